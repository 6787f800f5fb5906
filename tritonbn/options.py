"""What one batch-norm call is: its options and its tensors, each written down once.

``Options`` holds every non-tensor argument of a call. It is frozen and hashable, and travels
unchanged from the public API (``tritonbn.batch_norm``, the modules) through the custom op to the
launchers; the custom op carries it as one canonical string (``encode`` / ``decode``).

``FORWARD_ARGS`` and ``BACKWARD_ARGS`` describe the ops' tensor arguments -- name, whether
required, whether autograd returns a gradient for it, whether the op updates it. Everything else
is derived from them: the custom-op schemas (tritonbn/ops.py), the argument tuples the launchers
take, the outputs holding updated values, and the gradient tuple of the autograd Function.
"""
from __future__ import annotations

import ast
import collections
import functools
from dataclasses import dataclass, fields

import torch

from ._hashing import cached_hash
from .activations import get as get_activation

__all__ = ["Options", "TensorArg", "FORWARD_ARGS", "BACKWARD_ARGS", "ForwardArgs",
           "BackwardArgs", "FORWARD_OUTPUTS", "BACKWARD_OUTPUTS", "UPDATED", "schema",
           "OPS", "OVERFLOW_POLICIES", "NONFINITE_POLICIES", "MODES"]

# The four kinds of call the planner and the tuning table tell apart.
OPS = ("fwd_train", "fwd_eval", "bwd_train", "bwd_eval")
MODES = ("spatial", "per_activation")
OVERFLOW_POLICIES = ("propagate", "saturate")
NONFINITE_POLICIES = ("propagate", "skip")


@cached_hash
@dataclass(frozen=True)
class Options:
    """The non-tensor arguments of one batch-norm call."""

    training: bool = False          # batch statistics normalize (else the running statistics)
    # weight of this batch in the running statistics; None: the cumulative average, weight
    # 1 / (batches + 1) from the batch counter (per channel when given one)
    momentum: float | None = 0.1
    eps: float = 1e-5               # added to the variance
    activation: str | None = None   # applied last (tritonbn.activations)
    negative_slope: float = 0.01    # leaky_relu's slope; elu's alpha
    renorm: tuple[float, float] | None = None   # Batch Renormalization's (rmax, dmax)
    warmup_steps: int = 0           # renorm: r = 1, d = 0 while the batch counter is below this
    saturate: bool = False          # overflow="saturate": finite results beyond the dtype -> +-max
    skip_nonfinite: bool = False    # nonfinite_stats="skip": keep a channel's running stats
    group: str | None = None        # synchronized statistics over this process group (its name)
    # in-place activated batch norm: the op saves y instead of x and the backward recovers x_hat
    # from it (act^-1, |gamma| kept >= eps); the activation must be invertible
    invertible: bool = False

    @property
    def act_code(self) -> int:
        act = get_activation(self.activation)
        return 0 if act is None else act.code

    @property
    def cumulative(self) -> bool:
        """momentum=None: the running statistics are the average of every batch so far."""
        return self.momentum is None

    @property
    def renorming(self) -> bool:
        """Batch renorm applies in training only; eval is batch norm with running statistics."""
        return self.training and self.renorm is not None

    def encode(self) -> str:
        """A canonical string for the custom op's schema (floats round-trip exactly)."""
        if torch.compiler.is_compiling():  # Dynamo folds this to a constant; no cache needed
            return repr(_values(self))
        return _encode(self)

    @staticmethod
    def decode(text: str) -> "Options":
        return _decode(text)


@functools.lru_cache(maxsize=1024)
def _encode(options: Options) -> str:
    return repr(_values(options))


def _values(options: Options) -> tuple:
    # The fields in order (dataclasses.astuple deep-copies them, which torch 2.11's Dynamo
    # cannot trace; every field is a scalar, a string or a tuple of floats).
    return tuple(getattr(options, f.name) for f in fields(options))


@functools.lru_cache(maxsize=1024)
def _decode(text: str) -> Options:
    values = ast.literal_eval(text)
    return Options(*(tuple(v) if isinstance(v, list) else v for v in values))



@dataclass(frozen=True)
class TensorArg:
    name: str
    required: bool = False      # a Tensor, never None
    grad: bool = False          # autograd returns a gradient for it
    updated: bool = False       # the op returns its new value as output "new_<name>"


FORWARD_ARGS = (
    TensorArg("input", required=True, grad=True),
    TensorArg("weight", grad=True),
    TensorArg("bias", grad=True),
    TensorArg("residual", grad=True),        # added before the activation
    TensorArg("running_mean", updated=True),
    TensorArg("running_var", updated=True),
    TensorArg("batches"),                    # the module's num_batches_tracked (0-d int64), read
    TensorArg("running_count", updated=True),   # per-channel batch counts (C,) int64
    TensorArg("overflow_count", updated=True),    # per-channel counters (C,) int64, accumulated
    TensorArg("overflow_max", updated=True),      # per-channel max |y| (C,) float32
)
BACKWARD_ARGS = (
    TensorArg("grad_output", required=True),
    TensorArg("input", required=True),
    TensorArg("weight"),
    TensorArg("bias"),
    TensorArg("residual"),
    TensorArg("save_mean", required=True),
    TensorArg("save_invstd", required=True),
    TensorArg("save_rd"),                    # renorm's (r, d); None (or empty) without renorm
)
ForwardArgs = collections.namedtuple("ForwardArgs", [a.name for a in FORWARD_ARGS],
                                     defaults=[None] * (len(FORWARD_ARGS) - 1))
BackwardArgs = collections.namedtuple("BackwardArgs", [a.name for a in BACKWARD_ARGS])
UPDATED = tuple(a.name for a in FORWARD_ARGS if a.updated)
FORWARD_OUTPUTS = ("output", "save_mean", "save_invstd", "save_rd") + tuple(
    f"new_{name}" for name in UPDATED)
BACKWARD_OUTPUTS = ("grad_input", "grad_weight", "grad_bias", "grad_residual")
# The backward op's scalar arguments after the tensors, as (name, schema type).
FORWARD_SCALARS = (("options", "str"),)
BACKWARD_SCALARS = (("options", "str"), ("param_grads", "bool"))


def schema(args: tuple[TensorArg, ...], scalars, outputs) -> str:
    """A torch.library schema string, e.g. ``(Tensor input, Tensor? weight, str options) ->
    (Tensor, Tensor)``."""
    params = [f"Tensor{'' if a.required else '?'} {a.name}" for a in args]
    params += [f"{ty} {name}" for name, ty in scalars]
    return f"({', '.join(params)}) -> ({', '.join('Tensor' for _ in outputs)})"
