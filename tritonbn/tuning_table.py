"""The tuning table: measured best plans per (GPU, triton version, op, dtype, layout, alignment,
shape bucket), stored as JSON; read by the dispatcher, written by ``tritonbn tune``.

File format (``version`` 1)::

    {"format": "tritonbn-tuning-table", "version": 1,
     "entries": [{"gpu": "NVIDIA H100 80GB HBM3", "triton": "3.6.0", "op": "fwd_train",
                  "dtype": "float16", "layout": "nchw", "aligned": true, "bucket": [8, 6, 14],
                  "plan": {"variant": "split", "block_n": 1, "block_s": 4096, "block_c": 1,
                           "splits": 9, "num_warps": 8},
                  "shape": [256, 64, 112, 112], "memory_format": "contiguous",
                  "plane": [256, 64, 12544], "time_us": 812.0, "heuristic_us": 840.1, ...}, ...]}

``layout`` is the plane's memory order as the dispatcher sees it (``nhwc``: channels adjacent in
memory -- channels_last tensors, and 2-D (N, C) inputs; ``nchw``: one plane per channel), not the
caller's memory-format name, because that is all the dispatcher knows. The bucket is the plane's
(N, C, S) rounded to powers of two (log2). Lookups take the nearest bucket within
MAX_BUCKET_DISTANCE.

Where the table lives: ``$TRITONBN_TUNING_TABLE`` (``off`` disables lookups), else
``$XDG_CACHE_HOME/tritonbn/tuning.json`` (``~/.cache/tritonbn/tuning.json``). Smoke-mode tuning
(no GPU) writes ``tuning-smoke.json`` next to it, which the dispatcher never reads unless pointed
at it: interpreter timings must not change anyone's plans by accident.

Writes take an exclusive lock on ``<table>.lock``, re-read the file, merge, write a temporary
file in the same directory and ``os.replace`` it: readers see the old or the new table, never a
torn one, and concurrent tuners each keep their entries. A corrupt or foreign-version table is
reported with a ``TuningTableWarning`` and ignored by the dispatcher. Writing moves a corrupt
table aside (``<table>.corrupt-<time>``) and refuses -- TableError, before any sweep -- a path
that is a directory, unreadable, another JSON file or a table of another format version.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass, field

from .options import OPS


__all__ = ["FORMAT", "VERSION", "ENV", "TuningTableWarning", "TableError", "Table", "Hit",
           "cache_dir", "check_target",
           "default_path", "active_path", "bucket", "layout_key", "entry_key", "load",
           "merge_write", "lookup", "dispatch_table", "clear_cache", "triton_version"]

FORMAT = "tritonbn-tuning-table"
VERSION = 1
ENV = "TRITONBN_TUNING_TABLE"
OFF = ("off", "none", "0")
TABLE_NAME = "tuning.json"
SMOKE_TABLE_NAME = "tuning-smoke.json"

# Nearest bucket: at most this L1 distance in log2 units over (N, C, S), i.e. within 4x in one
# dimension or 2x in two. Tiling choices (tile shape vs plane, split count vs tile count) scale
# with these sizes; further away the heuristics, which look at the actual shape, are the better
# guess than a plan measured for another shape.
MAX_BUCKET_DISTANCE = 2

DTYPES_BY_SIZE = {2: ("float16", "bfloat16"), 4: ("float32",), 8: ("float64",)}
PLAN_FIELDS = ("variant", "block_n", "block_s", "block_c", "splits", "num_warps")


class TuningTableWarning(UserWarning):
    """A tuning table could not be used (corrupt, foreign version, stale triton version)."""


def triton_version() -> str:
    import triton
    return triton.__version__


def cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "tritonbn")


def default_path(smoke: bool = False) -> str:
    """Where ``tritonbn tune`` writes when no path is given."""
    env = os.environ.get(ENV, "")
    if env and env.lower() not in OFF and not smoke:
        return env
    return os.path.join(cache_dir(), SMOKE_TABLE_NAME if smoke else TABLE_NAME)


def active_path() -> str | None:
    """The table the dispatcher reads, or None when lookups are turned off."""
    env = os.environ.get(ENV, "")
    if env.lower() in OFF and env:
        return None
    return env or os.path.join(cache_dir(), TABLE_NAME)


def _log2_bucket(x: int) -> int:
    return max(0, round(math.log2(max(1, x))))


def bucket(n: int, c: int, s: int) -> tuple[int, int, int]:
    """The plane (N, C, S) in log2 units, rounded."""
    return _log2_bucket(n), _log2_bucket(c), _log2_bucket(s)


def layout_key(channels_minor: bool) -> str:
    return "nhwc" if channels_minor else "nchw"


def entry_key(e: dict) -> tuple:
    return (e["gpu"], e["triton"], e["op"], e["dtype"], e["layout"], bool(e["aligned"]),
            tuple(e["bucket"]))


def _is_pow2(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1 and v & (v - 1) == 0


def _entry_problem(e) -> str | None:
    """Why an entry is unusable, or None."""
    if not isinstance(e, dict):
        return "not an object"
    for k, typ in (("gpu", str), ("triton", str), ("op", str), ("dtype", str), ("layout", str),
                   ("aligned", bool), ("bucket", list), ("plan", dict)):
        if not isinstance(e.get(k), typ):
            return f"field {k!r} missing or not a {typ.__name__}"
    if e["op"] not in OPS or e["layout"] not in ("nchw", "nhwc"):
        return f"unknown op/layout {e['op']!r}/{e['layout']!r}"
    if len(e["bucket"]) != 3 or not all(isinstance(b, int) for b in e["bucket"]):
        return "bucket is not three integers"
    plan = e["plan"]
    if plan.get("variant") not in ("onepass", "split"):
        return f"unknown variant {plan.get('variant')!r}"
    if not all(_is_pow2(plan.get(k)) for k in ("block_n", "block_s", "block_c", "num_warps")):
        return "blocks and num_warps must be powers of two"
    if plan["num_warps"] > 32:  # 1024 threads: the most one program (CUDA block) may have
        return "num_warps above 32"
    if not isinstance(plan.get("splits"), int) or plan["splits"] < 1:
        return "splits must be a positive integer"
    # Informational fields, shown by `tritonbn info`: optional, but typed when present.
    if "shape" in e and not (isinstance(e["shape"], list)
                             and all(isinstance(d, int) for d in e["shape"])):
        return "shape is not a list of integers"
    for k in ("time_us", "heuristic_us"):
        if k in e and (isinstance(e[k], bool) or not isinstance(e[k], (int, float))):
            return f"{k} is not a number"
    return None


class TableError(Exception):
    """The file exists but is not a usable tuning table.

    ``kind``: "corrupt" (not JSON, or a tuning table whose structure is broken: safe to move
    aside and rebuild), "foreign" (some other JSON file, or another format version: never
    written over) or "unreadable" (a directory, no permission: never written over)."""

    def __init__(self, message: str, kind: str):
        super().__init__(message)
        self.kind = kind


def _read(path: str) -> list[dict] | None:
    """Entries of the table at ``path``; None when there is no file. Raises TableError."""
    if os.path.isdir(path):
        raise TableError("is a directory, not a table file", "unreadable")
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise TableError(f"cannot read: {e}", "unreadable")
    try:
        data = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise TableError(f"corrupt: {type(e).__name__}: {str(e)[:120]}", "corrupt")
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise TableError("not a tritonbn tuning table (no 'format': "
                         f"{FORMAT!r})", "foreign")
    if data.get("version") != VERSION:
        raise TableError(f"format version {data.get('version')!r}, this tritonbn reads "
                         f"version {VERSION}", "foreign")
    entries = data.get("entries")
    if not isinstance(entries, list):
        raise TableError("corrupt: 'entries' is not a list", "corrupt")
    return entries


@dataclass(frozen=True)
class Hit:
    """A table entry chosen for a plane."""
    path: str
    entry: dict
    distance: int           # L1 distance of the buckets, log2 units (0: same bucket)

    @property
    def plan(self) -> dict:
        return self.entry["plan"]

    def describe(self) -> str:
        e = self.entry
        where = "same bucket" if self.distance == 0 else f"nearest bucket, distance {self.distance}"
        shape = "x".join(map(str, e.get("shape") or [])) or "?"
        timing = ""
        if isinstance(e.get("time_us"), (int, float)) and isinstance(e.get("heuristic_us"),
                                                                         (int, float)):
            timing = f", {e['time_us']:.1f} us vs heuristic {e['heuristic_us']:.1f} us"
        return f"{where}; tuned on {shape} {e['dtype']}{timing}"


@dataclass
class Table:
    """A loaded table with an index for lookups. Empty when the file was missing or unusable."""
    path: str
    entries: list = field(default_factory=list)
    problem: str | None = None      # why the file was ignored, if it was

    def __post_init__(self):
        self._index: dict[tuple, list[dict]] = {}
        for e in self.entries:
            k = entry_key(e)
            self._index.setdefault(k[:6], []).append(e)

    def for_gpu(self, gpu: str, triton: str | None = None) -> list[dict]:
        return [e for e in self.entries if e["gpu"] == gpu
                and (triton is None or e["triton"] == triton)]

    def lookup(self, gpu: str, triton: str, op: str, dtypes, layout: str, aligned: bool,
               plane: tuple[int, int, int]) -> Hit | None:
        """The entry of the first dtype in ``dtypes`` that has one within MAX_BUCKET_DISTANCE."""
        want = bucket(*plane)
        for dtype in dtypes:
            group = self._index.get((gpu, triton, op, dtype, layout, aligned))
            if not group:
                continue
            # nearest bucket; ties go to the larger plane (its tiles are the safer upper bound)
            best = min(group, key=lambda e: (sum(abs(a - b) for a, b in zip(e["bucket"], want)),
                                             [-b for b in e["bucket"]]))
            dist = sum(abs(a - b) for a, b in zip(best["bucket"], want))
            if dist <= MAX_BUCKET_DISTANCE:
                return Hit(self.path, best, dist)
        return None


_warned: set = set()


def _warn_once(key, message: str) -> None:
    if key in _warned:
        return
    _warned.add(key)
    warnings.warn(message, TuningTableWarning, stacklevel=3)


def load(path: str, warn: bool = True) -> Table:
    """Read a table; a corrupt or foreign one gives a warning and an empty Table, never an error.
    Malformed entries are dropped (one warning counting them)."""
    try:
        raw = _read(path)
    except TableError as e:
        if warn:
            _warn_once(("ignored", path, str(e)),
                       f"tritonbn: tuning table {path} ignored ({e}); using heuristic plans. "
                       f"Re-run `tritonbn tune` to rebuild it.")
        return Table(path, [], str(e))
    if raw is None:
        return Table(path, [])
    good = [e for e in raw if _entry_problem(e) is None]
    if len(good) != len(raw) and warn:
        first = next(_entry_problem(e) for e in raw if _entry_problem(e) is not None)
        _warn_once(("entries", path, len(raw) - len(good)),
                   f"tritonbn: tuning table {path}: {len(raw) - len(good)} malformed entries "
                   f"ignored (e.g. {first})")
    return Table(path, good)


# ---------------------------------------------------------------------------- writing

_THREAD_LOCK = threading.Lock()


@contextlib.contextmanager
def _file_lock(path: str):
    """Exclusive lock on ``path + '.lock'`` for the whole read-merge-replace, across processes
    (flock is released by the kernel if a tuner dies) and threads (flock locks belong to open
    file descriptions, so two threads with their own descriptors exclude each other too)."""
    lock_path = path + ".lock"
    with _THREAD_LOCK:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                import fcntl
            except ImportError:  # Windows: msvcrt locks one byte, retrying for about 10 s
                import msvcrt
                msvcrt.locking(fd, msvcrt.LK_LOCK, 1)
                try:
                    yield
                finally:
                    os.lseek(fd, 0, os.SEEK_SET)
                    msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
                return
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)


def _atomic_write_json(path: str, data) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    try:  # keep the file's permissions (a shared table stays readable to its other users)
        mode = os.stat(path).st_mode & 0o777
    except FileNotFoundError:
        mode = 0o644
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tuning-", suffix=".tmp")
    try:
        os.chmod(tmp, mode)  # mkstemp creates 0600
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _aside_name(path: str) -> str:
    """A name for a corrupt table that no earlier one has: <path>.corrupt-<time>[-k]."""
    base = f"{path}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}"
    name, k = base, 1
    while os.path.lexists(name):
        name, k = f"{base}-{k}", k + 1
    return name


def _refuse_directory(path: str) -> None:
    if os.path.isdir(path):
        raise TableError(f"{path} is a directory; give the table's file name", "unreadable")


def check_target(path: str) -> None:
    """Raise TableError now if merge_write would refuse ``path`` (a directory, an unreadable
    file, some other JSON file, another format version): `tritonbn tune` asks before a sweep
    that can take hours, not after it."""
    _refuse_directory(path)
    try:
        _read(path)
    except TableError as e:
        if e.kind != "corrupt":
            raise TableError(f"{path}: {e}; not written over (choose another --table)",
                             e.kind) from None


def merge_write(path: str, new_entries: list[dict]) -> Table:
    """Merge entries into the table at ``path`` (same key: the new entry wins) under the lock and
    replace the file atomically. A corrupt table is moved aside to ``<path>.corrupt-<time>``
    with a warning; a path that is a directory, unreadable, some other JSON file or a table of
    another format version is left alone and TableError raised. Returns the table as written."""
    bad = [(_entry_problem(e), e) for e in new_entries if _entry_problem(e) is not None]
    if bad:
        raise ValueError(f"refusing to write a malformed tuning entry: {bad[0][0]}: {bad[0][1]}")
    _refuse_directory(path)  # before a lock file is made beside it (other refusals: below)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with _file_lock(path):
        try:
            current = _read(path) or []
        except TableError as e:
            if e.kind != "corrupt":
                raise TableError(f"{path}: {e}; not written over (choose another --table)",
                                 e.kind) from None
            aside = _aside_name(path)
            os.replace(path, aside)
            warnings.warn(f"tritonbn: tuning table {path} was unusable ({e}); moved to {aside} "
                          f"and started a new one", TuningTableWarning, stacklevel=2)
            current = []
        merged: dict[tuple, dict] = {}
        for e in current:
            if _entry_problem(e) is None:
                merged[entry_key(e)] = e
        for e in new_entries:
            merged[entry_key(e)] = e
        entries = sorted(merged.values(), key=lambda e: [str(k) for k in entry_key(e)])
        _atomic_write_json(path, {"format": FORMAT, "version": VERSION,
                                  "written": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                  "entries": entries})
    clear_cache()
    return Table(path, entries)


# ---------------------------------------------------------------------- dispatcher side

_loaded: dict[str, Table] = {}


def dispatch_table() -> Table | None:
    """The table the dispatcher consults, loaded once per process (``clear_cache`` reloads)."""
    path = active_path()
    if path is None:
        return None
    table = _loaded.get(path)
    if table is None:
        table = _loaded[path] = load(path)
    return table


def clear_cache() -> None:
    """Forget loaded tables (after a write, or when the environment changed)."""
    _loaded.clear()


def lookup(gpu: str, op: str, elem_bytes: int, dtype: str | None, channels_minor: bool,
           aligned: bool, plane: tuple[int, int, int]) -> Hit | None:
    """The tuned entry for this plane, or None. ``dtype`` (e.g. "float16") picks entries of that
    dtype first, then those of any other dtype of that size (float16 before bfloat16); without a
    dtype (`tritonbn info`), any dtype of that size."""
    table = dispatch_table()
    if table is None or not table.entries:
        return None
    sizes = DTYPES_BY_SIZE.get(elem_bytes, ())
    dtypes = ((dtype,) if dtype else ()) + tuple(d for d in sizes if d != dtype)
    triton = triton_version()
    hit = table.lookup(gpu, triton, op, dtypes, layout_key(channels_minor), aligned, plane)
    if hit is None and not table.for_gpu(gpu, triton) and table.for_gpu(gpu):
        others = sorted({e["triton"] for e in table.for_gpu(gpu)})
        _warn_once(("triton", table.path, gpu),
                   f"tritonbn: tuning table {table.path} has entries for {gpu} tuned with "
                   f"triton {', '.join(others)}, not {triton}: ignored (re-run `tritonbn tune`)")
    return hit
