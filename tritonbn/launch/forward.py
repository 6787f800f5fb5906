"""The forward launcher: y = act(BN(x) + residual), statistics saved, running statistics and
counters updated -- by the kernels, or by the float64 reference for CPU tensors when asked.

Training with a plan whose plane fits one tile: one launch (``bn_fwd_onepass_kernel``). Else
the statistics kernel writes per-split partials, [the merge kernel merges many of them; a
synchronized call gathers every process's], and the apply kernel merges what is left, finishes
the statistics, updates the running ones and normalizes.
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import torch

from .. import direct_launch, reference
from .. import plan as planner
from .._runtime import uses_reference, warn_reference_path
from ..layout import empty_output
from ..options import ForwardArgs, Options
from . import run
from .merge import gather_moments, merge_partials, world_size
from .planning import geometry, plan as make_plan, tl_acc, traced, view_or_copy
from .run import constants
from .updates import Updates

__all__ = ["forward"]


def forward(a: ForwardArgs, o: Options, in_place: bool = True,
            out: Optional[torch.Tensor] = None) -> tuple:
    """y = act(BN(x) + residual), into ``out`` when given (x itself, for in-place activated batch
    norm: every element is read before it is written, by the same program; x must then have a
    plane view, ``layout.plane_view``). Returns the op's outputs in FORWARD_OUTPUTS order:
    (y, save_mean, save_invstd, save_rd, new_running_mean, new_running_var,
    new_running_count, new_overflow_count, new_overflow_max). Statistics are float32 (float64
    for float64 input); save_rd is renorm's (2, C) r and d, or None. A ``new_`` output is a
    tensor with the updated values, None in place or when the op does not update that argument."""
    x = a.input
    c = x.shape[1]
    acc = torch.float64 if x.dtype is torch.float64 else torch.float32
    y = empty_output(x) if out is None else out
    save_mean = x.new_empty(c) if x.dtype is acc else torch.empty(c, dtype=acc, device=x.device)
    save_invstd = save_mean.new_empty(c)
    save_rd = save_mean.new_empty((2, c)) if o.renorming else None
    upd = Updates(a, o, in_place)
    saves = (save_mean, save_invstd, save_rd)
    if x.numel() == 0 and o.group is None:
        # torch leaves the running statistics alone on an empty batch; nothing to normalize.
        for t in saves:
            if t is not None:
                t.zero_()
        upd.unchanged()
    elif uses_reference(x):
        warn_reference_path()
        _reference_forward(a, o, y, saves, upd)
    else:
        _kernel_forward(a, o, y, saves, upd)
    return (y, *saves, *upd.finish(out))


def _reference_forward(a: ForwardArgs, o: Options, y, saves, upd: Updates) -> None:
    """The same steps in float64 torch: local moments, [exchange], normalize."""
    x = a.input
    part = None
    if o.training:
        part = reference.moments(x).to(saves[0].dtype).unsqueeze(1)   # (3, 1, C)
        if o.group is not None:
            part = gather_moments(part[:, 0], o.group)
    reads = upd.reads
    out = reference.forward_apply(a, o, part, reads["running_mean"], reads["running_var"],
                                  reads["running_count"])
    y.copy_(reference.fit(out.y, y.dtype, o.saturate))
    for t, v in zip(saves, (out.mean, out.invstd, out.rd)):
        if t is not None:
            t.copy_(v)
    for name, value in (("running_mean", out.new_mean), ("running_var", out.new_var),
                        ("running_count", out.new_count)):
        write, u = upd.writes[name], upd.items[name]
        if write is not None:
            if value is None:
                if u is not None:
                    u.unchanged()
            else:
                write.copy_(reference.fit(value, write.dtype, o.saturate))
    if a.overflow_count is not None:
        count, biggest = reference.overflow(out.y, y.dtype)
        upd.writes["overflow_count"].add_(count)
        w = upd.writes["overflow_max"]
        w.copy_(torch.maximum(w, biggest.to(w.dtype)))


class _ForwardSpec(NamedTuple):
    """What a forward's launches take that depends only on its plan and options (cached)."""
    onepass: direct_launch.Constants     # bn_fwd_onepass_kernel's constants
    stats: direct_launch.Constants       # bn_stats_partial_kernel's
    apply: direct_launch.Constants       # bn_fwd_apply_kernel's
    floats: dict                         # momentum, eps, slope, rmax, dmax
    reads_batches: bool                  # the kernel reads the module's batch counter


@functools.lru_cache(maxsize=4096)
def _forward_spec(plan: planner.Plan, o: Options, acc64: bool, has_w: bool, has_b: bool,
                  has_res: bool, per_channel: bool, counting: bool, update: bool,
                  splits_p2: int, edges: bool, one_column: bool) -> _ForwardSpec:
    # momentum=None: the weight 1 / (batches + 1) from per-channel counts, else the module's
    cumulative = 0 if not (o.training and o.cumulative) else (2 if per_channel else 1)
    warmup = o.renorming and o.warmup_steps > 0
    rmax, dmax = o.renorm if o.renorming else (1.0, 0.0)
    acc = tl_acc(torch.float64 if acc64 else torch.float32)
    flags = dict(ACC=acc, HAS_W=has_w, HAS_B=has_b, HAS_RES=has_res, ACT=o.act_code,
                 INVERTIBLE=o.invertible,
                 RENORM=o.renorming, WARMUP=warmup, SKIP_NONFINITE=o.skip_nonfinite,
                 CUMULATIVE=cumulative, SATURATE=o.saturate, COUNT_OVERFLOW=counting)
    return _ForwardSpec(
        constants(plan, UPDATE_RUNNING=update, **flags),
        constants(plan, ACC=acc, EDGES=edges, ONE_COLUMN=one_column),
        constants(plan, TRAINING=o.training, UPDATE_RUNNING=update, SPLITS_P2=splits_p2,
                  **flags),
        dict(momentum=0.0 if o.cumulative else o.momentum, eps=float(o.eps), slope=float(o.negative_slope),
             rmax=float(rmax), dmax=float(dmax)),
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
        return planner.pow2(world_size(o.group))
    return planner.pow2(splits) if splits * plan.block_c <= planner.MERGE_IN_APPLY else 1


_FORWARD_STRIDES = ("x", "y", "r")      # the view's tensors: input, output, residual


class _ForwardCall(NamedTuple):
    """A forward's launches for one kind of call: everything but its tensors (``_calls``)."""
    copies: bool                         # x or the residual has no plane view: contiguous copies
    onepass: Optional[run.Launch]        # the one launch of a one-pass plan, or None:
    stats: Optional[run.Launch]          # the statistics launch (training)
    part_shape: tuple                    # (3, splits, C): its partials
    merge: bool                          # merged in a launch of their own before apply
    apply: Optional[run.Launch]          # the apply launch
    reads_batches: bool                  # the kernels read the module's batch counter


# (options, x's shape / strides / dtype / device / alignment, the residual's, the other
# tensors' dtypes or absence, planner.state()) -> _ForwardCall. A model makes a few dozen.
_calls = run.kept_calls()


def _kernel_forward(a: ForwardArgs, o: Options, y, saves, upd: Updates) -> None:
    x, res, w, b = a.input, a.residual, a.weight, a.bias
    reads, writes = upd.reads, upd.writes
    if type(x) is not torch.Tensor and traced(x):   # a triton_op body being traced:
        # once per compile, nothing to keep
        call = _forward_call(a, o, y, saves[0], reads)
    else:
        key = (o, x.shape, x.stride(), x.dtype, x.device, x.data_ptr() % 16 == 0, y is x,
               None if res is None else (res.stride(), res.dtype, res.data_ptr() % 16 == 0),
               # (every pointer's dtype, or None when absent: what run.Launch's site requires)
               None if w is None else w.dtype, None if b is None else b.dtype,
               None if (rm := reads["running_mean"]) is None else (rm.dtype,
                                                                   reads["running_var"].dtype),
               reads["running_count"] is not None, a.overflow_count is not None,
               # a group's name outlives it: a new default group of another size is "0" too
               None if o.group is None else world_size(o.group), planner.state())
        call = _calls.get(key) or run.kept(_calls, key, _forward_call, a, o, y, saves[0],
                                           reads)
    if call.copies:
        _, x, (_, res) = view_or_copy(x, [y, res])
    save_mean, save_invstd, save_rd = saves
    pointers = {
        "X": x, "Y": y, "RES": res,
        "RUN_MEAN": reads["running_mean"], "RUN_VAR": reads["running_var"],
        "NEW_MEAN": writes["running_mean"], "NEW_VAR": writes["running_var"],
        "BATCHES": a.batches if call.reads_batches else None,
        "RUNNING_COUNT": reads["running_count"], "NEW_RUNNING_COUNT": writes["running_count"],
        "W": w if w is None or w.is_contiguous() else w.contiguous(),   # indexed flat
        "B": b if b is None or b.is_contiguous() else b.contiguous(),
        "SAVE_MEAN": save_mean, "SAVE_INVSTD": save_invstd, "SAVE_RD": save_rd,
        "OVF_COUNT": writes["overflow_count"], "OVF_MAX": writes["overflow_max"], "PART": None}
    if call.onepass is not None:
        call.onepass(pointers)
        return
    if call.stats is not None:
        part = pointers["PART"] = torch.empty(call.part_shape, dtype=save_mean.dtype,
                                              device=x.device)
        call.stats(pointers)            # writes the partials; apply reads them below
        if o.group is not None:
            pointers["PART"] = gather_moments(merge_partials(part, moments=True), o.group)
        elif call.merge:
            pointers["PART"] = merge_partials(part, moments=True).unsqueeze(1)
    call.apply(pointers)


def _forward_call(a: ForwardArgs, o: Options, y, save_mean, reads) -> _ForwardCall:
    """Plan a kind of forward call and bind its launches' sizes, strides, scalars and
    constants (what ``_calls`` keeps)."""
    x, residual = a.input, a.residual
    c = x.shape[1]
    view, x_view, others = view_or_copy(x, [y, residual])
    assert others[0] is y, "outputs are allocated in a format that always has a plane view"
    res = others[1]
    copies = x_view is not x or res is not residual
    has_res = res is not None
    plan = make_plan("fwd_train" if o.training else "fwd_eval", view, x_view,
                     (x_view, y, res) if has_res else (x_view, y))
    c_blocks = planner.cdiv(c, plan.block_c)
    onepass = o.training and plan.variant == "onepass" and o.group is None
    part_shape, splits, n_part_splits, merge = (), 1, 0, False
    scalars = {"warmup_steps": o.warmup_steps, **geometry(view, _FORWARD_STRIDES)}
    if not onepass:
        # An empty batch in a synchronized step still finalizes the shared statistics (so
        # every process updates its running statistics alike): one program and no tiles.
        n_tiles_s, n_tiles, per_split, splits = planner.grid_tiles(plan, view.n, view.s)
        scalars.update(n_tiles_s=n_tiles_s, n_tiles=n_tiles, tiles_per_split=per_split)
        if o.training:
            part_shape = (3, splits, c)
            # apply merges the splits' partials itself when few, else one launch merges them
            merge = o.group is None and splits * plan.block_c > planner.MERGE_IN_APPLY
            n_part_splits = world_size(o.group) if o.group is not None else \
                1 if merge else splits
    spec = _forward_spec(plan, o, save_mean.dtype is torch.float64, a.weight is not None,
                         a.bias is not None, has_res, reads["running_count"] is not None,
                         a.overflow_count is not None,
                         o.training and reads["running_mean"] is not None,
                         1 if not part_shape else _splits_p2(splits, plan, o),
                         *_edges(plan, view))
    scalars.update(spec.floats, n_part_splits=n_part_splits)
    if onepass:
        return _ForwardCall(copies, run.Launch("bn_fwd_onepass_kernel", (c_blocks,), scalars,
                                               spec.onepass),
                            None, (), False, None, spec.reads_batches)
    grid = (c_blocks, splits)
    stats = run.Launch("bn_stats_partial_kernel", grid, scalars, spec.stats) \
        if part_shape else None
    return _ForwardCall(copies, None, stats, part_shape, merge,
                        run.Launch("bn_fwd_apply_kernel", grid, scalars, spec.apply),
                        spec.reads_batches)
