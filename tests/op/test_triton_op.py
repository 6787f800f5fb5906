"""torch.compile with ``TRITONBN_COMPILED=triton_op``: the op reaches the compiler as
``torch.library.triton_op`` ops whose bodies -- the launchers -- it traces, so a compiled
training step's graphs hold tritonbn's kernels as user-defined Triton kernels (which Inductor
launches itself), not an opaque Python op. Checked here with a recording backend: the graphs'
nodes, and the graphs run with each kernel in Triton's interpreter against the eager op.

Without a GPU, Triton has no target to compile the kernels' TTIR for, which torch's analysis of
what a kernel writes needs: the tests answer Triton's ``get_current_target`` with an sm_90
target (nothing is compiled to a binary or launched on a device)."""
import contextlib

import pytest
import torch
from torch._dynamo.backends.common import aot_autograd
from torch._higher_order_ops import triton_kernel_wrap
from triton.backends.compiler import GPUTarget
from triton.runtime.driver import driver as triton_driver

import tritonbn
from tritonbn import _runtime
from tritonbn import plan as planner

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


class _TargetOnly:
    """A Triton driver that only names a target."""

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_current_device(self):
        return 0

    def __getattr__(self, name):
        raise RuntimeError(f"no {name}: no GPU in this test")


@pytest.fixture
def form(monkeypatch):
    """Choose the compiled form for one test (the environment variable is read at import)."""
    def choose(name: str):
        monkeypatch.setattr(_runtime, "_COMPILED_FORM", name)
        monkeypatch.setattr(triton_driver, "_active", _TargetOnly())
        torch._dynamo.reset()
    yield choose
    torch._dynamo.reset()


def _kernels(gm) -> list[str]:
    out = []
    for n in gm.graph.nodes:
        if n.op == "call_function" and "triton_kernel_wrapper" in str(n.target):
            k = triton_kernel_wrap.kernel_side_table.get_kernel(n.kwargs["kernel_idx"])
            out.append(getattr(k, "fn", k).fn.__name__)    # num_warps= makes an Autotuner
    return out


def _ops(gm) -> set[str]:
    return {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}


@contextlib.contextmanager
def _interpreted():
    """While a recorded graph runs, the side table hands out tritonbn's interpreted kernel of
    the same name for each compiled one (not while compiling: torch analyses the compiled)."""
    table = triton_kernel_wrap.kernel_side_table
    real, cpu = table.get_kernel, _runtime.kernels_for(torch.device("cpu"))

    def get_kernel(idx):
        k = real(idx)
        return getattr(cpu, getattr(k, "fn", k).fn.__name__)
    table.get_kernel = get_kernel
    try:
        yield
    finally:
        table.get_kernel = real


def _recording_backend(graphs: dict):
    """AOTAutograd with compilers that record the forward and backward graphs and run them
    with the kernels interpreted."""
    def recorder(name):
        def compiler(gm, example_inputs):
            graphs[name] = gm

            def run(args):
                with _interpreted():
                    return gm(*args)
            run._boxed_call = True
            return run
        return compiler
    return aot_autograd(fw_compiler=recorder("forward"), bw_compiler=recorder("backward"))


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
