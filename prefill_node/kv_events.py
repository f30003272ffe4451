"""The prefill node's KV event log: block hashes stored in / removed from its prefix cache,
numbered without gaps, fanned out to subscribers (the conductor's global prefix index).
Events of the KV tiers under the device region (engine/tiers: host, disk, and blocks this
node put to the cluster store) share the numbering and carry their tier. The events are the
block pool's own records (`engine.block_pool.KVEvent`), numbered here and queued in their
wire form (`proto.convert.kv_event_to_proto`), which the conductor turns back into them.

Events are produced on the engine thread (block pool listener); subscribers are asyncio
queues fed with `call_soon_threadsafe`. A new subscriber first gets a snapshot taken on the
engine thread, so nothing falls between the snapshot and the live stream.
"""
from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, replace

from engine.block_pool import CLEARED, STORED, KVEvent
from engine.engine import LLMEngine
from proto.convert import kv_event_to_proto


@dataclass(eq=False)
class _Subscriber:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue


class KVEventLog:
    def __init__(self, *, only_tier: str | None = None) -> None:
        """`only_tier`: publish that tier's events alone, after an empty snapshot (a decode
        node: "cluster", its write-back's puts)."""
        self.seq = 0
        self.only_tier = only_tier
        self._subs: list[_Subscriber] = []
        self._lock = threading.Lock()

    def on_event(self, event: KVEvent) -> None:
        """Block pool / tier manager listener (engine thread, tier I/O threads)."""
        if self.only_tier is not None and event.tier != self.only_tier:
            return
        with self._lock:
            self.seq += 1
            msg = kv_event_to_proto(replace(event, seq=self.seq))
            for s in self._subs:
                s.loop.call_soon_threadsafe(s.queue.put_nowait, msg)

    def subscribe(self, engine: LLMEngine, loop: asyncio.AbstractEventLoop) -> _Subscriber:
        """Run on the engine thread: queue a snapshot, then every later event."""
        sub = _Subscriber(loop, asyncio.Queue())
        with self._lock:
            device = () if self.only_tier is not None else tuple(engine.pool.cached_hashes())
            snap = [KVEvent(CLEARED, seq=self.seq), KVEvent(STORED, device, seq=self.seq)]
            tiers = engine.tiers
            if tiers is not None and self.only_tier is None:  # then each tier below, in the snapshot (same seq)
                snap.append(KVEvent(STORED, tuple(tiers.host.hashes()), tier="host", seq=self.seq))
                if tiers.disk is not None:
                    snap.append(KVEvent(STORED, tuple(tiers.disk.hashes()), tier="disk", seq=self.seq))
            for ev in snap:
                loop.call_soon_threadsafe(sub.queue.put_nowait, kv_event_to_proto(ev))
            self._subs.append(sub)
        return sub

    def unsubscribe(self, sub: _Subscriber) -> None:
        with self._lock:
            if sub in self._subs:
                self._subs.remove(sub)


async def stream_events(worker, events: KVEventLog):
    """The `KVEvents` RPC's stream: subscribe on the engine thread, then yield every event
    until the caller goes away."""
    loop = asyncio.get_running_loop()
    sub = await worker.run(lambda e: events.subscribe(e, loop), lambda e, got: events.unsubscribe(got))
    try:
        while True:
            yield await sub.queue.get()
    finally:
        events.unsubscribe(sub)

