"""tritonbn.batch_norm against the float64 reference: forward, running statistics and backward,
over shapes x dtypes x layouts x train/eval x affine x running stats x parameter dtype."""
import math

import pytest
import torch

import tritonbn
from tests.helpers import assert_close, make_input, reduction_size, reference, tol

SHAPES = {
    "2d": (5, 3),
    "3d": (4, 3, 7),
    "4d": (3, 4, 5, 6),
    "5d": (2, 3, 3, 4, 5),
    "n1": (1, 2, 9, 9),        # one sample, spatial size > 1
    "c1": (6, 1, 5, 5),        # one channel
    "s1": (7, 3, 1, 1),        # spatial size 1
}


def _layouts(shape):
    yield "contiguous"
    if len(shape) in (4, 5):
        yield "channels_last"
    yield "sliced"
    yield "transposed"


def _cases():
    for name, shape in SHAPES.items():
        for layout in _layouts(shape):
            for dtype in (torch.float32, torch.float16, torch.bfloat16):
                param_dtypes = (torch.float32,) if dtype == torch.float32 else (torch.float32, dtype)
                for pdtype in param_dtypes:
                    for training in (True, False):
                        for affine in (True, False):
                            for running in ((True, False) if training else (True,)):
                                yield pytest.param(
                                    shape, layout, dtype, pdtype, training, affine, running,
                                    id=f"{name}-{layout}-{str(dtype)[6:]}-p{str(pdtype)[6:]}-"
                                       f"{'train' if training else 'eval'}-"
                                       f"{'affine' if affine else 'noaffine'}-"
                                       f"{'running' if running else 'norunning'}")


def _params(c, pdtype, affine, running, device, seed=1):
    g = torch.Generator().manual_seed(seed)
    w = (torch.rand(c, generator=g) + 0.5).to(device, pdtype) if affine else None
    b = torch.randn(c, generator=g).to(device, pdtype) if affine else None
    rm = torch.randn(c, generator=g).to(device, pdtype) if running else None
    rv = (torch.rand(c, generator=g) + 0.5).to(device, pdtype) if running else None
    return w, b, rm, rv


@pytest.mark.parametrize("shape,layout,dtype,pdtype,training,affine,running", list(_cases()))
def test_forward_backward_matches_float64_reference(shape, layout, dtype, pdtype, training, affine,
                                                    running, device):
    x = make_input(shape, dtype, layout, device)
    c = shape[1]
    w, b, rm, rv = _params(c, pdtype, affine, running, device)
    m = reduction_size(x)

    y_ref, rm_ref, rv_ref, _, _ = reference(x, rm, rv, w, b, training)
    xg = x.detach().clone().requires_grad_()
    wg = w.detach().clone().requires_grad_() if affine else None
    bg = b.detach().clone().requires_grad_() if affine else None
    with tritonbn.count_launches() as launches:
        y = tritonbn.batch_norm(xg, rm, rv, wg, bg, training=training, momentum=0.1, eps=1e-5)
    assert sum(launches.values()) >= 1, "no Triton kernel ran"

    # dtype and memory format as torch gives them
    expected_y = torch.nn.functional.batch_norm(x.detach().float(), None, None, training=True)
    assert y.dtype == dtype
    assert y.shape == x.shape
    assert y.stride() == expected_y.stride()
    assert_close(y, y_ref, **tol(dtype, m))
    if running:
        assert rm.dtype == pdtype and rv.dtype == pdtype
        assert_close(rm, rm_ref, **tol(pdtype, m))
        assert_close(rv, rv_ref, **tol(pdtype, m))

    # backward against autograd through the float64 reference
    g = torch.Generator().manual_seed(7)
    grad = torch.randn(shape, generator=g).to(device, dtype)
    x64 = x.detach().double().requires_grad_()
    w64 = w.detach().double().requires_grad_() if affine else None
    b64 = b.detach().double().requires_grad_() if affine else None
    rm_b = None if rm is None else rm.detach().clone()
    rv_b = None if rv is None else rv.detach().clone()
    y64, _, _, _, _ = reference(x64, rm_b, rv_b, w64, b64, training)
    y64.backward(grad.double())
    with tritonbn.count_launches() as launches:
        y.backward(grad)
    assert sum(launches.values()) >= 1, "backward ran no Triton kernel"
    assert xg.grad.dtype == dtype and xg.grad.shape == x.shape
    assert_close(xg.grad, x64.grad, **tol(dtype, m))
    if affine:
        t = tol(pdtype, m)
        sum_tol = dict(atol=t["atol"] * math.sqrt(m), rtol=t["rtol"])
        assert wg.grad.dtype == pdtype and bg.grad.dtype == pdtype
        assert_close(wg.grad, w64.grad, **sum_tol)
        assert_close(bg.grad, b64.grad, **sum_tol)
