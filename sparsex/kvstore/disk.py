"""``DiskTier``: one file per entry in a folder, LRU within a byte budget, kept across restarts.

    <path>/sparsex%3A%7B3f9c...%7D%3Ae3b0....kv     file name = percent-encoded key + ".kv"
    <path>/.<name>.<pid>.<thread>.tmp              a write in progress (renamed when complete)

Invariants:
- A ``.kv`` file is always complete: writes go to a temp file in the same folder and are renamed
  over the target (atomic on POSIX), so a crash leaves at worst a ``.tmp`` file, removed at start.
- The in-memory index (key -> size, least recently used first) sums to ``num_bytes`` <= ``max_bytes``
  after every ``put``; a value larger than the budget is not stored.
- A file's mtime is its last access (set on every hit), so reopening the folder restores the LRU
  order by sorting on mtime.

One process owns a folder at a time; another process's writes are seen only after it reopens.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from urllib.parse import quote, unquote

from sparsex.kvstore.metrics import StoreMetrics
from sparsex.kvstore.tiers import FaultLog

_SUFFIX = ".kv"
_TMP_SUFFIX = ".tmp"
_MAX_NAME = 250  # most file systems cap a name at 255 bytes


class DiskTier:
    """Entries as files under ``path``, at most ``max_bytes`` in total, least recently used evicted."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        max_bytes: int,
        *,
        fsync: bool = False,
        metrics: StoreMetrics | None = None,
        name: str = "disk",
        on_evict: Callable[[str], None] | None = None,
    ) -> None:
        """fsync: flush each file to the device before renaming it (survives power loss, slower).
        on_evict: told of each key evicted to stay within the budget (with the tier's lock held:
        it must not call back into the tier)."""
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        self.name = name
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.fsync = fsync
        self.metrics = metrics if metrics is not None else StoreMetrics()
        self.on_evict = on_evict
        self._faults = FaultLog(name, f"at {self.path}")
        self._lock = threading.Lock()
        self._index: OrderedDict[str, int] = OrderedDict()  # key -> size, LRU first
        self._num_bytes = 0
        self.path.mkdir(parents=True, exist_ok=True)
        self._rebuild_index()

    @property
    def num_bytes(self) -> int:
        """Bytes of all stored values."""
        return self._num_bytes

    def keys(self) -> list[str]:
        """Stored keys, least recently used first."""
        with self._lock:
            return list(self._index)

    def contains(self, key: str) -> bool:
        return key in self._index

    def _file(self, key: str) -> Path:
        name = quote(key, safe="") + _SUFFIX
        if len(name) > _MAX_NAME:
            raise ValueError(f"key too long for a file name ({len(name)} chars encoded): {key[:40]}...")
        return self.path / name

    def _rebuild_index(self) -> None:
        found: list[tuple[float, str, int]] = []
        for entry in os.scandir(self.path):
            if entry.name.endswith(_TMP_SUFFIX):  # an interrupted write
                Path(entry.path).unlink(missing_ok=True)
            elif entry.name.endswith(_SUFFIX) and entry.is_file():
                st = entry.stat()
                found.append((st.st_mtime, unquote(entry.name[: -len(_SUFFIX)]), st.st_size))
        for _, key, size in sorted(found):
            self._index[key] = size
            self._num_bytes += size
        self._unlink(self._evict_over_budget())

    def _evict_over_budget(self) -> list[str]:
        """Pop least recently used keys until within budget (lock held); the caller unlinks them."""
        victims = []
        while self._num_bytes > self.max_bytes and self._index:
            key, size = self._index.popitem(last=False)
            self._num_bytes -= size
            victims.append(key)
            if self.on_evict is not None:
                self.on_evict(key)
        return victims

    def _unlink(self, keys: list[str]) -> None:
        """Remove files (lock held: unlink is a quick metadata change, and a put cannot interleave)."""
        for key in keys:
            try:
                self._file(key).unlink(missing_ok=True)
            except OSError as err:
                self.metrics.error(self.name, "evict")
                self._faults.failed(err)

    def _forget_missing(self, key: str) -> None:
        with self._lock:
            if key in self._index and not self._file(key).exists():
                self._num_bytes -= self._index.pop(key)

    def get(self, key: str) -> bytes | None:
        with self._lock:
            if key not in self._index:
                return None
            self._index.move_to_end(key)
        path = self._file(key)
        try:
            data = path.read_bytes()
        except FileNotFoundError:  # removed behind our back, or evicted by a concurrent put
            self._forget_missing(key)
            return None
        except OSError as err:
            self.metrics.error(self.name, "get")
            self._faults.failed(err)
            return None
        try:
            os.utime(path)  # mtime = last access, so a reopen restores the LRU order
        except OSError:
            pass
        return data

    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        """``get`` of each key (a missing key costs one dict lookup, no file system call)."""
        return [self.get(key) if key in self._index else None for key in keys]

    def put(self, key: str, value: bytes) -> bool:
        """Store ``value`` (replacing any old one), evicting LRU files; False if not stored."""
        if len(value) > self.max_bytes:
            return False
        path = self._file(key)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}{_TMP_SUFFIX}")
        try:
            with open(tmp, "wb") as f:
                f.write(value)
                if self.fsync:
                    f.flush()
                    os.fsync(f.fileno())
        except OSError as err:  # disk full, read-only, permissions
            return self._write_failed(tmp, err)
        with self._lock:  # rename and index change together, so an eviction cannot interleave
            try:
                os.replace(tmp, path)
            except OSError as err:
                return self._write_failed(tmp, err)
            old = self._index.pop(key, None)
            self._num_bytes += len(value) - (old or 0)
            self._index[key] = len(value)
            self._unlink(self._evict_over_budget())
        self._faults.succeeded()
        return True

    def _write_failed(self, tmp: Path, err: OSError) -> bool:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        self.metrics.error(self.name, "put")
        self._faults.failed(err)
        return False

    def delete(self, key: str) -> None:
        with self._lock:
            size = self._index.pop(key, None)
            if size is not None:
                self._num_bytes -= size
            self._unlink([key])

    def close(self) -> None:
        """Nothing to release: every write is complete when ``put`` returns."""
