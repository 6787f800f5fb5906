"""Swap the batch-norm layers of a model for tritonbn's, and back.

Conversion is in place. For torch's BatchNorm1d/2d/3d and SyncBatchNorm it changes only each
module's class: the tritonbn classes subclass the torch ones and add no state, so every module
stays the same object with the same Parameters, buffers, device, dtype, requires_grad, training
mode and hooks, and optimizers, hooks and any other reference to a module or a parameter keep
working. The other conversions (lazy batch norms, torchvision's FrozenBatchNorm2d, timm's
batch norm + activation layers, and any registered with ``tritonbn.register_conversion``) are
listed in tritonbn/transforms/registry.py; the built-in ones are class swaps too.

What each batch-norm-like layer became, and why any stayed on torch, is in the report
(``report=True``) and, for the ones left on torch, in a ``tritonbn.ConversionWarning``.
"""
from __future__ import annotations

from torch import nn

from .. import activations, functional
from ..nn import (BatchNorm1d, BatchNorm2d, BatchNorm3d, BatchNormAct1d, BatchNormAct2d,
                  BatchNormAct3d, SyncBatchNorm, TritonNorm)
from .fused_modules import (FusedBatchNormAct1d, FusedBatchNormAct2d, FusedBatchNormAct3d,
                            FusedFrozenBatchNorm2d, FusedSyncBatchNorm)
from .kinds import qualname
from .registry import (ORIGIN, TRITON_TO_TORCH, BatchNormAct, NotConvertible, Origin,
                       is_plain_swap, lookup, set_recorded, unswap)
from .report import (LayerRecord, TransformReport, class_name, is_batch_norm_like,
                     warn_left_on_torch)

__all__ = ["convert_model", "restore_model"]


def _set_child(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    (root.get_submodule(parent) if parent else root)._modules[name] = module


def _why_not(module: nn.Module) -> str:
    """The reason a batch-norm-like module without a conversion stays torch's."""
    from torch.nn.modules.batchnorm import _BatchNorm
    if isinstance(module, _BatchNorm):
        base = next(c for c in type(module).__mro__[1:] if c.__module__.startswith("torch.nn"))
        return (f"a subclass of {class_name(base)}, which may compute something else; "
                "tritonbn.register_conversion can add a conversion for it")
    return ("holds running statistics, but no conversion is registered for its class; "
            "tritonbn.register_conversion can add one")


def _is_tritonbn(module: nn.Module) -> bool:
    return type(module).__module__.startswith("tritonbn.")


def convert(module: nn.Module, report: TransformReport, inplace_abn: bool = False) -> nn.Module:
    """convert_model's work, filling ``report`` and warning about nothing; returns the root.
    ``inplace_abn``: as convert_model's."""
    converted: dict = {}     # id(original module) -> its replacement: shared modules once
    for name, m in list(module.named_modules(remove_duplicate=False)):
        if id(m) in converted:
            new = converted[id(m)]
            if new is not m:
                if name:
                    _set_child(module, name, new)
                else:
                    module = new
            continue
        if _is_tritonbn(m):
            converted[id(m)] = m
            if is_batch_norm_like(m):
                record = report.add(LayerRecord(name, class_name(m), class_name(m), kernels=True,
                                                note="already tritonbn's"))
                if inplace_abn:
                    _make_invertible(m, record)
            continue
        conversion = lookup(type(m))
        if conversion is None:
            converted[id(m)] = m
            if is_batch_norm_like(m):
                report.add(LayerRecord(name, class_name(m), class_name(m), note=_why_not(m)))
            continue
        original, original_cls = class_name(m), type(m)
        try:
            out = conversion.convert(m)
        except NotConvertible as exc:
            converted[id(m)] = m
            report.add(LayerRecord(name, original, class_name(m), note=str(exc)))
            continue
        new, note = out if isinstance(out, tuple) else (out, "")
        if not isinstance(new, nn.Module):
            raise TypeError(f"the conversion registered for {original} returned "
                            f"{type(new).__name__}, not an nn.Module")
        if ORIGIN not in new.__dict__ and not is_plain_swap(conversion) and (
                new is m or conversion.restore is not None):
            # remember the class it replaced, for restore_model (torch's own classes need not:
            # restore_model maps tritonbn.BatchNorm*d back whoever made them)
            new.__dict__[ORIGIN] = Origin(original_cls, type(new), tuple(new._modules), {}, ())
        converted[id(m)] = new
        if new is not m:
            if name:
                _set_child(module, name, new)
            else:
                module = new
        record = report.add(LayerRecord(name, original, class_name(new),
                                        kernels=_is_tritonbn(new), note=note))
        if not record.kernels:
            record.note = (note + "; " if note else "") + "the registered conversion " \
                "returned a module that is not tritonbn's"
        if getattr(new, "activation", None) is not None:
            record.fused = new.activation            # fused at conversion (timm's norm + act)
        if inplace_abn and record.kernels:
            _make_invertible(new, record)
    return module


# The layers that carry an activation of their own (None: the identity), which
# convert_model(inplace_abn=True) makes in-place activated.
_NORM_ACT = (BatchNormAct1d, BatchNormAct2d, BatchNormAct3d, BatchNormAct)
_PLAIN = (BatchNorm1d, BatchNorm2d, BatchNorm3d, SyncBatchNorm)
_FUSED = (FusedBatchNormAct1d, FusedBatchNormAct2d, FusedBatchNormAct3d, FusedFrozenBatchNorm2d,
          FusedSyncBatchNorm)
_TIMM_SYNC_NORM_ACT = ("timm.layers.norm_act.SyncBatchNormAct",
                       "timm.models.layers.norm_act.SyncBatchNormAct")


def _add_note(record: LayerRecord, note: str) -> None:
    record.note = f"{record.note}; {note}" if record.note else note


def _has_own_activation(m: nn.Module) -> bool:
    if type(m) in _NORM_ACT:
        return True
    if type(m) is SyncBatchNorm:        # timm's SyncBatchNormAct (or an activation set on it)
        origin = m.__dict__.get(ORIGIN)
        return m.activation is not None or (
            origin is not None and qualname(origin.cls) in _TIMM_SYNC_NORM_ACT)
    return False


def _make_invertible(m: nn.Module, record: LayerRecord) -> None:
    """convert_model(inplace_abn=True) on one converted layer: in-place activated (invertible,
    the output not written over the input) when it carries an invertible activation of its own;
    otherwise the report's note says why not."""
    if not isinstance(m, TritonNorm) or m.invertible:
        return                              # left on torch, or in-place activated already
    why = None
    if type(m) in _PLAIN and not _has_own_activation(m):
        why = ("no activation of its own (an in-place op after it, e.g. nn.ReLU(inplace=True), "
               "would overwrite the output its backward needs); tritonbn.fuse(model, "
               "inplace=True) finds batch norm -> activation pairs in the graph")
    elif isinstance(m, _FUSED):
        why = "a drop or activation module runs in torch around its kernels"
    elif not _has_own_activation(m):
        why = ("convert_model makes only batch norm + activation layers (tritonbn.BatchNormAct*d, "
               "timm's BatchNormAct2d / SyncBatchNormAct, inplace_abn's ABN) in-place "
               f"activated, not {class_name(m)}")
    elif m.activation not in activations.INVERTIBLE:
        why = (f"activation {m.activation!r} is not invertible (in-place activated batch norm "
               "takes leaky_relu or elu with a positive slope / alpha, or none)")
    else:
        try:
            functional.options(True, m.momentum, m.eps, m.activation, m.negative_slope,
                               overflow=m.overflow, invertible=True)
        except (TypeError, ValueError) as exc:
            why = str(exc)
    if why is not None:
        _add_note(record, f"not in-place activated: {why}")
        return
    set_recorded(m, invertible=True)
    _add_note(record, "in-place activated: only its output is saved for backward")


def convert_model(module: nn.Module, *, report: bool = False, inplace_abn: bool = False):
    """Convert every batch-norm layer in ``module`` that tritonbn has a conversion for.

    torch.nn.BatchNorm1d/2d/3d become tritonbn.BatchNorm1d/2d/3d and SyncBatchNorm becomes
    tritonbn.SyncBatchNorm, by changing the module's class; LazyBatchNorm1d/2d/3d become lazy
    modules that run tritonbn's kernels and turn into tritonbn.BatchNorm*d at their first
    forward; torchvision's FrozenBatchNorm2d becomes tritonbn.FrozenBatchNorm2d; timm's
    BatchNormAct2d / SyncBatchNormAct / FrozenBatchNormAct2d become tritonbn layers with their
    activation fused (tritonbn/transforms/registry.py has the rules). Classes are matched
    exactly: a subclass may compute something else, so it stays torch's unless a conversion is
    registered for it (``tritonbn.register_conversion``). State_dicts keep their keys, so
    checkpoints load both ways.

    Conversion is in place and keeps every tensor; the module is returned (a batch-norm root is
    converted too, and is the object returned). Batch-norm-like layers left on torch are named
    in one ``tritonbn.ConversionWarning``. With ``report=True`` the result is
    ``(module, report)``: a ``tritonbn.TransformReport`` saying, per layer, what it became and
    why any stayed torch's (``print(report)`` shows the table).

    timm's InplaceAbn and the inplace_abn package's InPlaceABN / InPlaceABNSync / ABN are
    converted too (to tritonbn.InPlaceABN / InPlaceABNSync, in-place activated as the originals,
    and tritonbn.transforms.registry.BatchNormAct, any rank), without the inplace_abn package;
    the in-place ones get |weight| + eps written into their weight (tritonbn/transforms/registry.py
    says why).

    ``inplace_abn=True`` (off by default) also makes the converted layers that carry an
    invertible activation of their own in-place activated (``invertible``: only the output is
    saved for backward, the kernels recover the input from it, so the layer's input can be freed
    after the forward): tritonbn.BatchNormAct1d/2d/3d with leaky_relu, elu or no activation, and
    timm's BatchNormAct2d / SyncBatchNormAct with nn.LeakyReLU, nn.ELU (fused as elu) or
    nn.Identity, inplace_abn's ABN with leaky_relu, elu or identity. Their
    output is a new tensor (``inplace`` stays off: a model may still read the input, e.g. as a
    residual shortcut). Layers with other activations (relu, silu, ...) stay as they were and
    the report says why. Plain batch norms, with no activation of their own, are not made
    invertible: nearly all of them are followed by an activation module, often
    nn.ReLU(inplace=True), which would overwrite the output their backward needs, and only a
    graph shows what follows; ``tritonbn.fuse(model, inplace=True)`` makes the batch norm ->
    activation pairs it finds in the graph in-place activated. Any layer made invertible here
    can still meet an in-place op after it (``x = bn_act(x); x += shortcut``): autograd then
    refuses the backward ("modified by an inplace operation"), it never computes a wrong
    gradient; convert without ``inplace_abn`` for such a model. restore_model undoes this too.
    """
    rep = TransformReport(stages=["convert"])
    module = convert(module, rep, inplace_abn)
    warn_left_on_torch(rep, "tritonbn.convert_model", stacklevel=2)
    return (module, rep) if report else module


def restore_model(module: nn.Module) -> nn.Module:
    """Undo ``convert_model``: tritonbn batch-norm modules become torch's classes again.

    tritonbn.BatchNorm1d/2d/3d and SyncBatchNorm become torch's (SyncBatchNorm with its
    process_group), modules converted from other classes (lazy, torchvision's, timm's,
    inplace_abn's, registered ones) what they were, with the child modules a conversion removed
    and the attributes and buffers it added removed (an in-place class's weight gets its eps
    back out: registry.py). In place, keeping every tensor; returns the module (a new root when
    the root's conversion made a new object).
    Modules changed by ``fuse`` are not restored (load the state_dict into the original model).
    """
    seen: dict = {}
    for name, m in list(module.named_modules(remove_duplicate=False)):
        if id(m) in seen:
            new = seen[id(m)]
        else:
            new = seen[id(m)] = _restore_one(m)
        if new is not m:
            if name:
                _set_child(module, name, new)
            else:
                module = new
    return module


def _restore_one(m: nn.Module) -> nn.Module:
    origin = m.__dict__.get(ORIGIN)
    if origin is not None and type(m) is origin.became:
        conversion = lookup(origin.cls)
        if conversion is not None and conversion.restore is not None:
            m.__dict__.pop(ORIGIN, None)
            return conversion.restore(m)
        m = unswap(m)
        if type(m) not in TRITON_TO_TORCH:
            return m
        # (an Origin kept on a tritonbn.SyncBatchNorm by convert_model(inplace_abn=True))
    torch_cls = TRITON_TO_TORCH.get(type(m))
    if torch_cls is not None:
        m.__dict__.pop(ORIGIN, None)   # e.g. a lazy module materialized since its conversion
        m.__class__ = torch_cls
    return m
