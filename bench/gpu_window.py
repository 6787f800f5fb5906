"""The GPU window: one command that turns a short GPU run into committed evidence.

``python -m bench.gpu_window --out DIR [--budget-s 420] [--dry-run]`` from the repository root (or
``bench/gpu_window.sh DIR``, which installs the project offline first) runs the steps below in
order, each in a process of its own with its own time budget: a step that overruns is killed
(its whole process group), recorded as timed out with whatever it saved so far, and the next
step runs. After every step the results folder is rewritten with exactly three files:

* ``summary.json``: every step's status, budget, time and findings; the environment; the
  headline rows (tritonbn, torch eager and torch.compile per shape/op/dtype/layout, % of copy,
  the performance model's prediction);
* ``report.md``: the same for people, with the tail of the log of any step that failed;
* ``raw.tar.gz``: every step's folder (logs, JSON, CSV, nvidia-smi output, the tuning table).

Work happens in a temporary folder outside the results folder, so a run cut at any moment
leaves those three files (at most three more ``*.tmp`` while one is being replaced) and
nothing else there. ``--dry-run`` runs the same steps on CPU in Triton's interpreter on tiny
shapes (a small ResNet instead of ResNet-50); what needs the hardware is recorded as not
available.

``python -m bench.gpu_window import RESULTS_DIR [--dest bench/results]`` turns a
results folder into committed files ``<dest>/<device>_<date>.{md,json,csv}`` (each under 1 MB)
and prints the README's performance table.

This file imports nothing but the standard library (and the ``bench`` package it sits in imports
nothing), so the window cannot fail on an import: ``bench/gpu_window.sh`` runs ``python -m
bench.gpu_window``, which does not import tritonbn or torch; each step imports what it needs in
its own process, where a failure is one step's finding.
"""
from __future__ import annotations

import os
import sys

if __name__ == "__main__" and sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(
        os.path.abspath(__file__)):
    sys.path.pop(0)     # run as a script: this folder's bench.py, report.py... must not shadow

import argparse
import csv
import io
import json
import shutil
import signal
import subprocess
import tarfile
import tempfile
import time
from dataclasses import dataclass

__all__ = ["STEPS", "TOTAL_BUDGET_S", "RESERVE_S", "Step", "budgets", "run_window",
           "readme_table", "import_results", "main"]


@dataclass(frozen=True)
class Step:
    name: str
    budget_s: float
    why: str


# Seconds per step on an H200 (nothing has been measured there yet: these are estimates, and
# the report says which steps were cut). Triton compiles each kernel specialization the first
# time it is launched, ~0.5-1 s on the machine's CPU, and torch.compile a graph in seconds;
# those compiles, not the GPU, decide most budgets. Most valuable first, so that if the window
# is cut short the evidence that matters most is already written.
STEPS = (
    Step("env", 15, "nvidia-smi, versions, commit; the first `import torch` on a cold machine "
                    "alone can take 10 s"),
    Step("pytest_cuda", 40, "the files with cuda tests; they compile the split kernels for "
                            "12 shape/dtype cases (~40 compiles)"),
    Step("int64", 25, "two 4.3 GB tensors per layout, ~4 kernels to compile with 64-bit "
                      "offsets, float64 chunked references (~10 GB read per layout)"),
    Step("memcheck", 30, "compute-sanitizer starts torch slowly (~10 s) and instruments each "
                         "of ~12 kernel compiles and launches"),
    Step("bench", 60, "tritonbn and torch eager, 5 ops x 2 dtypes x 2 layouts per shape: "
                      "~0.1 s per measurement plus ~30 kernel compiles for the first shape, "
                      "fewer after; the step stops before a shape it cannot finish"),
    Step("host", 15, "host time per call: 4 cases x 3 figures x 3 rounds x 300 calls of a few "
                     "tens of microseconds, after importing torch and tritonbn"),
    Step("perf_model", 20, "compiles the bench's problems for sm_90a on up to 16 processes "
                           "(~1 s each) and compares"),
    Step("resnet", 45, "ResNet-50 at batch 64 and 256, torch / convert / fuse, 3 warm-up and 10 "
                       "timed steps each (~0.1 s per step at 256) after compiling the kernels "
                       "of ~15 batch-norm shapes"),
    Step("memory", 20, "ResNet-50 (LeakyReLU) bytes saved for backward and peak of a training "
                       "step at batch 32: torch, fuse, fuse(inplace=True); ~15 batch-norm "
                       "shapes' kernels compiled for the fused and the in-place forms"),
    Step("tune", 20, "3 problems x 5 plans, each compiled (~1 s) and timed"),
    Step("bench_compile", 35, "torch.compile (inductor) compiles one graph per case and op: "
                              "~10 s for the first, a few seconds each after"),
    Step("resnet_compiled", 40, "inductor compiles a ResNet-50 training step in about a minute "
                                "on 16 cores: at most one or two variants fit"),
    Step("triton_op", 25, "TRITONBN_COMPILED=triton_op (opt-in until this step has passed on a "
                          "GPU): inductor compiles two 8-layer training steps (~10 s each) "
                          "checked against eager, then host time per layer"),
    Step("pytest_numerics", 20, "~310 numerics tests, most of them compiling a specialization; "
                                "least urgent (the interpreter runs them in every CI): a cut "
                                "run still lists every test that finished"),
)
# The whole window, 7 minutes: short enough that the offline install and a margin for a slow
# machine start still fit a short GPU run's time budget.
TOTAL_BUDGET_S = 420
# Kept back from the steps: a timed-out step's 3 s kill grace and rewriting the bundle (~1 s).
RESERVE_S = 10
# A step gets at least this long or is not started: below it not even `import torch` finishes.
MIN_STEP_S = 4
# Hard kill after SIGTERM: a process ignoring SIGTERM (compute-sanitizer finishing its report)
# gets this long.
KILL_GRACE_S = 3
# Logs in the bundle are cut to their head and tail beyond this (a sanitizer flooding errors
# must not push the bundle past the 16 MB a result file may have).
LOG_CAP_BYTES = 2 * 1024 * 1024
# The tarball's ceiling: under the 16 MB a returned file may have, with a megabyte of margin;
# above it the logs are cut 8 times harder and the tarball rebuilt.
BUNDLE_MAX_BYTES = 15 * 1024 * 1024
# Committed files (import): none over 1 MB.
COMMIT_MAX_BYTES = 1024 * 1024

BUNDLE = ("summary.json", "report.md", "raw.tar.gz")
# Steps of bench/gpu_window_steps.py that are not in STEPS: the memcheck script's own
# step, and two self-test steps the tests run (one finishes at once, one overruns).
HIDDEN_STEPS = ("memcheck_kernels", "selftest_ok", "selftest_sleep")
STATUSES = ("ok", "partial", "failed", "timed_out", "skipped", "interrupted")


def soft_margin(budget: float) -> float:
    """Seconds before its kill at which a step is told to stop starting new work: enough to
    write its files (15% of the budget, 1 to 5 s)."""
    return max(1.0, min(5.0, 0.15 * budget))


def budgets(total: float = TOTAL_BUDGET_S, names=None, overrides=None) -> dict:
    """{step: seconds}: STEPS' budgets scaled to ``total`` less RESERVE_S (unchanged at the
    default 420 s), ``overrides`` applied last; ``names`` picks and orders the steps (hidden
    self-test steps get 30 s unless overridden)."""
    scale = (total - RESERVE_S) / sum(s.budget_s for s in STEPS)
    table = {s.name: round(s.budget_s * scale, 1) for s in STEPS}
    order = list(names) if names else [s.name for s in STEPS]
    out = {n: table.get(n, 30.0) for n in order}
    for name, seconds in (overrides or {}).items():
        out[name] = float(seconds)
    return out


def _repo_root() -> str:
    here = os.path.dirname(os.path.abspath(__file__))     # bench/
    root = os.path.dirname(here)
    if os.path.isdir(os.path.join(root, "tests")):
        return root
    return os.getcwd()


def _invocation() -> str:
    """How this process was started: ``python -m bench.gpu_window`` (the wrapper's way) or the
    script's name."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is not None and spec.name:
        return f"python -m {spec.name}"
    return os.path.basename(sys.argv[0])


# ---------------------------------------------------------------------------------- running

class _Interrupted(Exception):
    pass


def _on_term(signum, frame):
    raise _Interrupted(f"signal {signum}")


def run_in_group(cmd: list, log, cwd: str, env, timeout: float, running: list) -> tuple:
    """Run ``cmd`` in a session of its own, its output to the open file ``log``, listed in
    ``running`` while it runs (for a signal handler to kill); killed with its whole process group
    after ``timeout`` seconds. Returns (exit status, timed out)."""
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                            cwd=cwd, env=env, start_new_session=True)
    running.append(proc)
    try:
        return proc.wait(timeout=timeout), False
    except subprocess.TimeoutExpired:
        kill_group(proc)
        return proc.returncode, True
    finally:
        running.remove(proc)


def kill_group(proc, grace: float = KILL_GRACE_S) -> None:
    """SIGTERM to the process group of ``proc``, then SIGKILL if it is still there after
    ``grace`` seconds."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            return
        try:
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def _step_env(dry: bool) -> dict:
    env = dict(os.environ)
    env.update(PYTHONDONTWRITEBYTECODE="1", PYTHONUNBUFFERED="1", MPLBACKEND="Agg",
               # the dispatcher's own heuristics: what ships, and reproducible
               TRITONBN_TUNING_TABLE="off")
    if dry:
        env.update(CUDA_VISIBLE_DEVICES="", TRITON_INTERPRET="1")
    return env


def _run_one(name: str, budget: float, stage: str, root: str, dry: bool, env: dict,
             current: list) -> dict:
    out = os.path.join(stage, name)
    os.makedirs(out, exist_ok=True)
    start = time.time()
    deadline = start + budget - soft_margin(budget)
    # by path, not -m: a step that needs no tritonbn does not import the package
    steps_py = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gpu_window_steps.py")
    cmd = [sys.executable, steps_py, name, "--out", out,
           "--stage", stage, "--root", root, "--deadline", f"{deadline:.2f}"]
    if dry:
        cmd.append("--dry-run")
    print(f"[gpu_window] {name}: budget {budget:.0f} s", flush=True)
    rec = {"name": name, "budget_s": budget, "started": time.strftime("%H:%M:%S")}
    with open(os.path.join(out, "log.txt"), "w") as log:
        rc, timed_out = run_in_group(cmd, log, root, env, budget, current)
    rec.update(rc=rc, timed_out=timed_out, elapsed_s=round(time.time() - start, 1))
    try:
        with open(os.path.join(out, "result.json")) as f:
            result = json.load(f)
    except (OSError, ValueError):
        result = {}
    rec["summary"] = result.get("summary", {})
    rec["notes"] = result.get("notes", [])
    rec["outputs"] = result.get("outputs", [])
    status = result.get("status", "failed")
    if timed_out:
        status = "timed_out"
        rec["notes"].append(f"killed at its budget of {budget:.0f} s")
    elif status == "running" or (rc != 0 and status in ("ok", "partial")):
        status = "failed"
    if not result:
        rec["notes"].append(f"no result.json (exit code {rc})")
    rec["status"] = status
    rec["log_tail"] = _tail(os.path.join(out, "log.txt"), 30) if status not in (
        "ok",) else []
    print(f"[gpu_window] {name}: {status} in {rec['elapsed_s']} s", flush=True)
    return rec


def _tail(path: str, lines: int) -> list:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 64 * 1024))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return []
    return [ln[:300] for ln in text.splitlines()[-lines:]]


def run_window(out: str, budget_s: float = TOTAL_BUDGET_S, dry: bool = False, steps=None,
               overrides=None, attach=(), stage: str | None = None,
               keep_stage: bool = False) -> dict:
    """Run the steps; returns the summary (also in ``out``/summary.json)."""
    os.makedirs(out, exist_ok=True)
    root = _repo_root()
    plan = budgets(budget_s, steps, overrides)
    made_stage = stage is None
    if stage is None:
        try:
            stage = tempfile.mkdtemp(prefix="tritonbn-gpu-window-")
        except OSError:
            stage = os.path.join(out, ".stage")
            os.makedirs(stage, exist_ok=True)
    for path in attach:
        if os.path.isfile(path):
            os.makedirs(os.path.join(stage, "_attached"), exist_ok=True)
            shutil.copy(path, os.path.join(stage, "_attached", os.path.basename(path)))
    t0 = time.time()
    summary = {"schema": 1, "dry_run": dry, "budget_s": budget_s, "reserve_s": RESERVE_S,
               "command": " ".join([_invocation(), *sys.argv[1:]]),
               "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               "root": root, "python": sys.executable, "plan": plan, "steps": []}
    env = _step_env(dry)
    current: list = []
    previous = signal.signal(signal.SIGTERM, _on_term)
    try:
        for name, budget in plan.items():
            left = budget_s - (time.time() - t0) - RESERVE_S
            use = min(budget, left)
            if use < min(budget, MIN_STEP_S):      # the window's time ran out
                summary["steps"].append({"name": name, "budget_s": budget, "status": "skipped",
                                         "elapsed_s": 0, "summary": {}, "outputs": [],
                                         "notes": [f"not started: {max(0, left):.0f} s of the "
                                                   f"window left"]})
                continue
            rec = _run_one(name, round(use, 1), stage, root, dry, env, current)
            if use < budget:
                rec["notes"].append(f"budget cut from {budget:.0f} s to {use:.0f} s: the "
                                    "window's time ran short")
            summary["steps"].append(rec)
            summary["elapsed_s"] = round(time.time() - t0, 1)
            write_bundle(out, stage, summary)
    except (_Interrupted, KeyboardInterrupt) as e:
        for proc in current:
            kill_group(proc)
        summary["interrupted"] = str(e) or type(e).__name__
        done = {s["name"] for s in summary["steps"]}
        summary["steps"] += [{"name": n, "budget_s": b, "status": "interrupted",
                              "elapsed_s": 0, "summary": {}, "outputs": [], "notes": []}
                             for n, b in plan.items() if n not in done]
    finally:
        signal.signal(signal.SIGTERM, previous)
        summary["elapsed_s"] = round(time.time() - t0, 1)
        write_bundle(out, stage, summary)
        if made_stage and not keep_stage:
            shutil.rmtree(stage, ignore_errors=True)
    return summary


# ---------------------------------------------------------------------------------- bundle

def _load(stage: str, step: str, name: str):
    try:
        with open(os.path.join(stage, step, name)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def headline(stage: str) -> list:
    """One row per (shape, op, dtype, layout) of the bench: tritonbn's time and % of copy,
    torch eager's and torch.compile's times and tritonbn's speedup over each, and the model's
    prediction."""
    rows: dict = {}
    bench = (_load(stage, "bench", "bench_rows.json") or {}).get("rows", [])
    comp = (_load(stage, "bench_compile", "bench_rows.json") or {}).get("rows", [])
    perf = _load(stage, "perf_model", "perf_vs_model.json") or []
    for r in bench:
        key = (r["shape"], r["op"], r["dtype"], r["layout"])
        row = rows.setdefault(key, {"shape": r["shape"], "op": r["op"], "dtype": r["dtype"],
                                    "layout": r["layout"]})
        if r["impl"] == "tritonbn":
            row.update(tritonbn_us=r.get("time_us"), pct_copy=r.get("pct_copy"),
                       copy_gbps=r.get("copy_gbps"), gbps=r.get("gbps"))
            if "error" in r:
                row["tritonbn_error"] = r["error"]
        elif r["impl"] == "torch":
            row.update(torch_us=r.get("time_us"), vs_torch=r.get("tritonbn_speedup"),
                       torch_backend=r.get("torch_backend"))
    for r in comp:
        key = (r["shape"], r["op"], r["dtype"], r["layout"])
        row = rows.setdefault(key, {"shape": r["shape"], "op": r["op"], "dtype": r["dtype"],
                                    "layout": r["layout"]})
        if r["impl"] == "torch.compile":
            row.update(compile_us=r.get("time_us"), vs_compile=r.get("tritonbn_speedup"))
            if "error" in r:
                row["compile_error"] = r["error"]
        elif r["impl"] == "tritonbn" and "tritonbn_us" not in row:
            row.update(tritonbn_us=r.get("time_us"), pct_copy=r.get("pct_copy"))
    for p in perf:
        row = rows.get((p["shape"], p["op"], p["dtype"], p["layout"]))
        if row is not None:
            row.update(predicted_us=p.get("predicted_us") or p.get("committed_predicted_us"),
                       measured_over_predicted=p.get("ratio") or p.get("committed_ratio"))
    return list(rows.values())


def _env(summary: dict) -> dict:
    for s in summary.get("steps", []):
        if s["name"] == "env":
            return s.get("summary", {})
    return {}


def _step(summary: dict, name: str) -> dict:
    return next((s for s in summary.get("steps", []) if s["name"] == name), {})


def _f(v, spec=".1f", suffix="") -> str:
    if v is None or v == "":
        return "-"
    try:
        return format(v, spec) + suffix
    except (TypeError, ValueError):
        return str(v)


_LAYOUT = {"contiguous": "NCHW", "channels_last": "NHWC"}


def _versions_line(summary: dict) -> str:
    env = _env(summary)
    v = env.get("versions", {})
    device = env.get("device", "unknown device")
    parts = [f"{device}", env.get("date", summary.get("started_utc", "")[:10]),
             f"torch {v.get('torch_runtime', v.get('torch', '?'))}",
             f"triton {v.get('triton_runtime', v.get('triton', '?'))}"]
    if v.get("cuda"):
        parts.append(f"CUDA {v['cuda']}")
    if env.get("driver") and env["driver"] != "not available":
        parts.append(f"driver {env['driver']}")
    git = env.get("git", {}).get("commit", "")
    if git and not git.startswith(("not a git", "git failed")):
        dirty = env["git"].get("dirty_files")
        parts.append(f"commit {git[:10]}" + (f" + {dirty} uncommitted files (source digest "
                                             f"{env.get('source_digest')})" if dirty else ""))
    elif env.get("source_digest"):
        parts.append(f"source digest {env['source_digest']}")
    return ", ".join(parts)


def readme_table(summary: dict) -> str:
    """The README's performance table: per (shape, op, dtype, layout), tritonbn's time, % of a
    same-run copy, and tritonbn's speedup over torch eager and torch.compile."""
    rows = summary.get("headline", [])
    lines = []
    if summary.get("dry_run") or any(s.get("summary", {}).get("smoke") for s in
                                     summary.get("steps", []) if s["name"] == "bench"):
        lines += ["**DRY RUN: CPU interpreter, tiny shapes, timings mean nothing**", ""]
    lines += [f"Measured with `bench/gpu_window.sh` on {_versions_line(summary)}. Speedup: "
              "peer time / tritonbn time (> 1: tritonbn faster); % of copy: tritonbn's "
              "effective bandwidth over a `copy_` of the same tensor in the same run.", "",
              "| shape | op | dtype | layout | tritonbn us | % of copy | vs torch eager "
              "| vs torch.compile |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['shape']} | {r['op']} | {r['dtype']} | "
                     f"{_LAYOUT.get(r['layout'], r['layout'])} | {_f(r.get('tritonbn_us'))} | "
                     f"{_f(r.get('pct_copy'), '.0f', '%')} | {_f(r.get('vs_torch'), '.2f', 'x')} "
                     f"| {_f(r.get('vs_compile'), '.2f', 'x')} |")
    if not rows:
        lines.append("| (no benchmark rows: see the report) | | | | | | | |")
    return "\n".join(lines) + "\n"


def _one_line(rec: dict) -> str:
    """What a step found, in one line."""
    s = rec.get("summary", {})
    name = rec["name"]
    try:
        if name == "env":
            return f"{s.get('device', '?')}; nvidia-smi: " + (
                "yes" if isinstance(s.get("nvidia_smi"), list) else str(s.get("nvidia_smi")))
        if name.startswith("pytest"):
            c = s.get("counts", {})
            return (", ".join(f"{v} {k}" for k, v in sorted(c.items())) or "no results") + (
                "" if s.get("finished") else " (cut before the end)")
        if name == "int64":
            return "; ".join(f"{c['layout']}: " + (c["error"] if "error" in c else
                                                   f"y err {c['y_err']:.1e}, dx err "
                                                   f"{c['dx_err']:.1e}, int64 {c['use_int64']}")
                             for c in s.get("cases", [])) + f" ({s.get('shape')})"
        if name == "memcheck":
            return (f"sanitizer: {s.get('sanitizer')}; errors: {s.get('sanitizer_errors')}; "
                    f"kernels missing: {s.get('missing_kernels')}")
        if name in ("bench", "bench_compile"):
            return (f"{s.get('rows', 0)} rows; done: {len(s.get('done', []))}, not run: "
                    f"{len(s.get('not_run', []))}")
        if name == "host":
            rows = s.get("rows") or []
            return f"{len(rows)} rows" + (f"; first: {rows[0]['case']} {rows[0]['launch_us']} us"
                                          if rows else "")
        if name == "perf_model":
            return (f"model {s.get('model_gpu')}: {s.get('live_rows', 0)} live, "
                    f"{s.get('committed_rows', 0)} committed predictions; geomean measured / "
                    f"predicted {s.get('ratio_geomean', '-')}")
        if name.startswith("resnet"):
            return "; ".join(f"{r['variant']} b{r['batch']}: " + (
                r["error"][:80] if "error" in r else f"{_f(r.get('step_ms'), '.1f')} ms"
            ) for r in s.get("runs", []))
        if name == "tune":
            return "; ".join(f"{r['op']} {'x'.join(map(str, r['shape']))} {r['dtype']}: "
                             f"{r['speedup']}x" for r in s.get("results", [])) or "no results"
    except (KeyError, TypeError, ValueError, IndexError) as e:
        return f"(summary unreadable: {type(e).__name__})"
    return ""


def report_markdown(summary: dict) -> str:
    env = _env(summary)
    dry = summary.get("dry_run")
    lines = []
    if dry:
        lines += ["**DRY RUN: CPU, Triton interpreter, tiny shapes -- the machinery, not the "
                  "numbers**", ""]
    lines += [f"# tritonbn GPU window: {env.get('device', 'unknown device')}", "",
              f"{_versions_line(summary)}. Window budget {summary.get('budget_s')} s, took "
              f"{summary.get('elapsed_s')} s.", ""]
    if summary.get("interrupted"):
        lines += [f"**Interrupted** ({summary['interrupted']}): the steps after it did not run.",
                  ""]
    lines += ["## Steps", "", "| step | status | budget s | took s | found |",
              "| --- | --- | --- | --- | --- |"]
    for rec in summary.get("steps", []):
        status = rec["status"] if rec["status"] == "ok" else f"**{rec['status']}**"
        lines.append(f"| {rec['name']} | {status} | {_f(rec.get('budget_s'), '.0f')} | "
                     f"{_f(rec.get('elapsed_s'), '.1f')} | "
                     f"{_one_line(rec).replace('|', '/')} |")
    if env:
        v = env.get("versions", {})
        lines += ["", "## Environment", "",
                  f"- Python {env.get('python')}; " + ", ".join(f"{k} {val}" for k, val in
                                                               sorted(v.items())),
                  f"- GPU: {env.get('gpu_props', 'none')}; driver {env.get('driver')}",
                  f"- nvidia-smi: {env.get('nvidia_smi')}",
                  f"- tools: {env.get('tools')}",
                  f"- git: {env.get('git', {}).get('commit')}; source digest "
                  f"{env.get('source_digest')}",
                  f"- host: {env.get('host')}"]
    lines += ["", "## Benchmark", "", readme_table(summary).rstrip()]
    bench = _step(summary, "bench").get("summary", {})
    if bench.get("row_errors"):
        lines += ["", "Rows with errors:", ""] + [f"- {e}" for e in bench["row_errors"]]
    for r in summary.get("headline", []):
        if r.get("torch_backend"):
            backends = sorted({h.get("torch_backend") for h in summary["headline"]
                               if h.get("torch_backend")})
            lines += ["", f"torch eager dispatched to: {', '.join(backends)}."]
            break
    perf = [r for r in summary.get("headline", []) if r.get("predicted_us")]
    if perf:
        lines += ["", "## Performance model against the measurements", "",
                  "| shape | op | dtype | layout | measured us | predicted us | measured / "
                  "predicted |", "| --- | --- | --- | --- | --- | --- | --- |"]
        for r in perf:
            lines.append(f"| {r['shape']} | {r['op']} | {r['dtype']} | "
                         f"{_LAYOUT.get(r['layout'], r['layout'])} | {_f(r.get('tritonbn_us'))} "
                         f"| {_f(r.get('predicted_us'))} | "
                         f"{_f(r.get('measured_over_predicted'), '.2f')} |")
    host = _step(summary, "host").get("summary", {})
    if host.get("rows"):
        lines += ["", "## Host time per call (us)", "",
                  "| case | launches | tritonbn Python | + launch path | torch |",
                  "| --- | --- | --- | --- | --- |"]
        for r in host["rows"]:
            lines.append(f"| {r.get('case')} | {r.get('launches')} | {r.get('python_us')} | "
                         f"{r.get('launch_us')} | {r.get('torch_us')} |")
    runs = [r for n in ("resnet", "resnet_compiled")
            for r in _step(summary, n).get("summary", {}).get("runs", [])]
    if runs:
        model = _step(summary, "resnet").get("summary", {}).get("model", "")
        rule = _step(summary, "resnet").get("summary", {}).get("parity_rule", "")
        lines += ["", "## ResNet training step", "", f"{model}; channels_last, bfloat16 "
                  "autocast, SGD. Step time: median of the timed steps (CUDA events), vs torch: "
                  "torch's step time / this one's at the same batch (compiled runs: against "
                  "compiled torch). Parity: one forward + backward from the same weights and "
                  "data; loss and gradient distance to torch in float32, next to torch's own "
                  f"bfloat16 distance ({rule}).", "",
                  "| variant | batch | compiled | step ms | images/s | vs torch | loss vs fp32 "
                  "(torch bf16) | grads vs fp32 (torch bf16) | parity | first call s |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in runs:
            p = r.get("parity", {})
            loss = (f"{_f(p.get('loss_rel_diff'), '.1e')} "
                    f"({_f(p.get('torch_bf16_loss_rel_diff'), '.1e')})")
            grad = (f"{_f(p.get('grad_rel_l2'), '.1e')} "
                    f"({_f(p.get('torch_bf16_grad_rel_l2'), '.1e')})")
            lines.append(
                f"| {r['variant']} | {r['batch']} | {'yes' if r.get('compiled') else 'no'} | "
                f"{_f(r.get('step_ms'), '.2f')} | {_f(r.get('images_per_s'), '.0f')} | "
                f"{_f(r.get('vs_torch', r.get('vs_torch_eager')), '.3f', 'x')} | {loss} | {grad} | "
                f"{'ok' if p.get('ok') else ('**no**' if p else '-')} | "
                f"{_f(r.get('first_call_s'), '.1f')} |" + (f" {r['error']}" if "error" in r
                                                           else ""))
    tune = _step(summary, "tune").get("summary", {})
    if tune.get("results"):
        lines += ["", "## Tune (worst bench rows)", "", "| problem | why | heuristic us | best "
                  "us | speedup | best plan |", "| --- | --- | --- | --- | --- | --- |"]
        why = {p["problem"]: p["why"] for p in tune.get("problems", [])}
        for e in tune["results"]:
            name = (f"{e['op']} {'x'.join(map(str, e['shape']))} {e['dtype']} "
                    f"{e['memory_format']}")
            pl = e["plan"]
            lines.append(f"| {name} | {why.get(name, '')} | {e.get('heuristic_us')} | "
                         f"{e.get('time_us')} | {e.get('speedup')}x | {pl['variant']} "
                         f"n{pl['block_n']} s{pl['block_s']} c{pl['block_c']} x{pl['splits']} "
                         f"w{pl['num_warps']} |")
    bad = [r for r in summary.get("steps", []) if r["status"] != "ok"]
    if bad or any(r.get("notes") for r in summary.get("steps", [])):
        lines += ["", "## Notes and failures", ""]
        for rec in summary.get("steps", []):
            if not rec.get("notes") and rec["status"] == "ok":
                continue
            lines.append(f"### {rec['name']}: {rec['status']}")
            lines += [f"- {n[:400]}" for n in rec.get("notes", [])[:20]]
            s = rec.get("summary", {})
            for reason in s.get("reasons", [])[:10]:
                lines.append(f"- {reason}")
            if rec.get("log_tail"):
                lines += ["", "```"] + rec["log_tail"] + ["```"]
            lines.append("")
    return "\n".join(lines) + "\n"


def _capped(path: str, cap: int) -> bytes:
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        if size <= cap:
            return f.read()
        head = f.read(cap // 4)
        f.seek(size - (cap - cap // 4))
        tail = f.read()
    return head + f"\n[... {size - cap} bytes cut ...]\n".encode() + tail


def _tar(stage: str, path: str, cap: int) -> None:
    with tarfile.open(path, "w:gz") as tar:
        for dirpath, dirnames, files in os.walk(stage):
            dirnames.sort()
            for name in sorted(files):
                full = os.path.join(dirpath, name)
                if name.endswith(".tmp") or os.path.islink(full):
                    continue
                try:
                    data = _capped(full, cap)
                except OSError as e:        # unreadable: say so in its place
                    data = f"could not read {full}: {e}\n".encode()
                info = tarfile.TarInfo(os.path.join("raw", os.path.relpath(full, stage)))
                info.size, info.mtime = len(data), int(os.path.getmtime(full))
                tar.addfile(info, io.BytesIO(data))


def write_bundle(out: str, stage: str, summary: dict) -> list:
    """summary.json, report.md and raw.tar.gz in ``out``, each replaced atomically. A step's
    findings in a shape the report does not expect must not cost the bundle: the report then
    says what went wrong, and summary.json and the raw files are written all the same."""
    summary.pop("bundle_errors", None)          # this writing's own, not the last one's
    try:
        summary["headline"] = headline(stage)
    except Exception as e:  # noqa: BLE001 - any failure here is reported, never raised
        summary["headline"] = []
        summary.setdefault("bundle_errors", []).append(f"headline: {type(e).__name__}: {e}")
    try:
        report = report_markdown(summary)
    except Exception as e:  # noqa: BLE001
        import traceback
        report = ("# tritonbn GPU window\n\nThe report could not be rendered; summary.json "
                  "and raw.tar.gz have everything.\n\n```\n" + traceback.format_exc()
                  + "```\n")
        summary.setdefault("bundle_errors", []).append(f"report: {type(e).__name__}: {e}")
    paths = []
    for name, text in (("summary.json", json.dumps(summary, indent=1, default=str)),
                       ("report.md", report)):
        path = os.path.join(out, name)
        with open(path + ".tmp", "w") as f:
            f.write(text)
        os.replace(path + ".tmp", path)
        paths.append(path)
    tar = os.path.join(out, "raw.tar.gz")
    cap = LOG_CAP_BYTES
    while True:
        _tar(stage, tar + ".tmp", cap)
        if os.path.getsize(tar + ".tmp") <= BUNDLE_MAX_BYTES or cap < 4096:
            break
        cap //= 8            # compressible logs are what grows: cut them harder
    os.replace(tar + ".tmp", tar)
    paths.append(tar)
    return paths


# ---------------------------------------------------------------------------------- import

def import_results(results_dir: str, dest: str) -> tuple[list, str]:
    """Committed files from a results folder: ``<dest>/<device>_<date>.md`` (the report),
    ``.json`` (the summary without logs) and ``.csv`` (the headline rows and ResNet runs);
    returns (paths, README table)."""
    with open(os.path.join(results_dir, "summary.json")) as f:
        summary = json.load(f)
    env = _env(summary)
    slug = env.get("device_slug") or "unknown-device"
    date = env.get("date") or summary.get("started_utc", "")[:10] or time.strftime("%Y-%m-%d")
    os.makedirs(dest, exist_ok=True)
    stem = os.path.join(dest, f"{slug}_{date}")
    slim = dict(summary)
    slim["steps"] = [{k: v for k, v in s.items() if k != "log_tail"} for s in summary["steps"]]
    paths = []
    md = report_markdown(summary)
    data = json.dumps(slim, indent=1, default=str)
    if len(data.encode()) > COMMIT_MAX_BYTES:          # keep the headline, drop the details
        slim["steps"] = [{k: s.get(k) for k in ("name", "status", "budget_s", "elapsed_s",
                                                "notes")} for s in slim["steps"]]
        slim["env"] = env
        data = json.dumps(slim, indent=1, default=str)
    for ext, text in ((".md", md), (".json", data)):
        raw = text.encode()
        if len(raw) > COMMIT_MAX_BYTES:
            raw = raw[:COMMIT_MAX_BYTES - 200] + b"\n\n[cut at 1 MB: the full text is in the " \
                                                 b"results folder]\n"
        with open(stem + ext, "wb") as f:
            f.write(raw)
        paths.append(stem + ext)
    keys = ["kind", "shape", "op", "dtype", "layout", "tritonbn_us", "pct_copy", "copy_gbps",
            "torch_us", "vs_torch", "torch_backend", "compile_us", "vs_compile", "predicted_us",
            "measured_over_predicted", "variant", "batch", "compiled", "step_ms", "images_per_s",
            "vs_torch_step", "loss_rel_diff", "grad_rel_l2", "parity_ok"]
    with open(stem + ".csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        for r in summary.get("headline", []):
            w.writerow({"kind": "bench", **r})
        for n in ("resnet", "resnet_compiled"):
            for r in _step(summary, n).get("summary", {}).get("runs", []):
                p = r.get("parity", {})
                w.writerow({"kind": "resnet", "variant": r["variant"], "batch": r["batch"],
                            "compiled": r.get("compiled"), "step_ms": r.get("step_ms"),
                            "images_per_s": r.get("images_per_s"),
                            "vs_torch_step": r.get("vs_torch"),
                            "loss_rel_diff": p.get("loss_rel_diff"),
                            "grad_rel_l2": p.get("grad_rel_l2"), "parity_ok": p.get("ok")})
    paths.append(stem + ".csv")
    return paths, readme_table(summary)


# ------------------------------------------------------------------------------------ main

def _import_main(argv) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_window import",
                                description="turn a GPU-window results folder into committed "
                                            "files and print the README performance table")
    p.add_argument("results_dir")
    p.add_argument("--dest", default=os.path.join("bench", "results"))
    args = p.parse_args(argv)
    if not os.path.isfile(os.path.join(args.results_dir, "summary.json")):
        p.error(f"{args.results_dir}: no summary.json (not a GPU-window results folder)")
    paths, table = import_results(args.results_dir, args.dest)
    for path in paths:
        print(f"wrote {path} ({os.path.getsize(path)} bytes)", file=sys.stderr)
    print(table, end="")
    return 0


def _override(text: str) -> tuple[str, float]:
    name, sep, seconds = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected NAME=SECONDS, got {text!r}")
    return name, float(seconds)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_window",
                                description=__doc__.split("\n\n")[0],
                                epilog="Steps and budgets (s): " + ", ".join(
                                    f"{s.name} {s.budget_s:g}" for s in STEPS)
                                + f"; reserve {RESERVE_S}. Also: `import RESULTS_DIR`.")
    p.add_argument("--out", required=True, help="results folder (gets 3 files)")
    p.add_argument("--budget-s", type=float, default=TOTAL_BUDGET_S,
                   help=f"the whole window, seconds (default {TOTAL_BUDGET_S}); step budgets "
                        "scale with it")
    p.add_argument("--dry-run", action="store_true",
                   help="CPU, Triton interpreter, tiny shapes: every step, no GPU")
    p.add_argument("--attach", action="append", default=[], metavar="FILE",
                   help="a file to bundle with the raw results (e.g. the install log)")
    # for tests and for rerunning one step by hand
    p.add_argument("--steps", help=argparse.SUPPRESS)
    p.add_argument("--step-budget", action="append", type=_override, default=[],
                   help=argparse.SUPPRESS)
    p.add_argument("--keep-stage", action="store_true", help=argparse.SUPPRESS)
    return p


def main(argv=None) -> int:
    """Entry point: ``python -m bench.gpu_window`` with these arguments."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["import"]:
        return _import_main(argv[1:])
    p = build_parser()
    args = p.parse_args(argv)
    known = {s.name for s in STEPS} | set(HIDDEN_STEPS)
    names = [n.strip() for n in args.steps.split(",") if n.strip()] if args.steps else None
    unknown = sorted(set(names or []) - known) + sorted(
        {n for n, _ in args.step_budget} - known)
    if unknown:
        p.error(f"unknown steps {unknown}")
    if args.budget_s <= RESERVE_S + MIN_STEP_S:
        p.error(f"--budget-s must exceed {RESERVE_S + MIN_STEP_S} s")
    try:
        os.makedirs(args.out, exist_ok=True)
    except OSError as e:
        p.error(f"--out {args.out}: {e}")
    summary = run_window(args.out, args.budget_s, args.dry_run, names, dict(args.step_budget),
                         args.attach, keep_stage=args.keep_stage)
    counts: dict = {}
    for s in summary["steps"]:
        counts[s["status"]] = counts.get(s["status"], 0) + 1
    print(f"[gpu_window] {summary['elapsed_s']} s; " + ", ".join(
        f"{v} {k}" for k, v in sorted(counts.items())) + f"; results in {args.out}: "
          + ", ".join(BUNDLE))
    # the window's job is evidence, failures included: exit 0 when the bundle was written
    return 0


if __name__ == "__main__":
    sys.exit(main())
