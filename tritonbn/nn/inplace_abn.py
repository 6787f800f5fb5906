"""In-place activated batch norm (Rota Bulo, Porzi, Kontschieder, CVPR 2018) on tritonbn's kernels.

A BN -> activation -> conv chain normally keeps two activation buffers per layer for backward:
batch norm's input x and the conv's input y = act(BN(x)). These layers keep only y: the
backward recovers x_hat = (act^-1(y) - residual - beta) / gamma inside the kernels, so the
activation must be invertible -- leaky_relu with a positive slope, elu, or identity. With
``inplace=True`` (the default, as in the inplace_abn package) y is also written over x where
that is allowed (``tritonbn.inplace_abn``), which saves the transient second buffer as well.

Constructor, attributes and state_dict follow the inplace_abn package's ``InPlaceABN(num_features,
eps, momentum, affine, activation="leaky_relu", activation_param=0.01)``; its "identity" is
``activation=None`` here. gamma is used with |gamma| >= eps (sign kept), the package's
safeguard in a form that leaves every |gamma| >= eps exact. The package's own layers compute
with |weight| + eps: a state_dict it saved needs that applied to ``weight`` after loading
(``tritonbn.convert_model`` on the package's modules does it).
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from .. import functional
from .modules import BatchNorm1d, BatchNorm2d, BatchNorm3d
from .sync import SyncBatchNorm

__all__ = ["InPlaceABN", "InPlaceABN1d", "InPlaceABN2d", "InPlaceABN3d", "InPlaceABNSync"]


class _InPlaceABN:
    """forward(input, residual=None) = act(BN(input) + residual), saving only the output."""

    invertible = True

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, activation: Optional[str] = "leaky_relu",
                 activation_param: float = 0.01, *, inplace: bool = True,
                 track_running_stats: bool = True, device=None, dtype=None, **kwargs) -> None:
        activation = functional.abn_activation(activation)
        super().__init__(num_features, eps, momentum, affine, track_running_stats,
                         device=device, dtype=dtype, **kwargs)
        self.activation, self.negative_slope = activation, float(activation_param)
        self.inplace = bool(inplace)
        # refused here, with the reason, rather than at the first forward
        functional.options(True, 0.1 if momentum is None else momentum, eps, activation,
                           self.negative_slope, invertible=True)

    # the inplace_abn package's name for the slope (leaky_relu) or alpha (elu)
    @property
    def activation_param(self) -> float:
        return self.negative_slope

    @activation_param.setter
    def activation_param(self, value: float) -> None:
        self.negative_slope = float(value)

    def forward(self, input: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        return self._run(input, residual)

    def extra_repr(self) -> str:
        act = "identity" if self.activation is None else self.activation
        return (f"{nn.modules.batchnorm._BatchNorm.extra_repr(self)}, activation={act!r}, "
                f"activation_param={self.negative_slope}, inplace={self.inplace}")


class InPlaceABN1d(_InPlaceABN, BatchNorm1d):
    """In-place activated batch norm on (N, C) or (N, C, L) input."""


class InPlaceABN2d(_InPlaceABN, BatchNorm2d):
    """In-place activated batch norm on (N, C, H, W) input."""


class InPlaceABN3d(_InPlaceABN, BatchNorm3d):
    """In-place activated batch norm on (N, C, D, H, W) input."""


class InPlaceABN(_InPlaceABN, BatchNorm2d):
    """In-place activated batch norm on (N, C, ...) input of any rank, as the inplace_abn
    package's InPlaceABN."""

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")


class InPlaceABNSync(_InPlaceABN, SyncBatchNorm):
    """InPlaceABN with statistics synchronized over the processes of ``group`` (default: the
    world) in training, as tritonbn.SyncBatchNorm; (N, C, ...) input of any rank."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, activation: Optional[str] = "leaky_relu",
                 activation_param: float = 0.01, group=None, *, inplace: bool = True,
                 track_running_stats: bool = True, device=None, dtype=None) -> None:
        super().__init__(num_features, eps, momentum, affine, activation, activation_param,
                         inplace=inplace, track_running_stats=track_running_stats,
                         device=device, dtype=dtype, process_group=group)

    @property
    def group(self):
        return self.process_group

