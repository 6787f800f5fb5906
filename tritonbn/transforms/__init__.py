"""Model transforms: convert torch's batch norms to tritonbn's, fold eval-mode batch norm into the
layer before it, fuse batch norm with the add and activation after it."""
from .convert import convert_model, restore_model
from .fold import FoldedEpilogue, fold_into_conv
from .fuse import (FusedBatchNormAct1d, FusedBatchNormAct2d, FusedBatchNormAct3d,
                   FusedFrozenBatchNorm2d, FusedSyncBatchNorm, fuse)
from .registry import NotConvertible, register_conversion, swap_class, unregister_conversion
from .report import ConversionWarning, LayerRecord, TransformReport

__all__ = ["convert_model", "restore_model", "fold_into_conv", "fuse",
           "FusedBatchNormAct1d", "FusedBatchNormAct2d", "FusedBatchNormAct3d",
           "FusedFrozenBatchNorm2d", "FusedSyncBatchNorm", "FoldedEpilogue",
           "register_conversion", "unregister_conversion", "swap_class", "NotConvertible",
           "ConversionWarning", "LayerRecord", "TransformReport"]
