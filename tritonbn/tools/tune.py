"""``tritonbn tune``: sweep the plan space for shapes on this GPU and write the tuning table the
dispatcher reads (tritonbn/tuning_table.py).

For each (op, shape, dtype, layout) the sweep times the heuristic plan and candidates around it:
kernel variant (one-pass where the plane fits a tile, split otherwise), tile shape (BLOCK_N x
BLOCK_S x BLOCK_C), num_warps and split count. Each candidate runs through the real launchers
under ``planner.forced_plan`` on scratch tensors (the caller's running statistics are never
touched), its output is checked against the heuristic plan's (a mis-tiled plan is rejected, not
just timed), and it is timed with L2 flushed (tritonbn/timing.py). A candidate must beat the
heuristic by KEEP_HEURISTIC_MARGIN to replace it.

Not swept: ``num_stages``. The kernels' loops load activations that feed reductions and
element-wise math, not ``tl.dot``, which is what Triton's software pipeliner multi-buffers; and a
Plan has no stages field for the launchers to pass. Loads in flight come from the tile size and
warps instead, which are swept.

Without a GPU this runs in smoke mode: tiny shapes in the Triton interpreter, few candidates,
wall-clock timings that mean nothing (every output says so). It exercises the machinery only.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass, field

import torch

from .. import launch, plan as planner, tuning_table
from . import shapes as shape_sets
from .shapes import DTYPES, LAYOUTS, Problem, in_layout
from ..plan import DeviceInfo, Plan
from ..options import BackwardArgs, ForwardArgs, Options
from .progress import Progress
from .timing import SMOKE_LABEL, make_timer, require_kernels_runnable, run_device, smoke_mode

__all__ = ["Problem", "TuneResult", "problems_for", "candidates", "tune", "iter_tune",
           "tune_model",
           "write_table", "format_results", "main"]

OPS = planner.OPS
DEFAULT_OPS = ("fwd_train", "fwd_eval", "bwd_train")

# A candidate replaces the heuristic only when at least 3% faster: median GPU timings of the same
# kernel move by 1-2% run to run, and a plan switch made on noise changes nothing but churn.
KEEP_HEURISTIC_MARGIN = 0.97
# Split-kernel tiles (elements per loop iteration) tried around the heuristic's GPU_TILE (4096):
# half and double it; --thorough widens to 1024..16384.
TILES = (2048, 4096, 8192)
THOROUGH_TILES = (1024, 2048, 4096, 8192, 16384)
# Elements per thread (tile / (32 * num_warps)) tried: the heuristic uses 16; 8 leaves more
# registers per value, 32 (one-pass only) is the most the compile check saw spill-free.
PER_THREAD = (8, 16)
ONEPASS_PER_THREAD = (8, 16, 32)
THOROUGH_PER_THREAD = (4, 8, 16, 32)
# Split counts as multiples of the heuristic's (which aims at 4 programs per SM).
SPLIT_SCALES = (0.5, 1.0, 2.0)
THOROUGH_SPLIT_SCALES = (0.25, 0.5, 1.0, 2.0, 4.0)
# Channels per program for channels-last planes: the heuristic's width, half and double it
# (--thorough: every power of two from 8 to 128, i.e. up to 256-byte rows of half values).
MAX_SWEEP_BLOCK_C = 128
# Smoke mode: the interpreter takes ~0.1-0.3 s per candidate call on tiny shapes.
SMOKE_MAX_CANDIDATES = 3


def problems_for(shapes, ops=DEFAULT_OPS, dtypes=("float16",), layouts=LAYOUTS) -> list[Problem]:
    """Every (op, shape, dtype, layout) asked for; channels_last only for 4-D and 5-D shapes
    (torch has no channels-last format for other ranks; a 2-D (N, C) input is channels-minor
    already)."""
    out: list[Problem] = []
    for shape in shapes:
        for layout in layouts:
            if layout == "channels_last" and len(shape) not in (4, 5):
                continue
            for dtype in dtypes:
                for op in ops:
                    p = Problem(op, tuple(shape), dtype, layout)
                    if p not in out:
                        out.append(p)
    return out


def plan_fields(plan: Plan) -> dict:
    return {k: getattr(plan, k) for k in tuning_table.PLAN_FIELDS}


def _short(p: dict) -> str:
    return (f"{p['variant']} n{p['block_n']} s{p['block_s']} c{p['block_c']} "
            f"x{p['splits']} w{p['num_warps']}")


def _warps(tile: int, per_thread) -> list[int]:
    """The num_warps (powers of two, 1..16) that give a tile each per-thread element count;
    empty for tiles too small for any (the caller then keeps one default)."""
    warps = {tile // (32 * k) for k in per_thread}
    return sorted(w for w in warps if 1 <= w <= 16 and w & (w - 1) == 0)


def candidates(op: str, n: int, c: int, s: int, channels_minor: bool, heuristic: Plan,
               device: DeviceInfo, thorough: bool = False) -> list[dict]:
    """Plan fields to try, the heuristic plan first; distinct launches only (split counts that
    give the same tiles per program are one candidate)."""
    pow2 = planner.pow2
    if channels_minor:
        top = min(pow2(c), MAX_SWEEP_BLOCK_C)
        low = min(top, planner.MIN_MINOR_BLOCK_C)
        widths = [w for w in (low << i for i in range(8)) if w <= top]
        if not thorough:
            widths = [w for w in widths if heuristic.block_c // 2 <= w <= heuristic.block_c * 2]
    else:
        widths = [1]  # NCHW: channel planes are separate streams, one channel per program
    tiles = THOROUGH_TILES if thorough else TILES
    scales = THOROUGH_SPLIT_SCALES if thorough else SPLIT_SCALES
    per_thread = THOROUGH_PER_THREAD if thorough else PER_THREAD
    target = planner.PROGRAMS_PER_SM * device.sm_count

    out: list[dict] = [plan_fields(heuristic)]
    seen = {launch_key(out[0], n, s)}

    def add(p: dict) -> None:
        key = launch_key(p, n, s)
        if key not in seen:
            seen.add(key)
            out.append(p)

    if op in planner.ONEPASS_MAX:
        plane = pow2(n) * pow2(s)
        for bc in widths:
            tile = plane * bc
            if tile > planner.ONEPASS_MAX[op]:
                continue
            for w in _warps(tile, THOROUGH_PER_THREAD if thorough else ONEPASS_PER_THREAD) or [4]:
                add(dict(variant="onepass", block_n=pow2(n), block_s=pow2(s), block_c=bc,
                         splits=1, num_warps=w))
    for bc in widths:
        c_blocks = planner.cdiv(c, bc)
        for tile in tiles:
            rows = max(1, tile // bc)
            bs = min(pow2(s), rows)
            bn = min(pow2(n), max(1, rows // bs))
            n_tiles = planner.cdiv(n, bn) * planner.cdiv(s, bs)
            base = planner.cdiv(target, c_blocks)
            for scale in scales:
                splits = max(1, min(n_tiles, round(base * scale)))
                for w in _warps(bn * bs * bc, per_thread) or [heuristic.num_warps]:
                    add(dict(variant="split", block_n=bn, block_s=bs, block_c=bc, splits=splits,
                             num_warps=w))
    return out


def launch_key(p: dict, n: int, s: int) -> tuple:
    if p["variant"] == "onepass":
        return ("onepass", p["block_c"], p["num_warps"])
    plan = Plan("split", p["block_n"], p["block_s"], p["block_c"], p["splits"], p["num_warps"],
                False, "")
    return ("split", p["block_n"], p["block_s"], p["block_c"], p["num_warps"],
            planner.grid_tiles(plan, n, s)[3])


def _spread(cands: list[dict], limit: int | None) -> list[dict]:
    """The heuristic plus ``limit - 1`` candidates spread evenly over the rest."""
    if limit is None or len(cands) <= limit:
        return cands
    rest = cands[1:]
    step = len(rest) / max(1, limit - 1)
    return [cands[0]] + [rest[int(i * step)] for i in range(limit - 1)]


class Workload:
    """Scratch tensors for one problem and the launcher call that runs its op."""

    def __init__(self, problem: Problem, device: str, seed: int = 0):
        self.problem = problem
        dtype = DTYPES[problem.dtype]
        gen = torch.Generator(device=device).manual_seed(seed)
        rand = lambda: in_layout(torch.randn(problem.shape, generator=gen, device=device)  # noqa: E731
                               .mul_(2).add_(0.5).to(dtype), problem.layout)
        n, c = problem.shape[0], problem.shape[1]
        # x drifts from -2 to 2 along each channel's (N, S) plane: every tile holds other values,
        # so a candidate that skips or repeats a tile moves the statistics it is checked on
        # (with i.i.d. values a missing tile of hundreds hides inside the rounding tolerance).
        plane = n * math.prod(problem.shape[2:])
        ramp = torch.linspace(-2, 2, plane, device=device).reshape(n, 1, *problem.shape[2:])
        self.x = in_layout((torch.randn(problem.shape, generator=gen, device=device) * 2 + 0.5
                          + ramp).to(dtype), problem.layout)
        # float32 parameters with half activations: the AMP case, as the compile check plans
        self.w = torch.linspace(0.5, 1.5, c, device=device)
        self.b = torch.linspace(-0.5, 0.5, c, device=device)
        # scratch running statistics: the sweep updates these and nothing else
        self.rm = torch.zeros(c, device=device)
        self.rv = torch.ones(c, device=device)
        self.planned = launch.plan_for(problem.op, self.x, tuned=False)
        self.options = Options(training=problem.op.endswith("train"))
        if problem.op.startswith("bwd"):
            _, self.mean, self.invstd, self.rd = launch.forward(
                ForwardArgs(self.x, self.w, self.b, None, self.rm.clone(), self.rv.clone()),
                self.options)[:4]
            self.dy = rand()

    def run(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The op's outputs worth checking: (y, save_mean, save_invstd) forward,
        (grad_input, grad_weight, grad_bias) backward."""
        if self.problem.op.startswith("fwd"):
            return launch.forward(ForwardArgs(self.x, self.w, self.b, None, self.rm, self.rv),
                                  self.options)[:3]
        return launch.backward(BackwardArgs(self.dy, self.x, self.w, self.b, None, self.mean,
                                            self.invstd, self.rd), self.options, True)[:3]


def _tolerance(ref: torch.Tensor) -> float:
    """Outputs of two valid plans differ by rounding only (another reduction order changes
    float32 statistics and sums in the 6th-7th digit): a few ulps of the output's dtype, 1e-4
    relative at least. A mis-tiled plan (a tile missed or doubled) moves the statistics of the
    ramped input by about 1/tiles of its range and the parameter gradients by a tile's share."""
    eps = torch.finfo(ref.dtype).eps
    scale = max(1.0, float(ref.detach().abs().max().float()))
    return max(4 * eps, 1e-4) * scale


def check_outputs(op: str, outs, refs) -> None:
    names = (("y", "save_mean", "save_invstd") if op.startswith("fwd")
             else ("grad_input", "grad_weight", "grad_bias"))
    for name, out, ref in zip(names, outs, refs):
        err = float((out.float() - ref.float()).abs().max()) if ref.numel() else 0.0
        if not err <= _tolerance(ref):
            raise AssertionError(f"{name} differs from the heuristic plan's by {err:.3g}")


@dataclass
class TuneResult:
    problem: Problem
    device: DeviceInfo
    plane: tuple[int, int, int]
    channels_minor: bool
    aligned: bool
    heuristic: dict
    heuristic_s: float
    best: dict
    best_s: float
    tried: int
    smoke: bool
    failures: list = field(default_factory=list)

    @property
    def speedup(self) -> float:
        return self.heuristic_s / self.best_s if self.best_s > 0 else float("nan")

    def entry(self) -> dict:
        """The tuning-table entry (see tritonbn/tuning_table.py)."""
        n, c, s = self.plane
        e = {"gpu": self.device.name, "triton": tuning_table.triton_version(),
             "op": self.problem.op, "dtype": self.problem.dtype,
             "layout": tuning_table.layout_key(self.channels_minor), "aligned": self.aligned,
             "bucket": list(tuning_table.bucket(n, c, s)), "plan": dict(self.best),
             "shape": list(self.problem.shape), "memory_format": self.problem.layout,
             "plane": [n, c, s], "time_us": round(self.best_s * 1e6, 2),
             "heuristic_us": round(self.heuristic_s * 1e6, 2),
             "heuristic_plan": dict(self.heuristic), "candidates": self.tried,
             "capability": list(self.device.capability), "sm_count": self.device.sm_count,
             "torch": torch.__version__, "tuned_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
             "smoke": self.smoke}
        if self.smoke:
            e["note"] = SMOKE_LABEL
        return e


def tune_problem(problem: Problem, timer, device: str, max_candidates: int | None = None,
                 thorough: bool = False, progress: Progress | None = None) -> TuneResult:
    work = Workload(problem, device)
    info = planner.device_info(work.x.device)
    v, heuristic, aligned = work.planned
    cands = _spread(candidates(problem.op, v.n, v.c, v.s, v.channels_minor, heuristic, info,
                               thorough), max_candidates)
    ref, timings, failures = None, [], []
    for i, fields in enumerate(cands):
        try:
            with planner.forced_plan(**fields):
                outs = work.run()
                if ref is None:  # the heuristic plan's outputs: the yardstick
                    ref = tuple(o.detach().clone() for o in outs)
                else:
                    check_outputs(problem.op, outs, ref)
                m = timer(work.run, warm=False)
            timings.append((m.median_s, i, fields))
        except Exception as e:  # a plan that fails to compile or run is a finding, not a crash
            failures.append(f"{_short(fields)}: {type(e).__name__}: {str(e).splitlines()[0][:160]}")
        if progress is not None:
            progress.update(problem.name)
    if not timings:
        raise RuntimeError(f"{problem.name}: every candidate failed: {failures[:3]}")
    h = [t for t in timings if t[1] == 0]
    best_s, _, best = min(timings, key=lambda t: (t[0], t[1]))
    if h and best_s > KEEP_HEURISTIC_MARGIN * h[0][0]:
        best_s, best = h[0][0], h[0][2]
    heuristic_s = h[0][0] if h else float("nan")
    return TuneResult(problem, info, (v.n, v.c, v.s), v.channels_minor, aligned,
                      plan_fields(heuristic), heuristic_s, best, best_s, len(cands),
                      getattr(timer, "smoke", False), failures)


def tune(problems: list[Problem], *, timer=None, max_candidates: int | None = None,
         thorough: bool = False, show_progress: bool = True, stream=None,
         on_error=None) -> list[TuneResult]:
    """Sweep each problem; returns one result per problem (the table is written separately).

    ``on_error(problem, exception)``: when given, a problem that cannot be tuned at all (every
    candidate failed, out of memory) is reported to it and the sweep goes on; otherwise the
    exception propagates."""
    return list(iter_tune(problems, timer=timer, max_candidates=max_candidates,
                          thorough=thorough, show_progress=show_progress, stream=stream,
                          on_error=on_error))


def iter_tune(problems: list[Problem], *, timer=None, max_candidates: int | None = None,
              thorough: bool = False, show_progress: bool = True, stream=None, on_error=None):
    """tune(), one result at a time (the CLI keeps what finished when it is interrupted)."""
    require_kernels_runnable()
    device = run_device()
    timer = timer or make_timer()
    if max_candidates is None and smoke_mode():
        max_candidates = SMOKE_MAX_CANDIDATES
    # The bar's total is an estimate until each problem's candidates are known: count them first
    # (cheap: plans and a plane view, no kernels).
    total = 0
    for p in problems:
        total += min(_count(p, device, thorough), max_candidates or 10**9)
    bar = Progress(total, "tune", stream=stream, enabled=show_progress)
    for p in problems:
        try:
            yield tune_problem(p, timer, device, max_candidates, thorough, bar)
        except Exception as e:
            if on_error is None:
                raise
            on_error(p, e)


def _count(problem: Problem, device: str, thorough: bool) -> int:
    x = in_layout(torch.empty(problem.shape, dtype=DTYPES[problem.dtype], device="meta"),
                problem.layout)
    info = planner.device_info(torch.device(device))
    v, h, _ = launch.plan_for(problem.op, x, tuned=False, device=torch.device(device))
    return len(candidates(problem.op, v.n, v.c, v.s, v.channels_minor, h, info, thorough))


def tune_model(model: torch.nn.Module, input_shape, ops=DEFAULT_OPS, dtypes=("float16",),
               layouts=LAYOUTS, **kwargs) -> list[TuneResult]:
    """Tune the shapes the model's batch-norm layers see for ``input_shape``. The model itself
    is only traced on a meta-device copy: its parameters, running statistics and mode stay."""
    found = shape_sets.shapes_from_model(model, tuple(input_shape))
    return tune(problems_for([s for s, _ in found], ops, dtypes, layouts), **kwargs)


def write_table(results: list[TuneResult], path: str) -> tuning_table.Table:
    table = tuning_table.merge_write(path, [r.entry() for r in results])
    planner.reload_tuning_table()
    return table


def format_results(results: list[TuneResult]) -> str:
    head = (f"{'op':9} {'shape':18} {'dtype':8} {'layout':13} {'heuristic plan':32} "
            f"{'us':>9} {'best plan':32} {'us':>9} {'speedup':>7} {'tried':>5}")
    lines = [head, "-" * len(head)]
    for r in results:
        p = r.problem
        lines.append(f"{p.op:9} {'x'.join(map(str, p.shape)):18} {p.dtype:8} {p.layout:13} "
                     f"{_short(r.heuristic):32} {r.heuristic_s * 1e6:9.1f} {_short(r.best):32} "
                     f"{r.best_s * 1e6:9.1f} {r.speedup:6.2f}x {r.tried:5d}")
        for f in r.failures[:3]:
            lines.append(f"    rejected {f}")
    return "\n".join(lines)


def _split(text: str, allowed) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if items == ["all"]:
        return list(allowed)
    bad = [t for t in items if t not in allowed]
    if bad or not items:
        raise SystemExit(f"tritonbn tune: {'unknown ' + str(bad) if bad else 'nothing chosen'}; "
                         f"choose from {list(allowed)}")
    return items


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tritonbn tune", description=__doc__.split("\n\n")[0],
        epilog="Without a GPU: smoke mode (tiny shapes in the Triton interpreter; timings mean "
               "nothing). The dispatcher reads $TRITONBN_TUNING_TABLE or "
               "$XDG_CACHE_HOME/tritonbn/tuning.json.")
    src = p.add_argument_group("shapes (any mix; default: --preset all)")
    src.add_argument("--shape", action="append", default=[], metavar="N,C[,...]",
                     help="an input shape, e.g. 256,64,112,112 (repeatable)")
    src.add_argument("--preset", action="append", default=[],
                     choices=sorted(shape_sets.PRESETS), help="a shape set (repeatable)")
    src.add_argument("--model", metavar="MODULE:CALLABLE",
                     help="a no-argument callable returning an nn.Module, or (module, input "
                          "shape); the shapes its batch norms see are tuned (traced on a meta "
                          "copy: nothing runs, the model is not changed)")
    src.add_argument("--input-shape", metavar="N,C,H,W",
                     help="the model's input shape (required unless the callable returns one)")
    p.add_argument("--ops", default=",".join(DEFAULT_OPS), help=f"comma-separated from {OPS}, or all")
    p.add_argument("--dtypes", default="float16",
                   help="comma-separated from float16,bfloat16,float32, or all. The launchers "
                        "give the dispatcher the element size only, so float16 and bfloat16 "
                        "entries serve both (float16's where both exist)")
    p.add_argument("--layouts", default=",".join(LAYOUTS), help="contiguous,channels_last")
    p.add_argument("--table", help="tuning table to merge into (default: the dispatcher's table; "
                                   "in smoke mode tuning-smoke.json next to it)")
    p.add_argument("--no-write", action="store_true", help="print the results only")
    p.add_argument("--max-candidates", type=int,
                   help=f"plans per problem, the heuristic included (default: all; smoke: "
                        f"{SMOKE_MAX_CANDIDATES})")
    p.add_argument("--thorough", action="store_true",
                   help="a wider sweep: tiles 1024..16384, 4..32 elements per thread, "
                        "split scales 0.25..4, channel blocks 8..128")
    p.add_argument("--warmup-ms", type=float, default=10.0)
    p.add_argument("--rep-ms", type=float, default=40.0, help="time per candidate measurement")
    p.add_argument("--no-progress", action="store_true")
    return p


def collect_shapes(args, parser) -> list[tuple[int, ...]]:
    shapes: list[tuple[int, ...]] = []
    try:
        shapes += [shape_sets.parse_shape(s) for s in args.shape]
        for name in args.preset:
            shapes += shape_sets.preset_shapes(name)
    except ValueError as e:
        parser.error(str(e))
    if args.input_shape and not args.model:
        parser.error("--input-shape is the input of --model; give --model too")
    if args.model:
        try:
            factory = shape_sets.load_model_factory(args.model)
            built = factory()
        except Exception as e:  # the user's code: say what went wrong without a traceback
            parser.error(f"--model {args.model}: {type(e).__name__}: {e}")
        model, input_shape = (built if isinstance(built, tuple) else (built, None))
        if not isinstance(model, torch.nn.Module):
            parser.error(f"--model {args.model}: returned a {type(model).__name__}, not an "
                         f"nn.Module (or an (nn.Module, input shape) pair)")
        try:
            if args.input_shape:
                input_shape = shape_sets.parse_shape(args.input_shape)
        except ValueError as e:
            parser.error(f"--input-shape: {e}")
        if input_shape is None:
            parser.error("--model: the callable returned no input shape; give --input-shape")
        input_shape = tuple(input_shape.shape if isinstance(input_shape, torch.Tensor)
                            else input_shape)
        try:
            found = shape_sets.shapes_from_model(model, input_shape)
        except Exception as e:
            parser.error(f"--model {args.model} on input {input_shape}: the forward pass "
                         f"failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
        print(f"{args.model}: {sum(k for _, k in found)} batch-norm calls, "
              f"{len(found)} distinct input shapes")
        shapes += [s for s, _ in found]
    if not (args.shape or args.preset or args.model):
        shapes = shape_sets.preset_shapes("all")
    return list(dict.fromkeys(shapes))


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.max_candidates is not None and args.max_candidates < 1:
        parser.error("--max-candidates must be at least 1 (the heuristic plan)")
    smoke = smoke_mode()
    if not args.no_write:
        try:
            tuning_table.check_target(args.table or tuning_table.default_path(smoke=smoke))
        except tuning_table.TableError as e:
            parser.error(f"--table: {e}")
    shapes = collect_shapes(args, parser)
    if smoke:
        print(SMOKE_LABEL)
        small = list(dict.fromkeys(shape_sets.smoke_shape(s) for s in shapes))
        if small != shapes:
            print(f"smoke mode: {len(shapes)} shapes shrunk to {len(small)} tiny ones "
                  f"(the interpreter runs ~1 M elements/s)")
        shapes = small
    problems = problems_for(shapes, _split(args.ops, OPS), _split(args.dtypes, DTYPES),
                            _split(args.layouts, LAYOUTS))
    timer = make_timer(args.warmup_ms, args.rep_ms)
    info = planner.device_info(torch.device(run_device()))
    print(f"tuning {len(problems)} problems on {info.name} ({info.sm_count} SMs), "
          f"triton {tuning_table.triton_version()}, torch {torch.__version__}")
    failed: list[str] = []

    def report(problem, e):
        failed.append(f"{problem.name}: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
        print(f"\ncould not tune {failed[-1]}", file=sys.stderr)

    results: list[TuneResult] = []
    interrupted = False
    try:
        for r in iter_tune(problems, timer=timer, max_candidates=args.max_candidates,
                           thorough=args.thorough, show_progress=not args.no_progress,
                           on_error=report):
            results.append(r)
    except KeyboardInterrupt:  # keep the problems that finished: a sweep can take hours
        interrupted = True
        print(f"\ninterrupted after {len(results)} of {len(problems)} problems; keeping "
              f"those", file=sys.stderr)
    print(format_results(results))
    if results:
        gm = math.exp(sum(math.log(r.speedup) for r in results) / len(results))
        print(f"geometric-mean speedup of the tuned plans over the heuristics: {gm:.3f}x")
    status = 130 if interrupted else (1 if failed else 0)
    if failed:
        print(f"{len(failed)} problems could not be tuned:\n  " + "\n  ".join(failed),
              file=sys.stderr)
    if not args.no_write and results:
        path = args.table or tuning_table.default_path(smoke=smoke)
        try:
            table = write_table(results, path)
        except (OSError, tuning_table.TableError) as e:
            # the sweep's results are printed above; say why none were kept
            print(f"could not write the tuning table {path}: {e}", file=sys.stderr)
            status = 1
        else:
            print(f"wrote {len(results)} entries to {path} ({len(table.entries)} in the table)")
            if smoke and not args.table:
                print(f"(smoke tables are not read by the dispatcher unless "
                      f"{tuning_table.ENV}={path} is set)")
    if smoke:
        print(SMOKE_LABEL)
    return status


if __name__ == "__main__":
    sys.exit(main())
