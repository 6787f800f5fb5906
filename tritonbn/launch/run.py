"""Running one kernel: its arguments bound by name, counted, or recorded instead.

Every launcher names each runtime argument of a kernel by its parameter name (``X=x``,
``stride_xn=...``); ``KernelSignature`` reads, once per kernel, the order its own signature
declares them in -- pointers (upper-case names), integers, floats (annotated ``tl.float64``),
then compile-time constants, which kernels/ keeps as a rule and this module checks -- and turns
the names into the grouped tuples the direct launcher packs. No call site keeps positions.
"""
from __future__ import annotations

import collections
import contextlib
import functools
import inspect
import operator
from typing import Mapping, Optional

import torch
import triton.language as tl
from torch.library import wrap_triton

from .. import _runtime, direct_launch
from .. import plan as planner
from .planning import traced

__all__ = ["LAUNCHES", "count_launches", "capture_launches", "LaunchArgs", "COMPILE_OPTIONS",
           "KernelSignature", "signature", "Launch", "run", "constants", "kept_calls", "kept",
           "forget_calls"]

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

    Yields a list of (kernel, grid, args, kwargs), args a LaunchArgs. Used by ``tritonbn tune
    --model`` to find a model's shapes on the meta device, and by the tests and the compile
    check to see exactly the specializations real calls produce.
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

_KINDS = ("pointer", "int", "float", "constexpr")


def _kind(p: inspect.Parameter) -> str:
    if p.annotation is tl.constexpr:
        return "constexpr"
    if p.annotation is tl.float64 or p.annotation is tl.float32:
        return "float"
    return "pointer" if p.name[0].isupper() else "int"


def _getter(names: tuple):
    """names -> a function of a mapping returning their values as a tuple (C speed)."""
    if not names:
        return lambda _args: ()
    if len(names) == 1:
        name = names[0]
        return lambda args: (args[name],)
    return operator.itemgetter(*names)


class KernelSignature:
    """A kernel's runtime parameters by kind, in its own order, read from its signature."""

    __slots__ = ("name", "pointers", "ints", "floats", "constexprs", "_take")

    def __init__(self, fn):
        params = list(inspect.signature(fn).parameters.values())
        kinds = [_kind(p) for p in params]
        if kinds != sorted(kinds, key=_KINDS.index):
            raise TypeError(f"{fn.__name__}: parameters must come as pointers (upper-case), "
                            f"integers, floats (tl.float64), then tl.constexpr: {kinds}")
        self.name = fn.__name__
        self.pointers, self.ints, self.floats, self.constexprs = (
            tuple(p.name for p, k in zip(params, kinds) if k == kind) for kind in _KINDS)
        self._take = tuple(_getter(g) for g in (self.pointers, self.ints, self.floats))

    def bind(self, args: Mapping) -> tuple[tuple, tuple, tuple]:
        """(pointers, ints, floats) from {parameter name: value}. Every runtime parameter must
        be named (KeyError); other names are ignored, so launchers may hand several kernels
        one mapping (a backward's geometry holds strides its partial kernel does not take)."""
        take_p, take_i, take_f = self._take
        return take_p(args), take_i(args), take_f(args)


_signatures: dict[str, KernelSignature] = {}


def signature(name: str) -> KernelSignature:
    """The signature of kernel ``name`` (the same for its compiled and interpreted forms)."""
    found = _signatures.get(name)
    if found is None:
        found = _signatures[name] = KernelSignature(
            getattr(_runtime.kernels_for(torch.device("meta")), name).fn)
    return found


class Launch:
    """One launch of kernel ``name`` with its grid, integers, floats and constants bound once,
    from ``args`` by parameter name; calling it with {pointer name: tensor} launches it (and
    counts it), or records it while capture_launches is active.

    The launchers keep these per kind of call (forward.py, backward.py): everything a launch
    takes but its tensors depends only on the call's shapes, strides, dtypes and options, so a
    call repeated with new tensors binds only its pointers. Their keys pin every pointer's
    dtype and which pointers are None, as the Site each Launch launches through requires."""

    __slots__ = ("name", "grid", "ints", "floats", "consts", "_pointers", "_site")

    def __init__(self, name: str, grid: tuple, args: Mapping, consts: direct_launch.Constants):
        take_pointers, take_ints, take_floats = signature(name)._take
        self.ints, self.floats = take_ints(args), take_floats(args)
        self.name, self.grid, self.consts, self._pointers = name, grid, consts, take_pointers
        self._site: Optional[direct_launch.Site] = None     # made at the first launch

    def __call__(self, pointers: Mapping) -> None:
        tensors = self._pointers(pointers)
        site = self._site
        if site is not None and _captured is None:
            # launched before: the same kernel (a kept call is for one device), its site
            site(tensors)
            LAUNCHES[self.name] += 1
            return
        if type(tensors[0]) is not torch.Tensor and traced(tensors[0]):
            # a triton_op body traced by torch.compile: the launch goes into the graph, as a
            # user-defined Triton kernel (the compiled one, whatever the tensors' device)
            kernel = getattr(_runtime.compiled_kernels(), self.name)
            wrap_triton(kernel)[self.grid](
                **direct_launch.by_name(kernel, tensors, self.ints, self.floats), **self.consts)
            return
        kernel = getattr(_runtime.kernels_for(tensors[0].device), self.name)
        if _captured is not None:
            launch_kwargs = {k: v for k, v in self.consts.items() if k not in COMPILE_OPTIONS}
            _captured.append((kernel, self.grid, LaunchArgs(tensors, self.ints, self.floats),
                              launch_kwargs))
            return
        site = self._site = direct_launch.Site(kernel, self.grid, self.ints, self.floats,
                                               self.consts)
        site(tensors)
        LAUNCHES[self.name] += 1


_kept: list[dict] = []


def kept_calls() -> dict:
    """A launcher's dict of kept calls (kind of call -> its bound launches), emptied by
    ``forget_calls``."""
    kept: dict = {}
    _kept.append(kept)
    return kept


def kept(calls: dict, key, build, *args):
    """The kept call of ``key`` in ``calls``, built by ``build(*args)`` the first time."""
    call = calls.get(key)
    if call is None:
        call = build(*args)
        if len(calls) > 4096:        # a model makes a few dozen kinds of call
            calls.clear()
        calls[key] = call
    return call


def forget_calls() -> None:
    """Forget every kept call, so the next calls are planned again (after a change to the
    planner's internals that ``plan.state()`` does not show, e.g. in tests)."""
    for kept in _kept:
        kept.clear()


def run(name: str, grid: tuple, args: Mapping, consts: direct_launch.Constants) -> None:
    """Launch (and count) kernel ``name`` once, with every runtime argument by name in
    ``args`` -- compiled, or interpreted for CPU tensors (its first pointer's device decides)
    -- or record the launch while capture_launches is active."""
    Launch(name, grid, args, consts)(args)


@functools.lru_cache(maxsize=4096)
def constants(plan: Optional[planner.Plan], **constexprs) -> direct_launch.Constants:
    """A launch's compile-time constants and options, made once per (plan, constants)."""
    return direct_launch.Constants({**(plan.constants if plan is not None else {}),
                                    **constexprs, **COMPILE_OPTIONS})
