"""tritonbn: batch normalization for PyTorch as hand-written Triton kernels, mixed precision."""
from .functional import batch_norm
from .launch import LAUNCHES, count_launches
from .reference import batch_norm_reference

__version__ = "0.1.0"

__all__ = ["batch_norm", "batch_norm_reference", "count_launches", "LAUNCHES", "__version__"]
