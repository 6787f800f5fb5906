"""Plane views: which strides the kernels read in place, and when a copy is made."""
import torch

import tritonbn
from tritonbn import launch
from tritonbn.layout import output_memory_format, plane_view


def _launched_input(x):
    """The activation the kernel launch of a training forward would read."""
    with launch.capture_launches() as launches:
        tritonbn.batch_norm(x, None, None, training=True)
    return launches[0][2][0]


def test_contiguous_nchw_keeps_samples_apart():
    x = torch.empty(4, 3, 5, 6)
    v = plane_view(x.shape, [x])
    assert (v.n, v.c, v.s) == (4, 3, 30) and v.strides == ((90, 30, 1),)
    assert not v.channels_minor


def test_channels_last_folds_samples_into_rows_without_copy():
    x = torch.empty(4, 3, 5, 6).to(memory_format=torch.channels_last)
    v = plane_view(x.shape, [x])
    assert (v.n, v.c, v.s) == (1, 3, 120) and v.strides == ((0, 1, 3),)
    assert v.channels_minor
    assert _launched_input(x) is x  # read in place: no permute-copy


def test_channels_last_3d_and_2d_inputs():
    x5 = torch.empty(2, 3, 4, 5, 6).to(memory_format=torch.channels_last_3d)
    assert plane_view(x5.shape, [x5]).strides == ((0, 1, 3),)
    x2 = torch.empty(7, 5)
    v2 = plane_view(x2.shape, [x2])
    assert (v2.n, v2.s) == (1, 7) and v2.strides == ((0, 1, 5),) and v2.channels_minor


def test_stride_zero_gradient_has_a_view():
    g = torch.ones(()).expand(4, 3, 5, 6)
    v = plane_view(g.shape, [g])
    assert v is not None and all(st == 0 for st in (v.strides[0][0], v.strides[0][2]))


def test_transposed_spatial_dims_have_no_view_and_get_copied():
    x = torch.randn(4, 3, 6, 5).transpose(2, 3)
    assert plane_view(x.shape, [x]) is None
    x_used = _launched_input(x)
    assert x_used is not x and x_used.is_contiguous() and torch.equal(x_used, x)
    assert output_memory_format(x) == torch.contiguous_format


def test_mixed_formats_share_one_view_without_folding():
    x = torch.empty(4, 3, 5, 6).to(memory_format=torch.channels_last)
    y = torch.empty(4, 3, 5, 6)
    v = plane_view(x.shape, [x, y])
    assert (v.n, v.s) == (4, 30) and v.strides == ((90, 1, 3), (90, 30, 1))


def test_mixed_format_gradient_is_read_in_place(device):
    # channels_last input, contiguous gradient: each tensor keeps its own strides in one launch
    x = torch.randn(3, 4, 5, 6, device=device).to(memory_format=torch.channels_last).requires_grad_()
    y = tritonbn.batch_norm(x, None, None, training=True)
    g = torch.randn(3, 4, 5, 6, device=device)
    y.backward(g)
    x64 = x.detach().double().requires_grad_()
    tritonbn.batch_norm_reference(x64, None, None, training=True)[0].backward(g.double())
    torch.testing.assert_close(x.grad.double(), x64.grad, atol=1e-5, rtol=1e-5)
    assert x.grad.is_contiguous(memory_format=torch.channels_last)
