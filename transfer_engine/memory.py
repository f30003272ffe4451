"""Registered memory: turning tensors and buffers into byte regions, POSIX shared-memory
segments, and the table a receiver checks every request against."""

from __future__ import annotations

import mmap
import os
import secrets
import socket
import sys
import threading
from dataclasses import dataclass

import numpy as np

from .errors import RegistrationError
from .records import RegionId, RegionInfo

SHM_DIR = "/dev/shm"


def shm_supported() -> bool:
    return sys.platform.startswith("linux") and os.path.isdir(SHM_DIR)


def host_id() -> str:
    """Equal on two processes that see the same kernel and the same /dev/shm mount."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = "no-boot-id"
    shm_dev = os.stat(SHM_DIR).st_dev if shm_supported() else -1
    return f"{socket.gethostname()}/{boot}/{shm_dev}"


def byte_array(obj: object) -> tuple[np.ndarray, bool]:
    """A flat uint8 numpy view sharing `obj`'s memory, and whether it is read-only.

    Accepts CPU torch tensors, numpy arrays and any contiguous buffer (bytearray, mmap,
    memoryview, bytes). Never copies."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(obj, torch.Tensor):
        if obj.device.type != "cpu":
            raise RegistrationError(f"only CPU tensors can be registered, not a tensor on {obj.device}")
        if not obj.is_contiguous():
            raise RegistrationError(f"tensor of shape {tuple(obj.shape)} is not contiguous; register .contiguous() memory")
        arr = obj.detach().reshape(-1).view(torch.uint8).numpy()
        return arr, False
    if isinstance(obj, np.ndarray):
        if not obj.flags.c_contiguous:
            raise RegistrationError(f"numpy array of shape {obj.shape} is not C-contiguous")
        return obj.reshape(-1).view(np.uint8), not obj.flags.writeable
    try:
        view = memoryview(obj)  # type: ignore[arg-type]
    except TypeError as exc:
        raise RegistrationError(f"cannot register a {type(obj).__name__}: it exposes no buffer") from exc
    if not view.c_contiguous:
        raise RegistrationError(f"cannot register a non-contiguous {type(obj).__name__} buffer")
    arr = np.frombuffer(view.cast("B"), dtype=np.uint8)
    return arr, view.readonly


SHM_PREFIX = "hm-te"


def shm_visible(name: str, size: int) -> str | None:
    """Why a peer's segment cannot be mapped from here, or None when it can."""
    try:
        actual = os.stat(ShmSegment._path(name)).st_size
    except (OSError, ValueError) as exc:
        return f"its segment {name} is not visible here ({exc})"
    if actual < size:
        return f"its segment {name} has {actual} bytes, {size} announced"
    return None


def sweep_stale_segments() -> list[str]:
    """Unlink segments whose creating process is gone (it was killed before it could
    unlink them). Names carry the creator's pid: `hm-te-<segment>-<pid>-<random>`."""
    if not shm_supported():
        return []
    removed = []
    for name in os.listdir(SHM_DIR):
        if not name.startswith(SHM_PREFIX + "-"):
            continue
        parts = name.rsplit("-", 2)
        if len(parts) != 3 or not parts[1].isdigit():
            continue
        try:
            os.kill(int(parts[1]), 0)
        except ProcessLookupError:
            unlink_segment(name)
            removed.append(name)
        except PermissionError:
            pass  # alive, owned by another user
    return removed


class ShmSegment:
    """A POSIX shared-memory segment mapped into this process.

    The creator unlinks the name when its engine closes; the mapping itself lives as
    long as any array viewing it."""

    def __init__(self, name: str, size: int, buffer: mmap.mmap, owner: bool) -> None:
        self.name = name
        self.size = size
        self.buffer = buffer
        self.array = np.frombuffer(buffer, dtype=np.uint8, count=size)
        self.view = memoryview(self.array)
        self.owner = owner

    @staticmethod
    def _path(name: str) -> str:
        if "/" in name or not name:
            raise ValueError(f"invalid shared-memory name {name!r}")
        return os.path.join(SHM_DIR, name)

    @classmethod
    def create(cls, prefix: str, size: int) -> ShmSegment:
        if size <= 0:
            raise RegistrationError(f"cannot allocate {size} bytes of shared memory")
        name = f"{prefix}-{os.getpid()}-{secrets.token_hex(6)}"
        fd = os.open(cls._path(name), os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, size)
            buf = mmap.mmap(fd, size, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE)
        except BaseException:
            os.unlink(cls._path(name))
            raise
        finally:
            os.close(fd)
        return cls(name, size, buf, owner=True)

    @classmethod
    def attach(cls, name: str, size: int) -> ShmSegment:
        """Map a peer's segment; raises OSError when it is not visible from here."""
        fd = os.open(cls._path(name), os.O_RDWR)
        try:
            actual = os.fstat(fd).st_size
            if actual < size:
                raise OSError(f"shared-memory segment {name} has {actual} bytes, its peer announced {size}")
            buf = mmap.mmap(fd, size, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE)
        finally:
            os.close(fd)
        return cls(name, size, buf, owner=False)

    def unlink(self) -> None:
        """Remove the name (the creator's job); existing mappings stay valid."""
        unlink_segment(self.name)


def unlink_segment(name: str) -> None:
    """Remove a segment's name; idempotent."""
    try:
        os.unlink(ShmSegment._path(name))
    except FileNotFoundError:
        pass  # already unlinked: nothing left to do


@dataclass(eq=False)
class LocalRegion:
    """A region registered with this engine."""

    id: RegionId
    array: np.ndarray  # flat uint8 view of the registered memory
    readonly: bool
    owner: object  # keeps the registered object (or shm segment) alive
    shm: ShmSegment | None = None

    def __post_init__(self) -> None:
        self.view = memoryview(self.array)
        self.size = int(self.array.nbytes)  # read by every bounds check: not a numpy lookup each time

    @property
    def addr(self) -> int:
        return int(self.array.ctypes.data)

    def info(self, with_addr: bool) -> RegionInfo:
        return RegionInfo(
            id=self.id,
            size=self.size,
            readonly=self.readonly,
            shm_name=self.shm.name if self.shm is not None else None,
            addr=self.addr if with_addr else None,
        )


class RegionTable:
    """Thread-safe id -> region map with the bounds checks every request goes through."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._regions: dict[int, LocalRegion] = {}
        self._next_id = 1

    def add(self, array: np.ndarray, readonly: bool, owner: object, shm: ShmSegment | None = None) -> LocalRegion:
        if array.nbytes == 0:
            raise RegistrationError("cannot register an empty buffer")
        with self._lock:
            region = LocalRegion(RegionId(self._next_id), array, readonly, owner, shm)
            self._next_id += 1
            self._regions[region.id] = region
        return region

    def remove(self, region_id: int) -> LocalRegion | None:
        with self._lock:
            return self._regions.pop(region_id, None)

    def get(self, region_id: int) -> LocalRegion | None:
        return self._regions.get(region_id)

    def all(self) -> list[LocalRegion]:
        with self._lock:
            return list(self._regions.values())

    def check(self, region_id: int, offset: int, length: int, *, writing: bool) -> tuple[LocalRegion | None, str | None]:
        """(region, None) when [offset, offset+length) may be accessed, else (None, why not)."""
        region = self._regions.get(region_id)
        if region is None:
            return None, f"unknown region {region_id}"
        problem = range_problem(region.size, region_id, offset, length, writing=writing, readonly=region.readonly)
        return (None, problem) if problem else (region, None)


def range_problem(size: int, region_id: int, offset: int, length: int, *, writing: bool, readonly: bool) -> str | None:
    """Why [offset, offset+length) of a region may not be accessed, or None when it may."""
    if length <= 0:
        return f"length {length} must be positive"
    if offset < 0 or offset + length > size:
        return f"range [{offset}, {offset + length}) is out of bounds of region {region_id} ({size} bytes)"
    if writing and readonly:
        return f"region {region_id} is read-only"
    return None
