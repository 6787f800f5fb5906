"""``tritonbn overflow``: the profiler's sweep, outputs and command line."""
import json
import os

import torch

import tritonbn
from tritonbn.tools import overflow_profile as prof
from tests.helpers import assert_close, tol


def test_naive_half_fails_where_tritonbn_is_exact(device):
    g = torch.Generator().manual_seed(1)
    x = (65504 * (0.99 + 0.01 * torch.rand(4, 2, 64, generator=g))
         * torch.where(torch.rand(4, 2, 64, generator=g) < 0.5, -1.0, 1.0)).half().to(device)
    w, b = torch.ones(2, device=device), torch.zeros(2, device=device)
    ref = tritonbn.batch_norm_reference(x, None, None, w, b, True)[0]
    assert_close(tritonbn.batch_norm(x, None, None, w, b, training=True), ref,
                 **tol(torch.float16, 256))
    naive = prof.naive_half(x, w, b, torch.zeros(2, device=device), torch.ones(2, device=device))
    assert not torch.isfinite(naive).all()  # x*x overflows float16: the naive variance is inf


def test_profiler_json_has_every_field(tmp_path):
    assert prof.main(["--quick", "--dtypes", "float16", "--sizes", "64", "--out", str(tmp_path)]) == 0
    rows = json.load(open(tmp_path / "overflow_profile.json"))
    fields = {"dtype", "reduction", "amplitude", "weight", "bias", "impl", "nonfinite_out",
              "nonfinite_grad", "at_or_beyond_max", "max_abs_err", "running_finite"}
    assert rows and all(fields <= set(r) for r in rows)
    assert {r["impl"] for r in rows} == {"tritonbn", "tritonbn-saturate", "torch", "naive-float16"}
    edge = {r["impl"]: r for r in rows if r["amplitude"] == "65000.0"}
    assert edge["tritonbn"]["nonfinite_out"] == 0 and edge["tritonbn"]["running_finite"]
    assert edge["naive-float16"]["nonfinite_out"] > 0   # what float32 accumulation buys
    assert os.path.exists(tmp_path / "overflow_profile.csv")
    assert os.path.exists(tmp_path / "overflow_profile.png")
