"""The tensors a batch norm updates -- running statistics, batch counters, overflow counters --
and how the kernels read them, write them, and hand them back.

Eager calls update them in place (``in_place=True``); the custom op (``in_place=False``)
returns their new values as ``new_<name>`` outputs, which its callers copy back.
"""
from __future__ import annotations

import functools
import operator
from typing import Optional

import torch
from torch.autograd.graph import increment_version

from ..options import UPDATED, ForwardArgs, Options

__all__ = ["UPDATES", "updated_names", "Updated", "Updates"]

# Which of the tensors the op may update it updates, given the options: the launchers, the
# custom op's fake kernel and its callers all read this one table.
UPDATES = {
    "running_mean": lambda o: o.training,
    "running_var": lambda o: o.training,
    "running_count": lambda o: o.training and o.cumulative,
    "overflow_count": lambda o: True,       # accumulated in eval too
    "overflow_max": lambda o: True,
}
assert set(UPDATES) == set(UPDATED)


@functools.lru_cache(maxsize=1024)
def updated_names(o: Options) -> tuple[str, ...]:
    """The names of the tensors a call with options ``o`` updates (UPDATES, per Options)."""
    return tuple(name for name in UPDATED if UPDATES[name](o))


_ACCUMULATED = ("overflow_count", "overflow_max")    # counters: new values add to the old
_NONE = dict.fromkeys(UPDATED)                     # (copied: each name's entry, None)
_NO_NEW = (None,) * len(UPDATED)
_take_updated = operator.attrgetter(*UPDATED)      # a ForwardArgs' updated tensors, in order


class Updated:
    """How the kernels read and write one tensor the op updates, and how it gets back.

    ``read``: flat values before the call (a view of the caller's tensor, or a copy when its
    strides have no flat view). ``write``: where the kernels put the new values -- ``read``
    itself when they may update in place, else a new tensor (a copy of ``read`` for counters
    that accumulate). In place, a new tensor is copied into the caller's afterwards (strided or
    reshaped statistics, renorm); otherwise it is the op's ``new_<name>`` output.
    """

    __slots__ = ("given", "in_place", "read", "write")

    def __init__(self, given: torch.Tensor, updates: bool, in_place: bool,
                 accumulates: bool = False, separate: bool = False):
        self.given, self.in_place = given, in_place
        contiguous = given.is_contiguous()
        self.read = given if contiguous and given.dim() == 1 else given.contiguous().view(-1)
        if not updates:
            self.write = None
        elif in_place and contiguous and not separate:
            self.write = self.read          # the caller's own memory
        elif accumulates:
            self.write = self.read.clone()
        else:
            self.write = torch.empty_like(self.read)

    def unchanged(self) -> None:
        """The kernels did not run (an empty batch): the new values are the old ones."""
        if self.write is not None and self.write is not self.read:
            self.write.copy_(self.read)

    def finish(self) -> Optional[torch.Tensor]:
        """In place: write back when needed, return None. Else the ``new_<name>`` output, None
        when the op does not update this argument."""
        if not self.in_place:
            return self.write
        if self.write is not None and self.write is not self.read:
            with torch.no_grad():
                self.given.copy_(self.write.view(self.given.shape))
        return None


class Updates:
    """The Updated of each tensor of a call, by name (None for absent ones and for ones the
    kernels update in the caller's own memory), and their ``reads`` / ``writes`` by name (None
    for absent ones) as the kernels take them."""

    __slots__ = ("items", "reads", "writes", "bumped")

    def __init__(self, a: ForwardArgs, o: Options, in_place: bool):
        # Renorm reads the running statistics of before this step in every program while the
        # first program of each channel block writes the new ones: never the same memory.
        separate = o.renorming
        updated = updated_names(o)
        self.items, self.reads, self.writes = items, reads, writes = (
            _NONE.copy(), _NONE.copy(), _NONE.copy())
        # in place: the caller's tensors this call changes, whose versions finish() bumps
        self.bumped = bumped = []
        for name, given in zip(UPDATED, _take_updated(a)):
            if given is None:
                continue
            update = name in updated
            if in_place and update:
                bumped.append(given)
            if in_place and not separate and given.dim() == 1 and given.is_contiguous():
                # the kernels read and write the caller's own memory: nothing to hand back
                # (what Updated would do, without making one on every call)
                reads[name] = given
                if update:
                    writes[name] = given
            else:
                u = items[name] = Updated(given, update, in_place, name in _ACCUMULATED,
                                          separate)
                reads[name], writes[name] = u.read, u.write

    def unchanged(self) -> None:
        """The kernels did not run (an empty batch): every new value is the old one."""
        for u in self.items.values():
            if u is not None:
                u.unchanged()

    def finish(self, written: Optional[torch.Tensor] = None) -> tuple:
        """The ``new_<name>`` outputs, in UPDATED order (all None in place). In place, the
        kernels wrote the caller's memory behind autograd's back: the version counters of the
        tensors updated (and of ``written``, the input y went over) are bumped as an in-place
        op's would be, so that a tensor saved for backward and changed here still raises
        there."""
        items = self.items
        new = _NO_NEW if items == _NONE else tuple(
            [None if (u := items[name]) is None else u.finish() for name in UPDATED])
        if written is not None:
            self.bumped.append(written)
        if self.bumped:
            increment_version(self.bumped)
        return new
