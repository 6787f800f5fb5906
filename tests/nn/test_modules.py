"""tritonbn.BatchNorm1d/2d/3d/Nd against the torch.nn modules they replace: constructor, state,
state_dict round trips, momentum=None, track_running_stats, affine, eval, input-dim checks."""
import inspect

import pytest
import torch
from torch import nn

import tritonbn
from tests.helpers import make_input

PAIRS = [  # (tritonbn class, torch class, an input shape it accepts)
    (tritonbn.BatchNorm1d, nn.BatchNorm1d, (6, 5)),
    (tritonbn.BatchNorm1d, nn.BatchNorm1d, (4, 5, 7)),
    (tritonbn.BatchNorm2d, nn.BatchNorm2d, (3, 5, 6, 7)),
    (tritonbn.BatchNorm3d, nn.BatchNorm3d, (2, 5, 3, 4, 5)),
]
PAIR_IDS = ["1d-2D", "1d-3D", "2d", "3d"]
FP32 = dict(atol=1e-5, rtol=1e-5)


def _twins(ours_cls, torch_cls, device, **kwargs):
    """A torch module and ours with the same non-trivial parameters and running statistics."""
    torch.manual_seed(0)
    ref = torch_cls(5, device=device, **kwargs)
    with torch.no_grad():
        if ref.weight is not None:
            ref.weight.uniform_(0.5, 1.5)
        if ref.bias is not None:
            ref.bias.uniform_(-1, 1)
        if ref.running_mean is not None:
            ref.running_mean.uniform_(-1, 1)
            ref.running_var.uniform_(0.5, 2)
    ours = ours_cls(5, device=device, **kwargs)
    ours.load_state_dict(ref.state_dict())
    return ours, ref


def _run(module, x):
    """Forward and backward of a fixed loss; returns (y, dx, {param: grad})."""
    x = x.detach().clone().requires_grad_()
    y = module(x)
    (y * torch.linspace(-1, 1, y.numel(), device=y.device).view_as(y)).sum().backward()
    grads = {n: p.grad.clone() for n, p in module.named_parameters()}
    module.zero_grad()
    return y.detach(), x.grad, grads


def _assert_same_run(ours, ref, x):
    with tritonbn.count_launches() as launches:
        y, dx, grads = _run(ours, x)
    assert launches, "the tritonbn module must run the Triton kernels"
    y_r, dx_r, grads_r = _run(ref, x)
    torch.testing.assert_close(y, y_r, **FP32)
    torch.testing.assert_close(dx, dx_r, **FP32)
    assert grads.keys() == grads_r.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], grads_r[name], **FP32)
    _assert_same_buffers(ours, ref)


def _assert_same_buffers(ours, ref):
    b, b_r = dict(ours.named_buffers()), dict(ref.named_buffers())
    assert b.keys() == b_r.keys()
    for name in b:
        if name == "num_batches_tracked":
            assert torch.equal(b[name], b_r[name]), (b[name], b_r[name])
        else:
            torch.testing.assert_close(b[name], b_r[name], **FP32)


@pytest.mark.parametrize("ours_cls,torch_cls", [(tritonbn.BatchNorm1d, nn.BatchNorm1d),
                                               (tritonbn.BatchNorm2d, nn.BatchNorm2d),
                                               (tritonbn.BatchNorm3d, nn.BatchNorm3d)])
def test_same_constructor_state_and_keys(ours_cls, torch_cls):
    assert issubclass(ours_cls, torch_cls)
    assert inspect.signature(ours_cls) == inspect.signature(torch_cls)
    kwargs = dict(eps=1e-3, momentum=0.3, affine=True, track_running_stats=True, device="cpu",
                  dtype=torch.float64)
    ours, ref = ours_cls(7, **kwargs), torch_cls(7, **kwargs)
    for attr in ("num_features", "eps", "momentum", "affine", "track_running_stats"):
        assert getattr(ours, attr) == getattr(ref, attr)
    assert ours.weight.dtype == torch.float64 and ours.running_var.dtype == torch.float64
    assert ours.num_batches_tracked.dtype == torch.long
    assert list(ours.state_dict()) == list(ref.state_dict()) == [
        "weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    assert [n for n, _ in ours.named_parameters()] == ["weight", "bias"]
    assert ours.extra_repr() == ref.extra_repr()
    none = ours_cls(7, affine=False, track_running_stats=False)
    assert none.weight is None and none.bias is None and none.running_mean is None
    assert none.num_batches_tracked is None and list(none.state_dict()) == []


@pytest.mark.parametrize("ours_cls,torch_cls,shape", PAIRS, ids=PAIR_IDS)
def test_training_matches_torch(ours_cls, torch_cls, shape, device):
    ours, ref = _twins(ours_cls, torch_cls, device, momentum=0.3)
    for seed in range(2):  # two steps: the second starts from updated running statistics
        x = make_input(shape, torch.float32, "contiguous", device, seed=seed)
        _assert_same_run(ours, ref, x)
    assert int(ours.num_batches_tracked) == 2


@pytest.mark.parametrize("ours_cls,torch_cls,shape", PAIRS[1:3], ids=PAIR_IDS[1:3])
def test_eval_uses_running_stats_and_leaves_them(ours_cls, torch_cls, shape, device):
    ours, ref = _twins(ours_cls, torch_cls, device)
    before = {n: b.clone() for n, b in ours.named_buffers()}
    ours.eval(), ref.eval()
    with tritonbn.count_launches() as launches:
        _assert_same_run(ours, ref, make_input(shape, torch.float32, "contiguous", device))
    assert launches["bn_fwd_apply_kernel"] >= 1  # the eval kernel, not the batch-statistics one
    for name, b in ours.named_buffers():
        assert torch.equal(b, before[name]), name
    # and back to training: batch statistics again, buffers move, the batch is counted
    ours.train(), ref.train()
    _assert_same_run(ours, ref, make_input(shape, torch.float32, "contiguous", device, seed=3))
    assert int(ours.num_batches_tracked) == 1
    assert not torch.equal(ours.running_mean, before["running_mean"])


def test_momentum_none_is_cumulative_average(device):
    ours, ref = _twins(tritonbn.BatchNorm2d, nn.BatchNorm2d, device, momentum=None)
    batch_means = []
    for step in range(4):
        # a different mean per step, so a wrong averaging factor cannot go unnoticed
        x = make_input((3, 5, 4, 6), torch.float32, "contiguous", device, shift=step, seed=step)
        batch_means.append(x.mean((0, 2, 3)))
        _assert_same_run(ours, ref, x)
    assert int(ours.num_batches_tracked) == 4
    # cumulative average: factor 1/k at step k, so the running mean is the mean of batch means
    torch.testing.assert_close(ours.running_mean, torch.stack(batch_means).mean(0), **FP32)


def test_track_running_stats_false_uses_batch_stats_in_eval(device):
    ours, ref = _twins(tritonbn.BatchNorm2d, nn.BatchNorm2d, device, track_running_stats=False)
    x = make_input((3, 5, 4, 6), torch.float32, "contiguous", device)
    _assert_same_run(ours, ref, x)
    ours.eval(), ref.eval()
    with tritonbn.count_launches() as launches:
        _assert_same_run(ours, ref, x)
    # eval without running statistics normalizes with the batch's own statistics
    assert launches["bn_fwd_onepass_kernel"] + launches["bn_stats_partial_kernel"] >= 1
    y = ours(x)
    torch.testing.assert_close(y.mean((0, 2, 3)), ours.bias, atol=1e-5, rtol=1e-5)


def test_track_running_stats_switched_off_after_construction(device):
    # torch's rule: buffers are passed only when updated (training and tracking) or read (eval)
    ours, ref = _twins(tritonbn.BatchNorm2d, nn.BatchNorm2d, device)
    ours.track_running_stats = ref.track_running_stats = False
    rm = ours.running_mean.clone()
    x = make_input((3, 5, 4, 6), torch.float32, "contiguous", device)
    _assert_same_run(ours, ref, x)
    assert torch.equal(ours.running_mean, rm) and int(ours.num_batches_tracked) == 0
    ours.eval(), ref.eval()
    _assert_same_run(ours, ref, x)  # eval reads the (untouched) buffers


@pytest.mark.parametrize("training", [True, False])
def test_affine_false(training, device):
    ours, ref = _twins(tritonbn.BatchNorm1d, nn.BatchNorm1d, device, affine=False)
    assert ours.weight is None and list(ours.parameters()) == []
    ours.train(training), ref.train(training)
    _assert_same_run(ours, ref, make_input((4, 5, 7), torch.float32, "contiguous", device))


@pytest.mark.skipif("bias" not in inspect.signature(nn.BatchNorm2d).parameters,
                    reason="this torch's batch norm has no bias argument")
def test_bias_false(device):
    ours, ref = _twins(tritonbn.BatchNorm2d, nn.BatchNorm2d, device, bias=False)
    assert ours.bias is None and ours.weight is not None
    _assert_same_run(ours, ref, make_input((3, 5, 4, 6), torch.float32, "contiguous", device))


def test_float64_module(device):
    ours, ref = _twins(tritonbn.BatchNorm2d, nn.BatchNorm2d, device, dtype=torch.float64)
    x = make_input((3, 5, 4, 6), torch.float64, "contiguous", device)
    with tritonbn.count_launches() as launches:
        y = ours(x)
    assert launches and y.dtype == torch.float64
    torch.testing.assert_close(y, ref(x), atol=1e-12, rtol=1e-12)
    # Triton passes Python floats to kernels as float32, so momentum carries float32's
    # 1.5e-8 relative error into float64 running statistics (on a GPU as in the interpreter).
    torch.testing.assert_close(ours.running_var, ref.running_var, atol=1e-12, rtol=1e-7)


def test_reset_running_stats(device):
    ours, _ = _twins(tritonbn.BatchNorm2d, nn.BatchNorm2d, device)
    ours(make_input((3, 5, 4, 6), torch.float32, "contiguous", device))
    ours.reset_running_stats()
    assert torch.equal(ours.running_mean, torch.zeros(5, device=device))
    assert torch.equal(ours.running_var, torch.ones(5, device=device))
    assert int(ours.num_batches_tracked) == 0


def _trained_state(module, x):
    module(x)
    module(x * 0.5 + 1)
    return module.state_dict()


@pytest.mark.parametrize("kwargs", [{}, dict(affine=False), dict(momentum=None)],
                         ids=["default", "affine-false", "momentum-none"])
def test_state_dict_round_trip_bit_exact(kwargs, device):
    x = make_input((3, 5, 4, 6), torch.float32, "contiguous", device)
    ref = nn.BatchNorm2d(5, device=device, **kwargs)
    if ref.weight is not None:
        with torch.no_grad():
            ref.weight.uniform_(0.5, 1.5), ref.bias.uniform_(-1, 1)
    saved = _trained_state(ref, x)                          # torch ...
    ours = tritonbn.BatchNorm2d(5, device=device, **kwargs)
    ours.load_state_dict(saved)                             # ... -> ours ...
    back = nn.BatchNorm2d(5, device=device, **kwargs)
    back.load_state_dict(ours.state_dict())                 # ... -> torch
    for sd in (ours.state_dict(), back.state_dict()):
        assert list(sd) == list(saved)
        assert sd._metadata[""]["version"] == saved._metadata[""]["version"]
        for k in saved:
            assert sd[k].dtype == saved[k].dtype and torch.equal(sd[k], saved[k]), k
    # and a state our module trained loads into torch bit-exact too
    with tritonbn.count_launches() as launches:
        ours_saved = _trained_state(ours, x)
    assert launches and int(ours_saved["num_batches_tracked"]) == 4
    back.load_state_dict(ours_saved)
    for k, v in back.state_dict().items():
        assert torch.equal(v, ours_saved[k]), k


def test_old_state_dict_without_num_batches_tracked_loads(device):
    saved = nn.BatchNorm2d(5, device=device).state_dict()
    del saved["num_batches_tracked"]
    saved._metadata[""]["version"] = 1  # before torch added num_batches_tracked
    ours = tritonbn.BatchNorm2d(5, device=device)
    ours.load_state_dict(saved)  # strict: would fail if the version-1 upgrade were lost
    assert int(ours.num_batches_tracked) == 0


BAD_DIMS = [
    (tritonbn.BatchNorm1d, nn.BatchNorm1d, (2, 5, 3, 3)),
    (tritonbn.BatchNorm1d, nn.BatchNorm1d, (5,)),
    (tritonbn.BatchNorm2d, nn.BatchNorm2d, (2, 5, 3)),
    (tritonbn.BatchNorm2d, nn.BatchNorm2d, (2, 5, 3, 3, 3)),
    (tritonbn.BatchNorm3d, nn.BatchNorm3d, (2, 5, 3, 3)),
    (tritonbn.SyncBatchNorm, nn.SyncBatchNorm, (5,)),
]


@pytest.mark.parametrize("ours_cls,torch_cls,shape", BAD_DIMS,
                         ids=["1d-4D", "1d-1D", "2d-3D", "2d-5D", "3d-4D", "Nd-1D"])
def test_wrong_input_dims_raise_like_torch(ours_cls, torch_cls, shape, device):
    x = torch.randn(shape, device=device)
    with pytest.raises(ValueError) as expected:
        torch_cls(5, device=device)(x)
    ours = ours_cls(5, device=device)
    with tritonbn.count_launches() as launches, pytest.raises(ValueError) as got:
        ours(x)
    assert str(got.value) == str(expected.value)
    assert not launches and int(ours.num_batches_tracked) == 0  # rejected before any change


@pytest.mark.parametrize("shape", [(6, 5), (4, 5, 7), (3, 5, 4, 6), (2, 5, 3, 4, 5)],
                         ids=["2D", "3D", "4D", "5D"])
def test_batchnormnd_any_ndim_like_syncbatchnorm(shape, device):
    # on one process SyncBatchNorm is plain batch norm over dim 1, whatever the ndim
    ours, ref = _twins(tritonbn.SyncBatchNorm, nn.SyncBatchNorm, device)
    _assert_same_run(ours, ref, make_input(shape, torch.float32, "contiguous", device))
