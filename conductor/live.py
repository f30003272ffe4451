"""The live conductor: one request's trip through the cluster (DESIGN.md §2).

    validate + tokenize + hash -> scheduler.decide (policy + admission; reject before any work)
    -> decode node Reserve (blocks + lease) -> prefill node Prefill (chunked, KV pushed
    into the reserved blocks as it is computed; answers with the first token)
    -> decode node Decode (joins the batch, streams tokens) -> client

The trip and its phases are `conductor.lifecycle`'s: every request gets the cluster's own
id, and each placement of it (an `Attempt`) ends through one cleanup path (`_close`). A node
that fails (unreachable, or out of rotation) before the first token reached the client gets
the request placed again elsewhere (`max_retries`); a decode node that fails mid-stream gets
it resumed on another decode node after the tokens streamed so far (`max_migrations`), so
the client's stream goes on with no token missing or repeated.

It implements the `Backend` protocol shared by the gRPC and HTTP front doors. The
scheduler, policies and admission modes are the same objects the simulator drives, and so is
the cluster state they read (`registry.state`, a `conductor.cluster_state.ClusterState`):
this module reports each attempt's transitions to it (dispatched, reserved, prefill started
and done, joined its decode batch, finished) exactly where the simulator reports its own,
and writes no view field itself.
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
from conductor.frontend_api import (Finished, GenerateRequest, Rejected, RequestFailed, SampleEnd, TokenChunk,
                                    Timing, Unavailable, Usage)
from conductor.lifecycle import Attempt, NodeDown, NodeFailure, Phase, Trip, or_down
from conductor.registry import NodeRecord, NodeRegistry
from conductor.policies import decode_estimate
from conductor.predictions import DecodeSteps, Quantity
from conductor.request import RequestInfo
from conductor.scheduler import Scheduler
from conductor.view import ClusterView
from engine.errors import InvalidRequestError
from engine.tokenizer import Tokenizer
from proto.convert import logprob_from_proto, sampling_to_proto
from proto.halfmoon.v1 import node_pb2

log = logging.getLogger("halfmoon.conductor")
# Rejections that say the cluster has no node for the request, not that it is overloaded:
# UNAVAILABLE / 503 (retry when nodes are back), not RESOURCE_EXHAUSTED / 429.
NO_NODE = frozenset({RejectReason.NO_PREFILL_NODE, RejectReason.NO_DECODE_NODE})
# Reserve answers that mean the node holds nothing for the request.
RESERVE_REFUSALS = frozenset({grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.ALREADY_EXISTS,
                              grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION,
                              grpc.StatusCode.UNAUTHENTICATED})


def cpu_default_costs() -> CostModel:
    """A rough cost model of SmolLM2-135M on 2 CPU cores (fp32), from `bench/engine.py` runs
    on this machine class: ~450 prefill tok/s, ~45 ms decode step at batch 1 growing ~6 ms per
    sequence; KV 46,080 B/token; loopback ~3 GB/s; KV tiers, per block through the tier
    manager's own paths, rounded down (`python -m bench.tiers`' micro-benchmark, quiet: host
    -> KV region 11.6 GB/s, disk with the page cache dropped 1.0 GB/s, Mooncake Store over
    loopback TCP 0.8 GB/s; `halfmoon profile --quick`, loaded: 9.7 / 0.82 / 1.22 GB/s): host
    10 GB/s, disk 0.8 GB/s, store 0.8 GB/s. `halfmoon profile` fits a better one."""
    return CostModel(
        prefill=PrefillModel(c_nn=2e-7, c_np=-1e-7, c_n=2.2e-3, c_p=-2.1e-3, c_1=0.01),
        decode=DecodeModel(s_1=0.045, s_b=0.006, s_t=2e-6),
        transfer=TransferModel(kv_bytes_per_token=46080, network_bytes_per_s=3e9,
                               tier_bytes_per_s={"host": 1e10, "disk": 8e8, "cluster": 8e8}),
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
    max_retries: int = 3  # placements after a node failed before the first token (invisible to the client)
    max_migrations: int = 3  # moves to another decode node after a failure mid-stream (0: fail instead)
    max_n: int = 16  # parallel samples (sampling.n) one request may ask for


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
        self.intake = Intake(tokenizer, cfg.max_model_len, cfg.block_size, max_n=cfg.max_n)
        self._clock = clock  # the scheduler's notion of now (tests pin it)
        self.state = registry.state  # the one writer of the view
        self.elastic = None  # a `conductor.elastic.ElasticRoles` when elastic roles are on
        registry.clock = clock  # heartbeats reach the view on the same clock
        registry.prefill_s_per_token = scheduler.costs.prefill_s(1024) / 1024
        registry.on_decode_steps = self._observe_decode_steps  # the TBT calibration's measurements

    def _observe_decode_steps(self, window: DecodeSteps) -> None:
        self.scheduler.observe_decode_steps(window)
        if self.metrics:
            self.metrics.set_calibration("tbt", self.scheduler.calibration.factor(Quantity.TBT))

    def token_bytes(self, token_id: int) -> bytes:
        """A token's bytes (the HTTP front door's logprobs name tokens by them)."""
        return self.intake.token_bytes(token_id)

    # --- the request ------------------------------------------------------------------
    async def generate(self, request: GenerateRequest) -> AsyncIterator[TokenChunk | Finished]:
        t0 = self._clock()
        clock = self.metrics.start_request() if self.metrics else None
        prepared = await self.intake.prepare(request)  # validated, tokenized, hashed; off the loop if big
        view = self.registry.view
        check_fits(prepared, (d.kv_capacity_tokens for d in view.decode if d.healthy))
        ids, params = prepared.token_ids, prepared.sampling
        rid = uuid.uuid4().hex  # the cluster's own id; the client's request_id is only an attribute
        info = RequestInfo(rid, len(ids), prepared.block_hashes, params.max_tokens)
        trip = Trip(rid, request.request_id, ids, params, info, t0)
        attempt = self._place(trip, t0, admit=True)
        try:
            async for item in self._drive(trip, attempt):
                if clock is not None:
                    if isinstance(item, TokenChunk):
                        clock.on_tokens(len(item.token_ids))
                    else:
                        clock.on_finished(item)
                yield item
        except RequestFailed as e:
            if self.metrics:
                self.metrics.observe_failed(str(e).split(":")[0])
            raise

    async def _drive(self, trip: Trip, attempt: Attempt) -> AsyncIterator[TokenChunk | Finished]:
        """Run attempts until one finishes: a node failure places the trip again."""
        while True:
            try:
                async for item in self._run(trip, attempt):
                    yield item
                return
            except NodeFailure as e:
                failure = e
            finally:
                self._close(trip, attempt)
            attempt = self._recover(trip, failure)  # the failed attempt no longer counts in the view

    def _recover(self, trip: Trip, failure: NodeFailure) -> Attempt:
        """The next attempt after `failure`: from scratch if the client has seen nothing yet,
        else resumed on another decode node after the tokens streamed so far."""
        now = self._clock()
        cfg = self.cfg
        if not trip.generated:
            trip.retries += 1
            if trip.retries > cfg.max_retries:
                raise RequestFailed(f"{failure} (gave up after {cfg.max_retries} retries)")
            attempt = self._place(trip, now, admit=False)
            if attempt is None:
                raise RequestFailed(f"{failure} (no other live node to retry on)")
            log.warning("%s: %s (phase %s); retrying on %s -> %s", trip.label, failure, failure.phase.value,
                        attempt.pre.node_id, attempt.dec.node_id)
            if self.metrics:
                self.metrics.observe_retried(failure.phase.value)
            return attempt
        if trip.params.n > 1:  # the samples' streams cannot be resumed together on another node
            raise RequestFailed(f"{failure} (after {len(trip.generated)} tokens of n={trip.params.n} parallel "
                                "samples, which are not migrated)")
        trip.migrations += 1
        if trip.migrations > cfg.max_migrations:
            raise RequestFailed(f"{failure} (after {len(trip.generated)} tokens; "
                                f"migration limit {cfg.max_migrations} reached)")
        attempt = self._place_resumed(trip, now)
        if attempt is None:
            raise RequestFailed(f"{failure} (after {len(trip.generated)} tokens; no other live decode node)")
        log.warning("%s: %s after %d tokens; migrating to %s", trip.label, failure, len(trip.generated),
                    attempt.dec.node_id)
        if self.metrics:
            self.metrics.observe_migrated()
        return attempt

    # --- placement ----------------------------------------------------------------------
    def _place(self, trip: Trip, now: float, *, admit: bool) -> Attempt | None:
        """Choose nodes for the whole trip and count it in the view. On arrival (`admit`)
        admission may reject it; a retry was admitted already and only needs live nodes
        (None: there are none)."""
        view, info = self.registry.view, trip.info
        colocated = self.registry.colocated
        decision = self.scheduler.decide(view, info, now)
        if colocated and decision.prefill is not None:
            decision = self._same_node_decode(view, info, decision, now)
        self.decisions.append(decision)
        del self.decisions[:-256]
        if decision.prefill is not None:
            pc = decision.prefill
            log.info("%s: %d tokens -> prefill %s (cached %d blocks%s, queue %.3fs, predicted TTFT %.3fs), decode %s%s",
                     trip.label, len(trip.token_ids), pc.node, pc.cached_blocks,
                     f", pull {pc.pulled_blocks} from {pc.pull_from}" if pc.pull_from else "", pc.queue_s, pc.ttft_s,
                     decision.decode.node if decision.decode else "-",
                     f"; rejected: {decision.rejection.detail}" if decision.rejection and admit else "")
        if admit and not decision.admitted:
            r = decision.rejection
            if self.metrics:
                self.metrics.observe_rejected(r.reason.value)
            if r.reason in NO_NODE:  # nothing to serve it (e.g. a restarted conductor before the nodes rejoin)
                raise Unavailable(f"{r.reason.value}: {r.detail}")
            raise Rejected(f"{r.reason.value}: {r.detail}", r.retry_after_s)
        pre = self.registry.nodes.get(decision.prefill.node) if decision.prefill else None
        dec = self.registry.nodes.get(decision.decode.node) if decision.decode else None
        if pre is None or dec is None or not (pre.up and dec.up):
            if admit:
                raise Unavailable("no live prefill or decode node")
            return None
        rid = trip.attempt_id()
        self.state.dispatched(replace(info, request_id=rid), decision, now)
        if self.elastic is not None:
            self.elastic.dispatched(info, decision)
        return Attempt(rid, pre, dec, decision, colocated=colocated, streamed_before=len(trip.generated))

    def _place_resumed(self, trip: Trip, now: float) -> Attempt | None:
        """A decode node to continue the trip on, recomputing prompt + tokens so far there."""
        s = self.scheduler.settings.values
        done = len(trip.generated)
        info = replace(trip.info, input_tokens=trip.info.input_tokens + done,
                       expected_output_tokens=trip.params.max_tokens - done)
        choice = self.scheduler.policy(s.policy).choose_decode(self.registry.view, info, now, s, LoadBasis.CURRENT)
        dec = self.registry.nodes.get(choice.node) if choice else None
        if dec is None or not dec.up:
            return None
        rid = trip.attempt_id()
        self.state.placed_on_decode(replace(info, request_id=rid), choice.node, now)
        return Attempt(rid, None, dec, colocated=self.registry.colocated, streamed_before=done)

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

    def _tracked(self, attempt: Attempt) -> bool:
        """Does the cluster state still count `attempt`? (Not once a node it was on has been
        dropped from the view: that ended it there, and its trip ends on the node's `down`.)"""
        return self.state.request(attempt.rid) is not None

    def _close(self, trip: Trip, attempt: Attempt) -> None:
        """The one cleanup path of an attempt, whatever phase it ended in."""
        if attempt.renewer is not None:
            attempt.renewer.cancel()
        if attempt.holds_reservation:  # never claimed: give the blocks back now, not at lease expiry
            asyncio.ensure_future(self._release(attempt.dec, attempt.rid))
        if attempt.decode_call is not None and attempt.phase is not Phase.FINISHED:
            attempt.decode_call.cancel()  # the decode node aborts the request and frees its blocks
        if self._tracked(attempt):  # the first token came from the prefill; the rest were generated there
            streamed = len(trip.generated) - attempt.streamed_before
            self.state.finished(attempt.rid, self._clock(), generated_tokens=max(0, streamed - 1))
        attempt.phase = Phase.FINISHED

    # --- one attempt ----------------------------------------------------------------------
    def _node_failure(self, rec: NodeRecord, phase: Phase, e: grpc.aio.AioRpcError, what: str,
                      *, control: bool = False) -> NodeFailure | None:
        """A NodeFailure if `e` says `rec` cannot be reached (the registry takes it out of
        rotation); None if the node answered with an error of its own."""
        if self.registry.rpc_failed(rec, e, control=control):
            return NodeFailure(rec, phase, f"{what}: {e.code().name}: {e.details()}")
        return None

    async def _run(self, trip: Trip, attempt: Attempt) -> AsyncIterator[TokenChunk | Finished]:
        cfg, rid, ids = self.cfg, attempt.rid, trip.token_ids
        hashes = trip.info.block_hashes  # hashed once, at intake: the nodes check and reuse them
        sp = sampling_to_proto(trip.params)
        pre, dec = attempt.pre, attempt.dec
        if attempt.colocated or pre is None:  # the decode node computes the prompt (+ tokens so far) itself
            attempt.decode_call = dec.decode_stub.Decode(node_pb2.DecodeRequest(
                request_id=rid, prompt_token_ids=ids, sampling=sp, colocated=attempt.colocated,
                recompute=not attempt.colocated, resume_token_ids=trip.generated, block_hashes=hashes),
                timeout=cfg.request_timeout_s)
            attempt.enter(Phase.DECODING)
            async for item in self._stream(trip, attempt, None, trip.t0 if pre else self._clock()):
                yield item
            return
        try:
            resv = await or_down(dec.decode_stub.Reserve(
                node_pb2.ReserveRequest(request_id=rid, num_tokens=len(ids), lease_s=cfg.kv_lease_s),
                timeout=cfg.control_timeout_s), dec)
        except grpc.aio.AioRpcError as e:
            if e.code() not in RESERVE_REFUSALS and dec.up:
                # the node may have granted it after we stopped waiting (a deadline, a node
                # that answers late): give it back now rather than at lease expiry
                asyncio.ensure_future(self._release(dec, rid))
            if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                if self.metrics:
                    self.metrics.observe_rejected("decode_out_of_blocks")
                raise Rejected(f"decode_out_of_blocks: {e.details()}", 1.0) from None
            what = f"decode node {dec.node_id} could not reserve KV blocks"
            raise self._node_failure(dec, attempt.phase, e, what, control=True) or RequestFailed(
                f"{what}: {e.code().name}: {e.details()}") from None
        except NodeDown as e:
            raise NodeFailure(dec, attempt.phase, str(e)) from None
        except asyncio.CancelledError:  # the client left while Reserve was in flight
            if dec.up:
                asyncio.ensure_future(self._release(dec, rid))
            raise
        attempt.enter(Phase.RESERVED)
        if self._tracked(attempt):
            self.state.reserved(rid, len(resv.target.block_ids) * cfg.block_size)
        attempt.renewer = asyncio.ensure_future(self._keep_reserved(dec, rid))
        preq = node_pb2.PrefillRequest(request_id=rid, prompt_token_ids=ids, sampling=sp, target=resv.target,
                                       block_hashes=hashes)
        holder = self.registry.nodes.get(attempt.decision.prefill.pull_from or "")
        if holder is not None and holder.up:  # kv_centric: pull the prefix instead of recomputing it
            preq.pull.CopyFrom(node_pb2.PrefixSource(
                node_id=holder.node_id, address=holder.address, transfer_descriptor=holder.descriptor,
                num_blocks=attempt.decision.prefill.cached_blocks + attempt.decision.prefill.pulled_blocks))
        attempt.enter(Phase.PREFILLING)
        if self._tracked(attempt):
            self.state.prefill_started(rid, self._clock())
        presp = await self._prefill(trip, attempt, preq)
        attempt.renewer.cancel()
        attempt.renewer = None
        t_kv = self._clock()
        if self.metrics and presp is not None:
            self.metrics.observe_prediction("ttft", attempt.decision.prefill.ttft_s, t_kv - trip.t0)
        again = None
        if admission.judges_after_prefill(self.scheduler.settings.values.admission) and presp is not None:
            # judged before the request counts as landing on its decode node (as the simulator does)
            again = self.scheduler.decide_after_prefill(self.registry.view, trip.info, t_kv, attempt.decision).rejection
        if self._tracked(attempt):
            self.state.prefill_done(rid, t_kv)
        if again is not None:
            if self.metrics:
                self.metrics.observe_rejected(again.reason.value)
            raise Rejected(f"{again.reason.value} (after prefill): {again.detail}", again.retry_after_s)
        attempt.decode_call = dec.decode_stub.Decode(node_pb2.DecodeRequest(
            request_id=rid, prompt_token_ids=ids, sampling=sp, first_token=presp.first_token if presp else 0,
            first_tokens=presp.first_tokens if presp else (), first_logprobs=presp.first_logprobs if presp else (),
            num_cached_tokens=presp.num_cached_tokens if presp else 0, recompute=presp is None,
            kv_bytes=presp.kv_bytes if presp else 0, kv_transfer_s=presp.kv_transfer_s if presp else 0.0,
            block_hashes=hashes), timeout=cfg.request_timeout_s)
        attempt.enter(Phase.DECODING)  # Decode claims (or, recomputing, frees) the reservation
        async for item in self._stream(trip, attempt, presp, t_kv):
            yield item

    async def _prefill(self, trip: Trip, attempt: Attempt, preq) -> node_pb2.PrefillResponse | None:
        """The prefill call; None when the decode node is to recompute the prompt instead
        (`on_transfer_failure`: the KV transfer failed mid-way)."""
        pre, dec = attempt.pre, attempt.dec
        try:
            return await or_down(pre.prefill_stub.Prefill(preq, timeout=self.cfg.request_timeout_s), pre, dec)
        except NodeDown as e:
            raise NodeFailure(e.node, Phase.PREFILLING, str(e)) from None
        except grpc.aio.AioRpcError as e:
            code = e.code()
            if code == grpc.StatusCode.INVALID_ARGUMENT:
                raise InvalidRequestError("prompt", e.details()) from None
            failure = self._node_failure(pre, Phase.PREFILLING, e, f"prefill on {pre.node_id} failed")
            if failure is not None:  # the prefill node is gone: nothing streamed yet, place it again
                raise failure from None
            if code != grpc.StatusCode.ABORTED:
                raise RequestFailed(f"prefill on {pre.node_id} failed: {code.name}: {e.details()}") from None
            # the KV transfer failed mid-way: a decode node that went away takes the request
            # elsewhere; otherwise `on_transfer_failure` decides
            if not dec.up or not await self.registry.probe(dec):
                self.registry.mark_down(dec, f"KV transfer into it failed and it does not answer ({e.details()})",
                                        probe=True)
                raise NodeFailure(dec, Phase.PREFILLING, f"decode node {dec.node_id} went away during the KV "
                                                         f"transfer: {e.details()}") from None
            if self.cfg.on_transfer_failure != "recompute":
                raise RequestFailed(f"prefill on {pre.node_id} failed: {code.name}: {e.details()}") from None
            log.warning("%s: prefill on %s failed (%s: %s); decode node recomputes", trip.label, pre.node_id,
                        code.name, e.details())
            return None

    async def _stream(self, trip: Trip, attempt: Attempt, presp, t_kv: float) -> AsyncIterator[TokenChunk | Finished]:
        """Relay the decode node's stream; end with `Finished` carrying the TTFT breakdown
        (once every parallel sample has finished, when sampling.n > 1)."""
        dec = attempt.dec
        it = attempt.decode_call.__aiter__()
        n = trip.params.n
        ends: dict[int, SampleEnd] = {}
        joined = False
        while True:
            try:
                out = await or_down(it.__anext__(), dec)
            except StopAsyncIteration:
                raise RequestFailed(f"decode node {dec.node_id} ended the stream early") from None
            except grpc.aio.AioRpcError as e:
                what = f"decode node {dec.node_id} failed"
                raise self._node_failure(dec, Phase.DECODING, e, what) or RequestFailed(
                    f"{what}: {e.code().name}: {e.details()}") from None
            except NodeDown as e:
                raise NodeFailure(dec, Phase.DECODING, str(e)) from None
            if not joined:  # the attempt's first output: it is in the decode node's batch
                joined = True
                if self._tracked(attempt):
                    self.state.decode_joined(attempt.rid, self._clock())
            if trip.first_at is None:  # the first token of the trip: its TTFT breakdown
                now = self._clock()
                if attempt.decision is not None and attempt.decision.prefill is not None:
                    self.scheduler.calibration.observe(Quantity.TTFT, attempt.decision.prefill.ttft_s, now - trip.t0)
                    if self.metrics:
                        self.metrics.set_calibration("ttft", self.scheduler.calibration.factor(Quantity.TTFT))
                if self.elastic is not None:
                    self.elastic.observed(ttft_s=now - trip.t0)
                trip.first_at = now
                trip.prefill_node = attempt.pre.node_id if attempt.pre else dec.node_id
                trip.cached_tokens = presp.num_cached_tokens if presp else out.num_cached_tokens
                trip.queue_s = presp.queue_s if presp else 0.0
                trip.prefill_s = presp.prefill_s if presp else now - t_kv  # colocated/recompute: all of it
                trip.kv_transfer_s = presp.kv_transfer_s if presp else 0.0
                trip.first_decode_s = now - t_kv if presp else 0.0
            sample_done = n > 1 and out.finished
            if out.delta.token_ids or out.delta.text or sample_done:
                trip.generated.extend(out.delta.token_ids)  # n > 1: every sample's (such a trip never resumes)
                yield TokenChunk(out.delta.text, tuple(out.delta.token_ids), out.index,
                                 tuple(logprob_from_proto(lp) for lp in out.delta.logprobs),
                                 (out.finish_reason or "stop") if sample_done else None)
            if out.finished:
                ends[out.index] = SampleEnd(out.index, out.finish_reason or "stop", out.completion_tokens)
            if len(ends) == n:
                attempt.enter(Phase.FINISHED)
                out_tokens = len(trip.generated) - attempt.streamed_before
                if self.elastic is not None and attempt.decision is not None and out_tokens > 1 and n == 1:
                    self.elastic.observed(tbt_s=(self._clock() - trip.first_at) / (out_tokens - 1))
                timing = Timing(queue_s=trip.queue_s, prefill_s=trip.prefill_s, kv_transfer_s=trip.kv_transfer_s,
                                first_decode_s=trip.first_decode_s, ttft_s=trip.first_at - trip.t0)
                samples = tuple(ends[i] for i in sorted(ends))
                yield Finished(samples[0].finish_reason,
                               Usage(len(trip.token_ids), sum(e.completion_tokens for e in samples),
                                     trip.cached_tokens),
                               timing, trip.prefill_node, dec.node_id, samples if n > 1 else ())
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
                if self.registry.rpc_failed(dec, e, control=True):
                    return  # out of rotation: the prefill waiting on it ends (NodeDown)
                log.info("renewing %s on %s failed (%s); retrying", rid, dec.node_id, e.code().name)
                continue
            if not renewed.found:
                log.warning("reservation of %s on %s is gone; its prefill can no longer land", rid, dec.node_id)
                return

    async def _release(self, dec: NodeRecord, rid: str) -> None:
        try:
            await dec.decode_stub.Release(node_pb2.ReleaseRequest(request_id=rid), timeout=self.cfg.control_timeout_s)
        except grpc.aio.AioRpcError as e:
            self.registry.rpc_failed(dec, e, control=True)
            log.info("release of %s on %s failed (%s); its lease will free it", rid, dec.node_id, e.code().name)
