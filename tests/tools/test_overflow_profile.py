"""``tritonbn overflow``: the profiler's sweep, outputs and command line."""
import contextlib
import io
import json
import math
import os
import re
import subprocess
import sys

import warnings

import pytest
import torch

import tritonbn
from tritonbn.tools import overflow_profile as prof
from tests.helpers import assert_close, tol

META_KEYS = {"device", "date", "tritonbn", "torch", "triton", "numpy", "input"}
ROW_FIELDS = {"dtype", "reduction", "amplitude", "weight", "bias", "impl", "nonfinite_out",
              "nonfinite_out_ref_finite", "nonfinite_out_ieee", "nonfinite_grad",
              "nonfinite_grad_ref_finite", "nonfinite_grad_ieee", "failures", "at_or_beyond_max",
              "max_abs_err", "running_finite"}


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
    assert meta["input"] == prof.INPUT_DESCRIPTION
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


def test_the_input_is_what_the_description_says():
    # uniform in [-amplitude, amplitude] with both extremes present, then rounded to the dtype
    x = prof._make_point_input(1000.0, torch.float16, 4, 2, 16, seed=0)
    assert x.dtype == torch.float16
    for c in range(2):
        ch = x[:, c].double()
        assert ch.max() == 1000.0 and ch.min() == -1000.0
        assert (ch.abs() <= 1000.0).all()
    inner = x.double().flatten()[1:-1]
    # a uniform draw: about half the values beyond amplitude / 2 (a normal one: about 1 in 3,
    # of an amplitude-sized sigma; here 1 in 2 of an amplitude-sized half-width)
    assert 0.3 < float((inner.abs() > 500).double().mean()) < 0.7
    assert torch.isinf(prof._make_point_input(70000.0, torch.float16, 4, 2, 16, 0)).any()
    x = prof._make_point_input("nan", torch.float16, 4, 2, 16, seed=0)
    assert torch.isnan(x[0, 0, 0]) and int(torch.isnan(x).sum()) == 1
    assert float(x[torch.isfinite(x)].abs().max()) <= 100
    # the description says this, and the console prints it
    assert "uniformly from [-amplitude, amplitude]" in prof.INPUT_DESCRIPTION
    assert "normal" not in prof.INPUT_DESCRIPTION and "N(0" not in prof.INPUT_DESCRIPTION


def test_console_prints_the_input_and_a_failures_column(quick_run):
    out = quick_run["stdout"]
    assert f"input: {prof.INPUT_DESCRIPTION}" in out
    header = next(line for line in out.splitlines() if line.startswith("dtype"))
    assert "failures" in header.split()
    # "nonfinite y" and "nonfinite dx": one column, two words each
    col = header.split().index("failures") - 2
    naive = next(line for line in out.splitlines()
                 if line.startswith("float16") and "65000.0" in line and "naive" in line)
    rows = json.load(open(quick_run["out"] / "overflow_profile.json"))["rows"]
    edge = next(r for r in rows if r["impl"] == "naive-float16" and r["amplitude"] == "65000.0")
    assert int(naive.split()[col]) == edge["failures"] > 0
    assert re.search(r"^failures: non-finite values", out, re.M)


def test_summary_table_failures_column_leaves_out_ieee_overflow():
    rows = [_row(impl="tritonbn", out=5, out_bad=5, nonfinite_out_ieee=5, failures=0),
            _row(impl="tritonbn-saturate", out=1, out_bad=1, nonfinite_out_ieee=1, failures=1),
            _row(impl="naive-float16", out=64, out_bad=64, grad=64, grad_bad=64, failures=128)]
    lines = prof.summary_table(rows).splitlines()
    col = lines[0].split().index("failures") - 2   # as above: two two-word headers before it
    assert [int(line.split()[col]) for line in lines[1:4]] == [0, 1, 128]


def test_metrics_tell_ieee_overflow_from_failures():
    # float64 results: one beyond float16's range each way, one in range
    ref = torch.tensor([7e4, -7e4, 1.0, 2.0], dtype=torch.float64)
    rm, rv = torch.zeros(1), torch.ones(1)

    def metrics(y, impl):
        return prof._metrics(y, None, ref, None, rm, rv, torch.float16, impl)
    ieee = ref.half()                              # [inf, -inf, 1, 2]: the IEEE cast
    m = metrics(ieee, "tritonbn")
    assert (m["nonfinite_out"], m["nonfinite_out_ref_finite"], m["nonfinite_out_ieee"],
            m["failures"]) == (2, 2, 2, 0)
    assert metrics(ieee, "torch")["failures"] == metrics(ieee, "naive-float16")["failures"] == 0
    # the saturate policy promises +-65,504 there: its inf is a failure
    assert metrics(ieee, "tritonbn-saturate")["failures"] == 2
    # NaN, or an inf of the wrong sign, where float64 is beyond the range: not IEEE overflow
    wrong = torch.tensor([float("nan"), float("inf"), 1.0, 2.0]).half()
    assert metrics(wrong, "tritonbn")["nonfinite_out_ieee"] == 0
    assert metrics(wrong, "tritonbn")["failures"] == 2
    # inf where float64 is in range: a failure for everyone
    assert metrics(torch.tensor([65504.0, -65504.0, float("inf"), 2.0]).half(),
                   "tritonbn")["failures"] == 1


def test_sweep_classifies_propagate_overflow_as_ieee_not_failure():
    # γ = 30,000, β = 60,000: float64's y passes 65,504, so the default policy and torch store
    # inf there (the IEEE cast), saturate stores 65,504: none of them fails
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        rows = prof.profile(dtypes=("float16",), amplitudes=[1.0], weight_scales=(3e4,),
                            biases=(6e4,), sizes=(64,))
    by = {r["impl"]: r for r in rows}
    for impl in ("tritonbn", "torch"):
        r = by[impl]
        assert r["nonfinite_out"] > 0 and r["nonfinite_out_ieee"] == r["nonfinite_out"]
        assert r["failures"] == 0 and prof._flag(r) == prof.IEEE_OVERFLOW
    saturate = by["tritonbn-saturate"]
    assert saturate["nonfinite_out"] == 0 and saturate["failures"] == 0
    assert saturate["at_or_beyond_max"] == by["tritonbn"]["nonfinite_out"]


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
    # 65,504: between 65,000 and 70,000, in every float16 panel
    assert [p.limit_x for p in data.grid[0]] == [2.5, 2.5]
    assert data.limits == {"float16": torch.finfo(torch.float16).max}


def test_each_panel_draws_its_own_dtypes_max_and_only_on_its_axis():
    rows = [dict(r, dtype=d) for d in ("float16", "bfloat16", "float32") for r in _sweep_rows()]
    data = prof.plot_data(rows)
    panels = {row[0].dtype: row for row in data.grid}
    for dtype, row in panels.items():
        assert all(p.limit == torch.finfo(getattr(torch, dtype)).max for p in row)
    assert all(p.limit_x == 2.5 for p in panels["float16"])
    # bfloat16's and float32's largest values (~3.4e38) lie far beyond the swept 70,000: no line
    assert all(p.limit_x is None for d in ("bfloat16", "float32") for p in panels[d])
    assert data.limits == {"float16": 65504.0}
    # a sweep that reaches bfloat16's max draws bfloat16's line, and float16's is then off
    # the axis (below the smallest amplitude)
    big = [dict(r, amplitude=a) for r in rows if r["amplitude"] == "1.0"
           for a in ("1e+38", "3.395e+38", "3.41e+38")]
    data = prof.plot_data(big, extra=None)
    panels = {row[0].dtype: row[0] for row in data.grid}
    assert panels["float16"].limit_x is None
    # bfloat16's 3.3895e38 before the second slot, float32's 3.4028e38 before the third
    assert panels["bfloat16"].limit_x == 0.5 and panels["float32"].limit_x == 1.5
    assert set(data.limits) == {"bfloat16", "float32"}


def test_plot_draws_each_dtypes_line_only_in_its_panels(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    import matplotlib.axes
    import matplotlib.figure
    lines, labels = [], []
    axvline, legend = matplotlib.axes.Axes.axvline, matplotlib.figure.Figure.legend

    def spy_axvline(ax, x=0, *args, **kwargs):
        lines.append((ax, x, kwargs.get("color")))
        return axvline(ax, x, *args, **kwargs)

    def spy_legend(fig, *args, handles=(), **kwargs):
        labels.extend(h.get_label() for h in handles)
        return legend(fig, *args, handles=handles, **kwargs)
    monkeypatch.setattr(matplotlib.axes.Axes, "axvline", spy_axvline)
    monkeypatch.setattr(matplotlib.figure.Figure, "legend", spy_legend)
    rows = [dict(r, dtype=d) for d in ("float16", "bfloat16") for r in _sweep_rows()]
    assert prof.plot({"meta": {}, "rows": rows}, str(tmp_path / "p.png"))
    # float16's two panels (status strip and error axis each): four lines, all at 65,504
    assert len(lines) == 4 and {x for _, x, _ in lines} == {2.5}
    assert all("float16" in ax.get_title() or ax.get_title() == "" for ax, _, _ in lines)
    assert sum("largest finite value" in label for label in labels) == 1
    assert "65,504: float16's largest finite value" in labels


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


def _propagate_rows():
    """float16 at γ = 30,000, β = 60,000 as the sweep measures it: the default policy and torch
    store inf where float64 passes 65,504 (IEEE overflow, no failure), saturate stores 65,504,
    the naive one fails (its gradient is non-finite where float64's is finite)."""
    rows = []
    for amp in ("1.0", "65000.0"):
        rows += [_row(amp=amp, impl="tritonbn", out=56, out_bad=56, nonfinite_out_ieee=56,
                      failures=0, err=1.0),
                 _row(amp=amp, impl="torch", out=56, out_bad=56, nonfinite_out_ieee=56,
                      failures=0, err=1.0),
                 _row(amp=amp, impl="tritonbn-saturate", failures=0, err=2e4),
                 _row(amp=amp, impl="naive-float16", out=56, out_bad=56, grad=128,
                      grad_bad=128, nonfinite_out_ieee=56, failures=128, err=2e4)]
    return rows


def test_plot_data_marks_propagate_overflow_apart_from_failures():
    data = prof.plot_data(_propagate_rows(), extra=None)
    series = {s.impl: s for s in data.grid[0][0].series}
    for impl in ("tritonbn", "torch"):
        assert [pt.flag for pt in series[impl].points] == [prof.IEEE_OVERFLOW] * 2
        assert [pt.err for pt in series[impl].points] == [1.0, 1.0]   # the finite values' error
        assert not series[impl].flagged(prof.NONFINITE)
    assert [pt.flag for pt in series["naive-float16"].points] == [prof.NONFINITE] * 2
    assert [pt.flag for pt in series["tritonbn-saturate"].points] == [None, None]
    assert data.legend[-2:] == [prof.NONFINITE, prof.IEEE_OVERFLOW]
    # a saturate row with inf where float64 passes the range is a failure (failures > 0)
    bad = _row(impl="tritonbn-saturate", out=3, out_bad=3, nonfinite_out_ieee=3, failures=3)
    assert prof._flag(bad) == prof.NONFINITE
    # the CSV's strings classify the same way
    assert prof._flag({k: str(v) for k, v in _propagate_rows()[0].items()}) == prof.IEEE_OVERFLOW


def test_plot_gives_ieee_overflow_its_own_neutral_marker(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    import matplotlib.figure
    labels = {}
    legend = matplotlib.figure.Figure.legend

    def spy_legend(fig, *args, handles=(), **kwargs):
        labels.update({h.get_label(): h for h in handles})
        return legend(fig, *args, handles=handles, **kwargs)
    monkeypatch.setattr(matplotlib.figure.Figure, "legend", spy_legend)
    assert prof.plot({"meta": {}, "rows": _propagate_rows()}, str(tmp_path / "p.png"),
                     extra=None)
    ieee = labels[prof.FLAG_LABELS[prof.IEEE_OVERFLOW]]
    failure = labels[prof.FLAG_LABELS[prof.NONFINITE]]
    assert "as torch (propagate)" in ieee.get_label()
    assert failure.get_marker() == "X" and failure.get_color() == "red"
    assert ieee.get_marker() == "o" and ieee.get_markerfacecolor() != "red"
    assert ieee.get_color() != "red"


def test_plot_draws_the_synthetic_profile(tmp_path):
    pytest.importorskip("matplotlib")
    rows = _sweep_rows()
    path = str(tmp_path / "p.png")
    assert prof.plot({"meta": {"device": "test", "date": "today"}, "rows": rows}, path)
    assert os.path.getsize(path) > 10_000
    assert not math.isnan(prof.plot_data(rows).grid[0][0].limit_x)


def test_without_out_writes_into_the_current_directory_only(tmp_path):
    # as a user runs it, from a folder that is not a checkout: no bench/results tree appears
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-m", "tritonbn", "overflow", "--quick", "--dtypes",
                           "float16", "--sizes", "2", "--no-progress"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    written = re.findall(r"^wrote (.+)$", proc.stdout, re.M)
    assert len(written) == 3, proc.stdout
    assert not (tmp_path / "bench").exists()
    assert sorted(os.listdir(tmp_path)) == ["overflow_profile.csv", "overflow_profile.json",
                                            "overflow_profile.png"]
    for path in written:   # the paths printed are where the files are
        assert os.path.isfile(os.path.join(tmp_path, path))
