"""Turning a caller's batch entries into validated pieces: local checks (raised at
submit time), coalescing of adjacent entries, and the check of the whole batch against
the peer's descriptor (so a batch the peer would refuse touches none of its memory)."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .errors import InvalidTransfer
from .memory import RegionTable, range_problem
from .records import PeerDescriptor, Region, RegionId, TransferOp
from .transport import Piece


def resolve(op: TransferOp, regions: RegionTable, segment: str, peer_segment: str, entry: Sequence[object]) -> Piece:
    """One entry (local_region, local_offset, remote_region, remote_offset, length) as a
    Piece; InvalidTransfer when it is malformed or wrong on our side."""
    try:
        local_ref, local_offset, remote_ref, remote_offset, length = entry
    except (TypeError, ValueError) as exc:
        raise InvalidTransfer(f"a batch entry is (local_region, local_offset, remote_region, remote_offset, "
                              f"length), not {entry!r}") from exc
    local_id = _region_id(local_ref, segment, "local")
    remote_id = _region_id(remote_ref, peer_segment, "remote")
    if not (type(local_offset) is int and type(remote_offset) is int and type(length) is int):
        local_offset, remote_offset, length = _int(local_offset), _int(remote_offset), _int(length)
    local = regions.get(local_id)
    if local is None:
        raise InvalidTransfer(f"unknown local region {local_id} in engine {segment!r}")
    problem = range_problem(local.size, local_id, local_offset, length,
                            writing=op is TransferOp.READ, readonly=local.readonly)
    if problem:
        raise InvalidTransfer(f"local {problem}")
    if remote_offset < 0:
        raise InvalidTransfer(f"remote offset {remote_offset} is negative")
    return Piece(local, local_offset, RegionId(remote_id), remote_offset, length)


def coalesce(pieces: list[Piece]) -> list[Piece]:
    """Merge neighbouring entries that are contiguous on both sides into one."""
    merged: list[Piece] = []
    for piece in pieces:
        last = merged[-1] if merged else None
        if (last is not None and last.local is piece.local and last.remote_id == piece.remote_id
                and last.local_offset + last.length == piece.local_offset
                and last.remote_offset + last.length == piece.remote_offset):
            merged[-1] = Piece(last.local, last.local_offset, last.remote_id, last.remote_offset,
                               last.length + piece.length)
        else:
            merged.append(piece)
    return merged


def unknown_regions(descriptor: PeerDescriptor, pieces: list[Piece]) -> bool:
    return any(descriptor.region(p.remote_id) is None for p in pieces)


def remote_check(op: TransferOp, descriptor: PeerDescriptor, pieces: list[Piece]) -> tuple[str | None, bool]:
    """(why the peer would refuse the batch, judged by its descriptor, or None; whether
    every destination region is in shared memory), in one pass."""
    in_shm = True
    writing = op is TransferOp.WRITE
    for piece in pieces:
        info = descriptor.region(piece.remote_id)
        if info is None:
            return f"unknown region {piece.remote_id}", False
        problem = range_problem(info.size, info.id, piece.remote_offset, piece.length,
                                writing=writing, readonly=info.readonly)
        if problem is not None:
            return problem, False
        in_shm = in_shm and info.shm_name is not None
    return None, in_shm


def _region_id(ref: object, segment: str, side: str) -> int:
    if type(ref) is int:
        return ref
    if isinstance(ref, Region):
        if ref.segment and ref.segment != segment:
            raise InvalidTransfer(f"{side} region {ref.id} belongs to {ref.segment!r}, not {segment!r}")
        return int(ref.id)
    if isinstance(ref, (int, np.integer)) and not isinstance(ref, bool):
        return int(ref)
    raise InvalidTransfer(f"{side} region must be a Region or an int id, not {ref!r}")


def _int(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise InvalidTransfer(f"offsets and lengths must be integers, not {value!r}")
    return int(value)
