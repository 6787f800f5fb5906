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


def _fill(outputs, like: Tensor) -> tuple:
    """Custom ops return tensors: an update the op did not make is an empty tensor."""
    return tuple(like.new_empty((0,)) if t is None else t for t in outputs)


def _forward_impl(*args) -> tuple:
    a, o = ForwardArgs(*args[:_N_FWD]), Options.decode(args[_N_FWD])
    return _fill(launch.forward(a, o, in_place=False), a.input)


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
    return launch.backward(a, o, param_grads)


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
    ctx.mark_non_differentiable(*(t for t in outputs[1:] if isinstance(t, Tensor)))
    ctx.save_for_backward(a.input, a.weight, a.bias,
                          a.residual if o.activation else None, save_mean, save_invstd, save_rd)
    ctx.options = o
    ctx.res_dtype = None if a.residual is None else a.residual.dtype


def _backward(ctx, grad_y) -> tuple:
    """The gradient tuple for (options, *FORWARD_ARGS), built from the argument descriptions."""
    input, weight, bias, residual, save_mean, save_invstd, save_rd = ctx.saved_tensors
    o: Options = ctx.options
    needs = dict(zip((a.name for a in FORWARD_ARGS), ctx.needs_input_grad[1:]))
    b = BackwardArgs(grad_y, input, weight, bias, residual, save_mean, save_invstd, save_rd)
    param_grads = needs["weight"] or needs["bias"]
    # With create_graph=True the backward itself is recorded: the op then raises autograd's
    # clear "no autograd formula" error, where the kernels would return gradients without
    # history and so silently drop the second-order terms.
    if _direct(grad_y) and not torch.is_grad_enabled():
        dx, dw, db, dres = launch.backward(b, o, param_grads)
    else:
        dx, dw, db, dres = batch_norm_backward(*b, o.encode(), param_grads)
    grads = {"input": dx,
             "weight": dw.to(weight.dtype) if needs["weight"] else None,
             "bias": db.to(bias.dtype) if needs["bias"] else None,
             # y = BN(x) + residual without an activation: the residual's gradient is grad_y
             "residual": (dres if o.activation else grad_y).to(ctx.res_dtype)
             if needs["residual"] else None}
    return (None, *(grads.get(a.name) if a.grad and needs[a.name] else None
                    for a in FORWARD_ARGS))


class BatchNormFunction(torch.autograd.Function):
    """Autograd for the op: forward(options, *FORWARD_ARGS) -> FORWARD_OUTPUTS.

    Plain eager calls run the launchers directly, which update the tensors in place (the
    ``new_`` outputs are then None); under tracers the forward is the custom op, whose ``new_``
    outputs ``batch_norm_op`` copies back."""

    @staticmethod
    def forward(ctx, o: Options, *tensors):
        a = ForwardArgs(*tensors)
        if _direct(a.input):
            out = launch.forward(a, o, in_place=True)
            # The kernels wrote raw memory: bump the version counters as an in-place op
            # would, so autograd still catches a saved running statistic modified afterwards.
            increment_version([t for name in UPDATED if launch.UPDATES[name](o)
                               and (t := getattr(a, name)) is not None])
        else:
            out = batch_norm_forward(*tensors, o.encode())
        _save(ctx, o, a, out)
        return out

    @staticmethod
    def backward(ctx, grad_y, *_grads_of_the_rest):
        return _backward(ctx, grad_y)


def batch_norm_op(o: Options, a: ForwardArgs) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Run the forward with autograd: (y, save_mean, save_invstd, save_rd). The tensors the op
    updates hold their new values afterwards, whichever path ran."""
    out = BatchNormFunction.apply(o, *a)
    with torch.no_grad():
        for name, new in zip(UPDATED, out[4:]):
            given = getattr(a, name)
            if new is not None and given is not None and launch.UPDATES[name](o):
                given.copy_(new.view(given.shape))     # the custom op's new values
    return out[:4]
