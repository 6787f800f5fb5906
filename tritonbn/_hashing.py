"""Frozen dataclasses that key the hot path's caches hash their fields once."""
from __future__ import annotations

import dataclasses

__all__ = ["cached_hash"]


def cached_hash(cls):
    """Class decorator for a frozen dataclass: hash its fields on first use and keep the value.
    Options, plans, plane views and device descriptions key lru_caches on every call; a
    generated dataclass __hash__ re-hashes every field (nested tuples included) each time."""
    names = tuple(f.name for f in dataclasses.fields(cls))

    def __hash__(self) -> int:
        try:
            return self.__dict__["_hash"]
        except KeyError:
            h = self.__dict__["_hash"] = hash(tuple(getattr(self, n) for n in names))
            return h

    cls.__hash__ = __hash__
    return cls
