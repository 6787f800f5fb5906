"""Every kernel variant on small shapes that cross each tiling boundary, by forcing plans:
sizes not multiples of the block, several tiles and splits per channel, several channel blocks,
64-bit offsets, and both one-pass and split kernels on the same input."""
import math

import pytest
import torch

import tritonbn
from tritonbn.plan import forced_plan
from tests.helpers import assert_close, make_input, reduction_size, reference, tol

# (shape, layout, forced plan fields, kernels expected to run in forward+backward training)
SPLIT = ["bn_stats_partial_kernel", "bn_fwd_apply_kernel", "bn_bwd_partial_kernel",
         "bn_bwd_apply_kernel"]
ONEPASS = ["bn_fwd_onepass_kernel", "bn_bwd_onepass_kernel"]
CASES = [
    # NCHW, N=5 in blocks of 2 and S=63 in blocks of 16: 12 tiles per channel in 4 splits of 3
    ((5, 3, 7, 9), "contiguous", dict(variant="split", block_n=2, block_s=16, splits=4), SPLIT),
    # sliced batch keeps its own strides; 3 splits of uneven tile counts
    ((5, 3, 7, 9), "sliced", dict(variant="split", block_n=4, block_s=8, splits=3), SPLIT),
    # channels_last: 70 channels in blocks of 64 (second block partial), 75 folded rows in 16s
    ((5, 70, 3, 5), "channels_last", dict(variant="split", block_n=1, block_s=16, splits=2), SPLIT),
    # 2-D (N, C): channels-minor, rows folded, 3 splits
    ((37, 70), "contiguous", dict(variant="split", block_n=1, block_s=8, block_c=32, splits=3), SPLIT),
    # 5-D channels_last_3d with 8-channel blocks
    ((3, 10, 2, 3, 5), "channels_last", dict(variant="split", block_s=8, block_c=8, splits=5), SPLIT),
    # one-pass with a multi-channel block on channels_last and on NCHW
    ((4, 12, 3, 3), "channels_last", dict(variant="onepass", block_c=4), ONEPASS),
    ((4, 3, 5, 7), "contiguous", dict(variant="onepass"), ONEPASS),
    # 64-bit offsets on both variants
    ((5, 3, 7, 9), "contiguous", dict(variant="split", block_s=16, splits=2, use_int64=True), SPLIT),
    ((4, 12, 3, 3), "channels_last", dict(variant="onepass", use_int64=True), ONEPASS),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape,layout,plan,kernels", CASES,
                         ids=[f"{c[1]}-{'x'.join(map(str, c[0]))}-{c[2]['variant']}"
                              + ("-int64" if c[2].get("use_int64") else "") for c in CASES])
def test_forced_plan_training(shape, layout, plan, kernels, dtype, device):
    x = make_input(shape, dtype, layout, device, scale=3.0, shift=-1.0, seed=3)
    c, m = shape[1], reduction_size(x)
    w = torch.linspace(0.5, 1.5, c, device=device).requires_grad_()
    b = torch.linspace(-1, 1, c, device=device).requires_grad_()
    rm, rv = torch.zeros(c, device=device), torch.ones(c, device=device)
    y_ref, rm_ref, rv_ref, _, _ = reference(x, rm, rv, w.detach(), b.detach(), True, momentum=0.3)
    xg = x.detach().clone().requires_grad_()
    grad = make_input(shape, dtype, "contiguous", device, scale=1.0, shift=0.0, seed=4)
    with forced_plan(**plan), tritonbn.count_launches() as launches:
        y = tritonbn.batch_norm(xg, rm, rv, w, b, training=True, momentum=0.3)
        y.backward(grad)
    assert sorted(launches) == sorted(kernels)
    assert all(v == 1 for v in launches.values())

    x64 = x.detach().double().requires_grad_()
    w64, b64 = w.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    y64 = reference(x64, None, None, w64, b64, True)[0]
    y64.backward(grad.double())
    t = tol(dtype, m)
    assert_close(y, y_ref, **t)
    assert_close(rm, rm_ref, **tol(torch.float32, m))
    assert_close(rv, rv_ref, **tol(torch.float32, m))
    assert_close(xg.grad, x64.grad, **t)
    sum_tol = dict(atol=tol(torch.float32, m)["atol"] * math.sqrt(m), rtol=tol(torch.float32, m)["rtol"])
    assert_close(w.grad, w64.grad, **sum_tol)
    assert_close(b.grad, b64.grad, **sum_tol)


@pytest.mark.parametrize("param_grads", [True, False])
def test_forced_split_eval_backward(param_grads, device):
    shape = (5, 3, 7, 9)
    x = make_input(shape, torch.float16, "contiguous", device, seed=5)
    m = reduction_size(x)
    rm = torch.tensor([0.1, -0.2, 0.3], device=device)
    rv = torch.tensor([2.0, 3.0, 4.0], device=device)
    w = torch.tensor([1.5, 0.5, -1.0], device=device).requires_grad_(param_grads)
    b = torch.tensor([0.1, 0.2, 0.3], device=device).requires_grad_(param_grads)
    xg = x.detach().clone().requires_grad_()
    with forced_plan(variant="split", block_n=2, block_s=16, splits=3), \
            tritonbn.count_launches() as launches:
        y = tritonbn.batch_norm(xg, rm, rv, w, b, training=False)
        y.backward(torch.ones_like(y))
    # eval forward and dx are one element-wise pass each; the sums run only for dw/db
    expected = {"bn_fwd_apply_kernel": 1, "bn_bwd_apply_kernel": 1}
    if param_grads:
        expected["bn_bwd_partial_kernel"] = 1
    assert dict(launches) == expected
    x64 = x.detach().double().requires_grad_()
    w64, b64 = w.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    reference(x64, rm, rv, w64, b64, False)[0].sum().backward()
    assert_close(y, reference(x, rm, rv, w.detach(), b.detach(), False)[0], **tol(torch.float16, m))
    assert_close(xg.grad, x64.grad, **tol(torch.float16, m))
    if param_grads:
        assert_close(w.grad, w64.grad, atol=1e-4 * math.sqrt(m), rtol=1e-5)
        assert_close(b.grad, b64.grad, atol=1e-4 * math.sqrt(m), rtol=1e-5)
    else:
        assert w.grad is None and b.grad is None


def test_forced_onepass_must_cover_plane(device):
    x = torch.randn(4, 3, 5, 7, device=device)
    with forced_plan(variant="onepass", block_s=8):
        with pytest.raises(ValueError, match="does not cover"):
            tritonbn.batch_norm(x, None, None, training=True)
