"""GPU-only checks (skipped without CUDA): real compiled kernels on shapes big enough to take the
split path with the default plans, including channels_last half precision."""
import math

import pytest
import torch

import tritonbn
from tests.helpers import assert_close, make_input, reduction_size, reference, tol

pytestmark = pytest.mark.cuda


@pytest.mark.parametrize("shape,layout", [((32, 64, 56, 56), "contiguous"),
                                          ((32, 64, 56, 56), "channels_last"),
                                          ((4096, 1024), "contiguous"),
                                          ((8, 32, 16, 28, 28), "channels_last")])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_gpu_training_step_matches_reference(shape, layout, dtype):
    x = make_input(shape, dtype, layout, "cuda", seed=101).requires_grad_()
    c, m = shape[1], reduction_size(x)
    w = torch.linspace(0.5, 1.5, c, device="cuda").requires_grad_()
    b = torch.linspace(-1, 1, c, device="cuda").requires_grad_()
    rm, rv = torch.zeros(c, device="cuda"), torch.ones(c, device="cuda")
    y_ref, rm_ref, rv_ref, _, _ = reference(x.detach(), rm, rv, w.detach(), b.detach(), True)
    grad = make_input(shape, dtype, "contiguous", "cuda", scale=1.0, shift=0.0, seed=102)
    with tritonbn.count_launches() as launches:
        y = tritonbn.batch_norm(x, rm, rv, w, b, training=True)
        y.backward(grad)
    assert sum(launches.values()) >= 2
    assert y.stride() == torch.nn.functional.batch_norm(x.detach(), None, None, training=True).stride()
    x64 = x.detach().double().requires_grad_()
    w64, b64 = w.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    reference(x64, None, None, w64, b64, True)[0].backward(grad.double())
    assert_close(y, y_ref, **tol(dtype, m))
    assert_close(rm, rm_ref, **tol(torch.float32, m))
    assert_close(rv, rv_ref, **tol(torch.float32, m))
    assert_close(x.grad, x64.grad, **tol(dtype, m))
    sum_tol = dict(atol=tol(torch.float32, m)["atol"] * math.sqrt(m), rtol=1e-4)
    assert_close(w.grad, w64.grad, **sum_tol)
    assert_close(b.grad, b64.grad, **sum_tol)
