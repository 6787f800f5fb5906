"""Launchers: take validated tensors, allocate outputs, choose a plan, launch the kernels.

Every launch is counted in ``LAUNCHES`` (kernel name -> launches) so tests can prove which
kernels ran; nothing here ever substitutes a torch computation for a kernel.
"""
from __future__ import annotations

import collections
import contextlib
import functools
from dataclasses import dataclass

import torch
import triton.language as tl

from . import dispatch
from .kernels import (
    bn_merge_partials_kernel,
    bn_bwd_apply_kernel,
    bn_bwd_onepass_kernel,
    bn_bwd_partial_kernel,
    bn_fwd_apply_kernel,
    bn_fwd_onepass_kernel,
    bn_stats_partial_kernel,
)
from .layout import max_offset, output_memory_format, plane_view

__all__ = ["LAUNCHES", "count_launches", "capture_launches", "acc_dtype", "Epilogue", "forward",
           "backward"]

LAUNCHES: collections.Counter = collections.Counter()


def _check_interpreter_support() -> None:
    """Triton 3.6's interpreter hands loop bounds to Python as 1-element arrays, which NumPy
    2.4 no longer converts ("only 0-dimensional arrays can be converted to Python scalars").
    Seen with triton 3.6.0 + numpy 2.4; triton 3.8 and 3.9 are fine; 3.7 was not tried."""
    if not dispatch.interpreter_enabled():
        return
    import numpy
    import triton

    def version(mod):
        return tuple(int(p) for p in mod.__version__.split(".")[:2] if p.isdigit())

    if version(triton) < (3, 7) and version(numpy) >= (2, 4):
        raise RuntimeError(
            f"The Triton {triton.__version__} interpreter (TRITON_INTERPRET=1) fails with "
            f"NumPy {numpy.__version__}: install 'numpy<2.4' or triton>=3.8")


_check_interpreter_support()


@contextlib.contextmanager
def count_launches():
    """Yield a Counter of the kernel launches made inside the block."""
    before = LAUNCHES.copy()
    seen: collections.Counter = collections.Counter()
    try:
        yield seen
    finally:
        seen.update(LAUNCHES - before)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation and saved-statistics dtype: float32, or float64 for float64 activations."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _tl(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


_captured: list | None = None


@contextlib.contextmanager
def capture_launches():
    """Record the launches the launchers would make instead of making them.

    Yields a list of (kernel, grid, args, kwargs). Used by the compile check to compile exactly
    the specializations real calls produce (tensors may be on the meta device).
    """
    global _captured
    previous, _captured = _captured, []
    try:
        yield _captured
    finally:
        _captured = previous


# Compile options of every launch. Floating-point contraction stays on, as the kernels were
# written and checked: x * gain + shift and the Welford updates become FMAs, one rounding instead
# of two. Triton 3.9 warns that its default turns this off in 3.10; naming it keeps it.
COMPILE_OPTIONS = {"enable_fp_fusion": True}


def _run(kernel, grid, args, kwargs) -> None:
    """Launch (and count) a kernel, or record the launch while capture_launches is active."""
    if _captured is not None:
        _captured.append((kernel, grid, args, kwargs))
        return
    kernel[grid](*args, **kwargs, **COMPILE_OPTIONS)
    LAUNCHES[kernel.fn.__name__] += 1


def _launch(kernel, grid, *args, plan: dispatch.Plan, **constexprs):
    _run(kernel, grid, args, dict(BLOCK_N=plan.block_n, BLOCK_S=plan.block_s,
                                  BLOCK_C=plan.block_c, USE_INT64=plan.use_int64,
                                  num_warps=plan.num_warps, **constexprs))


def _view_or_copy(x: torch.Tensor, others: list[torch.Tensor]):
    """The plane view of x (and tensors shaped like it); copies inputs whose strides have none."""
    view = plane_view(x.shape, [x, *others])
    if view is None:
        x = x.contiguous()
        others = [t if plane_view(t.shape, [t]) is not None else t.contiguous() for t in others]
        view = plane_view(x.shape, [x, *others])
    return view, x, others


def _aligned(view, tensors: list[torch.Tensor]) -> bool:
    """16-byte aligned pointers and strides (in bytes) for every activation: vectorizable."""
    return (all(t.data_ptr() % 16 == 0 for t in tensors)
            and _view_facts(view, tensors[0].element_size())[1])


@functools.lru_cache(maxsize=1024)
def _view_facts(view, elem_bytes: int) -> tuple[int, bool]:
    """(largest offset, every non-unit stride a multiple of 16 bytes): the view's part of the
    plan's inputs, remembered like the view itself (layout._plane_view)."""
    return max_offset(view), all(st in (0, 1) or (st * elem_bytes) % 16 == 0
                                 for sts in view.strides for st in sts)


def _plan(op: str, view, x: torch.Tensor, tensors: list[torch.Tensor]) -> dispatch.Plan:
    elem = x.element_size()
    return dispatch.make_plan(op, view.n, view.c, view.s, view.channels_minor, elem,
                              _view_facts(view, elem)[0], dispatch.device_info(x.device),
                              _aligned(view, tensors), dtype=_DTYPE_NAMES.get(x.dtype))


_DTYPE_NAMES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32",
                torch.float64: "float64"}


@dataclass(frozen=True)
class Epilogue:
    """What the kernels fuse around the normalization."""
    act: int = 0                                # activation code (kernels.activations)
    slope: float = 0.01                         # leaky_relu negative slope
    renorm: tuple[float, float] | None = None   # batch renorm (rmax, dmax), training only
    saturate: bool = False                      # output policy: clamp to the dtype's range
    skip_nonfinite: bool = False                # running stats skip non-finite channels


PLAIN = Epilogue()
_NO_STRIDES = (0, 0, 0)


def forward(x, weight, bias, running_mean, running_var, training: bool, momentum: float,
            eps: float, residual=None, epi: Epilogue = PLAIN, running_count=None,
            overflow_count=None, overflow_max=None, sync=None):
    """Batch norm forward: y = act(BN(x) + residual). Returns (y, save_mean, save_invstd,
    save_rd); updates the running statistics in training. save_rd is renorm's (r, d) or empty.

    ``running_count`` (C,) int64: per-channel batch counts for a cumulative running average
    (momentum unused), incremented by the kernel. ``overflow_count`` (C,) int64 and
    ``overflow_max`` (C,) float32 accumulate the outputs that overflow and the largest |y|.
    ``sync`` (training only): a function from this batch's (3, C) (count, mean, M2) summary to
    the (3, K, C) summaries of every process, which then normalize x -- synchronized batch norm."""
    c = x.shape[1]
    acc = acc_dtype(x.dtype)
    y = torch.empty_like(x, memory_format=output_memory_format(x))
    save_mean = torch.empty(c, dtype=acc, device=x.device)
    save_invstd = torch.empty(c, dtype=acc, device=x.device)
    renorm = training and epi.renorm is not None
    save_rd = torch.empty((2, c) if renorm else (0,), dtype=acc, device=x.device)
    if x.numel() == 0 and sync is None:
        # torch leaves the running statistics alone on an empty batch; nothing to normalize.
        save_mean.zero_()
        save_invstd.zero_()
        save_rd.zero_()
        return y, save_mean, save_invstd, save_rd

    view, x, others = _view_or_copy(x, [y] + ([residual] if residual is not None else []))
    assert others[0] is y, "outputs are allocated in a format that always has a plane view"
    res = others[1] if residual is not None else save_mean
    update = training and running_mean is not None
    rm = running_mean.contiguous() if running_mean is not None else save_mean
    rv = running_var.contiguous() if running_var is not None else save_invstd
    w = weight.contiguous() if weight is not None else save_mean
    b = bias.contiguous() if bias is not None else save_mean
    plan = _plan("fwd_train" if training else "fwd_eval", view, x, [x, *others])
    strides = (*view.strides[0], *view.strides[1],
               *(view.strides[2] if residual is not None else _NO_STRIDES))
    rmax, dmax = epi.renorm if renorm else (1.0, 0.0)
    common = dict(ACC=_tl(acc), HAS_W=weight is not None, HAS_B=bias is not None,
                  HAS_RES=residual is not None, ACT=epi.act, RENORM=renorm, plan=plan)
    scalars = (float(momentum), float(eps), float(epi.slope), float(rmax), float(dmax))
    c_blocks = dispatch.cdiv(c, plan.block_c)
    counting = overflow_count is not None
    ovf = (overflow_count, overflow_max) if counting else (save_mean, save_mean)
    run_count = running_count if running_count is not None else save_mean
    common.update(SKIP_NONFINITE=epi.skip_nonfinite, CUMULATIVE=running_count is not None,
                  SATURATE=epi.saturate, COUNT_OVERFLOW=counting)

    # An empty batch in a synchronized step still finalizes the shared statistics (so every
    # process updates its running statistics alike): its grid has one program and no tiles.
    if training and plan.variant == "onepass" and sync is None:
        # One program per channel reads the running statistics before it updates them.
        _launch(bn_fwd_onepass_kernel, (c_blocks,), x, y, res, rm, rv, run_count, rm, rv, w, b,
                save_mean, save_invstd, save_rd, *ovf, view.n, c, view.s, *strides, *scalars,
                UPDATE_RUNNING=update, **common)
    else:
        n_tiles_s, n_tiles, per_split, splits = dispatch.grid_tiles(plan, view.n, view.s)
        part = save_mean
        if training:
            part, part_splits = torch.empty((3, splits, c), dtype=acc, device=x.device), splits
            _launch(bn_stats_partial_kernel, (c_blocks, splits), x, part, view.n, c, view.s,
                    *strides[:3], n_tiles_s, n_tiles, per_split, ACC=_tl(acc), plan=plan)
        if sync is not None:
            part = sync(merge_partials(part, moments=True))
            part_splits = part.shape[1]
        # Renorm's r and d must come from the running statistics of before this step in every
        # program, while the first program of each channel block updates them: read a snapshot.
        stat_mean, stat_var = (rm.clone(), rv.clone()) if renorm else (rm, rv)
        _launch(bn_fwd_apply_kernel, (c_blocks, splits), x, y, res, part, rm, rv, run_count,
                stat_mean, stat_var, w, b, save_mean, save_invstd, save_rd, *ovf, view.n, c,
                view.s, *strides,
                n_tiles_s, n_tiles, per_split, part_splits if training else 0, *scalars,
                TRAINING=training, UPDATE_RUNNING=update, **common)

    if update:
        for given, used in ((running_mean, rm), (running_var, rv)):
            if used is not given:  # strided running stats (any shape): write back in place
                given.copy_(used.view_as(given))
    return y, save_mean, save_invstd, save_rd


def merge_partials(part: torch.Tensor, moments: bool) -> torch.Tensor:
    """(Q, K, C) partials -> (Q, C): Chan-merged moments (Q = 3) or summed sums (Q = 2)."""
    q, k, c = part.shape
    out = torch.empty((q, c), dtype=part.dtype, device=part.device)
    block_c = 128  # (Q, K, C) is tiny: one pass of 128 channels per program, any K
    _run(bn_merge_partials_kernel, (dispatch.cdiv(c, block_c),), (part, out, c, k),
         dict(MOMENTS=moments, ACC=_tl(part.dtype), BLOCK_C=block_c, num_warps=4))
    return out


def backward(dy, x, weight, bias, residual, save_mean, save_invstd, save_rd, training: bool,
             need_sums: bool, epi: Epilogue = PLAIN, sync=None):
    """Backward of y = act(BN(x) + residual). Returns (dx, grad_weight, grad_bias, grad_residual);
    the parameter grads are float32/64; grad_residual is None without an activation (it is dy).

    ``sync`` (training only): a function from this batch's (2, C) sums (dz, dz * x_hat) to
    (the sums over every process's batch, their element count per channel); dx then uses the
    global sums while grad_weight / grad_bias stay this process's own, as in torch."""
    c = x.shape[1]
    acc = save_mean.dtype
    dx = torch.empty_like(x, memory_format=output_memory_format(x))
    write_dres = residual is not None and epi.act != 0
    dres = torch.empty_like(residual, memory_format=output_memory_format(residual)) \
        if write_dres else None
    dw = torch.zeros(c, dtype=acc, device=x.device)
    db = torch.zeros(c, dtype=acc, device=x.device)
    if x.numel() == 0 and sync is None:
        return dx, dw, db, dres

    outs = [dy, dx] + ([residual] if residual is not None else []) + ([dres] if write_dres else [])
    view, x, others = _view_or_copy(x, outs)
    dy = others[0]
    assert others[1] is dx and (not write_dres or others[-1] is dres), \
        "outputs are allocated in a format that always has a plane view"
    res = others[2] if residual is not None else save_mean
    need_sums = need_sums or training
    renorm = save_rd.numel() > 0
    w = weight.contiguous() if weight is not None else save_mean
    b = bias.contiguous() if bias is not None else save_mean
    rd = save_rd if renorm else save_mean
    # Eval backward without parameter grads is one element-wise pass, planned like eval forward.
    op = "bwd_train" if training else ("bwd_eval" if need_sums else "fwd_eval")
    plan = _plan(op, view, x, [x, *others])
    st = view.strides
    s_x, s_dy, s_dx = st[0], st[1], st[2]
    s_res = st[3] if residual is not None else _NO_STRIDES
    s_dres = st[-1] if write_dres else _NO_STRIDES
    common = dict(ACC=_tl(acc), HAS_W=weight is not None, HAS_B=bias is not None,
                  HAS_RES=residual is not None, ACT=epi.act, RENORM=renorm, plan=plan)
    c_blocks = dispatch.cdiv(c, plan.block_c)
    dres_k = dres if write_dres else dx

    if plan.variant == "onepass" and sync is None:
        _launch(bn_bwd_onepass_kernel, (c_blocks,), x, dy, dx, res, dres_k, save_mean, save_invstd,
                w, b, rd, dw, db, view.n, c, view.s, *s_x, *s_dy, *s_dx, *s_res, *s_dres,
                float(epi.slope), TRAINING=training, WRITE_DRES=write_dres,
                SATURATE=epi.saturate, **common)
        return dx, dw, db, dres

    n_tiles_s, n_tiles, per_split, splits = dispatch.grid_tiles(plan, view.n, view.s)
    part = save_mean
    if need_sums:
        part = torch.empty((2, splits, c), dtype=acc, device=x.device)
        _launch(bn_bwd_partial_kernel, (c_blocks, splits), x, dy, res, save_mean, save_invstd, w,
                b, rd, part, view.n, c, view.s, *s_x, *s_dy, *s_res, n_tiles_s, n_tiles,
                per_split, float(epi.slope), **common)
    part_splits, total = (splits if need_sums else 0), float(view.n * view.s)
    if sync is not None:
        local = merge_partials(part, moments=False)
        db, dw = local[0], local[1]
        part, total = sync(local)
        part, part_splits = part.reshape(2, 1, c), 1
    if x.numel() == 0:
        return dx, dw, db, dres
    _launch(bn_bwd_apply_kernel, (c_blocks, splits), x, dy, dx, res, dres_k, save_mean,
            save_invstd, w, b, rd, part, dw, db, view.n, c, view.s, *s_x, *s_dy, *s_dx, *s_res,
            *s_dres, n_tiles_s, n_tiles, per_split, part_splits, total, float(epi.slope),
            TRAINING=training, WRITE_SUMS=need_sums and sync is None, WRITE_DRES=write_dres,
            SATURATE=epi.saturate, **common)
    return dx, dw, db, dres
