"""A tiny ResNet-style model for module-level tests, and a few-step SGD training loop.

Conv -> BN -> ReLU stem, two residual blocks (one with a strided 1x1 conv + BN shortcut),
global average pooling, Linear -> BatchNorm1d -> ReLU -> Linear head. Activations stay tiny
(batch 4, 8-16 channels, 8x8 images: about 2k elements per batch norm) because the kernels run
in the Triton interpreter on CPU.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

BATCH, IN_CH, SIZE, CLASSES = 4, 3, 8, 10


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                          nn.BatchNorm2d(cout))

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + self.shortcut(x))


class TinyResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(IN_CH, 8, 3, 1, 1), nn.BatchNorm2d(8), nn.ReLU())
        self.layer1 = Block(8, 8, 1)
        self.layer2 = Block(8, 16, 2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Linear(16, 16)
        self.bn_fc = nn.BatchNorm1d(16)
        self.fc2 = nn.Linear(16, CLASSES)

    def forward(self, x):
        x = self.layer2(self.layer1(self.stem(x)))
        x = torch.flatten(self.pool(x), 1)
        return self.fc2(F.relu(self.bn_fc(self.fc1(x))))


def make_model(device, seed: int = 0) -> TinyResNet:
    torch.manual_seed(seed)
    model = TinyResNet().to(device)
    # Non-trivial affine parameters, so a bug that ignores gamma or beta shows.
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return model


def make_batches(device, steps: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    xs = [(torch.randn(BATCH, IN_CH, SIZE, SIZE, generator=g) * 2 + 0.5).to(device)
          for _ in range(steps)]
    ts = [torch.randint(0, CLASSES, (BATCH,), generator=g).to(device) for _ in range(steps)]
    return xs, ts


def bn_modules(model: nn.Module) -> list:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def train(model: nn.Module, xs, ts, amp_dtype=None, step_fn=None) -> dict:
    """SGD steps over the batches; records every step's loss and gradients (before the update),
    the buffers after every step, and the parameters at the end.

    ``amp_dtype`` runs the forward under torch.autocast with that dtype (conv and linear in half
    precision, batch norm on half activations with float32 parameters and statistics).
    ``step_fn`` (default: the model) computes the logits, e.g. a torch.compile'd model.
    """
    step_fn = model if step_fn is None else step_fn
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    device_type = xs[0].device.type
    losses, grads, buffers = [], [], []
    model.train()
    for x, t in zip(xs, ts):
        opt.zero_grad()
        autocast = (torch.autocast(device_type, dtype=amp_dtype) if amp_dtype is not None
                    else contextlib.nullcontext())
        with autocast:
            logits = step_fn(x)
        loss = F.cross_entropy(logits.float(), t)
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters()})
        opt.step()
        buffers.append({n: b.detach().clone() for n, b in model.named_buffers()})
    return dict(losses=torch.stack(losses), grads=grads, buffers=buffers,
                params={n: p.detach().clone() for n, p in model.named_parameters()})


def check_compiled_steps(model, device, steps=2):
    """torch.compile(model, fullgraph=True) trains ``steps`` SGD steps like torch's eager model
    (one forward and one backward kernel per batch norm per step; losses, first-step gradients,
    running statistics and batch counts), then runs one eval step that calls only the eval
    kernel and changes no buffer. Returns (compiled, eval output, eval input, torch's model)."""
    import tritonbn

    fp32 = dict(atol=1e-5, rtol=1e-5)
    xs, ts = make_batches(device, steps)
    ref_model = make_model(device)
    ref = train(ref_model, xs, ts)
    n_bn = len(bn_modules(model))
    compiled = torch.compile(model, fullgraph=True)  # the default backend, inductor
    with tritonbn.count_launches() as launches:
        ours = train(model, xs, ts, step_fn=compiled)
    # the compiled forward and backward graphs call the kernels for every batch norm, every step
    fwd = launches["bn_fwd_onepass_kernel"] + launches["bn_fwd_apply_kernel"]
    bwd = launches["bn_bwd_onepass_kernel"] + launches["bn_bwd_apply_kernel"]
    assert fwd == bwd == n_bn * steps, launches
    torch.testing.assert_close(ours["losses"], ref["losses"], **fp32)
    for name, g in ours["grads"][0].items():
        torch.testing.assert_close(g, ref["grads"][0][name], atol=1e-5, rtol=1e-4, msg=name)
    for step in range(steps):
        # running statistics and num_batches_tracked are mutated through the compiled graph
        for name, b in ours["buffers"][step].items():
            if name.endswith("num_batches_tracked"):
                assert int(b) == step + 1, name
            torch.testing.assert_close(b, ref["buffers"][step][name], **fp32, msg=name)

    model.eval(), ref_model.eval()  # recompiles for eval mode: running statistics, no update
    before = {n: b.clone() for n, b in model.named_buffers()}
    with torch.no_grad(), tritonbn.count_launches() as launches:
        y = compiled(xs[0])
    assert launches["bn_fwd_apply_kernel"] == n_bn and sum(launches.values()) == n_bn
    with torch.no_grad():
        torch.testing.assert_close(y, model(xs[0]), **fp32)  # eager, same weights
    for name, b in model.named_buffers():
        assert torch.equal(b, before[name]), name
    return compiled, y, xs[0], ref_model
