"""tritonbn.fuse(model, inplace=True): in-place activated batch norm where it is safe.

Which layers become invertible (LeakyReLU / ELU / no activation) and which write over their input
(a fresh value read by nothing else); the layers kept on the ordinary path, with the reason in
the report (a non-invertible activation, an output or residual modified in place afterwards, a
submodule's output handed to an untraced forward); and training steps equal to torch's in
float64: the whole torchvision ResNet-50 with LeakyReLU, the drop-path branch, ELU, BN -> add.
The saved bytes are measured in tests/bench/test_memory.py."""
import copy
import operator
import warnings

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import fx, nn
from torchvision.ops import StochasticDepth

import tritonbn
from tritonbn.transforms.fuse import FusedBatchNormAct2d, _written_in_place

# float64 end to end: tritonbn's kernels and torch agree to rounding (measured ~1e-12 on
# ResNet-50's gradients); a wrong recovered input, residual or statistic is off by far more.
REL = 1e-9


def _leaky(model: nn.Module, slope: float = 0.01) -> nn.Module:
    """Every nn.ReLU of ``model`` replaced by nn.LeakyReLU(slope), keeping ``inplace``."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.ReLU:
                setattr(parent, name, nn.LeakyReLU(slope, inplace=child.inplace))
    return model


def _bns(model: nn.Module) -> dict:
    return {n: m for n, m in model.named_modules() if isinstance(m, tritonbn.TritonNorm)}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    if not b.abs().max() > 0:
        return float((a - b).abs().max())
    return float((a - b).norm() / b.norm())


def _step(model, inputs, loss=lambda y: y.square().sum()):
    """One training forward and backward: output, input grads, parameter grads, buffers."""
    model.train()
    model.zero_grad(set_to_none=True)
    inputs = [t.detach().clone().requires_grad_(t.requires_grad) for t in inputs]
    y = model(*inputs)
    loss(y).backward()
    return dict(y=y.detach(), dx=[t.grad for t in inputs],
                grads={n: p.grad for n, p in model.named_parameters()},
                buffers={n: b.clone() for n, b in model.named_buffers()})


def _assert_same_step(ours, ref, rel=REL):
    assert _rel(ours["y"], ref["y"]) <= rel
    for got, want in zip(ours["dx"], ref["dx"]):
        assert (got is None) == (want is None)
        if want is not None:
            assert _rel(got, want) <= rel
    assert ours["grads"].keys() == ref["grads"].keys()
    worst = max(((_rel(ours["grads"][n], g), n) for n, g in ref["grads"].items()),
                default=(0.0, None))
    assert worst[0] <= rel, worst
    assert ours["buffers"].keys() == ref["buffers"].keys()
    for name, b in ref["buffers"].items():
        if b.dtype.is_floating_point:
            assert _rel(ours["buffers"][name], b) <= rel, name
        else:
            assert torch.equal(ours["buffers"][name], b), name


def _check_trains_like_torch(model, *inputs, seed=None):
    """fuse(model, inplace=True) and one float64 training step against the torch model; returns
    (fused model, report)."""
    model = model.double()
    fused, report = tritonbn.fuse(model, inplace=True, report=True)
    inputs = [t.double() for t in inputs]
    if seed is not None:
        torch.manual_seed(seed)
    ref = _step(model, inputs)
    if seed is not None:
        torch.manual_seed(seed)
    _assert_same_step(_step(fused, inputs), ref)
    return fused, report


# ---------------------------------------------------------------- torchvision's ResNet-50


def test_resnet50_leaky_relu_every_layer_invertible_and_in_place():
    model = _leaky(torchvision.models.resnet50(weights=None))
    fused, report = tritonbn.fuse(model, inplace=True, report=True)
    bns = _bns(fused)
    assert len(bns) == 53
    # every layer saves only y; every input is a convolution's output read by nothing else
    assert all(m.invertible and m.inplace for m in bns.values()), [
        n for n, m in bns.items() if not (m.invertible and m.inplace)]
    assert {n for n, m in bns.items() if m.activation is None} == {
        f"layer{i}.0.downsample.1" for i in range(1, 5)}        # the residuals' batch norms
    assert all("in-place activated: saves its output, written over its input" in r.note
               for r in report)
    # opt-in: the default fuse, and the original model, are unchanged
    plain = tritonbn.fuse(model)
    assert not any(m.invertible or m.inplace for m in _bns(plain).values())
    assert not hasattr(model.bn1, "invertible")


def test_resnet50_relu_chains_stay_on_the_fused_path_with_the_reason():
    fused, report = tritonbn.fuse(torchvision.models.resnet50(weights=None), inplace=True,
                                  report=True)
    bns = _bns(fused)
    kept = {n for n, m in bns.items() if not m.invertible}
    assert len(kept) == 49 and all(bns[n].activation == "relu" for n in kept)
    assert all(not bns[n].inplace for n in kept)
    for name in kept:
        assert "not in-place activated: relu is not invertible" in report[name].note, name
        assert report[name].fused in ("relu", "add+relu")      # still fused as before
    # the downsample batch norms have no activation: invertible, written over the conv output
    assert {n for n, m in bns.items() if m.invertible} == {
        f"layer{i}.0.downsample.1" for i in range(1, 5)}
    assert all(bns[f"layer{i}.0.downsample.1"].inplace for i in range(1, 5))


def test_resnet50_leaky_relu_training_step_matches_torch_float64():
    torch.manual_seed(0)
    model = _leaky(torchvision.models.resnet50(weights=None)).double().to(
        memory_format=torch.channels_last)
    fused = tritonbn.fuse(model, inplace=True)
    assert all(m.invertible and m.inplace for m in _bns(fused).values())
    torch.manual_seed(1)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64).contiguous(
        memory_format=torch.channels_last)
    before = x.clone()
    ref = _step(model, [x])
    with tritonbn.count_launches() as launches:
        ours = _step(fused, [x])
    assert launches["bn_bwd_onepass_kernel"] + launches["bn_bwd_apply_kernel"] == 53
    _assert_same_step(ours, ref)
    assert torch.equal(x, before)       # the model's input is never written over
    # eval mode with the running statistics of that step
    model.eval(), fused.eval()
    with torch.no_grad():
        assert _rel(fused(x), model(x)) <= REL


# ------------------------------------------------------------ smaller nets, one pattern each


class ConvBnAct(nn.Module):
    """conv -> BN -> act, then what ``tail`` does with the result."""

    def __init__(self, act: nn.Module, tail=None, cin=3, c=4):
        super().__init__()
        self.conv = nn.Conv2d(cin, c, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c)
        self.act = act
        self.tail = tail or (lambda self, y, x: y)

    def forward(self, x):
        return self.tail(self, self.act(self.bn(self.conv(x))), x)


def _x(shape=(2, 3, 5, 5), seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64) * 1.5 + 0.2


def _randomized(model: nn.Module) -> nn.Module:
    """Batch norms with non-trivial parameters and running statistics (|gamma| >= 0.5)."""
    g = torch.Generator().manual_seed(5)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            sign = torch.where(torch.rand(c, generator=g) < 0.3, -1.0, 1.0)
            m.weight.data = sign * (0.5 + torch.rand(c, generator=g))
            m.bias.data = torch.randn(c, generator=g) * 0.3
            m.running_mean.data = torch.randn(c, generator=g) * 0.1
            m.running_var.data = 0.5 + torch.rand(c, generator=g)
    return model


@pytest.mark.parametrize("act, name, param", [
    (nn.LeakyReLU(0.2), "leaky_relu", 0.2),
    (nn.LeakyReLU(0.1, inplace=True), "leaky_relu", 0.1),
    (nn.ELU(alpha=0.7), "elu", 0.7),
    (nn.ELU(inplace=True), "elu", 1.0),
    (lambda y: F.elu(y, alpha=1.3), "elu", 1.3),
    (lambda y: F.elu(y, 0.4, True), "elu", 0.4),
    (lambda y: F.leaky_relu(y, 0.3), "leaky_relu", 0.3),
], ids=["LeakyReLU", "LeakyReLU-inplace", "ELU", "ELU-inplace", "F.elu", "F.elu-inplace",
        "F.leaky_relu"])
def test_invertible_activations_train_like_torch(act, name, param):
    model = _randomized(ConvBnAct(act if isinstance(act, nn.Module) else _Fn(act)))
    fused, report = _check_trains_like_torch(model, _x())
    bn = fused.bn
    assert type(bn) is FusedBatchNormAct2d and bn.activation == name
    assert bn.negative_slope == pytest.approx(param)          # elu's alpha is kept there
    assert bn.invertible and bn.inplace
    assert report["bn"].fused == name
    # the ordinary fused path knows ELU too
    if name == "elu":
        plain = tritonbn.fuse(model)
        assert plain.bn.activation == "elu" and not plain.bn.invertible


class _Fn(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, y):
        return self.fn(y)


@pytest.mark.parametrize("act, why", [
    (nn.ReLU(), "relu is not invertible"),
    (nn.SiLU(), "silu is not invertible"),
    (nn.GELU(), "gelu is not invertible"),
    (nn.ReLU6(inplace=True), "relu6 is not invertible"),
    (nn.LeakyReLU(0.0), "leaky_relu with negative_slope 0.0 is not invertible"),
    (nn.LeakyReLU(-0.5), "leaky_relu with negative_slope -0.5 is not invertible"),
])
def test_non_invertible_activations_keep_the_fused_path(act, why):
    model = ConvBnAct(act)
    fused, report = tritonbn.fuse(model, inplace=True, report=True)
    assert type(fused.bn) is FusedBatchNormAct2d and fused.bn.activation is not None
    assert not fused.bn.invertible and not fused.bn.inplace
    assert f"not in-place activated: {why}" in report["bn"].note


# In-place writes into the output after the chain, by something fuse does not absorb: the saved
# y would be overwritten, so the layer keeps saving its input.
def _add_(self, y, x):
    y.add_(1.0)
    return y


def _relu_(self, y, x):
    return y.relu_()


def _f_relu_inplace(self, y, x):
    return F.relu(y, inplace=True)


def _f_hardtanh_positional(self, y, x):
    return F.hardtanh(y, -1.0, 1.0, True)


def _torch_sigmoid_(self, y, x):
    return torch.sigmoid_(y)


def _view_mul_(self, y, x):
    y.flatten(1).mul_(2.0)
    return y


def _getitem_zero_(self, y, x):
    y[:, 1:].zero_()
    return y


def _clamp_(self, y, x):
    y.clamp_(max=1.0)
    return y


def _data_mul_(self, y, x):
    y.data.mul_(2.0)          # bypasses autograd's version check: silent if y were saved
    return y


def _relu_module(self, y, x):
    return self.post(y)


WRITERS = {"add_": _add_, "relu_": _relu_, "F.relu(inplace=True)": _f_relu_inplace,
           "F.hardtanh(..., True)": _f_hardtanh_positional, "torch.sigmoid_": _torch_sigmoid_,
           "view then mul_": _view_mul_, "getitem then zero_": _getitem_zero_,
           "clamp_": _clamp_, ".data.mul_": _data_mul_, "nn.ReLU(inplace=True)": _relu_module}


# after a plain batch norm (no activation) the in-place activations would be fused instead
NOT_ACTIVATIONS = ["add_", "F.hardtanh(..., True)", "view then mul_", "getitem then zero_",
                   "clamp_", ".data.mul_"]


@pytest.mark.parametrize("act, writer", [("leaky_relu", w) for w in WRITERS]
                         + [("none", w) for w in NOT_ACTIVATIONS])
def test_an_output_modified_in_place_afterwards_keeps_the_layer_non_invertible(act, writer):
    model = ConvBnAct(nn.LeakyReLU(0.1) if act == "leaky_relu" else nn.Identity(),
                      WRITERS[writer])
    model.post = nn.ReLU(inplace=True)
    fused, report = _check_trains_like_torch(_randomized(model), _x())
    assert not fused.bn.invertible and not fused.bn.inplace
    assert "not in-place activated: its output is modified in place by" in report["bn"].note


def test_residual_modified_in_place_afterwards_keeps_the_layer_non_invertible():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
            self.conv_r = nn.Conv2d(3, 4, 1)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            r = self.conv_r(x)
            y = self.bn(self.conv(x)) + r       # BN -> add: saves r when invertible
            r.mul_(2.0)
            return y * r

    fused, report = _check_trains_like_torch(_randomized(Net()), _x())
    assert report["bn"].fused == "add"
    assert not fused.bn.invertible
    assert "its residual operand is modified in place by .mul_()" in report["bn"].note


def test_an_inplace_dropout_moved_into_the_layer_keeps_it_non_invertible():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
            self.drop, self.act = nn.Dropout(0.5, inplace=True), nn.LeakyReLU(0.1)

        def forward(self, x):
            h = self.conv(x)
            return self.act(self.drop(self.bn(h)) + h)

    fused, report = _check_trains_like_torch(_randomized(Net()), _x(), seed=11)
    assert type(fused.bn.drop) is nn.Dropout and not fused.bn.invertible
    assert "its Dropout runs in place on its output" in report["bn"].note


def test_written_in_place_sees_iadd_and_setitem_of_a_graph_built_by_hand():
    # symbolic tracing records ``+=`` as ``+`` and cannot trace item assignment; a graph
    # built otherwise may hold operator.iadd / operator.setitem
    for op in (operator.iadd, operator.setitem):
        g = fx.Graph()
        x = g.placeholder("x")
        view = g.call_method("view", (x, -1))
        g.call_function(op, (view, 1.0) if op is operator.iadd else (view, 0, 1.0))
        g.output(x)
        assert _written_in_place(x, {}, root=True) == f"{op.__name__}()"
    g2 = fx.Graph()
    x2 = g2.placeholder("x")
    g2.call_function(operator.add, (x2, 1.0))
    g2.output(x2)
    assert _written_in_place(x2, {}, root=True) == ""
    assert _written_in_place(x2, {}, root=False) == \
        "the untraced forward it returns to"


# ----------------------------------------------------------------- writing y over the input


def test_input_read_elsewhere_is_not_written_over():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
            self.act = nn.LeakyReLU(0.1)

        def forward(self, x):
            h = self.conv(x)
            return self.act(self.bn(h)) * h       # h is read twice: not written over

    fused, report = _check_trains_like_torch(_randomized(Net()), _x())
    assert fused.bn.invertible and not fused.bn.inplace
    assert "not over its input (its input is read 2 times)" in report["bn"].note


def test_model_input_and_kept_values_are_not_written_over():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn0, self.act0 = nn.BatchNorm2d(3), nn.LeakyReLU(0.1)
            self.conv, self.bn1 = nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
            self.bn2 = nn.BatchNorm2d(4)

        def forward(self, x):
            h = self.act0(self.bn0(x))            # x: the caller's tensor
            h = torch.sigmoid(self.conv(h))       # sigmoid saves its output for backward
            return self.bn2(F.elu(self.bn1(h)))   # bn2's input is bn1's saved output

    model = _randomized(Net())
    x = _x(seed=4).requires_grad_()
    before = x.detach().clone()
    fused, report = _check_trains_like_torch(model, x)
    bns = _bns(fused)
    assert all(m.invertible for m in bns.values())
    assert not any(m.inplace for m in bns.values())
    assert "its input comes from the model's input" in report["bn0"].note
    assert "its input comes from sigmoid()" in report["bn1"].note
    assert "its input comes from FusedBatchNormAct2d 'bn1'" in report["bn2"].note
    assert torch.equal(x.detach(), before)
    with torch.no_grad():             # no autograd at all: still not written over
        fused.train()(x.detach())
    assert torch.equal(x.detach(), before)


def test_conv_with_a_hook_is_not_written_over():
    model = ConvBnAct(nn.LeakyReLU(0.1))
    seen = []
    model.conv.register_forward_hook(lambda m, i, out: seen.append(out))
    fused, report = tritonbn.fuse(model, inplace=True, report=True)
    assert fused.bn.invertible and not fused.bn.inplace
    kept = fused.conv(_x().float()).clone()
    seen.clear()
    fused(_x().float())
    torch.testing.assert_close(seen[0], kept)     # what the hook kept is the conv's output


# ----------------------------------------------------------- branches of the fused module


class DropBlock(nn.Module):
    """A torchvision-style residual block with stochastic depth before the add."""

    def __init__(self, act: nn.Module, c=4):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.drop, self.act = StochasticDepth(0.5, "row"), act

    def forward(self, x):
        h = self.act(self.bn1(self.conv1(x)))
        return self.act(self.drop(self.bn2(self.conv2(h))) + x)


def test_drop_path_branch_of_an_invertible_layer_trains_like_torch():
    model = _randomized(DropBlock(nn.LeakyReLU(0.1)))
    x = _x((4, 4, 5, 5), seed=6)
    fused, report = _check_trains_like_torch(model, x, seed=21)
    bn2 = fused.bn2
    assert type(bn2.drop) is StochasticDepth and report["bn2"].fused == "add+leaky_relu"
    assert bn2.invertible and bn2.inplace and fused.bn1.invertible
    # in training the drop is active: the batch norm alone ran invertible, then torch's ops;
    # in eval the whole chain runs in the kernels
    model.eval(), fused.eval()
    with torch.no_grad():
        assert _rel(fused(x.double()), model(x.double())) <= REL


def test_bn_add_and_plain_bn_are_invertible_with_an_identity_activation():
    class Net(nn.Module):
        """MobileNetV2's residual (conv -> BN -> add, no activation), then a batch norm whose
        output feeds only a pooling and a linear layer."""

        def __init__(self):
            super().__init__()
            self.conv1, self.bn1 = nn.Conv2d(4, 4, 1, bias=False), nn.BatchNorm2d(4)
            self.conv2, self.bn2 = nn.Conv2d(4, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6)
            self.fc = nn.Linear(6, 3)

        def forward(self, x):
            y = self.bn1(self.conv1(x)) + x
            z = self.bn2(self.conv2(y))
            return self.fc(torch.flatten(F.adaptive_avg_pool2d(z, 1), 1)) + z.mean()

    fused, report = _check_trains_like_torch(_randomized(Net()), _x((3, 4, 5, 5)))
    assert report["bn1"].fused == "add" and report["bn2"].fused == ""
    for name in ("bn1", "bn2"):
        bn = getattr(fused, name)
        assert bn.activation is None and bn.invertible and bn.inplace, name


def test_a_submodule_fused_on_its_own_keeps_its_output_layer_non_invertible():
    class Untraceable(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(
                nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.LeakyReLU(0.1),
                nn.Conv2d(4, 4, 1, bias=False), nn.BatchNorm2d(4), nn.LeakyReLU(0.1))

        def forward(self, x):
            y = self.body(x)
            if y.sum() > -1e30:       # data-dependent control flow: fx cannot trace it
                y.mul_(0.5)           # writes into the body's output, in the untraced forward
            return y

    model = _randomized(Untraceable()).double()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fused, report = tritonbn.fuse(model, inplace=True, report=True)
    first, last = fused.body.get_submodule("1"), fused.body.get_submodule("4")
    assert first.invertible and first.inplace
    assert not last.invertible
    assert "its output is modified in place by the untraced forward" in report["body.4"].note
    x = _x()
    _assert_same_step(_step(fused, [x]), _step(model, [x]))


def test_flags_survive_a_copy_and_the_state_dict_is_unchanged():
    model = _leaky(torchvision.models.resnet18(weights=None))
    fused = tritonbn.fuse(model, inplace=True)
    assert fused.state_dict().keys() == model.state_dict().keys()
    clone = copy.deepcopy(fused)
    assert all(m.invertible and m.inplace for m in _bns(clone).values())
