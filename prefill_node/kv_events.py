"""The prefill node's KV event log: block hashes stored in / removed from its prefix cache,
numbered without gaps, fanned out to subscribers (the conductor's global prefix index).
Events of the KV tiers under the device region (engine/tiers: host, disk, and blocks this
node put to the cluster store) share the numbering and carry their tier.

Events are produced on the engine thread (block pool listener); subscribers are asyncio
queues fed with `call_soon_threadsafe`. A new subscriber first gets a snapshot taken on the
engine thread, so nothing falls between the snapshot and the live stream.
"""
from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass

from engine.block_pool import KVEvent
from engine.engine import LLMEngine
from proto.halfmoon.v1 import node_pb2

_KINDS = {"stored": node_pb2.KV_EVENT_STORED, "removed": node_pb2.KV_EVENT_REMOVED}


@dataclass(eq=False)
class _Subscriber:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue


class KVEventLog:
    def __init__(self) -> None:
        self.seq = 0
        self._subs: list[_Subscriber] = []
        self._lock = threading.Lock()

    def on_event(self, event: KVEvent) -> None:
        """Block pool listener (engine thread)."""
        with self._lock:
            self.seq += 1
            msg = node_pb2.KVEvent(seq=self.seq, kind=_KINDS[event.kind], block_hashes=list(event.block_hashes),
                                   tier="" if event.tier == "device" else event.tier)
            for s in self._subs:
                s.loop.call_soon_threadsafe(s.queue.put_nowait, msg)

    def subscribe(self, engine: LLMEngine, loop: asyncio.AbstractEventLoop) -> _Subscriber:
        """Run on the engine thread: queue a snapshot, then every later event."""
        sub = _Subscriber(loop, asyncio.Queue())
        with self._lock:
            snap = [node_pb2.KVEvent(seq=self.seq, kind=node_pb2.KV_EVENT_CLEARED),
                    node_pb2.KVEvent(seq=self.seq, kind=node_pb2.KV_EVENT_STORED,
                                     block_hashes=engine.pool.cached_hashes())]
            tiers = engine.tiers
            if tiers is not None:  # then each tier below, as part of the snapshot (same seq)
                snap.append(node_pb2.KVEvent(seq=self.seq, kind=node_pb2.KV_EVENT_STORED,
                                             block_hashes=tiers.host.hashes(), tier="host"))
                if tiers.disk is not None:
                    snap.append(node_pb2.KVEvent(seq=self.seq, kind=node_pb2.KV_EVENT_STORED,
                                                 block_hashes=tiers.disk.hashes(), tier="disk"))
            for m in snap:
                loop.call_soon_threadsafe(sub.queue.put_nowait, m)
            self._subs.append(sub)
        return sub

    def unsubscribe(self, sub: _Subscriber) -> None:
        with self._lock:
            if sub in self._subs:
                self._subs.remove(sub)
