"""Host time: the do-nothing CUDA driver, the direct launch path, and `python -m bench.host`.

The launch-equivalence test runs, in a process whose Triton loads the recording do-nothing
driver, every launch of the compile check's CI subset twice -- through Triton's own
``kernel[grid]`` and through tritonbn's direct path -- and requires the grid, block, shared
memory and every parameter's bytes that reach cuLaunchKernelEx to be identical."""
import json
import os
import subprocess
import sys

import pytest

from bench import host
from tritonbn import direct_launch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def driver_env(tmp_path_factory):
    env = host.driver_env(host.build_driver(str(tmp_path_factory.mktemp("driver"))))
    env["PYTHONWARNINGS"] = "ignore::UserWarning"
    return env


def _run(env, *args, timeout=900):
    # bench/ is a folder of the checkout, not of the installed package: put the checkout on the
    # path of every child (scripts run by path do not get the current directory)
    env = dict(env, PYTHONPATH=os.pathsep.join(p for p in (REPO, env.get("PYTHONPATH")) if p))
    out = subprocess.run([sys.executable, *args], env=env, cwd=REPO, capture_output=True,
                         text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_the_direct_path_launches_exactly_what_triton_launches(driver_env):
    out = _run(driver_env, os.path.join("tests", "bench", "host_worker.py"))
    figures = json.loads(out.strip().splitlines()[-1])
    assert figures["launches"] >= 200 and figures["distinct"] >= 40
    assert figures["direct"] == figures["launches"]      # every one took the direct path
    # a Site keeps every aligned launch and, on the Triton versions direct_launch knows, calls
    # Triton's C launch function itself; an unaligned pointer takes the full lookup
    assert figures["kept"] == figures["launches"]        # (the subset's tensors are aligned)
    assert figures["c_direct"] == (figures["kept"] if direct_launch._FORM else 0)
    assert figures["misaligned_entries"] == 1


def test_a_launch_hook_sends_launches_through_triton(driver_env):
    code = """
from bench import host
host.use_driver()
import torch, tritonbn
from triton import knobs
from tritonbn import plan as planner
seen = []
h100 = planner.DeviceInfo("H100", 132, (9, 0), False)
with planner.planning_for(h100):
    x = torch.randn(4, 8, 4, 4)
    for _ in range(2):
        tritonbn.batch_norm(x, None, None, training=True)        # compiled, cached
    knobs.runtime.launch_enter_hook.add(lambda metadata: seen.append(metadata.get()["name"]))
    tritonbn.batch_norm(x, None, None, training=True)
print(seen)
"""
    assert "bn_fwd_onepass_kernel" in _run(driver_env, "-c", code)


def test_host_benchmark_reports_every_case(driver_env, tmp_path):
    path = tmp_path / "host.json"
    out = _run(driver_env, "-m", "bench.host", "--calls", "20", "--rounds", "1",
               "--no-compile", "--json", str(path))
    result = json.loads(path.read_text())
    cases = {(r["case"], r["launches"]) for r in result["rows"]}
    for case in ("module forward", "functional forward", "backward"):
        assert {(case, 1), (case, 2)} <= cases
    assert {r["launches"] for r in result["rows"] if r["case"].startswith("training step")} \
        == {2, 4}
    for r in result["rows"]:
        assert r["python_us"] > 0 and r["launch_us"] > 0 and r["torch_us"] > 0
    assert "Triton's launch path" in out and "do-nothing libcuda" in out


def test_host_benchmark_runs_without_a_gpu(tmp_path):
    """Started plainly, it builds the do-nothing driver and measures in a process of its own."""
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    out = _run(env, "-m", "bench.host", "--calls", "5", "--rounds", "1", "--no-compile")
    assert "| training step (module forward + backward) | 4 |" in out
