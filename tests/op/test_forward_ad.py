"""Forward-mode AD: torch.func.jvp, torch.func.jacfwd and torch.autograd.forward_ad dual tensors
through every op variant, against torch's own forward-mode results for F.batch_norm followed by
the same add and activation, in float64, for every layout. A variant without forward mode must
raise NotImplementedError, never return zeros."""
import functools

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F

import tritonbn
from tests.helpers import make_input

D = torch.float64
TORCH_ACT = {None: lambda z: z, "relu": F.relu, "leaky_relu": lambda z: F.leaky_relu(z, 0.2),
             "silu": F.silu, "gelu": F.gelu, "tanh": torch.tanh, "hardswish": F.hardswish}
LAYOUTS = [((6, 4), "contiguous"), ((5, 3, 7), "contiguous"), ((4, 3, 5, 6), "contiguous"),
           ((4, 3, 5, 6), "channels_last"), ((3, 2, 3, 4, 5), "channels_last"),
           ((6, 3, 4, 5), "sliced")]


def _params(c, device, seed=1):
    g = torch.Generator().manual_seed(seed)
    return ((torch.rand(c, generator=g, dtype=D) + 0.5).to(device),
            torch.randn(c, generator=g, dtype=D).to(device))


def _ours(x, w, b, r, *, training, activation, rm=None, rv=None):
    kwargs = dict(activation=activation, residual=r)
    if activation == "leaky_relu":
        kwargs["negative_slope"] = 0.2
    return tritonbn.batch_norm(x, rm, rv, w, b, training=training, **kwargs)


def _torch(x, w, b, r, *, training, activation, rm=None, rv=None):
    z = F.batch_norm(x, rm, rv, w, b, training=training)
    return TORCH_ACT[activation](z if r is None else z + r)


@pytest.mark.parametrize("shape,layout", LAYOUTS, ids=[f"{len(s)}d-{l}" for s, l in LAYOUTS])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_jvp_in_every_layout_matches_torch(shape, layout, training, device):
    x = make_input(shape, D, layout, device, seed=2)
    t = make_input(shape, D, layout, device, seed=3)
    w, b = _params(shape[1], device)
    rm, rv = (None, None) if training else (torch.randn(shape[1], dtype=D, device=device),
                                            torch.rand(shape[1], dtype=D, device=device) + 0.5)
    with tritonbn.count_launches() as launches:
        y, ty = torch.func.jvp(lambda x: _ours(x, w, b, None, training=training, activation=None,
                                               rm=rm, rv=rv), (x,), (t,))
    y_ref, ty_ref = torch.func.jvp(lambda x: _torch(x, w, b, None, training=training,
                                                    activation=None, rm=rm, rv=rv), (x,), (t,))
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(ty, ty_ref)
    assert ty.abs().max() > 0.1
    # the tangent came from the backward kernels (and y from the forward ones)
    assert any(k.startswith("bn_bwd") for k in launches) and any(
        k.startswith("bn_fwd") for k in launches)


@pytest.mark.parametrize("activation", list(TORCH_ACT))
@pytest.mark.parametrize("with_residual", [False, True], ids=["", "residual"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_jvp_of_every_input_with_the_fused_epilogue(activation, with_residual, training, device):
    shape = (4, 3, 5, 6)
    x = make_input(shape, D, "channels_last", device, seed=4)
    r = make_input(shape, D, "channels_last", device, seed=5) if with_residual else None
    w, b = _params(3, device)
    rm, rv = (None, None) if training else (torch.randn(3, dtype=D, device=device),
                                            torch.rand(3, dtype=D, device=device) + 0.5)
    primals = (x, w, b) + ((r,) if with_residual else ())
    tangents = tuple(torch.randn_like(p) for p in primals)

    def call(fn):
        return lambda x, w, b, r=None: fn(x, w, b, r, training=training, activation=activation,
                                          rm=rm, rv=rv)

    y, ty = torch.func.jvp(call(_ours), primals, tangents)
    y_ref, ty_ref = torch.func.jvp(call(_torch), primals, tangents)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(ty, ty_ref)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_jacfwd_matches_torch_and_jacrev(training, device):
    x = make_input((4, 2, 3), D, "contiguous", device, seed=6)
    w, b = _params(2, device)
    rm, rv = torch.zeros(2, dtype=D, device=device), torch.ones(2, dtype=D, device=device)
    f = functools.partial(_ours, w=w, b=b, r=None, training=training, activation="silu",
                          rm=rm.clone(), rv=rv.clone())
    g = functools.partial(_torch, w=w, b=b, r=None, training=training, activation="silu",
                          rm=rm.clone(), rv=rv.clone())
    jac = torch.func.jacfwd(f)(x)
    torch.testing.assert_close(jac, torch.func.jacfwd(g)(x))
    torch.testing.assert_close(jac, torch.autograd.functional.jacobian(f, x))


def test_forward_ad_dual_tensors_carry_the_tangent(device):
    x = make_input((4, 3, 5, 6), D, "contiguous", device, seed=7)
    t = torch.randn_like(x)
    w, b = _params(3, device)
    tw = torch.randn_like(w)
    rm, rv = torch.zeros(3, dtype=D, device=device), torch.ones(3, dtype=D, device=device)
    rm_t, rv_t = rm.clone(), rv.clone()
    with fwAD.dual_level():
        y = tritonbn.batch_norm(fwAD.make_dual(x, t), rm, rv, fwAD.make_dual(w, tw), b,
                                training=True, activation="relu")
        ty = fwAD.unpack_dual(y).tangent
        y_ref = F.relu(F.batch_norm(fwAD.make_dual(x, t), rm_t, rv_t, fwAD.make_dual(w, tw), b,
                                    training=True))
        ty_ref = fwAD.unpack_dual(y_ref).tangent
    assert ty is not None
    torch.testing.assert_close(ty, ty_ref)
    # the running statistics were updated once, as torch's were
    torch.testing.assert_close(rm, rm_t)
    torch.testing.assert_close(rv, rv_t)


def _dual_jvp(f, x, t):
    """(y, tangent) through forward_ad dual tensors: what a training-mode module takes (like
    torch's, it counts batches in place, which torch.func transforms refuse)."""
    with fwAD.dual_level():
        y = f(fwAD.make_dual(x, t))
        primal, tangent = fwAD.unpack_dual(y)
    return primal, tangent


def test_module_variants_per_activation_renorm_frozen(device):
    """The modules route through the same op: per-activation mode, batch renorm (r and d are
    constants, as in its backward) and frozen batch norm each give torch's tangent."""
    x = make_input((6, 3, 4, 5), D, "contiguous", device, seed=8)
    t = torch.randn_like(x)

    per_act = tritonbn.BatchNormPerActivation2d(3, (4, 5)).to(device, D)
    with torch.no_grad():
        per_act.weight.uniform_(0.5, 1.5)
    ref = lambda x: F.batch_norm(x.reshape(6, -1), None, None, per_act.weight.reshape(-1),  # noqa: E731
                                 per_act.bias.reshape(-1), training=True).reshape(x.shape)
    torch.testing.assert_close(_dual_jvp(per_act, x, t)[1], torch.func.jvp(ref, (x,), (t,))[1])

    renorm = tritonbn.BatchRenorm2d(3, rmax=1.5, dmax=0.5).to(device, D)
    with torch.no_grad():
        renorm.running_mean.uniform_(-1, 1)
        renorm.running_var.uniform_(0.2, 0.4)     # far enough from the batch for r, d to clip
    rm, rv = renorm.running_mean.clone(), renorm.running_var.clone()

    def renorm_ref(x):
        mean, var = x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False)
        sigma, running_sigma = (var + 1e-5).sqrt(), (rv + 1e-5).sqrt()
        r = (sigma / running_sigma).clamp(1 / 1.5, 1.5).detach().view(1, 3, 1, 1)
        d = ((mean - rm) / running_sigma).clamp(-0.5, 0.5).detach().view(1, 3, 1, 1)
        x_hat = (x - mean.view(1, 3, 1, 1)) / sigma.view(1, 3, 1, 1)
        return renorm.weight.view(1, 3, 1, 1) * (x_hat * r + d) + renorm.bias.view(1, 3, 1, 1)

    y, ty = _dual_jvp(renorm, x, t)
    y_ref, ty_ref = torch.func.jvp(renorm_ref, (x,), (t,))
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(ty, ty_ref)

    frozen = tritonbn.FrozenBatchNorm2d(3).to(device, D)
    with torch.no_grad():
        frozen.weight.uniform_(0.5, 1.5)
        frozen.running_var.uniform_(0.5, 2)
    scale = frozen.weight * (frozen.running_var + frozen.eps).rsqrt()
    for mode in (True, False):
        frozen.train(mode)
        ty = torch.func.jvp(frozen, (x,), (t,))[1]
        torch.testing.assert_close(ty, t * scale.view(1, 3, 1, 1))


def test_half_precision_tangent_is_close_to_float64(device):
    x64 = make_input((8, 4, 6, 6), D, "channels_last", device, seed=9)
    t64 = torch.randn_like(x64)
    w, b = _params(4, device)
    w, b = w.float(), b.float()
    f = lambda x: tritonbn.batch_norm(x, None, None, w, b, training=True)  # noqa: E731
    ty = torch.func.jvp(f, (x64.half(),), (t64.half(),))[1]
    ty_ref = torch.func.jvp(lambda x: F.batch_norm(x, None, None, w.double(), b.double(),
                                                   training=True), (x64,), (t64,))[1]
    assert ty.dtype == torch.float16
    torch.testing.assert_close(ty.double(), ty_ref, atol=1e-2, rtol=1e-2)


def test_jacrev_matches_and_second_order_forward_mode_raises(device):
    """jacrev (vmap over the backward) matches torch; forward mode through the backward
    (hessian = jacfwd(jacrev)) has no formula: it raises, where it used to return a second
    derivative missing the batch norm's terms."""
    x = make_input((4, 2, 3), D, "contiguous", device, seed=10)
    f = lambda x: tritonbn.batch_norm(x, None, None, training=True).pow(3).sum()  # noqa: E731
    g = lambda x: F.batch_norm(x, None, None, training=True).pow(3).sum()  # noqa: E731
    torch.testing.assert_close(torch.func.jacrev(f)(x), torch.func.jacrev(g)(x))
    with pytest.raises(NotImplementedError, match="forward-mode AD through batch norm's back"):
        torch.func.hessian(f)(x)


def test_synchronized_forward_mode_raises_not_implemented(device):
    from tritonbn import ops
    from tritonbn.options import ForwardArgs, Options

    o = Options(training=True, group="world")
    x = torch.randn(4, 2, 3, dtype=D, device=device)
    saved = (x, None, None, None, x.new_zeros(2), x.new_ones(2), None)
    with pytest.raises(NotImplementedError, match="synchronized"):
        ops.tangent(o, saved, ForwardArgs(torch.ones_like(x)))
