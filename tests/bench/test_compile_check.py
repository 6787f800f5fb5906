"""Every kernel plan compiles for sm_90a and sm_80 without a GPU, spill-free, with 16-byte
accesses for aligned half activations -- and the check catches plans that are not."""
import pytest

from tritonbn import launch, plan as planner
from bench import compile_check as cc


@pytest.fixture(scope="module")
def ci_results():
    # The default tier: every kernel and plan regime in float16 on both targets, unaligned
    # pointers on sm_90a (~2 minutes on 2 cores); bfloat16 and sm_80 unaligned are the slow
    # tier's (test_every_ci_plan_in_both_half_dtypes_and_alignments below).
    return cc.run_check(subset="ci", target_keys=("sm90", "sm80"), unaligned=("sm90",),
                        workers=2, dtypes=("float16",))


def _gate(results):
    failures = [(r.target, r.kernel, r.dtype, r.blocks, r.aligned, r.failures)
                for r in results if not r.ok]
    assert not failures, failures
    for r in results:
        assert r.regs > 0 and r.local == 0 and r.programs_per_sm >= 1


@pytest.mark.slow
def test_every_ci_plan_in_both_half_dtypes_and_alignments():
    results = cc.run_check(subset="ci", target_keys=("sm90", "sm80"), unaligned=True, workers=2)
    assert {r.dtype for r in results} == {"float16", "bfloat16"}
    assert {(r.target, r.aligned) for r in results} == {
        (t.name, a) for t in (cc.TARGETS["sm90"], cc.TARGETS["sm80"]) for a in (True, False)}
    _gate(results)


def test_every_ci_plan_compiles_without_spills_for_both_targets(ci_results):
    assert {r.target for r in ci_results} == {cc.TARGETS["sm90"].name, cc.TARGETS["sm80"].name}
    kernels = {r.kernel for r in ci_results}
    assert kernels == {"bn_stats_partial_kernel", "bn_fwd_apply_kernel", "bn_fwd_onepass_kernel",
                       "bn_bwd_partial_kernel", "bn_bwd_apply_kernel", "bn_bwd_onepass_kernel",
                       "bn_merge_partials_kernel"}   # channels-last planes with many splits
    assert {(r.target, r.aligned) for r in ci_results} == {
        (cc.TARGETS["sm90"].name, True), (cc.TARGETS["sm90"].name, False),
        (cc.TARGETS["sm80"].name, True)}
    # in-place activated batch norm's backward (y read and inverted) in both its forms
    inverted = {r.kernel for r in ci_results if r.flags.get("INVERTIBLE")}
    assert inverted >= {"bn_bwd_onepass_kernel", "bn_bwd_partial_kernel", "bn_bwd_apply_kernel"}
    _gate(ci_results)


def test_aligned_half_plans_use_16_byte_accesses(ci_results):
    vec = [r for r in ci_results if r.vector_capable]
    assert len(vec) >= 20  # the check must actually find vectorizable plans to gate
    for r in vec:
        assert max(r.loads) == 16, (r.kernel, r.blocks, r.loads)
        assert 2 not in r.loads and 2 not in r.stores
    # unaligned pointers cannot be proven vectorizable, so they are reported, not gated
    assert not any(r.vector_capable for r in ci_results if not r.aligned)


def _forced_jobs(problem, target_key, **plan):
    """Specializations a forced plan would launch for a problem."""
    with planner.forced_plan(**plan):
        launches = cc.capture(problem, cc.TARGETS[target_key])
    return {(cc.specialize(k, a, kw), target_key, problem.dtype, True): [problem.name]
            for k, _g, a, kw in launches}


def test_check_fails_a_spilling_plan_and_a_non_compiling_plan(capsys):
    prob = cc.Problem("fwd_train", (16, 4, 32, 32), "float16", "contiguous")
    # the whole 16 x 1024 plane of one channel in one warp: 512 values per thread -> spills
    spilling = _forced_jobs(prob, "sm90", variant="onepass", num_warps=1)
    # a block that is not a power of two cannot be an arange: the compiler rejects it
    broken = _forced_jobs(prob, "sm90", variant="split", block_s=48, splits=2)
    results = cc.compile_jobs({**spilling, **broken}, workers=2, progress=True)
    progress = capsys.readouterr().err   # a long check says how far it got
    assert f"{len(results)}/{len(results)}" in progress and "compiling" in progress
    onepass = [r for r in results if r.kernel == "bn_fwd_onepass_kernel"]
    assert onepass and not onepass[0].ok
    assert any("spills" in f for f in onepass[0].failures)
    assert onepass[0].local + onepass[0].stack > 0
    split = [r for r in results if r.kernel == "bn_stats_partial_kernel"]
    assert split and not split[0].ok and "does not compile" in split[0].failures[0]


def test_spills_are_local_memory_instructions_not_an_unused_stack_frame():
    sass = """
        /*0000*/                   LDC R1, c[0x0][0x28] ;
        /*00b0*/                   IADD3 R1, R1, -0x8, RZ ;
        /*14c0*/                   STG.E desc[UR4][R2.64], R4 ;
    """
    assert cc.local_memory_ops(sass) == 0      # a reserved frame nothing touches
    sass += """
        /*14d0*/                   STL [R1], R2 ;
        /*1570*/               @P0 LDL.LU R2, [R1] ;
    """
    assert cc.local_memory_ops(sass) == 2


def test_capture_records_launches_without_running_them():
    prob = cc.Problem("bwd_train", (8, 64, 16, 16), "bfloat16", "channels_last")
    with launch.count_launches() as launched:
        captured = cc.capture(prob, cc.TARGETS["sm90"])
    assert not launched and captured
    assert all(a[0].device.type == "meta" for _k, _g, a, _kw in captured)


def test_specialization_matches_tritons_rules():
    prob = cc.Problem("fwd_eval", (32, 64, 8, 8), "float16", "channels_last")
    (kernel, _g, args, kwargs), = cc.capture(prob, cc.TARGETS["sm90"])
    spec = cc.specialize(kernel, args, kwargs)
    sig = dict(spec.signature)
    assert sig["X"] == "*fp16" and sig["SAVE_MEAN"] == "*fp32"
    assert sig["stride_xc"] == "constexpr" and spec.constexpr("stride_xc") == 1  # channels-last
    assert "stride_xs" in spec.divisible and "X" in spec.divisible                # 64 channels
    (kernel, _g, args, kwargs), = cc.capture(prob, cc.TARGETS["sm90"], aligned=False)
    unaligned = cc.specialize(kernel, args, kwargs)
    assert "X" not in unaligned.divisible and "Y" in unaligned.divisible  # y is allocated aligned
    # an unaligned input gets scalar accesses and so a plan with fewer elements per thread
    def per_thread(sp):
        return (sp.constexpr("BLOCK_N") * sp.constexpr("BLOCK_S") * sp.constexpr("BLOCK_C")
                // (32 * sp.num_warps))
    assert per_thread(unaligned) == planner.UNALIGNED_PER_THREAD["fwd_eval"] < per_thread(spec)


def test_tiles_smaller_than_the_threads_are_not_gated_as_vectorizable():
    """A plane of one row (N * S = 1) holds fewer elements than the program has threads: there
    is nothing to vectorize, so narrow accesses there are not a finding."""
    tiny = cc.Problem("fwd_eval", (1, 32, 1, 1), "float16", "channels_last")
    big = cc.Problem("fwd_eval", (32, 64, 8, 8), "float16", "channels_last")
    specs = {}
    for prob in (tiny, big):
        (kernel, _g, args, kwargs), = cc.capture(prob, cc.TARGETS["sm90"])
        specs[prob] = cc.specialize(kernel, args, kwargs)
    t = specs[tiny]
    assert t.constexpr("BLOCK_N") * t.constexpr("BLOCK_S") * t.constexpr("BLOCK_C") \
        < 4 * 32 * t.num_warps
    assert not cc.vector_capable(specs[tiny])
    assert cc.vector_capable(specs[big])


def test_inv_std_has_no_subroutine_call_on_sm80():
    """A correctly rounded sqrt_rn compiles to a slow-path call that gave sm_80 kernels a stack
    frame; the reciprocal square root does not."""
    prob = cc.Problem("fwd_train", (1, 8, 112, 112), "bfloat16", "channels_last", "silu+res")
    jobs = {(cc.specialize(k, a, kw), "sm80", prob.dtype, True): [prob.name]
            for k, _g, a, kw in cc.capture(prob, cc.TARGETS["sm80"])}
    results = cc.compile_jobs(jobs, workers=2)
    assert {r.kernel for r in results} == {"bn_stats_partial_kernel", "bn_fwd_apply_kernel"}
    for r in results:
        assert r.ok and r.stack == 0 and r.local == 0, (r.kernel, r.failures)
