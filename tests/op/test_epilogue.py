"""Fused residual add + activation: forward and backward match torch's unfused float64 sequence
(batch norm, add, activation) for every activation, dtype and layout, in one fused pass that
saves fewer bytes for backward than torch's sequence."""
import math

import pytest
import torch
import torch.nn.functional as F

import tritonbn
from tritonbn.plan import forced_plan
from tests.helpers import NO_COMPUTE, TRITONBN_OPS, OpLog, assert_close, make_input, reduction_size, saved_bytes, tol
from tritonbn.activations import apply as activation_reference

ACTS = ["relu", "relu6", "leaky_relu", "silu", "gelu", "gelu_tanh", "hardswish", "sigmoid", "tanh"]


def torch_act(z, name, slope=0.2):
    return activation_reference(z, name, slope)


def unfused64(x, res, w, b, rm, rv, training, act):
    """torch's sequence in float64: batch norm, add, activation (running stats updated)."""
    y = F.batch_norm(x, rm, rv, w, b, training, 0.1, 1e-5)
    if res is not None:
        y = y + res
    return torch_act(y, act)


def _check(shape, dtype, layout, act, with_res, training, device, plan=None, res_dtype=None):
    x = make_input(shape, dtype, layout, device, scale=2.0, shift=0.3, seed=11)
    c, m = shape[1], reduction_size(x)
    res = make_input(shape, res_dtype or dtype, layout, device, scale=1.5, shift=0.0, seed=12) \
        if with_res else None
    w = torch.linspace(0.5, 1.5, c, device=device).requires_grad_()
    b = torch.linspace(-0.5, 0.5, c, device=device).requires_grad_()
    rm, rv = torch.linspace(-0.2, 0.2, c, device=device), torch.linspace(0.8, 1.6, c, device=device)
    rm64, rv64 = rm.double().clone(), rv.double().clone()
    grad = make_input(shape, dtype, "contiguous", device, scale=1.0, shift=0.0, seed=13)

    xg = x.detach().clone().requires_grad_()
    rg = res.detach().clone().requires_grad_() if with_res else None
    ctx = forced_plan(**plan) if plan else forced_plan()
    with ctx, tritonbn.count_launches() as launches:
        y = tritonbn.batch_norm(xg, rm, rv, w, b, training, 0.1, 1e-5, activation=act,
                                negative_slope=0.2, residual=rg)
        y.backward(grad)
    bn_kernels = {"bn_stats_partial_kernel", "bn_fwd_apply_kernel", "bn_fwd_onepass_kernel",
                  "bn_bwd_partial_kernel", "bn_bwd_apply_kernel", "bn_bwd_onepass_kernel"}
    assert set(launches) <= bn_kernels and sum(launches.values()) <= 4

    x64 = x.detach().double().requires_grad_()
    r64 = res.detach().double().requires_grad_() if with_res else None
    w64, b64 = w.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    y64 = unfused64(x64, r64, w64, b64, rm64, rv64, training, act)
    y64.backward(grad.double())

    t = tol(dtype, m)
    assert y.dtype == dtype and y.stride() == xg.grad.stride()
    assert_close(y, y64, **t)
    assert_close(xg.grad, x64.grad, **t)
    if with_res:
        assert rg.grad.dtype == rg.dtype
        assert_close(rg.grad, r64.grad, **tol(rg.dtype, m))
    sum_tol = dict(atol=tol(torch.float32, m)["atol"] * math.sqrt(m) + 1e-5, rtol=1e-4)
    assert_close(w.grad, w64.grad, **sum_tol)
    assert_close(b.grad, b64.grad, **sum_tol)
    if training:
        assert_close(rm, rm64, **tol(torch.float32, m))
        assert_close(rv, rv64, **tol(torch.float32, m))
    return launches


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("act", ACTS)
def test_fused_residual_activation_matches_unfused_torch(act, dtype, layout, device):
    _check((4, 6, 5, 7), dtype, layout, act, True, True, device)


@pytest.mark.parametrize("act", [None] + ACTS)
def test_fused_activation_without_residual(act, device):
    _check((3, 5, 4, 6), torch.float32, "contiguous", act, False, True, device)


@pytest.mark.parametrize("act", ["relu", "gelu", "hardswish", "leaky_relu"])
@pytest.mark.parametrize("with_res", [True, False])
def test_fused_eval_mode(act, with_res, device):
    _check((4, 6, 5, 7), torch.float16, "channels_last", act, with_res, False, device)


@pytest.mark.parametrize("act", ["silu", "relu", "tanh"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_fused_split_kernels(act, layout, device):
    plan = dict(variant="split", block_n=2, block_s=8, splits=3, block_c=4)
    if layout == "contiguous":
        plan["block_c"] = 1
    launches = _check((5, 6, 3, 7), torch.float16, layout, act, True, True, device, plan)
    assert launches["bn_stats_partial_kernel"] == 1 and launches["bn_bwd_partial_kernel"] == 1


def test_float32_residual_with_half_input(device):
    _check((4, 6, 5, 7), torch.float16, "contiguous", "silu", True, True, device,
           res_dtype=torch.float32)


def test_one_fused_pass_no_torch_ops_over_the_activation(device):
    x = make_input((4, 8, 6, 6), torch.float16, "channels_last", device, seed=21).requires_grad_()
    res = make_input((4, 8, 6, 6), torch.float16, "channels_last", device, seed=22).requires_grad_()
    w = torch.ones(8, device=device, requires_grad=True)
    b = torch.zeros(8, device=device, requires_grad=True)
    rm, rv = torch.zeros(8, device=device), torch.ones(8, device=device)
    with OpLog(x.numel()) as log, tritonbn.count_launches() as launches:
        y = tritonbn.batch_norm(x, rm, rv, w, b, True, activation="relu", residual=res)
        y.backward(torch.ones_like(y))
    # the only operators that produce activation-sized tensors are the tritonbn ops themselves
    # and allocations (plus ones_like for the gradient above): no add, no relu, no threshold
    extra = log.ops - TRITONBN_OPS - NO_COMPUTE - {"aten.ones_like.default"}
    assert not extra, extra
    assert dict(launches) == {"bn_fwd_onepass_kernel": 1, "bn_bwd_onepass_kernel": 1}


def test_fused_saves_fewer_bytes_for_backward_than_torch(device):
    shape = (8, 16, 8, 8)
    x = make_input(shape, torch.float16, "contiguous", device, seed=31).requires_grad_()
    w = torch.ones(16, device=device, requires_grad=True)
    b = torch.zeros(16, device=device, requires_grad=True)
    act_bytes = x.numel() * x.element_size()

    fused = saved_bytes(lambda: tritonbn.batch_norm(x, None, None, w, b, True, activation="relu"))
    unfused = saved_bytes(lambda: F.relu(F.batch_norm(x.float(), None, None, w, b, True).half()))
    torch_half = saved_bytes(lambda: F.relu(F.batch_norm(x, None, None, w.half(), b.half(), True)))
    # ours: x and per-channel float32 statistics; torch: x and the activation's output as well
    assert fused < act_bytes + 1024
    assert unfused > fused + act_bytes and torch_half > fused + act_bytes // 2

    # In a residual block the residual is the block's input, which the block's first conv has
    # already saved: the fused op adds no new activation-sized storage, torch adds relu's output.
    conv = torch.nn.Conv2d(16, 16, 3, padding=1).to(device).half()
    def block(fused_op):
        h = conv(x)
        if fused_op:
            return tritonbn.batch_norm(h, None, None, w, b, True, activation="relu", residual=x)
        return F.relu(F.batch_norm(h, None, None, w.half(), b.half(), True) + x)
    assert saved_bytes(lambda: block(True)) < saved_bytes(lambda: block(False))


@pytest.mark.parametrize("act", ["relu", "leaky_relu", "gelu"])
def test_batch_norm_act_module_matches_torch_modules(act, device):
    torch.manual_seed(3)
    mod = tritonbn.BatchNormAct2d(6, momentum=0.2, activation=act, negative_slope=0.2).to(device)
    ref = torch.nn.BatchNorm2d(6, momentum=0.2).double().to(device)
    assert mod.state_dict().keys() == ref.state_dict().keys()
    assert act in repr(mod)
    for step in range(2):
        x = make_input((4, 6, 5, 5), torch.float32, "channels_last", device, seed=90 + step)
        res = make_input((4, 6, 5, 5), torch.float32, "contiguous", device, seed=95 + step)
        y = mod(x, res)
        y_ref = torch_act(ref(x.double()) + res.double(), act)
        assert_close(y, y_ref, **tol(torch.float32, 100))
    assert_close(mod.running_var, ref.running_var, **tol(torch.float32, 100))
    assert int(mod.num_batches_tracked) == 2
    with pytest.raises(ValueError, match="unknown activation"):
        tritonbn.BatchNormAct2d(6, activation="swish")
