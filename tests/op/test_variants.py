"""cuDNN's per-activation mode and Batch Renormalization against float64 references written here."""
import math

import pytest
import torch
import torch.nn.functional as F

import tritonbn
from tests.helpers import assert_close, make_input, tol


# ---------------------------------------------------------------- per-activation mode

def _per_activation_ref(x, rm, rv, w, b, training):
    """Batch norm over the batch only: every (channel, position) is its own feature."""
    n = x.shape[0]
    y = F.batch_norm(x.reshape(n, -1), rm, rv, None if w is None else w.reshape(-1),
                     None if b is None else b.reshape(-1), training, 0.1, 1e-5)
    return y.reshape(x.shape)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("training", [True, False])
def test_per_activation_matches_batch_only_reference(layout, dtype, training, device):
    shape = (6, 3, 4, 5)
    feat = (3, 4, 5)
    x = make_input(shape, dtype, layout, device, seed=41)
    g = torch.Generator().manual_seed(42)
    w = (torch.rand(feat, generator=g) + 0.5).to(device).requires_grad_()
    b = torch.randn(feat, generator=g).to(device).requires_grad_()
    rm = torch.randn(feat, generator=g).to(device)
    rv = (torch.rand(feat, generator=g) + 0.5).to(device)
    rm64, rv64 = rm.double().reshape(-1).clone(), rv.double().reshape(-1).clone()
    grad = make_input(shape, dtype, "contiguous", device, seed=43)

    xg = x.detach().clone().requires_grad_()
    with tritonbn.count_launches() as launches:
        y = tritonbn.batch_norm(xg, rm, rv, w, b, training, mode="per_activation")
        y.backward(grad)
    assert sum(launches.values()) >= 2
    assert y.shape == x.shape and y.dtype == dtype
    assert y.is_contiguous(memory_format=torch.channels_last if layout == "channels_last"
                           else torch.contiguous_format)

    x64 = x.detach().double().requires_grad_()
    w64, b64 = w.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    y64 = _per_activation_ref(x64, rm64, rv64, w64, b64, training)
    y64.backward(grad.double())
    m = shape[0]
    assert_close(y, y64, **tol(dtype, m))
    assert_close(xg.grad, x64.grad, **tol(dtype, m))
    assert_close(w.grad, w64.grad, atol=1e-4, rtol=1e-4)
    assert_close(b.grad, b64.grad, atol=1e-4, rtol=1e-4)
    assert rm.shape == feat
    assert_close(rm.reshape(-1), rm64, **tol(torch.float32, m))
    assert_close(rv.reshape(-1), rv64, **tol(torch.float32, m))


def test_per_activation_module_over_steps(device):
    torch.manual_seed(0)
    mod = tritonbn.BatchNormPerActivation2d(4, (3, 5), momentum=0.2).to(device)
    ref = torch.nn.BatchNorm1d(60, momentum=0.2).double().to(device)
    assert mod.weight.shape == (4, 3, 5) and mod.running_var.shape == (4, 3, 5)
    for step in range(3):
        x = make_input((5, 4, 3, 5), torch.float32, "contiguous", device, seed=50 + step)
        y = mod(x)
        y_ref = ref(x.double().reshape(5, -1)).reshape(x.shape)
        assert_close(y, y_ref, **tol(torch.float32, 5))
    assert_close(mod.running_mean.reshape(-1), ref.running_mean, **tol(torch.float32, 5))
    assert_close(mod.running_var.reshape(-1), ref.running_var, **tol(torch.float32, 5))
    assert int(mod.num_batches_tracked) == 3
    mod.eval(), ref.eval()
    x = make_input((2, 4, 3, 5), torch.float32, "contiguous", device, seed=60)
    assert_close(mod(x), ref(x.double().reshape(2, -1)).reshape(x.shape), **tol(torch.float32, 5))
    with pytest.raises(ValueError, match="expected input of shape"):
        mod(torch.randn(2, 4, 5, 3, device=device))


def test_per_activation_rejects_channel_sized_parameters(device):
    x = torch.randn(4, 3, 2, 2, device=device)
    with pytest.raises(RuntimeError, match="12 elements"):
        tritonbn.batch_norm(x, None, None, torch.ones(3, device=device), None, True,
                            mode="per_activation")
    with pytest.raises(ValueError, match="mode"):
        tritonbn.batch_norm(x, None, None, training=True, mode="per_channel")


# ---------------------------------------------------------------- batch renormalization

class PaperBatchRenorm:
    """Ioffe (2017), Algorithm 1, in float64, with the running statistics kept the way torch's
    batch norm keeps them (momentum, unbiased running variance): sigma = sqrt(running_var + eps)."""

    def __init__(self, c, momentum, eps, rmax, dmax, warmup_steps):
        self.rm, self.rv = torch.zeros(c, dtype=torch.float64), torch.ones(c, dtype=torch.float64)
        self.momentum, self.eps, self.rmax, self.dmax = momentum, eps, rmax, dmax
        self.warmup, self.steps = warmup_steps, 0
        self.w = torch.ones(c, dtype=torch.float64, requires_grad=True)
        self.b = torch.zeros(c, dtype=torch.float64, requires_grad=True)

    def __call__(self, x):
        self.steps += 1
        dims = [0] + list(range(2, x.dim()))
        shape = [1, -1] + [1] * (x.dim() - 2)
        mu, var = x.mean(dims), x.var(dims, unbiased=False)
        sigma_b = torch.sqrt(var + self.eps)
        sigma = torch.sqrt(self.rv + self.eps)
        if self.steps <= self.warmup:
            r, d = torch.ones_like(mu), torch.zeros_like(mu)
        else:
            r = (sigma_b / sigma).clamp(1 / self.rmax, self.rmax).detach()
            d = ((mu - self.rm) / sigma).clamp(-self.dmax, self.dmax).detach()
        xhat = (x - mu.view(shape)) / sigma_b.view(shape) * r.view(shape) + d.view(shape)
        y = self.w.view(shape) * xhat + self.b.view(shape)
        m = x.numel() // x.shape[1]
        with torch.no_grad():
            self.rm = (1 - self.momentum) * self.rm + self.momentum * mu
            self.rv = (1 - self.momentum) * self.rv + self.momentum * var * m / (m - 1)
        return y, r, d


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_batch_renorm_matches_paper_over_steps_with_clipping_and_warmup(layout, device):
    c = 4
    mod = tritonbn.BatchRenorm2d(c, momentum=0.3, rmax=2.0, dmax=1.5, warmup_steps=2).to(device)
    ref = PaperBatchRenorm(c, 0.3, mod.eps, 2.0, 1.5, 2)
    clipped_r = clipped_d = False
    for step in range(6):
        # scales and shifts far from the running statistics, so r and d hit their limits
        scale, shift = (8.0, 6.0) if step % 2 == 0 else (0.2, -4.0)
        x = make_input((6, c, 3, 5), torch.float32, layout, device, scale=scale, shift=shift,
                       seed=70 + step).requires_grad_()
        y = mod(x)
        grad = make_input((6, c, 3, 5), torch.float32, "contiguous", device, seed=80 + step)
        y.backward(grad)
        x64 = x.detach().double().requires_grad_()
        y64, r, d = ref(x64)
        y64.backward(grad.double())
        m = 90
        assert_close(y, y64, atol=1e-4, rtol=1e-4)
        assert_close(x.grad, x64.grad, atol=1e-4, rtol=1e-4)
        assert_close(mod.weight.grad, ref.w.grad, atol=1e-3, rtol=1e-4)
        assert_close(mod.bias.grad, ref.b.grad, atol=1e-3, rtol=1e-4)
        assert_close(mod.running_mean, ref.rm, **tol(torch.float32, m))
        assert_close(mod.running_var, ref.rv, **tol(torch.float32, m))
        if step >= 2:
            clipped_r |= bool(((r - 2.0).abs() < 1e-12).any() | ((r - 0.5).abs() < 1e-12).any())
            clipped_d |= bool(((d.abs() - 1.5).abs() < 1e-12).any())
        else:
            assert torch.equal(r, torch.ones_like(r))  # warm-up: plain batch norm
        mod.weight.grad = mod.bias.grad = None
        ref.w.grad = ref.b.grad = None
    assert clipped_r and clipped_d, "the inputs were chosen to exercise the clipping"


def test_batch_renorm_with_rmax_1_dmax_0_is_batch_norm(device):
    x = make_input((5, 3, 4, 4), torch.float16, "channels_last", device, scale=5, shift=2, seed=90)
    rm, rv = torch.zeros(3, device=device), torch.ones(3, device=device)
    rm2, rv2 = rm.clone(), rv.clone()
    y_renorm = tritonbn.batch_renorm(x, rm, rv, training=True, rmax=1.0, dmax=0.0)
    y_bn = tritonbn.batch_norm(x, rm2, rv2, training=True)
    assert torch.equal(y_renorm, y_bn)
    assert torch.equal(rm, rm2) and torch.equal(rv, rv2)


def test_batch_renorm_split_kernels_and_eval(device):
    x = make_input((5, 3, 7, 9), torch.float32, "contiguous", device, scale=4, shift=3, seed=91)
    rm, rv = torch.zeros(3, device=device), torch.ones(3, device=device)
    ref = PaperBatchRenorm(3, 0.1, 1e-5, 3.0, 5.0, 0)
    with tritonbn.plan.forced_plan(variant="split", block_n=2, block_s=16, splits=4), \
            tritonbn.count_launches() as launches:
        y = tritonbn.batch_renorm(x, rm, rv, training=True)
    assert launches["bn_stats_partial_kernel"] == 1
    y64, _, _ = ref(x.double())
    assert_close(y, y64, atol=1e-4, rtol=1e-4)
    assert_close(rm, ref.rm, **tol(torch.float32, 315))
    y_eval = tritonbn.batch_renorm(x, rm, rv, training=False)
    assert_close(y_eval, F.batch_norm(x.double(), ref.rm, ref.rv), atol=1e-4, rtol=1e-4)


def test_batch_renorm_bad_arguments(device):
    with pytest.raises(ValueError, match="rmax"):
        tritonbn.BatchRenorm2d(3, rmax=0.5)
    with pytest.raises(ValueError, match="required"):
        tritonbn.batch_renorm(torch.randn(4, 3, device=device), None, None, training=True)
    assert math.isfinite(tritonbn.BatchRenorm1d(3).rmax)
