"""torch.compile(fullgraph=True) of a converted ResNet-style model: SGD training steps and an eval
step trace without graph breaks, run the Triton kernels, and match eager torch."""
import pytest
import torch

import tritonbn
from tests.models import check_compiled_steps, make_model


@pytest.mark.parametrize("backend", ["aot_eager",
                                     pytest.param("inductor", marks=pytest.mark.slow)])
def test_compiled_converted_resnet_train_and_eval_steps(backend, device):
    torch._dynamo.reset()
    model = tritonbn.convert_model(make_model(device))
    _, y, x, _ = check_compiled_steps(model, device, backend=backend)
    with torch.no_grad():
        restored = tritonbn.restore_model(model)
        torch.testing.assert_close(y, restored(x), atol=1e-5, rtol=1e-5)  # torch's batch norm


def _steps(module, xs, compiled: bool, backend: str):
    fn = torch.compile(module, fullgraph=True, backend=backend) if compiled else module
    outs = []
    for x in xs:
        x = x.detach().clone().requires_grad_()
        y = fn(x)
        y.square().sum().backward()
        outs.append((y.detach(), x.grad))
    return outs


@pytest.mark.parametrize("backend", ["aot_eager",
                                     pytest.param("inductor", marks=pytest.mark.slow)])
@pytest.mark.parametrize("make", [
    lambda: tritonbn.BatchNorm2d(3, momentum=None),
    lambda: tritonbn.BatchRenorm2d(3, warmup_steps=2, rmax=1.5, dmax=0.5),
], ids=["momentum=None", "renorm-warmup"])
def test_counter_driven_modules_compile_with_fullgraph(make, backend, device):
    """momentum=None (cumulative average) and batch renorm's warm-up read the batch counter on
    the device, so fullgraph traces them -- and the compiled steps match eager bit for bit."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    xs = [torch.randn(4, 3, 5, 5, device=device) * (1 + i) + i for i in range(4)]
    eager, compiled = make().to(device), make().to(device)
    ref = _steps(eager, xs, False, backend)
    with tritonbn.count_launches() as launches:
        got = _steps(compiled, xs, True, backend)
    assert launches, "the compiled graph must call the Triton kernels"
    for (y, dx), (y_e, dx_e) in zip(got, ref):
        assert torch.equal(y, y_e)
        torch.testing.assert_close(dx, dx_e, atol=1e-5, rtol=1e-5)   # the loss may fuse differently
    for name, b in eager.named_buffers():
        assert torch.equal(dict(compiled.named_buffers())[name], b), name
    assert int(compiled.num_batches_tracked) == len(xs)
