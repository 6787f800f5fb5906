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
