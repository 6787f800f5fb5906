"""``tritonbn overflow``: the profiler's sweep, outputs and command line."""
import contextlib
import io
import json
import math
import os
import sys

import pytest
import torch

import tritonbn
from tritonbn.tools import overflow_profile as prof
from tests.helpers import assert_close, tol

META_KEYS = {"device", "date", "tritonbn", "torch", "triton", "numpy"}
ROW_FIELDS = {"dtype", "reduction", "amplitude", "weight", "bias", "impl", "nonfinite_out",
              "nonfinite_grad", "at_or_beyond_max", "max_abs_err", "running_finite"}


def test_naive_half_fails_where_tritonbn_is_exact(device):
    g = torch.Generator().manual_seed(1)
    x = (65504 * (0.99 + 0.01 * torch.rand(4, 2, 64, generator=g))
         * torch.where(torch.rand(4, 2, 64, generator=g) < 0.5, -1.0, 1.0)).half().to(device)
    w, b = torch.ones(2, device=device), torch.zeros(2, device=device)
    ref = tritonbn.batch_norm_reference(x, None, None, w, b, True)[0]
    assert_close(tritonbn.batch_norm(x, None, None, w, b, training=True), ref,
                 **tol(torch.float16, 256))
    naive = prof.naive_half(x, w, b, torch.zeros(2, device=device), torch.ones(2, device=device))
    assert not torch.isfinite(naive).all()  # x*x overflows float16: the naive variance is inf


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One real quick sweep (float16, 64 values per channel: 3 points), shared by the tests that
    read its files; stdout and stderr kept for the ones that read those."""
    out = tmp_path_factory.mktemp("overflow")
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        rc = prof.main(["--quick", "--dtypes", "float16", "--sizes", "64", "--out", str(out)])
    return dict(rc=rc, out=out, stdout=stdout.getvalue(), stderr=stderr.getvalue())


def test_profiler_json_has_every_field(quick_run):
    tmp_path = quick_run["out"]
    assert quick_run["rc"] == 0
    rows = json.load(open(tmp_path / "overflow_profile.json"))["rows"]
    assert rows and all(ROW_FIELDS <= set(r) for r in rows)
    assert {r["impl"] for r in rows} == {"tritonbn", "tritonbn-saturate", "torch", "naive-float16"}
    edge = {r["impl"]: r for r in rows if r["amplitude"] == "65000.0"}
    assert edge["tritonbn"]["nonfinite_out"] == 0 and edge["tritonbn"]["running_finite"]
    assert edge["naive-float16"]["nonfinite_out"] > 0   # what float32 accumulation buys
    # ... and that is a failure, not an inf input's expected inf: float64 is finite there
    assert edge["naive-float16"]["nonfinite_out_ref_finite"] > 0
    inf = {r["impl"]: r for r in rows if r["amplitude"] == "inf"}
    assert inf["tritonbn"]["nonfinite_out"] > 0 and inf["tritonbn"]["nonfinite_out_ref_finite"] == 0
    assert os.path.exists(tmp_path / "overflow_profile.csv")
    assert os.path.exists(tmp_path / "overflow_profile.png")


def test_json_and_csv_carry_the_metadata(quick_run):
    meta = json.load(open(quick_run["out"] / "overflow_profile.json"))["meta"]
    assert META_KEYS <= set(meta)
    assert meta["torch"] == torch.__version__ and meta["tritonbn"] == tritonbn.__version__
    assert meta["device"] == (torch.cuda.get_device_name() if torch.cuda.is_available()
                              else "CPU, Triton interpreter")
    assert meta["dtypes"] == ["float16"] and meta["reductions"] == [64]
    csv_meta, csv_rows = prof.read_csv(str(quick_run["out"] / "overflow_profile.csv"))
    assert {k: csv_meta[k] for k in META_KEYS} == {k: str(meta[k]) for k in META_KEYS}
    # the file is comment lines, then what csv.DictReader reads
    with open(quick_run["out"] / "overflow_profile.csv") as f:
        lines = f.read().splitlines()
    n_comments = sum(1 for line in lines if line.startswith("#"))
    assert all(line.startswith("#") for line in lines[:n_comments])
    assert lines[n_comments].startswith("dtype,")
    assert len(csv_rows) == len(json.load(open(quick_run["out"] / "overflow_profile.json"))["rows"])
    assert ROW_FIELDS <= set(csv_rows[0])


def test_progress_goes_to_stderr(quick_run):
    assert "point" in quick_run["stderr"] and "3/3" in quick_run["stderr"]
    assert "point" not in quick_run["stdout"]   # stdout is the table and the paths written


@pytest.mark.parametrize("argv, says", [
    (["--dtypes", "fp16"], "float16, bfloat16, float32"),
    (["--dtypes", "int8"], "float16, bfloat16, float32"),
    (["--dtypes", "float16,"], None),   # a trailing comma is fine...
    (["--sizes", "abc"], "integers"),
    (["--sizes", "0"], ">= 2"),
    (["--sizes", "64,-1"], ">= 2"),
    (["--stem", "sub/name"], "without folders"),
    (["--out", "/proc/nope"], "/proc/nope"),
    (["--out", "{file}/sub"], "cannot create"),   # a folder under a plain file
])
def test_bad_arguments_are_usage_errors_before_any_work(argv, says, tmp_path, monkeypatch,
                                                        capsys):
    if says is None:   # ...and the sweep must then start: stop it there
        argv = argv + ["--out", str(tmp_path)]
    if "/proc/nope" in argv and not sys.platform.startswith("linux"):
        pytest.skip("/proc is Linux's")
    (tmp_path / "file").write_text("")
    argv = [a.replace("{file}", str(tmp_path / "file")) for a in argv]

    class Started(Exception):
        pass

    def no_sweep(**kwargs):
        raise Started
    monkeypatch.setattr(prof, "profile", no_sweep)
    with tritonbn.count_launches() as launches:
        if says is None:
            with pytest.raises(Started):
                prof.main(argv)
            return
        with pytest.raises(SystemExit) as exit_:
            prof.main(argv)
    assert exit_.value.code == 2
    assert not launches                    # no kernel ran
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert sum("error:" in line for line in err.splitlines()) == 1   # one line says why
    assert says in err


def _row(dtype="float16", m=64, amp="1.0", impl="tritonbn", weight=1.0, bias=0.0, err=5e-4,
         out=0, out_bad=0, grad=0, grad_bad=0, **extra):
    row = dict(dtype=dtype, reduction=m, amplitude=amp, weight=weight, bias=bias, impl=impl,
               nonfinite_out=out, nonfinite_out_ref_finite=out_bad, nonfinite_grad=grad,
               nonfinite_grad_ref_finite=grad_bad, at_or_beyond_max=0, max_abs_err=err,
               running_finite=True)
    row.update(extra)
    return row


def _sweep_rows():
    """A small synthetic profile: two sizes, the naive one broken at 65,000 (and at 1,000 for
    M = 1024), everything non-finite at 70,000 and on the inf input as float64 is."""
    rows = []
    for m in (64, 1024):
        for impl in ("tritonbn", "torch", "naive-float16"):
            for amp in ("1.0", "1000.0", "65000.0", "70000.0", "inf"):
                naive = impl.startswith("naive")
                if amp in ("70000.0", "inf"):   # the input itself is inf: float64 is too
                    rows.append(_row(m=m, amp=amp, impl=impl, out=2 * m, grad=2 * m,
                                     err=float("nan") if amp == "70000.0" else 5e-4))
                elif naive and (amp == "65000.0" or (amp == "1000.0" and m == 1024)):
                    rows.append(_row(m=m, amp=amp, impl=impl, out=m, out_bad=m, err=3.0))
                else:
                    rows.append(_row(m=m, amp=amp, impl=impl, err=2e-3 if naive else 5e-4))
    return rows


def test_plot_data_one_panel_per_reduction_size():
    data = prof.plot_data(_sweep_rows())
    assert len(data.grid) == 1                      # one dtype: one row of panels
    assert [p.reduction for p in data.grid[0]] == [64, 1024]
    assert all((p.dtype, p.weight, p.bias) == ("float16", 1.0, 0.0) for p in data.grid[0])
    # a panel's series hold that size's points only: one per amplitude
    for p in data.grid[0]:
        assert all(len(s.points) == 5 for s in p.series)
    assert data.amplitudes == ["1.0", "1000.0", "65000.0", "70000.0", "inf"]
    assert data.tick_labels[:4] == ["1", "1,000", "65,000", "70,000"]
    assert data.tick_labels[-1].startswith("inf")
    assert data.limit_x == 2.5                      # 65,504: between 65,000 and 70,000


def test_plot_data_puts_nonfinite_points_in_the_strip_not_on_the_axis():
    data = prof.plot_data(_sweep_rows())
    small, large = data.grid[0]
    naive = {p.reduction: next(s for s in p.series if s.impl == "naive-float16")
             for p in (small, large)}
    broken = {p.reduction: [pt.amplitude for pt in naive[p.reduction].flagged(prof.NONFINITE)]
              for p in (small, large)}
    assert broken == {64: ["65000.0"], 1024: ["1000.0", "65000.0"]}
    # a broken point's error is not drawn: its finite values would look accurate
    assert all(pt.err is None for pt in naive[1024].flagged(prof.NONFINITE))
    ours = next(s for s in large.series if s.impl == "tritonbn")
    assert not ours.flagged(prof.NONFINITE)
    # inf input: non-finite as float64 is, and the finite channel's error is still drawn
    inf = next(pt for pt in ours.points if pt.amplitude == "inf")
    assert inf.flag == prof.AS_REFERENCE and inf.err == 5e-4
    # 70,000 in float16: nothing finite to compare, only the strip's marker
    edge = next(pt for pt in ours.points if pt.amplitude == "70000.0")
    assert edge.flag == prof.AS_REFERENCE and edge.err is None
    assert [pt.amplitude for pt in ours.drawn()] == ["1.0", "1000.0", "65000.0", "inf"]
    # coinciding implementations sit side by side, not on top of each other
    xs = {s.impl: s.points[0].x for s in large.series}
    assert len(set(xs.values())) == len(xs)
    assert all(abs(x - 0) < 0.5 for x in xs.values())   # ... within their amplitude's slot


def test_plot_data_legend_lists_only_series_with_points():
    rows = [r for r in _sweep_rows() if r["impl"] != "torch"]
    rows.append(_row(impl="tritonbn-saturate", amp="1.0", weight=3e4, bias=6e4))   # not shown
    data = prof.plot_data(rows, extra=None)
    assert data.legend == ["tritonbn", "naive", prof.NONFINITE, prof.AS_REFERENCE]
    assert data.lanes == ["tritonbn", "naive"]
    # a series whose every point is flagged has no line: no legend entry for it either
    rows = [r for r in rows if not (r["impl"] == "tritonbn" and r["weight"] == 1.0)]
    rows += [_row(impl="tritonbn", m=m, amp="1.0", error="RuntimeError: refused")
             for m in (64, 1024)]
    data = prof.plot_data(rows, extra=None)
    assert "tritonbn" not in data.legend and prof.RAISED in data.legend
    assert "tritonbn" in data.lanes                 # ... but its lane shows the raised markers


def test_plot_data_extra_column_and_rows_read_back_from_csv(tmp_path):
    rows = _sweep_rows() + [_row(m=1024, amp=a, impl=i, weight=3e4, bias=6e4, out=5, out_bad=5)
                            for a in ("1.0", "65000.0") for i in ("tritonbn", "torch")]
    data = prof.plot_data(rows)
    assert [(p.reduction, p.weight, p.bias) for p in data.grid[0]] == [
        (64, 1.0, 0.0), (1024, 1.0, 0.0), (1024, 3e4, 6e4)]
    big = data.grid[0][-1]
    assert all(pt.flag == prof.NONFINITE for s in big.series for pt in s.points)
    # the CSV's string rows give the same panels and flags
    prof.write_data({"meta": {"device": "test"}, "rows": rows}, str(tmp_path), "p")
    meta, back = prof.read_csv(str(tmp_path / "p.csv"))
    assert meta == {"device": "test"}
    again = prof.plot_data(back)
    assert [[(p.reduction, [(s.impl, [(pt.amplitude, pt.flag, pt.err) for pt in s.points])
                            for s in p.series]) for p in row] for row in again.grid] == \
        [[(p.reduction, [(s.impl, [(pt.amplitude, pt.flag, pt.err) for pt in s.points])
                         for s in p.series]) for p in row] for row in data.grid]


def test_without_matplotlib_json_and_csv_are_still_written(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(prof, "profile", lambda **kwargs: _sweep_rows())
    monkeypatch.setitem(sys.modules, "matplotlib", None)   # import matplotlib -> ImportError
    assert prof.main(["--out", str(tmp_path), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "no PNG" in out
    assert os.path.exists(tmp_path / "overflow_profile.json")
    assert os.path.exists(tmp_path / "overflow_profile.csv")
    assert not os.path.exists(tmp_path / "overflow_profile.png")


def test_plot_draws_the_synthetic_profile(tmp_path):
    pytest.importorskip("matplotlib")
    rows = _sweep_rows()
    path = str(tmp_path / "p.png")
    assert prof.plot({"meta": {"device": "test", "date": "today"}, "rows": rows}, path)
    assert os.path.getsize(path) > 10_000
    assert not math.isnan(prof.plot_data(rows).limit_x)
