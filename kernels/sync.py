"""Merging per-split partials into one summary per channel, for statistics that are exchanged
between processes (synchronized batch norm): each process sends (count, mean, M2) or
(sum dz, sum dz * x_hat) for its whole batch, one row per quantity."""
import triton
import triton.language as tl

from .common import chan_merge


@triton.jit
def bn_merge_partials_kernel(
    PART,               # pointer to partials, (Q, n_splits, C) in ACC
    OUT,                # pointer to the merged summary, (Q, C) in ACC
    C,                  # channels
    n_splits,           # partials per channel
    MOMENTS: tl.constexpr,      # Q = 3 (count, mean, M2) merged with Chan; else Q = 2 summed
    ACC: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    c = pid * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    a = tl.zeros((BLOCK_C,), ACC)
    b = tl.zeros((BLOCK_C,), ACC)
    m2 = tl.zeros((BLOCK_C,), ACC)
    for k in range(0, n_splits):
        p0 = tl.load(PART + k * C + c, mask=cmask, other=0.0)
        p1 = tl.load(PART + (n_splits + k) * C + c, mask=cmask, other=0.0)
        if MOMENTS:
            p2 = tl.load(PART + (2 * n_splits + k) * C + c, mask=cmask, other=0.0)
            a, b, m2 = chan_merge(a, b, m2, p0, p1, p2)
        else:
            a += p0
            b += p1
    tl.store(OUT + c, a, mask=cmask)
    tl.store(OUT + C + c, b, mask=cmask)
    if MOMENTS:
        tl.store(OUT + 2 * C + c, m2, mask=cmask)
