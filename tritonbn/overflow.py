"""Half precision near its limit: fused overflow counters, output and running-stat policies, a
model monitor, and a profiler comparing tritonbn, torch and a naive half-precision batch norm.

Where batch norm can overflow in float16 (largest finite value 65,504):
  * x² overflows above |x| = 256: a kernel that squared in half would lose the variance. The
    kernels never do -- moments are centered float32 (Chan merges), see kernels/common.py.
  * |x̂| can reach sqrt(M - 1) for M values per channel, so γ·x̂ + β can exceed 65,504 even from
    tame inputs: that is the output overflow the counters and the "saturate" policy address.
  * running_var kept in float16 (after model.half()) overflows when the batch variance does, and
    one inf batch turns it into inf/NaN for good: "skip" keeps such a channel's statistics.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import json
import math
import os
import sys
from dataclasses import dataclass, field

import torch

__all__ = ["OverflowStats", "set_policy", "monitor", "MonitorReport", "profile", "main"]


@dataclass
class OverflowStats:
    """Per-channel accumulators filled by the forward kernels in the same pass as the output:
    ``count`` (int64) of outputs that overflowed the output dtype (became inf, or were saturated)
    and ``max_abs`` (float32) of the largest |y| computed (before the cast)."""

    count: torch.Tensor
    max_abs: torch.Tensor
    dtype: torch.dtype | None = None   # output dtype last seen, for headroom

    @classmethod
    def zeros(cls, channels: int, device=None) -> "OverflowStats":
        return cls(torch.zeros(channels, dtype=torch.int64, device=device),
                   torch.zeros(channels, dtype=torch.float32, device=device))

    def check(self, channels: int, device) -> None:
        ok = (self.count.numel() == channels and self.max_abs.numel() == channels
              and self.count.dtype == torch.int64 and self.max_abs.dtype == torch.float32
              and self.count.device == device and self.max_abs.device == device)
        if not ok:
            raise RuntimeError(f"batch_norm: overflow_stats must hold an int64 and a float32 "
                               f"tensor of {channels} elements on {device}; use "
                               f"OverflowStats.zeros({channels}, device)")

    def headroom(self, dtype: torch.dtype | None = None) -> float:
        """Smallest distance of any channel's max |y| to the dtype's largest finite value."""
        dtype = dtype or self.dtype or torch.float16
        return torch.finfo(dtype).max - float(self.max_abs.max()) if self.max_abs.numel() else math.inf

    def reset(self) -> None:
        self.count.zero_()
        self.max_abs.zero_()


def _tritonbn_layers(model: torch.nn.Module):
    from .modules import _TritonBatchNormMixin
    from .fused_modules import _PerActivation
    for name, m in model.named_modules():
        if isinstance(m, (_TritonBatchNormMixin, _PerActivation)):
            yield name or type(m).__name__, m


def set_policy(model: torch.nn.Module, overflow: str = "propagate",
               nonfinite_stats: str = "propagate") -> torch.nn.Module:
    """Set the output policy and running-statistics policy of every tritonbn layer in ``model``.

    With nonfinite_stats="skip" and momentum=None, each channel counts its own batches (a
    ``channel_batches_tracked`` buffer started from num_batches_tracked), so a skipped channel's
    cumulative average stays exact.
    """
    from .functional import NONFINITE_POLICIES, OVERFLOW_POLICIES
    if overflow not in OVERFLOW_POLICIES or nonfinite_stats not in NONFINITE_POLICIES:
        raise ValueError(f"set_policy: overflow in {OVERFLOW_POLICIES}, nonfinite_stats in "
                         f"{NONFINITE_POLICIES}; got {overflow!r}, {nonfinite_stats!r}")
    for _, m in _tritonbn_layers(model):
        m.overflow, m.nonfinite_stats = overflow, nonfinite_stats
        if (nonfinite_stats == "skip" and m.momentum is None and m.track_running_stats
                and getattr(m, "channel_batches_tracked", None) is None):
            start = m.num_batches_tracked.expand(m.running_mean.shape[0]).clone()
            m.register_buffer("channel_batches_tracked", start)
    return model


@dataclass
class MonitorReport:
    """What tritonbn.overflow.monitor saw, per layer (module path)."""

    layers: dict = field(default_factory=dict)    # name -> OverflowStats

    def rows(self) -> list[dict]:
        out = []
        for name, st in self.layers.items():
            out.append(dict(layer=name, overflowed=int(st.count.sum()),
                            max_abs=float(st.max_abs.max()) if st.max_abs.numel() else 0.0,
                            headroom=st.headroom(), dtype=str(st.dtype).replace("torch.", "")))
        return out

    def closest_to_edge(self) -> str:
        """The layer with the least headroom (most overflows first)."""
        rows = self.rows()
        return min(rows, key=lambda r: (-r["overflowed"], r["headroom"]))["layer"]

    def table(self) -> str:
        lines = [f"{'layer':30} {'dtype':9} {'overflowed':>10} {'max |y|':>12} {'headroom':>12}"]
        for r in self.rows():
            lines.append(f"{r['layer']:30} {r['dtype']:9} {r['overflowed']:>10d} "
                         f"{r['max_abs']:>12.5g} {r['headroom']:>12.5g}")
        return "\n".join(lines)


@contextlib.contextmanager
def monitor(model: torch.nn.Module):
    """Turn the fused overflow counters on for every tritonbn layer of ``model`` while the block
    runs; yields a MonitorReport accumulating over all the steps run inside it."""
    report = MonitorReport()
    previous = {}
    for name, m in _tritonbn_layers(model):
        previous[name] = getattr(m, "overflow_stats", None)
        c = m.running_mean.numel() if m.running_mean is not None else m.num_features
        m.overflow_stats = OverflowStats.zeros(c, device=next(
            (t.device for t in list(m.parameters()) + list(m.buffers())), None))
        report.layers[name] = m.overflow_stats
    hooks = [m.register_forward_pre_hook(_record_dtype) for _, m in _tritonbn_layers(model)]
    try:
        yield report
    finally:
        for h in hooks:
            h.remove()
        for name, m in _tritonbn_layers(model):
            m.overflow_stats = previous.get(name)


def _record_dtype(module, args):
    if args and isinstance(args[0], torch.Tensor):
        module.overflow_stats.dtype = args[0].dtype


# ------------------------------------------------------------------------------ profiler

def _naive_half(x: torch.Tensor, w, b, running_mean, running_var, eps=1e-5, momentum=0.1):
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
                            "naive-" + dname: lambda x, rm, rv: _naive_half(x, w, b, rm, rv),
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
