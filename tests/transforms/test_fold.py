"""tritonbn.fold_into_conv: eval-mode batch norm folded into the Conv1d/2d/3d or Linear
before it."""
import pytest
import torch
from torch import nn

import tritonbn
from tests.models import bn_modules, make_batches, make_model, train

FP32 = dict(atol=1e-5, rtol=1e-5)


def _randomize_bn(model):
    """Running statistics and affine parameters far from the identity, so a fold that drops any
    of them shows."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for bn in bn_modules(model):
            c = bn.num_features
            if bn.running_mean is not None:
                bn.running_mean.copy_(torch.randn(c, generator=g))
                bn.running_var.copy_(torch.rand(c, generator=g) * 2 + 0.2)
            if bn.weight is not None:
                bn.weight.copy_(torch.rand(c, generator=g) + 0.5)
                bn.bias.copy_(torch.randn(c, generator=g))
    return model


class Shapes(nn.Module):
    """Conv1d/3d pairs, a conv with bias, and batch norms that must not be folded."""

    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv1d(3, 4, 3), nn.BatchNorm1d(4)
        self.c3, self.b3 = nn.Conv3d(2, 3, 2, bias=True), nn.BatchNorm3d(3)
        self.c3b, self.b3b = nn.Conv3d(3, 3, 1), nn.BatchNorm3d(3, affine=False)
        self.shared = nn.Conv1d(4, 4, 1)                    # called twice: not folded
        self.b_shared = nn.BatchNorm1d(4)
        self.c_two_uses, self.b_two_uses = nn.Conv1d(4, 4, 1), nn.BatchNorm1d(4)
        self.c_nostats = nn.Conv1d(4, 4, 1)
        self.b_nostats = nn.BatchNorm1d(4, track_running_stats=False)  # batch stats in eval

    def forward(self, x1, x3):
        y = self.b1(self.c1(x1))
        y = self.b_shared(self.shared(y)) + self.shared(y)
        raw = self.c_two_uses(y)
        y = self.b_two_uses(raw) + raw                      # conv output used twice: not folded
        y = self.b_nostats(self.c_nostats(y))
        z = self.b3b(self.c3b(self.b3(self.c3(x3))))
        return y.sum() + z.sum(), y, z


def _shapes_inputs():
    g = torch.Generator().manual_seed(3)
    return torch.randn(4, 3, 9, generator=g), torch.randn(2, 2, 3, 4, 5, generator=g)


@pytest.mark.parametrize("convert", [False, True], ids=["torch-bn", "tritonbn"])
def test_fold_tiny_resnet_matches_eval_model(convert, device):
    model = _randomize_bn(make_model(device))
    if convert:
        tritonbn.convert_model(model)
    model.eval()
    x = make_batches(device, 1)[0][0]
    with torch.no_grad(), tritonbn.count_launches() as launches:
        expected = model(x)
    assert bool(launches) == convert  # the unfolded converted model runs the kernels

    folded = tritonbn.fold_into_conv(model)
    # every batch norm follows a conv or linear: all 7 fold away, and no kernel runs any more
    assert bn_modules(folded) == [] and len(bn_modules(model)) == 7
    assert folded.get_submodule("stem.0").bias is not None  # had a bias
    assert folded.get_submodule("layer1.conv1").bias is not None  # had none: created
    with torch.no_grad(), tritonbn.count_launches() as launches:
        got = folded(x)
    assert not launches
    torch.testing.assert_close(got, expected, **FP32)
    # model itself is untouched (still its batch norms, same outputs) and shares no tensor with
    # the folded copy, so training one cannot change the other
    assert len(bn_modules(model)) == 7 and model.layer1.conv1.bias is None
    assert not {id(p) for p in folded.parameters()} & {id(p) for p in model.parameters()}
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, atol=0, rtol=0)


def test_fold_after_training_converted_model(device):
    # the real use: train with tritonbn, then fold the learned running statistics for inference
    model = tritonbn.convert_model(make_model(device))
    xs, ts = make_batches(device, 2)
    with tritonbn.count_launches() as launches:
        train(model, xs, ts)
    assert launches
    model.eval()
    with torch.no_grad():
        expected = model(xs[0])
        torch.testing.assert_close(tritonbn.fold_into_conv(model)(xs[0]), expected, **FP32)


def test_fold_shapes_and_unfoldable_pairs():
    model = _randomize_bn(Shapes()).eval()
    x1, x3 = _shapes_inputs()
    with torch.no_grad():
        expected = model(x1, x3)
    folded = tritonbn.fold_into_conv(model)
    kept = {name for name, m in folded.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    assert kept == {"b_shared", "b_two_uses", "b_nostats"}
    assert isinstance(folded.c3b, nn.Conv3d) and folded.c3b.bias is not None
    with torch.no_grad():
        for got, exp in zip(folded(x1, x3), expected):
            torch.testing.assert_close(got, exp, **FP32)


def test_fold_linear_and_keeps_requires_grad_and_dtype():
    model = nn.Sequential(nn.Linear(5, 6, bias=False), nn.BatchNorm1d(6)).double()
    _randomize_bn(model).eval()
    model[0].weight.requires_grad_(False)
    folded = tritonbn.fold_into_conv(model)
    lin = folded.get_submodule("0")
    assert type(lin) is nn.Linear and lin.weight.dtype == lin.bias.dtype == torch.float64
    assert not lin.weight.requires_grad and not lin.bias.requires_grad
    x = torch.randn(7, 5, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), atol=1e-12, rtol=1e-12)


def test_fold_refuses_training_mode():
    model = make_model("cpu")  # training mode, as constructed
    with pytest.raises(RuntimeError, match="training mode"):
        tritonbn.fold_into_conv(model)
    model.eval()
    model.layer1.bn1.train()  # one batch norm left training inside an eval model
    with pytest.raises(RuntimeError, match="layer1.bn1"):
        tritonbn.fold_into_conv(model)


def test_fold_keeps_an_in_place_activated_layers_gamma_floor():
    # its kernels use |gamma| >= eps: the folded conv must scale by the same gamma
    conv = nn.Conv2d(3, 4, 3, padding=1).double()
    abn = tritonbn.InPlaceABN2d(4, activation="leaky_relu", activation_param=0.1).double()
    with torch.no_grad():
        abn.weight.copy_(torch.tensor([0.0, 1e-7, -1e-7, 1.5], dtype=torch.float64))
        abn.running_mean.normal_()
        abn.running_var.uniform_(0.5, 2.0)
    model = nn.Sequential(conv, abn).eval()
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    expected = model(x.clone())
    folded = tritonbn.fold_into_conv(model)
    assert not any(isinstance(m, tritonbn.InPlaceABN2d) for m in folded.modules())  # folded
    torch.testing.assert_close(folded(x), expected, rtol=1e-12, atol=1e-12)
