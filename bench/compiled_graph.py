"""What torch.compile's graphs of a tritonbn step hold, and running them without a GPU.

With ``TRITONBN_COMPILED=triton_op`` the op reaches the compiler as ``torch.library.triton_op``
ops whose bodies the compiler traces: the AOTAutograd graphs then hold tritonbn's kernels as
user-defined Triton kernels (``triton_kernel_wrapper_functional`` nodes), not an opaque op.
Used by tests/op/test_triton_op.py and the GPU window's ``triton_op`` step (its dry run):

* ``recording_backend(graphs, interpreted=True)``: AOTAutograd with compilers that keep the
  forward and backward graphs in ``graphs`` and run them as they are, each kernel in Triton's
  interpreter when asked (CPU tensors);
* ``kernels(gm)`` / ``ops(gm)``: the kernels and the other ops a graph calls;
* ``target_only()``: torch's analysis of what a kernel writes builds the kernel's TTIR, which
  needs a target; without a GPU Triton has none, and the analysis would assume every argument
  written. Inside this block Triton's driver names an sm_90 target (and does nothing else).
"""
from __future__ import annotations

import contextlib

import torch
from torch._dynamo.backends.common import aot_autograd
from torch._higher_order_ops import triton_kernel_wrap

__all__ = ["recording_backend", "kernels", "ops", "target_only", "interpreted"]


class _TargetOnly:
    """A Triton driver that only names a target."""

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget
        return GPUTarget("cuda", 90, 32)

    def get_current_device(self):
        return 0

    def __getattr__(self, name):
        raise RuntimeError(f"no {name}: this driver only names a target (no GPU)")


@contextlib.contextmanager
def target_only():
    from triton.runtime.driver import driver
    saved = driver._active
    driver.set_active(_TargetOnly())
    try:
        yield
    finally:
        driver._active = saved


def kernels(gm) -> list[str]:
    """The user-defined Triton kernels ``gm`` launches, by name, in order."""
    out = []
    for n in gm.graph.nodes:
        if n.op == "call_function" and "triton_kernel_wrapper" in str(n.target):
            k = triton_kernel_wrap.kernel_side_table.get_kernel(n.kwargs["kernel_idx"])
            out.append(getattr(k, "fn", k).fn.__name__)    # num_warps= makes an Autotuner
    return out


def ops(gm) -> set[str]:
    """Every function ``gm`` calls."""
    return {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}


@contextlib.contextmanager
def interpreted():
    """While a recorded graph runs, torch's kernel table hands out tritonbn's interpreted
    kernel of the same name for each compiled one (not while compiling: torch analyses the
    compiled kernels)."""
    from tritonbn import _runtime

    table = triton_kernel_wrap.kernel_side_table
    real, cpu = table.get_kernel, _runtime.kernels_for(torch.device("cpu"))

    def get_kernel(idx):
        k = real(idx)
        return getattr(cpu, getattr(k, "fn", k).fn.__name__)
    table.get_kernel = get_kernel
    try:
        yield
    finally:
        table.get_kernel = real


def recording_backend(graphs: dict, interpreted_kernels: bool = False):
    """A torch.compile backend: AOTAutograd whose compilers record the graphs in ``graphs``
    ("forward", "backward") and run them unchanged."""
    def recorder(name):
        def compiler(gm, example_inputs):
            graphs[name] = gm

            def run(args):
                with interpreted() if interpreted_kernels else contextlib.nullcontext():
                    return gm(*args)
            run._boxed_call = True
            return run
        return compiler
    return aot_autograd(fw_compiler=recorder("forward"), bw_compiler=recorder("backward"))
