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

from .registry import (ORIGIN, TRITON_TO_TORCH, NotConvertible, Origin, is_plain_swap, lookup,
                       unswap)
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


def convert(module: nn.Module, report: TransformReport) -> nn.Module:
    """convert_model's work, filling ``report`` and warning about nothing; returns the root."""
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
                report.add(LayerRecord(name, class_name(m), class_name(m), kernels=True,
                                       note="already tritonbn's"))
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
    return module


def convert_model(module: nn.Module, *, report: bool = False):
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
    """
    rep = TransformReport(stages=["convert"])
    module = convert(module, rep)
    warn_left_on_torch(rep, "tritonbn.convert_model", stacklevel=2)
    return (module, rep) if report else module


def restore_model(module: nn.Module) -> nn.Module:
    """Undo ``convert_model``: tritonbn batch-norm modules become torch's classes again.

    tritonbn.BatchNorm1d/2d/3d and SyncBatchNorm become torch's (SyncBatchNorm with its
    process_group), modules converted from other classes (lazy, torchvision's, timm's, registered
    ones) what they were, with the child modules a conversion removed. In place, keeping every
    tensor; returns the module (a new root when the root's conversion made a new object).
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
        return unswap(m)
    torch_cls = TRITON_TO_TORCH.get(type(m))
    if torch_cls is not None:
        m.__dict__.pop(ORIGIN, None)   # e.g. a lazy module materialized since its conversion
        m.__class__ = torch_cls
    return m
