"""Compile every kernel plan for real GPUs without one, and read what the compiler reports.

``python -m bench.compile_check [--subset ci|full|tuned] [--targets sm90,sm80]`` from the
repository root; the test suite runs ``--subset ci`` (tests/bench/test_compile_check.py).

The interpreter proves numbers, not GPU code. This check runs the launchers on meta tensors
for a grid of shapes x dtypes x layouts x ops with the dispatcher planning for an H100 (sm_90a)
or an A100 (sm_80), captures the launches they would make, specializes each exactly as a real
launch would (Triton's own specialization of every argument: ints equal to 1 become constants,
multiples of 16 and 16-byte-aligned pointers get divisibility hints), compiles each distinct
specialization with ``triton.compile`` for that target, and reads the cubin with the
``cuobjdump`` / ``nvdisasm`` that ship in the triton wheel: registers, stack, local memory
(spills), shared memory, occupancy per SM, and the widths of global loads and stores in SASS.

Plans from the tuning table (``tritonbn tune``) for GPUs of a target's architecture are compiled
as well, on the shapes they were tuned for (``tuned_problems``).

A plan fails when it does not compile, spills to local memory, needs more shared memory than
the target has, or -- for float16/bfloat16 activations whose addresses allow it -- moves
activations with global accesses narrower than 8 bytes.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import datetime
import inspect
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

import torch

from tritonbn import launch, plan as planner
from tritonbn.options import BackwardArgs, ForwardArgs, Options
from tritonbn.plan import DeviceInfo
from tritonbn.tools.shapes import BENCH_SHAPES, DTYPES, Problem

__all__ = ["TARGETS", "Problem", "problems", "tuned_problems", "capture", "specialize",
           "compile_and_inspect", "run_check", "main", "parse_sass", "sass_loops", "ttir_accesses"]


@dataclass(frozen=True)
class Target:
    name: str
    arch: int                 # compute capability as an integer: 90, 80
    device: DeviceInfo        # what the dispatcher plans for
    max_regs_per_sm: int = 65536
    max_threads_per_sm: int = 2048
    max_blocks_per_sm: int = 32
    max_warps_per_sm: int = 64
    shared_per_sm: int = 228 * 1024
    shared_per_block: int = 227 * 1024


TARGETS = {
    "sm90": Target("sm_90a (H100/H200)", 90,
                   DeviceInfo("NVIDIA H100 (planned)", 132, (9, 0), False)),
    "sm80": Target("sm_80 (A100)", 80, DeviceInfo("NVIDIA A100 (planned)", 108, (8, 0), False),
                   shared_per_sm=164 * 1024, shared_per_block=163 * 1024),
}

# The planner's ops, and the eval backward without parameter gradients (one element-wise pass).
OPS = planner.OPS + ("bwd_eval_dx",)


# What is fused around the normalization (a Problem's epilogue): the kernels specialize on it.
EPILOGUES = {
    "plain": Options(),
    "silu+res": Options(activation="silu"),                   # residual add, then SiLU
    "gelu+renorm": Options(activation="gelu", renorm=(3.0, 5.0)),
    # overflow guards: saturating stores, fused counters (atomics), skipped non-finite channels
    # counted per channel (momentum=None)
    "guards": Options(momentum=None, saturate=True, skip_nonfinite=True),
    # in-place activated batch norm: the backward reads y and inverts ELU (log, division by
    # gamma) before the usual sums, with the residual
    "abn+res": Options(activation="elu", negative_slope=1.0, invertible=True),
}


# The CI subset: one shape per dispatcher regime (NCHW large plane, NCHW 7x7, channels-last
# via 4-D and 5-D, 1-D rows, few channels with large images, pooled features: one-pass).
CI_SHAPES = [(256, 64, 112, 112), (256, 2048, 7, 7), (4096, 1024), (16, 32, 256, 256),
             (256, 1024, 1, 1),
             (8, 64, 16, 56, 56)]
# In-place ABN's backward in CI: a split plan (NCHW large plane) and a one-pass one (pooled
# features), each layout; the full set has it on every shape.
ABN_CI_SHAPES = [(256, 64, 112, 112), (256, 1024, 1, 1)]
# The shapes the project benchmarks (shapes.BENCH_SHAPES) and a sweep that reaches every branch of the dispatcher: every channel block width,
# one-pass and split, unaligned channel counts and spatial sizes, tiny and huge planes.
SWEEP_SHAPES = [(n, c, s, s) for n in (1, 256) for c in (1, 3, 8, 32, 70, 2048)
                for s in (1, 7, 112)]


def problems(subset: str = "full") -> list[Problem]:
    """The (op, shape, dtype, layout) grid; "ci" is CI_SHAPES in half precision only; "tuned"
    is none of them (only the tuning table's plans, added by collect_specs)."""
    if subset == "tuned":
        return []
    shapes = CI_SHAPES if subset == "ci" else BENCH_SHAPES + SWEEP_SHAPES
    dtypes = ["float16", "bfloat16"] if subset == "ci" else list(DTYPES)
    out = []
    for shape in shapes:
        layouts = ["contiguous"] + (["channels_last"] if len(shape) in (4, 5) else [])
        for layout in layouts:
            for dtype in dtypes:
                for op in OPS:
                    out.append(Problem(op, shape, dtype, layout))
                # fused epilogues change the kernels' loads and registers: check them too
                # (in CI for one half dtype; in full for every dtype, renorm included)
                if subset == "full" or dtype == "float16":
                    for op in ("fwd_train", "bwd_train"):
                        out.append(Problem(op, shape, dtype, layout, "silu+res"))
                        out.append(Problem(op, shape, dtype, layout, "guards"))
                        if subset == "full" or (op == "bwd_train" and shape in ABN_CI_SHAPES):
                            out.append(Problem(op, shape, dtype, layout, "abn+res"))
                        if subset == "full":
                            out.append(Problem(op, shape, dtype, layout, "gelu+renorm"))
    return out


def _meta(shape, dtype, layout, aligned=True):
    x = torch.empty(shape, dtype=dtype, device="meta")
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last if len(shape) == 4 else torch.channels_last_3d)
    if not aligned:  # the same strides one element into a buffer: a pointer off 16-byte alignment
        buf = torch.empty(x.numel() + 1, dtype=dtype, device="meta")
        x = buf.as_strided(x.shape, x.stride(), 1)
    return x


def capture(problem: Problem, target: Target, aligned: bool = True) -> list[tuple]:
    """The launches a real call would make for this problem on this target, on meta tensors
    (whose data_ptr is their storage offset: ``aligned=False`` shifts the input by one element)."""
    dtype = DTYPES[problem.dtype]
    x = _meta(problem.shape, dtype, problem.layout, aligned)
    c = problem.shape[1]
    p32 = lambda: torch.empty(c, device="meta")  # noqa: E731 - float32 parameters (the AMP case)
    training = problem.op in ("fwd_train", "bwd_train")
    o = dataclasses.replace(EPILOGUES[problem.epilogue], training=training)
    res = _meta(problem.shape, dtype, problem.layout) if o.activation or o.invertible else None
    with planner.planning_for(target.device), launch.capture_launches() as launches:
        if problem.op.startswith("fwd"):
            guarded = problem.epilogue == "guards"
            counts = lambda: torch.empty(c, dtype=torch.int64, device="meta")  # noqa: E731
            launch.forward(ForwardArgs(x, p32(), p32(), res, p32(), p32(), None,
                                       counts() if guarded else None,
                                       counts() if guarded else None,
                                       p32() if guarded else None), o)
        else:
            stats = torch.empty(c, device="meta")
            rd = torch.empty((2, c) if o.renorming else (0,), device="meta")
            dy = _meta(problem.shape, dtype, problem.layout, aligned)
            launch.backward(BackwardArgs(dy, x, p32(), p32(), res, stats, stats, rd), o,
                            problem.op != "bwd_eval_dx")
    return launches


def _arg_spec(value):
    """Triton's own specialization of one runtime argument: (type, hint)."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    return native_specialize_impl(BaseBackend, value, False, True, True)


@dataclass(frozen=True)
class Spec:
    kernel: str
    signature: tuple[tuple[str, str], ...]       # (arg, type or "constexpr")
    constexprs: tuple[tuple[str, object], ...]
    divisible: tuple[str, ...]                   # args with a divisibility-by-16 hint
    num_warps: int

    def constexpr(self, name):
        return dict(self.constexprs).get(name)


def _kernel_params(kernel) -> list[tuple[str, bool]]:
    """(name, is_constexpr) of each kernel argument; works for jitted and interpreted kernels."""
    import triton.language as tl
    return [(p.name, p.annotation is tl.constexpr)
            for p in inspect.signature(kernel.fn).parameters.values()]


def specialize(kernel, args, kwargs) -> Spec:
    params = _kernel_params(kernel)
    values = dict(zip([n for n, _ in params], args))
    kwargs = dict(kwargs)
    num_warps = kwargs.pop("num_warps", 4)
    values.update(kwargs)
    signature, constexprs, divisible = [], [], []
    for name, is_constexpr in params:
        v = values[name]
        if is_constexpr:
            signature.append((name, "constexpr"))
            constexprs.append((name, v))
            continue
        ty, hint = _arg_spec(v)
        if ty == "constexpr":          # an int equal to 1: a real launch makes it a constant
            signature.append((name, "constexpr"))
            constexprs.append((name, hint))
            continue
        signature.append((name, ty))
        if hint == "D":
            divisible.append(name)
    return Spec(kernel.fn.__name__, tuple(signature), tuple(constexprs), tuple(divisible),
                num_warps)


def _kernel_by_name(name):
    from tritonbn import kernels
    return getattr(kernels, name)


def _tool(name: str) -> str:
    import triton
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


_WIDTH = {"U8": 1, "S8": 1, "U16": 2, "S16": 2, "64": 8, "128": 16, "256": 32}


def _access_widths(sass: str) -> tuple[dict, dict]:
    """Histogram {bytes: count} of global loads and of global stores in SASS."""
    loads, stores = {}, {}
    for op, mods in re.findall(r"\b(LDG|STG)((?:\.[A-Z0-9_]+)*)", sass):
        width = 4
        for m in mods.split(".")[1:]:
            width = _WIDTH.get(m, width)
        hist = loads if op == "LDG" else stores
        hist[width] = hist.get(width, 0) + 1
    return loads, stores


def _occupancy(regs: int, shared: int, num_warps: int, t: Target) -> tuple[int, float]:
    """Resident programs per SM and the fraction of the SM's warp slots they fill."""
    regs_per_warp = -(-max(regs, 1) * 32 // 256) * 256        # allocated per warp, 256 at a time
    by_regs = (t.max_regs_per_sm // regs_per_warp) // num_warps
    by_threads = t.max_threads_per_sm // (num_warps * 32)
    by_shared = t.shared_per_sm // (shared + 1024) if shared else t.max_blocks_per_sm
    blocks = max(0, min(by_regs, by_threads, by_shared, t.max_blocks_per_sm))
    return blocks, blocks * num_warps / t.max_warps_per_sm


def vector_capable(spec: Spec) -> bool:
    """Whether every activation's address pattern allows 8-byte accesses for half values.

    The tile's contiguous axis is the one whose stride a real launch specializes to 1; its block
    must hold at least 4 elements, and the other strides (and the pointer) must carry the
    divisibility-by-16 hint, or the compiler cannot prove alignment. And the tile must give each
    thread at least 4 elements: a tile smaller than that (a plane of one row, N * S = 1, with a
    handful of channels) has nothing to put in a vector, whatever its addresses.
    """
    sig = dict(spec.signature)
    prefixes = sorted({m.group(1) for n, _ in spec.signature
                       if (m := re.fullmatch(r"stride_(\w+)[ncs]", n))})
    if not prefixes:
        return False
    tile = spec.constexpr("BLOCK_N") * spec.constexpr("BLOCK_S") * spec.constexpr("BLOCK_C")
    if tile < 4 * 32 * spec.num_warps:
        return False
    const = dict(spec.constexprs)
    absent = {"r": not const.get("HAS_RES"), "dr": not const.get("WRITE_DRES")}
    for p in prefixes:
        if absent.get(p):
            continue  # a dummy pointer with zero strides: the kernel never touches it
        axes = {a: f"stride_{p}{a}" for a in "ncs"}
        contiguous = [a for a, n in axes.items() if sig.get(n) == "constexpr" and const.get(n) == 1]
        if not contiguous:
            return False
        block = spec.constexpr("BLOCK_C") if contiguous[0] == "c" else spec.constexpr("BLOCK_S")
        others = [n for a, n in axes.items() if a not in contiguous]
        if block < 4 or not all(n in spec.divisible or sig.get(n) == "constexpr" for n in others):
            return False
        tensor = {"x": "X", "y": "Y", "dy": "DY", "dx": "DX", "r": "RES", "dr": "DRES"}[p]
        if tensor not in spec.divisible:
            return False
    return True


@dataclass
class Result:
    target: str
    kernel: str
    dtype: str
    num_warps: int
    blocks: dict
    flags: dict
    aligned: bool
    problems: list = field(default_factory=list)
    ok: bool = True
    failures: list = field(default_factory=list)
    regs: int = 0
    stack: int = 0
    local: int = 0
    shared: int = 0
    programs_per_sm: int = 0
    occupancy: float = 0.0
    loads: dict = field(default_factory=dict)
    stores: dict = field(default_factory=dict)
    vector_capable: bool = False
    compile_s: float = 0.0
    # What the code does, for the static performance model (bench/perf_model.py): the pointer
    # arguments the kernel loads from and stores to (from the Triton IR), its SASS instruction
    # count, and per loop (sass_loops) and for the code outside every loop, the instructions,
    # barriers, shuffles and global accesses -- attributed to the pointer arguments they touch.
    reads: list = field(default_factory=list)
    writes: list = field(default_factory=list)
    instructions: int = 0
    loops: list = field(default_factory=list)
    straight: dict = field(default_factory=dict)


_LOCAL_OPS = re.compile(r"^\s*/\*[0-9a-fA-F]+\*/\s+(?:@!?P\w+\s+)?(?:STL|LDL)\b", re.M)


def local_memory_ops(sass: str) -> int:
    """Local-memory loads and stores (spill traffic) in a SASS listing."""
    return len(_LOCAL_OPS.findall(sass))


def compile_and_inspect(spec: Spec, target_key: str, dtype: str, aligned: bool) -> Result:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend

    t = TARGETS[target_key]
    const = dict(spec.constexprs)
    res = Result(t.name, spec.kernel, dtype, spec.num_warps,
                 {k: const[k] for k in ("BLOCK_N", "BLOCK_S", "BLOCK_C") if k in const},
                 {k: v for k, v in const.items() if isinstance(v, bool)}, aligned)
    kernel = _kernel_by_name(spec.kernel)
    names = kernel.arg_names
    src = ASTSource(fn=kernel, signature=dict(spec.signature), constexprs=const,
                    attrs={(names.index(n),): [["tt.divisibility", 16]] for n in spec.divisible})
    gpu = GPUTarget("cuda", t.arch, 32)
    options = make_backend(gpu).parse_options({"num_warps": spec.num_warps,
                                               **launch.COMPILE_OPTIONS}).__dict__
    start = time.time()
    try:
        compiled = triton.compile(src, target=gpu, options=options)
    except Exception as e:  # a plan that does not compile is a finding, not a crash
        res.ok, res.failures = False, [f"does not compile: {type(e).__name__}: {str(e)[:300]}"]
        return res
    res.compile_s = round(time.time() - start, 2)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        usage = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", f.name],
                               capture_output=True, text=True, check=True).stdout
        # -g: each instruction annotated with its source line (comments: the access widths
        # below read the same instructions)
        sass = subprocess.run([_tool("nvdisasm"), "-g", f.name], capture_output=True, text=True,
                              check=True).stdout
    fields = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", usage))
    res.regs, res.stack, res.local = int(fields["REG"]), int(fields["STACK"]), int(fields["LOCAL"])
    res.shared = max(int(fields["SHARED"]), int(compiled.metadata.shared))
    res.programs_per_sm, occ = _occupancy(res.regs, res.shared, spec.num_warps, t)
    res.occupancy = round(occ, 3)
    res.loads, res.stores = _access_widths(sass)
    res.vector_capable = aligned and vector_capable(spec)
    _inspect_code(res, compiled.asm.get("ttir", ""), sass, spec)

    # A spill is local memory the code moves data through. A stack frame no instruction touches
    # is not one: LLVM's NVPTX backend sometimes declares a 1-byte local depot it never uses
    # (seen on a float16 statistics kernel), and ptxas reserves 8 B for it.
    local_ops = local_memory_ops(sass)
    if res.local > 0 or local_ops:
        res.failures.append(f"spills: {res.local} B local memory, {res.stack} B stack, "
                            f"{local_ops} local-memory instructions per thread")
    if res.shared > t.shared_per_block:
        res.failures.append(f"needs {res.shared} B shared memory; {t.name} has {t.shared_per_block}")
    if res.programs_per_sm == 0:
        res.failures.append("no program fits on an SM")
    if dtype in ("float16", "bfloat16") and res.vector_capable:
        narrow = {w: n for w, n in {**res.loads, **res.stores}.items() if w < 4}
        if narrow or max(list(res.loads) + [0]) < 8:
            res.failures.append(f"half activations moved with narrow accesses: loads {res.loads} "
                                f"stores {res.stores} (bytes: count)")
    res.ok = not res.failures
    return res


# ------------------------------------------------------------------------ code statistics
# Read by bench/perf_model.py: which arguments a kernel reads and writes (from the Triton IR),
# and its loops in SASS (a backward branch closes a loop) with what each does per iteration.

_SASS_INSTR = re.compile(r"^\s*/\*([0-9a-fA-F]+)\*/\s+(?:@(!?U?P(?:T|\d+))\s+)?"
                         r"([A-Z][A-Z0-9_]*)((?:\.[A-Z0-9_]+)*)([^;]*);")
_SASS_LABEL = re.compile(r"^\s*(\.L\w*):")
_SASS_SOURCE = re.compile(r'//## File "([^"]+)", line (\d+)')
_SASS_TARGET = re.compile(r"`\((\.L\w*)\)")


@dataclass(frozen=True)
class Instr:
    addr: int
    op: str                  # opcode: LDG, STG, BAR, BRA, ...
    mods: str                # modifiers: ".E.128"
    target: str | None       # branch target label, if any
    source: tuple | None     # (file name, line) from nvdisasm -g, if the cubin has line info
    predicated: bool = False  # under a predicate other than PT: a branch that may fall through


def parse_sass(sass: str) -> tuple[list[Instr], dict]:
    """Instructions (NOPs left out) and labels ({label: address}) of nvdisasm output; with ``-g``
    each instruction carries the (file name, line) of the source it came from."""
    instrs, labels, pending, source, in_text = [], [], [], None, True
    for line in sass.splitlines():
        m = re.match(r"^\s*\.section\s+([^\s,]+)", line)
        if m:                         # code lives in .text.<kernel>; other sections are data
            in_text, pending = m.group(1).startswith(".text"), []
            continue
        if not in_text:
            continue
        m = _SASS_SOURCE.search(line)
        if m:
            source = (os.path.basename(m.group(1)), int(m.group(2)))
            continue
        m = _SASS_LABEL.match(line)
        if m:
            pending.append(m.group(1))
            continue
        m = _SASS_INSTR.match(line)
        if not m:
            continue
        addr = int(m.group(1), 16)
        labels.extend((name, addr) for name in pending)
        pending = []
        pred, op, mods, operands = m.group(2), m.group(3), m.group(4), m.group(5)
        if op == "NOP":
            continue
        t = _SASS_TARGET.search(operands)
        instrs.append(Instr(addr, op, mods, t.group(1) if t else None, source,
                            pred is not None and pred != "PT"))
    return instrs, dict(labels)


def _width(mods: str) -> int:
    width = 4
    for m in mods.split(".")[1:]:
        width = _WIDTH.get(m, width)
    return width


def _access_names(i: Instr, kind: str, width: int, tensors_at: dict) -> set:
    """The pointer arguments a SASS global access touches, from its source line.

    Triton emits a masked load as inline PTX: one mov per 32-bit register (the masked-off
    value), then the ld.global; LLVM tags each line of that asm with the next source line, so a
    16-byte load reads as its own line + 3. So: the load's line less that offset, its own line,
    up to four lines above, then the line of the first use of a loaded value ("near")."""
    if i.source is None:
        return set()
    file, line = i.source
    if kind == "store":
        return set(tensors_at.get(i.source, {}).get("store", ()))
    for k in dict.fromkeys((max(0, width // 4 - 1), 0, 1, 2, 3, 4)):
        names = tensors_at.get((file, line - k), {}).get("load")
        if names:
            return set(names)
    return set(tensors_at.get(i.source, {}).get("near", ()))


def _code_stats(instrs: list[Instr], tensors_at=None) -> dict:
    """Instructions, barriers, shuffles, global accesses ({bytes: count} per thread) of a run of
    SASS; with ``tensors_at`` ((file, line) -> {"load": names, "store": names}), the bytes per
    thread each pointer argument gets loaded / stored ("?" where the source is unknown)."""
    out = {"instructions": len(instrs), "bar": 0, "shfl": 0, "loads": {}, "stores": {},
           "atomics": 0, "tensors": {}}
    for i in instrs:
        if i.op == "BAR" or i.op.startswith("BAR"):
            out["bar"] += 1
        elif i.op == "SHFL":
            out["shfl"] += 1
        elif i.op in ("LDG", "STG"):
            kind = "load" if i.op == "LDG" else "store"
            w = _width(i.mods)
            hist = out["loads"] if kind == "load" else out["stores"]
            hist[w] = hist.get(w, 0) + 1
            names = sorted(_access_names(i, kind, w, tensors_at or {})) or ["?"]
            for name in names:   # one line touching several arguments: share the bytes
                t = out["tensors"].setdefault(name, {"load": 0.0, "store": 0.0})
                t[kind] += w / len(names)
        elif i.op in ("ATOMG", "REDG", "RED", "ATOM"):
            out["atomics"] += 1
    return out


def _cheapest_path(body: list[Instr], labels: dict) -> list[Instr] | None:
    """The fewest instructions from the first of a loop body to its branch back, following
    its forward branches, among paths that load from global memory if the body does any
    loading: the side of a branch a loop takes on almost every iteration is the cheap one (a
    full tile's fast path beside an edge tile's), and a path that loads nothing skips the
    work. None when no such path exists."""
    n = len(body)
    index = {ins.addr: k for k, ins in enumerate(body)}
    need = int(any(ins.op == "LDG" for ins in body))
    inf = float("inf")
    dist = [[inf, inf] for _ in range(n)]           # [nothing loaded yet, loaded]
    prev: list[list] = [[None, None] for _ in range(n)]
    dist[0][int(body[0].op == "LDG")] = 1
    for k, ins in enumerate(body[:-1]):
        succ = []
        if ins.op == "BRA" and ins.target is not None:
            t = labels.get(ins.target)
            if t is not None and t > ins.addr and t in index:
                succ.append(index[t])               # forward, inside the body
            if ins.predicated:
                succ.append(k + 1)
        elif not (ins.op == "EXIT" and not ins.predicated):
            succ.append(k + 1)
        for state in (0, 1):
            if dist[k][state] == inf:
                continue
            for j in succ:
                nxt = state | int(body[j].op == "LDG")
                if dist[k][state] + 1 < dist[j][nxt]:
                    dist[j][nxt], prev[j][nxt] = dist[k][state] + 1, (k, state)
    if dist[n - 1][need] == inf:
        return None
    path, at = [], (n - 1, need)
    while at is not None:
        path.append(body[at[0]])
        at = prev[at[0]][at[1]]
    return path[::-1]


def sass_loops(sass: str, tensors_at=None) -> tuple[list[dict], dict]:
    """The loops of a kernel's SASS and the code outside every loop.

    A loop is the code from a branch target up to a branch back to it (several branches back
    to one target close one loop); a branch to itself (the trap after EXIT) is not a loop. Each
    loop is a dict: start and end addresses, depth (0 outermost), and _code_stats of its body
    per iteration (an inner loop's code is counted once in its outer loop), and "path": the
    same for the cheapest path through the body (_cheapest_path; the body itself when it has
    no branches). The second value is _code_stats of the instructions outside every loop."""
    instrs, labels = parse_sass(sass)
    ends: dict[int, int] = {}
    for i in instrs:
        if i.op == "BRA" and i.target in labels and labels[i.target] < i.addr:
            start = labels[i.target]
            ends[start] = max(ends.get(start, start), i.addr)
    spans = sorted(ends.items())
    loops = []
    for start, end in spans:
        body = [i for i in instrs if start <= i.addr <= end]
        depth = sum(1 for s, e in spans if (s, e) != (start, end) and s <= start and end <= e)
        path = _cheapest_path(body, labels) or body
        loops.append({"start": start, "end": end, "depth": depth,
                      **_code_stats(body, tensors_at), "path": _code_stats(path, tensors_at)})
    inside = lambda a: any(s <= a <= e for s, e in spans)  # noqa: E731
    return loops, _code_stats([i for i in instrs if not inside(i.addr)], tensors_at)


_TTIR_LOC_DEF = re.compile(r"^(#loc\d*) = loc\((.*)\)\s*$")
_TTIR_FILE_LOC = re.compile(r'^"([^"]+)":(\d+)(?::\d+)?$')
_TTIR_ACCESS = {"tt.load": "load", "tt.descriptor_load": "load", "tt.store": "store",
                "tt.descriptor_store": "store", "tt.atomic_rmw": "store", "tt.atomic_cas": "store"}


def _resolve_loc(text: str, defs: dict, depth: int = 0):
    """(file name, line) of an MLIR location: the callee of a call site, the inner location of a
    named one, the first of a fused one."""
    text = text.strip()
    if depth > 50 or not text or text == "unknown":
        return None
    if text.startswith("#loc"):
        return _resolve_loc(defs.get(text, ""), defs, depth + 1)
    m = _TTIR_FILE_LOC.match(text)
    if m:
        return os.path.basename(m.group(1)), int(m.group(2))
    m = re.match(r"^callsite\((#loc\d*|.+?) at ", text)
    if m:
        return _resolve_loc(m.group(1), defs, depth + 1)
    m = re.match(r'^"[^"]*"\((.*)\)$', text)          # a named location: "X"(#loc)
    if m:
        return _resolve_loc(m.group(1), defs, depth + 1)
    m = re.search(r'(#loc\d*|"[^"]+":\d+)', text)     # fused[...] and anything else
    return _resolve_loc(m.group(1), defs, depth + 1) if m else None


# How many ops downstream of a load the compiler may place its SASS line: ptxas often tags a
# global load with the line of its first use (the conversion to float32, the first reduction).
_NEAR_HOPS = 3


def ttir_accesses(ttir: str, arg_names=None) -> dict:
    """Which pointer arguments the kernel's Triton IR loads from and stores to (atomics count
    as stores), and the source lines that touch them, to attribute SASS accesses.

    Returns {"reads": [...], "writes": [...], "lines": {(file name, line): {"load": names,
    "store": names, "near": names}}}. Pointers are followed from the arguments through every op
    whose result is a pointer (splat, addptr, broadcast, select, loop-carried values). "near":
    the arguments whose loaded values reach an op on that line within the fewest ops (at most
    _NEAR_HOPS), for a load that SASS tags with the line of a use. ``arg_names``: names for IR
    arguments printed as %argN, in order."""
    defs = {}
    for line in ttir.splitlines():
        m = _TTIR_LOC_DEF.match(line.strip())
        if m:
            defs[m.group(1)] = m.group(2)
    taint: dict[str, set] = {}
    reads, writes, lines = set(), set(), {}
    users: dict[str, list] = {}       # value -> ops using it: (results, where)
    loads = []                        # (results, roots)

    def entry(where):
        return lines.setdefault(where, {"load": set(), "store": set(), "near": set()})

    for line in ttir.splitlines():
        if re.match(r"^\s*tt\.func\b", line):
            for name in re.findall(r"%(\w+): !tt\.ptr", line):
                idx = int(name[3:]) if re.fullmatch(r"arg\d+", name) else None
                known = arg_names and idx is not None and idx < len(arg_names)
                taint["%" + name] = {arg_names[idx] if known else name}
            continue
        code = line.split(" loc(")[0]
        m = re.match(r"^\s*(?:(%[\w#:]+(?:, %[\w#:]+)*) = )?([\w.]+)(.*)$", code)
        if not m:
            continue
        results = [r.split(":")[0].split("#")[0] for r in (m.group(1) or "").split(", ") if r]
        op, rest = m.group(2), m.group(3)
        operands = [o.split("#")[0] for o in re.findall(r"%[\w#]+", rest)]
        loc = re.search(r" loc\((.*)\)\s*$", line)
        where = _resolve_loc(loc.group(1), defs) if loc else None
        for o in operands:
            users.setdefault(o, []).append((results, where))
        kind = _TTIR_ACCESS.get(op)
        if kind:
            roots = set().union(*(taint.get(o, set()) for o in operands[:1]))
            if roots:
                (reads if kind == "load" else writes).update(roots)
                if where:
                    entry(where)[kind].update(roots)
                if kind == "load":
                    loads.append((results, roots))
            continue
        if "!tt.ptr" in rest or "tensordesc" in rest:
            for a, b in re.findall(r"(%[\w]+) = (%[\w#]+)", rest):   # iter_args(%a = %b)
                if b.split("#")[0] in taint:
                    taint[a] = taint.get(a, set()) | taint[b.split("#")[0]]
            roots = set().union(*(taint.get(o, set()) for o in operands))
            for r in results:
                if roots:
                    taint[r] = taint.get(r, set()) | roots
    # nearest uses of each loaded value, line by line
    best: dict = {}
    for results, roots in loads:
        frontier, seen = list(results), set(results)
        for hop in range(1, _NEAR_HOPS + 1):
            nxt = []
            for v in frontier:
                for outs, where in users.get(v, ()):
                    if where is not None:
                        h, names = best.get(where, (hop, set()))
                        if hop < h:
                            best[where] = (hop, set(roots))
                        elif hop == h:
                            best[where] = (h, names | roots)
                    nxt.extend(o for o in outs if o not in seen)
                    seen.update(outs)
            frontier = nxt
    for where, (_h, names) in best.items():
        entry(where)["near"].update(names)
    return {"reads": sorted(reads), "writes": sorted(writes), "lines": lines}


def _inspect_code(res: Result, ttir: str, sass: str, spec: Spec) -> None:
    """Fill the Result's reads / writes (Triton IR) and loop statistics (SASS from nvdisasm -g)."""
    acc = ttir_accesses(ttir, [n for n, ty in spec.signature if ty != "constexpr"])
    res.reads, res.writes = acc["reads"], acc["writes"]
    res.loops, res.straight = sass_loops(sass, acc["lines"])
    res.instructions = res.straight["instructions"] + sum(
        lp["instructions"] for lp in res.loops if lp["depth"] == 0)


def _compile_job(job):
    spec, target_key, dtype, aligned = job
    return compile_and_inspect(spec, target_key, dtype, aligned)


def tuned_problems(target_key: str, table_path: str | None = None) -> list[tuple[Problem, dict]]:
    """(problem, plan fields) for each tuning-table entry that the dispatcher would use on a GPU
    of this target's architecture (same triton version, capability = target arch): those plans
    run there, so they must compile spill-free too. Default table: the dispatcher's."""
    import triton

    from tritonbn import tuning_table
    path = table_path or tuning_table.active_path()
    if path is None:
        return []
    out = []
    for e in tuning_table.load(path).entries:
        cap = e.get("capability")
        if (e["triton"] != triton.__version__ or e["dtype"] not in DTYPES
                or not (isinstance(cap, list) and len(cap) == 2
                        and cap[0] * 10 + cap[1] == TARGETS[target_key].arch)
                or not isinstance(e.get("shape"), list)):
            continue
        layout = e.get("memory_format", "contiguous")
        out.append((Problem(e["op"], tuple(e["shape"]), e["dtype"], layout),
                    {k: e["plan"][k] for k in tuning_table.PLAN_FIELDS}))
    return out


def collect_specs(subset: str, target_keys: list[str], unaligned=True,
                  tuned: bool = True, table_path: str | None = None, dtypes=None):
    """Distinct (spec, target, dtype, aligned) jobs, each with the problems that produce it;
    with ``tuned``, also the plans of the tuning table for the targets' GPUs. ``unaligned``:
    True / False, or the target keys to add unaligned-pointer specializations for; ``dtypes``:
    only problems of these dtypes."""
    jobs: dict[tuple, list[str]] = {}
    for key in target_keys:
        both = unaligned is True or (not isinstance(unaligned, bool) and key in unaligned)
        for prob in problems(subset):
            if dtypes is not None and prob.dtype not in dtypes:
                continue
            for aligned in ((True, False) if both else (True,)):
                for kernel, _grid, args, kwargs in capture(prob, TARGETS[key], aligned):
                    spec = specialize(kernel, args, kwargs)
                    jobs.setdefault((spec, key, prob.dtype, aligned), []).append(prob.name)
        for prob, plan in (tuned_problems(key, table_path) if tuned else []):
            # the tuned plan on the shape it was tuned for, exactly as the dispatcher runs it
            with planner.forced_plan(**plan):
                launches = capture(prob, TARGETS[key], True)
            for kernel, _grid, args, kwargs in launches:
                spec = specialize(kernel, args, kwargs)
                jobs.setdefault((spec, key, prob.dtype, True), []).append(prob.name + " (tuned)")
    return jobs


def compile_jobs(jobs: dict, workers: int = 2, progress: bool = False) -> list[Result]:
    """Compile {(spec, target, dtype, aligned): [problem names]} in worker processes (with
    ``progress``, a progress line on stderr: a full check compiles for minutes)."""
    from tritonbn.tools.progress import Progress
    ordered = list(jobs)
    results: list[Result] = []
    bar = Progress(len(ordered), "compiling", enabled=progress)
    # Workers are fresh processes with TRITON_INTERPRET=0 (so importing tritonbn does not turn
    # the interpreter on), so their kernels are real JITFunctions that triton.compile accepts
    # (this process may be running the interpreter).
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "0"
    try:
        ctx = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
            for job, res in zip(ordered, pool.map(_compile_job, ordered)):
                res.problems = sorted(set(jobs[job]))
                results.append(res)
                bar.update(f"{res.kernel} {job[1]}")
    finally:
        if saved is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = saved
    return results


def run_check(subset: str = "ci", target_keys=("sm90",), unaligned=False,
              workers: int = 2, tuned: bool = True, table_path: str | None = None,
              dtypes=None, progress: bool = False) -> list[Result]:
    return compile_jobs(collect_specs(subset, list(target_keys), unaligned, tuned, table_path,
                                      dtypes), workers, progress)


def _versions() -> dict:
    import triton
    return {"torch": torch.__version__, "triton": triton.__version__,
            "date": datetime.date.today().isoformat(),
            "ptxas": subprocess.run([_tool("ptxas"), "--version"], capture_output=True,
                                    text=True).stdout.strip().splitlines()[-1]}


def _versions_line() -> str:
    v = _versions()
    return f"torch {v['torch']}, triton {v['triton']}, {v['ptxas']}, {v['date']}"


def write_report(results: list[Result], out_dir: str, stem: str = "compile_check") -> tuple[str, str]:
    os.makedirs(out_dir, exist_ok=True)
    meta = _versions()
    json_path = os.path.join(out_dir, f"{stem}.json")
    with open(json_path, "w") as f:
        json.dump({"versions": meta, "results": [dataclasses.asdict(r) for r in results]}, f,
                  indent=1, default=str)
    md_path = os.path.join(out_dir, f"{stem}.md")
    lines = ["# Compile check: every kernel plan compiled for real GPUs",
             "",
             f"torch {meta['torch']}, triton {meta['triton']}, {meta['ptxas']}, {meta['date']}. "
             f"Made by `python -m bench.compile_check`; see bench/README.md for how to read it.",
             "",
             "| target | kernel | dtype | blocks (n,s,c) | warps | aligned | regs | spill B | "
             "smem B | programs/SM | occupancy | load B:count | store B:count | vec | ok |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in sorted(results, key=lambda r: (r.target, r.kernel, r.dtype, -r.aligned,
                                            tuple(r.blocks.values()), r.num_warps)):
        b = r.blocks
        hist = lambda h: " ".join(f"{w}:{n}" for w, n in sorted(h.items())) or "-"  # noqa: E731
        lines.append(
            f"| {r.target.split()[0]} | {r.kernel.replace('_kernel', '')} | {r.dtype} | "
            f"{b.get('BLOCK_N')},{b.get('BLOCK_S')},{b.get('BLOCK_C')} | {r.num_warps} | "
            f"{'y' if r.aligned else 'n'} | {r.regs} | {r.local + r.stack} | {r.shared} | "
            f"{r.programs_per_sm} | {r.occupancy:.0%} | {hist(r.loads)} | {hist(r.stores)} | "
            f"{'y' if r.vector_capable else '-'} | {'ok' if r.ok else 'FAIL: ' + '; '.join(r.failures)} |")
    with open(md_path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return md_path, json_path


def summarize(results: list[Result]) -> str:
    ok = [r for r in results if r.ok]
    compiled = [r for r in results if r.regs]
    lines = [f"{len(results)} kernel specializations compiled: {len(ok)} ok, "
             f"{len(results) - len(ok)} failing"]
    if compiled:
        lines.append(f"registers/thread {min(r.regs for r in compiled)}..{max(r.regs for r in compiled)}, "
                     f"spills {max(r.local + r.stack for r in compiled)} B max, "
                     f"occupancy {min(r.occupancy for r in compiled):.0%}..{max(r.occupancy for r in compiled):.0%}")
        vec = [r for r in compiled if r.vector_capable]
        if vec:
            widest = min(max(r.loads) for r in vec)
            lines.append(f"{len(vec)} vector-capable half/float plans: narrowest widest-load {widest} B")
    for r in results:
        if not r.ok:
            lines.append(f"FAIL {r.target} {r.kernel} {r.dtype} {r.blocks} warps={r.num_warps} "
                         f"aligned={r.aligned}: {'; '.join(r.failures)} (e.g. {r.problems[:1]})")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.compile_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--subset", choices=["ci", "full", "tuned"], default="full",
                        help="tuned: only the tuning table's plans")
    parser.add_argument("--targets", default="sm90,sm80", help="comma-separated: sm90, sm80")
    parser.add_argument("--no-unaligned", action="store_true",
                        help="skip the unaligned-pointer specializations")
    parser.add_argument("--out", default=os.path.join("bench", "results"))
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--tuning-table", metavar="PATH",
                        help="also compile this tuning table's plans for the targets' GPUs "
                             "(default: the table the dispatcher reads)")
    parser.add_argument("--no-tuned", action="store_true",
                        help="skip the tuning table's plans")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    args = parser.parse_args(argv)
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    unknown = set(targets) - set(TARGETS)
    if unknown:
        parser.error(f"unknown targets {sorted(unknown)}; choose from {sorted(TARGETS)}")
    results = run_check(args.subset, targets, not args.no_unaligned, args.workers,
                        not args.no_tuned, args.tuning_table, progress=not args.quiet)
    md, js = write_report(results, args.out)
    summary = summarize(results)
    print(summary)
    summary_path = os.path.join(args.out, "compile_check_summary.txt")
    with open(summary_path, "w") as f:
        f.write(f"python -m bench.compile_check --subset {args.subset} --targets {args.targets}: "
                f"{_versions_line()}\n{summary}\n")
    print(f"wrote {summary_path} (reviewed, committed) and the full tables {md} and {js} "
          f"(regenerated by this command; not kept in git)")
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
