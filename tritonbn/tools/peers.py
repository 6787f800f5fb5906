"""The batch-norm implementations the benchmark compares: tritonbn, torch eager, torch.compile,
and any other found installed (apex's NHWC group batch norm). Each is a function
``(x, weight, bias, running_mean, running_var, training, relu) -> y`` built per case, or a reason
it does not apply to the case."""
from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F

__all__ = ["Peer", "available_peers", "torch_backend"]


class Peer:
    name = "?"

    def unsupported(self, x: torch.Tensor) -> str | None:
        """Why this implementation cannot run ``x`` (None: it can)."""
        return None

    def build(self, x: torch.Tensor, training: bool, relu: bool):
        raise NotImplementedError

    def reset(self) -> None:
        """Forget per-case state (compiled graphs)."""


class TritonBN(Peer):
    name = "tritonbn"

    def build(self, x, training, relu):
        import tritonbn
        act = "relu" if relu else None
        return lambda x, w, b, rm, rv: tritonbn.batch_norm(x, rm, rv, w, b, training,
                                                           activation=act)


def _torch_bn(training: bool, relu: bool):
    def fn(x, w, b, rm, rv):
        y = F.batch_norm(x, rm, rv, w, b, training)
        return F.relu(y) if relu else y
    return fn


class TorchEager(Peer):
    name = "torch"

    def build(self, x, training, relu):
        return _torch_bn(training, relu)


class TorchCompile(Peer):
    """torch.compile of the eager function, one graph per (case, mode): dynamo is reset per
    case so its recompile limit never sends a shape back to eager silently."""
    name = "torch.compile"

    def __init__(self, backend: str = "inductor"):
        self.backend = backend

    def build(self, x, training, relu):
        return torch.compile(_torch_bn(training, relu), backend=self.backend, dynamic=False)

    def reset(self):
        torch._dynamo.reset()


class ApexGroupBN(Peer):
    """apex.contrib.groupbn.BatchNorm2d_NHWC: float16, 4-D channels-last, CUDA only; takes the
    (N, H, W, C) view of a channels-last tensor (no copy). Not tried on a machine with apex:
    failures are recorded per case, never fatal."""
    name = "apex-groupbn"

    def unsupported(self, x):
        if not (x.is_cuda and x.dim() == 4 and x.dtype == torch.float16
                and x.is_contiguous(memory_format=torch.channels_last)):
            return "float16 4-D channels-last CUDA tensors only"
        return None

    def build(self, x, training, relu):
        from apex.contrib.groupbn.batch_norm import BatchNorm2d_NHWC
        module = BatchNorm2d_NHWC(x.shape[1], fuse_relu=relu).to(x.device)
        module.train(training)

        def fn(x, w, b, rm, rv):
            return module(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return fn


def available_peers(compile_backend: str = "inductor") -> dict[str, Peer]:
    peers: dict[str, Peer] = {p.name: p for p in (TritonBN(), TorchEager(),
                                                   TorchCompile(compile_backend))}
    if importlib.util.find_spec("apex") is not None:
        try:
            if importlib.util.find_spec("apex.contrib.groupbn") is not None:
                peers["apex-groupbn"] = ApexGroupBN()
        except (ImportError, ValueError):
            pass
    return peers


# torch.nn.functional.batch_norm picks cuDNN (or MIOpen) or its native kernels at run time from
# conditions that change between releases (dtype, eps, batch size, numel < 2**31, ...). Rather
# than re-implement that rule, run one call under the profiler and look at which aten ops
# dispatched: aten::cudnn_batch_norm(_backward) / aten::miopen_batch_norm mean the vendor
# library ran; anything else is torch's native kernel.
def torch_backend(x: torch.Tensor, training: bool) -> dict:
    from torch.profiler import ProfilerActivity, profile

    c = x.shape[1]
    w = torch.ones(c, device=x.device, requires_grad=training)
    b = torch.zeros(c, device=x.device, requires_grad=training)
    rm, rv = torch.zeros(c, device=x.device), torch.ones(c, device=x.device)
    xi = x.detach().requires_grad_(training)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        y = F.batch_norm(xi, rm, rv, w, b, training)
        if training:
            y.backward(torch.ones_like(y))
    names = sorted({e.name for e in prof.events() if "norm" in e.name})
    backend = ("cudnn" if any("cudnn" in n for n in names)
               else "miopen" if any("miopen" in n for n in names) else "native")
    return {"backend": backend, "aten_ops": names,
            "cudnn_enabled": bool(torch.backends.cudnn.enabled)}
