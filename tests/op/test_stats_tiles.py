"""The statistics kernel's tile walk: full tiles first, then the plane's edge tiles (last tile
column, last tile row, corner), split among programs at every possible boundary -- each element
counted once, each lane's count right, with and without the edge path compiled in."""
import pytest
import torch

import tritonbn
from tritonbn import launch
from tritonbn.plan import forced_plan
from tests.helpers import make_input

# (shape, layout, forced plan, (some tile has rows outside the plane, one tile column spans S))
CASES = [
    # 3 x 4 tiles: 6 full, then 3 last-column (corner last) and 3 last-row tiles; 3 splits of 4
    # put full and edge tiles in one split, and the corner mid-split
    ((5, 3, 7, 9), "contiguous", dict(block_n=2, block_s=16, splits=3), (True, False)),
    # the same plane in 2 splits (one all full, one all edges) and in 12 (a tile each)
    ((5, 3, 7, 9), "contiguous", dict(block_n=2, block_s=16, splits=2), (True, False)),
    ((5, 3, 7, 9), "contiguous", dict(block_n=2, block_s=16, splits=12), (True, False)),
    # only a last tile column (N divides), only a last tile row (S divides)
    ((4, 3, 5, 7), "contiguous", dict(block_n=2, block_s=16, splits=3), (True, False)),
    ((5, 3, 4, 8), "contiguous", dict(block_n=4, block_s=8, splits=2), (True, False)),
    # every tile full: the edge path is not compiled in
    ((4, 3, 4, 8), "contiguous", dict(block_n=2, block_s=16, splits=3), (False, False)),
    # a tile column spans the 15 positions (a small plane): lanes 15 of 16 off in every tile,
    # with and without a last tile row
    ((4, 3, 3, 5), "contiguous", dict(block_n=2, block_s=16, splits=2), (False, True)),
    ((5, 3, 3, 5), "contiguous", dict(block_n=2, block_s=16, splits=2), (True, True)),
    ((7, 3, 3, 5), "contiguous", dict(block_n=2, block_s=16, splits=4), (True, True)),
    # channels-last folds (N, S) into one plane of 105 rows: one edge tile, the last
    ((3, 70, 5, 7), "channels_last", dict(block_n=1, block_s=16, block_c=64, splits=4), (True, False)),
    ((2, 70, 4, 8), "channels_last", dict(block_n=1, block_s=16, block_c=64, splits=3), (False, False)),
]


def _edges_constant(x, plan):
    with forced_plan(variant="split", **plan), launch.capture_launches() as launches:
        tritonbn.batch_norm(x, None, None, training=True)
    (stats,) = [kw for k, _g, _a, kw in launches if k.fn.__name__ == "bn_stats_partial_kernel"]
    return stats["EDGES"], stats["ONE_COLUMN"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape,layout,plan,edges", CASES,
                         ids=[f"{c[1]}-{'x'.join(map(str, c[0]))}-{c[2]['splits']}splits" for c in CASES])
def test_every_element_counted_once(shape, layout, plan, edges, dtype, device):
    x = make_input(shape, dtype, layout, device, scale=3.0, shift=-1.0, seed=7)
    assert _edges_constant(x, plan) == edges
    c = shape[1]
    rm = torch.zeros(c, dtype=dtype, device=device)
    rv = torch.zeros(c, dtype=dtype, device=device)
    with forced_plan(variant="split", **plan), tritonbn.count_launches() as launches:
        tritonbn.batch_norm(x, rm, rv, training=True, momentum=1.0)
    assert launches["bn_stats_partial_kernel"] == 1
    dims = [0] + list(range(2, x.dim()))
    x64 = x.double().cpu()
    rtol = 1e-12 if dtype is torch.float64 else 2e-6
    torch.testing.assert_close(rm.double().cpu(), x64.mean(dims), rtol=rtol, atol=rtol)
    torch.testing.assert_close(rv.double().cpu(), x64.var(dims, unbiased=True), rtol=rtol,
                               atol=rtol)


@pytest.mark.parametrize("plan", [dict(block_n=2, block_s=16, splits=3),
                                  dict(block_n=4, block_s=64, splits=2)])
def test_edge_tiles_keep_a_large_mean_channels_digits(plan, device):
    # mean 1e4, std 1, float32: lanes that see different counts merge without cancellation
    g = torch.Generator().manual_seed(12)
    x = (torch.randn(7, 2, 9, 11, generator=g, dtype=torch.float64) + 1e4).float().to(device)
    assert _edges_constant(x, plan)[0]
    rv = torch.zeros(2, device=device)
    with forced_plan(variant="split", **plan):
        tritonbn.batch_norm(x, torch.zeros(2, device=device), rv, training=True, momentum=1.0)
    true_var = x.double().cpu().var(dim=(0, 2, 3), unbiased=True)
    assert ((rv.double().cpu() - true_var).abs() / true_var).max().item() <= 1e-4
