"""``tritonbn overflow``: how batch norm behaves near half precision's limit, measured.

Sweeps input amplitude (finite values at the edge, values that round to inf, inf and NaN inputs),
weight scale, bias, reduction size and dtype, forward and backward, for tritonbn (both output
policies), torch eager and a naive batch norm that accumulates in the input's half precision,
each against the float64 reference; prints a table and writes JSON, CSV and a PNG.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys

import torch

__all__ = ["profile", "summary_table", "main"]


def naive_half(x: torch.Tensor, w, b, running_mean, running_var, eps=1e-5, momentum=0.1):
    """Batch norm as a naive half-precision implementation would do it: sums accumulated in the
    input dtype (pairwise, each partial rounded), variance as E[x²] - E[x]², x² in that dtype."""
    dims = [0] + list(range(2, x.dim()))
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


AMPLITUDES = [1.0, 256.0, 1e3, 1e4, 3.2e4, 65000.0, 70000.0, "inf", "nan"]


def _make_point_input(amp, dtype, n, c, s, seed):
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(n, c, s, generator=g, dtype=torch.float64) * 2 - 1
    if isinstance(amp, str):
        x = base * 100.0
        x[0, 0, 0] = float(amp)       # one non-finite input in channel 0
    else:
        x = base * amp
        x[0, :, 0], x[-1, :, -1] = amp, -amp   # the amplitude itself is present in each channel
    return x.to(dtype)  # values beyond the dtype's range round to inf here


def _metrics(y, dx, ref, rm, rv, dtype):
    lim = torch.finfo(dtype).max
    finite_ref = torch.isfinite(ref)
    err = (y.double() - ref).abs()[finite_ref & torch.isfinite(y.double())]
    return dict(
        nonfinite_out=int((~torch.isfinite(y)).sum()),
        nonfinite_grad=int((~torch.isfinite(dx)).sum()) if dx is not None else -1,
        at_or_beyond_max=int((y.double().abs() >= lim).sum()),
        max_abs_err=float(err.max()) if err.numel() else float("nan"),
        running_finite=bool(torch.isfinite(rm).all() and torch.isfinite(rv).all()),
    )


def profile(dtypes=("float16", "bfloat16", "float32"), amplitudes=AMPLITUDES,
            weight_scales=(1.0, 3e4), biases=(0.0, 6e4), sizes=(64, 1024), channels=2,
            device=None, seed=0) -> list[dict]:
    """Sweep input amplitude (finite values at the edge, values that round to inf, inf and NaN),
    weight scale, bias, reduction size and dtype; forward and backward of tritonbn (both output
    policies), torch eager, and a naive half-precision batch norm, each against a float64
    reference. Returns one row per (point, implementation)."""
    import tritonbn
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    for dname in dtypes:
        dtype = getattr(torch, dname)
        for m in sizes:
            n, s = 4, max(1, m // 4)
            for amp in amplitudes:
                x0 = _make_point_input(amp, dtype, n, channels, s, seed).to(device)
                for wscale in weight_scales:
                    for bias in biases:
                        w = torch.full((channels,), wscale, device=device)
                        b = torch.full((channels,), bias, device=device)
                        ref = tritonbn.batch_norm_reference(x0, None, None, w, b, True)[0]
                        g = torch.ones_like(x0)
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
                                row = _metrics(y.detach(), x.grad, ref, rm, rv, dtype)
                            except Exception as e:  # an implementation that refuses the input
                                row = dict(error=f"{type(e).__name__}: {str(e)[:80]}")
                            rows.append(dict(dtype=dname, reduction=n * s, amplitude=str(amp),
                                             weight=wscale, bias=bias, impl=impl, **row))
    return rows


def _write(rows: list[dict], out_dir: str, stem: str) -> list[str]:
    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, f"{stem}.json"), os.path.join(out_dir, f"{stem}.csv")]
    with open(paths[0], "w") as f:
        json.dump(rows, f, indent=1)
    keys = sorted({k for r in rows for k in r})
    with open(paths[1], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed (pip install 'tritonbn[plot]'): no PNG written")
        return paths
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for impl in sorted({r["impl"] for r in rows}):
        pts = [r for r in rows if r["impl"] == impl and r.get("dtype") == "float16"
               and r.get("weight") == 1.0 and r.get("bias") == 0.0 and "error" not in r
               and r["amplitude"] not in ("inf", "nan")]
        amps = [float(r["amplitude"]) for r in pts]
        axes[0].plot(amps, [r["nonfinite_out"] for r in pts], "o-", label=impl)
        axes[1].plot(amps, [max(r["max_abs_err"], 1e-8) if r["max_abs_err"] == r["max_abs_err"]
                            else 1e3 for r in pts], "o-", label=impl)
    for ax, title in zip(axes, ["non-finite outputs (float16, γ=1, β=0)",
                                "max |error| vs float64 (float16, γ=1, β=0)"]):
        ax.set_xscale("log")
        ax.set_xlabel("input amplitude")
        ax.set_title(title, fontsize=9)
        ax.axvline(65504, color="grey", lw=0.5)
    axes[1].set_yscale("log")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    paths.append(os.path.join(out_dir, f"{stem}.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def summary_table(rows: list[dict]) -> str:
    """One line per (dtype, amplitude, impl) at γ=1, β=0 and the largest reduction size."""
    big = max(r["reduction"] for r in rows)
    lines = [f"{'dtype':9} {'amplitude':>9} {'impl':18} {'nonfinite y':>11} {'nonfinite dx':>12} "
             f"{'>=max':>6} {'max |err|':>10} {'running ok':>10}"]
    for r in rows:
        if r["reduction"] != big or r["weight"] != 1.0 or r["bias"] != 0.0:
            continue
        if "error" in r:
            lines.append(f"{r['dtype']:9} {r['amplitude']:>9} {r['impl']:18} {r['error']}")
            continue
        lines.append(f"{r['dtype']:9} {r['amplitude']:>9} {r['impl']:18} {r['nonfinite_out']:>11} "
                     f"{r['nonfinite_grad']:>12} {r['at_or_beyond_max']:>6} "
                     f"{r['max_abs_err']:>10.3g} {str(r['running_finite']):>10}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="tritonbn overflow",
                                     description="Profile batch norm near half precision's limit.")
    parser.add_argument("--dtypes", default="float16,bfloat16,float32")
    parser.add_argument("--sizes", default="64,1024", help="reduction sizes per channel")
    parser.add_argument("--quick", action="store_true", help="a few points only (smoke test)")
    parser.add_argument("--out", default=os.path.join("bench", "results"))
    parser.add_argument("--stem", default="overflow_profile")
    args = parser.parse_args(argv)
    kwargs = dict(dtypes=tuple(args.dtypes.split(",")),
                  sizes=tuple(int(s) for s in args.sizes.split(",")))
    if args.quick:
        kwargs.update(amplitudes=[1.0, 65000.0, "inf"], weight_scales=(1.0,), biases=(0.0,))
    rows = profile(**kwargs)
    print(summary_table(rows))
    for p in _write(rows, args.out, args.stem):
        print(f"wrote {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
