"""Launchers: take validated tensors, allocate outputs, choose a plan, launch the kernels.

Every launch is counted in ``LAUNCHES`` (kernel name -> launches) so tests can prove which
kernels ran; nothing here ever substitutes a torch computation for a kernel.
"""
from __future__ import annotations

import collections
import contextlib

import torch
import triton.language as tl

from . import dispatch
from .kernels import (
    bn_bwd_apply_kernel,
    bn_bwd_onepass_kernel,
    bn_bwd_partial_kernel,
    bn_fwd_apply_kernel,
    bn_fwd_onepass_kernel,
    bn_stats_partial_kernel,
)
from .layout import max_offset, output_memory_format, plane_view

__all__ = ["LAUNCHES", "count_launches", "capture_launches", "acc_dtype", "forward", "backward"]

LAUNCHES: collections.Counter = collections.Counter()


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


def _launch(kernel, grid, *args, plan: dispatch.Plan, **constexprs):
    kwargs = dict(BLOCK_N=plan.block_n, BLOCK_S=plan.block_s, BLOCK_C=plan.block_c,
                  USE_INT64=plan.use_int64, num_warps=plan.num_warps, **constexprs)
    if _captured is not None:
        _captured.append((kernel, grid, args, kwargs))
        return
    kernel[grid](*args, **kwargs)
    LAUNCHES[kernel.fn.__name__] += 1


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
    size = tensors[0].element_size()
    return (all(t.data_ptr() % 16 == 0 for t in tensors)
            and all(st in (0, 1) or (st * size) % 16 == 0 for sts in view.strides for st in sts))


def _plan(op: str, view, x: torch.Tensor, tensors: list[torch.Tensor]) -> dispatch.Plan:
    return dispatch.make_plan(op, view.n, view.c, view.s, view.channels_minor, x.element_size(),
                              max_offset(view), dispatch.device_info(x.device),
                              _aligned(view, tensors))


def forward(x, weight, bias, running_mean, running_var, training: bool, momentum: float, eps: float):
    """Batch norm forward. Returns (y, save_mean, save_invstd); updates running stats in training."""
    c = x.shape[1]
    acc = acc_dtype(x.dtype)
    y = torch.empty_like(x, memory_format=output_memory_format(x))
    save_mean = torch.empty(c, dtype=acc, device=x.device)
    save_invstd = torch.empty(c, dtype=acc, device=x.device)
    if x.numel() == 0:
        # torch leaves the running statistics alone on an empty batch; nothing to normalize.
        save_mean.zero_()
        save_invstd.zero_()
        return y, save_mean, save_invstd

    view, x, (y_k,) = _view_or_copy(x, [y])
    assert y_k is y, "outputs are allocated in a format that always has a plane view"
    update = training and running_mean is not None
    rm = running_mean.contiguous() if running_mean is not None else save_mean
    rv = running_var.contiguous() if running_var is not None else save_invstd
    w = weight.contiguous() if weight is not None else save_mean
    b = bias.contiguous() if bias is not None else save_mean
    plan = _plan("fwd_train" if training else "fwd_eval", view, x, [x, y])
    (sxn, sxc, sxs), (syn, syc, sys_) = view.strides
    common = dict(ACC=_tl(acc), HAS_W=weight is not None, HAS_B=bias is not None, plan=plan)
    c_blocks = dispatch.cdiv(c, plan.block_c)

    if training and plan.variant == "onepass":
        _launch(bn_fwd_onepass_kernel, (c_blocks,), x, y, rm, rv, w, b, save_mean, save_invstd,
                view.n, c, view.s, sxn, sxc, sxs, syn, syc, sys_, float(momentum), float(eps),
                UPDATE_RUNNING=update, **common)
    else:
        n_tiles_s, n_tiles, per_split, splits = dispatch.grid_tiles(plan, view.n, view.s)
        part = save_mean
        if training:
            part = torch.empty((3, splits, c), dtype=acc, device=x.device)
            _launch(bn_stats_partial_kernel, (c_blocks, splits), x, part, view.n, c, view.s,
                    sxn, sxc, sxs, n_tiles_s, n_tiles, per_split, ACC=_tl(acc), plan=plan)
        _launch(bn_fwd_apply_kernel, (c_blocks, splits), x, y, part, rm, rv, w, b, save_mean,
                save_invstd, view.n, c, view.s, sxn, sxc, sxs, syn, syc, sys_, n_tiles_s, n_tiles,
                per_split, splits if training else 0, float(momentum), float(eps),
                TRAINING=training, UPDATE_RUNNING=update, **common)

    if update:
        for given, used in ((running_mean, rm), (running_var, rv)):
            if used is not given:  # non-contiguous running stats: write the result back in place
                given.copy_(used.view_as(given))
    return y, save_mean, save_invstd


def backward(dy, x, weight, save_mean, save_invstd, training: bool, need_sums: bool):
    """Batch norm backward. Returns (dx, grad_weight, grad_bias), the latter two in float32/64."""
    c = x.shape[1]
    acc = save_mean.dtype
    dx = torch.empty_like(x, memory_format=output_memory_format(x))
    dw = torch.zeros(c, dtype=acc, device=x.device)
    db = torch.zeros(c, dtype=acc, device=x.device)
    if x.numel() == 0:
        return dx, dw, db

    view, x, (dy, dx_k) = _view_or_copy(x, [dy, dx])
    assert dx_k is dx, "outputs are allocated in a format that always has a plane view"
    need_sums = need_sums or training
    w = weight.contiguous() if weight is not None else save_mean
    # Eval backward without parameter grads is one element-wise pass, planned like eval forward.
    op = "bwd_train" if training else ("bwd_eval" if need_sums else "fwd_eval")
    plan = _plan(op, view, x, [x, dy, dx])
    (sxn, sxc, sxs), (sdn, sdc, sds), (sgn, sgc, sgs) = view.strides
    strides = (sxn, sxc, sxs, sdn, sdc, sds, sgn, sgc, sgs)
    c_blocks = dispatch.cdiv(c, plan.block_c)

    if plan.variant == "onepass":
        _launch(bn_bwd_onepass_kernel, (c_blocks,), x, dy, dx, save_mean, save_invstd, w, dw, db,
                view.n, c, view.s, *strides, ACC=_tl(acc), TRAINING=training,
                HAS_W=weight is not None, plan=plan)
        return dx, dw, db

    n_tiles_s, n_tiles, per_split, splits = dispatch.grid_tiles(plan, view.n, view.s)
    part = save_mean
    if need_sums:
        part = torch.empty((2, splits, c), dtype=acc, device=x.device)
        _launch(bn_bwd_partial_kernel, (c_blocks, splits), x, dy, save_mean, save_invstd, part,
                view.n, c, view.s, *strides[:6], n_tiles_s, n_tiles, per_split, ACC=_tl(acc),
                plan=plan)
    _launch(bn_bwd_apply_kernel, (c_blocks, splits), x, dy, dx, save_mean, save_invstd, w, part,
            dw, db, view.n, c, view.s, *strides, n_tiles_s, n_tiles, per_split,
            splits if need_sums else 0, ACC=_tl(acc), TRAINING=training,
            HAS_W=weight is not None, WRITE_SUMS=need_sums, plan=plan)
    return dx, dw, db
