"""Where the kernels run on CPU: in Triton's interpreter, whatever the process imported first
(torchvision, timm and triton import triton before tritonbn) and without touching
``TRITON_INTERPRET``; the float64 reference path only when asked (``TRITONBN_CPU=reference``,
quietly; ``TRITON_INTERPRET=0``, said once with a ReferencePathWarning). Each case runs in a
fresh process: import order is what is tested."""
import os
import subprocess
import sys
import textwrap

import pytest

CALL = """
import os
import warnings
import torch
x = torch.randn(4, 3, 5, dtype=torch.float16, requires_grad=True)
rm, rv = torch.zeros(3), torch.ones(3)
with warnings.catch_warnings(record=True) as seen:
    warnings.simplefilter("always")
    with tritonbn.count_launches() as launches:
        y = tritonbn.batch_norm(x, rm, rv, training=True)
        y.float().sum().backward()
        tritonbn.batch_norm(x.detach(), rm, rv, training=True)
rm_t, rv_t = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
y_t = torch.nn.functional.batch_norm(x.detach().double(), rm_t, rv_t, training=True)
torch.testing.assert_close(y.double(), y_t, atol=2e-3, rtol=2e-3)
assert y.dtype == torch.float16 and x.grad.dtype == torch.float16
warned = [w for w in seen if w.category.__name__ == "ReferencePathWarning"]
print("launches", sum(launches.values()), "warnings", len(warned),
      "env", os.environ.get("TRITON_INTERPRET"))
"""


def _run(prelude: str, env_update: dict) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "TRITONBN_CPU")}
    env.update(env_update, CUDA_VISIBLE_DEVICES="")
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(prelude) + CALL], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().splitlines()[-1]


@pytest.mark.parametrize("prelude", [
    "import tritonbn",
    "import triton\nimport tritonbn",
    "import torchvision, timm, triton, tritonbn",
], ids=["tritonbn-alone", "triton-first", "torchvision-timm-triton-first"])
def test_cpu_calls_run_the_kernels_in_the_interpreter_whatever_was_imported_first(prelude):
    # 3 launches (forward, backward, forward) and the process's environment left alone
    assert _run(prelude, {}) == "launches 3 warnings 0 env None"


def test_other_triton_kernels_of_the_process_stay_compiled(tmp_path):
    """Running tritonbn's kernels on CPU switches no other kernel to the interpreter: a kernel
    the user defines afterwards is still a compiled JITFunction."""
    code = "import tritonbn\n" + CALL + textwrap.dedent("""
        import triton
        import triton.language as tl

        @triton.jit
        def user_kernel(x_ptr):
            tl.store(x_ptr, 1.0)

        print(type(user_kernel).__name__)
    """)
    script = tmp_path / "user.py"     # Triton's @jit needs a function defined in a file
    script.write_text(code)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, str(script)], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[-1] == "JITFunction"


@pytest.mark.parametrize("prelude,env,expected", [
    ("import tritonbn", {"TRITON_INTERPRET": "0"}, "launches 0 warnings 1 env 0"),
    ("import triton\nimport tritonbn", {"TRITONBN_CPU": "reference"},
     "launches 0 warnings 0 env None"),
], ids=["TRITON_INTERPRET=0", "TRITONBN_CPU=reference"])
def test_the_reference_path_runs_only_when_asked(prelude, env, expected):
    assert _run(prelude, env) == expected


def test_an_unknown_cpu_choice_is_an_error():
    env = dict(os.environ, TRITONBN_CPU="gpu")
    out = subprocess.run([sys.executable, "-c", "import tritonbn"], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and "TRITONBN_CPU must be 'kernels' or 'reference'" in out.stderr


def test_threads_running_cpu_kernels_leave_triton_as_it_was():
    """Interpreted launches swap JITFunction.__call__ for their duration; launches from two
    threads at once still compute right and leave Triton's own method in place."""
    import threading

    import torch
    from triton.runtime.jit import JITFunction

    import tritonbn

    original = JITFunction.__call__
    errors = []

    def work(seed):
        try:
            g = torch.Generator().manual_seed(seed)
            for _ in range(3):
                x = torch.randn(4, 3, 5, generator=g)
                y = tritonbn.batch_norm(x, None, None, training=True)
                torch.testing.assert_close(
                    y, torch.nn.functional.batch_norm(x, None, None, training=True))
        except Exception as e:  # reported below, with the thread's failure
            errors.append(e)

    threads = [threading.Thread(target=work, args=(s,)) for s in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert JITFunction.__call__ is original
