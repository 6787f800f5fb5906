"""The model zoo of the ``zoo`` test tier: torchvision and timm architectures, built without
weights, with the smallest inputs that leave at least 4 values per channel (batch x positions) in
the last stage, and the machinery that runs a model's training step, eval forward and
train -> eval -> train switch and compares two such runs.

torchvision and timm are imported only when a zoo model is built.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable

import pytest
import torch
from torch import nn

# Batch 2 and 64 x 64 leave 2 x 2 x 2 = 8 values per channel after a 32x downsampling. (Batch 1
# would leave 4 but saves little: the interpreter's cost here is per launch more than per
# element.) r3d_18 (16x spatial, 4x temporal downsampling with its stem) gets 4 frames of
# 32 x 32, ending as 2 x 1 x 2 x 2; at batch 1 torch's conv3d returns NCDHW tensors, whose 512
# channels of 4 positions cost the interpreter ten times more.
IMAGE = (2, 3, 64, 64)
VIDEO = (2, 3, 4, 32, 32)


def _tv():
    return pytest.importorskip("torchvision")


def _timm(name: str):
    timm = pytest.importorskip("timm")
    return lambda: timm.create_model(name, pretrained=False)


def _frozen_resnet50():
    tv = _tv()
    from torchvision.ops.misc import FrozenBatchNorm2d
    return tv.models.resnet50(weights=None, norm_layer=FrozenBatchNorm2d)


def _fpn_backbone():
    _tv()
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
    return resnet_fpn_backbone(backbone_name="resnet50", weights=None, trainable_layers=3)


@dataclasses.dataclass(frozen=True)
class Zoo:
    id: str
    build: Callable[[], nn.Module]
    # (batch-norm-like layers, fused by tritonbn.fuse, folded by tritonbn.fold_into_conv):
    # the unfused ones feed a convolution or two consumers, the unfolded ones follow a concat
    expect: tuple = (0, 0, 0)
    shape: tuple = IMAGE


def _tv_model(name, **kwargs):
    return lambda: getattr(_tv().models, name)(weights=None, **kwargs)


ZOO = [
    Zoo("tv.resnet18", _tv_model("resnet18"), (20, 17, 20)),
    Zoo("tv.resnet50", _tv_model("resnet50"), (53, 49, 53)),
    Zoo("tv.mobilenet_v2", _tv_model("mobilenet_v2"), (52, 45, 52)),
    Zoo("tv.mobilenet_v3_small", _tv_model("mobilenet_v3_small"), (34, 29, 34)),
    # stochastic depth with p > 0 between the last batch norm of a block and its add
    Zoo("tv.efficientnet_b0", _tv_model("efficientnet_b0"), (49, 42, 49)),
    Zoo("tv.regnet_x_400mf", _tv_model("regnet_x_400mf"), (71, 67, 71)),
    Zoo("tv.shufflenet_v2_x0_5", _tv_model("shufflenet_v2_x0_5"), (56, 37, 56)),
    Zoo("tv.densenet121", _tv_model("densenet121"), (121, 121, 59)),
    # auxiliary heads in training: the model's own forward depends on the mode, so its
    # submodules are fused one by one; eval mode does not call the heads' 2 batch norms
    Zoo("tv.googlenet", _tv_model("googlenet", init_weights=True), (59, 59, 57)),
    Zoo("tv.r3d_18", lambda: _tv().models.video.r3d_18(weights=None), (20, 17, 20), VIDEO),
    Zoo("tv.resnet50_frozen_bn", _frozen_resnet50, (53, 49, 53)),
    Zoo("tv.resnet50_fpn_backbone", _fpn_backbone, (53, 49, 53)),
    Zoo("timm.resnet50", _timm("resnet50"), (53, 49, 53)),
    Zoo("timm.efficientnet_b0", _timm("efficientnet_b0"), (49, 42, 49)),
    Zoo("timm.mobilenetv3_small_100", _timm("mobilenetv3_small_100"), (34, 29, 34)),
    Zoo("timm.regnety_002", _timm("regnety_002"), (44, 40, 44)),
    Zoo("timm.cspdarknet53", _timm("cspdarknet53"), (67, 67, 67)),
    Zoo("timm.densenet121", _timm("densenet121"), (121, 121, 59)),
]


def memory_format(shape) -> torch.memory_format:
    return torch.channels_last if len(shape) == 4 else torch.channels_last_3d


def randomize(model: nn.Module, x: torch.Tensor, seed: int = 0) -> nn.Module:
    """Every batch-norm-like layer gets gamma and beta away from the identity (parameters or, for
    frozen layers, buffers) and running statistics near those of its input in an eval forward of
    ``x`` (mean moved by a tenth of a standard deviation, variance scaled by 0.75-1.25), so that
    eval mode and folding are tested on statistics that matter, and a deep network of random
    weights keeps its eval activations in float32's range (statistics drawn independently of the
    activations let them grow block after block: regnet_x_400mf overflowed float32 in eval)."""
    g = torch.Generator().manual_seed(seed)
    layers = [m for m in model.modules()
              if "running_mean" in m._buffers and m._buffers["running_mean"] is not None]

    def calibrate(m, args):
        inp = args[0].detach().to(m.running_mean.dtype)
        dims = [d for d in range(inp.dim()) if d != 1]
        mean, var = inp.mean(dims), inp.var(dims, unbiased=False)
        c = mean.numel()
        m.running_mean.copy_(mean + 0.1 * var.sqrt() * torch.randn(c, generator=g))
        m.running_var.copy_(var * (torch.rand(c, generator=g) * 0.5 + 0.75))

    with torch.no_grad():
        for m in layers:
            c = m.running_mean.numel()
            if getattr(m, "weight", None) is not None:
                m.weight.copy_(torch.rand(c, generator=g) * 0.5 + 0.75)
                m.bias.copy_(torch.rand(c, generator=g) * 0.4 - 0.2)
        hooks = [m.register_forward_pre_hook(calibrate) for m in layers]
        try:
            model.eval()(x.to(_dtype(model)))
        finally:
            for h in hooks:
                h.remove()
    return model


def tensors(out) -> list:
    """The tensors of a model's output: a tensor, a tuple / namedtuple, or a dict."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in tensors(v)]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in tensors(v)]
    return []


LR = 0.01
PHASES = ("train", "eval", "train_again")


def _run_phase(model: nn.Module, x: torch.Tensor, phase: str) -> dict:
    """One phase on ``model``: its outputs, gradients (training step) and buffers after it.
    Random draws (dropout, stochastic depth) come from a fixed seed per phase, so models that
    draw the same numbers in the same order see the same masks."""
    import tritonbn
    model.train(phase != "eval")
    torch.manual_seed(PHASES.index(phase) + 1)
    out: dict = {}
    counter = getattr(model, "bn_calls", None)
    before = counter[0] if counter is not None else 0
    context = getattr(model, "zoo_context", contextlib.nullcontext)
    with tritonbn.count_launches() as launches, context():
        if phase == "train":
            for p in model.parameters():
                p.grad = None
            ys = tensors(model(x))
            g = torch.Generator().manual_seed(7)
            loss = sum((y * torch.randn(y.shape, generator=g, dtype=torch.float64).to(y.dtype))
                       .sum() for y in ys)
            loss.backward()
            out["grads"] = {n: p.grad.detach().clone() for n, p in model.named_parameters()
                            if p.grad is not None}
        else:
            with torch.no_grad():
                ys = tensors(model(x))
    out["launches"] = dict(launches)
    if counter is not None:
        out["bn_calls"] = counter[0] - before
    out["outputs"] = [y.detach().clone() for y in ys]
    out["buffers"] = {n: b.detach().clone() for n, b in model.named_buffers()}
    return out


def lockstep(models: dict, x: torch.Tensor) -> list:
    """Training step, SGD update, eval forward, training forward (train -> eval -> train).

    The first model leads: before each phase every other model is given its state (cast to the
    model's dtype), so each phase of every model starts from the same state and errors do not
    compound through the phases; the SGD update is the leader's. Returns, per phase,
    {name: that model's result}."""
    leader = next(iter(models.values()))
    results = []
    for phase in PHASES:
        state = leader.state_dict()
        for model in models.values():
            if model is not leader:
                model.load_state_dict(state)
        results.append({name: _run_phase(model, x.to(_dtype(model)), phase)
                        for name, model in models.items()})
        if phase == "train":
            with torch.no_grad():
                for p in leader.parameters():
                    if p.grad is not None:
                        # a step of LR relative to each parameter's norm: a plain SGD step on
                        # the random loss wrecks networks without batch statistics (frozen batch
                        # norms), whose early gradients are products of many layer gains
                        p -= LR * (p.norm() + 1e-3) / (p.grad.norm() + 1e-30) * p.grad
    for model in models.values():
        model.eval()
    return results


def _dtype(model: nn.Module) -> torch.dtype:
    return next(t.dtype for t in model.state_dict().values() if t.is_floating_point())


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return (a - b).norm().item() / max(b.norm().item(), 1e-300)


def errors(ours: dict, ref: dict) -> dict:
    """Relative errors of one phase's quantities (batch counts compared exactly: they must be
    equal, not close): outputs, gradients (global and per parameter), running statistics."""
    err: dict = {}
    assert len(ours["outputs"]) == len(ref["outputs"])
    err["outputs"] = max(rel(a, b) for a, b in zip(ours["outputs"], ref["outputs"]))
    if "grads" in ref:
        assert ours["grads"].keys() == ref["grads"].keys()
        total = sum(g.double().norm().item() ** 2 for g in ref["grads"].values()) ** 0.5
        err["grads"] = sum((ours["grads"][n].double() - g.double()).norm().item() ** 2
                           for n, g in ref["grads"].items()) ** 0.5 / total
        # per parameter, relative to its own gradient floored at 1e-3 of the whole: a conv bias
        # right before a batch norm has a true gradient of zero, i.e. rounding noise
        err["grad_each"] = max((ours["grads"][n].double() - g.double()).norm().item()
                               / max(g.double().norm().item(), 1e-3 * total)
                               for n, g in ref["grads"].items())
    assert ours["buffers"].keys() == ref["buffers"].keys()
    worst = 0.0
    for name, b in ref["buffers"].items():
        if name.endswith("num_batches_tracked"):
            assert torch.equal(ours["buffers"][name].cpu(), b.cpu()), name
        elif b.is_floating_point():
            worst = max(worst, rel(ours["buffers"][name], b))
    err["buffers"] = worst
    return err


def count_bn_calls(model: nn.Module) -> nn.Module:
    """``model``, counting its batch-norm-like calls in ``model.bn_calls[0]`` (forward
    pre-hooks: for torch's models, as hooks on tritonbn's would keep fuse from fusing);
    the phases record how many calls each made."""
    from tritonbn.transforms.report import is_batch_norm_like
    count = [0]
    for m in model.modules():
        if is_batch_norm_like(m):
            m.register_forward_pre_hook(lambda *_: count.__setitem__(0, count[0] + 1))
    model.bn_calls = count
    return model
