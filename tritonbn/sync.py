"""Synchronized batch norm across processes on torch.distributed (NCCL on GPUs, gloo on CPUs).

Forward: each process reduces its batch with the Triton kernels to one float32 (count, mean, M2)
summary per channel; one all_gather exchanges them; every process merges all of them in rank
order with Chan's formula inside the normalize kernel -- so all processes normalize with, and
update their running statistics from, bit-identical global statistics. Backward: the kernels
reduce sum(dz) and sum(dz * x_hat) per channel; one all_reduce sums them over processes; dx
uses the global sums. grad_weight and grad_bias are each process's own (as in torch:
DistributedDataParallel then averages them). Unequal batch sizes, empty batches included, are
weighted by their counts. Communication per layer and step: world_size * 3 * C float32 values
gathered in forward, 2 * C float32 values all-reduced in backward.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm

from . import dispatch, launch
from .kernels.activations import ACTIVATIONS
from .modules import _TritonBatchNormMixin, _average_factor, _count_batch, guard_kwargs
from .validate import check_batch_norm_args, check_epilogue_args

__all__ = ["SyncBatchNorm", "sync_batch_norm"]


def _gather_moments(local: Tensor, group) -> Tensor:
    """(3, C) per process -> (3, world, C), in rank order."""
    world = dist.get_world_size(group)
    out = local.new_empty((world * local.shape[0], local.shape[1]))  # ranks concatenated on dim 0
    dist.all_gather_into_tensor(out, local.contiguous(), group=group)
    return out.view(world, *local.shape).transpose(0, 1).contiguous()


class _SyncBatchNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, weight, bias, running_mean, running_var, momentum, eps, group,
                residual, activation, slope):
        epi = launch.Epilogue(ACTIVATIONS[activation], slope)
        counts = {}

        def exchange(local):
            gathered = _gather_moments(local, group)
            counts["total"] = gathered[0].sum(0)   # elements per channel over all processes
            return gathered

        y, mean, invstd, rd = launch.forward(input, weight, bias, running_mean, running_var, True,
                                             momentum, eps, residual, epi, sync=exchange)
        ctx.save_for_backward(input, weight, bias, residual if activation else None, mean,
                              invstd, rd)
        ctx.group, ctx.epi = group, epi
        ctx.res_dtype = None if residual is None else residual.dtype
        ctx.total = counts["total"]
        return y

    @staticmethod
    def backward(ctx, grad_y):
        input, weight, bias, residual, mean, invstd, rd = ctx.saved_tensors
        total = ctx.total

        def exchange(local):
            summed = local.clone()  # local stays this process's own: grad_weight / grad_bias
            dist.all_reduce(summed, group=ctx.group)
            # hand the kernel means (sums / global count, on the device: no host sync) and 1
            return summed / total.clamp(min=1.0), 1.0

        dx, dw, db, dres = launch.backward(grad_y, input, weight, bias, residual, mean, invstd, rd,
                                           True, True, ctx.epi, sync=exchange)
        need = ctx.needs_input_grad
        if need[8] and dres is None:
            dres = grad_y
        return (dx if need[0] else None,
                dw.to(weight.dtype) if need[1] else None,
                db.to(bias.dtype) if need[2] else None,
                None, None, None, None, None,
                dres.to(ctx.res_dtype) if need[8] else None, None, None)


def sync_batch_norm(input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                    weight: Optional[Tensor], bias: Optional[Tensor], momentum: float, eps: float,
                    process_group=None, *, activation: Optional[str] = None,
                    negative_slope: float = 0.01, residual: Optional[Tensor] = None) -> Tensor:
    """Training-mode batch norm with statistics over the batches of every process in
    ``process_group`` (default: the world). Needs the Triton kernels: a GPU, or CPU tensors
    with TRITON_INTERPRET=1."""
    check_batch_norm_args(input, running_mean, running_var, weight, bias, True, momentum, eps)
    check_epilogue_args(input, activation, negative_slope, residual)
    if input.device.type == "cpu" and not dispatch.interpreter_enabled():
        raise RuntimeError("sync_batch_norm runs the Triton kernels: use a GPU, or set "
                           "TRITON_INTERPRET=1 before importing triton for CPU tensors")
    group = process_group or dist.group.WORLD
    c = input.shape[1]
    # the parameters flattened (their gradients flow back through the reshape); the running
    # statistics as they are: the launcher writes strided ones back in place
    flat = [None if t is None else t.reshape(c) for t in (weight, bias)]
    return _SyncBatchNormFunction.apply(input, flat[0], flat[1], running_mean, running_var,
                                        float(momentum),
                                        float(eps), group, residual, activation or None,
                                        float(negative_slope))


class SyncBatchNorm(_TritonBatchNormMixin, _BatchNorm):
    """torch.nn.SyncBatchNorm's constructor, state and semantics on tritonbn's kernels.

    In training with more than one process in the group the statistics are synchronized (one
    all_gather forward, one all_reduce backward); otherwise it is tritonbn's batch norm.
    ``forward(input, residual=None)``; ``activation`` may be set as an attribute
    (e.g. by tritonbn.fuse) to fuse the activation. It subclasses torch's _BatchNorm rather
    than nn.SyncBatchNorm: DistributedDataParallel refuses nn.SyncBatchNorm on CPU modules,
    while this one also works with gloo on CPU tensors (through the interpreter).
    """

    activation: Optional[str] = None
    negative_slope: float = 0.01

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, track_running_stats: bool = True, process_group=None,
                 device=None, dtype=None, **kwargs) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats,
                         device=device, dtype=dtype, **kwargs)
        self.process_group = process_group

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        self._check_input_dim(input)
        group = self.process_group or (dist.group.WORLD if dist.is_available()
                                       and dist.is_initialized() else None)
        distributed = group is not None and dist.get_world_size(group) > 1
        if not (self.training and distributed):
            return self._local(input, residual)
        factor = _average_factor(self)
        rm = self.running_mean if self.track_running_stats else None
        rv = self.running_var if self.track_running_stats else None
        out = sync_batch_norm(input, rm, rv, self.weight, self.bias, factor, self.eps, group,
                              activation=self.activation, negative_slope=self.negative_slope,
                              residual=residual)
        _count_batch(self)
        return out

    def _local(self, input, residual):
        """One process, or eval: tritonbn's batch norm with the module's options."""
        from .functional import batch_norm
        factor = _average_factor(self)
        batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        pass_running = not self.training or self.track_running_stats
        out = batch_norm(input, self.running_mean if pass_running else None,
                         self.running_var if pass_running else None, self.weight, self.bias,
                         batch_stats, factor, self.eps, activation=self.activation,
                         negative_slope=self.negative_slope, residual=residual,
                         **guard_kwargs(self))
        _count_batch(self)
        return out

    @classmethod
    def convert_sync_batchnorm(cls, module: torch.nn.Module, process_group=None) -> torch.nn.Module:
        """Like torch's: every batch norm (torch's or tritonbn's) becomes a tritonbn.SyncBatchNorm
        with the same parameters and buffers (the same tensors)."""
        out = module
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and not isinstance(module, cls):
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
            for attr in ("activation", "negative_slope"):
                if hasattr(module, attr):
                    setattr(out, attr, getattr(module, attr))
        for name, child in module.named_children():
            out.add_module(name, cls.convert_sync_batchnorm(child, process_group))
        return out
