"""The conductor's live cluster view: nodes that registered, their last heartbeat, their
gRPC stubs, and the scheduler's view records (`conductor.view`) kept up to date.

A node that misses heartbeats for `heartbeat_timeout_s` is marked down: it leaves the
policy's view (healthy=False) and its `down` event fires, which ends the requests waiting
on it with an error instead of letting them hang.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

import grpc

from conductor.kv_events import BlockRemoved, BlockStored
from conductor.prefix_index import GlobalPrefixIndex
from conductor.request import BlockHash, NodeId
from conductor.view import ClusterView, DecodeNodeView, PrefillNodeView
from proto.halfmoon.v1 import node_pb2, node_pb2_grpc

log = logging.getLogger("halfmoon.conductor.registry")

ROLES = {node_pb2.ROLE_PREFILL: "prefill", node_pb2.ROLE_DECODE: "decode", node_pb2.ROLE_COLOCATED: "colocated"}


@dataclass(eq=False)
class NodeRecord:
    node_id: str
    role: str
    address: str
    layout: node_pb2.KVLayout
    metrics_address: str
    channel: grpc.aio.Channel
    prefill_stub: node_pb2_grpc.PrefillNodeStub | None  # prefill and colocated nodes
    decode_stub: node_pb2_grpc.DecodeNodeStub | None  # decode and colocated nodes
    descriptor: bytes = b""  # the node's transfer-engine descriptor
    last_seen: float = field(default_factory=time.monotonic)
    load: node_pb2.NodeLoad = field(default_factory=node_pb2.NodeLoad)
    up: bool = True
    down: asyncio.Event = field(default_factory=asyncio.Event)
    events_task: asyncio.Task | None = None
    prefill_view: PrefillNodeView | None = None
    decode_view: DecodeNodeView | None = None


class NodeRegistry:
    def __init__(self, block_size: int, heartbeat_interval_s: float = 1.0, heartbeat_timeout_s: float = 5.0,
                 on_change=None) -> None:
        self.block_size = block_size
        self.heartbeat_interval_s = heartbeat_interval_s
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.nodes: dict[str, NodeRecord] = {}
        self.index = GlobalPrefixIndex()
        self.view = ClusterView(prefill=[], decode=[], index=self.index, block_tokens=block_size)
        self._on_change = on_change or (lambda node, up: None)
        self._watchdog: asyncio.Task | None = None

    def start(self) -> None:
        self._watchdog = asyncio.get_running_loop().create_task(self._watch())

    async def close(self) -> None:
        if self._watchdog:
            self._watchdog.cancel()
        for rec in list(self.nodes.values()):
            await self._drop(rec)

    # --- registration & heartbeats ------------------------------------------------------
    async def register(self, req: node_pb2.RegisterRequest) -> NodeRecord:
        role = ROLES.get(req.role)
        if role is None:
            raise ValueError(f"role: unknown role {req.role}")
        if req.layout.block_size != self.block_size:
            raise ValueError(f"layout.block_size: node uses {req.layout.block_size}, cluster uses {self.block_size}")
        for other in self.nodes.values():
            if other.node_id != req.node_id and other.up and other.layout.block_bytes != req.layout.block_bytes:
                raise ValueError(f"layout.block_bytes: {req.layout.block_bytes} differs from {other.node_id}'s "
                                 f"{other.layout.block_bytes}: every node must run the same model")
        old = self.nodes.get(req.node_id)
        if old is not None:
            await self._drop(old)
        channel = grpc.aio.insecure_channel(req.address)
        does_prefill, does_decode = role in ("prefill", "colocated"), role in ("decode", "colocated")
        rec = NodeRecord(req.node_id, role, req.address, req.layout, req.metrics_address, channel,
                         node_pb2_grpc.PrefillNodeStub(channel) if does_prefill else None,
                         node_pb2_grpc.DecodeNodeStub(channel) if does_decode else None,
                         descriptor=req.transfer_descriptor)
        nid = NodeId(req.node_id)
        if does_prefill:
            rec.prefill_view = PrefillNodeView(nid)
            self.view.prefill.append(rec.prefill_view)
            rec.events_task = asyncio.get_running_loop().create_task(self._follow_kv_events(rec))
        if does_decode:
            rec.decode_view = DecodeNodeView(nid, kv_capacity_tokens=req.layout.total_blocks * req.layout.block_size)
            self.view.decode.append(rec.decode_view)
        self.nodes[req.node_id] = rec
        log.info("node %s (%s) registered at %s", req.node_id, role, req.address)
        self._on_change(rec, True)
        return rec

    def heartbeat(self, req: node_pb2.HeartbeatRequest) -> bool:
        rec = self.nodes.get(req.node_id)
        if rec is None or not rec.up:
            return False
        rec.last_seen = time.monotonic()
        rec.load = req.load
        if rec.decode_view is not None:
            dv = rec.decode_view
            dv.running = req.load.running
            dv.waiting = req.load.waiting
            dv.tokens_in_flight = req.load.tokens_in_flight
            dv.reserved_tokens = (rec.layout.total_blocks - req.load.free_blocks) * rec.layout.block_size
        return True

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(min(self.heartbeat_interval_s, 0.5))
            now = time.monotonic()
            for rec in list(self.nodes.values()):
                if rec.up and now - rec.last_seen > self.heartbeat_timeout_s:
                    log.warning("node %s missed heartbeats for %.1fs: out of rotation", rec.node_id,
                                now - rec.last_seen)
                    self.mark_down(rec)

    def mark_down(self, rec: NodeRecord) -> None:
        if not rec.up:
            return
        rec.up = False
        rec.down.set()
        if rec.prefill_view is not None:
            rec.prefill_view.healthy = False
            self.index.remove_node(NodeId(rec.node_id))
        if rec.decode_view is not None:
            rec.decode_view.healthy = False
        if rec.events_task:
            rec.events_task.cancel()
        self._on_change(rec, False)

    async def _drop(self, rec: NodeRecord) -> None:
        self.mark_down(rec)
        if rec.prefill_view in self.view.prefill:
            self.view.prefill.remove(rec.prefill_view)
        if rec.decode_view in self.view.decode:
            self.view.decode.remove(rec.decode_view)
        self.nodes.pop(rec.node_id, None)
        await rec.channel.close()

    # --- KV events -> global prefix index ---------------------------------------------
    async def _follow_kv_events(self, rec: NodeRecord) -> None:
        node = NodeId(rec.node_id)
        while rec.up:
            try:
                call = rec.prefill_stub.KVEvents(node_pb2.KVEventsRequest(subscriber="conductor"))
                snapshot_seq = None
                async for ev in call:
                    if ev.kind == node_pb2.KV_EVENT_CLEARED:
                        snapshot_seq = ev.seq
                        continue
                    hashes = tuple(BlockHash(h) for h in ev.block_hashes)
                    if snapshot_seq is not None:  # the snapshot's STORED event
                        self.index.resync(node, hashes, snapshot_seq + 1)
                        snapshot_seq = None
                    elif ev.kind == node_pb2.KV_EVENT_STORED:
                        self.index.apply(BlockStored(node, ev.seq, hashes))
                    elif ev.kind == node_pb2.KV_EVENT_REMOVED:
                        self.index.apply(BlockRemoved(node, ev.seq, hashes))
            except grpc.aio.AioRpcError as e:
                if not rec.up:
                    return
                log.info("KV event stream from %s ended (%s); resubscribing", rec.node_id, e.code().name)
                await asyncio.sleep(0.5)

    # --- queries ----------------------------------------------------------------------
    def get(self, node_id: str) -> NodeRecord:
        return self.nodes[node_id]

    def live(self, role: str) -> list[NodeRecord]:
        return [r for r in self.nodes.values() if r.up and r.role == role]

    @property
    def colocated(self) -> bool:
        """True when the live nodes are colocated ones (the baseline layout)."""
        return any(r.role == "colocated" for r in self.nodes.values() if r.up)
