"""The batch-norm op: torch.library custom ops (for tracers) and their autograd.

``tritonbn::batch_norm_forward`` and ``tritonbn::batch_norm_backward`` are functional: their
schemas, fake kernels and gradient tuples all come from the argument descriptions in
tritonbn/options.py, and the forward returns the new values of the tensors it updates (running
statistics, batch counters, overflow counters) instead of mutating them; ``batch_norm`` copies
them back. A functional op costs torch.compile far less host time per call than a mutating one,
and inductor places the copies itself.

Plain eager calls skip the custom ops (``_direct``): the same launchers run directly and update
the tensors in place. Both run inside one autograd Function.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.graph import increment_version

from . import launch
from .layout import empty_output
from .options import (BACKWARD_ARGS, BACKWARD_OUTPUTS, BACKWARD_SCALARS, FORWARD_ARGS,
                      FORWARD_OUTPUTS, FORWARD_SCALARS, UPDATED, BackwardArgs, ForwardArgs,
                      Options, schema)

__all__ = ["batch_norm_forward", "batch_norm_backward", "BatchNormFunction", "batch_norm_op"]

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
    new = [getattr(a, name) if launch.UPDATES[name](o) else None for name in UPDATED]
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


# ---------------------------------------------------------------------------------- autograd

def _direct(t: Tensor) -> bool:
    """Whether a call may run the launchers itself instead of the registered custom ops.

    The custom ops are what tracers need: torch.compile, export, FakeTensor / functional / proxy
    tracing, dispatch modes (FlopCounterMode, the tests' op logs) and functorch transforms all
    see one opaque op with its fake kernel. Plain eager calls skip them: torch's Python custom-op
    wrapper re-reads the schema on every call. ``is_compiling`` comes first so Dynamo folds the
    test to False without tracing the other checks.
    """
    return not torch.compiler.is_compiling() and type(t) is Tensor \
        and t.device.type != "meta" \
        and torch._C._len_torch_dispatch_stack() == 0 \
        and not torch._C._are_functorch_transforms_active() \
        and not torch._C._get_tracing_state()  # torch.jit.trace: sizes are traced values


def _save(ctx, o: Options, a: ForwardArgs, outputs) -> None:
    """What backward needs: x, the parameters, the residual (only to recompute the activation's
    input) and the float32 statistics; non-tensor facts on ctx."""
    _y, save_mean, save_invstd, save_rd = outputs[:4]
    ctx.save_for_backward(a.input, a.weight, a.bias,
                          a.residual if o.activation else None, save_mean, save_invstd, save_rd)
    ctx.options = o
    ctx.res_dtype = None if a.residual is None else a.residual.dtype


# Where each gradient goes in the tuple autograd expects for (options, *FORWARD_ARGS).
_SLOTS = {a.name: 1 + i for i, a in enumerate(FORWARD_ARGS) if a.grad}
_NO_GRADS = (None,) * (1 + len(FORWARD_ARGS))


def _backward(ctx, grad_y) -> tuple:
    """The gradient tuple for (options, *FORWARD_ARGS), built from the argument descriptions."""
    input, weight, bias, residual, save_mean, save_invstd, save_rd = ctx.saved_tensors
    o: Options = ctx.options
    needs = ctx.needs_input_grad
    b = BackwardArgs(grad_y, input, weight, bias, residual, save_mean, save_invstd, save_rd)
    need_w, need_b = needs[_SLOTS["weight"]], needs[_SLOTS["bias"]]
    # With create_graph=True the backward itself is recorded: the op then raises autograd's
    # clear "no autograd formula" error, where the kernels would return gradients without
    # history and so silently drop the second-order terms.
    if _direct(grad_y) and not torch.is_grad_enabled():
        dx, dw, db, dres = launch.backward(b, o, need_w or need_b)
    else:
        dx, dw, db, dres = batch_norm_backward(*b, o.encode(), need_w or need_b)
    grads = list(_NO_GRADS)
    if needs[_SLOTS["input"]]:
        grads[_SLOTS["input"]] = dx
    if need_w:
        grads[_SLOTS["weight"]] = dw if dw.dtype is weight.dtype else dw.to(weight.dtype)
    if need_b:
        grads[_SLOTS["bias"]] = db if db.dtype is bias.dtype else db.to(bias.dtype)
    if needs[_SLOTS["residual"]]:
        # y = BN(x) + residual without an activation: the residual's gradient is grad_y
        g = dres if o.activation else grad_y
        grads[_SLOTS["residual"]] = g if g.dtype is ctx.res_dtype else g.to(ctx.res_dtype)
    return tuple(grads)


def _run_forward(o: Options, a: ForwardArgs) -> tuple:
    """The forward without autograd: the launchers directly (updating in place), or, for
    tracers, the custom op (whose new values the caller copies back)."""
    if _direct(a.input):
        out = launch.forward(a, o, in_place=True)
        # The kernels wrote raw memory: bump the version counters as an in-place op would, so
        # autograd still catches a saved running statistic modified afterwards.
        increment_version([t for name in UPDATED if launch.UPDATES[name](o)
                           and (t := getattr(a, name)) is not None])
        return out
    return batch_norm_forward(*a, o.encode())


def _needs_grad(a: ForwardArgs) -> bool:
    return torch.is_grad_enabled() and (
        a.input.requires_grad or (a.weight is not None and a.weight.requires_grad)
        or (a.bias is not None and a.bias.requires_grad)
        or (a.residual is not None and a.residual.requires_grad))


class BatchNormFunction(torch.autograd.Function):
    """Autograd for the op: forward(options, *FORWARD_ARGS) -> (y, *new values).

    Plain eager calls run the launchers directly, which update the tensors in place: the new
    values are None. Under tracers the forward is the custom op, whose ``new_`` outputs (not
    differentiable) ``batch_norm_op`` copies back. The arity is the same either way (a
    torch.jit trace replays the Function eagerly)."""

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
        return _backward(ctx, grad_y)


def batch_norm_op(o: Options, a: ForwardArgs) -> Tensor:
    """Run the forward, with autograd when a gradient is wanted; returns y. The tensors the op
    updates hold their new values afterwards, whichever path ran."""
    if _needs_grad(a):
        out = BatchNormFunction.apply(o, *a)
        y, new = out[0], out[1:]
    else:
        out = _run_forward(o, a)
        y, new = out[0], out[4:]
    if new[0] is not None:                  # the custom op: copy its new values back
        with torch.no_grad():
            for name, t in zip(UPDATED, new):
                given = getattr(a, name)
                if given is not None and launch.UPDATES[name](o):
                    given.copy_(t.view(given.shape))
    return y
