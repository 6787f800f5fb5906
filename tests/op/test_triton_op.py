"""torch.compile with ``TRITONBN_COMPILED=triton_op``: the op reaches the compiler as
``torch.library.triton_op`` ops whose bodies -- the launchers -- it traces, so a compiled
training step's graphs hold tritonbn's kernels as user-defined Triton kernels (which Inductor
launches itself), not an opaque Python op. Checked here with a recording backend: the graphs'
nodes, and the graphs run with each kernel in Triton's interpreter against the eager op.

Without a GPU, Triton has no target to compile the kernels' TTIR for, which torch's analysis of
what a kernel writes needs: the tests answer Triton's ``get_current_target`` with an sm_90
target (nothing is compiled to a binary or launched on a device); bench/compiled_graph.py."""
import pytest
import torch

import tritonbn
from bench.compiled_graph import kernels as _kernels, ops as _ops, recording_backend, target_only
from tritonbn import _runtime
from tritonbn import plan as planner

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture
def form(monkeypatch):
    """Choose the compiled form for one test (the environment variable is read at import),
    with a Triton target for torch's analysis of the kernels."""
    def choose(name: str):
        monkeypatch.setattr(_runtime, "_COMPILED_FORM", name)
        torch._dynamo.reset()
    with target_only():
        yield choose
    torch._dynamo.reset()


def _recording_backend(graphs: dict):
    return recording_backend(graphs, interpreted_kernels=True)


def _step(module, x, r):
    return (module(x, r).float() ** 2).sum()


def _setup(dtype=torch.float32):
    torch.manual_seed(0)
    m = tritonbn.BatchNormAct2d(6, activation="leaky_relu")
    with torch.no_grad():
        m.weight.uniform_(0.5, 1.5)
        m.bias.uniform_(-0.5, 0.5)
    x = torch.randn(4, 6, 5, 3).to(dtype).requires_grad_()
    r = torch.randn(4, 6, 5, 3).to(dtype).requires_grad_()
    return m, x, r


@pytest.mark.parametrize("variant, forward, backward", [
    ("onepass", ["bn_fwd_onepass_kernel"], ["bn_bwd_onepass_kernel"]),
    ("split", ["bn_stats_partial_kernel", "bn_fwd_apply_kernel"],
     ["bn_bwd_partial_kernel", "bn_bwd_apply_kernel"]),
])
def test_a_compiled_training_step_holds_the_kernels_and_computes_what_eager_does(
        form, variant, forward, backward):
    form("triton_op")
    m, x, r = _setup()
    eager = m.__class__(6, activation="leaky_relu")
    eager.load_state_dict(m.state_dict())
    graphs: dict = {}
    with planner.forced_plan(variant=variant, splits=2):
        loss = torch.compile(_step, backend=_recording_backend(graphs), fullgraph=True)(m, x, r)
        loss.backward()
        xe, re = x.detach().clone().requires_grad_(), r.detach().clone().requires_grad_()
        loss_e = _step(eager, xe, re)
        loss_e.backward()
    assert _kernels(graphs["forward"]) == forward
    assert _kernels(graphs["backward"]) == backward
    for gm in graphs.values():      # no opaque op left: every kernel is in the graph
        assert not any("tritonbn" in op for op in _ops(gm)), _ops(gm)
    torch.testing.assert_close(loss, loss_e, rtol=1e-6, atol=0)
    for ours, theirs in ((x.grad, xe.grad), (r.grad, re.grad), (m.weight.grad, eager.weight.grad),
                         (m.bias.grad, eager.bias.grad), (m.running_mean, eager.running_mean),
                         (m.running_var, eager.running_var),
                         (m.num_batches_tracked, eager.num_batches_tracked)):
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)


def test_by_default_compiled_graphs_call_the_custom_ops(form):
    form("custom_op")
    m, x, r = _setup()
    graphs: dict = {}
    torch.compile(_step, backend=_recording_backend(graphs), fullgraph=True)(m, x, r).backward()
    assert _kernels(graphs["forward"]) == [] and _kernels(graphs["backward"]) == []
    assert "tritonbn.batch_norm_forward.default" in _ops(graphs["forward"])
    assert "tritonbn.batch_norm_backward.default" in _ops(graphs["backward"])


def test_the_compiled_form_is_checked(monkeypatch):
    monkeypatch.setenv(_runtime.COMPILED_ENV, "inductor")
    with pytest.raises(ValueError, match="TRITONBN_COMPILED must be one of"):
        _runtime._compiled_form_from_env()
    monkeypatch.setenv(_runtime.COMPILED_ENV, "triton_op")
    assert _runtime._compiled_form_from_env() == "triton_op"


def _plain_step(module, x):
    return (module(x).float() ** 2).sum()


VARIANTS = {
    "eval": (lambda: tritonbn.BatchNorm2d(6).eval(), torch.float32, torch.contiguous_format),
    "renorm": (lambda: tritonbn.BatchRenorm2d(6), torch.float32, torch.contiguous_format),
    "cumulative": (lambda: tritonbn.BatchNorm2d(6, momentum=None), torch.float32,
                   torch.contiguous_format),
    "float16 channels-last": (lambda: tritonbn.BatchNorm2d(6), torch.float16,
                              torch.channels_last),
    "frozen": (lambda: tritonbn.FrozenBatchNorm2d(6), torch.float32, torch.contiguous_format),
}


@pytest.mark.parametrize("name", VARIANTS)
def test_every_variant_compiles_to_its_kernels(form, name):
    form("triton_op")
    make, dtype, memory_format = VARIANTS[name]
    torch.manual_seed(0)
    ours, eager = make(), make()
    with torch.no_grad():
        for t in (*ours.parameters(), *ours.buffers()):
            if t.is_floating_point():
                t.uniform_(0.5, 1.5)
    eager.load_state_dict(ours.state_dict())
    x = torch.randn(4, 6, 5, 3).to(dtype).contiguous(memory_format=memory_format)
    x.requires_grad_()
    xe = x.detach().clone().requires_grad_()
    graphs: dict = {}
    loss = torch.compile(_plain_step, backend=_recording_backend(graphs), fullgraph=True)(ours, x)
    loss.backward()
    _plain_step(eager, xe).backward()
    assert _kernels(graphs["forward"]) and _kernels(graphs["backward"])
    for gm in graphs.values():
        assert not any("tritonbn" in op for op in _ops(gm)), _ops(gm)
    tol = dict(rtol=1e-6, atol=1e-7) if dtype == torch.float32 else dict(rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(x.grad, xe.grad, **tol)
    for (n, a), (_, b) in zip(ours.state_dict().items(), eager.state_dict().items()):
        torch.testing.assert_close(a, b, **tol, msg=n)


def test_a_process_that_interprets_every_kernel_keeps_the_custom_ops():
    """torch traces only compiled kernels into a graph: with TRITON_INTERPRET=1 (every kernel
    of the process interpreted) the triton_op form cannot be had, and the custom ops stay."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, TRITON_INTERPRET="1", TRITONBN_COMPILED="triton_op")
    out = subprocess.run([sys.executable, "-c", "from tritonbn import _runtime; "
                          "print(_runtime.cuda_interpreted(), _runtime.compiled_form())"],
                         env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "custom_op"]
