"""torch.library custom ops for batch norm, with fake (meta) kernels, and their autograd.

``tritonbn::batch_norm_forward`` mutates the running statistics in place (declared in
mutates_args, so torch.compile functionalizes it); ``tritonbn::batch_norm_backward`` is pure.
Both run the Triton kernels, except for CPU tensors with the interpreter off, which take the
float64 reference path (tritonbn.reference) -- documented in the README.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import dispatch, launch, reference
from .layout import output_memory_format

__all__ = ["batch_norm_forward", "batch_norm_backward", "BatchNormFunction"]


def _use_reference(t: Tensor) -> bool:
    return t.device.type == "cpu" and not dispatch.interpreter_enabled()


@torch.library.custom_op("tritonbn::batch_norm_forward", mutates_args=("running_mean", "running_var"))
def batch_norm_forward(input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                       running_mean: Optional[Tensor], running_var: Optional[Tensor],
                       training: bool, momentum: float, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """(y, save_mean, save_invstd); save_* are float32 (float64 for float64 input)."""
    if _use_reference(input):
        y, mean, invstd = reference.batch_norm_reference(
            input, running_mean, running_var, weight, bias, training, momentum, eps)
        acc = launch.acc_dtype(input.dtype)
        out = torch.empty_like(input, memory_format=output_memory_format(input))
        return out.copy_(y), mean.to(acc), invstd.to(acc)
    return launch.forward(input, weight, bias, running_mean, running_var, training, momentum, eps)


@batch_norm_forward.register_fake
def _(input, weight, bias, running_mean, running_var, training, momentum, eps):
    acc = launch.acc_dtype(input.dtype)
    c = input.shape[1]
    y = torch.empty_like(input, memory_format=output_memory_format(input))
    return y, input.new_empty((c,), dtype=acc), input.new_empty((c,), dtype=acc)


@torch.library.custom_op("tritonbn::batch_norm_backward", mutates_args=())
def batch_norm_backward(grad_out: Tensor, input: Tensor, weight: Optional[Tensor],
                        save_mean: Tensor, save_invstd: Tensor, training: bool,
                        param_grads: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(grad_input, grad_weight, grad_bias); the last two in the statistics dtype."""
    if _use_reference(input):
        dx, dw, db = reference.batch_norm_reference_backward(
            grad_out, input, weight, save_mean, save_invstd, training)
        out = torch.empty_like(input, memory_format=output_memory_format(input))
        return out.copy_(dx), dw.to(save_mean.dtype), db.to(save_mean.dtype)
    return launch.backward(grad_out, input, weight, save_mean, save_invstd, training, param_grads)


@batch_norm_backward.register_fake
def _(grad_out, input, weight, save_mean, save_invstd, training, param_grads):
    dx = torch.empty_like(input, memory_format=output_memory_format(input))
    return dx, torch.empty_like(save_mean), torch.empty_like(save_mean)


class BatchNormFunction(torch.autograd.Function):
    """Autograd for the forward op.

    A custom op that mutates its inputs (the running statistics) cannot carry a
    register_autograd formula, so autograd lives here; torch.compile traces through it.
    """

    @staticmethod
    def forward(input, weight, bias, running_mean, running_var, training, momentum, eps):
        return batch_norm_forward(input, weight, bias, running_mean, running_var,
                                  training, momentum, eps)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, weight, bias, _running_mean, _running_var, training, _momentum, _eps = inputs
        _y, save_mean, save_invstd = output
        ctx.mark_non_differentiable(save_mean, save_invstd)
        ctx.save_for_backward(input, weight, save_mean, save_invstd)
        ctx.training = training
        ctx.bias_dtype = bias.dtype if bias is not None else None

    @staticmethod
    def backward(ctx, grad_y, _grad_mean, _grad_invstd):
        input, weight, save_mean, save_invstd = ctx.saved_tensors
        need_w, need_b = ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        dx, dw, db = batch_norm_backward(grad_y, input, weight, save_mean, save_invstd,
                                         ctx.training, need_w or need_b)
        return (
            dx if ctx.needs_input_grad[0] else None,
            dw.to(weight.dtype) if need_w else None,
            db.to(ctx.bias_dtype) if need_b else None,
            None, None, None, None, None,
        )
