"""The public functional op: tritonbn.batch_norm, a drop-in for torch.nn.functional.batch_norm."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import ops
from .validate import check_batch_norm_args

__all__ = ["batch_norm"]


def _flat(t: Optional[Tensor], c: int) -> Optional[Tensor]:
    # torch accepts any parameter with C elements, e.g. shape (1, C); the kernels index it flat.
    return t if t is None or t.dim() == 1 else t.reshape(c)


def batch_norm(input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
               weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
               training: bool = False, momentum: float = 0.1, eps: float = 1e-5) -> Tensor:
    """Batch normalization with the signature and semantics of torch.nn.functional.batch_norm.

    ``input`` is (N, C, ...) in float16, bfloat16, float32 (or float64); contiguous,
    channels_last / channels_last_3d or strided. Statistics are reduced in float32 (float64 for
    float64 input). In training the batch statistics normalize the input and, when given,
    ``running_mean`` / ``running_var`` are updated in place by the kernels with
    ``momentum`` and the unbiased batch variance. Parameters and running statistics may be
    float32 or the input's dtype. The output has the input's dtype and torch's memory format.
    """
    check_batch_norm_args(input, running_mean, running_var, weight, bias, training, momentum, eps)
    c = input.shape[1]
    y, _mean, _invstd = ops.BatchNormFunction.apply(
        input, _flat(weight, c), _flat(bias, c), _flat(running_mean, c), _flat(running_var, c),
        bool(training), float(momentum), float(eps))
    return y
