"""The static performance model (bench/perf_model.py): its SASS loop finder and IR reader on
hand-made code, its arithmetic on hand-made launches, its bytes on the real kernels -- and the
CI check: no benchmark row predicts more than 5 points of "% of copy" worse than the committed
table, bench/results/perf_model.md (regenerate it with the command in its header when a change
is meant to move the numbers)."""
import math
import os

import pytest

from tritonbn import plan as planner
from bench import compile_check as cc, perf_model as pm

TABLE = os.path.join(os.path.dirname(__file__), os.pardir, os.pardir, "bench", "results",
                     "perf_model.md")

# A loop (branch back from 0x70 to 0x20) with a 16-byte load, a shuffle, a barrier and a store;
# a branch to itself after EXIT (the trap every kernel ends with) that is not a loop.
SASS = """
	.section	.nv.info.k,"",@"SHT_CUDA_INFO"
.L_1:
        /*0002*/ 	.short	(.L_2 - .L_1)
.L_2:
	.section	.text.k,"ax",@progbits
.text.k:
        /*0000*/                   LDC R1, c[0x0][0x28] ;
        /*0010*/              @!P0 BRA `(.L_x_1) ;
.L_x_0:
	//## File "/src/kernels/forward.py", line 15
        /*0020*/              @!P1 LDG.E.128 R4, desc[UR4][R2.64] ;
	//## File "/src/kernels/common.py", line 40
        /*0030*/                   SHFL.BFLY PT, R5, R4, 0x10, 0x1f ;
        /*0040*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
	//## File "/src/kernels/forward.py", line 20
        /*0050*/               @P1 STG.E.128 desc[UR4][R6.64], R4 ;
        /*0060*/                   NOP;
        /*0070*/               @P0 BRA `(.L_x_0) ;
.L_x_1:
        /*0080*/                   EXIT ;
.L_x_2:
        /*0090*/                   BRA `(.L_x_2);
"""

TTIR = """
#loc = loc("/src/kernels/forward.py":1:1)
module {
  tt.func public @k(%X: !tt.ptr<f16> loc("X"(#loc)), %Y: !tt.ptr<f16> loc("Y"(#loc)), %N: i32 loc("N"(#loc))) attributes {noinline = false} {
    %0 = tt.splat %X : !tt.ptr<f16> -> tensor<64x!tt.ptr<f16>> loc(#loc1)
    %r:2 = scf.for %i = %c0 to %N step %c1 iter_args(%p = %0, %acc = %cst) -> (tensor<64x!tt.ptr<f16>>, tensor<64xf32>) : i32 {
      %1 = tt.addptr %p, %off : tensor<64x!tt.ptr<f16>>, tensor<64xi32> loc(#loc2)
      %x = tt.load %1, %m : tensor<64x!tt.ptr<f16>> loc(#loc3)
      %f = arith.extf %x : tensor<64xf16> to tensor<64xf32> loc(#loc4)
      scf.yield %1, %f : tensor<64x!tt.ptr<f16>>, tensor<64xf32> loc(#loc2)
    } loc(#loc2)
    %2 = tt.splat %Y : !tt.ptr<f16> -> tensor<64x!tt.ptr<f16>> loc(#loc5)
    tt.store %2, %v, %m : tensor<64x!tt.ptr<f16>> loc(#loc6)
    tt.return loc(#loc)
  } loc(#loc)
} loc(#loc)
#loc1 = loc("/src/kernels/forward.py":11:5)
#loc2 = loc("/src/kernels/forward.py":12:5)
#loc7 = loc("/src/kernels/forward.py":12:13)
#loc3 = loc("x"(#loc7))
#loc8 = loc("/src/kernels/common.py":33:9)
#loc9 = loc("/src/kernels/forward.py":13:9)
#loc4 = loc(callsite(#loc8 at #loc9))
#loc5 = loc("/src/kernels/forward.py":20:5)
#loc6 = loc("/src/kernels/forward.py":20:9)
"""


def test_loop_finder_on_hand_made_sass():
    tensors_at = {("forward.py", 12): {"load": {"X"}, "store": set(), "near": set()},
                  ("forward.py", 20): {"load": set(), "store": {"Y"}, "near": set()}}
    loops, straight = cc.sass_loops(SASS, tensors_at)
    assert len(loops) == 1            # the branch-to-itself trap is not a loop
    (lp,) = loops
    assert (lp["start"], lp["end"], lp["depth"]) == (0x20, 0x70, 0)
    assert lp["instructions"] == 5    # LDG SHFL BAR STG BRA; NOPs are padding
    assert (lp["bar"], lp["shfl"]) == (1, 1)
    assert lp["loads"] == {16: 1} and lp["stores"] == {16: 1}
    # the 16-byte load is tagged 3 lines below its source (its inline PTX has 4 movs first)
    assert lp["tensors"] == {"X": {"load": 16.0, "store": 0.0}, "Y": {"load": 0.0, "store": 16.0}}
    assert straight["instructions"] == 4   # LDC, the forward branch, EXIT, the trap
    assert straight["loads"] == {} and straight["bar"] == 0


def test_nested_loops_and_several_branches_back():
    sass = """
        /*0000*/                   MOV R0, RZ ;
.L_x_0:
        /*0010*/                   IADD3 R0, R0, 0x1, RZ ;
.L_x_1:
        /*0020*/                   LDG.E R4, desc[UR4][R2.64] ;
        /*0030*/               @P1 BRA `(.L_x_1) ;
        /*0040*/               @P2 BRA `(.L_x_0) ;
        /*0050*/               @P3 BRA `(.L_x_0) ;
        /*0060*/                   EXIT ;
"""
    loops, straight = cc.sass_loops(sass)
    assert [(lp["start"], lp["end"], lp["depth"]) for lp in loops] == [(0x10, 0x50, 0),
                                                                       (0x20, 0x30, 1)]
    assert loops[0]["instructions"] == 5 and loops[1]["instructions"] == 2
    assert loops[1]["tensors"] == {"?": {"load": 4.0, "store": 0.0}}   # no line info
    assert straight["instructions"] == 2


def test_an_iteration_takes_the_cheap_side_of_a_branch_that_still_loads():
    sass = """
.L_x_0:
        /*0100*/                   IADD3 R0, R0, 0x1, RZ ;
        /*0110*/               @P1 BRA `(.L_x_1) ;
        /*0120*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0130*/                   FADD R5, R4, R4 ;
        /*0140*/                   BRA `(.L_x_2) ;
.L_x_1:
        /*0150*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0160*/                   SHFL.BFLY PT, R5, R4, 0x10, 0x1f ;
        /*0170*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
        /*0180*/                   SHFL.BFLY PT, R6, R5, 0x8, 0x1f ;
        /*0190*/                   FADD R5, R6, R4 ;
.L_x_2:
        /*01a0*/               @P0 BRA `(.L_x_0) ;
        /*01b0*/                   EXIT ;
"""
    (lp,), _ = cc.sass_loops(sass)
    assert lp["instructions"] == 11 and (lp["bar"], lp["shfl"]) == (1, 2)
    fast = lp["path"]           # the full-tile side: no barrier, no shuffle
    assert fast["instructions"] == 6 and (fast["bar"], fast["shfl"]) == (0, 0)
    assert fast["loads"] == {16: 1}
    # a branch around all the loads is not the cheap way through: the loop is there to load
    guard = """
.L_x_0:
        /*0000*/               @P1 BRA `(.L_x_1) ;
        /*0010*/                   LDG.E R4, desc[UR4][R2.64] ;
        /*0020*/                   FADD R5, R4, R4 ;
.L_x_1:
        /*0030*/               @P0 BRA `(.L_x_0) ;
"""
    (lp,), _ = cc.sass_loops(guard)
    assert lp["path"]["instructions"] == lp["instructions"] == 4


def test_ir_reader_follows_pointers_through_loops_and_names_lines():
    acc = cc.ttir_accesses(TTIR)
    assert acc["reads"] == ["X"] and acc["writes"] == ["Y"]
    lines = acc["lines"]
    assert lines[("forward.py", 12)]["load"] == {"X"}        # through a named location
    assert lines[("forward.py", 20)]["store"] == {"Y"}
    assert lines[("common.py", 33)]["near"] == {"X"}         # the first use of the loaded value


def test_ir_reader_maps_positional_arguments_to_names():
    ttir = TTIR.replace("%X:", "%arg0:").replace("%X ", "%arg0 ").replace("%Y:", "%arg1:") \
        .replace("%Y ", "%arg1 ")
    acc = cc.ttir_accesses(ttir, ["X", "Y", "N"])
    assert acc["reads"] == ["X"] and acc["writes"] == ["Y"]


def _facts(**kw):
    """A hand-made launch: 8 warps, one program per SM, every tile one 16-byte round trip."""
    base = dict(kernel="k", grid=(132, 1), programs=132, warps=8, blocks={}, flags={}, ok=True,
                failures=[], regs=32, spill=0, resident=1, occupancy=0.125, reads=[], writes=[],
                partial_read_bytes=0, partial_write_bytes=0, partials=0, partials_in_flight=0,
                merge_trips=0, tiles=132, tile=4096, useful=132 * 4096, loop_instr=100, loop_body_instr=100,
                tiles_per_iter=1,
                warp_instr=0.0, merge_warp_instr=0.0, warp_instr_per_elem=0.0, bar_per_tile=0,
                shfl_per_tile=0, max_load=16, loads_per_program=1.0, straight_instr=0)
    base.update(kw)
    return pm.LaunchFacts(**base)


def test_waves_and_a_tail_wave():
    gpu = pm.GPUS["H100"]
    slots = gpu.sms * 2
    f = _facts(programs=2 * slots + 1, resident=2, loads_per_program=10)
    assert f.waves(gpu) == pytest.approx((2 * slots + 1) / slots)
    mb = 1e6
    t = pm._launch_time(f, gpu, hbm_read=f.programs * mb, hbm_write=0.0, l2_hits=0.0)
    full = slots * mb / gpu.copy_bw                       # a full wave at the copy bandwidth
    tail = 10 * pm.HBM_LATENCY_S                          # one program alone: 10 round trips
    assert full > tail
    assert t["memory"] == pytest.approx(2 * full + tail)
    assert t["HBM"] == pytest.approx(f.programs * mb / gpu.copy_bw)
    assert t["latency"] == pytest.approx(t["memory"] - t["HBM"])


def test_too_few_bytes_in_flight_is_latency_bound():
    gpu = pm.GPUS["H200"]
    f = _facts(programs=gpu.sms, resident=1, loads_per_program=100)
    t = pm._launch_time(f, gpu, hbm_read=1e6 * gpu.sms, hbm_write=0.0, l2_hits=0.0)
    assert t["memory"] == pytest.approx(100 * pm.HBM_LATENCY_S)
    assert t["latency"] > t["HBM"]


def test_lanes_count_masked_tile_elements():
    assert _facts(tiles=10, tile=4096, useful=30000).lanes == pytest.approx(30000 / 40960)
    assert _facts(tiles=0, tile=0, useful=0).lanes == 1.0


def test_serial_chain_of_partials():
    gpu = pm.GPUS["H100"]
    f = _facts(partials=512, partials_in_flight=4, merge_trips=128,
               partial_read_bytes=132 * 512 * 64 * 12)
    t = pm._launch_time(f, gpu, hbm_read=0.0, hbm_write=0.0, l2_hits=0.0)
    assert t["trips"] == 128
    assert t["merge"]["chain"] == pytest.approx(128 * pm.L2_ROUND_TRIP_S)
    assert t["merge"]["L2"] == pytest.approx(f.partial_read_bytes / gpu.l2_bw)


def test_op_time_bytes_and_l2_reuse_on_hand_made_launches():
    gpu = pm.GPUS["H100"]
    prob = cc.Problem("fwd_train", (8, 64, 112, 112), "float16", "contiguous")
    nbytes = 2 * math.prod(prob.shape)                    # 12.8 MB: fits half the L2
    stats = _facts(reads=[(1, nbytes)])
    apply = _facts(reads=[(1, nbytes)], writes=[(2, nbytes)])
    p = pm.predict_launches(prob, [stats, apply], gpu)
    assert p.launches == 2 and p.hbm_bytes == 2 * nbytes  # x re-read from L2
    assert p.l2_bytes == 3 * nbytes
    big = cc.Problem("fwd_train", (256, 64, 112, 112), "float16", "contiguous")
    nbig = 2 * math.prod(big.shape)
    p = pm.predict_launches(big, [_facts(reads=[(1, nbig)]),
                                  _facts(reads=[(1, nbig)], writes=[(2, nbig)])], gpu)
    assert p.hbm_bytes == 3 * nbig                        # too big for L2: read twice
    assert p.time_us > 3 * nbig / gpu.copy_bw * 1e6 + 2 * pm.LAUNCH_GAP_S * 1e6 - 1e-6
    assert p.pct_copy == pytest.approx(100 * 2 * nbig / gpu.copy_bw / (p.time_us * 1e-6))
    assert p.vs_two_pass == pytest.approx(p.time_us * 1e-6 / (3 * nbig / gpu.copy_bw))
    assert p.limit == "HBM"


def test_gpu_names():
    assert pm.gpu_for("NVIDIA H100 80GB HBM3") is pm.GPUS["H100"]
    assert pm.gpu_for("NVIDIA H200") is pm.GPUS["H200"]
    assert pm.gpu_for("NVIDIA A100-SXM4-80GB") is None
    assert pm.problem("bwd", (8, 64, 56, 56)).op == "bwd_train"


def test_table_round_trip_and_check(tmp_path):
    gpu = pm.GPUS["H100"]
    prob = cc.Problem("fwd_eval", (256, 64, 56, 56), "float16", "channels_last")
    nbytes = 2 * math.prod(prob.shape)
    pred = pm.predict_launches(prob, [_facts(reads=[(1, nbytes)], writes=[(2, nbytes)])], gpu)
    path = str(tmp_path / "table.md")
    pm.write_markdown([pred], {}, path, "test", 0.0)
    assert pm.read_table(path) == {pred.key: pytest.approx(pred.pct_copy, abs=0.05)}
    assert pm.check([pred], path) == []
    text = open(path).read().replace(f"| {pred.pct_copy:.1f} |", f"| {pred.pct_copy + 6:.1f} |")
    with open(path, "w") as f:
        f.write(text)
    (bad,) = pm.check([pred], path)
    assert "fwd_eval" in bad and "committed" in bad


def test_help_prints(capsys):
    # argparse formats help strings with %: a literal "% of copy" in one broke --help
    with pytest.raises(SystemExit) as exit_:
        pm.main(["--help"])
    assert exit_.value.code == 0 and "--check PATH" in capsys.readouterr().out


# ------------------------------------------------------------------ the real kernels

@pytest.fixture(scope="module")
def bench():
    """The model of every benchmark problem on both GPUs: compiles the ~60 distinct
    specializations once (most are cached on disk by the compile check's tests)."""
    probs = pm.problems()
    facts = pm.analyze(probs, workers=2)
    preds = {(p, g): pm.predict_launches(p, facts[p], pm.GPUS[g]) for p in probs for g in pm.GPUS}
    return facts, preds


def test_no_row_predicts_worse_than_the_committed_table(bench):
    _facts_, preds = bench
    committed = pm.read_table(TABLE)
    assert committed, f"no rows in {TABLE}"
    bad = pm.check(list(preds.values()), TABLE)
    assert not bad, ("predicted % of copy dropped (regenerate the table with "
                     "`python -m bench.perf_model` if that is intended):\n"
                     + "\n".join(bad))


def test_bytes_of_the_real_kernels(bench):
    _facts_, preds = bench
    big = (256, 64, 112, 112)
    e = 2 * math.prod(big)                                # s * E, float16
    for layout in ("contiguous", "channels_last"):
        p = lambda op: preds[(cc.Problem(op, big, "float16", layout), "H100")]  # noqa: E731
        assert p("fwd_eval").hbm_bytes == 2 * e           # read x, write y
        assert p("fwd_eval").launches == 1
        assert p("fwd_train").hbm_bytes >= 2 * e
        assert p("bwd_train").hbm_bytes >= 3 * e
    for pred in preds.values():
        assert not pred.failures, pred.failures
        assert 0 < pred.pct_copy <= 100.5 and 0 < pred.lanes <= 1
        assert pred.vs_one_pass >= 0.99 and pred.launches >= 1


def test_every_streaming_launch_has_its_loop_found(bench):
    facts, _preds = bench
    for prob, launches in facts.items():
        for f in launches:
            assert f.ok, (prob.name, f.kernel, f.failures)
            if f.tiles and f.tiles > f.programs:          # programs go round a tile loop
                assert f.loop_instr > 0 and f.warp_instr_per_elem > 0, (prob.name, f.kernel)
                assert f.loads_per_program >= 1
            if f.partials:                               # it merges partials from the SASS
                assert f.partials_in_flight >= 1 and f.partial_read_bytes > 0
                assert 1 <= f.merge_trips <= f.partials
            if f.kernel == "bn_merge_partials_kernel" and f.partials > 256:
                # one or two passes over chunks of a [partials, channels] tile: a few round
                # trips each, not one per partial
                assert f.merge_trips <= 8, (prob.name, f.partials, f.merge_trips)


def test_a_plan_with_hundreds_of_partials_predicts_worse():
    prob = cc.Problem("fwd_train", (32, 64, 56, 56), "float16", "contiguous")
    good = pm.predict(prob, "H100", workers=2)
    # one split per 512-position tile: 32 samples x 7 tiles = 224 partials per channel
    with planner.forced_plan(variant="split", block_n=1, block_s=512, splits=224):
        bad = pm.predict(prob, "H100", workers=2)
    assert bad.serial_partials >= 200 > good.serial_partials
    assert bad.serial_trips >= 1          # however many partials the SASS loads at once
    assert bad.terms_us["serial partials"] >= bad.serial_trips * pm.L2_ROUND_TRIP_S * 1e6 - 1e-3
    assert bad.time_us > good.time_us and bad.pct_copy < good.pct_copy
