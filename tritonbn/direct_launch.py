"""Launching a compiled Triton kernel at the cost of a launch.

``kernel[grid](*args)`` runs Triton's whole host path on every call: a generated binder
specializes each of ~50 arguments, a cache-key string is built and looked up, the globals the
kernel read are re-checked, and only then is the compiled kernel's launcher called. For a batch
norm that takes a few microseconds on the GPU, that path costs more than the kernel.

Here each kernel keeps its compiled specializations under a key computed from what decides
Triton's specialization, and computed cheaply because the launchers pass their arguments
grouped -- pointers, integers, floats, then compile-time constants, the order of every kernel's
parameters in kernels/:

* a pointer: its dtype and whether it is 16-byte aligned (Triton's divisibility hint), or None;
* an integer: 1 (Triton makes it a constant), a multiple of 16 (a divisibility hint), in the
  32-bit range or not -- for the whole tuple of integers at once, remembered per tuple;
* a float: nothing (Triton never specializes floats);
* the constants and options (num_warps, ...): their values.

The first call of a specialization goes through ``kernel[grid]``, which compiles, caches and
launches; later calls hand the same arguments to that compiled kernel's launcher directly. The
launch-equivalence test (tests/tools/test_host.py) checks, against a recording do-nothing CUDA
driver, that both paths launch the same grid, block, shared memory and argument bytes. Calls
take ``kernel[grid]`` every time when the kernel runs in Triton's interpreter, while a launch
hook is installed (profilers; then Triton also builds the launch metadata they read), or when the compiled kernel lacks the launcher attributes this
module expects (a Triton whose internals differ).
"""
from __future__ import annotations

import functools
import itertools


__all__ = ["launch", "by_name", "scalar_key", "Constants"]

_NOT_SUPPORTED = object()


class Constants(dict):
    """A launch's compile-time constants and options (num_warps, ...), with the part of the
    cache key they make, computed once: callers keep these objects and reuse them."""

    __slots__ = ("key",)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.key = tuple(self.items())


try:  # Triton >= 3.4 keeps its launch hooks in triton.knobs.runtime, as HookChains
    from triton import knobs as _triton_knobs
    _knobs = _triton_knobs.runtime
    _HookChain = _triton_knobs.HookChain
except (ImportError, AttributeError):  # pragma: no cover - older Triton: always kernel[grid]
    _knobs = _HookChain = None


from triton.runtime.driver import driver as _driver  # noqa: E402 - after the knobs probe


def _silent(hook) -> bool:
    """No launch hook would run: none set, or an empty chain (Triton's default)."""
    return hook is None or (type(hook) is _HookChain and not hook.calls)


# id(kernel) -> {key: (launcher, function, packed_metadata, constants) or _NOT_SUPPORTED}.
# By id: a JITFunction's own hash is a Python property that builds its cache key (~1 us).
_cache: dict = {}
_kernels: list = []      # the kernels of _cache, kept alive so that their ids stay theirs


@functools.lru_cache(maxsize=4096)
def _int_codes(ints: tuple) -> tuple:
    """Triton's specialization of each integer argument: 1 -> a constant, multiples of 16 ->
    a divisibility hint, the 32-bit range or not; None -> a constant."""
    return tuple(None if v is None else (v == 1, v % 16 == 0, -2**31 <= v < 2**31) for v in ints)


_DTYPES: dict = {}   # dtype -> a small number, so that the codes are plain ints (cheap to hash)


def _pointers(tensors: tuple) -> tuple[tuple, list]:
    """(codes, addresses) of the pointer arguments. A code is the tensor's dtype and 16-byte
    alignment as one int (-1 for None); the addresses are what the launcher takes (None stays
    None). Handing the launcher addresses instead of tensors spares it a ``data_ptr()`` call
    and a driver query per pointer: every tensor of a call was checked to be on the input's
    device before any launch (tritonbn/validate.py), CUDA for compiled kernels, which is all
    the query checks (it refuses memory no GPU can address, not another GPU's)."""
    codes, addresses = [], []
    for t in tensors:
        if t is None:
            codes.append(-1)
            addresses.append(None)
        else:
            address = t.data_ptr()
            dt = _DTYPES.get(t.dtype)
            if dt is None:
                dt = _DTYPES.setdefault(t.dtype, next(_numbers))
            codes.append(2 * dt + (address % 16 == 0))
            addresses.append(address)
    return tuple(codes), addresses


_scalar_keys: dict = {}   # (integer codes, constants) -> a small int, hashed once
_numbers = itertools.count()    # their numbers: next() is atomic, len() then insert is not


def scalar_key(ints: tuple, constants: Constants) -> int:
    """The part of a launch's cache key its integers and constants make, as a small int (a
    tuple of ~50 values would be hashed again on every call): callers that launch with the
    same ones again keep it and pass it to ``launch``."""
    key = (_int_codes(ints), constants.key)
    found = _scalar_keys.get(key)
    if found is None:
        found = _scalar_keys.setdefault(key, next(_numbers))
    return found


def by_name(kernel, tensors: tuple, ints: tuple, floats: tuple) -> dict:
    """The runtime arguments under the kernel's own parameter names (they come in its order)."""
    return dict(zip(kernel.arg_names, (*tensors, *ints, *floats)))


def launch(kernel, grid: tuple, tensors: tuple, ints: tuple, floats: tuple,
           constants: Constants, scalars: int | None = None) -> None:
    """Launch ``kernel[grid](**arguments by name, **constants)`` -- directly when this
    specialization has been launched before. ``scalars``: ``scalar_key(ints, constants)``,
    when the caller kept it."""
    if _knobs is None or not hasattr(kernel, "device_caches") or not (
            _silent(_knobs.launch_enter_hook) and _silent(_knobs.launch_exit_hook)):
        kernel[grid](**by_name(kernel, tensors, ints, floats), **constants)
        return
    active = _driver.active
    device = active.get_current_device()
    codes, addresses = _pointers(tensors)
    key = (device, codes, scalars if scalars is not None else scalar_key(ints, constants))
    entries = _cache.get(id(kernel))
    if entries is None:
        _kernels.append(kernel)
        entries = _cache[id(kernel)] = {}
    entry = entries.get(key)
    if entry is None or entry is _NOT_SUPPORTED:
        compiled = kernel[grid](**by_name(kernel, tensors, ints, floats), **constants)
        if entry is None:
            entries[key] = _entry(kernel, compiled, constants)
        return
    launcher, function, packed_metadata, tail = entry
    grid_1 = grid[1] if len(grid) > 1 else 1
    grid_2 = grid[2] if len(grid) > 2 else 1
    launcher(grid[0], grid_1, grid_2, active.get_current_stream(device), function,
             packed_metadata, None, None, None, *addresses, *ints, *floats, *tail)


def _entry(kernel, compiled, constants: dict):
    """What a direct launch of ``compiled`` needs, or _NOT_SUPPORTED when it does not look
    like the compiled kernels this module was written against."""
    if hasattr(compiled, "result"):     # an asynchronous compile (Triton 3.6's future)
        compiled = compiled.result()
    try:
        launcher, function = compiled.run, compiled.function
        packed_metadata = compiled.packed_metadata
        names = [p.name for p in kernel.params]
        constexpr = [p.name for p in kernel.params if p.is_constexpr]
    except AttributeError:
        return _NOT_SUPPORTED
    if launcher is None or function is None or names[len(names) - len(constexpr):] != constexpr:
        return _NOT_SUPPORTED
    # the compile-time constants in parameter order, after the runtime arguments
    return launcher, function, packed_metadata, tuple(constants[n] for n in constexpr)


def clear() -> None:
    """Forget every direct-launch entry (tests; a driver switch)."""
    _cache.clear()
    _kernels.clear()
