"""The module kinds the transforms recognize around a batch norm, by exact class: activations
tritonbn fuses, modules that do nothing, and "drop" modules (dropout, stochastic depth, drop path,
drop block) that are the identity in eval mode.

Classes of optional packages (torchvision, timm) are named by ``module.QualName`` strings and
compared with ``qualname(type(m))``: nothing here imports those packages; a model that holds one
of their modules has imported them already.
"""
from __future__ import annotations

from typing import Optional

from torch import nn

__all__ = ["qualname", "has_hooks", "activation_of", "is_noop", "drop_probability",
           "drop_active", "is_drop"]


def qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def has_hooks(m: nn.Module) -> bool:
    """Hooks of its own: they see the module's input or output, which fusing or folding would
    change or skip."""
    return any(getattr(m, name, None) for name in ("_forward_hooks", "_forward_pre_hooks",
                                                   "_backward_hooks", "_backward_pre_hooks",
                                                   "_forward_hooks_with_kwargs",
                                                   "_forward_pre_hooks_with_kwargs"))


# Activation modules, exact types: a subclass may compute something else.
_TORCH_ACTIVATIONS = {nn.ReLU: "relu", nn.ReLU6: "relu6", nn.LeakyReLU: "leaky_relu",
                      nn.SiLU: "silu", nn.GELU: "gelu", nn.Hardswish: "hardswish",
                      nn.Sigmoid: "sigmoid", nn.Tanh: "tanh", nn.ELU: "elu"}
# timm's own activation layers (timm.layers.activations): same functions as tritonbn's, up to
# rounding (Swish is x * sigmoid(x), HardSwish x * relu6(x + 3) / 6).
_TIMM_ACTIVATIONS = {f"{package}.{name}": act
                     for package in ("timm.layers.activations", "timm.models.layers.activations")
                     for name, act in (("GELU", "gelu"), ("GELUTanh", "gelu_tanh"),
                                       ("Sigmoid", "sigmoid"), ("Tanh", "tanh"),
                                       ("Swish", "silu"), ("HardSwish", "hardswish"))}


def activation_of(m: nn.Module) -> Optional[tuple]:
    """(tritonbn activation name, negative_slope) when ``m`` is an activation module tritonbn
    fuses (and has no hooks), else None. nn.Identity is (None, 0.01): no activation. ELU's
    alpha is stored as the negative_slope (the kernels' one activation parameter)."""
    if has_hooks(m):
        return None
    cls = type(m)
    if cls is nn.Identity:
        return None, 0.01
    name = _TORCH_ACTIVATIONS.get(cls) or _TIMM_ACTIVATIONS.get(qualname(cls))
    if name is None:
        return None
    if name == "gelu" and cls is nn.GELU:
        name = {"none": "gelu", "tanh": "gelu_tanh"}.get(m.approximate)
        if name is None:
            return None
    if name == "elu":
        return name, float(m.alpha)
    return name, float(getattr(m, "negative_slope", 0.01))


# Drop modules: the identity in eval mode and with probability 0, random in training. Each
# entry names the attribute holding the drop probability.
_DROPS = {
    "torch.nn.modules.dropout.Dropout": "p", "torch.nn.modules.dropout.Dropout1d": "p",
    "torch.nn.modules.dropout.Dropout2d": "p", "torch.nn.modules.dropout.Dropout3d": "p",
    "torch.nn.modules.dropout.AlphaDropout": "p",
    "torch.nn.modules.dropout.FeatureAlphaDropout": "p",
    # torchvision.ops.stochastic_depth: returns its input when not training or p == 0
    "torchvision.ops.stochastic_depth.StochasticDepth": "p",
    # timm.layers.drop: drop_path / drop_block return their input when not training or p == 0
    "timm.layers.drop.DropPath": "drop_prob", "timm.models.layers.drop.DropPath": "drop_prob",
    "timm.layers.drop.DropBlock2d": "drop_prob",
    "timm.models.layers.drop.DropBlock2d": "drop_prob",
}


def is_drop(m: nn.Module) -> bool:
    return qualname(type(m)) in _DROPS and not has_hooks(m)


def drop_probability(m: nn.Module) -> Optional[float]:
    attr = _DROPS.get(qualname(type(m)))
    return None if attr is None else float(getattr(m, attr))


def drop_active(m: nn.Module) -> bool:
    """Whether the drop module ``m`` changes its input now (training, probability > 0).
    Modules of unknown kinds count as active: the caller then runs them."""
    if has_hooks(m):
        return True      # its hooks must see every call
    if type(m) is nn.Identity:
        return False
    p = drop_probability(m)
    return p is None or (m.training and p > 0)


def is_noop(m: nn.Module) -> bool:
    """A module that returns its input unchanged in train and eval mode alike: nn.Identity, or a
    drop module with probability 0 (hooks excepted: they would see the value)."""
    if has_hooks(m):
        return False
    if type(m) is nn.Identity:
        return True
    p = drop_probability(m) if is_drop(m) else None
    return p == 0.0
