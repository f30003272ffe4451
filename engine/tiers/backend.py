"""The cluster store's backend interface, and an in-process fake of it for unit tests.

Four batched calls on registered memory (Mooncake Store's zero-copy API): `exists`,
`get_into` (copy objects into caller memory), `put_from` (copy caller memory into new
objects), `remove`. Results per key follow Mooncake's convention: `get_into` gives the
object's byte count or a negative error code, `put_from` and `remove` 0 or a negative code.
A put of a key that exists succeeds and keeps the object. Any call may also raise (a dead
connection); the cluster tier treats that as a failure of every key in the call.
"""
from __future__ import annotations

import ctypes
import threading
from collections import OrderedDict
from typing import Protocol, Sequence

# Mooncake's codes for the cases the fake models (mooncake-store/include/types.h)
NO_AVAILABLE_HANDLE = -200  # no segment space for a new object
OBJECT_NOT_FOUND = -704
RPC_FAIL = -900


class StoreBackend(Protocol):
    name: str

    def register(self, address: int, length: int) -> None: ...

    def exists(self, keys: Sequence[str]) -> list[bool]: ...

    def get_into(self, keys: Sequence[str], addresses: Sequence[int], lengths: Sequence[int]) -> list[int]: ...

    def put_from(self, keys: Sequence[str], addresses: Sequence[int], lengths: Sequence[int]) -> list[int]: ...

    def remove(self, key: str) -> int: ...

    def close(self) -> None: ...


class FakeStore:
    """A store in this process: objects in a dict, a byte capacity, and switches for tests.

    When full a put fails (as Mooncake's does while the objects that would have to go are
    leased) unless `evict` is set, in which case the least recently used objects go: an
    `exists` that finds an object and a `get_into` refresh it, as they grant Mooncake's read
    lease (its eviction takes objects whose lease ran out, the earliest first), so a chain a
    caller has just looked up outlives objects nobody asked for since.
    `down` makes every call fail as a dead master's would; `fail_puts` fails that many puts.
    One instance may serve several tier managers (nodes) at once: it is the shared cluster.
    """

    name = "fake"

    def __init__(self, capacity_bytes: int = 1 << 30, *, evict: bool = False) -> None:
        self.capacity_bytes = capacity_bytes
        self.evict = evict
        self.down = False
        self.fail_puts = 0
        self._objects: OrderedDict[str, bytes] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.regions: list[tuple[int, int]] = []
        self.puts = self.gets = 0

    def _check_region(self, address: int, length: int) -> None:
        if not any(a <= address and address + length <= a + n for a, n in self.regions):
            raise ValueError(f"[{address:#x}, +{length}) is not in a registered buffer")

    def register(self, address: int, length: int) -> None:
        self.regions.append((address, length))

    def exists(self, keys: Sequence[str]) -> list[bool]:
        with self._lock:
            if self.down:
                raise ConnectionError("fake store is down")
            out = [k in self._objects for k in keys]
            for k, present in zip(keys, out):
                if present:
                    self._objects.move_to_end(k)
            return out

    def get_into(self, keys, addresses, lengths) -> list[int]:
        out = []
        with self._lock:
            if self.down:
                return [RPC_FAIL] * len(keys)
            for k, a, n in zip(keys, addresses, lengths):
                obj = self._objects.get(k)
                if obj is None:
                    out.append(OBJECT_NOT_FOUND)
                    continue
                if n < len(obj):
                    out.append(-600)  # buffer too small
                    continue
                self._check_region(a, len(obj))
                ctypes.memmove(a, obj, len(obj))
                self._objects.move_to_end(k)
                self.gets += 1
                out.append(len(obj))
        return out

    def put_from(self, keys, addresses, lengths) -> list[int]:
        out = []
        with self._lock:
            for k, a, n in zip(keys, addresses, lengths):
                if self.down:
                    out.append(RPC_FAIL)
                    continue
                if self.fail_puts > 0:
                    self.fail_puts -= 1
                    out.append(NO_AVAILABLE_HANDLE)
                    continue
                if k in self._objects:
                    out.append(0)
                    continue
                while self.evict and self._objects and self._bytes + n > self.capacity_bytes:
                    _, old = self._objects.popitem(last=False)
                    self._bytes -= len(old)
                if self._bytes + n > self.capacity_bytes:
                    out.append(NO_AVAILABLE_HANDLE)
                    continue
                self._check_region(a, n)
                self._objects[k] = ctypes.string_at(a, n)
                self._bytes += n
                self.puts += 1
                out.append(0)
        return out

    def remove(self, key: str) -> int:
        with self._lock:
            if self.down:
                return RPC_FAIL
            obj = self._objects.pop(key, None)
            if obj is None:
                return OBJECT_NOT_FOUND
            self._bytes -= len(obj)
            return 0

    def close(self) -> None:
        pass

    # --- for tests --------------------------------------------------------------------
    def keys(self) -> list[str]:
        with self._lock:
            return list(self._objects)

    def corrupt(self, key: str, offset: int = 0) -> None:
        with self._lock:
            b = bytearray(self._objects[key])
            b[offset] ^= 0xFF
            self._objects[key] = bytes(b)

    def clear(self) -> None:
        with self._lock:
            self._objects.clear()
            self._bytes = 0
