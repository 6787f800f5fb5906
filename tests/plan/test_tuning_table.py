"""The tuning table and the dispatcher's use of it: lookups (nearest bucket, dtype, alignment),
constraint checks on tuned plans, corrupt / foreign tables (a warning, never a crash),
concurrent writers, and the compile check's hook for tuned plans. No kernels run here except
in the compile-check test (which compiles for sm_90a without a GPU)."""
import json
import subprocess
import sys
import threading
import warnings

import pytest
import triton

from bench import compile_check      # the repository's compile check (bench/), not the package's
from tritonbn import plan as planner, tuning_table as tt
from tritonbn.plan import DeviceInfo, make_plan

H100 = DeviceInfo("NVIDIA H100 80GB HBM3", sm_count=132, capability=(9, 0), interpreter=False)



def entry(plane=(256, 64, 12544), op="fwd_train", dtype="float16", layout="nchw", aligned=True,
          gpu=H100.name, triton_version=None, **plan):
    fields = dict(variant="split", block_n=1, block_s=2048, block_c=1, splits=7, num_warps=8)
    fields.update(plan)
    return {"gpu": gpu, "triton": triton_version or triton.__version__, "op": op, "dtype": dtype,
            "layout": layout, "aligned": aligned, "bucket": list(tt.bucket(*plane)),
            "plan": fields, "shape": [plane[0], plane[1], plane[2]], "plane": list(plane),
            "capability": [9, 0], "sm_count": 132, "time_us": 10.0, "heuristic_us": 12.0}


def plan(n=256, c=64, s=12544, op="fwd_train", minor=False, elem=2, aligned=True, **kw):
    return make_plan(op, n, c, s, minor, elem, 1 << 20, H100, aligned, **kw)


def test_tuned_plan_is_used_with_its_reason(table_path):
    heuristic = plan()
    tt.merge_write(str(table_path), [entry()])
    planner.reload_tuning_table()
    p = plan()
    assert (p.variant, p.block_s, p.splits, p.num_warps) == ("split", 2048, 7, 8)
    assert p.reason.startswith(f"tuned ({table_path})") and "same bucket" in p.reason
    assert plan() is p                      # still one cached object per plane
    assert plan(tuned=False) == heuristic   # the heuristics stay reachable (tune's baseline)
    # a nearby plane (within MAX_BUCKET_DISTANCE) takes the nearest entry; a far one does not
    assert plan(n=128).reason.startswith("tuned (") and "distance 1" in plan(n=128).reason
    assert not plan(n=8).reason.startswith("tuned")
    assert not plan(op="bwd_train").reason.startswith("tuned")


def test_lookup_is_keyed_by_dtype_layout_and_alignment(table_path):
    tt.merge_write(str(table_path), [entry(block_s=1024), entry(dtype="bfloat16", block_s=512),
                                     entry(layout="nhwc", block_c=16, block_s=256)])
    planner.reload_tuning_table()
    assert plan().block_s == 1024                        # element size only: float16 first
    assert plan(dtype="bfloat16").block_s == 512         # exact dtype wins
    assert not plan(elem=4).reason.startswith("tuned")  # float32: no entry
    assert plan(minor=True).block_c == 16                # the nhwc entry
    assert not plan(aligned=False).reason.startswith("tuned")  # measured aligned only


def test_tuned_plans_must_fit_the_kernels(table_path):
    small = (64, 8, 64)
    tt.merge_write(str(table_path), [
        # one pass tuned on a plane of 4096, looked up for a 4x larger one (bucket distance 2):
        # the derived tile (the plane must fit one tile) is over the register budget
        entry(plane=small, variant="onepass", block_n=64, block_s=64, block_c=1, splits=1,
              num_warps=4),
        # eval has no one-pass kernel
        entry(plane=small, op="fwd_eval", variant="onepass", block_n=64, block_s=64, block_c=1,
              splits=1, num_warps=4),
        # split blocks larger than the plane are clamped to it
        entry(plane=(4, 8, 64), op="bwd_train", block_n=8, block_s=256, block_c=1, splits=2),
    ])
    planner.reload_tuning_table()
    same = plan(*small)
    assert same.variant == "onepass" and same.block_n >= 64 and same.block_s >= 64
    big = plan(128, 8, 128)
    assert "not used" in big.reason and big.variant == plan(128, 8, 128, tuned=False).variant
    assert "no one-pass kernel" in plan(*small, op="fwd_eval").reason
    clamped = plan(4, 8, 64, op="bwd_train")
    assert clamped.reason.startswith("tuned") and (clamped.block_n, clamped.block_s) == (4, 64)
    for p in (same, big, clamped):
        assert all(b & (b - 1) == 0 for b in (p.block_n, p.block_s, p.block_c))


def test_tuned_split_tiles_are_bounded(table_path):
    """A split entry whose tile the compiler cannot build (valid JSON, powers of two) falls
    back to the heuristics; the sweep itself never writes one."""
    tt.merge_write(str(table_path), [
        entry(block_n=4, block_s=262144, block_c=2, splits=2, num_warps=8),     # 2 M elements
        entry(op="bwd_train", block_n=1, block_s=16384, splits=2, num_warps=1),  # 512 per thread
        entry(op="fwd_eval", block_n=1, block_s=8192, splits=2, num_warps=8),    # fits
    ])
    planner.reload_tuning_table()
    too_big, too_dense, fits = plan(), plan(op="bwd_train"), plan(op="fwd_eval")
    assert "exceeds 16384 elements" in too_big.reason and too_big.block_s == plan(tuned=False).block_s
    assert "per thread" in too_dense.reason
    assert fits.reason.startswith("tuned") and fits.block_s == 8192
    from tritonbn.tools import tune
    assert max(tune.THOROUGH_TILES) <= planner.MAX_TUNED_TILE
    assert max(tune.THOROUGH_PER_THREAD + tune.ONEPASS_PER_THREAD) <= planner.MAX_TUNED_PER_THREAD


def test_corrupt_table_warns_and_is_ignored(table_path):
    table_path.write_text('{"format": "tritonbn-tuning-table", "version": 1, "entries": [')
    with pytest.warns(tt.TuningTableWarning, match="ignored .*corrupt"):
        p = plan()
    assert p == plan(tuned=False)
    # writing over it keeps the broken file aside and starts a valid table
    with pytest.warns(tt.TuningTableWarning, match="moved to"):
        tt.merge_write(str(table_path), [entry()])
    asides = list(table_path.parent.glob("tuning.json.corrupt-*"))
    assert len(asides) == 1 and asides[0].read_text().endswith('"entries": [')
    assert json.loads(table_path.read_text())["entries"][0]["plan"]["block_s"] == 2048
    # a second corrupt table is moved aside too, without overwriting the first one kept
    table_path.write_bytes(b"\xff\xfe not utf-8")
    with pytest.warns(tt.TuningTableWarning, match="moved to"):
        tt.merge_write(str(table_path), [entry()])
    assert len(list(table_path.parent.glob("tuning.json.corrupt-*"))) == 2


@pytest.mark.parametrize("content", [b"\xff\xfe\x00garbage", b"[" * 200000, b"",
                                     b'{"format": "tritonbn-tuning-table", "version": 1, '
                                     b'"entries": {}}'])
def test_any_corrupt_bytes_are_ignored_by_the_dispatcher(table_path, content):
    table_path.write_bytes(content)
    with pytest.warns(tt.TuningTableWarning, match="ignored .*corrupt"):
        p = plan()
    assert p == plan(tuned=False)


def test_a_directory_or_a_foreign_file_is_never_written_over(table_path):
    # a directory where the table should be: ignored when planning, refused when writing
    table_path.mkdir()
    (table_path / "keep.md").write_text("results")
    with pytest.warns(tt.TuningTableWarning, match="directory"):
        assert plan() == plan(tuned=False)
    with pytest.raises(tt.TableError, match="directory"):
        tt.merge_write(str(table_path), [entry()])
    assert (table_path / "keep.md").read_text() == "results"
    # another JSON file, and a table of another format version: left exactly as they were
    for i, text in enumerate([json.dumps({"name": "some other tool's settings"}),
                              json.dumps({"format": tt.FORMAT, "version": 999, "entries": []})]):
        other = table_path.parent / f"other{i}.json"
        other.write_text(text)
        with pytest.raises(tt.TableError, match="not written over"):
            tt.merge_write(str(other), [entry()])
        assert other.read_text() == text
        assert not list(table_path.parent.glob(f"other{i}.json.corrupt*"))


def test_rewriting_keeps_the_table_file_permissions(table_path):
    tt.merge_write(str(table_path), [entry()])
    assert table_path.stat().st_mode & 0o777 == 0o644   # not mkstemp's 0600
    table_path.chmod(0o664)
    tt.merge_write(str(table_path), [entry(op="bwd_train")])
    assert table_path.stat().st_mode & 0o777 == 0o664
    assert len(json.loads(table_path.read_text())["entries"]) == 2


def test_foreign_version_table_and_stale_triton_warn_and_are_ignored(table_path):
    table_path.write_text(json.dumps({"format": tt.FORMAT, "version": 999,
                                      "entries": [entry()]}))
    with pytest.warns(tt.TuningTableWarning, match="format version 999"):
        assert not plan().reason.startswith("tuned")
    table_path.write_text(json.dumps({"format": tt.FORMAT, "version": tt.VERSION,
                                      "entries": [entry(triton_version="0.0.1")]}))
    planner.reload_tuning_table()
    with pytest.warns(tt.TuningTableWarning, match="triton 0.0.1"):
        assert not plan().reason.startswith("tuned")
    # not a table at all (a list), and a table with one malformed entry among good ones
    table_path.write_text("[1, 2, 3]")
    planner.reload_tuning_table()
    with pytest.warns(tt.TuningTableWarning, match="not a tritonbn tuning table"):
        plan()
    bad = entry(plane=(8, 8, 8), block_s=48)   # not a power of two
    bad_shape = dict(entry(plane=(256, 64, 4096)), shape=8)  # would break `tritonbn info`
    table_path.write_text(json.dumps({"format": tt.FORMAT, "version": tt.VERSION,
                                      "entries": [bad, bad_shape, entry()]}))
    planner.reload_tuning_table()
    with pytest.warns(tt.TuningTableWarning, match="2 malformed entries"):
        assert plan().reason.startswith("tuned")


def test_lookups_can_be_turned_off(table_path, monkeypatch):
    tt.merge_write(str(table_path), [entry()])
    monkeypatch.setenv(tt.ENV, "off")
    planner.reload_tuning_table()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not plan().reason.startswith("tuned")
    assert tt.active_path() is None


_WRITER = """
import sys
from tritonbn import tuning_table as tt
path, tag, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
base = {"gpu": "g", "triton": "t", "op": "fwd_train", "dtype": "float16", "layout": "nchw",
        "aligned": True, "plan": {"variant": "split", "block_n": 1, "block_s": 64, "block_c": 1,
                                  "splits": 1, "num_warps": 4}}
for i in range(count):
    tt.merge_write(path, [dict(base, bucket=[tag, i, 0])])
"""


def test_concurrent_writers_merge_without_corruption(tmp_path):
    path = str(tmp_path / "shared" / "tuning.json")
    count = 12
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, path, str(tag), str(count)])
             for tag in (1, 2)]
    # and threads in this process at the same time
    threads = [threading.Thread(target=lambda t=t: [tt.merge_write(path, [dict(
        entry(), gpu="g", triton="t", bucket=[t, i, 0])]) for i in range(count)]) for t in (3, 4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    table = tt.load(path)
    assert table.problem is None
    assert sorted(tuple(e["bucket"]) for e in table.entries) == sorted(
        (t, i, 0) for t in (1, 2, 3, 4) for i in range(count))
    # no temporary files left behind
    assert sorted(p.name for p in (tmp_path / "shared").iterdir()) == ["tuning.json",
                                                                       "tuning.json.lock"]


def test_merge_replaces_the_same_key_and_rejects_malformed_entries(tmp_path):
    path = str(tmp_path / "t.json")
    tt.merge_write(path, [entry(block_s=1024), entry(plane=(8, 8, 8))])
    tt.merge_write(path, [entry(block_s=512)])
    table = tt.load(path)
    assert len(table.entries) == 2
    assert {e["plan"]["block_s"] for e in table.entries} == {512, 2048}
    with pytest.raises(ValueError, match="malformed"):
        tt.merge_write(path, [entry(num_warps=3)])


def test_default_paths_follow_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv(tt.ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert tt.active_path() == str(tmp_path / "tritonbn" / "tuning.json")
    assert tt.default_path(smoke=True) == str(tmp_path / "tritonbn" / "tuning-smoke.json")
    monkeypatch.setenv(tt.ENV, str(tmp_path / "x.json"))
    assert tt.active_path() == tt.default_path() == str(tmp_path / "x.json")


def test_compile_check_compiles_the_tables_plans_for_matching_targets(tmp_path):
    path = str(tmp_path / "t.json")
    tuned = entry(plane=(8, 4, 1024), block_s=512, splits=3, num_warps=2)
    tuned["shape"], tuned["memory_format"] = [8, 4, 32, 32], "contiguous"
    tt.merge_write(path, [tuned, dict(entry(plane=(8, 4, 1024)), gpu="NVIDIA RTX A6000",
                                      capability=[8, 6])])
    probs = compile_check.tuned_problems("sm90", path)
    assert [p.name for p, _ in probs] == ["fwd_train 8x4x32x32 float16 contiguous"]
    assert compile_check.tuned_problems("sm80", path) == []     # sm_86 is neither target
    results = compile_check.run_check("tuned", ("sm90",), table_path=path)
    assert {r.kernel for r in results} == {"bn_stats_partial_kernel", "bn_fwd_apply_kernel"}
    for r in results:
        assert r.ok, r.failures
        assert r.blocks == {"BLOCK_N": 1, "BLOCK_S": 512, "BLOCK_C": 1} and r.num_warps == 2
        assert r.problems == ["fwd_train 8x4x32x32 float16 contiguous (tuned)"]
