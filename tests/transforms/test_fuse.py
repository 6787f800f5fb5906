"""tritonbn.fuse: which patterns fuse (every spelling of the activations and adds), which must not,
what the fused model keeps (state_dict keys, the original model untouched), the fallback for
models torch.fx cannot trace, and the bytes saved for backward."""
import re

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import tritonbn
from tritonbn.transforms.fuse import FusedBatchNormAct1d, FusedBatchNormAct2d, FusedBatchNormAct3d
from tests.helpers import NO_COMPUTE, TRITONBN_OPS, OpLog, saved_bytes
from tests.models import (ACT_SPELLINGS, ADD_SPELLINGS, SHAPES, ActNet, Chain,
                          assert_same_buffers, make_model, randomize_bn)

FP32 = dict(atol=1e-5, rtol=1e-5)
FUSED = {1: FusedBatchNormAct1d, 2: FusedBatchNormAct2d, 3: FusedBatchNormAct3d}


def _ops(gm):
    """The graph's computing nodes, as (op, target)."""
    return [(n.op, n.target) for n in gm.graph.nodes if n.op not in ("placeholder", "output")]


def _inputs(shape, seed=0, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * 2 + 0.3).to(device, dtype)
    r = torch.randn(shape, generator=g).to(device, dtype)
    dy = torch.randn(shape, generator=g).to(device, dtype)
    return x, r, dy


def _step(model, x, r, dy):
    """Forward and backward in training mode: output, input grads, parameter grads, buffers."""
    x, r = x.clone().requires_grad_(), r.clone().requires_grad_()
    model.train()
    y = model(x, r)
    y.backward(dy if y.shape == dy.shape else torch.ones_like(y))
    return dict(y=y.detach(), dx=x.grad, dr=r.grad,
                grads={n: p.grad for n, p in model.named_parameters()},
                buffers={n: b.clone() for n, b in model.named_buffers()})


def _assert_same_step(ours, ref, **tolerance):
    tolerance = tolerance or FP32
    assert ours["y"].dtype == ref["y"].dtype and ours["y"].shape == ref["y"].shape
    for key in ("y", "dx", "dr"):
        if ref[key] is None:
            assert ours[key] is None, key
        else:
            torch.testing.assert_close(ours[key], ref[key], **tolerance, msg=key)
    assert ours["grads"].keys() == ref["grads"].keys()
    for name, g in ref["grads"].items():
        torch.testing.assert_close(ours["grads"][name], g, atol=1e-4, rtol=1e-4, msg=name)
    assert_same_buffers(ours["buffers"], ref["buffers"], **FP32)


def _check_fused_chain(model, dims, activation, slope, residual, device):
    """``model`` (a Chain) fuses to one batch-norm call that matches torch's unfused chain."""
    model = randomize_bn(model.to(device))
    fused = tritonbn.fuse(model)
    assert isinstance(fused, fx.GraphModule)
    assert _ops(fused) == [("call_module", "bn")], fused.code  # no activation or add node left
    (call,) = [n for n in fused.graph.nodes if n.op == "call_module"]
    assert ("residual" in call.kwargs) == residual
    bn = fused.bn
    assert type(bn) is FUSED[dims] and bn.activation == activation
    assert bn.negative_slope == pytest.approx(slope)
    assert type(model.bn) not in FUSED.values()  # the model itself is not changed
    x, r, dy = _inputs(SHAPES[dims], device=device)
    ref = _step(model, x, r, dy)
    with tritonbn.count_launches() as launches, OpLog(x.numel()) as log:
        ours = _step(fused, x, r, dy)
    # one forward and one backward kernel, and no torch operator computing on the activations:
    # the activation and the add ran inside the kernels
    fwd = launches["bn_fwd_onepass_kernel"] + launches["bn_fwd_apply_kernel"]
    bwd = launches["bn_bwd_onepass_kernel"] + launches["bn_bwd_apply_kernel"]
    assert fwd == bwd == 1, launches
    assert log.ops <= TRITONBN_OPS | NO_COMPUTE | {"aten.clone.default"}, log.ops  # clone: _step
    _assert_same_step(ours, ref)


@pytest.mark.parametrize("spelling", ACT_SPELLINGS, ids=[s[0] for s in ACT_SPELLINGS])
def test_every_activation_spelling_fuses(spelling, device):
    _, activation, slope, factory = spelling
    _check_fused_chain(Chain(act=factory()), 2, activation, slope, False, device)


@pytest.mark.parametrize("spelling", ADD_SPELLINGS, ids=[s[0] for s in ADD_SPELLINGS])
def test_every_add_spelling_fuses_with_the_activation_after_it(spelling, device):
    _check_fused_chain(Chain(act=nn.GELU(approximate="tanh"), add=spelling[1]), 2, "gelu_tanh",
                       0.01, True, device)


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_batch_norm_1d_2d_3d_and_add_without_activation(dims, device):
    # BN -> add (no activation after it) fuses as well, with activation=None
    _check_fused_chain(Chain(add=ADD_SPELLINGS[0][1], dims=dims), dims, None, 0.01, True, device)
    _check_fused_chain(Chain(act=nn.SiLU(), add=ADD_SPELLINGS[1][1], dims=dims), dims, "silu",
                       0.01, True, device)


def test_tritonbn_batch_norm_modules_fuse_too(device):
    model = tritonbn.convert_model(Chain(act=nn.Hardswish(), add=ADD_SPELLINGS[0][1]))
    assert type(model.bn) is tritonbn.BatchNorm2d
    _check_fused_chain(model, 2, "hardswish", 0.01, True, device)


# ---------------------------------------------------------------------------------------------
# Patterns that must not fuse, or fuse only partly: the model still computes what torch does.


class UsedTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x, r):
        y = self.bn(x)
        return F.relu(y) + y * r            # the pre-activation value is read again


class ScalarAdd(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x, r):
        return F.relu(self.bn(x) + 0.5) * r  # not a tensor


class ParameterAdd(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(8)
        self.shift = nn.Parameter(torch.linspace(-1, 1, 8).view(1, 8, 1, 1))

    def forward(self, x, r):
        return F.relu(self.bn(x) + self.shift) * r  # broadcasts: (1, C, 1, 1)


class BroadcastAdd(nn.Module):
    """Residuals that turn out to broadcast only at run time: fused in the graph, unfused when run."""

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(8)
        self.bn_pooled = nn.BatchNorm2d(8)

    def forward(self, x, r):
        y = F.silu(self.bn(x) + r.mean((2, 3), keepdim=True))           # (N, C, 1, 1) operand
        return F.relu(r + self.bn_pooled(F.adaptive_avg_pool2d(y, 1)))  # BN output broadcasts


class NotAfterBatchNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x, r):
        y = F.relu(self.conv(x))             # activation after a conv
        return F.relu(self.conv(self.bn(y)) + r)  # batch norm, then conv: nothing to fuse


class CalledTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x, r):
        return F.relu(self.bn(x)) + self.bn(r)  # one module, two call sites


class AddReadTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x, r):
        z = self.bn(x) + r
        return F.relu(z) * z                 # the add's value is read again: BN + add fuse


class ScaledAdd(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x, r):
        return F.relu(torch.add(self.bn(x), r, alpha=2.0))


class Hooked(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(8)
        self.seen = []
        self.bn.register_forward_hook(lambda m, args, out: self.seen.append(out.min().item()))

    def forward(self, x, r):
        return F.relu(self.bn(x))             # the hook must see the batch norm's own output


NOT_FUSED = [
    # model, the fused modules' (path, activation) expected, graph nodes that must remain
    (UsedTwice, {}, {F.relu}),
    (ScalarAdd, {}, {F.relu}),
    (ParameterAdd, {}, {F.relu}),
    (BroadcastAdd, {"bn": "silu", "bn_pooled": "relu"}, set()),
    (NotAfterBatchNorm, {}, {F.relu}),
    (CalledTwice, {}, {F.relu}),
    (AddReadTwice, {"bn": None}, {F.relu}),
    (ScaledAdd, {}, {F.relu, torch.add}),
    (Hooked, {}, {F.relu}),
]


@pytest.mark.parametrize("case", NOT_FUSED, ids=[c[0].__name__ for c in NOT_FUSED])
def test_patterns_that_must_not_fuse_stay_correct(case, device):
    cls, fused_acts, kept = case
    model = randomize_bn(cls().to(device))
    fused = tritonbn.fuse(model)
    targets = {t for _, t in _ops(fused)}
    assert kept <= targets, fused.code
    for name, m in fused.named_modules():
        if name in fused_acts:
            assert isinstance(m, tritonbn.BatchNormAct2d) and m.activation == fused_acts[name]
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            assert type(m) is tritonbn.BatchNorm2d, name  # converted, not fused
    x, r, dy = _inputs(SHAPES[2], device=device)
    ref = _step(model, x, r, dy)
    with tritonbn.count_launches() as launches, OpLog(x.numel()) as log:
        ours = _step(fused, x, r, dy)
    bn_calls = [n for n in fused.graph.nodes if n.op == "call_module"
                and isinstance(fused.get_submodule(n.target), nn.modules.batchnorm._BatchNorm)]
    fwd = launches["bn_fwd_onepass_kernel"] + launches["bn_fwd_apply_kernel"]
    assert fwd == len(bn_calls), launches  # every batch norm ran tritonbn's kernels
    _assert_same_step(ours, ref)
    if cls is BroadcastAdd:  # fused in the graph, but the adds ran unfused: broadcasting
        assert "aten.add.Tensor" in log.ops
    if cls is Hooked:  # the copied hook appends to the same list: torch's value, then ours
        assert len(model.seen) == 2 and model.seen[1] == pytest.approx(model.seen[0])
        assert model.seen[0] < 0  # the batch norm's output, not the activation's


def test_residual_written_in_place_is_left_alone(device):
    """``r.add_(bn(x))`` writes into r, which other code may read: the add stays torch's.
    (``r += bn(x)`` does not: fx records ``+=`` and ``operator.iadd`` on a traced value as ``+``.)"""

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm2d(8)

        def forward(self, x, r):
            s = r * 1.0
            return F.relu(s.add_(self.bn(x))) * s

    model = randomize_bn(M().to(device))
    fused = tritonbn.fuse(model)
    assert {"add_", F.relu} <= {t for _, t in _ops(fused)}
    x, r, dy = _inputs(SHAPES[2], device=device)
    _assert_same_step(_step(fused, x, r, dy), _step(model, x, r, dy))


def test_residual_that_promotes_the_dtype_falls_back(device):
    """BN on half input + a float32 residual is float32 in torch: the fused call adds unfused."""
    model = randomize_bn(Chain(act=nn.ReLU(), add=ADD_SPELLINGS[0][1]).to(device))
    fused = tritonbn.fuse(model)
    assert _ops(fused) == [("call_module", "bn")]
    x, r, dy = _inputs(SHAPES[2], device=device)
    x16 = x.half()
    ref = _step(model, x16, r, dy)
    with OpLog(x.numel()) as log:
        ours = _step(fused, x16, r, dy)
    assert "aten.add.Tensor" in log.ops  # added by torch, after tritonbn's batch norm
    assert ours["y"].dtype == ref["y"].dtype == torch.float32
    assert ours["dx"].dtype == torch.float16
    _assert_same_step(ours, ref, atol=2e-3, rtol=2e-3)
    # a residual of lower precision does not promote: fused, float32 output
    with tritonbn.count_launches() as launches:
        ours = _step(fused, x, r.half(), dy)
    assert ours["y"].dtype == torch.float32 and ours["dr"].dtype == torch.float16
    assert sum(launches.values()) == 2
    _assert_same_step(ours, _step(model, x, r.half(), dy), atol=2e-3, rtol=2e-3)


# ---------------------------------------------------------------------------------------------
# What the fused model keeps


class Configs(nn.Module):
    """Batch norms in every configuration the module semantics cover."""

    def __init__(self):
        super().__init__()
        self.bn_avg = nn.BatchNorm2d(8, momentum=None)               # cumulative average
        self.bn_batch = nn.BatchNorm2d(8, track_running_stats=False)  # always batch statistics
        self.bn_eval = nn.BatchNorm2d(8)                              # set to eval below
        self.bn_plain = nn.BatchNorm2d(8, affine=False)

    def forward(self, x, r):
        y = F.relu(self.bn_avg(x))
        y = F.silu(self.bn_batch(y) + r)
        y = F.gelu(r + self.bn_eval(y))
        return F.leaky_relu(self.bn_plain(y), 0.1)


def test_module_semantics_momentum_none_no_tracking_eval_no_affine(device):
    model = randomize_bn(Configs().to(device))
    with torch.no_grad():
        model.bn_eval.running_mean.uniform_(-0.5, 0.5)
        model.bn_eval.running_var.uniform_(0.5, 2.0)
    fused = tritonbn.fuse(model)
    assert _ops(fused) == [("call_module", n) for n in ("bn_avg", "bn_batch", "bn_eval",
                                                        "bn_plain")]
    for step in range(2):
        x, r, dy = _inputs(SHAPES[2], seed=step, device=device)
        for m in (model, fused):
            m.train()
            m.bn_eval.eval()  # a batch norm in eval inside a training model
        ref = _step_keep_modes(model, x, r, dy)
        ours = _step_keep_modes(fused, x, r, dy)
        _assert_same_step(ours, ref)
    assert int(fused.bn_avg.num_batches_tracked) == 4 and fused.bn_batch.running_mean is None
    model.eval(), fused.eval()
    with torch.no_grad():
        torch.testing.assert_close(fused(x, r), model(x, r), **FP32)


def _step_keep_modes(model, x, r, dy):
    x, r = x.clone().requires_grad_(), r.clone().requires_grad_()
    model(x, r).backward(dy)
    y = model(x.detach(), r.detach()).detach()  # a second batch, same data
    return dict(y=y, dx=x.grad, dr=r.grad,
                grads={n: p.grad for n, p in model.named_parameters()},
                buffers={n: b.clone() for n, b in model.named_buffers()})


class WithSpareState(nn.Module):
    """State that the traced forward does not reach through a call: an unused module, a root
    parameter, a non-persistent buffer read as an attribute."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.aux_head = nn.Sequential(nn.Linear(8, 4), nn.BatchNorm1d(4))  # unused here
        self.scale = nn.Parameter(torch.tensor(1.5))
        self.register_buffer("offset", torch.tensor(0.25), persistent=False)

    def forward(self, x):
        return self.body(x * self.scale - self.offset)


def test_state_dict_keys_kept_and_checkpoints_load_both_ways(device):
    for model in (make_model(device), WithSpareState().to(device)):
        sd = model.state_dict()
        fused = tritonbn.fuse(model)
        assert set(fused.state_dict()) == set(sd)
        for name, t in fused.state_dict().items():
            assert torch.equal(t, sd[name]), name
        # the original model is untouched: torch's classes, its own tensors
        assert not any(type(m).__module__.startswith("tritonbn") for m in model.modules())
        ours = {id(p) for p in fused.parameters()}
        assert not ours & {id(p) for p in model.parameters()}
        # a checkpoint of either loads into the other
        fresh = type(model)().to(device)
        fresh.load_state_dict(fused.state_dict())
        tritonbn.fuse(fresh).load_state_dict(model.state_dict())
    assert "offset" not in fused.state_dict() and fused.offset.item() == 0.25
    assert type(fused.aux_head[1]) is tritonbn.BatchNorm1d  # kept, and converted


def test_fuse_of_a_fused_model_changes_nothing():
    fused = tritonbn.fuse(make_model("cpu"))
    again = tritonbn.fuse(fused)
    assert _ops(again) == _ops(fused)
    types = {n: type(m) for n, m in fused.named_modules() if n}
    assert {n: type(m) for n, m in again.named_modules() if n} == types


# ---------------------------------------------------------------------------------------------
# Models torch.fx cannot trace


class DataDependent(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # Python control flow on a tensor: fx cannot trace this
            return x
        return -x


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.gate = nn.Sequential(DataDependent())
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        return F.relu(self.bn(self.gate(self.features(x))))


def test_untraceable_model_fuses_its_traceable_submodules_with_a_warning(device):
    model = randomize_bn(Untraceable().to(device))
    line = DataDependent.forward.__code__.co_firstlineno + 1
    with pytest.warns(UserWarning) as record:
        converted = tritonbn.fuse(model)
    (w,) = [w for w in record if "tritonbn.fuse" in str(w.message)]
    message = str(w.message)
    assert "module 'gate.0' (DataDependent)" in message, message
    assert re.search(rf"test_fuse\.py:{line}\b", message), message
    assert "TraceError" in message and "convert_model" in message
    assert "fused one by one" in message
    assert w.filename == __file__  # attributed to the caller
    # the root stays a (converted) copy; `features` traces, so it is fused on its own
    assert not isinstance(converted, fx.GraphModule) and converted is not model
    assert type(converted.bn) is tritonbn.BatchNorm2d          # called by the untraced forward
    assert isinstance(converted.features, fx.GraphModule)
    assert type(converted.features.get_submodule("1")) is FusedBatchNormAct2d
    assert converted.features.get_submodule("1").activation == "relu"
    assert not isinstance(converted.gate, fx.GraphModule)     # nothing to fuse in it
    assert type(model.bn) is nn.BatchNorm2d
    assert set(converted.state_dict()) == set(model.state_dict())
    x = torch.randn(4, 3, 8, 8, device=device)
    with tritonbn.count_launches() as launches:
        y = converted(x)
    assert launches["bn_fwd_onepass_kernel"] + launches["bn_fwd_apply_kernel"] == 2
    torch.testing.assert_close(y, model(x), **FP32)


class RootUntraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        return F.relu(self.bn(x)) * len(x)  # len() of a traced value fails in the root itself


def test_untraceable_root_and_bare_batch_norm():
    with pytest.warns(UserWarning, match=r"RootUntraceable in the model's own forward, at .*"
                                         r"test_fuse\.py:\d+: RuntimeError"):
        converted = tritonbn.fuse(RootUntraceable())
    assert type(converted.bn) is tritonbn.BatchNorm2d
    bn = nn.BatchNorm1d(4)
    out = tritonbn.fuse(bn)  # nothing to fuse after it: a converted copy, no tracing into it
    assert type(out) is tritonbn.BatchNorm1d and out is not bn and type(bn) is nn.BatchNorm1d


# ---------------------------------------------------------------------------------------------
# Bytes saved for backward


def test_fused_bn_relu_model_saves_fewer_bytes_for_backward(device):
    """Measures the ratios quoted in the README (modules section); ``-s`` prints them."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.BatchNorm2d(16), nn.ReLU()).to(device)
    fused = tritonbn.fuse(model)
    x = torch.randn(8, 16, 8, 8, device=device, requires_grad=True)
    act_bytes = x.numel() * x.element_size()
    ours, torch_eager = saved_bytes(lambda: fused(x)), saved_bytes(lambda: model(x))
    # torch keeps BN's input and ReLU's output; the fused op only the input (+ 4 vectors of C)
    assert ours < act_bytes + 1024 and torch_eager > ours + act_bytes - 1024
    assert ours / torch_eager < 0.55
    report = [f"BN->ReLU {tuple(x.shape)}: {ours} B vs torch {torch_eager} B, "
              f"{ours / torch_eager:.2f}x"]

    # Whole models: where the next conv or linear saves the activation's output anyway (ReLU
    # then conv), fusing saves nothing more; SiLU-like activations save their *input* in torch,
    # a tensor the fused op never makes. Never more than torch.
    xr = torch.randn(4, 3, 8, 8, device=device)
    for name, net in (("tiny ResNet (ReLU)", make_model(device)),
                      ("ActNet('silu')", ActNet("silu").to(device))):
        ours_r, torch_r = saved_bytes(lambda: tritonbn.fuse(net)(xr)), saved_bytes(lambda: net(xr))
        assert ours_r <= torch_r, name
        if "silu" in name:
            assert ours_r < 0.75 * torch_r
        report.append(f"{name} {tuple(xr.shape)}: {ours_r} B vs {torch_r} B, "
                      f"{ours_r / torch_r:.2f}x")
    print("\nsaved for backward (float32, distinct storages): " + "; ".join(report))
