"""Blocks a node holds for a peer for a limited time: a decode node's reservations (until the
prefill's KV has landed and Decode claims them), a prefill node's pins (while a peer reads
them). Used from the node's event loop; the timers are asyncio's."""
from __future__ import annotations

import asyncio
from typing import Callable

MIN_LEASE_S = 0.1


class BlockLeases:
    """Block lists held under a key: each is handed to `on_expire(key, blocks)` unless it is
    taken or renewed before its lease runs out."""

    def __init__(self, on_expire: Callable[[str, list[int]], None]) -> None:
        self._on_expire = on_expire
        self._held: dict[str, tuple[list[int], asyncio.TimerHandle]] = {}

    def __contains__(self, key: str) -> bool:
        return key in self._held

    @property
    def num_blocks(self) -> int:
        return sum(len(blocks) for blocks, _ in self._held.values())

    def grant(self, key: str, blocks: list[int], lease_s: float) -> None:
        self._held[key] = (blocks, self._timer(key, lease_s))

    def renew(self, key: str, lease_s: float) -> bool:
        """Restart the lease of `key` from now; False if it is not held (taken or expired)."""
        entry = self._held.get(key)
        if entry is None:
            return False
        entry[1].cancel()
        self._held[key] = (entry[0], self._timer(key, lease_s))
        return True

    def expire_all(self) -> int:
        """Expire every lease now (`on_expire` for each, as if its time ran out); returns
        how many blocks were held."""
        n = 0
        for key in list(self._held):
            blocks, timer = self._held.pop(key)
            timer.cancel()
            n += len(blocks)
            self._on_expire(key, blocks)
        return n

    def take(self, key: str) -> list[int] | None:
        """The blocks held under `key`, no longer leased; None if not held."""
        entry = self._held.pop(key, None)
        if entry is None:
            return None
        entry[1].cancel()
        return entry[0]

    def _timer(self, key: str, lease_s: float) -> asyncio.TimerHandle:
        return asyncio.get_running_loop().call_later(max(lease_s, MIN_LEASE_S), self._expire, key)

    def _expire(self, key: str) -> None:
        entry = self._held.pop(key, None)
        if entry is not None:
            self._on_expire(key, entry[0])
