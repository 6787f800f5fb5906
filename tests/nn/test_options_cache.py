"""A layer keeps the Options it built for its calls until one of its attributes is set or
deleted (TritonNorm.__setattr__). Every change a user or tritonbn makes between two calls must
reach the next call: compared here with torch's layer given the same change."""
import copy
import pickle

import torch

import tritonbn
from tritonbn import launch
from tritonbn import overflow as ovf

C = 3


def _pair(device):
    ours, theirs = tritonbn.BatchNorm2d(C).to(device), torch.nn.BatchNorm2d(C).to(device)
    return ours, theirs


def _same_step(ours, theirs, x):
    y_ours, y_theirs = ours(x), theirs(x)
    torch.testing.assert_close(y_ours, y_theirs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.running_mean, theirs.running_mean, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ours.running_var, theirs.running_var, atol=1e-5, rtol=1e-5)


def test_changed_attributes_reach_the_next_call(device):
    x = torch.randn(4, C, 3, 5, device=device) * 3 + 1
    ours, theirs = _pair(device)
    _same_step(ours, theirs, x)
    assert ours.__dict__.get("_options"), "the first call keeps its Options"
    for name, value in (("momentum", 0.7), ("eps", 0.5), ("momentum", None)):
        setattr(ours, name, value)
        setattr(theirs, name, value)
        _same_step(ours, theirs, x)
        _same_step(ours, theirs, x)
    ours.eval()
    theirs.eval()
    _same_step(ours, theirs, x)
    ours.train()
    theirs.train()
    _same_step(ours, theirs, x)
    del ours.momentum            # the instance attribute goes: torch's class has none either
    ours.momentum = theirs.momentum = 0.2
    _same_step(ours, theirs, x)


def test_a_policy_set_between_calls_reaches_the_kernels(device):
    m = tritonbn.BatchNorm2d(C).to(device)
    x = torch.randn(4, C, 3, 5, device=device)

    def saturating():
        with launch.capture_launches() as launches:
            m(x)
        return {kwargs.get("SATURATE") for _, _, _, kwargs in launches}

    assert saturating() == {False}
    ovf.set_policy(m, overflow="saturate")
    assert saturating() == {True}
    ovf.set_policy(m, overflow="propagate")
    assert saturating() == {False}


def test_kept_options_are_not_pickled_or_shared_by_copies(device):
    m = tritonbn.BatchNormAct2d(C, activation="relu").to(device)
    x = torch.randn(4, C, 2, 2, device=device)
    assert m(x).min() >= 0
    assert "_options" in m.__dict__
    for other in (pickle.loads(pickle.dumps(m)), copy.deepcopy(m)):
        assert "_options" not in other.__dict__
        other.activation = None                  # the copy's change is the copy's own
        assert other(x).min() < 0
    assert m(x).min() >= 0
