"""Building blocks shared by the forward and backward kernels.

Statistics are carried as (count, mean, M2) triples in the accumulation dtype (float32,
or float64 for float64 activations) and merged with Chan's parallel formula (``merge_moments``,
many summaries at once), so the
variance is never formed as E[x^2] - E[x]^2 and no square is ever taken in half precision.
"""
import triton
import triton.language as tl

from .overflow import fit


@triton.jit
def tile_rows(
    t,                  # index of the tile in the channel's N x S plane (row-major over tiles)
    n_tiles_s,          # number of tiles along S: cdiv(S, BLOCK_S)
    N,                  # samples in the canonical view
    S,                  # spatial positions per sample in the canonical view
    BLOCK_N: tl.constexpr,
    BLOCK_S: tl.constexpr,
    USE_INT64: tl.constexpr,
):
    """Sample index, spatial index and in-range mask of every row of tile ``t``.

    A tile holds BLOCK_N * BLOCK_S rows; BLOCK_S is a power of two, so the split of a row
    into (sample, position) is a shift and a mask, and positions stay contiguous for the
    compiler's vectorizer when the spatial stride is 1.
    """
    tn = t // n_tiles_s
    ts = t - tn * n_tiles_s
    i = tl.arange(0, BLOCK_N * BLOCK_S)
    n = tn * BLOCK_N + i // BLOCK_S
    s = ts * BLOCK_S + i % BLOCK_S
    if USE_INT64:
        # An element offset n * stride_n can pass 2**31 on large activations.
        n = n.to(tl.int64)
        s = s.to(tl.int64)
    return n, s, (n < N) & (s < S)


@triton.jit
def row_index(BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr):
    """(sample, position) of every row of a tile relative to its first row: computed once per
    program, so a loop iteration adds scalars instead of redoing the index arithmetic."""
    i = tl.arange(0, BLOCK_N * BLOCK_S)
    return i // BLOCK_S, i % BLOCK_S


@triton.jit
def row_offsets(dn, ds, stride_n, stride_s, USE_INT64: tl.constexpr):
    """Element offsets of a tile's rows (``row_index``) from the tile's first row."""
    if USE_INT64:
        dn = dn.to(tl.int64)
        ds = ds.to(tl.int64)
    return dn * stride_n + ds * stride_s


@triton.jit
def tile_offset(tn, ts, stride_n, stride_s, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr,
                USE_INT64: tl.constexpr):
    """Element offset of the first row of tile (tn, ts) (tile row tn along N, column ts along S)."""
    n0 = tn * BLOCK_N
    s0 = ts * BLOCK_S
    if USE_INT64:
        n0 = n0.to(tl.int64)
        s0 = s0.to(tl.int64)
    return n0 * stride_n + s0 * stride_s


@triton.jit
def lane_count(dn, ds, n_rem, s_rem, k_full, k_col, k_row, k_corner):
    """Values each row lane (dn, ds) of a tile has seen, for a split that has seen ``k_full``
    full tiles and ``k_col`` / ``k_row`` / ``k_corner`` edge tiles of the last tile column
    (n_left >= BLOCK_N, s_left = s_rem), last row (n_left = n_rem), and corner."""
    in_n = (dn < n_rem).to(k_full.dtype)
    in_s = (ds < s_rem).to(k_full.dtype)
    return k_full + k_col * in_s + k_row * in_n + k_corner * (in_n * in_s)


@triton.jit
def channel_offsets(c, stride_c, USE_INT64: tl.constexpr):
    """Element offset of each channel in ``c`` (a BLOCK_C vector) along the channel axis."""
    if USE_INT64:
        c = c.to(tl.int64)
    return c * stride_c


@triton.jit
def tile_ptrs(BASE, n, s, c_off, stride_n, stride_s):
    """Pointers of a [rows, BLOCK_C] tile: rows (n, s) from tile_rows, columns c_off."""
    return BASE + (n * stride_n + s * stride_s)[:, None] + c_off[None, :]


@triton.jit
def tile_moments(x, mask, row_mask):
    """Count, mean and centered M2 of each column of a masked [rows, BLOCK_C] tile.

    The tile mean is taken first and the squares are of deviations from it, so the sum of
    squares stays O(count * var) even when the channel mean is large.
    """
    count = tl.sum(row_mask.to(x.dtype), axis=0)
    mean = tl.sum(x, axis=0) / tl.maximum(count, 1.0)
    d = tl.where(mask, x - mean[None, :], 0.0)
    return count, mean, tl.sum(d * d, axis=0)


@triton.jit
def merge_moments(n, mean, m2, axis: tl.constexpr):
    """Chan's merge of many (count, mean, M2) summaries at once along ``axis``, in closed form:
    the count-weighted mean of the means, then the M2s plus each count times its mean's squared
    deviation from it. Exact like a pairwise tree, but two fixed-order sums instead of a
    division per merge step; summaries with count 0 (masked) drop out."""
    count = tl.sum(n, axis=axis)
    total_mean = tl.sum(n * mean, axis=axis) / tl.maximum(count, 1.0)
    dev = mean - tl.expand_dims(total_mean, axis)
    return count, total_mean, tl.sum(m2 + n * (dev * dev), axis=axis)


@triton.jit
def merge_partials(
    PART,               # pointer to (3, n_splits, C) moments or (2, n_splits, C) sums, ACC
    c, cmask,           # channel indices (BLOCK_C,) and which exist
    C, n_splits,
    ACC: tl.constexpr,
    MOMENTS: tl.constexpr,      # merge (count, mean, M2); else add (sum dz, sum dz x_hat)
    SPLITS_P2: tl.constexpr,    # a power of two >= n_splits: all splits load at once
):
    """The partials of channels ``c`` merged at once: one round of parallel loads and fixed-order
    sums (no serial chain); deterministic, every program alike."""
    k = tl.arange(0, SPLITS_P2)
    ptr = PART + k[:, None] * C + c[None, :]
    mask = (k[:, None] < n_splits) & cmask[None, :]
    a = tl.load(ptr, mask=mask, other=0.0).to(ACC)
    b = tl.load(ptr + n_splits * C, mask=mask, other=0.0).to(ACC)
    if MOMENTS:
        m2 = tl.load(ptr + 2 * n_splits * C, mask=mask, other=0.0).to(ACC)
        a, b, m2 = merge_moments(a, b, m2, 0)
    else:
        a = tl.sum(a, axis=0)
        b = tl.sum(b, axis=0)
        m2 = a
    return a, b, m2


@triton.jit
def inv_std(var, eps):
    """1 / sqrt(var + eps).

    float32: the hardware reciprocal square root (rsqrt.approx.f32, relative error < 2^-22.9).
    A correctly rounded sqrt_rn buys nothing here: Triton's float32 `/` is div.full.f32, itself
    ~2 ulp, and sqrt_rn's slow-path subroutine cost sm_80 kernels an 8-16 B stack frame
    (python -m bench.compile_check). float64 (gradcheck precision): sqrt and division, both IEEE."""
    if var.dtype == tl.float64:
        return 1.0 / tl.sqrt(var + eps)
    return tl.math.rsqrt(var + eps)


@triton.jit
def scalar(v, ACC: tl.constexpr):
    """A float64 kernel argument as a 0-d value of the accumulation dtype (works the same for the
    compiled kernels, where v is an fp64 scalar, and for the interpreter, where it is a float)."""
    return tl.full((), v, ACC)


@triton.jit
def running_weight(
    BATCHES,            # pointer to the module's batch count, 0-d int64 (CUMULATIVE == 1), or None
    RUNNING_COUNT,      # pointer to per-channel batch counts, (C,) int64 (CUMULATIVE == 2), or None
    c, cmask,           # channel indices and which exist
    momentum,           # the weight when CUMULATIVE == 0 (float64 argument)
    ACC: tl.constexpr,
    BLOCK_C: tl.constexpr,
    CUMULATIVE: tl.constexpr,   # 0: momentum; 1: 1 / (batches + 1); 2: per channel, 1 / (seen + 1)
):
    """The weight of this batch in the running statistics, per channel. momentum=None is the
    cumulative average: the weight comes from a counter read here, on the device, so no host
    code reads a data-dependent number (fullgraph compiles, CUDA graphs replay it)."""
    if CUMULATIVE == 1:
        seen = tl.load(BATCHES).to(ACC)
        weight = tl.full((BLOCK_C,), 1.0, ACC) / (seen + 1.0)
    elif CUMULATIVE == 2:
        seen = tl.load(RUNNING_COUNT + c, mask=cmask, other=0).to(ACC)
        weight = 1.0 / (seen + 1.0)
    else:
        weight = tl.full((BLOCK_C,), momentum, ACC)
    return weight


@triton.jit
def update_running(
    RUN_MEAN,           # pointer to the running mean, (C,), float32 or the input dtype (read)
    RUN_VAR,            # pointer to the running variance, (C,), same dtype as RUN_MEAN (read)
    NEW_MEAN,           # pointer the updated running mean is written to (RUN_MEAN for in place)
    NEW_VAR,            # pointer the updated running variance is written to
    BATCHES,            # module batch count (CUMULATIVE == 1), or None
    RUNNING_COUNT,      # per-channel batch counts (CUMULATIVE == 2), or None
    NEW_RUNNING_COUNT,  # where the incremented per-channel counts go (CUMULATIVE == 2), or None
    c,                  # channel indices, (BLOCK_C,)
    cmask,              # which of them exist
    mean,               # batch mean, (BLOCK_C,), accumulation dtype
    m2,                 # batch sum of squared deviations, (BLOCK_C,)
    count,              # elements per channel, (BLOCK_C,)
    momentum,           # weight of the batch statistics (float64 argument)
    BLOCK_C: tl.constexpr,
    SKIP_NONFINITE: tl.constexpr,   # leave a channel alone when its batch statistics are not finite
    CUMULATIVE: tl.constexpr,       # see running_weight
    SATURATE: tl.constexpr,         # clamp finite results to the running dtype's range
):
    """running = (1 - w) * running + w * batch, with the unbiased variance; w from running_weight."""
    acc = mean.dtype
    rm = tl.load(RUN_MEAN + c, mask=cmask, other=0.0).to(acc)
    rv = tl.load(RUN_VAR + c, mask=cmask, other=0.0).to(acc)
    unbiased = m2 / tl.maximum(count - 1.0, 1.0)
    weight = running_weight(BATCHES, RUNNING_COUNT, c, cmask, momentum, acc, BLOCK_C, CUMULATIVE)
    new_rm = rm * (1.0 - weight) + mean * weight
    new_rv = rv * (1.0 - weight) + unbiased * weight
    if SKIP_NONFINITE:
        # decided per channel on the device: no host sync, other channels still update
        ok = (mean - mean == 0) & (unbiased - unbiased == 0)
        new_rm = tl.where(ok, new_rm, rm)
        new_rv = tl.where(ok, new_rv, rv)
    else:
        ok = cmask
    if CUMULATIVE == 2:
        seen = tl.load(RUNNING_COUNT + c, mask=cmask, other=0)
        tl.store(NEW_RUNNING_COUNT + c, seen + ok.to(seen.dtype), mask=cmask)
    tl.store(NEW_MEAN + c, fit(new_rm, NEW_MEAN.dtype.element_ty, SATURATE), mask=cmask)
    tl.store(NEW_VAR + c, fit(new_rv, NEW_VAR.dtype.element_ty, SATURATE), mask=cmask)


@triton.jit
def load_residual(
    RES,                # pointer to the residual, or None
    n, s, c,            # the tile's sample and position indices, its channels
    stride_rn, stride_rc, stride_rs,   # the residual's strides (None without it)
    mask,               # the tile's valid elements
    ACC: tl.constexpr,
    LOAD: tl.constexpr,  # false: no residual, or a backward that needs neither z nor x_hat from it
    USE_INT64: tl.constexpr,
):
    """The residual's tile in the accumulation dtype, or 0.0 without a load."""
    if LOAD:
        r_coff = channel_offsets(c, stride_rc, USE_INT64)
        res = tl.load(tile_ptrs(RES, n, s, r_coff, stride_rn, stride_rs), mask=mask,
                      other=0.0).to(ACC)
    else:
        res = 0.0
    return res


@triton.jit
def load_affine(W, B, c, cmask, floor, ACC: tl.constexpr, HAS_W: tl.constexpr,
                HAS_B: tl.constexpr, INVERTIBLE: tl.constexpr):
    """gamma and beta for the channels in ``c`` in the accumulation dtype (1 and 0 when absent).

    INVERTIBLE (in-place activated batch norm, whose backward divides by gamma): |gamma| is
    raised to at least ``floor`` (the call's eps), keeping its sign (+ for 0). Any larger gamma
    is used as it is, so the layer is exactly batch norm + activation there."""
    if HAS_W:
        w = tl.load(W + c, mask=cmask, other=1.0).to(ACC)
        if INVERTIBLE:
            w = tl.where(tl.abs(w) < floor, tl.where(w < 0, -floor, floor), w)
    else:
        w = tl.full(c.shape, 1.0, ACC)
    if HAS_B:
        b = tl.load(B + c, mask=cmask, other=0.0).to(ACC)
    else:
        b = tl.zeros(c.shape, ACC)
    return w, b


@triton.jit
def renorm_correction(
    RUN_MEAN,           # pointer to the running mean as it was before this step, (C,)
    RUN_VAR,            # pointer to the running variance as it was before this step, (C,)
    BATCHES,            # pointer to the module's batch count (0-d int64), or None without warm-up
    c, cmask,           # channel indices and which exist
    mean,               # batch mean, (BLOCK_C,), ACC
    invstd,             # batch 1 / sqrt(var + eps), (BLOCK_C,), ACC
    eps, rmax, dmax,    # float64 arguments
    warmup_steps,       # steps (batches counted before this one) that use r = 1, d = 0
    WARMUP: tl.constexpr,
):
    """Batch Renormalization's r and d (Ioffe 2017), clipped to [1/rmax, rmax] and [-dmax, dmax].

    sigma = sqrt(running_var + eps); r = sigma_batch / sigma; d = (mean - running_mean) / sigma.
    During the warm-up (the batch count read on the device is below warmup_steps) r = 1, d = 0.
    """
    acc = mean.dtype
    rm = tl.load(RUN_MEAN + c, mask=cmask, other=0.0).to(acc)
    rv = tl.load(RUN_VAR + c, mask=cmask, other=1.0).to(acc)
    inv_sigma = inv_std(rv, scalar(eps, acc))
    r_max = scalar(rmax, acc)
    d_max = scalar(dmax, acc)
    if WARMUP:
        warm = tl.load(BATCHES) < warmup_steps
        r_max = tl.where(warm, 1.0, r_max)
        d_max = tl.where(warm, 0.0, d_max)
    r = tl.minimum(tl.maximum(inv_sigma / invstd, 1.0 / r_max), r_max)
    d = tl.minimum(tl.maximum((mean - rm) * inv_sigma, -d_max), d_max)
    return r, d


@triton.jit
def load_renorm(SAVE_RD, c, cmask, C, ACC: tl.constexpr, RENORM: tl.constexpr):
    """r and d saved by the forward pass ((2, C) in ACC), or 1 and 0 without renormalization."""
    if RENORM:
        r = tl.load(SAVE_RD + c, mask=cmask, other=1.0).to(ACC)
        d = tl.load(SAVE_RD + C + c, mask=cmask, other=0.0).to(ACC)
    else:
        r = tl.full(c.shape, 1.0, ACC)
        d = tl.zeros(c.shape, ACC)
    return r, d


@triton.jit
def finish_batch_stats(
    count, mean, m2,            # merged (count, mean, M2) of the channels in c, ACC
    c, cmask, C,
    RUN_MEAN, RUN_VAR,          # running statistics as before this step (read)
    NEW_MEAN, NEW_VAR,          # where the updated running statistics go (when UPDATE_RUNNING)
    BATCHES,                    # module batch count (CUMULATIVE == 1 or renorm WARMUP), or None
    RUNNING_COUNT, NEW_RUNNING_COUNT,  # per-channel batch counts (CUMULATIVE == 2), or None
    SAVE_MEAN, SAVE_INVSTD,     # (C,) ACC outputs
    SAVE_RD,                    # (2, C) ACC output: renorm r and d, or None
    write,                      # whether this program writes the per-channel outputs
    momentum, eps, rmax, dmax,  # float64 arguments
    warmup_steps,               # renorm warm-up steps
    BLOCK_C: tl.constexpr,
    UPDATE_RUNNING: tl.constexpr,
    RENORM: tl.constexpr,
    WARMUP: tl.constexpr,
    SKIP_NONFINITE: tl.constexpr,
    CUMULATIVE: tl.constexpr,
    SATURATE: tl.constexpr,
):
    """Batch 1/std (and renorm r, d) from merged moments; one program per channel writes them."""
    acc = mean.dtype
    invstd = inv_std(m2 / tl.maximum(count, 1.0), scalar(eps, acc))
    if RENORM:
        r, d = renorm_correction(RUN_MEAN, RUN_VAR, BATCHES, c, cmask, mean, invstd, eps, rmax,
                                 dmax, warmup_steps, WARMUP)
    else:
        r = tl.full(c.shape, 1.0, acc)
        d = tl.zeros(c.shape, acc)
    if write:
        tl.store(SAVE_MEAN + c, mean, mask=cmask)
        tl.store(SAVE_INVSTD + c, invstd, mask=cmask)
        if RENORM:
            tl.store(SAVE_RD + c, r, mask=cmask)
            tl.store(SAVE_RD + C + c, d, mask=cmask)
        if UPDATE_RUNNING:
            update_running(RUN_MEAN, RUN_VAR, NEW_MEAN, NEW_VAR, BATCHES, RUNNING_COUNT,
                           NEW_RUNNING_COUNT, c, cmask, mean, m2, count, momentum, BLOCK_C,
                           SKIP_NONFINITE, CUMULATIVE, SATURATE)
    return invstd, r, d


@triton.jit
def preactivation(x, mean, gain, shift, res):
    """gain * (x - mean) + shift + res on a [rows, BLOCK_C] tile in ACC: the value the activation
    sees. (x - mean) first: exact for x near the mean, unlike x * gain + (shift - mean * gain)."""
    return (x - mean[None, :]) * gain[None, :] + shift[None, :] + res
