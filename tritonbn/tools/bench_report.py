"""Benchmark output: the markdown table (with per-op geometric means and the project's speed targets),
JSON, CSV and a PNG plot, named by device and date under bench/results/."""
from __future__ import annotations

import csv
import json
import math
import os

from .timing import SMOKE_LABEL

__all__ = ["markdown", "summary", "targets", "write", "stem"]

PEER_ORDER = ("torch", "torch.compile", "apex-groupbn")
HALF = ("float16", "bfloat16")
# forward-eval is held to copy bandwidth only from 2 MB up: below that a launch costs more than
# the bytes (the target applies from 2 MB up).
EVAL_TARGET_MIN_BYTES = 2 * 1024 * 1024
TRAFFIC_EVAL = 2      # bench.TRAFFIC["fwd_eval"]: bytes counted = 2 x the tensor's bytes


def stem(meta: dict) -> str:
    tag = meta.get("tag")
    return f"bench_{meta['device_slug']}_{meta['date']}" + (f"_{tag}" if tag else "")


def _peers(rows) -> list[str]:
    seen = {r["impl"] for r in rows if r["impl"] != "tritonbn"}
    return [p for p in PEER_ORDER if p in seen] + sorted(seen - set(PEER_ORDER))


def geomean(values) -> float:
    values = [v for v in values if v and v > 0]
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else float("nan")


def summary(result: dict) -> list[dict]:
    """Per (op, dtype, layout) and peer: geometric-mean and smallest speedup of tritonbn, and
    tritonbn's mean percentage of copy bandwidth."""
    rows = result["rows"]
    out = []
    groups = sorted({(r["op"], r["dtype"], r["layout"]) for r in rows})
    for op, dtype, layout in groups:
        mine = [r for r in rows if (r["op"], r["dtype"], r["layout"]) == (op, dtype, layout)]
        ours = [r["pct_copy"] for r in mine if r["impl"] == "tritonbn" and "pct_copy" in r]
        entry = {"op": op, "dtype": dtype, "layout": layout,
                 "tritonbn_pct_copy_mean": round(sum(ours) / len(ours), 1) if ours else None}
        for peer in _peers(rows):
            sp = [r["tritonbn_speedup"] for r in mine if r["impl"] == peer and "tritonbn_speedup" in r]
            if sp:
                entry[f"vs_{peer}_geomean"] = round(geomean(sp), 3)
                entry[f"vs_{peer}_min"] = round(min(sp), 3)
        out.append(entry)
    return out


def targets(result: dict) -> list[tuple[str, str, bool | None]]:
    """The project's speed targets (H100/H200, float16 and bfloat16, both layouts): (target, measured,
    met). ``met`` is None when the run has no data for it."""
    rows = result["rows"]

    def speedups(op, peer):
        return [r["tritonbn_speedup"] for r in rows if r["op"] == op and r["impl"] == peer
                and r["dtype"] in HALF and "tritonbn_speedup" in r]

    out = []
    for op, peer, goal, floor in (("fwd_train", "torch", 1.3, 1.0), ("fwd_train", "torch.compile", 1.1, None),
                                  ("bwd", "torch", 1.3, None)):
        sp = speedups(op, peer)
        if not sp:
            out.append((f"{op} >= {goal}x {peer} (geomean)", "no data", None))
            continue
        g = geomean(sp)
        out.append((f"{op} >= {goal}x {peer} (geomean)", f"{g:.2f}x", g >= goal))
        if floor is not None:
            out.append((f"{op} never below {floor}x {peer}", f"min {min(sp):.2f}x", min(sp) >= floor))
    ev = [r["pct_copy"] for r in rows if r["op"] == "fwd_eval" and r["impl"] == "tritonbn"
          and r["dtype"] in HALF and "pct_copy" in r
          and r["bytes"] // TRAFFIC_EVAL >= EVAL_TARGET_MIN_BYTES]   # the tensor's own bytes
    out.append(("fwd_eval >= 90% of copy bandwidth at >= 2 MB",
                f"min {min(ev):.0f}%" if ev else "no data", (min(ev) >= 90) if ev else None))
    # "within 1.15x of the byte-model limit": time <= 1.15 x (minimum bytes / copy bandwidth)
    tr = [r["pct_copy"] for r in rows if r["op"] == "fwd_train" and r["impl"] == "tritonbn"
          and r["dtype"] in HALF and "pct_copy" in r]
    out.append(("fwd_train within 1.15x of the byte-model limit (>= 87% of copy)",
                f"min {min(tr):.0f}%" if tr else "no data", (min(tr) >= 100 / 1.15) if tr else None))
    host = result["meta"].get("host_overhead_us", {}).get("tritonbn")
    out.append(("host overhead of one small forward <= 30 us",
                f"{host} us" if host is not None else "no data",
                (host <= 30) if host is not None else None))
    return out


def _fmt(v, spec=".1f") -> str:
    return "-" if v is None else format(v, spec)


def markdown(result: dict) -> str:
    meta, rows = result["meta"], result["rows"]
    smoke = meta.get("smoke")
    peers = _peers(rows)
    lines = []
    if smoke:
        lines += [f"**{SMOKE_LABEL}**", ""]
    lines += [f"# tritonbn benchmark: {meta['device']}", "",
              f"{meta['date']}; torch {meta['torch']}, triton {meta['triton']}"
              + (f", driver {meta.get('driver')}, CUDA {meta.get('cuda')}, cuDNN {meta.get('cudnn')}"
                 f" (enabled: {meta.get('cudnn_enabled')})" if not smoke else "")
              + f"; torch.compile backend {meta['compile_backend']}. Timing: {meta['timing']}.",
              "",
              "Effective GB/s counts the minimum traffic of the byte model of docs/design.md "
              + ", ".join(f"{op}: {m}" for op, m in meta["traffic_model"].items())
              + f"; % copy compares with {meta['copy_model']} of the same tensor in the same run. "
              "Speedup: peer time / tritonbn time (> 1: tritonbn faster). "
              "torch backend: what torch's eager batch norm dispatched to (profiled aten ops).",
              ""]
    head = ["op", "shape", "layout", "dtype", "copy GB/s", "tritonbn us", "GB/s", "% copy"]
    for p in peers:
        head += [f"{p} us", f"speedup vs {p}"]
        if p == "torch":
            head.append("torch backend")
    lines += ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    keys = list(dict.fromkeys((r["op"], r["shape"], r["layout"], r["dtype"]) for r in rows))
    by = {(r["op"], r["shape"], r["layout"], r["dtype"], r["impl"]): r for r in rows}
    for key in keys:
        ours = by.get((*key, "tritonbn"), {})
        any_row = next(r for r in rows if (r["op"], r["shape"], r["layout"], r["dtype"]) == key)
        cells = [*key, _fmt(any_row.get("copy_gbps")), _fmt(ours.get("time_us")),
                 _fmt(ours.get("gbps")), _fmt(ours.get("pct_copy"))]
        for p in peers:
            r = by.get((*key, p), {})
            t = r.get("time_us")
            cells += [_fmt(t) if t is not None else ("skip" if "skipped" in r else
                                                     "error" if "error" in r else "-"),
                      _fmt(r.get("tritonbn_speedup"), ".2f") + ("x" if "tritonbn_speedup" in r else "")]
            if p == "torch":
                cells.append(r.get("torch_backend", "-"))
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    summ = summary(result)
    if summ:
        lines += ["", "Geometric-mean speedup of tritonbn over each peer (smallest in brackets):", "",
                  "| op | dtype | layout | tritonbn mean % copy | " + " | ".join(peers) + " |",
                  "|" + " --- |" * (4 + len(peers))]
        for s in summ:
            cells = [s["op"], s["dtype"], s["layout"], _fmt(s["tritonbn_pct_copy_mean"])]
            for p in peers:
                g = s.get(f"vs_{p}_geomean")
                cells.append("-" if g is None else f"{g:.2f}x ({s[f'vs_{p}_min']:.2f}x)")
            lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Targets (float16 and bfloat16, both layouts):", "",
              "| target | measured | met |", "| --- | --- | --- |"]
    for name, measured, met in targets(result):
        verdict = "n/a" if met is None else ("yes" if met else "**no**")
        if smoke:
            verdict = "n/a (smoke)"
        lines.append(f"| {name} | {measured} | {verdict} |")
    host = dict(meta.get("host_overhead_us") or {})
    shape = host.pop("shape", "?")
    if host:
        lines += ["", f"Host time per small training-forward call ({shape} float16): "
                  + ", ".join(f"{k} {v} us" for k, v in host.items())]
    errors = [r for r in rows if "error" in r]
    if errors:
        lines += ["", "Errors:", ""] + [f"- {r['impl']} {r['op']} {r['shape']} {r['layout']} "
                                        f"{r['dtype']}: {r['error']}" for r in errors]
    if smoke:
        lines += ["", f"**{SMOKE_LABEL}**"]
    return "\n".join(lines) + "\n"


def write(result: dict, out_dir: str, plot: bool = True) -> list[str]:
    """JSON (meta, rows, summary), CSV (rows), markdown, and a PNG when matplotlib is present."""
    os.makedirs(out_dir, exist_ok=True)
    meta, rows = result["meta"], result["rows"]
    base = os.path.join(out_dir, stem(meta))
    paths = [base + ".json", base + ".csv", base + ".md"]
    with open(paths[0], "w") as f:
        json.dump({"meta": meta, "rows": rows, "summary": summary(result),
                   "targets": [dict(target=t, measured=m, met=ok) for t, m, ok in targets(result)]},
                  f, indent=1)
    note = {"note": SMOKE_LABEL} if meta.get("smoke") else {}
    keys = list(dict.fromkeys(["note"] * bool(note) + [k for r in rows for k in r]))
    with open(paths[1], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows({**note, **r} for r in rows)
    with open(paths[2], "w") as f:
        f.write(markdown(result))
    if plot:
        png = _plot(result, base + ".png")
        if png:
            paths.append(png)
    return paths


def _plot(result: dict, path: str) -> str | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed (pip install 'tritonbn[plot]'): no PNG written")
        return None
    meta, rows = result["meta"], result["rows"]
    ops = list(dict.fromkeys(r["op"] for r in rows))
    impls = ["tritonbn"] + _peers(rows)
    fig, axes = plt.subplots(len(ops), 1, figsize=(12, 2.6 * len(ops) + 1), squeeze=False)
    for ax, op in zip(axes[:, 0], ops):
        cases = list(dict.fromkeys((r["shape"], r["layout"], r["dtype"]) for r in rows if r["op"] == op))
        for impl in impls:
            ys = []
            for case in cases:
                r = next((r for r in rows if r["op"] == op and r["impl"] == impl
                          and (r["shape"], r["layout"], r["dtype"]) == case), {})
                ys.append(r.get("pct_copy", float("nan")))
            ax.plot(range(len(cases)), ys, "o-" if impl == "tritonbn" else ".--", label=impl, lw=1)
        ax.axhline(100, color="grey", lw=0.5)
        ax.set_ylabel("% of copy GB/s", fontsize=8)
        ax.set_title(op, fontsize=9)
        ax.set_xticks(range(len(cases)))
        short = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}
        ax.set_xticklabels([f"{s} {'NHWC' if lay == 'channels_last' else 'NCHW'} {short.get(d, d)}"
                            for s, lay, d in cases], rotation=90, fontsize=6)
        ax.legend(fontsize=7)
    title = f"tritonbn vs peers on {meta['device']}, {meta['date']} (torch {meta['torch']}, triton {meta['triton']})"
    if meta.get("smoke"):
        title = SMOKE_LABEL + "\n" + title
    fig.suptitle(title, fontsize=9, color="red" if meta.get("smoke") else "black")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
