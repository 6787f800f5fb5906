"""Where the kernels run, decided once per process when tritonbn is imported.

Triton reads ``TRITON_INTERPRET`` once, when it is first imported. So, before anything imports
triton:

* with a CUDA GPU: compiled kernels, as usual;
* without one, if triton is not imported yet and ``TRITON_INTERPRET`` is unset: tritonbn sets
  ``TRITON_INTERPRET=1``, so the same kernels run on CPU tensors in Triton's interpreter;
* otherwise (triton imported earlier without the interpreter, or ``TRITON_INTERPRET=0`` set on
  purpose): CPU tensors take the float64 reference path (tritonbn/reference.py), and the first
  such call says so once with a ``ReferencePathWarning``.

Also: in a source checkout whose ``tritonbn`` package is imported from the source tree, the
device code lives in the top-level ``kernels/`` folder, which an installed copy carries as
``tritonbn.kernels``; it is mapped to that name here (an editable install maps it itself).
"""
from __future__ import annotations

import importlib.util
import os
import sys
import warnings

import torch

__all__ = ["INTERPRETER", "ReferencePathWarning", "interpreter_enabled", "uses_reference",
           "warn_reference_path", "launch_on_cpu_tensors"]

_ENV = "TRITON_INTERPRET"


class ReferencePathWarning(UserWarning):
    """CPU tensors ran the float64 reference path instead of the Triton kernels."""


def _decide_interpreter() -> bool:
    if _ENV not in os.environ and "triton" not in sys.modules and not torch.cuda.is_available():
        os.environ[_ENV] = "1"
    return os.environ.get(_ENV, "0") == "1"


def _map_source_kernels() -> None:
    """Import the source tree's kernels/ as tritonbn.kernels when nothing else provides it."""
    name = __package__ + ".kernels"
    package_dir = os.path.dirname(os.path.abspath(__file__))
    if name in sys.modules or os.path.isdir(os.path.join(package_dir, "kernels")):
        return
    if importlib.util.find_spec(name) is not None:  # an editable install's finder knows it
        return
    init = os.path.join(os.path.dirname(package_dir), "kernels", "__init__.py")
    if not os.path.isfile(init):
        raise ImportError(f"{name} is missing: neither installed with the package nor found at "
                          f"{os.path.dirname(init)} (reinstall tritonbn)")
    spec = importlib.util.spec_from_file_location(name, init,
                                                  submodule_search_locations=[os.path.dirname(init)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    setattr(sys.modules[__package__], "kernels", module)


def _check_interpreter_support() -> None:
    """Triton 3.6's interpreter hands loop bounds to Python as 1-element arrays, which NumPy 2.4
    no longer converts ("only 0-dimensional arrays can be converted to Python scalars"). Seen
    with triton 3.6.0 + numpy 2.4; triton 3.8 and 3.9 are fine."""
    import numpy
    import triton

    def version(mod):
        return tuple(int(p) for p in mod.__version__.split(".")[:2] if p.isdigit())

    if version(triton) < (3, 7) and version(numpy) >= (2, 4):
        raise RuntimeError(f"The Triton {triton.__version__} interpreter (TRITON_INTERPRET=1) fails "
                           f"with NumPy {numpy.__version__}: install 'numpy<2.4' or triton>=3.8")


INTERPRETER: bool = _decide_interpreter()
_map_source_kernels()
if INTERPRETER:
    _check_interpreter_support()
_warned = False
_kernels_on_cpu = False


def launch_on_cpu_tensors() -> None:
    """Host timing without a GPU (``tritonbn bench --host``): CPU tensors take the kernel path,
    whose launches a do-nothing CUDA driver receives. No kernel computes anything then: this is
    for measuring the host path, never for real work."""
    global _kernels_on_cpu
    _kernels_on_cpu = True


def interpreter_enabled() -> bool:
    """Whether the kernels run in Triton's CPU interpreter (fixed when tritonbn was imported)."""
    return INTERPRETER


def uses_reference(t: torch.Tensor) -> bool:
    """A CPU tensor without the interpreter runs the float64 reference path."""
    return t.device.type == "cpu" and not INTERPRETER and not _kernels_on_cpu


def warn_reference_path() -> None:
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(
            "tritonbn: CPU tensors are computed by the float64 reference path, not the Triton "
            "kernels: triton was imported before tritonbn without TRITON_INTERPRET=1 (or it was "
            "set to 0). Import tritonbn first, or set TRITON_INTERPRET=1 before anything imports "
            "triton, to run the kernels in Triton's CPU interpreter.", ReferencePathWarning,
            stacklevel=3)
