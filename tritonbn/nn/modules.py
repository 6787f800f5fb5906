"""tritonbn's batch-norm layers, all on one base.

``TritonNorm`` states torch's rules once -- which statistics normalize in training and eval,
which running buffers a call reads or updates, ``momentum=None`` as a cumulative average, the
batch counter -- and the half-precision guard options every layer carries (set by
``tritonbn.overflow.set_policy`` / ``monitor``). Its ``forward(input, residual=None)`` runs
``tritonbn.functional.run``. The layers subclass it together with the torch class they stand
for:

* ``BatchNorm1d/2d/3d``: torch's classes, forward replaced, no state of their own (so
  ``tritonbn.convert_model`` converts a torch module in place by changing its class);
* ``BatchNormAct*d``: + residual add and activation, fused in the kernels;
* ``BatchRenorm*d``: Batch Renormalization in training, batch norm in eval;
* ``BatchNormPerActivation*d``: cuDNN's per-activation mode, parameters of shape (C, *spatial);
* ``SyncBatchNorm`` (tritonbn/nn/sync.py): statistics synchronized across processes.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .. import activations, functional

__all__ = ["TritonNorm", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d",
           "BatchNormAct1d", "BatchNormAct2d", "BatchNormAct3d",
           "BatchRenorm1d", "BatchRenorm2d", "BatchRenorm3d",
           "BatchNormPerActivation1d", "BatchNormPerActivation2d", "BatchNormPerActivation3d"]


class TritonNorm:
    """The base of every tritonbn batch-norm layer (mixed into a torch ``_BatchNorm``)."""

    # What variants set (class defaults, so that a converted torch module needs no new state).
    activation: Optional[str] = None
    negative_slope: float = 0.01
    renorm: Optional[tuple[float, float]] = None   # (rmax, dmax): batch renormalization
    warmup_steps: int = 0
    per_activation: bool = False
    # In-place activated batch norm (tritonbn/nn/inplace_abn.py): only y is saved, x_hat is
    # recovered from it in backward; ``inplace`` also writes y over the input where allowed.
    invertible: bool = False
    inplace: bool = False
    # The half-precision guards (tritonbn.overflow): output policy, running-statistics policy
    # and fused counters (an OverflowStats). set_policy adds a buffer of per-channel batch
    # counts, channel_batches_tracked, for momentum=None with nonfinite_stats="skip".
    overflow: str = "propagate"
    nonfinite_stats: str = "propagate"
    overflow_stats = None

    def features(self) -> int:
        """Statistics the layer keeps: one per channel (per channel and position in
        per-activation mode)."""
        return self.num_features

    def _process_group(self) -> Optional[str]:
        """The process group to synchronize statistics over (SyncBatchNorm), or None."""
        return None

    def _uses_batch_statistics(self, running_mean, running_var) -> bool:
        """torch's rule: batch statistics normalize in training, and in eval when there are no
        running buffers. (A frozen layer never uses them.)"""
        return self.training or (running_mean is None and running_var is None)

    def _prepare_input(self, input: Tensor) -> Tensor:
        """The input as the op takes it (a frozen layer promotes it to its buffers' dtype)."""
        return input

    def _run(self, input: Tensor, residual: Optional[Tensor] = None,
             with_activation: bool = True) -> Tensor:
        """torch's _BatchNorm.forward with tritonbn's op; ``with_activation=False`` leaves the
        layer's activation out (the caller applies it)."""
        self._check_input_dim(input)
        input = self._prepare_input(input)
        # (parameters and buffers read from their dicts: nn.Module's attribute lookup for them
        # costs a microsecond per call on this path)
        params, buffers, training = self._parameters, self._buffers, self.training
        running_mean, running_var = buffers.get("running_mean"), buffers.get("running_var")
        batches = buffers.get("num_batches_tracked")
        momentum = self.momentum
        use_batch_stats = self._uses_batch_statistics(running_mean, running_var)
        known = self.__dict__.get("_options")         # (see __setattr__)
        o = None if known is None else known.get((training, use_batch_stats, with_activation))
        if o is None:
            o = functional.options(
                use_batch_stats, momentum, self.eps,
                self.activation if with_activation else None, self.negative_slope, self.renorm,
                self.warmup_steps, self.overflow, self.nonfinite_stats,
                group=self._process_group() if training else None, invertible=self.invertible)
            # kept unless the group is read from torch.distributed's state, which can change
            # under the module (SyncBatchNorm); not while compiling (a traced side effect)
            if type(self)._process_group is TritonNorm._process_group \
                    and not torch.compiler.is_compiling():
                if known is None:
                    known = self.__dict__["_options"] = {}
                known[(training, use_batch_stats, with_activation)] = o
        # Running buffers go to the op when it updates them (training with tracking) or reads
        # them (running statistics normalize); a module whose track_running_stats was switched
        # off keeps its buffers.
        passed = not use_batch_stats or self.track_running_stats
        counting = training and self.track_running_stats and batches is not None
        # momentum=None and renorm's warm-up read the batch counter on the device (no host
        # sync); with nonfinite_stats="skip" each channel counts its own batches.
        reads_batches = counting and (momentum is None or self.warmup_steps > 0)
        running_count = (buffers.get("channel_batches_tracked") if counting and momentum is None
                       and self.nonfinite_stats == "skip" else None)
        out = functional.run(
            input, o, running_mean if passed else None, running_var if passed else None,
            params.get("weight", buffers.get("weight")), params.get("bias", buffers.get("bias")),
            residual,
            batches if reads_batches else None, running_count, self.overflow_stats,
            self.per_activation, self.inplace)
        if counting:
            # counted once the batch went through: a call the op rejects leaves the count alone
            batches.add_(1)
        return out

    def forward(self, input: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        return self._run(input, residual)

    # A call's Options come from the module's attributes; ``_run`` keeps the ones it built
    # (per training flag, use of batch statistics and activation) until any attribute of the
    # module is set or deleted -- train() / eval(), momentum or eps changed, a policy set, the
    # class converted -- which is what a model's every call would otherwise rebuild and look up.
    def __setattr__(self, name: str, value) -> None:
        self.__dict__.pop("_options", None)
        super().__setattr__(name, value)

    def __delattr__(self, name: str) -> None:
        self.__dict__.pop("_options", None)
        super().__delattr__(name)

    def __getstate__(self) -> dict:
        state = super().__getstate__()          # (a copy: pickle, copy.deepcopy)
        state.pop("_options", None)             # rebuilt, by the version that loads it
        return state

    def extra_repr(self) -> str:
        parts = [super().extra_repr()]
        if self.activation is not None:
            parts.append(f"activation={self.activation!r}")
            if self.activation in ("leaky_relu", "elu"):
                parts.append(f"negative_slope={self.negative_slope}")
        if self.renorm is not None:
            parts.append(f"rmax={self.renorm[0]}, dmax={self.renorm[1]}, "
                         f"warmup_steps={self.warmup_steps}")
        return ", ".join(parts)


class BatchNorm1d(TritonNorm, nn.BatchNorm1d):
    """torch.nn.BatchNorm1d on (N, C) or (N, C, L) input, computed by tritonbn's Triton kernels."""

    def forward(self, input: Tensor) -> Tensor:
        return self._run(input)


class BatchNorm2d(TritonNorm, nn.BatchNorm2d):
    """torch.nn.BatchNorm2d on (N, C, H, W) input, computed by tritonbn's Triton kernels."""

    def forward(self, input: Tensor) -> Tensor:
        return self._run(input)


class BatchNorm3d(TritonNorm, nn.BatchNorm3d):
    """torch.nn.BatchNorm3d on (N, C, D, H, W) input, computed by tritonbn's Triton kernels."""

    def forward(self, input: Tensor) -> Tensor:
        return self._run(input)


def _check_activation(activation: Optional[str], negative_slope) -> None:
    activations.get(activation)
    if isinstance(negative_slope, bool) or not isinstance(negative_slope, (int, float)):
        raise TypeError(f"negative_slope must be a float, got {type(negative_slope).__name__}")


class _Act:
    """forward(input, residual=None) = act(BN(input) + residual), one fused kernel pass."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, track_running_stats: bool = True, device=None,
                 dtype=None, *, activation: Optional[str] = "relu",
                 negative_slope: float = 0.01) -> None:
        _check_activation(activation, negative_slope)
        super().__init__(num_features, eps, momentum, affine, track_running_stats,
                         device=device, dtype=dtype)
        self.activation, self.negative_slope = activation, negative_slope

    def forward(self, input: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        return self._run(input, residual)


class BatchNormAct1d(_Act, BatchNorm1d):
    """BatchNorm1d fused with a residual add and activation."""


class BatchNormAct2d(_Act, BatchNorm2d):
    """BatchNorm2d fused with a residual add and activation."""


class BatchNormAct3d(_Act, BatchNorm3d):
    """BatchNorm3d fused with a residual add and activation."""


class _Renorm:
    """Batch Renormalization (Ioffe, 2017): training normalizes with the batch statistics
    corrected by r and d towards the running ones; eval is plain batch norm. r and d are
    clipped to rmax and dmax after the first ``warmup_steps`` training steps (r = 1, d = 0
    before: batch norm); the step count is read on the device, so there is no host sync."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, *, rmax: float = 3.0, dmax: float = 5.0,
                 warmup_steps: int = 0, activation: Optional[str] = None,
                 negative_slope: float = 0.01, device=None, dtype=None) -> None:
        if not (rmax >= 1.0 and dmax >= 0.0 and warmup_steps >= 0):
            raise ValueError(f"{type(self).__name__}: need rmax >= 1, dmax >= 0, "
                             f"warmup_steps >= 0; got rmax={rmax}, dmax={dmax}, "
                             f"warmup_steps={warmup_steps}")
        _check_activation(activation, negative_slope)
        super().__init__(num_features, eps, momentum, affine, True, device=device, dtype=dtype)
        self.renorm = (float(rmax), float(dmax))
        self.warmup_steps = int(warmup_steps)
        self.activation, self.negative_slope = activation, negative_slope

    # rmax and dmax as attributes, for schedules that relax them during training
    @property
    def rmax(self) -> float:
        return self.renorm[0]

    @rmax.setter
    def rmax(self, value: float) -> None:
        self.renorm = (float(value), self.renorm[1])

    @property
    def dmax(self) -> float:
        return self.renorm[1]

    @dmax.setter
    def dmax(self, value: float) -> None:
        self.renorm = (self.renorm[0], float(value))

    def forward(self, input: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        return self._run(input, residual)


class BatchRenorm1d(_Renorm, BatchNorm1d):
    """Batch Renormalization with BatchNorm1d's state and input checks."""


class BatchRenorm2d(_Renorm, BatchNorm2d):
    """Batch Renormalization with BatchNorm2d's state and input checks."""


class BatchRenorm3d(_Renorm, BatchNorm3d):
    """Batch Renormalization with BatchNorm3d's state and input checks."""


class _PerActivation(TritonNorm, _BatchNorm):
    """cuDNN's per-activation batch norm: statistics over the batch only, one mean/variance
    (and gamma/beta) per (channel, position); parameters and buffers have shape (C, *spatial)."""

    _spatial_dims = 0
    per_activation = True

    def __init__(self, num_features: int, spatial_size, eps: float = 1e-5,
                 momentum: Optional[float] = 0.1, affine: bool = True,
                 track_running_stats: bool = True, device=None, dtype=None, *,
                 activation: Optional[str] = None, negative_slope: float = 0.01) -> None:
        spatial = (spatial_size,) if isinstance(spatial_size, int) else tuple(spatial_size)
        if len(spatial) != self._spatial_dims:
            raise ValueError(f"{type(self).__name__}: spatial_size needs {self._spatial_dims} "
                             f"sizes, got {spatial_size!r}")
        _check_activation(activation, negative_slope)
        super().__init__(num_features, eps, momentum, affine, track_running_stats,
                         device=device, dtype=dtype)
        self.spatial_size = spatial
        shape = (num_features, *spatial)
        # _BatchNorm made (C,) tensors; give every per-feature tensor its (C, *spatial) shape.
        for name in ("weight", "bias"):
            if getattr(self, name) is not None:
                setattr(self, name, nn.Parameter(getattr(self, name).data.new_empty(shape)))
        for name in ("running_mean", "running_var"):
            if getattr(self, name) is not None:
                setattr(self, name, getattr(self, name).new_empty(shape))
        self.reset_parameters()
        self.activation, self.negative_slope = activation, negative_slope

    def features(self) -> int:
        return self.num_features * math.prod(self.spatial_size)

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
