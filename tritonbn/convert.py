"""Swap torch batch-norm modules in a model for tritonbn's, and back.

Conversion is in place and changes only each module's class: the tritonbn classes subclass the
torch ones and add no state, so every module stays the same object with the same Parameters,
buffers, device, dtype, requires_grad, training mode and hooks. Optimizers, hooks and any other
reference to a module or a parameter keep working after a conversion.
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

from .modules import BatchNorm1d, BatchNorm2d, BatchNorm3d, BatchNormNd

__all__ = ["convert_model", "restore_model"]

# Exact types only: a user's subclass of a torch batch norm may override forward, and swapping
# its class would silently drop that override. Lazy modules become BatchNorm*d once initialized.
_TO_TRITON = {
    nn.BatchNorm1d: BatchNorm1d,
    nn.BatchNorm2d: BatchNorm2d,
    nn.BatchNorm3d: BatchNorm3d,
    nn.SyncBatchNorm: BatchNormNd,
}
_TO_TORCH = {triton_cls: torch_cls for torch_cls, triton_cls in _TO_TRITON.items()}


def _sync_world_size(module: nn.SyncBatchNorm) -> int:
    """How many processes this SyncBatchNorm would synchronize over (1 when not distributed)."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    group = module.process_group or dist.group.WORLD
    return dist.get_world_size(group)


def _swap_class(module: nn.Module, mapping: dict) -> None:
    for m in module.modules():
        new_cls = mapping.get(type(m))
        if new_cls is None:
            continue
        if type(m) is nn.SyncBatchNorm and _sync_world_size(m) > 1:
            warnings.warn("tritonbn.convert_model: leaving a SyncBatchNorm in place, because it "
                          "synchronizes statistics over more than one process and tritonbn "
                          "does not", stacklevel=3)
            continue
        if new_cls is nn.SyncBatchNorm and not hasattr(m, "process_group"):
            m.process_group = None  # a BatchNormNd built directly, not converted from SyncBatchNorm
        m.__class__ = new_cls


def convert_model(module: nn.Module) -> nn.Module:
    """Convert every torch.nn.BatchNorm1d/2d/3d and SyncBatchNorm in ``module`` to tritonbn's.

    BatchNorm1d/2d/3d become tritonbn.BatchNorm1d/2d/3d. A SyncBatchNorm becomes
    tritonbn.BatchNormNd (any input of 2 or more dims, like SyncBatchNorm), unless
    torch.distributed is initialized and its process group has more than one process: then it
    is left alone, with a warning, since tritonbn does not synchronize statistics. That is
    decided when convert_model runs: convert after init_process_group, or a SyncBatchNorm
    converted earlier will normalize each process's batch on its own. Subclasses of
    the torch classes are left alone. Conversion is in place and keeps every tensor; the module
    is returned (a batch-norm root is converted too, and is the object returned).
    """
    _swap_class(module, _TO_TRITON)
    return module


def restore_model(module: nn.Module) -> nn.Module:
    """Undo ``convert_model``: tritonbn batch-norm modules become the torch classes again.

    BatchNormNd becomes torch.nn.SyncBatchNorm (with the process_group it had, or None).
    In place, keeping every tensor; returns the module.
    """
    _swap_class(module, _TO_TORCH)
    return module
