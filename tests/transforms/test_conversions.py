"""The conversions beyond torch's own batch norms, layer by layer, in the default tier:
torchvision's FrozenBatchNorm2d, timm's BatchNormAct2d, LazyBatchNorm*d, registered conversions
for other classes, the report and warning, fuse's train/eval behaviour around mode-dependent
code and stochastic depth, fold_into_conv through layer subclasses and the ``tritonbn convert``
command. Whole models are the zoo tier's (test_zoo.py); these are small and in float64, so
each comparison with torch is tight."""
import copy
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from timm.layers import BatchNormAct2d as TimmBatchNormAct2d
from torch import fx, nn
from torchvision.ops import StochasticDepth
from torchvision.ops.misc import FrozenBatchNorm2d as TVFrozenBatchNorm2d

import tritonbn
from tritonbn.transforms import (FusedBatchNormAct2d, FusedFrozenBatchNorm2d, swap_class)

TIGHT = dict(atol=1e-12, rtol=1e-10)
FORWARD = ("bn_fwd_onepass_kernel", "bn_fwd_apply_kernel")


def _randomize(model, seed=0):
    """Every batch-norm-like layer away from the identity: statistics, gamma and beta."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if "running_mean" in m._buffers and m.running_mean is not None:
                c = m.running_mean.numel()
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.3)
                m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
                if getattr(m, "weight", None) is not None:
                    m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(c, generator=g) * 0.3)
    return model


def _x(shape=(2, 8, 5, 5), seed=1):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return x.to(memory_format=torch.channels_last)


def _step(model, x, training, seed=3):
    """One forward (and backward in training): output, input and parameter gradients, buffers,
    forward-kernel launches."""
    model.train(training)
    x = x.detach().clone().requires_grad_(training)
    torch.manual_seed(seed)
    with tritonbn.count_launches() as launches:
        y = model(x)
        if training:
            (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    if training:
        grads["input"] = x.grad
    for p in model.parameters():
        p.grad = None
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    return y.detach(), grads, buffers, sum(launches.get(k, 0) for k in FORWARD)


def _assert_same_step(ours, theirs, launches):
    (y, g, b, n), (y_ref, g_ref, b_ref, n_ref) = ours, theirs
    torch.testing.assert_close(y, y_ref, **TIGHT)
    assert g.keys() == g_ref.keys()
    for k in g:
        torch.testing.assert_close(g[k], g_ref[k], **TIGHT, msg=k)
    assert b.keys() == b_ref.keys()
    for k in b:
        if k.endswith("num_batches_tracked"):
            assert torch.equal(b[k], b_ref[k]), k
        else:
            torch.testing.assert_close(b[k], b_ref[k], **TIGHT, msg=k)
    assert n == launches and n_ref == 0


def _lockstep(ours, theirs, x, calls):
    """train -> eval -> train, ours against theirs from the same state each time."""
    for training in (True, False, True):
        theirs.load_state_dict(ours.state_dict())
        _assert_same_step(_step(ours, x, training), _step(theirs, x, training), calls)


# ----------------------------------------------------------------------------------------------
# torchvision's FrozenBatchNorm2d


def _frozen_model():
    return _randomize(nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=False),
                                    TVFrozenBatchNorm2d(8), nn.ReLU())).double()


def test_torchvision_frozen_batch_norm_runs_the_eval_kernel_in_both_modes():
    torch_model = _frozen_model()
    model = copy.deepcopy(torch_model)
    buffers = [b for b in model[1].buffers()]
    converted, report = tritonbn.convert_model(model, report=True)
    assert converted is model and type(model[1]) is tritonbn.FrozenBatchNorm2d
    assert [b for b in model[1].buffers()] == buffers           # the same tensors, in place
    assert report["1"].kernels and report["1"].original == "torchvision.FrozenBatchNorm2d"
    with tritonbn.count_launches() as launches:
        model.train()(_x())
    assert launches["bn_fwd_apply_kernel"] == 1 and not launches["bn_stats_partial_kernel"]
    _lockstep(model, torch_model, _x(), calls=1)
    # checkpoints load both ways; restore_model gives torchvision's class back
    assert model.state_dict().keys() == torch_model.state_dict().keys()
    torch_model.load_state_dict(model.state_dict())
    model.load_state_dict(torch_model.state_dict())
    assert type(tritonbn.restore_model(model)[1]) is TVFrozenBatchNorm2d


def test_torchvision_frozen_batch_norm_fuses_and_folds():
    torch_model = _frozen_model()
    fused, report = tritonbn.fuse(torch_model, report=True)
    frozen = fused.get_submodule("1")
    assert type(frozen) is FusedFrozenBatchNorm2d and frozen.activation == "relu"
    assert report["1"].fused == "relu"
    assert not any(isinstance(m, nn.ReLU) for m in fused.modules())
    _lockstep(fused, torch_model, _x(), calls=1)
    folded, folds = tritonbn.fold_into_conv(torch_model.eval(), report=True)
    assert folds["1"].folded == "0"
    assert not any(isinstance(m, TVFrozenBatchNorm2d) for m in folded.modules())
    with torch.no_grad():
        torch.testing.assert_close(folded(_x()), torch_model(_x()), **TIGHT)


# ----------------------------------------------------------------------------------------------
# timm's BatchNormAct2d


@pytest.mark.parametrize("act_layer, became, fused, torch_runs", [
    (nn.SiLU, tritonbn.BatchNormAct2d, "silu", ()),          # activation in the kernels
    (nn.Hardswish, tritonbn.BatchNormAct2d, "hardswish", ()),
    (nn.PReLU, FusedBatchNormAct2d, "", ("act",)),            # PReLU stays, after the kernels
], ids=["silu", "hardswish", "prelu"])
def test_timm_batch_norm_act_converts_with_its_activation(act_layer, became, fused, torch_runs):
    torch_model = _randomize(TimmBatchNormAct2d(8, act_layer=act_layer)).double()
    model, report = tritonbn.convert_model(copy.deepcopy(torch_model), report=True)
    assert type(model) is became and report[""].kernels
    assert report[""].fused == fused and report[""].original == "timm.BatchNormAct2d"
    assert [n for n, _ in model.named_children()] == list(torch_runs)
    assert model.state_dict().keys() == torch_model.state_dict().keys()
    _lockstep(model, torch_model, _x(), calls=1)
    assert type(tritonbn.restore_model(model)) is TimmBatchNormAct2d
    assert [n for n, _ in model.named_children()] == ["drop", "act"]


def test_timm_batch_norm_act_with_drop_block_keeps_the_drop_in_training():
    from timm.layers import DropBlock2d
    torch_model = _randomize(TimmBatchNormAct2d(
        8, act_layer=nn.ReLU, drop_layer=lambda: DropBlock2d(0.3, block_size=3))).double()
    model, report = tritonbn.convert_model(copy.deepcopy(torch_model), report=True)
    assert type(model) is FusedBatchNormAct2d and "drop DropBlock2d run by torch" in report[""].note
    _lockstep(model, torch_model, _x(), calls=1)        # same seed: the same blocks dropped


# ----------------------------------------------------------------------------------------------
# Lazy batch norms


@pytest.mark.parametrize("lazy, shape, final", [
    (nn.LazyBatchNorm1d, (4, 6), tritonbn.BatchNorm1d),
    (nn.LazyBatchNorm2d, (2, 6, 3, 3), tritonbn.BatchNorm2d),
    (nn.LazyBatchNorm3d, (2, 6, 2, 3, 3), tritonbn.BatchNorm3d),
], ids=["1d", "2d", "3d"])
def test_lazy_batch_norm_runs_the_kernels_from_its_first_forward(lazy, shape, final):
    torch_model = nn.Sequential(lazy(dtype=torch.float64))     # (lazy modules do not deepcopy)
    model, report = tritonbn.convert_model(nn.Sequential(lazy(dtype=torch.float64)), report=True)
    assert report["0"].kernels and "first forward" in report["0"].note
    x = torch.randn(shape, dtype=torch.float64)
    with tritonbn.count_launches() as launches:
        y = model(x)
    assert type(model[0]) is final and sum(launches[k] for k in FORWARD) == 1
    torch.testing.assert_close(y, torch_model(x), **TIGHT)
    torch.testing.assert_close(model[0].running_var, torch_model[0].running_var, **TIGHT)
    assert type(tritonbn.restore_model(model)[0]) is type(torch_model[0])


# ----------------------------------------------------------------------------------------------
# Other classes: the warning, the report, register_conversion


class MyBatchNorm(nn.BatchNorm2d):
    """A subclass that computes what BatchNorm2d computes (so a class swap is right)."""


class MyFrozen(nn.Module):
    """Another library's frozen batch norm: running statistics, no conversion registered."""

    def __init__(self, c):
        super().__init__()
        self.register_buffer("weight", torch.ones(c))
        self.register_buffer("bias", torch.zeros(c))
        self.register_buffer("running_mean", torch.zeros(c))
        self.register_buffer("running_var", torch.ones(c))

    def forward(self, x):
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                            training=False)


def _subclass_model():
    return nn.Sequential(nn.BatchNorm2d(8), MyBatchNorm(8), MyFrozen(8)).double()


def test_layers_left_on_torch_are_named_with_the_reason():
    with pytest.warns(tritonbn.ConversionWarning) as record:
        model, report = tritonbn.convert_model(_subclass_model(), report=True)
    (w,) = record
    message = str(w.message)
    assert "2 of 3 batch-norm-like layers left on torch" in message
    # classes outside torch and tritonbn are named package.QualName
    assert "'1' (tests.MyBatchNorm): a subclass of torch.nn.BatchNorm2d" in message
    assert "'2' (tests.MyFrozen): holds running statistics" in message
    assert w.filename == __file__
    assert [r.name for r in report.left_on_torch] == ["1", "2"]
    assert report.counts() == dict(layers=3, kernels=1, fused=0, folded=0, left_on_torch=2)
    table = report.table()
    assert table.splitlines()[0].split() == ["layer", "class", "became", "note"]
    assert table.endswith("3 batch-norm-like layers, 1 on tritonbn's kernels, 2 left on torch")
    assert "| 1 | tests.MyBatchNorm | tests.MyBatchNorm (torch) |" in report.table(markdown=True)
    assert type(model[1]) is MyBatchNorm and type(model[2]) is MyFrozen


@pytest.fixture
def registry_entries():
    """Registrations made by a test are removed after it."""
    made = []
    yield made
    for cls in made:
        tritonbn.unregister_conversion(cls)


def test_register_conversion_for_a_subclass_and_restore(registry_entries):
    registry_entries.append(MyBatchNorm)
    assert tritonbn.register_conversion(
        MyBatchNorm, lambda m: swap_class(m, tritonbn.BatchNorm2d)) is None
    registry_entries.append(MyFrozen)
    tritonbn.register_conversion(f"{__name__}.MyFrozen",       # by name, as for an optional pkg
                                 lambda m: (_frozen_from(m), "made new"))
    torch_model = _randomize(_subclass_model())
    with warnings.catch_warnings():
        warnings.simplefilter("error", tritonbn.ConversionWarning)
        model, report = tritonbn.convert_model(copy.deepcopy(torch_model), report=True)
    assert [type(m) for m in model] == [tritonbn.BatchNorm2d, tritonbn.BatchNorm2d,
                                        tritonbn.FrozenBatchNorm2d]
    assert report["2"].note == "made new" and report.counts()["kernels"] == 3
    _lockstep(model, torch_model, _x(), calls=3)
    restored = tritonbn.restore_model(model)
    # the class swap is undone; a new object is left alone (no restore given)
    assert [type(m) for m in restored] == [nn.BatchNorm2d, MyBatchNorm,
                                           tritonbn.FrozenBatchNorm2d]


def _frozen_from(m):
    new = tritonbn.FrozenBatchNorm2d(m.running_mean.numel(), dtype=m.running_mean.dtype)
    for name, b in m.named_buffers():
        setattr(new, name, b)
    return new


def test_not_convertible_reason_reaches_the_warning(registry_entries):
    def refuse(m):
        raise tritonbn.NotConvertible("computes its statistics in a way tritonbn does not")
    registry_entries.append(MyBatchNorm)
    tritonbn.register_conversion(MyBatchNorm, refuse)
    model = _subclass_model()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.warns(tritonbn.ConversionWarning, match="'1' .*: computes its statistics in a way"):
        tritonbn.convert_model(model)
    assert type(model[1]) is MyBatchNorm
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_register_conversion_rejects_bad_arguments_and_unregisters(registry_entries):
    with pytest.raises(TypeError, match="nn.Module subclass"):
        tritonbn.register_conversion(int, lambda m: m)
    with pytest.raises(ValueError, match="module.QualName"):
        tritonbn.register_conversion("MyBatchNorm", lambda m: m)
    with pytest.raises(TypeError, match="callable"):
        tritonbn.register_conversion(MyBatchNorm, None)
    registry_entries.append(MyBatchNorm)
    first = lambda m: swap_class(m, tritonbn.BatchNorm2d)  # noqa: E731
    tritonbn.register_conversion(MyBatchNorm, first)
    assert tritonbn.register_conversion(MyBatchNorm, first).convert is first   # replaced
    assert tritonbn.unregister_conversion(MyBatchNorm).convert is first
    assert tritonbn.unregister_conversion(MyBatchNorm) is None
    # a conversion returning something that is not a module is an error, before any change
    tritonbn.register_conversion(MyBatchNorm, lambda m: 3)
    model = _subclass_model()
    with pytest.raises(TypeError, match="returned int, not an nn.Module"):
        tritonbn.convert_model(model)


# ----------------------------------------------------------------------------------------------
# fuse: train/eval switching, no-op modules, stochastic depth


class ModeDependent(nn.Module):
    """A block whose forward reads self.training (as timm's layers and auxiliary heads do)."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(8, 8, 1, bias=False), nn.BatchNorm2d(8)

    def forward(self, x):
        y = self.bn(self.conv(x))
        if self.training:
            y = y * 0.5
        return F.relu(y)


class Blocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = ModeDependent()
        self.bn = nn.BatchNorm2d(8)
        self.noop = nn.Identity()
        self.bn2 = nn.BatchNorm2d(8)
        self.sd = StochasticDepth(0.5, "row")

    def forward(self, x):
        y = F.relu(self.noop(self.bn(self.block(x))))        # BN -> Identity -> ReLU
        return F.relu(self.sd(self.bn2(y)) + x)               # BN -> stochastic depth -> add


@pytest.mark.parametrize("traced_in", ["train", "eval"])
def test_fused_model_behaves_as_the_original_in_both_modes(traced_in):
    torch_model = _randomize(Blocks()).double()
    torch_model.train(traced_in == "train")
    fused, report = tritonbn.fuse(torch_model, report=True)
    assert report["bn"].fused == "relu" and report["bn2"].fused == "add+relu"
    assert report["block.bn"].kernels and not report["block.bn"].fused   # inside the leaf
    assert isinstance(fused, fx.GraphModule)
    assert not isinstance(fused.block, fx.GraphModule)     # runs its own forward: reads the mode
    assert type(fused.bn2) is FusedBatchNormAct2d and type(fused.bn2.drop) is StochasticDepth
    _lockstep(fused, torch_model, _x(), calls=3)
    # eval: the whole BN -> add -> ReLU chain of bn2 in the kernel, stochastic depth inactive
    fused.eval()
    with tritonbn.count_launches() as launches, torch.no_grad():
        fused(_x())
    assert launches["bn_fwd_apply_kernel"] == 3


def test_model_whose_own_forward_depends_on_the_mode_fuses_its_submodules():
    class Root(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8), nn.ReLU())

        def forward(self, x):
            y = self.features(x)
            return (y, y.mean()) if self.training else y

    torch_model = _randomize(Root()).double()
    with pytest.warns(UserWarning, match="depends on train/eval mode"):
        fused, report = tritonbn.fuse(torch_model, report=True)
    assert type(fused) is Root and isinstance(fused.features, fx.GraphModule)
    assert report["features.1"].fused == "relu"
    for training in (True, False):
        fused.train(training), torch_model.train(training)
        torch_model.load_state_dict(fused.state_dict())
        with torch.no_grad():
            ours, theirs = fused(_x()), torch_model(_x())
        assert type(ours) is type(theirs)
        for a, b in zip(ours if training else [ours], theirs if training else [theirs]):
            torch.testing.assert_close(a, b, **TIGHT)


# ----------------------------------------------------------------------------------------------
# fold_into_conv through subclasses of the layers


class Conv3DSimple(nn.Conv3d):
    """As torchvision's video ResNets: a Conv3d subclass with its own constructor only."""

    def __init__(self, cin, cout):
        super().__init__(cin, cout, kernel_size=(1, 3, 3), padding=(0, 1, 1), bias=False)


class MyLinear(nn.Linear):
    pass


class OwnForward(nn.Conv2d):
    def forward(self, x):
        return super().forward(x) * 2.0


def test_fold_into_subclasses_of_conv_and_linear_but_not_past_a_forward_of_their_own():
    model = _randomize(nn.Sequential(Conv3DSimple(4, 8), nn.BatchNorm3d(8), nn.Flatten(2),
                                     nn.AdaptiveAvgPool1d(1), nn.Flatten(), MyLinear(8, 6),
                                     nn.BatchNorm1d(6))).double().eval()
    folded, report = tritonbn.fold_into_conv(model, report=True)
    assert report["1"].folded == "0" and report["6"].folded == "5"
    x = torch.randn(2, 4, 2, 5, 5, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), **TIGHT)
    other = _randomize(nn.Sequential(OwnForward(8, 8, 1), nn.BatchNorm2d(8))).double().eval()
    folded, report = tritonbn.fold_into_conv(other, report=True)
    assert not report["1"].folded and report["1"].note
    with torch.no_grad():
        torch.testing.assert_close(folded(_x()), other(_x()), **TIGHT)


# ----------------------------------------------------------------------------------------------
# tritonbn convert


def factory():
    """The command's --model target: a small model with a layer left on torch."""
    return nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         TVFrozenBatchNorm2d(8), MyBatchNorm(8))


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "tritonbn", "convert", *args],
                          capture_output=True, text=True)


def test_convert_command_prints_the_table():
    proc = _cli("--model", f"{__name__}:factory", "--fuse", "--fold", "--markdown")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == f"{__name__}:factory: Sequential"
    assert lines[1] == "| layer | class | became | fused | folded into | note |"
    row = {line.split(" | ")[0].lstrip("| "): line for line in lines if line.startswith("| ")}
    assert "| torch.nn.BatchNorm2d | tritonbn.transforms.FusedBatchNormAct2d | relu | 0 |" \
        in row["1"]
    assert "| torchvision.FrozenBatchNorm2d | tritonbn.FrozenBatchNorm2d |" in row["3"]
    assert "(torch)" in row["4"] and "register_conversion" in row["4"]
    assert lines[-1] == ("3 batch-norm-like layers, 2 on tritonbn's kernels, 1 fused, "
                         "1 folded, 1 left on torch")
    strict = _cli("--model", f"{__name__}:factory", "--strict")
    assert strict.returncode == 1 and "left on torch" in strict.stdout
    bad = _cli("--model", "no_such_module:factory")
    assert bad.returncode == 2 and "--model 'no_such_module:factory'" in bad.stderr


def leaky_factory():
    """--inplace's target: BN -> LeakyReLU (invertible) and BN -> ReLU (not)."""
    return nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.LeakyReLU(0.1),
                         nn.Conv2d(8, 8, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU())


def test_convert_command_with_inplace_says_which_layers_save_only_their_output():
    proc = _cli("--model", f"{__name__}:leaky_factory", "--fuse", "--inplace", "--markdown")
    assert proc.returncode == 0, proc.stderr
    row = {line.split(" | ")[0].lstrip("| "): line for line in proc.stdout.splitlines()
           if line.startswith("| ")}
    assert "in-place activated: saves its output, written over its input" in row["1"]
    assert "not in-place activated: relu is not invertible" in row["4"]
    plain = _cli("--model", f"{__name__}:leaky_factory", "--fuse", "--markdown")
    assert "in-place" not in plain.stdout
