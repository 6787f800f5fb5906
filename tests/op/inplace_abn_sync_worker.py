"""Worker processes for tests/op/test_inplace_abn.py's synchronized case (imported by
torch.multiprocessing.spawn): InPlaceABNSync over the processes against InPlaceABN over the
concatenated batch, in each process."""
import torch
import torch.distributed as dist

# (dtype, layout, batch per process, activation, its parameter, with a residual)
CASES = [
    ("float64", "contiguous", [3, 5], "leaky_relu", 0.05, True),
    ("float64", "channels_last", [4, 2], "elu", 0.8, False),
    ("float32", "contiguous", [2, 3], "identity", 0.0, True),
]
TOL = {torch.float64: 1e-9, torch.float32: 1e-5}


def _rel(got, want) -> float:
    got, want = got.detach().double(), want.detach().double()
    return ((got - want).abs().max() / want.abs().max()).item()


def check_inplace_abn_sync(rank, world, init_file):
    import tritonbn
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        for case, (dname, layout, sizes, act, param, with_res) in enumerate(CASES):
            dtype, c = getattr(torch, dname), 5
            g = torch.Generator().manual_seed(300 + case)
            full = (sum(sizes), c, 3, 4)
            x_all = (torch.randn(full, generator=g, dtype=torch.float64) * 2 + 0.5).to(dtype)
            g_all = torch.randn(full, generator=g, dtype=torch.float64).to(dtype)
            r_all = torch.randn(full, generator=g, dtype=torch.float64).to(dtype)
            w = torch.tensor([1.2, -0.7, 0.5, 1.0, -1.5], dtype=dtype)
            b = torch.tensor([0.1, -0.2, 0.3, 0.0, 0.5], dtype=dtype)
            mods = []
            for cls in (tritonbn.InPlaceABNSync, tritonbn.InPlaceABN):
                m = cls(c, momentum=0.3, activation=act, activation_param=param, dtype=dtype)
                with torch.no_grad():
                    m.weight.copy_(w)
                    m.bias.copy_(b)
                mods.append(m)
            sync, single = mods

            lo, hi = sum(sizes[:rank]), sum(sizes[:rank + 1])
            x = x_all[lo:hi].clone()
            if layout == "channels_last":
                x = x.contiguous(memory_format=torch.channels_last)
            x.requires_grad_()
            res = r_all[lo:hi].clone().requires_grad_() if with_res else None
            xi = x * 1
            with tritonbn.count_launches() as launches:
                y = sync(xi, res)
                y.backward(g_all[lo:hi])
            assert y.data_ptr() == xi.data_ptr(), "written over the input"
            # the synchronized path ran: partials merged and exchanged forward and backward
            assert launches["bn_merge_partials_kernel"] == 2, dict(launches)

            xs = x_all.clone().requires_grad_()
            rs = r_all.clone().requires_grad_() if with_res else None
            ys = single(xs * 1, rs)
            ys.backward(g_all)

            tol = TOL[dtype]
            errors = {"y": _rel(y, ys[lo:hi]), "dx": _rel(x.grad, xs.grad[lo:hi])}
            if with_res:
                errors["dres"] = _rel(res.grad, rs.grad[lo:hi])
            # parameter gradients are per process (as torch's); their sum is the whole batch's
            for name in ("weight", "bias"):
                total = getattr(sync, name).grad.clone()
                dist.all_reduce(total)
                errors["d" + name] = _rel(total, getattr(single, name).grad)
            errors["running_mean"] = _rel(sync.running_mean, single.running_mean)
            errors["running_var"] = _rel(sync.running_var, single.running_var)
            assert all(v <= tol for v in errors.values()), (case, rank, errors)
            # the running statistics are bit-identical on every process
            both = [torch.empty(2, c, dtype=dtype) for _ in range(world)]
            dist.all_gather(both, torch.stack([sync.running_mean, sync.running_var]))
            assert all(torch.equal(both[0], o) for o in both)
    finally:
        dist.destroy_process_group()
