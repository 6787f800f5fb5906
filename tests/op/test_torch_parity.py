"""Corners where a drop-in must behave exactly as torch.nn.functional.batch_norm does -- or, where
tritonbn deliberately differs, does so before any kernel runs and says why."""
import pytest
import torch
import torch.nn.functional as F

import tritonbn
from tests.helpers import assert_close, make_input, tol

C = 3


def _stats(device, dtype=torch.float32):
    return torch.zeros(C, device=device, dtype=dtype), torch.ones(C, device=device, dtype=dtype)


# ------------------------------------------------------------------------------ output layout

def _layouts():
    x4 = torch.randn(4, 6, 4, 5).to(memory_format=torch.channels_last)
    x2c = torch.randn(4, 2, 4, 5).to(memory_format=torch.channels_last)
    x5 = torch.randn(2, 6, 3, 4, 5).to(memory_format=torch.channels_last_3d)
    return {
        "channels_last": x4,
        "channels_last C-sliced": x4[:, ::2],
        "channels_last W-sliced": x4[..., ::2],
        "channels_last H-sliced": x4[:, :, ::2],
        "channels_last 2 channels C-sliced": x2c[:, ::2],
        "channels_last_3d C-sliced": x5[:, ::2],
        "channels_last empty batch": x4[:0],
        "channels_last_3d empty batch": x5[:0],
        "contiguous sliced": torch.randn(4, 6, 4, 5)[:, ::2],
        "transposed H/W": torch.randn(4, 6, 5, 4).transpose(2, 3),
        "3-D channels-minor": torch.randn(4, 5, 6).transpose(1, 2),
    }


@pytest.mark.parametrize("name", list(_layouts()))
def test_output_and_gradient_have_torchs_strides(name, device):
    x = _layouts()[name].to(device)
    c = x.shape[1]
    for training in (True, False):
        # views of the same storage, so both keep the input's own strides
        xg = x.detach().as_strided(x.shape, x.stride()).requires_grad_()
        xr = x.detach().cpu().as_strided(x.shape, x.stride()).requires_grad_()
        rm, rv = torch.zeros(c, device=device), torch.ones(c, device=device)
        w = torch.ones(c, device=device, requires_grad=True)
        y = tritonbn.batch_norm(xg, rm, rv, w, None, training)
        y_t = F.batch_norm(xr, rm.cpu().clone(), rv.cpu().clone(), w.detach().cpu()
                           .requires_grad_(), None, training)
        assert y.stride() == y_t.stride(), (training, y.stride(), y_t.stride())
        if x.numel():
            g = torch.ones_like(y_t)
            y.backward(g.to(device))
            y_t.backward(g)
            assert xg.grad.stride() == xr.grad.stride(), (xg.grad.stride(), xr.grad.stride())
            assert_close(xg.grad, xr.grad, **tol(torch.float32, x.numel() // c))


# ---------------------------------------------------------------- inputs outside (N, C, ...)

@pytest.mark.parametrize("input_", [torch.tensor(1.0), torch.randn(3), torch.randn(1),
                                    [1.0, 2.0], 1.0],
                         ids=["0-D", "1-D", "1-D one value", "list", "float"])
@pytest.mark.parametrize("training", [True, False])
def test_inputs_outside_the_domain_raise_what_torch_raises(input_, training):
    rm, rv = _stats("cpu")
    with pytest.raises(Exception) as torch_error:
        F.batch_norm(input_, rm.clone(), rv.clone(), training=training)
    with tritonbn.count_launches() as launches, pytest.raises(type(torch_error.value)) as ours:
        tritonbn.batch_norm(input_, rm, rv, training=training)
    assert str(ours.value) == str(torch_error.value)
    assert not launches and (rm == 0).all() and (rv == 1).all()


@pytest.mark.parametrize("training", [True, False])
def test_empty_1d_input_returns_empty_like_torch(training):
    x = torch.randn(0)
    y = tritonbn.batch_norm(x, torch.zeros(0), torch.ones(0), training=training)
    assert y.shape == (0,) and y.dtype == x.dtype


# --------------------------------------------------------------- accepted as torch accepts them

def test_momentum_true_and_nan_eps_are_accepted_like_torch(device):
    x = make_input((4, C, 5), torch.float32, "contiguous", device)
    for kwargs in (dict(momentum=True), dict(eps=float("nan")), dict(momentum=1)):
        rm, rv = _stats(device)
        rm_t, rv_t = _stats("cpu", torch.float64)
        y = tritonbn.batch_norm(x, rm, rv, training=True, **kwargs)
        y_t = F.batch_norm(x.cpu().double(), rm_t, rv_t, training=True, **kwargs)
        assert_close(y, y_t, **tol(torch.float32, 20))
        assert_close(rm, rm_t, **tol(torch.float32, 20))
        assert_close(rv, rv_t, **tol(torch.float32, 20))


def test_eval_with_one_running_statistic_is_a_runtime_error_like_torch(device):
    x = make_input((4, C), torch.float32, "contiguous", device)
    rm, rv = _stats(device)
    for args in ((rm, None), (None, rv)):
        with pytest.raises(RuntimeError):
            F.batch_norm(x.cpu(), *(None if a is None else a.cpu() for a in args))
        with pytest.raises(RuntimeError, match="evaluation mode"):
            tritonbn.batch_norm(x, *args)


def test_inference_mode_statistics_with_a_grad_input_raise_like_torch(device):
    with torch.inference_mode():
        rm, rv = _stats(device)
    x = make_input((4, C), torch.float32, "contiguous", device).requires_grad_()
    with pytest.raises(RuntimeError):
        F.batch_norm(x.cpu(), rm.cpu(), rv.cpu(), training=True)
    with pytest.raises(RuntimeError, match="inference"):
        tritonbn.batch_norm(x, rm, rv, training=True)
    assert (rm == 0).all() and (rv == 1).all()
    tritonbn.batch_norm(x.detach(), rm, rv, training=True)   # without grad: fine, as in torch
    assert not (rm == 0).all()


# ------------------------------------------------------------- deliberate, documented difference

def test_expanded_running_statistic_is_refused_before_any_kernel(device):
    """torch accepts a stride-0 running_mean in training and folds every channel's update into
    its one element in channel order (a race on a GPU); tritonbn refuses it up front."""
    x = make_input((4, C, 5), torch.float32, "contiguous", device)
    rm, rv = torch.zeros(1, device=device).expand(C), torch.ones(C, device=device)
    with tritonbn.count_launches() as launches, pytest.raises(RuntimeError, match="overlapping"):
        tritonbn.batch_norm(x, rm, rv, training=True)
    assert not launches and (rv == 1).all() and (rm == 0).all()
    y = tritonbn.batch_norm(x, rm, rv, training=False)      # read-only in eval: fine
    assert_close(y, F.batch_norm(x.cpu(), rm.cpu(), rv.cpu()), **tol(torch.float32, 20))


# --------------------------------------------------------------------------- numerics corners

def test_float64_running_statistics_follow_torch_to_float64_precision(device):
    """The momentum reaches the kernels as a float64 value: a float64 module's running
    statistics (momentum 0.1, and momentum=None) match torch's to float64 rounding."""
    for momentum in (0.1, None):
        ours = tritonbn.BatchNorm1d(C, momentum=momentum).double().to(device)
        ref = torch.nn.BatchNorm1d(C, momentum=momentum).double()
        for step in range(4):
            x = make_input((8, C, 5), torch.float64, "contiguous", device, seed=step) * 3 + 2
            ours(x)
            ref(x.cpu())
        for name in ("running_mean", "running_var"):
            assert_close(getattr(ours, name), getattr(ref, name), atol=1e-14, rtol=1e-13)
        ours.eval(), ref.eval()
        x = make_input((8, C, 5), torch.float64, "contiguous", device, seed=9)
        assert_close(ours(x), ref(x.cpu()), atol=1e-13, rtol=1e-13)


def test_float64_input_with_a_bfloat16_residual_and_an_activation(device):
    x = make_input((4, C, 5), torch.float64, "contiguous", device).requires_grad_()
    r = make_input((4, C, 5), torch.bfloat16, "contiguous", device, seed=2).requires_grad_()
    y = tritonbn.batch_norm(x, None, None, training=True, activation="silu", residual=r)
    g = make_input((4, C, 5), torch.float64, "contiguous", device, seed=3)
    y.backward(g)
    x64, r64 = x.detach().clone().requires_grad_(), r.detach().double().requires_grad_()
    F.silu(F.batch_norm(x64, None, None, training=True) + r64).backward(g)
    assert r.grad.dtype == torch.bfloat16 and torch.isfinite(r.grad).all()
    assert_close(r.grad, r64.grad, **tol(torch.bfloat16, 20))
    assert_close(x.grad, x64.grad, atol=1e-12, rtol=1e-12)


def test_per_activation_channels_last_updates_strided_statistics_in_place(device):
    """Per-activation mode, channels-last input, running statistics with no (C, H*W) view."""
    x = torch.randn(6, C, 2, 4, device=device).to(memory_format=torch.channels_last)
    storage_m, storage_v = torch.zeros(C, 4, 4, device=device), torch.ones(C, 4, 4, device=device)
    rm, rv = storage_m[:, ::2], storage_v[:, ::2]          # (C, 2, 4), strides (16, 8, 1)
    ref_m, ref_v = torch.zeros(C * 8, dtype=torch.float64), torch.ones(C * 8, dtype=torch.float64)
    tritonbn.batch_norm(x, rm, rv, training=True, mode="per_activation")
    F.batch_norm(x.cpu().double().reshape(6, C * 8), ref_m, ref_v, training=True)
    assert_close(rm.reshape(-1), ref_m, **tol(torch.float32, 6))
    assert_close(rv.reshape(-1), ref_v, **tol(torch.float32, 6))
    assert (storage_m[:, 1::2] == 0).all() and (storage_v[:, 1::2] == 1).all()  # untouched
