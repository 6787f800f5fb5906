"""tritonbn.overflow.monitor and set_policy on models: every tritonbn layer, per layer."""
import torch

import tritonbn
from tritonbn import overflow as ovf


def _three_layer_model(device):
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 1), tritonbn.BatchNorm2d(4), torch.nn.ReLU(),
        torch.nn.Conv2d(4, 4, 1), tritonbn.BatchNorm2d(4), torch.nn.ReLU(),
        torch.nn.Conv2d(4, 4, 1), tritonbn.BatchNorm2d(4),
    ).to(device).half()


def test_monitor_names_the_layer_near_the_edge(device):
    model = _three_layer_model(device)
    with torch.no_grad():
        model[4].weight.fill_(3e4)        # layer "4": gamma * x_hat beyond 65504
    x = torch.randn(8, 3, 6, 6, device=device).half()
    with ovf.monitor(model) as report:
        for _ in range(2):
            model(x)
    assert report.closest_to_edge() == "4"
    rows = {r["layer"]: r for r in report.rows()}
    assert rows["4"]["overflowed"] > 0 and rows["4"]["headroom"] < 0
    assert rows["1"]["overflowed"] == 0 and rows["7"]["overflowed"] == 0
    assert rows["1"]["headroom"] > 60000 and rows["1"]["dtype"] == "float16"
    assert "4" in report.table()
    assert getattr(model[4], "overflow_stats", None) is None  # the counters are off again
