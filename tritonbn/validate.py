"""Argument checks for the batch-norm ops, run before any kernel so a rejected call changes nothing.

Each check raises the exception type torch.nn.functional.batch_norm raises for the same input,
with a message that says what was expected.

* ``check_scalars``: the public scalar arguments, as given (types and names);
* ``check_options``: the values of an Options (once per distinct Options: it is cached);
* ``check_tensors``: the tensors of one call against its Options.
"""
from __future__ import annotations

import math
import numbers

import torch

from . import activations
from .options import NONFINITE_POLICIES, OVERFLOW_POLICIES, Options

__all__ = ["check_scalars", "check_options", "check_tensors"]


def _is_real(v) -> bool:
    """A Python real number (not a bool), or a real 0-d tensor as torch also accepts."""
    if isinstance(v, torch.Tensor):
        return v.dim() == 0 and not v.is_complex() and v.dtype != torch.bool
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def check_scalars(training, momentum, eps, activation, negative_slope, overflow,
                  nonfinite_stats) -> None:
    if not isinstance(training, bool):
        raise TypeError(f"batch_norm: training must be a bool, got {type(training).__name__}")
    if not _is_real(momentum):
        raise TypeError(f"batch_norm: momentum must be a float, got {type(momentum).__name__} "
                        "(momentum=None, the cumulative average, is a module option)")
    if not _is_real(eps):
        raise TypeError(f"batch_norm: eps must be a float, got {type(eps).__name__}")
    activations.get(activation)  # ValueError naming the known ones
    if isinstance(negative_slope, bool) or not isinstance(negative_slope, numbers.Real):
        raise TypeError(f"batch_norm: negative_slope must be a float, got "
                        f"{type(negative_slope).__name__}")
    if overflow not in OVERFLOW_POLICIES:
        raise ValueError(f"batch_norm: overflow must be one of {OVERFLOW_POLICIES}, got "
                         f"{overflow!r}")
    if nonfinite_stats not in NONFINITE_POLICIES:
        raise ValueError(f"batch_norm: nonfinite_stats must be one of {NONFINITE_POLICIES}, "
                         f"got {nonfinite_stats!r}")


def check_options(o: Options) -> None:
    if o.training and not o.eps > 0:
        raise ValueError(f"batch_norm: eps must be positive during training, but got {o.eps}")
    if o.eps < 0:
        raise ValueError(f"batch_norm: eps must be non-negative, but got {o.eps}")
    if o.renorm is not None:
        rmax, dmax = o.renorm
        if not rmax >= 1.0:
            raise ValueError(f"batch_renorm: rmax must be >= 1, got {rmax}")
        if not dmax >= 0.0:
            raise ValueError(f"batch_renorm: dmax must be >= 0, got {dmax}")
        if o.warmup_steps < 0:
            raise ValueError(f"batch_renorm: warmup_steps must be >= 0, got {o.warmup_steps}")


def _check_param(name: str, t, input: torch.Tensor, c: int) -> None:
    if t is None:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"batch_norm: {name} must be a Tensor or None, got {type(t).__name__}")
    if t.device != input.device:
        raise RuntimeError(
            f"batch_norm: expected all tensors to be on the same device, but input is on "
            f"{input.device} and {name} is on {t.device}")
    if t.numel() != c:
        raise RuntimeError(f"batch_norm: {name} should contain {c} elements (one per feature), "
                           f"not {t.numel()} (shape {tuple(t.shape)})")
    if t.dtype not in (torch.float32, input.dtype):
        raise RuntimeError(f"batch_norm: {name} has dtype {t.dtype}; expected float32 or the "
                           f"input's dtype {input.dtype}")


def _check_counter(name: str, t, input: torch.Tensor, numel: int, dtype: torch.dtype) -> None:
    if t is None:
        return
    if not (isinstance(t, torch.Tensor) and t.numel() == numel and t.dtype == dtype
            and t.device == input.device):
        what = (f"{t.dtype} {tuple(t.shape)} on {t.device}" if isinstance(t, torch.Tensor)
                else type(t).__name__)
        raise RuntimeError(f"batch_norm: {name} must be a {dtype} tensor of {numel} elements "
                           f"on {input.device}, got {what}")


def check_tensors(input, o: Options, running_mean, running_var, weight, bias, residual,
                  batches, channel_batches, overflow_stats, per_activation: bool) -> None:
    """``per_activation``: statistics per (channel, position), so parameters have C * S
    elements."""
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"batch_norm: input must be a Tensor, got {type(input).__name__}")
    if input.dim() < 2:
        raise RuntimeError(f"batch_norm: expected an input of shape (N, C, ...) with at least "
                           f"2 dimensions, got {input.dim()}-D input of shape {tuple(input.shape)}")
    if not input.is_floating_point():
        raise NotImplementedError(f'"batch_norm" not implemented for {input.dtype}: '
                                  f"tritonbn supports float16, bfloat16, float32 and float64")
    if (running_mean is None) != (running_var is None):
        raise ValueError("batch_norm: running_mean and running_var must either both be None "
                         "or neither be None")
    if not o.training and running_mean is None:
        raise RuntimeError("batch_norm: running_mean and running_var must be given in "
                           "evaluation mode (training=False)")
    if o.renorm is not None and running_mean is None:
        raise ValueError("batch_renorm: running_mean and running_var are required (r and d "
                         "are measured against them)")
    c = math.prod(input.shape[1:]) if per_activation else input.shape[1]
    for name, t in (("running_mean", running_mean), ("running_var", running_var),
                    ("weight", weight), ("bias", bias)):
        _check_param(name, t, input, c)
    if torch.is_grad_enabled():
        for name, t in (("running_mean", running_mean), ("running_var", running_var)):
            if t is not None and t.requires_grad:
                raise RuntimeError(f"batch_norm: {name} requires grad, but running statistics "
                                   f"are not differentiable (detach it, or update it under "
                                   f"torch.no_grad())")
    if o.training and input.numel() == c and input.numel() > 0 and o.group is None:
        raise ValueError("Expected more than 1 value per channel when training, got input size "
                         f"{tuple(input.shape)}")
    if residual is not None:
        if not isinstance(residual, torch.Tensor):
            raise TypeError(f"batch_norm: residual must be a Tensor or None, got "
                            f"{type(residual).__name__}")
        if residual.device != input.device:
            raise RuntimeError(f"batch_norm: expected all tensors to be on the same device, but "
                               f"input is on {input.device} and residual is on {residual.device}")
        if residual.shape != input.shape:
            raise RuntimeError(f"batch_norm: residual must have the input's shape "
                               f"{tuple(input.shape)}, got {tuple(residual.shape)}")
        if not residual.is_floating_point():
            raise NotImplementedError(f'"batch_norm" residual not implemented for '
                                      f"{residual.dtype}")
    _check_counter("batches", batches, input, 1, torch.int64)
    _check_counter("running_count", channel_batches, input, c, torch.int64)
    if overflow_stats is not None:
        overflow_stats.check(c, input.device)
