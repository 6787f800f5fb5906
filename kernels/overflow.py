"""Stores that know the output dtype's range: saturation and overflow counting.

A value is "overflowed" when it is finite in the accumulation dtype but its cast to the output
dtype is infinite (for float16: |v| >= 65520, which rounds past 65504). "propagate" stores the
IEEE cast (inf, like torch); "saturate" stores +-max of the output dtype instead. NaN and values
that were already infinite are stored as they are under both policies.
"""
import triton
import triton.language as tl


@triton.jit
def _max_finite(DT: tl.constexpr):
    if DT == tl.float16:
        lim = 65504.0
    elif DT == tl.bfloat16:
        lim = 3.3895313892515355e38
    else:
        lim = 3.4028234663852886e38
    return lim


@triton.jit
def _cast(v, DT: tl.constexpr):
    """v.to(DT); float64 -> bfloat16 goes through float32 explicitly: Triton's interpreter has
    no direct conversion and stores garbage (a float64 tensor with a bfloat16 residual)."""
    if v.dtype == tl.float64 and DT == tl.bfloat16:
        v = v.to(tl.float32)
    return v.to(DT)


@triton.jit
def overflowed(v, DT: tl.constexpr):
    """Finite values of v (accumulation dtype) whose cast to DT is infinite."""
    back = _cast(v, DT).to(v.dtype)
    return (back - back != 0) & (v - v == 0)


@triton.jit
def fit(v, DT: tl.constexpr, SATURATE: tl.constexpr):
    """v cast to DT under the output policy."""
    if SATURATE:
        lim = _max_finite(DT)
        v = tl.where(overflowed(v, DT), tl.where(v > 0, lim, -lim), v)
    return _cast(v, DT)


@triton.jit
def store_fit(ptrs, v, mask, SATURATE: tl.constexpr, EVICTION: tl.constexpr):
    """tl.store of v into ptrs' dtype under the output policy, with an L2 eviction hint ("" for
    none). No default: triton 3.6 does not compile a defaulted constexpr string parameter."""
    tl.store(ptrs, fit(v, ptrs.dtype.element_ty, SATURATE), mask=mask,
             eviction_policy=EVICTION)


@triton.jit
def tile_overflow(v, mask, DT: tl.constexpr):
    """Per column of a [rows, BLOCK_C] tile: how many values overflow DT, and the largest |v|
    (NaN ignored; an infinite input gives inf)."""
    count = tl.sum((overflowed(v, DT) & mask).to(tl.int32), axis=0)
    biggest = tl.max(tl.where(mask & (v == v), tl.abs(v), 0.0), axis=0)
    return count, biggest
