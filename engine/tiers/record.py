"""The block record every tier below the device stores: a KV block's bytes, then a trailer.

    [ payload: block_bytes of KV (every layer's K and V, the device block's exact bytes) ]
    [ trailer: magic "HMKV", version u16, token count u16, block hash u64, checksum u64,
               the block's token ids as int32 ]  (padded to a multiple of 64 bytes)

The checksum is xxh64 over the payload, then the trailer without the checksum field. The
payload sits at offset 0, so a host slot, a disk file and a store object are the same bytes
and move with one copy; a record read back is used only if its magic, hash, token ids and
checksum all match what the reader expects (a truncated or corrupted file fails this).
"""
from __future__ import annotations

import struct
from typing import Sequence

import numpy as np
import xxhash

MAGIC = b"HMKV"
VERSION = 1
_HEAD = struct.Struct("<4sHHQQ")  # magic, version, ntokens, hash, checksum
_ALIGN = 64


def trailer_bytes(block_size: int) -> int:
    return _HEAD.size + 4 * block_size


def record_bytes(block_bytes: int, block_size: int) -> int:
    n = block_bytes + trailer_bytes(block_size)
    return -(-n // _ALIGN) * _ALIGN


def _checksum(buf: np.ndarray, block_bytes: int, h: int, tokens_le: bytes) -> int:
    x = xxhash.xxh64()
    x.update(memoryview(buf[:block_bytes]))
    x.update(_HEAD.pack(MAGIC, VERSION, len(tokens_le) // 4, h, 0))
    x.update(tokens_le)
    return x.intdigest()


def seal(buf: np.ndarray, block_bytes: int, h: int, tokens: Sequence[int]) -> None:
    """Write the trailer of the record in `buf` (uint8, record-sized) whose payload is filled."""
    tok = np.asarray(tokens, dtype="<i4").tobytes()
    cs = _checksum(buf, block_bytes, h, tok)
    end = block_bytes + _HEAD.size
    buf[block_bytes:end] = np.frombuffer(_HEAD.pack(MAGIC, VERSION, len(tokens), h, cs), dtype=np.uint8)
    buf[end:end + len(tok)] = np.frombuffer(tok, dtype=np.uint8)


def problem(buf: np.ndarray, block_bytes: int, h: int, tokens: Sequence[int] | None) -> str | None:
    """Why the record in `buf` is not block `h` with `tokens` (None: tokens not checked),
    or None when it is."""
    magic, version, ntok, rh, cs = _HEAD.unpack_from(memoryview(buf[block_bytes:block_bytes + _HEAD.size]))
    if magic != MAGIC or version != VERSION:
        return "not a block record (bad magic or version)"
    if rh != h:
        return f"holds block {rh:016x}, not {h:016x}"
    start = block_bytes + _HEAD.size
    if start + 4 * ntok > buf.shape[0]:
        return f"token count {ntok} overruns the record"
    tok = bytes(buf[start:start + 4 * ntok])
    if tokens is not None and tok != np.asarray(tokens, dtype="<i4").tobytes():
        return "token ids differ from the block's"
    if _checksum(buf, block_bytes, h, tok) != cs:
        return "checksum mismatch"
    return None


def record_tokens(buf: np.ndarray, block_bytes: int) -> tuple[int, ...]:
    ntok = _HEAD.unpack_from(memoryview(buf[block_bytes:block_bytes + _HEAD.size]))[2]
    start = block_bytes + _HEAD.size
    return tuple(np.frombuffer(bytes(buf[start:start + 4 * ntok]), dtype="<i4").tolist())
