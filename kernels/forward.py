"""Forward kernels: split statistics, normalize (+affine, residual, activation), and a one-pass kernel.

Training runs either
  * ``bn_stats_partial_kernel`` (grid: channel blocks x splits) writing float32
    (count, mean, M2) partials, then ``bn_fwd_apply_kernel`` whose programs each merge their
    channels' partials in split order (deterministic, no atomics) and normalize; or
  * ``bn_fwd_onepass_kernel`` when a channel block's whole N x S plane fits one tile: x is read
    once, statistics and output come from registers.
Evaluation runs ``bn_fwd_apply_kernel`` alone with the running statistics.

The output is act(gain * (x - mean) + shift + residual) with gain = gamma * invstd * r and
shift = beta + gamma * d, where r = 1 and d = 0 except under batch renormalization.
"""
import triton
import triton.language as tl

from .activations import activate
from .overflow import store_fit, tile_overflow
from .common import (
    channel_offsets,
    merge_moments,
    merge_partials,
    lane_count,
    row_index,
    row_offsets,
    tile_offset,
    finish_batch_stats,
    inv_std,
    load_affine,
    load_residual,
    preactivation,
    scalar,
    tile_moments,
    tile_ptrs,
    tile_rows,
)


@triton.jit
def _welford_full_tile(ptrs, tn, ts, ds, S, cmask, mean, m2, k, stride_n, stride_s,
                       ACC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr,
                       USE_INT64: tl.constexpr, ONE_COLUMN: tl.constexpr):
    """One Welford step of every lane over the full tile in tile row ``tn``, column ``ts``:
    all lanes share the count, so one reciprocal per tile. With ONE_COLUMN, lanes at positions
    past S are off in every tile: they stay at 0 and the final merge gives them no weight."""
    start = tile_offset(tn, ts, stride_n, stride_s, BLOCK_N, BLOCK_S, USE_INT64)
    if ONE_COLUMN:
        mask = (ds < S)[:, None] & cmask[None, :]
    else:
        mask = cmask[None, :]
    # kept in L2 for the apply pass, which reads the same tiles next
    x = tl.load(ptrs + start, mask=mask, other=0.0, eviction_policy="evict_last").to(ACC)
    k += 1.0
    delta = x - mean
    mean += delta * (1.0 / k)
    m2 += delta * (x - mean)
    return mean, m2, k


@triton.jit
def bn_stats_partial_kernel(
    X,                  # pointer to the input activation, canonical view (N, C, S)
    PART,               # pointer to partials, (3, n_splits, C) in ACC: count, mean, M2
    size_n, size_c, size_s,   # canonical sizes N, C, S
    stride_xn, stride_xc, stride_xs,   # element strides of X
    n_tiles_s,          # tiles along S: cdiv(S, BLOCK_S)
    n_tiles,            # tiles in a channel's plane: cdiv(N, BLOCK_N) * n_tiles_s
    tiles_per_split,    # consecutive tiles handled by one program
    ACC: tl.constexpr,          # accumulation dtype (tl.float32, or tl.float64 for float64 input)
    BLOCK_N: tl.constexpr,      # samples per tile
    BLOCK_S: tl.constexpr,      # spatial positions per tile (power of two)
    BLOCK_C: tl.constexpr,      # channels per program
    USE_INT64: tl.constexpr,    # 64-bit element offsets
    EDGES: tl.constexpr,        # some tile has rows outside the plane (BLOCK_N does not divide
                                # N, or BLOCK_S does not divide S over several tile columns);
                                # without, that path is not built
    ONE_COLUMN: tl.constexpr,   # BLOCK_S >= S: one tile column, its lanes past S always off
):
    """Per (channel block, split): count, mean and M2 of the split's tiles.

    Tiles are numbered full tiles first (every row inside the plane, row-major), then the
    plane's edge tiles, so a split meets its full tiles before any edge tile. Every element
    lane keeps a running Welford mean and M2 over the tiles it sees: in a full tile all lanes
    share one count, so an update is a subtract and two fused multiply-adds per element with one
    reciprocal per tile, nothing crossing threads and the next tile's loads free to issue. In an
    edge tile a lane's count follows in closed form from how many edge tiles of each kind (last
    tile column, last tile row, corner) the split has seen. One cross-thread step at the end
    merges the lanes exactly (Chan's merge written for many parts at once: the count-weighted
    mean of the lane means, then the lanes' M2 plus their counts times squared deviations), in
    fixed-order sums, so the result is deterministic.
    """
    N = size_n                  # the canonical sizes under their short names
    C = size_c
    S = size_s
    pid_c = tl.program_id(0)
    pid_k = tl.program_id(1)
    n_splits = tl.num_programs(1)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    x_coff = channel_offsets(c, stride_xc, USE_INT64)
    dn, ds = row_index(BLOCK_N, BLOCK_S)
    ptrs = X + row_offsets(dn, ds, stride_xn, stride_xs, USE_INT64)[:, None] + x_coff[None, :]

    full_n = N // BLOCK_N               # tile rows / columns made of full tiles only
    if ONE_COLUMN:
        # A tile spans every position (a 7x7 or 14x14 plane): the same lanes are off in every
        # tile, so its tiles count as full with those lanes masked -- no edge column.
        full_s = 1
    else:
        full_s = S // BLOCK_S
    n_full = full_n * full_s
    n_rem = N - full_n * BLOCK_N        # samples / positions in the edge tiles
    s_rem = S - full_s * BLOCK_S if not ONE_COLUMN else 0
    # edge tiles: the last tile column (one per tile row, corner included), then the last row
    n_col = tl.where(s_rem > 0, n_tiles // n_tiles_s, 0)
    g_start = pid_k * tiles_per_split
    g_end = tl.minimum(g_start + tiles_per_split, n_tiles)

    k = tl.zeros((), ACC)               # full tiles seen
    k_col = tl.zeros((), ACC)           # edge tiles seen: last column (not corner), last row,
    k_row = tl.zeros((), ACC)           # corner
    k_corner = tl.zeros((), ACC)
    mean = tl.zeros((BLOCK_N * BLOCK_S, BLOCK_C), ACC)
    m2 = tl.zeros((BLOCK_N * BLOCK_S, BLOCK_C), ACC)
    # Row and column of the split's current full tile, stepped in the loop rather than divided
    # out of g per tile: no integer division in the loop (a division's magic constant was the
    # one value ptxas 12.8 spilled to the stack for sm_80).
    fn = g_start // tl.maximum(full_s, 1)
    fs = g_start - fn * full_s
    for g in range(g_start, g_end):
        if EDGES:
            if g < n_full:
                mean, m2, k = _welford_full_tile(ptrs, fn, fs, ds, S, cmask, mean, m2, k,
                                                 stride_xn, stride_xs, ACC, BLOCK_N, BLOCK_S,
                                                 USE_INT64, ONE_COLUMN)
            else:
                e = g - n_full
                tn = tl.where(e < n_col, e, full_n)
                ts = tl.where(e < n_col, full_s, e - n_col)
                in_n = (tn < full_n) | (dn < n_rem)
                if ONE_COLUMN:
                    in_s = ds < S
                else:
                    in_s = (ts < full_s) | (ds < s_rem)
                mask = (in_n & in_s)[:, None] & cmask[None, :]
                start = tile_offset(tn, ts, stride_xn, stride_xs, BLOCK_N, BLOCK_S, USE_INT64)
                x = tl.load(ptrs + start, mask=mask, other=0.0,
                            eviction_policy="evict_last").to(ACC)
                k_col += ((tn < full_n) & (ts == full_s)).to(ACC)
                k_row += ((tn == full_n) & (ts < full_s)).to(ACC)
                k_corner += ((tn == full_n) & (ts == full_s)).to(ACC)
                seen = lane_count(dn, ds, n_rem, s_rem, k, k_col, k_row, k_corner)
                delta = tl.where(mask, x - mean, 0.0)
                mean += delta / tl.maximum(seen, 1.0)[:, None]
                m2 += delta * (x - mean)
        else:
            mean, m2, k = _welford_full_tile(ptrs, fn, fs, ds, S, cmask, mean, m2, k, stride_xn,
                                             stride_xs, ACC, BLOCK_N, BLOCK_S, USE_INT64,
                                             ONE_COLUMN)
        fs += 1
        wrap = fs == full_s
        fn = tl.where(wrap, fn + 1, fn)
        fs = tl.where(wrap, 0, fs)

    # Chan's merge of all lanes at once, exact for any counts (a lane never in range has count
    # 0, mean 0 and M2 0 and drops out).
    seen = lane_count(dn, ds, n_rem, s_rem, k, k_col, k_row, k_corner)
    if ONE_COLUMN:
        seen = tl.where(ds < S, seen, 0.0)
    count, mean_c, m2_c = merge_moments(tl.broadcast_to(seen[:, None], mean.shape), mean, m2, 0)

    base = pid_k * C + c
    tl.store(PART + base, count, mask=cmask)
    tl.store(PART + n_splits * C + base, mean_c, mask=cmask)
    tl.store(PART + 2 * n_splits * C + base, m2_c, mask=cmask)


@triton.jit
def bn_fwd_apply_kernel(
    X,                  # pointer to the input activation, canonical view (N, C, S)
    Y,                  # pointer to the output activation, same view, own strides
    RES,                # pointer to the residual added before the activation, or None
    PART,               # pointer to the (3, n_part_splits, C) partials (training), or None
    RUN_MEAN,           # pointer to the running mean (C,) as before this step, or None
    RUN_VAR,            # pointer to the running variance (C,) as before this step, or None
    NEW_MEAN,           # pointer the updated running mean goes to (RUN_MEAN: in place), or None
    NEW_VAR,            # pointer the updated running variance goes to, or None
    BATCHES,            # pointer to the module's batch count, 0-d int64, or None
    RUNNING_COUNT,      # pointer to per-channel batch counts (C,) int64, or None
    NEW_RUNNING_COUNT,  # pointer the incremented per-channel counts go to, or None
    W,                  # pointer to gamma (C,) or None
    B,                  # pointer to beta (C,) or None
    SAVE_MEAN,          # pointer to the saved mean (C,), ACC
    SAVE_INVSTD,        # pointer to the saved 1/sqrt(var + eps) (C,), ACC
    SAVE_RD,            # pointer to the saved renorm (r, d), (2, C), ACC, or None
    OVF_COUNT,          # pointer to per-channel overflow counts (C,) int64, accumulated, or None
    OVF_MAX,            # pointer to per-channel max |y| (C,) float32, accumulated, or None
    size_n, size_c, size_s,   # canonical sizes N, C, S
    stride_xn, stride_xc, stride_xs,   # element strides of X
    stride_yn, stride_yc, stride_ys,   # element strides of Y
    stride_rn, stride_rc, stride_rs,   # element strides of RES (None without it)
    n_tiles_s,          # tiles along S
    n_tiles,            # tiles in a channel's plane
    tiles_per_split,    # consecutive tiles handled by one program
    n_part_splits,      # partials per channel in PART (at most SPLITS_P2)
    warmup_steps,       # batch renorm: steps with r = 1, d = 0 (WARMUP)
    momentum: tl.float64,   # running-statistics momentum
    eps: tl.float64,        # added to the variance
    slope: tl.float64,      # leaky_relu negative slope, elu's alpha
    rmax: tl.float64,       # batch renorm clipping limits
    dmax: tl.float64,
    ACC: tl.constexpr,
    TRAINING: tl.constexpr,         # statistics from PART (else from RUN_MEAN / RUN_VAR)
    UPDATE_RUNNING: tl.constexpr,   # training with running statistics present
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    HAS_RES: tl.constexpr,
    ACT: tl.constexpr,              # activation code (kernels.activations.ACTIVATIONS)
    INVERTIBLE: tl.constexpr,       # in-place activated: |gamma| >= eps (load_affine)
    RENORM: tl.constexpr,           # batch renormalization (training only)
    WARMUP: tl.constexpr,           # renorm warm-up read from BATCHES
    SKIP_NONFINITE: tl.constexpr,   # running stats keep channels whose batch stats are not finite
    CUMULATIVE: tl.constexpr,       # 0 momentum; 1 from BATCHES; 2 RUNNING_COUNT (running_weight)
    SATURATE: tl.constexpr,         # clamp finite results beyond the output dtype to +-max
    COUNT_OVERFLOW: tl.constexpr,   # accumulate OVF_COUNT / OVF_MAX
    SPLITS_P2: tl.constexpr,        # a power of two >= n_part_splits
    BLOCK_N: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_C: tl.constexpr,
    USE_INT64: tl.constexpr,
):
    N = size_n                  # the canonical sizes under their short names
    C = size_c
    S = size_s
    # Programs in the reverse of the statistics pass's order too: its last programs' tiles are
    # the freshest in L2 (see the tile loop below).
    pid_c = tl.num_programs(0) - 1 - tl.program_id(0)
    pid_k = tl.num_programs(1) - 1 - tl.program_id(1)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C

    if TRAINING:
        # Every program merges its channels' partials in the same fixed tree, so all of them
        # see bit-identical statistics (the launcher merges many splits in a launch of its own
        # first, and hands over one partial).
        count, mean, m2 = merge_partials(PART, c, cmask, C, n_part_splits, ACC, True, SPLITS_P2)
        invstd, r, d = finish_batch_stats(
            count, mean, m2, c, cmask, C, RUN_MEAN, RUN_VAR, NEW_MEAN, NEW_VAR, BATCHES,
            RUNNING_COUNT, NEW_RUNNING_COUNT, SAVE_MEAN, SAVE_INVSTD, SAVE_RD, pid_k == 0, momentum,
            eps, rmax, dmax, warmup_steps, BLOCK_C, UPDATE_RUNNING, RENORM, WARMUP,
            SKIP_NONFINITE, CUMULATIVE, SATURATE)
    else:
        mean = tl.load(RUN_MEAN + c, mask=cmask, other=0.0).to(ACC)
        invstd = inv_std(tl.load(RUN_VAR + c, mask=cmask, other=1.0).to(ACC), scalar(eps, ACC))
        r = tl.full((BLOCK_C,), 1.0, ACC)
        d = tl.zeros((BLOCK_C,), ACC)
        if pid_k == 0:
            tl.store(SAVE_MEAN + c, mean, mask=cmask)
            tl.store(SAVE_INVSTD + c, invstd, mask=cmask)

    w, b = load_affine(W, B, c, cmask, scalar(eps, ACC), ACC, HAS_W, HAS_B, INVERTIBLE)
    gain = w * invstd * r
    shift = b + w * d
    x_coff = channel_offsets(c, stride_xc, USE_INT64)
    y_coff = channel_offsets(c, stride_yc, USE_INT64)
    neg_slope = scalar(slope, ACC)
    ovf_count = tl.zeros((BLOCK_C,), tl.int32)
    ovf_max = tl.zeros((BLOCK_C,), ACC)
    t_start = pid_k * tiles_per_split
    t_end = tl.minimum(t_start + tiles_per_split, n_tiles)
    # Backwards through the tiles: the statistics pass read them forwards and left its last
    # tiles in L2, so a tensor that fits L2 is read from there here, not from HBM again.
    for i in range(t_start, t_end):
        t = t_start + t_end - 1 - i
        n, s, rmask = tile_rows(t, n_tiles_s, N, S, BLOCK_N, BLOCK_S, USE_INT64)
        mask = rmask[:, None] & cmask[None, :]
        x = tl.load(tile_ptrs(X, n, s, x_coff, stride_xn, stride_xs), mask=mask, other=0.0,
                    eviction_policy="evict_first")
        res = load_residual(RES, n, s, c, stride_rn, stride_rc, stride_rs, mask, ACC, HAS_RES,
                            USE_INT64)
        y = activate(preactivation(x.to(ACC), mean, gain, shift, res), ACT, neg_slope)
        if COUNT_OVERFLOW:
            t_count, t_max = tile_overflow(y, mask, Y.dtype.element_ty)
            ovf_count += t_count
            ovf_max = tl.maximum(ovf_max, t_max)
        # y is not read again here: it should not push x's tiles out of L2
        store_fit(tile_ptrs(Y, n, s, y_coff, stride_yn, stride_ys), y, mask, SATURATE,
                  "evict_first")
    if COUNT_OVERFLOW:
        # integer adds and max commute: the totals are the same whatever the program order
        tl.atomic_add(OVF_COUNT + c, ovf_count.to(tl.int64), mask=cmask)
        tl.atomic_max(OVF_MAX + c, ovf_max.to(tl.float32), mask=cmask)


@triton.jit
def bn_fwd_onepass_kernel(
    X,                  # pointer to the input activation, canonical view (N, C, S)
    Y,                  # pointer to the output activation
    RES,                # pointer to the residual, or None
    RUN_MEAN,           # pointer to the running mean (C,) as before this step, or None
    RUN_VAR,            # pointer to the running variance (C,) as before this step, or None
    NEW_MEAN,           # pointer the updated running mean goes to, or None
    NEW_VAR,            # pointer the updated running variance goes to, or None
    BATCHES,            # pointer to the module's batch count, 0-d int64, or None
    RUNNING_COUNT,      # pointer to per-channel batch counts (C,) int64, or None
    NEW_RUNNING_COUNT,  # pointer the incremented per-channel counts go to, or None
    W,                  # pointer to gamma (C,) or None
    B,                  # pointer to beta (C,) or None
    SAVE_MEAN,          # pointer to the saved mean (C,), ACC
    SAVE_INVSTD,        # pointer to the saved inverse std (C,), ACC
    SAVE_RD,            # pointer to the saved renorm (r, d), (2, C), ACC, or None
    OVF_COUNT,          # pointer to per-channel overflow counts (C,) int64, accumulated, or None
    OVF_MAX,            # pointer to per-channel max |y| (C,) float32, accumulated, or None
    size_n, size_c, size_s,   # canonical sizes N, C, S; N <= BLOCK_N and S <= BLOCK_S
    stride_xn, stride_xc, stride_xs,   # element strides of X
    stride_yn, stride_yc, stride_ys,   # element strides of Y
    stride_rn, stride_rc, stride_rs,   # element strides of RES (None without it)
    warmup_steps,       # batch renorm: steps with r = 1, d = 0 (WARMUP)
    momentum: tl.float64,   # running-statistics momentum
    eps: tl.float64,        # added to the variance
    slope: tl.float64,      # leaky_relu negative slope, elu's alpha
    rmax: tl.float64,       # batch renorm clipping limits
    dmax: tl.float64,
    ACC: tl.constexpr,
    UPDATE_RUNNING: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    HAS_RES: tl.constexpr,
    ACT: tl.constexpr,
    INVERTIBLE: tl.constexpr,
    RENORM: tl.constexpr,
    WARMUP: tl.constexpr,
    SKIP_NONFINITE: tl.constexpr,
    CUMULATIVE: tl.constexpr,
    SATURATE: tl.constexpr,
    COUNT_OVERFLOW: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_C: tl.constexpr,
    USE_INT64: tl.constexpr,
):
    """Training forward for planes that fit one tile: one read of x, one write of y."""
    N = size_n                  # the canonical sizes under their short names
    C = size_c
    S = size_s
    pid_c = tl.program_id(0)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    n, s, rmask = tile_rows(0, 1, N, S, BLOCK_N, BLOCK_S, USE_INT64)
    mask = rmask[:, None] & cmask[None, :]
    x_coff = channel_offsets(c, stride_xc, USE_INT64)
    x = tl.load(tile_ptrs(X, n, s, x_coff, stride_xn, stride_xs), mask=mask, other=0.0)
    x = x.to(ACC)
    count, mean, m2 = tile_moments(x, mask, rmask)
    invstd, r, d = finish_batch_stats(
        count, mean, m2, c, cmask, C, RUN_MEAN, RUN_VAR, NEW_MEAN, NEW_VAR, BATCHES, RUNNING_COUNT,
        NEW_RUNNING_COUNT, SAVE_MEAN, SAVE_INVSTD, SAVE_RD, True, momentum, eps, rmax, dmax,
        warmup_steps, BLOCK_C, UPDATE_RUNNING, RENORM, WARMUP, SKIP_NONFINITE, CUMULATIVE,
        SATURATE)

    w, b = load_affine(W, B, c, cmask, scalar(eps, ACC), ACC, HAS_W, HAS_B, INVERTIBLE)
    res = load_residual(RES, n, s, c, stride_rn, stride_rc, stride_rs, mask, ACC, HAS_RES,
                        USE_INT64)
    y = activate(preactivation(x, mean, w * invstd * r, b + w * d, res), ACT, scalar(slope, ACC))
    if COUNT_OVERFLOW:
        t_count, t_max = tile_overflow(y, mask, Y.dtype.element_ty)
        tl.atomic_add(OVF_COUNT + c, t_count.to(tl.int64), mask=cmask)
        tl.atomic_max(OVF_MAX + c, t_max.to(tl.float32), mask=cmask)
    y_coff = channel_offsets(c, stride_yc, USE_INT64)
    store_fit(tile_ptrs(Y, n, s, y_coff, stride_yn, stride_ys), y, mask, SATURATE, "")
