"""Plain eager calls run the implementation without torch's custom-op wrapper (host time, see
tritonbn.ops._direct); tracers and dispatch modes still see the registered ops, and both paths
compute the same thing and bump the same version counters."""
import pytest
import torch

import tritonbn
from tritonbn import launch, ops

from tests.helpers import TRITONBN_OPS, OpLog, assert_close, make_input, tol


def _call(x, rm, rv, w, b, **kw):
    y = tritonbn.batch_norm(x, rm, rv, w, b, training=True, **kw)
    y.backward(torch.linspace(-1, 1, y.numel(), device=y.device).reshape(y.shape).to(y.dtype))
    return y


def _inputs(device, requires_grad=True):
    x = make_input((4, 6, 3, 5), torch.float32, "contiguous", device).requires_grad_(requires_grad)
    w = torch.linspace(0.5, 1.5, 6, device=device).requires_grad_(requires_grad)
    b = torch.linspace(-1, 1, 6, device=device).requires_grad_(requires_grad)
    return x, w, b, torch.zeros(6, device=device), torch.ones(6, device=device)


def test_eager_calls_do_not_go_through_the_custom_ops(device, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the custom op wrapper ran on a plain eager call")

    monkeypatch.setattr(ops, "batch_norm_forward", refuse)
    monkeypatch.setattr(ops, "batch_norm_backward", refuse)
    x, w, b, rm, rv = _inputs(device)
    with launch.count_launches() as ran:
        _call(x, rm, rv, w, b, activation="relu")
    assert sum(ran.values()) >= 2  # forward and backward kernels really ran, directly
    assert x.grad is not None and w.grad is not None


def test_dispatch_modes_see_the_registered_ops(device):
    x, w, b, rm, rv = _inputs(device)
    with OpLog(x.numel()) as log:
        _call(x, rm, rv, w, b, activation="relu")
    assert TRITONBN_OPS <= log.ops


def test_eager_and_op_paths_agree(device):
    """The same call through the direct path and through the custom ops (forced by a dispatch
    mode): outputs, gradients and running statistics."""
    results = []
    for traced in (False, True):
        x, w, b, rm, rv = _inputs(device)
        if traced:
            with OpLog(x.numel()):
                y = _call(x, rm, rv, w, b, activation="silu")
        else:
            y = _call(x, rm, rv, w, b, activation="silu")
        results.append([y.detach(), x.grad, w.grad, b.grad, rm, rv])
    t = tol(torch.float32, 4 * 15)
    for eager, traced in zip(*results):
        assert_close(eager, traced, **t)


@pytest.mark.parametrize("training", [True, False])
def test_running_stat_versions_bump_like_the_custom_op(device, training):
    """A training call writes the running statistics: the traced path copies the op's new
    values in (an in-place op: the version counters move), and the direct path, whose kernels
    write raw memory, bumps them itself. An eval call writes nothing on either path."""
    bumps = []
    for traced in (False, True):
        x, w, b, rm, rv = _inputs(device, requires_grad=False)
        before = rm._version, rv._version
        if traced:
            with OpLog(x.numel()):
                tritonbn.batch_norm(x, rm, rv, w, b, training=training)
        else:
            tritonbn.batch_norm(x, rm, rv, w, b, training=training)
        bumps.append((rm._version - before[0], rv._version - before[1]))
    assert bumps[0] == bumps[1]
    assert (bumps[0][0] >= 1 and bumps[0][1] >= 1) if training else bumps[0] == (0, 0)


def test_double_backward_raises_instead_of_dropping_terms(device):
    """create_graph=True records the backward: the kernels' gradients have no history, so the
    backward goes through the op, which raises autograd's error rather than return
    second-order gradients without batch norm's terms."""
    x, w, b, rm, rv = _inputs(device)
    y = tritonbn.batch_norm(x, rm, rv, w, b, training=True)
    (gx,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="autograd"):
        gx.square().sum().backward()


def test_meta_tensors_take_the_op_and_its_fake_kernel():
    x = torch.empty(4, 6, 3, 5, device="meta")
    rm, rv = torch.zeros(6, device="meta"), torch.ones(6, device="meta")
    y = tritonbn.batch_norm(x, rm, rv, training=True)
    assert y.shape == x.shape and y.device.type == "meta"
    with torch.device("meta"):
        m = tritonbn.BatchNorm2d(6)
    assert m(x).shape == x.shape


def test_jit_trace_records_the_op(device):
    m = tritonbn.BatchNorm2d(6).to(device).eval()
    with torch.no_grad():
        m.running_mean.uniform_(-1, 1)
        m.running_var.uniform_(0.5, 2)
    x = make_input((4, 6, 3, 5), torch.float32, "contiguous", device)
    traced = torch.jit.trace(m, x, check_trace=False)
    # the trace records the op's autograd Function (the custom op runs inside it) ...
    assert "BatchNormFunction" in str(traced.graph)
    assert_close(traced(x), m(x), atol=1e-6, rtol=1e-6)
    # ... with the sizes as traced values: another batch size replays correctly
    x2 = make_input((2, 6, 3, 5), torch.float32, "contiguous", device, seed=3)
    assert_close(traced(x2), m(x2), atol=1e-6, rtol=1e-6)


def test_interpreted_calls_leave_the_triton_language_as_it_was():
    """CPU tensors run the kernels in Triton's interpreter, which swaps triton.language's
    builtins for its own while it runs (and, for device functions, never swaps them back). In
    this process compiled kernels may follow -- CUDA tensors, torch.compile's analysis of a
    kernel -- and would be built from the interpreter's builtins: after any CPU call every
    builtin must be Triton's own again."""
    import triton.language as tl

    from tritonbn import plan as planner

    namespaces = {"tl": tl, "core": tl.core, "math": tl.math, "tensor": tl.tensor,
                  "standard": tl.standard}
    before = {name: dict(vars(ns)) for name, ns in namespaces.items()}
    x = torch.randn(4, 6, 5, 3, requires_grad=True)
    m = tritonbn.BatchNormAct2d(6, activation="silu")
    for variant in ("onepass", "split"):
        with planner.forced_plan(variant=variant, splits=2):
            m(x, x.detach().flip(0)).sum().backward()
    for name, ns in namespaces.items():
        now = vars(ns)
        changed = [k for k, v in before[name].items() if now.get(k) is not v]
        assert changed == [], (name, changed)
