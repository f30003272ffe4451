"""The KV block audit: reclaim block references that nothing live accounts for.

Every reference on a block of the pool has a holder: a live engine request (running,
waiting with blocks, or finished and held for export) or an entry of the engine's
`BlockLedger`, which records what a node holds outside requests (a decode node's
reservations, a prefill node's pins and pull buffers). Free blocks, including prefix-cached
ones waiting to be evicted, hold no reference and are never touched. A reference beyond what
the holders explain is a leak (a holder that went away without freeing) and the audit drops
it: the block returns to the free queue, keeping its prefix-cache hash if it has one. Fewer
references than holders (a double free waiting to happen) is reported and left alone.

The audit runs on the engine thread (`EngineWorker.run`), and every ledger entry is written
or removed inside the same engine call that allocates or frees its blocks. So the audit never
sees a block between its allocation and its record, such as a reservation whose answer is
still on its way to the conductor, and never reclaims what is legitimately held.
"""
from __future__ import annotations

import asyncio
import logging
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Hashable, Iterable, Iterator, Sequence

if TYPE_CHECKING:
    from engine.block_pool import BlockPool
    from engine.worker import EngineWorker

log = logging.getLogger(__name__)

DEFAULT_INTERVAL_S = 10.0


class BlockLedger:
    """Block lists a node holds outside engine requests, by key (e.g. ``("reservation", id)``).
    Touched only on the engine thread, in the same call that allocates or frees the blocks."""

    def __init__(self) -> None:
        self._held: dict[Hashable, list[int]] = {}

    def __contains__(self, key: Hashable) -> bool:
        return key in self._held

    def __len__(self) -> int:
        return len(self._held)

    def __iter__(self) -> Iterator[list[int]]:
        return iter(list(self._held.values()))

    @property
    def num_blocks(self) -> int:
        return sum(len(b) for b in self._held.values())

    def hold(self, key: Hashable, blocks: Sequence[int]) -> None:
        if key in self._held:
            raise KeyError(f"{key!r} already holds blocks")
        self._held[key] = list(blocks)

    def take(self, key: Hashable) -> list[int] | None:
        """The blocks held under `key`, no longer recorded here; None if none are."""
        return self._held.pop(key, None)


@dataclass(frozen=True, slots=True)
class AuditReport:
    reclaimed: dict[int, int]  # block -> leaked references dropped
    short: dict[int, int]  # block -> references missing (more holders than references)

    @property
    def num_reclaimed(self) -> int:
        """Blocks that had leaked references (each is now held exactly by its holders)."""
        return len(self.reclaimed)


def audit_pool(pool: BlockPool, holders: Iterable[Sequence[int]]) -> AuditReport:
    """Drop every reference on `pool`'s blocks beyond one per holder occurrence."""
    want: Counter[int] = Counter()
    for blocks in holders:
        want.update(blocks)
    reclaimed: dict[int, int] = {}
    short: dict[int, int] = {}
    for b in range(pool.num_blocks):
        extra = pool.ref_count(b) - want.get(b, 0)
        if extra > 0:
            pool.free([b] * extra)
            reclaimed[b] = extra
        elif extra < 0:
            short[b] = -extra
    return AuditReport(reclaimed, short)


def log_report(report: AuditReport, node: str) -> None:
    if report.reclaimed:
        log.warning("%s: block audit reclaimed %d leaked blocks (no live request, reservation or pin held them): %s",
                    node, report.num_reclaimed, sorted(report.reclaimed))
    if report.short:
        log.error("%s: block audit found %d blocks with fewer references than holders: %s", node,
                  len(report.short), sorted(report.short))


async def audit_periodically(worker: EngineWorker, interval_s: float, node: str,
                             on_report: Callable[[AuditReport], None] | None = None) -> None:
    """Audit `worker`'s engine every `interval_s` until cancelled; log and report each result."""
    while True:
        await asyncio.sleep(interval_s)
        try:
            report = await worker.run(lambda e: e.audit())
        except Exception:  # the audit must never take the node down
            log.exception("%s: block audit failed", node)
            continue
        log_report(report, node)
        if on_report is not None:
            on_report(report)
