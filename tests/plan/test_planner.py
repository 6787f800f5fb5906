"""The dispatcher is a pure, cached function from shape/layout/dtype/device to a frozen plan."""
import dataclasses

import pytest
import torch

from tritonbn import plan as planner
from tritonbn.plan import DeviceInfo, Plan, make_plan
from tritonbn.layout import max_offset, plane_view

H100 = DeviceInfo("NVIDIA H100 80GB HBM3", sm_count=132, capability=(9, 0), interpreter=False)
SMALL_GPU = DeviceInfo("small", sm_count=8, capability=(8, 6), interpreter=False)


def _plan(op, n, c, s, minor=False, elem=2, offset=1 << 20, device=H100):
    return make_plan(op, n, c, s, minor, elem, offset, device)


def test_plan_is_frozen_and_cached():
    p = _plan("fwd_train", 256, 64, 112 * 112)
    assert p is _plan("fwd_train", 256, 64, 112 * 112)
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.splits = 3


def test_unknown_op_is_rejected():
    with pytest.raises(ValueError, match="unknown op"):
        _plan("fwd_sideways", 2, 3, 4)


@pytest.mark.parametrize("n,c,s", [(256, 64, 112 * 112), (8, 64, 112 * 112), (16, 32, 256 * 256),
                                   (1, 1, 1 << 22)])
def test_small_channel_counts_still_fill_the_gpu(n, c, s):
    # one program per channel would leave most of 132 SMs idle at C = 32 or 64
    p = _plan("fwd_train", n, c, s)
    assert p.variant == "split"
    programs = -(-c // p.block_c) * planner.grid_tiles(p, n, s)[3]
    assert programs >= 2 * H100.sm_count


def test_nchw_plans_one_channel_per_program_with_power_of_two_positions():
    p = _plan("fwd_train", 256, 256, 56 * 56)
    assert p.block_c == 1
    assert p.block_s & (p.block_s - 1) == 0
    assert p.tile <= planner.GPU_TILE


def test_channels_last_plans_block_channels():
    p = _plan("fwd_train", 1, 256, 256 * 56 * 56, minor=True)
    assert p.block_c == planner.MAX_BLOCK_C
    assert p.block_n == 1 and p.tile <= planner.GPU_TILE
    p32 = _plan("fwd_train", 1, 32, 16 * 256 * 256, minor=True)
    assert p32.block_c == 32


def test_onepass_when_plane_fits_and_grid_fills():
    # (256, 2048, 1, 1) after folding: 256 rows x 2048 channels, 256 * 32 channels per tile
    p = _plan("fwd_train", 1, 2048, 256, minor=True)
    assert p.variant == "onepass" and p.block_s >= 256 and p.splits == 1
    assert p.tile <= planner.ONEPASS_MAX["fwd_train"]
    # the same plane on few channels and a big tensor would starve the GPU: split instead
    p_few = _plan("fwd_train", 1, 8, 1024, minor=True, device=H100)
    assert p_few.variant == "onepass"  # tiny tensor: launch-bound, one launch wins
    # channels-last rows are never narrowed below 8 channels to fit (they would be gathers)
    p_narrow = _plan("fwd_train", 1, 64, 4096, minor=True)
    assert p_narrow.variant == "split" and p_narrow.block_c == 64
    p_big = _plan("fwd_train", 512, 8, 1024)
    assert p_big.variant == "split"


def test_eval_is_never_onepass():
    assert _plan("fwd_eval", 1, 2048, 256, minor=True).variant == "split"


def test_int64_offsets_only_when_needed():
    assert not _plan("fwd_train", 256, 64, 112 * 112, offset=(1 << 31) - 2).use_int64
    assert _plan("fwd_train", 256, 64, 112 * 112, offset=1 << 31).use_int64
    # a real view whose largest offset passes 2**31 (no memory allocated: shape and strides only)
    big = torch.empty((4096, 64, 128, 128), device="meta")
    view = plane_view(big.shape, [big])
    assert max_offset(view) > 2**31


def test_device_info_of_cpu_is_the_interpreter():
    assert planner.device_info(torch.device("cpu")).interpreter


def test_forced_plan_overrides_and_restores():
    base = _plan("fwd_train", 64, 8, 100)
    with planner.forced_plan(variant="split", splits=3, block_s=16):
        p = _plan("fwd_train", 64, 8, 100)
        assert (p.variant, p.splits, p.block_s) == ("split", 3, 16) and "forced" in p.reason
    assert _plan("fwd_train", 64, 8, 100) == base
    with pytest.raises(TypeError, match="unknown plan fields"):
        with planner.forced_plan(blocks=3):
            pass


def test_grid_tiles_leaves_no_empty_split():
    p = Plan("split", block_n=2, block_s=16, block_c=1, splits=5, num_warps=4, use_int64=False, reason="")
    n_tiles_s, n_tiles, per_split, splits = planner.grid_tiles(p, n=5, s=63)
    assert (n_tiles_s, n_tiles) == (4, 12)
    assert per_split * (splits - 1) < n_tiles <= per_split * splits


def test_unaligned_tensors_get_fewer_elements_per_thread():
    aligned = make_plan("bwd_train", 1, 64, 1 << 20, True, 2, 1 << 30, H100, aligned=True)
    unaligned = make_plan("bwd_train", 1, 64, 1 << 20, True, 2, 1 << 30, H100, aligned=False)
    def per_thread(p):
        return p.tile // (32 * p.num_warps)
    assert per_thread(aligned) == planner.ELEMS_PER_THREAD
    assert per_thread(unaligned) == planner.UNALIGNED_PER_THREAD["bwd_train"] < per_thread(aligned)
    assert unaligned.tile == planner.UNALIGNED_TILE


def test_every_plan_respects_its_limits():
    for op in planner.OPS:
        for n, c, s, minor in [(256, 64, 12544, False), (256, 2048, 49, False), (1, 2048, 12544, True),
                               (4096, 1024, 1, True), (65536, 64, 1, True), (8, 64, 16 * 3136, False),
                               (1, 1, 3, False), (2, 3, 1, True)]:
            for dev in (H100, SMALL_GPU, planner.INTERPRETER):
                p = make_plan(op, n, c, s, minor, 2, 1 << 20, dev)
                for b in (p.block_n, p.block_s, p.block_c):
                    assert b >= 1 and b & (b - 1) == 0
                if p.variant == "onepass":
                    assert p.block_n >= n and p.block_s >= s and p.splits == 1
                    assert p.tile <= planner.ONEPASS_MAX[op]
                else:
                    assert p.tile <= (planner.INTERPRETER_TILE if dev.interpreter else planner.GPU_TILE)
