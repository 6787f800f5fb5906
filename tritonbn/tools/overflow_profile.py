"""``tritonbn overflow``: how batch norm behaves near half precision's limit, measured.

Sweeps input amplitude (finite values at the edge, values that round to inf, inf and NaN inputs),
weight scale, bias, reduction size and dtype, forward and backward, for tritonbn (both output
policies), torch eager and a naive batch norm that accumulates in the input's half precision,
each against the float64 reference; prints a table and writes ``<stem>.json``, ``<stem>.csv`` and
``<stem>.png`` into ``--out`` (default: the current directory), printing each path written (the
PNG needs matplotlib; without it the tool says "no PNG" and writes the rest).

The input (INPUT_DESCRIPTION, also in the files' metadata as "input"): per channel, values drawn
uniformly from [-amplitude, amplitude] in float64 with +amplitude and -amplitude placed once each,
so that the amplitude is exactly the largest |x| the batch norm sees, then rounded to the dtype
(float16 rounds 70,000 to inf). A uniform draw with the extremes pinned, rather than a normal
one, because the sweep is about the largest |x|: a normal draw's maximum would vary with the
reduction size and the seed. The inf and NaN amplitudes draw from [-100, 100] instead and put one
inf or NaN in channel 0.

Both files carry the same metadata (device, tritonbn / torch / triton / numpy versions, date and
what was swept, the input as described above):

* JSON: one object ``{"meta": {...}, "rows": [...]}``, one row per (point, implementation).
* CSV: the metadata first, as ``# key: value`` comment lines (lists comma-separated), then an
  ordinary header and one row per (point, implementation). ``csv.DictReader`` reads it once the
  comment lines are skipped: ``csv.DictReader(line for line in f if not line.startswith("#"))``;
  :func:`read_csv` does that and returns the metadata too.

Each row has: dtype, reduction (values per channel), amplitude (a string: "65000.0", "inf",
"nan"), weight, bias, impl; then nonfinite_out / nonfinite_grad (non-finite values in y / dx),
nonfinite_out_ref_finite / nonfinite_grad_ref_finite (those of them where the float64 result is
finite; an inf input makes float64 non-finite too), nonfinite_out_ieee / nonfinite_grad_ieee (of
those, the values where float64's result lies beyond the dtype's range and the implementation
stored the same-signed inf the IEEE cast gives: what tritonbn's default overflow="propagate" and
torch document), failures (non-finite values where float64 is finite that are not that IEEE
overflow, y and dx together: the real failures; for the "saturate" policy, which promises
+-max instead of inf, the IEEE overflow counts too), at_or_beyond_max (|y| at or above the
dtype's max), max_abs_err (largest |y - y64| over the values both have finite; NaN when there
are none) and running_finite. An implementation that raises gets an ``error`` field
instead of the measurements. The backward pass takes a gradient of ones, for which dx is exactly
0 in exact arithmetic: it shows where non-finite values appear, not how accurate dx is.

The PNG has a panel per (dtype, reduction size) at γ = 1, β = 0, plus a column at γ = 30,000,
β = 60,000: max |y - y64| on a log axis against the swept amplitudes, and above each panel a
strip with a lane per implementation that marks its non-finite results: a red X for failures
only; the IEEE overflow of the propagate policy and torch, and non-finite values float64 has too,
get neutral markers of their own. Each panel draws its dtype's largest finite value as a dashed
line where that value falls inside the swept amplitudes (float16's 65,504; bfloat16's and
float32's lie far beyond). plot_data() decides everything the plot shows and can be tested
without drawing.
Progress goes to stderr during the sweep (``--no-progress`` turns it off).
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import math
import os
import platform
import sys
import warnings
from dataclasses import dataclass, field

import torch

from .shapes import DTYPES

__all__ = ["AMPLITUDES", "FIELDS", "INPUT_DESCRIPTION", "stores_ieee", "naive_half", "n_points",
           "profile", "metadata", "summary_table", "write_data", "read_csv", "plot_data", "plot",
           "build_parser", "main"]

# 1 ... 32,000: from tame to "x² overflows float16" (above 256) to within 2x of the limit;
# 65,000: within 1% of 65,504; 70,000: rounds to inf in float16 (anything >= 65,520 does);
# "inf" / "nan": one such value in channel 0, the rest of the batch tame.
AMPLITUDES = [1.0, 256.0, 1e3, 1e4, 3.2e4, 65000.0, 70000.0, "inf", "nan"]

# What every point's input is (_make_point_input): printed, and in the files' metadata.
INPUT_DESCRIPTION = (
    "per channel, values drawn uniformly from [-amplitude, amplitude] in float64 with +amplitude "
    "and -amplitude placed once each (the amplitude is exactly the largest |x|), then rounded to "
    "the dtype (float16 rounds 70,000 to inf); for the inf and NaN amplitudes, values drawn "
    "uniformly from [-100, 100] with one inf or NaN in channel 0")

# The row fields, in the order the CSV writes them (fields a row lacks stay empty there).
FIELDS = ["dtype", "reduction", "amplitude", "weight", "bias", "impl", "nonfinite_out",
          "nonfinite_out_ref_finite", "nonfinite_out_ieee", "nonfinite_grad",
          "nonfinite_grad_ref_finite", "nonfinite_grad_ieee", "failures", "at_or_beyond_max",
          "max_abs_err", "running_finite", "error"]


def naive_half(x: torch.Tensor, w, b, running_mean, running_var, eps=1e-5, momentum=0.1):
    """Batch norm as a naive half-precision implementation would do it: sums accumulated in the
    input dtype (pairwise, each partial rounded), variance as E[x²] - E[x]², x² in that dtype."""
    c = x.shape[1]
    flat = x.transpose(0, 1).reshape(c, -1)
    m = flat.shape[1]

    def mean_in_dtype(t):
        while t.shape[1] > 1:   # pairwise sum, every partial rounded to the dtype
            if t.shape[1] % 2:
                t = torch.cat([t, torch.zeros_like(t[:, :1])], dim=1)
            t = t[:, 0::2] + t[:, 1::2]
        return t[:, 0] / m

    mean = mean_in_dtype(flat)
    var = mean_in_dtype(flat * flat) - mean * mean
    shape = [1, c] + [1] * (x.dim() - 2)
    y = (x - mean.view(shape)) / torch.sqrt(var.view(shape) + eps) * w.to(x.dtype).view(shape) \
        + b.to(x.dtype).view(shape)
    with torch.no_grad():
        unbiased = var * m / max(m - 1, 1)
        running_mean.copy_((1 - momentum) * running_mean + momentum * mean.to(running_mean.dtype))
        running_var.copy_((1 - momentum) * running_var + momentum * unbiased.to(running_var.dtype))
    return y


def _split(m: int) -> tuple[int, int]:
    """(samples N, spatial size S) with N * S == m values per channel: 4 samples when m allows
    (so the reduction runs over samples and space both), else 2, else 1."""
    n = next(k for k in (4, 2, 1) if m % k == 0)
    return n, m // n


def _make_point_input(amp, dtype, n, c, s, seed):
    """The (n, c, s) input of one point, as INPUT_DESCRIPTION says."""
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(n, c, s, generator=g, dtype=torch.float64) * 2 - 1
    if isinstance(amp, str):
        x = base * 100.0
        x[0, 0, 0] = float(amp)       # one non-finite input in channel 0
    else:
        x = base * amp
        x[0, :, 0], x[-1, :, -1] = amp, -amp   # the amplitude itself is present in each channel
    return x.to(dtype)  # values beyond the dtype's range round to inf here


def _max_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest |a - ref| over the values both have finite; NaN when there are none."""
    a = a.double()
    both = torch.isfinite(a) & torch.isfinite(ref)
    err = (a - ref).abs()[both]
    return float(err.max()) if err.numel() else float("nan")


def _nonfinite_counts(a: torch.Tensor, ref: torch.Tensor, dtype) -> tuple[int, int, int]:
    """(non-finite values of ``a``; those where float64's ``ref`` is finite; of those, the ones
    that are IEEE overflow: ``ref`` beyond the dtype's range and ``a`` the same-signed inf that
    casting ``ref`` to the dtype gives)."""
    bad = ~torch.isfinite(a)
    ref_finite = bad & torch.isfinite(ref)
    ieee = ref_finite & (a.double() == ref.to(dtype).double())   # equal only where both are inf
    return int(bad.sum()), int(ref_finite.sum()), int(ieee.sum())


def stores_ieee(impl: str) -> bool:
    """Whether an implementation's documented result for a finite value beyond the dtype's range
    is the IEEE cast's inf: tritonbn's default overflow="propagate" (inf exactly where torch has
    inf), torch, and the naive batch norm (plain torch arithmetic). Not "tritonbn-saturate",
    which promises +-max instead: an inf there is a failure."""
    return impl in ("tritonbn", "torch") or impl.startswith("naive-")


def _metrics(y, dx, ref, ref_dx, rm, rv, dtype, impl="tritonbn"):
    """One implementation's measurements at one point (fields in FIELDS order)."""
    lim = torch.finfo(dtype).max
    out, out_ref_finite, out_ieee = _nonfinite_counts(y, ref, dtype)
    if dx is None:   # no gradient reached the input: -1, "not measured"
        grad = dict(nonfinite_grad=-1, nonfinite_grad_ref_finite=-1, nonfinite_grad_ieee=-1)
        grad_failures = 0
    else:
        n, ref_finite, ieee = _nonfinite_counts(dx, ref_dx, dtype)
        grad = dict(nonfinite_grad=n, nonfinite_grad_ref_finite=ref_finite,
                    nonfinite_grad_ieee=ieee)
        grad_failures = ref_finite - (ieee if stores_ieee(impl) else 0)
    return dict(
        nonfinite_out=out,
        nonfinite_out_ref_finite=out_ref_finite,
        nonfinite_out_ieee=out_ieee,
        **grad,
        failures=out_ref_finite - (out_ieee if stores_ieee(impl) else 0) + grad_failures,
        at_or_beyond_max=int((y.double().abs() >= lim).sum()),
        max_abs_err=_max_err(y, ref),
        running_finite=bool(torch.isfinite(rm).all() and torch.isfinite(rv).all()),
    )


def n_points(dtypes, amplitudes, weight_scales, biases, sizes) -> int:
    """How many sweep points ``profile`` measures (each runs every implementation)."""
    return len(dtypes) * len(sizes) * len(amplitudes) * len(weight_scales) * len(biases)


def profile(dtypes=("float16", "bfloat16", "float32"), amplitudes=AMPLITUDES,
            weight_scales=(1.0, 3e4), biases=(0.0, 6e4), sizes=(64, 1024), channels=2,
            device=None, seed=0, progress=None) -> list[dict]:
    """Sweep input amplitude (finite values at the edge, values that round to inf, inf and NaN),
    weight scale, bias, reduction size and dtype; forward and backward of tritonbn (both output
    policies), torch eager, and a naive half-precision batch norm, each against a float64
    reference (its input gradient tells the non-finite gradients an inf / NaN input implies
    from broken ones). Returns one row per (point, implementation); ``progress`` (a
    tools.progress.Progress) is told after each point."""
    import tritonbn
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    for dname in dtypes:
        dtype = DTYPES[dname]
        for m in sizes:
            n, s = _split(m)
            for amp in amplitudes:
                x0 = _make_point_input(amp, dtype, n, channels, s, seed).to(device)
                for wscale in weight_scales:
                    for bias in biases:
                        w = torch.full((channels,), wscale, device=device)
                        b = torch.full((channels,), bias, device=device)
                        g = torch.ones_like(x0)
                        # the yardstick: the same (rounded) input, every operation in float64
                        x64 = x0.double().requires_grad_()
                        ref = tritonbn.batch_norm_reference(x64, None, None, w.double(),
                                                            b.double(), True)[0]
                        ref.backward(g.double())
                        ref, ref_dx = ref.detach(), x64.grad
                        impls = {
                            "tritonbn": lambda x, rm, rv: tritonbn.batch_norm(
                                x, rm, rv, w, b, True),
                            "tritonbn-saturate": lambda x, rm, rv: tritonbn.batch_norm(
                                x, rm, rv, w, b, True, overflow="saturate"),
                            "torch": lambda x, rm, rv: torch.nn.functional.batch_norm(
                                x, rm, rv, w, b, True),
                            "naive-" + dname: lambda x, rm, rv: naive_half(x, w, b, rm, rv),
                        }
                        for impl, fn in impls.items():
                            rm = torch.zeros(channels, device=device)
                            rv = torch.ones(channels, device=device)
                            x = x0.detach().clone().requires_grad_()
                            try:
                                y = fn(x, rm, rv)
                                y.backward(g)
                                row = _metrics(y.detach(), x.grad, ref, ref_dx, rm, rv, dtype, impl)
                            except Exception as e:  # an implementation that refuses the input
                                row = dict(error=f"{type(e).__name__}: {str(e)[:80]}")
                            rows.append(dict(dtype=dname, reduction=n * s, amplitude=str(amp),
                                             weight=wscale, bias=bias, impl=impl, **row))
                        if progress is not None:
                            progress.update(f"{dname} M={m} amplitude {amp} γ={wscale:g} "
                                            f"β={bias:g}")
    return rows


def _device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    from .._runtime import cpu_runs_kernels
    # without the interpreter CPU tensors take the float64 reference path: say so, the rows
    # then measure the reference against itself
    return ("CPU, Triton interpreter" if cpu_runs_kernels()
            else "CPU, float64 reference path (Triton interpreter off)")


def metadata(dtypes, sizes, amplitudes, weight_scales, biases, channels=2, seed=0,
             device=None) -> dict:
    """Where and with what the sweep ran, and what it swept: the "meta" of the result files."""
    import triton

    import tritonbn
    try:
        import numpy
        numpy_version = numpy.__version__
    except ImportError:   # torch runs without numpy; the files then say so
        numpy_version = "not installed"
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return {
        "tool": "tritonbn overflow",
        "date": datetime.date.today().isoformat(),
        "device": _device_name(device),
        "tritonbn": tritonbn.__version__,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "numpy": numpy_version,
        "python": platform.python_version(),
        "dtypes": list(dtypes),
        "reductions": [_split(m)[0] * _split(m)[1] for m in sizes],
        "channels": channels,
        "amplitudes": [str(a) for a in amplitudes],
        "weights": list(weight_scales),
        "biases": list(biases),
        "seed": seed,
        "input": INPUT_DESCRIPTION,
        "reference": "float64 (tritonbn.batch_norm_reference on the input as rounded to dtype)",
    }


def _csv_value(v) -> str:
    return ", ".join(str(x) for x in v) if isinstance(v, (list, tuple)) else str(v)


def write_data(result: dict, out_dir: str, stem: str) -> list[str]:
    """Write ``result`` ({"meta", "rows"}) as <stem>.json and <stem>.csv; returns the paths."""
    rows, meta = result["rows"], result["meta"]
    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, f"{stem}.json"), os.path.join(out_dir, f"{stem}.csv")]
    with open(paths[0], "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    keys = [k for k in FIELDS if any(k in r for r in rows)]
    keys += sorted({k for r in rows for k in r} - set(keys))   # anything a caller added
    with open(paths[1], "w", newline="") as f:
        for k, v in meta.items():
            f.write(f"# {k}: {_csv_value(v)}\n")
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    return paths


def read_csv(path: str) -> tuple[dict, list[dict]]:
    """(metadata from the ``# key: value`` lines, rows as csv.DictReader gives them: strings)."""
    meta = {}
    with open(path, newline="") as f:
        lines = f.readlines()
    for line in lines:
        if line.startswith("#"):
            key, _, value = line[1:].strip().partition(":")
            meta[key.strip()] = value.strip()
    rows = list(csv.DictReader(line for line in lines if not line.startswith("#")))
    return meta, rows


# ---------------------------------------------------------------------------------------------
# The plot. plot_data() turns rows into panels, series and points with everything decided
# (positions, which points are non-finite, which legend entries exist); plot() only draws that.

# What a point's marker in a panel's status strip says, most serious first (a point gets the
# first that applies).
RAISED = "raised"              # the implementation raised instead of returning
NONFINITE = "nonfinite"        # a failure: non-finite where float64 is finite (row "failures")
IEEE_OVERFLOW = "ieee"         # inf where float64 is beyond the dtype's range, as documented:
#                                the propagate policy's IEEE cast, as torch (no failures)
AS_REFERENCE = "as_reference"  # non-finite only where float64 is too (an inf / NaN input)

FLAG_LABELS = {
    NONFINITE: "failure: non-finite output or gradient where float64 is finite",
    IEEE_OVERFLOW: "inf as IEEE / as torch (propagate): float64 beyond the dtype's range",
    AS_REFERENCE: "non-finite only where float64 is too (inf / NaN input)",
    RAISED: "raised an error",
}

# Each flag's marker, in the strips and the legend alike: red only for failures, the documented
# non-finite results in neutral colours (hollow grey: as float64; filled amber: IEEE overflow).
FLAG_STYLES = {
    NONFINITE: dict(marker="X", ms=9, color="red", markerfacecolor="red", markeredgecolor="red",
                    markeredgewidth=1.0),
    IEEE_OVERFLOW: dict(marker="o", ms=7, color="#e8a33d", markerfacecolor="#e8a33d",
                        markeredgecolor="0.35", markeredgewidth=0.9),
    AS_REFERENCE: dict(marker="o", ms=7, color="0.45", markerfacecolor="none",
                       markeredgecolor="0.45", markeredgewidth=1.3),
    RAISED: dict(marker="s", ms=7, color="black", markerfacecolor="black",
                 markeredgecolor="black", markeredgewidth=1.0),
}

# The dashed line of each dtype's largest finite value, drawn in that dtype's panels only.
LIMIT_COLORS = {"float16": "crimson", "bfloat16": "#8c564b", "float32": "#17becf"}

# Implementations in drawing order with their look. tritonbn, its saturate policy and torch give
# the same errors wherever all three are finite, so each has its own marker shape and line style,
# the later ones hollow and larger (the filled one shows through), and a small sideways offset
# (in units of the gap between two amplitudes): coinciding points stay four visible markers.
IMPL_STYLES = {
    "tritonbn": dict(label="tritonbn (overflow=\"propagate\")", short="tritonbn",
                     color="#1f77b4", marker="o", ms=6, filled=True, ls="-", dx=-0.24),
    "tritonbn-saturate": dict(label="tritonbn (overflow=\"saturate\")", short="saturate",
                              color="#ff7f0e", marker="s", ms=8, filled=False, ls="--", dx=-0.08),
    "torch": dict(label="torch eager", short="torch", color="#2ca02c", marker="^", ms=8,
                  filled=False, ls=":", dx=0.08),
    "naive": dict(label="naive: sums and x² in the input dtype", short="naive",
                  color="#9467bd", marker="D", ms=6, filled=True, ls="-.", dx=0.24),
}


def _style_key(impl: str) -> str:
    return "naive" if impl.startswith("naive-") else impl


def _style(key: str) -> dict:
    """IMPL_STYLES[key], or a plain black look for an implementation it does not know."""
    return IMPL_STYLES.get(key, dict(label=key, short=key, color="black", marker="o", ms=6,
                                     filled=True, ls="-", dx=0.0))


@dataclass
class Point:
    amplitude: str       # as in the rows: "65000.0", "inf"
    slot: int            # the amplitude's place on the x axis (PlotData.amplitudes)
    x: float             # where the error marker goes: the slot plus the series' offset
    err: float | None    # max |y - y64| to draw, None when there is nothing finite to draw
    flag: str | None     # a key of FLAG_LABELS, or None when all is finite


@dataclass
class Series:
    impl: str
    style: str                      # key into IMPL_STYLES
    points: list[Point] = field(default_factory=list)

    def drawn(self) -> list[Point]:
        """Points with an error to draw on the log axis."""
        return [p for p in self.points if p.err is not None]

    def flagged(self, flag: str | None = None) -> list[Point]:
        """Points in the status strip (with that flag, or any)."""
        return [p for p in self.points if p.flag and (flag is None or p.flag == flag)]


@dataclass
class Panel:
    dtype: str
    reduction: int
    weight: float
    bias: float
    series: list[Series]            # only series with at least one point, in IMPL_STYLES order
    limit: float | None = None      # the dtype's largest finite value (None: not a known dtype)
    limit_x: float | None = None    # where it falls on the x axis (None: outside the sweep)

    @property
    def title(self) -> str:
        return (f"{self.dtype}, M = {self.reduction:,} values per channel, "
                f"γ = {self.weight:,g}, β = {self.bias:,g}")


@dataclass
class PlotData:
    amplitudes: list[str]           # the x slots, left to right (numeric ascending, inf, nan)
    tick_labels: list[str]
    grid: list[list[Panel]]         # panels by row (dtype) and column
    legend: list[str]               # styles of series with drawn errors, then flags shown
    lanes: list[str]                # the status strips' lanes, top to bottom: style keys
    limits: dict[str, float] = field(default_factory=dict)   # dtype -> max, where a line is drawn


def _amp_key(a: str):
    """Sort key: finite amplitudes ascending, then "inf", "nan" (float() would take those too)."""
    if a in ("inf", "nan"):
        return (1, ["inf", "nan"].index(a))
    return (0, float(a))


def _tick_label(a: str) -> str:
    if a in ("inf", "nan"):
        return {"inf": "inf", "nan": "NaN"}[a] + " in\nch. 0"
    v = float(a)
    return f"{v:,.0f}" if v >= 1 else f"{v:g}"


def _flag(row: dict) -> str | None:
    """The row's status-strip flag (see FLAG_LABELS), from its counts."""
    if "error" in row and row.get("error"):
        return RAISED
    num = lambda k, default=0: float(row.get(k, default) or 0)  # noqa: E731 - CSV gives strings
    if row.get("failures") not in (None, ""):
        if num("failures") > 0:
            return NONFINITE
        if num("nonfinite_out_ieee") > 0 or num("nonfinite_grad_ieee") > 0:
            return IEEE_OVERFLOW
    # files from before the "failures" field: any non-finite value where float64 is finite
    # counts as a failure (and from before the *_ref_finite fields, any non-finite value)
    elif num("nonfinite_out_ref_finite", num("nonfinite_out")) > 0 or \
            num("nonfinite_grad_ref_finite", max(num("nonfinite_grad"), 0)) > 0:
        return NONFINITE
    if num("nonfinite_out") > 0 or num("nonfinite_grad") > 0:
        return AS_REFERENCE
    return None


def _dtype_max(dtype: str) -> float | None:
    """torch.finfo(dtype).max for a dtype named as the rows name it; None for another name."""
    return torch.finfo(DTYPES[dtype]).max if dtype in DTYPES else None


def _limit_position(amplitudes: list[str], limit: float | None) -> float | None:
    """``limit`` on the slot axis: halfway between the last swept amplitude at or below it and
    the first above (a boundary between two slots; interpolating would put float16's 65,504 on
    top of 65,000's markers); None when the sweep has no finite amplitude on one side of it:
    the line would be off the axis, so none is drawn."""
    if limit is None:
        return None
    finite = [(i, float(a)) for i, a in enumerate(amplitudes) if _amp_key(a)[0] == 0]
    for (i0, a0), (i1, a1) in zip(finite, finite[1:]):
        if a0 <= limit < a1:
            return (i0 + i1) / 2
    return None


def plot_data(rows: list[dict], main: tuple[float, float] = (1.0, 0.0),
              extra: tuple[float, float] | None = (3e4, 6e4)) -> PlotData:
    """Rows -> what the plot draws. One panel per (dtype, reduction size) at γ, β = ``main``, in
    a grid: a row per dtype, a column per reduction size, and, when the rows have it, one more
    column for γ, β = ``extra`` at the largest reduction size. A point carries its error (max
    |y - y64| over the finite values) unless the implementation raised or failed (non-finite
    values where float64 is finite, other than the IEEE overflow its policy documents); those
    points carry a flag for the status strip (RAISED, NONFINITE), and so do the points whose
    non-finite values are documented: IEEE_OVERFLOW (inf where float64 is beyond the dtype's
    range, for the propagate policy, torch and naive) and AS_REFERENCE (non-finite where float64
    is too). Each panel carries its dtype's largest finite value and where it falls on the x
    axis (None when outside the swept amplitudes). Rows read back from the CSV (strings) work
    too."""
    f = float   # CSV rows hold strings, JSON rows numbers
    rows = [r for r in rows if "impl" in r]
    amplitudes = sorted({str(r["amplitude"]) for r in rows}, key=_amp_key)
    slot = {a: i for i, a in enumerate(amplitudes)}
    dtypes = list(dict.fromkeys(r["dtype"] for r in rows))
    sizes = sorted({int(r["reduction"]) for r in rows})
    has = {(r["dtype"], int(r["reduction"]), f(r["weight"]), f(r["bias"])) for r in rows}

    def panel(dtype, m, wb) -> Panel | None:
        if (dtype, m, *wb) not in has:
            return None
        pts = [r for r in rows if r["dtype"] == dtype and int(r["reduction"]) == m
               and (f(r["weight"]), f(r["bias"])) == wb]
        series = []
        for impl in dict.fromkeys(r["impl"] for r in pts):
            key = _style_key(impl)
            dx = _style(key)["dx"]
            s = Series(impl, key)
            for r in sorted((r for r in pts if r["impl"] == impl),
                            key=lambda r: slot[str(r["amplitude"])]):
                flag = _flag(r)
                err = r.get("max_abs_err")
                err = None if err in (None, "") else f(err)
                # a broken point's finite values would look accurate: it is drawn as a flag only
                if flag in (NONFINITE, RAISED) or err is None or not math.isfinite(err):
                    err = None
                i = slot[str(r["amplitude"])]
                s.points.append(Point(str(r["amplitude"]), i, i + dx, err, flag))
            if s.points:
                series.append(s)
        order = list(IMPL_STYLES)
        series.sort(key=lambda s: order.index(s.style) if s.style in order else len(order))
        limit = _dtype_max(dtype)
        return Panel(dtype, m, *wb, series, limit, _limit_position(amplitudes, limit))

    grid = []
    for dtype in dtypes:
        row = [p for p in (panel(dtype, m, main) for m in sizes) if p]
        if extra is not None and sizes:
            p = panel(dtype, sizes[-1], extra)
            if p:
                row.append(p)
        if row:
            grid.append(row)
    present = {s.style for row in grid for p in row for s in p.series if s.drawn()}
    flags = {pt.flag for row in grid for p in row for s in p.series for pt in s.flagged()}
    legend = [k for k in list(IMPL_STYLES) + sorted(present - set(IMPL_STYLES)) if k in present]
    legend += [k for k in FLAG_LABELS if k in flags]
    # one lane per implementation in every strip, the same in every panel (labelled once)
    styles = {s.style for row in grid for p in row for s in p.series}
    lanes = [k for k in list(IMPL_STYLES) + sorted(styles - set(IMPL_STYLES)) if k in styles]
    limits = {p.dtype: p.limit for row in grid for p in row if p.limit_x is not None}
    return PlotData(amplitudes, [_tick_label(a) for a in amplitudes], grid, legend, lanes,
                    limits)


def _title(meta: dict, data: PlotData, main, extra_shown) -> str:
    sizes = sorted({p.reduction for row in data.grid for p in row})
    dtypes = [row[0].dtype for row in data.grid if row]
    setting = f"γ = {main[0]:,g}, β = {main[1]:,g}"
    if extra_shown:
        setting += (f" (right column: γ = {extra_shown[0]:,g}, β = {extra_shown[1]:,g}, "
                    f"M = {sizes[-1]:,})")
    channels = meta.get("channels", "?")
    versions = " · ".join(f"{k} {meta[k]}" for k in ("tritonbn", "torch", "triton", "numpy")
                          if k in meta)
    return ("Batch norm near float16's limit (65,504): largest |output − float64| per "
            "implementation; the strip above each panel marks non-finite results\n"
            f"swept: {', '.join(dtypes)} × reduction sizes M = "
            f"{', '.join(f'{m:,}' for m in sizes)} per channel ({channels} channels) × input "
            f"amplitude; {setting}\n"
            f"{meta.get('device', '?')} · {versions} · {meta.get('date', '')}")


def plot(result: dict, path: str, main=(1.0, 0.0), extra=(3e4, 6e4)) -> bool:
    """Draw the profile as a PNG at ``path``; False (and nothing written) without matplotlib.
    ValueError when the rows have no point at γ, β = ``main``.

    Layout (see plot_data): a row of panels per dtype, a column per reduction size, then the
    large-γ/β column. One panel per (dtype, size) because one line across sizes zigzags: where
    naive sums overflow depends on M, and errors differ by orders of magnitude between dtypes;
    float16, where everything happens, is the top row, bfloat16 and float32 below are the
    control. All error axes share one log y axis, so panels compare by eye. The x axis has one
    slot per swept amplitude, in log order, rather than a true log scale: 65,000 and 70,000
    (either side of 65,504, where the story is) are 0.03 decades apart and would share one
    column; inf and NaN inputs take the last two slots, shaded."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.lines import Line2D
    except ImportError:
        return False
    data = plot_data(result["rows"], main, extra)
    if not data.grid:
        raise ValueError(f"nothing to plot: no rows at γ = {main[0]:g}, β = {main[1]:g}")
    n_rows, n_cols = len(data.grid), max(len(r) for r in data.grid)
    extra_shown = extra if any(len(r) > 1 and (r[-1].weight, r[-1].bias) == tuple(extra)
                               for r in data.grid) else None
    n_lanes = len(data.lanes)
    # sizes in inches: panels, the title above (3 lines), tick labels and legend below
    top_in, bottom_in, panel_w, panel_h = 0.85, 1.45, 4.6, 3.3
    fig_w, fig_h = panel_w * n_cols + 0.9, panel_h * n_rows + top_in + bottom_in
    fig = plt.figure(figsize=(fig_w, fig_h))
    # each panel: a status strip (one lane per implementation) above the error axis
    outer = fig.add_gridspec(n_rows, n_cols, left=0.8 / fig_w, right=1 - 0.1 / fig_w,
                             top=1 - top_in / fig_h, bottom=bottom_in / fig_h, hspace=0.22,
                             wspace=0.1)
    errs = [pt.err for row in data.grid for p in row for s in p.series for pt in s.drawn()]
    positive = [e for e in errs if e > 0]
    # a decade of room around the data; exact zeros (possible in float32) sit on the floor
    lo = 10 ** (math.floor(math.log10(min(positive))) - 1) if positive else 1e-8
    hi = 10 ** (math.ceil(math.log10(max(positive))) + 1) if positive else 1.0
    n_slots = len(data.amplitudes)
    numeric = [i for i, a in enumerate(data.amplitudes) if _amp_key(a)[0] == 0]
    first_ax = None
    for ri, row in enumerate(data.grid):
        for ci, p in enumerate(row):
            inner = outer[ri, ci].subgridspec(2, 1, height_ratios=[0.22 * n_lanes + 0.2, 2.6],
                                              hspace=0.06)
            strip = fig.add_subplot(inner[0])
            ax = fig.add_subplot(inner[1], sharex=strip, sharey=first_ax)
            first_ax = first_ax or ax
            for ax_ in (strip, ax):
                if numeric and len(numeric) < n_slots:   # the categorical inf / NaN slots
                    ax_.axvspan(numeric[-1] + 0.5, n_slots - 0.5, color="0.93", zorder=0)
                if p.limit_x is not None:   # this panel's dtype's max, where on the axis
                    ax_.axvline(p.limit_x, color=LIMIT_COLORS.get(p.dtype, "0.3"), lw=1.0,
                                ls="--", zorder=1)
            for s in p.series:
                st = _style(s.style)
                # errors: lines join neighbouring finite amplitudes only (NaN breaks the line)
                ys = {pt.slot: pt.err for pt in s.drawn()}
                line_x = [i + st["dx"] for i in numeric]
                line_y = [max(ys[i], lo) if ys.get(i) is not None else float("nan")
                          for i in numeric]
                ax.plot(line_x, line_y, ls=st["ls"], color=st["color"], lw=1.1, alpha=0.8,
                        zorder=2)
                pts = s.drawn()
                ax.plot([pt.x for pt in pts], [max(pt.err, lo) for pt in pts], ls="none",
                        marker=st["marker"], ms=st["ms"], color=st["color"],
                        markerfacecolor=st["color"] if st["filled"] else "none",
                        markeredgewidth=1.4, zorder=3)
                # the status strip: the series' own lane (data.lanes, top to bottom), so
                # its markers sit at the slot itself, no offset
                y_lane = n_lanes - 1 - data.lanes.index(s.style)
                strip.axhline(y_lane, color="0.85", lw=0.6, zorder=0)
                for pt in s.flagged():
                    strip.plot(pt.slot, y_lane, ls="none", zorder=3, **FLAG_STYLES[pt.flag])
            strip.set_ylim(-0.6, n_lanes - 0.4)
            strip.set_yticks(range(n_lanes))
            if ci == 0:
                strip.set_yticklabels([_style(k)["short"] for k in reversed(data.lanes)],
                                      fontsize=7)
                for lab, k in zip(strip.get_yticklabels(), reversed(data.lanes)):
                    lab.set_color(_style(k)["color"])
            else:
                strip.tick_params(axis="y", labelleft=False)
            strip.tick_params(axis="x", labelbottom=False, length=0)
            strip.tick_params(axis="y", length=0)
            strip.set_title(p.title, fontsize=9, pad=3)
            ax.set_yscale("log")
            ax.set_ylim(lo / 2, hi)
            ax.grid(axis="y", which="major", color="0.9", lw=0.6)
            ax.set_xlim(-0.5, n_slots - 0.5)
            ax.set_xticks(range(n_slots))
            last_row = ri == len(data.grid) - 1 or ci >= len(data.grid[ri + 1])
            ax.set_xticklabels(data.tick_labels if last_row else [], fontsize=7)
            if last_row:
                ax.set_xlabel("input amplitude a = largest |x| per channel: values uniform in "
                              "[−a, a], ±a present\ninf / NaN: one such value in channel 0",
                              fontsize=7.5)
            if ci == 0:
                ax.set_ylabel("max |y − y₆₄|", fontsize=8)
            else:
                ax.tick_params(axis="y", labelleft=False)
            ax.tick_params(axis="y", labelsize=7)
    handles = []
    for key in data.legend:
        if key not in FLAG_LABELS:
            st = _style(key)
            handles.append(Line2D([], [], color=st["color"], ls=st["ls"], marker=st["marker"],
                                  ms=st["ms"], markeredgewidth=1.4,
                                  markerfacecolor=st["color"] if st["filled"] else "none",
                                  label=st["label"]))
        else:
            handles.append(Line2D([], [], ls="none", label=FLAG_LABELS[key],
                                  **FLAG_STYLES[key]))
    for dtype, limit in data.limits.items():
        value = f"{limit:,.0f}" if limit < 1e7 else f"{limit:.4g}"
        handles.append(Line2D([], [], color=LIMIT_COLORS.get(dtype, "0.3"), ls="--", lw=1.0,
                              label=f"{value}: {dtype}'s largest finite value"))
    fig.legend(handles=handles, loc="lower center", ncol=min(3, len(handles)), fontsize=8,
               frameon=False, bbox_to_anchor=(0.5, 0.02 / fig_h))
    fig.suptitle(_title(result.get("meta", {}), data, main, extra_shown), fontsize=9.5,
                 y=1 - 0.08 / fig_h, va="top")
    # "tight": a narrow grid (one dtype, one size) still shows the whole title and legend
    fig.savefig(path, dpi=110, bbox_inches="tight", pad_inches=0.15)
    plt.close(fig)
    return True


def summary_table(rows: list[dict]) -> str:
    """One line per (dtype, amplitude, impl) at γ=1, β=0 and the largest reduction size, then
    what the columns mean."""
    big = max(r["reduction"] for r in rows)
    lines = [f"{'dtype':9} {'amplitude':>9} {'impl':18} {'nonfinite y':>11} {'nonfinite dx':>12} "
             f"{'failures':>8} {'>=max':>6} {'max |err|':>10} {'running ok':>10}"]
    for r in rows:
        if r["reduction"] != big or r["weight"] != 1.0 or r["bias"] != 0.0:
            continue
        if "error" in r:
            lines.append(f"{r['dtype']:9} {r['amplitude']:>9} {r['impl']:18} {r['error']}")
            continue
        lines.append(f"{r['dtype']:9} {r['amplitude']:>9} {r['impl']:18} {r['nonfinite_out']:>11} "
                     f"{r['nonfinite_grad']:>12} {r.get('failures', '?'):>8} "
                     f"{r['at_or_beyond_max']:>6} {r['max_abs_err']:>10.3g} "
                     f"{str(r['running_finite']):>10}")
    lines += [
        "nonfinite y / dx: inf or NaN values in the output / input gradient, those float64 has "
        "too included",
        "failures: non-finite values (y and dx) where float64 is finite, less the inf the IEEE "
        "cast gives\n  where float64 is beyond the dtype's range (documented for tritonbn's "
        "default policy, torch\n  and naive; for overflow=\"saturate\", which stores +-max, "
        "that inf is a failure too)",
        ">=max: |y| at or above the dtype's largest finite value; max |err|: largest |y - y64| "
        "over\n  the values both have finite",
    ]
    return "\n".join(lines)


# Common short names, only to point at torch's: the result files name dtypes one way.
_DTYPE_HINTS = {"fp16": "float16", "half": "float16", "bf16": "bfloat16", "fp32": "float32",
                "float": "float32"}


def _parse_dtypes(text: str) -> list[str]:
    """'float16,bfloat16' -> names; ValueError naming the valid ones otherwise. Only torch's
    own names are accepted ('fp16' gets a hint, not a guess), as the rows carry them."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in names if t not in DTYPES]
    if bad or not names:
        what = (f"unknown {', '.join(map(repr, bad))}" if bad else "no dtype given")
        hints = [f"{t} is {_DTYPE_HINTS[t.lower()]}" for t in bad if t.lower() in _DTYPE_HINTS]
        if hints:
            what += f" ({'; '.join(hints)})"
        raise ValueError(f"--dtypes {text!r}: {what}; choose from {', '.join(DTYPES)}")
    return list(dict.fromkeys(names))


def _parse_sizes(text: str) -> list[int]:
    """'64,1024' -> [64, 1024]: values per channel, each at least 2 (batch norm in training
    needs two values per channel to have a variance; torch refuses one)."""
    items = [t.strip() for t in text.split(",") if t.strip()]
    try:
        sizes = [int(t) for t in items]
    except ValueError:
        raise ValueError(f"--sizes {text!r}: expected comma-separated integers like 64,1024")
    if not sizes or any(m < 2 for m in sizes):
        raise ValueError(f"--sizes {text!r}: each reduction size must be an integer >= 2 "
                         f"(values per channel)")
    return list(dict.fromkeys(sizes))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tritonbn overflow",
                                     description="Profile batch norm near half precision's limit.")
    parser.add_argument("--dtypes", default=",".join(DTYPES),
                        help=f"comma-separated from {', '.join(DTYPES)}")
    parser.add_argument("--sizes", default="64,1024",
                        help="reduction sizes: values per channel, comma-separated, each >= 2")
    parser.add_argument("--quick", action="store_true", help="a few points only (smoke test)")
    parser.add_argument("--out", default=os.curdir,
                        help="results folder (default: the current directory; made if missing, "
                             "checked before the sweep)")
    parser.add_argument("--stem", default="overflow_profile",
                        help="file name without extension for the .json, .csv and .png")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress lines on stderr")
    return parser


def main(argv=None) -> int:
    from .progress import Progress

    parser = build_parser()
    args = parser.parse_args(argv)
    # every argument is checked before the sweep: a typo should cost a second, not the sweep
    try:
        dtypes, sizes = _parse_dtypes(args.dtypes), _parse_sizes(args.sizes)
    except ValueError as e:
        parser.error(str(e))
    if not args.stem or os.sep in args.stem or (os.altsep and os.altsep in args.stem):
        parser.error(f"--stem {args.stem!r}: a file name without folders (use --out for those)")
    try:   # the results folder is made now, so that one which cannot be fails now
        os.makedirs(args.out, exist_ok=True)
    except OSError as e:
        parser.error(f"--out {args.out}: cannot create it ({e.strerror or e})")
    if not os.access(args.out, os.W_OK | os.X_OK):
        parser.error(f"--out {args.out}: not writable")
    kwargs = dict(dtypes=tuple(dtypes), sizes=tuple(sizes), amplitudes=AMPLITUDES,
                  weight_scales=(1.0, 3e4), biases=(0.0, 6e4))
    if args.quick:
        kwargs.update(amplitudes=[1.0, 65000.0, "inf"], weight_scales=(1.0,), biases=(0.0,))
    bar = Progress(n_points(**kwargs), "overflow: point", enabled=not args.no_progress)
    with warnings.catch_warnings():
        # the sweep overflows on purpose: numpy's "overflow encountered" warnings from inside
        # the interpreter say nothing the rows do not
        warnings.simplefilter("ignore", RuntimeWarning)
        rows = profile(**kwargs, progress=bar)
    result = {"meta": metadata(kwargs["dtypes"], kwargs["sizes"], kwargs["amplitudes"],
                               kwargs["weight_scales"], kwargs["biases"]),
              "rows": rows}
    print(f"input: {INPUT_DESCRIPTION}")
    print(summary_table(rows))
    try:
        paths = write_data(result, args.out, args.stem)
        png = os.path.join(args.out, f"{args.stem}.png")
        if plot(result, png):
            paths.append(png)
        else:
            print("matplotlib not installed (pip install 'tritonbn[plot]'): no PNG written")
    except OSError as e:  # the table is printed above; say why the files are missing
        print(f"could not write the results to {args.out}: {e}", file=sys.stderr)
        return 1
    for p in paths:
        print(f"wrote {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
