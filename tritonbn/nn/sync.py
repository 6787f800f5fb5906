"""Synchronized batch norm across processes on torch.distributed (NCCL on GPUs, gloo on CPUs).

The layer is tritonbn's batch norm with one more option, the process group, which the launchers
use between their usual steps (tritonbn/launch/): forward, each process reduces its batch to
one float32 (count, mean, M2) summary per channel, one all_gather exchanges them, and every
process merges all of them in rank order inside the normalize kernel -- so all processes
normalize with, and update their running statistics from, bit-identical global statistics.
Backward, one all_reduce sums the per-channel sum(dz) and sum(dz * x_hat) (and the element
counts) over processes; dx uses the global sums, grad_weight and grad_bias stay each process's
own (as in torch: DistributedDataParallel then averages them). Unequal batch sizes, empty
batches included, are weighted by their counts. Communication per layer and step:
world_size * 3 * C float32 values gathered forward, 3 * C all-reduced backward.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch.nn.modules.batchnorm import _BatchNorm

from ..functional import group_name, sync_batch_norm
from .modules import TritonNorm

__all__ = ["SyncBatchNorm", "sync_batch_norm"]


class SyncBatchNorm(TritonNorm, _BatchNorm):
    """torch.nn.SyncBatchNorm's constructor, state and semantics on tritonbn's kernels.

    In training with more than one process in the group the statistics are synchronized (one
    all_gather forward, one all_reduce backward); otherwise it is tritonbn's batch norm.
    ``forward(input, residual=None)``; ``activation`` may be set as an attribute (e.g. by
    tritonbn.fuse) to fuse the activation. It subclasses torch's _BatchNorm rather than
    nn.SyncBatchNorm: DistributedDataParallel refuses nn.SyncBatchNorm on CPU modules, while
    this one also works with gloo on CPU tensors (through the interpreter).
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, track_running_stats: bool = True, process_group=None,
                 device=None, dtype=None, **kwargs) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats,
                         device=device, dtype=dtype, **kwargs)
        self.process_group = process_group

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def _process_group(self) -> Optional[str]:
        if not (dist.is_available() and dist.is_initialized()):
            return None
        group = self.process_group if self.process_group is not None else dist.group.WORLD
        return group_name(group) if dist.get_world_size(group) > 1 else None

    @classmethod
    def convert_sync_batchnorm(cls, module: torch.nn.Module, process_group=None) -> torch.nn.Module:
        """Like torch's: every batch norm (torch's or tritonbn's) becomes a tritonbn.SyncBatchNorm
        with the same parameters and buffers (the same tensors)."""
        out = module
        if isinstance(module, _BatchNorm) and not isinstance(module, cls):
            out = cls(module.num_features, module.eps, module.momentum, module.affine,
                      module.track_running_stats, process_group)
            if module.affine:
                with torch.no_grad():
                    out.weight, out.bias = module.weight, module.bias
            out.running_mean, out.running_var = module.running_mean, module.running_var
            out.num_batches_tracked = module.num_batches_tracked
            out.training = module.training
            if hasattr(module, "qconfig"):
                out.qconfig = module.qconfig
            # a fused or in-place activated layer stays one: its activation, and whether it
            # saves its output instead of its input (invertible) and writes it over the input
            for attr in ("activation", "negative_slope", "invertible", "inplace"):
                if hasattr(module, attr):
                    setattr(out, attr, getattr(module, attr))
        for name, child in module.named_children():
            out.add_module(name, cls.convert_sync_batchnorm(child, process_group))
        return out
