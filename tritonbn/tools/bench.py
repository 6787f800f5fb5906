"""``tritonbn bench`` (also ``python -m bench``): tritonbn against torch eager, torch.compile and
any other implementation found installed, for training forward, eval forward, backward and fused
BN+ReLU (forward and backward), NCHW and NHWC, float16/bfloat16/float32, over the project's
shape set (tritonbn/tools/shapes.py). Reports time, effective GB/s under the byte model of
docs/design.md, the percentage of a device copy of the same bytes measured in the same run, and
tritonbn's speedup over each peer; writes JSON, CSV, a markdown table and a PNG (tritonbn/tools/bench_report.py).

Without a GPU it runs in smoke mode: tiny shapes through the Triton interpreter, every output
labelled SMOKE MODE -- the timings mean nothing; the machinery is what is checked.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from . import shapes as shape_sets
from .shapes import DTYPES, LAYOUTS, in_layout
from .peers import available_peers, torch_backend
from .timing import (SMOKE_LABEL, machine_info, make_timer, require_kernels_runnable, run_device,
                     smoke_mode)

__all__ = ["OPS", "TRAFFIC", "effective_bytes", "run_bench", "host_overhead",
           "main"]

OPS = ("fwd_train", "fwd_eval", "bwd", "relu_fwd", "relu_bwd")

# Effective traffic per op in elements moved per activation element, times the element size s:
# the minimum traffic of docs/design.md's byte model (the channel slice stays on chip; parameters and per-channel
# statistics are negligible). GB/s = TRAFFIC[op] * s * E / time. A two-pass implementation moves
# more than this and so shows a lower effective GB/s -- which is the point of the measure.
TRAFFIC = {
    "fwd_train": 2,   # read x, write y
    "fwd_eval": 2,    # read x, write y
    "bwd": 3,         # read x and dy, write dx
    "relu_fwd": 2,    # relu(BN(x)) fused: read x, write y
    "relu_bwd": 3,    # read x and dy, write dx (the pre-activation is recomputed, not stored)
}
COPY_TRAFFIC = 2      # dst.copy_(x): read E elements, write E elements



def _sig(x: float, digits: int = 4) -> float:
    """x to a few significant digits: smoke-mode GB/s are tiny, and fixed decimals lose them."""
    return float(f"{x:.{digits}g}")

def effective_bytes(op: str, numel: int, elem_size: int) -> int:
    return TRAFFIC[op] * elem_size * numel


def _case_tensors(shape, dtype, layout, device, seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)
    x = in_layout(torch.randn(shape, generator=gen, device=device).to(DTYPES[dtype]), layout)
    dy = in_layout(torch.randn(shape, generator=gen, device=device).to(DTYPES[dtype]), layout)
    return x, dy


def _op_fn(peer, op: str, x: torch.Tensor, dy: torch.Tensor):
    """The callable to time for one op: forward calls, or autograd.grad on a retained graph."""
    c = x.shape[1]
    training = op != "fwd_eval"
    relu = op.startswith("relu")
    grad = op in ("fwd_train", "bwd", "relu_fwd", "relu_bwd")   # training runs under autograd
    # float32 parameters with half activations: the AMP case (torch's cuDNN path wants it too)
    w = torch.linspace(0.5, 1.5, c, device=x.device).requires_grad_(grad)
    b = torch.linspace(-0.5, 0.5, c, device=x.device).requires_grad_(grad)
    rm, rv = torch.zeros(c, device=x.device), torch.ones(c, device=x.device)  # the bench's own
    fn = peer.build(x, training, relu)
    xi = x.detach().requires_grad_(grad)
    if op in ("bwd", "relu_bwd"):
        y = fn(xi, w, b, rm, rv)
        inputs = [xi, w, b]
        return lambda: torch.autograd.grad(y, inputs, dy, retain_graph=True)
    if grad:
        return lambda: fn(xi, w, b, rm, rv)

    def infer():
        with torch.no_grad():
            return fn(xi, w, b, rm, rv)
    return infer


HOST_SHAPE = (32, 64, 8, 8)
SMOKE_HOST_SHAPE = (2, 4, 4, 4)   # the interpreter takes ~0.5 s for HOST_SHAPE


def host_overhead(peers, device: str, calls: int = 200) -> dict:
    """Wall time per small training-forward call, queued back to back then synchronized: on a GPU
    the kernels of a (32, 64, 8, 8) tensor take a few microseconds, so this is host time."""
    shape = HOST_SHAPE if device == "cuda" else SMOKE_HOST_SHAPE
    x, _ = _case_tensors(shape, "float16", "contiguous", device)
    out = {"shape": "x".join(map(str, shape))}
    for name in ("tritonbn", "torch"):
        if name not in peers:
            continue
        fn = _op_fn(peers[name], "fwd_train", x, x)
        n = calls if device == "cuda" else 3
        fn()
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        _sync(device)
        out[name] = round((time.perf_counter() - t0) / n * 1e6, 1)
    return out


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def run_bench(shapes, ops=OPS, dtypes=("float16", "bfloat16", "float32"), layouts=LAYOUTS,
              impls=None, timer=None, compile_backend: str | None = None, progress=None) -> dict:
    """Measure every (shape, layout, dtype) x op x implementation. Returns {"meta", "rows"}."""
    require_kernels_runnable()
    device = run_device()
    timer = timer or make_timer()
    compile_backend = compile_backend or ("aot_eager" if smoke_mode() else "inductor")
    peers = available_peers(compile_backend)
    if impls:
        unknown = set(impls) - set(peers)
        if unknown:
            raise ValueError(f"implementations not available here: {sorted(unknown)}; "
                             f"found {sorted(peers)}")
        peers = {k: v for k, v in peers.items() if k in impls}
    cases = [(tuple(s), lay, dt) for s in shapes for lay in layouts for dt in dtypes
             if lay == "contiguous" or len(s) in (4, 5)]
    rows: list[dict] = []
    backends = []
    for shape, layout, dtype in cases:
        x, dy = _case_tensors(shape, dtype, layout, device)
        elem, numel = x.element_size(), x.numel()
        dst = torch.empty_like(x)
        copy = timer(lambda: dst.copy_(x))
        copy_gbps = COPY_TRAFFIC * elem * numel / copy.median_s / 1e9
        used = {mode: torch_backend(x, mode == "train") for mode in ("train", "eval")}
        backends.append({"shape": list(shape), "layout": layout, "dtype": dtype, **{
            f"{mode}_{k}": v for mode, d in used.items() for k, v in d.items()}})
        base = dict(shape="x".join(map(str, shape)), layout=layout, dtype=dtype,
                    numel=numel, copy_us=round(copy.median_us, 2),
                    copy_gbps=_sig(copy_gbps))
        for name, peer in peers.items():
            why = peer.unsupported(x)
            for op in ops:
                row = dict(base, op=op, impl=name)
                if name == "torch":
                    row["torch_backend"] = used["eval" if op == "fwd_eval" else "train"]["backend"]
                if name == "torch.compile":
                    row["compile_backend"] = compile_backend
                if why:
                    row["skipped"] = why
                else:
                    try:
                        m = timer(_op_fn(peer, op, x, dy))
                        gbps = effective_bytes(op, numel, elem) / m.median_s / 1e9
                        row.update(time_us=round(m.median_us, 2), min_us=round(m.min_s * 1e6, 2),
                                   reps=m.reps, bytes=effective_bytes(op, numel, elem),
                                   gbps=_sig(gbps), pct_copy=_sig(100 * gbps / copy_gbps))
                    except Exception as e:  # a peer that refuses a case is a finding, not a crash
                        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
                rows.append(row)
                if progress is not None:
                    progress.update(f"{name} {op} {base['shape']} {layout} {dtype}")
            peer.reset()
        x = dy = dst = None    # free this case's tensors before the next is made
    _add_speedups(rows)
    meta = machine_info()
    meta.update(compile_backend=compile_backend, implementations=list(peers),
                torch_backends=backends, host_overhead_us=host_overhead(peers, device),
                traffic_model={op: f"{k} * s * E" for op, k in TRAFFIC.items()},
                copy_model=f"{COPY_TRAFFIC} * s * E (dst.copy_(x))",
                timing=("wall clock, interpreter" if smoke_mode() else
                        "CUDA events, median; L2 flushed by a 256 MB write before each rep"))
    return {"meta": meta, "rows": rows}


def _add_speedups(rows: list[dict]) -> None:
    """On each peer's row: tritonbn_speedup = peer time / tritonbn time (> 1: tritonbn faster)."""
    ours = {(r["shape"], r["layout"], r["dtype"], r["op"]): r["time_us"] for r in rows
            if r["impl"] == "tritonbn" and "time_us" in r}
    for r in rows:
        t = ours.get((r["shape"], r["layout"], r["dtype"], r["op"]))
        if r["impl"] != "tritonbn" and t and "time_us" in r:
            r["tritonbn_speedup"] = _sig(r["time_us"] / t)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tritonbn bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", action="append", default=[], metavar="N,C[,...]",
                   help="a shape (repeatable); default: --preset all")
    p.add_argument("--preset", action="append", default=[], choices=sorted(shape_sets.PRESETS))
    p.add_argument("--ops", default=",".join(OPS), help=f"comma-separated from {OPS}")
    p.add_argument("--dtypes", default=",".join(DTYPES))
    p.add_argument("--layouts", default=",".join(LAYOUTS))
    p.add_argument("--impls", help="comma-separated subset of tritonbn,torch,torch.compile,"
                                   "apex-groupbn (default: all found)")
    p.add_argument("--compile-backend", help="torch.compile backend (default inductor; smoke: "
                                             "aot_eager, since inductor on CPU needs minutes)")
    # triton.testing.do_bench uses 25 / 100 ms; half of that keeps the full suite within a few
    # short GPU runs and still gives >= 5 repetitions of the largest tensors.
    p.add_argument("--warmup-ms", type=float, default=10.0)
    p.add_argument("--rep-ms", type=float, default=50.0)
    p.add_argument("--out", default=os.path.join("bench", "results"))
    p.add_argument("--tag", help="appended to the file names (runs split over several calls "
                                 "on one day would otherwise overwrite each other)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    return p


def _items(text: str, allowed) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in items if t not in allowed]
    if bad or not items:
        raise SystemExit(f"tritonbn bench: {'unknown ' + str(bad) if bad else 'nothing chosen'}; "
                         f"choose from {list(allowed)}")
    return items


def main(argv=None) -> int:
    from . import bench_report as report
    from .progress import Progress

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    # a results folder that cannot be made should fail now, not after the measurements
    try:
        os.makedirs(args.out, exist_ok=True)
    except OSError as e:
        parser.error(f"--out {args.out}: {e}")
    if not os.access(args.out, os.W_OK):
        parser.error(f"--out {args.out}: not writable")
    try:
        shapes = [shape_sets.parse_shape(s) for s in args.shape]
    except ValueError as e:
        parser.error(str(e))
    for name in args.preset:
        shapes += shape_sets.preset_shapes(name)
    shapes = list(dict.fromkeys(shapes or shape_sets.BENCH_SHAPES))
    smoke = smoke_mode()
    if smoke:
        print(SMOKE_LABEL)
        shapes = list(dict.fromkeys(shape_sets.smoke_shape(s) for s in shapes))
    ops, dtypes = _items(args.ops, OPS), _items(args.dtypes, DTYPES)
    layouts = _items(args.layouts, LAYOUTS)
    impls = args.impls.split(",") if args.impls else None
    found = available_peers()
    if impls and set(impls) - set(found):
        parser.error(f"--impls: {sorted(set(impls) - set(found))} not available here; "
                     f"found {sorted(found)}")
    n_cases = sum(1 for s in shapes for lay in layouts for _ in dtypes
                  if lay == "contiguous" or len(s) in (4, 5))
    n_impls = len(impls) if impls else len(found)
    bar = Progress(n_cases * len(ops) * n_impls, "bench", enabled=not args.no_progress)
    result = run_bench(shapes, ops, dtypes, layouts, impls,
                       make_timer(args.warmup_ms, args.rep_ms), args.compile_backend, bar)
    if args.tag:
        result["meta"]["tag"] = "".join(ch if ch.isalnum() or ch in "-_" else "-" for ch in args.tag)
    print(report.markdown(result))
    try:
        paths = report.write(result, args.out, plot=not args.no_plot)
    except OSError as e:  # the table is printed above; say why the files are missing
        print(f"could not write the results to {args.out}: {e}", file=sys.stderr)
        return 1
    for path in paths:
        print(f"wrote {path}")
    if smoke:
        print(SMOKE_LABEL)
    return 0


if __name__ == "__main__":
    sys.exit(main())
