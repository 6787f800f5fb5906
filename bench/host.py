"""``python -m bench.host``: what one batch-norm layer costs the CPU, per call.

Run from the repository root (``bench`` is a folder of the checkout, not part of the installed
package).

A batch norm on a GPU takes microseconds, so the host time per call decides whether tritonbn
speeds a model up or slows it down. Measured in one run, per call, median of rounds:

* ``python``: tritonbn's own host code -- validation, options, autograd, allocation, planning --
  with the kernel launches recorded instead of made (``launch.capture_launches``);
* ``launch``: the same calls with Triton's real launch path. On a GPU these are real launches;
  without one, ``python -m bench.host`` builds a do-nothing libcuda from ``host_driver.c``
  (gcc) and runs itself again against it, so Triton's real binder, cache and C launcher run and
  only the driver's own work is missing (it is a few microseconds per launch on a GPU). Plans
  are then made for an H100, and CPU tensors stand in for device tensors;
* ``torch``: torch's own module or function on the same tiny tensor, the yardstick (on the CPU
  without a GPU, where a tensor this small costs almost nothing to compute, on one thread:
  waking torch's intra-op thread pool is CPU-only work a GPU op does not do), timed in turn
  with the ``launch`` figure round by round, so that both see the same machine.

Cases: a ``BatchNorm2d`` module's training forward, the functional training forward, the
backward, and the layer's whole training step (module forward + backward), each with the one-
and two-launch plans; and the module forward under ``torch.compile`` (inductor) against eager.
Host time only: no kernel computes anything here.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import torch

__all__ = ["build_driver", "use_driver", "measure", "format_table", "main"]

SHAPE = (4, 8, 4, 4)         # the host path does not depend on the size; torch computes ~nothing
PLANS = {1: dict(variant="onepass"), 2: dict(variant="split", splits=2)}
_CHILD = "TRITONBN_HOST_DRIVER"  # set in the process that runs against the do-nothing driver


def build_driver(directory: str | None = None) -> str:
    """Compile host_driver.c into ``directory``/libcuda.so.1 (gcc); returns the directory."""
    directory = directory or os.path.join(tempfile.gettempdir(), f"tritonbn-host-{os.getuid()}")
    os.makedirs(directory, exist_ok=True)
    lib = os.path.join(directory, "libcuda.so.1")
    source = os.path.join(os.path.dirname(__file__), "host_driver.c")
    if not os.path.exists(lib) or os.path.getmtime(lib) < os.path.getmtime(source):
        if shutil.which("gcc") is None:
            raise RuntimeError("python -m bench.host needs gcc to build its do-nothing libcuda")
        subprocess.run(["gcc", "-O2", "-shared", "-fPIC", "-o", lib + ".tmp", source], check=True)
        os.replace(lib + ".tmp", lib)
    link = os.path.join(directory, "libcuda.so")
    if not os.path.exists(link):
        os.symlink("libcuda.so.1", link)
    return directory


def driver_env(directory: str) -> dict:
    """The environment of a process whose Triton loads the do-nothing driver in ``directory``."""
    env = dict(os.environ, TRITON_LIBCUDA_PATH=directory)
    # compiled kernels: no process-wide interpreter (and not TRITON_INTERPRET=0 either, which
    # sends CPU tensors to the float64 reference path)
    env.pop("TRITON_INTERPRET", None)
    env.pop("TRITONBN_CPU", None)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (directory, env.get("LD_LIBRARY_PATH"))
                                             if p)
    env[_CHILD] = directory
    env["CUDA_VISIBLE_DEVICES"] = ""   # torch must not take the do-nothing driver for a GPU
    return env


def use_driver() -> None:
    """In a process started with ``driver_env``: make Triton's NVIDIA driver active (torch has
    no CUDA here, so its device, stream and capability are answered for it) and let CPU tensors
    take the kernel path, planned for an H100."""
    from triton.backends.nvidia.driver import CudaDriver
    from triton.runtime.driver import driver

    drv = CudaDriver()
    drv.get_current_device = lambda: 0
    drv.get_current_stream = lambda device=None: 0
    drv.get_device_capability = lambda device=None: (9, 0)
    driver.set_active(drv)
    _compiled_kernels_on_cpu_tensors()


def _compiled_kernels_on_cpu_tensors() -> None:
    """CPU tensors take the compiled kernels (whose launches the do-nothing driver receives),
    not the interpreted copy tritonbn makes for them nor the reference path. tritonbn has no
    public switch for this -- nothing but this harness should want it -- so it is set on
    tritonbn._runtime's internals here, and checked: a change there fails loudly, not silently
    into timing the interpreter."""
    from tritonbn import _runtime

    compiled = getattr(_runtime, "_compiled", None)
    if compiled is None or not callable(getattr(_runtime, "kernels_for", None)) \
            or not hasattr(_runtime, "_REFERENCE"):
        raise RuntimeError("tritonbn._runtime has changed: bench/host.py cannot send CPU tensors "
                           "to the compiled kernels (update _compiled_kernels_on_cpu_tensors)")
    _runtime.kernels_for = lambda device: compiled
    _runtime._REFERENCE = False


def _per_call_us(fn, calls: int, rounds: int) -> float:
    return _interleaved({"fn": fn}, calls, rounds)["fn"]


def _interleaved(fns: dict, calls: int, rounds: int) -> dict:
    """{name: median microseconds per call}, the functions timed in turn within each round,
    so that a drift of the machine (another process, frequency) moves them alike and their
    ratio holds."""
    for fn in fns.values():
        fn()
        fn()
    times: dict = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            times[name].append((time.perf_counter() - t0) / calls * 1e6)
    return {name: round(statistics.median(t), 1) for name, t in times.items()}


def _cases(device: str):
    """name -> (tritonbn callable, torch callable) on SHAPE, float32."""
    import tritonbn

    c = SHAPE[1]
    x = torch.randn(SHAPE, device=device).requires_grad_()
    w = torch.ones(c, device=device, requires_grad=True)
    b = torch.zeros(c, device=device, requires_grad=True)
    rm, rv = torch.zeros(c, device=device), torch.ones(c, device=device)
    ours_m, torch_m = tritonbn.BatchNorm2d(c).to(device), torch.nn.BatchNorm2d(c).to(device)
    dy = torch.randn(SHAPE, device=device)
    # graphs for the backward cases, with statistics of their own (torch saves them)
    y_ours = tritonbn.batch_norm(x, rm.clone(), rv.clone(), w, b, training=True)
    y_torch = torch.nn.functional.batch_norm(x, rm.clone(), rv.clone(), w, b, training=True)

    def step(module):
        def run():
            module(x).backward(dy)
        return run
    return {
        "module forward": (lambda: ours_m(x), lambda: torch_m(x)),
        "functional forward": (lambda: tritonbn.batch_norm(x, rm, rv, w, b, training=True),
                               lambda: torch.nn.functional.batch_norm(x, rm, rv, w, b, True)),
        "backward": (lambda: torch.autograd.grad(y_ours, (x, w, b), dy, retain_graph=True),
                     lambda: torch.autograd.grad(y_torch, (x, w, b), dy, retain_graph=True)),
        "training step (module forward + backward)": (step(ours_m), step(torch_m)),
    }


def measure(calls: int = 2000, rounds: int = 5, compiled: bool = True) -> dict:
    """The figures, in microseconds per call; see the module docstring."""
    from tritonbn import _runtime, launch, plan as planner

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if _runtime.cuda_interpreted() or (device == "cpu" and _runtime.kernels_for(
            torch.device("cpu")) is not getattr(_runtime, "_compiled", None)):
        raise RuntimeError("host timing needs compiled kernels: a GPU, or the do-nothing CUDA "
                           "driver `python -m bench.host` builds (not Triton's interpreter)")
    h100 = planner.DeviceInfo("NVIDIA H100 (planned)", 132, (9, 0), False)
    plan_for = planner.planning_for(h100) if device == "cpu" else planner.planning_for(
        planner.device_info(torch.device("cuda")))
    threads = torch.get_num_threads()
    if device == "cpu":
        # torch's CPU kernels wake its intra-op thread pool, which a GPU op never does: on 2
        # cores that alone moved torch's training step between ~30 and ~41 us from one run to
        # the next. One thread keeps the yardstick to torch's host path (and the tiny compute).
        torch.set_num_threads(1)
    rows = []
    with plan_for:
        for name, (ours, ref) in _cases(device).items():
            for launches, fields in PLANS.items():
                with planner.forced_plan(**fields):
                    with launch.count_launches() as counted:
                        ours()
                    with launch.capture_launches() as captured:
                        # recorded, then dropped (a growing record would slow every call)
                        python_us = _per_call_us(lambda: (ours(), captured.clear()), calls,
                                                 rounds)
                    # torch and tritonbn in turn, round by round: the ratio is the figure
                    timed = _interleaved({"torch": ref, "ours": ours}, calls, rounds)
                    launch_us, torch_us = timed["ours"], timed["torch"]
                rows.append(dict(case=name, launches=sum(counted.values()),
                                 plan_launches=launches, python_us=python_us,
                                 launch_us=launch_us, torch_us=torch_us,
                                 vs_torch=round(launch_us / torch_us, 2)))
        if compiled:
            rows.append(_compiled_row(device, calls, rounds))
    torch.set_num_threads(threads)
    return {"shape": "x".join(map(str, SHAPE)), "dtype": "float32", "device": _device_name(),
            "torch_threads": 1 if device == "cpu" else threads,
            "torch": torch.__version__, "triton": __import__("triton").__version__,
            "calls": calls, "rounds": rounds, "rows": rows,
            "date": time.strftime("%Y-%m-%d")}


LAYERS = 8   # the compiled model's batch norms: torch.compile's per-graph cost spreads over them


def _compiled_row(device: str, calls: int, rounds: int) -> dict:
    """A model of LAYERS BatchNorm2d in training, compiled with inductor (its graph calls the
    custom op once per layer) against the same model in eager mode; per layer."""
    import tritonbn

    model = torch.nn.Sequential(*(tritonbn.BatchNorm2d(SHAPE[1]) for _ in range(LAYERS)))
    model = model.to(device)
    x = torch.randn(SHAPE, device=device).requires_grad_()
    torch._dynamo.reset()
    fn = torch.compile(model, backend="inductor", fullgraph=True)
    timed = _interleaved({"eager": lambda: model(x), "compiled": lambda: fn(x)}, calls, rounds)
    eager_us, compiled_us = timed["eager"] / LAYERS, timed["compiled"] / LAYERS
    return dict(case=f"module forward in a {LAYERS}-layer model, torch.compile (inductor) vs "
                     f"eager, per layer", launches=1, plan_launches=1, python_us=None,
                launch_us=round(compiled_us, 1), torch_us=None, eager_us=round(eager_us, 1),
                vs_eager=round(compiled_us / eager_us, 2))


def _device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return "CPU; launches against a do-nothing libcuda (Triton's real host path, no GPU work)"


def format_table(result: dict) -> str:
    lines = [f"Host time per call, microseconds ({result['shape']} {result['dtype']}, "
             f"{result['device']}; torch {result['torch']}, triton {result['triton']}; "
             f"median of {result['rounds']} x {result['calls']} calls)", "",
             "| case | launches | tritonbn Python only | + Triton's launch path | torch, same run "
             "| ratio |", "| --- | --- | --- | --- | --- | --- |"]
    for r in result["rows"]:
        if "vs_eager" in r:
            lines.append(f"| {r['case']} | {r['launches']} | - | {r['launch_us']} | "
                         f"eager {r['eager_us']} | {r['vs_eager']}x eager |")
        else:
            lines.append(f"| {r['case']} | {r['launches']} | {r['python_us']} | "
                         f"{r['launch_us']} | {r['torch_us']} | {r['vs_torch']}x torch |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.host", description=__doc__.split(
        "\n\n")[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-compile", action="store_true",
                        help="skip the torch.compile row (inductor's first compile takes a while)")
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    args = parser.parse_args(argv)
    if args.calls < 1 or args.rounds < 1:
        parser.error("--calls and --rounds must be at least 1")
    if not torch.cuda.is_available() and os.environ.get(_CHILD) is None:
        # Triton reads its driver once, at import: measure in a fresh process on the stub.
        env = driver_env(build_driver())
        # torch's CUDA build warns that this driver is too old for it: that is the point
        env["PYTHONWARNINGS"] = "ignore::UserWarning:torch.cuda"
        # `-m bench.host` needs the checkout on the path whatever the current directory
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        child = [sys.executable, "-m", "bench.host", *(argv if argv is not None else sys.argv[1:])]
        return subprocess.run(child, env=env).returncode
    if not torch.cuda.is_available():
        use_driver()
    result = measure(args.calls, args.rounds, compiled=not args.no_compile)
    print(format_table(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
