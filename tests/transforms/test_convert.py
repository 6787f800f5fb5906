"""tritonbn.convert_model / restore_model: in-place swaps that keep every tensor, and a converted
ResNet-style model trains like the torch one, in float32 and under autocast mixed precision."""
import copy

import pytest
import torch
from torch import nn

import tritonbn
from tests.helpers import tol
from tests.models import bn_modules, make_batches, make_model, train

TORCH_TO_OURS = {nn.BatchNorm1d: tritonbn.BatchNorm1d, nn.BatchNorm2d: tritonbn.BatchNorm2d,
                 nn.BatchNorm3d: tritonbn.BatchNorm3d, nn.SyncBatchNorm: tritonbn.SyncBatchNorm}


class MyBatchNorm(nn.BatchNorm2d):
    """A user subclass with its own forward: convert_model must leave it alone."""

    def forward(self, x):
        return super().forward(x) * 2


def _mixed_model(device):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv1d(3, 4, 3), nn.BatchNorm1d(4),
        nn.ModuleDict({"bn2": nn.BatchNorm2d(4, momentum=None), "bn3": nn.BatchNorm3d(4)}),
        nn.ModuleList([nn.SyncBatchNorm(4, affine=False), MyBatchNorm(4)]),
    ).to(device)
    model[1].weight.requires_grad_(False)        # frozen gamma must stay frozen
    model[2]["bn3"].eval()                       # a BN in eval inside a training model
    model[2]["bn2"].to(torch.float64)            # a BN with another dtype
    return model


def _state(model):
    """Every module's class, and every parameter and buffer as the tensor object itself."""
    return ({n: type(m) for n, m in model.named_modules()},
            {n: p for n, p in model.named_parameters()},
            {n: b for n, b in model.named_buffers()},
            {n: m.training for n, m in model.named_modules()})


def test_convert_and_restore_keep_every_tensor(device):
    model = _mixed_model(device)
    types, params, buffers, modes = _state(model)
    modules = dict(model.named_modules())
    sd = copy.deepcopy(model.state_dict())

    assert tritonbn.convert_model(model) is model
    c_types, c_params, c_buffers, c_modes = _state(model)
    for name, cls in types.items():
        assert modules[name] is dict(model.named_modules())[name]  # the same module objects
        assert c_types[name] is TORCH_TO_OURS.get(cls, cls), name  # MyBatchNorm, Conv1d stay
    assert c_params.keys() == params.keys() and c_buffers.keys() == buffers.keys()
    assert all(c_params[n] is p for n, p in params.items())       # the same Parameter objects
    assert all(c_buffers[n] is b for n, b in buffers.items())     # the same buffers
    assert c_modes == modes
    assert not model[1].weight.requires_grad and model[2]["bn2"].weight.dtype == torch.float64
    assert tritonbn.convert_model(model) is model and _state(model)[0] == c_types  # idempotent

    # the converted modules run the kernels on the same state
    with tritonbn.count_launches() as launches:
        model[1](torch.randn(4, 4, 5, device=device))
        model[3][0](torch.randn(2, 4, 3, 3, device=device))
    assert launches and int(model[1].num_batches_tracked) == 1

    assert tritonbn.restore_model(model) is model
    r_types, r_params, r_buffers, r_modes = _state(model)
    assert r_types == types and r_modes == modes
    assert all(r_params[n] is p for n, p in params.items())
    assert all(r_buffers[n] is b for n, b in buffers.items())
    assert model[3][0].process_group is None                      # a working SyncBatchNorm again
    assert list(model.state_dict()) == list(sd)
    with tritonbn.count_launches() as launches:
        model[1](torch.randn(4, 4, 5, device=device))
    assert not launches, "restored modules are torch's"


def test_convert_bare_batchnorm_root(device):
    bn = nn.BatchNorm2d(3, device=device)
    weight = bn.weight
    out = tritonbn.convert_model(bn)
    assert out is bn and type(out) is tritonbn.BatchNorm2d and out.weight is weight
    assert type(tritonbn.restore_model(out)) is nn.BatchNorm2d


def test_syncbatchnorm_converted_whatever_the_world_size(monkeypatch, device):
    # tritonbn.SyncBatchNorm synchronizes itself, so conversion no longer depends on the group
    model = nn.Sequential(nn.SyncBatchNorm(4), nn.BatchNorm2d(4)).to(device)
    dist = torch.distributed
    monkeypatch.setattr(dist, "is_available", lambda: True)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    tritonbn.convert_model(model)
    assert type(model[0]) is tritonbn.SyncBatchNorm and type(model[1]) is tritonbn.BatchNorm2d
    tritonbn.restore_model(model)
    assert type(model[0]) is nn.SyncBatchNorm


_HAS_GLOO = torch.distributed.is_available() and torch.distributed.is_gloo_available()


@pytest.mark.skipif(not _HAS_GLOO, reason="needs torch.distributed with gloo")
def test_syncbatchnorm_converted_in_a_one_process_group(device):
    dist = torch.distributed
    assert not dist.is_initialized()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        model = nn.Sequential(nn.SyncBatchNorm(4)).to(device)
        # the reference is plain batch norm: torch's SyncBatchNorm refuses CPU input whenever a
        # process group exists, even of one process
        ref = nn.Sequential(nn.BatchNorm3d(4)).to(device)
        tritonbn.convert_model(model)
        assert type(model[0]) is tritonbn.SyncBatchNorm
        x = torch.randn(3, 4, 2, 3, 2, device=device)  # 5-D: SyncBatchNorm takes any ndim
        with tritonbn.count_launches() as launches:
            y = model(x)
        assert launches
        torch.testing.assert_close(y, ref(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model[0].running_var, ref[0].running_var, atol=1e-6, rtol=1e-6)
    finally:
        dist.destroy_process_group()


STEPS = 3
FP32 = dict(atol=1e-5, rtol=1e-5)


def _grad_error(grads, grads_ref, floor):
    """max over parameters of |g - g_ref| / max(|g_ref|, floor) (2-norms).

    Floored because a conv or linear bias right before a batch norm has a true gradient of
    zero: there both runs give rounding noise (~1e-6 for the Linear before a 4-sample BN).
    """
    worst = 0.0
    for name, g_ref in grads_ref.items():
        diff = (grads[name].double() - g_ref.double()).norm().item()
        worst = max(worst, diff / max(g_ref.double().norm().item(), floor))
    return worst


def _global_grad_error(grads, grads_ref):
    num = sum((grads[n].double() - g.double()).norm().item() ** 2 for n, g in grads_ref.items())
    den = sum(g.double().norm().item() ** 2 for g in grads_ref.values())
    return (num / den) ** 0.5


def _assert_same_buffers(buffers, buffers_ref, **tolerance):
    assert buffers.keys() == buffers_ref.keys()
    for name, b in buffers.items():
        if name.endswith("num_batches_tracked"):
            assert torch.equal(b, buffers_ref[name]), name
        else:
            torch.testing.assert_close(b, buffers_ref[name], **tolerance)


def _train_converted(device, xs, ts, amp_dtype):
    model = tritonbn.convert_model(make_model(device))
    assert {type(m) for m in bn_modules(model)} == {tritonbn.BatchNorm1d, tritonbn.BatchNorm2d}
    with tritonbn.count_launches() as launches:
        run = train(model, xs, ts, amp_dtype)
    # every batch norm ran a forward and a backward kernel in every step
    fwd = launches["bn_fwd_onepass_kernel"] + launches["bn_fwd_apply_kernel"]
    bwd = launches["bn_bwd_onepass_kernel"] + launches["bn_bwd_apply_kernel"]
    assert fwd == bwd == len(bn_modules(model)) * len(xs), launches
    return model, run


def test_converted_resnet_trains_like_torch_fp32(device):
    xs, ts = make_batches(device, STEPS)
    ref = train(make_model(device), xs, ts)
    model, ours = _train_converted(device, xs, ts, None)
    torch.testing.assert_close(ours["losses"], ref["losses"], **FP32)
    # Step 0, same weights and input: every parameter's gradient, to float32 rounding. Later
    # steps start from weights that differ by float32 rounding, and a ReLU input that close to
    # zero can flip: torch against itself, with its weights perturbed by 1e-7, moved one gradient
    # by 1% at step 2 for one seed (global error 3e-3, against 1e-6 without a flip). So later
    # steps are held to a global bound that allows such a flip, and to exact buffers.
    assert _grad_error(ours["grads"][0], ref["grads"][0], floor=0.1) < 1e-4
    for step in range(STEPS):
        assert _global_grad_error(ours["grads"][step], ref["grads"][step]) < 1e-2, step
        _assert_same_buffers(ours["buffers"][step], ref["buffers"][step], **FP32)
    params = torch.cat([p.flatten() for p in ours["params"].values()])
    params_ref = torch.cat([ref["params"][n].flatten() for n in ours["params"]])
    assert (params - params_ref).norm() / params_ref.norm() < 1e-3
    # eval mode with the learned running statistics, after handing the state to torch
    ref_model = make_model(device)
    ref_model.load_state_dict(model.state_dict())
    model.eval(), ref_model.eval()
    with torch.no_grad(), tritonbn.count_launches() as launches:
        y = model(xs[0])
    assert launches["bn_fwd_apply_kernel"] == len(bn_modules(model))
    with torch.no_grad():
        torch.testing.assert_close(y, ref_model(xs[0]), **FP32)


# Mixed precision is torch.autocast (on CPU too): conv and linear run in half precision, so batch
# norm gets half activations with float32 weight, bias and running statistics -- the AMP case the
# kernels are built for. Half-precision training of this tiny model is itself far from float32:
# torch's own bfloat16 run has 5-20% gradient error at step 0, and two runs that differ by one
# rounding drift apart over the steps. So the test has two parts:
#  * layer by layer, at step 0: each batch norm of the converted model, fed the half-precision
#    input and output gradient that torch's batch norm saw, gives torch's output, gradients and
#    running statistics to within a rounding or two of the half dtype (float32 for the sums);
#  * end to end: the first loss agrees closely, gradients are as close to the float32 run as
#    torch's autocast run is, and the later losses stay within the drift of half precision.
# On CPU, float16 often comes out identical to torch's; bfloat16 less so, partly because the Triton
# *interpreter* rounds float32 -> bfloat16 toward zero where a GPU rounds to nearest.
# relative loss differences allowed: at step 0 (a few roundings), and by the last step (drift)
AMP_LOSS_RTOL = {torch.float16: (1e-3, 0.05), torch.bfloat16: (1e-2, 0.15)}


def _record_bn_step(model, x, t, amp_dtype):
    """One forward/backward of torch's model under autocast; per batch norm: its state before the
    step, input, output, grad of input and output, and parameter grads."""
    records, hooks = {}, []
    for name, bn in model.named_modules():
        if isinstance(bn, nn.modules.batchnorm._BatchNorm):
            records[name] = dict(before=copy.deepcopy(bn))

            def hook(bn, args, out, rec=records[name]):
                args[0].retain_grad(), out.retain_grad()
                rec.update(x=args[0], y=out)
            hooks.append(bn.register_forward_hook(hook))
    with torch.autocast(x.device.type, dtype=amp_dtype):
        logits = model(x)
    torch.nn.functional.cross_entropy(logits.float(), t).backward()
    for h in hooks:
        h.remove()
    for name, rec in records.items():
        bn = model.get_submodule(name)
        rec.update(grads={n: p.grad.clone() for n, p in bn.named_parameters()},
                   buffers=dict(bn.named_buffers()))
    return records


@pytest.mark.parametrize("amp_dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_converted_batchnorms_match_torch_layer_by_layer_under_autocast(amp_dtype, device):
    xs, ts = make_batches(device, 1)
    records = _record_bn_step(make_model(device), xs[0], ts[0], amp_dtype)
    assert len(records) == 7
    for name, rec in records.items():
        assert rec["x"].dtype == rec["y"].dtype == amp_dtype, name  # half activations in and out
        ours = tritonbn.convert_model(rec["before"])
        x = rec["x"].detach().clone().requires_grad_()
        with tritonbn.count_launches() as launches:
            with torch.autocast(x.device.type, dtype=amp_dtype):
                y = ours(x)
            y.backward(rec["y"].grad)
        assert launches, name
        m = x.numel() // x.shape[1]
        torch.testing.assert_close(y, rec["y"], **tol(amp_dtype, m), msg=name)
        torch.testing.assert_close(x.grad, rec["x"].grad, **tol(amp_dtype, m), msg=name)
        for n, p in ours.named_parameters():  # float32 sums of half products
            assert p.grad.dtype == torch.float32
            torch.testing.assert_close(p.grad, rec["grads"][n], atol=1e-4, rtol=1e-3, msg=name)
        _assert_same_buffers(dict(ours.named_buffers()), rec["buffers"], **FP32)


@pytest.mark.parametrize("amp_dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_converted_resnet_trains_like_torch_autocast(amp_dtype, device):
    xs, ts = make_batches(device, STEPS)
    exact = train(make_model(device), xs, ts)                 # float32: the yardstick
    ref = train(make_model(device), xs, ts, amp_dtype)        # torch under autocast
    model, ours = _train_converted(device, xs, ts, amp_dtype)
    first, drift = AMP_LOSS_RTOL[amp_dtype]
    torch.testing.assert_close(ours["losses"][0], ref["losses"][0], atol=0, rtol=first)
    grad_err = _global_grad_error(ours["grads"][0], exact["grads"][0])
    grad_err_ref = _global_grad_error(ref["grads"][0], exact["grads"][0])
    assert grad_err <= 2 * grad_err_ref + 0.05, (grad_err, grad_err_ref)
    torch.testing.assert_close(ours["losses"], ref["losses"], atol=0, rtol=drift)
    for step in range(STEPS):  # every batch counted; statistics within half-precision drift
        _assert_same_buffers(ours["buffers"][step], ref["buffers"][step], atol=0.1, rtol=0.1)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(b.dtype == torch.float32 for m in bn_modules(model)
               for b in (m.running_mean, m.running_var))
