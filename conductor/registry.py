"""The conductor's live nodes: those that registered, their last heartbeat, their gRPC
stubs, and the adapter that turns what they report into `ClusterState` events (register ->
add_prefill / add_decode, heartbeat -> heartbeat_prefill / heartbeat_decode, out of and back
into rotation -> node_down / node_up, dropped -> remove_node, KV events -> the index). The
registry writes no view field itself: `state` is the only writer, as in the simulator.

A node is taken out of rotation (`mark_down`) at once when an RPC to it fails in a way
that says it cannot be reached (`rpc_failed`: UNAVAILABLE, or a control call past its
deadline), or when it misses heartbeats for `heartbeat_timeout_s`. Either way it leaves the
policy's view (healthy=False) and its `down` event fires, which ends the requests waiting
on it (they are retried or migrated elsewhere, or fail) instead of letting them hang.

A node taken out by a failed RPC is probed (a cheap RPC that touches no engine, every
`probe_interval_s`) and comes back into rotation as soon as it answers; its heartbeats are
still accepted meanwhile. A node that stopped heartbeating must register again.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Callable

import grpc

from conductor.cluster_state import ClusterState
from conductor.predictions import DecodeSteps
from conductor.request import NodeId
from conductor.view import DecodeNodeView, PrefillNodeView
from engine.block_pool import CLEARED
from proto.convert import kv_event_from_proto
from proto.halfmoon.v1 import node_pb2, node_pb2_grpc

log = logging.getLogger("halfmoon.conductor.registry")

ROLES = {node_pb2.ROLE_PREFILL: "prefill", node_pb2.ROLE_DECODE: "decode", node_pb2.ROLE_COLOCATED: "colocated"}
ROLE_CODES = {name: code for code, name in ROLES.items()}


class MoveRefused(Exception):
    """A node cannot be moved to another role now (down, already there, the last of its pool)."""


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
    probe_task: asyncio.Task | None = None  # while out of rotation after a failed RPC
    down_reason: str = ""
    prefill_view: PrefillNodeView | None = None
    decode_view: DecodeNodeView | None = None
    draining: bool = False  # being moved to another role: out of rotation, its requests finish
    switch_to: str = ""  # the role it moves to; once drained, its next heartbeat's answer says so
    switch_sent: bool = False


class NodeRegistry:
    """`clock`: the scheduler's notion of now, for the view (the live conductor's clock);
    heartbeat deadlines use the monotonic clock. `heartbeat_lag_s`: requests dispatched this
    recently may not be in a node's reported queue yet. `prefill_s_per_token`: what a queued
    prompt token nobody told this conductor about costs (the live conductor sets it from its
    cost model)."""

    def __init__(self, block_size: int, heartbeat_interval_s: float = 1.0, heartbeat_timeout_s: float = 5.0,
                 on_change=None, *, probe_interval_s: float = 0.5, probe_timeout_s: float = 1.0,
                 clock=time.monotonic, heartbeat_lag_s: float = 0.05, store_gib: float = 0.0) -> None:
        self.block_size = block_size
        self.store_gib = store_gib  # > 0: the cluster store's memory, which the index's cluster tier is bounded to
        self.heartbeat_interval_s = heartbeat_interval_s
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.probe_interval_s = probe_interval_s
        self.probe_timeout_s = probe_timeout_s
        self.nodes: dict[str, NodeRecord] = {}
        self.state = ClusterState(block_size, heartbeat_lag_s=heartbeat_lag_s)
        self.index = self.state.index
        self.view = self.state.view
        self.clock = clock
        self.prefill_s_per_token = 0.0
        self.resyncs = 0  # KV event subscriptions restarted because a heartbeat found the index behind
        # a decode node's steps since its last heartbeat (the live conductor calibrates on them)
        self.on_decode_steps: Callable[[DecodeSteps], None] = lambda window: None
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
        kv_dtype = req.layout.kv_dtype or "float32"  # (nodes from before the field: float32)
        for other in self.nodes.values():
            if other.node_id != req.node_id and other.up and (other.layout.kv_dtype or "float32") != kv_dtype:
                raise ValueError(f"layout.kv_dtype: node {req.node_id} keeps its KV cache in {kv_dtype}, "
                                 f"{other.node_id} in {other.layout.kv_dtype or 'float32'}: prefill and decode "
                                 f"nodes exchange KV blocks as they are, so every node must use one KV dtype "
                                 f"(model.dtype float32 -> float32, bfloat16 / w8a8 / fp8 -> bfloat16)")
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
        if req.HasField("load"):  # shown by Status until the first heartbeat (which also feeds the views)
            rec.load = req.load
        self.add(rec)
        log.info("node %s (%s) registered at %s", req.node_id, role, req.address)
        self._on_change(rec, True)
        return rec

    def add(self, rec: NodeRecord, *, follow_events: bool = True) -> NodeRecord:
        """Put `rec` in rotation: its views enter the cluster state (a prefill node's KV
        events, and a decode node's puts to the cluster store, are followed into the index
        unless `follow_events` is off)."""
        nid = NodeId(rec.node_id)
        if rec.role in ("prefill", "colocated"):
            rec.prefill_view = self.state.add_prefill(nid)
            if follow_events:
                rec.events_task = asyncio.get_running_loop().create_task(self._follow_kv_events(rec))
        if rec.role in ("decode", "colocated"):
            rec.decode_view = self.state.add_decode(nid, rec.layout.total_blocks * rec.layout.block_size)
        if rec.role == "decode" and follow_events:  # its write-back's puts to the store
            rec.events_task = asyncio.get_running_loop().create_task(self._follow_kv_events(rec))
        self.nodes[rec.node_id] = rec
        if self.store_gib > 0 and self.index.store_lru is None and rec.layout.block_bytes:
            self._bound_store(rec.layout)
        return rec

    def _bound_store(self, layout: node_pb2.KVLayout) -> None:
        """The first node's block layout sizes the store in blocks: its memory over one block
        record (a KV block and its trailer, as the tiers store it)."""
        from engine.tiers.record import record_bytes

        blocks = int(self.store_gib * 2**30) // record_bytes(layout.block_bytes, layout.block_size)
        if blocks >= 1:
            self.index.bound_store(blocks)
            log.info("cluster KV store modelled as %d blocks (%.2f GiB): the index drops what it has evicted",
                     blocks, self.store_gib)

    def heartbeat(self, req: node_pb2.HeartbeatRequest) -> bool:
        rec = self.nodes.get(req.node_id)
        if rec is None or not (rec.up or rec.probe_task is not None):
            return False
        rec.last_seen = time.monotonic()
        ld = rec.load = req.load
        now, nid = self.clock(), NodeId(rec.node_id)
        if rec.role == "prefill":  # (a colocated node's prompts run inside its Decode calls: no queue to report)
            behind = self.state.heartbeat_prefill(nid, ld.queued_prefill_tokens, now, ld.kv_event_seq,
                                                  fallback_s_per_token=self.prefill_s_per_token)
            if behind and rec.up and rec.events_task is not None:  # events were lost: subscribe again (a snapshot)
                log.warning("prefill node %s published KV event %d, the index has %d: resubscribing", rec.node_id,
                            ld.kv_event_seq, self.index.next_seq(nid) - 1)
                self.resyncs += 1
                rec.events_task.cancel()
                rec.events_task = asyncio.get_running_loop().create_task(self._follow_kv_events(rec))
        if rec.decode_view is not None:
            used = (rec.layout.total_blocks - ld.free_blocks) * rec.layout.block_size
            steps = DecodeSteps(ld.decode_steps, ld.decode_step_seconds, ld.decode_step_rows, ld.decode_step_tokens)
            window = self.state.heartbeat_decode(nid, running=ld.running, waiting=ld.waiting,
                                                 tokens_in_flight=ld.tokens_in_flight, used_tokens=used, now_s=now,
                                                 steps=steps)
            if window is not None:
                self.on_decode_steps(window)
        return True

    async def _watch(self) -> None:
        tick = min(self.heartbeat_interval_s, 0.5)
        last = time.monotonic()
        while True:
            await asyncio.sleep(tick)
            now = time.monotonic()
            stalled = now - last - tick
            last = now
            if stalled > tick:
                # The conductor itself did not run (SIGSTOP, a stalled loop): heartbeats sent
                # meanwhile are still unread, so the gap is ours, not the nodes'.
                log.warning("conductor stalled for %.1fs: not counting it against node heartbeats", stalled)
                for rec in self.nodes.values():
                    rec.last_seen += stalled
                continue
            for rec in list(self.nodes.values()):
                if (rec.up or rec.probe_task is not None) and now - rec.last_seen > self.heartbeat_timeout_s:
                    self.mark_down(rec, f"missed heartbeats for {now - rec.last_seen:.1f}s")

    def mark_down(self, rec: NodeRecord, reason: str = "", *, probe: bool = False) -> None:
        """Take `rec` out of rotation now and end what waits on it (`down` fires). With
        `probe`, probe it and bring it back when it answers (unless it was lost already: it
        stopped heartbeating, so it has to register again); without, stop any probing."""
        was_up = rec.up
        if rec.up:
            rec.up = False
            rec.down_reason = reason
            rec.down.set()
            if rec.prefill_view is not None or rec.decode_view is not None:
                self.state.node_down(NodeId(rec.node_id), forget_cache=True)
            if rec.events_task:
                rec.events_task.cancel()
            log.warning("%s node %s out of rotation: %s", rec.role, rec.node_id, reason or "dropped")
            self._on_change(rec, False)
        if probe and was_up and self.nodes.get(rec.node_id) is rec:
            rec.probe_task = asyncio.get_running_loop().create_task(self._probe_until_up(rec))
        elif not probe and rec.probe_task is not None:  # it was out already: now it is lost
            rec.probe_task.cancel()
            rec.probe_task = None
            log.warning("%s node %s: %s; it must register again", rec.role, rec.node_id, reason or "dropped")

    def rpc_failed(self, rec: NodeRecord, error: grpc.aio.AioRpcError, *, control: bool = False) -> bool:
        """Judge a failed RPC to `rec`: UNAVAILABLE (refused, reset: the node is gone or
        unreachable), or DEADLINE_EXCEEDED on a `control` call (Reserve, Renew, Release: they
        answer between two engine steps), takes it out of rotation at once and probes it.
        True when it did (the request may then be retried on another node)."""
        code = error.code()
        if code == grpc.StatusCode.UNAVAILABLE or (control and code == grpc.StatusCode.DEADLINE_EXCEEDED):
            self.mark_down(rec, f"{code.name}: {error.details()}", probe=True)
            return True
        return False

    async def probe(self, rec: NodeRecord) -> bool:
        """Does `rec` answer an RPC? (One that no engine step can delay: Renew or Unpin of an
        id that does not exist.)"""
        try:
            if rec.decode_stub is not None:
                await rec.decode_stub.Renew(node_pb2.RenewRequest(request_id=""), timeout=self.probe_timeout_s)
            else:
                await rec.prefill_stub.Unpin(node_pb2.UnpinRequest(pin_id=""), timeout=self.probe_timeout_s)
        except grpc.aio.AioRpcError:
            return False
        return True

    async def _probe_until_up(self, rec: NodeRecord) -> None:
        await asyncio.sleep(self.probe_interval_s)
        while not await self.probe(rec):
            await asyncio.sleep(self.probe_interval_s)
        rec.probe_task = None
        if self.nodes.get(rec.node_id) is rec:
            self.mark_up(rec)

    def mark_up(self, rec: NodeRecord) -> None:
        """Back into rotation (a probe answered)."""
        if rec.up:
            return
        rec.up = True
        rec.down = asyncio.Event()
        rec.down_reason = ""
        if (rec.prefill_view is not None or rec.decode_view is not None) and not rec.draining:
            self.state.node_up(NodeId(rec.node_id))
        if rec.prefill_view is not None or rec.role == "decode":
            rec.events_task = asyncio.get_running_loop().create_task(self._follow_kv_events(rec))
        log.info("%s node %s answers again: back in rotation", rec.role, rec.node_id)
        self._on_change(rec, True)

    async def _drop(self, rec: NodeRecord) -> None:
        self.mark_down(rec)
        if self.nodes.get(rec.node_id) is rec and (rec.prefill_view is not None or rec.decode_view is not None):
            self.state.remove_node(NodeId(rec.node_id))  # its requests stop counting (their trips end on `down`)
        self.nodes.pop(rec.node_id, None)
        if rec.channel is not None:
            await rec.channel.close()

    # --- moving a node between the prefill and decode pools ---------------------------------
    async def move(self, node_id: str, role: str, *, timeout_s: float = 120.0) -> tuple[str, float, float]:
        """Move `node_id` to `role` ("prefill" or "decode"): take it out of rotation (policies
        stop choosing it; the requests on it go on), wait until no request counts on it, tell
        it (in the answer to its next heartbeat) to restart in `role`, and wait until it has
        registered again in that role. Returns (its old role, seconds draining, seconds
        switching). A node not yet told to switch when `timeout_s` runs out goes back into
        rotation in its old role (TimeoutError)."""
        if role not in ("prefill", "decode"):
            raise ValueError(f"role: must be 'prefill' or 'decode', got {role!r}")
        rec = self.nodes.get(node_id)
        if rec is None:
            raise LookupError(f"node_id: no node {node_id!r} is registered")
        if not rec.up or rec.draining:
            raise MoveRefused(f"node {node_id} is {'being moved' if rec.draining else 'down'}")
        if rec.role == role or rec.role not in ("prefill", "decode"):
            raise MoveRefused(f"node {node_id} is a {rec.role} node: it cannot be moved to {role}")
        if not any(r.up and not r.draining and r.role == rec.role for r in self.nodes.values() if r is not rec):
            raise MoveRefused(f"node {node_id} is the last {rec.role} node in rotation")
        nid, old_role = NodeId(node_id), rec.role
        t0 = time.monotonic()
        deadline = t0 + timeout_s
        rec.draining, rec.switch_to = True, role
        self.state.node_down(nid)
        log.info("moving %s node %s to %s: draining %d requests", old_role, node_id, role,
                 len(self.state.requests_on(nid)))
        try:
            while self.state.requests_on(nid):
                if self.nodes.get(node_id) is not rec or not rec.up:
                    raise MoveRefused(f"node {node_id} went down while draining")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"node {node_id} still has {len(self.state.requests_on(nid))} requests "
                                       f"after {timeout_s:g}s")
                await asyncio.sleep(0.05)
            drained = time.monotonic()
            while True:
                new = self.nodes.get(node_id)
                if new is not None and new is not rec and new.role == role and new.up:
                    log.info("node %s moved to %s (drained in %.2fs, switched in %.2fs)", node_id, role,
                             drained - t0, time.monotonic() - drained)
                    return old_role, drained - t0, time.monotonic() - drained
                if time.monotonic() > deadline:
                    raise TimeoutError(f"node {node_id} did not register as a {role} node within {timeout_s:g}s")
                await asyncio.sleep(0.05)
        except BaseException:
            if not rec.switch_sent and self.nodes.get(node_id) is rec:  # not told yet: back in its old role
                rec.draining, rec.switch_to = False, ""
                if rec.up:
                    self.state.node_up(nid)
            raise

    def take_switch(self, node_id: str) -> str:
        """The role `node_id` is to restart in now ("" for none), once: for the heartbeat's answer."""
        rec = self.nodes.get(node_id)
        if rec is None or not rec.switch_to or rec.switch_sent or self.state.requests_on(NodeId(node_id)):
            return ""
        rec.switch_sent = True
        return rec.switch_to

    # --- KV events -> global prefix index ---------------------------------------------
    async def _follow_kv_events(self, rec: NodeRecord) -> None:
        """A prefill node's KV events (every tier), or a decode node's (the blocks its
        write-back put to the cluster store), into the cluster state's index."""
        node = NodeId(rec.node_id)
        stub = rec.prefill_stub if rec.prefill_stub is not None else rec.decode_stub
        retry_s = 0.5
        while rec.up:
            try:
                call = stub.KVEvents(node_pb2.KVEventsRequest(subscriber="conductor"))
                snapshot_seq = None
                snapshot_of = None  # the last snapshot's seq: its lower-tier parts follow it with that seq
                async for msg in call:
                    try:
                        ev = kv_event_from_proto(msg, node)
                    except ValueError as e:  # a newer node's kind: skip it (the next snapshot repairs)
                        log.warning("%s", e)
                        continue
                    if ev.kind == CLEARED:
                        snapshot_seq = ev.seq
                        continue
                    if snapshot_seq is not None:  # the snapshot's STORED event
                        self.state.kv_snapshot(node, ev.block_hashes, snapshot_seq + 1)
                        snapshot_of, snapshot_seq = snapshot_seq, None
                    elif ev.tier != "device" and ev.seq == snapshot_of:  # a tier's part of the snapshot
                        self.state.kv_snapshot(node, ev.block_hashes, ev.seq, tier=ev.tier)
                    else:
                        self.state.kv_event(ev)
            except grpc.aio.AioRpcError as e:
                if rec.prefill_stub is None:  # a decode node: its heartbeats and decode calls judge it, not this
                    if e.code() == grpc.StatusCode.UNIMPLEMENTED or not rec.up:  # an older node publishes none
                        return
                    await asyncio.sleep(retry_s)
                    retry_s = min(5.0, 2 * retry_s)
                    continue
                if not rec.up or self.rpc_failed(rec, e):  # a killed prefill node leaves rotation at once
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
