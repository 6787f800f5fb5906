"""The public functional ops: ``batch_norm``, a drop-in for torch.nn.functional.batch_norm that
can also fuse the residual add and activation after it, in cuDNN's spatial or per-activation
mode; ``batch_renorm``, Batch Renormalization; and ``sync_batch_norm``, statistics synchronized
across processes. Each validates its arguments, builds the call's ``Options`` and runs the op
(tritonbn/ops.py) through ``run``, which the modules call as well.
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from . import ops
from .options import MODES, ForwardArgs, Options
from .validate import check_options, check_scalars, check_tensors, float_momentum

__all__ = ["batch_norm", "batch_renorm", "sync_batch_norm", "inplace_abn", "inplace_abn_sync",
           "run", "options"]


@functools.lru_cache(maxsize=512)  # a few per model: building and checking costs ~2 us
def _cached_options(*fields) -> Options:
    o = Options(*fields)
    check_options(o)
    return o


# Calls whose scalars have exactly the types of a module's attributes (bool, float, str) find
# their Options here without re-checking them: checked once, when first built.
_by_arguments: dict = {}


def options(training: bool = False, momentum: Optional[float] = 0.1, eps: float = 1e-5,
            activation: Optional[str] = None, negative_slope: float = 0.01,
            renorm: Optional[tuple[float, float]] = None, warmup_steps: int = 0,
            overflow: str = "propagate", nonfinite_stats: str = "propagate",
            group: Optional[str] = None, invertible: bool = False) -> Options:
    """The checked Options of one call, from the public argument names and types (checked
    here, before they become canonical Python values). ``momentum=None``: the cumulative
    average."""
    args = (training, momentum, eps, activation, negative_slope, renorm, warmup_steps, overflow,
            nonfinite_stats, group, invertible)
    exact = (momentum is None or type(momentum) is float) and type(eps) is float \
        and type(negative_slope) is float
    if exact and not torch.compiler.is_compiling():
        found = _by_arguments.get(args)
        if found is not None and type(found.training) is type(training):
            return found
    check_scalars(training, momentum, eps, activation, negative_slope, overflow,
                  nonfinite_stats)
    fields = (training, None if momentum is None else float(momentum), float(eps),
              activation or None, float(negative_slope),
              None if renorm is None else (float(renorm[0]), float(renorm[1])),
              int(warmup_steps), overflow == "saturate", nonfinite_stats == "skip", group,
              bool(invertible))
    if torch.compiler.is_compiling():  # Dynamo folds it; the cache would only warn
        o = Options(*fields)
        check_options(o)
        return o
    o = _cached_options(*fields)
    if exact and len(_by_arguments) < 4096:
        _by_arguments[args] = o
    return o


def _flat(t: Optional[Tensor], numel: int) -> Optional[Tensor]:
    # torch accepts a parameter of any shape with C elements (e.g. (1, C)); the kernels index it
    # flat, and its gradient flows back through the reshape.
    return t if t is None or t.dim() == 1 else t.reshape(numel)


def run(input: Tensor, o: Options, running_mean=None, running_var=None, weight=None,
        bias=None, residual=None, batches=None, running_count=None, overflow_stats=None,
        per_activation: bool = False, inplace: bool = False) -> Tensor:
    """Check the tensors of a call with options ``o`` and run it; returns y. The running
    statistics and counters are updated in place (whatever their strides or shape).
    ``per_activation``: every per-channel tensor is per (channel, position) feature instead.
    ``inplace`` (with ``o.invertible``): y is written over the input where that is allowed
    (``ops.writes_in_place``)."""
    check_tensors(input, o, running_mean, running_var, weight, bias, residual, batches,
                  running_count, overflow_stats, per_activation)
    count, max_abs = (None, None) if overflow_stats is None else (overflow_stats.count,
                                                                  overflow_stats.max_abs)
    if per_activation and input.dim() > 2:
        return _per_activation(input, o, weight, bias, residual, batches,
                               (running_mean, running_var, running_count, count, max_abs))
    c = input.shape[1]
    a = ForwardArgs(input, _flat(weight, c), _flat(bias, c), residual, running_mean, running_var,
                    batches, running_count, count, max_abs)
    if inplace and o.invertible:
        return ops.inplace_abn_op(o, a)
    return ops.batch_norm_op(o, a)


def _per_activation(input, o, weight, bias, residual, batches, features) -> Tensor:
    """Batch norm over the batch only, one statistic per (channel, position) feature.

    The input becomes a 2-D (N, features) batch without copying: contiguous inputs in
    (C, *spatial) feature order; channels-last inputs in memory order (*spatial, C). The tensors
    the op updates (running statistics, counters) are passed as views in that order -- the
    launchers update them in place through the view -- and the parameters as reordered copies
    (their gradients flow back).
    """
    n, c, spatial = input.shape[0], input.shape[1], tuple(input.shape[2:])
    s = math.prod(spatial)
    # (C, *spatial) views of the per-feature tensors; one that has none is refused, not copied
    # (a copy would take the update).
    features = [None if t is None else t.view(c, *spatial) for t in features]
    to_last = (0, *range(2, input.dim()), 1)
    channels_last = input.dim() > 2 and not input.is_contiguous() and input.permute(
        to_last).is_contiguous()
    if not channels_last:
        x2 = input.contiguous().reshape(n, c * s)
        r2 = None if residual is None else residual.contiguous().reshape(n, c * s)
        rm, rv, *rest = features
        a = ForwardArgs(x2, _flat(weight, c * s), _flat(bias, c * s), r2, rm, rv, batches, *rest)
        return ops.batch_norm_op(o, a).reshape(input.shape)
    last = (*range(1, len(spatial) + 1), 0)      # (C, *spatial) -> (*spatial, C)
    x2 = input.permute(to_last).reshape(n, s * c)
    r2 = None if residual is None else residual.permute(to_last).reshape(n, s * c)
    w, b = [None if t is None else t.reshape(c, *spatial).permute(last).reshape(s * c)
            for t in (weight, bias)]
    rm, rv, *rest = [None if t is None else t.permute(last) for t in features]
    y2 = ops.batch_norm_op(o, ForwardArgs(x2, w, b, r2, rm, rv, batches, *rest))
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
    if not isinstance(input, Tensor) or input.dim() < 2:
        # Outside the (N, C, ...) domain torch decides, whichever version is installed: it
        # raises its own exception, or returns an empty tensor for an empty 1-D input.
        return F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum,
                            eps)
    momentum = None if running_count is not None else float_momentum(momentum)
    o = options(training, momentum, eps, activation, negative_slope, overflow=overflow,
                nonfinite_stats=nonfinite_stats)
    return run(input, o, running_mean, running_var, weight, bias, residual,
               running_count=running_count, overflow_stats=overflow_stats,
               per_activation=_mode(mode))


def _mode(mode: str) -> bool:
    if mode not in MODES:
        raise ValueError(f"batch_norm: mode must be one of {MODES}, got {mode!r}")
    return mode == "per_activation"


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
    o = options(training, float_momentum(momentum), eps, activation, negative_slope,
                renorm=(rmax, dmax))
    return run(input, o, running_mean, running_var, weight, bias, residual)


def sync_batch_norm(input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                    weight: Optional[Tensor], bias: Optional[Tensor], momentum: float, eps: float,
                    process_group=None, *, activation: Optional[str] = None,
                    negative_slope: float = 0.01, residual: Optional[Tensor] = None) -> Tensor:
    """Training-mode batch norm with statistics over the batches of every process in
    ``process_group`` (default: the world): one all_gather of per-channel (count, mean, M2)
    forward, one all_reduce of per-channel sums backward."""
    o = options(True, float_momentum(momentum), eps, activation, negative_slope,
                group=group_name(process_group))
    return run(input, o, running_mean, running_var, weight, bias, residual)


def group_name(process_group=None) -> str:
    """The name under which the launchers find a process group again (default: the world)."""
    group = process_group if process_group is not None else dist.group.WORLD
    return group.group_name


# the inplace_abn package's names of the invertible activations -> tritonbn's
ABN_ACTIVATIONS = {"identity": None, None: None, "leaky_relu": "leaky_relu", "elu": "elu"}


def abn_activation(activation: Optional[str]) -> Optional[str]:
    """tritonbn's name for an in-place activated batch norm's activation ("identity": None);
    ValueError for one that is not invertible."""
    if activation not in ABN_ACTIVATIONS:
        raise ValueError(f"inplace_abn: activation must be 'leaky_relu', 'elu' or 'identity' "
                         f"(invertible, so x can be recovered from the output), got "
                         f"{activation!r}")
    return ABN_ACTIVATIONS[activation]


def _abn_options(training, momentum, eps, activation, activation_param,
                 group: Optional[str] = None) -> Options:
    return options(training, float_momentum(momentum), eps, abn_activation(activation),
                   activation_param, group=group, invertible=True)


def inplace_abn(input: Tensor, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                running_mean: Optional[Tensor] = None, running_var: Optional[Tensor] = None,
                training: bool = True, momentum: float = 0.1, eps: float = 1e-5,
                activation: str = "leaky_relu", activation_param: float = 0.01, *,
                residual: Optional[Tensor] = None, inplace: bool = True) -> Tensor:
    """In-place activated batch norm (Rota Bulo et al., CVPR 2018): y = act(BN(x) + residual)
    with an invertible ``activation`` -- "leaky_relu" (``activation_param``: its slope, > 0),
    "elu" (its alpha) or "identity" -- in the argument order of the inplace_abn package.

    Only y is saved for backward, never x: the backward recovers x_hat = (act^-1(y) - residual
    - beta) / gamma inside the kernels. So a BN -> activation -> conv chain keeps one activation
    buffer per layer instead of two. With ``inplace`` y is also written over x's storage (and
    returned) where that is allowed: in plain eager calls, when x is not a leaf that requires
    grad and has strides the kernels can write through; otherwise y is a new tensor (under
    torch.compile the compiler plans the memory). A node that saved x before it was
    overwritten raises autograd's "modified by an inplace operation" error in backward.

    gamma is used with |gamma| raised to at least ``eps`` (its sign kept), forward and backward,
    since the backward divides by it; its gradient passes straight through. Any |gamma| >= eps
    gives exactly batch norm + activation. In half precision x_hat is recovered from a rounded
    y: its error grows like |beta / gamma| (docs/usage.md states the measured bound).
    """
    o = _abn_options(training, momentum, eps, activation, activation_param)
    return run(input, o, running_mean, running_var, weight, bias, residual, inplace=inplace)


def inplace_abn_sync(input: Tensor, weight: Optional[Tensor] = None,
                     bias: Optional[Tensor] = None, running_mean: Optional[Tensor] = None,
                     running_var: Optional[Tensor] = None, training: bool = True,
                     momentum: float = 0.1, eps: float = 1e-5, activation: str = "leaky_relu",
                     activation_param: float = 0.01, group=None, *,
                     residual: Optional[Tensor] = None, inplace: bool = True) -> Tensor:
    """``inplace_abn`` with statistics synchronized over the processes of ``group`` (default:
    the world) in training, as ``sync_batch_norm``; eval is ``inplace_abn``."""
    o = _abn_options(training, momentum, eps, activation, activation_param,
                     group=group_name(group) if training else None)
    return run(input, o, running_mean, running_var, weight, bias, residual, inplace=inplace)
