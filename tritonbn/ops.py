"""The batch-norm op: torch.library custom ops (for tracers) and their autograd.

``tritonbn::batch_norm_forward`` and ``tritonbn::batch_norm_backward`` are functional: their
schemas, fake kernels and gradient tuples all come from the argument descriptions in
tritonbn/options.py, and the forward returns the new values of the tensors it updates (running
statistics, batch counters, overflow counters) instead of mutating them; ``batch_norm`` copies
them back. A functional op costs torch.compile far less host time per call than a mutating one,
and inductor places the copies itself.

With ``TRITONBN_COMPILED=triton_op`` torch.compile gets their twins
``tritonbn::batch_norm_forward_traced`` / ``_backward_traced`` instead: ``torch.library.triton_op``
ops with the same schemas, whose bodies (the same launchers) the compiler traces, so its graph
holds the kernels themselves.

Plain eager calls skip the custom ops (``_direct``): the same launchers run directly and update
the tensors in place, inside ``EagerFunction``, whose only output is y. Tracers see
``BatchNormFunction``, which returns the new values too; forward-mode AD and functorch
transforms get ``ForwardModeFunction``. All three share the saving (``_save``) and the backward
(``_backward``).
"""
from __future__ import annotations

import inspect
from dataclasses import replace
from typing import Optional

import torch
from torch import Tensor
from torch.autograd import forward_ad

from . import _runtime, activations, launch
from .layout import empty_output, output_memory_format, plane_view
from .options import (BACKWARD_ARGS, BACKWARD_OUTPUTS, BACKWARD_SCALARS, FORWARD_ARGS,
                      FORWARD_OUTPUTS, FORWARD_SCALARS, UPDATED, BackwardArgs, ForwardArgs,
                      Options, schema)

__all__ = ["batch_norm_forward", "batch_norm_backward", "batch_norm_forward_traced",
           "batch_norm_backward_traced", "BatchNormFunction",
           "ForwardModeFunction", "EagerFunction", "tangent", "batch_norm_op",
           "inplace_abn_op", "writes_in_place"]

_N_FWD = len(FORWARD_ARGS)


def _fill(outputs, likes) -> tuple:
    """Custom ops return tensors: an output the op did not make is an empty tensor of the dtype
    its fake kernel gives (``likes``: one tensor per output)."""
    return tuple(like.new_empty((0,)) if t is None else t for t, like in zip(outputs, likes))


def _forward_impl(*args) -> tuple:
    a, o = ForwardArgs(*args[:_N_FWD]), Options.decode(args[_N_FWD])
    out = launch.forward(a, o, in_place=False)
    stats = a.input.new_empty((0,), dtype=launch.acc_dtype(a.input.dtype))
    return _fill(out, (a.input, stats, stats, stats) + (a.input,) * (len(out) - 4))


def _forward_fake(*args) -> tuple:
    a, o = ForwardArgs(*args[:_N_FWD]), Options.decode(args[_N_FWD])
    x = a.input
    c = x.shape[1]
    acc = launch.acc_dtype(x.dtype)
    updated = launch.updated_names(o)
    new = [getattr(a, name) if name in updated else None for name in UPDATED]
    return (empty_output(x), x.new_empty((c,), dtype=acc), x.new_empty((c,), dtype=acc),
            x.new_empty((2, c) if o.renorming else (0,), dtype=acc),
            *(x.new_empty((0,)) if t is None else t.new_empty((t.numel(),)) for t in new))


batch_norm_forward = torch.library.custom_op(
    "tritonbn::batch_norm_forward", _forward_impl, mutates_args=(),
    schema=schema(FORWARD_ARGS, FORWARD_SCALARS, FORWARD_OUTPUTS))
batch_norm_forward.register_fake(_forward_fake)


def _backward_impl(*args) -> tuple:
    a = BackwardArgs(*args[:len(BACKWARD_ARGS)])
    o, param_grads = Options.decode(args[-2]), args[-1]
    return _fill(launch.backward(a, o, param_grads), (a.input, a.save_mean, a.save_mean, a.input))


def _backward_fake(*args) -> tuple:
    a = BackwardArgs(*args[:len(BACKWARD_ARGS)])
    o = Options.decode(args[-2])
    dres = empty_output(a.residual) if a.residual is not None and o.activation else \
        a.input.new_empty((0,))
    return (empty_output(a.input), torch.empty_like(a.save_mean), torch.empty_like(a.save_mean),
            dres)


batch_norm_backward = torch.library.custom_op(
    "tritonbn::batch_norm_backward", _backward_impl, mutates_args=(),
    schema=schema(BACKWARD_ARGS, BACKWARD_SCALARS, BACKWARD_OUTPUTS))
batch_norm_backward.register_fake(_backward_fake)


def _backward_vmap(info, in_dims, *args) -> tuple:
    """vmap (jacrev, jacfwd's batched tangents): one backward per slice of the batched
    arguments, stacked. Each slice is a whole batch norm, so there is no cheaper batching."""
    outputs = []
    for i in range(info.batch_size):
        outputs.append(batch_norm_backward(*(
            a if d is None else a.select(d, i) for a, d in zip(args, in_dims))))
    return tuple(torch.stack(o) for o in zip(*outputs)), (0,) * len(outputs[0])


batch_norm_backward.register_vmap(_backward_vmap)


# ------------------------------------------------- the same ops as torch.compile may trace them

def _traceable(name: str, impl, args, scalars, outputs):
    """``tritonbn::<name>`` as a ``torch.library.triton_op`` whose body is ``impl`` -- the
    launchers, which launch through ``wrap_triton`` when their tensors are traced
    (tritonbn/launch/run.py). torch.compile traces the body instead of calling it, so its graph
    holds the kernels as user-defined Triton kernels. The body's signature, from which
    triton_op takes the schema, is the op's, written from the argument descriptions."""
    def body(*values):
        return impl(*values)

    P, optional = inspect.Parameter, Optional[Tensor]
    params = [P(a.name, P.POSITIONAL_OR_KEYWORD, annotation=Tensor if a.required else optional)
              for a in args]
    params += [P(n, P.POSITIONAL_OR_KEYWORD, annotation={"str": str, "bool": bool}[ty])
               for n, ty in scalars]
    body.__signature__ = inspect.Signature(params, return_annotation=tuple[(Tensor,) * len(
        outputs)])
    return torch.library.triton_op(f"tritonbn::{name}", body, mutates_args=())


batch_norm_forward_traced = _traceable("batch_norm_forward_traced", _forward_impl,
                                       FORWARD_ARGS, FORWARD_SCALARS, FORWARD_OUTPUTS)
batch_norm_backward_traced = _traceable("batch_norm_backward_traced", _backward_impl,
                                        BACKWARD_ARGS, BACKWARD_SCALARS, BACKWARD_OUTPUTS)


def _traced_ops(o: Options) -> bool:
    """Whether a tracer gets the triton_op form: under torch.compile, when chosen
    (``TRITONBN_COMPILED=triton_op``), and not for synchronized statistics, whose collectives
    stay inside the custom op."""
    return torch.compiler.is_compiling() and _runtime.compiled_form() == "triton_op" \
        and o.group is None


# ---------------------------------------------------------------------------------- autograd

def _direct(t: Tensor) -> bool:
    """Whether a call may run the launchers itself instead of the registered custom ops.

    The custom ops are what tracers need: torch.compile, export, FakeTensor / functional / proxy
    tracing, dispatch modes (FlopCounterMode, the tests' op logs) and functorch transforms all
    see one opaque op with its fake kernel. Plain eager calls skip them: torch's Python custom-op
    wrapper re-reads the schema on every call. ``is_compiling`` comes first so Dynamo folds the
    test to False without tracing the other checks.
    """
    return not torch.compiler.is_compiling() and type(t) is Tensor and not t.is_meta \
        and torch._C._len_torch_dispatch_stack() == 0 \
        and not torch._C._are_functorch_transforms_active() \
        and not torch._C._get_tracing_state()  # torch.jit.trace: sizes are traced values


def _saved_for(o: Options, a: ForwardArgs, outputs) -> tuple:
    """What backward (and forward mode) needs: x, the parameters, the residual (only to
    recompute the activation's input) and the float32 statistics. In-place activated batch norm
    (``Options.invertible``) saves y instead of x, and the residual to recover x from it."""
    y, save_mean, save_invstd, save_rd = outputs[:4]
    return (y if o.invertible else a.input, a.weight, a.bias,
            a.residual if o.activation or o.invertible else None, save_mean, save_invstd,
            save_rd)


def _save(ctx, o: Options, a: ForwardArgs, outputs) -> None:
    """Save for backward; non-tensor facts on ctx."""
    ctx.save_for_backward(*_saved_for(o, a, outputs))
    ctx.options = o
    ctx.res_dtype = None if a.residual is None else a.residual.dtype


def _backward_kernels(b: BackwardArgs, o: Options, param_grads: bool) -> tuple:
    """(grad_input, grad_weight, grad_bias, grad_residual): the launchers directly, or the
    custom op under tracers and transforms. With create_graph=True the backward itself is
    recorded: the op then raises autograd's clear "no autograd formula" error, where the kernels
    would return gradients without history and so silently drop the second-order terms."""
    if _direct(b.grad_output) and not torch.is_grad_enabled():
        return launch.backward(b, o, param_grads)
    if _forward_mode():
        return BackwardOpFunction.apply(o.encode(), param_grads, *b)
    if _traced_ops(o):
        return batch_norm_backward_traced(*b, o.encode(), param_grads)
    return batch_norm_backward(*b, o.encode(), param_grads)


class BackwardOpFunction(torch.autograd.Function):
    """The backward op where forward-mode AD may reach it (``torch.func.hessian``,
    ``jacfwd(jacrev(f))``, a dual tensor as grad_output): it has no derivative of its own, so
    such a call raises instead of returning gradients whose tangents are silently zero."""

    generate_vmap_rule = True

    @staticmethod
    def forward(options: str, param_grads: bool, *tensors):
        return batch_norm_backward(*tensors, options, param_grads)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def jvp(ctx, *tangents):
        raise NotImplementedError("tritonbn: forward-mode AD through batch norm's backward "
                                  "(e.g. torch.func.hessian, jacfwd(jacrev(f))) is not "
                                  "implemented; first-order jvp / jacfwd / jacrev are")

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError("tritonbn: double backward through batch norm is not implemented")


# The differentiable arguments: FORWARD_ARGS's first ones (input, weight, bias, residual).
_N_GRAD = sum(a.grad for a in FORWARD_ARGS)
assert all(a.grad for a in FORWARD_ARGS[:_N_GRAD])
# Where each gradient goes in the tuple autograd expects: for (options, *FORWARD_ARGS) --
# BatchNormFunction's and ForwardModeFunction's arguments -- and for (options, args,
# over_input, *the differentiable ones) -- EagerFunction's.
_FLAT = ({a.name: 1 + i for i, a in enumerate(FORWARD_ARGS) if a.grad},
         (None,) * (1 + len(FORWARD_ARGS)))
_EAGER = ({a.name: 3 + i for i, a in enumerate(FORWARD_ARGS[:_N_GRAD])}, (None,) * (3 + _N_GRAD))


def _backward(ctx, grad_y, form: tuple) -> tuple:
    """The gradient tuple for the Function's arguments (``form``: _FLAT or _EAGER), built from
    the argument descriptions."""
    input, weight, bias, residual, save_mean, save_invstd, save_rd = ctx.saved_tensors
    o: Options = ctx.options
    needs = ctx.needs_input_grad
    slots, no_grads = form
    b = BackwardArgs(grad_y, input, weight, bias, residual, save_mean, save_invstd, save_rd)
    need_w, need_b = needs[slots["weight"]], needs[slots["bias"]]
    dx, dw, db, dres = _backward_kernels(b, o, need_w or need_b)
    grads = list(no_grads)
    if needs[slots["input"]]:
        grads[slots["input"]] = dx
    if need_w:
        grads[slots["weight"]] = dw if dw.dtype is weight.dtype else dw.to(weight.dtype)
    if need_b:
        grads[slots["bias"]] = db if db.dtype is bias.dtype else db.to(bias.dtype)
    if needs[slots["residual"]]:
        # y = BN(x) + residual without an activation: the residual's gradient is grad_y
        g = dres if o.activation else grad_y
        grads[slots["residual"]] = g if g.dtype is ctx.res_dtype else g.to(ctx.res_dtype)
    return tuple(grads)


def _run_forward(o: Options, a: ForwardArgs) -> tuple:
    """The forward without autograd: the launchers directly (updating in place), or, for
    tracers, the custom op (whose new values the caller copies back)."""
    if _direct(a.input):
        return launch.forward(a, o, in_place=True)   # (which bumps what it updated)
    if _traced_ops(o):
        return batch_norm_forward_traced(*a, o.encode())
    return batch_norm_forward(*a, o.encode())


def _needs_grad(a: ForwardArgs) -> bool:
    return torch.is_grad_enabled() and (
        a.input.requires_grad or (a.weight is not None and a.weight.requires_grad)
        or (a.bias is not None and a.bias.requires_grad)
        or (a.residual is not None and a.residual.requires_grad))


class BatchNormFunction(torch.autograd.Function):
    """Autograd for the op where tracers see it: forward(options, *FORWARD_ARGS) -> (y, *new
    values); only y is differentiable.

    Under tracers the forward is the custom op, whose ``new_`` outputs ``batch_norm_op`` copies
    back. A torch.jit trace records this Function and replays it eagerly: the launchers then
    run directly, update the tensors in place and return None for the new values, the same
    arity. (Plain eager calls take EagerFunction.) The forward takes ``ctx`` (the classic form):
    autograd then binds its arguments without ``inspect.signature``, which costs the form with
    ``setup_context`` about 15 us per call."""

    @staticmethod
    def forward(ctx, o: Options, *tensors):
        a = ForwardArgs(*tensors)
        out = _run_forward(o, a)
        _save(ctx, o, a, out)
        if out[4] is not None:
            ctx.mark_non_differentiable(*out[4:])
        return (out[0], *out[4:])

    @staticmethod
    def backward(ctx, grad_y, *_grads_of_the_rest):
        return _backward(ctx, grad_y, _FLAT)


class EagerFunction(torch.autograd.Function):
    """Autograd for the op in a plain eager call (``_direct``): forward(options, args,
    over_input, input, weight, bias, residual) -> y. ``args`` is the call's ForwardArgs, passed
    whole so that autograd handles only the tensors it differentiates; the launchers update the
    others in place, so y is the only output. ``over_input``: in-place activated batch norm
    writes y over x, which is marked dirty and returned (only y, x's storage, and the
    statistics are saved; the backward recovers x_hat from y). About 1 us less host time per
    training step than BatchNormFunction's ten tensor arguments and six outputs."""

    @staticmethod
    def forward(ctx, o: Options, a: ForwardArgs, over_input: bool, *_differentiable):
        if over_input:
            out = _forward_over_input(o, a)
            ctx.mark_dirty(a.input)
        else:
            out = launch.forward(a, o, in_place=True)   # (which bumps what it updated)
        _save(ctx, o, a, out)
        return out[0]

    @staticmethod
    def backward(ctx, grad_y):
        return _backward(ctx, grad_y, _EAGER)


class ForwardModeFunction(torch.autograd.Function):
    """The same autograd with forward-mode AD (``torch.func.jvp`` / ``jacfwd``,
    ``torch.autograd.forward_ad`` dual tensors), in the form functorch transforms need
    (``setup_context``); used only while forward-mode AD or a functorch transform is active, so
    eager and compiled calls keep the plain Function. forward(options, *FORWARD_ARGS) ->
    (y, save_mean, save_invstd, save_rd, *new values)."""

    generate_vmap_rule = True       # jacfwd vmaps the jvp over basis tangents

    @staticmethod
    def forward(o: Options, *tensors):
        # The new values are copied back here, below the transforms' levels, where the running
        # statistics are the caller's own tensors (a copy outside would write a transformed
        # value into a captured tensor, which functorch refuses).
        a = ForwardArgs(*tensors)
        out = _run_forward(o, a)
        _copy_back(o, a, out[4:])
        return (*out[:4], *(None for _ in UPDATED))

    @staticmethod
    def setup_context(ctx, inputs, output):
        o, a = inputs[0], ForwardArgs(*inputs[1:])
        _save(ctx, o, a, output)
        ctx.save_for_forward(*_saved_for(o, a, output))
        ctx.mark_non_differentiable(*(t for t in output[1:] if t is not None))

    @staticmethod
    def backward(ctx, grad_y, *_grads_of_the_rest):
        return _backward(ctx, grad_y, _FLAT)

    @staticmethod
    def jvp(ctx, _options_tangent, *tangents):
        ty = tangent(ctx.options, ctx.saved_tensors, ForwardArgs(*tangents))
        return (ty, *(None for _ in FORWARD_OUTPUTS[1:]))


def tangent(o: Options, saved: tuple, t: ForwardArgs) -> Tensor | None:
    """The forward-mode derivative of y = act(z), z = gamma * (x_hat * r + d) + beta + residual,
    for input tangents ``t`` (None where an input has none).

    x's part is the batch-norm Jacobian applied to t.input. That Jacobian (of x_hat, times the
    per-channel gamma * r) is symmetric -- invstd * (I - 1 1^T / M - x_hat x_hat^T / M) per
    channel in training, invstd * I in eval -- so it is what the backward kernels compute with
    t.input as the incoming gradient, without the activation (whose derivative comes after, here,
    not before as in the backward). The parameters' and the residual's parts are per-element
    products; act'(z) multiplies the sum. All in the statistics' dtype, rounded once into y's.
    """
    x, weight, bias, residual, mean, invstd, rd = saved
    if o.group is not None:
        raise NotImplementedError("tritonbn: forward-mode AD (jvp, jacfwd, forward_ad dual "
                                  "tensors) of synchronized batch norm is not implemented")
    if x.numel() == 0 or all(v is None for v in t):
        return empty_output(x).zero_() if x.numel() == 0 else None
    acc = mean.dtype
    shape = [1, x.shape[1]] + [1] * (x.dim() - 2)
    renorm = rd is not None and rd.numel() > 0
    x_hat = (x.to(acc) - mean.view(shape)) * invstd.view(shape)
    normalized = x_hat * rd[0].view(shape) + rd[1].view(shape) if renorm else x_hat
    dz = torch.zeros((), dtype=acc, device=x.device)
    if t.input is not None:
        b = BackwardArgs(t.input, x, weight, None, None, mean, invstd, rd if renorm else None)
        dz = dz + _backward_kernels(b, replace(o, activation=None), False)[0].to(acc)
    if t.weight is not None:
        dz = dz + t.weight.to(acc).reshape(shape) * normalized
    if t.bias is not None:
        dz = dz + t.bias.to(acc).reshape(shape)
    if t.residual is not None:
        dz = dz + t.residual.to(acc)
    if o.activation is not None:
        z = normalized if weight is None else normalized * weight.to(acc).reshape(shape)
        if bias is not None:
            z = z + bias.to(acc).reshape(shape)
        if residual is not None:
            z = z + residual.to(acc)
        dz = dz * activations.derivative(z, o.activation, o.negative_slope)
    # out of place: under jacfwd the tangents are batched and x is not
    return dz.expand(x.shape).to(x.dtype).contiguous(memory_format=output_memory_format(x))


def _forward_mode() -> bool:
    """Forward-mode AD or a functorch transform is active (a dual tensor may be among the
    arguments: they are not told apart from plain tensors cheaply)."""
    return not torch.compiler.is_compiling() and (
        forward_ad._current_level >= 0 or torch._C._are_functorch_transforms_active())


def batch_norm_op(o: Options, a: ForwardArgs) -> Tensor:
    """Run the forward, with autograd when a gradient is wanted; returns y. The tensors the op
    updates hold their new values afterwards, whichever path ran."""
    if _forward_mode():
        if o.invertible:
            raise NotImplementedError("tritonbn: forward-mode AD (jvp, jacfwd, forward_ad dual "
                                      "tensors) of in-place activated batch norm is not "
                                      "implemented; use tritonbn.batch_norm with the activation")
        out = ForwardModeFunction.apply(o, *a)
        new = out[4:]
    elif _needs_grad(a):
        if _direct(a.input):
            return EagerFunction.apply(o, a, False, *a[:_N_GRAD])
        out = BatchNormFunction.apply(o, *a)
        new = out[1:]
    else:
        out = _run_forward(o, a)
        new = out[4:]
    _copy_back(o, a, new)
    return out[0]


def writes_in_place(x: Tensor, residual: Optional[Tensor] = None) -> bool:
    """Whether in-place activated batch norm may write y over x: a plain eager call (tracers
    get the functional op, and the compiler plans the memory); neither a leaf that requires
    grad nor a view of one (autograd forbids writing into them); strides the kernels can write
    through (a plane view) with no two elements at one address (an expanded view: a program
    could read an element another one already overwrote); and no residual in x's storage (the
    backward reads the residual, which the write would change)."""
    if not _direct(x) or plane_view(x.shape, [x]) is None \
            or torch._debug_has_internal_overlap(x) != 0:
        return False
    if residual is not None and \
            residual.untyped_storage().data_ptr() == x.untyped_storage().data_ptr():
        return False
    if not x.requires_grad:
        return True
    base = x._base if x._is_view() else x
    return not (base.is_leaf and base.requires_grad)


def inplace_abn_op(o: Options, a: ForwardArgs) -> Tensor:
    """In-place activated batch norm (``o.invertible``): y over x where ``writes_in_place``
    allows, else a new y; either way only y is saved for backward. Returns y."""
    if _forward_mode() or not writes_in_place(a.input, a.residual):
        return batch_norm_op(o, a)          # (forward mode raises its clear error there)
    if _needs_grad(a):
        return EagerFunction.apply(o, a, True, *a[:_N_GRAD])
    return _forward_over_input(o, a)[0]


def _forward_over_input(o: Options, a: ForwardArgs) -> tuple:
    """The launchers writing y over x (x's version bumped there too: a node that saved x before
    it was overwritten raises instead of reading y)."""
    return launch.forward(a, o, in_place=True, out=a.input)


def _copy_back(o: Options, a: ForwardArgs, new: tuple) -> None:
    """The custom op returned the new values of the tensors it updates: copy them back (the
    launchers called directly updated them in place and returned None)."""
    if new[0] is None:
        return
    with torch.no_grad():
        for name, t in zip(UPDATED, new):
            given = getattr(a, name)
            # (the table, not the cached updated_names: this runs under torch.compile too)
            if given is not None and launch.UPDATES[name](o):
                given.copy_(t.view(given.shape))
