"""The package as users get it: one version string, the type marker, and ``import tritonbn`` from
a source checkout whose package is not the installed one (after ``pip install .``, Python finds
the checkout's tritonbn/ first; its device code is the top-level kernels/ folder)."""
import importlib.metadata
import os
import subprocess
import sys
import textwrap

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
