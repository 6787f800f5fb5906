"""The scripts in examples/ run and do what their docstrings say, at tiny sizes.

Each script runs as a user would run it: a subprocess of this Python, from the repository root
(or from another folder, to check that it leaves nothing there).
Without a GPU the kernels run in Triton's CPU interpreter, so the sizes are as small as the
scripts allow (the whole file takes about 30 s on a 2-core CPU).

torchvision: the ResNet tests need it and are skipped without it; the "needs torchvision"
message is tested either way, by putting a stand-in ``torchvision`` package that fails to import
first on PYTHONPATH (``no_torchvision_env``).
"""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 600  # generous: the interpreter on a slow, busy CPU


def run_example(script, *flags, env=None, cwd=ROOT):
    return subprocess.run([sys.executable, str(ROOT / "examples" / script), *map(str, flags)],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)


def check_ok(proc):
    assert proc.returncode == 0, f"exit status {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


@pytest.fixture
def no_torchvision_env(tmp_path):
    """An environment in which `import torchvision` fails, as if it were not installed."""
    shim = tmp_path / "shim" / "torchvision"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'torchvision'\", name='torchvision')\n")
    path = os.pathsep.join(p for p in (str(shim.parent), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path}


def _launches(out):
    return int(re.search(r"^Triton kernel launches: (\d+)$", out, re.M).group(1))


def test_swap_into_resnet_trains_with_tritonbn_layers():
    pytest.importorskip("torchvision")
    out = check_ok(run_example("swap_into_resnet.py", "--batch", 2, "--image-size", 32,
                               "--steps", 2))
    assert "resnet18: 20 tritonbn batch-norm layers, 0 of them fused" in out
    losses = [float(v) for v in re.findall(r"^step \d/2: loss (\S+)$", out, re.M)]
    assert len(losses) == 2 and all(0 < v < 100 for v in losses), out
    # every batch norm launches at least one forward and one backward kernel per step
    assert _launches(out) >= 2 * 20 * 2, out
    assert re.search(r"^  bn_fwd_\w+ +\d+$", out, re.M), out
    assert re.search(r"^  bn_bwd_\w+ +\d+$", out, re.M), out


def test_swap_into_resnet_fused():
    pytest.importorskip("torchvision")
    out = check_ok(run_example("swap_into_resnet.py", "--batch", 2, "--image-size", 32,
                               "--steps", 1, "--fuse"))
    fused = int(re.search(r"20 tritonbn batch-norm layers, (\d+) of them fused", out).group(1))
    assert fused > 0, out
    assert re.search(r"^step 1/1: loss \d+\.\d+$", out, re.M), out
    assert _launches(out) >= 2 * 20, out


def test_swap_into_resnet_without_torchvision_says_how_to_install(no_torchvision_env):
    proc = run_example("swap_into_resnet.py", "--steps", 1, env=no_torchvision_env)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "pip install torchvision" in proc.stderr
    assert "Traceback" not in proc.stderr and "step 1" not in proc.stdout


def test_tune_for_a_model_writes_a_table(tmp_path):
    import torch

    table = tmp_path / "tuning.json"
    out = check_ok(run_example("tune_for_a_model.py", "--model", "tiny", "--input-shape",
                               "8,3,64,64", "--max-candidates", 2, "--table", table))
    assert "tiny conv net on input (8, 3, 64, 64): 2 batch-norm layers" in out
    assert "(8, 16, 64, 64)" in out and "(8, 32, 32, 32)" in out
    if not torch.cuda.is_available():
        assert "SMOKE MODE" in out
    written = int(re.search(r"^wrote (\d+) entries to ", out, re.M).group(1))
    entries = json.loads(table.read_text())["entries"]
    # 3 ops x 2 layouts per tuned shape, each a plan the dispatcher can read
    assert written == len(entries) and written > 0 and written % 6 == 0
    assert {e["op"] for e in entries} == {"fwd_train", "fwd_eval", "bwd_train"}
    assert {e["memory_format"] for e in entries} == {"contiguous", "channels_last"}
    assert all(e["dtype"] == "float16" and e["plan"]["variant"] in ("onepass", "split")
               for e in entries)


def test_tune_for_a_model_leaves_nothing_in_the_folder_it_runs_from(tmp_path):
    # no --table: the table and its lock file go to a new temporary folder, which it names
    cwd, tmp = tmp_path / "cwd", tmp_path / "tmp"
    cwd.mkdir()
    tmp.mkdir()
    out = check_ok(run_example("tune_for_a_model.py", "--model", "tiny", "--input-shape",
                               "8,3,64,64", "--max-candidates", 1, cwd=cwd,
                               env={**os.environ, "TMPDIR": str(tmp)}))
    assert os.listdir(cwd) == []
    table = Path(re.search(r"^tuning table: (\S+) \(a new temporary folder", out, re.M).group(1))
    assert table.parent.parent == tmp and table.is_file()
    assert sorted(os.listdir(table.parent)) == sorted([table.name, table.name + ".lock"])
    assert re.search(rf"^wrote [1-9]\d* entries to {re.escape(str(table))} ", out, re.M), out
    assert f"TRITONBN_TUNING_TABLE={table} " in out


def test_tune_for_a_model_falls_back_to_the_tiny_net_without_torchvision(tmp_path,
                                                                        no_torchvision_env):
    out = check_ok(run_example("tune_for_a_model.py", "--input-shape", "8,3,64,64",
                               "--max-candidates", 1, "--table", tmp_path / "t.json",
                               env=no_torchvision_env))
    assert "torchvision is not installed (pip install torchvision)" in out
    assert "tiny conv net on input" in out and re.search(r"^wrote [1-9]\d* entries", out, re.M)


def test_float16_headroom_finds_the_layer_and_saturate_removes_inf():
    out = check_ok(run_example("float16_headroom.py", "--batch", 2, "--size", 8, "--steps", 2))
    rows = {m[0]: int(m[1]) for m in re.findall(r"^(bn\d) +float16 +(\d+) ", out, re.M)}
    assert set(rows) == {"bn1", "bn2", "bn3"}, out
    assert rows["bn3"] > 0 and rows["bn1"] == rows["bn2"] == 0
    assert "closest to the edge: bn3" in out
    before = int(re.search(r"overflow='propagate'\): (\d+)$", out, re.M).group(1))
    after = int(re.search(r"overflow='saturate'\): (\d+) ", out, re.M).group(1))
    assert before > 0 and after == 0, out
    assert "no inf after saturate" in out
