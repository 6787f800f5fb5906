"""Numerical guarantees: robust variance, determinism, NaN isolation, half precision near its
limit, stride-0 gradients, float64 gradcheck, empty batches and momentum/eps semantics."""

import pytest
import torch

import tritonbn
from tritonbn.plan import forced_plan
from tests.helpers import assert_close, make_input, reference, tol


@pytest.mark.parametrize("plan", [None, dict(variant="split", block_n=4, block_s=256, splits=5)],
                         ids=["default", "many-tiles"])
def test_variance_of_large_mean_channel_is_accurate(plan, device):
    # float32 input, mean 1e4 and std 1: E[x^2] - E[x]^2 in float32 cancels 8 digits away.
    g = torch.Generator().manual_seed(11)
    x = (torch.randn(64, 2, 32, 32, generator=g, dtype=torch.float64) + 1e4)
    x32 = x.float().to(device)
    true_var = x32.double().var(dim=(0, 2, 3), unbiased=True).cpu()
    rm, rv = torch.zeros(2, device=device), torch.zeros(2, device=device)
    ctx = forced_plan(**plan) if plan else forced_plan()
    with ctx, tritonbn.count_launches() as launches:
        y = tritonbn.batch_norm(x32, rm, rv, training=True, momentum=1.0)
    assert launches["bn_stats_partial_kernel"] == 1
    rel_err = ((rv.double().cpu() - true_var).abs() / true_var).max().item()
    assert rel_err <= 1e-3
    # the naive float32 formula this guards against really does fail here
    xf = x32.cpu()
    naive = (xf * xf).mean(dim=(0, 2, 3)) - xf.mean(dim=(0, 2, 3)) ** 2
    assert ((naive.double() - true_var).abs() / true_var).max().item() > 1e-3
    y_ref = reference(x32, None, None, None, None, True)[0]
    assert_close(y, y_ref, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_bit_identical_across_runs(dtype, device):
    x = make_input((6, 5, 9, 11), dtype, "contiguous", device, seed=21)
    grad = make_input((6, 5, 9, 11), dtype, "contiguous", device, seed=22)
    results = []
    for _ in range(2):
        rm, rv = torch.zeros(5, device=device), torch.ones(5, device=device)
        w = torch.ones(5, device=device, requires_grad=True)
        b = torch.zeros(5, device=device, requires_grad=True)
        xg = x.detach().clone().requires_grad_()
        with forced_plan(variant="split", block_n=2, block_s=32, splits=4):
            y = tritonbn.batch_norm(xg, rm, rv, w, b, training=True)
            y.backward(grad)
        results.append([y, rm, rv, xg.grad, w.grad, b.grad])
    for a, b_ in zip(*results):
        assert torch.equal(a, b_)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_nan_in_one_channel_does_not_leak(layout, device):
    x = make_input((4, 3, 5, 5), torch.float32, layout, device, seed=31)
    x[1, 1, 2, 3] = float("nan")
    rm, rv = torch.zeros(3, device=device), torch.ones(3, device=device)
    xg = x.detach().clone().requires_grad_()
    with forced_plan(variant="split", block_n=2, block_s=8, splits=2):
        y = tritonbn.batch_norm(xg, rm, rv, training=True)
        y.backward(torch.ones_like(y))
    clean = [0, 2]
    assert torch.isnan(y[:, 1]).all() and torch.isnan(rm[1]) and torch.isnan(rv[1])
    assert torch.isfinite(y[:, clean]).all() and torch.isfinite(xg.grad[:, clean]).all()
    rm_ref, rv_ref = torch.zeros(3, device=device), torch.ones(3, device=device)
    y_ref = reference(x, rm_ref, rv_ref, None, None, True)
    assert_close(y[:, clean], y_ref[0][:, clean], **tol(torch.float32, 100))
    assert_close(rm[clean], y_ref[1][clean], **tol(torch.float32, 100))
    assert_close(rv[clean], y_ref[2][clean], **tol(torch.float32, 100))


def test_float16_near_limit_uses_float32_statistics(device):
    # Every |x| within 1% of 65504: squares in half would overflow; float32 statistics are exact.
    g = torch.Generator().manual_seed(41)
    mag = 65504 * (0.99 + 0.01 * torch.rand(8, 2, 6, 6, generator=g))
    sign = torch.where(torch.rand(8, 2, 6, 6, generator=g) < 0.5, -1.0, 1.0)
    x = (mag * sign).half().to(device)
    assert (x.abs() >= 0.99 * 65504).all() and torch.isfinite(x).all()
    y = tritonbn.batch_norm(x, None, None, training=True)
    assert torch.isfinite(y).all()
    assert_close(y, reference(x, None, None, None, None, True)[0], **tol(torch.float16, 288))


def test_stride_zero_gradient(device):
    x = make_input((3, 4, 5, 6), torch.float16, "channels_last", device, seed=51)
    xg = x.detach().clone().requires_grad_()
    w = torch.linspace(0.5, 2, 4, device=device).requires_grad_()
    y = tritonbn.batch_norm(xg, None, None, w, None, training=True)
    with tritonbn.count_launches() as launches:
        y.sum().backward()  # grad_output is expand()ed: every stride 0
    assert sum(launches.values()) >= 1
    x64 = x.detach().double().requires_grad_()
    w64 = w.detach().double().requires_grad_()
    reference(x64, None, None, w64, None, True)[0].sum().backward()
    # sum of dy over a channel is M, sum of dy * x_hat is 0: dx is pure rounding noise
    assert_close(xg.grad, x64.grad, atol=2e-3, rtol=0)
    assert_close(w.grad, w64.grad, atol=1e-3, rtol=0)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("affine", [True, False])
def test_gradcheck_float64(training, affine, device):
    g = torch.Generator().manual_seed(61)
    x = torch.randn(3, 2, 2, 3, generator=g, dtype=torch.float64).to(device).requires_grad_()
    w = (torch.rand(2, generator=g, dtype=torch.float64) + 0.5).to(device).requires_grad_(affine)
    b = torch.randn(2, generator=g, dtype=torch.float64).to(device).requires_grad_(affine)
    rm = torch.randn(2, dtype=torch.float64, device=device)
    rv = torch.rand(2, dtype=torch.float64, device=device) + 0.5
    if training:
        fn = lambda x, w, b: tritonbn.batch_norm(x, None, None, w, b, training=True)  # noqa: E731
    else:
        fn = lambda x, w, b: tritonbn.batch_norm(x, rm, rv, w, b, training=False)  # noqa: E731
    with tritonbn.count_launches() as launches:
        assert torch.autograd.gradcheck(fn, (x, w, b), eps=1e-6, atol=1e-6, rtol=1e-5)
    assert launches["bn_bwd_onepass_kernel"] + launches["bn_bwd_apply_kernel"] >= 1


@pytest.mark.parametrize("shape", [(0, 3, 4, 4), (4, 3, 0), (0, 3)])
@pytest.mark.parametrize("training", [True, False])
def test_empty_batch(shape, training, device):
    x = torch.randn(shape, device=device, requires_grad=True)
    w = torch.ones(3, device=device, requires_grad=True)
    b = torch.zeros(3, device=device, requires_grad=True)
    rm, rv = torch.full((3,), 0.5, device=device), torch.full((3,), 2.0, device=device)
    rm_t, rv_t = rm.clone(), rv.clone()
    y = tritonbn.batch_norm(x, rm, rv, w, b, training=training)
    y_t = torch.nn.functional.batch_norm(x.detach(), rm_t, rv_t, w.detach(), b.detach(),
                                         training=training)
    assert y.shape == y_t.shape and y.dtype == y_t.dtype
    assert torch.equal(rm, rm_t) and torch.equal(rv, rv_t)
    y.sum().backward()
    assert x.grad.shape == x.shape
    assert torch.equal(w.grad, torch.zeros(3, device=device))
    assert torch.equal(b.grad, torch.zeros(3, device=device))


@pytest.mark.parametrize("momentum", [0.0, 0.5, 1.0, -0.25, 1])
@pytest.mark.parametrize("eps", [1e-5, 1e-1, 3.0])
def test_momentum_and_eps_follow_torch(momentum, eps, device):
    x = make_input((4, 3, 3, 5), torch.float32, "contiguous", device, seed=71)
    rm, rv = torch.full((3,), 0.25, device=device), torch.full((3,), 1.5, device=device)
    rm_t, rv_t = rm.clone().cpu(), rv.clone().cpu()
    y = tritonbn.batch_norm(x, rm, rv, training=True, momentum=momentum, eps=eps)
    y_t = torch.nn.functional.batch_norm(x.cpu().double(), rm_t.double(), rv_t.double(),
                                         training=True, momentum=momentum, eps=eps)
    rm_ref, rv_ref = rm_t.double(), rv_t.double()
    torch.nn.functional.batch_norm(x.cpu().double(), rm_ref, rv_ref, training=True,
                                   momentum=momentum, eps=eps)
    assert_close(y, y_t, **tol(torch.float32, 60))
    assert_close(rm, rm_ref, **tol(torch.float32, 60))
    assert_close(rv, rv_ref, **tol(torch.float32, 60))
    # eval mode uses the running statistics with the same eps
    y_eval = tritonbn.batch_norm(x, rm, rv, training=False, eps=eps)
    y_eval_t = torch.nn.functional.batch_norm(x.cpu().double(), rm.cpu().double(),
                                              rv.cpu().double(), training=False, eps=eps)
    assert_close(y_eval, y_eval_t, **tol(torch.float32, 60))


def test_noncontiguous_running_stats_updated_in_place(device):
    x = make_input((4, 3, 5), torch.float32, "contiguous", device, seed=81)
    storage = torch.zeros(3, 2, device=device)
    rm, rv = storage[:, 0], storage[:, 1].fill_(1.0)
    assert not rm.is_contiguous()
    rm_ref, rv_ref = torch.zeros(3), torch.ones(3)
    tritonbn.batch_norm(x, rm, rv, training=True)
    torch.nn.functional.batch_norm(x.cpu(), rm_ref, rv_ref, training=True)
    assert_close(storage[:, 0], rm_ref, **tol(torch.float32, 20))
    assert_close(storage[:, 1], rv_ref, **tol(torch.float32, 20))
