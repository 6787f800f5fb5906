"""Half precision near its limit: fused overflow counters, output and running-stat policies, and
a model monitor. (The profiler comparing tritonbn, torch and a naive half-precision batch norm
is a tool: ``tritonbn overflow``, tritonbn/tools/overflow_profile.py.)

Where batch norm can overflow in float16 (largest finite value 65,504):
  * x² overflows above |x| = 256: a kernel that squared in half would lose the variance. The
    kernels never do -- moments are centered float32 (Chan merges), see kernels/common.py.
  * |x̂| can reach sqrt(M - 1) for M values per channel, so γ·x̂ + β can exceed 65,504 even from
    tame inputs: that is the output overflow the counters and the "saturate" policy address.
  * running_var kept in float16 (after model.half()) overflows when the batch variance does, and
    one inf batch turns it into inf/NaN for good: "skip" keeps such a channel's statistics.
"""
from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass, field

import torch

from .nn.modules import TritonNorm
from .options import NONFINITE_POLICIES, OVERFLOW_POLICIES

__all__ = ["OverflowStats", "set_policy", "monitor", "MonitorReport"]


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
    for name, m in model.named_modules():
        if isinstance(m, TritonNorm):
            yield name or type(m).__name__, m


def set_policy(model: torch.nn.Module, overflow: str = "propagate",
               nonfinite_stats: str = "propagate") -> torch.nn.Module:
    """Set the output policy and running-statistics policy of every tritonbn layer in ``model``.

    With nonfinite_stats="skip" and momentum=None, each channel counts its own batches (a
    ``channel_batches_tracked`` buffer started from num_batches_tracked), so a skipped channel's
    cumulative average stays exact.
    """
    if overflow not in OVERFLOW_POLICIES or nonfinite_stats not in NONFINITE_POLICIES:
        raise ValueError(f"set_policy: overflow in {OVERFLOW_POLICIES}, nonfinite_stats in "
                         f"{NONFINITE_POLICIES}; got {overflow!r}, {nonfinite_stats!r}")
    kept = []
    for name, m in _tritonbn_layers(model):
        if overflow == "saturate" and m.invertible:
            # in-place activated: backward inverts y, which a clipped y would not allow
            kept.append(name)
            m.nonfinite_stats = nonfinite_stats
        else:
            m.overflow, m.nonfinite_stats = overflow, nonfinite_stats
        if (nonfinite_stats == "skip" and m.momentum is None and m.track_running_stats
                and getattr(m, "channel_batches_tracked", None) is None):
            start = m.num_batches_tracked.expand(m.features()).clone()
            m.register_buffer("channel_batches_tracked", start)
    if kept:
        warnings.warn(f"set_policy: in-place activated layers keep overflow='propagate' (their "
                      f"backward inverts the output, which saturating would clip): "
                      f"{', '.join(kept)}", UserWarning, stacklevel=2)
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
        m.overflow_stats = OverflowStats.zeros(m.features(), device=next(
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
