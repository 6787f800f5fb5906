"""torch.compile(fullgraph=True) of a model fused by tritonbn.fuse: SGD training steps and an eval
step trace without graph breaks, run the fused kernels, and match eager torch."""
import importlib

import pytest
import torch

import tritonbn
from tiny_resnet import bn_modules, make_batches, make_model, train

STEPS = 2
FP32 = dict(atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_compiled_fused_resnet_train_and_eval_steps(device, monkeypatch):
    torch._dynamo.reset()
    # the unfused fallback (for residuals that broadcast) must not be traced: it would raise
    fuse_module = importlib.import_module("tritonbn.fusion")

    def no_fallback(*args):
        raise AssertionError("the fused module fell back to torch's add and activation")
    monkeypatch.setattr(fuse_module, "activation_reference", no_fallback)
    xs, ts = make_batches(device, STEPS)
    ref_model = make_model(device)
    ref = train(ref_model, xs, ts)
    fused = tritonbn.fuse(make_model(device))
    n_bn = len(bn_modules(fused))
    compiled = torch.compile(fused, fullgraph=True)  # the default backend, inductor

    with tritonbn.count_launches() as launches:
        ours = train(fused, xs, ts, step_fn=compiled)
    fwd = launches["bn_fwd_onepass_kernel"] + launches["bn_fwd_apply_kernel"]
    bwd = launches["bn_bwd_onepass_kernel"] + launches["bn_bwd_apply_kernel"]
    assert fwd == bwd == n_bn * STEPS, launches
    torch.testing.assert_close(ours["losses"], ref["losses"], **FP32)
    for name, g in ours["grads"][0].items():
        torch.testing.assert_close(g, ref["grads"][0][name], atol=1e-5, rtol=1e-4, msg=name)
    for step in range(STEPS):  # running statistics mutated through the compiled graph
        for name, b in ours["buffers"][step].items():
            torch.testing.assert_close(b, ref["buffers"][step][name], **FP32, msg=name)

    fused.eval(), ref_model.eval()  # recompiles for eval mode
    before = {n: b.clone() for n, b in fused.named_buffers()}
    with torch.no_grad(), tritonbn.count_launches() as launches:
        y = compiled(xs[0])
    assert launches["bn_fwd_apply_kernel"] == n_bn and sum(launches.values()) == n_bn
    with torch.no_grad():
        torch.testing.assert_close(y, fused(xs[0]), **FP32)      # eager, same weights
        torch.testing.assert_close(y, ref_model(xs[0]), atol=1e-4, rtol=1e-4)  # torch's model
    for name, b in fused.named_buffers():
        assert torch.equal(b, before[name]), name
