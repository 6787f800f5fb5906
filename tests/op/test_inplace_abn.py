"""In-place activated batch norm (tritonbn.inplace_abn, the InPlaceABN modules): y =
act(BN(x) + residual) saving only y, whose backward recovers x_hat from it.

Covered: float64 parity with torch (F.batch_norm + residual + leaky_relu / elu / identity) for
the output, every gradient and the running statistics, on every layout and on forced one-pass,
split and merged-split plans (count_launches proves which kernels ran); the half-precision
gradient error next to torch's own; in-place semantics (storage, versions, leaves, no_grad,
a node that saved x); retain_graph; the |gamma| >= eps floor; torch.compile; activation
checkpointing; argument errors; two-process synchronization; the modules."""
import math

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import tritonbn
from tritonbn.plan import forced_plan
from tests.helpers import make_input
from tests.op import inplace_abn_sync_worker

F64 = torch.float64
ACTS = [("leaky_relu", 0.01), ("elu", 0.7), ("identity", 0.0)]


def _act(z, activation, param):
    if activation == "leaky_relu":
        return F.leaky_relu(z, param)
    if activation == "elu":
        return F.elu(z, param)
    return z


def torch_abn(x, w, b, rm, rv, training, momentum, eps, activation, param, residual=None):
    """torch's own batch norm, residual add and activation."""
    z = F.batch_norm(x, rm, rv, w, b, training, momentum, eps)
    return _act(z if residual is None else z + residual, activation, param)


def rel_err(got, want) -> float:
    """max |got - want| / max |want| (inf where want is all zero and got is not)."""
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    assert got.shape == want.shape, (got.shape, want.shape)
    diff = (got - want).abs().max().item() if want.numel() else 0.0
    scale = want.abs().max().item() if want.numel() else 0.0
    return 0.0 if diff == 0 else diff / scale if scale > 0 else math.inf


def _params(c, dtype, device, seed):
    """gamma with both signs, away from the floor; beta; running statistics."""
    g = torch.Generator().manual_seed(seed)
    w = (torch.rand(c, generator=g) + 0.5) * torch.where(torch.arange(c) % 3 == 1, -1.0, 1.0)
    b = torch.randn(c, generator=g) * 0.5
    rm = torch.randn(c, generator=g) * 0.3
    rv = torch.rand(c, generator=g) + 0.5
    return [t.to(device=device, dtype=dtype) for t in (w, b, rm, rv)]


def _run_pair(shape, layout, device, training, activation, param, with_residual, seed=0,
              momentum=0.3):
    """tritonbn.inplace_abn and torch on the same float64 inputs; forward and backward launches
    counted separately. Returns (ours, torch's, forward launches, backward launches), each side
    a dict of y, the gradients and the running statistics."""
    x = make_input(shape, F64, layout, device, scale=2.0, shift=0.5, seed=seed)
    dy = make_input(shape, F64, "contiguous", device, scale=1.0, shift=0.0, seed=seed + 1)
    res = make_input(shape, F64, "contiguous", device, scale=1.0, shift=0.0, seed=seed + 2) \
        if with_residual else None
    w, b, rm, rv = _params(shape[1], F64, device, seed)
    sides = {}
    for who in ("ours", "torch"):
        xl = x.detach().clone().requires_grad_()
        wl, bl = w.clone().requires_grad_(), b.clone().requires_grad_()
        rl = None if res is None else res.clone().requires_grad_()
        rml, rvl = rm.clone(), rv.clone()
        if who == "ours":
            xi = xl * 1                  # a non-leaf, written over in place
            assert xi.stride() == xl.stride()
            with tritonbn.count_launches() as fwd:
                y = tritonbn.inplace_abn(xi, wl, bl, rml, rvl, training, momentum, 1e-5,
                                         activation, param, residual=rl)
            assert y.data_ptr() == xi.data_ptr(), "a plain eager call writes y over x"
            with tritonbn.count_launches() as bwd:
                y.backward(dy)
        else:
            y = torch_abn(xl, wl, bl, rml, rvl, training, momentum, 1e-5, activation, param, rl)
            y.backward(dy)
        sides[who] = dict(y=y.detach(), dx=xl.grad, dw=wl.grad, db=bl.grad, rm=rml, rv=rvl)
        if rl is not None:
            sides[who]["dres"] = rl.grad
    if not training:      # eval leaves the running statistics alone
        assert torch.equal(sides["ours"]["rm"], rm) and torch.equal(sides["ours"]["rv"], rv)
    return sides["ours"], sides["torch"], dict(fwd), dict(bwd)


def _assert_parity(ours, ref, bound=1e-9):
    assert ours.keys() == ref.keys()
    errors = {k: rel_err(ours[k], ref[k]) for k in ref}
    assert all(v <= bound for v in errors.values()), \
        f"relative errors above {bound:g}: { {k: f'{v:.2e}' for k, v in errors.items()} }"


# ------------------------------------------------------------------------ 1. float64 parity

LAYOUTS = [((4, 3, 5, 6), "contiguous"), ((3, 5, 4, 3), "channels_last"),
           ((29, 6), "contiguous"), ((4, 3, 10), "contiguous")]


@pytest.mark.parametrize("shape,layout", LAYOUTS,
                         ids=[f"{lay}-{'x'.join(map(str, s))}" for s, lay in LAYOUTS])
@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("activation,param", ACTS, ids=[a for a, _ in ACTS])
def test_float64_parity_with_torch(shape, layout, with_residual, training, activation, param,
                                   device):
    ours, ref, _, bwd = _run_pair(shape, layout, device, training, activation, param,
                                  with_residual, seed=sum(shape))
    assert bwd and all(k.startswith("bn_bwd_") for k in bwd), bwd
    _assert_parity(ours, ref)


SPLIT_FWD = {"bn_stats_partial_kernel": 1, "bn_fwd_apply_kernel": 1}
SPLIT_BWD = {"bn_bwd_partial_kernel": 1, "bn_bwd_apply_kernel": 1}
MERGE = {"bn_merge_partials_kernel": 1}
ONEPASS_FWD, ONEPASS_BWD = {"bn_fwd_onepass_kernel": 1}, {"bn_bwd_onepass_kernel": 1}
# (shape, layout, forced plan, activation, training's forward launches, backward launches --
# the same in eval, where gamma's and beta's gradients need the sums as well)
PLANS = [
    ((4, 3, 5, 7), "contiguous", dict(variant="onepass"), "leaky_relu", ONEPASS_FWD,
     ONEPASS_BWD),
    ((4, 12, 3, 3), "channels_last", dict(variant="onepass", block_c=4), "elu", ONEPASS_FWD,
     ONEPASS_BWD),
    ((37, 6), "contiguous", dict(variant="onepass"), "identity", ONEPASS_FWD, ONEPASS_BWD),
    # NCHW, 12 tiles per channel in 4 splits
    ((5, 3, 7, 9), "contiguous", dict(variant="split", block_n=2, block_s=16, splits=4), "elu",
     SPLIT_FWD, SPLIT_BWD),
    # channels_last, 70 channels in blocks of 64 (the second partial), 2 splits
    ((5, 70, 3, 5), "channels_last", dict(variant="split", block_n=1, block_s=16, splits=2),
     "leaky_relu", SPLIT_FWD, SPLIT_BWD),
    # 2-D (N, C), channels-minor rows in 3 splits
    ((37, 70), "contiguous", dict(variant="split", block_n=1, block_s=8, block_c=32, splits=3),
     "identity", SPLIT_FWD, SPLIT_BWD),
    # 3-D (N, C, L) in 3 splits
    ((5, 3, 40), "contiguous", dict(variant="split", block_n=1, block_s=8, splits=3),
     "leaky_relu", SPLIT_FWD, SPLIT_BWD),
    # 18 splits x 64 channels > plan.MERGE_IN_APPLY: the partials are merged in a launch of
    # their own, forward and backward
    ((2, 70, 3, 6), "channels_last",
     dict(variant="split", block_n=1, block_s=2, block_c=64, splits=18), "elu",
     {**SPLIT_FWD, **MERGE}, {**SPLIT_BWD, **MERGE}),
]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape,layout,plan,activation,fwd,bwd", PLANS,
                         ids=[f"{c[2]['variant']}-{c[1]}-{'x'.join(map(str, c[0]))}"
                              for c in PLANS])
def test_float64_parity_on_forced_plans(shape, layout, plan, activation, fwd, bwd, training,
                                        device):
    param = dict(ACTS)[activation]
    with forced_plan(**plan):
        ours, ref, got_fwd, got_bwd = _run_pair(shape, layout, device, training, activation,
                                                param, True, seed=len(shape) + shape[1])
    # eval's forward is one element-wise pass whatever the plan
    assert got_fwd == (fwd if training else {"bn_fwd_apply_kernel": 1})
    assert got_bwd == bwd
    _assert_parity(ours, ref)


# -------------------------------------------------------------- 2. half and single precision

def _gradient_errors(dtype, activation, param, shape, layout, seed, with_residual, device):
    """Relative errors of (dx, dw, db[, dres]) against float64 on the same (rounded) inputs:
    tritonbn.inplace_abn in ``dtype``, and torch's batch norm + activation in ``dtype``.
    Parameters and running statistics float32, as in mixed-precision training."""
    g = torch.Generator().manual_seed(seed)
    c = shape[1]
    x = (torch.randn(shape, generator=g) * 2 + 0.5).to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    dy = torch.randn(shape, generator=g).to(dtype)
    res = torch.randn(shape, generator=g).to(dtype) if with_residual else None
    w = (torch.rand(c, generator=g) + 0.5) * torch.where(torch.rand(c, generator=g) < 0.25,
                                                          -1.0, 1.0)
    b = torch.randn(c, generator=g) * 0.5
    grads = {}
    for who in ("ours", "torch", "float64"):
        dt, pt = (F64, F64) if who == "float64" else (dtype, torch.float32)
        xl = x.to(device=device, dtype=dt).clone().requires_grad_()
        wl = w.to(device=device, dtype=pt).clone().requires_grad_()
        bl = b.to(device=device, dtype=pt).clone().requires_grad_()
        rl = None if res is None else res.to(device=device, dtype=dt).clone().requires_grad_()
        rm = torch.zeros(c, device=device, dtype=pt)
        rv = torch.ones(c, device=device, dtype=pt)
        if who == "ours":
            y = tritonbn.inplace_abn(xl * 1, wl, bl, rm, rv, True, 0.1, 1e-5, activation, param,
                                     residual=rl)
        else:
            y = torch_abn(xl, wl, bl, rm, rv, True, 0.1, 1e-5, activation, param, rl)
        y.backward(dy.to(device=device, dtype=dt))
        grads[who] = [xl.grad, wl.grad, bl.grad] + ([rl.grad] if rl is not None else [])
    ours = [rel_err(a, r) for a, r in zip(grads["ours"], grads["float64"])]
    theirs = [rel_err(a, r) for a, r in zip(grads["torch"], grads["float64"])]
    return ours, theirs


# (shape, layout) x 3 seeds per test; the residual on even seeds
LOW_CASES = [((8, 4, 6, 6), "contiguous"), ((6, 5, 4, 4), "channels_last"), ((64, 8), "contiguous")]
NAMES = ("dx", "dw", "db", "dres")
# err_ours <= K * err_torch + A * finfo(dtype).eps: (K, A) for the input-shaped gradients (dx,
# dres) and for the parameters' (dw, db), every dtype. See the test's docstring.
LOW_BOUNDS = dict(input=(3.0, 2.0), param=(4.0, 4.0))


@pytest.mark.parametrize("activation,param", ACTS, ids=[a for a, _ in ACTS])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32],
                         ids=["float16", "bfloat16", "float32"])
def test_low_precision_gradient_error_next_to_torch(dtype, activation, param, device):
    """The gradients' error against float64 on the same inputs, next to torch's own error in
    the same dtype (torch's batch norm + activation, which saves x itself). Error: max |g -
    g64| / max |g64| per gradient; eps: torch.finfo(dtype).eps.

    Measured (CPU, interpreter) over LOW_CASES' 3 shapes x 10 seeds, gamma of both signs with
    |gamma| in [0.5, 1.5), beta ~ N(0, 0.25), x ~ N(0.5, 4), the residual on even seeds;
    ratio = ours / torch's, "max (median)", and ours' largest error in eps:

      * dx: float16 1.1 (1.0) for leaky_relu and identity, 5.2 (1.0) for elu, at most 1.9 eps;
        bfloat16 4.3 (1.7-1.9), at most 2.2 eps; float32 2.6 (1.0-1.3), at most 1.9 eps.
        dres: float16 1.5, bfloat16 3.7, float32 3.6 (identity: grad_y itself, both exact).
        x_hat is recovered from y rounded to the dtype; elu's inverse log(1 + y / alpha) loses
        most where y nears -alpha, so elu's dx errs most.
      * dw: the sum over the recovered x_hat carries y's rounding, which torch's (over exact x,
        in float32) has not: up to 1.6 eps (float16), 2.0 eps (bfloat16). Ratios: leaky_relu
        median 140 / 220, max 470 / 700 (float16 / bfloat16); identity, whose dw torch gets
        exact to float32, median 2,000 / 28,000; elu, whose half-precision backward costs torch
        as much, 4-15. db: at most 0.35 eps, ratio at most 3.1 / 6.7 (identity: torch exact,
        ours within 0.01 eps). float32: dw and db within 4.4 eps, ratio up to 12 (median 1.0
        to 2.2).

    Asserted, every dtype: dx, dres <= 3 x torch's + 2 eps; dw, db <= 4 x torch's + 4 eps. Over
    those 10 seeds the largest share of the bound used is 0.62 (float16 dx) and 0.69 (float32
    dw); a wrong recovery errs by O(1).
    """
    eps = torch.finfo(dtype).eps
    worst, failures = {}, []
    for shape, layout in LOW_CASES:
        for seed in range(3):
            ours, theirs = _gradient_errors(dtype, activation, param, shape, layout, seed,
                                            seed % 2 == 0, device)
            for name, e_ours, e_torch in zip(NAMES, ours, theirs):
                k, a = LOW_BOUNDS["input" if name in ("dx", "dres") else "param"]
                ratio = e_ours / e_torch if e_torch > 0 else (0.0 if e_ours == 0 else math.inf)
                w = worst.setdefault(name, [0.0, 0.0])
                w[0], w[1] = max(w[0], ratio), max(w[1], e_ours / eps)
                if not e_ours <= k * e_torch + a * eps:
                    failures.append(f"{name} {shape} {layout} seed {seed}: ours {e_ours:.2e}, "
                                    f"torch {e_torch:.2e}, bound {k} x torch + {a} eps")
    summary = ", ".join(f"{n}: ratio {r:.2f}, {e:.2f} eps" for n, (r, e) in worst.items())
    assert not failures, f"{dtype} {activation}: " + "; ".join(failures) + f" | worst {summary}"


def test_float16_elu_far_below_zero_stays_bounded(device):
    # With beta = -7 most pre-activations z lie where float16 has rounded y = alpha (e^z - 1)
    # to -alpha: z is lost there, and the inverse takes log(eps of float16) ~ -6.9 instead of
    # log(2^-126). Measured dx error against float64: 0.09 (torch's own float16: 0.001; 2.03
    # with the 2^-126 floor). The bound is what the floor buys, not torch's accuracy.
    g = torch.Generator().manual_seed(40)
    x64 = torch.randn(8, 4, 8, 8, generator=g, dtype=F64)
    dy64 = torch.randn(8, 4, 8, 8, generator=g, dtype=F64)
    w, b = torch.full((4,), 1.0, device=device), torch.full((4,), -7.0, device=device)
    grads = []
    for dtype in (torch.float16, F64):
        x = x64.to(device=device, dtype=dtype).requires_grad_()
        pw, pb = (w, b) if dtype is torch.float16 else (w.double(), b.double())
        if dtype is torch.float16:
            y = tritonbn.inplace_abn(x * 1, pw, pb, None, None, activation="elu",
                                     activation_param=1.0)
        else:
            y = torch_abn(x, pw, pb, None, None, True, 0.1, 1e-5, "elu", 1.0)
        y.backward(dy64.to(device=device, dtype=dtype))
        grads.append(x.grad.double())
    err = ((grads[0] - grads[1]).norm() / grads[1].norm()).item()
    assert err < 0.15, err


# ---------------------------------------------------------------------- 3. in-place semantics

def _abn_args(c, device, dtype=torch.float32, requires_grad=True):
    w, b, rm, rv = _params(c, dtype, device, seed=7)
    return w.requires_grad_(requires_grad), b.requires_grad_(requires_grad), rm, rv


def test_nonleaf_input_is_overwritten_and_returned(device):
    leaf = make_input((4, 3, 5, 6), torch.float32, "contiguous", device, seed=11).requires_grad_()
    w, b, rm, rv = _abn_args(3, device)
    expected = tritonbn.inplace_abn(leaf.detach().clone(), w.detach(), b.detach(), rm.clone(),
                                    rv.clone(), activation="elu", activation_param=1.0,
                                    inplace=False)
    x = leaf * 1
    version, ptr = x._version, x.data_ptr()
    y = tritonbn.inplace_abn(x, w, b, rm, rv, activation="elu", activation_param=1.0)
    assert y is x and y.data_ptr() == ptr and x._version > version
    assert torch.equal(y.detach(), expected)
    # and autograd goes through it to the leaf
    y.sum().backward()
    assert leaf.grad is not None and torch.isfinite(leaf.grad).all() and leaf.grad.abs().sum() > 0


def test_leaf_requiring_grad_gets_a_new_tensor(device):
    x = make_input((4, 3, 5, 6), torch.float32, "channels_last", device, seed=12).requires_grad_()
    before = x.detach().clone()
    w, b, rm, rv = _abn_args(3, device)
    y = tritonbn.inplace_abn(x, w, b, rm, rv)
    assert y.data_ptr() != x.data_ptr() and torch.equal(x.detach(), before)
    # the same values and gradient as a non-leaf written over in place
    x2 = before.clone().requires_grad_()
    w2, b2 = w.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    y2 = tritonbn.inplace_abn(x2 * 1, w2, b2, rm.clone(), rv.clone())
    assert torch.equal(y.detach(), y2.detach())
    g = torch.randn_like(before)
    y.backward(g)
    y2.backward(g)
    assert torch.equal(x.grad, x2.grad) and torch.equal(w.grad, w2.grad)


def test_view_of_a_leaf_requiring_grad_gets_a_new_tensor(device):
    big = make_input((8, 3, 5, 6), torch.float32, "contiguous", device, seed=19).requires_grad_()
    x = big[::2]                                # a plane view, but of a leaf
    before = x.detach().clone()
    w, b, rm, rv = _abn_args(3, device)
    y = tritonbn.inplace_abn(x, w, b, rm, rv)
    assert y.data_ptr() != x.data_ptr() and torch.equal(x.detach(), before)
    y.sum().backward()
    assert big.grad[1::2].abs().sum() == 0 and big.grad[::2].abs().sum() > 0


def test_inplace_false_never_touches_the_input(device):
    x = make_input((4, 3, 5, 6), torch.float32, "contiguous", device, seed=13) \
        .requires_grad_() * 1
    before, version = x.detach().clone(), x._version
    w, b, rm, rv = _abn_args(3, device)
    y = tritonbn.inplace_abn(x, w, b, rm, rv, inplace=False)
    assert y.data_ptr() != x.data_ptr() and x._version == version
    assert torch.equal(x.detach(), before)
    y.sum().backward()
    assert torch.equal(x.detach(), before)


def test_no_grad_on_a_plain_leaf_writes_in_place(device):
    x = make_input((4, 3, 5, 6), torch.float32, "contiguous", device, seed=14)
    w, b, rm, rv = _abn_args(3, device)
    expected = tritonbn.inplace_abn(x.clone(), w.detach(), b.detach(), rm.clone(), rv.clone(),
                                    inplace=False)
    ptr, version = x.data_ptr(), x._version
    with torch.no_grad():
        y = tritonbn.inplace_abn(x, w, b, rm, rv)
    assert y.data_ptr() == ptr and x._version > version
    assert torch.equal(x, expected) and torch.equal(y, expected)


def test_plain_input_with_trainable_parameters_is_overwritten(device):
    # x needs no gradient (e.g. the first layer's data) but gamma and beta do
    x = make_input((4, 3, 5, 6), F64, "contiguous", device, seed=15)
    x_copy = x.clone()
    w, b, rm, rv = _abn_args(3, device, F64)
    y = tritonbn.inplace_abn(x, w, b, rm, rv, activation="leaky_relu", activation_param=0.1)
    assert y.data_ptr() == x.data_ptr()
    dy = torch.randn_like(x_copy)
    y.backward(dy)
    w2, b2 = w.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    torch_abn(x_copy, w2, b2, None, None, True, 0.1, 1e-5, "leaky_relu", 0.1).backward(dy)
    assert rel_err(w.grad, w2.grad) <= 1e-9 and rel_err(b.grad, b2.grad) <= 1e-9


def test_input_without_a_plane_view_gets_a_new_tensor(device):
    # last two dims swapped in memory: the kernels cannot write through these strides
    x = make_input((4, 3, 5, 6), torch.float32, "transposed", device, seed=16)
    x = x.requires_grad_() * 1
    before = x.detach().clone()
    w, b, rm, rv = _abn_args(3, device)
    y = tritonbn.inplace_abn(x, w, b, rm, rv)
    assert y.data_ptr() != x.data_ptr() and torch.equal(x.detach(), before)
    ref = torch_abn(before, w.detach(), b.detach(), None, None, True, 0.1, 1e-5, "leaky_relu",
                    0.01)
    assert rel_err(y, ref) <= 1e-5


def test_the_input_as_its_own_residual_gets_a_new_tensor(device):
    # the backward reads the residual: overwriting x would change it (silently wrong gradients)
    x0 = make_input((4, 3, 4, 4), F64, "contiguous", device, seed=30)
    dy = make_input((4, 3, 4, 4), F64, "contiguous", device, seed=31)
    w, b, _, _ = _params(3, F64, device, 30)
    grads = []
    for ours in (True, False):
        x = x0.clone().requires_grad_()
        h = x * 1.0
        y = tritonbn.inplace_abn(h, w, b, None, None, residual=h) if ours else \
            torch_abn(h, w, b, None, None, True, 0.1, 1e-5, "leaky_relu", 0.01, residual=h)
        if ours:
            assert y.data_ptr() != h.data_ptr() and torch.equal(h.detach(), x0)
        y.backward(dy)
        grads.append((y.detach(), x.grad))
    for got, want in zip(*grads):
        assert rel_err(got, want) <= 1e-9


def test_an_expanded_input_gets_a_new_tensor(device):
    # stride 0: several elements at one address, which one program could overwrite before
    # another reads it
    x = make_input((1, 3, 4, 4), F64, "contiguous", device, seed=32).expand(4, 3, 4, 4)
    w, b, _, _ = _params(3, F64, device, 32)
    with forced_plan(variant="split", block_n=1, block_s=16, splits=4):
        y = tritonbn.inplace_abn(x, w, b, None, None)
    assert y.data_ptr() != x.data_ptr()
    want = torch_abn(x.contiguous(), w, b, None, None, True, 0.1, 1e-5, "leaky_relu", 0.01)
    assert rel_err(y, want) <= 1e-9


def test_node_that_saved_the_input_raises_in_backward(device):
    leaf = make_input((4, 3, 5, 6), torch.float32, "contiguous", device, seed=17).requires_grad_()
    w, b, rm, rv = _abn_args(3, device)
    x = leaf * 1
    s = x.sin()                                 # saves x for its backward
    y = tritonbn.inplace_abn(x, w, b, rm, rv)   # overwrites x
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (s.sum() + y.sum()).backward()


def test_output_modified_after_the_call_raises_in_backward(device):
    # y is what backward recovers x_hat from: an in-place change to it is caught
    leaf = make_input((4, 3, 5, 6), torch.float32, "contiguous", device, seed=18).requires_grad_()
    w, b, rm, rv = _abn_args(3, device)
    y = tritonbn.inplace_abn(leaf * 1, w, b, rm, rv)
    y.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


# ------------------------------------------------------------------------- 4. retain_graph

def test_two_backward_passes_through_one_graph_agree(device):
    shape = (4, 6, 5, 5)
    x = make_input(shape, F64, "channels_last", device, seed=21)
    res = make_input(shape, F64, "contiguous", device, seed=22).requires_grad_()
    w, b, rm, rv = _abn_args(6, device, F64)
    xl = x.clone().requires_grad_()
    y = tritonbn.inplace_abn(xl * 1, w, b, rm, rv, activation="elu", activation_param=1.0,
                             residual=res)
    y_before = y.detach().clone()
    dy = torch.randn_like(x)
    first = torch.autograd.grad(y, (xl, w, b, res), dy, retain_graph=True)
    second = torch.autograd.grad(y, (xl, w, b, res), dy)
    assert all(torch.equal(g1, g2) for g1, g2 in zip(first, second))
    assert torch.equal(y.detach(), y_before)
    # and they are the right gradients
    x2, w2, b2 = x.clone().requires_grad_(), w.detach().clone().requires_grad_(), \
        b.detach().clone().requires_grad_()
    r2 = res.detach().clone().requires_grad_()
    y2 = torch_abn(x2, w2, b2, None, None, True, 0.1, 1e-5, "elu", 1.0, r2)
    ref = torch.autograd.grad(y2, (x2, w2, b2, r2), dy)
    errors = [rel_err(g, r) for g, r in zip(first, ref)]
    assert max(errors) <= 1e-9, errors


# ------------------------------------------------------------------------- 5. gamma's floor

@pytest.mark.parametrize("activation,param", ACTS[:2], ids=[a for a, _ in ACTS[:2]])
def test_gamma_below_eps_is_raised_to_eps_with_its_sign(activation, param, device):
    eps = 1e-5
    w = torch.tensor([0.0, 1e-7, -1e-7, 1.3, -0.8], dtype=F64, device=device)
    floored = torch.tensor([eps, eps, -eps, 1.3, -0.8], dtype=F64, device=device)
    c = w.numel()
    x = make_input((6, c, 4, 3), F64, "contiguous", device, seed=31)
    b = torch.linspace(-0.5, 0.5, c, dtype=F64, device=device)
    dy = torch.randn(x.shape, dtype=F64, generator=torch.Generator().manual_seed(32)).to(device)

    xl, wl, bl = x.clone().requires_grad_(), w.clone().requires_grad_(), b.clone().requires_grad_()
    y = tritonbn.inplace_abn(xl * 1, wl, bl, None, None, True, 0.1, eps, activation, param)
    y.backward(dy)
    for t in (y, xl.grad, wl.grad, bl.grad):
        assert torch.isfinite(t).all()

    x2, w2, b2 = x.clone().requires_grad_(), floored.clone().requires_grad_(), \
        b.clone().requires_grad_()
    y2 = torch_abn(x2, w2, b2, None, None, True, 0.1, eps, activation, param)
    y2.backward(dy)
    assert rel_err(y, y2) <= 1e-9
    # gamma's gradient passes straight through the floor: that of the floored gamma. Where
    # gamma = eps, x_hat is recovered through a division by eps, which amplifies y's rounding
    # by ~|beta| / eps (to ~1e-11 relative here, per channel, in float64)
    assert rel_err(xl.grad, x2.grad) <= 1e-9 and rel_err(bl.grad, b2.grad) <= 1e-9
    assert rel_err(wl.grad, w2.grad) <= 1e-9
    for ch in range(c):
        assert rel_err(xl.grad[:, ch], x2.grad[:, ch]) <= 1e-9, ch
        assert rel_err(wl.grad[ch], w2.grad[ch]) <= 1e-8, ch


def test_gamma_at_or_above_eps_is_used_as_is(device):
    eps = 1e-5
    w = torch.tensor([eps, -eps, 2 * eps, 1.0, -3.0], dtype=F64, device=device)
    c = w.numel()
    x = make_input((6, c, 4, 3), F64, "contiguous", device, seed=33)
    b = torch.linspace(-0.2, 0.2, c, dtype=F64, device=device)
    y = tritonbn.inplace_abn(x.clone(), w, b, None, None, True, 0.1, eps, "leaky_relu", 0.01)
    ref = torch_abn(x, w, b, None, None, True, 0.1, eps, "leaky_relu", 0.01)
    assert rel_err(y, ref) <= 1e-9
    dy = torch.randn(x.shape, dtype=F64, generator=torch.Generator().manual_seed(34)).to(device)
    xl, wl = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = tritonbn.inplace_abn(xl * 1, wl, b, None, None, True, 0.1, eps, "leaky_relu", 0.01)
    y.backward(dy)
    x2, w2 = x.clone().requires_grad_(), w.clone().requires_grad_()
    torch_abn(x2, w2, b, None, None, True, 0.1, eps, "leaky_relu", 0.01).backward(dy)
    assert rel_err(wl.grad, w2.grad) <= 1e-9 and rel_err(xl.grad, x2.grad) <= 1e-9


# ------------------------------------------------------------------------- 6. torch.compile

def _conv_abn_loss(x, conv_w, w, b, rm, rv):
    h = F.conv2d(x, conv_w, padding=1)
    y = tritonbn.inplace_abn(h, w, b, rm, rv, True, 0.2, 1e-5, "leaky_relu", 0.05)
    return (y * y).sum()


@pytest.mark.parametrize("backend", ["aot_eager",
                                     pytest.param("inductor", marks=pytest.mark.slow)])
def test_compile_fullgraph_training_step_matches_eager(backend, device):
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(41)
    x = torch.randn(4, 3, 6, 5, generator=g).to(device)
    conv_w0 = (torch.randn(6, 3, 3, 3, generator=g) * 0.3).to(device)
    w0, b0, rm0, rv0 = _params(6, torch.float32, device, seed=42)
    results = []
    for mode in ("compiled", "eager"):
        params = [t.clone().requires_grad_() for t in (conv_w0, w0, b0)]
        rm, rv = rm0.clone(), rv0.clone()
        fn = torch.compile(_conv_abn_loss, backend=backend, fullgraph=True) \
            if mode == "compiled" else _conv_abn_loss
        with tritonbn.count_launches() as launches:
            loss = fn(x, *params, rm, rv)
            loss.backward()
        assert any(k.startswith("bn_fwd_") for k in launches) and \
            any(k.startswith("bn_bwd_") for k in launches), launches
        opt = torch.optim.SGD(params, lr=0.01)
        opt.step()
        results.append((loss.detach(), [p.grad for p in params], [p.detach() for p in params],
                        rm, rv))
    (lc, gc, pc, rmc, rvc), (le, ge, pe, rme, rve) = results
    assert rel_err(lc, le) <= 1e-6
    for a, e in zip(gc, ge):
        assert rel_err(a, e) <= 1e-5
    for a, e in zip(pc, pe):
        assert rel_err(a, e) <= 1e-6
    assert torch.equal(rmc, rme) and torch.equal(rvc, rve)
    assert not torch.equal(rme, rm0)        # the step did update them


# -------------------------------------------------------------------------- 7. checkpointing

def _conv_abn(x, conv_w, w, b):
    return tritonbn.inplace_abn(F.conv2d(x, conv_w, padding=1), w, b, None, None, True, 0.1,
                                1e-5, "elu", 1.0)


def test_checkpoint_gives_the_same_gradients(device):
    g = torch.Generator().manual_seed(51)
    x0 = torch.randn(3, 2, 5, 6, generator=g, dtype=F64).to(device)
    cw0 = (torch.randn(4, 2, 3, 3, generator=g, dtype=F64) * 0.4).to(device)
    w0, b0, _, _ = _params(4, F64, device, seed=52)
    dy = torch.randn(3, 4, 5, 6, generator=g, dtype=F64).to(device)
    grads = []
    for use_checkpoint in (False, True):
        leaves = [t.clone().requires_grad_() for t in (x0, cw0, w0, b0)]
        with tritonbn.count_launches() as launches:
            if use_checkpoint:
                y = checkpoint(_conv_abn, *leaves, use_reentrant=False)
            else:
                y = _conv_abn(*leaves)
            y.backward(dy)
        # with checkpointing the forward runs again during backward
        assert launches.get("bn_fwd_onepass_kernel", 0) + launches.get("bn_fwd_apply_kernel", 0) == \
            (2 if use_checkpoint else 1), launches
        grads.append([t.grad for t in leaves])
    for a, e in zip(*grads):
        assert rel_err(a, e) <= 1e-12


# ---------------------------------------------------------------------------------- 8. errors

def test_non_invertible_activation_is_refused(device):
    x = torch.randn(4, 3, 5, 5, device=device)
    with pytest.raises(ValueError, match="leaky_relu"):
        tritonbn.inplace_abn(x, activation="relu")
    with pytest.raises(ValueError):
        tritonbn.InPlaceABN2d(3, activation="relu")


@pytest.mark.parametrize("activation,param", [("leaky_relu", 0.0), ("leaky_relu", -0.1),
                                              ("elu", 0.0)])
def test_activation_param_must_be_positive(activation, param, device):
    x = torch.randn(4, 3, 5, 5, device=device)
    before = x.clone()
    with pytest.raises(ValueError, match="activation_param"):
        tritonbn.inplace_abn(x, activation=activation, activation_param=param)
    assert torch.equal(x, before)
    with pytest.raises(ValueError, match="activation_param"):
        tritonbn.InPlaceABN2d(3, activation=activation, activation_param=param)


def test_saturating_overflow_is_refused():
    with pytest.raises(ValueError, match="saturate"):
        tritonbn.functional.options(True, 0.1, 1e-5, "leaky_relu", 0.01, overflow="saturate",
                                    invertible=True)


def test_forward_mode_ad_is_not_implemented(device):
    x = torch.randn(4, 3, 5, 5, device=device)
    w, b, _, _ = _abn_args(3, device, requires_grad=False)
    with pytest.raises(NotImplementedError, match="in-place activated"):
        torch.func.jvp(lambda t: tritonbn.inplace_abn(t, w, b), (x,), (torch.ones_like(x),))


@pytest.mark.parametrize("bad", ["weight", "bias", "running_var", "residual"])
def test_rejected_call_leaves_everything_unchanged(bad, device):
    x = torch.randn(4, 3, 5, 5, device=device)
    w, b, rm, rv = _abn_args(3, device, requires_grad=False)
    args = dict(weight=w, bias=b, running_mean=rm, running_var=rv,
                residual=torch.randn(4, 3, 5, 5, device=device))
    # one argument of the wrong size
    args[bad] = torch.randn(4, 3, 5, 4, device=device) if bad == "residual" else \
        torch.ones(4, device=device)
    saved = [t.clone() for t in (x, rm, rv)]
    versions = [t._version for t in (x, rm, rv)]
    with pytest.raises((RuntimeError, ValueError)):
        tritonbn.inplace_abn(x, **args)
    assert all(torch.equal(t, s) for t, s in zip((x, rm, rv), saved))
    assert [t._version for t in (x, rm, rv)] == versions


# ------------------------------------------------------------------ 9. synchronized, 2 processes

def test_inplace_abn_sync_matches_one_process_over_the_whole_batch(tmp_path):
    mp.spawn(inplace_abn_sync_worker.check_inplace_abn_sync, args=(2, str(tmp_path / "init")),
             nprocs=2, join=True)


# ---------------------------------------------------------------------------------- 10. modules

def test_state_dict_matches_batch_norm():
    abn, bn = tritonbn.InPlaceABN2d(5), torch.nn.BatchNorm2d(5)
    assert list(abn.state_dict()) == list(bn.state_dict())
    assert all(abn.state_dict()[k].shape == v.shape for k, v in bn.state_dict().items())
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.running_mean.uniform_(-1, 1)
    abn.load_state_dict(bn.state_dict())            # strict: the same keys both ways
    assert torch.equal(abn.weight, bn.weight) and torch.equal(abn.running_mean, bn.running_mean)
    for cls in (tritonbn.InPlaceABN1d, tritonbn.InPlaceABN3d, tritonbn.InPlaceABN):
        assert list(cls(5).state_dict()) == list(bn.state_dict())


@pytest.mark.parametrize("rank", [2, 3, 4, 5])
def test_inplace_abn_module_takes_any_rank(rank, device):
    c = 4
    shape = (5, c, 3, 2, 2)[:rank]
    m = tritonbn.InPlaceABN(c, momentum=0.2, activation="leaky_relu", activation_param=0.1,
                            device=device, dtype=F64)
    with torch.no_grad():
        m.weight.copy_(torch.tensor([1.5, -0.5, 0.8, 1.0]))
        m.bias.copy_(torch.tensor([0.1, -0.3, 0.0, 0.2]))
    x = make_input(shape, F64, "contiguous", device, seed=60 + rank)
    res = torch.randn(shape, dtype=F64, generator=torch.Generator().manual_seed(rank)).to(device)
    rm, rv = torch.zeros(c, dtype=F64, device=device), torch.ones(c, dtype=F64, device=device)
    ref = torch_abn(x, m.weight.detach(), m.bias.detach(), rm, rv, True, 0.2, 1e-5,
                    "leaky_relu", 0.1, res)
    xi = x.clone()
    y = m(xi, res)
    assert y.data_ptr() == xi.data_ptr()
    assert rel_err(y, ref) <= 1e-9
    assert rel_err(m.running_mean, rm) <= 1e-9 and rel_err(m.running_var, rv) <= 1e-9
    assert int(m.num_batches_tracked) == 1
    m.eval()
    y_eval = m(x.clone(), res)
    ref_eval = torch_abn(x, m.weight.detach(), m.bias.detach(), rm, rv, False, 0.2, 1e-5,
                         "leaky_relu", 0.1, res)
    assert rel_err(y_eval, ref_eval) <= 1e-9
    with pytest.raises(ValueError):
        m(torch.randn(c, dtype=F64, device=device))


def test_fixed_rank_modules_follow_torch(device):
    for cls, shape in ((tritonbn.InPlaceABN1d, (6, 3, 7)), (tritonbn.InPlaceABN2d, (4, 3, 4, 5)),
                       (tritonbn.InPlaceABN3d, (3, 3, 2, 3, 4))):
        m = cls(3, activation="elu", activation_param=0.5, device=device, dtype=F64)
        x = make_input(shape, F64, "contiguous", device, seed=len(shape)).requires_grad_()
        y = m(x * 1)
        y.backward(torch.ones_like(y))
        x2 = x.detach().clone().requires_grad_()
        w2, b2 = m.weight.detach().clone().requires_grad_(), m.bias.detach().clone() \
            .requires_grad_()
        y2 = torch_abn(x2, w2, b2, None, None, True, 0.1, 1e-5, "elu", 0.5)
        y2.backward(torch.ones_like(y2))
        assert rel_err(y, y2) <= 1e-9, cls
        assert rel_err(x.grad, x2.grad) <= 1e-9, cls
        assert rel_err(m.weight.grad, w2.grad) <= 1e-9, cls
    with pytest.raises(ValueError):
        tritonbn.InPlaceABN2d(3)(torch.randn(4, 3, 5))


def test_extra_repr_names_the_activation_and_its_parameter():
    r = repr(tritonbn.InPlaceABN2d(5))
    assert "activation='leaky_relu'" in r and "activation_param=0.01" in r
    r = repr(tritonbn.InPlaceABN(5, activation="elu", activation_param=0.5))
    assert "activation='elu'" in r and "activation_param=0.5" in r
    r = repr(tritonbn.InPlaceABN3d(5, activation="identity"))
    assert "activation='identity'" in r
    m = tritonbn.InPlaceABN1d(5, activation="leaky_relu", activation_param=0.2)
    assert m.activation_param == 0.2
    m.activation_param = 0.3
    assert "activation_param=0.3" in repr(m)
