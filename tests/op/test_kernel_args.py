"""Kernel arguments are bound by name from each kernel's own signature (tritonbn/launch/run.py):
the signature's order rule is checked, a missing argument is an error, and every launch the
launchers make hands each kernel exactly its runtime parameters, in its order."""
import pytest
import torch
import triton.language as tl

from tritonbn import kernels, launch
from tritonbn.launch.run import KernelSignature, signature
from tritonbn.options import BackwardArgs, ForwardArgs, Options


@pytest.mark.parametrize("name", kernels.__all__)
def test_every_kernel_declares_pointers_ints_floats_then_constants(name):
    sig = signature(name)
    assert sig.pointers and all(p[0].isupper() for p in sig.pointers)
    assert all(i[0].islower() for i in sig.ints)
    assert "size_c" in sig.ints and "C" not in sig.pointers
    assert all(c.isupper() or c.startswith("num_") for c in sig.constexprs)


def test_a_signature_out_of_order_is_refused():
    def kernel(X, n, eps: tl.float64, Y, BLOCK: tl.constexpr):   # a pointer after a float
        pass

    with pytest.raises(TypeError, match="pointers .upper-case., integers"):
        KernelSignature(kernel)


def test_bind_groups_by_kind_ignores_other_names_and_needs_every_parameter():
    def kernel(X, Y, size_n, stride_x, eps: tl.float64, BLOCK: tl.constexpr):
        pass

    sig = KernelSignature(kernel)
    args = {"Y": "y", "X": "x", "stride_x": 3, "size_n": 7, "eps": 0.5, "unused": 1}
    assert sig.bind(args) == (("x", "y"), (7, 3), (0.5,))
    del args["stride_x"]
    with pytest.raises(KeyError, match="stride_x"):
        sig.bind(args)


@pytest.mark.parametrize("variant", ["onepass", "split"])
def test_every_launch_passes_exactly_the_kernels_parameters(variant, device):
    from tritonbn import plan as planner

    x = torch.randn(4, 3, 6, 5, device=device)
    w, b = torch.rand(3, device=device) + 0.5, torch.randn(3, device=device)
    rm, rv = torch.zeros(3, device=device), torch.ones(3, device=device)
    o = Options(training=True, activation="relu")
    with planner.forced_plan(variant=variant), launch.capture_launches() as launches:
        out = launch.forward(ForwardArgs(x, w, b, x.clone(), rm, rv), o)
        launch.backward(BackwardArgs(torch.randn_like(x), x, w, b, x.clone(), out[1], out[2],
                                     None), o, True)
    assert len(launches) >= 2
    for kernel, _grid, args, kwargs in launches:
        sig = signature(kernel.fn.__name__)
        pointers, ints, floats = args.groups
        assert (len(pointers), len(ints), len(floats)) == (
            len(sig.pointers), len(sig.ints), len(sig.floats))
        assert all(t is None or isinstance(t, torch.Tensor) for t in pointers)
        assert all(v is None or type(v) is int for v in ints)
        assert all(type(v) is float for v in floats)
        assert set(kwargs) <= set(sig.constexprs) | {"num_warps", "num_stages"}
