"""From a call's tensors to what its launches take: the canonical (N, C, S) view, the plan, and
the view's sizes and strides under the kernels' parameter names."""
from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import torch
import triton.language as tl
from torch._subclasses.fake_tensor import FakeTensor
from torch._subclasses.functional_tensor import FunctionalTensor

from .. import plan as planner
from ..layout import max_offset, plane_view

__all__ = ["acc_dtype", "tl_acc", "view_or_copy", "plan", "Planned", "plan_for", "geometry",
           "traced", "aligned16"]


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation and saved-statistics dtype: float32, or float64 for float64 activations."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def tl_acc(dtype: torch.dtype):
    """The kernels' ACC constant for statistics of ``dtype``."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def view_or_copy(x: torch.Tensor, others: list):
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


def traced(t: torch.Tensor) -> bool:
    """A tensor of a compiler's trace (a ``triton_op`` body traced by torch.compile): it has
    shapes, strides and offsets but no address, and its launches go into the graph."""
    return type(t) is not torch.Tensor and isinstance(t, (FakeTensor, FunctionalTensor))


def aligned16(t: torch.Tensor) -> bool:
    """16-byte aligned: by its address; a traced tensor, which has none, by its offset into a
    storage the compiler allocates aligned (Inductor copies a misaligned graph input to an
    aligned one before running the graph)."""
    if traced(t):
        return (t.storage_offset() * t.element_size()) % 16 == 0
    return t.data_ptr() % 16 == 0


def _aligned(view, x: torch.Tensor, tensors) -> bool:
    """Every activation pointer 16-byte aligned and every non-unit stride a multiple of 16
    bytes: the compiler can vectorize."""
    return _view_facts(view, x.element_size())[1] and all(aligned16(t) for t in tensors)


_plans: dict = {}   # the plans of the calls seen: a model makes a few dozen


def plan(op: str, view, x: torch.Tensor, tensors, tuned: bool = True,
         device: Optional[torch.device] = None) -> planner.Plan:
    """The plan of ``op`` for ``view`` of ``x`` (``tensors``: the activations, for alignment)."""
    aligned = _aligned(view, x, tensors)
    device = device or x.device
    key = (op, view, x.dtype, aligned, device, tuned, planner.state())
    found = _plans.get(key)
    if found is None:
        elem = x.element_size()
        found = planner.make_plan(op, view.n, view.c, view.s, view.channels_minor, elem,
                                  _view_facts(view, elem)[0], planner.device_info(device),
                                  aligned, dtype=_DTYPE_NAMES.get(x.dtype), tuned=tuned)
        if len(_plans) > 4096:
            _plans.clear()
        _plans[key] = found
    return found


class Planned(NamedTuple):
    view: object                # layout.PlaneView
    plan: planner.Plan
    aligned: bool


def plan_for(op: str, x: torch.Tensor, tuned: bool = True,
             device: Optional[torch.device] = None) -> Planned:
    """The plane view and the plan the launchers use for ``op`` on an input like ``x`` (a meta
    tensor will do, with the ``device`` to plan for); ``tuned=False``: the heuristic plan,
    ignoring the tuning table. What ``tritonbn info`` prints and ``tritonbn tune`` starts from."""
    view, x, _ = view_or_copy(x, [])
    return Planned(view, plan(op, view, x, [x], tuned, device), _aligned(view, x, [x]))


@functools.lru_cache(maxsize=1024)
def geometry(view, names: tuple) -> dict:
    """{size_n, size_c, size_s, stride_<name>n/c/s ...}: the sizes, and the strides of the view's tensors in
    order under the kernel's prefixes (``names``, e.g. ("x", "y", "r")); a tensor the view does
    not hold (no residual) gets None strides, which Triton makes constants."""
    out = {"size_n": view.n, "size_c": view.c, "size_s": view.s}
    for i, name in enumerate(names):
        strides = view.strides[i] if i < len(view.strides) else (None, None, None)
        out.update(zip((f"stride_{name}n", f"stride_{name}c", f"stride_{name}s"), strides))
    return out
