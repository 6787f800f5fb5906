"""Half precision near 65,504: output policies, fused counters, running statistics that survive
non-finite batches, the model monitor and the profiler."""
import pytest
import torch
import torch.nn.functional as F

import tritonbn
from tritonbn import overflow as ovf
from tritonbn.plan import forced_plan
from tests.helpers import assert_close, tol

F16_MAX = 65504.0


def _edge_input(device, n=8, c=3, s=40, seed=0):
    """float16 input whose normalized values times gamma = 3e4 leave float16's range."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, s, generator=g)
    x[0, :, 0] = 12.0     # an outlier: |x_hat| near sqrt(M - 1) in its channel
    return x.half().to(device)


def test_near_limit_inputs_are_exact(device):
    g = torch.Generator().manual_seed(1)
    x = (65504 * (0.99 + 0.01 * torch.rand(4, 2, 64, generator=g))
         * torch.where(torch.rand(4, 2, 64, generator=g) < 0.5, -1.0, 1.0)).half().to(device)
    w, b = torch.ones(2, device=device), torch.zeros(2, device=device)
    y = tritonbn.batch_norm(x, None, None, w, b, training=True)
    ref = tritonbn.batch_norm_reference(x, None, None, w, b, True)[0]
    assert torch.isfinite(y).all()
    assert_close(y, ref, **tol(torch.float16, 256))


@pytest.mark.parametrize("plan", [None, dict(variant="split", block_n=2, block_s=8, splits=3)],
                         ids=["default", "split"])
def test_propagate_matches_torch_and_saturate_clamps_exactly(plan, device):
    x = _edge_input(device)
    w = torch.full((3,), 3e4, device=device)
    b = torch.tensor([0.0, 6e4, -6e4], device=device)
    with (forced_plan(**plan) if plan else forced_plan()):
        y_prop = tritonbn.batch_norm(x, None, None, w, b, training=True)
        y_sat = tritonbn.batch_norm(x, None, None, w, b, training=True, overflow="saturate")
    y_torch = F.batch_norm(x.cpu(), None, None, w.cpu(), b.cpu(), training=True)
    inf_prop = torch.isinf(y_prop).cpu()
    assert inf_prop.any() and torch.equal(inf_prop, torch.isinf(y_torch))
    assert not torch.isinf(y_sat).any()
    assert torch.equal(y_sat[inf_prop.to(device)].abs(), torch.full_like(y_sat[inf_prop.to(device)], F16_MAX))
    assert torch.equal(torch.sign(y_sat[inf_prop.to(device)]), torch.sign(y_prop[inf_prop.to(device)]))
    assert torch.equal(y_sat[~inf_prop.to(device)], y_prop[~inf_prop.to(device)])


def test_saturate_keeps_nan_and_inf_inputs(device):
    x = _edge_input(device)
    x[1, 0, 3] = float("nan")
    y = tritonbn.batch_norm(x, None, None, training=True, overflow="saturate")
    assert torch.isnan(y[:, 0]).all()           # NaN stays NaN (the whole channel's stats)
    assert torch.isfinite(y[:, 1:]).all()


def test_saturate_in_backward(device):
    x = _edge_input(device).requires_grad_()
    w = torch.full((3,), 40.0, device=device)
    grad = torch.full_like(x, 3e4)
    grad[:, :, ::2] = -3e4
    for policy in ("propagate", "saturate"):
        x.grad = None
        tritonbn.batch_norm(x, None, None, w, None, training=True, overflow=policy).backward(grad)
        if policy == "propagate":
            dx_prop = x.grad.clone()
        else:
            dx_sat = x.grad.clone()
    over = torch.isinf(dx_prop)
    assert over.any() and not torch.isinf(dx_sat).any()
    assert torch.equal(dx_sat[over].abs(), torch.full_like(dx_sat[over], F16_MAX))
    assert torch.equal(dx_sat[~over], dx_prop[~over])


@pytest.mark.parametrize("plan", [None, dict(variant="split", block_n=2, block_s=8, splits=3)],
                         ids=["onepass", "split"])
def test_counters_equal_a_float64_recount(plan, device):
    x = _edge_input(device, seed=3)
    w = torch.full((3,), 3e4, device=device)
    b = torch.tensor([0.0, 6e4, -2e4], device=device)
    stats = ovf.OverflowStats.zeros(3, device)
    with (forced_plan(**plan) if plan else forced_plan()):
        for _ in range(2):  # the counters accumulate over calls
            tritonbn.batch_norm(x, None, None, w, b, training=True, overflow_stats=stats)
    y64 = tritonbn.batch_norm_reference(x, None, None, w, b, True)[0]
    over = (torch.isinf(y64.half()) & torch.isfinite(y64)).sum(dim=(0, 2))
    assert over.sum() > 0
    assert torch.equal(stats.count.cpu(), 2 * over.cpu())
    assert_close(stats.max_abs, y64.abs().amax(dim=(0, 2)), atol=0, rtol=1e-6)
    assert stats.headroom(torch.float16) < 0


def test_skip_keeps_running_stats_of_nonfinite_channels(device):
    x = _edge_input(device, seed=4).float()
    x[2, 1, 5] = float("inf")
    rm = torch.tensor([0.5, 0.25, -0.5], device=device)
    rv = torch.tensor([2.0, 3.0, 4.0], device=device)
    rm0, rv0 = rm.clone(), rv.clone()
    tritonbn.batch_norm(x, rm, rv, training=True, nonfinite_stats="skip")
    assert torch.equal(rm[1], rm0[1]) and torch.equal(rv[1], rv0[1])   # bit-identical
    _, rm_ref, rv_ref, *_ = _ref_running(x, rm0, rv0)
    assert_close(rm[[0, 2]], rm_ref[[0, 2]], **tol(torch.float32, 320))
    assert_close(rv[[0, 2]], rv_ref[[0, 2]], **tol(torch.float32, 320))
    # without the policy the inf poisons channel 1 for good, as in torch
    rm2, rv2 = rm0.clone(), rv0.clone()
    tritonbn.batch_norm(x, rm2, rv2, training=True)
    assert not torch.isfinite(rm2[1]) or not torch.isfinite(rv2[1])


def _ref_running(x, rm, rv):
    rm, rv = rm.clone().cpu(), rv.clone().cpu()
    y = tritonbn.batch_norm_reference(x.cpu(), rm, rv, None, None, True)
    return y, rm, rv


def test_skip_with_cumulative_average_counts_per_channel(device):
    bn = tritonbn.BatchNorm1d(3, momentum=None).to(device)
    ovf.set_policy(bn, nonfinite_stats="skip")
    batches = []
    for step in range(3):
        x = torch.randn(16, 3, generator=torch.Generator().manual_seed(step)).to(device)
        if step == 1:
            x[4, 2] = float("nan")
        batches.append(x)
        bn(x)
    assert bn.channel_batches_tracked.tolist() == [3, 3, 2]
    # channel 2's running mean is the plain average of its finite batches' means
    expected = torch.stack([batches[0][:, 2].mean(), batches[2][:, 2].mean()]).mean()
    assert_close(bn.running_mean[2], expected, atol=1e-6, rtol=1e-6)
    assert_close(bn.running_mean[0], torch.stack([b[:, 0].mean() for b in batches]).mean(),
                 atol=1e-6, rtol=1e-6)


def test_half_running_var_saturates_instead_of_overflowing(device):
    x = (torch.randn(32, 2, generator=torch.Generator().manual_seed(5)) * 400).half().to(device)
    for policy, check in (("propagate", torch.isinf), ("saturate", lambda t: t == F16_MAX)):
        rm = torch.zeros(2, dtype=torch.float16, device=device)
        rv = torch.ones(2, dtype=torch.float16, device=device)
        tritonbn.batch_norm(x, rm, rv, training=True, momentum=1.0, overflow=policy)
        assert check(rv).all(), (policy, rv)
