"""Argument checks for the batch-norm ops, run before any kernel so a rejected call changes nothing.

Each check raises the exception type torch.nn.functional.batch_norm raises for the same input,
with a message that says what was expected.
"""
from __future__ import annotations

import math
import numbers

import torch

from .kernels.activations import ACTIVATIONS

__all__ = ["check_batch_norm_args"]


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


def _is_real(v) -> bool:
    """A Python real number (not a bool), or a real 0-d tensor as torch also accepts."""
    if isinstance(v, torch.Tensor):
        return v.dim() == 0 and not v.is_complex() and v.dtype != torch.bool
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def check_batch_norm_args(input, running_mean, running_var, weight, bias, training, momentum, eps,
                          per_activation: bool = False):
    """``per_activation``: statistics per (channel, position), so parameters have C * S elements."""
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
    if not training and running_mean is None:
        raise RuntimeError("batch_norm: running_mean and running_var must be given in "
                           "evaluation mode (training=False)")
    c = math.prod(input.shape[1:]) if per_activation else input.shape[1]
    for name, t in (("running_mean", running_mean), ("running_var", running_var),
                    ("weight", weight), ("bias", bias)):
        _check_param(name, t, input, c)
    if not isinstance(training, bool):
        raise TypeError(f"batch_norm: training must be a bool, got {type(training).__name__}")
    if not _is_real(momentum):
        raise TypeError(f"batch_norm: momentum must be a float, got {type(momentum).__name__} "
                        "(momentum=None, the cumulative average, is a module option)")
    if not _is_real(eps):
        raise TypeError(f"batch_norm: eps must be a float, got {type(eps).__name__}")
    if torch.is_grad_enabled():
        for name, t in (("running_mean", running_mean), ("running_var", running_var)):
            if t is not None and t.requires_grad:
                raise RuntimeError(f"batch_norm: {name} requires grad, but running statistics "
                                   f"are not differentiable (detach it, or update it under "
                                   f"torch.no_grad())")
    if training and not eps > 0:
        raise ValueError(f"batch_norm: eps must be positive during training, but got {eps}")
    if eps < 0:
        raise ValueError(f"batch_norm: eps must be non-negative, but got {eps}")
    if training and input.numel() == c and input.numel() > 0:
        raise ValueError("Expected more than 1 value per channel when training, got input size "
                         f"{tuple(input.shape)}")


def check_epilogue_args(input, activation, negative_slope, residual) -> None:
    """The fused activation and residual: a known name, and a residual shaped like the input."""
    if activation not in ACTIVATIONS:
        names = ", ".join(repr(a) for a in ACTIVATIONS if a)
        raise ValueError(f"batch_norm: unknown activation {activation!r}; expected None or one "
                         f"of {names}")
    if isinstance(negative_slope, bool) or not isinstance(negative_slope, numbers.Real):
        raise TypeError(f"batch_norm: negative_slope must be a float, got "
                        f"{type(negative_slope).__name__}")
    if residual is None:
        return
    if not isinstance(residual, torch.Tensor):
        raise TypeError(f"batch_norm: residual must be a Tensor or None, got {type(residual).__name__}")
    if residual.device != input.device:
        raise RuntimeError(f"batch_norm: expected all tensors to be on the same device, but input "
                           f"is on {input.device} and residual is on {residual.device}")
    if residual.shape != input.shape:
        raise RuntimeError(f"batch_norm: residual must have the input's shape {tuple(input.shape)}, "
                           f"got {tuple(residual.shape)}")
    if not residual.is_floating_point():
        raise NotImplementedError(f'"batch_norm" residual not implemented for {residual.dtype}')


def check_renorm_args(running_mean, rmax, dmax) -> None:
    if running_mean is None:
        raise ValueError("batch_renorm: running_mean and running_var are required (r and d "
                         "are measured against them)")
    if not rmax >= 1.0:
        raise ValueError(f"batch_renorm: rmax must be >= 1, got {rmax}")
    if not dmax >= 0.0:
        raise ValueError(f"batch_renorm: dmax must be >= 0, got {dmax}")
