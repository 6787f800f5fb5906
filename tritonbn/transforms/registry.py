"""The conversions ``tritonbn.convert_model`` applies, by exact class, and how to register more.

Built in:

* ``torch.nn.BatchNorm1d/2d/3d`` -> ``tritonbn.BatchNorm1d/2d/3d`` and ``torch.nn.SyncBatchNorm`` ->
  ``tritonbn.SyncBatchNorm`` (class swaps: every module, Parameter and buffer stays the object it
  was);
* ``torch.nn.LazyBatchNorm1d/2d/3d`` -> a lazy tritonbn class that runs tritonbn's kernels from its
  first forward on and becomes ``tritonbn.BatchNorm1d/2d/3d`` there (as torch's becomes
  ``BatchNorm*d``);
* ``torchvision.ops.misc.FrozenBatchNorm2d`` -> ``tritonbn.FrozenBatchNorm2d`` (eval kernel);
* timm's ``BatchNormAct2d`` / ``SyncBatchNormAct`` / ``FrozenBatchNormAct2d`` (batch norm, then
  the ``drop`` module, then the ``act`` module) -> ``tritonbn.BatchNormAct2d`` /
  ``tritonbn.SyncBatchNorm`` / ``tritonbn.FrozenBatchNorm2d`` with the activation fused, when the
  drop slot is ``nn.Identity`` and the activation is one tritonbn fuses (ReLU, ReLU6, LeakyReLU,
  ELU, SiLU, GELU, Hardswish, Sigmoid, Tanh, Identity, and timm's own GELU / Sigmoid / Tanh / Swish /
  HardSwish); otherwise -> ``FusedBatchNormAct2d`` / ``FusedSyncBatchNorm`` /
  ``FusedFrozenBatchNorm2d`` holding the same ``drop`` (and unfusable ``act``) module, which
  torch runs in between (see tritonbn/transforms/fused_modules.py). timm's forward is torch's batch norm
  followed by drop and act, so the converted layer computes the same in train and eval mode.
* timm's ``InplaceAbn`` and the inplace_abn package's (mapillary's) ``InPlaceABN`` /
  ``InPlaceABNSync`` -> ``tritonbn.InPlaceABN`` (any rank) / ``tritonbn.InPlaceABNSync`` (its
  ``group`` kept), in-place activated as the originals: only the output is saved for backward
  and it is written over the input. The activation (``act_name`` / ``activation``:
  "leaky_relu", "elu" or "identity", with ``act_param`` / ``activation_param``), eps, momentum,
  affine, training mode and every Parameter and buffer are kept (class swaps); one without a
  ``num_batches_tracked`` buffer (timm's, inplace_abn before 1.1) gets a zero one. These run
  without the inplace_abn package, which timm's layer needs for its forward.
  **The weight becomes |weight| + eps, in place** (same Parameter, under no_grad): the
  inplace_abn kernels scale by |weight| + eps (and timm's InplaceAbn calls them; timm's TResNet
  checkpoint filter makes the same change for torch's BatchNorm2d), where tritonbn's scale by
  the weight (kept at |weight| >= eps, sign and all), so the converted layer computes what the
  original did. Its gradient is then the original's with the sign of the original weight, as
  an optimizer moves |weight|; training differs only when a weight would cross zero (the
  original reflects, tritonbn's changes sign) and in what weight decay sees (|w| + eps, not w).
  restore_model writes w = max(|w'| - eps, 0) with w''s sign back (the same scale where w' >= 0;
  a negative w' cannot be expressed: a warning says how many channels lost their sign). So a
  state_dict saved from the converted model holds |w| + eps: load it into a converted model, or
  restore_model before saving one for the original classes. A
  ``drop`` module other than a no-op, or any other child module, is refused (timm's
  InplaceAbn ignores its ``drop_layer`` argument today); so is an activation the original does
  not take (relu in the in-place classes) or cannot invert (a slope <= 0). momentum=None, which
  the originals without a batch counter cannot use, becomes torch's cumulative average.
* the inplace_abn package's ``ABN`` (batch norm, then relu / leaky_relu / elu / identity, out of
  place) -> ``BatchNormAct`` (below: tritonbn.BatchNormAct2d on any rank) with that activation
  fused; its weight is used as it is (ABN calls torch's batch norm).

Classes of torchvision, timm and inplace_abn are matched by name (``module.QualName``): nothing
here imports those packages.

``tritonbn.register_conversion(cls, convert, restore=None)`` adds a conversion for any other
class (a batch-norm subclass, another library's frozen batch norm). ``convert(module)`` returns
the module to use in its place -- the same object with its class changed, or a new module holding
the same tensors -- or ``(module, note)`` to add a remark to the report; it raises
``tritonbn.NotConvertible(reason)`` to leave the module on torch, with that reason in the report
and the warning. ``restore(module)`` undoes it for ``tritonbn.restore_model``; without one,
restore_model changes a converted module's class back when ``convert`` kept the object (and
leaves a new object alone).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Callable, Optional, Union

import torch
from torch import Tensor, nn

from .. import functional
from ..nn import (BatchNorm1d, BatchNorm2d, BatchNorm3d, BatchNormAct2d, FrozenBatchNorm2d,
                  InPlaceABN, InPlaceABNSync, SyncBatchNorm)
from .fused_modules import FusedBatchNormAct2d, FusedFrozenBatchNorm2d, FusedSyncBatchNorm
from .kinds import activation_of, has_hooks, is_noop, qualname

__all__ = ["register_conversion", "unregister_conversion", "NotConvertible", "Conversion",
           "lookup", "swap_class", "LazyBatchNorm1d", "LazyBatchNorm2d", "LazyBatchNorm3d",
           "BatchNormAct"]


class NotConvertible(Exception):
    """Raised by a conversion function to leave a module on torch; the message is the reason
    the report and the ConversionWarning give."""


@dataclass(frozen=True)
class Conversion:
    convert: Callable
    restore: Optional[Callable] = None


_REGISTRY: dict = {}


def _key(cls: Union[type, str]) -> Union[type, str]:
    if isinstance(cls, str):
        if "." not in cls:
            raise ValueError(f"register_conversion: a class name must be 'module.QualName', "
                             f"got {cls!r}")
        return cls
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"register_conversion: expected an nn.Module subclass or a "
                        f"'module.QualName' string, got {cls!r}")
    return cls


def register_conversion(cls: Union[type, str], convert: Callable,
                        restore: Optional[Callable] = None) -> Optional[Conversion]:
    """Make ``tritonbn.convert_model`` (and ``fuse``) convert modules of exactly class ``cls``
    with ``convert(module)``; ``restore(module)`` undoes it for ``tritonbn.restore_model``.

    ``cls`` is the class, or its ``'module.QualName'`` string (to register a class of a package
    without importing it). Subclasses are not matched: register each class. A new registration
    replaces the previous one for the class, which is returned (None if there was none).

    ``convert`` returns the module to use instead (the same object with its class changed, e.g.
    with :func:`swap_class`, or a new module) or ``(module, note)``; it raises
    ``tritonbn.NotConvertible(reason)`` to leave the module as it is, which the report and the
    ConversionWarning then give as the reason.
    """
    if not callable(convert) or (restore is not None and not callable(restore)):
        raise TypeError("register_conversion: convert (and restore, when given) must be callable")
    key = _key(cls)
    previous = _REGISTRY.get(key)
    _REGISTRY[key] = Conversion(convert, restore)
    return previous


def unregister_conversion(cls: Union[type, str]) -> Optional[Conversion]:
    """Remove the conversion registered for ``cls``; returns it (None if there was none)."""
    return _REGISTRY.pop(_key(cls), None)


def lookup(cls: type) -> Optional[Conversion]:
    """The conversion for exactly this class (registered as the class or by its name)."""
    return _REGISTRY.get(cls) or _REGISTRY.get(qualname(cls))


# ----------------------------------------------------------------------------------------------
# Class swaps that remember what they changed, so that restore_model can undo them


@dataclass
class Origin:
    """What a class swap changed on a module: its class, the child modules it removed (in the
    module's original child order), the instance attributes it set (``saved``: the values of
    those the module had before) and ``undo``, a function of the module that reverts whatever
    else the conversion changed (added buffers, rewritten values), called last by unswap."""

    cls: type
    became: type
    order: tuple
    removed: dict
    attrs: tuple
    saved: dict = field(default_factory=dict)
    undo: Optional[Callable] = None


ORIGIN = "_tritonbn_origin"   # the instance attribute holding a module's Origin


def swap_class(module: nn.Module, new_cls: type, remove: tuple = (), **attrs) -> nn.Module:
    """Change ``module``'s class to ``new_cls`` in place, removing the named child modules and
    setting ``attrs``; remembers what it changed for :func:`unswap`. Returns the module."""
    return _swap(module, new_cls, remove, attrs)


def _swap(module: nn.Module, new_cls: type, remove: tuple, attrs: dict,
          undo: Optional[Callable] = None) -> nn.Module:
    origin = Origin(type(module), new_cls, tuple(module._modules),
                    {name: module._modules[name] for name in remove if name in module._modules},
                    tuple(attrs), {name: module.__dict__[name] for name in attrs
                                   if name in module.__dict__}, undo)
    for name in origin.removed:
        del module._modules[name]
    for name, value in attrs.items():
        setattr(module, name, value)
    module.__class__ = new_cls
    module.__dict__[ORIGIN] = origin   # a plain attribute: not a child, not state
    return module


def set_recorded(module: nn.Module, **attrs) -> None:
    """Set instance attributes of a converted module so that :func:`unswap` removes them again
    (restoring earlier values); a module without an Origin gets one that keeps its class."""
    origin = module.__dict__.get(ORIGIN)
    if origin is None:
        origin = module.__dict__[ORIGIN] = Origin(type(module), type(module),
                                                  tuple(module._modules), {}, ())
    for name, value in attrs.items():
        if name not in origin.attrs:
            if name in module.__dict__:
                origin.saved[name] = module.__dict__[name]
            origin.attrs += (name,)
        setattr(module, name, value)


def unswap(module: nn.Module) -> nn.Module:
    """Undo :func:`swap_class`: the original class, children (in their order) and attributes."""
    origin = module.__dict__.pop(ORIGIN)
    for name in origin.attrs:
        module.__dict__.pop(name, None)
    module.__dict__.update(origin.saved)
    children = dict(module._modules)
    module._modules.clear()
    for name in origin.order:
        child = origin.removed.get(name, children.pop(name, None))
        if child is not None or name in origin.removed:
            module._modules[name] = child
    module._modules.update(children)     # children added since, after the original ones
    module.__class__ = origin.cls
    if origin.undo is not None:
        origin.undo(module)
    return module


# ----------------------------------------------------------------------------------------------
# torch's classes


_TORCH_TO_TRITON = {nn.BatchNorm1d: BatchNorm1d, nn.BatchNorm2d: BatchNorm2d,
                    nn.BatchNorm3d: BatchNorm3d, nn.SyncBatchNorm: SyncBatchNorm}
# restore_model: tritonbn's classes back to torch's (every such module, however it was made)
TRITON_TO_TORCH = {triton_cls: torch_cls for torch_cls, triton_cls in _TORCH_TO_TRITON.items()}


def _plain_swap(module: nn.Module) -> nn.Module:
    # No Origin: restore_model maps tritonbn's classes back to torch's by TRITON_TO_TORCH.
    module.__class__ = _TORCH_TO_TRITON[type(module)]
    return module


for _cls in _TORCH_TO_TRITON:
    register_conversion(_cls, _plain_swap)


def is_plain_swap(conversion: Conversion) -> bool:
    return conversion.convert is _plain_swap


class _LazyForward:
    """The forward of a lazy module's first call: torch's LazyModuleMixin changes the class to
    ``cls_to_become`` in a pre-hook, after this bound method was looked up, so it runs on the
    materialized module (a tritonbn.BatchNorm*d) through tritonbn's kernels."""

    def forward(self, input):
        return self._run(input)


class LazyBatchNorm1d(_LazyForward, nn.LazyBatchNorm1d):
    """torch.nn.LazyBatchNorm1d that becomes tritonbn.BatchNorm1d at its first forward."""
    cls_to_become = BatchNorm1d


class LazyBatchNorm2d(_LazyForward, nn.LazyBatchNorm2d):
    """torch.nn.LazyBatchNorm2d that becomes tritonbn.BatchNorm2d at its first forward."""
    cls_to_become = BatchNorm2d


class LazyBatchNorm3d(_LazyForward, nn.LazyBatchNorm3d):
    """torch.nn.LazyBatchNorm3d that becomes tritonbn.BatchNorm3d at its first forward."""
    cls_to_become = BatchNorm3d


_LAZY = {nn.LazyBatchNorm1d: LazyBatchNorm1d, nn.LazyBatchNorm2d: LazyBatchNorm2d,
         nn.LazyBatchNorm3d: LazyBatchNorm3d}


def _convert_lazy(module: nn.Module):
    new_cls = _LAZY[type(module)]
    return swap_class(module, new_cls), f"becomes {new_cls.cls_to_become.__name__} at its " \
                                        "first forward"


for _cls in _LAZY:
    register_conversion(_cls, _convert_lazy)


# ----------------------------------------------------------------------------------------------
# torchvision and timm, by name


def _convert_frozen(module: nn.Module) -> nn.Module:
    # torchvision's FrozenBatchNorm2d: eps and four buffers, the same as tritonbn's.
    return swap_class(module, FrozenBatchNorm2d)


register_conversion("torchvision.ops.misc.FrozenBatchNorm2d", _convert_frozen)


def _convert_norm_act(module: nn.Module, pure_cls: type, partial_cls: Optional[type]):
    """timm's batch norm + drop + act layers: act(drop(BN(x))).

    Pure (drop is Identity or missing, act fusable or missing): ``pure_cls`` with the activation
    in the kernels. Otherwise ``partial_cls`` keeps the drop module (run in training, skipped
    while it is the identity) and an unfusable act module (run by torch after the kernels).
    """
    children = module._modules
    drop, act = children.get("drop"), children.get("act")
    spec = (None, 0.01) if act is None else activation_of(act)
    pure_drop = drop is None or (type(drop) is nn.Identity and not has_hooks(drop))
    if spec is not None and pure_drop:
        new = swap_class(module, pure_cls, remove=("drop", "act"),
                         activation=spec[0], negative_slope=spec[1])
        return new, f"activation {spec[0] or 'none'} fused"
    if partial_cls is None:
        raise NotConvertible(f"drop {type(drop).__name__} / act {type(act).__name__}: no "
                             "tritonbn layer runs them around this batch norm")
    remove = ("act",) if spec is not None else ()
    remove += ("drop",) if pure_drop else ()
    attrs = dict(activation=spec[0], negative_slope=spec[1]) if spec is not None else {}
    new = swap_class(module, partial_cls, remove=remove, **attrs)
    kept = [f"{name} {type(children[name]).__name__}" for name in ("drop", "act")
            if name in children]
    return new, (f"activation {spec[0] or 'none'} fused; " if spec else "") + \
        f"{' and '.join(kept)} run by torch"


for _package in ("timm.layers.norm_act", "timm.models.layers.norm_act"):
    register_conversion(f"{_package}.BatchNormAct2d",
                        lambda m: _convert_norm_act(m, BatchNormAct2d, FusedBatchNormAct2d))
    register_conversion(f"{_package}.SyncBatchNormAct",
                        lambda m: _convert_norm_act(m, SyncBatchNorm, FusedSyncBatchNorm))
    register_conversion(f"{_package}.FrozenBatchNormAct2d",
                        lambda m: _convert_norm_act(m, FrozenBatchNorm2d,
                                                    FusedFrozenBatchNorm2d))


# ----------------------------------------------------------------------------------------------
# In-place activated batch norm: timm's InplaceAbn and the inplace_abn package's classes, by name


class BatchNormAct(BatchNormAct2d):
    """tritonbn.BatchNormAct2d on (N, C, ...) input of any rank: what the inplace_abn package's
    ABN (batch norm, then its activation, out of place, on any rank) becomes."""

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")


# The inplace_abn package's activation names (timm's InplaceAbn uses the same; "" is identity):
# the invertible ones, and relu for its ABN.
_ABN_ACTIVATIONS = {**functional.ABN_ACTIVATIONS, "": None, "relu": "relu"}
_BATCHES = "num_batches_tracked"


def _convert_activated(module: nn.Module, new_cls: type, act_name, act_param, who: str,
                       invertible: bool, **attrs):
    """timm's InplaceAbn and the inplace_abn package's ABN / InPlaceABN / InPlaceABNSync: a class
    swap to ``new_cls`` that keeps the module and every Parameter and buffer.

    ``invertible`` (the in-place classes, whose kernels scale by |weight| + eps): the weight
    becomes |weight| + eps, in place, and the layer writes its output over its input as the
    original did. A module without ``num_batches_tracked`` (timm's, inplace_abn before 1.1)
    gets one (zero); restore_model removes it and the weight's eps again (see the module
    docstring).
    """
    allowed = ("'leaky_relu', 'elu' or 'identity'" if invertible
               else "'relu', 'leaky_relu', 'elu' or 'identity'")
    if not isinstance(act_name, str) or act_name not in _ABN_ACTIVATIONS or (
            invertible and act_name == "relu"):
        raise NotConvertible(f"activation {act_name!r}: {who} takes {allowed}")
    activation = _ABN_ACTIVATIONS[act_name]
    try:
        slope = float(act_param)
        functional.options(True, module.momentum, float(module.eps), activation, slope,
                           invertible=invertible)
    except (TypeError, ValueError) as exc:
        raise NotConvertible(str(exc)) from None
    children = dict(module._modules)
    drop = children.pop("drop", None)
    if drop is not None and not is_noop(drop):
        raise NotConvertible(f"drop {type(drop).__name__}: {new_cls.__name__} has no place for "
                             "a drop module between its batch norm and activation")
    if children:
        raise NotConvertible(f"child modules {', '.join(children)}: {new_cls.__name__} would "
                             "not run them")
    notes = [f"activation {activation or 'none'} fused"]
    params, buffers = module._parameters, module._buffers
    add_batches = _BATCHES not in buffers and _BATCHES not in params
    if add_batches and module.momentum is None:
        notes.append("momentum=None: a cumulative average, as in torch (the original cannot "
                     "use None)")
    abs_weight = invertible and params.get("weight") is not None
    attrs.update(activation=activation, negative_slope=slope)
    if invertible:
        attrs["inplace"] = True
        notes.append("in place, invertible")
    if "track_running_stats" not in module.__dict__:
        attrs["track_running_stats"] = True

    def undo(m: nn.Module) -> None:
        if add_batches:
            m._buffers.pop(_BATCHES, None)
        if abs_weight:
            _remove_weight_eps(m)

    if add_batches:
        mean = buffers.get("running_mean")
        buffers[_BATCHES] = torch.zeros((), dtype=torch.long,
                                        device=None if mean is None else mean.device)
    if abs_weight:
        with torch.no_grad():
            module.weight.abs_().add_(module.eps)
        notes.append("weight := |weight| + eps")
    return _swap(module, new_cls, ("drop",) if drop is not None else (), attrs, undo), \
        "; ".join(notes)


def _remove_weight_eps(m: nn.Module) -> None:
    """restore_model of an in-place class: the weight w' the tritonbn layer scaled by (|w'| kept
    >= eps) back to w with |w| + eps = max(|w'|, eps). A negative w' (trained through zero after
    the conversion) has no such w: its sign is lost, with a warning."""
    w = m._parameters.get("weight")
    if w is None:
        return
    with torch.no_grad():
        negative = int((w < 0).sum())
        w.copy_(torch.copysign((w.abs() - m.eps).clamp(min=0), w))
    if negative:
        warnings.warn(f"tritonbn.restore_model: {type(m).__name__} scales by |weight| + eps, but "
                      f"{negative} of its {w.numel()} channels have a negative scale since the "
                      "conversion; they get the same scale with a positive sign", stacklevel=6)


def _convert_timm_inplace_abn(module: nn.Module):
    return _convert_activated(module, InPlaceABN, module.act_name, module.act_param,
                              "timm's InplaceAbn", invertible=True)


for _package in ("timm.layers.inplace_abn", "timm.models.layers.inplace_abn"):
    register_conversion(f"{_package}.InplaceAbn", _convert_timm_inplace_abn)

register_conversion(
    "inplace_abn.abn.InPlaceABN",
    lambda m: _convert_activated(m, InPlaceABN, m.activation, m.activation_param,
                                 "inplace_abn's InPlaceABN", invertible=True))
register_conversion(
    "inplace_abn.abn.InPlaceABNSync",
    lambda m: _convert_activated(m, InPlaceABNSync, m.activation, m.activation_param,
                                 "inplace_abn's InPlaceABNSync", invertible=True,
                                 process_group=getattr(m, "group", None)))
register_conversion(
    "inplace_abn.abn.ABN",
    lambda m: _convert_activated(m, BatchNormAct, m.activation, m.activation_param,
                                 "inplace_abn's ABN", invertible=False))
