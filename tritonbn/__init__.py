"""tritonbn: batch normalization for PyTorch as hand-written Triton kernels, mixed precision."""
from . import _runtime  # noqa: F401 - first: maps the source tree's kernels/ as tritonbn.kernels
from ._version import __version__
from .functional import batch_norm, batch_renorm, inplace_abn, inplace_abn_sync, sync_batch_norm
from .launch import LAUNCHES, count_launches
from .nn import *  # noqa: F401,F403 - the layers, tritonbn.nn.__all__
from .nn import __all__ as _layers
from .reference import batch_norm_reference
from .transforms import convert_model, fold_into_conv, fuse, restore_model
from .transforms import (ConversionWarning, NotConvertible, TransformReport, register_conversion,
                         unregister_conversion)
from . import overflow

__all__ = ["batch_norm", "batch_renorm", "sync_batch_norm", "inplace_abn", "inplace_abn_sync",
           "batch_norm_reference",
           "count_launches", "LAUNCHES", "__version__", "convert_model", "restore_model",
           "fold_into_conv", "fuse", "overflow", *_layers,
           "register_conversion", "unregister_conversion", "NotConvertible", "ConversionWarning",
           "TransformReport"]
