"""Swap torch batch-norm modules in a model for tritonbn's, and back.

Conversion is in place and changes only each module's class: the tritonbn classes subclass the
torch ones and add no state, so every module stays the same object with the same Parameters,
buffers, device, dtype, requires_grad, training mode and hooks. Optimizers, hooks and any other
reference to a module or a parameter keep working after a conversion.
"""
from __future__ import annotations

import torch
from torch import nn

from ..nn import BatchNorm1d, BatchNorm2d, BatchNorm3d, SyncBatchNorm

__all__ = ["convert_model", "restore_model"]

# Exact types only: a user's subclass of a torch batch norm may override forward, and swapping
# its class would silently drop that override. Lazy modules become BatchNorm*d once initialized.
_TO_TRITON = {
    nn.BatchNorm1d: BatchNorm1d,
    nn.BatchNorm2d: BatchNorm2d,
    nn.BatchNorm3d: BatchNorm3d,
    nn.SyncBatchNorm: SyncBatchNorm,   # synchronizes across processes like torch's
}
_TO_TORCH = {triton_cls: torch_cls for torch_cls, triton_cls in _TO_TRITON.items()}


def _swap_class(module: nn.Module, mapping: dict) -> None:
    for m in module.modules():
        new_cls = mapping.get(type(m))
        if new_cls is not None:
            m.__class__ = new_cls


def convert_model(module: nn.Module) -> nn.Module:
    """Convert every torch.nn.BatchNorm1d/2d/3d and SyncBatchNorm in ``module`` to tritonbn's.

    BatchNorm1d/2d/3d become tritonbn.BatchNorm1d/2d/3d; a SyncBatchNorm becomes
    tritonbn.SyncBatchNorm (synchronized statistics across its process group, plain batch norm
    with one process). Subclasses of the torch classes are left alone. Conversion is in place and keeps every tensor; the module
    is returned (a batch-norm root is converted too, and is the object returned).
    """
    _swap_class(module, _TO_TRITON)
    return module


def restore_model(module: nn.Module) -> nn.Module:
    """Undo ``convert_model``: tritonbn batch-norm modules become the torch classes again.

    tritonbn.SyncBatchNorm becomes torch.nn.SyncBatchNorm (with its process_group). In place, keeping every tensor; returns the module.
    """
    _swap_class(module, _TO_TORCH)
    return module
