"""PyTorch's own test samples, replayed against tritonbn: the OpInfo samples of
nn.functional.batch_norm and the ModuleInfo samples of BatchNorm1d/2d/3d (torch.testing._internal),
in every dtype tritonbn supports, compared with torch in float64 -- outputs, gradients, running
statistics and batch counts -- and torch's exception type wherever torch raises."""
import copy

import pytest
import torch
import torch.nn.functional as F
# torch's test corpus; it needs the expecttest package (in tritonbn's "test" extra)
from torch.testing._internal import common_methods_invocations as common_methods
from torch.testing._internal import common_modules

import tritonbn
from tests.helpers import assert_close, tol

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
OPINFO = next(o for o in common_methods.op_db
              if o.name == "nn.functional.batch_norm" and o.variant_test_name == "")
MODULES = {m.module_cls: m for m in common_modules.module_db
           if m.module_cls in (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d)}
OURS = {torch.nn.BatchNorm1d: tritonbn.BatchNorm1d, torch.nn.BatchNorm2d: tritonbn.BatchNorm2d,
        torch.nn.BatchNorm3d: tritonbn.BatchNorm3d}


def _grad_like(t: torch.Tensor, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(t.shape, generator=g, dtype=torch.float64)


def _float64(v):
    if isinstance(v, torch.Tensor):
        return v.detach().cpu().double().clone().requires_grad_(v.requires_grad)
    return v


def _reduction(x: torch.Tensor) -> int:
    return x.numel() // x.shape[1] if x.dim() > 1 and x.shape[1] else 1


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_opinfo_samples_of_functional_batch_norm(dtype, device):
    samples = list(OPINFO.sample_inputs(device, dtype, requires_grad=True))
    assert len(samples) >= 10
    for i, s in enumerate(samples):
        args, kwargs = list(s.args), dict(s.kwargs)
        ref_args = [_float64(a) for a in args]
        ref_input = _float64(s.input)
        try:
            y_ref = F.batch_norm(ref_input, *ref_args, **kwargs)
        except Exception as e:                                  # torch refuses: so must we
            with pytest.raises(type(e)):
                tritonbn.batch_norm(s.input, *args, **kwargs)
            continue
        with tritonbn.count_launches() as launches:
            y = tritonbn.batch_norm(s.input, *args, **kwargs)
        if s.input.numel() and s.input.dim() > 1:
            assert launches, f"sample {i}: no kernel ran"
        t = tol(dtype, _reduction(s.input))
        assert y.dtype == s.input.dtype and y.shape == y_ref.shape
        assert_close(y, y_ref, **t, msg=f"sample {i}: output")
        for name, ours, ref in (("running_mean", args[0], ref_args[0]),
                                ("running_var", args[1], ref_args[1])):
            if ours is not None:
                assert_close(ours, ref, **t, msg=f"sample {i}: {name}")
        if y.numel():
            g = _grad_like(y, i)
            y.backward(g.to(device=y.device, dtype=y.dtype))
            y_ref.backward(g)
            pairs = [("input", s.input, ref_input)] + [
                (n, a, r) for n, a, r in zip(("weight", "bias"), args[2:4], ref_args[2:4])
                if isinstance(a, torch.Tensor)]
            for name, ours, ref in pairs:
                assert_close(ours.grad, ref.grad, atol=t["atol"] * 10, rtol=t["rtol"] * 10,
                             msg=f"sample {i}: grad of {name}")


def _module_inputs(module_info, training):
    return module_info.module_inputs_func(module_info, device="cpu", dtype=torch.float64,
                                          requires_grad=True, training=training)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("torch_cls", list(MODULES), ids=lambda c: c.__name__)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_moduleinfo_samples_of_batch_norm_modules(torch_cls, training, dtype, device):
    inputs = _module_inputs(MODULES[torch_cls], training)
    assert inputs
    for i, mi in enumerate(inputs):
        ci, fi = mi.constructor_input, mi.forward_input
        torch.manual_seed(i)
        ref = torch_cls(*ci.args, **ci.kwargs).double()
        with torch.no_grad():                      # non-trivial parameters and statistics
            for p in ref.parameters():
                p.uniform_(0.5, 1.5)
            if ref.running_mean is not None:
                ref.running_mean.uniform_(-0.5, 0.5)
                ref.running_var.uniform_(0.5, 2.0)
        ours = OURS[torch_cls](*ci.args, **ci.kwargs).to(device=device, dtype=dtype)
        ours.load_state_dict(copy.deepcopy(ref.state_dict()))
        ref.train(training), ours.train(training)
        x_ref = fi.args[0].detach().double()
        t = tol(dtype, _reduction(x_ref))
        for step in range(2):                      # twice: momentum=None averages over steps
            xr = (x_ref * (step + 1)).requires_grad_()
            x = xr.detach().to(device=device, dtype=dtype).requires_grad_()
            y_ref = ref(xr)
            with tritonbn.count_launches() as launches:
                y = ours(x)
            assert launches or not x.numel(), f"input {i}: no kernel ran"
            assert_close(y, y_ref, **t, msg=f"input {i} step {step}: output")
            if y.numel():
                g = _grad_like(y_ref, i)
                y.backward(g.to(device=device, dtype=dtype))
                y_ref.backward(g)
                assert_close(x.grad, xr.grad, atol=t["atol"] * 10, rtol=t["rtol"] * 10,
                             msg=f"input {i} step {step}: grad_input")
            for name, b in ref.named_buffers():
                mine = dict(ours.named_buffers())[name]
                if name == "num_batches_tracked":
                    assert torch.equal(mine.cpu(), b), f"input {i}: {name}"
                else:
                    assert_close(mine, b, **t, msg=f"input {i} step {step}: {name}")
        for name, p in ref.named_parameters():
            mine = dict(ours.named_parameters())[name]
            if p.grad is not None:
                assert_close(mine.grad, p.grad, atol=t["atol"] * 20, rtol=t["rtol"] * 20,
                             msg=f"input {i}: grad of {name}")
