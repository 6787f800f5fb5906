"""A model fused by tritonbn.fuse trains like the original torch model: SGD steps of the tiny
ResNet in float32 and under autocast, and of a small net for each activation (module,
functional and in-place forms), with every BN -> [add ->] activation fused into the kernels."""
import operator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tritonbn
from tritonbn.transforms.fuse import FusedBatchNormAct1d, FusedBatchNormAct2d, FusedBatchNormAct3d
from tests.helpers import OpLog
from tests.models import (ACTIVATIONS, BATCH, SLOPE, ActNet, assert_same_buffers,
                          assert_trains_like, bn_modules, global_grad_error, make_batches,
                          make_model, randomize_bn, train)

STEPS = 3
FP32 = dict(atol=1e-5, rtol=1e-5)
# graph nodes that fusion removes from these models
ACT_OR_ADD = {operator.add, torch.add, F.relu, "relu_", "add"}


def _fused_acts(gm):
    return {n: (m.activation, m.negative_slope) for n, m in gm.named_modules()
            if isinstance(m, (FusedBatchNormAct1d, FusedBatchNormAct2d, FusedBatchNormAct3d))}


def _train_fused(model, xs, ts, amp_dtype=None):
    """Fuse, train, and check each batch norm ran one forward and one backward kernel a step."""
    fused = tritonbn.fuse(model)
    n_bn = len(bn_modules(fused))
    with tritonbn.count_launches() as launches:
        run = train(fused, xs, ts, amp_dtype)
    fwd = launches["bn_fwd_onepass_kernel"] + launches["bn_fwd_apply_kernel"]
    bwd = launches["bn_bwd_onepass_kernel"] + launches["bn_bwd_apply_kernel"]
    assert fwd == bwd == n_bn * len(xs), launches
    return fused, run


def test_fused_resnet_graph_has_no_activation_or_add_left(device):
    fused = tritonbn.fuse(make_model(device))
    targets = {n.target for n in fused.graph.nodes if n.op in ("call_function", "call_method")}
    assert not targets & ACT_OR_ADD, fused.code
    assert not any(isinstance(m, nn.ReLU) for m in fused.modules())
    fused_bns = {n: type(m) for n, m in fused.named_modules() if "Fused" in type(m).__name__}
    assert fused_bns == {"stem.1": FusedBatchNormAct2d, "layer1.bn1": FusedBatchNormAct2d,
                         "layer1.bn2": FusedBatchNormAct2d, "layer2.bn1": FusedBatchNormAct2d,
                         "layer2.bn2": FusedBatchNormAct2d, "bn_fc": FusedBatchNormAct1d}
    # the shortcut's batch norm feeds the fused add as its residual: converted, not fused
    assert type(fused.get_submodule("layer2.shortcut.1")) is tritonbn.BatchNorm2d
    residuals = {n.target: n.kwargs["residual"].target for n in fused.graph.nodes
                 if n.op == "call_module" and "residual" in n.kwargs}
    assert residuals == {"layer1.bn2": "layer1.shortcut", "layer2.bn2": "layer2.shortcut.1"}

    # running it: no torch ReLU or add on the activations (test_fuse.py checks backward too)
    x = make_batches(device, 1)[0][0]
    with OpLog(BATCH * 8 * 8 * 8) as log:
        fused(x)
    assert not {op for op in log.ops if "relu" in op or "add" in op}, log.ops
    assert "tritonbn.batch_norm_forward.default" in log.ops


def test_fused_resnet_trains_like_torch_fp32(device):
    xs, ts = make_batches(device, STEPS)
    ref = train(make_model(device), xs, ts)
    fused, ours = _train_fused(make_model(device), xs, ts)
    assert_trains_like(ours, ref, STEPS)
    params = torch.cat([p.flatten() for p in ours["params"].values()])
    params_ref = torch.cat([ref["params"][n].flatten() for n in ours["params"]])
    assert (params - params_ref).norm() / params_ref.norm() < 1e-3
    # eval mode with the learned running statistics, after handing the state to torch
    ref_model = make_model(device)
    ref_model.load_state_dict(fused.state_dict())
    fused.eval(), ref_model.eval()
    with torch.no_grad(), tritonbn.count_launches() as launches:
        y = fused(xs[0])
    assert launches["bn_fwd_apply_kernel"] == len(bn_modules(fused))
    with torch.no_grad():
        torch.testing.assert_close(y, ref_model(xs[0]), **FP32)


# Half-precision training of this tiny model drifts from float32 by itself (see
# tests/test_convert.py): relative loss differences allowed at step 0 and by the last step.
AMP_LOSS_RTOL = {torch.float16: (1e-3, 0.05), torch.bfloat16: (1e-2, 0.15)}


@pytest.mark.parametrize("amp_dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_fused_resnet_trains_like_torch_autocast(amp_dtype, device):
    steps = 2
    xs, ts = make_batches(device, steps)
    exact = train(make_model(device), xs, ts)                # float32: the yardstick
    ref = train(make_model(device), xs, ts, amp_dtype)       # torch under autocast
    fused, ours = _train_fused(make_model(device), xs, ts, amp_dtype)
    first, drift = AMP_LOSS_RTOL[amp_dtype]
    torch.testing.assert_close(ours["losses"][0], ref["losses"][0], atol=0, rtol=first)
    torch.testing.assert_close(ours["losses"], ref["losses"], atol=0, rtol=drift)
    # the fused op rounds act(BN(x) + r) once where torch rounds BN, add and activation
    # each to the half dtype: no further from float32 than torch's autocast run
    grad_err = global_grad_error(ours["grads"][0], exact["grads"][0])
    grad_err_ref = global_grad_error(ref["grads"][0], exact["grads"][0])
    assert grad_err <= 2 * grad_err_ref + 0.05, (grad_err, grad_err_ref)
    for step in range(steps):
        assert_same_buffers(ours["buffers"][step], ref["buffers"][step], atol=0.1, rtol=0.1)
    assert all(p.dtype == torch.float32 for p in fused.parameters())


@pytest.mark.parametrize("act", list(ACTIVATIONS))
def test_each_activation_in_module_functional_and_inplace_form_trains_like_torch(act, device):
    steps = 1  # the ResNet tests cover several steps; this one covers the activations
    xs, ts = make_batches(device, steps, seed=7)
    model = randomize_bn(ActNet(act).to(device))
    ref_model = randomize_bn(ActNet(act).to(device))
    ref_model.load_state_dict(model.state_dict())
    ref = train(ref_model, xs, ts)
    fused, ours = _train_fused(model, xs, ts)
    slope = SLOPE.get(act, 0.01)
    assert _fused_acts(fused) == {n: (act, slope) for n in ("stem.1", "bn1", "bn2", "bn_fc")}
    calls = [n for n in fused.graph.nodes if n.op not in ("placeholder", "output")]
    assert [n.target for n in calls if n.op != "call_module"] == [
        F.adaptive_avg_pool2d, torch.flatten]  # activations and the add are gone
    # fc1's gradient passes a 4-sample BatchNorm1d: torch's and ours are both up to ~1e-4 from
    # float64 there (measured with sigmoid), so step 0 gets 5e-4 here
    assert_trains_like(ours, ref, steps, step0_tol=5e-4)
