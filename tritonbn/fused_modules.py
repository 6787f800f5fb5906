"""Modules for the fused and variant batch norms: BN + residual + activation, batch
renormalization, and cuDNN's per-activation mode. Same buffers, parameters and running-statistic
semantics as torch's batch norm modules (they build on tritonbn.BatchNorm*d)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm

from .functional import batch_norm, batch_renorm
from .modules import (BatchNorm1d, BatchNorm2d, BatchNorm3d, _average_factor, _count_batch,
                      guard_kwargs)
from .validate import check_epilogue_args

__all__ = ["BatchNormAct1d", "BatchNormAct2d", "BatchNormAct3d",
           "BatchRenorm1d", "BatchRenorm2d", "BatchRenorm3d",
           "BatchNormPerActivation1d", "BatchNormPerActivation2d", "BatchNormPerActivation3d"]


def _running(module: _BatchNorm):
    """torch's rule: which statistics normalize, and which running buffers the op gets."""
    use_batch_stats = module.training or (module.running_mean is None and module.running_var is None)
    pass_running = not module.training or module.track_running_stats
    return (use_batch_stats, module.running_mean if pass_running else None,
            module.running_var if pass_running else None)


class _ActMixin:
    """forward(input, residual=None) = act(BN(input) + residual), one fused kernel pass."""

    _mode = "spatial"

    def _init_act(self, activation: Optional[str], negative_slope: float) -> None:
        check_epilogue_args(torch.empty(0), activation, negative_slope, None)
        self.activation = activation
        self.negative_slope = negative_slope

    def forward(self, input: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        self._check_input_dim(input)
        factor = _average_factor(self)
        training, rm, rv = _running(self)
        out = batch_norm(input, rm, rv, self.weight, self.bias, training, factor, self.eps,
                         activation=self.activation, negative_slope=self.negative_slope,
                         residual=residual, mode=self._mode, **guard_kwargs(self))
        _count_batch(self)
        return out

    def extra_repr(self) -> str:
        slope = f", negative_slope={self.negative_slope}" if self.activation == "leaky_relu" else ""
        return f"{super().extra_repr()}, activation={self.activation!r}{slope}"


def _act_class(base, doc):
    class _Act(_ActMixin, base):
        __doc__ = doc

        def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                     affine: bool = True, track_running_stats: bool = True, device=None,
                     dtype=None, *, activation: Optional[str] = "relu",
                     negative_slope: float = 0.01) -> None:
            base.__init__(self, num_features, eps, momentum, affine, track_running_stats,
                          device=device, dtype=dtype)
            self._init_act(activation, negative_slope)
    return _Act


BatchNormAct1d = _act_class(BatchNorm1d, "BatchNorm1d fused with a residual add and activation.")
BatchNormAct2d = _act_class(BatchNorm2d, "BatchNorm2d fused with a residual add and activation.")
BatchNormAct3d = _act_class(BatchNorm3d, "BatchNorm3d fused with a residual add and activation.")
for _cls, _name in ((BatchNormAct1d, "BatchNormAct1d"), (BatchNormAct2d, "BatchNormAct2d"),
                    (BatchNormAct3d, "BatchNormAct3d")):
    _cls.__name__ = _cls.__qualname__ = _name


class _RenormMixin:
    """Batch Renormalization (Ioffe, 2017): training normalizes with the batch statistics
    corrected by r and d towards the running ones; eval is plain batch norm."""

    def forward(self, input: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        self._check_input_dim(input)
        factor = _average_factor(self)
        if not self.training:
            return batch_norm(input, self.running_mean, self.running_var, self.weight, self.bias,
                              False, factor, self.eps, activation=self.activation,
                              negative_slope=self.negative_slope, residual=residual)
        # This is step num_batches_tracked + 1 (counted once it went through): the first
        # warmup_steps steps use r=1, d=0 (rmax=1, dmax=0 clip exactly to that): batch norm.
        warm = (int(self.num_batches_tracked) < self.warmup_steps if self.warmup_steps
                else False)
        rmax, dmax = (1.0, 0.0) if warm else (self.rmax, self.dmax)
        out = batch_renorm(input, self.running_mean, self.running_var, self.weight, self.bias,
                           True, factor, self.eps, rmax, dmax, activation=self.activation,
                           negative_slope=self.negative_slope, residual=residual)
        _count_batch(self)
        return out

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, rmax={self.rmax}, dmax={self.dmax}, "
                f"warmup_steps={self.warmup_steps}")


def _renorm_class(base, name):
    class _Renorm(_RenormMixin, base):
        __doc__ = (f"Batch Renormalization with {base.__name__}'s state and input checks; r and "
                   "d are clipped to rmax and dmax after the first warmup_steps training steps "
                   "(reading the step count then is a host sync, only when warmup_steps > 0).")

        def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                     affine: bool = True, *, rmax: float = 3.0, dmax: float = 5.0,
                     warmup_steps: int = 0, activation: Optional[str] = None,
                     negative_slope: float = 0.01, device=None, dtype=None) -> None:
            if rmax < 1.0 or dmax < 0.0 or warmup_steps < 0:
                raise ValueError(f"{name}: need rmax >= 1, dmax >= 0, warmup_steps >= 0; got "
                                 f"rmax={rmax}, dmax={dmax}, warmup_steps={warmup_steps}")
            base.__init__(self, num_features, eps, momentum, affine, True, device=device,
                          dtype=dtype)
            self.rmax, self.dmax, self.warmup_steps = float(rmax), float(dmax), int(warmup_steps)
            check_epilogue_args(torch.empty(0), activation, negative_slope, None)
            self.activation, self.negative_slope = activation, negative_slope
    _Renorm.__name__ = _Renorm.__qualname__ = name
    return _Renorm


BatchRenorm1d = _renorm_class(BatchNorm1d, "BatchRenorm1d")
BatchRenorm2d = _renorm_class(BatchNorm2d, "BatchRenorm2d")
BatchRenorm3d = _renorm_class(BatchNorm3d, "BatchRenorm3d")


class _PerActivation(_ActMixin, _BatchNorm):
    """cuDNN's per-activation batch norm: statistics over the batch only, one mean/variance
    (and gamma/beta) per (channel, position); parameters and buffers have shape (C, *spatial)."""

    _spatial_dims = 0
    _mode = "per_activation"

    def __init__(self, num_features: int, spatial_size, eps: float = 1e-5,
                 momentum: Optional[float] = 0.1, affine: bool = True,
                 track_running_stats: bool = True, device=None, dtype=None, *,
                 activation: Optional[str] = None, negative_slope: float = 0.01) -> None:
        spatial = (spatial_size,) if isinstance(spatial_size, int) else tuple(spatial_size)
        if len(spatial) != self._spatial_dims:
            raise ValueError(f"{type(self).__name__}: spatial_size needs {self._spatial_dims} "
                             f"sizes, got {spatial_size!r}")
        super().__init__(num_features, eps, momentum, affine, track_running_stats,
                         device=device, dtype=dtype)
        self.spatial_size = spatial
        shape = (num_features, *spatial)
        # _BatchNorm made (C,) tensors; give every per-feature tensor its (C, *spatial) shape.
        for name in ("weight", "bias"):
            if getattr(self, name) is not None:
                setattr(self, name, torch.nn.Parameter(getattr(self, name).data.new_empty(shape)))
        for name in ("running_mean", "running_var"):
            if getattr(self, name) is not None:
                setattr(self, name, getattr(self, name).new_empty(shape))
        self.reset_parameters()
        check_epilogue_args(torch.empty(0), activation, negative_slope, None)
        self.activation, self.negative_slope = activation, negative_slope

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() != 2 + self._spatial_dims or tuple(input.shape[2:]) != self.spatial_size:
            raise ValueError(f"expected input of shape (N, {self.num_features}, "
                             f"{', '.join(map(str, self.spatial_size))}), got {tuple(input.shape)}")

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, spatial_size={self.spatial_size}, mode=per_activation"


class BatchNormPerActivation1d(_PerActivation):
    __doc__ = _PerActivation.__doc__ + " Input (N, C, L)."
    _spatial_dims = 1


class BatchNormPerActivation2d(_PerActivation):
    __doc__ = _PerActivation.__doc__ + " Input (N, C, H, W)."
    _spatial_dims = 2


class BatchNormPerActivation3d(_PerActivation):
    __doc__ = _PerActivation.__doc__ + " Input (N, C, D, H, W)."
    _spatial_dims = 3

