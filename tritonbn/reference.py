"""The float64 torch reference: one implementation shared by tests, benchmarks and profilers.

It is also the documented CPU path: a CPU tensor with the Triton interpreter off
(TRITON_INTERPRET unset) is computed here, in float64, and cast back to the input dtype.
"""
from __future__ import annotations

import torch

__all__ = ["batch_norm_reference", "batch_norm_reference_backward"]


def _channel_shape(x: torch.Tensor) -> list[int]:
    return [1, x.shape[1]] + [1] * (x.dim() - 2)


def _reduce_dims(x: torch.Tensor) -> list[int]:
    return [0] + list(range(2, x.dim()))


def batch_norm_reference(input, running_mean, running_var, weight=None, bias=None,
                         training=False, momentum=0.1, eps=1e-5):
    """Batch norm in float64. Returns (y, mean, invstd), all float64; y keeps autograd history.

    In training the running statistics are updated in place, torch's way: with the unbiased
    batch variance and ``running = (1 - momentum) * running + momentum * batch``.
    """
    x = input.double()
    shape = _channel_shape(x)
    count = x.numel() // x.shape[1] if x.shape[1] else 0
    if training:
        if count == 0:
            mean = x.new_zeros(x.shape[1])
            var = x.new_zeros(x.shape[1])
        else:
            mean = x.mean(_reduce_dims(x))
            var = x.var(_reduce_dims(x), unbiased=False)
        if running_mean is not None and count > 0:
            with torch.no_grad():
                unbiased = var.detach() * count / max(count - 1, 1)
                new_mean = (1 - momentum) * running_mean.double() + momentum * mean.detach()
                new_var = (1 - momentum) * running_var.double() + momentum * unbiased
                running_mean.copy_(new_mean.view_as(running_mean))
                running_var.copy_(new_var.view_as(running_var))
    else:
        mean = running_mean.detach().double().reshape(-1)
        var = running_var.detach().double().reshape(-1)
    invstd = torch.rsqrt(var + eps)
    y = (x - mean.view(shape)) * invstd.view(shape)
    if weight is not None:
        y = y * weight.double().reshape(shape)
    if bias is not None:
        y = y + bias.double().reshape(shape)
    return y, mean, invstd


def batch_norm_reference_backward(grad_out, input, weight, mean, invstd, training):
    """(grad_input, grad_weight, grad_bias) in float64 from the saved statistics."""
    x = input.double()
    dy = grad_out.double()
    shape = _channel_shape(x)
    dims = _reduce_dims(x)
    count = max(x.numel() // x.shape[1], 1) if x.shape[1] else 1
    xhat = (x - mean.double().view(shape)) * invstd.double().view(shape)
    sum_dy = dy.sum(dims)
    sum_dy_xhat = (dy * xhat).sum(dims)
    k = invstd.double() if weight is None else weight.double().reshape(-1) * invstd.double()
    if training:
        dx = k.view(shape) * (dy - (sum_dy / count).view(shape) - xhat * (sum_dy_xhat / count).view(shape))
    else:
        dx = k.view(shape) * dy
    return dx, sum_dy_xhat, sum_dy
