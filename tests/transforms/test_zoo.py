"""The model-zoo tier (``python -m pytest -m zoo``): torchvision and timm architectures, without
weights, converted by tritonbn.convert_model, fused by tritonbn.fuse and folded by
tritonbn.fold_into_conv, against torch.

For each model (tests/transforms/zoo.py has the list and the input sizes):

* convert_model puts every batch-norm-like layer on tritonbn's kernels: the report says so, no
  ConversionWarning, and every phase below launches one forward kernel per batch-norm call;
* fuse fuses the expected number of layers, and every layer it leaves unfused is one whose
  output feeds something other than an activation or add, is read twice, or is the residual of
  an add fused elsewhere;
* a training step (forward, backward, SGD update), an eval forward and a training forward again
  (train -> eval -> train), every model given the same state before each phase: the fused
  model in float64 against torch's float64 to a tight tolerance (fuse converts first, so this
  holds the conversions to it too), the converted model in float32 against torch's own
  float32-vs-float64 spread (the fused epilogues in float32 are the default tier's,
  tests/transforms/test_fuse_training.py); running statistics to the same tolerances,
  num_batches_tracked exactly, and an eval forward changes no buffer;
* fold_into_conv folds the expected number of layers, of the torch model and of the converted
  one, and the folded models compute what the eval-mode models compute.

Inputs are channels-last (cheaper in the Triton interpreter), batch 2, and as small as leaves at
least 4 values per channel in the last stage. The run prints the coverage table.
"""
import copy
import time
import warnings

import pytest
import torch

import tritonbn
from tests.transforms.zoo import (ZOO, count_bn_calls, errors, lockstep, memory_format,
                                  randomize, tensors)

pytestmark = pytest.mark.zoo

# float64: tritonbn reduces in float64 like torch; what is left is summation order, amplified
# through up to 121 batch norms of 8-value channels
F64_TOL = 1e-9
# float32: within SPREAD x torch's own float32 error (against float64 from the same state), plus
# a floor for quantities torch's float32 happens to get nearly exact
SPREAD, FLOOR = 8.0, 1e-5
# ... except gradients, where one ReLU input within rounding of zero that lands on the other
# side (in tritonbn's run or in torch's) reroutes the gradient of everything before it: measured
# on tv.googlenet, one flipped element of 16,384 in inception4b gives a 3.3e-2 global and
# 1.4e-1 per-parameter error, where torch's own float32 run shows 2.5e-4. Gradients are held to
# float32 precision by the float64 runs here and layer by layer in the default tier.
FLIP = {"grads": 0.1, "grad_each": 0.5}

# How fuse may leave a layer unfused in these models: its output feeds a convolution, is read
# twice (a block's output feeding the next block's convolution and residual add), or is the
# residual of an add fused into the other branch's batch norm (a downsampling shortcut).
ALLOWED_UNFUSED = ("nothing to fuse", "its output is read", "it is the residual")

PHASE_NAMES = ("train", "eval", "train again")


def _forward_launches(result) -> int:
    launches = result["launches"]
    return launches.get("bn_fwd_onepass_kernel", 0) + launches.get("bn_fwd_apply_kernel", 0)


def _check(results: list) -> None:
    """Every phase of the converted and fused models against torch's from the same state."""
    for phase, r in zip(PHASE_NAMES, results):
        exact = r["torch64"]
        # torch's float32 spread: the larger of two of its own float32 runs (oneDNN and native
        # convolutions round differently); one run alone can be lucky in a network that
        # amplifies rounding (timm.efficientnet_b0 in eval after the step: 7.4e-5 with oneDNN)
        spread = {key: max(a, b) for (key, a), b in zip(
            errors(r["torch32"], exact).items(), errors(r["torch32_native"], exact).values())}
        for key, e in errors(r["fused64"], exact).items():
            assert e <= F64_TOL, f"fused, float64, {phase}: {key} relative error {e:.2e}"
        for name in ("converted32",):
            for key, e in errors(r[name], exact).items():
                bound = SPREAD * spread[key] + FLOOR
                assert e <= max(bound, FLIP.get(key, 0.0)), (
                    f"{name}, {phase}: {key} relative error {e:.2e}, torch float32's "
                    f"{spread[key]:.2e}")
        # every batch-norm call ran a tritonbn forward kernel, in each model and phase
        calls = exact["bn_calls"]
        assert calls > 0 and not exact["launches"]
        for name in ("fused64", "converted32"):
            assert _forward_launches(r[name]) == calls, (name, phase, r[name]["launches"], calls)
        if phase == "eval":
            # an eval forward changes no buffer: each model still holds the state it was given
            before = results[0]["fused64"]["buffers"]
            for name, result in r.items():
                for key, b in result["buffers"].items():
                    assert torch.equal(b, before[key].to(b.dtype)), (name, key)


@pytest.mark.parametrize("spec", ZOO, ids=[z.id for z in ZOO])
def test_zoo_model(spec, record_property):
    start, cpu = time.perf_counter(), time.process_time()
    torch.manual_seed(0)
    fmt = memory_format(spec.shape)
    x = torch.randn(spec.shape, generator=torch.Generator().manual_seed(5),
                    dtype=torch.float64).to(memory_format=fmt)
    base = randomize(spec.build().to(memory_format=fmt), x).eval()
    torch64 = copy.deepcopy(base).double().to(memory_format=fmt)
    torch32 = copy.deepcopy(base).float().to(memory_format=fmt)
    torch32_native = copy.deepcopy(torch32)
    torch32_native.zoo_context = lambda: torch.backends.mkldnn.flags(enabled=False)
    layers, fused_expected, folded_expected = spec.expect

    # -- convert_model: every batch-norm-like layer on the kernels, no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error", tritonbn.ConversionWarning)
        conv32, report = tritonbn.convert_model(copy.deepcopy(torch32), report=True)
    counts = report.counts()
    assert counts["layers"] == layers and counts["kernels"] == layers, report.table()

    # -- fuse: the expected chains fused; the rest for a reason the math gives
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fused64, fuse_report = tritonbn.fuse(torch64, report=True)
    messages = [str(w.message) for w in caught if "tritonbn" in str(w.message)]
    if spec.id == "tv.googlenet":
        assert messages and all("depends on train/eval mode" in m for m in messages), messages
    else:
        assert not messages, messages
    fuse_counts = fuse_report.counts()
    assert fuse_counts["kernels"] == layers
    unfused = [r for r in fuse_report if not r.fused]
    assert all(any(a in r.note for a in ALLOWED_UNFUSED) for r in unfused), \
        fuse_report.table()
    assert fuse_counts["fused"] == fused_expected, fuse_report.table()

    # -- training step, eval forward, training forward, every model from the fused float64
    # model's state at each phase
    results = lockstep({"fused64": fused64, "torch64": count_bn_calls(copy.deepcopy(torch64)),
                        "torch32": copy.deepcopy(torch32), "torch32_native": torch32_native,
                        "converted32": conv32}, x)
    _check(results)

    # -- fold_into_conv, of the torch model and of the converted one (eval mode, trained state),
    # against torch's eval forward (which the converted model's matches: the eval phase above)
    conv64 = tritonbn.convert_model(copy.deepcopy(torch64))
    torch64.load_state_dict(fused64.state_dict())
    with torch.no_grad():
        expected = tensors(torch64.eval()(x))
    for model in (torch64, conv64):
        model.load_state_dict(fused64.state_dict())
        model.eval()
        folded, fold_report = tritonbn.fold_into_conv(model, report=True)
        assert fold_report.counts()["folded"] == folded_expected, fold_report.table()
        unfolded = [r for r in fold_report if not r.folded]
        assert all("not folded: follows" in r.note or "not called" in r.note
                   for r in unfolded), fold_report.table()
        with torch.no_grad():
            got = tensors(folded(x))
        assert len(got) == len(expected)
        for g, e in zip(got, expected):
            assert (g - e).norm() <= F64_TOL * e.norm()

    record_property("zoo_row", dict(
        model=spec.id, layers=layers, kernels=counts["kernels"], fused=fuse_counts["fused"],
        folded=fold_report.counts()["folded"], input="x".join(map(str, spec.shape)),
        seconds=time.perf_counter() - start, cpu_seconds=time.process_time() - cpu))
