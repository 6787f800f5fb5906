"""The public functional ops: tritonbn.batch_norm, a drop-in for torch.nn.functional.batch_norm
that can also fuse the residual add and activation that follow it, in cuDNN's spatial or
per-activation mode; and tritonbn.batch_renorm, Batch Renormalization on the same kernels."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from . import ops
from .validate import check_batch_norm_args, check_epilogue_args, check_renorm_args

__all__ = ["batch_norm", "batch_renorm"]

MODES = ("spatial", "per_activation")
OVERFLOW_POLICIES = ("propagate", "saturate")
NONFINITE_POLICIES = ("propagate", "skip")


def _flat(t: Optional[Tensor], c: int) -> Optional[Tensor]:
    # torch accepts any parameter with C elements, e.g. shape (1, C); the kernels index it flat.
    return t if t is None or t.dim() == 1 else t.reshape(c)


@dataclass(frozen=True)
class _Guards:
    """The overflow options of one call (see batch_norm)."""
    saturate: bool = False
    skip_nonfinite: bool = False
    running_count: Optional[Tensor] = None
    overflow_count: Optional[Tensor] = None
    overflow_max: Optional[Tensor] = None


NO_GUARDS = _Guards()


def _guards(input, overflow, overflow_stats, nonfinite_stats, running_count) -> _Guards:
    if (overflow == "propagate" and nonfinite_stats == "propagate" and overflow_stats is None
            and running_count is None):
        return NO_GUARDS  # the common call: no dataclass to build (host time, see ops._direct)
    if overflow not in OVERFLOW_POLICIES:
        raise ValueError(f"batch_norm: overflow must be one of {OVERFLOW_POLICIES}, got {overflow!r}")
    if nonfinite_stats not in NONFINITE_POLICIES:
        raise ValueError(f"batch_norm: nonfinite_stats must be one of {NONFINITE_POLICIES}, "
                         f"got {nonfinite_stats!r}")
    c = input.shape[1]
    if overflow_stats is not None:
        overflow_stats.check(c, input.device)
    if running_count is not None and (running_count.numel() != c or running_count.dtype != torch.int64
                                      or running_count.device != input.device):
        raise RuntimeError(f"batch_norm: running_count must be an int64 tensor of {c} elements on "
                           f"{input.device}, got {running_count.dtype} {tuple(running_count.shape)} "
                           f"on {running_count.device}")
    return _Guards(overflow == "saturate", nonfinite_stats == "skip", running_count,
                   None if overflow_stats is None else overflow_stats.count,
                   None if overflow_stats is None else overflow_stats.max_abs)


def _run(input, running_mean, running_var, weight, bias, training, momentum, eps, residual,
         activation, negative_slope, renorm=False, rmax=1.0, dmax=0.0, guards=NO_GUARDS):
    c = input.shape[1]
    # Running statistics go as they are: the launchers (and the reference path) index any
    # C-element tensor flat and write a strided one back in place. Flattening them here would
    # update a copy when their strides allow no (C,) view.
    y, _mean, _invstd, _rd = ops.batch_norm_function(
        input, _flat(weight, c), _flat(bias, c), running_mean, running_var,
        bool(training), float(momentum), float(eps), residual, activation or "",
        float(negative_slope), bool(renorm), float(rmax), float(dmax), guards.saturate,
        guards.skip_nonfinite, guards.running_count, guards.overflow_count, guards.overflow_max)
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
        # parameters of any shape with C * S elements: _run hands them over (see there)
        return run(x2, *params, r2).reshape(input.shape)
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
               residual: Optional[Tensor] = None, mode: str = "spatial",
               overflow: str = "propagate", overflow_stats=None,
               nonfinite_stats: str = "propagate",
               running_count: Optional[Tensor] = None) -> Tensor:
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

    Half-precision guards (see tritonbn.overflow), decided in the kernels without host syncs:
      * ``overflow``: "propagate" (IEEE, like torch: finite results beyond the output dtype's
        range become inf) or "saturate" (they become +-max of the dtype, e.g. +-65504 for
        float16; NaN stays NaN), forward and backward, and for running statistics stored in
        half precision;
      * ``overflow_stats``: a tritonbn.overflow.OverflowStats that accumulates, per channel, the
        outputs that overflowed (or were saturated) and the largest |y|, in the same pass;
      * ``nonfinite_stats``: "skip" leaves a channel's running statistics (and its
        ``running_count``) untouched when its batch statistics are not finite;
      * ``running_count``: per-channel int64 batch counts for a cumulative running average
        (what momentum=None means in the modules), incremented in the kernel; momentum unused.
    """
    check_epilogue_args(input, activation, negative_slope, residual)
    if mode not in MODES:
        raise ValueError(f"batch_norm: mode must be one of {MODES}, got {mode!r}")
    if mode == "per_activation" and isinstance(input, Tensor) and input.dim() > 2:
        if overflow_stats is not None or running_count is not None:
            raise ValueError("batch_norm: overflow_stats and running_count are per channel: "
                             "mode='spatial' only")
        check_batch_norm_args(input, running_mean, running_var, weight, bias, training, momentum,
                              eps, per_activation=True)

        def run(x2, rm, rv, w, b, r2):
            guards = _guards(x2, overflow, None, nonfinite_stats, None)
            return _run(x2, rm, rv, w, b, training, momentum, eps, r2, activation, negative_slope,
                        guards=guards)
        return _per_activation(input, (running_mean, running_var, weight, bias), residual, run)
    check_batch_norm_args(input, running_mean, running_var, weight, bias, training, momentum, eps)
    guards = _guards(input, overflow, overflow_stats, nonfinite_stats, running_count)
    return _run(input, running_mean, running_var, weight, bias, training, momentum, eps, residual,
                activation, negative_slope, guards=guards)


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
