"""Worker processes for tests/test_sync.py (imported by torch.multiprocessing.spawn)."""
import gc

import torch
import torch.distributed as dist

CASES = {
    2: [("float32", "contiguous", [3, 5], None), ("float16", "channels_last", [4, 0], None),
        ("float32", "contiguous", [2, 2], "relu"), ("float16", "contiguous", [1, 3], None)],
    3: [("float32", "channels_last", [2, 0, 3], None), ("float16", "contiguous", [1, 2, 3], None)],
}


def _full_batch(sizes, c, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(sum(sizes), c, 3, 4, generator=g) * 2 + 0.5
    grad = torch.randn(sum(sizes), c, 3, 4, generator=g)
    res = torch.randn(sum(sizes), c, 3, 4, generator=g)
    return x.to(dtype), grad.to(dtype), res.to(dtype)


def check_sync_batch_norm(rank, world, init_file):
    import tritonbn
    from tritonbn.reference import batch_norm_reference
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        for case, (dname, layout, sizes, act) in enumerate(CASES[world]):
            dtype = getattr(torch, dname)
            c = 5
            x_all, g_all, r_all = _full_batch(sizes, c, dtype, seed=100 + case)
            lo, hi = sum(sizes[:rank]), sum(sizes[:rank + 1])
            x = x_all[lo:hi].clone()
            if layout == "channels_last":
                x = x.to(memory_format=torch.channels_last)
            x.requires_grad_()
            res = r_all[lo:hi].clone().requires_grad_() if act else None
            w = torch.linspace(0.5, 1.5, c, requires_grad=True)
            b = torch.linspace(-0.5, 0.5, c, requires_grad=True)
            rm, rv = torch.zeros(c), torch.ones(c)
            with tritonbn.count_launches() as launches:
                y = tritonbn.sync_batch_norm(x, rm, rv, w, b, 0.1, 1e-5, activation=act,
                                                  residual=res)
                y.backward(g_all[lo:hi])
            assert launches["bn_stats_partial_kernel"] == 1 and launches["bn_merge_partials_kernel"] == 2

            # single process over the concatenated batch, float64
            x64 = x_all.double().requires_grad_()
            w64, b64 = w.detach().double().requires_grad_(), b.detach().double().requires_grad_()
            r64 = r_all.double().requires_grad_() if act else None
            rm64, rv64 = torch.zeros(c, dtype=torch.float64), torch.ones(c, dtype=torch.float64)
            y64 = batch_norm_reference(x64, rm64, rv64, w64, b64, True, 0.1, 1e-5, residual=r64,
                                       activation=act)[0]
            y64.backward(g_all.double())
            t = dict(atol=2e-3, rtol=2e-3) if dtype == torch.float16 else dict(atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(y.double(), y64[lo:hi].detach(), **t)
            torch.testing.assert_close(x.grad.double(), x64.grad[lo:hi], **t)
            if act:
                torch.testing.assert_close(res.grad.double(), r64.grad[lo:hi], **t)
            # parameter grads are per process (as in torch); their sum is the whole batch's
            gw, gb = w.grad.clone(), b.grad.clone()
            dist.all_reduce(gw), dist.all_reduce(gb)
            torch.testing.assert_close(gw.double(), w64.grad, atol=1e-3, rtol=1e-4)
            torch.testing.assert_close(gb.double(), b64.grad, atol=1e-3, rtol=1e-4)
            torch.testing.assert_close(rm.double(), rm64, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(rv.double(), rv64, atol=1e-5, rtol=1e-5)
            # running statistics are bit-identical on every process
            both = [torch.empty(2, c) for _ in range(world)]
            dist.all_gather(both, torch.stack([rm, rv]))
            assert all(torch.equal(both[0], o) for o in both)
    finally:
        dist.destroy_process_group()


def make_model(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3, padding=1), torch.nn.BatchNorm2d(6),
                               torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                               torch.nn.Linear(6, 4))


def train_steps(model, world, rank=None, steps=3):
    """SGD steps on batches of 4 per process: this rank's quarter (DDP), or all of it (rank None).
    Returns the losses averaged over the processes."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(7)
    losses = []
    for _ in range(steps):
        x = torch.randn(4 * world, 3, 6, 6, generator=g)
        target = torch.randint(0, 4, (4 * world,), generator=g)
        if rank is not None:
            x, target = x[4 * rank:4 * rank + 4], target[4 * rank:4 * rank + 4]
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), target)
        loss.backward()
        opt.step()
        total = loss.detach().clone()
        if rank is not None:
            dist.all_reduce(total)
            total /= world
        losses.append(float(total))
    return losses


def check_ddp_training(rank, world, init_file, result_file):
    import tritonbn
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        model = tritonbn.SyncBatchNorm.convert_sync_batchnorm(make_model(0))
        assert isinstance(model[1], tritonbn.SyncBatchNorm)
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        losses = train_steps(ddp, world, rank)
        if rank == 0:
            torch.save({"losses": losses, "state": model.state_dict()}, result_file)
        # Shut down in step: every rank done with its collectives, and DDP's reducer (which owns
        # threads) gone, before the process group is destroyed. A rank that tore the group down
        # under a live reducer once aborted with "terminate called without an active exception".
        # DDP and its reducer sit in reference cycles, so `del` alone leaves them alive until
        # exit -- where the abort kept happening (3 in 20 runs): collect them here.
        dist.barrier()
        del ddp
        gc.collect()
    finally:
        dist.destroy_process_group()


def check_compiled_sync(rank, world, init_file, backend):
    """A SyncBatchNorm training step under torch.compile(fullgraph=True) equals the eager step:
    the collectives run inside the op (the process group travels by name), so Dynamo sees no
    ProcessGroup and no graph break."""
    import tritonbn
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        torch.manual_seed(0)
        c = 4
        eager = tritonbn.SyncBatchNorm(c)
        compiled = tritonbn.SyncBatchNorm(c)
        step = torch.compile(compiled, fullgraph=True, backend=backend)
        for i in range(2):
            g = torch.Generator().manual_seed(10 * i + rank)
            x = torch.randn(3 + rank, c, 2, 3, generator=g) * (1 + rank) + i
            xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
            ye = eager(xe)
            with tritonbn.count_launches() as launches:
                yc = step(xc)
                (yc * yc).sum().backward()
            (ye * ye).sum().backward()
            assert launches["bn_merge_partials_kernel"] == 2, launches   # forward and backward
            assert torch.equal(yc, ye)
            torch.testing.assert_close(xc.grad, xe.grad, atol=1e-5, rtol=1e-5)
        for name, b in eager.named_buffers():
            assert torch.equal(dict(compiled.named_buffers())[name], b), name
        both = [torch.empty(2, c) for _ in range(world)]
        dist.all_gather(both, torch.stack([compiled.running_mean, compiled.running_var]))
        assert all(torch.equal(both[0], o) for o in both)
        # Shut down in step, as check_ddp_training does: every rank done with its collectives
        # and the compiled graphs (and what they hold) gone before the group is destroyed.
        dist.barrier()
        del step, compiled, eager
        torch._dynamo.reset()
        gc.collect()
    finally:
        dist.destroy_process_group()
