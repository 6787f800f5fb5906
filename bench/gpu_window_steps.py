"""The steps of the GPU window (bench/gpu_window.py), each run in a process of its own.

``python bench/gpu_window_steps.py STEP --out DIR --stage DIR --root DIR
--deadline EPOCH [--dry-run]`` runs one step (``python -m bench.gpu_window_steps`` from the
repository root too; as a script, a step that needs no tritonbn -- running pytest, starting
compute-sanitizer -- does not import it, and saves a second of start-up). It writes what it found under ``DIR`` --
``result.json`` first (``status``, ``summary``, ``outputs``, ``notes``), rewritten after each
piece of work, so a step the window cuts at its budget keeps what it finished. ``--stage`` is
the folder holding every step's folder (later steps read earlier ones: tune and the performance
model read the benchmark's rows); ``--deadline`` is when the step should stop starting new work
(the window kills it a few seconds later).

``--dry-run`` (or no GPU): the same code on CPU tensors in Triton's interpreter, on tiny
shapes, with a small torchvision ResNet instead of ResNet-50; what needs the hardware
(nvidia-smi, compute-sanitizer, CUDA events) is recorded as not available.

Nothing here is imported by tritonbn itself: the harnesses sit beside the package.
"""
from __future__ import annotations

import os
import sys

if __name__ == "__main__":
    # Run as a script (the window does): import tritonbn and the bench package from the
    # checkout this file belongs to, not this folder's modules as top-level ones.
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import argparse
import copy
import functools
import json
import math
import platform
import re
import shutil
import signal
import statistics
import subprocess
import time
import traceback

__all__ = ["STEPS", "HEADLINE_SHAPES", "COMPILE_SHAPES", "NUMERICS_TESTS", "main"]

# ----------------------------------------------------------------------------- shapes and sets

# The benchmark's headline shapes, most valuable first (the step stops when its budget ends):
# ResNet-50's most frequent batch-norm input at batch 256, its 112x112 stem, the 14x14 and 7x7
# stages whose NCHW planes are not 16-byte multiples (scalar accesses), the 28x28 stage, and a
# small batch.
HEADLINE_SHAPES = [(256, 256, 56, 56), (256, 64, 112, 112), (256, 1024, 14, 14),
                   (256, 2048, 7, 7), (256, 512, 28, 28), (32, 256, 56, 56)]
HEADLINE_DTYPES = ("float16", "bfloat16")
# torch.compile compiles one graph per (case, op) -- seconds each -- so it gets fewer cases:
# the commonest shape and an unaligned one, training in bfloat16 channels-last (the AMP case)
# first.
COMPILE_SHAPES = [(256, 256, 56, 56), (256, 1024, 14, 14)]
COMPILE_CASES = [("channels_last", "bfloat16"), ("contiguous", "float16"),
                 ("channels_last", "float16"), ("contiguous", "bfloat16")]
COMPILE_OPS = ("fwd_train", "bwd", "relu_fwd", "fwd_eval")

# The numerics-relevant test files run again on the GPU (the default suite runs them in the
# interpreter): tiles, plans, variants, epilogues, overflow guards, in-place activated batch
# norm (never run on a GPU before this step).
NUMERICS_TESTS = ["tests/op/test_numerics.py", "tests/op/test_forced_plans.py",
                  "tests/op/test_stats_tiles.py", "tests/op/test_variants.py",
                  "tests/op/test_overflow_guards.py", "tests/op/test_epilogue.py",
                  "tests/op/test_layout.py", "tests/op/test_inplace_abn.py"]
# Dry run: a handful of those tests (each file's cheapest), so the pytest step is exercised in
# seconds; the GPU run takes every test of every file.
DRY_NUMERICS_K = "test_stride_zero_gradient or test_float16_near_limit"

# The kernels the memcheck script must launch (tritonbn.count_launches proves each ran).
KERNELS = ("bn_stats_partial_kernel", "bn_fwd_apply_kernel", "bn_fwd_onepass_kernel",
           "bn_bwd_partial_kernel", "bn_bwd_apply_kernel", "bn_bwd_onepass_kernel",
           "bn_merge_partials_kernel")

# The >2**31-element check: 129 x 64 x 512 x 512 = 2,164,260,864 float16 elements (4.3 GB,
# 16,777,216 past 2**31), so element offsets overflow 32 bits in the last sample.
BIG_SHAPE = (129, 64, 512, 512)
DRY_BIG_SHAPE = (3, 4, 5, 7)
# fp16 has a 2**-10 epsilon: one rounding of the output is at most half of it relative to the
# largest |value|, float32 statistics over 3e7 elements add ~1e-6. 4 epsilons leaves room for
# both; 32-bit offsets that wrapped would read or write other elements: errors of order 1.
BIG_TOL = 4 * 2.0**-10
# Running statistics (float32) against float64 ones: 1e-4 relative is float32 accumulation over
# 3e7 elements with partial sums, with margin; a missing or doubled tile moves them by >= 1e-3.
STATS_TOL = 1e-4

MODELLED_OPS = {"fwd_train": "fwd_train", "fwd_eval": "fwd_eval", "bwd": "bwd_train"}
TUNE_OPS = {"fwd_train": "fwd_train", "fwd_eval": "fwd_eval", "bwd": "bwd_train",
            "relu_fwd": "fwd_train", "relu_bwd": "bwd_train"}   # plans ignore the activation

# ResNet parity (see _parity): tritonbn's bfloat16 run may be at most twice as far from torch's
# float32 run as torch's own bfloat16 run is (two implementations rounding at different points
# land on different sides of torch's), plus floors for runs where torch's distance is ~0:
# 1e-3 of the loss, 1e-2 of the gradients (L2), a few bfloat16 roundings.
PARITY_FACTOR = 2.0
LOSS_FLOOR = 1e-3
GRAD_FLOOR = 1e-2


class Ctx:
    """One step's folder, result and deadline."""

    def __init__(self, name, out, stage, root, deadline, dry):
        self.name, self.out, self.stage, self.root = name, out, stage, root
        self.deadline, self.dry = deadline, dry
        self.result = {"step": name, "status": "running", "summary": {}, "outputs": [],
                       "notes": [], "dry_run": dry}
        os.makedirs(out, exist_ok=True)

    # -- time
    def left(self) -> float:
        return self.deadline - time.time()

    # -- results
    def note(self, text: str) -> None:
        print(f"[{self.name}] {text}", flush=True)
        self.result["notes"].append(text)

    def path(self, name: str) -> str:
        return os.path.join(self.out, name)

    def output(self, name: str) -> str:
        if name not in self.result["outputs"]:
            self.result["outputs"].append(name)
        return self.path(name)

    def write_json(self, name: str, data) -> str:
        path = self.output(name)
        _atomic_json(path, data)
        return path

    def save(self, status: str | None = None) -> None:
        if status is not None:
            self.result["status"] = status
        _atomic_json(self.path("result.json"), self.result)

    def earlier(self, step: str, name: str):
        """A JSON file an earlier step wrote (None if it is missing)."""
        path = os.path.join(self.stage, step, name)
        try:
            with open(path) as f:
                return json.load(f)
        except (OSError, ValueError):
            return None


def _atomic_json(path: str, data) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, default=str)
    os.replace(tmp, path)


def _gpu() -> bool:
    """Kernels compiled for a CUDA GPU (not the interpreter)."""
    import torch

    from tritonbn._runtime import cuda_interpreted
    return torch.cuda.is_available() and not cuda_interpreted()


def _sync() -> None:
    import torch
    if _gpu():
        torch.cuda.synchronize()


def _err(e: BaseException) -> str:
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}"


@functools.lru_cache(maxsize=None)
def _window():
    """bench/gpu_window.py, loaded by its path: it imports only the standard library (and a
    step run as a script need not import any package for it)."""
    import importlib.util
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gpu_window.py")
    spec = importlib.util.spec_from_file_location("_tritonbn_gpu_window", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module      # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _run_logged(ctx: Ctx, cmd: list, log_name: str, env=None, margin: float = 2.0) -> dict:
    """Run a command, its output to a log in the step's folder, killed (its whole process group)
    when the step's deadline comes ``margin`` seconds closer; returns rc, timed_out, seconds."""
    log = ctx.output(log_name)
    timeout = max(1.0, ctx.left() - margin)
    start = time.time()
    with open(log, "w") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        rc, timed_out = _window().run_in_group(cmd, f, ctx.root, env, timeout, _CHILDREN)
    return {"rc": rc, "timed_out": timed_out, "seconds": round(time.time() - start, 1),
            "log": log_name}


_CHILDREN: list = []     # processes this step started in sessions of their own


def _on_term(signum, frame):
    """The window kills a step that overran with SIGTERM (its process group): take the
    children started in sessions of their own (pytest, compute-sanitizer) along."""
    for proc in list(_CHILDREN):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    os._exit(128 + signum)


def _tool(name: str) -> str | None:
    """A CUDA tool on PATH or in the usual CUDA folders."""
    found = shutil.which(name)
    if found:
        return found
    import glob
    for pattern in ("/usr/local/cuda/bin", "/usr/local/cuda-*/bin", "/opt/cuda/bin",
                    "/usr/local/cuda/compute-sanitizer", "/usr/local/cuda-*/compute-sanitizer",
                    "/opt/nvidia/nsight-compute/*"):
        for d in sorted(glob.glob(pattern), reverse=True):
            if os.access(os.path.join(d, name), os.X_OK):
                return os.path.join(d, name)
    return None


def _first_line(cmd: list, timeout: float = 5, last: bool = False) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout).stdout
    except (OSError, subprocess.SubprocessError) as e:
        return f"not available ({type(e).__name__})"
    lines = [ln.strip() for ln in out.splitlines() if ln.strip()]
    return (lines[-1] if last else lines[0]) if lines else "no output"


# ------------------------------------------------------------------------------------ env

def step_env(ctx: Ctx) -> None:
    import importlib.metadata as md

    s = ctx.result["summary"]
    s["date"] = time.strftime("%Y-%m-%d")
    s["date_utc"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    s["python"] = f"{platform.python_version()} ({sys.executable})"
    s["host"] = {"cpus": os.cpu_count(), "machine": platform.machine(),
                 "cpu": _cpu_model(), "platform": platform.platform()}
    # nvidia-smi first: it says the most about the machine and needs no Python package
    smi = shutil.which("nvidia-smi")
    if smi and not ctx.dry:
        # nvidia-smi answers in about a second (a few without persistence mode)
        full = subprocess.run([smi], capture_output=True, text=True, timeout=10)
        with open(ctx.output("nvidia-smi.txt"), "w") as f:
            f.write(full.stdout + full.stderr)
        q = subprocess.run([smi, "--query-gpu=name,driver_version,memory.total,clocks.max.sm,"
                            "clocks.max.mem,power.limit,pstate,temperature.gpu,"
                            "compute_cap,persistence_mode", "--format=csv"],
                           capture_output=True, text=True, timeout=10)
        with open(ctx.output("nvidia-smi-query.csv"), "w") as f:
            f.write(q.stdout + q.stderr)
        rows = q.stdout.strip().splitlines()
        s["nvidia_smi"] = rows[1:] or q.stderr.strip()
        s["driver"] = rows[1].split(",")[1].strip() if len(rows) > 1 and "," in rows[1] \
            else "unknown"
    else:
        s["nvidia_smi"] = "not available" + (" (dry run)" if ctx.dry and smi else "")
        s["driver"] = "not available"
    ctx.save()
    versions = {}
    for pkg in ("torch", "triton", "numpy", "torchvision", "timm", "pytest", "matplotlib",
                "tritonbn", "setuptools"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = "not installed"
    s["versions"] = versions
    tools = {}
    for name, args, last in (("nvcc", ["--version"], True),
                             ("compute-sanitizer", ["--version"], False),
                             ("ncu", ["--version"], True), ("gcc", ["--version"], False)):
        path = _tool(name)
        tools[name] = (f"{_first_line([path, *args], last=last)} ({path})" if path
                       else "not available")
    s["tools"] = tools
    s["git"] = _git(ctx.root)
    s["source_digest"] = _source_digest(ctx.root)
    s["env"] = {k: v for k, v in os.environ.items()
                if k.startswith(("TRITON", "TORCH", "CUDA", "PYTORCH", "NVIDIA_"))}
    ctx.save()

    import tritonbn      # first: it decides whether the kernels run in the interpreter
    import torch
    import triton
    from tritonbn.tools.timing import machine_info
    s["versions"].update(torch_runtime=torch.__version__, triton_runtime=triton.__version__,
                         cuda=torch.version.cuda, tritonbn_runtime=tritonbn.__version__,
                         cudnn=(torch.backends.cudnn.version()
                                if torch.backends.cudnn.is_available() else None))
    s["tritonbn_file"] = tritonbn.__file__
    s["kernels_file"] = getattr(tritonbn.kernels, "__file__", None)
    info = machine_info()
    s["machine"] = info
    s["device"] = info["device"]
    s["device_slug"] = info["device_slug"]
    s["gpu"] = _gpu()
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        s["gpu_props"] = {"name": props.name, "sms": props.multi_processor_count,
                          "capability": f"{props.major}.{props.minor}",
                          "memory_gib": round(props.total_memory / 2**30, 1),
                          # the performance model assumes 60 MB on an H200: confirm it here
                          "l2_bytes": getattr(props, "L2_cache_size", None)}
        s["gpu_count"] = torch.cuda.device_count()
    from tritonbn._runtime import cpu_runs_kernels
    # the kernels the steps run: compiled on a GPU, else Triton's interpreter on CPU tensors
    # (unless CPU tensors were sent to the float64 reference path)
    s["interpreter"] = not s["gpu"] and cpu_runs_kernels()
    ctx.save("ok")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git(root: str) -> dict:
    if not os.path.exists(os.path.join(root, ".git")) or shutil.which("git") is None:
        return {"commit": "not a git repository (a copy of the working tree)"}
    try:
        run = lambda *a: subprocess.run(["git", *a], cwd=root, capture_output=True,  # noqa: E731
                                        text=True, timeout=20)
        head = run("rev-parse", "HEAD")
        if head.returncode != 0:
            return {"commit": f"git failed: {head.stderr.strip()[:200]}"}
        status = run("status", "--porcelain").stdout.splitlines()
        return {"commit": head.stdout.strip(), "branch": run("rev-parse", "--abbrev-ref",
                                                             "HEAD").stdout.strip(),
                "dirty_files": len(status), "dirty": status[:40]}
    except (OSError, subprocess.SubprocessError) as e:
        return {"commit": f"git failed: {_err(e)}"}


def _source_digest(root: str) -> str:
    """sha256 of the package and kernel sources: names the code a copy without git ran."""
    import hashlib
    h = hashlib.sha256()
    for top in ("tritonbn", "kernels"):
        for dirpath, dirnames, files in sorted(os.walk(os.path.join(root, top))):
            dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
            for name in sorted(files):
                if name.endswith((".py", ".c")):
                    path = os.path.join(dirpath, name)
                    h.update(os.path.relpath(path, root).encode())
                    with open(path, "rb") as f:
                        h.update(f.read())
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------------- pytest

_OUTCOME = re.compile(r"^(\S+::\S.*?) (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)\b")
_TOTALS = re.compile(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed|deselected)")


def parse_pytest(text: str) -> dict:
    """Counts per outcome from a ``pytest -v`` log (complete or cut), the failures, and the
    kernel-launch table the project's conftest prints."""
    counts: dict = {}
    failed = []
    for line in text.splitlines():
        m = _OUTCOME.match(line)
        if m:
            counts[m.group(2).lower()] = counts.get(m.group(2).lower(), 0) + 1
            if m.group(2) in ("FAILED", "ERROR"):
                failed.append(m.group(1))
    reasons = [ln[:300] for ln in text.splitlines() if ln.startswith(("FAILED ", "ERROR "))]
    final = [ln for ln in text.splitlines() if re.match(r"^=+ .*(passed|failed|error|skipped|"
                                                        r"deselected|no tests ran).* =+$", ln)]
    totals = {}
    if final:
        for n, what in _TOTALS.findall(final[-1]):
            totals["errors" if what.startswith("error") else what] = int(n)
    launches = {}
    if "Triton kernel launches in this run" in text:
        block = text.split("Triton kernel launches in this run", 1)[1].splitlines()[1:]
        for line in block:
            m = re.match(r"^(bn_\w+)\s+(\d+)$", line.strip())
            if m:
                launches[m.group(1)] = int(m.group(2))
            elif line.strip() and not line.startswith("="):
                break
    return {"counts": counts, "failed": failed[:50], "reasons": reasons[:30],
            "totals": totals, "finished": bool(final), "launches": launches}


def _pytest(ctx: Ctx, args: list, log: str) -> None:
    if not os.path.isdir(os.path.join(ctx.root, "tests")):
        ctx.note(f"no tests/ folder in {ctx.root}: nothing to run")
        ctx.save("failed")
        return
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-v", "-rfE",
           "--durations=10", "--junitxml", ctx.path("junit.xml"), *args]
    run = _run_logged(ctx, cmd, log)
    with open(ctx.path(log)) as f:
        parsed = parse_pytest(f.read())
    if os.path.exists(ctx.path("junit.xml")):
        ctx.output("junit.xml")
    ctx.result["summary"].update(run, **parsed)
    if run["timed_out"]:
        ctx.note(f"cut at the step's budget after {run['seconds']} s: "
                 f"{parsed['counts']} so far")
        status = "partial"
    elif run["rc"] == 0:
        status = "ok"
    elif run["rc"] == 5:          # pytest: no tests collected
        status = "failed"
        ctx.note("pytest collected no tests")
    else:
        status = "failed"
    ctx.save(status)


def step_pytest_cuda(ctx: Ctx) -> None:
    """The tests marked cuda (skipped without a GPU): real compiled kernels on shapes that take
    the split path, host-sync-free modules."""
    # only the files that use the marker: collecting the whole suite imports every model
    # zoo test's dependencies for nothing. -m cuda replaces pyproject's "not slow and not zoo".
    files = []
    for dirpath, dirnames, names in os.walk(os.path.join(ctx.root, "tests")):
        dirnames.sort()
        for n in sorted(names):
            if n.startswith("test") and n.endswith(".py"):
                with open(os.path.join(dirpath, n), errors="replace") as f:
                    if "mark.cuda" in f.read():
                        files.append(os.path.relpath(os.path.join(dirpath, n), ctx.root))
    ctx.result["summary"]["files"] = files
    _pytest(ctx, ["-m", "cuda", *(files or ["tests"])], "pytest.log")
    c = ctx.result["summary"]
    if ctx.result["status"] == "ok" and not ctx.dry and not c["counts"].get("passed"):
        ctx.note("no cuda test passed: they were all skipped (no GPU seen by pytest?)")
        ctx.save("failed")


def step_pytest_numerics(ctx: Ctx) -> None:
    """The numerics-relevant test files again, on the GPU (the device fixture gives "cuda")."""
    files = [f for f in NUMERICS_TESTS if os.path.exists(os.path.join(ctx.root, f))]
    missing = sorted(set(NUMERICS_TESTS) - set(files))
    if missing:
        ctx.note(f"test files not found (skipped): {missing}")
    args = list(files)
    if ctx.dry:
        args += ["-k", DRY_NUMERICS_K]
    _pytest(ctx, args, "pytest.log")
    ctx.result["summary"]["files"] = files


# ---------------------------------------------------------------------------------- int64

def step_int64(ctx: Ctx) -> None:
    """A > 2**31-element float16 tensor through training forward and backward, each layout,
    against float64 per-channel statistics computed in chunks: 64-bit element offsets."""
    import torch

    import tritonbn
    from tritonbn import launch, plan as planner

    gpu = _gpu()
    device = "cuda" if gpu else "cpu"
    shape = BIG_SHAPE if gpu else DRY_BIG_SHAPE
    numel = math.prod(shape)
    s = ctx.result["summary"]
    s.update(shape="x".join(map(str, shape)), numel=numel, over_2_31=numel > 2**31,
             device=device, cases=[])
    if not gpu:
        ctx.note("no GPU: a tiny tensor with the 64-bit offset plan forced (use_int64=True) "
                 "in the interpreter; the real check needs > 2**31 elements on a GPU")
    # the dry run forces 64-bit offsets (a forced_plan context is single-use: one per case)
    force = (lambda: planner.forced_plan()) if gpu else (
        lambda: planner.forced_plan(use_int64=True))
    ok = True
    for layout in ("contiguous", "channels_last"):
        if ctx.left() < 3:
            ctx.note(f"{layout}: not run, the step's budget ended")
            ok = False
            break
        case = {"layout": layout}
        s["cases"].append(case)
        try:
            with force():
                case.update(_int64_case(shape, layout, device, gpu, launch, tritonbn, torch))
        except Exception as e:  # a failure is the finding; the other layout still runs
            case["error"] = _err(e)
            traceback.print_exc()
        case_ok = "error" not in case and case.get("ok", False)
        ok &= case_ok
        ctx.note(f"{layout}: {'ok' if case_ok else 'FAILED'} {json.dumps(case)}")
        ctx.save()
        if gpu:
            torch.cuda.empty_cache()
    ctx.save("ok" if ok else "failed")


def _int64_case(shape, layout, device, gpu, launch, tritonbn, torch) -> dict:
    c = shape[1]
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    gen = torch.Generator(device=device).manual_seed(7)
    t0 = time.time()
    x = torch.empty(shape, dtype=torch.float16, device=device, memory_format=fmt)
    x.normal_(generator=gen)
    shift = torch.linspace(-2, 2, c, device=device, dtype=torch.float16).view(1, c, 1, 1)
    x.mul_(1.5).add_(shift)                       # channel-dependent statistics
    _, plan, _ = launch.plan_for("fwd_train", x)
    w = torch.linspace(0.5, 1.5, c, device=device, requires_grad=True)
    b = torch.linspace(-0.5, 0.5, c, device=device, requires_grad=True)
    rm, rv = torch.zeros(c, device=device), torch.ones(c, device=device)
    xi = x.requires_grad_()
    with tritonbn.count_launches() as launches:
        y = tritonbn.batch_norm(xi, rm, rv, w, b, training=True, momentum=0.1, eps=1e-5)
        _sync()
    out = {"plan": f"{plan.variant} n{plan.block_n} s{plan.block_s} c{plan.block_c} "
                   f"x{plan.splits} w{plan.num_warps}", "use_int64": plan.use_int64}
    # float64 statistics in chunks of samples (a float64 copy of the whole would be 17 GB)
    mean, var, m = _chunked_stats(x.detach(), torch)
    invstd = 1.0 / torch.sqrt(var + 1e-5)
    out["running_mean_err"] = _rel(rm.double(), 0.1 * mean, torch)
    out["running_var_err"] = _rel(rv.double(), 0.9 + 0.1 * var * m / (m - 1), torch)
    w64, b64 = w.detach().double(), b.detach().double()
    y_err, tail = _chunked_err(y.detach(), x.detach(), lambda xc: (
        (xc - _bc(mean)) * _bc(invstd * w64) + _bc(b64)), torch)
    out["y_err"], out["y_err_last_sample"] = y_err, tail
    dy = torch.empty(shape, dtype=torch.float16, device=device, memory_format=fmt)
    dy.normal_(generator=gen)
    with tritonbn.count_launches() as back:
        y.backward(dy)
        _sync()
    dx = xi.grad
    del y
    # dx = w invstd (dy - mean(dy) - xhat mean(dy xhat)); dw = sum(dy xhat); db = sum(dy)
    sum_dy, sum_dyx = _chunked_sums(x.detach(), dy, mean, invstd, torch)
    dx_err, dx_tail = _chunked_err(dx, x.detach(), None, torch, dy=dy, coef=(
        mean, invstd, w64, sum_dy / m, sum_dyx / m))
    out["dx_err"], out["dx_err_last_sample"] = dx_err, dx_tail
    out["dw_err"] = _rel(w.grad.double(), sum_dyx, torch)
    out["db_err"] = _rel(b.grad.double(), sum_dy, torch)
    out["launches"] = dict(launches + back)
    out["seconds"] = round(time.time() - t0, 1)
    out["ok"] = bool(out["use_int64"] and max(y_err, dx_err) <= BIG_TOL
                     and max(out["running_mean_err"], out["running_var_err"], out["dw_err"],
                             out["db_err"]) <= STATS_TOL * 10
                     and sum(out["launches"].values()) >= 2)
    out["tolerance"] = {"y, dx (relative to max |ref|)": BIG_TOL,
                        "statistics and parameter gradients": STATS_TOL * 10}
    return out


def _bc(v):
    return v.view(1, -1, 1, 1)


def _rel(a, ref, torch) -> float:
    return float((a - ref).abs().max() / ref.abs().max().clamp(min=1e-12))


def _chunks(n: int, numel_per_sample: int):
    # ~1 GB of float64 per chunk
    k = max(1, (1 << 27) // max(1, numel_per_sample))
    return [(i, min(n, i + k)) for i in range(0, n, k)]


def _chunked_stats(x, torch):
    n = x.shape[0]
    per = x[0].numel()
    c = x.shape[1]
    s1 = torch.zeros(c, dtype=torch.float64, device=x.device)
    for i, j in _chunks(n, per):
        s1 += x[i:j].double().sum(dim=(0, 2, 3))
    m = n * per // c
    mean = s1 / m
    s2 = torch.zeros_like(s1)
    for i, j in _chunks(n, per):
        s2 += ((x[i:j].double() - _bc(mean)) ** 2).sum(dim=(0, 2, 3))
    return mean, s2 / m, m


def _chunked_sums(x, dy, mean, invstd, torch):
    n, per = x.shape[0], x[0].numel()
    s_dy = torch.zeros_like(mean)
    s_dyx = torch.zeros_like(mean)
    for i, j in _chunks(n, per):
        d = dy[i:j].double()
        s_dy += d.sum(dim=(0, 2, 3))
        s_dyx += (d * (x[i:j].double() - _bc(mean)) * _bc(invstd)).sum(dim=(0, 2, 3))
    return s_dy, s_dyx


def _chunked_err(out, x, ref_fn, torch, dy=None, coef=None):
    """max |out - ref| / max |ref| over the whole tensor, and the same over the last sample
    (where offsets pass 2**31)."""
    n, per = x.shape[0], x[0].numel()
    num = den = 0.0
    tail = None
    for i, j in _chunks(n, per):
        xc = x[i:j].double()
        if dy is None:
            ref = ref_fn(xc)
        else:
            mean, invstd, w, m_dy, m_dyx = coef
            xhat = (xc - _bc(mean)) * _bc(invstd)
            ref = _bc(w * invstd) * (dy[i:j].double() - _bc(m_dy) - xhat * _bc(m_dyx))
        diff = (out[i:j].double() - ref).abs()
        num, den = max(num, float(diff.max())), max(den, float(ref.abs().max()))
        if j == n:
            tail = float(diff[-1].max() / ref[-1].abs().max().clamp(min=1e-12))
    return num / max(den, 1e-12), tail


# ------------------------------------------------------------------------------- memcheck

def step_memcheck(ctx: Ctx) -> None:
    """compute-sanitizer --tool memcheck on a script that launches every kernel once (on odd
    shapes, both layouts); without the sanitizer (or a GPU) the script runs alone."""
    s = ctx.result["summary"]
    sanitizer = _tool("compute-sanitizer")
    inner = os.path.join(ctx.out, "kernels")
    script = [sys.executable, os.path.abspath(__file__), "memcheck_kernels",
              "--out", inner, "--stage", ctx.stage, "--root", ctx.root,
              "--deadline", str(ctx.deadline - 3)] + (["--dry-run"] if ctx.dry else [])
    env = dict(os.environ)
    # the caching allocator hands out slices of big blocks: an overrun into a neighbouring
    # slice is invisible to memcheck unless every tensor is its own allocation
    env["PYTORCH_NO_CUDA_MEMORY_CACHING"] = "1"
    if sanitizer and not ctx.dry and _has_cuda_device():
        s["sanitizer"] = sanitizer
        cmd = [sanitizer, "--tool", "memcheck", "--print-limit", "200", *script]
    else:
        s["sanitizer"] = "not available" + (" (dry run)" if ctx.dry else
                                            "" if sanitizer else ": compute-sanitizer not found")
        ctx.note(f"compute-sanitizer {s['sanitizer']}: the kernel script runs without it")
        cmd = script
    run = _run_logged(ctx, cmd, "memcheck.log", env=env)
    s.update(run)
    with open(ctx.path("memcheck.log"), errors="replace") as f:
        text = f.read()
    m = re.search(r"ERROR SUMMARY: (\d+) error", text)
    s["sanitizer_errors"] = int(m.group(1)) if m else None
    inner_result = None
    try:
        with open(os.path.join(inner, "result.json")) as f:
            inner_result = json.load(f)
    except (OSError, ValueError):
        pass
    s["kernels"] = inner_result["summary"] if inner_result else None
    if inner_result:
        ctx.output("kernels/result.json")
    launched = set((inner_result or {}).get("summary", {}).get("launches", {}))
    s["missing_kernels"] = sorted(set(KERNELS) - launched)
    ok = (not run["timed_out"] and run["rc"] == 0 and inner_result is not None
          and inner_result["status"] == "ok" and not s["missing_kernels"]
          and (s["sanitizer_errors"] in (0, None) if "not available" in s["sanitizer"]
               else s["sanitizer_errors"] == 0))
    if run["timed_out"]:
        ctx.save("partial")
        return
    ctx.save("ok" if ok else "failed")


def _has_cuda_device() -> bool:
    import torch
    return torch.cuda.is_available()


def memcheck_cases():
    """(name, shape, dtype, layout, forced plan fields, activation): every kernel at least once,
    on shapes whose tiles overhang the plane (N, S and C not multiples of the blocks)."""
    return [
        ("onepass", (6, 5, 7, 9), "float16", "contiguous", dict(variant="onepass"), None),
        ("onepass relu", (6, 5, 7, 9), "bfloat16", "channels_last", dict(variant="onepass"),
         "relu"),
        ("split", (6, 5, 7, 9), "float16", "contiguous",
         dict(variant="split", block_n=2, block_s=16, splits=3), None),
        ("split", (6, 5, 7, 9), "float32", "channels_last",
         dict(variant="split", block_n=2, block_s=16, splits=3), "relu"),
        # 9 splits x a 128-channel block = 1,152 partials > MERGE_IN_APPLY (1,024): the
        # partials are merged in a launch of their own (channels-last folds N into the rows:
        # 18 rows in tiles of 2)
        ("merge", (2, 128, 3, 3), "float16", "channels_last",
         dict(variant="split", block_n=1, block_s=2, block_c=128, splits=9), None),
        ("heuristic 2-D", (33, 17), "float16", "contiguous", None, None),
    ]


def step_memcheck_kernels(ctx: Ctx) -> None:
    """The script compute-sanitizer runs: each case's training forward, backward and eval
    forward, checked against the float64 reference; launches counted per kernel."""
    import torch

    import tritonbn
    from tritonbn import plan as planner
    from tritonbn.tools.shapes import DTYPES, in_layout

    device = "cuda" if torch.cuda.is_available() and not ctx.dry else "cpu"
    s = ctx.result["summary"]
    s["device"], s["cases"] = device, []
    total = {}
    ok = True
    for name, shape, dtype, layout, plan, act in memcheck_cases():
        case = {"case": name, "shape": list(shape), "dtype": dtype, "layout": layout}
        s["cases"].append(case)
        try:
            g = torch.Generator().manual_seed(3)
            x = in_layout((torch.randn(shape, generator=g) * 2 + 0.5).to(DTYPES[dtype]),
                          layout).to(device).requires_grad_()
            dy = in_layout(torch.randn(shape, generator=g).to(DTYPES[dtype]), layout).to(device)
            c = shape[1]
            w = torch.linspace(0.5, 1.5, c, device=device).requires_grad_()
            b = torch.linspace(-0.5, 0.5, c, device=device).requires_grad_()
            rm, rv = torch.zeros(c, device=device), torch.ones(c, device=device)
            with (planner.forced_plan(**plan) if plan else planner.forced_plan()), \
                    tritonbn.count_launches() as launches:
                y = tritonbn.batch_norm(x, rm, rv, w, b, training=True, activation=act)
                y.backward(dy)
                y_eval = tritonbn.batch_norm(x.detach(), rm, rv, w.detach(), b.detach(),
                                             activation=act)
                if device == "cuda":
                    torch.cuda.synchronize()
            x64 = x.detach().double().requires_grad_()
            w64 = w.detach().double().requires_grad_()
            b64 = b.detach().double().requires_grad_()
            y64 = torch.nn.functional.batch_norm(x64, None, None, w64, b64, training=True)
            if act == "relu":
                y64 = torch.relu(y64)
            y64.backward(dy.double())
            e64 = torch.nn.functional.batch_norm(x64.detach(), rm.double(), rv.double(),
                                                 w64.detach(), b64.detach())
            if act == "relu":
                e64 = torch.relu(e64)
            scale = lambda t: float(t.abs().max().clamp(min=1.0))  # noqa: E731
            y, y64 = y.detach(), y64.detach()
            case["y_err"] = float((y.double() - y64).abs().max()) / scale(y64)
            case["dx_err"] = float((x.grad.double() - x64.grad).abs().max()) / scale(x64.grad)
            case["eval_err"] = float((y_eval.double() - e64).abs().max()) / scale(e64)
            case["launches"] = dict(launches)
            # float16/bfloat16 outputs: 4 units of their epsilon (2**-10, 2**-7) relative to
            # the largest value (one rounding is half a unit); float32: 1e-4. A mis-tiled or
            # overrunning kernel is off by order 1.
            tol = {"float16": 4 * 2.0**-10, "bfloat16": 4 * 2.0**-7, "float32": 1e-4}[dtype]
            case["ok"] = max(case["y_err"], case["dx_err"], case["eval_err"]) <= tol \
                and bool(launches)
            for k, v in launches.items():
                total[k] = total.get(k, 0) + v
        except Exception as e:
            case["error"] = _err(e)
            case["ok"] = False
            traceback.print_exc()
        ok &= case["ok"]
        print(f"[memcheck] {json.dumps(case)}", flush=True)
        s["launches"] = total
        ctx.save()
    s["missing_kernels"] = sorted(set(KERNELS) - set(total))
    if s["missing_kernels"]:
        ctx.note(f"kernels never launched: {s['missing_kernels']}")
    ctx.save("ok" if ok and not s["missing_kernels"] else "failed")


# ---------------------------------------------------------------------------------- bench

def _bench_loop(ctx: Ctx, runs: list, impls: list, ops) -> None:
    """runs: [(shape, layouts, dtypes)]; one run_bench call each, the rows kept after each."""
    from tritonbn.tools import bench, bench_report as report
    from tritonbn.tools.shapes import smoke_shape
    from tritonbn.tools.timing import make_timer, smoke_mode

    smoke = smoke_mode()
    # do_bench uses 25 / 100 ms; 10 / 40 ms still gives >= 5 repetitions of the largest
    # tensors (~1 ms) and keeps a case near 0.1 s. Smoke mode: one timed call per measurement.
    timer = make_timer(warmup_ms=10, rep_ms=40, smoke_reps=1)
    s = ctx.result["summary"]
    s.update(smoke=smoke, impls=impls, ops=list(ops), done=[], not_run=[], seconds=[])
    rows, meta = [], None
    for i, (shape, layouts, dtypes) in enumerate(runs):
        if smoke:
            shape = smoke_shape(shape)
        label = f"{'x'.join(map(str, shape))} {','.join(layouts)} {','.join(dtypes)}"
        took = s["seconds"]
        # stop before a run that would not finish: the mean of the runs so far (the first
        # paid the kernels' compiles, so this errs long), plus 2 s to write the files
        if took and ctx.left() < statistics.mean(took) + 2:
            s["not_run"] += [f"{'x'.join(map(str, sh))} {','.join(la)} {','.join(dt)}"
                             for sh, la, dt in runs[i:]]
            ctx.note(f"budget: {len(runs) - i} runs not started ({ctx.left():.0f} s left)")
            break
        t0 = time.time()
        try:
            result = bench.run_bench([shape], ops, dtypes, layouts, impls, timer)
        except Exception as e:
            ctx.note(f"{label}: {_err(e)}")
            traceback.print_exc()
            s.setdefault("errors", []).append(f"{label}: {_err(e)}")
            ctx.save()
            continue
        took.append(round(time.time() - t0, 1))
        rows += result["rows"]
        meta = meta or result["meta"]
        meta.setdefault("host_overhead_runs", []).append(result["meta"].get("host_overhead_us"))
        s["done"].append(label)
        combined = {"meta": meta, "rows": rows}
        ctx.write_json("bench_rows.json", combined)
        try:
            for p in report.write(combined, ctx.out, plot=False):
                ctx.output(os.path.basename(p))
        except Exception as e:  # the rows above are kept either way
            ctx.note(f"report: {_err(e)}")
        s["rows"] = len(rows)
        s["row_errors"] = [f"{r['impl']} {r['op']} {r['shape']} {r['layout']} {r['dtype']}: "
                           f"{r['error']}" for r in rows if "error" in r][:20]
        ctx.save()
    if not rows:
        ctx.save("failed")
        return
    # every tritonbn row must have a time: an error there is a failure, not a peer's finding
    ours_bad = [r for r in rows if r["impl"] == "tritonbn" and "time_us" not in r]
    if ours_bad:
        ctx.note(f"{len(ours_bad)} tritonbn rows without a time")
    ctx.save("failed" if ours_bad else ("partial" if s["not_run"] else "ok"))


def step_bench(ctx: Ctx) -> None:
    """tritonbn against torch eager on the headline set, with the same-run copy yardstick."""
    from tritonbn.tools.bench import OPS
    shapes = HEADLINE_SHAPES[:1] if ctx.dry else HEADLINE_SHAPES
    dtypes = HEADLINE_DTYPES
    _bench_loop(ctx, [(s, ("contiguous", "channels_last"), dtypes) for s in shapes],
                ["tritonbn", "torch"], OPS)


def step_bench_compile(ctx: Ctx) -> None:
    """tritonbn against torch.compile (inductor; aot_eager in the dry run) on fewer cases."""
    shapes = COMPILE_SHAPES[:1] if ctx.dry else COMPILE_SHAPES
    cases = COMPILE_CASES[:1] if ctx.dry else COMPILE_CASES
    ops = ("fwd_train",) if ctx.dry else COMPILE_OPS
    _bench_loop(ctx, [(s, (lay,), (dt,)) for s in shapes for lay, dt in cases],
                ["tritonbn", "torch.compile"], ops)


# ----------------------------------------------------------------------------------- host

def step_host(ctx: Ctx) -> None:
    """Host time per call: ``python -m bench.host`` (bench/host.py). On a GPU it
    measures real launches; without one it builds a do-nothing libcuda and runs against it."""
    from bench import host
    # GPU: 300 calls x 3 rounds per figure is ~1 s of calls; the compiled-model row is left
    # out (inductor's first compile alone would take the step's budget)
    args = ["--calls", "10", "--rounds", "1"] if ctx.dry else ["--calls", "300", "--rounds",
                                                               "3"]
    args += ["--no-compile", "--json", ctx.output("host.json")]
    ctx.result["summary"]["argv"] = ["python", "-m", "bench.host", *args]
    sys.stdout.flush()
    rc = host.main(args)
    sys.stdout.flush()
    try:
        with open(ctx.path("host.json")) as f:
            data = json.load(f)
        ctx.result["summary"]["rows"] = data.get("rows")
        ctx.result["summary"]["device"] = data.get("device")
    except (OSError, ValueError):
        ctx.result["outputs"].remove("host.json")
        ctx.note("host.json was not written")
        rc = rc or 1
    ctx.result["summary"]["rc"] = rc
    ctx.save("ok" if rc == 0 else "failed")


# ------------------------------------------------------------------------------- resnet

def _resnet(dry: bool):
    """(model factory, batch sizes, image size, description). ResNet-50 on a GPU; in the dry
    run a stem and one torchvision BasicBlock with a downsample (4 batch norms: BN -> ReLU,
    BN -> add -> ReLU and the downsample's BN, the patterns fuse rewrites in ResNet-50)."""
    try:
        import torchvision
        from torchvision.models.resnet import BasicBlock, conv1x1
    except Exception as e:  # torchvision missing or built for another torch
        if not dry:
            raise
        return (_tiny_resnet, (2,), 32,
                f"a stem and one basic block built here (torchvision not importable: {_err(e)})")
    if dry:
        def factory():
            import torch.nn as nn
            return nn.Sequential(
                nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(inplace=True),
                BasicBlock(16, 32, stride=2, downsample=nn.Sequential(conv1x1(16, 32, 2),
                                                                      nn.BatchNorm2d(32))),
                nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))
        return (factory, (2,), 32, "a stem and one torchvision BasicBlock with downsample "
                                   "(4 batch norms), 10 classes")
    return (lambda: torchvision.models.resnet50(weights=None), (64, 256), 224,
            "torchvision resnet50, 1000 classes, random weights")


def _tiny_resnet():
    import torch.nn as nn

    class Block(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.relu = nn.ReLU(inplace=True)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                            nn.BatchNorm2d(cout))

        def forward(self, x):
            identity = self.downsample(x)
            out = self.relu(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
            return self.relu(out + identity)

    return nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16),
                         nn.ReLU(inplace=True), Block(16, 32, 2), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(32, 10))


def _variant(name: str, base):
    import tritonbn
    model = copy.deepcopy(base)
    if name == "torch":
        return model
    if name == "convert":
        return tritonbn.convert_model(model)
    if name == "fuse":
        return tritonbn.fuse(model)
    raise ValueError(name)


def _train_step(model, opt, images, labels, device):
    import torch
    import torch.nn.functional as F
    with torch.autocast(device_type=device, dtype=torch.bfloat16):
        loss = F.cross_entropy(model(images), labels)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss


def _grads(model, images, labels, device, amp: bool = True):
    """Loss, gradients by parameter name, and logits of one forward + backward (no step)."""
    import torch
    import torch.nn.functional as F
    model.zero_grad(set_to_none=True)
    with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=amp):
        logits = model(images)
        loss = F.cross_entropy(logits, labels)
    loss.backward()
    # a compiled model's parameters are named "_orig_mod.<name>"
    grads = {n.removeprefix("_orig_mod."): p.grad.detach().float().clone()
             for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return float(loss.detach()), grads, logits.detach().float()


def _distance(ref, got) -> dict:
    """How far one forward + backward (got) is from another (ref): loss, gradients (relative
    L2 over all parameters, and the worst parameter), logits."""
    loss_r, g_r, out_r = ref
    loss, g, out = got
    common = sorted(set(g_r) & set(g))
    num = sum(float((g[n] - g_r[n]).pow(2).sum()) for n in common)
    den = sum(float(g_r[n].pow(2).sum()) for n in common)
    worst = max(((float((g[n] - g_r[n]).norm() / g_r[n].norm().clamp(min=1e-12)), n)
                 for n in common), default=(float("nan"), None))
    return {"loss_rel_diff": abs(loss - loss_r) / max(abs(loss_r), 1e-12),
            "grad_rel_l2": math.sqrt(num / den) if den else float("nan"),
            "worst_param_rel_l2": worst[0], "worst_param": worst[1],
            "logits_rel_max": float((out - out_r).abs().max() / out_r.abs().max().clamp(
                min=1e-12)),
            "params_compared": len(common), "params_ref": len(g_r)}


def _parity(ref32, torch16, got) -> dict:
    """bfloat16 autocast moves a ResNet's loss and gradients away from float32 by far more than
    any batch-norm detail (seen on the dry run's model: torch's own bfloat16 gradients are 20%
    to 190% (L2) from its float32 ones), so tritonbn is held to torch's own distance: its
    bfloat16 run may be at most PARITY_FACTOR times as far from torch's float32 run as torch's
    bfloat16 run is, plus a floor. A wrong batch norm (a term missing, statistics off) moves
    them by orders of magnitude more."""
    mine, theirs = _distance(ref32, got), _distance(ref32, torch16)
    p = {"loss": got[0], "loss_torch_bf16": torch16[0], "loss_torch_fp32": ref32[0],
         "loss_rel_diff": mine["loss_rel_diff"], "grad_rel_l2": mine["grad_rel_l2"],
         "torch_bf16_loss_rel_diff": theirs["loss_rel_diff"],
         "torch_bf16_grad_rel_l2": theirs["grad_rel_l2"],
         "worst_param": mine["worst_param"], "worst_param_rel_l2": mine["worst_param_rel_l2"],
         "logits_rel_max": mine["logits_rel_max"],
         "params_compared": mine["params_compared"], "params_torch": mine["params_ref"],
         "vs_torch_bf16": _distance(torch16, got)}
    p["ok"] = bool(
        p["loss_rel_diff"] <= PARITY_FACTOR * theirs["loss_rel_diff"] + LOSS_FLOOR
        and p["grad_rel_l2"] <= PARITY_FACTOR * theirs["grad_rel_l2"] + GRAD_FLOOR
        and mine["params_compared"] == mine["params_ref"])
    return p


def _time_steps(model, images, labels, device, warmup: int, steps: int) -> dict:
    """Median step time: CUDA events around each step on a GPU (the warm-up steps, which
    compile, excluded), the wall clock otherwise."""
    import torch
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    t0 = time.time()
    for _ in range(warmup):
        _train_step(model, opt, images, labels, device)
        _sync()
    warm_s = time.time() - t0
    times = []
    if device == "cuda":
        ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(steps)]
        for a, b in ev:
            a.record()
            _train_step(model, opt, images, labels, device)
            b.record()
        torch.cuda.synchronize()
        times = [a.elapsed_time(b) for a, b in ev]
    else:
        for _ in range(steps):
            t = time.perf_counter()
            _train_step(model, opt, images, labels, device)
            times.append((time.perf_counter() - t) * 1e3)
    med = statistics.median(times)
    return {"step_ms": round(med, 3), "step_ms_min": round(min(times), 3), "steps": steps,
            "warmup": warmup, "warmup_s": round(warm_s, 2),
            "images_per_s": round(images.shape[0] / med * 1e3, 1)}


def _resnet_step(ctx: Ctx, compiled: bool) -> None:
    import torch

    import tritonbn

    gpu = _gpu()
    device = "cuda" if gpu else "cpu"
    factory, batches, size, what = _resnet(ctx.dry or not gpu)
    backend = "inductor" if gpu else "aot_eager"
    s = ctx.result["summary"]
    s.update(model=what, device=device, image_size=size, autocast="bfloat16",
             memory_format="channels_last", compiled=compiled,
             compile_backend=backend if compiled else None, runs=[], not_run=[],
             parity_rule=f"distance to torch float32 <= {PARITY_FACTOR} x torch bfloat16's "
                         f"+ {LOSS_FLOOR} (loss) / {GRAD_FLOOR} (gradients, L2)")
    # GPU: 3 warm-up steps (cuDNN autotuning, allocator growth; the parity pass before them
    # already compiled), then 10 timed. Dry run: the parity pass is the warm-up, 1 timed step.
    warmup, steps = (3, 10) if gpu else (0, 1)
    variants = ("fuse", "torch", "convert") if compiled else ("torch", "convert", "fuse")
    if compiled and not gpu:
        variants = variants[:1]     # the dry run: one tritonbn variant compiled is the path
    if compiled:
        batches = tuple(sorted(batches, reverse=True))    # batch 256 first: the headline
    torch.manual_seed(0)
    base = factory().to(device, memory_format=torch.channels_last).train()
    ok = True
    refs: dict = {}
    plan = [(bs, v) for bs in batches for v in variants]
    for k, (bs, name) in enumerate(plan):
        if ctx.left() < 2:
            s["not_run"] += [f"{v} batch {b}" for b, v in plan[k:]]
            ctx.note(f"budget: {len(plan) - k} runs not started")
            break
        g = torch.Generator(device="cpu").manual_seed(bs)
        images = torch.randn(bs, 3, size, size, generator=g).to(
            device, memory_format=torch.channels_last)
        labels = torch.randint(0, 10, (bs,), generator=g).to(device)
        run = {"variant": name, "batch": bs, "compiled": compiled}
        s["runs"].append(run)
        try:
            if bs not in refs:      # torch eager, float32 and bfloat16: the yardsticks
                refs[bs] = (_grads(copy.deepcopy(base), images, labels, device, amp=False),
                            _grads(copy.deepcopy(base), images, labels, device))
            model = _variant(name, base)
            run["tritonbn_layers"] = sum(type(m).__module__.startswith("tritonbn")
                                         for m in model.modules())
            if compiled:
                torch._dynamo.reset()
                model = torch.compile(model, backend=backend)
            t0 = time.time()
            with tritonbn.count_launches() as launches:
                got = _grads(model, images, labels, device)
                _sync()
            run["first_call_s"] = round(time.time() - t0, 2)
            run["launches"] = sum(launches.values())
            run["parity"] = _parity(*refs[bs], got)
            if name != "torch" and not run["launches"]:
                run["parity"]["ok"] = False
                ctx.note(f"{name} batch {bs}: no tritonbn kernel ran")
            ctx.save()
            run.update(_time_steps(model, images, labels, device, warmup, steps))
            del model
        except Exception as e:
            run["error"] = _err(e)
            traceback.print_exc()
        run_ok = "error" not in run and run.get("parity", {}).get("ok", False)
        ok &= run_ok
        ctx.note(f"{name} batch {bs}{' compiled' if compiled else ''}: "
                 f"{'ok' if run_ok else 'FAILED'} "
                 f"{json.dumps({k: v for k, v in run.items() if k != 'parity'})}")
        ctx.save()
        del images, labels
        if gpu:
            torch.cuda.empty_cache()
    # step time relative to torch's at the same batch (and, compiled, to torch eager's from
    # the eager step)
    eager = ctx.earlier("resnet", "result.json") if compiled else None
    for run in s["runs"]:
        same = [r for r in s["runs"] if r["batch"] == run["batch"] and r["variant"] == "torch"
                and "step_ms" in r]
        if same and "step_ms" in run:
            run["vs_torch"] = round(same[0]["step_ms"] / run["step_ms"], 3)
        if eager and "step_ms" in run:
            base_runs = [r for r in eager["summary"].get("runs", []) if r["batch"] == run[
                "batch"] and r["variant"] == "torch" and "step_ms" in r]
            if base_runs:
                run["vs_torch_eager"] = round(base_runs[0]["step_ms"] / run["step_ms"], 3)
    ctx.save("failed" if not ok else ("partial" if s["not_run"] else "ok"))


def step_resnet(ctx: Ctx) -> None:
    """One training step of a ResNet (ResNet-50, batch 64 and 256, channels_last, bfloat16
    autocast) with torch's batch norm, tritonbn.convert_model and tritonbn.fuse, eager."""
    _resnet_step(ctx, compiled=False)


def step_resnet_compiled(ctx: Ctx) -> None:
    """The same under torch.compile (inductor on a GPU)."""
    _resnet_step(ctx, compiled=True)


# ------------------------------------------------------------------------------- memory

# Activation memory (bench/memory.py) of torchvision's ResNet-50 with LeakyReLU(0.01): torch
# eager, tritonbn.fuse and tritonbn.fuse(model, inplace=True) -- the in-place activated batch
# norm, whose saved bytes must be at most MEMORY_TARGET of torch eager's on the same model --
# and torch's ReLU model for reference. On the GPU: 224x224 images, batch 32, with
# torch.cuda.max_memory_allocated over one training step (bench.memory's peak column).
MEMORY_VARIANTS = ("torch, LeakyReLU", "fuse inplace, LeakyReLU", "fuse, LeakyReLU", "torch")
MEMORY_TARGET = 0.6
MEMORY_GPU = ("resnet50", 224, 32)
# Dry run: the same model at 32x32 in the interpreter (0.58x there), ~6 s; "fuse, LeakyReLU",
# another 4 s, left out
MEMORY_DRY = ("resnet50", 32, 2)
MEMORY_DRY_VARIANTS = ("torch, LeakyReLU", "fuse inplace, LeakyReLU", "torch")


def step_memory(ctx: Ctx) -> None:
    """Bytes saved for backward and the peak of one training step (bench/memory.py) for
    ResNet-50 with LeakyReLU: torch eager, fuse, fuse(inplace=True); fails when the in-place
    form saves more than MEMORY_TARGET of torch's (budget: ~15 batch-norm shapes' kernels
    compiled twice, for the fused and the invertible forms, and 2 training steps per
    variant)."""
    from bench import memory

    gpu = _gpu()
    device = "cuda" if gpu else "cpu"
    small = ctx.dry or not gpu
    name, size, batch = MEMORY_DRY if small else MEMORY_GPU
    variants = MEMORY_DRY_VARIANTS if small else MEMORY_VARIANTS
    s = ctx.result["summary"]
    s.update(model=f"torchvision {name}, ReLU -> LeakyReLU(0.01) for the LeakyReLU variants",
             device=device, image_size=size, batch=batch, dtype="float32",
             memory_format="channels_last", target=f"fuse inplace, LeakyReLU: saved bytes <= "
                                                  f"{MEMORY_TARGET} x torch, LeakyReLU's",
             rows=[], not_run=[])

    def saved(row) -> None:
        s["rows"].append(row)
        peak = "" if row["peak_step_mb"] is None else f", peak {row['peak_step_mb']} MB"
        ctx.note(f"{row['variant']}: {row['saved_mb']} MB saved{peak}, {row['seconds']} s")
        ctx.save()

    # a variant is not started with under 2 s left: the rows so far are kept either way
    result = memory.measure([name], variants, size, batch, device,
                            deadline=ctx.deadline - 2, on_row=saved)
    s["rows"] = result["rows"]          # with the ratios filled in
    s["not_run"] = [v for v in variants if v not in {r["variant"] for r in s["rows"]}]
    ctx.write_json("memory_rows.json", result)
    with open(ctx.output("memory.md"), "w") as f:
        f.write(memory.format_table(result) + "\n")
    rows = {r["variant"]: r for r in s["rows"]}
    inplace = rows.get("fuse inplace, LeakyReLU", {})
    s["inplace_ratio"] = inplace.get("ratio_same_act")
    s["inplace_peak_ratio"] = inplace.get("peak_ratio_same_act")
    if s["inplace_ratio"] is None:
        ctx.note("budget: the in-place variant (or its yardstick) was not measured")
        ctx.save("partial")
        return
    s["target_met"] = s["inplace_ratio"] <= MEMORY_TARGET
    peak = ("" if s["inplace_peak_ratio"] is None
            else f"; peak {s['inplace_peak_ratio']} x torch's")
    ctx.note(f"fuse inplace, LeakyReLU: {s['inplace_ratio']} x torch's saved bytes "
             f"(target <= {MEMORY_TARGET}){peak}")
    ctx.save("ok" if s["target_met"] and not s["not_run"] else
             "partial" if s["target_met"] else "failed")


# ------------------------------------------------------------------------------ triton_op

TRITON_OP_LAYERS = 8        # BatchNormAct2d layers in the compiled model (as bench.host's)
TRITON_OP_CASES = (         # (shape, dtype, memory format) of the checked training steps
    ((32, 64, 56, 56), "float16", "channels_last"),
    ((32, 256, 14, 14), "float32", "contiguous"),
)
DRY_TRITON_OP_CASES = (((4, 6, 5, 3), "float32", "contiguous"),)


def step_triton_op(ctx: Ctx) -> None:
    """``TRITONBN_COMPILED=triton_op`` -- opt-in until a GPU has run it: a training step of
    BatchNormAct2d layers under torch.compile (inductor), whose graphs then hold tritonbn's
    kernels as user-defined Triton kernels, checked against the same step eager (loss, input
    and parameter gradients, running statistics); on a GPU also host time per layer compiled
    against eager, and mode="reduce-overhead" (CUDA graphs). Dry run: the AOT graphs recorded
    and run with the kernels in Triton's interpreter (bench/compiled_graph.py)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        # The dry run interprets every kernel of the process, and torch traces only compiled
        # ones into a graph: this step runs again in a process without it (CPU tensors still
        # run the kernels interpreted), and its result is that process's.
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        subprocess.run([sys.executable, os.path.abspath(__file__), *sys.argv[1:]], env=env)
        with open(ctx.path("result.json")) as f:
            ctx.result = json.load(f)
        return
    os.environ["TRITONBN_COMPILED"] = "triton_op"     # read when tritonbn is imported
    import torch

    import tritonbn
    from bench import compiled_graph
    from tritonbn import _runtime

    gpu = _gpu()
    device = "cuda" if gpu else "cpu"
    s = ctx.result["summary"]
    s.update(form=_runtime.compiled_form(), device=device, layers=TRITON_OP_LAYERS,
             backend="inductor" if gpu else "aot_autograd (recorded, interpreted)", cases=[])
    ok = s["form"] == "triton_op"
    for shape, dtype_name, layout in (TRITON_OP_CASES if gpu else DRY_TRITON_OP_CASES):
        if ctx.left() < 5:
            ctx.note(f"{shape}: not run, the step's budget ended")
            ok = False
            break
        case = {"shape": "x".join(map(str, shape)), "dtype": dtype_name, "layout": layout}
        s["cases"].append(case)
        try:
            case.update(_triton_op_case(shape, getattr(torch, dtype_name), layout, gpu,
                                        torch, tritonbn, compiled_graph))
        except Exception as e:  # a failure is the finding; the next case still runs
            case["error"] = _err(e)
        ok = ok and case.get("ok", False)
        ctx.save()
    if gpu and ctx.left() > 10:
        try:
            s["host"] = _triton_op_host(torch, tritonbn)
        except Exception as e:
            s["host"] = {"error": _err(e)}
        ctx.save()
    elif not gpu:
        ctx.note("no GPU: inductor cannot compile Triton kernels for CPU tensors; the graphs "
                 "were recorded and run interpreted, and no host time was taken")
    ctx.save("ok" if ok else "failed")


def _triton_op_model(torch, tritonbn, channels: int):
    return torch.nn.Sequential(*(tritonbn.BatchNormAct2d(channels, activation="relu")
                                 for _ in range(TRITON_OP_LAYERS)))


def _triton_op_case(shape, dtype, layout, gpu, torch, tritonbn, compiled_graph) -> dict:
    device = "cuda" if gpu else "cpu"
    torch.manual_seed(0)
    model = _triton_op_model(torch, tritonbn, shape[1]).to(device)
    eager = copy.deepcopy(model)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = torch.randn(shape, device=device).to(dtype).contiguous(memory_format=fmt)
    xe = x.clone().requires_grad_()
    x.requires_grad_()
    graphs: dict = {}
    torch._dynamo.reset()
    if gpu:
        from torch._inductor.utils import run_and_get_code
        compiled = torch.compile(model, backend="inductor", fullgraph=True)
        _, code = run_and_get_code(lambda: compiled(x).float().square().mean().backward())
        text = "\n".join(code)
        found = sorted({k for k in KERNELS if k in text})
        opaque = "tritonbn.batch_norm" in text or "tritonbn::batch_norm" in text
    else:
        backend = compiled_graph.recording_backend(graphs, interpreted_kernels=True)
        compiled = torch.compile(model, backend=backend, fullgraph=True)
        with compiled_graph.target_only():
            compiled(x).float().square().mean().backward()
        found = sorted(set(compiled_graph.kernels(graphs["forward"])
                           + compiled_graph.kernels(graphs["backward"])))
        opaque = any("tritonbn" in op for gm in graphs.values() for op in compiled_graph.ops(gm))
    eager(xe).float().square().mean().backward()
    _sync()

    def rel(a, b):
        a, b = a.detach().double(), b.detach().double()
        return float((a - b).norm() / max(b.norm(), 1e-30))
    errors = {"input_grad": rel(x.grad, xe.grad)}
    for (name, a), (_, b) in zip(model.state_dict().items(), eager.state_dict().items()):
        if a.is_floating_point():
            errors[name] = rel(a, b)
    for (name, a), (_, b) in zip(model.named_parameters(), eager.named_parameters()):
        errors[name + ".grad"] = rel(a.grad, b.grad)
    worst = max(errors.values())
    limit = 1e-5 if dtype == torch.float32 else 1e-2
    return {"kernels_in_graph": found, "opaque_op_in_graph": opaque,
            "worst_rel_error": worst, "limit": limit, "errors_over_limit": sorted(
                k for k, v in errors.items() if v > limit),
            "ok": bool(found) and not opaque and worst <= limit}


def _triton_op_host(torch, tritonbn) -> dict:
    """Host time per layer of bench.host's compiled row (a training forward of an 8-layer
    model on a tiny tensor, no synchronization): eager, compiled, and compiled with
    mode="reduce-overhead" (CUDA graphs)."""
    model = _triton_op_model(torch, tritonbn, 8).cuda()
    x = torch.randn(4, 8, 4, 4, device="cuda", requires_grad=True)
    out = {}
    for name, fn in (("eager", model),
                     ("compiled", torch.compile(model, fullgraph=True)),
                     ("reduce_overhead", torch.compile(model, fullgraph=True,
                                                       mode="reduce-overhead"))):
        try:
            for _ in range(3):
                fn(x)
            torch.cuda.synchronize()
            times = []
            for _ in range(5):
                t0 = time.perf_counter()
                for _ in range(200):
                    fn(x)
                times.append((time.perf_counter() - t0) / 200 / TRITON_OP_LAYERS * 1e6)
            torch.cuda.synchronize()
            out[name + "_us_per_layer"] = round(statistics.median(times), 1)
        except Exception as e:
            out[name + "_error"] = _err(e)
    if "eager_us_per_layer" in out:
        for name in ("compiled", "reduce_overhead"):
            if name + "_us_per_layer" in out:
                out[name + "_vs_eager"] = round(out[name + "_us_per_layer"]
                                                / out["eager_us_per_layer"], 2)
    return out


# ----------------------------------------------------------------------------------- tune

def worst_problems(rows: list, k: int = 3) -> list:
    """The k (op, shape, dtype, layout) tune problems behind the bench's worst rows: taken in
    turn from tritonbn's smallest speedup over torch eager and its smallest % of copy."""
    by_torch = sorted((r for r in rows if r.get("impl") == "torch" and "tritonbn_speedup" in r),
                      key=lambda r: r["tritonbn_speedup"])
    by_copy = sorted((r for r in rows if r.get("impl") == "tritonbn" and "pct_copy" in r),
                     key=lambda r: r["pct_copy"])
    out, why = [], []
    for pair in zip(by_torch + [None] * len(by_copy), by_copy + [None] * len(by_torch)):
        for r, reason in zip(pair, ("vs torch", "vs copy")):
            if r is None:
                continue
            key = (TUNE_OPS[r["op"]], tuple(int(d) for d in r["shape"].split("x")),
                   r["dtype"], r["layout"])
            if key not in out:
                out.append(key)
                value = (f"{r['tritonbn_speedup']}x torch" if reason == "vs torch"
                         else f"{r['pct_copy']}% of copy")
                why.append(f"{r['op']} {r['shape']} {r['dtype']} {r['layout']}: {value}")
            if len(out) == k:
                return list(zip(out, why))
    return list(zip(out, why))


# When the bench left no rows: the performance model's lowest predicted % of copy among the
# headline shapes (bench/results/perf_model.md): channels-last training with many partials,
# the unaligned 14x14 NCHW plane, and the 7x7 backward.
FALLBACK_TUNE = [(("fwd_train", (256, 64, 112, 112), "float16", "channels_last"), "model"),
                 (("fwd_train", (256, 1024, 14, 14), "float16", "contiguous"), "model"),
                 (("bwd_train", (256, 2048, 7, 7), "float16", "contiguous"), "model")]


def step_tune(ctx: Ctx) -> None:
    """A short ``tritonbn tune`` on the three worst shapes of the bench run."""
    from tritonbn.tools import tune as T
    from tritonbn.tools.shapes import smoke_shape
    from tritonbn.tools.timing import make_timer, smoke_mode

    s = ctx.result["summary"]
    bench = ctx.earlier("bench", "bench_rows.json")
    picked = worst_problems(bench["rows"]) if bench else []
    s["source"] = "bench" if picked else "fallback (no bench rows)"
    if not picked:
        picked = FALLBACK_TUNE
        ctx.note("no bench rows: tuning the performance model's weakest headline problems")
    problems = []
    for (op, shape, dtype, layout), why in picked:
        if smoke_mode():
            shape = smoke_shape(shape)
        problems.append(T.Problem(op, tuple(shape), dtype, layout))
    s["problems"] = [{"problem": p.name, "why": w} for p, (_, w) in zip(problems, picked)]
    # GPU: 5 plans per problem (the heuristic and 4 spread over the sweep), each compiled
    # (~1 s) and timed (10 + 20 ms): ~20 s for three problems. Smoke: tune's own 3.
    max_candidates = None if smoke_mode() else 5
    timer = make_timer(warmup_ms=5, rep_ms=20, smoke_reps=1)
    results, failed = [], []
    table = ctx.path("tuning_table.json")

    def on_error(problem, e):
        failed.append(f"{problem.name}: {_err(e)}")
        ctx.note(f"could not tune {failed[-1]}")

    for r in T.iter_tune(problems, timer=timer, max_candidates=max_candidates,
                         show_progress=False, on_error=on_error):
        results.append(r)
        entry = r.entry()
        entry["speedup"] = round(r.speedup, 3)
        entry["rejected"] = r.failures[:5]
        s.setdefault("results", []).append(entry)
        try:
            T.write_table([r], table)
            ctx.output("tuning_table.json")
        except Exception as e:
            ctx.note(f"tuning table: {_err(e)}")
        ctx.save()
        print(T.format_results([r]), flush=True)
    s["failed"] = failed
    with open(ctx.output("tune.txt"), "w") as f:
        f.write(T.format_results(results) + "\n")
    ctx.save("ok" if results and not failed else "failed")


# ----------------------------------------------------------------------------- perf model

def committed_predictions(root: str) -> dict:
    """{(GPU, shape, layout, op): (predicted us, % of copy)} from bench/results/perf_model.md
    (float16 rows, as committed)."""
    from bench.perf_model import read_rows
    out = {}
    try:
        rows = read_rows(os.path.join(root, "bench", "results", "perf_model.md"))
    except OSError:
        return out
    for row in rows:
        try:
            out[(row["GPU"], row["shape"], row["layout"], row["op"])] = (
                float(row["predicted us"]), float(row["% of copy"]))
        except (KeyError, ValueError):
            continue
    return out


def step_perf_model(ctx: Ctx) -> None:
    """The static performance model's predictions next to the bench's measured times (ratio
    measured / predicted per row): the committed table's, then this code's own (compiled
    for sm_90a here, float16 first)."""
    from bench import perf_model as pm

    s = ctx.result["summary"]
    bench = ctx.earlier("bench", "bench_rows.json")
    if not bench:
        ctx.note("no bench rows to compare with")
        ctx.save("failed")
        return
    device = bench["meta"].get("device", "")
    gpu = pm.gpu_for(device)
    s["device"] = device
    if gpu is None:
        gpu = pm.GPUS["H200"]
        ctx.note(f"{device!r} is not a modelled GPU: showing the H200 predictions"
                 + (" (dry run: the ratios mean nothing)" if ctx.dry else ""))
    gpu_key = next(k for k, g in pm.GPUS.items() if g == gpu)
    s["model_gpu"] = gpu_key
    rows = [r for r in bench["rows"] if r["impl"] == "tritonbn" and r["op"] in MODELLED_OPS
            and "time_us" in r]
    committed = committed_predictions(ctx.root)
    table = []
    for r in rows:
        pred = committed.get((gpu_key, r["shape"], r["layout"], MODELLED_OPS[r["op"]]))
        table.append({"shape": r["shape"], "layout": r["layout"], "dtype": r["dtype"],
                      "op": r["op"], "measured_us": r["time_us"],
                      "measured_pct_copy": r.get("pct_copy"),
                      "committed_predicted_us": pred[0] if pred else None,
                      "committed_ratio": round(r["time_us"] / pred[0], 3) if pred else None})
    s["committed_rows"] = sum(t["committed_predicted_us"] is not None for t in table)
    _write_perf(ctx, table)
    # this code's predictions: compile each distinct problem for sm_90a (workers: one per core)
    problems = list(dict.fromkeys(pm.problem(MODELLED_OPS[r["op"]],
                                             tuple(int(d) for d in r["shape"].split("x")),
                                             r["layout"], r["dtype"]) for r in rows))
    problems.sort(key=lambda p: p.dtype != "float16")     # float16 first: the committed dtype
    if ctx.dry:
        problems = problems[:1]      # one problem's compiles: the path, not the numbers
    os.environ.setdefault("TRITONBN_TUNING_TABLE", "off")
    from tritonbn import plan as planner
    planner.reload_tuning_table()
    workers = max(1, min(16, os.cpu_count() or 1))
    live = {}
    for dtype in ("float16", "bfloat16"):
        batch = [p for p in problems if p.dtype == dtype]
        if not batch:
            continue
        if ctx.left() < 5:
            ctx.note(f"budget: no live predictions for {dtype}")
            break
        try:
            facts = pm.analyze(batch, workers)
        except Exception as e:
            ctx.note(f"live predictions ({dtype}): {_err(e)}")
            traceback.print_exc()
            continue
        for p in batch:
            pred = pm.predict_launches(p, facts[p], gpu)
            live[(p.op, "x".join(map(str, p.shape)), p.layout, p.dtype)] = pred
        for t in table:
            pred = live.get((MODELLED_OPS[t["op"]], t["shape"], t["layout"], t["dtype"]))
            if pred is None:
                continue
            if pred.failures:
                t["predicted_error"] = "; ".join(pred.failures)[:300]
                continue
            t.update(predicted_us=round(pred.time_us, 2),
                     ratio=round(t["measured_us"] / pred.time_us, 3),
                     predicted_pct_copy=round(pred.pct_copy, 1), limit=pred.limit,
                     launches=pred.launches)
        s["live_rows"] = sum("predicted_us" in t for t in table)
        s["compile_failures"] = sorted({t["predicted_error"] for t in table
                                        if "predicted_error" in t})[:5]
        _write_perf(ctx, table)
        ctx.save()
    ratios = [t["ratio"] for t in table if t.get("ratio")]
    if ratios:
        s["ratio_geomean"] = round(math.exp(sum(map(math.log, ratios)) / len(ratios)), 3)
    ok = bool(table) and (s.get("live_rows", 0) > 0 or s["committed_rows"] > 0)
    if s.get("compile_failures"):
        ctx.note(f"the model could not compile: {s['compile_failures'][0][:200]}")
    ctx.save("ok" if ok and not s.get("compile_failures") else "failed")


def _write_perf(ctx: Ctx, table: list) -> None:
    import csv
    ctx.write_json("perf_vs_model.json", table)
    keys = ["shape", "layout", "dtype", "op", "measured_us", "predicted_us", "ratio",
            "measured_pct_copy", "predicted_pct_copy", "limit", "launches",
            "committed_predicted_us", "committed_ratio", "predicted_error"]
    with open(ctx.output("perf_vs_model.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        w.writerows(table)


# ------------------------------------------------------------------------------ self-test

def step_selftest_sleep(ctx: Ctx) -> None:
    """Hidden: a step that overruns any small budget (the tests cut it)."""
    ctx.result["summary"]["pid"] = os.getpid()
    ctx.save()
    time.sleep(float(os.environ.get("TRITONBN_SELFTEST_SLEEP_S", "60")))
    ctx.save("ok")


def step_selftest_ok(ctx: Ctx) -> None:
    """Hidden: a step that finishes at once."""
    ctx.result["summary"]["pid"] = os.getpid()
    ctx.save("ok")


STEPS = {
    "env": step_env,
    "pytest_cuda": step_pytest_cuda,
    "int64": step_int64,
    "memcheck": step_memcheck,
    "memcheck_kernels": step_memcheck_kernels,
    "bench": step_bench,
    "host": step_host,
    "perf_model": step_perf_model,
    "resnet": step_resnet,
    "memory": step_memory,
    "tune": step_tune,
    "bench_compile": step_bench_compile,
    "resnet_compiled": step_resnet_compiled,
    "triton_op": step_triton_op,
    "pytest_numerics": step_pytest_numerics,
    "selftest_sleep": step_selftest_sleep,
    "selftest_ok": step_selftest_ok,
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_window_steps",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("step", choices=sorted(STEPS))
    p.add_argument("--out", required=True)
    p.add_argument("--stage", required=True)
    p.add_argument("--root", default=os.getcwd())
    p.add_argument("--deadline", type=float, default=time.time() + 3600)
    p.add_argument("--dry-run", action="store_true")
    args = p.parse_args(argv)
    ctx = Ctx(args.step, os.path.abspath(args.out), os.path.abspath(args.stage),
              os.path.abspath(args.root), args.deadline, args.dry_run)
    ctx.save()
    signal.signal(signal.SIGTERM, _on_term)
    try:
        STEPS[args.step](ctx)
    except Exception as e:
        traceback.print_exc()
        ctx.note(f"step crashed: {_err(e)}")
        ctx.save("failed")
        return 1
    if ctx.result["status"] == "running":
        ctx.save("ok")
    return 0 if ctx.result["status"] in ("ok", "partial") else 1


if __name__ == "__main__":
    sys.exit(main())
