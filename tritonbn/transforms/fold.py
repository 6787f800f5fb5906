"""Fold eval-mode batch norm into the convolution or linear layer before it, with torch.fx.

In eval mode a batch norm is a per-channel affine map with fixed coefficients,
``y = (x - running_mean) * gamma / sqrt(running_var + eps) + beta``, so a Conv/Linear followed
by it equals one Conv/Linear with rescaled weights and a shifted bias, and the batch-norm pass
over the activations disappears.
"""
from __future__ import annotations

import copy

import torch
from torch import fx, nn

from ..nn import BatchNorm1d, BatchNorm2d, BatchNorm3d, SyncBatchNorm

__all__ = ["fold_into_conv"]

_FOLDABLE_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm,
                BatchNorm1d, BatchNorm2d, BatchNorm3d, SyncBatchNorm)
# Exact types: a subclass (or ConvTranspose, whose weight is laid out (in, out, ...)) may not
# compute weight @ x + bias with out-channels first in the weight.
_FOLDABLE_LAYER = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


class _Tracer(fx.Tracer):
    """fx's tracer, with tritonbn's modules kept as single call_module nodes like torch.nn's."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return type(m) in _FOLDABLE_BN or super().is_leaf_module(m, module_qualified_name)


def _set_submodule(root: nn.Module, target: str, module: nn.Module) -> None:
    parent, _, name = target.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


@torch.no_grad()
def _folded(layer: nn.Module, bn: nn.Module) -> nn.Module:
    """A copy of ``layer`` computing bn(layer(x)) with bn's running statistics."""
    # In float64 so that folding adds one rounding, to the layer's dtype, and nothing else.
    scale = torch.rsqrt(bn.running_var.double() + bn.eps)
    shift = -bn.running_mean.double() * scale
    if bn.weight is not None:
        scale = scale * bn.weight.double()
        shift = shift * bn.weight.double()
    if bn.bias is not None:
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
    """(layer node, layer, bn) when ``node`` is a batch norm that folds into its input's layer."""
    if node.op != "call_module" or type(modules[node.target]) not in _FOLDABLE_BN:
        return None
    bn = modules[node.target]
    if bn.running_mean is None or bn.running_var is None:
        return None  # no running statistics: batch statistics normalize even in eval
    src = node.args[0] if node.args else None
    if not isinstance(src, fx.Node) or src.op != "call_module":
        return None
    layer = modules[src.target]
    if type(layer) not in _FOLDABLE_LAYER:
        return None
    # The layer's raw output must feed only this batch norm, and the layer be called only here:
    # otherwise another use would see the folded (normalized) output.
    if len(src.users) != 1 or calls[src.target] != 1:
        return None
    out_features = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
    if out_features != bn.num_features:
        return None
    return src, layer, bn


def fold_into_conv(model: nn.Module) -> fx.GraphModule:
    """Fold every eval-mode batch norm that directly follows a Conv1d/2d/3d or Linear into it.

    Returns a new ``torch.fx.GraphModule`` (``model`` itself is not changed) in which each
    foldable layer -> batch-norm pair is one layer whose weight is scaled by
    gamma / sqrt(running_var + eps) and whose bias (created when the layer had none) absorbs the
    rest; in eval mode it computes what ``model`` computes, up to rounding. Works on torch and
    tritonbn batch-norm modules. A batch norm is left in place when it has no running
    statistics, when the layer's output has another use, or when the layer is called more than
    once. Linear -> BatchNorm1d assumes the Linear's output is (N, features), the only case in
    which BatchNorm1d normalizes the Linear's features (as torch.ao's fuse_linear_bn_eval does).

    A model in training mode is refused with a RuntimeError: training normalizes with the batch's
    own statistics, which no fixed weights can reproduce, and a folded model would also stop
    updating the running statistics. Call ``model.eval()`` first.
    """
    if model.training:
        raise RuntimeError("fold_into_conv: the model is in training mode. Folding replaces batch "
                           "norm by its running statistics, which only eval mode uses; call "
                           "model.eval() first.")
    model = copy.deepcopy(model)
    tracer = _Tracer()
    graph = tracer.trace(model)
    gm = fx.GraphModule(tracer.root, graph, model.__class__.__name__)
    modules = dict(gm.named_modules())
    calls: dict = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1

    for node in list(gm.graph.nodes):
        pair = _foldable_pair(node, modules, calls)
        if pair is None:
            continue
        src, layer, bn = pair
        if bn.training:
            raise RuntimeError(f"fold_into_conv: batch norm '{node.target}' is in training mode "
                               "while the model is in eval mode; call model.eval() first.")
        _set_submodule(gm, src.target, _folded(layer, bn))
        modules[src.target] = gm.get_submodule(src.target)
        node.replace_all_uses_with(src)
        gm.graph.erase_node(node)

    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm
