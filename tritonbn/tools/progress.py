"""A plain-text progress bar (no dependency): redrawn in place on a terminal, one line per 10%
otherwise (logs and captured output stay short)."""
from __future__ import annotations

import sys
import time

__all__ = ["Progress"]


class Progress:
    def __init__(self, total: int, label: str = "", stream=None, width: int = 28,
                 enabled: bool = True):
        self.total, self.label, self.width, self.enabled = max(1, total), label, width, enabled
        self.stream = stream if stream is not None else sys.stderr
        self.done = 0
        self.start = time.perf_counter()
        self._tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._last_decile = -1

    def update(self, note: str = "", step: int = 1) -> None:
        self.done = min(self.total, self.done + step)
        if not self.enabled:
            return
        frac = self.done / self.total
        filled = int(frac * self.width)
        elapsed = time.perf_counter() - self.start
        eta = elapsed / frac - elapsed if frac > 0 else 0.0
        line = (f"{self.label} [{'#' * filled}{'.' * (self.width - filled)}] "
                f"{self.done}/{self.total} {elapsed:5.0f}s eta {eta:4.0f}s {note}")
        if self._tty:
            self.stream.write("\r" + line[:160].ljust(160))
            if self.done == self.total:
                self.stream.write("\n")
        else:
            decile = int(frac * 10)
            if decile == self._last_decile and self.done != self.total:
                return
            self._last_decile = decile
            self.stream.write(line + "\n")
        self.stream.flush()
