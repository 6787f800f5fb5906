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
from torch.nn import Parameter

from . import activations
from .activations import INVERTIBLE
from .options import NONFINITE_POLICIES, OVERFLOW_POLICIES, Options

__all__ = ["check_scalars", "check_options", "check_tensors", "float_momentum"]


def float_momentum(momentum):
    """The functional ops take a momentum value: None (the cumulative average) is a module
    option, or batch_norm's with ``running_count``."""
    if momentum is None:
        raise TypeError("batch_norm: momentum must be a float, got NoneType (momentum=None, "
                        "the cumulative average, is a module option)")
    return momentum


def _is_real(v, allow_bool: bool = False) -> bool:
    """A Python real number, or a real 0-d tensor as torch also accepts (a bool only where torch
    takes one: momentum=True is momentum 1)."""
    if isinstance(v, torch.Tensor):
        return v.dim() == 0 and not v.is_complex() and v.dtype != torch.bool
    return isinstance(v, numbers.Real) and (allow_bool or not isinstance(v, bool))


def check_scalars(training, momentum, eps, activation, negative_slope, overflow,
                  nonfinite_stats) -> None:
    if not isinstance(training, bool):
        raise TypeError(f"batch_norm: training must be a bool, got {type(training).__name__}")
    if momentum is not None and not _is_real(momentum, allow_bool=True):
        raise TypeError(f"batch_norm: momentum must be a float, got {type(momentum).__name__}")
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
    # torch's rules, NaN included (it passes both, as in torch)
    if o.training and o.eps <= 0:
        raise ValueError(f"batch_norm eps must be positive during training, but got {o.eps}")
    if o.eps < 0:
        raise ValueError(f"batch_norm eps must be non-negative, but got {o.eps}")
    if o.renorm is not None:
        rmax, dmax = o.renorm
        if not rmax >= 1.0:
            raise ValueError(f"batch_renorm: rmax must be >= 1, got {rmax}")
        if not dmax >= 0.0:
            raise ValueError(f"batch_renorm: dmax must be >= 0, got {dmax}")
        if o.warmup_steps < 0:
            raise ValueError(f"batch_renorm: warmup_steps must be >= 0, got {o.warmup_steps}")
    if o.invertible:
        _check_invertible(o)


def _check_invertible(o: Options) -> None:
    """In-place activated batch norm recovers z from y = act(z): only an invertible activation."""
    if o.activation not in INVERTIBLE:
        names = ", ".join(repr(a) for a in INVERTIBLE)
        raise ValueError(f"inplace_abn: activation {o.activation!r} is not invertible, so the "
                         f"backward could not recover its input from the output; use one of "
                         f"{names}, or tritonbn.batch_norm(..., activation=...)")
    if o.activation is not None and not o.negative_slope > 0:
        raise ValueError(f"inplace_abn: activation_param must be > 0 for {o.activation!r} "
                         f"(a slope or alpha of {o.negative_slope} is not invertible)")
    if o.saturate:
        raise ValueError("inplace_abn: overflow='saturate' clips y, which then cannot be inverted")


def _check_param(name: str, t, device, dtype, c: int) -> None:
    if type(t) is not torch.Tensor and not isinstance(t, torch.Tensor):
        raise TypeError(f"batch_norm: {name} must be a Tensor or None, got {type(t).__name__}")
    if t.device != device:
        raise RuntimeError(
            f"batch_norm: expected all tensors to be on the same device, but input is on "
            f"{device} and {name} is on {t.device}")
    if t.numel() != c:
        raise RuntimeError(f"batch_norm: {name} should contain {c} elements (one per feature), "
                           f"not {t.numel()} (shape {tuple(t.shape)})")
    if t.dtype is not torch.float32 and t.dtype is not dtype:
        raise RuntimeError(f"batch_norm: {name} has dtype {t.dtype}; expected float32 or the "
                           f"input's dtype {dtype}")


def _check_running(name: str, t, input: torch.Tensor, o: Options, per_activation: bool,
                   grad: bool, compiling: bool) -> None:
    """torch's rules for a running statistic, beyond its size and dtype."""
    if not per_activation and t.dim() != 1:
        raise RuntimeError(f"batch_norm: {name} must be a 1-D tensor of {input.shape[1]} "
                           f"elements, got shape {tuple(t.shape)}")
    if grad and t.requires_grad:
        raise RuntimeError(f"batch_norm: {name} requires grad, but running statistics are not "
                           f"differentiable (detach it, or update it under torch.no_grad())")
    if compiling:
        return  # the checks below read tensor facts Dynamo cannot trace; eager calls make them
    if grad and input.requires_grad and t.is_inference():
        # torch saves the running statistics for backward, which inference tensors forbid
        raise RuntimeError(f"batch_norm: {name} is an inference tensor (made under "
                           f"torch.inference_mode()): inference tensors cannot be saved for "
                           f"backward; clone it outside inference mode")
    if o.training and not t.is_contiguous() and t.numel() > 1 \
            and torch._debug_has_internal_overlap(t) == 1:
        # An expanded (stride-0) statistic: every channel's update lands on the same memory,
        # an order-dependent result (torch on CPU) or a race (on a GPU). Refused before any
        # kernel runs, so neither running statistic changes.
        raise RuntimeError(f"batch_norm: {name} has overlapping memory (an expanded tensor, "
                           f"strides {t.stride()}): one element per channel is needed to "
                           f"update it in training")


def _check_counter(name: str, t, device, numel: int, dtype: torch.dtype) -> None:
    if not (isinstance(t, torch.Tensor) and t.numel() == numel and t.dtype == dtype
            and t.device == device):
        what = (f"{t.dtype} {tuple(t.shape)} on {t.device}" if isinstance(t, torch.Tensor)
                else type(t).__name__)
        raise RuntimeError(f"batch_norm: {name} must be a {dtype} tensor of {numel} elements "
                           f"on {device}, got {what}")


def _check_residual(residual, input: torch.Tensor) -> None:
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
        raise NotImplementedError(f'"batch_norm" residual not implemented for {residual.dtype}')


def check_tensors(input, o: Options, running_mean, running_var, weight, bias, residual,
                  batches, running_count, overflow_stats, per_activation: bool) -> None:
    """``per_activation``: statistics per (channel, position), so parameters have C * S
    elements. Every call runs this: it is written for speed (locals, identity tests)."""
    if type(input) is not torch.Tensor and not isinstance(input, torch.Tensor):
        raise TypeError(f"batch_norm: input must be a Tensor, got {type(input).__name__}")
    if input.dim() < 2:
        raise RuntimeError(f"batch_norm: expected an input of shape (N, C, ...) with at least "
                           f"2 dimensions, got {input.dim()}-D input of shape {tuple(input.shape)}")
    dtype, device = input.dtype, input.device
    if not dtype.is_floating_point:
        raise NotImplementedError(f'"batch_norm" not implemented for {dtype}: '
                                  f"tritonbn supports float16, bfloat16, float32 and float64")
    if not o.training:
        for name, t in (("running_mean", running_mean), ("running_var", running_var)):
            if t is None:
                raise RuntimeError(f"batch_norm: {name} must be defined in evaluation mode")
    if (running_mean is None) != (running_var is None):
        raise ValueError("batch_norm: running_mean and running_var must either both be None "
                         "or neither be None")
    if o.renorm is not None and running_mean is None:
        raise ValueError("batch_renorm: running_mean and running_var are required (r and d "
                         "are measured against them)")
    c = math.prod(input.shape[1:]) if per_activation else input.shape[1]
    f32 = torch.float32
    # (each check in full only when the common case's one-line test fails: a call of a model's
    # layer runs these every time)
    if weight is not None and not (type(weight) is Parameter and weight.device == device
                                   and weight.numel() == c
                                   and (weight.dtype is f32 or weight.dtype is dtype)):
        _check_param("weight", weight, device, dtype, c)
    if bias is not None and not (type(bias) is Parameter and bias.device == device
                                 and bias.numel() == c
                                 and (bias.dtype is f32 or bias.dtype is dtype)):
        _check_param("bias", bias, device, dtype, c)
    if running_mean is not None:
        grad, compiling = torch.is_grad_enabled(), torch.compiler.is_compiling()
        plain = not (per_activation or compiling)
        saves = grad and input.requires_grad
        for name, t in (("running_mean", running_mean), ("running_var", running_var)):
            # the common case of both checks below in one test
            if not (plain and type(t) is torch.Tensor and t.device == device
                    and t.numel() == c and (t.dtype is f32 or t.dtype is dtype)
                    and t.dim() == 1 and not (grad and t.requires_grad)
                    and not (saves and t.is_inference())
                    and (not o.training or t.is_contiguous())):
                _check_param(name, t, device, dtype, c)
                _check_running(name, t, input, o, per_activation, grad, compiling)
    if o.training and o.group is None and input.numel() == c and c > 0:
        raise ValueError("Expected more than 1 value per channel when training, got input size "
                         f"{tuple(input.shape)}")
    if residual is not None:
        _check_residual(residual, input)
    if batches is not None:
        _check_counter("batches", batches, device, 1, torch.int64)
    if running_count is not None:
        _check_counter("running_count", running_count, device, c, torch.int64)
    if overflow_stats is not None:
        overflow_stats.check(c, device)
