"""torch.compile(fullgraph=True) traces tritonbn.batch_norm (the custom ops) in training and eval,
forward and backward, with the aot_eager and inductor backends; the kernels still run."""
import pytest
import torch

import tritonbn
from tests.helpers import assert_close, make_input, reference, tol


def _step(x, w, b, rm, rv, training):
    y = tritonbn.batch_norm(x, rm, rv, w, b, training=training, momentum=0.2)
    return (y.float() * y.float()).mean()


@pytest.mark.parametrize("backend", ["aot_eager",
                                     pytest.param("inductor", marks=pytest.mark.slow)])
@pytest.mark.parametrize("training", [True, False])
def test_compile_fullgraph(backend, training, device):
    torch._dynamo.reset()
    x = make_input((4, 3, 5, 6), torch.float16, "channels_last", device, seed=91)
    c = 3
    w = torch.linspace(0.5, 1.5, c, device=device).requires_grad_()
    b = torch.linspace(-1, 1, c, device=device).requires_grad_()
    rm, rv = torch.full((c,), 0.1, device=device), torch.full((c,), 1.2, device=device)
    rm_e, rv_e = rm.clone(), rv.clone()

    compiled = torch.compile(_step, backend=backend, fullgraph=True)
    xc = x.detach().clone().requires_grad_()
    with tritonbn.count_launches() as launches:
        loss = compiled(xc, w, b, rm, rv, training)
        loss.backward()
    assert sum(launches.values()) >= 2, "the compiled graph must call the Triton kernels"
    wc_grad, bc_grad = w.grad.clone(), b.grad.clone()
    w.grad = b.grad = None

    xe = x.detach().clone().requires_grad_()
    loss_e = _step(xe, w, b, rm_e, rv_e, training)
    loss_e.backward()
    assert_close(loss, loss_e, atol=1e-6, rtol=1e-6)
    assert_close(xc.grad, xe.grad, atol=1e-5, rtol=2e-3)  # inductor may fuse the loss differently
    assert_close(wc_grad, w.grad, atol=1e-6, rtol=1e-6)
    assert_close(bc_grad, b.grad, atol=1e-6, rtol=1e-6)
    # running statistics are mutated through the compiled graph exactly as in eager
    assert torch.equal(rm, rm_e) and torch.equal(rv, rv_e)
    if training:
        _, rm_ref, rv_ref, _, _ = reference(x, torch.full((c,), 0.1), torch.full((c,), 1.2),
                                            None, None, True, momentum=0.2)
        assert_close(rm, rm_ref, **tol(torch.float32, 120))
        assert_close(rv, rv_ref, **tol(torch.float32, 120))


@pytest.mark.parametrize("training", [True, False])
def test_fake_kernels_agree_with_the_ops(training, device):
    # torch.compile checks real outputs' dtypes and shapes against the fake kernels' (a call
    # without batch renorm returned a float16 placeholder for (r, d) where the fake said
    # float32; inductor refused it): opcheck compares them for both ops
    from tritonbn.options import BackwardArgs, ForwardArgs, Options
    x = make_input((4, 3, 5, 6), torch.float16, "channels_last", device, seed=3)
    p = lambda v: torch.full((3,), v, device=device)  # noqa: E731
    o = Options(training=training, momentum=0.2, eps=1e-5).encode()
    args = (*ForwardArgs(x, p(1.0), p(0.0), None, p(0.1), p(1.2)), o)
    torch.library.opcheck(torch.ops.tritonbn.batch_norm_forward.default, args,
                          test_utils=("test_schema", "test_faketensor"))
    out = torch.ops.tritonbn.batch_norm_forward.default(*args)
    for param_grads in (True, False):
        bargs = (*BackwardArgs(torch.ones_like(x), x, p(1.0), p(0.0), None, *out[1:4]), o,
                 param_grads)
        torch.library.opcheck(torch.ops.tritonbn.batch_norm_backward.default, bargs,
                              test_utils=("test_schema", "test_faketensor"))
