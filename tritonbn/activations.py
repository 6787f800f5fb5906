"""The activations tritonbn fuses after batch norm: one registry, by name.

Each entry has the kernels' compile-time code (kernels/activations.py, the device side of the same
contract) and torch's own function and derivative, which the float64 reference path, the
unfused fallback of ``tritonbn.fuse`` and the tests use.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .kernels.activations import ACTIVATIONS as _CODES
from .kernels.activations import INVERTIBLE

__all__ = ["Activation", "ACTIVATIONS", "NAMES", "INVERTIBLE", "get", "apply", "derivative"]


@dataclass(frozen=True)
class Activation:
    name: str
    code: int                                   # the kernels' ACT constexpr
    fn: Callable[[torch.Tensor, float], torch.Tensor]          # torch's act(z, slope or alpha)
    grad: Callable[[torch.Tensor, float], torch.Tensor]        # d act / dz, torch's kink rules


def _gelu_grad(z, _slope):
    return (0.5 * (1 + torch.erf(z / math.sqrt(2)))
            + z * torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi))


def _gelu_tanh_grad(z, _slope):
    k = math.sqrt(2 / math.pi)
    t = torch.tanh(k * (z + 0.044715 * z ** 3))
    return 0.5 * (1 + t) + 0.5 * z * (1 - t * t) * k * (1 + 3 * 0.044715 * z * z)


def _sigmoid_grad(z, _slope):
    s = torch.sigmoid(z)
    return s * (1 - s)


def _silu_grad(z, _slope):
    s = torch.sigmoid(z)
    return s * (1 + z * (1 - s))


_TORCH = {
    "relu": (lambda z, _s: F.relu(z), lambda z, _s: (z > 0).to(z.dtype)),
    "relu6": (lambda z, _s: F.relu6(z), lambda z, _s: ((z > 0) & (z < 6)).to(z.dtype)),
    "leaky_relu": (lambda z, s: F.leaky_relu(z, s),
                   lambda z, s: torch.where(z > 0, 1.0, s).to(z.dtype)),
    "silu": (lambda z, _s: F.silu(z), _silu_grad),
    "gelu": (lambda z, _s: F.gelu(z), _gelu_grad),
    "gelu_tanh": (lambda z, _s: F.gelu(z, approximate="tanh"), _gelu_tanh_grad),
    "hardswish": (lambda z, _s: F.hardswish(z),
                  lambda z, _s: torch.where(z < -3, 0.0, torch.where(z > 3, 1.0, z / 3 + 0.5))
                  .to(z.dtype)),
    "sigmoid": (lambda z, _s: torch.sigmoid(z), _sigmoid_grad),
    "tanh": (lambda z, _s: torch.tanh(z), lambda z, _s: 1 - torch.tanh(z) ** 2),
    "elu": (lambda z, alpha: F.elu(z, alpha),
            lambda z, alpha: torch.where(z > 0, 1.0, alpha * torch.exp(z.clamp(max=0)))
            .to(z.dtype)),
}

ACTIVATIONS: dict[str, Activation] = {
    name: Activation(name, _CODES[name], *_TORCH[name]) for name in _CODES if name is not None}
assert set(_TORCH) == set(ACTIVATIONS), "host registry and kernel codes must name the same set"
NAMES: tuple[str, ...] = tuple(ACTIVATIONS)


def get(name: str | None) -> Activation | None:
    """The registry entry, None for no activation; ValueError for an unknown name."""
    if name is None or name == "":
        return None
    try:
        return ACTIVATIONS[name]
    except (KeyError, TypeError):
        names = ", ".join(repr(a) for a in NAMES)
        raise ValueError(f"unknown activation {name!r}; expected None or one of {names}") from None


def apply(z: torch.Tensor, name: str | None, slope: float = 0.01) -> torch.Tensor:
    """torch's act(z) for a registered name (identity for None)."""
    act = get(name)
    return z if act is None else act.fn(z, slope)


def derivative(z: torch.Tensor, name: str | None, slope: float = 0.01) -> torch.Tensor:
    """d act / dz in closed form (torch's conventions at the kinks: relu'(0) = 0)."""
    act = get(name)
    return torch.ones_like(z) if act is None else act.grad(z, slope)
