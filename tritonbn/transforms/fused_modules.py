"""The modules ``tritonbn.fuse`` (and the conversion of batch norm + activation layers of other
libraries) make: batch norm with the residual add and activation after it in the kernels.

``FusedBatchNormAct*d`` / ``FusedFrozenBatchNorm2d`` compute, in this order,

    z = BN(input);  z = drop(z);  z = z + residual;  z = activation(z);  z = act(z)

where each step is optional. ``activation`` (a tritonbn activation name) and ``residual`` are
fused into the batch-norm kernels. Two optional child modules cover what the kernels cannot do:

* ``drop``: a module that is the identity in eval mode -- stochastic depth, drop path, dropout,
  drop block. While it is inactive (eval mode, or probability 0) the whole chain runs in the
  kernels; while it is active (training) the batch norm runs in the kernels and the drop, the add
  and the activation in torch, in the original order, because a per-sample or per-element random
  factor sits between the batch norm and the add.
* ``act``: an activation module tritonbn does not fuse (kept from a converted layer such as
  timm's BatchNormAct2d with PReLU or Mish), run by torch last.

An in-place activated layer (``invertible``, set by ``tritonbn.fuse(model, inplace=True)``)
saves its output for backward instead of its input. Where torch finishes the chain (an active
drop, a residual that does not fit) that output is the batch norm's alone -- invertible with no
activation -- which the drop, the add and the activation read without modifying it; fuse leaves
a layer whose ``drop`` or ``act`` runs in place non-invertible.

fx sees no shapes, so a rewritten add can meet a residual that broadcasts or promotes the dtype at
run time; that residual is added by torch after tritonbn's batch norm (same result, unfused).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import activations
from ..nn import BatchNormAct1d, BatchNormAct2d, BatchNormAct3d, FrozenBatchNorm2d, SyncBatchNorm
from .kinds import drop_active

__all__ = ["FusedBatchNormAct1d", "FusedBatchNormAct2d", "FusedBatchNormAct3d",
           "FusedFrozenBatchNorm2d", "FusedSyncBatchNorm"]


def fits(input: Tensor, residual) -> bool:
    """Whether ``BN(input) + residual`` is what the fused op computes: a tensor of the input's
    shape (no broadcasting) on its device, whose dtype does not promote the sum past the
    input's dtype (the fused op's output has the input's dtype)."""
    return (isinstance(residual, Tensor) and residual.shape == input.shape
            and residual.device == input.device
            and torch.promote_types(input.dtype, residual.dtype) == input.dtype)


class _FusedMixin:
    """forward(input, residual=None): the chain of the module docstring, fused where it can."""

    def forward(self, input: Tensor, residual=None) -> Tensor:
        modules = self._modules
        drop, post = modules.get("drop"), modules.get("act")
        dropping = drop is not None and drop_active(drop)
        if not dropping and (residual is None or fits(input, residual)):
            z = self._run(input, residual)                 # BN [+ residual] [-> activation]
            return z if post is None else post(z)
        z = self._run(input, with_activation=False)
        if dropping:
            z = drop(z)
        if residual is not None:
            z = z + residual
        z = activations.apply(z, self.activation, self.negative_slope)
        return z if post is None else post(z)


class FusedBatchNormAct1d(_FusedMixin, BatchNormAct1d):
    """What ``tritonbn.fuse`` makes of a BatchNorm1d with the add / activation after it."""


class FusedBatchNormAct2d(_FusedMixin, BatchNormAct2d):
    """What ``tritonbn.fuse`` makes of a BatchNorm2d with the add / activation after it."""


class FusedBatchNormAct3d(_FusedMixin, BatchNormAct3d):
    """What ``tritonbn.fuse`` makes of a BatchNorm3d with the add / activation after it."""


class FusedFrozenBatchNorm2d(_FusedMixin, FrozenBatchNorm2d):
    """What ``tritonbn.fuse`` makes of a FrozenBatchNorm2d with the add / activation after it."""


class FusedSyncBatchNorm(_FusedMixin, SyncBatchNorm):
    """What ``tritonbn.fuse`` makes of a SyncBatchNorm with the add / activation after it."""
