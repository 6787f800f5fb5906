"""The canonical (N, C, S) view every kernel works on.

An activation of shape (N, C, d1, ..., dk) is seen as N samples x C channels x S = d1*...*dk
positions with three element strides. That covers contiguous, channels_last / channels_last_3d,
sliced batches, and stride-0 (expanded) gradients without a copy. When the samples can be folded
into the positions too (channels-last, C == 1, S == 1, N == 1), N becomes 1 and the kernels see one
long plane, which keeps their tiles full. Only strides that no single (N, S) pair can describe
(e.g. a transposed H/W) fall back to a contiguous copy.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch._prims_common import suggest_memory_format

from ._hashing import cached_hash

__all__ = ["PlaneView", "plane_view", "output_memory_format", "empty_output", "max_offset"]


@cached_hash
@dataclass(frozen=True)
class PlaneView:
    n: int                              # samples (1 once folded into the positions)
    c: int                              # channels
    s: int                              # positions per sample
    strides: tuple[tuple[int, int, int], ...]   # (stride_n, stride_c, stride_s) per tensor

    @property
    def channels_minor(self) -> bool:
        """True when channels are adjacent in memory for the first tensor (NHWC-like)."""
        return self.c > 1 and self.strides[0][1] == 1


def _spatial_stride(sizes: tuple[int, ...], strides: tuple[int, ...]) -> int | None:
    """The one stride that walks the flattened spatial dims, or None if they do not flatten."""
    dims = [(n, st) for n, st in zip(sizes, strides) if n != 1]
    if not dims:
        return 1
    for (_, st), (n_next, st_next) in zip(dims, dims[1:]):
        if st != st_next * n_next:
            return None
    return dims[-1][1]


def plane_view(shape: torch.Size, tensors: list[torch.Tensor]) -> PlaneView | None:
    """The shared (N, C, S) view of tensors of one shape, or None if one of them has no such view."""
    return _plane_view(tuple(shape), tuple(t.stride() for t in tensors))


# A model calls with a handful of (shape, strides) combinations; remembering their views takes
# ~3 us of Python off every call (the host-overhead target is 30 us per forward).
@functools.lru_cache(maxsize=1024)
def _plane_view(shape: tuple[int, ...], strides: tuple[tuple[int, ...], ...]) -> PlaneView | None:
    n, c = shape[0], shape[1]
    s = math.prod(shape[2:])
    per_tensor = []
    for st in strides:
        ss = _spatial_stride(shape[2:], st[2:])
        if ss is None:
            return None
        per_tensor.append((st[0], st[1], ss))

    def foldable(sn: int, ss: int) -> bool:
        return n == 1 or s == 1 or sn == s * ss

    if all(foldable(sn, ss) for sn, _, ss in per_tensor):
        folded = tuple((0, sc, sn if s == 1 else ss) for sn, sc, ss in per_tensor)
        return PlaneView(1, c, n * s, folded)
    return PlaneView(n, c, s, tuple(per_tensor))


def output_memory_format(x: torch.Tensor) -> torch.memory_format:
    """The memory format torch's batch_norm gives its output (and grad_input) for a non-empty x:
    torch's suggested format, which also makes a sliced channels-last input's output
    channels-last (with torch's own tie-breaking for ambiguous strides)."""
    if x.is_contiguous():
        return torch.contiguous_format
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return suggest_memory_format(x)


def empty_output(x: torch.Tensor) -> torch.Tensor:
    """An uninitialized tensor like x in the layout torch's batch_norm gives its output (and
    gradient): an empty x keeps its own strides, as in torch."""
    if x.numel() == 0:
        return torch.empty_like(x)
    return torch.empty_like(x, memory_format=output_memory_format(x))


def max_offset(view: PlaneView) -> int:
    """Largest element offset any kernel can form (masked rows included) for this view."""
    worst = 0
    for sn, sc, ss in view.strides:
        # Tiles may run one block past the last sample/position before masking; 2x covers it.
        worst = max(worst, 2 * view.n * abs(sn) + view.c * abs(sc) + 2 * view.s * abs(ss))
    return worst
