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
