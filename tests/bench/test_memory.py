"""Activation memory saved for backward: the counter of ``python -m bench.memory`` (exact bytes
of a known saved tensor, one count per storage, parameters and buffers left out), its figures
on a small model, and the command line."""
import gc
import json
import os
import subprocess
import sys
import weakref

import pytest
import torch
from torch import nn

from bench import memory

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_counts_a_known_saved_tensor_exactly():
    x = torch.randn(1000, requires_grad=True)
    with memory.SavedBytes() as counted:
        y = x.exp()                          # exp saves its result, nothing else
    assert counted.nbytes == y.nbytes == 4000
    assert (counted.storages, counted.tensors) == (1, 1)


def test_a_storage_saved_twice_or_through_views_counts_once():
    x = torch.randn(1000, dtype=torch.float64, requires_grad=True)
    with memory.SavedBytes() as counted:
        a = x.exp()                          # saves a
        a.sin()                              # saves a again
        (a * a).sum()                        # saves a twice more
        a[10:20].cos()                       # saves a view of a
        a.view(10, 100).t().tanh()           # tanh saves its own result: a second storage
    assert counted.tensors == 6
    assert counted.storages == 2
    assert counted.nbytes == 8000 + 8000


def test_a_dropped_graph_does_not_hand_its_address_to_a_later_save():
    x = torch.randn(1000, requires_grad=True)
    with memory.SavedBytes() as counted:
        for _ in range(3):
            x.exp()                          # saved, then dropped with its graph at once
    assert (counted.storages, counted.nbytes) == (3, 12000)


def test_the_counter_keeps_no_graph_alive_and_backward_still_works():
    # packing an output as itself would make a reference cycle: no graph freed, ever
    x = torch.randn(10, requires_grad=True)
    with memory.SavedBytes():
        y = x.exp()
        alive = weakref.ref(y)
        y.sum().backward()
        del y
    gc.collect()
    assert alive() is None
    torch.testing.assert_close(x.grad, x.detach().exp())


def test_parameters_and_buffers_are_left_out():
    lin = nn.Linear(10, 5)
    x = torch.randn(3, 10, requires_grad=True)
    with memory.SavedBytes(exclude=list(lin.parameters())) as counted:
        lin(x)                               # addmm saves x and a view of the weight
    with memory.SavedBytes() as everything:
        lin(x)
    assert counted.nbytes == x.nbytes == 120
    assert everything.nbytes == 120 + lin.weight.nbytes

    bn = nn.BatchNorm2d(4).train()           # saves its running statistics (buffers) too
    x = torch.randn(2, 4, 3, 3, requires_grad=True)
    counted = memory.saved_bytes(bn, x)
    kept = {memory._storage_key(t) for t in (*bn.parameters(), *bn.buffers())}
    assert not kept & counted.seen.keys()
    assert counted.seen[memory._storage_key(x)] == x.nbytes
    with memory.SavedBytes() as everything:
        bn(x)
    assert everything.nbytes > counted.nbytes


class _DictNet(nn.Module):
    """conv -> BN -> ReLU -> conv -> BN -> + -> ReLU, returning {'out': ...} as deeplabv3 does."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.relu1, self.relu2 = nn.ReLU(inplace=True), nn.ReLU()

    def forward(self, x):
        h = self.relu1(self.bn1(self.conv1(x)))
        return {"out": self.relu2(self.bn2(self.conv2(h)) + h)}


def _bn_statistics_bytes(model: nn.Module) -> int:
    """A generous bound on what a batch norm's statistics add: four float32 per channel."""
    return sum(16 * m.num_features for m in model.modules() if isinstance(m, nn.BatchNorm2d))


@pytest.mark.parametrize("name, size", [("dictnet", 8), ("resnet18", 32)])
def test_measure_on_small_models(monkeypatch, name, size):
    monkeypatch.setitem(memory.MODELS, "dictnet", _DictNet)
    result = memory.measure([name], size=size, batch=2, device="cpu")
    rows = {r["variant"]: r for r in result["rows"]}
    assert list(rows) == list(memory.DEFAULT_VARIANTS)
    assert all(r["saved_bytes"] > 0 and r["saved_mb"] >= 0 and r["ratio"] > 0
               for r in rows.values())
    assert rows["torch"]["ratio"] == 1.0
    assert rows["torch, LeakyReLU"]["ratio_same_act"] == 1.0
    assert all(r["peak_step_mb"] is None for r in rows.values())     # no GPU here
    # in-place activated batch norm: the batch norms' inputs are not kept
    inplace = rows["fuse inplace, LeakyReLU"]
    assert inplace["ratio_same_act"] < 0.75
    assert inplace["batch_in_budget"] > rows["torch, LeakyReLU"]["batch_in_budget"]
    # convert changes only the batch-norm op: the same input saved, its statistics in float32
    tolerance = _bn_statistics_bytes(memory.MODELS[name]())
    assert abs(rows["convert"]["saved_bytes"] - rows["torch"]["saved_bytes"]) <= tolerance
    for r in rows.values():
        assert r["ratio"] == round(r["saved_bytes"] / rows["torch"]["saved_bytes"], 3)
        base = rows[memory.baseline_of(r["variant"])]["saved_bytes"]
        assert r["ratio_same_act"] == round(r["saved_bytes"] / base, 3)
        # linear in the batch: 16 GB over the bytes per sample
        assert r["batch_in_budget"] == int(16e9 // (r["saved_bytes"] / 2))
    table = memory.format_table(result)
    assert "| resnet18 | torch | " in table or "| dictnet | torch | " in table
    assert "no GPU" in table


def test_inplace_abn_resnet50_saves_at_most_0_6_of_torch():
    """The in-place activated batch norm's target: torchvision's resnet50 with LeakyReLU(0.01),
    fuse(model, inplace=True), saves at most 0.6x what torch eager saves on the same model
    (measured 0.560: the batch norms' inputs are no longer kept)."""
    result = memory.measure(["resnet50"], ["torch, LeakyReLU", "fuse inplace, LeakyReLU"],
                            size=64, batch=2, device="cpu")
    rows = {r["variant"]: r for r in result["rows"]}
    assert list(rows) == ["torch", "torch, LeakyReLU", "fuse inplace, LeakyReLU"]
    inplace = rows["fuse inplace, LeakyReLU"]
    assert inplace["ratio_same_act"] <= 0.6, inplace
    assert inplace["saved_bytes"] <= 0.6 * rows["torch, LeakyReLU"]["saved_bytes"]
    # because every layer saves its output instead of its input
    model = memory.build_model("resnet50", "fuse inplace, LeakyReLU")
    layers = [m for m in model.modules() if hasattr(m, "invertible")]
    assert len(layers) == 53 and all(m.invertible and m.inplace for m in layers)


def test_leaky_relu_replaces_every_relu_keeping_inplace():
    model = memory.leaky_relu(_DictNet())
    assert not any(type(m) is nn.ReLU for m in model.modules())
    assert (model.relu1.inplace, model.relu2.inplace) == (True, False)
    assert model.relu1.negative_slope == 0.01


def test_command_line_writes_json(tmp_path):
    out = tmp_path / "memory.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (REPO, os.environ.get("PYTHONPATH")) if p))
    proc = subprocess.run([sys.executable, "-m", "bench.memory", "--models", "resnet18",
                           "--size", "32", "--variants", "torch;convert", "--json", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert [r["variant"] for r in figures["rows"]] == ["torch", "convert"]
    assert figures["size"] == 32 and figures["batch"] == 2 and figures["torch"] == torch.__version__
    assert "| resnet18 | convert | " in proc.stdout
    bad = subprocess.run([sys.executable, "-m", "bench.memory", "--models", "nosuchnet"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "unknown model" in bad.stderr
