"""torch.compile(fullgraph=True) of a converted ResNet-style model: SGD training steps and an eval
step trace without graph breaks, run the Triton kernels, and match eager torch."""
import pytest
import torch

import tritonbn
from tiny_resnet import bn_modules, make_batches, make_model, train

STEPS = 2
FP32 = dict(atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_compiled_converted_resnet_train_and_eval_steps(device):
    torch._dynamo.reset()
    xs, ts = make_batches(device, STEPS)
    ref = train(make_model(device), xs, ts)
    model = tritonbn.convert_model(make_model(device))
    n_bn = len(bn_modules(model))
    compiled = torch.compile(model, fullgraph=True)  # the default backend, inductor

    with tritonbn.count_launches() as launches:
        ours = train(model, xs, ts, step_fn=compiled)
    # the compiled forward and backward graphs call the kernels for every batch norm, every step
    fwd = launches["bn_fwd_onepass_kernel"] + launches["bn_fwd_apply_kernel"]
    bwd = launches["bn_bwd_onepass_kernel"] + launches["bn_bwd_apply_kernel"]
    assert fwd == bwd == n_bn * STEPS, launches
    torch.testing.assert_close(ours["losses"], ref["losses"], **FP32)
    for name, g in ours["grads"][0].items():
        torch.testing.assert_close(g, ref["grads"][0][name], atol=1e-5, rtol=1e-4, msg=name)
    for step in range(STEPS):
        # running statistics and num_batches_tracked are mutated through the compiled graph
        for name, b in ours["buffers"][step].items():
            if name.endswith("num_batches_tracked"):
                assert int(b) == step + 1, name
            torch.testing.assert_close(b, ref["buffers"][step][name], **FP32, msg=name)

    model.eval()  # recompiles for eval mode: running statistics, no update
    before = {n: b.clone() for n, b in model.named_buffers()}
    with torch.no_grad(), tritonbn.count_launches() as launches:
        y = compiled(xs[0])
    assert launches["bn_fwd_apply_kernel"] == n_bn and sum(launches.values()) == n_bn
    with torch.no_grad():
        torch.testing.assert_close(y, model(xs[0]), **FP32)  # eager, same weights
        restored = tritonbn.restore_model(model)
        torch.testing.assert_close(y, restored(xs[0]), **FP32)  # torch's batch norm
    for name, b in model.named_buffers():
        assert torch.equal(b, before[name]), name
