"""The live conductor: one request's trip through the cluster (DESIGN.md §2).

    validate + tokenize -> scheduler.decide (policy + admission; reject before any work)
    -> decode node Reserve (blocks + lease) -> prefill node Prefill (chunked, KV pushed
    into the reserved blocks as it is computed; answers with the first token)
    -> decode node Decode (joins the batch, streams tokens) -> client

It implements the `Backend` protocol shared by the gRPC and HTTP front doors. The
scheduler, policies and admission modes are the same objects the simulator drives; this
module only keeps their `ClusterView` current (dispatches, completions, heartbeats).
"""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass, replace
from typing import AsyncIterator

import grpc

from conductor import admission
from conductor.cost_model import CostModel, DecodeModel, PrefillModel, TransferModel
from conductor.decision import Decision, LoadBasis, RejectReason, Rejection, Stage
from conductor.intake import Intake, check_fits
from conductor.frontend_api import (Finished, GenerateRequest, Rejected, RequestFailed, TokenChunk, Timing,
                                    Unavailable, Usage)
from conductor.registry import NodeRecord, NodeRegistry
from conductor.policies import decode_estimate
from conductor.request import RequestInfo
from conductor.scheduler import Scheduler
from conductor.view import ClusterView, DecodeResident
from engine.errors import InvalidRequestError
from engine.tokenizer import Tokenizer
from proto.convert import sampling_to_proto
from proto.halfmoon.v1 import node_pb2

log = logging.getLogger("halfmoon.conductor")


def cpu_default_costs() -> CostModel:
    """A rough cost model of SmolLM2-135M on 2 CPU cores (fp32), from `bench/engine.py` runs
    on this machine class: ~450 prefill tok/s, ~45 ms decode step at batch 1 growing ~6 ms per
    sequence; KV 46,080 B/token; loopback ~3 GB/s. `halfmoon profile` fits a better one."""
    return CostModel(
        prefill=PrefillModel(c_nn=2e-7, c_np=-1e-7, c_n=2.2e-3, c_p=-2.1e-3, c_1=0.01),
        decode=DecodeModel(s_1=0.045, s_b=0.006, s_t=2e-6),
        transfer=TransferModel(kv_bytes_per_token=46080, network_bytes_per_s=3e9),
        description="CPU default: SmolLM2-135M fp32 on 2 cores (rough; run `halfmoon profile`)",
    )


@dataclass(frozen=True, slots=True)
class LiveConfig:
    model_name: str
    max_model_len: int
    block_size: int
    on_transfer_failure: str = "recompute"  # or "fail"
    kv_lease_s: float = 60.0
    request_timeout_s: float = 600.0
    control_timeout_s: float = 10.0


class NodeDown(Exception):
    pass


async def _or_down(aw, rec: NodeRecord):
    """Await `aw`, but fail fast with NodeDown if `rec` is marked down meanwhile."""
    task = asyncio.ensure_future(aw)
    down = asyncio.ensure_future(rec.down.wait())
    try:
        done, _ = await asyncio.wait({task, down}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        down.cancel()
    if task in done:
        return task.result()
    task.cancel()
    raise NodeDown(f"{rec.role} node {rec.node_id} stopped heartbeating")


class LiveConductor:
    def __init__(self, cfg: LiveConfig, tokenizer: Tokenizer, scheduler: Scheduler, registry: NodeRegistry,
                 metrics=None, clock=time.monotonic) -> None:
        self.cfg = cfg
        self.model_name = cfg.model_name
        self.tokenizer = tokenizer
        self.scheduler = scheduler
        self.registry = registry
        self.metrics = metrics
        self.decisions: list[Decision] = []  # recent decisions, for status and tests
        self.intake = Intake(tokenizer, cfg.max_model_len, cfg.block_size)
        self._clock = clock  # the scheduler's notion of now (tests pin it)

    # --- the request ------------------------------------------------------------------
    async def generate(self, request: GenerateRequest) -> AsyncIterator[TokenChunk | Finished]:
        t0 = self._clock()
        clock = self.metrics.start_request() if self.metrics else None
        prepared = await self.intake.prepare(request)  # validated, tokenized, hashed; off the loop if big
        view = self.registry.view
        check_fits(prepared, (d.kv_capacity_tokens for d in view.decode if d.healthy))
        ids, params = prepared.token_ids, prepared.sampling
        rid = request.request_id or uuid.uuid4().hex
        info = RequestInfo(rid, len(ids), prepared.block_hashes, params.max_tokens)
        colocated = self.registry.colocated
        decision = self.scheduler.decide(view, info, t0)
        if colocated and decision.prefill is not None:
            decision = self._same_node_decode(view, info, decision, t0)
        self.decisions.append(decision)
        del self.decisions[:-256]
        if decision.prefill is not None:
            pc = decision.prefill
            log.info("%s: %d tokens -> prefill %s (cached %d blocks%s, queue %.3fs, predicted TTFT %.3fs), decode %s%s",
                     rid, len(ids), pc.node, pc.cached_blocks,
                     f", pull {pc.pulled_blocks} from {pc.pull_from}" if pc.pull_from else "", pc.queue_s, pc.ttft_s,
                     decision.decode.node if decision.decode else "-",
                     f"; rejected: {decision.rejection.detail}" if decision.rejection else "")
        if not decision.admitted:
            r = decision.rejection
            if self.metrics:
                self.metrics.observe_rejected(r.reason.value)
            raise Rejected(f"{r.reason.value}: {r.detail}", r.retry_after_s)
        if decision.prefill is None or decision.decode is None:
            raise Unavailable("no live prefill or decode node")
        try:
            pre = self.registry.get(decision.prefill.node)
            dec = self.registry.get(decision.decode.node)
        except KeyError as e:
            raise Unavailable(f"node {e} left the cluster") from None
        if not (pre.up and dec.up):
            raise Unavailable("the chosen node is down")
        self._dispatched(pre, dec, info, decision, t0)
        try:
            async for item in self._run(rid, ids, params, pre, dec, decision, info, t0, colocated):
                if clock is not None:
                    if isinstance(item, TokenChunk):
                        clock.on_tokens(len(item.token_ids))
                    else:
                        clock.on_finished(item)
                yield item
        finally:
            self._completed(pre, dec, rid)

    def _same_node_decode(self, view: ClusterView, info: RequestInfo, decision: Decision, now: float) -> Decision:
        """Colocated layout: decode where the prefill runs; admission judges that node."""
        node = next((d for d in view.decode if d.node_id == decision.prefill.node and d.healthy), None)
        if node is None:
            return replace(decision, decode=None, rejection=Rejection(
                RejectReason.NO_DECODE_NODE, Stage.ARRIVAL, f"colocated node {decision.prefill.node} is down", 5.0))
        s = self.scheduler.settings.values
        basis = admission.decode_basis(s.admission)
        at = now + decision.prefill.ttft_s if basis is LoadBasis.PROJECTED else now
        dec = decode_estimate(node, info, at, basis, s, self.scheduler.costs)
        return replace(decision, decode=dec, rejection=admission.check_arrival(s, decision.prefill, dec))

    def _dispatched(self, pre: NodeRecord, dec: NodeRecord, info: RequestInfo, d: Decision, now: float) -> None:
        pv = pre.prefill_view
        pv.busy_until_s = max(pv.busy_until_s, now) + d.prefill.service_s
        pv.queued_requests += 1
        dv = dec.decode_view
        dv.incoming += 1
        dv.incoming_tokens += info.input_tokens
        dv.residents[info.request_id] = DecodeResident(info.request_id, info.input_tokens, now + d.prefill.ttft_s,
                                                       info.expected_output_tokens)

    def _prefill_done(self, pre: NodeRecord, dec: NodeRecord, info: RequestInfo) -> None:
        pv = pre.prefill_view
        pv.queued_requests = max(0, pv.queued_requests - 1)
        if pv.queued_requests == 0:
            pv.busy_until_s = self._clock()
        dv = dec.decode_view
        dv.incoming = max(0, dv.incoming - 1)
        dv.incoming_tokens = max(0, dv.incoming_tokens - info.input_tokens)
        res = dv.residents.get(info.request_id)
        if res is not None:
            res.running = True
            res.ready_at_s = self._clock()

    def _completed(self, pre: NodeRecord, dec: NodeRecord, rid: str) -> None:
        dec.decode_view.residents.pop(rid, None)

    async def _run(self, rid, ids, params, pre: NodeRecord, dec: NodeRecord, decision: Decision, info, t0,
                   colocated: bool):
        cfg = self.cfg
        sp = sampling_to_proto(params)
        reserved = False
        prefill_pending = True
        decode_call = None
        renewer: asyncio.Future | None = None
        try:
            if colocated:
                prefill_pending = False
                self._prefill_done(pre, dec, info)
                decode_call = dec.decode_stub.Decode(node_pb2.DecodeRequest(
                    request_id=rid, prompt_token_ids=ids, sampling=sp, colocated=True), timeout=cfg.request_timeout_s)
                async for item in self._stream(decode_call, rid, ids, pre, dec, None, t0, t0):
                    yield item
                decode_call = None
                return
            try:
                resv = await _or_down(dec.decode_stub.Reserve(
                    node_pb2.ReserveRequest(request_id=rid, num_tokens=len(ids), lease_s=cfg.kv_lease_s),
                    timeout=cfg.control_timeout_s), dec)
            except grpc.aio.AioRpcError as e:
                if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    if self.metrics:
                        self.metrics.observe_rejected("decode_out_of_blocks")
                    raise Rejected(f"decode_out_of_blocks: {e.details()}", 1.0) from None
                raise RequestFailed(f"decode node {dec.node_id} could not reserve KV blocks: "
                                    f"{e.code().name}: {e.details()}") from None
            reserved = True
            renewer = asyncio.ensure_future(self._keep_reserved(dec, rid))
            recompute = False
            presp = None
            preq = node_pb2.PrefillRequest(request_id=rid, prompt_token_ids=ids, sampling=sp, target=resv.target)
            holder = self.registry.nodes.get(decision.prefill.pull_from or "")
            if holder is not None and holder.up:  # kv_centric: pull the prefix instead of recomputing it
                preq.pull.CopyFrom(node_pb2.PrefixSource(
                    node_id=holder.node_id, address=holder.address, transfer_descriptor=holder.descriptor,
                    num_blocks=decision.prefill.cached_blocks + decision.prefill.pulled_blocks))
            try:
                presp = await _or_down(pre.prefill_stub.Prefill(preq, timeout=cfg.request_timeout_s), pre)
            except grpc.aio.AioRpcError as e:
                if e.code() == grpc.StatusCode.INVALID_ARGUMENT:
                    raise InvalidRequestError("prompt", e.details()) from None
                if cfg.on_transfer_failure == "recompute" and e.code() in (
                        grpc.StatusCode.ABORTED, grpc.StatusCode.UNAVAILABLE):
                    log.warning("%s: prefill on %s failed (%s: %s); decode node recomputes", rid, pre.node_id,
                                e.code().name, e.details())
                    recompute = True
                else:
                    raise RequestFailed(f"prefill on {pre.node_id} failed: {e.code().name}: {e.details()}") from None
            except NodeDown as e:
                if cfg.on_transfer_failure != "recompute":
                    raise RequestFailed(str(e)) from None
                recompute = True
            prefill_pending = False
            renewer.cancel()
            self._prefill_done(pre, dec, info)
            t_kv = self._clock()
            if self.metrics and presp is not None:
                self.metrics.observe_prediction("ttft", decision.prefill.ttft_s, t_kv - t0)
            if admission.judges_after_prefill(self.scheduler.settings.values.admission) and not recompute:
                again = self.scheduler.decide_after_prefill(self.registry.view, info, t_kv, decision).rejection
                if again is not None:
                    if self.metrics:
                        self.metrics.observe_rejected(again.reason.value)
                    raise Rejected(f"{again.reason.value} (after prefill): {again.detail}", again.retry_after_s)
            decode_call = dec.decode_stub.Decode(node_pb2.DecodeRequest(
                request_id=rid, prompt_token_ids=ids, sampling=sp, first_token=presp.first_token if presp else 0,
                num_cached_tokens=presp.num_cached_tokens if presp else 0, recompute=recompute,
                kv_bytes=presp.kv_bytes if presp else 0, kv_transfer_s=presp.kv_transfer_s if presp else 0.0),
                timeout=cfg.request_timeout_s)
            reserved = False  # Decode claims (or, recomputing, frees) the reservation
            async for item in self._stream(decode_call, rid, ids, pre, dec, presp, t0, t_kv):
                yield item
            decode_call = None
        except (RequestFailed, Rejected) as e:
            if self.metrics and isinstance(e, RequestFailed):
                self.metrics.observe_failed(str(e).split(":")[0])
            raise
        finally:
            if renewer is not None:
                renewer.cancel()
            if prefill_pending:
                self._prefill_done(pre, dec, info)
            if decode_call is not None:
                decode_call.cancel()
            if reserved and dec.up:  # never claimed: give the blocks back now, not at lease expiry
                asyncio.ensure_future(self._release(dec, rid))

    async def _stream(self, decode_call, rid, ids, pre: NodeRecord, dec: NodeRecord, presp, t0: float, t_kv: float):
        """Relay the decode node's stream; end with `Finished` carrying the TTFT breakdown."""
        first_at = None
        it = decode_call.__aiter__()
        while True:
            try:
                out = await _or_down(it.__anext__(), dec)
            except StopAsyncIteration:
                raise RequestFailed(f"decode node {dec.node_id} ended the stream early") from None
            except grpc.aio.AioRpcError as e:
                raise RequestFailed(f"decode node {dec.node_id} failed: {e.code().name}: {e.details()}") from None
            except NodeDown as e:
                raise RequestFailed(str(e)) from None
            now = self._clock()
            if first_at is None:
                first_at = now
            if out.delta.token_ids or out.delta.text:
                yield TokenChunk(out.delta.text, tuple(out.delta.token_ids))
            if out.finished:
                timing = Timing(
                    queue_s=presp.queue_s if presp else 0.0,
                    prefill_s=presp.prefill_s if presp else first_at - t_kv,  # colocated/recompute: all of it
                    kv_transfer_s=presp.kv_transfer_s if presp else 0.0,
                    first_decode_s=first_at - t_kv if presp else 0.0,
                    ttft_s=first_at - t0)
                yield Finished(out.finish_reason or "stop",
                               Usage(len(ids), out.completion_tokens,
                                     presp.num_cached_tokens if presp else out.num_cached_tokens),
                               timing, pre.node_id, dec.node_id)
                return

    async def _keep_reserved(self, dec: NodeRecord, rid: str) -> None:
        """Renew the decode reservation every third of its lease while the prefill is
        queued or running, so a long prefill queue never frees the blocks it writes into."""
        lease = self.cfg.kv_lease_s
        while True:
            await asyncio.sleep(lease / 3)
            try:
                renewed = await dec.decode_stub.Renew(node_pb2.RenewRequest(request_id=rid, lease_s=lease),
                                                      timeout=self.cfg.control_timeout_s)
            except grpc.aio.AioRpcError as e:
                log.info("renewing %s on %s failed (%s); retrying", rid, dec.node_id, e.code().name)
                continue
            if not renewed.found:
                log.warning("reservation of %s on %s is gone; its prefill can no longer land", rid, dec.node_id)
                return

    async def _release(self, dec: NodeRecord, rid: str) -> None:
        try:
            await dec.decode_stub.Release(node_pb2.ReleaseRequest(request_id=rid), timeout=self.cfg.control_timeout_s)
        except grpc.aio.AioRpcError as e:
            log.info("release of %s on %s failed (%s); its lease will free it", rid, dec.node_id, e.code().name)
