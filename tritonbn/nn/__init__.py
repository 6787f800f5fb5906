"""tritonbn's nn.Module layers: batch norm, its fused, renormalized, per-activation and
synchronized variants and in-place activated batch norm, all on one base (``TritonNorm``)."""
from .modules import (BatchNorm1d, BatchNorm2d, BatchNorm3d, BatchNormAct1d, BatchNormAct2d,
                      BatchNormAct3d, BatchNormPerActivation1d, BatchNormPerActivation2d,
                      BatchNormPerActivation3d, BatchRenorm1d, BatchRenorm2d, BatchRenorm3d,
                      TritonNorm)
from .sync import SyncBatchNorm
from .frozen import FrozenBatchNorm2d
from .inplace_abn import InPlaceABN, InPlaceABN1d, InPlaceABN2d, InPlaceABN3d, InPlaceABNSync

__all__ = ["TritonNorm", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d",
           "BatchNormAct1d", "BatchNormAct2d", "BatchNormAct3d",
           "BatchRenorm1d", "BatchRenorm2d", "BatchRenorm3d",
           "BatchNormPerActivation1d", "BatchNormPerActivation2d", "BatchNormPerActivation3d",
           "SyncBatchNorm", "FrozenBatchNorm2d",
           "InPlaceABN", "InPlaceABN1d", "InPlaceABN2d", "InPlaceABN3d", "InPlaceABNSync"]
