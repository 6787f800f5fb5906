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
import operator


__all__ = ["Site", "launch", "by_name", "scalar_key", "Constants"]

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


def _silent(enter, leave) -> bool:
    """No launch hook would run: none set, or empty chains (Triton's default)."""
    return (enter is None or (type(enter) is _HookChain and not enter.calls)) and (
        leave is None or (type(leave) is _HookChain and not leave.calls))


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
           constants: Constants, scalars: int | None = None):
    """Launch ``kernel[grid](**arguments by name, **constants)`` -- directly when this
    specialization has been launched before. ``scalars``: ``scalar_key(ints, constants)``,
    when the caller kept it. Returns (device, entry) when the launch took the direct path or
    made its entry, else None."""
    if _knobs is None or not hasattr(kernel, "device_caches") or not (
            _silent(_knobs.launch_enter_hook, _knobs.launch_exit_hook)):
        kernel[grid](**by_name(kernel, tensors, ints, floats), **constants)
        return None
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
            entry = entries[key] = _entry(kernel, compiled, constants)
        return None if entry is _NOT_SUPPORTED else (device, entry)
    launcher, function, packed_metadata, tail = entry
    grid_1 = grid[1] if len(grid) > 1 else 1
    grid_2 = grid[2] if len(grid) > 2 else 1
    launcher(grid[0], grid_1, grid_2, active.get_current_stream(device), function,
             packed_metadata, None, None, None, *addresses, *ints, *floats, *tail)
    return device, entry


_generation = 0     # bumped by clear(): what a Site kept before it is stale


def _version(text: str) -> tuple:
    return tuple(int(part) for part in text.split(".")[:2])


# How the Triton versions tritonbn admits (pyproject.toml) hand a launch from
# CudaLauncher.__call__ to its C function, read from their source: "spread" (3.6) -- grid,
# stream, function, the cooperative and PDL flags, the two scratch buffers, then every argument
# spread; "packed" (3.7 to 3.9) -- the same up to the flags, then the metadata and hooks, the
# scratch buffers, the argument annotations and signature, and the kernel's arguments as one
# tuple. __call__ adds nothing else for a kernel with no scratch memory and no sanitizer, so a
# Site calls the C function itself (~1 us less per launch); other versions and kernels keep
# calling __call__. The launch-equivalence test checks the bytes either way reach the driver.
_FORMS = {(3, 6): "spread", (3, 7): "packed", (3, 8): "packed", (3, 9): "packed"}
_FORM = _FORMS.get(_version(__import__("triton").__version__))


def _fast_launch(launcher, function, packed_metadata) -> tuple:
    """(C function or launcher, the arguments after the stream but the kernel's, whether the
    kernel's come as one tuple) for ``launcher``."""
    plain = (launcher, (function, packed_metadata, None, None, None), False)
    if _FORM is None or type(launcher).__name__ != "CudaLauncher" or getattr(
            launcher, "gsan_enabled", False) or getattr(launcher, "global_scratch_size", 1) \
            or getattr(launcher, "profile_scratch_size", 1):
        return plain
    c_launch = getattr(launcher, "launch", None)
    flags = (getattr(launcher, "launch_cooperative_grid", None),
             getattr(launcher, "launch_pdl", None))
    if not callable(c_launch) or None in flags:
        return plain
    if _FORM == "spread":
        return c_launch, (function, *flags, None, None, packed_metadata, None, None, None), False
    annotations = getattr(launcher, "arg_annotations", None)
    signature = getattr(launcher, "kernel_signature", None)
    if annotations is None or signature is None:
        return plain
    return (c_launch, (function, *flags, packed_metadata, None, None, None, None, None,
                       annotations, signature), True)


class Site:
    """One launch site: ``kernel`` with its grid, integers, floats and constants bound, called
    with its pointer arguments again and again.

    The caller promises that every call's pointers have the dtypes, and the Nones, of the
    first call's (the launchers' kept calls are keyed by them). So once a call has launched
    with every pointer 16-byte aligned, the site keeps that specialization's compiled
    launcher, and a later call costs the pointers' addresses, one alignment test (their bitwise
    or), the current device and stream, and Triton's C launch function (``_fast_launch``). Any
    other call -- a pointer not 16-byte aligned, another current device, a launch hook, an
    interpreted kernel, a new Triton driver (``clear``) -- takes ``launch``, which looks its
    specialization up in full.
    """

    __slots__ = ("kernel", "grid", "ints", "floats", "constants", "scalars", "_fast")

    def __init__(self, kernel, grid: tuple, ints: tuple, floats: tuple, constants: Constants):
        self.kernel, self.ints, self.floats, self.constants = kernel, ints, floats, constants
        self.grid = (grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1)
        self.scalars = scalar_key(ints, constants)
        # (generation, device, launch function, its arguments before the kernel's, whether
        # those come packed, the kernel's integers, floats and constants)
        self._fast = None

    def __call__(self, tensors: tuple) -> None:
        fast = self._fast
        if fast is not None and fast[0] == _generation and \
                _silent(_knobs.launch_enter_hook, _knobs.launch_exit_hook):
            _, kept_device, call, head, packed, tail = fast
            # (0 for an absent pointer: Triton made it a compile-time None, whose argument its
            # launcher skips; and 0 leaves the alignment test alone)
            addresses = [0 if t is None else t.data_ptr() for t in tensors]
            if not functools.reduce(operator.or_, addresses) & 15:
                active = _driver.active
                device = active.get_current_device()
                if device == kept_device:
                    gx, gy, gz = self.grid
                    stream = active.get_current_stream(device)
                    if packed:
                        call(gx, gy, gz, stream, *head, (*addresses, *tail))
                    else:
                        call(gx, gy, gz, stream, *head, *addresses, *tail)
                    return
        done = launch(self.kernel, self.grid, tensors, self.ints, self.floats, self.constants,
                      self.scalars)
        if done is not None and all(t is None or t.data_ptr() % 16 == 0 for t in tensors):
            device, (launcher, function, packed_metadata, tail) = done
            self._fast = (_generation, device,
                          *_fast_launch(launcher, function, packed_metadata),
                          (*self.ints, *self.floats, *tail))


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
    """Forget every direct-launch entry, and what every Site kept (tests; a driver switch)."""
    global _generation
    _generation += 1
    _cache.clear()
    _kernels.clear()
