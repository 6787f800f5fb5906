"""Test setup: without CUDA the Triton kernels run in the interpreter on CPU tensors.

Nothing is set for that: tritonbn runs CPU tensors' kernels in Triton's interpreter by itself,
whatever was imported first, as it does for a user (the tests run the product's own path).
"""
import os

import pytest

try:
    import torch
    _HAS_CUDA = torch.cuda.is_available()
except Exception:  # pragma: no cover - torch is a hard dependency
    _HAS_CUDA = False

# Tests assert the dispatcher's heuristics: a tuning table in the user's cache must not change
# them (the tuning tests point TRITONBN_TUNING_TABLE at their own tables).
os.environ.setdefault("TRITONBN_TUNING_TABLE", "off")



@pytest.fixture
def device():
    """Where the kernels run: the GPU when there is one, else CPU tensors in the interpreter."""
    return "cuda" if _HAS_CUDA else "cpu"


def pytest_report_header(config):
    mode = "CUDA GPU" if _HAS_CUDA else "Triton interpreter on CPU"
    return f"tritonbn kernels run on: {mode}"


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords and not _HAS_CUDA:
            item.add_marker(skip)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """Show which Triton kernels the run exercised, and how often: proof the kernels ran."""
    try:
        from tritonbn import LAUNCHES
    except Exception:  # pragma: no cover - import failure is reported by the tests themselves
        return
    terminalreporter.write_sep("-", "Triton kernel launches in this run")
    if not LAUNCHES:
        terminalreporter.write_line("none")
    for name, count in sorted(LAUNCHES.items()):
        terminalreporter.write_line(f"{name:28} {count:6d}")


@pytest.fixture
def table_path(tmp_path, monkeypatch):
    """A private tuning table (and cache dir) for the dispatcher; plan caches cleared around it."""
    from tritonbn import plan as planner, tuning_table

    path = tmp_path / "tuning.json"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv(tuning_table.ENV, str(path))
    planner.reload_tuning_table()
    yield path
    planner.reload_tuning_table()
