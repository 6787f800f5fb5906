"""The launchers: the one place where a batch norm runs.

``forward`` and ``backward`` take the op's tensors (``ForwardArgs`` / ``BackwardArgs``) and its
``Options``, allocate the outputs, and run one of two backends behind the same steps:

* the Triton kernels, planned by tritonbn/plan.py (on a GPU, or on CPU tensors in the
  interpreter);
* the float64 reference (tritonbn/reference.py), for CPU tensors when Triton runs no kernels
  there (see tritonbn/_runtime.py).

A synchronized call (``Options.group``) adds its collectives between the same steps: the
forward gathers every process's per-channel (count, mean, M2) before normalizing, the backward
all-reduces the per-channel sums before computing grad_input.

Tensors the op updates (running statistics, batch counters, overflow counters) are written in
place (``in_place=True``: eager calls) or to new tensors returned as ``new_<name>`` outputs
(``in_place=False``: the custom op, whose callers copy them back). Every kernel launch is counted
in ``LAUNCHES`` (kernel name -> launches) so tests can prove which kernels ran; nothing here
substitutes a torch computation for a kernel.
"""
from __future__ import annotations

import collections
import contextlib
import functools
from typing import NamedTuple, Optional

import torch
import torch.distributed as dist
import triton.language as tl

from . import plan as planner
from . import reference
from ._runtime import uses_reference, warn_reference_path
from .kernels import (
    bn_bwd_apply_kernel,
    bn_bwd_onepass_kernel,
    bn_bwd_partial_kernel,
    bn_fwd_apply_kernel,
    bn_fwd_onepass_kernel,
    bn_merge_partials_kernel,
    bn_stats_partial_kernel,
)
from .layout import empty_output, max_offset, plane_view
from .options import UPDATED, BackwardArgs, ForwardArgs, Options

__all__ = ["LAUNCHES", "count_launches", "capture_launches", "acc_dtype", "plan_for", "Planned",
           "forward", "backward", "UPDATES", "COMPILE_OPTIONS"]

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


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation and saved-statistics dtype: float32, or float64 for float64 activations."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _tl(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


# ---------------------------------------------------------------------------------- planning

def _view_or_copy(x: torch.Tensor, others: list):
    """The plane view of x (and tensors shaped like it); copies inputs whose strides have none."""
    present = [t for t in others if t is not None]
    view = plane_view(x.shape, [x, *present])
    if view is None:
        x = x.contiguous()
        others = [t if t is None or plane_view(t.shape, [t]) is not None else t.contiguous()
                  for t in others]
        view = plane_view(x.shape, [x, *(t for t in others if t is not None)])
    return view, x, others


@functools.lru_cache(maxsize=1024)
def _view_facts(view, elem_bytes: int) -> tuple[int, bool]:
    """(largest offset, every non-unit stride a multiple of 16 bytes): the view's part of the
    plan's inputs, remembered like the view itself (layout._plane_view)."""
    return max_offset(view), all(st in (0, 1) or (st * elem_bytes) % 16 == 0
                                 for sts in view.strides for st in sts)


_DTYPE_NAMES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32",
                torch.float64: "float64"}


def _aligned(view, x: torch.Tensor, tensors) -> bool:
    """Every activation pointer 16-byte aligned and every non-unit stride a multiple of 16
    bytes: the compiler can vectorize."""
    return _view_facts(view, x.element_size())[1] and all(t.data_ptr() % 16 == 0 for t in tensors)


def _plan(op: str, view, x: torch.Tensor, tensors, tuned: bool = True,
          device: Optional[torch.device] = None) -> planner.Plan:
    elem = x.element_size()
    return planner.make_plan(op, view.n, view.c, view.s, view.channels_minor, elem,
                             _view_facts(view, elem)[0], planner.device_info(device or x.device),
                             _aligned(view, x, tensors), dtype=_DTYPE_NAMES.get(x.dtype),
                             tuned=tuned)


class Planned(NamedTuple):
    view: object                # layout.PlaneView
    plan: planner.Plan
    aligned: bool


def plan_for(op: str, x: torch.Tensor, tuned: bool = True,
             device: Optional[torch.device] = None) -> Planned:
    """The plane view and the plan the launchers use for ``op`` on an input like ``x`` (a meta
    tensor will do, with the ``device`` to plan for); ``tuned=False``: the heuristic plan,
    ignoring the tuning table. What ``tritonbn info`` prints and ``tritonbn tune`` starts from."""
    view, x, _ = _view_or_copy(x, [])
    return Planned(view, _plan(op, view, x, [x], tuned, device), _aligned(view, x, [x]))


def _contiguous(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """Per-channel tensors are indexed flat by the kernels."""
    return None if t is None else t.contiguous()


def _strides(view, i: int, present: bool):
    """The i-th tensor's (stride_n, stride_c, stride_s), or Nones for an absent tensor."""
    return view.strides[i] if present else (None, None, None)


def _launch(kernel, grid, *args, plan: planner.Plan, **constexprs):
    _run(kernel, grid, args, dict(BLOCK_N=plan.block_n, BLOCK_S=plan.block_s,
                                  BLOCK_C=plan.block_c, USE_INT64=plan.use_int64,
                                  num_warps=plan.num_warps, **constexprs))


# ---------------------------------------------------------------------- tensors the op updates

class _Updated:
    """How the kernels read and write one tensor the op updates, and how it gets back.

    ``read``: flat values before the call (a view of the caller's tensor, or a copy when its
    strides have no flat view). ``write``: where the kernels put the new values -- ``read``
    itself when they may update in place, else a new tensor (a copy of ``read`` for counters
    that accumulate). In place, a new tensor is copied into the caller's afterwards (strided or
    reshaped statistics, renorm); otherwise it is the op's ``new_<name>`` output.
    """

    def __init__(self, given: Optional[torch.Tensor], updates: bool, in_place: bool,
                 accumulates: bool = False, separate: bool = False):
        self.given, self.in_place = given, in_place
        self.updates = updates and given is not None
        self.read = None if given is None else given.contiguous().view(-1)
        if not self.updates:
            self.write = None
        elif in_place and not separate and given.is_contiguous():
            self.write = self.read          # a flat view of the caller's tensor
        elif accumulates:
            self.write = self.read.clone()
        else:
            self.write = torch.empty_like(self.read)

    def unchanged(self) -> None:
        """The kernels did not run (an empty batch): the new values are the old ones."""
        if self.updates and self.write is not self.read:
            self.write.copy_(self.read)

    def finish(self) -> Optional[torch.Tensor]:
        """In place: write back when needed, return None. Else the ``new_<name>`` output, None
        when the op does not update this argument."""
        if not self.in_place:
            return self.write
        if self.updates and self.write is not self.read:
            with torch.no_grad():
                self.given.copy_(self.write.view(self.given.shape))
        return None


# Which of the tensors the op may update it updates, given the options: the launchers, the
# custom op's fake kernel and its callers all read this one table.
UPDATES = {
    "running_mean": lambda o: o.training,
    "running_var": lambda o: o.training,
    "channel_batches": lambda o: o.training and o.cumulative,
    "overflow_count": lambda o: True,       # accumulated in eval too
    "overflow_max": lambda o: True,
}
assert set(UPDATES) == set(UPDATED)


def _updated(a: ForwardArgs, o: Options, in_place: bool) -> dict:
    # Renorm reads the running statistics of before this step in every program while the
    # first program of each channel block writes the new ones: never the same memory.
    separate = o.renorming
    return {name: _Updated(getattr(a, name), UPDATES[name](o), in_place,
                           accumulates=name.startswith("overflow"), separate=separate)
            for name in UPDATED}


# ------------------------------------------------------------------------ synchronized calls

def _group(name: str):
    return dist.distributed_c10d._resolve_process_group(name)


def _gather_moments(local: torch.Tensor, name: str) -> torch.Tensor:
    """(3, C) per process -> (3, world, C), in rank order."""
    group = _group(name)
    world = dist.get_world_size(group)
    out = local.new_empty((world * local.shape[0], local.shape[1]))  # ranks stacked on dim 0
    dist.all_gather_into_tensor(out, local.contiguous(), group=group)
    return out.view(world, *local.shape).transpose(0, 1).contiguous()


def _sum_over_processes(local: torch.Tensor, name: str) -> torch.Tensor:
    summed = local.clone()
    dist.all_reduce(summed, group=_group(name))
    return summed


def merge_partials(part: torch.Tensor, moments: bool) -> torch.Tensor:
    """(Q, K, C) partials -> (Q, C): Chan-merged moments (Q = 3) or summed sums (Q = 2)."""
    q, k, c = part.shape
    out = torch.empty((q, c), dtype=part.dtype, device=part.device)
    block_c = 128  # (Q, K, C) is tiny: one pass of 128 channels per program, any K
    _run(bn_merge_partials_kernel, (planner.cdiv(c, block_c),), (part, out, c, k),
         dict(MOMENTS=moments, ACC=_tl(part.dtype), BLOCK_C=block_c, num_warps=4))
    return out


# ---------------------------------------------------------------------------------- forward

def forward(a: ForwardArgs, o: Options, in_place: bool = True) -> tuple:
    """y = act(BN(x) + residual). Returns the op's outputs in FORWARD_OUTPUTS order:
    (y, save_mean, save_invstd, save_rd, new_running_mean, new_running_var,
    new_channel_batches, new_overflow_count, new_overflow_max). Statistics are float32 (float64
    for float64 input); save_rd is renorm's (2, C) r and d, or empty. A ``new_`` output is the
    tensor with the updated values, None in place or when the op does not update that argument."""
    x = a.input
    c = x.shape[1]
    acc = acc_dtype(x.dtype)
    y = empty_output(x)
    save_mean = torch.empty(c, dtype=acc, device=x.device)
    save_invstd = torch.empty(c, dtype=acc, device=x.device)
    save_rd = torch.empty((2, c) if o.renorming else (0,), dtype=acc, device=x.device)
    upd = _updated(a, o, in_place)
    saves = (save_mean, save_invstd, save_rd)
    if x.numel() == 0 and o.group is None:
        # torch leaves the running statistics alone on an empty batch; nothing to normalize.
        for t in saves:
            t.zero_()
        for u in upd.values():
            u.unchanged()
    elif uses_reference(x):
        warn_reference_path()
        _reference_forward(a, o, y, saves, upd)
    else:
        _kernel_forward(a, o, y, saves, upd)
    return (y, *saves, *(upd[name].finish() for name in UPDATED))


def _reference_forward(a: ForwardArgs, o: Options, y, saves, upd) -> None:
    """The same steps in float64 torch: local moments, [exchange], normalize."""
    x = a.input
    part = None
    if o.training:
        part = reference.moments(x).to(saves[0].dtype).unsqueeze(1)   # (3, 1, C)
        if o.group is not None:
            part = _gather_moments(part[:, 0], o.group)
    rm, rv = upd["running_mean"], upd["running_var"]
    out = reference.forward_apply(a, o, part, rm.read, rv.read, upd["channel_batches"].read)
    y.copy_(reference.fit(out.y, y.dtype, o.saturate))
    for t, v in zip(saves, (out.mean, out.invstd, out.rd)):
        if t.numel():
            t.copy_(v)
    for name, value in (("running_mean", out.new_mean), ("running_var", out.new_var),
                        ("channel_batches", out.new_counts)):
        u = upd[name]
        if u.updates and value is not None:
            u.write.copy_(reference.fit(value, u.write.dtype, o.saturate))
        elif u.updates:
            u.unchanged()
    if a.overflow_count is not None:
        count, biggest = reference.overflow(out.y, y.dtype)
        upd["overflow_count"].write.add_(count)
        w = upd["overflow_max"].write
        w.copy_(torch.maximum(w, biggest.to(w.dtype)))


def _kernel_forward(a: ForwardArgs, o: Options, y, saves, upd) -> None:
    x, residual = a.input, a.residual
    save_mean, save_invstd, save_rd = saves
    c = x.shape[1]
    acc = save_mean.dtype
    view, x, others = _view_or_copy(x, [y, residual])
    assert others[0] is y, "outputs are allocated in a format that always has a plane view"
    res = others[1]
    has_res = res is not None
    plan = _plan("fwd_train" if o.training else "fwd_eval", view, x,
                 [x, y] + ([res] if has_res else []))
    strides = (*view.strides[0], *view.strides[1], *_strides(view, 2, has_res))
    rm, rv, cb = upd["running_mean"], upd["running_var"], upd["channel_batches"]
    update = o.training and rm.read is not None
    cumulative = 0 if not (o.training and o.cumulative) else (2 if cb.read is not None else 1)
    warmup = o.renorming and o.warmup_steps > 0
    rmax, dmax = o.renorm if o.renorming else (1.0, 0.0)
    counting = a.overflow_count is not None
    common = dict(ACC=_tl(acc), HAS_W=a.weight is not None, HAS_B=a.bias is not None,
                  HAS_RES=has_res, ACT=o.act_code, RENORM=o.renorming, WARMUP=warmup,
                  SKIP_NONFINITE=o.skip_nonfinite, CUMULATIVE=cumulative, SATURATE=o.saturate,
                  COUNT_OVERFLOW=counting, plan=plan)
    scalars = (float(o.momentum), float(o.eps), float(o.negative_slope), float(rmax),
               float(dmax), int(o.warmup_steps))
    batches = a.batches if (cumulative == 1 or warmup) else None
    stats = (rm.read, rv.read, rm.write, rv.write, batches, cb.read, cb.write,
             _contiguous(a.weight), _contiguous(a.bias), save_mean, save_invstd,
             save_rd if o.renorming else None,
             upd["overflow_count"].write, upd["overflow_max"].write)
    c_blocks = planner.cdiv(c, plan.block_c)

    if o.training and plan.variant == "onepass" and o.group is None:
        _launch(bn_fwd_onepass_kernel, (c_blocks,), x, y, res, *stats, view.n, c, view.s,
                *strides, *scalars, UPDATE_RUNNING=update, **common)
        return
    # An empty batch in a synchronized step still finalizes the shared statistics (so every
    # process updates its running statistics alike): its grid has one program and no tiles.
    n_tiles_s, n_tiles, per_split, splits = planner.grid_tiles(plan, view.n, view.s)
    part, part_splits = None, 0
    if o.training:
        part, part_splits = torch.empty((3, splits, c), dtype=acc, device=x.device), splits
        _launch(bn_stats_partial_kernel, (c_blocks, splits), x, part, view.n, c, view.s,
                *strides[:3], n_tiles_s, n_tiles, per_split, ACC=_tl(acc), plan=plan)
        if o.group is not None:
            part = _gather_moments(merge_partials(part, moments=True), o.group)
            part_splits = part.shape[1]
    _launch(bn_fwd_apply_kernel, (c_blocks, splits), x, y, res, part, *stats, view.n, c, view.s,
            *strides, n_tiles_s, n_tiles, per_split, part_splits, *scalars,
            TRAINING=o.training, UPDATE_RUNNING=update, **common)


# --------------------------------------------------------------------------------- backward

def backward(a: BackwardArgs, o: Options, param_grads: bool) -> tuple:
    """Backward of y = act(BN(x) + residual): (grad_input, grad_weight, grad_bias,
    grad_residual). Parameter gradients are in the statistics' dtype; grad_residual is empty
    without an activation (it is grad_output itself). With ``Options.group`` grad_input uses the
    sums over every process's batch; grad_weight / grad_bias stay this process's own, as in
    torch (DistributedDataParallel averages them)."""
    x, residual = a.input, a.residual
    c = x.shape[1]
    acc = a.save_mean.dtype
    dx = empty_output(x)
    write_dres = residual is not None and o.activation is not None
    dres = empty_output(residual) if write_dres else x.new_empty((0,))
    dw = torch.empty(c, dtype=acc, device=x.device)
    db = torch.empty(c, dtype=acc, device=x.device)
    if x.numel() == 0 and o.group is None:
        dw.zero_()
        db.zero_()
    elif uses_reference(x):
        warn_reference_path()
        _reference_backward(a, o, dx, dw, db, dres if write_dres else None)
    else:
        _kernel_backward(a, o, param_grads, dx, dw, db, dres if write_dres else None)
    return dx, dw, db, dres


def _sums_over_processes(local: torch.Tensor, count: int, name: str):
    """Local (2, C) sums -> (global sums / global count, as (2, C)): the means dx needs. The
    element count rides along in the same all_reduce, so no host sync and no stash."""
    with_count = torch.cat([local, local.new_full((1, local.shape[1]), float(count))])
    summed = _sum_over_processes(with_count, name)
    return summed[:2] / summed[2:].clamp(min=1.0)


def _reference_backward(a: BackwardArgs, o: Options, dx, dw, db, dres) -> None:
    sums = reference.backward_sums(a, o)                      # (2, C) float64: dz, dz * x_hat
    count = a.input.numel() // max(a.input.shape[1], 1)
    means = sums / max(count, 1)
    if o.group is not None:
        means = _sums_over_processes(sums.to(dw.dtype), count, o.group).double()
    grad_x, grad_res = reference.backward_apply(a, o, means)
    dx.copy_(reference.fit(grad_x, dx.dtype, o.saturate))
    if dres is not None:
        dres.copy_(reference.fit(grad_res, dres.dtype, o.saturate))
    r, d = reference.renorm_factors(a)
    dw.copy_(r * sums[1] + d * sums[0])
    db.copy_(sums[0])


def _kernel_backward(a: BackwardArgs, o: Options, param_grads: bool, dx, dw, db, dres) -> None:
    x, residual, dy = a.input, a.residual, a.grad_output
    c = x.shape[1]
    acc = a.save_mean.dtype
    write_dres = dres is not None
    view, x, others = _view_or_copy(x, [dy, dx, residual, dres])
    dy, res = others[0], others[2]
    assert others[1] is dx and others[3] is dres, \
        "outputs are allocated in a format that always has a plane view"
    has_res = res is not None
    need_sums = param_grads or o.training
    renorm = a.save_rd.numel() > 0
    # Eval backward without parameter grads is one element-wise pass, planned like eval forward.
    op = "bwd_train" if o.training else ("bwd_eval" if need_sums else "fwd_eval")
    plan = _plan(op, view, x, [t for t in (x, dy, dx, res, dres) if t is not None])
    s_x, s_dy, s_dx = view.strides[0], view.strides[1], view.strides[2]
    s_res, s_dres = _strides(view, 3, has_res), _strides(view, 4, write_dres)
    params = (_contiguous(a.weight), _contiguous(a.bias), a.save_rd if renorm else None)
    common = dict(ACC=_tl(acc), HAS_W=a.weight is not None, HAS_B=a.bias is not None,
                  HAS_RES=has_res, ACT=o.act_code, RENORM=renorm, plan=plan)
    c_blocks = planner.cdiv(c, plan.block_c)
    slope = float(o.negative_slope)

    if plan.variant == "onepass" and o.group is None:
        _launch(bn_bwd_onepass_kernel, (c_blocks,), x, dy, dx, res, dres, a.save_mean,
                a.save_invstd, *params, dw, db, view.n, c, view.s, *s_x, *s_dy, *s_dx, *s_res,
                *s_dres, slope, TRAINING=o.training, WRITE_DRES=write_dres,
                SATURATE=o.saturate, **common)
        return

    n_tiles_s, n_tiles, per_split, splits = planner.grid_tiles(plan, view.n, view.s)
    part, part_splits, total = None, 0, float(view.n * view.s)
    if need_sums:
        part = torch.empty((2, splits, c), dtype=acc, device=x.device)
        _launch(bn_bwd_partial_kernel, (c_blocks, splits), x, dy, res, a.save_mean,
                a.save_invstd, *params, part, view.n, c, view.s, *s_x, *s_dy, *s_res, n_tiles_s,
                n_tiles, per_split, slope, **common)
        part_splits = splits
    write_sums = need_sums
    if o.group is not None:
        local = merge_partials(part, moments=False)           # this process's own sums
        db.copy_(local[0])
        r, d = (a.save_rd[0], a.save_rd[1]) if renorm else (1.0, 0.0)
        dw.copy_(r * local[1] + d * local[0])
        part = _sums_over_processes(local, view.n * view.s, o.group).reshape(2, 1, c)
        part_splits, total, write_sums = 1, 1.0, False      # the kernel gets means
    elif not need_sums:
        dw.zero_()
        db.zero_()
    if x.numel() == 0:
        return
    _launch(bn_bwd_apply_kernel, (c_blocks, splits), x, dy, dx, res, dres, a.save_mean,
            a.save_invstd, *params, part, dw, db, view.n, c, view.s, *s_x, *s_dy, *s_dx, *s_res,
            *s_dres, n_tiles_s, n_tiles, per_split, part_splits, total, slope,
            TRAINING=o.training, WRITE_SUMS=write_sums, WRITE_DRES=write_dres,
            SATURATE=o.saturate, **common)
