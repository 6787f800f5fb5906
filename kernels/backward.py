"""Backward kernels: per-channel sums of dy and dy * x_hat, then grad_input.

With x_hat = (x - mean) * invstd, M elements per channel and k = gamma * invstd:
  grad_bias   = sum(dy)
  grad_weight = sum(dy * x_hat)
  grad_input  = k * (dy - sum(dy) / M - x_hat * sum(dy * x_hat) / M)   (training)
  grad_input  = k * dy                                                (eval: stats are constants)
The sums are float32 (float64 for float64 input) partials per (split, channel), summed in split
order by every consumer program: deterministic, no atomics.
"""
import triton
import triton.language as tl

from .common import channel_offsets, tile_ptrs, tile_rows


@triton.jit
def bn_bwd_partial_kernel(
    X,                  # pointer to the forward input, canonical view (N, C, S)
    DY,                 # pointer to the output gradient, same view, own strides (may be 0)
    MEAN,               # pointer to the saved mean (C,), ACC
    INVSTD,             # pointer to the saved inverse std (C,), ACC
    PART,               # pointer to partial sums, (2, n_splits, C) in ACC: sum dy, sum dy*x_hat
    N, C, S,
    stride_xn, stride_xc, stride_xs,
    stride_dyn, stride_dyc, stride_dys,
    n_tiles_s,          # tiles along S
    n_tiles,            # tiles in a channel's plane
    tiles_per_split,    # consecutive tiles handled by one program
    ACC: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_C: tl.constexpr,
    USE_INT64: tl.constexpr,
):
    pid_c = tl.program_id(0)
    pid_k = tl.program_id(1)
    n_splits = tl.num_programs(1)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    mean = tl.load(MEAN + c, mask=cmask, other=0.0)
    x_coff = channel_offsets(c, stride_xc, USE_INT64)
    dy_coff = channel_offsets(c, stride_dyc, USE_INT64)

    # Element-wise accumulators, reduced once at the end: fixed order, one tree per program.
    acc_dy = tl.zeros((BLOCK_N * BLOCK_S, BLOCK_C), ACC)
    acc_dyxc = tl.zeros((BLOCK_N * BLOCK_S, BLOCK_C), ACC)
    t_start = pid_k * tiles_per_split
    t_end = tl.minimum(t_start + tiles_per_split, n_tiles)
    for t in range(t_start, t_end):
        n, s, rmask = tile_rows(t, n_tiles_s, N, S, BLOCK_N, BLOCK_S, USE_INT64)
        mask = rmask[:, None] & cmask[None, :]
        x = tl.load(tile_ptrs(X, n, s, x_coff, stride_xn, stride_xs), mask=mask, other=0.0)
        dy = tl.load(tile_ptrs(DY, n, s, dy_coff, stride_dyn, stride_dys), mask=mask, other=0.0)
        dy = dy.to(ACC)
        acc_dy += dy
        acc_dyxc += dy * tl.where(mask, x.to(ACC) - mean[None, :], 0.0)

    invstd = tl.load(INVSTD + c, mask=cmask, other=0.0)
    base = pid_k * C + c
    tl.store(PART + base, tl.sum(acc_dy, axis=0), mask=cmask)
    tl.store(PART + n_splits * C + base, tl.sum(acc_dyxc, axis=0) * invstd, mask=cmask)


@triton.jit
def bn_bwd_apply_kernel(
    X,                  # pointer to the forward input (read in training only)
    DY,                 # pointer to the output gradient
    DX,                 # pointer to the input gradient (written)
    MEAN,               # pointer to the saved mean (C,), ACC
    INVSTD,             # pointer to the saved inverse std (C,), ACC
    W,                  # pointer to gamma (C,) or dummy
    PART,               # pointer to the (2, n_part_splits, C) partial sums, or dummy
    DW,                 # pointer to grad_weight (C,), ACC, or dummy
    DB,                 # pointer to grad_bias (C,), ACC, or dummy
    N, C, S,
    stride_xn, stride_xc, stride_xs,
    stride_dyn, stride_dyc, stride_dys,
    stride_dxn, stride_dxc, stride_dxs,
    n_tiles_s,
    n_tiles,
    tiles_per_split,
    n_part_splits,      # splits in PART (0 when the sums are not needed)
    ACC: tl.constexpr,
    TRAINING: tl.constexpr,         # batch statistics: dx has the mean terms
    HAS_W: tl.constexpr,
    WRITE_SUMS: tl.constexpr,       # store grad_weight / grad_bias
    BLOCK_N: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_C: tl.constexpr,
    USE_INT64: tl.constexpr,
):
    pid_c = tl.program_id(0)
    pid_k = tl.program_id(1)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    sum_dy = tl.zeros((BLOCK_C,), ACC)
    sum_dyxhat = tl.zeros((BLOCK_C,), ACC)
    for k in range(0, n_part_splits):
        sum_dy += tl.load(PART + k * C + c, mask=cmask, other=0.0)
        sum_dyxhat += tl.load(PART + (n_part_splits + k) * C + c, mask=cmask, other=0.0)
    if WRITE_SUMS:
        if pid_k == 0:
            tl.store(DW + c, sum_dyxhat, mask=cmask)
            tl.store(DB + c, sum_dy, mask=cmask)

    mean = tl.load(MEAN + c, mask=cmask, other=0.0)
    invstd = tl.load(INVSTD + c, mask=cmask, other=0.0)
    if HAS_W:
        k_scale = tl.load(W + c, mask=cmask, other=0.0).to(ACC) * invstd
    else:
        k_scale = invstd
    inv_m = 1.0 / ((tl.zeros((BLOCK_C,), ACC) + N) * S)  # N, S may be specialized to 1
    mean_dy = sum_dy * inv_m
    coef_xc = k_scale * invstd * sum_dyxhat * inv_m

    x_coff = channel_offsets(c, stride_xc, USE_INT64)
    dy_coff = channel_offsets(c, stride_dyc, USE_INT64)
    dx_coff = channel_offsets(c, stride_dxc, USE_INT64)
    t_start = pid_k * tiles_per_split
    t_end = tl.minimum(t_start + tiles_per_split, n_tiles)
    for t in range(t_start, t_end):
        n, s, rmask = tile_rows(t, n_tiles_s, N, S, BLOCK_N, BLOCK_S, USE_INT64)
        mask = rmask[:, None] & cmask[None, :]
        dy = tl.load(tile_ptrs(DY, n, s, dy_coff, stride_dyn, stride_dys), mask=mask, other=0.0)
        dy = dy.to(ACC)
        if TRAINING:
            x = tl.load(tile_ptrs(X, n, s, x_coff, stride_xn, stride_xs), mask=mask, other=0.0)
            dx = k_scale[None, :] * (dy - mean_dy[None, :]) - coef_xc[None, :] * (x.to(ACC) - mean[None, :])
        else:
            dx = k_scale[None, :] * dy
        dx_ptrs = tile_ptrs(DX, n, s, dx_coff, stride_dxn, stride_dxs)
        tl.store(dx_ptrs, dx.to(DX.dtype.element_ty), mask=mask)


@triton.jit
def bn_bwd_onepass_kernel(
    X,                  # pointer to the forward input, canonical view (N, C, S)
    DY,                 # pointer to the output gradient
    DX,                 # pointer to the input gradient (written)
    MEAN,               # pointer to the saved mean (C,), ACC
    INVSTD,             # pointer to the saved inverse std (C,), ACC
    W,                  # pointer to gamma (C,) or dummy
    DW,                 # pointer to grad_weight (C,), ACC
    DB,                 # pointer to grad_bias (C,), ACC
    N, C, S,            # canonical sizes; N <= BLOCK_N and S <= BLOCK_S
    stride_xn, stride_xc, stride_xs,
    stride_dyn, stride_dyc, stride_dys,
    stride_dxn, stride_dxc, stride_dxs,
    ACC: tl.constexpr,
    TRAINING: tl.constexpr,
    HAS_W: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_C: tl.constexpr,
    USE_INT64: tl.constexpr,
):
    """Backward for planes that fit one tile: x and dy read once, dx written once."""
    pid_c = tl.program_id(0)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    n, s, rmask = tile_rows(0, 1, N, S, BLOCK_N, BLOCK_S, USE_INT64)
    mask = rmask[:, None] & cmask[None, :]
    mean = tl.load(MEAN + c, mask=cmask, other=0.0)
    invstd = tl.load(INVSTD + c, mask=cmask, other=0.0)
    x_coff = channel_offsets(c, stride_xc, USE_INT64)
    dy_coff = channel_offsets(c, stride_dyc, USE_INT64)
    x = tl.load(tile_ptrs(X, n, s, x_coff, stride_xn, stride_xs), mask=mask, other=0.0)
    dy = tl.load(tile_ptrs(DY, n, s, dy_coff, stride_dyn, stride_dys), mask=mask, other=0.0)
    dy = dy.to(ACC)
    xc = tl.where(mask, x.to(ACC) - mean[None, :], 0.0)
    sum_dy = tl.sum(dy, axis=0)
    sum_dyxhat = tl.sum(dy * xc, axis=0) * invstd
    tl.store(DW + c, sum_dyxhat, mask=cmask)
    tl.store(DB + c, sum_dy, mask=cmask)

    if HAS_W:
        k_scale = tl.load(W + c, mask=cmask, other=0.0).to(ACC) * invstd
    else:
        k_scale = invstd
    if TRAINING:
        inv_m = 1.0 / ((tl.zeros((BLOCK_C,), ACC) + N) * S)  # N, S may be specialized to 1
        dx = k_scale[None, :] * (dy - (sum_dy * inv_m)[None, :]) - (k_scale * invstd * sum_dyxhat * inv_m)[None, :] * xc
    else:
        dx = k_scale[None, :] * dy
    dx_coff = channel_offsets(c, stride_dxc, USE_INT64)
    dx_ptrs = tile_ptrs(DX, n, s, dx_coff, stride_dxn, stride_dxs)
    tl.store(dx_ptrs, dx.to(DX.dtype.element_ty), mask=mask)
