"""The decode node's control service.

Lifecycle of one request:

1. `Reserve` allocates blocks for the prompt's KV (plus the first decode token) and returns
   them as a `KVTarget` in this node's registered KV region. The reservation has a lease:
   if `Decode` does not claim it in time, the blocks are freed. The conductor `Renew`s the
   lease while the prefill is still queued or running, so a long prefill queue never
   frees blocks a prefill will write into.
2. The prefill node writes the KV straight into those blocks (transfer engine).
3. `Decode` claims the reservation, joins the request to the running batch with the first
   token the prefill node sampled, and streams tokens until it finishes. With
   `recompute=True` (the KV never arrived) the node computes the prompt itself instead;
   so does a node of the colocated layout for every request (`colocated=True`).

Cancelling the `Decode` call aborts the request and frees its blocks. An engine step that
fails while the request runs ends the stream at once with INTERNAL "decode node X: engine
step failed: ..." (the worker has aborted it and freed its blocks).

KV events (`KVEvents`): the blocks the decode write-back put to the cluster store, as
tier-"cluster" events numbered without gaps (`prefill_node.kv_events.KVEventLog`); nothing
else this node caches is published, since prompts are only ever looked up on prefill nodes.

Block hashes: as on the prefill node, the conductor's chain of the prompt's full blocks
(`block_hashes`) is checked and reused, so the prompt blocks this node caches are not hashed
again here.

Request ids are the conductor's own (unique per request); a second `Reserve` or `Decode`
for an id this node already holds or runs is refused with ALREADY_EXISTS. A migrated request
(its first decode node failed mid-stream) arrives with `recompute=True` and the tokens it
already generated in `resume_token_ids`: the node recomputes prompt + those and continues.

Every reservation is recorded in the engine's block ledger inside the engine call that
allocates or frees it (`engine/audit.py`), so the periodic block audit sees exactly which
blocks are held and reclaims only leaked ones.
"""
from __future__ import annotations

import asyncio
import logging

import grpc

from engine.engine import LLMEngine, RequestOutput
from engine.errors import InvalidRequestError, OutOfBlocksError
from engine.leases import BlockLeases
from engine.request import sample_id
from engine.worker import EngineWorker
from prefill_node.kv_events import KVEventLog, stream_events
from proto.convert import logprob_from_proto, logprob_to_proto, sampling_from_proto
from proto.halfmoon.v1 import common_pb2, node_pb2, node_pb2_grpc

log = logging.getLogger(__name__)


class DecodeService(node_pb2_grpc.DecodeNodeServicer):
    def __init__(self, worker: EngineWorker, node_id: str, region_id: int, descriptor: bytes, *, metrics=None) -> None:
        self.worker = worker
        self.node_id = node_id
        self.region_id = region_id
        self.descriptor = descriptor
        self.metrics = metrics
        self.block_bytes = worker.engine.kv.block_bytes
        self._reserved = BlockLeases(self._expired)
        self.recomputed = 0
        self.expired_leases = 0
        # the write-back's puts to the cluster store, for the conductor's index of it
        self.events = KVEventLog(only_tier="cluster")
        if worker.engine.tiers is not None:
            worker.engine.tiers.add_listener(self.events.on_event)

    async def _engine(self, fn, undo=None):
        return await self.worker.run(fn, undo)

    @property
    def num_reserved_blocks(self) -> int:
        return self._reserved.num_blocks

    def expire_reservations(self) -> int:
        """Free every reservation now: the conductor that made them no longer knows this node
        (it restarted, or took the node out and failed its requests), so none will be
        claimed. Returns how many blocks were freed."""
        return self._reserved.expire_all()

    async def Reserve(self, request: node_pb2.ReserveRequest, context):
        rid = request.request_id
        if request.num_tokens <= 0:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "num_tokens: must be > 0")

        def reserve(e: LLMEngine) -> list[int] | None:  # check and record in one engine call
            if _reservation(rid) in e.held or e.get_request(rid) is not None:
                return None
            got = e.reserve(request.num_tokens)
            e.held.hold(_reservation(rid), got)
            return got

        try:
            blocks = await self._engine(reserve, undo=lambda e, got: got is not None and _free_reservation(e, rid))
        except OutOfBlocksError as e:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"decode node {self.node_id}: {e}")
        if blocks is None:
            await context.abort(grpc.StatusCode.ALREADY_EXISTS,
                                f"request_id: {rid!r} already holds a reservation or runs on {self.node_id}")
        self._reserved.grant(rid, blocks, request.lease_s)
        return node_pb2.ReserveResponse(target=node_pb2.KVTarget(
            node_id=self.node_id, transfer_descriptor=self.descriptor, region_id=self.region_id,
            block_ids=blocks, block_bytes=self.block_bytes))

    def _expired(self, rid: str, blocks: list[int]) -> None:
        log.warning("reservation of %s expired: freeing %d blocks", rid, len(blocks))
        self.expired_leases += 1
        if self.metrics:
            self.metrics.observe_lease_expired(len(blocks))
        self.worker.call(lambda e: _free_reservation(e, rid))

    async def KVEvents(self, request: node_pb2.KVEventsRequest, context):
        """The blocks this node's write-back put to the cluster store (a finished turn's
        prompt and answer), so the conductor's index places them there before any prefill
        node loads them."""
        async for msg in stream_events(self.worker, self.events):
            yield msg

    async def Renew(self, request: node_pb2.RenewRequest, context):
        """Restart a reservation's lease (its prefill is still queued or running)."""
        return node_pb2.RenewResponse(found=self._reserved.renew(request.request_id, request.lease_s))

    async def Release(self, request: node_pb2.ReleaseRequest, context):
        rid = request.request_id
        blocks = self._reserved.take(rid)
        if blocks is not None:  # no lease is left to free them: this must run even if the call is cancelled
            await asyncio.shield(asyncio.wrap_future(self.worker.call(lambda e: _free_reservation(e, rid))))
        return node_pb2.ReleaseResponse(found=blocks is not None)

    async def Decode(self, request: node_pb2.DecodeRequest, context):
        rid = request.request_id
        try:
            params = sampling_from_proto(request.sampling)
        except InvalidRequestError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        prompt = list(request.prompt_token_ids)
        hashes = list(request.block_hashes)  # the conductor's chain of the prompt: checked, then reused
        resume = list(request.resume_token_ids)
        local_prefill = request.recompute or request.colocated
        if resume and not local_prefill:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                "resume_token_ids: a resumed request is recomputed here: set recompute or colocated")
        leased = self._reserved.take(rid) is not None  # the lease stops; the ledger keeps the blocks until `start`
        if not leased and not local_prefill:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"no reservation for {rid!r} on {self.node_id} (lease expired or released)")
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        samples = [sample_id(rid, i) for i in range(params.n)]  # n > 1: parallel samples, each its own engine id
        firsts = list(request.first_tokens) or [request.first_token]
        first_logprobs = [logprob_from_proto(lp) for lp in request.first_logprobs] or None

        def sink(out: RequestOutput) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, out)

        def set_sinks(fn) -> None:
            for sid in samples:
                self.worker.set_sink(sid, fn)

        started = False

        def start(eng: LLMEngine) -> bool:
            """Join the request (False: its id already runs here). The reservation passes from
            the ledger to the request, or is freed, inside this one engine call."""
            nonlocal started
            if eng.get_request(rid) is not None:
                if leased:
                    _free_reservation(eng, rid)
                return False
            started = True
            blocks = eng.held.take(_reservation(rid))
            set_sinks(sink)
            try:
                if local_prefill:
                    if blocks is not None:
                        eng.unreserve(blocks)
                    eng.add_request(rid, params, prompt_token_ids=prompt, resume_token_ids=resume,
                                    block_hashes=hashes)
                    return True
                # the first tokens were sampled by the prefill node (under the request's grammar, if
                # any): the engine rebuilds the grammar here and advances it by each of them
                for out in eng.add_prefilled(rid, params, prompt, firsts, blocks, request.num_cached_tokens,
                                             first_logprobs=first_logprobs, block_hashes=hashes):
                    sink(out)
                    if out.finished:
                        self.worker.set_sink(out.request_id, None)
            except InvalidRequestError:
                set_sinks(None)
                if blocks is not None and not local_prefill:
                    eng.unreserve(blocks)
                raise
            return True

        try:
            joined = await self._engine(start, undo=lambda e, ok: ok and (set_sinks(None), e.abort(rid)))
        except asyncio.CancelledError:
            if leased:  # if `start` never ran, the reservation is still ours
                self.worker.call(lambda e: None if started else _free_reservation(e, rid))
            raise
        except InvalidRequestError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        if not joined:
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, f"request_id: {rid!r} already runs on {self.node_id}")
        if request.recompute and not resume:  # a migrated request's recompute is no failed transfer
            self.recomputed += 1
            if self.metrics:
                self.metrics.observe_recomputed_prefill()
        elif not local_prefill and self.metrics:  # the prompt's KV arrived from the prefill node
            self.metrics.observe_kv_transfer(request.kv_bytes, request.kv_transfer_s)
        running = set(samples)  # the stream ends when every sample has finished
        finished = False
        try:
            while not finished:
                out = await queue.get()
                if out.finished:
                    running.discard(out.request_id)
                finished = not running
                if out.error:  # a failed engine step (or a refused grammar token) ended it and freed its blocks
                    await context.abort(grpc.StatusCode.INTERNAL, f"decode node {self.node_id}: {out.error}")
                yield node_pb2.DecodeOutput(
                    delta=common_pb2.TokenDelta(text=out.text_delta, token_ids=list(out.new_token_ids),
                                                logprobs=[logprob_to_proto(lp) for lp in out.logprobs]),
                    finished=out.finished,
                    finish_reason=out.finish_reason.value if out.finish_reason else "",
                    completion_tokens=out.num_output_tokens, num_cached_tokens=out.num_cached_tokens,
                    index=out.index, forced_tokens=out.num_forced_tokens)
        finally:
            if not finished:  # cancelled: abort without awaiting (every sample with it)
                set_sinks(None)
                self.worker.call(lambda e: e.abort(rid))


def _reservation(rid: str) -> tuple[str, str]:
    return ("reservation", rid)


def _free_reservation(eng: LLMEngine, rid: str) -> bool:
    """Engine thread: free `rid`'s reserved blocks and drop their ledger entry."""
    blocks = eng.held.take(_reservation(rid))
    if blocks is not None:
        eng.unreserve(blocks)
    return blocks is not None
