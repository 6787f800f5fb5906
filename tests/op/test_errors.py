"""Bad input gets the exception type torch raises for it, and a rejected call changes nothing."""
import pytest
import torch
import torch.nn.functional as F

import tritonbn

C = 3


def _buffers(device):
    return dict(
        running_mean=torch.full((C,), 0.25, device=device),
        running_var=torch.full((C,), 2.0, device=device),
        weight=torch.full((C,), 1.5, device=device),
        bias=torch.full((C,), -0.5, device=device),
    )


def _x(device):
    return torch.randn(4, C, 5, device=device)


CASES = {
    "1d-input": (lambda d: dict(input=torch.randn(C, device=d)), RuntimeError),
    "0d-input": (lambda d: dict(input=torch.tensor(1.0, device=d)), (RuntimeError, IndexError)),
    "int-input": (lambda d: dict(input=torch.ones(4, C, 5, dtype=torch.int32, device=d)),
                  NotImplementedError),
    "bool-input": (lambda d: dict(input=torch.ones(4, C, 5, dtype=torch.bool, device=d)),
                   NotImplementedError),
    "complex-input": (lambda d: dict(input=torch.ones(4, C, 5, dtype=torch.complex64, device=d)),
                      NotImplementedError),
    "weight-channels": (lambda d: dict(weight=torch.ones(C + 1, device=d)), RuntimeError),
    "bias-channels": (lambda d: dict(bias=torch.ones(C - 1, device=d)), RuntimeError),
    "running-mean-channels": (lambda d: dict(running_mean=torch.zeros(C + 2, device=d)), RuntimeError),
    "running-var-channels": (lambda d: dict(running_var=torch.ones(1, device=d)), RuntimeError),
    "weight-int-dtype": (lambda d: dict(weight=torch.ones(C, dtype=torch.long, device=d)), RuntimeError),
    "running-int-dtype": (lambda d: dict(running_mean=torch.zeros(C, dtype=torch.long, device=d)),
                          RuntimeError),
    "weight-other-device": (lambda d: dict(weight=torch.ones(C, device="meta")), RuntimeError),
    "running-other-device": (lambda d: dict(running_var=torch.ones(C, device="meta")), RuntimeError),
    "one-value-per-channel": (lambda d: dict(input=torch.randn(1, C, device=d)), ValueError),
    "one-value-per-channel-4d": (lambda d: dict(input=torch.randn(1, C, 1, 1, device=d)), ValueError),
    "eps-zero-training": (lambda d: dict(eps=0.0), ValueError),
    "eps-negative-eval": (lambda d: dict(eps=-1.0, training=False), ValueError),
    "momentum-none": (lambda d: dict(momentum=None), TypeError),
    "momentum-string": (lambda d: dict(momentum="0.1"), TypeError),
    "only-running-mean": (lambda d: dict(running_var=None), ValueError),
    "eval-without-running": (lambda d: dict(running_mean=None, running_var=None, training=False),
                             RuntimeError),
    "training-none": (lambda d: dict(training=None), TypeError),
    "training-int": (lambda d: dict(training=1), TypeError),
    "running-mean-requires-grad": (
        lambda d: dict(running_mean=torch.zeros(C, device=d, requires_grad=True)), RuntimeError),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_raises_like_torch_and_changes_nothing(case, device):
    make, expected = CASES[case]
    args = dict(input=_x(device), training=True, momentum=0.1, eps=1e-5, **_buffers(device))
    args.update(make(device))
    before = {k: v.clone() for k, v in args.items() if isinstance(v, torch.Tensor) and k != "input"
              and v.device.type != "meta"}
    # torch raises the same type for the same call (on CPU copies, its reference behaviour)
    # (on clones: torch itself is not careful to leave buffers alone when it rejects a call)
    cpu_args = {k: (v.detach().cpu().clone().requires_grad_(v.requires_grad)
                    if isinstance(v, torch.Tensor) and v.device.type != "meta" else v)
                for k, v in args.items()}
    with pytest.raises(expected):
        F.batch_norm(**cpu_args)
    with tritonbn.count_launches() as launches, pytest.raises(expected) as info:
        tritonbn.batch_norm(**args)
    assert str(info.value), "the error must say what is wrong"
    assert sum(launches.values()) == 0
    for k, v in before.items():
        assert torch.equal(args[k], v), f"{k} changed by a rejected call"


def test_error_messages_name_the_problem(device):
    with pytest.raises(RuntimeError, match="weight should contain 3 elements"):
        tritonbn.batch_norm(_x(device), None, None, torch.ones(4, device=device), training=True)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        tritonbn.batch_norm(torch.randn(1, C, device=device), None, None, training=True)
    with pytest.raises(NotImplementedError, match="int32"):
        tritonbn.batch_norm(torch.ones(2, C, dtype=torch.int32, device=device), None, None,
                            training=True)


def test_one_value_per_channel_is_fine_in_eval(device):
    rm, rv = torch.zeros(C, device=device), torch.ones(C, device=device)
    x = torch.randn(1, C, device=device)
    y = tritonbn.batch_norm(x, rm, rv, training=False)
    torch.testing.assert_close(y.cpu(), F.batch_norm(x.cpu(), rm.cpu(), rv.cpu()), atol=1e-5, rtol=1e-5)


def test_zero_dim_tensor_momentum_and_eps_are_accepted_like_torch(device):
    x = _x(device)
    rm, rv = torch.zeros(C, device=device), torch.ones(C, device=device)
    ref_rm, ref_rv = rm.clone().cpu(), rv.clone().cpu()
    y = tritonbn.batch_norm(x, rm, rv, training=True, momentum=torch.tensor(0.3),
                            eps=torch.tensor(1e-3))
    ref = F.batch_norm(x.cpu(), ref_rm, ref_rv, training=True, momentum=torch.tensor(0.3),
                       eps=torch.tensor(1e-3))
    torch.testing.assert_close(y.cpu(), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rm.cpu(), ref_rm, atol=1e-6, rtol=1e-6)


def test_running_stats_that_require_grad_are_fine_under_no_grad(device):
    rm = torch.zeros(C, device=device, requires_grad=True)
    with torch.no_grad():
        tritonbn.batch_norm(_x(device), rm, torch.ones(C, device=device), training=True)
    assert rm.abs().sum() > 0  # updated


@pytest.mark.parametrize("module_cls, bad", [
    (tritonbn.BatchNorm1d, lambda: torch.ones(4, C, dtype=torch.int32)),   # integer input
    (tritonbn.BatchNorm1d, lambda: torch.randn(1, C)),                      # 1 value per channel
    (tritonbn.BatchNorm1d, lambda: torch.randn(4, C + 1)),                  # wrong C
    (tritonbn.BatchNormAct1d, lambda: torch.randn(4, C)),                   # bad residual below
    (tritonbn.BatchRenorm1d, lambda: torch.randn(1, C)),
])
def test_rejected_module_call_does_not_count_the_batch(device, module_cls, bad):
    """momentum=None averages over num_batches_tracked: a rejected call must not count, or the
    next batch would get weight 1/2 instead of 1."""
    m = module_cls(C, momentum=None).to(device)
    kwargs = {"residual": torch.randn(4, C + 1, device=device)} if module_cls is \
        tritonbn.BatchNormAct1d else {}
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises((RuntimeError, ValueError, NotImplementedError)):
        m(bad().to(device), **kwargs)
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed by a rejected call"
    x = torch.randn(8, C, device=device) * 3 + 5
    m(x)
    assert int(m.num_batches_tracked) == 1
    torch.testing.assert_close(m.running_mean.cpu(), x.mean(0).cpu(), atol=1e-5, rtol=1e-5)


def test_running_stats_must_be_one_dimensional_like_torch(device):
    """torch refuses running statistics of any other shape, (1, C) included, with a
    RuntimeError; so does tritonbn, before any kernel runs (weight and bias of any shape with C
    elements are fine, as in torch)."""
    x = torch.randn(4, 6, 3, device=device)
    for shape in ((1, 6), (2, 3)):
        rm, rv = torch.zeros(shape, device=device), torch.ones(shape, device=device)
        with pytest.raises(RuntimeError):
            F.batch_norm(x.cpu(), rm.cpu(), rv.cpu(), training=True)
        with pytest.raises(RuntimeError, match="1-D"):
            tritonbn.batch_norm(x, rm, rv, training=True)
        assert (rm == 0).all() and (rv == 1).all()
    w = torch.linspace(0.5, 1.5, 6, device=device).reshape(1, 6)
    y = tritonbn.batch_norm(x, None, None, w, None, training=True)
    torch.testing.assert_close(y.cpu(), F.batch_norm(x.cpu(), None, None, w.cpu(), None, True),
                               atol=1e-5, rtol=1e-5)
