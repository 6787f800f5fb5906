"""The GPU window (bench/gpu_window.py) on CPU: its --dry-run runs every step in
Triton's interpreter and bundles the results; a step that overruns is cut while the next one
runs; a results folder turns into committed files and the README table."""
import csv
import json
import os
import subprocess
import sys
import tarfile
import time

import pytest

from bench import gpu_window as gw
from bench import gpu_window_steps as steps

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(REPO, "bench", "gpu_window.py")
WRAPPER = os.path.join(REPO, "bench", "gpu_window.sh")
# What a results folder may hand back: at most 8 files of at most 16 MB.
MAX_FILES, MAX_FILE_BYTES = 8, 16 * 1024 * 1024
# The dry run must stay a default-suite test on a 2-core machine.
DRY_RUN_LIMIT_S = 90

# What each step must leave in its folder of the bundle (besides result.json and log.txt).
EXPECTED_OUTPUTS = {
    "env": [],
    "pytest_cuda": ["pytest.log", "junit.xml"],
    "int64": [],
    "memcheck": ["memcheck.log", "kernels/result.json"],
    "bench": ["bench_rows.json"],
    "host": ["host.json"],
    "perf_model": ["perf_vs_model.csv", "perf_vs_model.json"],
    "resnet": [],
    "memory": ["memory_rows.json", "memory.md"],
    "tune": ["tuning_table.json", "tune.txt"],
    "bench_compile": ["bench_rows.json"],
    "resnet_compiled": [],
    "pytest_numerics": ["pytest.log", "junit.xml"],
}


def _window(out, *args, env=None, timeout=300):
    """Run the window as a script (it then imports no torch: quick for the self-test steps)."""
    cmd = [sys.executable, SCRIPT, "--out", str(out), *args]
    start = time.time()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(os.path.join(out, "summary.json")) as f:
        return json.load(f), time.time() - start, proc.stdout


@pytest.fixture(scope="module")
def dry(tmp_path_factory):
    """The dry run, as the GPU machine runs the window: bench/gpu_window.sh (the install step
    switched off: a test must not change the environment)."""
    out = tmp_path_factory.mktemp("window")
    env = dict(os.environ, PYTHON=sys.executable, GPU_WINDOW_NO_INSTALL="1")
    start = time.time()
    proc = subprocess.run(["bash", WRAPPER, str(out), "--dry-run"], cwd=out, env=env,
                          capture_output=True, text=True, timeout=300)
    took = time.time() - start
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    with tarfile.open(out / "raw.tar.gz") as tar:
        members = {m.name: m for m in tar.getmembers()}
        results = {}
        for name in EXPECTED_OUTPUTS:
            results[name] = json.load(tar.extractfile(f"raw/{name}/result.json"))
    return out, summary, took, members, results


def test_budgets_fit_the_window():
    assert gw.TOTAL_BUDGET_S <= 420
    assert sum(s.budget_s for s in gw.STEPS) + gw.RESERVE_S <= gw.TOTAL_BUDGET_S
    assert gw.budgets() == {s.name: s.budget_s for s in gw.STEPS}   # unscaled at 420 s
    for total in (200, 300, 420, 600):
        assert sum(gw.budgets(total).values()) <= total - gw.RESERVE_S + 0.1 * len(gw.STEPS)
    assert gw.budgets(420, ["selftest_sleep"], {"selftest_sleep": 2}) == {"selftest_sleep": 2}
    # every step of the window is a step the step runner knows, and the hidden ones too
    assert {s.name for s in gw.STEPS} | set(gw.HIDDEN_STEPS) == set(steps.STEPS)
    assert all(s.why for s in gw.STEPS)


def test_dry_run_runs_every_step(dry):
    out, summary, took, members, results = dry
    assert summary["dry_run"] is True
    assert summary["command"].startswith("python -m bench.gpu_window ")   # the wrapper's way
    assert summary["budget_s"] <= 420
    assert any(n.startswith("raw/_attached/tritonbn-install") for n in members)  # its log
    ran = [s["name"] for s in summary["steps"]]
    assert ran == [s.name for s in gw.STEPS]
    bad = {s["name"]: (s["status"], s["notes"][-3:], s.get("log_tail", [])[-8:])
           for s in summary["steps"] if s["status"] != "ok"}
    assert not bad, bad
    for name, expected in EXPECTED_OUTPUTS.items():
        for f in ["result.json", "log.txt", *expected]:
            assert f"raw/{name}/{f}" in members, (name, f)
        assert set(expected) <= set(results[name]["outputs"]), name
    assert summary["elapsed_s"] < DRY_RUN_LIMIT_S, summary["elapsed_s"]
    assert took < DRY_RUN_LIMIT_S + 15


def test_dry_run_findings(dry):
    _, summary, _, _, results = dry
    env = results["env"]["summary"]
    assert env["nvidia_smi"].startswith("not available") and env["device_slug"]
    assert env["versions"]["torch"] and env["git"]["commit"] and len(env["source_digest"]) == 16
    # pytest ran: cuda tests skipped without a GPU, the numerics subset passed
    assert results["pytest_cuda"]["summary"]["counts"].get("skipped", 0) > 0
    numerics = results["pytest_numerics"]["summary"]
    assert numerics["counts"].get("passed", 0) >= 3 and not numerics["failed"]   # 3 selected
    assert numerics["launches"]          # the conftest's table: kernels really ran
    # 64-bit offsets forced and checked against float64 in both layouts
    cases = results["int64"]["summary"]["cases"]
    assert [c["layout"] for c in cases] == ["contiguous", "channels_last"]
    assert all(c["ok"] and c["use_int64"] and c["y_err"] < steps.BIG_TOL for c in cases)
    # every kernel launched by the memcheck script; the sanitizer recorded as not available
    mem = results["memcheck"]["summary"]
    assert mem["sanitizer"].startswith("not available") and not mem["missing_kernels"]
    assert set(mem["kernels"]["launches"]) == set(steps.KERNELS)
    # the bench: tritonbn and torch eager for every op, dtype and layout of the headline set
    rows = {h["op"] + h["dtype"] + h["layout"]: h for h in summary["headline"]}
    assert len(rows) == 5 * 2 * 2
    assert all(h.get("tritonbn_us") and h.get("torch_us") and h.get("vs_torch")
               for h in rows.values())
    assert any(h.get("vs_compile") for h in rows.values())       # bench_compile joined in
    assert any(h.get("predicted_us") for h in rows.values())     # the model's prediction
    # the ResNet: torch, convert and fuse, parity with torch's bfloat16 distance
    runs = results["resnet"]["summary"]["runs"]
    assert [r["variant"] for r in runs] == ["torch", "convert", "fuse"]
    assert all(r["parity"]["ok"] and r["step_ms"] > 0 for r in runs)
    assert all(r["launches"] > 0 for r in runs if r["variant"] != "torch")
    compiled = results["resnet_compiled"]["summary"]["runs"]
    assert compiled[0]["variant"] == "fuse" and compiled[0]["parity"]["ok"]
    assert compiled[0]["launches"] > 0
    # tune took three problems from the bench's worst rows
    tune = results["tune"]["summary"]
    assert tune["source"] == "bench" and len(tune["results"]) == 3
    assert results["host"]["summary"]["rows"]


def test_bundle_is_what_comes_back(dry):
    out, *_ = dry
    files = sorted(os.listdir(out))
    assert files == sorted(gw.BUNDLE) and len(files) <= MAX_FILES
    assert all(os.path.getsize(out / f) <= MAX_FILE_BYTES for f in files)
    report = (out / "report.md").read_text()
    assert report.startswith("**DRY RUN") and "| pytest_numerics | ok |" in report


def test_import_writes_small_committed_files_and_the_readme_table(dry, tmp_path):
    out, summary, *_ = dry
    dest = tmp_path / "results"
    proc = subprocess.run([sys.executable, "-m", "bench.gpu_window", "import",
                           str(out), "--dest", str(dest)], cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    env = next(s for s in summary["steps"] if s["name"] == "env")["summary"]
    stem = f"{env['device_slug']}_{env['date']}"
    assert sorted(os.listdir(dest)) == [f"{stem}.csv", f"{stem}.json", f"{stem}.md"]
    assert all(os.path.getsize(dest / f) <= 1024 * 1024 for f in os.listdir(dest))
    table = proc.stdout
    assert "DRY RUN" in table and env["versions"]["torch_runtime"] in table
    header = [ln for ln in table.splitlines() if ln.startswith("| shape |")]
    assert header and "vs torch eager" in header[0] and "vs torch.compile" in header[0]
    body = [ln for ln in table.splitlines() if ln.startswith("| ") and "x" in ln.split("|")[1]]
    assert len(body) == len(summary["headline"]) == 20
    with open(dest / f"{stem}.csv") as f:
        kinds = [r["kind"] for r in csv.DictReader(f)]
    assert kinds.count("bench") == 20 and kinds.count("resnet") >= 4
    assert json.loads((dest / f"{stem}.json").read_text())["headline"]


def test_an_overrunning_step_is_cut_and_the_next_one_runs(tmp_path):
    env = dict(os.environ, TRITONBN_SELFTEST_SLEEP_S="120")
    summary, took, _ = _window(tmp_path, "--steps", "selftest_sleep,selftest_ok",
                               "--step-budget", "selftest_sleep=1.5", env=env, timeout=60)
    cut, after = summary["steps"]
    assert cut["name"] == "selftest_sleep" and cut["status"] == "timed_out"
    assert cut["budget_s"] == 1.5 and cut["elapsed_s"] < 1.5 + gw.KILL_GRACE_S + 1
    assert any("killed at its budget" in n for n in cut["notes"])
    with pytest.raises(ProcessLookupError):          # the step's process is gone
        os.kill(cut["summary"]["pid"], 0)
    assert after["name"] == "selftest_ok" and after["status"] == "ok"
    assert sorted(os.listdir(tmp_path)) == sorted(gw.BUNDLE)
    assert took < 30


def test_the_window_budget_caps_the_steps(tmp_path):
    # 14.5 s less the 10 s reserve leaves 4.5 s: the sleeping step is cut there, not at its
    # own 30 s, and nothing is left for the next one
    env = dict(os.environ, TRITONBN_SELFTEST_SLEEP_S="120")
    summary, took, _ = _window(tmp_path, "--budget-s", "14.5", "--steps",
                               "selftest_sleep,selftest_ok", env=env, timeout=60)
    cut, skipped = summary["steps"]
    assert cut["status"] == "timed_out" and cut["budget_s"] <= 14.5 - gw.RESERVE_S
    assert any("budget cut" in n for n in cut["notes"])
    assert skipped["status"] == "skipped"
    assert summary["elapsed_s"] <= 14.5 + gw.KILL_GRACE_S
    assert took < 30


def test_wrapper_usage():
    usage = subprocess.run(["bash", WRAPPER], capture_output=True, text=True, timeout=30)
    assert usage.returncode == 2 and "usage" in usage.stderr


def test_parse_pytest_reads_a_log_cut_short():
    log = "\n".join([
        "tests/op/test_a.py::test_x[1] PASSED                                     [ 10%]",
        "tests/op/test_a.py::test_x[2] FAILED                                     [ 20%]",
        "tests/op/test_b.py::test_y SKIPPED (needs a CUDA GPU)                    [ 30%]",
        "tests/op/test_b.py::test_z PASSED                                        [ 40%]",
    ])
    cut = steps.parse_pytest(log)
    assert cut["counts"] == {"passed": 2, "failed": 1, "skipped": 1}
    assert cut["failed"] == ["tests/op/test_a.py::test_x[2]"] and not cut["finished"]
    full = steps.parse_pytest(log + "\nFAILED tests/op/test_a.py::test_x[2] - AssertionError\n"
                              "---- Triton kernel launches in this run ----\n"
                              "bn_fwd_apply_kernel      3\n"
                              "==== 1 failed, 2 passed, 1 skipped in 1.2s ====")
    assert full["finished"] and full["totals"] == {"failed": 1, "passed": 2, "skipped": 1}
    assert full["launches"] == {"bn_fwd_apply_kernel": 3} and full["reasons"]


def test_worst_problems_alternate_torch_and_copy():
    def row(impl, op, shape, **kw):
        return dict(impl=impl, op=op, shape=shape, dtype="float16", layout="contiguous", **kw)
    rows = [row("torch", "bwd", "8x4x4x4", tritonbn_speedup=0.5),
            row("torch", "fwd_train", "8x4x4x4", tritonbn_speedup=0.9),
            row("torch", "relu_fwd", "8x4x4x4", tritonbn_speedup=0.7),   # same problem
            row("tritonbn", "fwd_eval", "2x8", pct_copy=10.0),
            row("tritonbn", "bwd", "8x4x4x4", pct_copy=20.0)]
    picked = [p for p, _ in steps.worst_problems(rows)]
    assert picked == [("bwd_train", (8, 4, 4, 4), "float16", "contiguous"),
                      ("fwd_eval", (2, 8), "float16", "contiguous"),
                      ("fwd_train", (8, 4, 4, 4), "float16", "contiguous")]


def test_a_terminated_window_still_writes_its_bundle(tmp_path):
    # a time limit on the command ends it with SIGTERM: the running step is killed and
    # the results folder still gets its three files, saying what was interrupted
    env = dict(os.environ, TRITONBN_SELFTEST_SLEEP_S="120")
    proc = subprocess.Popen([sys.executable, SCRIPT, "--out", str(tmp_path), "--steps",
                             "selftest_ok,selftest_sleep", "--step-budget",
                             "selftest_sleep=60"], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 30
    while not (tmp_path / "summary.json").exists() and time.time() < deadline:
        time.sleep(0.2)                  # the first step finished: the sleeping one runs
    time.sleep(0.5)
    proc.terminate()
    out, _ = proc.communicate(timeout=30)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["interrupted"], out
    assert [s["status"] for s in summary["steps"]] == ["ok", "interrupted"]
    assert sorted(os.listdir(tmp_path)) == sorted(gw.BUNDLE)


def test_bundle_survives_findings_it_does_not_expect(tmp_path):
    stage, out = tmp_path / "stage", tmp_path / "out"
    (stage / "bench").mkdir(parents=True)
    out.mkdir()
    (stage / "bench" / "bench_rows.json").write_text('{"rows": [{"impl": "tritonbn"}]}')
    summary = {"steps": [{"name": "resnet", "status": "ok", "summary": {"runs": [{}]}}]}
    gw.write_bundle(str(out), str(stage), summary)
    assert sorted(os.listdir(out)) == sorted(gw.BUNDLE)
    written = json.loads((out / "summary.json").read_text())
    assert [e.split(":")[0] for e in written["bundle_errors"]] == ["headline", "report"]
    assert written["headline"] == []
    assert "could not be rendered" in (out / "report.md").read_text()


def test_memory_step_dry_run(tmp_path):
    # not in STEPS until bench/gpu_window.py gives it a budget: run here directly, as its
    # process would (the interpreter: resnet50 at 32x32, ~6 s)
    ctx = steps.Ctx("memory", str(tmp_path / "memory"), str(tmp_path), REPO, time.time() + 120,
                    True)
    steps.step_memory(ctx)
    result = json.loads((tmp_path / "memory" / "result.json").read_text())
    assert result["status"] == "ok", result["notes"]
    assert set(result["outputs"]) == {"memory_rows.json", "memory.md"}
    s = result["summary"]
    assert [r["variant"] for r in s["rows"]] == list(steps.MEMORY_DRY_VARIANTS)
    assert s["target_met"] and s["inplace_ratio"] <= steps.MEMORY_TARGET
    assert all(r["ratio"] is not None and r["peak_step_mb"] is None for r in s["rows"])
    table = (tmp_path / "memory" / "memory.md").read_text()
    assert "| resnet50 | fuse inplace, LeakyReLU |" in table
    # past its deadline it starts nothing and says so
    late = steps.Ctx("memory", str(tmp_path / "late"), str(tmp_path), REPO, time.time() - 1, True)
    steps.step_memory(late)
    cut = json.loads((tmp_path / "late" / "result.json").read_text())
    assert cut["status"] == "partial" and not cut["summary"]["rows"]
    assert cut["summary"]["not_run"] == list(steps.MEMORY_DRY_VARIANTS)
