"""Without TRITON_INTERPRET a CPU tensor takes the documented float64 reference path: no kernel
launches, same results. Run in a subprocess because this test process has the interpreter on."""
import os
import subprocess
import sys
import textwrap


def test_cpu_tensors_without_interpreter_use_reference_path():
    code = textwrap.dedent("""
        import torch, tritonbn
        x = torch.randn(4, 3, 5, dtype=torch.float16, requires_grad=True)
        rm, rv = torch.zeros(3), torch.ones(3)
        with tritonbn.count_launches() as launches:
            y = tritonbn.batch_norm(x, rm, rv, training=True)
            y.float().sum().backward()
        assert sum(launches.values()) == 0, launches
        rm_t, rv_t = torch.zeros(3), torch.ones(3)
        y_t = torch.nn.functional.batch_norm(x.detach().double(), rm_t.double(), rv_t.double(),
                                             training=True)
        torch.testing.assert_close(y.double(), y_t, atol=2e-3, rtol=2e-3)
        torch.testing.assert_close(rm.double(), torch.zeros(3, dtype=torch.float64) * 0.9
                                   + 0.1 * x.detach().double().mean((0, 2)))
        assert y.dtype == torch.float16 and x.grad.dtype == torch.float16
        print("reference path ok")
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert "reference path ok" in out.stdout
