"""Where the kernels run, per tensor device, whatever the process imported first.

* CUDA tensors: the kernels of ``tritonbn.kernels``, compiled by Triton -- unless the whole
  process runs Triton's interpreter (``TRITON_INTERPRET=1`` set by the user before triton was
  imported), in which case Triton interprets them as it does every kernel.
* CPU tensors: the same kernel source decorated a second time with Triton's interpreter switched
  on for that import only (``triton.knobs``, never ``os.environ``), made on first use. So CPU
  calls run the kernels in Triton's interpreter however triton, torchvision or timm were
  imported, and no other Triton kernel of the process changes mode.
* CPU tensors take the float64 reference path (tritonbn/reference.py) instead when asked:
  ``TRITONBN_CPU=reference``, or ``TRITON_INTERPRET=0`` set on purpose (then a
  ``ReferencePathWarning`` says so once, since that variable is about every Triton kernel).
* Under torch.compile (``TRITONBN_COMPILED``): the graph calls tritonbn's functional custom
  ops, opaque to the compiler, whose implementation runs the launchers (``custom_op``, the
  default); or, with ``triton_op``, ``torch.library.triton_op`` ops whose bodies -- the same
  launchers -- the compiler traces, so that the graph holds the kernels themselves and
  Inductor launches them with its own launcher. ``triton_op`` stays opt-in until a GPU has run
  it (the GPU window's ``triton_op`` step).

Also: in a source checkout whose ``tritonbn`` package is imported from the source tree, the
device code lives in the top-level ``kernels/`` folder, which an installed copy carries as
``tritonbn.kernels``; it is mapped to that name here (an editable install maps it itself).
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
import threading
import types
import warnings

import torch

__all__ = ["ReferencePathWarning", "kernels_for", "compiled_kernels", "uses_reference",
           "warn_reference_path", "cpu_runs_kernels", "cuda_interpreted", "compiled_form",
           "CPU_ENV", "COMPILED_ENV", "COMPILED_FORMS"]

CPU_ENV = "TRITONBN_CPU"            # "kernels" (the default) or "reference"
COMPILED_ENV = "TRITONBN_COMPILED"  # "custom_op" (the default) or "triton_op"
COMPILED_FORMS = ("custom_op", "triton_op")
_KERNELS = __package__ + ".kernels"
_INTERPRETED = __package__ + "._interpreted_kernels"


class ReferencePathWarning(UserWarning):
    """CPU tensors ran the float64 reference path instead of the Triton kernels."""


def _map_source_kernels() -> None:
    """Import the source tree's kernels/ as tritonbn.kernels when nothing else provides it."""
    package_dir = os.path.dirname(os.path.abspath(__file__))
    if _KERNELS in sys.modules or os.path.isdir(os.path.join(package_dir, "kernels")):
        return
    if importlib.util.find_spec(_KERNELS) is not None:  # an editable install's finder knows it
        return
    init = os.path.join(os.path.dirname(package_dir), "kernels", "__init__.py")
    if not os.path.isfile(init):
        raise ImportError(f"{_KERNELS} is missing: neither installed with the package nor found "
                          f"at {os.path.dirname(init)} (reinstall tritonbn)")
    module = _import_package(_KERNELS, os.path.dirname(init))
    setattr(sys.modules[__package__], "kernels", module)


def _import_package(name: str, folder: str) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, os.path.join(folder, "__init__.py"),
                                                  submodule_search_locations=[folder])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def _reference_on_cpu() -> tuple[bool, bool]:
    """(CPU tensors take the reference path, say so with a warning), from the environment."""
    choice = os.environ.get(CPU_ENV, "kernels")
    if choice not in ("kernels", "reference"):
        raise ValueError(f"{CPU_ENV} must be 'kernels' or 'reference', got {choice!r}")
    if choice == "reference":
        return True, False
    return os.environ.get("TRITON_INTERPRET") == "0", True


_map_source_kernels()
from . import kernels as _compiled  # noqa: E402 - after the mapping above

_REFERENCE, _WARN = _reference_on_cpu()
_interpreted = None
_warned = False


def compiled_kernels():
    """The compiled kernels (``tritonbn.kernels``), whatever the tensors' device: what a traced
    ``triton_op`` body hands the compiler."""
    return _compiled


def cuda_interpreted() -> bool:
    """Whether CUDA tensors' kernels run in Triton's interpreter too (TRITON_INTERPRET=1 was set
    for the whole process when the kernels were defined)."""
    return not hasattr(_compiled.bn_fwd_apply_kernel, "device_caches")


def _compiled_form_from_env() -> str:
    form = os.environ.get(COMPILED_ENV, "custom_op")
    if form not in COMPILED_FORMS:
        raise ValueError(f"{COMPILED_ENV} must be one of {COMPILED_FORMS}, got {form!r}")
    return form


# torch traces only compiled kernels into a graph: a process that interprets every kernel
# (TRITON_INTERPRET=1) keeps the custom ops
_COMPILED_FORM = _compiled_form_from_env()
if cuda_interpreted():
    _COMPILED_FORM = "custom_op"


def compiled_form() -> str:
    """How compiled graphs reach the kernels: "custom_op" or "triton_op" (module docstring)."""
    return _COMPILED_FORM


def cpu_runs_kernels() -> bool:
    """Whether CPU tensors run tritonbn's kernels (in Triton's interpreter); False when they take
    the float64 reference path."""
    return not _REFERENCE


@contextlib.contextmanager
def _interpreting():
    """Triton's ``@triton.jit`` builds interpreted kernels inside this block, and only here:
    the knob (which also writes ``TRITON_INTERPRET`` to os.environ) and the variable are both
    put back as they were."""
    from triton import knobs
    knob, env = knobs.runtime, os.environ.get("TRITON_INTERPRET")
    saved = knob.__dict__.get("interpret", _UNSET)
    knob.interpret = True
    try:
        yield
    finally:
        if saved is _UNSET:
            knob.__dict__.pop("interpret", None)
        else:
            knob.__dict__["interpret"] = saved
        if env is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = env


_UNSET = object()


def _check_interpreter_support() -> None:
    """Triton 3.6's interpreter hands loop bounds to Python as 1-element arrays, which NumPy 2.4
    no longer converts ("only 0-dimensional arrays can be converted to Python scalars"). Seen
    with triton 3.6.0 + numpy 2.4; triton 3.8 and 3.9 are fine."""
    import numpy
    import triton

    def version(mod):
        return tuple(int(p) for p in mod.__version__.split(".")[:2] if p.isdigit())

    if version(triton) < (3, 7) and version(numpy) >= (2, 4):
        raise RuntimeError(f"The Triton {triton.__version__} interpreter fails with NumPy "
                           f"{numpy.__version__}, so tritonbn cannot run its kernels on CPU "
                           f"tensors: install 'numpy<2.4' or triton>=3.8 (or set "
                           f"{CPU_ENV}=reference)")


@contextlib.contextmanager
def _library_interpreted():
    """Triton's own library functions (``tl.sum``, ``tl.max``, ...) are ``@triton.jit``
    functions too, decorated when triton was imported -- compiled ones, unless the whole process
    interprets. Inside an interpreted launch, calling one interprets its source, as Triton does
    when it interprets everything.

    Interpreting a device function (a library function, or a kernel's own helper) replaces the
    builtins of ``triton.language.core`` with the interpreter's and never puts them back: in a
    process that only interprets, nothing else needs them. Here compiled kernels may follow (on
    CUDA tensors, or torch.compile's analysis of a kernel), and would be built with the
    interpreter's builtins: every patch an interpreted launch makes is undone when it ends."""
    from triton.runtime import interpreter
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    def interpret(self, *args, **kwargs):
        device_fn = _library.get(self.fn)
        if device_fn is None:
            device_fn = _library.setdefault(self.fn, InterpretedFunction(self.fn))
        return device_fn(*args, **kwargs)

    # What each attribute the interpreter's patch scopes set held before this launch (its
    # first setting here saw it), restored afterwards where it differs. Triton sets ~4,000
    # attributes per launch on a handful of objects: keeping the first value of each, and
    # setting back only the changed ones, keeps this to a small part of a launch.
    before = {}
    scope_class = interpreter._LangPatchScope
    set_attr = scope_class.set_attr

    def set_attr_recorded(scope, obj, name, value):
        key = (id(obj), name)
        if key not in before:
            before[key] = (obj, name, vars(obj).get(name, _ABSENT))
        set_attr(scope, obj, name, value)

    saved = JITFunction.__call__
    JITFunction.__call__ = interpret
    scope_class.set_attr = set_attr_recorded
    try:
        yield
    finally:
        scope_class.set_attr = set_attr
        JITFunction.__call__ = saved
        for obj, name, original in before.values():
            if vars(obj).get(name, _ABSENT) is original:
                continue
            if original is _ABSENT:
                delattr(obj, name)
            else:
                setattr(obj, name, original)


_library: dict = {}     # a library function's Python function -> its InterpretedFunction
_ABSENT = object()
_one_at_a_time = threading.Lock()


class _InterpretedKernel:
    """A kernel of the interpreted copy, launched as ``kernel[grid](**arguments)``."""

    def __init__(self, kernel):
        self.kernel, self.fn = kernel, kernel.fn

    def __getattr__(self, name: str):
        return getattr(self.kernel, name)      # arg_names, params, ...: the kernel's own

    def __getitem__(self, grid):
        run = self.kernel[grid]

        def launch(*args, **kwargs):
            # one interpreted launch at a time: the swap of JITFunction.__call__ is
            # process-wide, so two threads must not interleave their swaps and restores
            with _one_at_a_time, _library_interpreted():
                return run(*args, **kwargs)
        return launch


class _InterpretedKernels:
    """The kernels as Triton's interpreter runs them: the kernel modules imported once more,
    under a name of their own, with the interpreter on while they are decorated."""

    def __init__(self):
        _check_interpreter_support()
        with _interpreting():
            self._module = _import_package(_INTERPRETED, os.path.dirname(_compiled.__file__))

    def __getattr__(self, name: str) -> _InterpretedKernel:
        kernel = _InterpretedKernel(getattr(self._module, name))
        setattr(self, name, kernel)
        return kernel


def _interpreted_kernels():
    global _interpreted
    if _interpreted is None:
        # the process interprets every kernel already: the kernels as defined
        _interpreted = _compiled if cuda_interpreted() else _InterpretedKernels()
    return _interpreted


def kernels_for(device: torch.device):
    """The module whose kernels run on tensors of ``device``: interpreted ones for CPU tensors,
    compiled ones otherwise (CUDA; meta tensors, whose launches are only recorded)."""
    if device.type == "cpu":
        return _interpreted_kernels()
    return _compiled


def uses_reference(t: torch.Tensor) -> bool:
    """A CPU tensor runs the float64 reference path when that was asked for."""
    return _REFERENCE and t.device.type == "cpu"


def warn_reference_path() -> None:
    global _warned
    if _WARN and not _warned:
        _warned = True
        warnings.warn(
            "tritonbn: CPU tensors are computed by the float64 reference path, not the Triton "
            "kernels, because TRITON_INTERPRET=0 is set. Unset it to run the kernels in "
            f"Triton's CPU interpreter (set {CPU_ENV}=reference to choose the reference path "
            "without this warning).", ReferencePathWarning, stacklevel=3)
