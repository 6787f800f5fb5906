"""The ``tritonbn`` command (also ``python -m tritonbn``): the user commands of the installed
package (COMMANDS). Development harnesses -- the compile check, the performance model, host
timing, the GPU window -- live in the repository's bench/ folder and run from a checkout
(``python -m bench.<name>``); this package never imports them."""
from __future__ import annotations

import argparse
import copy
import importlib
import os
import sys

import torch

from .shapes import DTYPES, LAYOUTS, in_layout, parse_shape


def _make(shape, dtype, layout, device, seed):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * 3 + 1).to(device=device, dtype=dtype)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    return x


def demo(args) -> int:
    import tritonbn
    from tritonbn import plan as planner
    from tritonbn._runtime import cpu_runs_kernels

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        where = torch.cuda.get_device_name()
    elif cpu_runs_kernels():
        where = "CPU, Triton interpreter"
    else:
        where = ("CPU, float64 reference path (TRITONBN_CPU=reference or TRITON_INTERPRET=0 is "
                 "set): no kernel runs")
    print(f"tritonbn {tritonbn.__version__} | torch {torch.__version__} | "
          f"triton {__import__('triton').__version__} | running on {where}")
    shapes = [((8, 16, 12, 12), "contiguous"), ((8, 16, 12, 12), "channels_last"),
              ((64, 48), "contiguous"), ((2, 4, 3, 8, 8), "channels_last"),
              ((16, 8, 32, 32), "contiguous")]  # the last one is too big for one tile: split kernels
    worst = 0.0
    for i, (shape, layout) in enumerate(shapes):
        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            x = _make(shape, dtype, layout, device, i).requires_grad_()
            c = shape[1]
            w = torch.linspace(0.5, 1.5, c, device=device, requires_grad=True)
            b = torch.linspace(-0.5, 0.5, c, device=device, requires_grad=True)
            rm, rv = torch.zeros(c, device=device), torch.ones(c, device=device)
            with tritonbn.count_launches() as launches:
                y = tritonbn.batch_norm(x, rm, rv, w, b, training=True)
                grad = _make(shape, dtype, "contiguous", device, 100 + i)
                y.backward(grad)
                y_eval = tritonbn.batch_norm(x.detach(), rm, rv, w.detach(), b.detach())
            # torch on float64 copies is the yardstick
            x64 = x.detach().double().requires_grad_()
            w64, b64 = w.detach().double().requires_grad_(), b.detach().double().requires_grad_()
            rm64, rv64 = torch.zeros(c, device=device, dtype=torch.float64), torch.ones(
                c, device=device, dtype=torch.float64)
            y64 = torch.nn.functional.batch_norm(x64, rm64, rv64, w64, b64, training=True)
            y64.backward(grad.double())
            y64_eval = torch.nn.functional.batch_norm(x64.detach(), rm64, rv64, w64.detach(),
                                                      b64.detach())
            scale = {torch.float16: 1e-3, torch.bfloat16: 8e-3, torch.float32: 1e-6}[dtype]
            errs = {
                "y": (y.double() - y64).abs().max().item() / max(1.0, y64.abs().max().item()),
                "eval": (y_eval.double() - y64_eval).abs().max().item()
                / max(1.0, y64_eval.abs().max().item()),
                "dx": (x.grad.double() - x64.grad).abs().max().item()
                / max(1e-3, x64.grad.abs().max().item()),
                "running_var": (rv.double() - rv64).abs().max().item(),
            }
            rel = max(errs.values()) / scale
            worst = max(worst, rel)
            kernels = ", ".join(f"{k.replace('bn_', '').replace('_kernel', '')} x{v}"
                                for k, v in sorted(launches.items()))
            print(f"  {str(tuple(shape)):18} {layout:13} {str(dtype)[6:]:8} "
                  f"max err / dtype tolerance = {rel:5.2f}   kernels: {kernels}")
            if not launches:
                print("  no Triton kernel ran" + (": this is a bug" if device == "cuda"
                                                  or cpu_runs_kernels() else ""))
                return 1
    mode = planner.device_info(torch.device(device)).name
    # within 10x the dtype's tolerance on every case (seen: below 1x)
    if worst <= 10:
        print(f"OK: tritonbn matches torch (float64) on every case; plans chosen for {mode}.")
        return 0
    print(f"MISMATCH: worst case is {worst:.1f}x the dtype's tolerance; plans chosen for {mode}.")
    return 1


def _table_line(device) -> str:
    """Which tuning table the dispatcher reads and what it holds for this device."""
    from tritonbn import tuning_table

    path = tuning_table.active_path()
    if path is None:
        return f"tuning table: off (${tuning_table.ENV}=off): heuristic plans"
    table = tuning_table.dispatch_table()
    if table.problem:
        return f"tuning table: {path} ignored ({table.problem}): heuristic plans"
    if not table.entries:
        return f"tuning table: none at {path}: heuristic plans (run `tritonbn tune`)"
    mine = table.for_gpu(device.name, tuning_table.triton_version())
    return (f"tuning table: {path}: {len(mine)} entries for {device.name} with triton "
            f"{tuning_table.triton_version()} ({len(table.entries)} in all)")


def _dtype_line(dtype_name: str, elem_bytes: int) -> str:
    """What the planner keys on for this dtype: the heuristic plans on its element size only;
    the tuning table prefers entries of the dtype itself, then those of its size."""
    from tritonbn import tuning_table

    same = [d for d in tuning_table.DTYPES_BY_SIZE.get(elem_bytes, ()) if d != dtype_name]
    line = f"dtype {dtype_name}: planned as any {elem_bytes}-byte dtype"
    if not same:
        return f"{line}; tuning-table entries of {dtype_name}"
    return (f"{line} (the heuristic plans are {' and '.join(same)}'s too); tuning-table "
            f"entries of {dtype_name} first, then of {', '.join(same)}")


def info(args, parser) -> int:
    from tritonbn import launch, plan as planner
    from tritonbn._runtime import cpu_runs_kernels

    try:
        shape = parse_shape(args.shape)
    except ValueError as e:
        parser.error(f"--shape: {e}")
    if args.layout == "channels_last" and len(shape) not in (4, 5):
        parser.error(f"--layout channels_last needs a 4-D or 5-D shape, got {len(shape)}-D "
                     f"{args.shape!r} (torch has no channels-last format for other ranks)")
    dtype = {**DTYPES, "float64": torch.float64}[args.dtype]
    x = in_layout(torch.empty(shape, dtype=dtype, device="meta"), args.layout)
    where = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = planner.device_info(where)
    print(f"device: {device.name} ({device.sm_count} SMs)")
    if not torch.cuda.is_available() and not cpu_runs_kernels():
        print("note: CPU tensors take the float64 reference path here (TRITONBN_CPU=reference "
              "or TRITON_INTERPRET=0 is set) and launch no kernel; the plans below are what "
              "Triton's interpreter runs without it")
    print(_table_line(device))
    for i, op in enumerate(planner.OPS if args.op == "all" else [args.op]):
        # exactly what the launchers plan (a meta tensor's data_ptr is 0: an aligned pointer)
        view, p, aligned = launch.plan_for(op, x, device=where)
        if i == 0:
            print(f"input {shape} {args.dtype} {args.layout} -> plane view N={view.n} "
                  f"C={view.c} S={view.s} strides={view.strides[0]} "
                  f"channels_minor={view.channels_minor} aligned={aligned}")
            print(_dtype_line(args.dtype, x.element_size()))
        grid = ""
        if p.variant == "split":
            _, n_tiles, per_split, splits = planner.grid_tiles(p, view.n, view.s)
            grid = f" grid={-(-view.c // p.block_c)}x{splits} tiles/program={per_split}"
        print(f"  {op:10} {p.variant:8} block(n,s,c)=({p.block_n},{p.block_s},{p.block_c}) "
              f"warps={p.num_warps} int64={p.use_int64}{grid}\n             why: {p.reason}")
    return 0


def convert(args, parser) -> int:
    """Build the model from its factory and print, per batch-norm-like layer, what
    convert_model (and with --fuse / --fold, fuse and fold_into_conv) make of it."""
    import warnings

    import tritonbn
    from tritonbn.tools.shapes import load_model_factory
    from tritonbn.transforms.report import TransformReport

    try:
        factory = load_model_factory(args.model)
    except (ValueError, ImportError, AttributeError) as e:
        parser.error(f"--model {args.model!r}: {type(e).__name__}: {e}")
    model = factory()
    if not isinstance(model, torch.nn.Module):
        parser.error(f"--model {args.model!r} returned {type(model).__name__}, not an nn.Module")
    with warnings.catch_warnings():
        # the table says everything the warnings would (layers left on torch, fuse's fallbacks)
        warnings.simplefilter("ignore")
        if args.fuse:
            _, report = tritonbn.fuse(model, report=True, inplace=args.inplace)
        else:
            _, report = tritonbn.convert_model(copy.deepcopy(model), report=True,
                                               inplace_abn=args.inplace)
        if args.fold:
            _, folds = tritonbn.fold_into_conv(copy.deepcopy(model).eval(), report=True)
            report = TransformReport(report.stages + ["fold"], report.layers)
            for name, folded in folds.layers.items():
                record = report.layers.get(name)
                if record is None:
                    continue
                record.folded = folded.folded
                if not folded.folded and folded.note:
                    record.note = f"{record.note}; {folded.note}" if record.note else folded.note
    print(f"{args.model}: {type(model).__name__}")
    print(report.table(markdown=args.markdown))
    return 1 if args.strict and report.left_on_torch else 0


# The user commands, in the order `tritonbn --help` lists them: name -> one-line description.
COMMANDS = {
    "demo": "check tritonbn against torch on this machine and show the kernels that ran",
    "info": "show the plan a shape gets and why",
    "convert": "show what convert_model, fuse and fold_into_conv make of a model's batch norms",
    "tune": "sweep kernel plans for shapes on this GPU; write the tuning table",
    "bench": "benchmark against torch eager, torch.compile and other implementations",
    "overflow": "profile batch norm near float16's limit against torch and naive half precision",
}
# Commands with parsers of their own: name -> module.
DELEGATED = {"tune": "tune", "bench": "bench", "overflow": "overflow_profile"}


def _description() -> str:
    width = max(map(len, COMMANDS))
    lines = ["Batch norm for PyTorch as Triton kernels.", "", "commands:"]
    lines += [f"  {name:{width}}  {text}" for name, text in COMMANDS.items()]
    lines += ["", "`tritonbn COMMAND --help` shows a command's options. Also `python -m tritonbn`."]
    return "\n".join(lines)


def build_parser() -> tuple[argparse.ArgumentParser, dict]:
    """The top-level parser and the sub-parsers of the commands it parses itself."""
    parser = argparse.ArgumentParser(prog="tritonbn", usage="%(prog)s [-h] COMMAND ...",
                                     description=_description(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    # the commands are listed (one line each) in the description, not again by argparse
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                help=argparse.SUPPRESS)
    own = {}
    own["demo"] = sub.add_parser("demo", description=COMMANDS["demo"])
    p_info = own["info"] = sub.add_parser("info", description=COMMANDS["info"])
    p_info.add_argument("--shape", required=True,
                        help="comma-separated integers, at least N and C, e.g. 256,64,112,112")
    p_info.add_argument("--dtype", default="float16", choices=sorted(DTYPES) + ["float64"])
    p_info.add_argument("--layout", default="contiguous", choices=LAYOUTS)
    p_info.add_argument("--op", default="all", choices=["all", "fwd_train", "fwd_eval",
                                                         "bwd_train", "bwd_eval"])
    p_convert = own["convert"] = sub.add_parser(
        "convert", description="show what convert_model (--fuse, --fold: fuse, fold_into_conv) "
                               "makes of each batch-norm layer of a model, and why any stays on "
                               "torch")
    p_convert.add_argument("--model", required=True, metavar="MODULE:CALLABLE",
                           help="a callable returning the model, called with no arguments, "
                                "e.g. torchvision.models:resnet50")
    p_convert.add_argument("--fuse", action="store_true",
                           help="also fuse (tritonbn.fuse): what each layer is fused with")
    p_convert.add_argument("--inplace", action="store_true",
                           help="in-place activated batch norm where it applies "
                                "(fuse(inplace=True), or convert_model(inplace_abn=True) "
                                "without --fuse): which layers save only their output, and why "
                                "the others do not")
    p_convert.add_argument("--fold", action="store_true",
                           help="also fold (tritonbn.fold_into_conv, eval mode): which layer "
                                "each batch norm folds into")
    p_convert.add_argument("--markdown", action="store_true", help="print a markdown table")
    p_convert.add_argument("--strict", action="store_true",
                           help="exit with status 1 when a layer stays on torch")
    for name in DELEGATED:
        # parsed by the command's own module (`tritonbn NAME --help`)
        sub.add_parser(name, add_help=False, description=COMMANDS[name])
    return parser, own


def _run(argv: list[str]) -> int:
    if argv[:1] and argv[0] in DELEGATED:
        return importlib.import_module(f".{DELEGATED[argv[0]]}", __package__).main(argv[1:])
    parser, own = build_parser()
    args = parser.parse_args(argv)
    if args.command == "demo":
        return demo(args)
    if args.command == "convert":
        return convert(args, own["convert"])
    return info(args, own["info"])


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        try:
            return _run(argv)
        finally:
            sys.stdout.flush()  # a closed pipe shows here (help and usage errors too), not at exit
    except BrokenPipeError:
        # The reader went away (`tritonbn info ... | head -1`): stop quietly, as a process
        # killed by SIGPIPE would. Python still flushes stdout at exit: point it at devnull.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 128 + 13


if __name__ == "__main__":
    sys.exit(main())
