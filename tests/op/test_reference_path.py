"""Where the kernels run on CPU: ``import tritonbn`` turns Triton's interpreter on when there is
no GPU and triton is not imported yet; with the interpreter off on purpose (TRITON_INTERPRET=0,
or triton imported before tritonbn) CPU tensors take the float64 reference path, said once with
a ReferencePathWarning. Each case runs in a fresh process: the interpreter is decided at import."""
import os
import subprocess
import sys
import textwrap

import pytest

CALL = """
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
print("launches", sum(launches.values()), "warnings", len(warned))
"""


def _run(prelude: str, env_update: dict) -> str:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(env_update, CUDA_VISIBLE_DEVICES="")
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(prelude) + CALL], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().splitlines()[-1]


def test_without_a_gpu_the_kernels_run_in_the_interpreter_by_themselves():
    assert _run("import tritonbn", {}) == "launches 3 warnings 0"


@pytest.mark.parametrize("prelude,env", [
    ("import tritonbn", {"TRITON_INTERPRET": "0"}),
    ("import triton\nimport tritonbn", {}),
], ids=["TRITON_INTERPRET=0", "triton-imported-first"])
def test_interpreter_off_takes_the_reference_path_and_says_so_once(prelude, env):
    assert _run(prelude, env) == "launches 0 warnings 1"
