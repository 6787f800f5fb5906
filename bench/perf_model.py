"""A static performance model of the batch-norm kernels on H100 and H200, without a GPU.

For each benchmark problem (tritonbn/tools/shapes.py BENCH_SHAPES x layouts x fwd_train /
fwd_eval / bwd_train, float16) the launchers run on meta tensors with the dispatcher planning
for an H100 (bench/compile_check.py ``capture``); every launch is compiled for sm_90a (one
compile serves H100 and H200, both sm_90 with 132 SMs) and read back: registers and resident
programs per SM, which pointer arguments the kernel loads and stores (Triton IR), and its loops
in SASS with their instructions, barriers, shuffles and global accesses per iteration. From those facts
alone -- nothing is set per kernel -- each launch gets:

* bytes: activation-sized tensors read and written, once each (a tensor an earlier launch of the
  same op touched is read from L2 instead when it and what came between fit half the L2);
  per-channel tensors are negligible, except partial buffers (arguments named PART*): a kernel
  that reads them reads, per program, every partial of its channel block -- L2 traffic;
* waves (programs / (SMs x resident programs)), lane utilisation of the tiles;
* warp-instructions: the loop that moves activations costs (instructions per iteration x warps)
  per tile, a loop over partials per group of partials it loads at once, the rest once per
  program; issue time = all of them / (SMs x 4 per clock x clock);
* the memory time wave by wave: the bytes at the copy bandwidth, but no faster than each program
  can go when every loop iteration waits one memory round trip (too few bytes in flight);
* the serial chain: partials merged one after another per program, one dependent L2 round trip
  per group the SASS loads at once.

A launch takes its merge of partials (the slowest of its serial chain, its instructions and
its partials' bytes at the L2 bandwidth) plus max(memory, L2, issue) for the rest; an op is the
sum over its launches plus a launch gap each. Its "% of copy" is the op's minimum traffic
(2 s E forward, 3 s E backward) at the copy bandwidth over the predicted time.

``python -m bench.perf_model`` (from the repository root) writes bench/results/perf_model.md;
``--check PATH`` compares with a committed table and exits non-zero when a row's % of copy
dropped by more than 5 points. A benchmark on a GPU prints the predictions next to its measurements::

    gpu = perf_model.gpu_for(torch.cuda.get_device_name())      # None: not a modelled GPU
    predicted = {p.key: p for p in perf_model.predict_all(gpus=[gpu])}
    # key: (GPU, "256x64x112x112", layout, op); or one problem:
    perf_model.predict(perf_model.problem("bwd", shape, "channels_last"), gpu).time_us
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass, field

from . import compile_check as cc
from tritonbn.tools.shapes import BENCH_SHAPES, DTYPES

__all__ = ["GPU", "GPUS", "OPS", "Prediction", "LaunchFacts", "problems", "problem", "gpu_for",
           "analyze", "predict", "predict_all", "predict_launches", "write_markdown",
           "read_table", "check", "main"]


@dataclass(frozen=True)
class GPU:
    name: str
    sms: int            # streaming multiprocessors
    copy_bw: float      # bytes/s a device-to-device copy reaches: the bandwidth kernels can get
    peak_bw: float      # bytes/s, the datasheet HBM bandwidth (for reference only)
    l2_bytes: int       # L2 cache size
    l2_bw: float        # bytes/s the L2 serves to the SMs
    clock_hz: float     # SM clock under load


GPUS = {
    # H100 SXM5. Datasheet: 132 SMs, HBM3 3.35 TB/s, 50 MB L2, 1.98 GHz boost. Lead: copy 3.0
    # TB/s (~90% of peak, what device copies reach on HBM3), L2 10 TB/s (microbenchmarks).
    "H100": GPU("H100 SXM", 132, 3.0e12, 3.35e12, 50 * 10**6, 10e12, 1.98e9),
    # H200. Datasheet: 132 SMs, HBM3e 4.8 TB/s, clocks as H100. Measured: 4.3 TB/s device copy.
    # Lead: L2 60 MB as briefed (the full GH100 die has 60 MB, H100 SXM enables 50: confirm
    # with cudaDeviceProp.l2CacheSize), L2 bandwidth as H100.
    "H200": GPU("H200", 132, 4.3e12, 4.8e12, 60 * 10**6, 10e12, 1.98e9),
}

# Datasheet: a Hopper SM's four schedulers issue one warp-instruction per clock each.
ISSUE_PER_CLOCK = 4
# Lead, ~2 us: GPU gap between dependent back-to-back launches (Nsight timelines, no graphs).
LAUNCH_GAP_S = 2.0e-6
# Lead, ~0.3 us per partial merged serially: an L2 hit is ~260 cycles (0.13 us) in Hopper
# pointer-chase microbenchmarks, more from the far partition, plus the merge's dependent math
# (a division) before the next iteration's loads issue.
L2_ROUND_TRIP_S = 0.3e-6
# Lead, ~0.7 us: the HBM round trip a loop iteration waits (pointer-chase latency ~0.5 us idle
# in microbenchmarks, plus queueing); an SM then needs 3.0 TB/s x 0.7 us / 132 = 16 KB in
# flight to keep pace with an H100 copy.
HBM_LATENCY_S = 0.7e-6
# Lead: share of the L2 a tensor re-read by the op's next launch can count on (two partitions,
# the op's other tensors streaming through).
L2_USABLE = 0.5

OPS = ("fwd_train", "fwd_eval", "bwd_train")
# Minimum traffic (elements moved per activation element): one pass reads x (and dy) once and
# writes the output once; a two-pass kernel pair reads the inputs twice.
ONE_PASS = {"fwd_train": 2, "fwd_eval": 2, "bwd_train": 3}
TWO_PASS = {"fwd_train": 3, "fwd_eval": 2, "bwd_train": 5}
TARGET = "sm90"          # compile_check target: sm_90a, planned for 132 SMs
TOLERANCE = 5.0          # points of "% of copy" a row may lose before --check fails
DEFAULT_OUT = os.path.join("bench", "results", "perf_model.md")


# ------------------------------------------------------------------------------ problems

def problems(shapes=None, ops=OPS, dtype: str = "float16") -> list:
    """The benchmark problems: every shape (BENCH_SHAPES by default) contiguous, and channels
    last for 4-D / 5-D shapes, for each op."""
    out = []
    for shape in (BENCH_SHAPES if shapes is None else shapes):
        for layout in ["contiguous"] + (["channels_last"] if len(shape) in (4, 5) else []):
            for op in ops:
                out.append(cc.Problem(op, tuple(shape), dtype, layout))
    return out


_OP_NAMES = {"bwd": "bwd_train", "backward": "bwd_train"}


def problem(op: str, shape, layout: str = "contiguous", dtype: str = "float16"):
    """A problem from the benchmark's names (op "bwd" is the training backward)."""
    return cc.Problem(_OP_NAMES.get(op, op), tuple(shape), dtype, layout)


def gpu_for(device_name: str) -> GPU | None:
    """The modelled GPU a CUDA device name is (e.g. "NVIDIA H100 80GB HBM3"), or None."""
    for key in ("H200", "H100"):
        if key in device_name.upper():
            return GPUS[key]
    return None


# ------------------------------------------------------------------- facts of each launch

@dataclass
class LaunchFacts:
    """What one launch of a problem does, from its capture, its plan and its compiled code
    (the same on every sm_90 GPU)."""
    kernel: str
    grid: tuple
    programs: int
    warps: int
    blocks: dict                 # BLOCK_N / BLOCK_S / BLOCK_C
    flags: dict                  # boolean constexprs (TRAINING, ...)
    ok: bool                     # it compiled
    failures: list
    regs: int
    spill: int                   # bytes of local memory + stack per thread
    resident: int                # programs per SM
    occupancy: float
    reads: list                  # activation tensors read: [(tensor id, bytes)]
    writes: list                 # activation tensors written: [(tensor id, bytes)]
    partial_read_bytes: int      # partial buffers read (L2), all programs together
    partial_write_bytes: int
    partials: int                # partials each program merges serially (0: none)
    partials_in_flight: int      # partials the SASS loads per dependent round trip
    merge_trips: int             # dependent L2 round trips of the merge loops (1 without a loop)
    tiles: int                   # tiles of the activations all programs go through
    tile: int                    # elements per tile
    useful: int                  # elements of the activations
    loop_instr: int              # instructions per iteration of the main activation loop
    loop_body_instr: int         # instructions in its body (both sides of its branches)
    tiles_per_iter: int          # tiles per iteration of the main loop (its unroll)
    warp_instr: float            # warp-instructions of the launch, merging partials aside
    merge_warp_instr: float      # warp-instructions of the loops that merge partials
    warp_instr_per_elem: float   # in the code that moves activations, per tile element
    bar_per_tile: float
    shfl_per_tile: float
    max_load: int                # widest global load, bytes
    loads_per_program: float     # memory round trips each program waits, one after another
    straight_instr: int          # instructions outside every loop

    def waves(self, gpu: GPU) -> float:
        """Programs over the programs the GPU holds at once."""
        return self.programs / max(1, gpu.sms * max(1, self.resident))

    @property
    def lanes(self) -> float:
        """Useful elements over the tile elements launched (a block that overhangs the plane
        leaves lanes masked off)."""
        return self.useful / (self.tiles * self.tile) if self.tiles and self.tile else 1.0


def _prod(xs) -> int:
    return math.prod(int(x) for x in xs)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _values(kernel, args, kwargs) -> dict:
    names = [n for n, _ in cc._kernel_params(kernel)]
    values = dict(zip(names, args))
    values.update(kwargs)
    return values


def _classify_loops(res, act_names: set, partial_names: set) -> tuple[list, list, list]:
    """The SASS loops split into (activation loops, partial-merge loops, other loops).

    A loop whose attributed global accesses all touch partial buffers read by this kernel merges
    partials; one that touches an activation, or global memory nobody could attribute, moves
    activations; a loop without global accesses is other code (run once per program)."""
    act, merge, other = [], [], []
    for lp in res.loops:
        if lp["depth"] > 0:
            continue          # an inner loop is counted in its outer loop's body
        names = {n for n, b in lp["tensors"].items() if b["load"] or b["store"]}
        if names and names <= partial_names:
            merge.append(lp)
        elif names & act_names or "?" in names:
            act.append(lp)
        else:
            other.append(lp)
    return act, merge, other


def _iteration(lp: dict) -> dict:
    """What one iteration of a SASS loop runs: its cheapest path that loads (a branch in the
    body takes its cheap side: a full tile's fast path, not an edge tile's)."""
    return lp.get("path", lp)


def _load_bytes(stats: dict, names=None) -> float:
    """Global load bytes per thread in a run of code (only those of ``names`` if given)."""
    return sum(b["load"] for n, b in stats["tensors"].items() if names is None or n in names)


def launch_facts(prob, kernel, grid, args, kwargs, res) -> LaunchFacts:
    """The facts of one captured launch (kernel, grid, arguments and constants as the launcher
    made them) given its compiled Result: bytes, tiles, loops, instructions, partials."""
    import torch
    values = _values(kernel, args, kwargs)
    numel = _prod(prob.shape)
    # the canonical (N, C, S) plane the kernels see (a 2-D input is one sample of S = N rows)
    n, c, s = (int(values[k]) if isinstance(values.get(k), int) else d
               for k, d in zip(("size_n", "size_c", "size_s"),
                               (prob.shape[0], prob.shape[1], _prod(prob.shape[2:]))))
    warps = int(kwargs.get("num_warps", 4))
    threads = 32 * warps
    programs = _prod(grid)
    bn, bs, bc = (values.get(k) for k in ("BLOCK_N", "BLOCK_S", "BLOCK_C"))
    tensors = {k: v for k, v in values.items() if isinstance(v, torch.Tensor)}
    # partial buffers by name (PART*); activations by size: as many elements as the input
    # (per-channel tensors have a few times C)
    partial = {k: t for k, t in tensors.items() if k.upper().startswith("PART")}
    act = {k: t for k, t in tensors.items()
           if k not in partial and t.numel() == numel and numel > 4 * c}
    reads = [(id(t), t.numel() * t.element_size()) for k, t in act.items() if k in res.reads]
    writes = [(id(t), t.numel() * t.element_size()) for k, t in act.items() if k in res.writes]
    esize = max([t.element_size() for t in act.values()] or [2])

    # partial buffers: (Q quantities, K partials, C channels); a reader merges all K of its block
    part_read = part_write = n_part = 0
    block_c = min(int(bc or c), c)
    read_partials = {k for k in partial if k in res.reads}
    step_bytes = 0.0
    for k, t in partial.items():
        q, kk = (t.shape[0], t.shape[1]) if t.dim() == 3 else (1, max(1, t.numel() // max(c, 1)))
        if k in res.reads:
            part_read += programs * q * kk * block_c * t.element_size()
            n_part = max(n_part, kk)
            # bytes per thread one partial step (all BLOCK_C channels of one split) loads
            step_bytes += q * t.element_size() * block_c / threads
        if k in res.writes:
            part_write += t.numel() * t.element_size()

    tiled = bn is not None and bs is not None and bc is not None
    tile = int(bn) * int(bs) * int(bc) if tiled else 0
    tiles = _cdiv(c, bc) * _cdiv(n, bn) * _cdiv(s, bs) if tiled else 0

    compiled = res.regs > 0
    act_loops, merge_loops, other_loops = _classify_loops(res, set(act), read_partials)
    per_thread = max(1.0, tile / threads) * esize       # bytes of one tensor's tile per thread
    straight = res.straight or {"instructions": 0, "bar": 0, "shfl": 0, "tensors": {}}
    warp_instr = programs * straight.get("instructions", 0)
    loads_pp = 0.0
    tiles_pp = tiles / programs if programs else 0
    main = None
    units = 1
    for lp in act_loops:
        it = _iteration(lp)
        touched = [nm for nm, b in it["tensors"].items() if nm in act and (b["load"] or b["store"])]
        moved = sum(b["load"] + b["store"] for nm, b in it["tensors"].items() if nm in act)
        u = max(1, round(moved / (per_thread * len(touched)))) if touched else 1
        warp_instr += tiles / u * it["instructions"]
        if _load_bytes(it) > 0:
            loads_pp += tiles_pp / u
        if main is None or it["instructions"] > _iteration(main)["instructions"]:
            main, units = lp, u
    # partial merges: each merge loop walks all K partials of the program's channel block; an
    # iteration covers as many as its loads hold (a thread's share of a [partials, BLOCK_C]
    # tile: load bytes x threads / (quantities x element size x BLOCK_C)) -- one dependent L2
    # round trip each. Without a loop the compiler issued every partial's loads at once.
    in_flight, merge_instr, trips = 0, 0.0, 0
    if n_part:
        steps = [(max(1, round(_load_bytes(it) / step_bytes)) if step_bytes else 1, it)
                 for it in map(_iteration, merge_loops)]
        if steps:
            in_flight = max(k for k, _ in steps)
            trips = sum(_cdiv(n_part, k) for k, _ in steps)
            merge_instr = programs * warps * sum(_cdiv(n_part, k) * it["instructions"]
                                                 for k, it in steps)
        else:
            in_flight, trips = n_part, 1
    for lp in other_loops:
        warp_instr += programs * _iteration(lp)["instructions"]
    warp_instr *= warps
    if main is not None:
        code, per = _iteration(main), units * tile
    else:                               # no activation loop: a one-pass kernel, or no tiles
        code, per = straight, tile
        if act and _load_bytes(straight, set(act) | {"?"}) > 0:
            loads_pp += 1.0
    wipe = code["instructions"] * warps / per if per else 0.0
    return LaunchFacts(
        kernel=res.kernel, grid=tuple(int(g) for g in grid), programs=programs, warps=warps,
        blocks=dict(res.blocks), flags=dict(res.flags), ok=compiled,
        failures=[] if compiled else list(res.failures),
        regs=res.regs, spill=res.local + res.stack, resident=res.programs_per_sm,
        occupancy=res.occupancy, reads=reads, writes=writes, partial_read_bytes=part_read,
        partial_write_bytes=part_write, partials=n_part, partials_in_flight=in_flight,
        merge_trips=trips,
        tiles=tiles, tile=tile, useful=numel if tiled else 0,
        loop_instr=code["instructions"] if main else 0,
        loop_body_instr=main["instructions"] if main else 0, tiles_per_iter=units,
        warp_instr=warp_instr, merge_warp_instr=merge_instr, warp_instr_per_elem=wipe,
        bar_per_tile=code.get("bar", 0) / (units if main else 1),
        shfl_per_tile=code.get("shfl", 0) / (units if main else 1),
        max_load=max(list(res.loads) + [0]), loads_per_program=loads_pp,
        straight_instr=straight.get("instructions", 0))


# ---------------------------------------------------------------------------- compiling

_results: dict = {}     # compile job -> compile_check.Result, kept across calls


def analyze(probs, workers: int = 2) -> dict:
    """{problem: [LaunchFacts]}: captures each problem's launches (planned for an H100),
    compiles every distinct specialization once for sm_90a (in ``workers`` processes; Triton's
    on-disk cache makes repeated runs cheap) and derives each launch's facts."""
    target = cc.TARGETS[TARGET]
    captured, jobs = {}, {}
    for prob in probs:
        launches = cc.capture(prob, target)
        captured[prob] = launches
        for kernel, _grid, args, kwargs in launches:
            job = (cc.specialize(kernel, args, kwargs), TARGET, prob.dtype, True)
            if job not in _results:
                jobs.setdefault(job, []).append(prob.name)
    if jobs:
        for job, res in zip(list(jobs), cc.compile_jobs(jobs, workers)):
            _results[job] = res
    out = {}
    for prob, launches in captured.items():
        facts = []
        for kernel, grid, args, kwargs in launches:
            job = (cc.specialize(kernel, args, kwargs), TARGET, prob.dtype, True)
            facts.append(launch_facts(prob, kernel, grid, args, kwargs, _results[job]))
        out[prob] = facts
    return out


# --------------------------------------------------------------------------- predicting

@dataclass
class Prediction:
    """The model's prediction for one problem on one GPU, with what it is made of."""
    op: str
    shape: tuple
    dtype: str
    layout: str
    gpu: str
    launches: int
    time_us: float
    limit: str                  # what the time is mostly made of
    pct_copy: float             # minimum traffic at the copy bandwidth / predicted time, %
    vs_one_pass: float          # predicted time / the one-pass limit
    vs_two_pass: float          # predicted time / the two-pass limit
    hbm_bytes: float
    l2_bytes: float
    terms_us: dict              # time per cause: HBM, latency, L2, issue, serial partials, gaps
    worst_warp_instr_per_elem: float
    serial_partials: int        # partials a program merges one after another (worst launch)
    serial_trips: int           # dependent L2 round trips that takes
    lanes: float                # useful / launched tile elements (worst launch)
    kernels: list = field(default_factory=list)   # per launch: its facts and times
    failures: list = field(default_factory=list)

    @property
    def key(self) -> tuple:
        return (self.gpu, "x".join(map(str, self.shape)), self.layout, self.op)


def _launch_time(f: LaunchFacts, gpu: GPU, hbm_read: float, hbm_write: float,
                 l2_hits: float) -> dict:
    """Seconds per cause for one launch: memory (bandwidth or latency bound), L2, issue,
    serial chain."""
    slots = gpu.sms * max(1, f.resident)
    programs = max(1, f.programs)
    per_program = (hbm_read + hbm_write) / programs
    reads = hbm_read + l2_hits
    # each iteration of a program's loads waits one round trip: to HBM, or to L2 for re-reads
    trip = (HBM_LATENCY_S * hbm_read + L2_ROUND_TRIP_S * l2_hits) / reads if reads else 0.0
    latency = f.loads_per_program * trip
    full, rem = divmod(programs, slots)
    bw = (hbm_read + hbm_write) / gpu.copy_bw
    mem = full * max(slots * per_program / gpu.copy_bw, latency)
    if rem:
        mem += max(rem * per_program / gpu.copy_bw, latency)
    l2 = (hbm_read + hbm_write + l2_hits + f.partial_write_bytes) / gpu.l2_bw
    rate = min(gpu.sms, programs) * ISSUE_PER_CLOCK * gpu.clock_hz
    issue = f.warp_instr / rate
    # Merging partials comes first in a program, before it streams: as slow as its dependent
    # L2 round trips (the chain, paid once: the programs of a wave wait side by side), its
    # instructions, or the partials' bytes at the L2 bandwidth, whichever is slowest.
    trips = f.merge_trips if f.partials else 0
    merge = {"chain": trips * L2_ROUND_TRIP_S, "issue": f.merge_warp_instr / rate,
             "L2": f.partial_read_bytes / gpu.l2_bw}
    return {"HBM": bw, "latency": mem - bw, "L2": l2, "issue": issue, "merge": merge,
            "trips": trips, "memory": mem}


def predict_launches(prob, facts: list, gpu: GPU) -> Prediction:
    """The prediction for one problem on one GPU from its launches' facts."""
    elem = DTYPES[prob.dtype].itemsize
    numel = _prod(prob.shape)
    usable = gpu.l2_bytes * L2_USABLE
    touched: list[dict] = []            # per launch: {tensor id: bytes} it touched
    total, hbm_total, l2_total = 0.0, 0.0, 0.0
    causes = {"HBM": 0.0, "latency": 0.0, "L2": 0.0, "issue": 0.0, "serial partials": 0.0}
    kernels, failures = [], []
    worst_wipe, lanes, serial, trips_max = 0.0, 1.0, 0, 0
    for f in facts:
        if not f.ok:
            failures.append(f"{f.kernel}: {'; '.join(f.failures)}")
        hbm_read = l2_hits = 0.0
        for key, nbytes in f.reads:
            last = max((j for j, t in enumerate(touched) if key in t), default=None)
            hit = 0.0
            if last is not None:
                between = {}
                for t in touched[last:]:
                    between.update(t)
                other = sum(b for k, b in between.items() if k != key)
                hit = 1.0 if other + nbytes <= usable else 0.0
            hbm_read += (1 - hit) * nbytes
            l2_hits += hit * nbytes
        hbm_write = float(sum(b for _k, b in f.writes))
        touched.append({k: b for k, b in f.reads + f.writes})
        t = _launch_time(f, gpu, hbm_read, hbm_write, l2_hits)
        body = {"memory": t["memory"], "L2": t["L2"], "issue": t["issue"]}
        bound = max(body, key=body.get)
        if bound == "memory":       # the copy-bandwidth time, and what latency and tails add
            causes["HBM"] += t["HBM"]
            causes["latency"] += t["latency"]
            cause = "latency" if t["latency"] > t["HBM"] else "HBM"
        else:
            causes[bound] += body[bound]
            cause = bound
        merge = max(t["merge"].values())
        causes["serial partials"] += merge
        seconds = body[bound] + merge
        total += seconds
        hbm_total += hbm_read + hbm_write
        l2_total += hbm_read + hbm_write + l2_hits + f.partial_read_bytes + f.partial_write_bytes
        worst_wipe = max(worst_wipe, f.warp_instr_per_elem)
        if f.tiles:
            lanes = min(lanes, f.lanes)
        if f.partials > serial:
            serial, trips_max = f.partials, t["trips"]
        kernels.append({"kernel": f.kernel, "grid": list(f.grid), "blocks": f.blocks,
                        "warps": f.warps, "regs": f.regs, "resident": f.resident,
                        "waves": round(f.waves(gpu), 2),
                        "us": round(seconds * 1e6, 2), "bound": cause,
                        "merge_us": {k: round(v * 1e6, 2) for k, v in t["merge"].items()},
                        "hbm_MB": round((hbm_read + hbm_write) / 1e6, 2),
                        "l2_hit_MB": round(l2_hits / 1e6, 2),
                        "partials_MB": round(f.partial_read_bytes / 1e6, 2),
                        "warp_instr_per_elem": round(f.warp_instr_per_elem, 3),
                        "partials": f.partials, "in_flight": f.partials_in_flight,
                        "lanes": round(f.lanes, 3)})
    gaps = len(facts) * LAUNCH_GAP_S
    causes["launch gaps"] = gaps
    total += gaps
    one = ONE_PASS[prob.op] * elem * numel / gpu.copy_bw
    two = TWO_PASS[prob.op] * elem * numel / gpu.copy_bw
    limit = max(causes, key=causes.get)
    return Prediction(
        op=prob.op, shape=tuple(prob.shape), dtype=prob.dtype, layout=prob.layout,
        gpu=next(k for k, g in GPUS.items() if g == gpu) if gpu in GPUS.values() else gpu.name,
        launches=len(facts), time_us=total * 1e6, limit=limit,
        pct_copy=100.0 * one / total if total else 0.0,
        vs_one_pass=total / one if one else 0.0, vs_two_pass=total / two if two else 0.0,
        hbm_bytes=hbm_total, l2_bytes=l2_total,
        terms_us={k: round(v * 1e6, 2) for k, v in causes.items()},
        worst_warp_instr_per_elem=worst_wipe, serial_partials=serial, serial_trips=trips_max,
        lanes=lanes, kernels=kernels, failures=failures)


def _gpu(gpu) -> GPU:
    if isinstance(gpu, GPU):
        return gpu
    found = GPUS.get(gpu) or gpu_for(str(gpu))
    if found is None:
        raise ValueError(f"unknown GPU {gpu!r}; modelled: {sorted(GPUS)}")
    return found


def predict(prob, gpu="H100", workers: int = 2) -> Prediction:
    """The prediction for one problem (a compile_check.Problem; see ``problem``) on one GPU
    ("H100", "H200", a CUDA device name or a GPU)."""
    return predict_launches(prob, analyze([prob], workers)[prob], _gpu(gpu))


def predict_all(probs=None, gpus=("H100", "H200"), workers: int = 2) -> list:
    """Predictions for every problem (the benchmark set by default) on every GPU, problem-major."""
    probs = problems() if probs is None else list(probs)
    facts = analyze(probs, workers)
    return [predict_launches(p, facts[p], _gpu(g)) for p in probs for g in gpus]


# ------------------------------------------------------------------------------- output

def _versions() -> dict:
    try:
        return cc._versions()
    except Exception:  # pragma: no cover - ptxas missing: the compile would have failed first
        import torch
        import triton
        return {"torch": torch.__version__, "triton": triton.__version__, "ptxas": "ptxas ?",
                "date": datetime.date.today().isoformat()}


_COLUMNS = ["GPU", "shape", "layout", "op", "launches", "predicted us", "% of copy",
            "vs 1-pass", "vs 2-pass", "limit", "warp-instr/elem", "serial partials", "lanes %"]


def _row(p: Prediction) -> list[str]:
    if p.failures:
        return [p.gpu, "x".join(map(str, p.shape)), p.layout, p.op, str(p.launches), "FAIL",
                "0.0", "-", "-", "does not compile", "-", "-", "-"]
    serial = f"{p.serial_partials} ({p.serial_trips} trips)" if p.serial_partials else "-"
    return [p.gpu, "x".join(map(str, p.shape)), p.layout, p.op, str(p.launches),
            f"{p.time_us:.1f}", f"{p.pct_copy:.1f}", f"{p.vs_one_pass:.2f}",
            f"{p.vs_two_pass:.2f}", p.limit, f"{p.worst_warp_instr_per_elem:.3f}", serial,
            f"{100 * p.lanes:.0f}"]


def _kernel_table(facts: dict) -> list[str]:
    """One row per distinct compiled kernel of the problems: why the predictions are what
    they are."""
    rows: dict[tuple, list] = {}
    every = [f for launches in facts.values() for f in launches]
    # flags set in every kernel say nothing about the row
    common = set.intersection(*({k for k, v in f.flags.items() if v} for f in every)) \
        if every else set()
    for prob, launches in facts.items():
        for f in launches:
            b = f.blocks
            flags = ",".join(k.lower() for k, v in sorted(f.flags.items())
                             if v and k not in common) or "-"
            row = (f.kernel.replace("_kernel", ""),
                   ",".join(str(b.get(k, "-")) for k in ("BLOCK_N", "BLOCK_S", "BLOCK_C")),
                   str(f.warps), flags, str(f.regs), str(f.spill), str(f.resident),
                   f"{f.occupancy:.0%}",
                   (f"{f.loop_instr} of {f.loop_body_instr}" if f.loop_body_instr != f.loop_instr
                    else str(f.loop_instr or "-")),
                   f"{f.warp_instr_per_elem:.3f}" if f.tile else "-",
                   f"{f.bar_per_tile:g}" if f.tile else "-",
                   f"{f.shfl_per_tile:g}" if f.tile else "-", str(f.max_load),
                   str(f.partials_in_flight) if f.partials else "-")
            rows.setdefault(row, []).append(prob.name)
    out = ["| kernel | blocks (n,s,c) | warps | flags | regs | spill B | programs/SM | "
           "occupancy | loop instr | warp-instr/elem | bar/tile | shfl/tile | max load B | "
           "partials in flight | problems |",
           "|" + " --- |" * 15]
    for row, names in sorted(rows.items()):
        example = names[0] + (f" (+{len(names) - 1})" if len(names) > 1 else "")
        out.append("| " + " | ".join(row) + f" | {example} |")
    return out


def write_markdown(preds: list, facts: dict, path: str, command: str, elapsed_s: float) -> str:
    """The predictions table, the kernel table and the model's constants, as markdown."""
    v = _versions()
    m = re.search(r"cuda_(\d+\.\d+)", v["ptxas"])
    ptxas = f"ptxas {m.group(1)}" if m else v["ptxas"]
    ok = [p for p in preds if not p.failures]
    lines = [
        "# Static performance model: predicted batch-norm times on H100 and H200",
        "",
        f"Made by `{command}` on {v['date']} (torch {v['torch']}, triton {v['triton']}, "
        f"{ptxas}; {elapsed_s:.0f} s). Predictions from the compiled code, not "
        "measurements: every launch the dispatcher makes for the benchmark shapes "
        "(tritonbn/tools/shapes.py), float16, compiled for sm_90a (one compile serves both "
        "GPUs: sm_90, 132 SMs) and read back from SASS; no GPU ran. Regenerate with the same "
        "command after changing kernels, plans or launchers; `--check` compares with this table "
        f"(CI fails a row that loses more than {TOLERANCE:g} points of % of copy).",
        "",
        "Columns: **predicted us** = sum over the op's launches of (merging partials: the "
        "slowest of the serial chain, its instructions, its bytes at the L2 bandwidth) + "
        "max(memory, L2, issue), plus a launch gap each; **% of copy** = the op's minimum "
        "traffic (2 s E forward, "
        "3 s E backward) at the GPU's copy bandwidth over the predicted time; **vs 1-pass / "
        "vs 2-pass** = predicted time over the one-pass limit and over the two-pass limit "
        "(3 s E forward training, 5 s E backward); **limit** = the cause most of the time goes to "
        "(HBM bandwidth, latency = too few bytes in flight or a tail wave, L2, issue, serial "
        "partials, launch gaps); **warp-instr/elem** = warp-instructions per tile element of the "
        "code that moves activations (worst launch); **serial partials** = partials a program "
        "merges one after another and the dependent L2 round trips that takes; **lanes %** = "
        "useful / launched tile elements (worst launch).",
        "",
    ]
    if ok:
        worst = sorted(ok, key=lambda p: p.pct_copy)[:5]
        lines += ["Lowest predicted % of copy: " + "; ".join(
            f"{p.gpu} {p.op} {'x'.join(map(str, p.shape))} {p.layout} {p.pct_copy:.0f}% "
            f"({p.limit})" for p in worst) + ".", ""]
        for g in sorted({p.gpu for p in ok}):
            mine = [p for p in ok if p.gpu == g]
            geo = math.exp(sum(math.log(max(p.pct_copy, 1e-3)) for p in mine) / len(mine))
            lines.append(f"- {g}: geometric mean {geo:.0f}% of copy over {len(mine)} rows; "
                         f"{sum(p.pct_copy >= 80 for p in mine)} rows at 80% or more.")
        lines.append("")
    lines += ["## Predictions", "", "| " + " | ".join(_COLUMNS) + " |",
              "|" + " --- |" * len(_COLUMNS)]
    lines += ["| " + " | ".join(_row(p)) + " |" for p in preds]
    lines += ["", "## Kernels", "",
              "One row per distinct compiled kernel: registers, resident programs per SM and "
              "occupancy (from registers, threads and shared memory), instructions per "
              "iteration of the loop that moves activations (its cheapest path that loads, "
              "\"of\" the whole body when the body branches; the whole program for a one-pass "
              "kernel), warp-instructions per tile element, barriers and shuffles per tile, the "
              "widest global load, and how many partials the SASS loads per round trip when it "
              "merges them.", ""]
    lines += _kernel_table(facts)
    lines += ["", "## Constants", ""]
    for g in GPUS.values():
        lines.append(f"- {g.name}: {g.sms} SMs, copy {g.copy_bw / 1e12:g} TB/s (peak "
                     f"{g.peak_bw / 1e12:g}), L2 {g.l2_bytes / 1e6:g} MB at "
                     f"{g.l2_bw / 1e12:g} TB/s, {g.clock_hz / 1e9:g} GHz.")
    lines += [f"- {ISSUE_PER_CLOCK} warp-instructions issued per clock per SM; launch gap "
              f"{LAUNCH_GAP_S * 1e6:g} us; dependent L2 round trip {L2_ROUND_TRIP_S * 1e6:g} us; "
              f"HBM round trip {HBM_LATENCY_S * 1e6:g} us; a re-read tensor hits L2 when it and "
              f"what came between fit {L2_USABLE:.0%} of the L2. Where each comes from, and which "
              "are leads to fit against the GPU benchmark: bench/perf_model.py."]
    text = "\n".join(lines) + "\n"
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    return path


def write_json(preds: list, path: str) -> str:
    """The predictions as compact JSON (one object per row, per-launch breakdown included)."""
    rows = []
    for p in preds:
        d = dataclasses.asdict(p)
        for k in ("time_us", "pct_copy", "vs_one_pass", "vs_two_pass",
                  "worst_warp_instr_per_elem", "lanes"):
            d[k] = round(d[k], 3)
        d["hbm_MB"] = round(d.pop("hbm_bytes") / 1e6, 2)
        d["l2_MB"] = round(d.pop("l2_bytes") / 1e6, 2)
        rows.append(d)
    with open(path, "w") as f:
        json.dump({"versions": _versions(), "rows": rows}, f, separators=(",", ":"))
    return path


def read_rows(path: str) -> list[dict]:
    """The rows of the markdown table(s) written by write_markdown, as {column: cell} dicts
    (every table with a "% of copy" column; separator lines skipped)."""
    rows, header = [], None
    with open(path) as f:
        for line in f:
            if not line.startswith("|"):
                header = None if not line.strip() else header
                continue
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if "% of copy" in cells:
                header = cells
            elif header is not None and not set(cells[0]) <= {"-", " "}:
                rows.append(dict(zip(header, cells)))
    return rows


def read_table(path: str) -> dict:
    """{(GPU, shape, layout, op): % of copy} from a markdown table written by write_markdown."""
    out = {}
    for row in read_rows(path):
        try:
            out[(row["GPU"], row["shape"], row["layout"], row["op"])] = float(row["% of copy"])
        except (KeyError, ValueError):
            continue
    return out


def check(preds: list, path: str, tolerance: float = TOLERANCE) -> list[str]:
    """Rows whose predicted % of copy is more than ``tolerance`` points below the committed
    table's (and rows that do not compile); rows the table lacks are not failures."""
    committed = read_table(path)
    bad = []
    for p in preds:
        if p.failures:
            bad.append(f"{p.key}: {'; '.join(p.failures)}")
            continue
        old = committed.get(p.key)
        if old is not None and p.pct_copy < old - tolerance:
            bad.append(f"{' '.join(p.key)}: {p.pct_copy:.1f}% of copy, committed {old:.1f}% "
                       f"(limit now: {p.limit})")
    return bad


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.perf_model",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help=f"markdown table to write (default: {DEFAULT_OUT}, "
                                      "unless --check is given)")
    parser.add_argument("--json", metavar="PATH", help="also write the rows as compact JSON")
    parser.add_argument("--check", metavar="PATH",
                        help=f"compare with a committed table: exit 1 when a row's %% of copy "
                             f"dropped by more than {TOLERANCE:g} points (writes nothing "
                             "unless --out is given too)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    # The dispatcher's own heuristics, not a tuning table of this machine: a reproducible table.
    os.environ.setdefault("TRITONBN_TUNING_TABLE", "off")
    from tritonbn import plan as planner
    planner.reload_tuning_table()
    start = time.time()
    probs = problems()
    facts = analyze(probs, args.workers)
    preds = [predict_launches(p, facts[p], GPUS[g]) for p in probs for g in GPUS]
    elapsed = time.time() - start
    out = args.out or (None if args.check else DEFAULT_OUT)
    if out:
        path = write_markdown(preds, facts, out,
                              "python -m bench.perf_model --out " + out, elapsed)
        print(f"wrote {path}")
    if args.json:
        print(f"wrote {write_json(preds, args.json)}")
    for p in sorted(preds, key=lambda p: p.pct_copy)[:8]:
        print(f"{p.gpu} {p.op:9} {'x'.join(map(str, p.shape)):16} {p.layout:13} "
              f"{p.time_us:9.1f} us {p.pct_copy:5.1f}% of copy ({p.limit})")
    print(f"{len(preds)} rows in {elapsed:.0f} s")
    if args.check:
        bad = check(preds, args.check)
        for line in bad:
            print("WORSE:", line)
        return 1 if bad else 0
    return 0 if all(not p.failures for p in preds) else 1


if __name__ == "__main__":
    sys.exit(main())
