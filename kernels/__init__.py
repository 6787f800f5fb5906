"""Device code for tritonbn: @triton.jit kernels only.

Installed as the subpackage ``tritonbn.kernels``. Nothing here knows about gradient tapes,
modules or shapes beyond the canonical (N, C, S) view that the host builds:

* an activation is seen as N samples x C channels x S spatial positions with three
  element strides (any of which may be 0, e.g. for the gradient of ``y.sum()``);
* a channel's reduction domain is the N x S plane, walked in tiles of
  BLOCK_N samples x BLOCK_S positions x BLOCK_C channels.

Every kernel orders its parameters pointers (upper-case names), integers (lower-case),
floats (annotated tl.float64 / tl.float32), then compile-time constants (tl.constexpr): the
host binds arguments by name from this signature (tritonbn/launch/run.py checks the order) and
its direct launch path (tritonbn/direct_launch.py) packs them in these groups. The canonical
sizes come in as size_n, size_c, size_s and are called N, C, S inside. Absent tensors are
passed as None, with None strides, and a constexpr flag says so.
"""
from .forward import bn_fwd_apply_kernel, bn_fwd_onepass_kernel, bn_stats_partial_kernel
from .backward import bn_bwd_apply_kernel, bn_bwd_onepass_kernel, bn_bwd_partial_kernel
from .merge import bn_merge_partials_kernel

__all__ = [
    "bn_stats_partial_kernel",
    "bn_fwd_apply_kernel",
    "bn_fwd_onepass_kernel",
    "bn_bwd_partial_kernel",
    "bn_bwd_apply_kernel",
    "bn_bwd_onepass_kernel",
    "bn_merge_partials_kernel",
]
