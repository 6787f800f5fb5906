"""The package as users get it: one version string, the type marker, and ``import tritonbn`` from
a source checkout whose package is not the installed one (after ``pip install .``, Python finds
the checkout's tritonbn/ first; its device code is the top-level kernels/ folder)."""
import importlib.metadata
import os
import subprocess
import sys
import textwrap

import pytest

import tritonbn

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_one_version_string():
    assert tritonbn.__version__ == importlib.metadata.version("tritonbn")


def test_the_type_marker_ships():
    assert os.path.isfile(os.path.join(os.path.dirname(tritonbn.__file__), "py.typed"))


def test_import_from_a_source_checkout_maps_its_kernels():
    # No install finder may help: drop the editable install's finder, put the checkout first.
    code = textwrap.dedent(f"""
        import os, sys
        sys.meta_path[:] = [f for f in sys.meta_path
                            if not getattr(f, "__module__", "").startswith("__editable__")]
        sys.path.insert(0, {REPO!r})
        import tritonbn, tritonbn.kernels
        assert tritonbn.__file__.startswith({REPO!r}), tritonbn.__file__
        print(os.path.relpath(tritonbn.kernels.__file__, {REPO!r}))
        print(tritonbn.kernels.bn_fwd_apply_kernel.fn.__module__)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, cwd="/")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [os.path.join("kernels", "__init__.py"),
                                  "tritonbn.kernels.forward"]


def test_ci_runs_the_readme_test_command_verbatim():
    # CI must test the stack a README user gets: the README's command 2, letter for letter, as
    # the first command .ci/run runs, with no install before it that changes what pip resolves
    with open(os.path.join(REPO, "README.md")) as f:
        readme = f.read()
    command = next(line for line in readme.splitlines()
                   if line.startswith("python -m venv") and "pytest" in line)
    with open(os.path.join(REPO, ".ci", "run")) as f:
        ci = [line for line in f.read().splitlines() if line and not line.startswith("#")]
    first = next(i for i, line in enumerate(ci) if "pip " in line or "python " in line)
    assert ci[first] == command, (ci[first], command)


def test_project_urls_for_pip_show():
    # `pip show tritonbn` and package indexes show these: a home page, the docs, the changelog
    # and where to report bugs, all on the one repository
    tomllib = pytest.importorskip("tomllib")   # Python 3.11+
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        urls = tomllib.load(f)["project"]["urls"]
    home = "https://github.com/tritonbn/tritonbn"
    assert urls["Homepage"] == home
    assert {"Documentation", "Changelog", "Issues"} <= set(urls)
    assert all(u == home or u.startswith(home + "/") or u.startswith(home + "#")
               for u in urls.values()), urls
    # the files the links name exist in the repository, at those paths
    for url in urls.values():
        if "/blob/main/" in url:
            assert os.path.isfile(os.path.join(REPO, url.split("/blob/main/", 1)[1])), url
    assert urls["Issues"] == home + "/issues"
