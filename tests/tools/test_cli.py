"""The command line: `tritonbn demo` checks against torch and names the kernels that ran;
`tritonbn info` explains the plan of a shape; `tritonbn --help` lists the user commands, and
the installed package holds no development harness (those are the repository's bench/)."""
import importlib.util
import os
import re
import subprocess
import sys

import pytest

import tritonbn
from tritonbn.tools import cli

USER_COMMANDS = ["demo", "info", "convert", "tune", "bench", "overflow"]
# what lives in the repository's bench/ folder, never in the installed package
HARNESSES = ["compile_check", "gpu_window", "gpu_window_steps", "perf_model", "host"]


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
    (["--shape", "256x64x112x112"], "comma-separated integers"),   # not read as 256,64,112,112
    (["--shape", "2x4x4x4"], "comma-separated integers"),
    (["--shape", "2,,4"], "comma-separated integers"),
    (["--shape", "2,4,"], "comma-separated integers"),
    (["--shape", "1_000,4"], "comma-separated integers"),
    (["--shape", "2;4"], "comma-separated integers"),
    (["--shape", "2,4,3", "--layout", "channels_last"], "4-D or 5-D"),
    (["--shape", "2,4,3,3,3,3", "--layout", "channels_last"], "4-D or 5-D"),
])
def test_info_bad_shapes_are_usage_errors(argv, says, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["info", *argv])
    assert exit_.value.code == 2 and says in capsys.readouterr().err


def test_info_accepts_comma_separated_shapes_with_spaces(capsys):
    assert cli.main(["info", "--shape", "2, 4,4 ,4", "--op", "fwd_train"]) == 0
    assert "input (2, 4, 4, 4) float16 contiguous -> plane view N=2 C=4 S=16" in \
        capsys.readouterr().out


@pytest.mark.parametrize("dtype, says", [
    ("bfloat16", "dtype bfloat16: planned as any 2-byte dtype (the heuristic plans are "
                 "float16's too); tuning-table entries of bfloat16 first, then of float16"),
    ("float16", "dtype float16: planned as any 2-byte dtype (the heuristic plans are "
                "bfloat16's too); tuning-table entries of float16 first, then of bfloat16"),
    ("float32", "dtype float32: planned as any 4-byte dtype; tuning-table entries of float32"),
])
def test_info_says_what_the_plan_depends_on_for_the_dtype(dtype, says, capsys):
    # bfloat16 and float16 get the same heuristic plan: the output must say so, not print a
    # float16-looking plan without a word
    assert cli.main(["info", "--shape", "8,4,16,16", "--dtype", dtype, "--op", "fwd_eval"]) == 0
    assert says in capsys.readouterr().out


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


@pytest.mark.parametrize("command", ["overflow", "tune", "bench"])
def test_each_tool_command_reaches_its_own_parser(command, capsys):
    # every tool is listed in `tritonbn --help` and `tritonbn <command> --help` is that tool's
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--help"])
    assert exit_.value.code == 0 and command in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_:
        cli.main([command, "--help"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: tritonbn {command} [-h]")


def _help_commands(text: str) -> dict:
    """{command: description} from the 'commands:' block of the top-level help."""
    block = text.split("\ncommands:\n", 1)[1].split("\n\n", 1)[0]
    lines = block.splitlines()
    found = {}
    for line in lines:
        m = re.fullmatch(r"  (\S+) +(\S.*)", line)
        assert m, f"not a one-line command description: {line!r}"
        found[m.group(1)] = m.group(2)
    return found


def test_help_lists_exactly_the_user_commands_one_line_each(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--help"])
    assert exit_.value.code == 0
    listed = _help_commands(capsys.readouterr().out)
    assert list(listed) == USER_COMMANDS
    assert all(len(text) > 10 for text in listed.values())


def test_help_of_the_installed_command_lists_them_too():
    out = subprocess.run([sys.executable, "-m", "tritonbn", "--help"], capture_output=True,
                         text=True, timeout=120, cwd="/", env=dict(os.environ, COLUMNS="60"))
    assert out.returncode == 0, out.stderr
    assert list(_help_commands(out.stdout)) == USER_COMMANDS


def test_commands_run_in_this_process(monkeypatch, capsys):
    # CPU tensors run the kernels in Triton's interpreter whatever the environment says, so no
    # command re-executes itself to switch the interpreter on
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(os, "execve", lambda *a: pytest.fail(f"re-executed: {a[1]}"))
    for command in ("tune", "bench", "overflow"):
        with pytest.raises(SystemExit) as exit_:
            cli.main([command, "--help"])
        assert exit_.value.code == 0
    capsys.readouterr()


@pytest.mark.parametrize("command", ["check-compile", "gpu-window"])
def test_harness_commands_are_not_user_commands(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main([command, "--help"])
    assert exit_.value.code == 2 and "invalid choice" in capsys.readouterr().err


def test_the_installed_package_holds_no_harness():
    for name in HARNESSES:
        assert importlib.util.find_spec(f"tritonbn.tools.{name}") is None, name
    tools = os.path.dirname(cli.__file__)
    assert not os.path.exists(os.path.join(tools, "host_driver.c"))
    # and never imports one: dependencies go from bench/ to tritonbn only
    package = os.path.dirname(tritonbn.__file__)
    for folder, _dirs, files in os.walk(package):
        for name in files:
            if name.endswith(".py"):
                with open(os.path.join(folder, name)) as f:
                    text = f.read()
                assert not re.search(r"^\s*(from|import)\s+bench\b", text, re.M), name
                for harness in HARNESSES:
                    assert not re.search(rf"\bimport\s+{harness}\b|\.{harness}\s+import|"
                                         rf"import\s+\.\s*{harness}\b", text), (name, harness)


def test_a_closed_stdout_pipe_ends_quietly():
    """`tritonbn info ... | head -1`: the reader goes away before the output is written. The
    command stops without a traceback, with the status of a process killed by SIGPIPE."""
    proc = subprocess.Popen([sys.executable, "-m", "tritonbn", "info", "--shape",
                             "256,64,112,112"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            cwd="/")
    proc.stdout.close()             # before the child has imported torch, let alone printed
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141, err
    assert "Traceback" not in err and "BrokenPipeError" not in err, err
