"""The planner: shape -> plan, which kernel variant runs and with which block sizes.

``make_plan`` is a pure function of (op, canonical shape, layout, element size, offset width,
device) returning a frozen ``Plan``; it is cached, so a shape costs one lookup after its first
call. The thresholds below come from the hardware model (register file, SM count, bytes in
flight per SM), not yet from measurements. Where ``tritonbn tune`` has swept a GPU, its tuning
table (tritonbn/tuning_table.py) supplies the plan instead, if that plan still meets the kernels'
constraints for the shape at hand (``_from_table``); the reason then reads "tuned (<table>)".
Each threshold carries the reason it exists.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
from dataclasses import dataclass

import torch

from . import tuning_table
from ._hashing import cached_hash
from ._runtime import cuda_interpreted
from .options import OPS

__all__ = ["OPS", "DeviceInfo", "Plan", "device_info", "make_plan", "forced_plan", "forced_fields",
           "pow2",
           "planning_for", "reload_tuning_table", "grid_tiles", "cdiv"]



@cached_hash
@dataclass(frozen=True)
class DeviceInfo:
    name: str            # e.g. "NVIDIA H100 80GB HBM3" or "triton-interpreter"
    sm_count: int        # streaming multiprocessors (programs run concurrently per SM)
    capability: tuple[int, int]
    interpreter: bool


# The interpreter runs programs one after another in numpy: what costs is the number of tile
# iterations, not parallelism (measured: ~0.1 M elements/s at 256-wide tiles, ~1 M at 4096).
# So it gets big tiles and few programs; 2 "SMs" still gives split reductions on small tests.
INTERPRETER = DeviceInfo("triton-interpreter", sm_count=2, capability=(0, 0), interpreter=True)


@functools.lru_cache(maxsize=None)
def _cuda_info(index: int) -> DeviceInfo:
    props = torch.cuda.get_device_properties(index)
    return DeviceInfo(props.name, props.multi_processor_count, (props.major, props.minor), False)


_device_override: DeviceInfo | None = None


@contextlib.contextmanager
def planning_for(device: DeviceInfo):
    """Plan as if for ``device`` (the compile check plans for GPUs it does not have)."""
    global _device_override
    previous, _device_override = _device_override, device
    try:
        yield
    finally:
        _device_override = previous


def device_info(device: torch.device) -> DeviceInfo:
    if _device_override is not None:
        return _device_override
    if device.type == "cuda" and not cuda_interpreted():
        return _cuda_info(device.index if device.index is not None else torch.cuda.current_device())
    return INTERPRETER


@cached_hash
@dataclass(frozen=True)
class Plan:
    variant: str        # "onepass": the whole plane in one tile; "split": tiles over (C blocks, splits)
    block_n: int        # samples per tile
    block_s: int        # positions per tile (power of two)
    block_c: int        # channels per program
    splits: int         # programs along a channel block's plane
    num_warps: int
    use_int64: bool     # 64-bit element offsets
    reason: str         # one line: why this variant

    @property
    def tile(self) -> int:
        return self.block_n * self.block_s * self.block_c

    @functools.cached_property
    def constants(self) -> dict:
        """The plan's compile-time constants and num_warps, as every kernel launch takes them
        (made once per plan: plans are cached)."""
        return dict(BLOCK_N=self.block_n, BLOCK_S=self.block_s, BLOCK_C=self.block_c,
                    USE_INT64=self.use_int64, num_warps=self.num_warps)


def _warps(tile: int, aligned: bool, op: str) -> int:
    """Warps for a tile: ELEMS_PER_THREAD elements per thread (UNALIGNED_PER_THREAD[op] when
    unaligned), 4-16."""
    per_thread = ELEMS_PER_THREAD if aligned else UNALIGNED_PER_THREAD[op]
    return max(4, min(16, tile // (32 * per_thread)))


def pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


# Elements a split-kernel tile loads per loop iteration on a GPU. 4096 elements over 8 warps
# (ELEMS_PER_THREAD below) is 16 per thread: for half that is two 16-byte loads in flight per
# thread and tensor, which with a few resident programs per SM covers HBM latency.
GPU_TILE = 4096
# Interpreter tiles: as large as tests allow, since each iteration costs fixed numpy overhead.
INTERPRETER_TILE = 16384
# Programs per SM the split grid aims for: streaming kernels need several resident programs
# per SM to keep enough loads in flight; 4 x 132 SMs on an H100.
PROGRAMS_PER_SM = 4
# Channels per program for channels-last tensors: 64 half channels are one 128-byte row segment,
# a full cache line, so a warp's loads are coalesced and 16 bytes wide.
MAX_BLOCK_C = 64
# One-pass kernels hold the whole plane of a channel block in registers: x (and dy) plus the
# float32 result. 8192 elements over 8 warps is 32 values per thread per tensor, inside the
# 255-register budget without spilling; backward holds two inputs, so half of that.
ONEPASS_MAX = {"fwd_train": 8192, "bwd_train": 4096, "bwd_eval": 4096}
# Bounds on a split plan read from a tuning table (a hand-edited or foreign entry must not reach
# the compiler with a tile it cannot build): the widest tile `tritonbn tune --thorough` tries,
# which is also the interpreter's tile, and the most elements per thread it tries -- the
# compile check's spill-free limit for one-pass tiles.
MAX_TUNED_TILE = 16384
MAX_TUNED_PER_THREAD = 32
# Narrowest channel block for channels-last tensors: 8 half values are one 16-byte access.
MIN_MINOR_BLOCK_C = 8
# Narrowest NCHW position block that divides the plane: 8 half values, one 16-byte access per
# thread and row (narrower ones -- 14x14 = 4 x 49 -- keep the covering power-of-two block).
MIN_DIVIDING_BLOCK_S = 8
# At most 16 tile elements per thread: the backward partial kernel keeps two float32
# accumulators per element, and at 32 per thread (4096 elements, 4 warps) the compile check saw
# 207 registers and 12% occupancy on sm_90; at 8 warps it stays near half of that.
ELEMS_PER_THREAD = 16
# Unaligned tensors (a 7x7 or 14x14 NCHW plane of half values: rows of 98 or 392 bytes) are
# moved with scalar accesses, one 64-bit address per element, in half-size tiles. Forward: 8 per
# thread (8 warps) -- at 4 (16 warps) too few loads were in flight and the statistics kernel was
# latency-bound in the performance model (42% of copy for 256x1024x14x14 fp16 on an H100, 58%
# at 8). Backward: 4 per thread -- at 8 the partial-sums kernel turned issue-bound on an H200
# (256x2048x7x7: 48% of copy against 54% at 4). The compile check sees no spills at either.
UNALIGNED_PER_THREAD = {"fwd_train": 8, "fwd_eval": 8, "bwd_train": 4, "bwd_eval": 4}
UNALIGNED_TILE = GPU_TILE // 2
# Partials an apply program merges itself (splits x channels per program): one round of parallel
# loads of at most 12 KB (3 float32 quantities) and a tree; more, and every program re-reading
# them (hundreds of splits for channels-last planes with few channels) costs more than one small
# merge launch beforehand (~2 us of GPU time).
MERGE_IN_APPLY = 1024
# Partials a merge program loads at once (splits x channels): 8 per thread and quantity over
# 4 warps, with two float32 accumulators each -- the closed-form merge's loop is a few
# multiply-adds per partial, so a channel block's 500 splits take a handful of iterations.
MERGE_TILE = 1024
# Below this many elements a launch costs more than the bytes, so one launch beats a full grid.
LAUNCH_BOUND_ELEMS = 1 << 20
# 64-bit offsets cost an extra multiply-add per address; only used when 32 bits can overflow.
INT32_LIMIT = 2**31 - 1


_forced: tuple | None = None   # the fields forced_plan imposes, as sorted items


@contextlib.contextmanager
def forced_plan(**fields):
    """Override plan fields (tests and tuning): e.g. ``forced_plan(variant="split", splits=3)``."""
    global _forced
    unknown = set(fields) - {f.name for f in dataclasses.fields(Plan)}
    if unknown:
        raise TypeError(f"forced_plan: unknown plan fields {sorted(unknown)}")
    previous, _forced = _forced, tuple(sorted(fields.items()))
    try:
        yield
    finally:
        _forced = previous


def forced_fields() -> dict:
    """The plan fields ``forced_plan`` imposes right now (empty outside it)."""
    return dict(_forced or ())


def make_plan(op: str, n: int, c: int, s: int, channels_minor: bool, elem_bytes: int,
              max_offset: int, device: DeviceInfo, aligned: bool = True,
              dtype: str | None = None, tuned: bool = True) -> Plan:
    """The plan for one op on a canonical (n, c, s) plane.

    ``aligned``: every activation pointer is 16-byte aligned and every non-unit stride a
    multiple of 16 bytes, so the compiler can vectorize; otherwise accesses are scalar.
    ``dtype`` (e.g. "bfloat16"): prefer tuning-table entries of that dtype (without it, any
    dtype of ``elem_bytes``). ``tuned=False``: the heuristic plan, ignoring the tuning table.
    """
    use_int64 = max_offset > INT32_LIMIT
    if tuned:
        plan = _planned(op, n, c, s, channels_minor, elem_bytes, use_int64, device, aligned,
                        dtype)
    else:
        plan = _make_plan(op, n, c, s, channels_minor, elem_bytes, use_int64, device, aligned)
    if _forced:
        plan = _apply_forced(plan, n, s, _forced)
    return plan


_generation = 0   # counts reload_tuning_table calls: plans made before are stale


def state() -> tuple:
    """What besides a call's own facts decides its plan: the device planned for, forced fields,
    the tuning table's generation. Callers that keep plans key them on this too."""
    return _device_override, _forced, _generation


def reload_tuning_table() -> None:
    """Re-read the tuning table on the next plan (after ``tritonbn tune`` wrote it, or after
    $TRITONBN_TUNING_TABLE changed) and forget the plans made from the old one."""
    global _generation
    _generation += 1
    tuning_table.clear_cache()
    _planned.cache_clear()


@functools.lru_cache(maxsize=4096)
def _planned(op: str, n: int, c: int, s: int, channels_minor: bool, elem_bytes: int,
             use_int64: bool, device: DeviceInfo, aligned: bool, dtype: str | None) -> Plan:
    """The tuned plan when the table has one that fits this plane, else the heuristic plan.
    Cached: the table is consulted once per distinct plane."""
    heuristic = _make_plan(op, n, c, s, channels_minor, elem_bytes, use_int64, device, aligned)
    hit = tuning_table.lookup(device.name, op, elem_bytes, dtype, channels_minor, aligned,
                              (n, c, s))
    if hit is None:
        return heuristic
    return _from_table(hit, heuristic, op, n, c, s, use_int64)


def _from_table(hit, heuristic: Plan, op: str, n: int, c: int, s: int, use_int64: bool) -> Plan:
    """The table's plan adapted to this plane, or the heuristic plan (saying why) when it cannot
    be: the kernels need power-of-two blocks, and a one-pass tile must cover the plane within
    the register budget of ONEPASS_MAX (the compile check's spill-free limit)."""
    p = hit.plan
    variant = p["variant"]
    # A nearest-bucket entry may come from a smaller plane: blocks larger than this plane only
    # add masked lanes, so they are clamped (to powers of two, as the kernels' aranges need).
    block_c = min(p["block_c"], pow2(c))
    if variant == "onepass":
        # One pass needs the whole plane in one tile: derive it from this plane's sizes.
        block_n, block_s, splits = pow2(n), pow2(s), 1
        limit = ONEPASS_MAX.get(op)
        if limit is None:
            why = f"{op} has no one-pass kernel"
        elif block_n * block_s * block_c > limit:
            why = f"a one-pass tile of {block_n}x{block_s}x{block_c} exceeds {limit} elements"
        else:
            why = None
        if why:
            return dataclasses.replace(
                heuristic, reason=f"{heuristic.reason} (tuned plan from {hit.path} not used: {why})")
    else:
        block_n, block_s, splits = min(p["block_n"], pow2(n)), min(p["block_s"], pow2(s)), p["splits"]
        tile = block_n * block_s * block_c
        per_thread = tile // (32 * p["num_warps"])
        if tile > MAX_TUNED_TILE:
            why = f"a split tile of {block_n}x{block_s}x{block_c} exceeds {MAX_TUNED_TILE} elements"
        elif per_thread > MAX_TUNED_PER_THREAD:
            why = (f"{per_thread} tile elements per thread exceed {MAX_TUNED_PER_THREAD} "
                   f"({p['num_warps']} warps)")
        else:
            why = None
        if why:
            return dataclasses.replace(
                heuristic, reason=f"{heuristic.reason} (tuned plan from {hit.path} not used: {why})")
    return Plan(variant, block_n, block_s, block_c, splits, p["num_warps"], use_int64,
                f"tuned ({hit.path}): {hit.describe()}")


@functools.lru_cache(maxsize=1024)  # tuning and the host benchmark force plans in loops
def _apply_forced(plan: Plan, n: int, s: int, forced: tuple) -> Plan:
    fields = dict(forced)
    if fields.get("variant") == "onepass" and plan.variant != "onepass":
        # A one-pass tile must cover the plane; derive its blocks unless they were given.
        fields.setdefault("block_n", pow2(n))
        fields.setdefault("block_s", pow2(s))
        fields.setdefault("splits", 1)
    forced = dataclasses.replace(plan, **fields, reason=plan.reason + " (forced)")
    if forced.variant == "onepass" and (forced.block_n < n or forced.block_s < s):
        raise ValueError(f"forced one-pass plan {forced} does not cover the plane ({n} x {s})")
    return forced


@functools.lru_cache(maxsize=4096)
def _make_plan(op: str, n: int, c: int, s: int, channels_minor: bool, elem_bytes: int,
               use_int64: bool, device: DeviceInfo, aligned: bool) -> Plan:
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; expected one of {OPS}")
    tile = INTERPRETER_TILE if device.interpreter else (GPU_TILE if aligned else UNALIGNED_TILE)
    if channels_minor:
        block_c = min(pow2(c), MAX_BLOCK_C)
    else:
        # Channel planes are separate streams (NCHW): one channel per program, positions vectorized.
        block_c = 1
    c_blocks = cdiv(c, block_c)

    onepass_max = ONEPASS_MAX.get(op)
    if onepass_max is not None:
        plane = pow2(n) * pow2(s)
        bc = block_c
        # Channels-last rows narrower than 8 channels turn into 2- and 4-byte gathers
        # (compile check: the one-pass backward at 1 channel per program moved half values
        # with 2-byte loads and used a stack frame), so stop halving at 8.
        min_bc = min(block_c, MIN_MINOR_BLOCK_C) if channels_minor else 1
        while bc > min_bc and plane * bc > onepass_max:
            bc //= 2  # fewer channels per program before giving up on one pass
        if plane * bc <= onepass_max:
            grid = cdiv(c, bc)
            fills = grid >= device.sm_count
            tiny = n * c * s <= LAUNCH_BOUND_ELEMS
            if fills or tiny:
                why = "plane fits one tile; " + ("grid fills the GPU" if fills else "launch-bound size")
                return Plan("onepass", pow2(n), pow2(s), bc, 1, _warps(plane * bc, aligned, op),
                            use_int64, why)

    # Split plan: tile the plane, spreading positions first (they are contiguous for NCHW and
    # strided by C for NHWC) and filling the rest of the tile with samples.
    rows = max(1, tile // block_c)
    block_s = min(pow2(s), rows)
    dividing = s & -s                   # the largest power of two that divides s
    if not channels_minor and MIN_DIVIDING_BLOCK_S <= dividing < block_s:
        # A block that divides the plane's rows wastes no lane: 112x112 = 256 x 49 takes
        # 256-wide blocks (not 16384-wide ones 77% full), 56x56 64-wide, 28x28 16-wide.
        block_s = dividing
    block_n = min(pow2(n), max(1, rows // block_s))
    n_tiles = cdiv(n, block_n) * cdiv(s, block_s)
    # Whole waves: floor, not ceiling -- cdiv(528, 64) = 9 splits gave 576 programs for 528
    # slots on an H100, a second wave 9% full (the performance model's tail-wave term).
    target = PROGRAMS_PER_SM * device.sm_count
    splits = max(1, min(n_tiles, target // c_blocks))
    why = f"plane of {n * s} needs {n_tiles} tiles; {splits} split(s) x {c_blocks} channel block(s)"
    return Plan("split", block_n, block_s, block_c, splits,
                _warps(block_n * block_s * block_c, aligned, op), use_int64, why)


def grid_tiles(plan: Plan, n: int, s: int) -> tuple[int, int, int, int]:
    """(tiles along S, tiles per plane, tiles per split, splits) for a split plan.

    Splits are recounted from the tiles each gets, so no program of the grid is empty.
    """
    n_tiles_s = cdiv(s, plan.block_s)
    n_tiles = cdiv(n, plan.block_n) * n_tiles_s
    if n_tiles == 0:  # an empty plane (a synchronized step's empty batch): one program, no tiles
        return n_tiles_s, 0, 0, 1
    per_split = cdiv(n_tiles, max(1, min(plan.splits, n_tiles)))
    return n_tiles_s, n_tiles, per_split, cdiv(n_tiles, per_split)
