"""torch.compile(fullgraph=True) of a model fused by tritonbn.fuse: SGD training steps and an eval
step trace without graph breaks, run the fused kernels, and match eager torch."""
import importlib

import pytest
import torch

import tritonbn
from tests.models import check_compiled_steps, make_model


@pytest.mark.parametrize("backend", ["aot_eager",
                                     pytest.param("inductor", marks=pytest.mark.slow)])
def test_compiled_fused_resnet_train_and_eval_steps(backend, device, monkeypatch):
    torch._dynamo.reset()
    # the unfused fallback (for residuals that broadcast) must not be traced: it would raise
    fuse_module = importlib.import_module("tritonbn.transforms.fuse")

    def no_fallback(*args):
        raise AssertionError("the fused module fell back to torch's add and activation")
    monkeypatch.setattr(fuse_module.activations, "apply", no_fallback)
    fused = tritonbn.fuse(make_model(device))
    _, y, x, ref_model = check_compiled_steps(fused, device, backend=backend)
    with torch.no_grad():
        torch.testing.assert_close(y, ref_model(x), atol=1e-4, rtol=1e-4)  # torch's model
