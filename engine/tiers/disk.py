"""The local disk tier: one file per block record under the cache directory, LRU, bounded.

A block's file is ``<dir>/<hash as 16 hex digits>.kv`` holding exactly one block record
(`engine/tiers/record.py`). Writes go to ``.tmp`` and are renamed into place, so a file that
exists is complete unless something outside damaged it; every read checks the record's
magic, hash, token ids and checksum, and a file that fails (truncated, corrupted, another
block's) is deleted and reported as a miss: the block is recomputed, never used.

Capacity counts committed files plus writes in flight, so the directory never holds more
than `capacity` blocks. At start the directory is scanned: complete-sized files are indexed
(oldest first by modification time, trimmed to capacity), leftovers are removed, so the
tier survives a node restart. The directory should belong to one model and KV layout: the
tier manager puts it under a fingerprint of both. One process owns a directory at a time
(an flock on ``.lock``): a second one (two clusters on one machine with the same node
names) gets a private ``<dir>-<pid>`` instead, deleted when it closes.
"""
from __future__ import annotations

import fcntl
import os
import shutil
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Sequence

import numpy as np

from engine.tiers.record import problem


def _name(h: int) -> str:
    return f"{h:016x}.kv"


class DiskTier:
    def __init__(self, directory: Path, capacity: int, record_bytes: int, block_bytes: int) -> None:
        if capacity <= 0:
            raise ValueError(f"the disk tier needs room for at least one block, got {capacity}")
        self.dir, self._lock_fd, self._private = self._claim(Path(directory))
        self.capacity = capacity
        self.record_bytes = record_bytes
        self.block_bytes = block_bytes
        self._lock = threading.Lock()
        self._index: OrderedDict[int, None] = OrderedDict()  # committed files, least recently used first
        self._writing: set[int] = set()
        self.high_water = 0
        self.corrupt = 0  # records that failed their check on read (deleted, recomputed)
        self.write_errors = 0
        self.evicted: list[int] = []  # hashes dropped for room since the last `take_evicted()`
        self._scan()

    @staticmethod
    def _claim(directory: Path) -> tuple[Path, int, bool]:
        for path, private in ((directory, False), (directory.with_name(f"{directory.name}-{os.getpid()}"), True)):
            path.mkdir(parents=True, exist_ok=True)
            fd = os.open(path / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return path, fd, private
            except OSError:
                os.close(fd)
        raise RuntimeError(f"cannot lock a disk-tier directory at {directory}")

    def close(self) -> None:
        """Release the directory (and delete it if it was a private one)."""
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1
            if self._private:
                shutil.rmtree(self.dir, ignore_errors=True)

    def _scan(self) -> None:
        found = []
        for p in self.dir.iterdir():
            if p.suffix == ".tmp":
                p.unlink(missing_ok=True)
                continue
            if p.suffix != ".kv":
                continue
            try:
                h = int(p.stem, 16)
                st = p.stat()
            except (ValueError, OSError):
                continue
            if st.st_size != self.record_bytes:
                p.unlink(missing_ok=True)
                continue
            found.append((st.st_mtime_ns, h))
        found.sort()
        for _, h in found[max(0, len(found) - self.capacity):]:
            self._index[h] = None
        for _, h in found[: max(0, len(found) - self.capacity)]:
            (self.dir / _name(h)).unlink(missing_ok=True)

    # --- observation ----------------------------------------------------------------
    def contains(self, h: int) -> bool:
        with self._lock:
            return h in self._index

    @property
    def num_cached(self) -> int:
        with self._lock:
            return len(self._index)

    @property
    def num_used(self) -> int:
        with self._lock:
            return len(self._index) + len(self._writing)

    def hashes(self) -> list[int]:
        with self._lock:
            return list(self._index)

    def take_evicted(self) -> list[int]:
        with self._lock:
            out, self.evicted = self.evicted, []
            return out

    # --- writes ---------------------------------------------------------------------
    def reserve(self, h: int) -> bool:
        """Room for block `h`'s file, evicting least recently used files; False when `h` is
        already stored or being written, or every place is a write in flight."""
        with self._lock:
            if h in self._index or h in self._writing:
                return False
            while len(self._index) + len(self._writing) >= self.capacity:
                if not self._index:
                    return False
                old, _ = self._index.popitem(last=False)
                (self.dir / _name(old)).unlink(missing_ok=True)
                self.evicted.append(old)
            self._writing.add(h)
            self.high_water = max(self.high_water, len(self._index) + len(self._writing))
            return True

    def write(self, h: int, record: np.ndarray | bytes | memoryview) -> bool:
        """Write a `reserve()`d block's record; False (and the place given back) on an I/O error."""
        path = self.dir / _name(h)
        tmp = path.with_suffix(".tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(memoryview(record))
            os.replace(tmp, path)
        except OSError:
            tmp.unlink(missing_ok=True)
            with self._lock:
                self._writing.discard(h)
                self.write_errors += 1
            return False
        with self._lock:
            self._writing.discard(h)
            self._index[h] = None
        return True

    # --- reads ----------------------------------------------------------------------
    def read_into(self, h: int, tokens: Sequence[int] | None, dst: np.ndarray) -> str | None:
        """Read block `h`'s record into `dst` (a record-sized uint8 array) and check it
        against `h` and `tokens`. None when it is good; else why not (a record that fails its
        check is deleted)."""
        with self._lock:
            if h not in self._index:
                return "not on disk"
            self._index.move_to_end(h)
        try:
            with open(self.dir / _name(h), "rb", buffering=0) as f:
                n = f.readinto(memoryview(dst))
                extra = f.read(1)
        except FileNotFoundError:
            return "evicted while being read"
        except OSError as e:
            self._drop(h)
            return f"read failed: {e}"
        if n != self.record_bytes or extra:
            bad = f"truncated: {n} of {self.record_bytes} bytes" if n != self.record_bytes else "longer than a record"
        else:
            bad = problem(dst, self.block_bytes, h, tokens)
        if bad is not None:
            with self._lock:
                self.corrupt += 1
            self._drop(h)
        return bad

    def _drop(self, h: int) -> None:
        with self._lock:
            if h in self._index:
                del self._index[h]
                (self.dir / _name(h)).unlink(missing_ok=True)
                self.evicted.append(h)

    def remove(self, h: int) -> None:
        self._drop(h)

    def clear(self) -> list[int]:
        """Delete every committed file; returns their hashes."""
        with self._lock:
            gone = list(self._index)
            self._index.clear()
        for h in gone:
            (self.dir / _name(h)).unlink(missing_ok=True)
        return gone

    def path_of(self, h: int) -> Path:
        return self.dir / _name(h)

    # --- accounting -----------------------------------------------------------------
    def problems(self) -> list[str]:
        """Broken invariants once no write is in flight: the files are the index, within capacity."""
        with self._lock:
            out = []
            if len(self._index) + len(self._writing) > self.capacity:
                out.append(f"{len(self._index)} files + {len(self._writing)} writes exceed capacity {self.capacity}")
            if self._writing:
                return out
            on_disk = {int(p.stem, 16) for p in self.dir.glob("*.kv")}
            if on_disk != set(self._index):
                out.append(f"files and index differ: {len(on_disk - set(self._index))} unindexed files, "
                           f"{len(set(self._index) - on_disk)} indexed blocks without a file")
            if any(self.dir.glob("*.tmp")):
                out.append("a .tmp file is left over")
            return out
