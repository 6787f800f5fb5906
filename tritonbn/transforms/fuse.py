"""Fuse batch norm with the residual add and activation after it, found in a model with torch.fx.

``tritonbn.fuse(model)`` traces the model and rewrites each ``BN -> activation``,
``BN -> add -> activation`` and ``BN -> add`` chain into one call of a fused batch-norm module,
which computes act(BN(x) + residual) in the batch-norm kernels, forward and backward: the
pre-activation tensor is neither written nor saved for backward.
"""
from __future__ import annotations

import collections
import copy
import numbers
import operator
import os
import traceback
import warnings
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .. import activations
from ..nn import BatchNorm1d, BatchNorm2d, BatchNorm3d, BatchNormAct1d, BatchNormAct2d, BatchNormAct3d
from .convert import convert_model

__all__ = ["fuse", "FusedBatchNormAct1d", "FusedBatchNormAct2d", "FusedBatchNormAct3d"]


# ----------------------------------------------------------------------------------------------
# The fused module


def _fits(input: Tensor, residual) -> bool:
    """Whether ``BN(input) + residual`` is what the fused op computes: a tensor of the input's
    shape (no broadcasting) on its device, whose dtype does not promote the sum past the
    input's dtype (the fused op's output has the input's dtype)."""
    return (isinstance(residual, Tensor) and residual.shape == input.shape
            and residual.device == input.device
            and torch.promote_types(input.dtype, residual.dtype) == input.dtype)


class _FusedMixin:
    """forward(input, residual=None) = act(BN(input) + residual), fused when the residual fits.

    fx sees no shapes, so a rewritten add can meet a residual that broadcasts or promotes the
    dtype; then this falls back to torch's add and activation after tritonbn's batch norm.
    """

    def forward(self, input: Tensor, residual=None) -> Tensor:
        if residual is None or _fits(input, residual):
            return self._run(input, residual)
        z = self._run(input, activation=False) + residual
        return activations.apply(z, self.activation, self.negative_slope)


class FusedBatchNormAct1d(_FusedMixin, BatchNormAct1d):
    """What ``tritonbn.fuse`` makes of a BatchNorm1d with the add / activation after it."""


class FusedBatchNormAct2d(_FusedMixin, BatchNormAct2d):
    """What ``tritonbn.fuse`` makes of a BatchNorm2d with the add / activation after it."""


class FusedBatchNormAct3d(_FusedMixin, BatchNormAct3d):
    """What ``tritonbn.fuse`` makes of a BatchNorm3d with the add / activation after it."""


# Exact types: a user's subclass may override forward, which a class swap would drop. (convert_model
# runs first, so torch's classes have become tritonbn's by the time the rewrite looks.)
_FUSED_CLASS = {BatchNorm1d: FusedBatchNormAct1d, BatchNorm2d: FusedBatchNormAct2d,
                BatchNorm3d: FusedBatchNormAct3d}


# ----------------------------------------------------------------------------------------------
# Recognizing the activations and adds in an fx graph

# The activations: modules by exact type (a subclass may compute something else); functions and
# tensor methods as (activation, names of the arguments after the input).
_ACT_MODULES = {nn.ReLU: "relu", nn.ReLU6: "relu6", nn.LeakyReLU: "leaky_relu", nn.SiLU: "silu",
                nn.GELU: "gelu", nn.Hardswish: "hardswish", nn.Sigmoid: "sigmoid", nn.Tanh: "tanh"}
_ACT_FUNCTIONS = {
    F.relu: ("relu", ("inplace",)), torch.relu: ("relu", ()), torch.relu_: ("relu", ()),
    F.relu6: ("relu6", ("inplace",)),
    F.leaky_relu: ("leaky_relu", ("negative_slope", "inplace")),
    F.leaky_relu_: ("leaky_relu", ("negative_slope",)),
    F.silu: ("silu", ("inplace",)),
    F.gelu: ("gelu", ("approximate",)),
    F.hardswish: ("hardswish", ("inplace",)),
    torch.sigmoid: ("sigmoid", ()), torch.sigmoid_: ("sigmoid", ()),
    torch.tanh: ("tanh", ()), torch.tanh_: ("tanh", ()),
}  # F.sigmoid and F.tanh call the tensor methods, which fx records
_ACT_METHODS = {"relu": ("relu", ()), "relu_": ("relu", ()), "sigmoid": ("sigmoid", ()),
                "sigmoid_": ("sigmoid", ()), "tanh": ("tanh", ()), "tanh_": ("tanh", ())}
# add spellings -> whether it writes into its first operand (then only that one may be the BN's).
# fx's symbolic tracing records ``+=`` and operator.iadd as operator.add (its Proxy has no
# __iadd__); iadd is listed for graphs built by other means.
_ADD_FUNCTIONS = {operator.add: False, torch.add: False, operator.iadd: True}
_ADD_METHODS = {"add": False, "add_": True}


def _has_hooks(m: nn.Module) -> bool:
    # A hook sees the module's own output (or input); after fusion it would see another value.
    return any(getattr(m, name, None) for name in ("_forward_hooks", "_forward_pre_hooks",
                                                   "_backward_hooks", "_backward_pre_hooks"))


def _call_args(node: fx.Node, names: tuple):
    """(input, {name: value}) of a call whose arguments after the input are ``names``; None when
    it passes anything else (``out=``, an unknown keyword, too many arguments)."""
    args, kwargs = list(node.args), dict(node.kwargs)
    if not args and "input" in kwargs:
        args = [kwargs.pop("input")]
    if not args or len(args) - 1 > len(names) or not set(kwargs) <= set(names):
        return None
    params = dict(zip(names, args[1:]))
    if set(params) & set(kwargs):
        return None
    params.update(kwargs)
    return args[0], params


def _activation(node: fx.Node, modules: dict):
    """(input node, activation, negative_slope) when ``node`` is a fusable activation, else None."""
    if node.op == "call_module":
        m = modules[node.target]
        name = _ACT_MODULES.get(type(m))
        if name is None or _has_hooks(m) or len(node.args) != 1 or node.kwargs:
            return None
        if name == "gelu":
            name = {"none": "gelu", "tanh": "gelu_tanh"}.get(m.approximate)
        return (node.args[0], name, float(getattr(m, "negative_slope", 0.01))) if name else None
    if node.op == "call_function":
        spec = _ACT_FUNCTIONS.get(node.target) if _hashable(node.target) else None
    elif node.op == "call_method":
        spec = _ACT_METHODS.get(node.target)
    else:
        return None
    if spec is None:
        return None
    name, names = spec
    parsed = _call_args(node, names)
    if parsed is None:
        return None
    src, params = parsed
    # Constants only: a value computed in the graph (a Node) is unknown until run time.
    if not isinstance(params.get("inplace", False), bool):
        return None  # an in-place activation is fine: its input has no other use (checked)
    slope = params.get("negative_slope", 0.01)
    if isinstance(slope, bool) or not isinstance(slope, numbers.Real):
        return None
    if name == "gelu":
        name = {"none": "gelu", "tanh": "gelu_tanh"}.get(params.get("approximate", "none"))
    return (src, name, float(slope)) if name else None


def _hashable(target) -> bool:
    try:
        hash(target)
    except TypeError:
        return False
    return True


def _residual(node: fx.Node, bn_node: fx.Node):
    """The other operand when ``node`` adds something to ``bn_node``'s output, else None."""
    if node.op == "call_function" and _hashable(node.target) and node.target in _ADD_FUNCTIONS:
        writes_first = _ADD_FUNCTIONS[node.target]
    elif node.op == "call_method" and node.target in _ADD_METHODS:
        writes_first = _ADD_METHODS[node.target]
    else:
        return None
    kwargs = dict(node.kwargs)
    alpha = kwargs.pop("alpha", 1)
    if len(node.args) != 2 or kwargs or isinstance(alpha, bool) or alpha != 1:
        return None  # out=, or a scaled add
    a, b = node.args
    if a is bn_node:
        other = b
    elif b is bn_node and not writes_first:
        # ``r.add_(bn(x))`` writes into r, which other code may still read: left alone.
        other = a
    else:
        return None
    # A parameter or constant (get_attr) is never an activation-shaped tensor: leave that add.
    if not isinstance(other, fx.Node) or other.op == "get_attr":
        return None
    return other


def _uses(user: fx.Node, node: fx.Node) -> int:
    count = 0

    def visit(n):
        nonlocal count
        count += n is node
        return n
    fx.node.map_arg((user.args, user.kwargs), visit)
    return count


def _sole_user(node: fx.Node) -> Optional[fx.Node]:
    """The one node that reads ``node``'s value, reading it once; None otherwise."""
    if len(node.users) != 1:
        return None
    user = next(iter(node.users))
    return user if _uses(user, node) == 1 else None


@dataclass
class _Match:
    last: fx.Node                 # the node whose value the fused call produces
    dead: list                    # the nodes the fused call replaces, last first (BN not included)
    residual: Optional[fx.Node]
    activation: Optional[str]
    slope: float = 0.01


def _match(bn_node: fx.Node, modules: dict) -> Optional[_Match]:
    """The longest fusable chain after a batch norm: BN -> act, BN -> add -> act, or BN -> add."""
    user = _sole_user(bn_node)
    if user is None:
        return None
    act = _activation(user, modules)
    if act is not None and act[0] is bn_node:
        return _Match(user, [user], None, act[1], act[2])
    residual = _residual(user, bn_node)
    if residual is None:
        return None
    after = _sole_user(user)
    act = _activation(after, modules) if after is not None else None
    if act is not None and act[0] is user:
        return _Match(after, [after, user], residual, act[1], act[2])
    return _Match(user, [user], residual, None)  # the add's value is read elsewhere too


def _fusable_bn(node: fx.Node, modules: dict, calls: collections.Counter):
    if node.op != "call_module":
        return None
    m = modules[node.target]
    if type(m) not in _FUSED_CLASS or _has_hooks(m):
        return None
    # The module becomes the fused one, so it must have no other call site; and its only
    # argument is the input (a call with anything else is not a plain batch norm).
    if calls[node.target] != 1 or len(node.args) != 1 or node.kwargs:
        return None
    return m


def _rewrite(gm: fx.GraphModule) -> int:
    """Replace every fusable chain in ``gm``'s graph; returns how many were fused."""
    graph = gm.graph
    modules = dict(gm.named_modules())
    calls = collections.Counter(n.target for n in graph.nodes if n.op == "call_module")
    fused = 0
    for node in list(graph.nodes):
        bn = _fusable_bn(node, modules, calls)
        match = _match(node, modules) if bn is not None else None
        if match is None:
            continue
        bn.__class__ = _FUSED_CLASS[type(bn)]  # same object: same Parameters, buffers, mode
        bn.activation, bn.negative_slope = match.activation, match.slope
        kwargs = {"residual": match.residual} if match.residual is not None else {}
        # At the chain's last node: the residual may be computed after the batch norm.
        with graph.inserting_before(match.last):
            call = graph.call_module(node.target, node.args, kwargs)
        match.last.replace_all_uses_with(call)
        for dead in match.dead + [node]:
            graph.erase_node(dead)
        fused += 1
    return fused


# ----------------------------------------------------------------------------------------------
# Tracing, and what the GraphModule keeps


class _Tracer(fx.Tracer):
    """fx's tracer with tritonbn's modules as leaves, remembering where tracing failed."""

    def __init__(self):
        super().__init__()
        # (exception, qualified name, class name) of the innermost module it came out of
        self.failed_in: Optional[tuple] = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return (type(m).__module__.startswith("tritonbn.")
                or super().is_leaf_module(m, module_qualified_name))

    def call_module(self, m, forward, args, kwargs):
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception as exc:
            # The innermost module sees an exception first; the outer ones see the same object.
            if self.failed_in is None or self.failed_in[0] is not exc:
                try:
                    path = self.path_of_module(m)
                except NameError:
                    path = "?"
                self.failed_in = (exc, path, type(m).__name__)
            raise

    def where(self, exc: BaseException) -> str:
        if self.failed_in is None or self.failed_in[0] is not exc:
            return "in the model's own forward"
        return f"in module '{self.failed_in[1]}' ({self.failed_in[2]})"


def _user_frame(exc: BaseException) -> str:
    """file:line of the innermost frame outside torch and this file: the user's code."""
    torch_dir = os.path.dirname(torch.__file__)
    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if not f.filename.startswith(torch_dir) and f.filename != __file__]
    return f", at {frames[-1].filename}:{frames[-1].lineno}" if frames else ""


def _carry_state(gm: fx.GraphModule, model: nn.Module) -> None:
    """Give ``gm`` every Parameter and buffer of ``model`` at the same path, as the same tensors.

    fx copies only what the traced forward touches; a module the forward does not call (a
    branch not taken while tracing, an unused head) would drop out of the state_dict and
    checkpoints would no longer load both ways. Also keeps buffers non-persistent that fx
    re-registered as persistent.
    """
    for path, module in model.named_modules():
        if not (module._parameters or module._buffers):
            continue
        target, parts = gm, path.split(".") if path else []
        for i, atom in enumerate(parts):
            if not hasattr(target, atom):
                # gm has nothing from here down: the original subtree, whole and unused
                prefix = ".".join(parts[:i + 1])
                target.add_module(atom, model.get_submodule(prefix))
            target = getattr(target, atom)
        if target is module:
            continue
        for name, p in module._parameters.items():
            if name not in target._parameters:
                target.register_parameter(name, p)
        for name, b in module._buffers.items():
            if name not in target._buffers:
                target.register_buffer(name, b)
        target._non_persistent_buffers_set |= module._non_persistent_buffers_set & set(
            target._buffers)


def fuse(model: nn.Module) -> nn.Module:
    """Fuse each batch norm with the residual add and activation that follow it.

    Returns a new ``torch.fx.GraphModule``; ``model`` is not changed (the rewrite works on a deep
    copy, as ``fold_into_conv`` does). In the result

    * each ``torch.nn`` or tritonbn ``BatchNorm1d/2d/3d`` followed by an activation, by an add
      then an activation, or by an add alone is one ``FusedBatchNormAct*d`` call computing
      act(BN(x) + residual) in the batch-norm kernels (forward and backward). Activations: ReLU,
      ReLU6, LeakyReLU, SiLU, GELU (approximate "none" or "tanh"), Hardswish, Sigmoid, Tanh, as
      ``nn`` modules, ``torch.nn.functional`` calls (``inplace=True`` too) and ``torch.relu`` /
      ``tensor.relu()``-style calls; adds: ``+``, ``+=``, ``torch.add`` (alpha 1),
      ``tensor.add`` / ``add_``, with the batch norm as either operand (``r.add_(bn(x))``
      excepted: it writes into r, which other code may read). fx records ``+=`` as ``+``,
      so, as in any fx-traced model, ``y += r`` no longer writes into y;
    * every other batch norm is converted as ``tritonbn.convert_model`` converts it;
    * the state_dict has the same keys and tensors' values as ``model``'s, so checkpoints load
      both ways; a fused module keeps the batch norm's Parameters and buffers, training/eval
      behaviour (``momentum=None``, ``track_running_stats``) and input checks. Train the result
      with an optimizer built on its own ``parameters()``.

    A chain is left alone when an intermediate value (the batch norm's output, or the add's
    before an activation) has another use, when the batch-norm module is called more than once
    or has hooks, and when the add's other operand is a constant or a parameter. fx sees no
    shapes: a residual that turns out at run time to broadcast, or to promote the dtype, is
    added by torch after tritonbn's batch norm (same result, unfused). As always with fx, Python
    control flow in ``forward`` (``if self.training:``) is fixed at the value it had here.

    A model torch.fx cannot trace gives a warning saying where tracing stopped (module, source
    line, fx's message) and, like a bare batch-norm module, a deep copy converted by
    ``tritonbn.convert_model``, nothing fused.
    """
    # The copy's batch norms become tritonbn's (in place: the GraphModule below holds the same
    # module objects); the fusable ones then change class once more, to the fused modules.
    model = convert_model(copy.deepcopy(model))
    if isinstance(model, _BatchNorm):
        return model  # a bare batch norm: nothing after it to fuse (and fx would trace into it)
    tracer = _Tracer()
    try:
        graph = tracer.trace(model)
    except Exception as exc:  # noqa: BLE001 - any tracing failure falls back, with the reason
        warnings.warn(f"tritonbn.fuse: torch.fx could not trace {type(model).__name__} "
                      f"{tracer.where(exc)}{_user_frame(exc)}: {type(exc).__name__}: {exc}. "
                      "Nothing was fused; returning a copy converted by tritonbn.convert_model "
                      "instead.", stacklevel=2)
        return model
    gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
    _rewrite(gm)
    gm.graph.lint()
    gm.delete_all_unused_submodules()  # the fused activations' modules
    _carry_state(gm, model)
    gm.recompile()
    return gm
