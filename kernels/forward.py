"""Forward kernels: split statistics, normalize (+affine), and a one-pass kernel.

Training runs either
  * ``bn_stats_partial_kernel`` (grid: channel blocks x splits) writing float32
    (count, mean, M2) partials, then ``bn_fwd_apply_kernel`` whose programs each merge their
    channels' partials in split order (deterministic, no atomics) and normalize; or
  * ``bn_fwd_onepass_kernel`` when a channel block's whole N x S plane fits one tile: x is read
    once, statistics and output come from registers.
Evaluation runs ``bn_fwd_apply_kernel`` alone with the running statistics.
"""
import triton
import triton.language as tl

from .common import (
    chan_merge,
    channel_offsets,
    inv_std,
    load_affine,
    tile_moments,
    tile_ptrs,
    tile_rows,
    update_running,
)


@triton.jit
def bn_stats_partial_kernel(
    X,                  # pointer to the input activation, canonical view (N, C, S)
    PART,               # pointer to partials, (3, n_splits, C) in ACC: count, mean, M2
    N, C, S,            # canonical sizes
    stride_xn, stride_xc, stride_xs,   # element strides of X
    n_tiles_s,          # tiles along S: cdiv(S, BLOCK_S)
    n_tiles,            # tiles in a channel's plane: cdiv(N, BLOCK_N) * n_tiles_s
    tiles_per_split,    # consecutive tiles handled by one program
    ACC: tl.constexpr,          # accumulation dtype (tl.float32, or tl.float64 for float64 input)
    BLOCK_N: tl.constexpr,      # samples per tile
    BLOCK_S: tl.constexpr,      # spatial positions per tile (power of two)
    BLOCK_C: tl.constexpr,      # channels per program
    USE_INT64: tl.constexpr,    # 64-bit element offsets
):
    pid_c = tl.program_id(0)
    pid_k = tl.program_id(1)
    n_splits = tl.num_programs(1)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    x_coff = channel_offsets(c, stride_xc, USE_INT64)

    count = tl.zeros((BLOCK_C,), ACC)
    mean = tl.zeros((BLOCK_C,), ACC)
    m2 = tl.zeros((BLOCK_C,), ACC)
    t_start = pid_k * tiles_per_split
    t_end = tl.minimum(t_start + tiles_per_split, n_tiles)
    for t in range(t_start, t_end):
        n, s, rmask = tile_rows(t, n_tiles_s, N, S, BLOCK_N, BLOCK_S, USE_INT64)
        mask = rmask[:, None] & cmask[None, :]
        x_ptrs = tile_ptrs(X, n, s, x_coff, stride_xn, stride_xs)
        x = tl.load(x_ptrs, mask=mask, other=0.0).to(ACC)
        t_count, t_mean, t_m2 = tile_moments(x, mask, rmask)
        count, mean, m2 = chan_merge(count, mean, m2, t_count, t_mean, t_m2)

    base = pid_k * C + c
    tl.store(PART + base, count, mask=cmask)
    tl.store(PART + n_splits * C + base, mean, mask=cmask)
    tl.store(PART + 2 * n_splits * C + base, m2, mask=cmask)


@triton.jit
def bn_fwd_apply_kernel(
    X,                  # pointer to the input activation, canonical view (N, C, S)
    Y,                  # pointer to the output activation, same view, own strides
    PART,               # pointer to the (3, n_part_splits, C) partials (training only)
    RUN_MEAN,           # pointer to running mean (C,) or dummy; read in eval, updated in training
    RUN_VAR,            # pointer to running variance (C,) or dummy
    W,                  # pointer to gamma (C,) or dummy
    B,                  # pointer to beta (C,) or dummy
    SAVE_MEAN,          # pointer to the saved mean (C,), ACC
    SAVE_INVSTD,        # pointer to the saved 1/sqrt(var + eps) (C,), ACC
    N, C, S,            # canonical sizes
    stride_xn, stride_xc, stride_xs,   # element strides of X
    stride_yn, stride_yc, stride_ys,   # element strides of Y
    n_tiles_s,          # tiles along S
    n_tiles,            # tiles in a channel's plane
    tiles_per_split,    # consecutive tiles handled by one program
    n_part_splits,      # splits in PART
    momentum,           # running-statistics momentum
    eps,                # added to the variance
    ACC: tl.constexpr,
    TRAINING: tl.constexpr,         # statistics from PART (else from RUN_MEAN / RUN_VAR)
    UPDATE_RUNNING: tl.constexpr,   # training with running statistics present
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_C: tl.constexpr,
    USE_INT64: tl.constexpr,
):
    pid_c = tl.program_id(0)
    pid_k = tl.program_id(1)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C

    if TRAINING:
        # Every program merges its channels' partials in the same split order, so all of them
        # see bit-identical statistics without a separate finalize launch.
        count = tl.zeros((BLOCK_C,), ACC)
        mean = tl.zeros((BLOCK_C,), ACC)
        m2 = tl.zeros((BLOCK_C,), ACC)
        for k in range(0, n_part_splits):
            base = k * C + c
            p_count = tl.load(PART + base, mask=cmask, other=0.0)
            p_mean = tl.load(PART + n_part_splits * C + base, mask=cmask, other=0.0)
            p_m2 = tl.load(PART + 2 * n_part_splits * C + base, mask=cmask, other=0.0)
            count, mean, m2 = chan_merge(count, mean, m2, p_count, p_mean, p_m2)
        invstd = inv_std(m2 / tl.maximum(count, 1.0), eps)
        if UPDATE_RUNNING:
            if pid_k == 0:
                update_running(RUN_MEAN, RUN_VAR, c, cmask, mean, m2, count, momentum)
    else:
        mean = tl.load(RUN_MEAN + c, mask=cmask, other=0.0).to(ACC)
        invstd = inv_std(tl.load(RUN_VAR + c, mask=cmask, other=1.0).to(ACC), eps)
    if pid_k == 0:
        tl.store(SAVE_MEAN + c, mean, mask=cmask)
        tl.store(SAVE_INVSTD + c, invstd, mask=cmask)

    w, b = load_affine(W, B, c, cmask, ACC, HAS_W, HAS_B)
    scale = w * invstd
    x_coff = channel_offsets(c, stride_xc, USE_INT64)
    y_coff = channel_offsets(c, stride_yc, USE_INT64)
    t_start = pid_k * tiles_per_split
    t_end = tl.minimum(t_start + tiles_per_split, n_tiles)
    for t in range(t_start, t_end):
        n, s, rmask = tile_rows(t, n_tiles_s, N, S, BLOCK_N, BLOCK_S, USE_INT64)
        mask = rmask[:, None] & cmask[None, :]
        x = tl.load(tile_ptrs(X, n, s, x_coff, stride_xn, stride_xs), mask=mask, other=0.0)
        # (x - mean) first: exact for x near the mean, unlike x * scale + (b - mean * scale).
        y = (x.to(ACC) - mean[None, :]) * scale[None, :] + b[None, :]
        y_ptrs = tile_ptrs(Y, n, s, y_coff, stride_yn, stride_ys)
        tl.store(y_ptrs, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def bn_fwd_onepass_kernel(
    X,                  # pointer to the input activation, canonical view (N, C, S)
    Y,                  # pointer to the output activation
    RUN_MEAN,           # pointer to running mean (C,) or dummy
    RUN_VAR,            # pointer to running variance (C,) or dummy
    W,                  # pointer to gamma (C,) or dummy
    B,                  # pointer to beta (C,) or dummy
    SAVE_MEAN,          # pointer to the saved mean (C,), ACC
    SAVE_INVSTD,        # pointer to the saved inverse std (C,), ACC
    N, C, S,            # canonical sizes; N <= BLOCK_N and S <= BLOCK_S
    stride_xn, stride_xc, stride_xs,   # element strides of X
    stride_yn, stride_yc, stride_ys,   # element strides of Y
    momentum,           # running-statistics momentum
    eps,                # added to the variance
    ACC: tl.constexpr,
    UPDATE_RUNNING: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_C: tl.constexpr,
    USE_INT64: tl.constexpr,
):
    """Training forward for planes that fit one tile: one read of x, one write of y."""
    pid_c = tl.program_id(0)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    n, s, rmask = tile_rows(0, 1, N, S, BLOCK_N, BLOCK_S, USE_INT64)
    mask = rmask[:, None] & cmask[None, :]
    x_coff = channel_offsets(c, stride_xc, USE_INT64)
    x = tl.load(tile_ptrs(X, n, s, x_coff, stride_xn, stride_xs), mask=mask, other=0.0)
    x = x.to(ACC)
    count, mean, m2 = tile_moments(x, mask, rmask)
    invstd = inv_std(m2 / tl.maximum(count, 1.0), eps)
    tl.store(SAVE_MEAN + c, mean, mask=cmask)
    tl.store(SAVE_INVSTD + c, invstd, mask=cmask)
    if UPDATE_RUNNING:
        update_running(RUN_MEAN, RUN_VAR, c, cmask, mean, m2, count, momentum)

    w, b = load_affine(W, B, c, cmask, ACC, HAS_W, HAS_B)
    y = (x - mean[None, :]) * (w * invstd)[None, :] + b[None, :]
    y_coff = channel_offsets(c, stride_yc, USE_INT64)
    y_ptrs = tile_ptrs(Y, n, s, y_coff, stride_yn, stride_ys)
    tl.store(y_ptrs, y.to(Y.dtype.element_ty), mask=mask)
