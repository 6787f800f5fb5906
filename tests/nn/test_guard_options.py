"""Every half-precision guard reaches every layer class: the output policy ("saturate"), the
running-statistics policy ("skip", with momentum=None counted per channel), the fused counters
and the model monitor, set by tritonbn.overflow.set_policy / monitor -- for BatchNorm1d/2d/3d,
BatchNormAct2d, BatchRenorm2d, BatchNormPerActivation2d, SyncBatchNorm (one process) and the
module tritonbn.fuse makes."""
import pytest
import torch

import tritonbn
from tritonbn import overflow as ovf
from tritonbn.transforms.fuse import FusedBatchNormAct2d

C = 3
F16_MAX = 65504.0


def _layers():
    return {
        "BatchNorm1d": (lambda: tritonbn.BatchNorm1d(C), (8, C, 6)),
        "BatchNorm2d": (lambda: tritonbn.BatchNorm2d(C), (4, C, 3, 4)),
        "BatchNorm3d": (lambda: tritonbn.BatchNorm3d(C), (4, C, 2, 2, 3)),
        "BatchNormAct2d": (lambda: tritonbn.BatchNormAct2d(C, activation="leaky_relu"),
                           (4, C, 3, 4)),
        "BatchRenorm2d": (lambda: tritonbn.BatchRenorm2d(C, warmup_steps=1), (4, C, 3, 4)),
        "BatchNormPerActivation2d": (lambda: tritonbn.BatchNormPerActivation2d(C, (3, 4)),
                                     (16, C, 3, 4)),
        "SyncBatchNorm": (lambda: tritonbn.SyncBatchNorm(C), (4, C, 3, 4)),
        "FusedBatchNormAct2d": (lambda: _fused(), (4, C, 3, 4)),
    }


def _fused():
    m = tritonbn.BatchNorm2d(C)
    m.__class__ = FusedBatchNormAct2d
    m.activation = "relu"
    return m


LAYERS = list(_layers())


def _make(name, device, momentum=0.1):
    factory, shape = _layers()[name]
    m = factory().to(device).half()
    m.momentum = momentum
    with torch.no_grad():
        m.weight.fill_(3e4)            # gamma * x_hat leaves float16's range for |x_hat| > ~2.2
        m.bias.fill_(100.0)
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=g) * 2).half().to(device)
    return m, x


def _outputs(name, device, policy):
    m, x = _make(name, device)
    if policy is not None:
        ovf.set_policy(m, overflow=policy)
    with tritonbn.count_launches() as launches:
        y = m(x)
    assert launches, "the layer must run the kernels"
    return y


@pytest.mark.parametrize("name", LAYERS)
def test_saturate_reaches_every_layer(name, device):
    y_default = _outputs(name, device, None)
    y_propagate = _outputs(name, device, "propagate")
    y_saturate = _outputs(name, device, "saturate")
    inf = torch.isinf(y_propagate)
    assert inf.any(), "the inputs must overflow float16 somewhere"
    assert torch.equal(inf, torch.isinf(y_default))
    assert not torch.isinf(y_saturate).any()
    assert (y_saturate[inf].float().abs() == F16_MAX).all()
    torch.testing.assert_close(y_saturate[~inf], y_propagate[~inf])


@pytest.mark.parametrize("name", LAYERS)
def test_monitor_counts_every_layer(name, device):
    m, x = _make(name, device)
    model = torch.nn.Sequential(m)
    with ovf.monitor(model) as report:
        y = model(x)
    row, = report.rows()
    assert row["overflowed"] == int(torch.isinf(y).sum()) > 0
    assert row["headroom"] < 0 and row["dtype"] == "float16"
    assert getattr(m, "overflow_stats", None) is None        # off again after the block


@pytest.mark.parametrize("name", LAYERS)
def test_skip_reaches_every_layer(name, device):
    """A NaN in the first channel's batch: "skip" keeps that channel's running statistics (and,
    with momentum=None, its batch count) while the others update; "propagate" poisons them."""
    for policy in ("propagate", "skip"):
        m, x = _make(name, device, momentum=None)
        ovf.set_policy(m, nonfinite_stats=policy)
        x = x.clone()
        x[0, 0] = float("nan")
        before = m.running_mean.clone()
        m(x)
        first = m.running_mean.view(C, -1)[0]
        rest = m.running_mean.view(C, -1)[1:]
        if policy == "skip":
            assert torch.equal(first, before.view(C, -1)[0])
            counts = m.channel_batches_tracked.view(C, -1)
            assert (counts[0] == 0).all() and (counts[1:] == 1).all()
        else:
            assert torch.isnan(first).any()
        assert torch.isfinite(rest).all() and not torch.equal(rest, before.view(C, -1)[1:])
        assert int(m.num_batches_tracked) == 1


def test_set_policy_leaves_in_place_activated_layers_propagating():
    # their backward inverts y; a saturated y could not be inverted (and the op refuses it)
    model = torch.nn.Sequential(tritonbn.BatchNorm2d(3), tritonbn.InPlaceABN2d(3))
    with pytest.warns(UserWarning, match="in-place activated layers keep overflow='propagate'.*1"):
        tritonbn.overflow.set_policy(model, overflow="saturate", nonfinite_stats="skip")
    assert model[0].overflow == "saturate" and model[1].overflow == "propagate"
    assert model[1].nonfinite_stats == "skip"
    x = torch.randn(4, 3, 5, 5, dtype=torch.float16) * 100
    model.half()(x)          # runs: no saturate reaches the in-place layer
    with pytest.raises(ValueError, match="saturate"):
        tritonbn.functional.options(True, 0.1, 1e-5, "leaky_relu", 0.01, overflow="saturate",
                                    invertible=True)
