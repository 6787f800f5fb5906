"""Fuse batch norm with the residual add and activation after it, found in a model with torch.fx.

``tritonbn.fuse(model)`` traces the model and rewrites each ``BN -> activation``,
``BN -> add -> activation`` and ``BN -> add`` chain into one call of a fused batch-norm module,
which computes act(BN(x) + residual) in the batch-norm kernels, forward and backward: the
pre-activation tensor is neither written nor saved for backward.

The rewritten model must behave as the original in training and in eval mode, whichever it was
traced in. fx runs a module's Python forward with proxies, so ``if self.training:`` (timm's
BatchNormAct2d, a network returning auxiliary outputs in training) and functions called with
``self.training`` as an argument (torchvision's stochastic depth) are fixed at the mode of the
trace. So the model is traced in training mode and in eval mode: where the two graphs differ, the
innermost module whose forward made the difference becomes one opaque call (a leaf: its own
forward runs, reading its mode at run time), and the model is traced again, until the graphs
agree. Batch norms are leaves from the start (converted first: their forward reads the mode at
run time). A root forward that depends on the mode itself cannot be made a leaf: then, as for a
model fx cannot trace, its submodules are fused one by one.
"""
from __future__ import annotations

import collections
import copy
import inspect
import numbers
import operator
import os
import sys
import traceback
import warnings
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..nn import (BatchNorm1d, BatchNorm2d, BatchNorm3d, BatchNormAct1d, BatchNormAct2d,
                  BatchNormAct3d, FrozenBatchNorm2d, SyncBatchNorm)
from .. import activations
from .convert import convert
from .fused_modules import (FusedBatchNormAct1d, FusedBatchNormAct2d, FusedBatchNormAct3d,
                    FusedFrozenBatchNorm2d, FusedSyncBatchNorm)
from .kinds import activation_of, has_hooks, is_drop, is_noop, qualname
from .report import TransformReport, class_name, is_batch_norm_like, warn_left_on_torch

__all__ = ["fuse", "FusedBatchNormAct1d", "FusedBatchNormAct2d", "FusedBatchNormAct3d",
           "FusedFrozenBatchNorm2d", "FusedSyncBatchNorm"]


# Exact types: a user's subclass may override forward, which a class swap would drop.
# (convert runs first, so torch's classes have become tritonbn's by the time the rewrite looks.)
# A layer that already has an activation (timm's BatchNormAct2d converted with it) is not
# fused further: act(BN(x)) + r is not the fused op's act(BN(x) + r).
_FUSED_CLASS = {BatchNorm1d: FusedBatchNormAct1d, BatchNorm2d: FusedBatchNormAct2d,
                BatchNorm3d: FusedBatchNormAct3d, BatchNormAct1d: FusedBatchNormAct1d,
                BatchNormAct2d: FusedBatchNormAct2d, BatchNormAct3d: FusedBatchNormAct3d,
                SyncBatchNorm: FusedSyncBatchNorm, FrozenBatchNorm2d: FusedFrozenBatchNorm2d}


# ----------------------------------------------------------------------------------------------
# Recognizing the activations and adds in an fx graph

# Functions and tensor methods as (activation, names of the arguments after the input); modules
# are recognized by tritonbn.transforms.kinds.activation_of.
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
    F.elu: ("elu", ("alpha", "inplace")), F.elu_: ("elu", ("alpha",)),
}  # F.sigmoid and F.tanh call the tensor methods, which fx records
_ACT_METHODS = {"relu": ("relu", ()), "relu_": ("relu", ()), "sigmoid": ("sigmoid", ()),
                "sigmoid_": ("sigmoid", ()), "tanh": ("tanh", ()), "tanh_": ("tanh", ())}
# add spellings -> whether it writes into its first operand (then only that one may be the BN's).
# fx's symbolic tracing records ``+=`` and operator.iadd as operator.add (its Proxy has no
# __iadd__); iadd is listed for graphs built by other means.
_ADD_FUNCTIONS = {operator.add: False, torch.add: False, operator.iadd: True}
_ADD_METHODS = {"add": False, "add_": True}


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
    """(input node, activation, negative_slope -- elu's alpha for "elu") when ``node`` is a
    fusable activation, else None."""
    if node.op == "call_module":
        m = modules[node.target]
        spec = activation_of(m)
        if spec is None or spec[0] is None or len(node.args) != 1 or node.kwargs:
            return None
        return node.args[0], spec[0], spec[1]
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
    # the kernels' one activation parameter: leaky_relu's slope, or elu's alpha
    slope = params.get("alpha", 1.0) if name == "elu" else params.get("negative_slope", 0.01)
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


def _residual(node: fx.Node, value: fx.Node):
    """The other operand when ``node`` adds something to ``value``, else None."""
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
    if a is value:
        other = b
    elif b is value and not writes_first:
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


def _describe(node: fx.Node, modules: dict) -> str:
    if node.op == "call_module":
        return f"{type(modules[node.target]).__name__} '{node.target}'"
    if node.op == "output":
        return "the output"
    target = getattr(node.target, "__name__", str(node.target))
    return f"{target}()" if node.op == "call_function" else f".{target}()"


def _sole_user(node: fx.Node, modules: dict):
    """(the one node that reads ``node``'s value, once; "") or (None, why not)."""
    users = list(node.users)
    if not users:
        return None, "its output is not used"
    if len(users) > 1 or _uses(users[0], node) != 1:
        names = ", ".join(_describe(u, modules) for u in users[:3])
        return None, f"its output is read {sum(_uses(u, node) for u in users)} times ({names})"
    return users[0], ""


# Targets that draw random numbers (drop modules are recognized by class).
_RANDOM_WORDS = ("dropout", "bernoulli", "rand", "normal", "uniform", "multinomial",
                 "drop_path", "stochastic_depth", "drop_block", "exponential_", "geometric_",
                 "cauchy_", "random_")


def _may_draw_random(node: fx.Node, modules: dict) -> bool:
    if node.op == "call_module":
        m = modules[node.target]
        torch_module = type(m).__module__.startswith(("torch.nn.", "tritonbn."))
        return not torch_module or any(is_drop(s) for s in m.modules())
    if node.op in ("call_function", "call_method"):
        name = getattr(node.target, "__name__", str(node.target)).lower()
        return any(word in name for word in _RANDOM_WORDS)
    return False


@dataclass
class _Match:
    last: fx.Node                 # the node whose value the fused call produces
    dead: list                    # the nodes the fused call replaces, in graph order (BN not included)
    residual: Optional[fx.Node] = None
    activation: Optional[str] = None
    slope: float = 0.01
    drop: Optional[str] = None    # target of a drop module run between BN and the add
    noops: list = field(default_factory=list)


def _follow(node: fx.Node, modules: dict, skipped: list):
    """(the user of ``node``'s value after any no-op modules, the value it reads, "") or
    (None, value, why not). The no-op calls passed are appended to ``skipped``."""
    while True:
        user, why = _sole_user(node, modules)
        if user is None:
            return None, node, why
        if (user.op == "call_module" and is_noop(modules[user.target]) and user.args == (node,)
                and not user.kwargs):
            skipped.append(user)
            node = user
            continue
        return user, node, ""


def _match(bn_node: fx.Node, bn: nn.Module, modules: dict, calls: collections.Counter):
    """The longest fusable chain after a batch norm (no-op modules in between are skipped):
    BN -> act, BN -> add -> act, BN -> add, each optionally with a drop module (stochastic
    depth, drop path, dropout) right after the batch norm. (match, "") or (None, why not)."""
    dead: list = []
    user, value, why = _follow(bn_node, modules, dead)
    if user is None:
        return None, why
    drop = None
    if (user.op == "call_module" and is_drop(modules[user.target]) and user.args == (value,)
            and not user.kwargs and calls[user.target] == 1):
        drop_node = user
        after: list = [user]
        user, value, why = _follow(user, modules, after)
        if user is None:
            return None, f"only {_describe(drop_node, modules)} follows; {why}"
        dead += after
        drop = drop_node.target
    act = _activation(user, modules)
    if act is not None and act[0] is value:
        return _Match(user, dead + [user], None, act[1], act[2], drop), ""
    if user.op == "call_module" and user.kwargs.get("residual") is value:
        # a shortcut's batch norm: the add it feeds is fused into the other branch's
        return None, f"it is the residual added by the fused '{user.target}'"
    residual = _residual(user, value)
    if residual is None:
        return None, f"followed by {_describe(user, modules)}: nothing to fuse"
    dead.append(user)
    tail: list = []
    after, value, _ = _follow(user, modules, tail)
    act = _activation(after, modules) if after is not None else None
    if act is not None and act[0] is value:
        return _Match(after, dead + tail + [after], residual, act[1], act[2], drop), ""
    return _Match(user, dead, residual, None, 0.01, drop), ""


def _fusable_bn(node: fx.Node, modules: dict, calls: collections.Counter):
    """(module, "") when the call is a batch norm the rewrite may fuse, else (None, why not)."""
    m = modules[node.target]
    if type(m) not in _FUSED_CLASS:
        if getattr(m, "activation", None) is not None:
            return None, ""      # fused at conversion (the record says which activation)
        return None, f"{class_name(m)} is not fused by tritonbn.fuse"
    if getattr(m, "activation", None) is not None:
        return None, ""
    if has_hooks(m):
        return None, "it has hooks, which would see the fused output"
    # The module becomes the fused one, so it must have no other call site; and its only
    # argument is the input (a call with anything else is not a plain batch norm).
    if calls[node.target] != 1:
        return None, f"the module is called {calls[node.target]} times"
    if len(node.args) != 1 or node.kwargs:
        return None, "called with more than its input"
    return m, ""


def _describe_fusion(match: _Match) -> str:
    parts = (["add"] if match.residual is not None else []) + (
        [match.activation] if match.activation else [])
    return "+".join(parts)


def _between_random(start: fx.Node, stop: fx.Node, skip: set, modules: dict) -> bool:
    """Whether a node strictly between ``start`` and ``stop`` (graph order), other than those in
    ``skip``, may draw random numbers."""
    node = start.next
    while node is not stop and node.op != "root":
        if node not in skip and _may_draw_random(node, modules):
            return True
        node = node.next
    return False


def _rewrite(gm: fx.GraphModule, records: dict, prefix: str) -> int:
    """Replace every fusable chain in ``gm``'s graph; returns how many were fused. ``records``
    (layer path -> LayerRecord) get what happened to each batch norm called in the graph."""
    graph = gm.graph
    modules = dict(gm.named_modules())
    calls = collections.Counter(n.target for n in graph.nodes if n.op == "call_module")
    fused = 0
    for node in list(graph.nodes):
        if node.op != "call_module" or not is_batch_norm_like(modules[node.target]):
            continue
        record = records.get(prefix + node.target)
        bn, why = _fusable_bn(node, modules, calls)
        match = None
        if bn is not None:
            match, why = _match(node, bn, modules, calls)
        if match is not None and match.drop is not None:
            drop_node = next(n for n in match.dead if n.target == match.drop)
            if _between_random(drop_node, match.last, set(match.dead), modules):
                match, why = None, ("random operations run between the drop module and the "
                                    "add: fusing would reorder the random draws")
        if match is None:
            if record is not None and why and not record.fused:
                record.note = _join(record.note, f"not fused: {why}")
            continue
        bn.__class__ = _FUSED_CLASS[type(bn)]  # same object: same Parameters, buffers, mode
        if match.activation is not None:
            bn.activation, bn.negative_slope = match.activation, match.slope
        if match.drop is not None:
            # the drop module moves into the fused module, which runs it while it drops
            bn.add_module("drop", modules[match.drop])
        kwargs = {"residual": match.residual} if match.residual is not None else {}
        # At the chain's last node: the residual may be computed after the batch norm.
        with graph.inserting_before(match.last):
            call = graph.call_module(node.target, node.args, kwargs)
        match.last.replace_all_uses_with(call)
        for dead in reversed(match.dead):   # users before what they read
            graph.erase_node(dead)
        graph.erase_node(node)
        fused += 1
        if record is not None:
            record.result = class_name(bn)
            record.fused = _describe_fusion(match)
            if match.drop is not None:
                record.note = _join(record.note, (
                    f"{type(bn.drop).__name__} '{prefix + match.drop}' moved into it: while "
                    "it drops (training), it and what follows run in torch"))
    return fused


# ----------------------------------------------------------------------------------------------
# In-place activated batch norm: fuse(model, inplace=True)

# The layers the pass may make invertible: exact tritonbn classes (renorm, per-activation and
# InPlaceABN layers are left as they are).
_INVERTIBLE_CLASSES = frozenset(_FUSED_CLASS) | frozenset(_FUSED_CLASS.values())

# Calls whose result may be (a view of) their first argument: an in-place write into the
# result writes into the argument. Methods, functions, attributes (``y.T``, ``y.data``) and
# modules; ``.to()``-style conversions return their input itself when nothing changes.
_VIEW_METHODS = frozenset((
    "view", "view_as", "reshape", "reshape_as", "flatten", "unflatten", "squeeze", "unsqueeze",
    "transpose", "permute", "t", "expand", "expand_as", "narrow", "select", "split",
    "split_with_sizes", "chunk", "tensor_split", "unbind", "contiguous", "detach", "as_strided",
    "unfold", "movedim", "moveaxis", "swapaxes", "swapdims", "diagonal", "__getitem__", "to",
    "type", "type_as", "float", "double", "half", "bfloat16", "cpu", "cuda", "view_as_real",
    "align_as", "refine_names", "rename"))
_VIEW_FUNCTIONS = frozenset((
    torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze, torch.transpose, torch.permute,
    torch.t, torch.narrow, torch.select, torch.split, torch.chunk, torch.tensor_split,
    torch.unbind, torch.movedim, torch.moveaxis, torch.swapaxes, torch.swapdims, torch.detach,
    torch.diagonal, torch.as_strided, torch.real, torch.imag, operator.getitem))
_VIEW_ATTRIBUTES = frozenset(("T", "mT", "H", "mH", "data", "real", "imag"))
_VIEW_MODULES = (nn.Flatten, nn.Unflatten, nn.Identity)
# Operators that write into their first argument.
_INPLACE_OPERATORS = frozenset((
    operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
    operator.imod, operator.ipow, operator.imatmul, operator.iand, operator.ior, operator.ixor,
    operator.ilshift, operator.irshift, operator.setitem))
# What may produce a batch norm's input for the layer to write y over it: a call returning a new
# tensor that it does not save for backward (a convolution and a linear layer save their input,
# an add or a concatenation nothing). Anything else may return a view of a tensor still read
# elsewhere, or its output saved (ReLU's), or the caller's own tensor (the model's input).
_FRESH_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
                  nn.ConvTranspose3d, nn.Linear)
_FRESH_FUNCTIONS = frozenset((F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d,
                              F.conv_transpose2d, F.conv_transpose3d, F.linear, operator.add,
                              operator.sub, torch.add, torch.sub, torch.cat, torch.concat))
_FRESH_METHODS = frozenset(("add", "sub"))


def _is_view(user: fx.Node, value: fx.Node, modules: dict) -> bool:
    """Whether ``user`` returns (a view of) ``value`` itself, which it takes first."""
    if not user.args or user.args[0] is not value:
        return False
    if user.op == "call_method":
        return user.target in _VIEW_METHODS
    if user.op == "call_function":
        if user.target is getattr:
            return len(user.args) > 1 and user.args[1] in _VIEW_ATTRIBUTES
        return _hashable(user.target) and user.target in _VIEW_FUNCTIONS
    if user.op == "call_module":
        return type(modules[user.target]) in _VIEW_MODULES
    return False


def _inplace_argument(node: fx.Node) -> bool:
    """Whether a call passes ``inplace`` as True (or as a value known only at run time)."""
    value = node.kwargs.get("inplace", False)
    if value is False and callable(node.target):
        try:
            bound = inspect.signature(node.target).bind(*node.args, **node.kwargs)
        except (TypeError, ValueError):
            return False
        value = bound.arguments.get("inplace", False)
    return value is not False and value is not None and value != 0


def _writer(user: fx.Node, value: fx.Node, modules: dict, root: bool) -> str:
    """How ``user`` writes into ``value`` in place, or may: a description, "" when it does not."""
    first = bool(user.args) and user.args[0] is value
    if user.kwargs.get("out") is value:
        return f"{_describe(user, modules)} (out=)"
    if user.op == "output":
        # the root graph's outputs go to the caller; a part's, to its parent's untraced forward
        return "" if root else "the untraced forward it returns to"
    if user.op == "call_method":
        target = user.target
        writes = target.endswith("_") and not target.startswith("_") or target.startswith("__i")
        return _describe(user, modules) if writes and first else ""
    if user.op == "call_function":
        target = user.target
        if not _hashable(target):
            return ""
        name = getattr(target, "__name__", "")
        writes = (target in _INPLACE_OPERATORS or name.endswith("_") and not name.startswith("_")
                  or _inplace_argument(user))
        return _describe(user, modules) if writes and first else ""
    if user.op == "call_module":
        m = modules[user.target]
        ours = type(m).__module__.startswith(("torch.nn.", "tritonbn."))
        # torch's modules and tritonbn's say so with ``inplace`` (tritonbn's write over their
        # input, not the residual); another module traced as one call might anywhere inside
        inplace = (getattr(m, "inplace", False) is True and first if ours else
                   any(getattr(s, "inplace", False) is True for s in m.modules()))
        return _describe(user, modules) + (" (in place)" if ours else
                                           ", which holds an in-place module") if inplace else ""
    return ""


def _written_in_place(value: fx.Node, modules: dict, root: bool, skip=None) -> str:
    """What writes into ``value`` in place after it is computed (through views of it), "" when
    nothing does; ``skip``: a user not to look at."""
    todo, seen = [value], set()
    while todo:
        node = todo.pop()
        if node in seen:
            continue
        seen.add(node)
        for user in node.users:
            if user is skip:
                continue
            if _is_view(user, node, modules):
                todo.append(user)
                continue
            why = _writer(user, node, modules, root)
            if why:
                return why
    return ""


def _fresh_input(node: fx.Node, modules: dict) -> str:
    """"" when the batch norm called at ``node`` may write y over its input; else why not."""
    src = node.args[0] if node.args else None
    if not isinstance(src, fx.Node):
        return "its input is not a value of the graph"
    if len(src.users) != 1 or _uses(node, src) != 1:
        return f"its input is read {sum(_uses(u, src) for u in src.users)} times"
    if src.op == "call_module":
        m = modules[src.target]
        fresh = type(m) in _FRESH_MODULES and not has_hooks(m)
    elif src.op == "call_function":
        fresh = _hashable(src.target) and src.target in _FRESH_FUNCTIONS
    elif src.op == "call_method":
        fresh = src.target in _FRESH_METHODS
    else:
        fresh = False
    if fresh:
        return ""
    what = "the model's input" if src.op == "placeholder" else _describe(src, modules)
    return f"its input comes from {what}, which may keep or share it"


def _not_invertible(node: fx.Node, bn: nn.Module, modules: dict, calls: collections.Counter,
                    root: bool) -> str:
    """"" when the batch norm called at ``node`` may save its output instead of its input;
    else why not."""
    act = bn.activation
    if act not in activations.INVERTIBLE:
        return f"{act} is not invertible"
    if act is not None and not bn.negative_slope > 0:
        what = "alpha" if act == "elu" else "negative_slope"
        return f"{act} with {what} {bn.negative_slope} is not invertible"
    if has_hooks(bn):
        return "it has hooks"
    if calls[node.target] != 1:
        return f"the module is called {calls[node.target]} times"
    if len(node.args) != 1 or set(node.kwargs) - {"residual"}:
        return "called with more than its input and residual"
    if bn.overflow == "saturate":
        return "overflow='saturate' clips its output, which then cannot be inverted"
    for child in ("drop", "act"):
        m = bn._modules.get(child)
        if m is not None and getattr(m, "inplace", False) is True:
            return f"its {type(m).__name__} runs in place on its output"
    why = _written_in_place(node, modules, root)
    if why:
        return f"its output is modified in place by {why}"
    residual = node.kwargs.get("residual")
    if isinstance(residual, fx.Node):
        why = _written_in_place(residual, modules, root, skip=node)
        if why:
            return f"its residual operand is modified in place by {why}"
    return ""


def _make_invertible(gm: fx.GraphModule, records: dict, prefix: str, root: bool) -> int:
    """In-place activated batch norm for the layers of ``gm`` (already fused) that allow it:
    ``invertible`` (save y, recover x from it) when the activation is invertible and nothing
    writes into y (or the saved residual) in place; ``inplace`` (write y over x) too when x is a
    fresh value read by nothing else. Returns how many layers became invertible."""
    modules = dict(gm.named_modules())
    calls = collections.Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
    made = 0
    for node in gm.graph.nodes:
        if node.op != "call_module" or type(modules[node.target]) not in _INVERTIBLE_CLASSES:
            continue
        bn = modules[node.target]
        record = records.get(prefix + node.target)
        why = _not_invertible(node, bn, modules, calls, root)
        if why:
            if record is not None:
                record.note = _join(record.note, f"not in-place activated: {why}")
            continue
        over = _fresh_input(node, modules)
        bn.invertible, bn.inplace = True, not over
        made += 1
        if record is not None:
            record.note = _join(record.note, "in-place activated: saves its output, " + (
                "written over its input" if not over else f"not over its input ({over})"))
    return made


def _join(a: str, b: str) -> str:
    return f"{a}; {b}" if a else b


# ----------------------------------------------------------------------------------------------
# Tracing


def _timm_fx():
    """timm's lists of modules and functions its own fx tools do not trace into, when timm is
    loaded (a model with timm modules has loaded it; nothing is imported here)."""
    fx_module = sys.modules.get("timm.layers._fx")
    if fx_module is None:
        return set(), ()
    try:
        leaves = {qualname(c) for c in fx_module.get_notrace_modules()}
        functions = tuple(f for f in fx_module.get_notrace_functions() if callable(f))
    except Exception:  # noqa: BLE001 - an unknown timm version: no extra leaves
        return set(), ()
    return leaves, functions


class _Tracer(fx.Tracer):
    """fx's tracer with batch norms, tritonbn's modules and ``leaves`` (paths) as leaves,
    remembering where tracing failed."""

    def __init__(self, leaves: frozenset = frozenset(), extra: tuple = (set(), ())):
        super().__init__(autowrap_functions=extra[1])
        self.leaves, self.named_leaves = leaves, extra[0]
        # (exception, qualified name, class name) of the innermost module it came out of
        self.failed_in: Optional[tuple] = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return (type(m).__module__.startswith("tritonbn.") or is_batch_norm_like(m)
                or module_qualified_name in self.leaves
                or qualname(type(m)) in self.named_leaves
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


class _Untraceable(Exception):
    """fx cannot give one graph valid in both modes: the message says why."""


def _user_frame(exc: BaseException) -> str:
    """file:line of the innermost frame outside torch and tritonbn: the user's code."""
    torch_dir = os.path.dirname(torch.__file__)
    ours = os.path.dirname(os.path.dirname(__file__))
    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if not f.filename.startswith((torch_dir, ours))]
    return f", at {frames[-1].filename}:{frames[-1].lineno}" if frames else ""


def _signature(node: fx.Node) -> tuple:
    """What a node computes, comparable across two traces (nodes print as their names)."""
    target = node.target if isinstance(node.target, str) else getattr(
        node.target, "__qualname__", repr(node.target))
    return node.op, target, repr(node.args), repr(node.kwargs)


def _stack(node: Optional[fx.Node]) -> list:
    if node is None:
        return []
    return [path for path, _ in (node.meta.get("nn_module_stack") or {}).values()]


def _mode_difference(a: fx.Graph, b: fx.Graph):
    """None when the graphs compute the same; else (the deepest module whose forward both
    differing nodes are in, or "" for the root; a description of the difference)."""
    nodes_a, nodes_b = list(a.nodes), list(b.nodes)
    for i in range(max(len(nodes_a), len(nodes_b))):
        na = nodes_a[i] if i < len(nodes_a) else None
        nb = nodes_b[i] if i < len(nodes_b) else None
        if na is not None and nb is not None and _signature(na) == _signature(nb):
            continue
        common = ""
        for pa, pb in zip(_stack(na), _stack(nb)):
            if pa != pb:
                break
            common = pa
        shown = na if na is not None and na.op != "output" else nb
        what = (f"{shown.op} {_signature(shown)[1]} with arguments {shown.args}"
                if shown is not None else "the graph's end")
        return common, what
    return None


def _run_tracer(model: nn.Module, leaves: set, extra) -> tuple:
    tracer = _Tracer(frozenset(leaves), extra)
    try:
        return tracer, tracer.trace(model)
    except Exception as exc:
        exc._tritonbn_tracer = tracer   # for the message: where tracing stopped
        raise


def _trace(model: nn.Module, extra) -> tuple:
    """(tracer, graph, mode leaves) of a graph that computes what ``model`` computes in training
    and in eval mode. Raises _Untraceable, or fx's own exception (with tracer.failed_in)."""
    leaves: set = set()
    modes = [(m, m.training) for m in model.modules()]
    uniform = len({t for _, t in modes}) == 1
    try:
        while True:
            model.train()
            tracer, trained = _run_tracer(model, leaves, extra)
            model.eval()
            tracer, evaluated = _run_tracer(model, leaves, extra)
            diff = _mode_difference(trained, evaluated)
            if diff is None:
                break
            path, what = diff
            while path in leaves:
                # a leaf's call itself differs (its arguments): its caller made the difference
                path = path.rpartition(".")[0]
            if not path:
                raise _Untraceable(f"its own forward depends on train/eval mode (first "
                                   f"difference: {what}), and the model itself cannot be "
                                   "traced as one call")
            leaves.add(path)
    finally:
        for m, training in modes:
            m.training = training
    if uniform:
        return tracer, (trained if modes[0][1] else evaluated), leaves
    tracer, graph = _run_tracer(model, leaves, extra)   # in the model's own, mixed, modes
    diff = _mode_difference(graph, trained)
    if diff is not None:
        raise _Untraceable(f"its graph with the modules' current mixed train/eval modes "
                           f"differs from the training-mode graph (first difference: {diff[1]})")
    return tracer, graph, leaves


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


def _contains_batch_norm(module: nn.Module) -> bool:
    return any(is_batch_norm_like(m) for m in module.modules())


class _Fuser:
    def __init__(self, report: TransformReport, inplace: bool = False):
        self.records = report.layers
        self.extra = _timm_fx()
        self.inplace = inplace      # fuse(inplace=True): in-place activated batch norm
        self.problems: list = []    # why a module was fused part by part, one per module
        self.fused = 0              # chains fused

    def fuse(self, module: nn.Module, prefix: str) -> nn.Module:
        """``module`` fused as one graph, or, where fx cannot give one graph valid in both modes,
        with its children fused one by one."""
        try:
            tracer, graph, leaves = _trace(module, self.extra)
        except _Untraceable as exc:
            return self._by_parts(module, prefix, f"{_path_name(prefix, module)}: {exc}")
        except Exception as exc:  # noqa: BLE001 - any tracing failure: fuse the parts
            why = (f"torch.fx could not trace {_path_name(prefix, module)} "
                   f"{tracer_where(exc, prefix)}{_user_frame(exc)}: {type(exc).__name__}: {exc}")
            return self._by_parts(module, prefix, why)
        gm = fx.GraphModule(tracer.root, graph, type(module).__name__)
        self.fused += _rewrite(gm, self.records, prefix)
        if self.inplace:
            _make_invertible(gm, self.records, prefix, root=not prefix)
        self._note_unreached(gm, module, prefix, leaves)
        gm.graph.lint()
        gm.delete_all_unused_submodules()  # the fused activations' and moved drops' modules
        _carry_state(gm, module)
        gm.recompile()
        return gm

    def _by_parts(self, module: nn.Module, prefix: str, why: str) -> nn.Module:
        self.problems.append(why)
        for name, child in list(module.named_children()):
            if is_batch_norm_like(child) or not _contains_batch_norm(child):
                if is_batch_norm_like(child):
                    self._note(prefix + name, f"not fused: called by the forward of "
                                              f"{_path_name(prefix, module)}, which is not traced")
                continue
            if has_hooks(child):
                # a GraphModule in its place would drop the hooks: look inside instead
                self._by_parts(child, f"{prefix}{name}.",
                               f"{_path_name(prefix + name + '.', child)} has hooks")
                continue
            new = self.fuse(child, f"{prefix}{name}.")
            if new is not child:
                module._modules[name] = new
        return module

    def _note_unreached(self, gm: fx.GraphModule, module: nn.Module, prefix: str,
                        leaves: set) -> None:
        called = {n.target for n in gm.graph.nodes if n.op == "call_module"}
        for name, m in module.named_modules():
            if not is_batch_norm_like(m) or name in called:
                continue
            leaf = next((p for p in sorted(leaves) if name.startswith(p + ".")), None)
            if leaf is not None:
                why = (f"not fused: inside '{prefix}{leaf}' "
                       f"({type(module.get_submodule(leaf)).__name__}), whose forward depends "
                       "on train/eval mode and runs as one call")
            else:
                holder = next((p for p in sorted(called, key=len, reverse=True)
                               if name.startswith(p + ".")), None)
                why = (f"not fused: inside '{prefix}{holder}', traced as one call"
                       if holder else "not fused: the traced forward does not call it")
            self._note(prefix + name, why)

    def _note(self, name: str, why: str) -> None:
        record = self.records.get(name)
        if record is not None and not record.fused:
            record.note = _join(record.note, why)


def tracer_where(exc: BaseException, prefix: str) -> str:
    """Where in the traced module tracing stopped (paths from the model's root)."""
    tracer = getattr(exc, "_tritonbn_tracer", None)
    failed = tracer.failed_in if tracer is not None else None
    if failed is None or failed[0] is not exc:
        return "in its own forward" if prefix else "in the model's own forward"
    return f"in module '{prefix}{failed[1]}' ({failed[2]})"


def _path_name(prefix: str, module: nn.Module) -> str:
    """'module 'a.b' (Class)' for a submodule, the class name for the model."""
    return (f"module '{prefix.rstrip('.')}' ({type(module).__name__})" if prefix
            else type(module).__name__)


def fuse(model: nn.Module, *, report: bool = False, inplace: bool = False):
    """Fuse each batch norm with the residual add and activation that follow it.

    Returns a new ``torch.fx.GraphModule``; ``model`` is not changed (the rewrite works on a deep
    copy, as ``fold_into_conv`` does). In the result

    * each batch norm (torch's or tritonbn's ``BatchNorm1d/2d/3d``, ``SyncBatchNorm``,
      ``FrozenBatchNorm2d``, and the converted layers of torchvision and timm) followed by an
      activation, by an add then an activation, or by an add alone is one fused call computing
      act(BN(x) + residual) in the batch-norm kernels (forward and backward). Activations: ReLU,
      ReLU6, LeakyReLU, SiLU, GELU (approximate "none" or "tanh"), Hardswish, Sigmoid, Tanh, ELU
      (its alpha kept as the layer's ``negative_slope``), as
      ``nn`` modules (and timm's activation layers), ``torch.nn.functional`` calls
      (``inplace=True`` too) and ``torch.relu`` / ``tensor.relu()``-style calls; adds: ``+``,
      ``+=``, ``torch.add`` (alpha 1), ``tensor.add`` / ``add_``, with the batch norm as either
      operand (``r.add_(bn(x))`` excepted: it writes into r, which other code may read). fx
      records ``+=`` as ``+``, so, as in any fx-traced model, ``y += r`` no longer writes
      into y;
    * modules that do nothing between them (``nn.Identity``, dropout / drop path / stochastic
      depth of probability 0) are skipped and removed;
    * a drop module right after the batch norm (stochastic depth, drop path, dropout: a random
      per-sample or per-element factor in training, the identity in eval) moves into the fused
      module: in eval mode the chain runs in the kernels; in training the batch norm runs in the
      kernels and the drop, add and activation in torch, in the original order;
    * every other batch norm is converted as ``tritonbn.convert_model`` converts it;
    * the state_dict has the same keys and tensors' values as ``model``'s, so checkpoints load
      both ways; a fused module keeps the batch norm's Parameters and buffers, training/eval
      behaviour (``momentum=None``, ``track_running_stats``) and input checks. Train the result
      with an optimizer built on its own ``parameters()``.

    The result behaves as ``model`` in training and in eval mode: switching it with ``.train()``
    / ``.eval()`` switches every layer (see the module docstring for how the trace avoids fixing
    a mode). A chain is left alone when an intermediate value (the batch norm's output, or the
    add's before an activation) has another use, when the batch-norm module is called more than
    once or has hooks, and when the add's other operand is a constant or a parameter. fx sees no
    shapes: a residual that turns out at run time to broadcast, or to promote the dtype, is
    added by torch after tritonbn's batch norm (same result, unfused).

    A model torch.fx cannot trace, or whose own forward depends on train/eval mode (auxiliary
    outputs in training), gives a warning saying where and why (module, source line, fx's
    message); its submodules are then fused one by one (each a GraphModule in its place) and
    the model itself is a converted deep copy, not a GraphModule. A bare batch-norm module gives
    a converted copy. Layers left on torch are named in a ``tritonbn.ConversionWarning``.

    With ``inplace=True`` the layers become in-place activated batch norms where that is safe
    (see tritonbn.InPlaceABN): a layer whose activation is invertible -- LeakyReLU with a
    positive slope, ELU, or none (BN -> add, and a batch norm fused with nothing) -- saves only
    its output y for backward, which recovers the input from it, instead of its input
    (``layer.invertible``); where the input is a fresh value (a convolution's, a linear layer's,
    an add's or a concatenation's output) that nothing else reads, y is also written over it
    (``layer.inplace``). Left as they are, with the reason in the report's note: layers whose
    activation is not invertible (ReLU, ReLU6, SiLU, GELU, ...), and layers whose output (or
    saved residual) is later modified in place by something fuse did not absorb -- an in-place
    method or operator (``add_``, ``relu_``, ``+=`` in a graph built by other means, item
    assignment), a module with ``inplace=True``, a module traced as one call that holds one,
    or, in a submodule fused on its own, its parent's untraced forward -- since that would
    overwrite the saved y. The model's own outputs must not be modified in place before
    backward (autograd raises if they are). As in tritonbn.InPlaceABN, an invertible layer uses
    gamma with |gamma| >= eps (sign kept): a gamma closer to 0 than eps (``zero_init_residual``
    initializes some to exactly 0) computes as +-eps.

    With ``report=True`` the result is ``(fused model, report)``: a ``tritonbn.TransformReport``
    saying, per batch-norm-like layer, what it became, what was fused into it, and why a layer
    was not fused or converted (with ``inplace=True``, also whether it was made in-place
    activated, and why not).
    """
    rep = TransformReport(stages=["convert", "fuse"])
    # The copy's batch norms become tritonbn's (in place: the GraphModule below holds the same
    # module objects); the fusable ones then change class once more, to the fused modules.
    model = convert(copy.deepcopy(model), rep)
    if is_batch_norm_like(model):
        # a bare batch norm: nothing after it to fuse (and fx would trace into it)
        fused = model
    else:
        fuser = _Fuser(rep, inplace)
        fused = fuser.fuse(model, "")
        if fuser.problems:
            parts = "; ".join(fuser.problems[:4])
            more = f"; and {len(fuser.problems) - 4} more" if len(fuser.problems) > 4 else ""
            outcome = ("The submodules it could trace were fused one by one" if fuser.fused
                       else "Nothing was fused")
            warnings.warn(f"tritonbn.fuse: {parts}{more}. {outcome}; the rest is a copy "
                          "converted by tritonbn.convert_model.", stacklevel=2)
    warn_left_on_torch(rep, "tritonbn.fuse", stacklevel=2)
    return (fused, rep) if report else fused
