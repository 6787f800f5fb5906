"""Merging per-split partials into one summary per channel, in a launch of its own: for splits
too many to merge inside every apply program (channels-last planes with few channels get
hundreds), and for the statistics synchronized batch norm exchanges between processes, where
each process sends one (count, mean, M2) or (sum dz, sum dz * x_hat) row per quantity."""
import triton
import triton.language as tl


@triton.jit
def _chunk(PART, k0, c, cmask, C, n_splits, BLOCK_K: tl.constexpr):
    """Pointers to (and which exist of) the first quantity of splits k0 .. k0 + BLOCK_K - 1."""
    k = k0 + tl.arange(0, BLOCK_K)
    return PART + k[:, None] * C + c[None, :], (k[:, None] < n_splits) & cmask[None, :]


@triton.jit
def bn_merge_partials_kernel(
    PART,               # pointer to partials, (Q, n_splits, C) in ACC
    OUT,                # pointer to the merged summary, (Q, C) in ACC
    size_c,             # channels C
    n_splits,           # partials per channel
    MOMENTS: tl.constexpr,      # Q = 3 (count, mean, M2), merged exactly; else Q = 2, summed
    ACC: tl.constexpr,
    BLOCK_K: tl.constexpr,      # splits loaded at once
    BLOCK_C: tl.constexpr,      # channels per program
):
    """Chan's merge in closed form over chunks of BLOCK_K splits: element-wise sums of the
    counts and count-weighted means first, then (a second, L2-resident read) of the M2s plus
    each count times its mean's squared deviation from the merged mean. A few multiply-adds
    per partial, reduced once in a fixed tree: deterministic."""
    C = size_c                  # the channels under their short name
    pid = tl.program_id(0)
    c = pid * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    acc_a = tl.zeros((BLOCK_K, BLOCK_C), ACC)
    acc_b = tl.zeros((BLOCK_K, BLOCK_C), ACC)
    for k0 in range(0, n_splits, BLOCK_K):
        ptr, mask = _chunk(PART, k0, c, cmask, C, n_splits, BLOCK_K)
        p0 = tl.load(ptr, mask=mask, other=0.0)
        p1 = tl.load(ptr + n_splits * C, mask=mask, other=0.0)
        if MOMENTS:
            acc_a += p0
            acc_b += p0 * p1
        else:
            acc_a += p0
            acc_b += p1
    a = tl.sum(acc_a, axis=0)
    b = tl.sum(acc_b, axis=0)
    if MOMENTS:
        b = b / tl.maximum(a, 1.0)          # the merged mean
        acc_m2 = tl.zeros((BLOCK_K, BLOCK_C), ACC)
        for k0 in range(0, n_splits, BLOCK_K):
            ptr, mask = _chunk(PART, k0, c, cmask, C, n_splits, BLOCK_K)
            p0 = tl.load(ptr, mask=mask, other=0.0)
            dev = tl.load(ptr + n_splits * C, mask=mask, other=0.0) - b[None, :]
            acc_m2 += tl.load(ptr + 2 * n_splits * C, mask=mask, other=0.0) + p0 * (dev * dev)
        tl.store(OUT + 2 * C + c, tl.sum(acc_m2, axis=0), mask=cmask)
    tl.store(OUT + c, a, mask=cmask)
    tl.store(OUT + C + c, b, mask=cmask)
