"""The backward launcher: grad_input (and the residual's gradient through the activation),
grad_weight, grad_bias -- by the kernels, or by the float64 reference for CPU tensors when
asked.

A plane that fits one tile: one launch (``bn_bwd_onepass_kernel``). Else the partial kernel
writes per-split sums of dz and dz * x_hat, [merged once per channel when many; all-reduced
over the processes when synchronized], and the apply kernel finishes them into grad_weight /
grad_bias and computes grad_input.
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import torch

from .. import direct_launch, reference
from .. import plan as planner
from .._runtime import uses_reference, warn_reference_path
from ..layout import empty_output
from ..options import BackwardArgs, Options
from . import run
from .merge import merge_partials, sums_over_processes
from .planning import geometry, plan as make_plan, tl_acc, traced, view_or_copy
from .run import constants

__all__ = ["backward"]


def backward(a: BackwardArgs, o: Options, param_grads: bool) -> tuple:
    """Backward of y = act(BN(x) + residual): (grad_input, grad_weight, grad_bias,
    grad_residual). Parameter gradients are in the statistics' dtype; grad_residual is None
    without an activation (it is grad_output itself). With ``Options.group`` grad_input uses the
    sums over every process's batch; grad_weight / grad_bias stay this process's own, as in
    torch (DistributedDataParallel averages them)."""
    x, residual = a.input, a.residual
    c = x.shape[1]
    dx = empty_output(x)
    dres = empty_output(residual) if residual is not None and o.activation is not None else None
    dw = a.save_mean.new_empty(c)           # (the statistics' dtype and device)
    db = a.save_mean.new_empty(c)
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
        means = sums_over_processes(sums.to(dw.dtype), count, o.group).double()
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


@functools.lru_cache(maxsize=4096)
def _backward_spec(plan: planner.Plan, o: Options, acc64: bool, has_w: bool, has_b: bool,
                   has_res: bool, renorm: bool, write_dres: bool, write_sums: bool,
                   splits_p2: int) -> _BackwardSpec:
    flags = dict(ACC=tl_acc(torch.float64 if acc64 else torch.float32), HAS_W=has_w,
                 HAS_B=has_b, HAS_RES=has_res, ACT=o.act_code, INVERTIBLE=o.invertible,
                 RENORM=renorm)
    return _BackwardSpec(
        constants(plan, TRAINING=o.training, WRITE_DRES=write_dres, SATURATE=o.saturate,
                  **flags),
        constants(plan, **flags),
        constants(plan, TRAINING=o.training, WRITE_SUMS=write_sums, WRITE_DRES=write_dres,
                  SATURATE=o.saturate, SPLITS_P2=splits_p2, **flags))


_BACKWARD_STRIDES = ("x", "dy", "dx", "r", "dr")   # input, its gradient in and out, residual's


class _BackwardCall(NamedTuple):
    """A backward's launches for one kind of call: everything but its tensors (``_calls``)."""
    copies: bool                         # x, dy or the residual has no plane view: copies
    onepass: Optional[run.Launch]        # the one launch of a one-pass plan, or None:
    partial: Optional[run.Launch]        # the sums' launch (training, or parameter grads)
    part_shape: tuple                    # (2, splits, C): its partials
    merge: bool                          # merged in a launch of their own before apply
    apply: Optional[run.Launch]          # the apply launch (None for an empty input)
    count: int                           # elements per channel (synchronized sums)


# (options, parameter grads wanted, x / dy / residual shapes, strides, dtypes, alignment,
# the other tensors' dtypes or absence, planner.state()) -> _BackwardCall
_calls = run.kept_calls()


def _kernel_backward(a: BackwardArgs, o: Options, param_grads: bool, dx, dw, db, dres) -> None:
    x, residual, dy, w, b = a.input, a.residual, a.grad_output, a.weight, a.bias
    rd = a.save_rd if a.save_rd is not None and a.save_rd.numel() else None
    if type(x) is not torch.Tensor and traced(x):   # a triton_op body being traced:
        # once per compile, nothing to keep
        call = _backward_call(a, o, param_grads, dx, dres, rd)
    else:
        key = (o, param_grads, x.shape, x.stride(), x.dtype, x.device, x.data_ptr() % 16 == 0,
               dy.stride(), dy.dtype, dy.data_ptr() % 16 == 0,
               None if residual is None else (residual.stride(), residual.dtype,
                                              residual.data_ptr() % 16 == 0),
               # (every pointer's dtype, or None when absent: what run.Launch's site requires)
               None if w is None else w.dtype, None if b is None else b.dtype,
               rd is not None, a.save_mean.dtype, a.save_invstd.dtype,
               planner.state())
        call = _calls.get(key) or run.kept(_calls, key, _backward_call, a, o, param_grads,
                                           dx, dres, rd)
    if call.copies:
        _, x, (dy, _, residual, _) = view_or_copy(x, [dy, dx, residual, dres])
    pointers = {
        "X": x, "DY": dy, "DX": dx, "RES": residual, "DRES": dres,
        "MEAN": a.save_mean, "INVSTD": a.save_invstd,
        "W": w if w is None or w.is_contiguous() else w.contiguous(),   # indexed flat
        "B": b if b is None or b.is_contiguous() else b.contiguous(),
        "SAVE_RD": rd, "DW": dw, "DB": db,
        "PART": None}
    if call.onepass is not None:
        call.onepass(pointers)
        return
    if call.partial is not None:
        part = pointers["PART"] = torch.empty(call.part_shape, dtype=a.save_mean.dtype,
                                              device=x.device)
        call.partial(pointers)          # writes the partials; apply reads them below
        if o.group is not None:
            local = merge_partials(part, moments=False)       # this process's own sums
            db.copy_(local[0])
            r, d = (rd[0], rd[1]) if rd is not None else (1.0, 0.0)
            dw.copy_(r * local[1] + d * local[0])
            pointers["PART"] = sums_over_processes(local, call.count, o.group).reshape(
                2, 1, x.shape[1])
        elif call.merge:
            pointers["PART"] = merge_partials(part, moments=False).unsqueeze(1)
    else:
        dw.zero_()
        db.zero_()
    if call.apply is not None:
        call.apply(pointers)


def _backward_call(a: BackwardArgs, o: Options, param_grads: bool, dx, dres,
                   rd) -> _BackwardCall:
    """Plan a kind of backward call and bind its launches' sizes, strides, scalars and
    constants (what ``_calls`` keeps)."""
    x, residual, dy = a.input, a.residual, a.grad_output
    c = x.shape[1]
    write_dres = dres is not None
    view, x_view, others = view_or_copy(x, [dy, dx, residual, dres])
    assert others[1] is dx and others[3] is dres, \
        "outputs are allocated in a format that always has a plane view"
    copies = x_view is not x or others[0] is not dy or others[2] is not residual
    res = others[2]
    need_sums = param_grads or o.training
    # Eval backward without parameter grads is one element-wise pass, planned like eval forward.
    op = "bwd_train" if o.training else ("bwd_eval" if need_sums else "fwd_eval")
    plan = make_plan(op, view, x_view,
                     [t for t in (x_view, others[0], dx, res, dres) if t is not None])
    synchronized = o.group is not None
    c_blocks = planner.cdiv(c, plan.block_c)
    onepass = plan.variant == "onepass" and not synchronized
    scalars = {"slope": float(o.negative_slope), "eps": float(o.eps),
               **geometry(view, _BACKWARD_STRIDES)}
    splits_p2, splits, merge = 1, 1, False
    if not onepass:
        n_tiles_s, n_tiles, per_split, splits = planner.grid_tiles(plan, view.n, view.s)
        scalars.update(n_tiles_s=n_tiles_s, n_tiles=n_tiles, tiles_per_split=per_split)
        if need_sums and not synchronized:
            few = splits * plan.block_c <= planner.MERGE_IN_APPLY
            # apply merges the splits' sums itself when few, else one launch merges them
            splits_p2, merge = (planner.pow2(splits), False) if few else (1, True)
    spec = _backward_spec(plan, o, a.save_mean.dtype is torch.float64, a.weight is not None,
                          a.bias is not None, res is not None, rd is not None, write_dres,
                          need_sums and not synchronized, splits_p2)
    if onepass:
        return _BackwardCall(copies, run.Launch("bn_bwd_onepass_kernel", (c_blocks,), scalars,
                                                spec.onepass),
                             None, (), False, None, 0)
    grid = (c_blocks, splits)
    partial = run.Launch("bn_bwd_partial_kernel", grid, scalars, spec.partial) \
        if need_sums else None
    n_part_splits = 0 if not need_sums else 1 if (merge or synchronized) else splits
    # the kernel gets sums (and divides) or, synchronized, the means over every process
    scalars.update(n_part_splits=n_part_splits,
                   total_count=1.0 if synchronized else float(view.n * view.s))
    apply = run.Launch("bn_bwd_apply_kernel", grid, scalars, spec.apply) \
        if x.numel() else None
    return _BackwardCall(copies, None, partial, (2, splits, c), merge, apply, view.n * view.s)
