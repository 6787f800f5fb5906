"""Backward kernels: per-channel sums of dz and dz * x_hat, then grad_input (and grad_residual).

The forward computed y = act(z), z = gain * (x - mean) + shift + residual with
gain = gamma * invstd * r and shift = beta + gamma * d (r = 1, d = 0 unless renormalizing).
Here z is recomputed from x and the saved float32 statistics (no pre-activation tensor is saved),
dz = dy * act'(z) is the residual's gradient, and with x_hat = (x - mean) * invstd, M elements
per channel and k = gamma * r * invstd:
  grad_bias   = sum(dz)
  grad_weight = r * sum(dz * x_hat) + d * sum(dz)
  grad_input  = k * (dz - sum(dz) / M - x_hat * sum(dz * x_hat) / M)   (training)
  grad_input  = k * dz                                                (eval: stats are constants)
In-place activated batch norm (INVERTIBLE) saves y instead of x: z = act^-1(y) and
x_hat = (z - shift - residual) / (gamma * r), with |gamma| kept >= eps in both directions.
The sums are float32 (float64 for float64 input) partials per (split, channel), summed in one
fixed tree by every consumer program (or beforehand, in a launch of their own, when there are
many): deterministic, no atomics.
"""
import triton
import triton.language as tl

from .activations import activate_grad, activate_grad_at_output, invert, resolution
from .common import (channel_offsets, load_affine, load_renorm, load_residual, merge_partials,
                     preactivation, scalar, tile_ptrs, tile_rows)
from .overflow import store_fit


@triton.jit
def _grad_preact(dy, x, res, mean, gain, shift, ACT: tl.constexpr, slope):
    """dz = dy * act'(z) with z recomputed; dy itself when there is no activation."""
    if ACT == 0:
        dz = dy
    else:
        dz = dy * activate_grad(preactivation(x, mean, gain, shift, res), ACT, slope)
    return dz


@triton.jit
def _dz_xc(dy, v, res, mean, gain, inv_gain, shift, ACT: tl.constexpr, slope, v_eps,
           INVERTIBLE: tl.constexpr):
    """(dz, x - mean) on a tile. ``v`` is the forward's input x or, INVERTIBLE (in-place
    activated batch norm), its output y = act(z): then z = act^-1(y), x - mean =
    (z - shift - res) / gain and act'(z) comes from y itself (``v_eps``: the eps of the dtype
    y was stored in, activations.invert)."""
    if INVERTIBLE:
        if ACT == 0:
            dz = dy
        else:
            dz = dy * activate_grad_at_output(v, ACT, slope)
        xc = (invert(v, ACT, slope, v_eps) - shift[None, :] - res) * inv_gain[None, :]
    else:
        dz = _grad_preact(dy, v, res, mean, gain, shift, ACT, slope)
        xc = v - mean[None, :]
    return dz, xc


@triton.jit
def bn_bwd_partial_kernel(
    X,                  # pointer to the forward input (INVERTIBLE: its output), view (N, C, S)
    DY,                 # pointer to the output gradient, same view, own strides (may be 0)
    RES,                # pointer to the forward residual, or None
    MEAN,               # pointer to the saved mean (C,), ACC
    INVSTD,             # pointer to the saved inverse std (C,), ACC
    W,                  # pointer to gamma (C,) or None
    B,                  # pointer to beta (C,) or None
    SAVE_RD,            # pointer to the saved renorm (r, d), (2, C), or None
    PART,               # pointer to partial sums, (2, n_splits, C) in ACC: sum dz, sum dz*x_hat
    size_n, size_c, size_s,   # canonical sizes N, C, S
    stride_xn, stride_xc, stride_xs,
    stride_dyn, stride_dyc, stride_dys,
    stride_rn, stride_rc, stride_rs,
    n_tiles_s,          # tiles along S
    n_tiles,            # tiles in a channel's plane
    tiles_per_split,    # consecutive tiles handled by one program
    slope: tl.float64,  # leaky_relu negative slope, elu's alpha
    eps: tl.float64,    # the forward's eps: INVERTIBLE's floor of |gamma|
    ACC: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    HAS_RES: tl.constexpr,
    ACT: tl.constexpr,
    INVERTIBLE: tl.constexpr,       # X is the output y (in-place activated batch norm)
    RENORM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_C: tl.constexpr,
    USE_INT64: tl.constexpr,
):
    N = size_n                  # the canonical sizes under their short names
    C = size_c
    S = size_s
    pid_c = tl.program_id(0)
    pid_k = tl.program_id(1)
    n_splits = tl.num_programs(1)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    mean = tl.load(MEAN + c, mask=cmask, other=0.0)
    invstd = tl.load(INVSTD + c, mask=cmask, other=1.0)   # 1: no 1/0 on channels past C
    w, b = load_affine(W, B, c, cmask, scalar(eps, ACC), ACC, HAS_W, HAS_B, INVERTIBLE)
    r, d = load_renorm(SAVE_RD, c, cmask, C, ACC, RENORM)
    gain = w * invstd * r
    inv_gain = 1.0 / gain
    shift = b + w * d
    x_coff = channel_offsets(c, stride_xc, USE_INT64)
    dy_coff = channel_offsets(c, stride_dyc, USE_INT64)
    neg_slope = scalar(slope, ACC)

    # Element-wise accumulators, reduced once at the end: fixed order, one tree per program.
    acc_dz = tl.zeros((BLOCK_N * BLOCK_S, BLOCK_C), ACC)
    acc_dzxc = tl.zeros((BLOCK_N * BLOCK_S, BLOCK_C), ACC)
    t_start = pid_k * tiles_per_split
    t_end = tl.minimum(t_start + tiles_per_split, n_tiles)
    for t in range(t_start, t_end):
        n, s, rmask = tile_rows(t, n_tiles_s, N, S, BLOCK_N, BLOCK_S, USE_INT64)
        mask = rmask[:, None] & cmask[None, :]
        # kept in L2 for the apply pass, which reads the same tiles next
        x = tl.load(tile_ptrs(X, n, s, x_coff, stride_xn, stride_xs), mask=mask, other=0.0,
                    eviction_policy="evict_last").to(ACC)
        dy = tl.load(tile_ptrs(DY, n, s, dy_coff, stride_dyn, stride_dys), mask=mask, other=0.0,
                     eviction_policy="evict_last")
        res = load_residual(RES, n, s, c, stride_rn, stride_rc, stride_rs, mask, ACC, HAS_RES,
                            USE_INT64)
        dz, xc = _dz_xc(dy.to(ACC), x, res, mean, gain, inv_gain, shift, ACT, neg_slope,
                        resolution(X), INVERTIBLE)
        dz = tl.where(mask, dz, 0.0)
        acc_dz += dz
        acc_dzxc += dz * xc

    base = pid_k * C + c
    tl.store(PART + base, tl.sum(acc_dz, axis=0), mask=cmask)
    tl.store(PART + n_splits * C + base, tl.sum(acc_dzxc, axis=0) * invstd, mask=cmask)


@triton.jit
def bn_bwd_apply_kernel(
    X,                  # pointer to the forward input (INVERTIBLE: its output), read in training
                        # or with an activation
    DY,                 # pointer to the output gradient
    DX,                 # pointer to the input gradient (written)
    RES,                # pointer to the forward residual, or None
    DRES,               # pointer to the residual gradient (written with an activation), or None
    MEAN,               # pointer to the saved mean (C,), ACC
    INVSTD,             # pointer to the saved inverse std (C,), ACC
    W,                  # pointer to gamma (C,) or None
    B,                  # pointer to beta (C,) or None
    SAVE_RD,            # pointer to the saved renorm (r, d), (2, C), or None
    PART,               # pointer to the (2, n_part_splits, C) partial sums, or None
    DW,                 # pointer to grad_weight (C,), ACC, or None
    DB,                 # pointer to grad_bias (C,), ACC, or None
    size_n, size_c, size_s,   # canonical sizes N, C, S
    stride_xn, stride_xc, stride_xs,
    stride_dyn, stride_dyc, stride_dys,
    stride_dxn, stride_dxc, stride_dxs,
    stride_rn, stride_rc, stride_rs,
    stride_drn, stride_drc, stride_drs,
    n_tiles_s,
    n_tiles,
    tiles_per_split,
    n_part_splits,      # partials per channel in PART, at most SPLITS_P2 (0: no sums needed)
    total_count: tl.float32,   # elements per channel behind PART's sums (every process's batch)
    slope: tl.float64,  # leaky_relu negative slope, elu's alpha
    eps: tl.float64,    # the forward's eps: INVERTIBLE's floor of |gamma|
    ACC: tl.constexpr,
    TRAINING: tl.constexpr,         # batch statistics: dx has the mean terms
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    HAS_RES: tl.constexpr,
    ACT: tl.constexpr,
    INVERTIBLE: tl.constexpr,       # X is the output y (in-place activated batch norm)
    RENORM: tl.constexpr,
    WRITE_SUMS: tl.constexpr,       # store grad_weight / grad_bias
    WRITE_DRES: tl.constexpr,       # store dz as the residual gradient
    SATURATE: tl.constexpr,         # clamp finite gradients beyond their dtype to +-max
    SPLITS_P2: tl.constexpr,        # a power of two >= n_part_splits
    BLOCK_N: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_C: tl.constexpr,
    USE_INT64: tl.constexpr,
):
    N = size_n                  # the canonical sizes under their short names
    C = size_c
    S = size_s
    # Programs and tiles in the reverse of the partial pass's order: its last tiles are the
    # freshest in L2, so a tensor that fits L2 is read from there, not from HBM again.
    pid_c = tl.num_programs(0) - 1 - tl.program_id(0)
    pid_k = tl.num_programs(1) - 1 - tl.program_id(1)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    if TRAINING or WRITE_SUMS:  # PART is None otherwise: eval grad_input needs no sums
        # in one fixed tree, alike in every program (many splits are summed beforehand)
        sum_dz, sum_dzxhat, _ = merge_partials(PART, c, cmask, C, n_part_splits, ACC, False,
                                               SPLITS_P2)
    else:
        sum_dz = tl.zeros((BLOCK_C,), ACC)
        sum_dzxhat = tl.zeros((BLOCK_C,), ACC)

    mean = tl.load(MEAN + c, mask=cmask, other=0.0)
    invstd = tl.load(INVSTD + c, mask=cmask, other=1.0)   # 1: no 1/0 on channels past C
    w, b = load_affine(W, B, c, cmask, scalar(eps, ACC), ACC, HAS_W, HAS_B, INVERTIBLE)
    r, d = load_renorm(SAVE_RD, c, cmask, C, ACC, RENORM)
    if WRITE_SUMS:
        if pid_k == 0:
            tl.store(DW + c, r * sum_dzxhat + d * sum_dz, mask=cmask)
            tl.store(DB + c, sum_dz, mask=cmask)
    gain = w * invstd * r
    inv_gain = 1.0 / gain
    shift = b + w * d
    inv_m = 1.0 / (tl.zeros((BLOCK_C,), ACC) + total_count)
    mean_dz = sum_dz * inv_m
    coef_xc = gain * invstd * sum_dzxhat * inv_m

    x_coff = channel_offsets(c, stride_xc, USE_INT64)
    dy_coff = channel_offsets(c, stride_dyc, USE_INT64)
    dx_coff = channel_offsets(c, stride_dxc, USE_INT64)
    neg_slope = scalar(slope, ACC)
    t_start = pid_k * tiles_per_split
    t_end = tl.minimum(t_start + tiles_per_split, n_tiles)
    for i in range(t_start, t_end):
        t = t_start + t_end - 1 - i
        n, s, rmask = tile_rows(t, n_tiles_s, N, S, BLOCK_N, BLOCK_S, USE_INT64)
        mask = rmask[:, None] & cmask[None, :]
        dy = tl.load(tile_ptrs(DY, n, s, dy_coff, stride_dyn, stride_dys), mask=mask, other=0.0,
                     eviction_policy="evict_first")
        dy = dy.to(ACC)
        if TRAINING or ACT != 0:
            x = tl.load(tile_ptrs(X, n, s, x_coff, stride_xn, stride_xs), mask=mask, other=0.0,
                        eviction_policy="evict_first")
            x = x.to(ACC)
        else:
            x = 0.0
        # the residual recomputes z, or with INVERTIBLE recovers x - mean (training only)
        res = load_residual(RES, n, s, c, stride_rn, stride_rc, stride_rs, mask, ACC,
                            HAS_RES and ((INVERTIBLE and TRAINING)
                                         or (ACT != 0 and not INVERTIBLE)), USE_INT64)
        dz, xc = _dz_xc(dy, x, res, mean, gain, inv_gain, shift, ACT, neg_slope, resolution(X),
                        INVERTIBLE)
        if TRAINING:
            dx = gain[None, :] * (dz - mean_dz[None, :]) - coef_xc[None, :] * xc
        else:
            dx = gain[None, :] * dz
        store_fit(tile_ptrs(DX, n, s, dx_coff, stride_dxn, stride_dxs), dx, mask, SATURATE,
                  "evict_first")
        if WRITE_DRES:
            dr_coff = channel_offsets(c, stride_drc, USE_INT64)
            store_fit(tile_ptrs(DRES, n, s, dr_coff, stride_drn, stride_drs), dz, mask, SATURATE,
                      "evict_first")


@triton.jit
def bn_bwd_onepass_kernel(
    X,                  # pointer to the forward input (INVERTIBLE: its output), view (N, C, S)
    DY,                 # pointer to the output gradient
    DX,                 # pointer to the input gradient (written)
    RES,                # pointer to the forward residual, or None
    DRES,               # pointer to the residual gradient (written with an activation), or None
    MEAN,               # pointer to the saved mean (C,), ACC
    INVSTD,             # pointer to the saved inverse std (C,), ACC
    W,                  # pointer to gamma (C,) or None
    B,                  # pointer to beta (C,) or None
    SAVE_RD,            # pointer to the saved renorm (r, d), (2, C), or None
    DW,                 # pointer to grad_weight (C,), ACC
    DB,                 # pointer to grad_bias (C,), ACC
    size_n, size_c, size_s,   # canonical sizes N, C, S; N <= BLOCK_N and S <= BLOCK_S
    stride_xn, stride_xc, stride_xs,
    stride_dyn, stride_dyc, stride_dys,
    stride_dxn, stride_dxc, stride_dxs,
    stride_rn, stride_rc, stride_rs,
    stride_drn, stride_drc, stride_drs,
    slope: tl.float64,  # leaky_relu negative slope, elu's alpha
    eps: tl.float64,    # the forward's eps: INVERTIBLE's floor of |gamma|
    ACC: tl.constexpr,
    TRAINING: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    HAS_RES: tl.constexpr,
    ACT: tl.constexpr,
    INVERTIBLE: tl.constexpr,       # X is the output y (in-place activated batch norm)
    RENORM: tl.constexpr,
    WRITE_DRES: tl.constexpr,
    SATURATE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_C: tl.constexpr,
    USE_INT64: tl.constexpr,
):
    """Backward for planes that fit one tile: x and dy read once, dx written once."""
    N = size_n                  # the canonical sizes under their short names
    C = size_c
    S = size_s
    pid_c = tl.program_id(0)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    n, s, rmask = tile_rows(0, 1, N, S, BLOCK_N, BLOCK_S, USE_INT64)
    mask = rmask[:, None] & cmask[None, :]
    mean = tl.load(MEAN + c, mask=cmask, other=0.0)
    invstd = tl.load(INVSTD + c, mask=cmask, other=1.0)   # 1: no 1/0 on channels past C
    w, b = load_affine(W, B, c, cmask, scalar(eps, ACC), ACC, HAS_W, HAS_B, INVERTIBLE)
    r, d = load_renorm(SAVE_RD, c, cmask, C, ACC, RENORM)
    gain = w * invstd * r
    inv_gain = 1.0 / gain
    shift = b + w * d
    x_coff = channel_offsets(c, stride_xc, USE_INT64)
    dy_coff = channel_offsets(c, stride_dyc, USE_INT64)
    x = tl.load(tile_ptrs(X, n, s, x_coff, stride_xn, stride_xs), mask=mask, other=0.0).to(ACC)
    dy = tl.load(tile_ptrs(DY, n, s, dy_coff, stride_dyn, stride_dys), mask=mask, other=0.0)
    res = load_residual(RES, n, s, c, stride_rn, stride_rc, stride_rs, mask, ACC,
                        HAS_RES and (ACT != 0 or INVERTIBLE), USE_INT64)
    dz, xc = _dz_xc(dy.to(ACC), x, res, mean, gain, inv_gain, shift, ACT, scalar(slope, ACC),
                    resolution(X), INVERTIBLE)
    dz = tl.where(mask, dz, 0.0)
    xc = tl.where(mask, xc, 0.0)
    sum_dz = tl.sum(dz, axis=0)
    sum_dzxhat = tl.sum(dz * xc, axis=0) * invstd
    tl.store(DW + c, r * sum_dzxhat + d * sum_dz, mask=cmask)
    tl.store(DB + c, sum_dz, mask=cmask)

    if TRAINING:
        inv_m = 1.0 / ((tl.zeros((BLOCK_C,), ACC) + N) * S)  # N, S may be specialized to 1
        dx = gain[None, :] * (dz - (sum_dz * inv_m)[None, :]) \
            - (gain * invstd * sum_dzxhat * inv_m)[None, :] * xc
    else:
        dx = gain[None, :] * dz
    dx_coff = channel_offsets(c, stride_dxc, USE_INT64)
    store_fit(tile_ptrs(DX, n, s, dx_coff, stride_dxn, stride_dxs), dx, mask, SATURATE, "")
    if WRITE_DRES:
        dr_coff = channel_offsets(c, stride_drc, USE_INT64)
        store_fit(tile_ptrs(DRES, n, s, dr_coff, stride_drn, stride_drs), dz, mask, SATURATE, "")
