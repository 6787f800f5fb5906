"""Merging per-split partials: the merge kernel over several chunks of splits, exact against a
float64 Chan merge, and the training path that uses it (more partials than an apply program
merges itself)."""
import pytest
import torch

import tritonbn
from tritonbn import launch, plan as planner
from tritonbn.plan import forced_plan
from tests.helpers import make_input


def _partials(k, c, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    count = torch.randint(0, 50, (k, c), generator=g).double()
    count[3] = 0                                       # an empty split drops out
    mean = torch.randn(k, c, generator=g, dtype=torch.float64) * 5 + 1e3
    m2 = torch.rand(k, c, generator=g, dtype=torch.float64) * count
    return torch.stack([count, mean, m2]).float().to(device)


def _chan64(part):
    n, mean, m2 = part.double().cpu()
    tot = n.sum(0)
    mu = (n * mean).sum(0) / tot
    return tot, mu, (m2 + n * (mean - mu) ** 2).sum(0)


@pytest.mark.parametrize("k,c,chunks", [(1100, 3, 2), (300, 200, 5), (17, 5, 1)])
def test_merge_kernel_matches_a_float64_chan_merge(k, c, chunks, device):
    part = _partials(k, c, device)
    with launch.capture_launches() as captured:
        launch.merge_partials(part, moments=True)
    (_kernel, _grid, _args, kw), = captured
    assert -(-k // kw["BLOCK_K"]) == chunks        # splits loaded in this many chunks
    with tritonbn.count_launches() as launches:
        out = launch.merge_partials(part, moments=True)
    assert launches == {"bn_merge_partials_kernel": 1}
    n, mean, m2 = _chan64(part)
    torch.testing.assert_close(out[0].double().cpu(), n, rtol=0, atol=0)
    torch.testing.assert_close(out[1].double().cpu(), mean, rtol=1e-6, atol=0)
    torch.testing.assert_close(out[2].double().cpu(), m2, rtol=1e-5, atol=1e-3)
    sums = launch.merge_partials(part[:2].contiguous(), moments=False)
    torch.testing.assert_close(sums.double().cpu(), part[:2].double().cpu().sum(1),
                               rtol=1e-6, atol=1e-3)
    # deterministic: the same bits again
    assert torch.equal(launch.merge_partials(part, moments=True), out)


def test_training_with_more_partials_than_an_apply_program_merges(device):
    # channels-last, 70 channels in blocks of 64 (2 blocks), 18 splits: 18 x 64 partials per
    # program exceed MERGE_IN_APPLY, so a merge launch runs between statistics and apply
    x = make_input((4, 70, 9, 8), torch.float32, "channels_last", device, seed=9)
    assert 18 * 64 > planner.MERGE_IN_APPLY
    rm = torch.zeros(70, device=device)
    rv = torch.zeros(70, device=device)
    with forced_plan(variant="split", block_n=1, block_s=16, block_c=64, splits=18), \
            tritonbn.count_launches() as launches:
        y = tritonbn.batch_norm(x, rm, rv, training=True, momentum=1.0)
    assert launches == {"bn_stats_partial_kernel": 1, "bn_merge_partials_kernel": 1,
                        "bn_fwd_apply_kernel": 1}
    x64 = x.double().cpu()
    torch.testing.assert_close(rm.double().cpu(), x64.mean((0, 2, 3)), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(rv.double().cpu(), x64.var((0, 2, 3), unbiased=True), rtol=1e-5,
                               atol=1e-6)
    ref = torch.nn.functional.batch_norm(x64, None, None, training=True)
    torch.testing.assert_close(y.double().cpu(), ref, rtol=1e-5, atol=1e-5)
