"""Fold eval-mode batch norm into the convolution or linear layer before it, with torch.fx.

In eval mode a batch norm is a per-channel affine map with fixed coefficients,
``y = (x - running_mean) * gamma / sqrt(running_var + eps) + beta``, so a Conv/Linear followed
by it equals one Conv/Linear with rescaled weights and a shifted bias, and the batch-norm pass
over the activations disappears.

Which layers fold: ``nn.Conv1d/2d/3d`` and ``nn.Linear`` and their subclasses that compute
``weight @ x + bias`` with out-channels first in the weight -- checked by the subclass not
overriding ``forward`` (nor a convolution's ``_conv_forward``), as torchvision's Conv3DSimple /
Conv2Plus1D-style classes do, or by being a known zoo class that only pads before the
convolution (timm's Conv2dSame). A layer with hooks or a parametrized weight
(torch.nn.utils.parametrize) does not fold: its weight is recomputed at every call.
ConvTranspose is not a subclass of Conv*d (its weight is (in, out, ...)) and does not fold.

Which batch norms fold: torch's and tritonbn's BatchNorm1d/2d/3d and SyncBatchNorm, frozen batch
norms (tritonbn's and torchvision's FrozenBatchNorm2d), and batch norms with an epilogue --
tritonbn's BatchNormAct / fused modules, timm's BatchNormAct2d / FrozenBatchNormAct2d: the batch
norm folds and what followed it in the layer (drop, residual add, activation) stays, as a
``FoldedEpilogue`` module in the batch norm's place.
"""
from __future__ import annotations

import collections
import copy

import torch
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .. import activations
from ..reference import floored_gamma
from .fuse import _timm_fx
from .kinds import has_hooks, qualname
from .report import LayerRecord, TransformReport, class_name, is_batch_norm_like

__all__ = ["fold_into_conv", "FoldedEpilogue"]

_LAYER_BASES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
# Subclasses that override forward but still compute conv(weight, x) + bias per out-channel:
# timm's Conv2dSame pads the input ("same" padding) and calls F.conv2d with its weight and bias.
_KNOWN_FOLDABLE = {"timm.layers.conv2d_same.Conv2dSame",
                   "timm.models.layers.conv2d_same.Conv2dSame"}

# Batch norms of optional packages, by name: (has an epilogue of drop and act modules)
_NAMED_BN = {"torchvision.ops.misc.FrozenBatchNorm2d": False,
             **{f"{p}.{c}": True for p in ("timm.layers.norm_act", "timm.models.layers.norm_act")
                for c in ("BatchNormAct2d", "SyncBatchNormAct", "FrozenBatchNormAct2d")}}


class FoldedEpilogue(nn.Module):
    """What follows a batch norm inside its layer, kept when the batch norm is folded into the
    layer before: ``act(activation(drop(x) + residual))``, each part optional. ``drop`` and
    ``act`` are the modules the layer had (same names, so their state keeps its keys)."""

    def __init__(self, activation=None, negative_slope: float = 0.01, drop=None, act=None):
        super().__init__()
        self.activation, self.negative_slope = activation, negative_slope
        if drop is not None:
            self.drop = drop
        if act is not None:
            self.act = act

    def forward(self, input, residual=None):
        z = input
        if "drop" in self._modules:
            z = self.drop(z)
        if residual is not None:
            z = z + residual
        z = activations.apply(z, self.activation, self.negative_slope)
        return self.act(z) if "act" in self._modules else z

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}" if self.activation else ""


def _layer_problem(m: nn.Module) -> str:
    """"" when ``m`` is a layer a batch norm folds into, else why not."""
    base = next((b for b in _LAYER_BASES if isinstance(m, b)), None)
    if base is None:
        return f"follows {class_name(m)}, not a convolution or linear layer"
    if type(m) is not base and qualname(type(m)) not in _KNOWN_FOLDABLE:
        for attr in ("forward", "_conv_forward"):
            if getattr(type(m), attr, None) is not getattr(base, attr, None):
                return (f"follows {class_name(m)}, a subclass of {class_name(base)} with its own "
                        f"{attr}: it may not compute weight @ x + bias")
    if torch.nn.utils.parametrize.is_parametrized(m):
        return f"follows {class_name(m)}, whose weight is parametrized"
    if has_hooks(m):
        return f"follows {class_name(m)}, which has hooks"
    if isinstance(m.weight, nn.parameter.UninitializedParameter):
        return f"follows {class_name(m)}, not initialized yet (lazy)"
    return ""


def _is_layer(m: nn.Module) -> bool:
    return isinstance(m, _LAYER_BASES) and not _layer_problem(m)


def _bn_kind(m: nn.Module):
    """None when ``m`` is no batch norm fold knows; else the FoldedEpilogue to leave in its
    place (None as the second item: nothing follows the batch norm in the layer)."""
    from ..nn import FrozenBatchNorm2d, TritonNorm
    from .fused_modules import (FusedBatchNormAct1d, FusedBatchNormAct2d, FusedBatchNormAct3d,
                        FusedFrozenBatchNorm2d, FusedSyncBatchNorm)
    from ..nn import (BatchNorm1d, BatchNorm2d, BatchNorm3d, BatchNormAct1d, BatchNormAct2d,
                      BatchNormAct3d, InPlaceABN, InPlaceABN1d, InPlaceABN2d, InPlaceABN3d,
                      InPlaceABNSync, SyncBatchNorm)
    plain = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, BatchNorm1d,
             BatchNorm2d, BatchNorm3d, SyncBatchNorm, FrozenBatchNorm2d)
    with_epilogue = (BatchNormAct1d, BatchNormAct2d, BatchNormAct3d, FusedBatchNormAct1d,
                     FusedBatchNormAct2d, FusedBatchNormAct3d, FusedFrozenBatchNorm2d,
                     FusedSyncBatchNorm, InPlaceABN, InPlaceABN1d, InPlaceABN2d, InPlaceABN3d,
                     InPlaceABNSync)
    cls = type(m)
    if cls in plain or cls in with_epilogue:
        kids = m._modules
        if isinstance(m, TritonNorm) and (m.activation is not None or "drop" in kids
                                          or "act" in kids or cls in with_epilogue):
            return "epilogue", lambda: FoldedEpilogue(m.activation, m.negative_slope,
                                                      kids.get("drop"), kids.get("act"))
        return "plain", None
    named = _NAMED_BN.get(qualname(cls))
    if named is None:
        return None
    if not named:
        return "plain", None
    return "epilogue", lambda: FoldedEpilogue(None, 0.01, m._modules.get("drop"),
                                              m._modules.get("act"))


class _Tracer(fx.Tracer):
    """fx's tracer with batch norms, tritonbn's modules and foldable layers as single
    call_module nodes, like torch.nn's."""

    def __init__(self, extra):
        super().__init__(autowrap_functions=extra[1])
        self.named_leaves = extra[0]

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return (is_batch_norm_like(m) or type(m).__module__.startswith("tritonbn.")
                or _is_layer(m) or qualname(type(m)) in self.named_leaves
                or super().is_leaf_module(m, module_qualified_name))


def _set_submodule(root: nn.Module, target: str, module: nn.Module) -> None:
    parent, _, name = target.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


@torch.no_grad()
def _folded(layer: nn.Module, bn: nn.Module) -> nn.Module:
    """A copy of ``layer`` computing bn(layer(x)) with bn's running statistics."""
    # In float64 so that folding adds one rounding, to the layer's dtype, and nothing else.
    scale = torch.rsqrt(bn.running_var.double() + bn.eps)
    shift = -bn.running_mean.double() * scale
    if getattr(bn, "weight", None) is not None:
        gamma = bn.weight.double()
        if getattr(bn, "invertible", False):    # in-place activated: its kernels' |gamma| >= eps
            gamma = floored_gamma(gamma, bn.eps)
        scale = scale * gamma
        shift = shift * gamma
    if getattr(bn, "bias", None) is not None:
        shift = shift + bn.bias.double()
    weight = layer.weight.double()
    bias = layer.bias.double() if layer.bias is not None else torch.zeros_like(shift)

    folded = copy.deepcopy(layer)
    dtype, requires_grad = layer.weight.dtype, layer.weight.requires_grad
    folded.weight = nn.Parameter((weight * scale.view(-1, *[1] * (weight.dim() - 1))).to(dtype),
                                 requires_grad)
    # A layer built with bias=False registered bias as None; assigning a Parameter fills it in.
    folded.bias = nn.Parameter((bias * scale + shift).to(dtype), requires_grad)
    return folded


def _foldable_pair(node: fx.Node, modules: dict, calls: dict):
    """((layer node, layer, bn, epilogue factory), "") when ``node`` is a batch norm that folds
    into its input's layer, else (None, why not; "" when the node is no batch norm)."""
    if node.op != "call_module":
        return None, ""
    bn = modules[node.target]
    kind = _bn_kind(bn)
    if kind is None:
        return None, (f"{class_name(bn)} is not a batch norm fold_into_conv knows"
                      if is_batch_norm_like(bn) else "")
    running_mean, running_var = (getattr(bn, "running_mean", None),
                                 getattr(bn, "running_var", None))
    if running_mean is None or running_var is None:
        # no running statistics: batch statistics normalize even in eval
        return None, "no running statistics (batch statistics even in eval)"
    if isinstance(running_mean, nn.parameter.UninitializedBuffer):
        return None, "not initialized yet (lazy)"
    if calls[node.target] != 1 or has_hooks(bn):
        return None, "the batch norm is called more than once or has hooks"
    src = node.args[0] if node.args else None
    if not isinstance(src, fx.Node) or src.op != "call_module":
        what = "the model's input" if isinstance(src, fx.Node) and src.op == "placeholder" \
            else f"a {getattr(src, 'op', 'constant')} node" if isinstance(src, fx.Node) else "?"
        if isinstance(src, fx.Node) and src.op in ("call_function", "call_method"):
            what = f"{getattr(src.target, '__name__', src.target)}()"
        return None, f"follows {what}, not a convolution or linear layer"
    layer = modules[src.target]
    problem = _layer_problem(layer)
    if problem:
        return None, problem
    # The layer's raw output must feed only this batch norm, and the layer be called only here:
    # otherwise another use would see the folded (normalized) output.
    if len(src.users) != 1 or calls[src.target] != 1:
        return None, f"the output of '{src.target}' has another use, or it is called twice"
    out_features = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
    if out_features != running_mean.numel():
        return None, "the layer's output features are not the batch norm's channels"
    return (src, layer, bn, kind[1]), ""


class _Folder:
    def __init__(self, report: TransformReport):
        self.records = report.layers
        self.extra = _timm_fx()

    def fold(self, model: nn.Module, prefix: str) -> nn.Module:
        tracer = _Tracer(self.extra)
        try:
            graph = tracer.trace(model)
        except Exception as exc:  # noqa: BLE001 - fold the submodules fx can trace
            return self._by_parts(model, prefix, f"torch.fx could not trace "
                                  f"{type(model).__name__}: {type(exc).__name__}: {exc}")
        gm = fx.GraphModule(tracer.root, graph, model.__class__.__name__)
        modules = dict(gm.named_modules())
        calls = collections.Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
        for node in list(gm.graph.nodes):
            pair, why = _foldable_pair(node, modules, calls)
            record = self.records.get(prefix + node.target) if node.op == "call_module" else None
            if pair is None:
                if record is not None and why:
                    record.note = f"not folded: {why}"
                continue
            src, layer, bn, epilogue = pair
            if getattr(bn, "training", False) and isinstance(bn, _BatchNorm):
                raise RuntimeError(f"fold_into_conv: batch norm '{prefix}{node.target}' is in "
                                   "training mode while the model is in eval mode; call "
                                   "model.eval() first.")
            _set_submodule(gm, src.target, _folded(layer, bn))
            modules[src.target] = gm.get_submodule(src.target)
            if epilogue is None:
                node.replace_all_uses_with(src)
                gm.graph.erase_node(node)
            else:
                # the batch norm's place now holds what followed it in its layer
                _set_submodule(gm, node.target, epilogue())
            if record is not None:
                record.folded = prefix + src.target
                record.result = class_name(FoldedEpilogue) if epilogue else "(removed)"
                record.kernels = False
                record.note = ""
        for name, m in model.named_modules():
            if is_batch_norm_like(m) and name not in calls and prefix + name in self.records:
                record = self.records[prefix + name]
                if not record.folded and not record.note:
                    record.note = "not folded: not called as one module by the traced forward"
        gm.graph.lint()
        gm.delete_all_unused_submodules()
        gm.recompile()
        return gm

    def _by_parts(self, module: nn.Module, prefix: str, why: str) -> nn.Module:
        for name, child in list(module.named_children()):
            if is_batch_norm_like(child):
                record = self.records.get(prefix + name)
                if record is not None:
                    record.note = f"not folded: called by an untraceable forward ({why})"
                continue
            if not any(is_batch_norm_like(m) for m in child.modules()):
                continue
            new = (self._by_parts(child, f"{prefix}{name}.", "it has hooks")
                   if has_hooks(child) else self.fold(child, f"{prefix}{name}."))
            if new is not child:
                module._modules[name] = new
        return module


def fold_into_conv(model: nn.Module, *, report: bool = False):
    """Fold every eval-mode batch norm that directly follows a convolution or linear layer into it.

    Returns a new ``torch.fx.GraphModule`` (``model`` itself is not changed) in which each
    foldable layer -> batch-norm pair is one layer whose weight is scaled by
    gamma / sqrt(running_var + eps) and whose bias (created when the layer had none) absorbs the
    rest; in eval mode it computes what ``model`` computes, up to rounding. Works on torch and
    tritonbn batch-norm modules, frozen batch norms, and batch norms with an activation (timm's
    BatchNormAct2d, tritonbn's fused modules), whose activation stays after the folded layer;
    layers: Conv1d/2d/3d and Linear and their subclasses that compute weight @ x + bias (see the
    module docstring for the rule). A batch norm is left in place when it has no running
    statistics, when the layer's output has another use, or when the layer or the batch norm is
    called more than once. Linear -> BatchNorm1d assumes the Linear's output is (N, features),
    the only case in which BatchNorm1d normalizes the Linear's features (as torch.ao's
    fuse_linear_bn_eval does). A model torch.fx cannot trace has its submodules folded one by
    one. The result is for eval mode.

    A model in training mode is refused with a RuntimeError: training normalizes with the batch's
    own statistics, which no fixed weights can reproduce, and a folded model would also stop
    updating the running statistics. Call ``model.eval()`` first.

    With ``report=True`` the result is ``(folded model, report)``: per batch-norm-like layer,
    the layer it was folded into or why it was not.
    """
    if model.training:
        raise RuntimeError("fold_into_conv: the model is in training mode. Folding replaces batch "
                           "norm by its running statistics, which only eval mode uses; call "
                           "model.eval() first.")
    rep = TransformReport(stages=["fold"])
    model = copy.deepcopy(model)
    for name, m in model.named_modules():
        if is_batch_norm_like(m):
            rep.add(LayerRecord(name, class_name(m), class_name(m),
                                kernels=type(m).__module__.startswith("tritonbn.")))
    if is_batch_norm_like(model):
        folded = model     # nothing before it to fold into
    else:
        folded = _Folder(rep).fold(model, "")
    return (folded, rep) if report else folded
