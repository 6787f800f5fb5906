"""``python -m bench.memory``: the activation memory a training forward saves for backward.

Run from the repository root (``bench`` is a folder of the checkout, not part of the installed
package). The baseline and the yardstick for an in-place activated batch norm: per model and
variant, how many bytes of activations autograd keeps between the forward and the backward.

Variants of each model (built afresh from the same seed, training mode, channels_last, float32):

* ``torch``: the model as torchvision builds it (torch's batch norm; ReLU in place where
  torchvision has it so);
* ``convert``: ``tritonbn.convert_model(model)`` (each batch norm on tritonbn's kernels);
* ``fuse``: ``tritonbn.fuse(model)`` (BN -> [add ->] activation as one kernel call);
* ``torch, LeakyReLU``: every ``nn.ReLU`` replaced by ``nn.LeakyReLU(0.01)`` with the same
  ``inplace`` flag, torch's batch norm: the model an in-place activated batch norm targets (a
  leaky ReLU is invertible, so its input can be recomputed from its output);
* ``fuse, LeakyReLU`` (only with ``--variants``): the same model fused;
* ``fuse inplace, LeakyReLU``: the same model fused with ``tritonbn.fuse(model, inplace=True)``:
  in-place activated batch norm, each layer with an invertible activation (LeakyReLU, or none:
  the downsample branches' batch norms) saving only its output, written over its input where
  nothing else reads that;
* ``fuse inplace`` (only with ``--variants``): ``fuse(model, inplace=True)`` on the ReLU model,
  where only the layers without an activation become invertible (ReLU is not).

How: one training forward runs under ``torch.autograd.graph.saved_tensors_hooks``, whose pack
hook sees every tensor an autograd node saves (torch's ops and tritonbn's, which save with
``ctx.save_for_backward``). Each distinct storage counts once, whatever its dtype or view:
tensors are keyed by their untyped storage's (device, data_ptr), with the storage's nbytes, so
a tensor saved by two ops (a ReLU's output saved by the ReLU and by the next convolution) or
two views of one storage count once. Storages of the model's parameters and buffers (a
convolution saves its weight, a batch norm its running statistics) are left out; the input
batch, which the first convolution saves, is counted (the same in every variant). MB = 10^6
bytes. ``ratio`` is a variant's bytes over the ``torch`` variant's of the same model;
``ratio_same_act`` over torch's with the same activations (``torch, LeakyReLU`` for the LeakyReLU
variants, measured whenever one of them is).

``batch_in_budget``: the largest batch whose saved activations fit ``--budget-gb`` (default 16
GB = 16 x 10^9 bytes) at the measured image size, assuming saved bytes grow in proportion to the
batch (per sample: saved bytes / batch). What does not grow with the batch -- the batch norms'
per-channel statistics, about 0.2 MB on resnet50 -- is counted as if it did, so the figure is an
underestimate by that share (1-3% here). Parameters, gradients, optimizer state and the
transient buffers of the forward and backward are not in the budget: it is the activation
memory's share of a device, and the figure compares variants, not devices.

On a GPU each variant also gets ``torch.cuda.max_memory_allocated`` over one full training
step (forward, ``sum`` of the output, backward; after one warm-up step, gradients set to None
before each step): the peak, parameters and gradients included, and its ratio to the peak of
torch's with the same activations (``peak_ratio_same_act``). Without a GPU that column is
``-``. On CPU the tritonbn variants run their kernels in Triton's interpreter; what is saved
does not depend on where the kernels run, but torch's own batch norm saves different tensors
on CPU (native) and on CUDA (cuDNN), so compare rows of one device.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import warnings

import torch
from torch import nn

__all__ = ["MODELS", "VARIANTS", "DEFAULT_MODELS", "DEFAULT_VARIANTS", "DEFAULT_BUDGET_GB",
           "SavedBytes", "baseline_of", "build_model", "saved_bytes", "measure", "format_table",
           "main"]

MB = 1e6


def _resnet50():
    import torchvision
    return torchvision.models.resnet50(weights=None)


def _deeplabv3_resnet50():
    import torchvision
    return torchvision.models.segmentation.deeplabv3_resnet50(
        weights=None, weights_backbone=None, aux_loss=False)


def _wide_resnet50_2():
    import torchvision
    return torchvision.models.wide_resnet50_2(weights=None)


def _resnet18():
    import torchvision
    return torchvision.models.resnet18(weights=None)


# name -> builder; resnet18 is for tests and quick looks (not in the default set)
MODELS = {"resnet50": _resnet50, "deeplabv3_resnet50": _deeplabv3_resnet50,
          "wide_resnet50_2": _wide_resnet50_2, "resnet18": _resnet18}
DEFAULT_MODELS = ("resnet50", "deeplabv3_resnet50", "wide_resnet50_2")


def leaky_relu(model: nn.Module, negative_slope: float = 0.01) -> nn.Module:
    """Replace every ``nn.ReLU`` of ``model`` (in place) by ``nn.LeakyReLU(negative_slope)``
    with the same ``inplace`` flag; returns the model."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.ReLU:
                setattr(parent, name, nn.LeakyReLU(negative_slope, inplace=child.inplace))
    return model


def _convert(model):
    import tritonbn
    return tritonbn.convert_model(model)


def _fuse(model, inplace: bool = False):
    import tritonbn
    return tritonbn.fuse(model, inplace=inplace)


# name -> transform of a freshly built model (returns the model to run)
VARIANTS = {
    "torch": lambda m: m,
    "convert": _convert,
    "fuse": _fuse,
    "torch, LeakyReLU": leaky_relu,
    "fuse, LeakyReLU": lambda m: _fuse(leaky_relu(m)),
    "fuse inplace, LeakyReLU": lambda m: _fuse(leaky_relu(m), inplace=True),
    "fuse inplace": lambda m: _fuse(m, inplace=True),
}
DEFAULT_VARIANTS = ("torch", "convert", "fuse", "torch, LeakyReLU", "fuse inplace, LeakyReLU")
DEFAULT_BUDGET_GB = 16.0


def baseline_of(variant: str) -> str:
    """The torch eager variant with the same activations: the yardstick of ``ratio_same_act``."""
    return "torch, LeakyReLU" if variant.endswith("LeakyReLU") else "torch"


def build_model(name: str, variant: str, device: str = "cpu", seed: int = 0) -> nn.Module:
    """``MODELS[name]`` built from ``seed``, transformed by ``VARIANTS[variant]``, on
    ``device``, channels_last, in training mode."""
    torch.manual_seed(seed)
    model = MODELS[name]()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")      # ConversionWarning etc.: the table says what ran
        model = VARIANTS[variant](model)
    return model.to(device=device, memory_format=torch.channels_last).train()


def _storage_key(t: torch.Tensor) -> tuple:
    s = t.untyped_storage()
    return (str(t.device), s.data_ptr())


class SavedBytes:
    """A context manager counting the storages autograd saves for backward inside it.

    ``exclude``: tensors (parameters, buffers) whose storages are not counted. Every storage
    saved inside the block counts, also one whose graph is dropped before the block ends (the
    counter holds the tensors until then, so two storages never share an address). After the
    block, ``nbytes`` is the total of distinct saved storages, ``tensors`` how many saves the
    hook saw and ``storages`` how many distinct storages were counted."""

    def __init__(self, exclude=()):
        self.excluded = {_storage_key(t) for t in exclude}
        self.seen: dict = {}        # storage key -> nbytes
        self.tensors = 0
        self._hooks = None
        self._alive: list = []      # every saved tensor, until the block ends (see _pack)

    def _pack(self, t: torch.Tensor):
        self.tensors += 1
        key = _storage_key(t)
        if key not in self.excluded:
            nbytes = t.untyped_storage().nbytes()
            self.seen[key] = max(nbytes, self.seen.get(key, 0))
            # held here too: a node whose graph is dropped inside the block (a discarded
            # branch) would free the storage, and a later one could get its address
            self._alive.append(t.detach())
        # saved as usual, detached: packing an op's output itself would make a reference cycle
        # (output -> its node -> the saved output), and no graph would ever be freed
        return t.detach()

    def __enter__(self):
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._alive.clear()
        return self._hooks.__exit__(*exc)

    @property
    def nbytes(self) -> int:
        return sum(self.seen.values())

    @property
    def storages(self) -> int:
        return len(self.seen)


def _loss(out):
    """The sum of the output, as float32; of each value of a dict (deeplabv3's ``{'out': ...}``)."""
    if isinstance(out, dict):
        return sum(v.float().sum() for v in out.values())
    return out.float().sum()


def saved_bytes(model: nn.Module, x: torch.Tensor) -> SavedBytes:
    """Run one forward of ``model`` on ``x`` with autograd recording and count what it saves
    (parameters and buffers excluded). The graph is dropped afterwards."""
    exclude = [*model.parameters(), *model.buffers()]
    with torch.enable_grad(), SavedBytes(exclude) as counter:
        out = model(x)
    del out
    return counter


def _peak_step_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """torch.cuda.max_memory_allocated over one training step, after one warm-up step."""
    for step in range(2):
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if step == 1:
            torch.cuda.reset_peak_memory_stats()
        _loss(model(x)).backward()
        torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated()


def measure(models=DEFAULT_MODELS, variants=DEFAULT_VARIANTS, size: int = 64, batch: int = 2,
            device: str | None = None, budget_gb: float = DEFAULT_BUDGET_GB,
            deadline: float | None = None, on_row=None) -> dict:
    """The figures: one row per (model, variant); see the module docstring.

    ``deadline`` (a ``time.time()``): no variant is started after it (the rows measured so far
    are returned; a ratio whose denominator was not measured is None). ``on_row(row)`` is
    called with each row as it is measured (its ratios may be filled in later, once the
    denominators are measured)."""
    import triton

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device.startswith("cuda")
    variants = list(variants)
    # the ratios' denominators: torch's, and torch's with the same activations
    missing = [b for b in ("torch", "torch, LeakyReLU")
               if b not in variants and (b == "torch" or any(baseline_of(v) == b
                                                               for v in variants))]
    variants = missing + variants
    budget = budget_gb * 1e9
    rows = []
    for name in models:
        bases, peaks, mine = {}, {}, []
        for variant in variants:
            if deadline is not None and time.time() > deadline:
                break
            t0 = time.perf_counter()
            model = build_model(name, variant, device)
            torch.manual_seed(1)
            x = torch.randn(batch, 3, size, size, device=device).contiguous(
                memory_format=torch.channels_last)
            counted = saved_bytes(model, x)
            peak = _peak_step_bytes(model, x) if gpu else None
            del model
            if gpu:
                torch.cuda.empty_cache()
            bases[variant], peaks[variant] = counted.nbytes, peak
            row = dict(model=name, variant=variant, saved_bytes=counted.nbytes,
                       saved_mb=round(counted.nbytes / MB, 2), ratio=None, ratio_same_act=None,
                       batch_in_budget=int(budget // (counted.nbytes / batch)),
                       storages=counted.storages, saves=counted.tensors,
                       peak_step_bytes=peak,
                       peak_step_mb=None if peak is None else round(peak / MB, 1),
                       peak_ratio_same_act=None, seconds=round(time.perf_counter() - t0, 1))
            rows.append(row)
            mine.append(row)
            _ratios(mine, bases, peaks)
            if on_row is not None:
                on_row(row)
        _ratios(mine, bases, peaks)
    return {"device": _device_name(device), "gpu": gpu, "torch": torch.__version__,
            "triton": triton.__version__, "size": size, "batch": batch, "budget_gb": budget_gb,
            "dtype": "float32",
            "memory_format": "channels_last", "rows": rows, "date": time.strftime("%Y-%m-%d")}


def _ratios(rows: list, bases: dict, peaks: dict) -> None:
    """Fill in the ratios of one model's rows whose denominators have been measured."""
    for r in rows:
        same = baseline_of(r["variant"])
        if "torch" in bases:
            r["ratio"] = round(r["saved_bytes"] / bases["torch"], 3)
        if same in bases:
            r["ratio_same_act"] = round(r["saved_bytes"] / bases[same], 3)
            if peaks.get(same) and r["peak_step_bytes"] is not None:
                r["peak_ratio_same_act"] = round(r["peak_step_bytes"] / peaks[same], 3)


def _device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return "CPU (tritonbn's kernels in Triton's interpreter)"


def format_table(result: dict) -> str:
    peak = ("peak MB, one training step (torch.cuda.max_memory_allocated)" if result["gpu"]
            else "peak MB, one training step (- : no GPU, not measured)")
    lines = [f"Activation memory saved for backward by one training forward, "
             f"{result['date']}: batch {result['batch']}, {result['size']}x{result['size']} "
             f"images, {result['dtype']}, {result['memory_format']}; {result['device']}; "
             f"torch {result['torch']}, triton {result['triton']}", "",
             f"| model | variant | saved MB | ratio to torch | ratio to torch, same "
             f"activations | largest batch in {result['budget_gb']:g} GB | storages (saves) "
             f"| {peak} |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    def ratio(value) -> str:
        return "-" if value is None else f"{value:.3f}"

    for r in result["rows"]:
        p = "-" if r["peak_step_mb"] is None else r["peak_step_mb"]
        if r["peak_ratio_same_act"] is not None:
            p = f"{p} ({r['peak_ratio_same_act']:.3f} of torch's, same activations)"
        lines.append(f"| {r['model']} | {r['variant']} | {r['saved_mb']:.2f} | "
                     f"{ratio(r['ratio'])} | {ratio(r['ratio_same_act'])} | "
                     f"{r['batch_in_budget']} | {r['storages']} ({r['saves']}) | {p} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.memory",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS),
                        help=f"comma-separated, of: {', '.join(MODELS)} (default: %(default)s)")
    parser.add_argument("--variants", default=";".join(DEFAULT_VARIANTS),
                        help=f"semicolon-separated, of: {'; '.join(VARIANTS)} "
                             f"(default: %(default)s)")
    parser.add_argument("--size", type=int, default=64, help="image height and width")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--budget-gb", type=float, default=DEFAULT_BUDGET_GB,
                        help="memory budget of the largest-batch column, GB = 10^9 bytes of "
                             "saved activations (default: %(default)s)")
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    args = parser.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    variants = [v.strip() for v in args.variants.split(";") if v.strip()]
    for m in models:
        if m not in MODELS:
            parser.error(f"unknown model {m!r}; choose from {', '.join(MODELS)}")
    for v in variants:
        if v not in VARIANTS:
            parser.error(f"unknown variant {v!r}; choose from {'; '.join(VARIANTS)}")
    if args.size < 1 or args.batch < 1:
        parser.error("--size and --batch must be at least 1")
    if not args.budget_gb > 0:
        parser.error("--budget-gb must be positive")
    result = measure(models, variants, args.size, args.batch, budget_gb=args.budget_gb)
    print(format_table(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
