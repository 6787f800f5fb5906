"""Shape sets for tuning and benchmarks: presets, command-line parsing, smoke-mode shrinking, the
batch-norm input shapes of a model (found by a forward pass with hooks on a meta copy), and the
(op, shape, dtype, layout) problems that tuning and the compile check work on."""
from __future__ import annotations

import copy
import importlib
import math
import os
import re
import sys
from dataclasses import dataclass

import torch

__all__ = ["DTYPES", "LAYOUTS", "PRESETS", "BENCH_SHAPES", "Problem", "in_layout", "parse_shape",
           "preset_shapes", "smoke_shape",
           "shapes_from_model", "load_model_factory"]

Shape = tuple[int, ...]

# The activation dtypes and memory layouts the tools sweep, by their command-line names.
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
LAYOUTS = ("contiguous", "channels_last")

# The benchmark's shape sets: ResNet-50's stages, small batches, few channels with large images,
# 1-D and 3-D inputs (the bench set is their union, in this order).
PRESETS: dict[str, list[Shape]] = {
    "resnet50": [(256, 64, 112, 112), (256, 256, 56, 56), (256, 512, 28, 28),
                 (256, 1024, 14, 14), (256, 2048, 7, 7)],
    "small-batch": [(8, 64, 112, 112), (32, 256, 56, 56)],
    "few-channels": [(16, 32, 256, 256)],        # few channels, large images
    "1d": [(4096, 1024), (65536, 64)],
    "3d": [(8, 64, 16, 56, 56)],
}
BENCH_SHAPES: list[Shape] = [s for shapes in PRESETS.values() for s in shapes]
PRESETS["all"] = BENCH_SHAPES

# Smoke mode runs the kernels in Triton's CPU interpreter, where one program costs ~20 ms
# (measured: a split forward over 4 channels x 2 splits took ~0.3 s on a 2-core machine), so
# shapes above this many elements are shrunk: the point is the machinery, not the numbers.
SMOKE_MAX_ELEMS = 4096
SMOKE_TARGET_ELEMS = 256


@dataclass(frozen=True)
class Problem:
    """One (op, shape, dtype, layout) case of a kernel: what ``tritonbn tune`` sweeps plans for
    and what the repository's compile check compiles (with a fused epilogue, by name)."""
    op: str
    shape: tuple[int, ...]
    dtype: str
    layout: str               # "contiguous" or "channels_last"
    epilogue: str = "plain"   # what is fused around the normalization (the compile check's names)

    @property
    def name(self) -> str:
        fused = "" if self.epilogue == "plain" else f" {self.epilogue}"
        return f"{self.op} {'x'.join(map(str, self.shape))} {self.dtype} {self.layout}{fused}"


def in_layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """t in one of LAYOUTS (channels_last: channels_last_3d for 5-D; other ranks stay
    contiguous, as torch has no channels-last format for them)."""
    if layout == "channels_last" and t.dim() in (4, 5):
        return t.contiguous(memory_format=torch.channels_last if t.dim() == 4
                            else torch.channels_last_3d)
    return t.contiguous()


_SHAPE = re.compile(r"\s*[0-9]+(\s*,\s*[0-9]+)*\s*")


def parse_shape(text: str) -> Shape:
    """'256,64,112,112' -> (256, 64, 112, 112): comma-separated integers, at least (N, C).
    Anything else ('256x64x112x112', '2,,3', '1_000,3', a trailing comma) is refused."""
    if not _SHAPE.fullmatch(text):
        raise ValueError(f"bad shape {text!r}: expected comma-separated integers like 8,64,56,56")
    shape = tuple(int(p) for p in text.split(","))
    if len(shape) < 2 or any(d < 1 for d in shape):
        raise ValueError(f"bad shape {text!r}: need (N, C, ...) with every size >= 1")
    return shape


def preset_shapes(name: str) -> list[Shape]:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    return list(PRESETS[name])


def smoke_shape(shape: Shape) -> Shape:
    """A tiny shape with the same rank (so the same layouts apply) for interpreter runs.

    Keeps N >= 2 and C >= 2 where the original had them (so reductions over samples and
    channels-last channel blocks still happen), then halves the largest dimension until the
    tensor has at most SMOKE_TARGET_ELEMS elements. Shapes already small are kept as given.
    """
    if math.prod(shape) <= SMOKE_MAX_ELEMS:
        return tuple(shape)
    dims = [min(shape[0], 8), min(shape[1], 4)] + [min(d, 8) for d in shape[2:]]
    floor = [min(shape[0], 2), min(shape[1], 2)] + [1] * (len(shape) - 2)
    while math.prod(dims) > SMOKE_TARGET_ELEMS:
        i = max((i for i in range(len(dims)) if dims[i] > floor[i]), key=lambda i: dims[i])
        dims[i] = max(floor[i], dims[i] // 2)
    return tuple(dims)


def load_model_factory(spec: str):
    """'package.module:callable' -> the callable. The current directory is importable, as with
    ``python -m``, so a factory in a local file works from the console script too."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"--model expects module:callable, got {spec!r}")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    obj = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def _is_batch_norm(module: torch.nn.Module) -> bool:
    # torch's _BatchNorm covers BatchNorm1d/2d/3d, SyncBatchNorm and tritonbn's subclasses.
    return isinstance(module, torch.nn.modules.batchnorm._BatchNorm)


def shapes_from_model(model: torch.nn.Module, input_shape: Shape,
                      dtype: torch.dtype = torch.float32) -> list[tuple[Shape, int]]:
    """The input shapes of the model's batch-norm layers, with how many layers see each, in
    first-seen order. The forward pass runs on a deep copy moved to the meta device: no memory
    for activations, no arithmetic, and the caller's model (running statistics, batch counts,
    train/eval mode) is never touched."""
    from .. import launch

    probe = copy.deepcopy(model).to("meta")
    seen: dict[Shape, int] = {}

    def record(module, args):
        if args and isinstance(args[0], torch.Tensor):
            shape = tuple(args[0].shape)
            seen[shape] = seen.get(shape, 0) + 1

    hooks = [m.register_forward_pre_hook(record) for m in probe.modules() if _is_batch_norm(m)]
    if not hooks:
        raise ValueError(f"{type(model).__name__} has no batch-norm layers to tune")
    x = torch.empty(tuple(input_shape), dtype=dtype, device="meta")
    try:
        # tritonbn layers on meta tensors: record their launches instead of running kernels.
        with torch.no_grad(), launch.capture_launches():
            probe(x)
    finally:
        for h in hooks:
            h.remove()
    return list(seen.items())
