"""The launchers: the one place where a batch norm runs.

``forward`` and ``backward`` take the op's tensors (``ForwardArgs`` / ``BackwardArgs``) and its
``Options``, allocate the outputs, and run one of two backends behind the same steps:

* the Triton kernels, planned by tritonbn/plan.py (compiled for CUDA tensors, in Triton's
  interpreter for CPU tensors), launched through tritonbn/direct_launch.py;
* the float64 reference (tritonbn/reference.py), for CPU tensors when asked
  (tritonbn/_runtime.py).

Each file reads alone:

* ``forward.py``, ``backward.py``: the two launchers;
* ``updates.py``: the tensors the op updates (running statistics, batch and overflow counters),
  written in place (eager calls) or returned as ``new_<name>`` outputs (the custom op);
* ``merge.py``: partials merged once per channel, and a synchronized call's collectives (the
  forward gathers every process's per-channel (count, mean, M2) before normalizing, the
  backward all-reduces the per-channel sums before computing grad_input);
* ``planning.py``: the canonical view, the plan, the view's sizes and strides by name;
* ``run.py``: kernel arguments bound by name from each kernel's own signature, every launch
  counted in ``LAUNCHES`` (kernel name -> launches) so tests can prove which kernels ran, or
  recorded by ``capture_launches``. Nothing here substitutes a torch computation for a kernel.
"""
from __future__ import annotations

from .backward import backward
from .forward import forward
from .merge import merge_partials
from .planning import Planned, acc_dtype, plan_for
from .run import COMPILE_OPTIONS, LAUNCHES, capture_launches, count_launches, forget_calls
from .updates import UPDATES, updated_names

__all__ = ["LAUNCHES", "count_launches", "capture_launches", "acc_dtype", "plan_for", "Planned",
           "forward", "backward", "merge_partials", "UPDATES", "updated_names", "COMPILE_OPTIONS",
           "forget_calls"]
