"""In-place activated batch norm through the model transforms: timm's InplaceAbn and the
inplace_abn package's InPlaceABN / InPlaceABNSync / ABN converted without that package (the
in-place ones with |weight| + eps written into the weight), convert_model(inplace_abn=True) on
layers with an activation of their own, and restore_model after all of it. Float64 on small
tensors, so each comparison with torch is tight."""
import copy
import importlib.util
import itertools
import warnings

import pytest
import torch
import torch.nn.functional as F
from timm.layers import BatchNormAct2d as TimmBatchNormAct2d
from timm.layers import InplaceAbn
from timm.models.cspnet import CspModelCfg, CspNet, CspStagesCfg, CspStemCfg
from torch import nn

import tritonbn
from tritonbn.transforms.registry import ORIGIN, BatchNormAct

TIGHT = dict(rtol=1e-9, atol=1e-12)
ACTS = {"leaky_relu": lambda p: nn.LeakyReLU(p), "elu": lambda p: nn.ELU(p),
        "identity": lambda p: nn.Identity(), "relu": lambda p: nn.ReLU()}


def _randomize(model, seed=0):
    """Statistics, bias and a weight of both signs, |weight| in [0.3, 1.3], for every layer with
    running statistics."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m._buffers.get("running_mean"), torch.Tensor):
                c = m.running_mean.numel()
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.3)
                m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
                if m._parameters.get("weight") is not None:
                    sign = torch.where(torch.rand(c, generator=g) < 0.5, -1.0, 1.0)
                    m.weight.copy_(sign * (torch.rand(c, generator=g) + 0.3))
                    m.bias.copy_(torch.randn(c, generator=g) * 0.3)
    return model


def _state(model, x, steps=("train",)):
    """Output, input gradient, parameter gradients, parameters after an SGD step and buffers,
    of one training step of ``model`` on a copy of ``x``."""
    model.train()
    x = x.detach().clone().requires_grad_(True)
    out = model(x)
    weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
    loss = (out * weights).sum()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    grads["input"] = x.grad
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    model.zero_grad(set_to_none=True)
    return dict(out=out.detach(), loss=loss.detach(), grads=grads,
                params={n: p.detach().clone() for n, p in model.named_parameters()},
                buffers={n: b.clone() for n, b in model.named_buffers()})


def _assert_close_dicts(ours, ref, rename=lambda n: n):
    ref = {rename(n): v for n, v in ref.items()}
    assert ours.keys() == ref.keys()
    for name in ours:
        if ours[name].dtype == torch.long:
            assert torch.equal(ours[name], ref[name]), name
        else:
            torch.testing.assert_close(ours[name], ref[name], **TIGHT, msg=name)


# ----------------------------------------------------------------------------------------------
# timm's InplaceAbn in a timm model


def _timm_inplace_abn_model():
    """A small timm CspNet (darknet stages) whose every norm layer is timm's InplaceAbn, the
    activations cycling through leaky_relu, elu and identity. timm 1.0's builders pass device,
    dtype and act_kwargs, which InplaceAbn does not take: the norm_layer function drops them."""
    acts = itertools.cycle([("leaky_relu", 0.05), ("elu", 0.7), ("identity", 0.01)])

    def norm_layer(num_features, apply_act=True, act_kwargs=None, device=None, dtype=None,
                   **kwargs):
        name, param = next(acts)
        return InplaceAbn(num_features, apply_act=apply_act, act_layer=name, act_param=param,
                          **kwargs)

    cfg = CspModelCfg(
        stem=CspStemCfg(out_chs=8, stride=2, kernel_size=3, pool=""),
        stages=CspStagesCfg(depth=(1, 1), out_chs=(16, 24), stride=2, stage_type="dark",
                            block_type="dark", bottle_ratio=0.5),
        act_layer="leaky_relu", norm_layer=norm_layer)
    return _randomize(CspNet(cfg, num_classes=5).double())


def _torch_twin(model):
    """A copy of the model with each InplaceAbn replaced by nn.Sequential(torch's BatchNorm2d
    with weight |w| + eps, the activation): what the inplace_abn kernels compute."""
    twin = copy.deepcopy(model)
    replaced = []
    for name, m in list(twin.named_modules()):
        if isinstance(m, InplaceAbn):
            bn = nn.BatchNorm2d(m.num_features, m.eps, m.momentum, dtype=torch.float64)
            with torch.no_grad():
                bn.weight.copy_(m.weight.abs() + m.eps)
                bn.bias.copy_(m.bias)
                bn.running_mean.copy_(m.running_mean)
                bn.running_var.copy_(m.running_var)
            twin.set_submodule(name, nn.Sequential(bn, ACTS[m.act_name](m.act_param)))
            replaced.append(name)
    return twin, replaced


def test_timm_inplace_abn_model_trains_a_step_without_the_inplace_abn_package():
    assert importlib.util.find_spec("inplace_abn") is None
    model = _timm_inplace_abn_model()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(1))
    with pytest.raises(ImportError, match="InplaceABN"):
        model(x.clone())     # timm's layer needs the package: the conversion is what runs it
    twin, replaced = _torch_twin(model)
    assert len(replaced) == 7
    layers = {n: m for n, m in model.named_modules() if isinstance(m, InplaceAbn)}
    weights = {n: (m.weight, m.weight.detach().clone()) for n, m in layers.items()}

    converted, report = tritonbn.convert_model(model, report=True)

    assert converted is model and not report.left_on_torch
    for name, m in layers.items():
        assert model.get_submodule(name) is m and type(m) is tritonbn.InPlaceABN
        assert m.invertible and m.inplace and m.training
        weight, before = weights[name]
        assert m.weight is weight                                # the same Parameter ...
        torch.testing.assert_close(weight.detach(), before.abs() + m.eps, rtol=0, atol=0)
        assert m.num_batches_tracked.item() == 0                 # ... and a counter added
        assert report[name].kernels and report[name].result == "tritonbn.InPlaceABN"
        assert "weight := |weight| + eps" in report[name].note
    assert {m.activation for m in layers.values()} == {"leaky_relu", "elu", None}

    ours, ref = _state(model, x), _state(twin, x)

    def rename(n):   # the twin's "<layer>.0.<tensor>" is the converted "<layer>.<tensor>"
        for layer in replaced:
            n = n.replace(f"{layer}.0.", f"{layer}.")
        return n

    torch.testing.assert_close(ours["out"], ref["out"], **TIGHT)
    torch.testing.assert_close(ours["loss"], ref["loss"], **TIGHT)
    for key in ("grads", "params", "buffers"):
        _assert_close_dicts(ours[key], ref[key], rename)
    assert all(m.num_batches_tracked.item() == 1 for m in layers.values())


def test_timm_inplace_abn_drop_module_is_kept_out_or_refused():
    # timm ignores InplaceAbn's drop_layer today; a drop set on it later must not be lost.
    quiet, active = InplaceAbn(4).double(), InplaceAbn(4).double()
    quiet.drop, active.drop = nn.Identity(), nn.Dropout(0.5)
    model = nn.Sequential(quiet, active)
    with pytest.warns(tritonbn.ConversionWarning, match="drop Dropout"):
        _, report = tritonbn.convert_model(model, report=True)
    assert type(quiet) is tritonbn.InPlaceABN and "drop" not in quiet._modules
    assert type(active) is InplaceAbn and not report["1"].kernels
    assert "drop Dropout" in report["1"].note
    assert active.weight.min() == 1.0 and "num_batches_tracked" not in active._buffers  # untouched
    tritonbn.restore_model(model)
    assert type(quiet) is InplaceAbn and type(quiet.drop) is nn.Identity


# ----------------------------------------------------------------------------------------------
# the inplace_abn package's classes, as stand-ins of its two state layouts


class _ABN(nn.Module):
    """inplace_abn's ABN: state (1.1: track_running_stats and num_batches_tracked; 1.0.x:
    neither) and forward, in torch; the in-place subclasses scale by |weight| + eps."""

    old = False
    scale_abs = False

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 activation="leaky_relu", activation_param=0.01):
        super().__init__()
        self.num_features, self.eps, self.momentum, self.affine = num_features, eps, momentum, \
            affine
        self.activation, self.activation_param = activation, activation_param
        if not self.old:
            self.track_running_stats = True
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        if not self.old:
            self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def forward(self, x):
        if self.training and not self.old:
            self.num_batches_tracked = self.num_batches_tracked + 1
        weight = self.weight.abs() + self.eps if self.scale_abs else self.weight
        x = F.batch_norm(x, self.running_mean, self.running_var, weight, self.bias,
                         self.training, self.momentum, self.eps)
        return ACTS[self.activation](self.activation_param)(x)


def _stand_in(name, old=False, scale_abs=None, **extra):
    return type(name, (_ABN,), dict(__module__="inplace_abn.abn", __qualname__=name, old=old,
                                    scale_abs=name != "ABN" if scale_abs is None else scale_abs,
                                    **extra))


def _sync_init(self, *args, group=None, **kwargs):
    _ABN.__init__(self, *args, **kwargs)
    self.group = group


ABN, InPlaceABN = _stand_in("ABN"), _stand_in("InPlaceABN")
InPlaceABNSync = _stand_in("InPlaceABNSync", __init__=_sync_init)
OldInPlaceABN = _stand_in("InPlaceABN", old=True)   # inplace_abn 1.0.x: no batch counter


@pytest.mark.parametrize("cls, became, activation, param, shape", [
    (InPlaceABN, tritonbn.InPlaceABN, "leaky_relu", 0.1, (2, 4, 3, 3)),
    (OldInPlaceABN, tritonbn.InPlaceABN, "elu", 0.5, (3, 4, 5)),
    (InPlaceABNSync, tritonbn.InPlaceABNSync, "identity", 0.01, (2, 4, 2, 2, 2)),
])
def test_inplace_abn_package_classes_convert_with_abs_weight_plus_eps(cls, became, activation,
                                                                      param, shape):
    group = object()
    kwargs = dict(group=group) if cls is InPlaceABNSync else {}
    layer = _randomize(cls(4, eps=1e-3, momentum=0.2, activation=activation,
                           activation_param=param, **kwargs).double())
    original = copy.deepcopy(layer)
    w0, weight = layer.weight.detach().clone(), layer.weight
    assert (w0 < 0).any()

    assert tritonbn.convert_model(layer) is layer and type(layer) is became
    assert layer.weight is weight and layer.invertible and layer.inplace
    assert layer.activation == (None if activation == "identity" else activation)
    assert layer.activation_param == param and layer.eps == 1e-3 and layer.momentum == 0.2
    torch.testing.assert_close(weight.detach(), w0.abs() + 1e-3, rtol=0, atol=0)
    if cls is InPlaceABNSync:
        assert layer.group is group and layer.process_group is group

    x = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    ours, ref = _state(layer, x), _state(original, x)
    torch.testing.assert_close(ours["out"], ref["out"], **TIGHT)
    # d/dw of |w| + eps is sign(w): the converted weight's gradient is the original's times
    # sign(w), as the inplace_abn kernels flip it (so an optimizer moves |w| alike)
    ref["grads"]["weight"] = ref["grads"]["weight"] * w0.sign()
    _assert_close_dicts(ours["grads"], ref["grads"])
    torch.testing.assert_close(ours["params"]["bias"], ref["params"]["bias"], **TIGHT)
    torch.testing.assert_close(ours["params"]["weight"],
                               ref["params"]["weight"].abs() + 1e-3, **TIGHT)
    if cls is OldInPlaceABN:    # given a counter; the original has none
        assert ours["buffers"].pop("num_batches_tracked").item() == 1
    _assert_close_dicts(ours["buffers"], ref["buffers"])

    # eval: the running statistics, and y written over x as the original did
    layer.eval(), original.eval()
    x2 = x * 1.0
    with torch.no_grad():
        y = layer(x2)
        torch.testing.assert_close(y, original(x), **TIGHT)
    assert y.data_ptr() == x2.data_ptr()


def test_inplace_abn_package_abn_becomes_an_any_rank_fused_layer_with_its_weight_as_is():
    layers = [_randomize(ABN(4, activation="relu").double()),
              _randomize(ABN(4, activation="leaky_relu", activation_param=0.2).double())]
    model = nn.Sequential(*layers)
    originals = copy.deepcopy(model)
    w0 = [m.weight.detach().clone() for m in layers]
    _, report = tritonbn.convert_model(model, report=True)
    for m, w, act in zip(layers, w0, ("relu", "leaky_relu")):
        assert type(m) is BatchNormAct and m.activation == act and not m.invertible
        assert not m.inplace and torch.equal(m.weight.detach(), w)   # negative weights kept
    assert report["0"].fused == "relu" and report["1"].fused == "leaky_relu"
    for shape in ((6, 4), (2, 4, 3, 3)):     # (N, C) and (N, C, H, W) alike
        x = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
        ours, ref = _state(model, x), _state(originals, x)
        for key in ("grads", "params", "buffers"):
            _assert_close_dicts(ours[key], ref[key])
        torch.testing.assert_close(ours["out"], ref["out"], **TIGHT)


def test_inplace_abn_package_classes_refuse_what_they_cannot_compute():
    relu = InPlaceABN(4, activation="relu").double()          # inplace_abn raises for it too
    flat = InPlaceABN(4, activation="leaky_relu", activation_param=0.0).double()
    with torch.no_grad():
        relu.weight.fill_(-0.5)
    with pytest.warns(tritonbn.ConversionWarning) as caught:
        _, report = tritonbn.convert_model(nn.Sequential(relu, flat), report=True)
    assert "2 of 2" in str(caught[0].message)
    assert type(relu) is InPlaceABN and type(flat) is InPlaceABN
    assert "activation 'relu'" in report["0"].note and "'leaky_relu', 'elu' or 'identity'" in \
        report["0"].note
    assert "activation_param must be > 0" in report["1"].note
    assert (relu.weight == -0.5).all()                       # left as it was


# ----------------------------------------------------------------------------------------------
# convert_model(inplace_abn=True)


def _norm_act_model():
    """conv -> timm BatchNormAct2d (LeakyReLU, ELU, Identity, ReLU) -> ... -> torch BatchNorm2d."""
    layers, c = [], 3
    acts = [dict(act_layer=nn.LeakyReLU, act_kwargs=dict(negative_slope=0.2)),
            dict(act_layer=nn.ELU, act_kwargs=dict(alpha=0.6)),
            dict(act_layer=nn.Identity), dict(act_layer=nn.ReLU), None]
    for act in acts:
        layers.append(nn.Conv2d(c, 4, 1, bias=False))
        layers.append(TimmBatchNormAct2d(4, **act) if act else nn.BatchNorm2d(4))
        c = 4
    return _randomize(nn.Sequential(*layers).double())


def _saved_inputs(model, x):
    """For each batch-norm layer (by index), whether its input's storage was saved for backward
    by the forward (inputs kept alive meanwhile, so no storage is reused); on a copy."""
    model = copy.deepcopy(model)
    inputs, saved = {}, set()
    handles = [m.register_forward_pre_hook(lambda _m, args, i=i: inputs.setdefault(i, args[0]))
               for i, m in enumerate(model) if i % 2]

    def pack(t):
        saved.add(t.untyped_storage().data_ptr())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = model(x)
    y.sum().backward()
    for h in handles:
        h.remove()
    return {i: t.untyped_storage().data_ptr() in saved for i, t in inputs.items()}


def test_convert_model_inplace_abn_makes_layers_with_an_invertible_activation_invertible():
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    torch_model = _norm_act_model()
    default, plain = tritonbn.convert_model(copy.deepcopy(torch_model), report=True)
    model, report = tritonbn.convert_model(copy.deepcopy(torch_model), report=True,
                                           inplace_abn=True)

    # default: unchanged -- nothing invertible, every input saved
    assert not any(m.invertible for m in default[1::2])
    assert not any("in-place" in r.note for r in plain)
    assert _saved_inputs(default, x) == {1: True, 3: True, 5: True, 7: True, 9: True}

    # inplace_abn=True: leaky_relu, elu (now fused) and identity invertible; relu and the plain
    # batch norm as before, with the reason
    assert [m.activation for m in model[1::2]] == ["leaky_relu", "elu", None, "relu", None]
    assert [m.invertible for m in model[1::2]] == [True, True, True, False, False]
    assert not any(m.inplace for m in model[1::2])      # a new output: the input may be read
    assert model[1].negative_slope == 0.2 and model[3].negative_slope == 0.6
    for i in (1, 3, 5):
        assert "in-place activated: only its output is saved" in report[str(i)].note
    assert "activation 'relu' is not invertible" in report["7"].note
    assert "no activation of its own" in report["9"].note
    assert "tritonbn.fuse(model, inplace=True)" in report["9"].note
    assert _saved_inputs(model, x) == {1: False, 3: False, 5: False, 7: True, 9: True}

    # and it computes what torch does
    ours, ref = _state(model, x), _state(torch_model, x)
    torch.testing.assert_close(ours["out"], ref["out"], **TIGHT)
    for key in ("grads", "params", "buffers"):
        _assert_close_dicts(ours[key], ref[key])


def test_convert_model_inplace_abn_on_tritonbn_layers_and_the_in_place_op_after_one():
    act = tritonbn.BatchNormAct2d(4, activation="leaky_relu", negative_slope=0.1).double()
    ident = tritonbn.BatchNormAct2d(4, activation=None).double()
    silu = tritonbn.BatchNormAct2d(4, activation="silu").double()
    abn = ABN(4, activation="elu", activation_param=0.3).double()
    _, report = tritonbn.convert_model(nn.Sequential(act, ident, silu, abn), report=True,
                                       inplace_abn=True)
    assert [m.invertible for m in (act, ident, silu, abn)] == [True, True, False, True]
    assert "already tritonbn's; in-place activated" in report["0"].note
    assert "activation 'silu' is not invertible" in report["2"].note
    # an in-place op on the saved output is refused by autograd, not silently wrong
    y = ident(torch.randn(2, 4, 3, 3, dtype=torch.float64, requires_grad=True) * 1.0)
    y.relu_()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


# ----------------------------------------------------------------------------------------------
# restore_model


def test_restore_model_after_the_timm_inplace_abn_conversion():
    model = _timm_inplace_abn_model()
    layers = {n: m for n, m in model.named_modules() if isinstance(m, InplaceAbn)}
    attrs = {n: dict(vars(m)) for n, m in layers.items()}
    keys = list(model.state_dict())
    tritonbn.convert_model(model)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    _state(model, x)                                    # a step: weights move
    trained = {n: m.weight.detach().clone() for n, m in layers.items()}
    assert min(w.min() for w in trained.values()) > 1e-5    # (no scale crossed zero)

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert tritonbn.restore_model(model) is model
    assert list(model.state_dict()) == keys             # no num_batches_tracked any more
    for name, m in layers.items():
        assert type(m) is InplaceAbn and model.get_submodule(name) is m
        assert vars(m).keys() == attrs[name].keys()
        assert (m.act_name, m.act_param) == (attrs[name]["act_name"], attrs[name]["act_param"])
        # timm's layer scales by |w| + eps: the scale the converted layer had
        torch.testing.assert_close(m.weight.detach().abs() + m.eps, trained[name], **TIGHT)


def test_restore_model_after_the_inplace_abn_package_conversions():
    group = object()
    sync = _randomize(InPlaceABNSync(4, activation="identity", group=group).double())
    old = _randomize(OldInPlaceABN(4, activation="elu", activation_param=0.5).double())
    abn = _randomize(ABN(4, activation="leaky_relu", activation_param=0.2).double())
    # (1x1 convolutions in between: an in-place layer must not overwrite the output another
    # one saved, with inplace_abn as here)
    model = nn.Sequential(sync, nn.Conv2d(4, 4, 1), old, nn.Conv2d(4, 4, 1), abn).double()
    layers = (sync, old, abn)
    before = {i: dict(vars(m)) for i, m in enumerate(layers)}
    keys = list(model.state_dict())
    tritonbn.convert_model(model, inplace_abn=True)
    assert abn.invertible and "invertible" in vars(abn)
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    _state(model, x)
    with torch.no_grad():   # trained through zero (not expressible in the original) and below eps
        sync.weight.copy_(torch.tensor([-0.25, 0.5, 0.75, 1e-6]))
    model.eval()
    with torch.no_grad():
        expected = [m(x.clone()) for m in layers]

    with pytest.warns(UserWarning, match="1 of its 4 channels have a negative scale"):
        tritonbn.restore_model(model)
    assert [type(m) for m in layers] == [InPlaceABNSync, OldInPlaceABN, ABN]
    assert list(model.state_dict()) == keys
    for i, m in enumerate(layers):
        assert vars(m).keys() == before[i].keys() and ORIGIN not in vars(m)
        assert m.activation == before[i]["activation"]
    assert sync.group is group
    with torch.no_grad():
        got = [m(x.clone()) for m in layers]
        # the sign that was lost (identity activation): scale 0.25 instead of -0.25
        expected[0][:, 0] = 2 * sync.bias[0] - expected[0][:, 0]
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, **TIGHT)


def test_restore_model_after_convert_model_inplace_abn():
    torch_model = _norm_act_model()
    model = tritonbn.convert_model(copy.deepcopy(torch_model), inplace_abn=True)
    own = tritonbn.BatchNormAct2d(4, activation="elu").double()
    tritonbn.convert_model(own, inplace_abn=True)
    assert own.invertible
    tritonbn.restore_model(model), tritonbn.restore_model(own)
    assert [type(m) for m in model] == [type(m) for m in torch_model]
    for m, t in zip(model[1::2], torch_model[1::2]):
        assert vars(m).keys() == vars(t).keys() and m._modules.keys() == t._modules.keys()
        assert [type(c) for c in m.children()] == [type(c) for c in t.children()]
    assert type(own) is tritonbn.BatchNormAct2d and not own.invertible
    assert ORIGIN not in vars(own) and "invertible" not in vars(own)
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(_state(model, x)["out"], _state(torch_model, x)["out"], **TIGHT)
