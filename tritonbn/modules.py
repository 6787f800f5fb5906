"""nn.Module drop-ins: tritonbn.BatchNorm1d / 2d / 3d (SyncBatchNorm is in tritonbn.sync).

Each class subclasses the torch.nn class it replaces and overrides ``forward`` only, so it has
torch's constructor (whatever arguments the installed torch version takes), parameters, buffers,
state_dict keys and version, ``reset_running_stats``, ``extra_repr`` and ``_check_input_dim``.
Adding no state of their own is also what lets ``tritonbn.convert_model`` convert a torch module
in place by changing its class.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm

from .functional import batch_norm

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d"]


def _counts_batches(module: _BatchNorm) -> bool:
    return module.training and module.track_running_stats and module.num_batches_tracked is not None


def _average_factor(module: _BatchNorm) -> float:
    """The momentum handed to the op for this batch.

    Follows torch's ``_BatchNorm.forward``: with ``momentum=None`` the running statistics are
    the cumulative average of all batches, i.e. the factor is 1 / (batches counted so far + 1),
    this batch included. Torch counts the batch before its op runs; tritonbn counts it after
    (``_count_batch``), so a call the op rejects leaves ``num_batches_tracked`` as it was.
    Reading the count as a float is data-dependent, so momentum=None does not trace with
    fullgraph=True -- nor does it in torch's own module.
    """
    if module.momentum is not None:
        return module.momentum
    if _counts_batches(module):
        return 1.0 / (float(module.num_batches_tracked) + 1.0)
    return 0.0  # nothing is updated: the factor does not matter


def _count_batch(module: _BatchNorm) -> None:
    """num_batches_tracked += 1 once the batch went through (see _average_factor)."""
    if _counts_batches(module):
        module.num_batches_tracked.add_(1)


def guard_kwargs(module: _BatchNorm) -> dict:
    """The half-precision guards a module carries (set by tritonbn.overflow.set_policy and
    tritonbn.overflow.monitor), as keyword arguments of tritonbn.batch_norm."""
    kwargs = {}
    if getattr(module, "overflow", "propagate") != "propagate":
        kwargs["overflow"] = module.overflow
    if getattr(module, "overflow_stats", None) is not None:
        kwargs["overflow_stats"] = module.overflow_stats
    if getattr(module, "nonfinite_stats", "propagate") != "propagate":
        kwargs["nonfinite_stats"] = module.nonfinite_stats
        count = getattr(module, "channel_batches_tracked", None)
        if module.momentum is None and count is not None and module.training:
            kwargs["running_count"] = count  # a skipped channel does not count the batch
    return kwargs


class _TritonBatchNormMixin:
    """The forward shared by every tritonbn batch-norm module: torch's logic, tritonbn's op."""

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        factor = _average_factor(self)
        # Batch statistics normalize in training, and in eval when there are no running buffers.
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        # Running buffers are passed when they are updated (training and tracking) or read (eval);
        # a module whose track_running_stats was switched off keeps its buffers untouched.
        pass_running = not self.training or self.track_running_stats
        running_mean: Optional[Tensor] = self.running_mean if pass_running else None
        running_var: Optional[Tensor] = self.running_var if pass_running else None
        out = batch_norm(input, running_mean, running_var, self.weight, self.bias,
                         use_batch_stats, factor, self.eps, **guard_kwargs(self))
        _count_batch(self)
        return out


class BatchNorm1d(_TritonBatchNormMixin, torch.nn.BatchNorm1d):
    """torch.nn.BatchNorm1d on (N, C) or (N, C, L) input, computed by tritonbn's Triton kernels."""


class BatchNorm2d(_TritonBatchNormMixin, torch.nn.BatchNorm2d):
    """torch.nn.BatchNorm2d on (N, C, H, W) input, computed by tritonbn's Triton kernels."""


class BatchNorm3d(_TritonBatchNormMixin, torch.nn.BatchNorm3d):
    """torch.nn.BatchNorm3d on (N, C, D, H, W) input, computed by tritonbn's Triton kernels."""
