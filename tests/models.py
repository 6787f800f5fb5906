"""Small models for the module, transform and compile tests: a tiny ResNet (training loops and
compiled steps) and the nets that spell every fusable activation and add after a batch norm, with
comparisons of two training runs.

Activations stay tiny (batch 4, 8-16 channels, 8x8) because the kernels run in the Triton
interpreter on CPU.
"""
from __future__ import annotations

import contextlib
import operator

import torch
import torch.nn.functional as F
from torch import nn

import tritonbn


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


def check_compiled_steps(model, device, steps=2, backend="inductor"):
    """torch.compile(model, fullgraph=True) trains ``steps`` SGD steps like torch's eager model
    (one forward and one backward kernel per batch norm per step; losses, first-step gradients,
    running statistics and batch counts), then runs one eval step that calls only the eval
    kernel and changes no buffer. Returns (compiled, eval output, eval input, torch's model)."""

    fp32 = dict(atol=1e-5, rtol=1e-5)
    xs, ts = make_batches(device, steps)
    ref_model = make_model(device)
    ref = train(ref_model, xs, ts)
    n_bn = len(bn_modules(model))
    compiled = torch.compile(model, fullgraph=True, backend=backend)
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


# name -> (nn.Module factory, functional spelling, in-place spelling); the names are tritonbn's.
ACTIVATIONS = {
    "relu": (nn.ReLU, F.relu, lambda z: z.relu_()),
    "relu6": (nn.ReLU6, F.relu6, lambda z: F.relu6(z, inplace=True)),
    "leaky_relu": (lambda: nn.LeakyReLU(0.2), lambda z: F.leaky_relu(z, 0.2),
                   lambda z: F.leaky_relu_(z, 0.2)),
    "silu": (nn.SiLU, F.silu, lambda z: F.silu(z, inplace=True)),
    "gelu": (nn.GELU, F.gelu, lambda z: F.gelu(z, approximate="none")),
    "gelu_tanh": (lambda: nn.GELU(approximate="tanh"), lambda z: F.gelu(z, approximate="tanh"),
                  lambda z: F.gelu(z, approximate="tanh")),
    "hardswish": (nn.Hardswish, F.hardswish, lambda z: F.hardswish(z, inplace=True)),
    "sigmoid": (nn.Sigmoid, torch.sigmoid, lambda z: z.sigmoid_()),
    "tanh": (nn.Tanh, torch.tanh, lambda z: z.tanh_()),
}
SLOPE = {"leaky_relu": 0.2}

# Every way of writing each activation after a batch norm: (id, tritonbn name, slope, factory of
# an nn.Module or a function of the tensor).
ACT_SPELLINGS = [
    ("nn.ReLU", "relu", 0.01, nn.ReLU),
    ("nn.ReLU-inplace", "relu", 0.01, lambda: nn.ReLU(inplace=True)),
    ("F.relu", "relu", 0.01, lambda: F.relu),
    ("F.relu-inplace", "relu", 0.01, lambda: lambda z: F.relu(z, inplace=True)),
    ("F.relu_", "relu", 0.01, lambda: F.relu_),
    ("torch.relu", "relu", 0.01, lambda: torch.relu),
    ("torch.relu_", "relu", 0.01, lambda: torch.relu_),
    ("tensor.relu", "relu", 0.01, lambda: lambda z: z.relu()),
    ("tensor.relu_", "relu", 0.01, lambda: lambda z: z.relu_()),
    ("nn.ReLU6", "relu6", 0.01, nn.ReLU6),
    ("nn.ReLU6-inplace", "relu6", 0.01, lambda: nn.ReLU6(inplace=True)),
    ("F.relu6", "relu6", 0.01, lambda: F.relu6),
    ("F.relu6-inplace", "relu6", 0.01, lambda: lambda z: F.relu6(z, inplace=True)),
    ("nn.LeakyReLU", "leaky_relu", 0.01, nn.LeakyReLU),
    ("nn.LeakyReLU-0.2-inplace", "leaky_relu", 0.2, lambda: nn.LeakyReLU(0.2, inplace=True)),
    ("F.leaky_relu", "leaky_relu", 0.01, lambda: F.leaky_relu),
    ("F.leaky_relu-0.3", "leaky_relu", 0.3, lambda: lambda z: F.leaky_relu(z, 0.3)),
    ("F.leaky_relu-kw-inplace", "leaky_relu", 0.25,
     lambda: lambda z: F.leaky_relu(z, negative_slope=0.25, inplace=True)),
    ("F.leaky_relu_", "leaky_relu", 0.15, lambda: lambda z: F.leaky_relu_(z, 0.15)),
    ("nn.SiLU", "silu", 0.01, nn.SiLU),
    ("nn.SiLU-inplace", "silu", 0.01, lambda: nn.SiLU(inplace=True)),
    ("F.silu", "silu", 0.01, lambda: F.silu),
    ("F.silu-inplace", "silu", 0.01, lambda: lambda z: F.silu(z, inplace=True)),
    ("nn.GELU", "gelu", 0.01, nn.GELU),
    ("nn.GELU-tanh", "gelu_tanh", 0.01, lambda: nn.GELU(approximate="tanh")),
    ("F.gelu", "gelu", 0.01, lambda: F.gelu),
    ("F.gelu-tanh", "gelu_tanh", 0.01, lambda: lambda z: F.gelu(z, approximate="tanh")),
    ("nn.Hardswish", "hardswish", 0.01, nn.Hardswish),
    ("nn.Hardswish-inplace", "hardswish", 0.01, lambda: nn.Hardswish(inplace=True)),
    ("F.hardswish", "hardswish", 0.01, lambda: F.hardswish),
    ("F.hardswish-inplace", "hardswish", 0.01, lambda: lambda z: F.hardswish(z, inplace=True)),
    ("nn.Sigmoid", "sigmoid", 0.01, nn.Sigmoid),
    ("torch.sigmoid", "sigmoid", 0.01, lambda: torch.sigmoid),
    ("tensor.sigmoid_", "sigmoid", 0.01, lambda: lambda z: z.sigmoid_()),
    ("nn.Tanh", "tanh", 0.01, nn.Tanh),
    ("torch.tanh", "tanh", 0.01, lambda: torch.tanh),
    ("tensor.tanh", "tanh", 0.01, lambda: lambda z: z.tanh()),
]


def _iadd(y, r):
    y += r  # fx records this (and operator.iadd) as operator.add: its Proxy has no __iadd__
    return y


# Every way of writing the residual add, with the batch norm's output y first or second.
ADD_SPELLINGS = [
    ("y+r", lambda y, r: y + r),
    ("r+y", lambda y, r: r + y),
    ("y+=r", _iadd),
    ("operator.add(r,y)", lambda y, r: operator.add(r, y)),
    ("operator.iadd(y,r)", lambda y, r: operator.iadd(y, r)),
    ("torch.add(y,r)", lambda y, r: torch.add(y, r)),
    ("torch.add(r,y,alpha=1)", lambda y, r: torch.add(r, y, alpha=1)),
    ("y.add(r)", lambda y, r: y.add(r)),
    ("r.add(y)", lambda y, r: r.add(y)),
    ("y.add_(r)", lambda y, r: y.add_(r)),
]

BN_CLASSES = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
SHAPES = {1: (4, 8, 6), 2: (4, 8, 8, 8), 3: (4, 8, 3, 4, 4)}


class Chain(nn.Module):
    """bn -> [add residual] -> [activation]: one pattern, spelled as given."""

    def __init__(self, act=None, add=None, dims: int = 2, channels: int = 8):
        super().__init__()
        self.bn = BN_CLASSES[dims](channels)
        self.act = act      # an nn.Module (registered) or a function (a plain attribute)
        self.add = add

    def forward(self, x, r):
        y = self.bn(x)
        if self.add is not None:
            y = self.add(y, r)
        return y if self.act is None else self.act(y)


class ActNet(nn.Module):
    """A small ResNet-style net with one activation written three ways: an nn.Module in the stem
    and the head, the functional form inside the block, the in-place form after the residual add
    (which has the batch norm as its second operand)."""

    def __init__(self, act: str):
        super().__init__()
        module, self.functional, self.inplace = ACTIVATIONS[act]
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1), nn.BatchNorm2d(8), module())
        self.conv1 = nn.Conv2d(8, 8, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.fc1 = nn.Linear(8, 16)
        self.bn_fc = nn.BatchNorm1d(16)
        self.act_fc = module()
        self.fc2 = nn.Linear(16, 10)

    def forward(self, x):
        x = self.stem(x)
        y = self.functional(self.bn1(self.conv1(x)))
        y = self.inplace(torch.add(x, self.bn2(self.conv2(y))))
        y = torch.flatten(F.adaptive_avg_pool2d(y, 1), 1)
        return self.fc2(self.act_fc(self.bn_fc(self.fc1(y))))


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial gamma and beta, so that a bug ignoring either shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None:
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.rand(m.bias.shape, generator=g) - 0.5)
    return model


def grad_error(grads, grads_ref, floor: float) -> float:
    """max over parameters of |g - g_ref| / max(|g_ref|, floor) (2-norms); floored because a
    bias right before a batch norm has a true gradient of zero, i.e. rounding noise."""
    worst = 0.0
    for name, g_ref in grads_ref.items():
        diff = (grads[name].double() - g_ref.double()).norm().item()
        worst = max(worst, diff / max(g_ref.double().norm().item(), floor))
    return worst


def global_grad_error(grads, grads_ref) -> float:
    num = sum((grads[n].double() - g.double()).norm().item() ** 2 for n, g in grads_ref.items())
    den = sum(g.double().norm().item() ** 2 for g in grads_ref.values())
    return (num / den) ** 0.5


def assert_same_buffers(buffers, buffers_ref, **tolerance) -> None:
    assert buffers.keys() == buffers_ref.keys()
    for name, b in buffers.items():
        if name.endswith("num_batches_tracked"):
            assert torch.equal(b, buffers_ref[name]), name
        else:
            torch.testing.assert_close(b, buffers_ref[name], **tolerance, msg=name)


def assert_trains_like(ours: dict, ref: dict, steps: int, step0_tol: float = 1e-4) -> None:
    """Two float32 runs of tiny_resnet.train: same losses, gradients and running statistics.

    Step 0 starts from the same weights: every gradient to float32 rounding, ``step0_tol``
    relative (a linear layer before a 4-sample batch norm has an ill-conditioned gradient:
    both runs can be ~1e-4 from float64). Later steps start from weights that differ by
    rounding, where a ReLU input near zero can flip (see tests/test_convert.py), so they get a
    global bound."""
    fp32 = dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours["losses"], ref["losses"], **fp32)
    assert ours["grads"][0].keys() == ref["grads"][0].keys()
    assert grad_error(ours["grads"][0], ref["grads"][0], floor=0.1) < step0_tol
    for step in range(steps):
        assert global_grad_error(ours["grads"][step], ref["grads"][step]) < 1e-2, step
        assert_same_buffers(ours["buffers"][step], ref["buffers"][step], **fp32)
