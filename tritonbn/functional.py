"""The public functional ops: tritonbn.batch_norm, a drop-in for torch.nn.functional.batch_norm
that can also fuse the residual add and activation that follow it, in cuDNN's spatial or
per-activation mode; and tritonbn.batch_renorm, Batch Renormalization on the same kernels."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from . import ops
from .validate import check_batch_norm_args, check_epilogue_args, check_renorm_args

__all__ = ["batch_norm", "batch_renorm"]

MODES = ("spatial", "per_activation")


def _flat(t: Optional[Tensor], c: int) -> Optional[Tensor]:
    # torch accepts any parameter with C elements, e.g. shape (1, C); the kernels index it flat.
    return t if t is None or t.dim() == 1 else t.reshape(c)


def _run(input, running_mean, running_var, weight, bias, training, momentum, eps, residual,
         activation, negative_slope, renorm=False, rmax=1.0, dmax=0.0):
    c = input.shape[1]
    y, _mean, _invstd, _rd = ops.BatchNormFunction.apply(
        input, _flat(weight, c), _flat(bias, c), _flat(running_mean, c), _flat(running_var, c),
        bool(training), float(momentum), float(eps), residual, activation or "",
        float(negative_slope), bool(renorm), float(rmax), float(dmax))
    return y


def _per_activation(input, params, residual, run):
    """Batch norm over the batch only, one statistic per (channel, position) feature.

    The input becomes a 2-D (N, features) batch without copying: contiguous inputs in
    (C, *spatial) feature order; channels-last inputs in memory order (*spatial, C), with the
    parameters and running statistics (C * S elements, not activations) permuted to match and
    the running statistics written back.
    """
    n, c, spatial = input.shape[0], input.shape[1], tuple(input.shape[2:])
    s = math.prod(spatial)
    channels_last = input.dim() > 2 and not input.is_contiguous() and input.permute(
        0, *range(2, input.dim()), 1).is_contiguous()
    if not channels_last:
        x2 = input.contiguous().reshape(n, c * s)
        r2 = None if residual is None else residual.contiguous().reshape(n, c * s)
        return run(x2, *(None if p is None else p.reshape(c * s) for p in params), r2).reshape(input.shape)
    to_last = (0, *range(2, input.dim()), 1)
    x2 = input.permute(to_last).reshape(n, s * c)
    r2 = None if residual is None else residual.permute(to_last).reshape(n, s * c)
    permuted = [None if p is None else p.reshape(c, s).t().reshape(s * c) for p in params]
    rm, rv = params[0], params[1]
    if rm is not None:  # the permuted running stats are copies: update them, then write back
        permuted[0], permuted[1] = permuted[0].clone(), permuted[1].clone()
    y2 = run(x2, *permuted, r2)
    if rm is not None:
        with torch.no_grad():
            rm.reshape(c, s).copy_(permuted[0].reshape(s, c).t())
            rv.reshape(c, s).copy_(permuted[1].reshape(s, c).t())
    back = (0, input.dim() - 1, *range(1, input.dim() - 1))
    return y2.reshape(n, *spatial, c).permute(back)


def batch_norm(input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
               weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
               training: bool = False, momentum: float = 0.1, eps: float = 1e-5, *,
               activation: Optional[str] = None, negative_slope: float = 0.01,
               residual: Optional[Tensor] = None, mode: str = "spatial") -> Tensor:
    """Batch normalization with the signature and semantics of torch.nn.functional.batch_norm.

    ``input`` is (N, C, ...) in float16, bfloat16, float32 (or float64); contiguous,
    channels_last / channels_last_3d or strided. Statistics are reduced in float32 (float64 for
    float64 input). In training the batch statistics normalize the input and, when given,
    ``running_mean`` / ``running_var`` are updated in place by the kernels with
    ``momentum`` and the unbiased batch variance. Parameters and running statistics may be
    float32 or the input's dtype. The output has the input's dtype and torch's memory format.

    Keyword-only extensions, fused into the same kernels (forward and backward):
      * ``residual``: a tensor shaped like the input, added after the affine transform;
      * ``activation``: applied last -- "relu", "relu6", "leaky_relu" (``negative_slope``),
        "silu", "gelu", "gelu_tanh", "hardswish", "sigmoid", "tanh";
      * ``mode``: "spatial" (statistics per channel, the default) or "per_activation"
        (cuDNN's BATCHNORM_MODE_PER_ACTIVATION: statistics over the batch only, per
        (channel, position); weight, bias and running statistics then have C * prod(spatial)
        elements, e.g. shape (C, H, W)).
    """
    check_epilogue_args(input, activation, negative_slope, residual)
    if mode not in MODES:
        raise ValueError(f"batch_norm: mode must be one of {MODES}, got {mode!r}")
    if mode == "per_activation" and isinstance(input, Tensor) and input.dim() > 2:
        check_batch_norm_args(input, running_mean, running_var, weight, bias, training, momentum,
                              eps, per_activation=True)

        def run(x2, rm, rv, w, b, r2):
            return _run(x2, rm, rv, w, b, training, momentum, eps, r2, activation, negative_slope)
        return _per_activation(input, (running_mean, running_var, weight, bias), residual, run)
    check_batch_norm_args(input, running_mean, running_var, weight, bias, training, momentum, eps)
    return _run(input, running_mean, running_var, weight, bias, training, momentum, eps, residual,
                activation, negative_slope)


def batch_renorm(input: Tensor, running_mean: Tensor, running_var: Tensor,
                 weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                 training: bool = False, momentum: float = 0.1, eps: float = 1e-5,
                 rmax: float = 3.0, dmax: float = 5.0, *, activation: Optional[str] = None,
                 negative_slope: float = 0.01, residual: Optional[Tensor] = None) -> Tensor:
    """Batch Renormalization (Ioffe, 2017) in training, batch norm with running stats in eval.

    y = gamma * (x_hat * r + d) + beta with r = clip(sigma_B / sigma, 1/rmax, rmax) and
    d = clip((mean_B - running_mean) / sigma, -dmax, dmax), sigma = sqrt(running_var + eps),
    measured before this step's running update and treated as constants in backward. The
    running statistics follow torch's batch norm (momentum, unbiased variance). rmax=1, dmax=0
    is plain batch norm.
    """
    check_epilogue_args(input, activation, negative_slope, residual)
    check_batch_norm_args(input, running_mean, running_var, weight, bias, training, momentum, eps)
    check_renorm_args(running_mean, rmax, dmax)
    return _run(input, running_mean, running_var, weight, bias, training, momentum, eps, residual,
                activation, negative_slope, renorm=True, rmax=rmax, dmax=dmax)
