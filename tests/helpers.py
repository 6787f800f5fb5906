"""Shared test helpers: inputs, per-dtype tolerances, and comparison against the float64 reference."""
from __future__ import annotations

import math

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tritonbn.reference import batch_norm_reference

# Per-dtype base tolerances (atol, rtol) for one rounding of a result of magnitude ~1:
# the dtype's unit roundoff times a small factor for the few float32 operations before it.
BASE_TOL = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (2e-6, 2e-6),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}


def tol(dtype: torch.dtype, reduction_size: int) -> dict:
    """atol/rtol for dtype, grown with the reduction size (float32 sums lose ~log2(M) bits)."""
    atol, rtol = BASE_TOL[dtype]
    grow = 1.0 + math.log2(max(reduction_size, 2)) / 4.0
    return dict(atol=atol * grow, rtol=rtol * grow)


def reduction_size(x: torch.Tensor) -> int:
    return x.numel() // x.shape[1] if x.shape[1] else 0


def make_input(shape, dtype, layout, device, scale=2.0, shift=0.5, seed=0):
    """An input of `shape` in one of the layouts: contiguous, channels_last, or strided views."""
    g = torch.Generator().manual_seed(seed)
    if layout == "contiguous":
        x = torch.randn(shape, generator=g)
    elif layout == "channels_last":
        fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
        x = torch.randn(shape, generator=g).to(memory_format=fmt)
    elif layout == "sliced":
        # Every other sample of a twice-as-large batch: non-contiguous, still a plane view.
        big = torch.randn((2 * shape[0],) + tuple(shape[1:]), generator=g)
        x = big[::2]
    elif layout == "transposed":
        # Last two dims swapped in memory: no single spatial stride, needs the copy fallback;
        # for 2-D input, (C, N) memory transposed.
        if len(shape) == 2:
            x = torch.randn(shape[::-1], generator=g).t()
        else:
            perm_shape = tuple(shape[:-2]) + (shape[-1], shape[-2])
            x = torch.randn(perm_shape, generator=g).transpose(-1, -2)
    else:
        raise ValueError(layout)
    x = x * scale + shift
    return x.to(device=device, dtype=dtype)


def reference(x, running_mean, running_var, weight, bias, training, momentum=0.1, eps=1e-5):
    """Float64 reference on copies: returns (y64, rm_after, rv_after, mean, invstd)."""
    rm = None if running_mean is None else running_mean.detach().clone()
    rv = None if running_var is None else running_var.detach().clone()
    y, mean, invstd = batch_norm_reference(x, rm, rv, weight, bias, training, momentum, eps)
    return y, rm, rv, mean, invstd


def assert_close(actual, expected, **tolerance):
    torch.testing.assert_close(actual.double().cpu(), expected.double().cpu(), equal_nan=True,
                               **tolerance)


class OpLog(TorchDispatchMode):
    """The operators dispatched inside the block that produce a tensor of ``numel`` elements:
    what touched activation-sized data."""

    def __init__(self, numel: int):
        super().__init__()
        self.numel, self.ops = numel, set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outs = out if isinstance(out, (tuple, list)) else [out]
        if any(isinstance(o, torch.Tensor) and o.numel() == self.numel for o in outs):
            self.ops.add(str(func))
        return out


# Operators that touch activations without computing on them: views, allocations, and autograd's
# copy of a gradient into a leaf's .grad (the residual's gradient is grad_output itself when no
# activation follows the add).
NO_COMPUTE = {"aten.detach.default", "aten.empty_like.default", "aten.empty.memory_format",
              "aten.empty_strided.default", "aten.new_empty_strided.default", "aten.copy_.default"}
TRITONBN_OPS = {"tritonbn.batch_norm_forward.default", "tritonbn.batch_norm_backward.default"}


def saved_bytes(fn) -> int:
    """Bytes of distinct storages autograd saves for backward while fn runs."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())
