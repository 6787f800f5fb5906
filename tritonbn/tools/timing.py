"""Timing for tuning and benchmarks: triton.testing.do_bench-style measurement with L2 flushed
between repetitions on a GPU; wall clock in smoke mode (CPU interpreter), where timings mean
nothing and every output says so."""
from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass

import torch

__all__ = ["SMOKE_LABEL", "Measurement", "CudaTimer", "WallTimer", "make_timer", "smoke_mode",
           "run_device", "require_kernels_runnable", "machine_info"]

SMOKE_LABEL = "SMOKE MODE: CPU interpreter, timings mean nothing"

# The flush buffer must be larger than any L2 the code may meet (H100/H200: 50 MB, B200: 126 MB):
# writing it evicts the tensors of the previous repetition, so each timed run reads from HBM,
# as a real network's layers do. triton.testing.do_bench uses 256 MB for the same reason.
FLUSH_BYTES = 256 * 1024 * 1024


def run_device() -> str:
    """Where tune and bench run kernels: the GPU, or CPU tensors in the Triton interpreter."""
    from .._runtime import cuda_interpreted
    return "cuda" if torch.cuda.is_available() and not cuda_interpreted() else "cpu"


def smoke_mode() -> bool:
    return run_device() == "cpu"


@dataclass(frozen=True)
class Measurement:
    median_s: float
    min_s: float
    reps: int

    @property
    def median_us(self) -> float:
        return self.median_s * 1e6


class CudaTimer:
    """do_bench-style: estimate one run, then warm up for ``warmup_ms`` and time ``rep_ms`` worth
    of runs (5..max_reps), each bracketed by CUDA events after a write of FLUSH_BYTES; returns
    the median (robust to the odd preempted run) and the minimum."""

    smoke = False

    def __init__(self, warmup_ms: float = 25.0, rep_ms: float = 100.0, max_reps: int = 1000):
        self.warmup_ms, self.rep_ms, self.max_reps = warmup_ms, rep_ms, max_reps
        l2 = getattr(torch.cuda.get_device_properties(torch.cuda.current_device()),
                     "L2_cache_size", 0)
        self._flush = torch.empty(max(FLUSH_BYTES, 4 * l2) // 4, dtype=torch.int32, device="cuda")

    def _timed(self, fn, reps: int) -> list[float]:
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        for i in range(reps):
            self._flush.zero_()
            starts[i].record()
            fn()
            ends[i].record()
        torch.cuda.synchronize()
        return [s.elapsed_time(e) for s, e in zip(starts, ends)]  # milliseconds

    def __call__(self, fn, warm: bool = True) -> Measurement:
        """``warm=False``: fn already ran (compiled) -- skip the first call."""
        if warm:
            fn()  # compile / autotune / allocate outside the measurement
        torch.cuda.synchronize()
        estimate_ms = max(statistics.median(self._timed(fn, 5)), 1e-3)
        for _ in range(max(1, int(self.warmup_ms / estimate_ms))):
            fn()
        reps = max(5, min(self.max_reps, int(self.rep_ms / estimate_ms)))
        times = self._timed(fn, reps)
        return Measurement(statistics.median(times) / 1e3, min(times) / 1e3, reps)


class WallTimer:
    """Smoke mode: one warm-up call, then ``reps`` calls timed with the wall clock."""

    smoke = True

    def __init__(self, reps: int = 2):
        self.reps = reps

    def __call__(self, fn, warm: bool = True) -> Measurement:
        if warm:
            fn()
        times = []
        for _ in range(self.reps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return Measurement(statistics.median(times), min(times), self.reps)


def make_timer(warmup_ms: float = 25.0, rep_ms: float = 100.0, smoke_reps: int = 2):
    if smoke_mode():
        return WallTimer(smoke_reps)
    return CudaTimer(warmup_ms, rep_ms)


def require_kernels_runnable() -> None:
    """Tune and bench launch the Triton kernels; on CPU tensors they run in Triton's
    interpreter, unless the float64 reference path was chosen."""
    from .._runtime import cpu_runs_kernels
    if run_device() == "cpu" and not cpu_runs_kernels():
        raise RuntimeError("no GPU, and CPU tensors take the float64 reference path "
                           "(TRITONBN_CPU=reference or TRITON_INTERPRET=0): unset it to run the "
                           "kernels in Triton's interpreter")


def machine_info() -> dict:
    """Device, driver and library versions for result files."""
    import platform
    import subprocess

    import triton

    info = {"torch": torch.__version__, "triton": triton.__version__,
            "python": platform.python_version(), "smoke": smoke_mode(),
            "date": time.strftime("%Y-%m-%d")}
    if smoke_mode():
        info.update(device="CPU (Triton interpreter)", device_slug="cpu-interpreter-smoke",
                    note=SMOKE_LABEL, cpu=platform.processor() or platform.machine(),
                    cores=os.cpu_count())
        return info
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    driver = None
    try:  # nvidia-smi knows the driver version; torch only knows the CUDA API level it supports
        driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=20).stdout.split("\n")[0].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    info.update(device=props.name, device_slug=_slug(props.name), sm_count=props.multi_processor_count,
                capability=f"{props.major}.{props.minor}", memory_gib=round(props.total_memory / 2**30, 1),
                driver=driver or "unknown", cuda=torch.version.cuda,
                cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
                cudnn_enabled=torch.backends.cudnn.enabled)
    return info


def _slug(name: str) -> str:
    return "".join(ch if ch.isalnum() else "-" for ch in name.lower()).strip("-").replace("--", "-")
