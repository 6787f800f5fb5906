"""Frozen batch norm: a fixed per-channel affine map from running statistics, as in
torchvision.ops.misc.FrozenBatchNorm2d (every torchvision detection and segmentation backbone),
computed by tritonbn's eval-mode kernel.

``tritonbn.FrozenBatchNorm2d`` has torchvision's constructor, buffers (``weight``, ``bias``,
``running_mean``, ``running_var``: buffers, not Parameters), ``eps`` attribute, state_dict keys
and checkpoint loading (a ``num_batches_tracked`` key is dropped), and adds no state, so
``tritonbn.convert_model`` turns a torchvision module into it in place by changing its class (and
``restore_model`` back). torchvision is not needed to use it.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .modules import TritonNorm, _check_activation

__all__ = ["FrozenBatchNorm2d"]


class FrozenBatchNorm2d(TritonNorm, nn.Module):
    """y = (x - running_mean) * weight / sqrt(running_var + eps) + bias on (N, C, H, W) input,
    whatever the training mode: no batch statistics, no running-statistics update, no gradient
    for the buffers (the input's gradient flows through the eval-mode backward kernel).

    ``forward(input, residual=None)`` computes activation(y + residual) in the kernel;
    ``activation`` / ``negative_slope`` as in tritonbn.BatchNormAct2d (default: none).

    Output dtype as torchvision's, which computes in the buffers' dtype: a float16 input with
    float32 buffers gives float32 (the input is cast first, then normalized in float32).
    """

    # A frozen layer has no running update: what TritonNorm's helpers read from a batch norm.
    momentum = 0.0
    track_running_stats = False

    def __init__(self, num_features: int, eps: float = 1e-5, *,
                 activation: Optional[str] = None, negative_slope: float = 0.01,
                 device=None, dtype=None) -> None:
        _check_activation(activation, negative_slope)
        super().__init__()
        factory = dict(device=device, dtype=dtype)
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features, **factory))
        self.register_buffer("bias", torch.zeros(num_features, **factory))
        self.register_buffer("running_mean", torch.zeros(num_features, **factory))
        self.register_buffer("running_var", torch.ones(num_features, **factory))
        if activation is not None:
            self.activation, self.negative_slope = activation, negative_slope

    def features(self) -> int:
        return self._buffers["running_mean"].numel()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # As torchvision's: checkpoints of a BatchNorm2d load, their batch count dropped.
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() != 4:
            raise ValueError(f"expected 4D input (got {input.dim()}D input)")

    def _uses_batch_statistics(self, running_mean, running_var) -> bool:
        return False        # whatever the training mode

    def _prepare_input(self, input: Tensor) -> Tensor:
        # torchvision computes x * scale + shift with tensors of the buffers' dtype, so the
        # output has the promoted dtype: cast the input up front and normalize in that dtype.
        dtype = input.dtype
        for t in self._buffers.values():
            if t is not None and t.is_floating_point():
                dtype = torch.promote_types(dtype, t.dtype)
        return input if dtype == input.dtype else input.to(dtype)

    def extra_repr(self) -> str:
        parts = [f"{self.features()}, eps={self.eps}"]
        if self.activation is not None:
            parts.append(f"activation={self.activation!r}")
            if self.activation == "leaky_relu":
                parts.append(f"negative_slope={self.negative_slope}")
        return ", ".join(parts)
