"""tritonbn: batch normalization for PyTorch as hand-written Triton kernels, mixed precision."""
from .convert import convert_model, restore_model
from .fold import fold_into_conv
from .fusion import fuse
from .functional import batch_norm, batch_renorm
from .fused_modules import (
    BatchNormAct1d, BatchNormAct2d, BatchNormAct3d, BatchNormPerActivation1d,
    BatchNormPerActivation2d, BatchNormPerActivation3d, BatchRenorm1d, BatchRenorm2d, BatchRenorm3d,
)
from .launch import LAUNCHES, count_launches
from .modules import BatchNorm1d, BatchNorm2d, BatchNorm3d
from .reference import batch_norm_reference
from .sync import SyncBatchNorm, sync_batch_norm
from . import overflow

__version__ = "0.1.0"

__all__ = ["batch_norm", "batch_renorm", "batch_norm_reference", "count_launches", "LAUNCHES", "__version__",
           "BatchNorm1d", "BatchNorm2d", "BatchNorm3d",
           "convert_model", "restore_model", "fold_into_conv", "fuse",
           "BatchNormAct1d", "BatchNormAct2d", "BatchNormAct3d",
           "BatchRenorm1d", "BatchRenorm2d", "BatchRenorm3d",
           "BatchNormPerActivation1d", "BatchNormPerActivation2d", "BatchNormPerActivation3d",
           "SyncBatchNorm", "sync_batch_norm", "overflow"]
