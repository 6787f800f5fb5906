"""`tritonbn tune` end to end (smoke mode through the interpreter when there is no GPU): the
sweep, the table it writes, the dispatcher using the tuned plan in real launches, `tritonbn
info` showing it, model shapes from hooks, and the caller's running statistics left alone."""
import json

import pytest
import torch
from torch import nn

import tritonbn
from tritonbn import launch, plan as planner, tuning_table as tt
from tritonbn.tools import cli, shapes, tune
from tritonbn.tools.timing import SMOKE_LABEL, Measurement, smoke_mode



def test_cli_tune_writes_a_labelled_table_and_info_shows_the_tuned_plan(table_path, capsys):
    argv = ["tune", "--shape", "2,4,4,4", "--ops", "fwd_train,bwd_train", "--dtypes", "float16",
            "--layouts", "contiguous,channels_last", "--table", str(table_path),
            "--max-candidates", "2"]
    assert cli.main(argv) == 0
    out, err = capsys.readouterr()
    if smoke_mode():
        assert out.startswith(SMOKE_LABEL) and out.rstrip().endswith(SMOKE_LABEL)
    assert "fwd_train 2x4x4x4" in out and "speedup" in out and f"wrote 4 entries to {table_path}" in out
    assert "tune [" in err and "8/8" in err   # the bar counts candidates: 4 problems x 2
    data = json.loads(table_path.read_text())
    assert data["format"] == tt.FORMAT and data["version"] == tt.VERSION
    assert {(e["op"], e["layout"]) for e in data["entries"]} == {
        ("fwd_train", "nchw"), ("bwd_train", "nchw"), ("fwd_train", "nhwc"), ("bwd_train", "nhwc")}
    for e in data["entries"]:
        assert e["triton"] == tt.triton_version() and e["candidates"] == 2
        assert e["gpu"] == planner.device_info(torch.device(
            "cuda" if not smoke_mode() else "cpu")).name
        if smoke_mode():
            assert e["smoke"] and e["note"] == SMOKE_LABEL

    for layout in ("contiguous", "channels_last"):
        assert cli.main(["info", "--shape", "2,4,4,4", "--dtype", "float16", "--layout", layout]) == 0
        out = capsys.readouterr().out
        assert f"tuning table: {table_path}: 4 entries" in out
        assert out.count("why:") == 4 and out.count(f"why: tuned ({table_path})") == 2


class PreferSplit:
    """A timer that makes split plans win (it reads the candidate the tuner is forcing), so the
    round trip can show a tuned plan that differs from the heuristic one."""
    smoke = True

    def __call__(self, fn, warm=True):
        fn()
        forced = planner.forced_fields()
        t = 1.0 if forced.get("variant") == "onepass" else 0.5
        return Measurement(t, t, 1)


def test_round_trip_tuned_plan_runs_in_real_launches(table_path, device):
    shape = (2, 4, 8, 8)    # the heuristic plan is one-pass; the sweep also tries a split plan
    problems = tune.problems_for([shape], ops=("fwd_train",), layouts=("contiguous",))
    (result,) = tune.tune(problems, timer=PreferSplit(), show_progress=False)
    assert result.heuristic["variant"] == "onepass" and result.best["variant"] == "split"
    tune.write_table([result], str(table_path))

    x = torch.randn(shape, device=device, dtype=torch.float16)
    rm, rv = torch.zeros(4, device=device), torch.ones(4, device=device)
    with launch.count_launches() as ran:
        y = tritonbn.batch_norm(x, rm, rv, training=True)
    assert ran == {"bn_stats_partial_kernel": 1, "bn_fwd_apply_kernel": 1}   # split, as tuned
    ref = torch.nn.functional.batch_norm(x.double(), None, None, training=True)
    assert (y.double() - ref).abs().max() < 1e-2
    view_plan = planner.make_plan("fwd_train", 2, 4, 64, False, 2, 1 << 10,
                                   planner.device_info(x.device))
    assert view_plan.reason.startswith(f"tuned ({table_path})")

    # without the table the same call is one-pass again
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(tt.ENV, "off")
        planner.reload_tuning_table()
        with launch.count_launches() as ran:
            tritonbn.batch_norm(x, rm, rv, training=True)
        assert ran == {"bn_fwd_onepass_kernel": 1}
    planner.reload_tuning_table()


def _bn_model():
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Flatten(), nn.Linear(4 * 4 * 4, 8), nn.BatchNorm1d(8))


def make_model():
    """A --model factory: (module, input shape)."""
    return _bn_model(), (2, 3, 4, 4)


def test_tune_model_leaves_the_callers_model_alone(table_path):
    model = _bn_model()
    model[1].momentum = None                      # cumulative average: uses num_batches_tracked
    model(torch.randn(2, 3, 4, 4))                # non-trivial running statistics
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    results = tune.tune_model(model, (2, 3, 4, 4), ops=("fwd_train", "fwd_eval"),
                              layouts=("contiguous",), show_progress=False, max_candidates=2)
    assert {r.problem.shape for r in results} == {(2, 4, 4, 4), (2, 8)}
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert torch.equal(after[k], v), k
        assert after[k].device.type == "cpu"      # the meta copy never replaced the model's
    assert not model.training and not model[1].training


def test_cli_model_factory_and_input_shape(table_path, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(__import__("pathlib").Path(__file__).parent))
    argv = ["tune", "--model", "test_tune:make_model", "--ops", "fwd_eval", "--dtypes", "float32",
            "--layouts", "contiguous", "--no-write", "--max-candidates", "1", "--no-progress"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "2 batch-norm calls, 2 distinct input shapes" in out
    assert "fwd_eval  2x4x4x4" in out and "fwd_eval  2x8" in out
    assert not table_path.exists()                # --no-write


def test_model_shapes_come_from_hooks_on_a_meta_copy():
    model = tritonbn.convert_model(_bn_model())  # tritonbn layers too: launches are captured
    found = shapes.shapes_from_model(model, (5, 3, 4, 4))
    assert found == [((5, 4, 4, 4), 1), ((5, 8), 1)]
    assert next(model.parameters()).device.type == "cpu"
    with pytest.raises(ValueError, match="no batch-norm layers"):
        shapes.shapes_from_model(nn.Linear(2, 2), (1, 2))


def test_candidates_respect_the_kernel_constraints():
    h100 = planner.DeviceInfo("NVIDIA H100 80GB HBM3", 132, (9, 0), False)
    for op, n, c, s, minor in [("fwd_train", 256, 64, 12544, False), ("bwd_train", 1, 256, 802816, True),
                               ("fwd_eval", 256, 2048, 49, False), ("fwd_train", 1, 2048, 256, True),
                               ("bwd_train", 4096, 1024, 1, False)]:
        h = planner.make_plan(op, n, c, s, minor, 2, 1 << 20, h100, tuned=False)
        sweeps = {thorough: tune.candidates(op, n, c, s, minor, h, h100, thorough)
                  for thorough in (False, True)}
        assert len(sweeps[True]) >= len(sweeps[False]) > 1
        for cands in sweeps.values():
            assert cands[0] == tune.plan_fields(h)            # the heuristic is always measured
            keys = [tune.launch_key(p, n, s) for p in cands]
            assert len(keys) == len(set(keys))            # no duplicate launches
            for p in cands:
                assert all(v & (v - 1) == 0 for v in (p["block_n"], p["block_s"], p["block_c"],
                                                      p["num_warps"]))
                assert p["num_warps"] <= 16 and p["splits"] >= 1
                if p["variant"] == "onepass":
                    assert op != "fwd_eval" and p["block_n"] >= n and p["block_s"] >= s
                    assert p["block_n"] * p["block_s"] * p["block_c"] <= planner.ONEPASS_MAX[op]
                if not minor:
                    assert p["block_c"] == 1


def test_smoke_shapes_are_tiny_and_keep_their_rank():
    for shape in shapes.BENCH_SHAPES:
        small = shapes.smoke_shape(shape)
        assert len(small) == len(shape) and all(1 <= a <= b for a, b in zip(small, shape))
        assert torch.Size(small).numel() <= shapes.SMOKE_TARGET_ELEMS
        assert small[0] >= 2 and small[1] >= 2
    assert shapes.smoke_shape((2, 3, 5)) == (2, 3, 5)     # already tiny: as given
    assert shapes.parse_shape("8,64,56,56") == (8, 64, 56, 56)
    for bad in ("8", "8x64x56x56"):              # comma-separated integers only
        with pytest.raises(ValueError):
            shapes.parse_shape(bad)


@pytest.mark.parametrize("argv, says", [
    (["--model", "nomodule"], "module:callable"),
    (["--model", "no_such_module_xyz:f"], "ModuleNotFoundError"),
    (["--model", "os:getcwd"], "not an nn.Module"),
    (["--model", "test_tune:make_model", "--input-shape", "2,x"], "--input-shape"),
    (["--model", "test_tune:make_model", "--input-shape", "2,5,4,4"], "forward pass failed"),
    (["--input-shape", "2,3,4,4"], "give --model too"),
    (["--shape", "2,4", "--max-candidates", "0"], "at least 1"),
])
def test_cli_tune_usage_errors_name_the_problem(argv, says, table_path, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(__import__("pathlib").Path(__file__).parent))
    with pytest.raises(SystemExit) as exit_:
        cli.main(["tune", *argv, "--no-progress"])
    assert exit_.value.code == 2 and says in capsys.readouterr().err
    assert not table_path.exists()


def test_cli_tune_refuses_a_table_path_it_would_not_write_before_sweeping(table_path, capsys):
    table_path.mkdir()
    with launch.count_launches() as ran, pytest.raises(SystemExit) as exit_:
        cli.main(["tune", "--shape", "2,4", "--table", str(table_path), "--no-progress"])
    assert exit_.value.code == 2 and "directory" in capsys.readouterr().err
    assert not ran and table_path.is_dir()
    with pytest.raises(SystemExit, match="nothing chosen"):
        cli.main(["tune", "--shape", "2,4", "--ops", "", "--no-progress"])


def test_a_problem_that_cannot_be_tuned_is_reported_and_the_rest_kept(table_path, capsys,
                                                                      monkeypatch):
    real = tune.tune_problem

    def fail_2d(problem, *args, **kwargs):
        if len(problem.shape) == 2:
            raise RuntimeError("CUDA out of memory (simulated)")
        return real(problem, *args, **kwargs)

    monkeypatch.setattr(tune, "tune_problem", fail_2d)
    argv = ["tune", "--shape", "2,4", "--shape", "2,4,4,4", "--ops", "fwd_eval", "--layouts",
            "contiguous", "--table", str(table_path), "--max-candidates", "1", "--no-progress"]
    assert cli.main(argv) == 1
    out, err = capsys.readouterr()
    assert "could not tune fwd_eval 2x4 float16 contiguous: RuntimeError: CUDA out of memory" in err
    assert "wrote 1 entries" in out
    (entry,) = json.loads(table_path.read_text())["entries"]
    assert entry["shape"] == [2, 4, 4, 4]
    with pytest.raises(RuntimeError, match="simulated"):   # the library call raises by default
        tune.tune(tune.problems_for([(2, 4)], ops=("fwd_eval",)), show_progress=False)


def test_the_output_check_rejects_a_plan_that_drops_a_tile(device, monkeypatch):
    """The tuner compares every candidate with the heuristic plan: on its ramped input, a plan
    that skips one tile of 64 must fail on the statistics (forward) or the parameter gradients
    (backward), not only on the activations."""
    for op in ("fwd_train", "bwd_train"):
        work = tune.Workload(tune.Problem(op, (8, 3, 16, 16), "float32", "contiguous"), device)
        plan = dict(variant="split", block_n=1, block_s=64, block_c=1, splits=4, num_warps=4)
        with planner.forced_plan(**plan):
            ref = work.run()
            tune.check_outputs(op, work.run(), ref)      # the same plan passes
            real = planner.grid_tiles

            def drop_last(p, n, s):
                n_tiles_s, n_tiles, per_split, splits = real(p, n, s)
                return n_tiles_s, n_tiles - 1, per_split, splits

            monkeypatch.setattr(planner, "grid_tiles", drop_last)
            launch.forget_calls()       # the launchers keep each kind of call's grid
            bad = work.run()
            monkeypatch.setattr(planner, "grid_tiles", real)
            launch.forget_calls()
        names = ("save_mean", "save_invstd") if op == "fwd_train" else ("grad_weight", "grad_bias")
        for i, name in enumerate(names, start=1):
            with pytest.raises(AssertionError, match=name):
                tune.check_outputs(op, (ref[0], *((bad[i] if j == i else ref[j])
                                                   for j in (1, 2))), ref)
