"""The prefill node's control service.

Lifecycle of one request (named after where it waits):

1. `Prefill` arrives with the decode node's reserved blocks (a `KVTarget`). The request
   joins the engine with `max_tokens=1` and `hold_blocks=True`: its cached prefix blocks
   are reused and the rest is computed in chunks.
2. After every engine step, each block that became full is written into the matching
   destination block by the transfer engine at once, so the network works while the next
   chunk computes. When the first token is sampled the last (partial) block follows.
3. When every write is acknowledged the call answers with the first token and the timing,
   and the blocks are released (full ones stay in the prefix cache) at the engine thread's
   next turn: the answer does not wait for the step in progress there.

Cancellation (the conductor's call is cancelled) or a failed write aborts the request and
frees its blocks; a failed write answers ABORTED naming the decode node. An engine step that
fails while the request is in it ends the call at once with INTERNAL "engine step failed: ..."
(the worker has aborted the request and freed its blocks).

KV-centric pulls: when the conductor names a `PrefixSource` (another prefill node caching a
longer prefix), the node first pins those blocks there (`Pin`), reads them into blocks of its
own through the transfer engine, publishes them in its prefix cache, unpins, and only then
admits the request, which now finds the whole prefix cached. A pull that fails is reported
in `pull_error` and the prefix is recomputed instead.

Block hashes: the conductor sends the chain of the prompt's full blocks it computed at
intake (`block_hashes`); the engine takes it instead of hashing the prompt again once a cheap
check passes (`engine.block_pool.chain_mismatch`: the count, the first and the last block),
and hashes the prompt itself when it does not (or none came). A pull's lookups use it too,
here and on the holder (`PinRequest.block_hashes`), each after the same check.

Request ids are the conductor's own; a `Prefill` for an id this node already runs is refused
with ALREADY_EXISTS (and a `Pin` of an existing pin id likewise). Pins and pull buffers are
recorded in the engine's block ledger inside the engine call that takes or frees their
blocks (`engine/audit.py`), so the periodic block audit reclaims only leaked blocks.
"""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass, field, replace

import grpc

from engine.engine import LLMEngine, RequestOutput
from engine.errors import InvalidRequestError
from engine.leases import BlockLeases
from engine.worker import EngineWorker, StepFailed
from prefill_node.kv_events import KVEventLog, stream_events
from proto.convert import logprob_to_proto, sampling_from_proto
from proto.halfmoon.v1 import node_pb2, node_pb2_grpc
from transfer_engine import PeerDescriptor, Region, TransferEngine, TransferError, TransferHandle

log = logging.getLogger(__name__)


@dataclass(eq=False)
class _Job:
    request_id: str
    prompt_len: int
    remote_region: int
    remote_blocks: list[int]
    peer: object
    loop: asyncio.AbstractEventLoop
    done: asyncio.Future
    arrived_at: float = field(default_factory=time.monotonic)
    started_at: float | None = None
    computed_at: float | None = None
    sent_blocks: int = 0
    bytes_sent: int = 0
    first_token: int | None = None
    first_tokens: list[int] = field(default_factory=list)  # every parallel sample's (n > 1), first_token first
    first_logprobs: list = field(default_factory=list)  # their TokenLogprobs, when asked for
    cached_tokens: int = 0
    handles: list[TransferHandle] = field(default_factory=list)


class PrefillService(node_pb2_grpc.PrefillNodeServicer):
    def __init__(self, worker: EngineWorker, transfer: TransferEngine | None, kv_region: Region | int, *,
                 transfer_timeout_s: float = 30.0, metrics=None) -> None:
        self.worker = worker
        self.transfer = transfer
        self.kv_region = kv_region
        self.transfer_timeout_s = transfer_timeout_s
        self.metrics = metrics
        eng = worker.engine
        self.block_size = eng.config.block_size
        self.block_bytes = eng.kv.block_bytes
        self.events = KVEventLog()
        eng.add_kv_listener(self.events.on_event)
        if eng.tiers is not None:  # host / disk / store events, tagged with their tier (engine/tiers)
            eng.tiers.add_listener(self.events.on_event)
        self._jobs: dict[str, _Job] = {}
        self._peers: dict[bytes, object] = {}
        self._pins = BlockLeases(self._pin_expired)
        self._holders: dict[str, tuple[grpc.aio.Channel, node_pb2_grpc.PrefillNodeStub]] = {}
        self.queued_prefill_tokens = 0
        worker.add_hook(self._after_step)

    # --- engine thread -----------------------------------------------------------------
    def _count_queued(self, engine: LLMEngine) -> None:
        """The uncomputed prompt tokens heartbeats report: after every step, and when a request
        is added (else a prompt added during a long step is missing from the report until the
        step ends, and the conductor reads the node as idle)."""
        self.queued_prefill_tokens = sum(r.num_uncomputed for r in engine.scheduler.waiting) + sum(
            r.num_uncomputed for r in engine.scheduler.running)

    def _after_step(self, engine: LLMEngine, outputs: list[RequestOutput]) -> None:
        self._count_queued(engine)
        for job in list(self._jobs.values()):
            req = engine.get_request(job.request_id)
            if req is None or job.first_token is not None:
                continue
            if job.started_at is None and req.num_computed_tokens > 0:
                job.started_at = self.worker.step_started_at
                job.cached_tokens = req.num_cached_tokens
            if req.finished:
                full = len(job.remote_blocks)
            else:
                full = min(req.num_computed_tokens // self.block_size, len(job.remote_blocks))
            if full > job.sent_blocks:
                self._ship(job, req.block_ids, job.sent_blocks, full)
            if req.finished:
                job.first_token = req.output_token_ids[0]
                samples = [req, *req.children]  # n > 1: the samples forked when the first tokens were drawn
                job.first_tokens = [r.output_token_ids[0] for r in samples]
                drawn = {o.request_id: o.logprobs for o in outputs if o.logprobs}
                job.first_logprobs = [drawn[r.request_id][0] for r in samples if r.request_id in drawn]
                job.computed_at = time.monotonic()
                job.loop.call_soon_threadsafe(lambda j=job: asyncio.ensure_future(self._complete(j)))

    def _ship(self, job: _Job, local_blocks: list[int], start: int, end: int) -> None:
        bb = self.block_bytes
        entries: list[list[int]] = []
        for lb, rb in zip(local_blocks[start:end], job.remote_blocks[start:end]):
            last = entries[-1] if entries else None
            if last and last[1] + last[4] == lb * bb and last[3] + last[4] == rb * bb:
                last[4] += bb  # adjacent on both sides: one longer write
            else:
                entries.append([self.kv_region, lb * bb, job.remote_region, rb * bb, bb])
        try:
            job.handles.append(self.transfer.write(job.peer, [tuple(e) for e in entries],
                                                   timeout=self.transfer_timeout_s))
        except TransferError as e:  # e.g. the peer connection is already gone
            error = e  # `e` is unbound once the except block ends, before the loop runs the callback
            job.loop.call_soon_threadsafe(lambda: job.done.done() or job.done.set_exception(error))
            return
        job.sent_blocks = end
        job.bytes_sent += sum(e[4] for e in entries)

    # --- event loop ----------------------------------------------------------------------
    async def _complete(self, job: _Job) -> None:
        try:
            for h in job.handles:
                await h
        except TransferError as e:
            if not job.done.done():
                job.done.set_exception(e)
            return
        except asyncio.CancelledError:
            return
        if not job.done.done():
            job.done.set_result(time.monotonic())

    async def _peer(self, desc_bytes: bytes):
        peer = self._peers.get(desc_bytes)
        if peer is None:
            desc = PeerDescriptor.from_bytes(desc_bytes)
            peer = await asyncio.get_running_loop().run_in_executor(None, self.transfer.connect, desc)
            self._peers[desc_bytes] = peer
        return peer

    async def _engine(self, fn, undo=None):
        return await self.worker.run(fn, undo)

    async def Prefill(self, request: node_pb2.PrefillRequest, context: grpc.aio.ServicerContext):
        rid = request.request_id
        prompt = list(request.prompt_token_ids)
        hashes = list(request.block_hashes)  # the conductor's chain of the prompt: checked, then reused
        if self.transfer is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                "this is a colocated node: it serves whole requests through Decode, it does not push KV")
        try:
            params = sampling_from_proto(request.sampling)
        except InvalidRequestError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        t = request.target
        need = -(-len(prompt) // self.block_size)
        if len(t.block_ids) < need:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"target.block_ids: {len(t.block_ids)} blocks for {len(prompt)} tokens, need {need}")
        if t.block_bytes != self.block_bytes:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"target.block_bytes {t.block_bytes} != this node's {self.block_bytes}: "
                                "nodes must run the same model and block size")
        try:
            peer = await self._peer(t.transfer_descriptor)
        except TransferError as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"cannot reach decode node {t.node_id}: {e}")
        loop = asyncio.get_running_loop()
        job = _Job(rid, len(prompt), t.region_id, list(t.block_ids[:need]), peer, loop, loop.create_future())
        # one sampled token (per parallel sample), no stop rules: the decode node applies the
        # request's own. A constrained request's first token is sampled under its grammar here.
        pparams = replace(params, max_tokens=1, stop=(), stop_token_ids=(), ignore_eos=True)
        pulled: tuple[int, list[int], tuple[str, str]] | None = None
        pull_error, pull_s = "", 0.0
        if request.HasField("pull") and request.pull.num_blocks:
            t_pull = time.monotonic()
            pulled, pull_error = await self._pull(prompt, request.pull, hashes)
            pull_s = time.monotonic() - t_pull
            if pull_error:
                log.warning("%s: pull from %s failed, recomputing: %s", rid, request.pull.node_id, pull_error)

        imported = False

        def on_output(out: RequestOutput) -> None:  # engine thread; only a failed step's output matters here
            if out.error:
                failed = StepFailed(out.error)
                loop.call_soon_threadsafe(lambda: job.done.done() or job.done.set_exception(failed))

        def add(eng: LLMEngine) -> bool:
            nonlocal imported
            if pulled is not None:  # in the same engine call, so nothing can evict them first
                blocks = eng.held.take(pulled[2])
                eng.import_prefix(prompt, pulled[0], blocks, hashes)
                imported = True
            if rid in self._jobs or eng.get_request(rid) is not None:
                return False
            eng.add_request(rid, pparams, prompt_token_ids=prompt, hold_blocks=True, block_hashes=hashes)
            self._jobs[rid] = job
            self.worker.set_sink(rid, on_output)
            self._count_queued(eng)
            return True

        try:
            added = await self._engine(add, undo=lambda e, ok: ok and (self.worker.set_sink(rid, None), e.abort(rid)))
        except InvalidRequestError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except asyncio.CancelledError:
            if pulled is not None:  # `add` never ran: the pulled blocks are still ours
                self.worker.call(lambda e: None if imported else _free_held(e, pulled[2]))
            raise
        if not added:
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, f"request_id: {rid!r} already runs on this node")
        ok = False
        try:
            acked_at = await job.done
            ok = True
        except TransferError as e:
            if self.metrics:
                self.metrics.observe_kv_transfer_failed()
            await context.abort(grpc.StatusCode.ABORTED, f"KV transfer to decode node {t.node_id} failed: {e}")
        except StepFailed as e:  # the engine aborted it and freed its blocks: a server fault, not the client's
            await context.abort(grpc.StatusCode.INTERNAL, str(e))
        finally:
            self._jobs.pop(rid, None)
            if ok:  # queued, not awaited: the answer carries the first token, and waiting here for
                # the engine thread kept it behind the step in progress (another prompt's chunk);
                # a queued call runs whether or not this call is cancelled now
                self.worker.call(lambda e: e.release(rid))
            else:  # cancelled or failed: do not await (a cancelled task must not block here)
                for h in job.handles:
                    h.cancel()
                self.worker.call(lambda e: (self.worker.set_sink(rid, None), e.abort(rid)))
        computed_at = job.computed_at or acked_at
        started = job.started_at or job.arrived_at
        if self.metrics:
            self.metrics.observe_kv_transfer(job.bytes_sent, acked_at - started)
        return node_pb2.PrefillResponse(
            first_token=job.first_token, first_tokens=job.first_tokens,
            first_logprobs=[logprob_to_proto(lp) for lp in job.first_logprobs], num_cached_tokens=job.cached_tokens,
            queue_s=max(0.0, started - job.arrived_at), prefill_s=max(0.0, computed_at - started),
            kv_transfer_s=max(0.0, acked_at - computed_at), kv_bytes=job.bytes_sent,
            pulled_tokens=len(pulled[1]) * self.block_size if pulled else 0, pull_s=pull_s, pull_error=pull_error)

    # --- KV-centric pulls ---------------------------------------------------------------
    async def _pull(self, prompt: list[int], src: node_pb2.PrefixSource, hashes: list[int]
                    ) -> tuple[tuple[int, list[int], tuple[str, str]] | None, str]:
        """Read the prefix blocks this node lacks from `src`; returns (first block, local
        blocks holding them, their ledger key) to import, or None and the reason. `hashes`:
        the prompt's chain from the conductor (or none), checked and reused by the lookups
        here and on the holder."""
        bs, bb = self.block_size, self.block_bytes
        n = min(src.num_blocks, len(prompt) // bs)
        prefix = prompt[: n * bs]
        chain = hashes[:n] if len(hashes) >= n else []
        have = await self._engine(lambda e: e.cached_prefix_blocks(prefix, chain))
        if have >= n:
            return None, ""
        if self.transfer is None:
            return None, "this node has no transfer engine"
        stub = self._holder(src.address)
        pin_id = uuid.uuid4().hex
        key = ("pull", pin_id)
        local: list[int] | None = None
        try:
            # the holder answers between two of its engine steps: allow for a long one
            pin = await stub.Pin(node_pb2.PinRequest(pin_id=pin_id, token_ids=prefix, lease_s=self.transfer_timeout_s,
                                                     block_hashes=chain), timeout=self.transfer_timeout_s)
            remote = list(pin.block_ids)[have:n]
            if not remote:
                return None, f"{src.node_id} no longer caches blocks {have}..{n - 1} of the prefix"
            if pin.block_bytes != bb:
                return None, f"{src.node_id} has {pin.block_bytes}-byte blocks, this node {bb}"
            local = await self._engine(lambda e: _allocate_held(e, key, len(remote)),
                                       undo=lambda e, got: got and _free_held(e, key))
            if local is None:
                return None, f"no {len(remote)} free blocks to pull into"
            peer = await self._peer(src.transfer_descriptor)
            entries = [(self.kv_region, lb * bb, pin.region_id, rb * bb, bb) for lb, rb in zip(local, remote)]
            await self.transfer.read(peer, entries, timeout=self.transfer_timeout_s)
            done, local = (have, local, key), None
            return done, ""
        except grpc.aio.AioRpcError as e:
            return None, f"pin on {src.node_id}: {e.code().name}: {e.details()}"
        except TransferError as e:
            return None, f"reading from {src.node_id}: {e}"
        finally:
            if local is not None:
                self.worker.call(lambda e: _free_held(e, key))
            asyncio.ensure_future(self._unpin(stub, pin_id))

    def _holder(self, address: str) -> node_pb2_grpc.PrefillNodeStub:
        entry = self._holders.get(address)
        if entry is None:
            ch = grpc.aio.insecure_channel(address)
            entry = self._holders[address] = (ch, node_pb2_grpc.PrefillNodeStub(ch))
        return entry[1]

    async def _unpin(self, stub, pin_id: str) -> None:
        try:
            await stub.Unpin(node_pb2.UnpinRequest(pin_id=pin_id), timeout=5)
        except grpc.aio.AioRpcError as e:
            log.info("unpin %s failed (%s); the holder's lease frees it", pin_id, e.code().name)

    async def Pin(self, request: node_pb2.PinRequest, context):
        if self.transfer is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "this node does not serve KV reads")
        key = ("pin", request.pin_id)
        tokens = list(request.token_ids)
        hashes = list(request.block_hashes)  # the puller's chain of them (the conductor's), checked there

        def pin(e: LLMEngine) -> list[int] | None:  # check and record in one engine call
            if key in e.held:
                return None
            got = e.pin_prefix(tokens, hashes)
            e.held.hold(key, got)
            return got

        blocks = await self._engine(pin, undo=lambda e, got: got is not None and _unpin_held(e, key))
        if blocks is None:
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, f"pin_id: {request.pin_id!r} exists")
        self._pins.grant(request.pin_id, blocks, request.lease_s)
        return node_pb2.PinResponse(region_id=int(self.kv_region), block_ids=blocks, block_bytes=self.block_bytes)

    def _pin_expired(self, pin_id: str, blocks: list[int]) -> None:
        log.warning("pin %s expired; unpinning %d blocks", pin_id, len(blocks))
        self.worker.call(lambda e: _unpin_held(e, ("pin", pin_id)))

    async def Unpin(self, request: node_pb2.UnpinRequest, context):
        blocks = self._pins.take(request.pin_id)
        if blocks is not None:  # no lease is left to free them: this must run even if the call is cancelled
            await _settle(self.worker, lambda e: _unpin_held(e, ("pin", request.pin_id)))
        return node_pb2.UnpinResponse(found=blocks is not None)

    async def Abort(self, request: node_pb2.AbortRequest, context):
        found = await self._engine(lambda e: e.abort(request.request_id))
        return node_pb2.AbortResponse(found=found)

    async def KVEvents(self, request: node_pb2.KVEventsRequest, context):
        async for msg in stream_events(self.worker, self.events):
            yield msg


async def _settle(worker: EngineWorker, fn) -> None:
    """Run `fn` (a cleanup that frees blocks) on the engine thread and wait for it; cancelling
    the waiting task (a call whose client went away) does not stop `fn`, unlike `worker.run`,
    which drops a queued `fn` when its awaiter is cancelled."""
    await asyncio.shield(asyncio.wrap_future(worker.call(fn)))


# --- the block ledger (engine thread) ------------------------------------------------------
def _allocate_held(eng: LLMEngine, key: tuple[str, str], n: int) -> list[int] | None:
    got = eng.allocate_blocks(n)
    if got is not None:
        eng.held.hold(key, got)
    return got


def _free_held(eng: LLMEngine, key: tuple[str, str]) -> None:
    blocks = eng.held.take(key)
    if blocks is not None:
        eng.unreserve(blocks)


def _unpin_held(eng: LLMEngine, key: tuple[str, str]) -> None:
    blocks = eng.held.take(key)
    if blocks is not None:
        eng.unpin(blocks)
