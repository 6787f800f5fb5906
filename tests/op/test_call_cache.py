"""The launchers keep each kind of call's launches bound (tritonbn/launch/forward.py and
backward.py, ``_calls``) and bind only the pointers per call. A call must launch exactly what
it would with nothing kept: every fact its launches depend on is part of the key. Each case
below differs from the first in one such fact; they run one after another on warm caches and
are compared with the same call planned from nothing."""
import importlib

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tritonbn import launch
from tritonbn import plan as planner
from tritonbn.options import BackwardArgs, ForwardArgs, Options

SHAPE = (4, 6, 5, 3)
# the modules (tritonbn.launch's ``forward`` / ``backward`` are the functions)
forward_launcher = importlib.import_module("tritonbn.launch.forward")
backward_launcher = importlib.import_module("tritonbn.launch.backward")


def _forward_cases(device):
    def x_like(dtype=torch.float32, memory_format=torch.contiguous_format):
        return torch.randn(SHAPE, device=device, dtype=dtype).contiguous(
            memory_format=memory_format)

    def stats(dtype=torch.float32):
        return torch.zeros(6, device=device, dtype=dtype), torch.ones(6, device=device,
                                                                       dtype=dtype)

    w, b = torch.rand(6, device=device) + 0.5, torch.randn(6, device=device)
    misaligned = torch.randn(1 + 4 * 6 * 5 * 3, device=device)[1:].view(SHAPE)
    train = Options(training=True)
    return {
        "base": (train, lambda: ForwardArgs(x_like(), w, b, None, *stats())),
        "no weight": (train, lambda: ForwardArgs(x_like(), None, b, None, *stats())),
        "no bias": (train, lambda: ForwardArgs(x_like(), w, None, None, *stats())),
        "no running stats": (train, lambda: ForwardArgs(x_like(), w, b)),
        "eval": (Options(), lambda: ForwardArgs(x_like(), w, b, None, *stats())),
        "float16": (train, lambda: ForwardArgs(x_like(torch.float16), w, b, None, *stats())),
        "half stats": (train, lambda: ForwardArgs(x_like(torch.float16), w, b, None,
                                                  *stats(torch.float16))),
        "half weight": (train, lambda: ForwardArgs(x_like(torch.float16), w.half(), b, None,
                                                   *stats())),
        "half bias": (train, lambda: ForwardArgs(x_like(torch.float16), w, b.half(), None,
                                                 *stats())),
        "half running var": (train, lambda: ForwardArgs(
            x_like(torch.float16), w, b, None, stats()[0], stats(torch.float16)[1])),
        "channels last": (train, lambda: ForwardArgs(x_like(memory_format=torch.channels_last),
                                                     w, b, None, *stats())),
        "misaligned input": (train, lambda: ForwardArgs(misaligned, w, b, None, *stats())),
        "residual": (Options(training=True, activation="relu"),
                     lambda: ForwardArgs(x_like(), w, b, x_like(), *stats())),
        "channels-last residual": (
            Options(training=True, activation="relu"),
            lambda: ForwardArgs(x_like(), w, b, x_like(memory_format=torch.channels_last),
                                *stats())),
        "transposed input (copied)": (train, lambda: ForwardArgs(
            torch.randn(4, 6, 3, 5, device=device).transpose(2, 3), w, b, None, *stats())),
        "cumulative": (Options(training=True, momentum=None), lambda: ForwardArgs(
            x_like(), w, b, None, *stats(), torch.zeros((), dtype=torch.int64, device=device))),
        "per-channel counts": (Options(training=True, momentum=None), lambda: ForwardArgs(
            x_like(), w, b, None, *stats(), None, torch.zeros(6, dtype=torch.int64,
                                                              device=device))),
        "overflow counters": (train, lambda: ForwardArgs(
            x_like(), w, b, None, *stats(), None, None,
            torch.zeros(6, dtype=torch.int64, device=device), torch.zeros(6, device=device))),
        "renorm": (Options(training=True, renorm=(3.0, 5.0)),
                   lambda: ForwardArgs(x_like(), w, b, None, *stats())),
    }


def _described(launches) -> list:
    """Launches as comparable values: kernel, grid, integers, floats, constants, and per
    pointer its presence, dtype, shape and strides (the tensors themselves are new per call)."""
    out = []
    for kernel, grid, args, kwargs in launches:
        pointers, ints, floats = args.groups
        out.append((kernel.fn.__name__, grid, ints, floats, sorted(kwargs.items(), key=str),
                    [None if t is None else (t.dtype, tuple(t.shape), t.stride())
                     for t in pointers]))
    return out


def _forget() -> None:
    launch.forget_calls()
    assert not forward_launcher._calls and not backward_launcher._calls


def _forward_launches(o, a) -> list:
    with launch.capture_launches() as launches:
        launch.forward(a, o)
    return _described(launches)


@pytest.mark.parametrize("variant", ["onepass", "split"])
def test_every_fact_of_a_forward_call_keys_its_launches(variant, device):
    cases = _forward_cases(device)
    with planner.forced_plan(variant=variant):
        fresh = {}
        for name, (o, args) in cases.items():
            _forget()
            fresh[name] = _forward_launches(o, args())
        assert len({repr(v) for v in fresh.values()}) > len(cases) // 2, \
            "the cases must launch differently, or this test would prove nothing"
        _forget()
        for _ in range(2):
            for name, (o, args) in cases.items():
                assert _forward_launches(o, args()) == fresh[name], name


def test_a_forced_plan_after_a_kept_call_changes_the_launches(device):
    o, args = _forward_cases(device)["base"]
    _forget()
    with planner.forced_plan(variant="onepass"):
        one = _forward_launches(o, args())
    with planner.forced_plan(variant="split", splits=2):
        split = _forward_launches(o, args())
    assert [d[0] for d in one] == ["bn_fwd_onepass_kernel"]
    assert [d[0] for d in split] == ["bn_stats_partial_kernel", "bn_fwd_apply_kernel"]


def _backward_cases(device):
    def x_like(dtype=torch.float32, memory_format=torch.contiguous_format):
        return torch.randn(SHAPE, device=device, dtype=dtype).contiguous(
            memory_format=memory_format)

    w, b = torch.rand(6, device=device) + 0.5, torch.randn(6, device=device)
    mean, invstd = torch.zeros(6, device=device), torch.ones(6, device=device)
    rd = torch.ones(2, 6, device=device)
    train, relu = Options(training=True), Options(training=True, activation="relu")
    return {
        "base": (train, True, lambda: BackwardArgs(x_like(), x_like(), w, b, None, mean,
                                                   invstd, None)),
        "no parameter grads": (train, False, lambda: BackwardArgs(
            x_like(), x_like(), w, b, None, mean, invstd, None)),
        "eval": (Options(), True, lambda: BackwardArgs(x_like(), x_like(), w, b, None, mean,
                                                       invstd, None)),
        "eval, input grad only": (Options(), False, lambda: BackwardArgs(
            x_like(), x_like(), w, b, None, mean, invstd, None)),
        "no weight": (train, True, lambda: BackwardArgs(x_like(), x_like(), None, b, None,
                                                        mean, invstd, None)),
        "channels-last grad": (train, True, lambda: BackwardArgs(
            x_like(memory_format=torch.channels_last), x_like(), w, b, None, mean, invstd,
            None)),
        "expanded grad": (train, True, lambda: BackwardArgs(
            torch.ones((), device=device).expand(SHAPE), x_like(), w, b, None, mean, invstd,
            None)),
        "float16": (train, True, lambda: BackwardArgs(
            x_like(torch.float16), x_like(torch.float16), w, b, None, mean, invstd, None)),
        "half weight": (train, True, lambda: BackwardArgs(
            x_like(torch.float16), x_like(torch.float16), w.half(), b, None, mean, invstd,
            None)),
        "half bias": (train, True, lambda: BackwardArgs(
            x_like(torch.float16), x_like(torch.float16), w, b.half(), None, mean, invstd,
            None)),
        "residual and activation": (relu, True, lambda: BackwardArgs(
            x_like(), x_like(), w, b, x_like(), mean, invstd, None)),
        "renorm": (Options(training=True, renorm=(3.0, 5.0)), True, lambda: BackwardArgs(
            x_like(), x_like(), w, b, None, mean, invstd, rd)),
    }


@pytest.mark.parametrize("variant", ["onepass", "split"])
def test_every_fact_of_a_backward_call_keys_its_launches(variant, device):
    cases = _backward_cases(device)

    def launches(o, param_grads, a):
        with launch.capture_launches() as captured:
            launch.backward(a, o, param_grads)
        return _described(captured)

    with planner.forced_plan(variant=variant):
        fresh = {}
        for name, (o, param_grads, args) in cases.items():
            _forget()
            fresh[name] = launches(o, param_grads, args())
        assert len({repr(v) for v in fresh.values()}) > len(cases) // 2
        _forget()
        for _ in range(2):
            for name, (o, param_grads, args) in cases.items():
                assert launches(o, param_grads, args()) == fresh[name], name


def _pointer_facts(launches) -> list:
    return [(d[0], d[5] and [None if p is None else p[0] for p in d[5]]) for d in launches]


@pytest.mark.parametrize("variant", ["onepass", "split"])
def test_calls_that_share_a_kept_call_have_the_same_pointer_dtypes(variant, device,
                                                                   monkeypatch):
    """A kept call's launches keep Triton's compiled launcher once it has launched
    (direct_launch.Site) and hand it later calls' addresses unchecked: every call that finds
    a kept call must have the dtypes, and the Nones, of the call that made it -- its key holds
    every pointer's dtype. (The comparisons above cannot see this: a captured launch records
    the call's own tensors.)"""
    run_module = importlib.import_module("tritonbn.launch.run")
    keep, used = run_module.kept, []
    monkeypatch.setattr(run_module, "kept", lambda *args: used.append(keep(*args)) or used[-1])
    fwd = _forward_cases(device)
    bwd = _backward_cases(device)

    def forward(o, args):
        return _forward_launches(o, args())

    def backward(o, param_grads, args):
        with launch.capture_launches() as captured:
            launch.backward(args(), o, param_grads)
        return _described(captured)

    with planner.forced_plan(variant=variant):
        _forget()
        by_call: dict = {}
        for cases, run_case in ((fwd, forward), (bwd, backward)):
            for name, case in cases.items():
                used.clear()
                facts = _pointer_facts(run_case(*case))
                assert len(used) == 1, name
                first = by_call.setdefault(id(used[0]), (name, facts))
                assert facts == first[1], (name, "shares the kept call of", first[0])
        assert len(by_call) == len(fwd) + len(bwd)    # here every case is a kind of its own


def test_kept_calls_compute_what_fresh_ones_do(device):
    """The values, not only the launches: the same call twice on warm caches, then planned
    from nothing, gives bit-identical outputs and running statistics."""
    x = torch.randn(SHAPE, device=device)
    w, b = torch.rand(6, device=device) + 0.5, torch.randn(6, device=device)
    o = Options(training=True, activation="relu")
    results = []
    for forget in (False, False, True):
        if forget:
            _forget()
        rm, rv = torch.zeros(6, device=device), torch.ones(6, device=device)
        out = launch.forward(ForwardArgs(x, w, b, x.flip(0), rm, rv), o)
        results.append((out[0], out[1], out[2], rm, rv))
    for later in results[1:]:
        for a, b_ in zip(results[0], later):
            assert torch.equal(a, b_)


# ------------------------------------------------------------------- synchronized statistics
# A synchronized forward's launches depend on its group's world size (one partial per
# process), and a group's name outlives the group: a process that destroys its default group
# and makes one of another size gets the same name ("0").

C = 3


def _input(rank: int) -> torch.Tensor:
    return torch.randn(4, C, 2, 2, generator=torch.Generator().manual_seed(rank))


def _sync_forward(x: torch.Tensor):
    import tritonbn
    rm, rv = torch.zeros(C), torch.ones(C)
    y = tritonbn.sync_batch_norm(x, rm, rv, None, None, 0.1, 1e-5)
    return y, rm, rv


def _worker(rank: int, init_dir: str, result: str) -> None:
    x = _input(rank)
    dist.init_process_group("gloo", init_method=f"file://{init_dir}/two", rank=rank,
                            world_size=2)
    try:
        name_two = dist.group.WORLD.group_name
        _sync_forward(x)                          # kept: a call synchronized over 2 processes
    finally:
        dist.destroy_process_group()
    if rank != 0:
        return
    dist.init_process_group("gloo", init_method=f"file://{init_dir}/one", rank=0, world_size=1)
    try:
        name_one = dist.group.WORLD.group_name
        y, rm, rv = _sync_forward(x)              # the same kind of call, now over 1 process
    finally:
        dist.destroy_process_group()
    torch.save({"names": (name_two, name_one), "y": y, "rm": rm, "rv": rv}, result)


def test_a_kept_synchronized_call_follows_its_groups_world_size(tmp_path):
    result = str(tmp_path / "result.pt")
    mp.spawn(_worker, args=(str(tmp_path), result), nprocs=2)
    out = torch.load(result)
    assert out["names"][0] == out["names"][1], "the test needs the group name to repeat"
    x = _input(0)
    rm, rv = torch.zeros(C), torch.ones(C)
    expected = torch.nn.functional.batch_norm(x, rm, rv, training=True, momentum=0.1, eps=1e-5)
    torch.testing.assert_close(out["y"], expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["rm"], rm, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out["rv"], rv, atol=1e-6, rtol=1e-5)
