"""No host synchronisation on the forward and backward of any layer -- what lets a training step
be captured in a CUDA graph -- checked on CPU by making every host read of a tensor's value
raise; and, on a GPU (marked cuda), a converted model's training step captured and replayed with
torch.cuda.graphs and with torch.compile(mode="reduce-overhead"), its running statistics
advancing once per replay."""
import contextlib

import pytest
import torch
from torch import nn

import tritonbn
from tritonbn import overflow as ovf


@contextlib.contextmanager
def no_host_reads():
    """Every way Python code reads a tensor's value onto the host raises inside the block."""
    def refuse(*args, **kwargs):
        raise AssertionError("a host read of a tensor value (a host sync on a GPU)")
    names = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__")
    saved = {n: getattr(torch.Tensor, n) for n in names}
    try:
        for n in names:
            setattr(torch.Tensor, n, refuse)
        yield
    finally:
        for n, f in saved.items():
            setattr(torch.Tensor, n, f)


LAYERS = {
    "BatchNorm2d": lambda: tritonbn.BatchNorm2d(4),
    "BatchNorm2d momentum=None": lambda: tritonbn.BatchNorm2d(4, momentum=None),
    "BatchNormAct2d": lambda: tritonbn.BatchNormAct2d(4, activation="silu"),
    "BatchRenorm2d warm-up": lambda: tritonbn.BatchRenorm2d(4, warmup_steps=2),
    "BatchNormPerActivation2d": lambda: tritonbn.BatchNormPerActivation2d(4, (3, 3)),
    "SyncBatchNorm": lambda: tritonbn.SyncBatchNorm(4),
    "guards, skip, momentum=None": lambda: ovf.set_policy(
        tritonbn.BatchNorm2d(4, momentum=None), overflow="saturate", nonfinite_stats="skip"),
}


@pytest.mark.parametrize("name", list(LAYERS))
def test_no_host_read_in_forward_or_backward(name, device):
    layer = LAYERS[name]().to(device)
    x = torch.randn(6, 4, 3, 3, device=device)
    for training in (True, False, True):
        layer.train(training)
        xi = x.clone().requires_grad_()
        with no_host_reads():
            y = layer(xi)
            y.backward(torch.ones_like(y))
        assert xi.grad is not None
    assert int(layer.num_batches_tracked) == 2


@pytest.mark.cuda
def test_cuda_graph_replays_a_training_step():
    torch.manual_seed(0)

    def make():
        torch.manual_seed(1)
        m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8, momentum=None))
        return tritonbn.convert_model(m).cuda()

    model, ref = make(), make()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    static_x = torch.randn(8, 3, 16, 16, device="cuda")

    def step(m, o, x):
        o.zero_grad(set_to_none=False)
        loss = m(x).square().mean()
        loss.backward()
        o.step()
        return loss

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):           # warm-up (compiles the kernels) off the capture
        for _ in range(2):
            step(model, opt, static_x)
            step(ref, ref_opt, static_x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = step(model, opt, static_x)
    # the capture itself ran no step: replay it on new batches, eager alongside
    for i in range(3):
        batch = torch.randn(8, 3, 16, 16, device="cuda") + i
        static_x.copy_(batch)
        graph.replay()
        ref_loss = step(ref, ref_opt, batch)
        torch.testing.assert_close(static_loss, ref_loss, atol=1e-5, rtol=1e-5)
    for (name, b), (_, b_ref) in zip(model.named_buffers(), ref.named_buffers()):
        torch.testing.assert_close(b, b_ref, atol=1e-5, rtol=1e-5, msg=name)
    assert int(model[1].num_batches_tracked) == 2 + 3       # once per warm-up step and replay


@pytest.mark.cuda
def test_reduce_overhead_compile_advances_statistics_once_per_call():
    torch._dynamo.reset()
    torch.manual_seed(2)
    model = tritonbn.convert_model(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8),
                                                 nn.ReLU(), nn.BatchNorm2d(8, momentum=None)))
    model = model.cuda()
    ref = tritonbn.convert_model(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8),
                                               nn.ReLU(), nn.BatchNorm2d(8, momentum=None)))
    ref.load_state_dict(model.state_dict())
    ref = ref.cuda()
    compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)
    for i in range(5):
        x = torch.randn(4, 3, 12, 12, device="cuda") + i
        y = compiled(x)
        y.sum().backward()
        y_ref = ref(x)
        y_ref.sum().backward()
        torch.testing.assert_close(y, y_ref, atol=1e-4, rtol=1e-4)
    for (name, b), (_, b_ref) in zip(model.named_buffers(), ref.named_buffers()):
        torch.testing.assert_close(b, b_ref, atol=1e-5, rtol=1e-5, msg=name)
    assert int(model[1].num_batches_tracked) == 5
