"""Synchronized batch norm: 2 (and, in the slow tier, 3) gloo processes on CPU (the interpreter
runs the kernels) against single-process batch norm over the concatenated batch."""

import pytest
import torch
import torch.multiprocessing as mp

import tritonbn
from tests.nn import sync_worker


@pytest.mark.parametrize("world", [2, pytest.param(3, marks=pytest.mark.slow)])
def test_sync_batch_norm_matches_single_process(world, tmp_path):
    mp.spawn(sync_worker.check_sync_batch_norm, args=(world, str(tmp_path / "init")),
             nprocs=world, join=True)


def test_ddp_training_matches_single_process(tmp_path):
    world = 2
    result = tmp_path / "ddp.pt"
    mp.spawn(sync_worker.check_ddp_training, args=(world, str(tmp_path / "init"), str(result)),
             nprocs=world, join=True)
    got = torch.load(result)
    # the same model and data in one process, with torch's own batch norm over the whole batch
    model = sync_worker.make_model(0)
    losses = sync_worker.train_steps(model, world)
    torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(losses), atol=1e-5, rtol=1e-5)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(got["state"][k].double(), v.double(), atol=1e-5, rtol=1e-5)


def test_convert_sync_batchnorm_keeps_tensors_and_runs_locally():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4))
    w = model[1].weight
    converted = tritonbn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert isinstance(converted[1], tritonbn.SyncBatchNorm) and converted[1].weight is w
    x = torch.randn(4, 3, 5, 5)
    with tritonbn.count_launches() as launches:
        converted(x)  # no process group: plain batch norm
    assert sum(launches.values()) >= 1


def test_convert_sync_batchnorm_keeps_an_in_place_activated_layer_one():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1),
                                tritonbn.InPlaceABN2d(4, activation="elu", activation_param=0.5))
    converted = tritonbn.SyncBatchNorm.convert_sync_batchnorm(model)
    layer = converted[1]
    assert isinstance(layer, tritonbn.SyncBatchNorm)
    assert (layer.invertible, layer.inplace, layer.activation, layer.negative_slope) == (
        True, True, "elu", 0.5)
    x = torch.randn(4, 3, 5, 5)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = converted(x)
    # only the layer's output (over the conv's output) is saved, never a separate input
    assert any(t.data_ptr() == y.data_ptr() for t in saved)
    assert all(t.shape != y.shape or t.data_ptr() == y.data_ptr() for t in saved
               if t is not x)


@pytest.mark.parametrize("backend", ["aot_eager",
                                     pytest.param("inductor", marks=pytest.mark.slow)])
def test_sync_batch_norm_compiles_with_fullgraph(backend, tmp_path):
    mp.spawn(sync_worker.check_compiled_sync, args=(2, str(tmp_path / "init"), backend),
             nprocs=2, join=True)
