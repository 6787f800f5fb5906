"""The command line: `tritonbn demo` checks against torch and names the kernels that ran;
`tritonbn info` explains the plan of a shape."""
import pytest

from tritonbn.tools import cli


def test_demo_runs_kernels_and_reports_ok(capsys):
    assert cli.main(["demo"]) == 0
    out = capsys.readouterr().out
    assert "OK: tritonbn matches torch" in out
    for kernel in ("fwd_onepass", "bwd_onepass", "stats_partial", "fwd_apply", "bwd_partial",
                   "bwd_apply"):
        assert kernel in out


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_info_prints_every_op_with_its_reason(layout, capsys):
    assert cli.main(["info", "--shape", "256,64,112,112", "--dtype", "bfloat16",
                     "--layout", layout]) == 0
    out = capsys.readouterr().out
    for op in ("fwd_train", "fwd_eval", "bwd_train", "bwd_eval"):
        assert op in out
    assert out.count("why:") == 4
    assert f"channels_minor={layout == 'channels_last'}" in out


def test_info_rejects_unknown_dtype():
    with pytest.raises(SystemExit):
        cli.main(["info", "--shape", "2,3", "--dtype", "int8"])


@pytest.mark.parametrize("argv, says", [
    (["--shape", "2,x"], "bad shape"),
    (["--shape", "2"], "bad shape"),
    (["--shape", "2,4,-1"], "bad shape"),
    (["--shape", "2,4,3", "--layout", "channels_last"], "4-D or 5-D"),
    (["--shape", "2,4,3,3,3,3", "--layout", "channels_last"], "4-D or 5-D"),
])
def test_info_bad_shapes_are_usage_errors(argv, says, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["info", *argv])
    assert exit_.value.code == 2 and says in capsys.readouterr().err


def test_info_accepts_the_x_separated_shape(capsys):
    assert cli.main(["info", "--shape", "2x4x4x4", "--op", "fwd_train"]) == 0
    assert "input (2, 4, 4, 4) float16 contiguous -> plane view N=2 C=4 S=16" in \
        capsys.readouterr().out


def test_info_prints_the_plan_the_launchers_use(table_path, device, capsys):
    """With float16 and bfloat16 entries for the same plane, `tritonbn info --dtype bfloat16`
    shows the bfloat16 entry -- the plan a real bfloat16 call launches."""
    import torch

    from tritonbn import launch, plan as planner, tuning_table as tt

    shape = (8, 4, 16, 16)
    name = planner.device_info(torch.device(device)).name
    plane = [shape[0], shape[1], shape[2] * shape[3]]
    entries = []
    for dtype, block_s in (("float16", 32), ("bfloat16", 64)):
        entries.append({"gpu": name, "triton": tt.triton_version(), "op": "fwd_eval",
                        "dtype": dtype, "layout": "nchw", "aligned": True,
                        "bucket": list(tt.bucket(*plane)), "shape": list(shape), "plane": plane,
                        "plan": dict(variant="split", block_n=2, block_s=block_s, block_c=1,
                                     splits=3, num_warps=4)})
    tt.merge_write(str(table_path), entries)
    planner.reload_tuning_table()
    assert cli.main(["info", "--shape", ",".join(map(str, shape)), "--dtype", "bfloat16",
                     "--op", "fwd_eval"]) == 0
    out = capsys.readouterr().out
    assert "block(n,s,c)=(2,64,1)" in out and "tuned (" in out
    x = torch.randn(shape, device=device).to(torch.bfloat16)
    with launch.capture_launches() as launches:
        import tritonbn
        tritonbn.batch_norm(x, torch.zeros(4, device=device), torch.ones(4, device=device))
    (_kernel, _grid, _args, kwargs), = launches
    assert (kwargs["BLOCK_N"], kwargs["BLOCK_S"], kwargs["BLOCK_C"]) == (2, 64, 1)


@pytest.mark.parametrize("command", ["check-compile", "overflow", "tune", "bench", "gpu-window"])
def test_each_tool_command_reaches_its_own_parser(command, capsys):
    # every tool is listed in `tritonbn --help` and `tritonbn <command> --help` is that tool's
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--help"])
    assert exit_.value.code == 0 and command in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_:
        cli.main([command, "--help"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: tritonbn {command} [-h]")
