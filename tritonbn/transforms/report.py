"""What the model transforms did to each batch-norm-like layer, and the warning for the ones left
on torch.

``convert_model``, ``fuse`` and ``fold_into_conv`` return a :class:`TransformReport` when called
with ``report=True``: one :class:`LayerRecord` per batch-norm-like layer, in module order, saying
what the layer became (and whether it runs on tritonbn's kernels), what was fused into it, what it
was folded into, and why any of that did not happen. ``print(report)`` prints the table.

A layer is *batch-norm-like* when it is a torch ``_BatchNorm`` (BatchNorm1d/2d/3d, SyncBatchNorm,
the lazy ones and any subclass), a tritonbn layer, an instance of a class with a registered
conversion, or any other module holding ``running_mean`` / ``running_var`` buffers of its own
(frozen batch norms of other libraries): those are the layers a report lists and a
:class:`ConversionWarning` names when they stay on torch.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Iterator

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["ConversionWarning", "LayerRecord", "TransformReport", "class_name"]


class ConversionWarning(UserWarning):
    """Batch-norm-like layers were left on torch by ``tritonbn.convert_model`` / ``tritonbn.fuse``
    (the message names them and says why)."""


def class_name(cls_or_module) -> str:
    """'torch.nn.BatchNorm2d', 'tritonbn.BatchNormAct2d', 'timm BatchNormAct2d'-style short
    names: the public path for torch and tritonbn classes, package + class otherwise."""
    cls = cls_or_module if isinstance(cls_or_module, type) else type(cls_or_module)
    module = cls.__module__ or ""
    if module.startswith("torch.nn.modules."):
        return f"torch.nn.{cls.__qualname__}"
    if module.startswith("tritonbn."):
        return f"{_public_tritonbn(cls)}.{cls.__qualname__}"
    package = module.split(".")[0]
    return f"{package}.{cls.__qualname__}" if package else cls.__qualname__


def _public_tritonbn(cls) -> str:
    """'tritonbn' or 'tritonbn.transforms' where the class is exported, else its module."""
    import tritonbn
    for name, namespace in (("tritonbn", tritonbn), ("tritonbn.transforms", tritonbn.transforms)):
        if getattr(namespace, cls.__qualname__, None) is cls:
            return name
    return cls.__module__


@dataclass
class LayerRecord:
    """One batch-norm-like layer: its path in the model, its class before and after, and what
    the transforms did to it.

    ``kernels``: whether the layer runs on tritonbn's kernels after the transform. ``fused``: the
    epilogue computed in the batch-norm kernels ("relu", "add+silu", "add", ...; "" when none).
    ``folded``: the path of the layer it was folded into ("" when not folded). ``note``: why a
    layer stayed on torch, was not fused or not folded, or a remark on what it became.
    """

    name: str
    original: str
    result: str = ""
    kernels: bool = False
    fused: str = ""
    folded: str = ""
    note: str = ""

    @property
    def left_on_torch(self) -> bool:
        return not self.kernels and not self.folded


@dataclass
class TransformReport:
    """Per-layer outcome of convert_model / fuse / fold_into_conv (see the module docstring).

    ``stages`` names the transforms that filled it in ("convert", "fuse", "fold"); ``layers``
    maps each batch-norm-like layer's path ("" for a root layer) to its :class:`LayerRecord`.
    """

    stages: list = field(default_factory=list)
    layers: dict = field(default_factory=dict)

    def __iter__(self) -> Iterator[LayerRecord]:
        return iter(self.layers.values())

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, name: str) -> LayerRecord:
        return self.layers[name]

    def add(self, record: LayerRecord) -> LayerRecord:
        self.layers[record.name] = record
        return record

    @property
    def left_on_torch(self) -> list:
        """The records of the layers that stay torch's (not on the kernels, not folded away)."""
        return [r for r in self if r.left_on_torch]

    def counts(self) -> dict:
        """{'layers', 'kernels', 'fused', 'folded', 'left_on_torch'}: how many layers of each."""
        return dict(layers=len(self), kernels=sum(r.kernels for r in self),
                    fused=sum(bool(r.fused) for r in self),
                    folded=sum(bool(r.folded) for r in self),
                    left_on_torch=len(self.left_on_torch))

    def summary(self) -> str:
        c = self.counts()
        parts = [f"{c['layers']} batch-norm-like layers", f"{c['kernels']} on tritonbn's kernels"]
        if "fuse" in self.stages:
            parts.append(f"{c['fused']} fused")
        if "fold" in self.stages:
            parts.append(f"{c['folded']} folded")
        parts.append(f"{c['left_on_torch']} left on torch")
        return ", ".join(parts)

    def table(self, markdown: bool = False) -> str:
        """The per-layer table (aligned text, or markdown), then the summary line."""
        columns = [("layer", lambda r: r.name or "(root)"), ("class", lambda r: r.original),
                   ("became", lambda r: r.result if r.kernels or r.folded
                    else f"{r.result} (torch)")]
        if "fuse" in self.stages:
            columns.append(("fused", lambda r: r.fused or "-"))
        if "fold" in self.stages:
            columns.append(("folded into", lambda r: r.folded or "-"))
        columns.append(("note", lambda r: r.note))
        rows = [[get(r) for _, get in columns] for r in self]
        heads = [h for h, _ in columns]
        if markdown:
            lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
            lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |"
                      for row in rows]
        else:
            widths = [max([len(h)] + [len(row[i]) for row in rows])
                      for i, h in enumerate(heads[:-1])]
            fmt = "  ".join(f"{{:{w}}}" for w in widths) + "  {}"
            lines = [fmt.format(*heads).rstrip()]
            lines += [fmt.format(*row).rstrip() for row in rows]
        return "\n".join(lines + ["", self.summary()])

    def __str__(self) -> str:
        return self.table()


def is_batch_norm_like(module: nn.Module, registered: bool = False) -> bool:
    """The report's rule (module docstring); ``registered``: its class has a conversion."""
    from ..nn import TritonNorm
    return (registered or isinstance(module, (_BatchNorm, TritonNorm))
            or "running_mean" in module._buffers or "running_var" in module._buffers)


def warn_left_on_torch(report: TransformReport, who: str, stacklevel: int) -> None:
    """One ConversionWarning naming every layer the report leaves on torch, with the reason."""
    left = report.left_on_torch
    if not left:
        return
    shown = left[:8]
    items = "; ".join(f"'{r.name or '(root)'}' ({r.original}): {r.note}" for r in shown)
    more = f"; and {len(left) - len(shown)} more" if len(left) > len(shown) else ""
    warnings.warn(f"{who}: {len(left)} of {len(report)} batch-norm-like layers left on torch: "
                  f"{items}{more}. Pass report=True for the per-layer table.",
                  ConversionWarning, stacklevel=stacklevel + 1)
