"""The launchers: the one place where a batch norm runs.

``forward`` and ``backward`` take the op's tensors (``ForwardArgs`` / ``BackwardArgs``) and its
``Options``, allocate the outputs, and run one of two backends behind the same steps:

* the Triton kernels, planned by tritonbn/plan.py (on a GPU, or on CPU tensors in the
  interpreter), launched through tritonbn/direct_launch.py;
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

from . import direct_launch
from . import plan as planner
from . import _runtime, reference
from ._runtime import uses_reference, warn_reference_path
from .layout import empty_output, max_offset, plane_view
from .options import UPDATED, BackwardArgs, ForwardArgs, Options

__all__ = ["LAUNCHES", "count_launches", "capture_launches", "acc_dtype", "plan_for", "Planned",
           "forward", "backward", "UPDATES", "COMPILE_OPTIONS"]

LAUNCHES: collections.Counter = collections.Counter()


@contextlib.contextmanager
def count_launches():
    """Yield a Counter of the kernel launches made inside the block (filled when it ends)."""
    before = LAUNCHES.copy()
    seen: collections.Counter = collections.Counter()
    try:
        yield seen
    finally:
        seen.update(LAUNCHES - before)


_captured: list | None = None


class LaunchArgs(tuple):
    """A recorded launch's arguments in the kernel's parameter order; ``groups`` says how many
    are pointers, integers and floats (the order every kernel declares them in)."""

    def __new__(cls, tensors: tuple, ints: tuple, floats: tuple):
        args = super().__new__(cls, (*tensors, *ints, *floats))
        args.groups = (tensors, ints, floats)
        return args


@contextlib.contextmanager
def capture_launches():
    """Record the launches the launchers would make instead of making them.

    Yields a list of (kernel, grid, args, kwargs), args a LaunchArgs. Used by the compile check
    to compile exactly the specializations real calls produce (tensors may be on the meta
    device), and by the launch-equivalence test.
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


def _run(name: str, grid: tuple, tensors: tuple, ints: tuple, floats: tuple,
         constants: direct_launch.Constants) -> None:
    """Launch (and count) kernel ``name`` -- compiled, or interpreted for CPU tensors (the first
    tensor's device decides) -- its arguments grouped as every kernel orders them; or record
    the launch while capture_launches is active."""
    kernel = getattr(_runtime.kernels_for(tensors[0].device), name)
    if _captured is not None:
        launch_kwargs = {k: v for k, v in constants.items() if k not in COMPILE_OPTIONS}
        _captured.append((kernel, grid, LaunchArgs(tensors, ints, floats), launch_kwargs))
        return
    direct_launch.launch(kernel, grid, tensors, ints, floats, constants)
    LAUNCHES[name] += 1


@functools.lru_cache(maxsize=4096)
def _constants(plan: Optional[planner.Plan], **constexprs) -> direct_launch.Constants:
    """A launch's compile-time constants and options, made once per (plan, constants)."""
    return direct_launch.Constants({**(plan.constants if plan is not None else {}),
                                    **constexprs, **COMPILE_OPTIONS})


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


_plans: dict = {}   # the plans of the calls seen: a model makes a few dozen


def _plan(op: str, view, x: torch.Tensor, tensors, tuned: bool = True,
          device: Optional[torch.device] = None) -> planner.Plan:
    aligned = _aligned(view, x, tensors)
    device = device or x.device
    key = (op, view, x.dtype, aligned, device, tuned, planner.state())
    plan = _plans.get(key)
    if plan is None:
        elem = x.element_size()
        plan = planner.make_plan(op, view.n, view.c, view.s, view.channels_minor, elem,
                                 _view_facts(view, elem)[0], planner.device_info(device),
                                 aligned, dtype=_DTYPE_NAMES.get(x.dtype), tuned=tuned)
        if len(_plans) > 4096:
            _plans.clear()
        _plans[key] = plan
    return plan


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


_NO_STRIDES = (None, None, None)


def _contiguous(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """Per-channel tensors are indexed flat by the kernels."""
    return t if t is None or t.is_contiguous() else t.contiguous()


# ---------------------------------------------------------------------- tensors the op updates

class _Updated:
    """How the kernels read and write one tensor the op updates, and how it gets back.

    ``read``: flat values before the call (a view of the caller's tensor, or a copy when its
    strides have no flat view). ``write``: where the kernels put the new values -- ``read``
    itself when they may update in place, else a new tensor (a copy of ``read`` for counters
    that accumulate). In place, a new tensor is copied into the caller's afterwards (strided or
    reshaped statistics, renorm); otherwise it is the op's ``new_<name>`` output.
    """

    __slots__ = ("given", "in_place", "read", "write")

    def __init__(self, given: torch.Tensor, updates: bool, in_place: bool,
                 accumulates: bool = False, separate: bool = False):
        self.given, self.in_place = given, in_place
        contiguous = given.is_contiguous()
        self.read = given if contiguous and given.dim() == 1 else given.contiguous().view(-1)
        if not updates:
            self.write = None
        elif in_place and contiguous and not separate:
            self.write = self.read          # the caller's own memory
        elif accumulates:
            self.write = self.read.clone()
        else:
            self.write = torch.empty_like(self.read)

    def unchanged(self) -> None:
        """The kernels did not run (an empty batch): the new values are the old ones."""
        if self.write is not None and self.write is not self.read:
            self.write.copy_(self.read)

    def finish(self) -> Optional[torch.Tensor]:
        """In place: write back when needed, return None. Else the ``new_<name>`` output, None
        when the op does not update this argument."""
        if not self.in_place:
            return self.write
        if self.write is not None and self.write is not self.read:
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


class _Updates:
    """The _Updated of each tensor of a call (None for absent ones), in UPDATED order, and their
    ``reads`` / ``writes`` (None for absent ones) as the kernels take them."""

    __slots__ = ("items", "reads", "writes")

    def __init__(self, a: ForwardArgs, o: Options, in_place: bool):
        # Renorm reads the running statistics of before this step in every program while the
        # first program of each channel block writes the new ones: never the same memory.
        separate = o.renorming
        self.items = tuple(
            None if given is None else _Updated(given, UPDATES[name](o), in_place,
                                                name.startswith("overflow"), separate)
            for name, given in zip(UPDATED, (a.running_mean, a.running_var, a.channel_batches,
                                             a.overflow_count, a.overflow_max)))
        self.reads = tuple(None if u is None else u.read for u in self.items)
        self.writes = tuple(None if u is None else u.write for u in self.items)

    def finish(self) -> tuple:
        return tuple(None if u is None else u.finish() for u in self.items)


_RM, _RV, _CB, _OC, _OM = range(5)      # positions in UPDATED
assert UPDATED == ("running_mean", "running_var", "channel_batches", "overflow_count",
                   "overflow_max")


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


def _sums_over_processes(local: torch.Tensor, count: int, name: str) -> torch.Tensor:
    """Local (2, C) sums -> (global sums / global count, as (2, C)): the means grad_input needs.
    The element count rides along in the same all_reduce: no host sync, nothing stashed."""
    with_count = torch.cat([local, local.new_full((1, local.shape[1]), float(count))])
    dist.all_reduce(with_count, group=_group(name))
    return with_count[:2] / with_count[2:].clamp(min=1.0)


def merge_partials(part: torch.Tensor, moments: bool) -> torch.Tensor:
    """(Q, K, C) partials -> (Q, C): Chan-merged moments (Q = 3) or summed sums (Q = 2), in a
    launch of its own (many splits, or the summaries synchronized processes exchange)."""
    q, k, c = part.shape
    out = torch.empty((q, c), dtype=part.dtype, device=part.device)
    # About 16 programs whatever C (a few KB of partials each), each loading MERGE_TILE
    # partials at once: 1,024 over 4 warps is 8 per thread and accumulator
    block_c = max(1, min(planner.pow2(c) // 16, 128))
    block_k = max(1, min(planner.pow2(k), planner.MERGE_TILE // block_c))
    _run("bn_merge_partials_kernel", (planner.cdiv(c, block_c),), (part, out), (c, k), (),
         _constants(None, MOMENTS=moments, ACC=_tl(part.dtype), BLOCK_K=block_k,
                    BLOCK_C=block_c, num_warps=4))
    return out


def _merged(part: torch.Tensor, plan: planner.Plan, moments: bool) -> torch.Tensor:
    """The partials as the apply kernel merges them: as they are when few, else merged first
    (one per channel, in a launch of its own)."""
    if part.shape[1] * plan.block_c <= planner.MERGE_IN_APPLY:
        return part
    return merge_partials(part, moments).unsqueeze(1)


# ---------------------------------------------------------------------------------- forward

def forward(a: ForwardArgs, o: Options, in_place: bool = True) -> tuple:
    """y = act(BN(x) + residual). Returns the op's outputs in FORWARD_OUTPUTS order:
    (y, save_mean, save_invstd, save_rd, new_running_mean, new_running_var,
    new_channel_batches, new_overflow_count, new_overflow_max). Statistics are float32 (float64
    for float64 input); save_rd is renorm's (2, C) r and d, or None. A ``new_`` output is a
    tensor with the updated values, None in place or when the op does not update that argument."""
    x = a.input
    c = x.shape[1]
    acc = torch.float64 if x.dtype is torch.float64 else torch.float32
    y = empty_output(x)
    save_mean = torch.empty(c, dtype=acc, device=x.device)
    save_invstd = torch.empty(c, dtype=acc, device=x.device)
    save_rd = torch.empty((2, c), dtype=acc, device=x.device) if o.renorming else None
    upd = _Updates(a, o, in_place)
    saves = (save_mean, save_invstd, save_rd)
    if x.numel() == 0 and o.group is None:
        # torch leaves the running statistics alone on an empty batch; nothing to normalize.
        for t in saves:
            if t is not None:
                t.zero_()
        for u in upd.items:
            if u is not None:
                u.unchanged()
    elif uses_reference(x):
        warn_reference_path()
        _reference_forward(a, o, y, saves, upd)
    else:
        _kernel_forward(a, o, y, saves, upd)
    return (y, *saves, *upd.finish())


def _reference_forward(a: ForwardArgs, o: Options, y, saves, upd: _Updates) -> None:
    """The same steps in float64 torch: local moments, [exchange], normalize."""
    x = a.input
    part = None
    if o.training:
        part = reference.moments(x).to(saves[0].dtype).unsqueeze(1)   # (3, 1, C)
        if o.group is not None:
            part = _gather_moments(part[:, 0], o.group)
    out = reference.forward_apply(a, o, part, upd.reads[_RM], upd.reads[_RV], upd.reads[_CB])
    y.copy_(reference.fit(out.y, y.dtype, o.saturate))
    for t, v in zip(saves, (out.mean, out.invstd, out.rd)):
        if t is not None:
            t.copy_(v)
    for i, value in ((_RM, out.new_mean), (_RV, out.new_var), (_CB, out.new_counts)):
        u = upd.items[i]
        if u is not None and u.write is not None:
            if value is None:
                u.unchanged()
            else:
                u.write.copy_(reference.fit(value, u.write.dtype, o.saturate))
    if a.overflow_count is not None:
        count, biggest = reference.overflow(out.y, y.dtype)
        upd.writes[_OC].add_(count)
        w = upd.writes[_OM]
        w.copy_(torch.maximum(w, biggest.to(w.dtype)))


class _ForwardSpec(NamedTuple):
    """What a forward's launches take that depends only on its plan and options (cached)."""
    onepass: direct_launch.Constants     # bn_fwd_onepass_kernel's constants
    stats: direct_launch.Constants       # bn_stats_partial_kernel's
    apply: direct_launch.Constants       # bn_fwd_apply_kernel's
    floats: tuple                        # (momentum, eps, slope, rmax, dmax)
    reads_batches: bool                  # the kernel reads the module's batch counter


@functools.lru_cache(maxsize=4096)
def _forward_spec(plan: planner.Plan, o: Options, acc64: bool, has_w: bool, has_b: bool,
                  has_res: bool, per_channel: bool, counting: bool, update: bool,
                  splits_p2: int, edges: bool, one_column: bool) -> _ForwardSpec:
    # momentum=None: the weight 1 / (batches + 1) from per-channel counts, else the module's
    cumulative = 0 if not (o.training and o.cumulative) else (2 if per_channel else 1)
    warmup = o.renorming and o.warmup_steps > 0
    rmax, dmax = o.renorm if o.renorming else (1.0, 0.0)
    acc = tl.float64 if acc64 else tl.float32
    flags = dict(ACC=acc, HAS_W=has_w, HAS_B=has_b, HAS_RES=has_res, ACT=o.act_code,
                 RENORM=o.renorming, WARMUP=warmup, SKIP_NONFINITE=o.skip_nonfinite,
                 CUMULATIVE=cumulative, SATURATE=o.saturate, COUNT_OVERFLOW=counting)
    return _ForwardSpec(
        _constants(plan, UPDATE_RUNNING=update, **flags),
        _constants(plan, ACC=acc, EDGES=edges, ONE_COLUMN=one_column),
        _constants(plan, TRAINING=o.training, UPDATE_RUNNING=update, SPLITS_P2=splits_p2,
                   **flags),
        (float(o.momentum), float(o.eps), float(o.negative_slope), float(rmax), float(dmax)),
        cumulative == 1 or warmup)


def _edges(plan: planner.Plan, view) -> tuple[bool, bool]:
    """(EDGES, ONE_COLUMN) of the statistics kernel: whether some tile has rows outside the
    plane, and whether one tile column spans every position (its lanes past S always off)."""
    one_column = plan.block_s >= view.s
    return bool(view.n % plan.block_n or (not one_column and view.s % plan.block_s)), one_column


def _splits_p2(splits: int, plan: planner.Plan, o: Options) -> int:
    """SPLITS_P2 of the apply kernel: the power of two that holds the partials it merges --
    the splits themselves, one after a merge launch, the processes' when synchronized."""
    if o.group is not None:
        return planner.pow2(dist.get_world_size(_group(o.group)))
    return planner.pow2(splits) if splits * plan.block_c <= planner.MERGE_IN_APPLY else 1


def _kernel_forward(a: ForwardArgs, o: Options, y, saves, upd: _Updates) -> None:
    x, residual = a.input, a.residual
    save_mean, save_invstd, save_rd = saves
    c = x.shape[1]
    view, x, others = _view_or_copy(x, [y, residual])
    assert others[0] is y, "outputs are allocated in a format that always has a plane view"
    res = others[1]
    has_res = res is not None
    plan = _plan("fwd_train" if o.training else "fwd_eval", view, x,
                 (x, y, res) if has_res else (x, y))
    sizes = (view.n, c, view.s, *view.strides[0], *view.strides[1],
             *(view.strides[2] if has_res else _NO_STRIDES))
    reads, writes = upd.reads, upd.writes
    c_blocks = planner.cdiv(c, plan.block_c)
    onepass = o.training and plan.variant == "onepass" and o.group is None
    part = None
    if not onepass:
        # An empty batch in a synchronized step still finalizes the shared statistics (so
        # every process updates its running statistics alike): one program and no tiles.
        n_tiles_s, n_tiles, per_split, splits = planner.grid_tiles(plan, view.n, view.s)
        if o.training:
            part = torch.empty((3, splits, c), dtype=save_mean.dtype, device=x.device)
    spec = _forward_spec(plan, o, save_mean.dtype is torch.float64, a.weight is not None,
                         a.bias is not None, has_res, reads[_CB] is not None,
                         a.overflow_count is not None, o.training and reads[_RM] is not None,
                         1 if part is None else _splits_p2(part.shape[1], plan, o),
                         *_edges(plan, view))
    tensors = (reads[_RM], reads[_RV], writes[_RM], writes[_RV],
               a.batches if spec.reads_batches else None, reads[_CB], writes[_CB],
               _contiguous(a.weight), _contiguous(a.bias), save_mean, save_invstd, save_rd,
               writes[_OC], writes[_OM])

    if onepass:
        _run("bn_fwd_onepass_kernel", (c_blocks,), (x, y, res, *tensors),
             (*sizes, o.warmup_steps), spec.floats, spec.onepass)
        return
    if part is not None:
        _run("bn_stats_partial_kernel", (c_blocks, splits), (x, part),
             (*sizes[:6], n_tiles_s, n_tiles, per_split), (), spec.stats)
        if o.group is not None:
            part = _gather_moments(merge_partials(part, moments=True), o.group)
        else:
            part = _merged(part, plan, moments=True)
    _run("bn_fwd_apply_kernel", (c_blocks, splits), (x, y, res, part, *tensors),
         (*sizes, n_tiles_s, n_tiles, per_split, 0 if part is None else part.shape[1],
          o.warmup_steps), spec.floats, spec.apply)


# --------------------------------------------------------------------------------- backward

def backward(a: BackwardArgs, o: Options, param_grads: bool) -> tuple:
    """Backward of y = act(BN(x) + residual): (grad_input, grad_weight, grad_bias,
    grad_residual). Parameter gradients are in the statistics' dtype; grad_residual is None
    without an activation (it is grad_output itself). With ``Options.group`` grad_input uses the
    sums over every process's batch; grad_weight / grad_bias stay this process's own, as in
    torch (DistributedDataParallel averages them)."""
    x, residual = a.input, a.residual
    c = x.shape[1]
    acc = a.save_mean.dtype
    dx = empty_output(x)
    dres = empty_output(residual) if residual is not None and o.activation is not None else None
    dw = torch.empty(c, dtype=acc, device=x.device)
    db = torch.empty(c, dtype=acc, device=x.device)
    if x.numel() == 0 and o.group is None:
        dw.zero_()
        db.zero_()
    elif uses_reference(x):
        warn_reference_path()
        _reference_backward(a, o, dx, dw, db, dres)
    else:
        _kernel_backward(a, o, param_grads, dx, dw, db, dres)
    return dx, dw, db, dres


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


class _BackwardSpec(NamedTuple):
    """What a backward's launches take that depends only on its plan and options (cached)."""
    onepass: direct_launch.Constants     # bn_bwd_onepass_kernel's constants
    partial: direct_launch.Constants     # bn_bwd_partial_kernel's
    apply: direct_launch.Constants       # bn_bwd_apply_kernel's
    slope: tuple                         # (negative_slope,)


@functools.lru_cache(maxsize=4096)
def _backward_spec(plan: planner.Plan, o: Options, acc64: bool, has_w: bool, has_b: bool,
                   has_res: bool, renorm: bool, write_dres: bool, write_sums: bool,
                   splits_p2: int) -> _BackwardSpec:
    flags = dict(ACC=tl.float64 if acc64 else tl.float32, HAS_W=has_w, HAS_B=has_b,
                 HAS_RES=has_res, ACT=o.act_code, RENORM=renorm)
    return _BackwardSpec(
        _constants(plan, TRAINING=o.training, WRITE_DRES=write_dres, SATURATE=o.saturate,
                   **flags),
        _constants(plan, **flags),
        _constants(plan, TRAINING=o.training, WRITE_SUMS=write_sums, WRITE_DRES=write_dres,
                   SATURATE=o.saturate, SPLITS_P2=splits_p2, **flags),
        (float(o.negative_slope),))


def _kernel_backward(a: BackwardArgs, o: Options, param_grads: bool, dx, dw, db, dres) -> None:
    x, residual, dy = a.input, a.residual, a.grad_output
    c = x.shape[1]
    write_dres = dres is not None
    view, x, others = _view_or_copy(x, [dy, dx, residual, dres])
    dy, res = others[0], others[2]
    assert others[1] is dx and others[3] is dres, \
        "outputs are allocated in a format that always has a plane view"
    has_res = res is not None
    need_sums = param_grads or o.training
    rd = a.save_rd if a.save_rd is not None and a.save_rd.numel() else None
    # Eval backward without parameter grads is one element-wise pass, planned like eval forward.
    op = "bwd_train" if o.training else ("bwd_eval" if need_sums else "fwd_eval")
    plan = _plan(op, view, x, [t for t in (x, dy, dx, res, dres) if t is not None])
    strides = (*view.strides[0], *view.strides[1], *view.strides[2],
               *(view.strides[3] if has_res else _NO_STRIDES),
               *(view.strides[4] if write_dres else _NO_STRIDES))
    params = (a.save_mean, a.save_invstd, _contiguous(a.weight), _contiguous(a.bias), rd)
    synchronized = o.group is not None
    c_blocks = planner.cdiv(c, plan.block_c)
    onepass = plan.variant == "onepass" and not synchronized
    splits_p2 = 1
    if not onepass:
        n_tiles_s, n_tiles, per_split, splits = planner.grid_tiles(plan, view.n, view.s)
        if need_sums and not synchronized:
            splits_p2 = planner.pow2(splits) if splits * plan.block_c <= planner.MERGE_IN_APPLY \
                else 1
    spec = _backward_spec(plan, o, a.save_mean.dtype is torch.float64, a.weight is not None,
                          a.bias is not None, has_res, rd is not None, write_dres,
                          need_sums and not synchronized, splits_p2)

    if onepass:
        _run("bn_bwd_onepass_kernel", (c_blocks,), (x, dy, dx, res, dres, *params, dw, db),
             (view.n, c, view.s, *strides), spec.slope, spec.onepass)
        return

    part, total = None, float(view.n * view.s)
    if need_sums:
        part = torch.empty((2, splits, c), dtype=a.save_mean.dtype, device=x.device)
        _run("bn_bwd_partial_kernel", (c_blocks, splits), (x, dy, res, *params, part),
             (view.n, c, view.s, *strides[:6], *strides[9:12], n_tiles_s, n_tiles, per_split),
             spec.slope, spec.partial)
    if synchronized:
        local = merge_partials(part, moments=False)           # this process's own sums
        db.copy_(local[0])
        r, d = (rd[0], rd[1]) if rd is not None else (1.0, 0.0)
        dw.copy_(r * local[1] + d * local[0])
        part = _sums_over_processes(local, view.n * view.s, o.group).reshape(2, 1, c)
        total = 1.0                                           # the kernel gets means
    elif need_sums:
        part = _merged(part, plan, moments=False)
    else:
        dw.zero_()
        db.zero_()
    if x.numel() == 0:
        return
    _run("bn_bwd_apply_kernel", (c_blocks, splits), (x, dy, dx, res, dres, *params, part, dw, db),
         (view.n, c, view.s, *strides, n_tiles_s, n_tiles, per_split,
          0 if part is None else part.shape[1]), (total, *spec.slope), spec.apply)
