"""`tritonbn bench` end to end (smoke mode through the interpreter when there is no GPU): every
op and peer measured, the byte model applied, JSON/CSV/markdown/PNG written and labelled."""
import contextlib
import csv
import io
import json
import os
import subprocess
import sys
import time

import pytest
import torch

from tritonbn import launch
from tritonbn.tools import bench, cli, peers
from tritonbn.tools import bench_report as report
from tritonbn.tools.timing import SMOKE_LABEL, smoke_mode

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    """One CLI run shared by the tests below: tritonbn and torch eager, every op, both layouts."""
    out = tmp_path_factory.mktemp("bench")
    argv = ["bench", "--shape", "2,4,4,4", "--shape", "8,4", "--dtypes", "float16",
            "--impls", "tritonbn,torch", "--out", str(out), "--no-progress", "--tag", "t1"]
    buf = io.StringIO()
    with launch.count_launches() as ran, contextlib.redirect_stdout(buf):
        assert cli.main(argv) == 0
    return out, buf.getvalue(), ran


def test_bench_runs_the_kernels_and_writes_every_output(bench_run):
    out, stdout, ran = bench_run
    assert ran["bn_fwd_onepass_kernel"] > 0 and ran["bn_bwd_onepass_kernel"] > 0  # really ran
    files = sorted(os.listdir(out))
    exts = sorted(os.path.splitext(f)[1] for f in files)
    assert exts == [".csv", ".json", ".md", ".png"]
    stem = os.path.splitext(files[0])[0]
    assert stem.startswith("bench_") and stem.endswith(time.strftime("%Y-%m-%d") + "_t1")
    data = json.loads((out / f"{stem}.json").read_text())
    meta = data["meta"]
    for key in ("device", "torch", "triton", "date", "compile_backend", "traffic_model"):
        assert key in meta
    if smoke_mode():
        assert meta["smoke"] and meta["note"] == SMOKE_LABEL and "smoke" in stem
        assert stdout.startswith(SMOKE_LABEL)
        md = (out / f"{stem}.md").read_text()
        assert md.startswith(f"**{SMOKE_LABEL}**") and md.rstrip().endswith(f"**{SMOKE_LABEL}**")
        with open(out / f"{stem}.csv") as f:
            assert all(r["note"] == SMOKE_LABEL for r in csv.DictReader(f))
    else:
        assert meta["driver"] and meta["device"] == torch.cuda.get_device_name()


def test_bench_rows_cover_ops_layouts_and_peers(bench_run):
    out, _, _ = bench_run
    (path,) = [p for p in out.iterdir() if p.suffix == ".json"]
    rows = json.loads(path.read_text())["rows"]
    cases = {(r["shape"], r["layout"]) for r in rows}
    # channels_last applies to 4-D (and 5-D) shapes only
    assert cases == {("2x4x4x4", "contiguous"), ("2x4x4x4", "channels_last"), ("8x4", "contiguous")}
    assert {(r["impl"], r["op"]) for r in rows} == {(i, o) for i in ("tritonbn", "torch")
                                                     for o in bench.OPS}
    for r in rows:
        assert "error" not in r, r
        elem = 2
        assert r["bytes"] == bench.TRAFFIC[r["op"]] * elem * r["numel"]
        # relative only: smoke-mode figures are tiny (1e-5 GB/s), so any absolute slack would
        # let a units mistake through; the slack covers rounding to 4 digits and 0.01 us
        assert r["gbps"] == pytest.approx(r["bytes"] / r["time_us"] / 1e3, rel=2e-3)
        # three 4-digit roundings (gbps, copy_gbps, pct_copy) of up to 5e-4 each
        assert r["pct_copy"] == pytest.approx(100 * r["gbps"] / r["copy_gbps"], rel=1.6e-3)
        if r["impl"] == "torch":
            assert r["torch_backend"] in ("cudnn", "native", "miopen")
            ours = next(o for o in rows if o["impl"] == "tritonbn" and
                        (o["shape"], o["layout"], o["op"]) == (r["shape"], r["layout"], r["op"]))
            assert r["tritonbn_speedup"] == pytest.approx(r["time_us"] / ours["time_us"], rel=0.01)


def test_markdown_reports_summary_and_targets(bench_run):
    out, _, _ = bench_run
    (path,) = [p for p in out.iterdir() if p.suffix == ".md"]
    md = path.read_text()
    assert "| op | shape | layout | dtype | copy GB/s | tritonbn us |" in md
    assert "Geometric-mean speedup" in md and "torch backend" in md
    assert "fwd_train >= 1.3x torch (geomean)" in md and "host overhead" in md


def test_torch_compile_peer_and_backend_detection(tmp_path):
    result = bench.run_bench([(2, 4, 4, 4)], ops=("fwd_train", "bwd"), dtypes=("float32",),
                                 layouts=("contiguous",), impls=["tritonbn", "torch.compile"])
    rows = {r["impl"]: r for r in result["rows"] if r["op"] == "bwd"}
    assert "time_us" in rows["torch.compile"] and rows["torch.compile"]["tritonbn_speedup"] > 0
    assert rows["torch.compile"]["compile_backend"] == result["meta"]["compile_backend"]
    backends = result["meta"]["torch_backends"][0]
    if not torch.cuda.is_available():
        assert backends["train_backend"] == backends["eval_backend"] == "native"
    assert backends["train_cudnn_enabled"] == torch.backends.cudnn.enabled
    paths = report.write(result, str(tmp_path), plot=False)
    assert [os.path.splitext(p)[1] for p in paths] == [".json", ".csv", ".md"]


def test_unknown_peer_is_refused():
    with pytest.raises(ValueError, match="not available"):
        bench.run_bench([(2, 4)], impls=["nonesuch"])
    assert set(peers.available_peers()) >= {"tritonbn", "torch", "torch.compile"}


def test_python_m_bench_is_a_thin_entry_point():
    proc = subprocess.run([sys.executable, "-m", "bench", "--help"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "usage: tritonbn bench" in proc.stdout and "--impls" in proc.stdout


def test_bench_refuses_an_unusable_out_folder_before_measuring(tmp_path, capsys):
    a_file = tmp_path / "results"
    a_file.write_text("not a folder")
    with launch.count_launches() as ran, pytest.raises(SystemExit) as exit_:
        cli.main(["bench", "--shape", "2,4", "--out", str(a_file / "sub"), "--no-progress"])
    assert exit_.value.code == 2 and "--out" in capsys.readouterr().err and not ran
    with pytest.raises(SystemExit, match="nothing chosen"):
        cli.main(["bench", "--shape", "2,4", "--dtypes", ""])
