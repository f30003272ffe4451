"""A discrete-event simulation of a prefill/decode cluster driven by the real scheduling core.

Requests from a Mooncake-format trace arrive at their (sped-up) timestamps and go through the
conductor's own `Scheduler` (policy + admission), `ClusterView` and `GlobalPrefixIndex`; only
the nodes are simulated, with the same `CostModel` that the scheduler predicts with:

- **prefill instance**: a FIFO queue; on start it reuses the leading blocks in its own cache
  (an LRU of `cache_blocks` blocks), pulls further blocks from a peer when the decision says
  so (and the peer still has them), and is busy for local load + pull + prefill time; when
  done it caches every block of the prompt and publishes `BlockStored` / `BlockRemoved`
  events to the index.
- **decode instance**: reserves KV for prompt + output (as if `max_tokens` = the trace's
  output length; a FIFO of waiting requests when full), receives the KV after a network
  transfer, and runs continuous-batching steps of `decode_step_s(batch, tokens in flight)`;
  a request joins at the next step boundary and leaves after `output_length - 1` steps.

The first token is sampled at the end of the prefill and reaches the client when the KV has
landed on the decode node, so TTFT = queue + local load + pull + prefill + KV send (+ any
wait for decode memory). The conductor's view is updated the way the live conductor does it:
a dispatch adds its predicted service time to `busy_until_s`, a start or finish corrects it,
decode nodes report their batch and KV, and each request pairs with its decode node on
arrival (counted there as incoming until its prefill ends). Predictions are logged against
what happened (queue, prefill, TTFT, TBT); `service_noise` makes prefill times deviate from
the cost model.

Every request leaves a trail in `events` (`bench.sim_events`, which also checks it).
"""
from __future__ import annotations

import heapq
import math
import random
from collections import OrderedDict, deque
from dataclasses import dataclass, field

from bench.sim_events import EventKind, Outcome, RequestEvent
from conductor.cost_model import CostModel
from conductor.decision import Decision, Rejection
from conductor.kv_events import BlockRemoved, BlockStored
from conductor.modes import AdmissionMode, PolicyName
from conductor.predictions import PredictionLog, Quantity
from conductor.prefix_index import GlobalPrefixIndex
from conductor.request import NodeId, RequestInfo
from conductor.scheduler import Scheduler
from conductor.settings import ConductorSettings, SettingsValues
from conductor.view import ClusterView, DecodeNodeView, DecodeResident, PrefillNodeView

# A decode node of the default model: 8 × 80 GB of HBM at 90% use, minus 141 GB of
# LLaMA3-70B weights, at 320 KiB of KV per token.
DEFAULT_DECODE_KV_TOKENS = 1_300_000
# A prefill node's KV cache in host DRAM: 6,000 blocks of 512 tokens = 1.0 TB.
DEFAULT_CACHE_BLOCKS = 6_000


@dataclass(frozen=True, slots=True)
class SimRequest:
    index: int
    arrival_s: float
    input_tokens: int
    output_tokens: int
    block_hashes: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class SimConfig:
    prefill_nodes: int = 8
    decode_nodes: int = 8
    policy: PolicyName = PolicyName.KV_CENTRIC
    admission: AdmissionMode = AdmissionMode.NONE
    cache_blocks: int = DEFAULT_CACHE_BLOCKS  # per prefill instance
    decode_kv_tokens: int = DEFAULT_DECODE_KV_TOKENS  # per decode instance
    block_tokens: int = 512  # tokens per trace hash id
    ttft_slo_s: float = 30.0
    tbt_slo_s: float = 0.1
    prefill_reject_threshold: float = 1.0
    decode_reject_threshold: float = 1.0
    typical_output_tokens: int = 343  # the conversation trace's mean output length
    seed: int = 0
    # σ of a mean-one log-normal factor on every actual prefill time: the cost model is then
    # wrong the way a real engine's timing is, and the logged prediction error shows it.
    service_noise: float = 0.0

    def __post_init__(self) -> None:
        if self.prefill_nodes < 1 or self.decode_nodes < 1:
            raise ValueError("need at least one prefill and one decode instance")
        if self.cache_blocks < 0 or self.decode_kv_tokens < 1 or self.block_tokens < 1:
            raise ValueError("cache_blocks >= 0, decode_kv_tokens >= 1 and block_tokens >= 1 required")
        if not 0.0 <= self.service_noise <= 2.0:
            raise ValueError(f"service_noise must be in [0, 2], got {self.service_noise}")

    def settings(self) -> SettingsValues:
        return SettingsValues(
            ttft_slo_s=self.ttft_slo_s,
            tbt_slo_s=self.tbt_slo_s,
            prefill_reject_threshold=self.prefill_reject_threshold,
            decode_reject_threshold=self.decode_reject_threshold,
            admission=self.admission,
            policy=self.policy,
            typical_output_tokens=self.typical_output_tokens,
        )


@dataclass(slots=True)
class RequestState:
    req: SimRequest
    info: RequestInfo
    outcome: Outcome = Outcome.PENDING
    decision: Decision | None = None
    rejection: Rejection | None = None
    rejected_after_prefill: bool = False
    failure: str = ""
    prefill_node: int = -1
    decode_node: int = -1
    enqueued_s: float = math.nan
    prefill_start_s: float = math.nan
    prefill_end_s: float = math.nan
    service_s: float = 0.0
    hit_blocks: int = 0
    first_token_s: float = math.nan
    finish_s: float = math.nan
    join_step: int = -1
    finish_step: int = -1


# Heap event kinds (plain ints: compared a million times per run); ties run in push order.
_PREFILL_DONE, _KV_ARRIVED, _STEP_END = 0, 1, 2


@dataclass(slots=True)
class _Job:
    state: RequestState
    predicted_service_s: float


@dataclass(slots=True)
class SimPrefill:
    view: PrefillNodeView
    capacity: int
    cache: OrderedDict = field(default_factory=OrderedDict)  # block hash -> None, LRU first
    queue: deque = field(default_factory=deque)
    running: _Job | None = None
    queued_predicted_s: float = 0.0
    seq: int = 0

    def depth(self, hashes: tuple[int, ...], limit: int | None = None) -> int:
        """Leading blocks of `hashes` cached here, touched in the LRU (children first, so a
        chain is evicted from its tail)."""
        cache = self.cache
        end = len(hashes) if limit is None else min(limit, len(hashes))
        d = 0
        while d < end and hashes[d] in cache:
            d += 1
        for i in range(d - 1, -1, -1):
            cache.move_to_end(hashes[i])
        return d


@dataclass(slots=True)
class SimDecode:
    view: DecodeNodeView
    waiting: deque = field(default_factory=deque)
    pending: list = field(default_factory=list)  # KV arrived, joins at the next step
    finishing: list = field(default_factory=list)  # heap of (finish_step, index, state)
    batch: int = 0
    tokens: int = 0
    reserved: int = 0
    step_count: int = 0
    stepping: bool = False
    step_batch: int = 0
    step_duration: float = 0.0
    step_ends: list = field(default_factory=list)
    step_durations: list = field(default_factory=list)
    step_batches: list = field(default_factory=list)


@dataclass(slots=True)
class SimRun:
    """Everything a finished simulation leaves behind, for metrics and checks."""

    config: SimConfig
    states: list[RequestState]
    events: list[RequestEvent]
    decode: list[SimDecode]
    prefill: list[SimPrefill]
    index: GlobalPrefixIndex
    predictions: PredictionLog
    span_s: float  # first to last arrival, simulated seconds
    end_s: float  # when the last request finished


class Simulation:
    def __init__(self, requests: list[SimRequest], config: SimConfig, costs: CostModel) -> None:
        self.config = config
        self.costs = costs
        self.now = 0.0
        self.settings = ConductorSettings(config.settings(), clock=lambda: self.now)
        self.scheduler = Scheduler(self.settings, costs, seed=config.seed)
        self.index = GlobalPrefixIndex()
        self.prefill = [
            SimPrefill(PrefillNodeView(NodeId(f"p{i}")), config.cache_blocks) for i in range(config.prefill_nodes)
        ]
        self.decode = [
            SimDecode(DecodeNodeView(NodeId(f"d{i}"), config.decode_kv_tokens)) for i in range(config.decode_nodes)
        ]
        self._prefill_by_id = {p.view.node_id: i for i, p in enumerate(self.prefill)}
        self._decode_by_id = {d.view.node_id: i for i, d in enumerate(self.decode)}
        self.view = ClusterView(
            prefill=[p.view for p in self.prefill],
            decode=[d.view for d in self.decode],
            index=self.index,
            block_tokens=config.block_tokens,
        )
        self.requests = requests
        self.states = [
            RequestState(r, RequestInfo(str(r.index), r.input_tokens, r.block_hashes)) for r in requests
        ]  # type: ignore[arg-type]
        self.events: list[RequestEvent] = []
        self.predictions = PredictionLog(max_records=None)
        self._heap: list[tuple[float, int, int, object]] = []
        self._decode_model = costs.decode
        self._noise = random.Random(config.seed + 1)
        self._seq = 0

    # -- the loop ----------------------------------------------------------------------------
    def run(self) -> SimRun:
        heap = self._heap
        states = self.states
        i, total = 0, len(states)
        while True:
            next_arrival = states[i].req.arrival_s if i < total else math.inf
            if heap and heap[0][0] <= next_arrival:
                t, _, kind, payload = heapq.heappop(heap)
                self.now = t
                if kind == _STEP_END:
                    self._step_end(payload, t)  # type: ignore[arg-type]
                elif kind == _PREFILL_DONE:
                    self._prefill_done(payload, t)  # type: ignore[arg-type]
                else:
                    self._kv_arrived(payload, t)  # type: ignore[arg-type]
            elif i < total:
                self.now = next_arrival
                self._arrive(states[i], next_arrival)
                i += 1
            else:
                break
        for st in states:
            if st.outcome is Outcome.PENDING:  # cannot happen unless a stage leaks requests
                self._fail(st, self.now, "simulation ended before the request finished")
        arrivals = [r.arrival_s for r in self.requests]
        span = (max(arrivals) - min(arrivals)) if arrivals else 0.0
        return SimRun(self.config, states, self.events, self.decode, self.prefill, self.index,
                      self.predictions, span, self.now)

    def _push(self, t: float, kind: int, payload: object) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (t, self._seq, kind, payload))

    def _log(self, t: float, st: RequestState, kind: EventKind, detail: str = "") -> None:
        self.events.append(RequestEvent(t, st.req.index, kind, detail))

    def _reject(self, st: RequestState, t: float, rejection: Rejection, after_prefill: bool) -> None:
        st.outcome = Outcome.REJECTED
        st.rejection = rejection
        st.rejected_after_prefill = after_prefill
        self._log(t, st, EventKind.REJECTED, f"{rejection.reason}@{rejection.stage}: {rejection.detail}")

    def _fail(self, st: RequestState, t: float, reason: str) -> None:
        st.outcome = Outcome.FAILED
        st.failure = reason
        self._log(t, st, EventKind.FAILED, reason)

    # -- arrival and prefill -------------------------------------------------------------------
    def _arrive(self, st: RequestState, t: float) -> None:
        self._log(t, st, EventKind.ARRIVED)
        decision = self.scheduler.decide(self.view, st.info, t)
        st.decision = decision
        if decision.rejection is not None:
            self._reject(st, t, decision.rejection, after_prefill=False)
            return
        choice = decision.prefill
        assert choice is not None
        assert decision.decode is not None
        self._assign_decode(st, decision.decode.node, t + choice.ttft_s)
        node = self.prefill[self._prefill_by_id[choice.node]]
        st.prefill_node = self._prefill_by_id[choice.node]
        st.enqueued_s = t
        view = node.view
        view.queued_requests += 1
        view.busy_until_s = max(view.busy_until_s, t) + choice.service_s
        node.queue.append(_Job(st, choice.service_s))
        node.queued_predicted_s += choice.service_s
        if node.running is None:
            self._start_prefill(node, t)

    def _start_prefill(self, node: SimPrefill, t: float) -> None:
        job: _Job = node.queue.popleft()
        node.queued_predicted_s -= job.predicted_service_s
        if not node.queue:
            node.queued_predicted_s = 0.0  # no float drift across an idle period
        st = job.state
        choice = st.decision.prefill  # type: ignore[union-attr]
        hashes = st.req.block_hashes
        local = node.depth(hashes)
        pulled = 0
        if choice.pull_from is not None:
            target = choice.cached_blocks + choice.pulled_blocks
            if local < target:
                source = self.prefill[self._prefill_by_id[choice.pull_from]]
                pulled = max(0, source.depth(hashes, target) - local)
        n, bt, costs = st.req.input_tokens, self.config.block_tokens, self.costs
        p_local = min(local * bt, n - 1)
        p_total = min((local + pulled) * bt, n - 1)
        service = costs.local_load_s(p_local) + costs.network_s(p_total - p_local) + costs.prefill_s(n, p_total)
        sigma = self.config.service_noise
        if sigma:
            service *= self._noise.lognormvariate(-0.5 * sigma * sigma, sigma)
        st.prefill_start_s = t
        st.service_s = service
        st.hit_blocks = local + pulled
        node.running = job
        node.view.busy_until_s = t + service + node.queued_predicted_s
        self._log(t, st, EventKind.PREFILL_STARTED, f"{node.view.node_id} local={local} pulled={pulled}")
        self._push(t + service, _PREFILL_DONE, node)

    def _prefill_done(self, node: SimPrefill, t: float) -> None:
        job = node.running
        assert job is not None
        st = job.state
        st.prefill_end_s = t
        self._cache_prompt(node, st.req.block_hashes)
        node.view.queued_requests -= 1
        node.running = None
        choice = st.decision.prefill  # type: ignore[union-attr]
        rid = st.info.request_id
        self.predictions.record(rid, Quantity.QUEUE, choice.queue_s, st.prefill_start_s - st.enqueued_s)
        self.predictions.record(rid, Quantity.PREFILL, job.predicted_service_s, st.service_s)
        self._log(t, st, EventKind.PREFILL_DONE)
        if node.queue:
            self._start_prefill(node, t)
        else:
            node.view.busy_until_s = t
        paired = self.decode[st.decode_node].view
        paired.incoming -= 1
        paired.incoming_tokens -= st.req.input_tokens
        decision = self.scheduler.decide_after_prefill(self.view, st.info, t, st.decision)  # type: ignore[arg-type]
        st.decision = decision
        if decision.rejection is not None:
            paired.residents.pop(st.info.request_id, None)
            self._reject(st, t, decision.rejection, after_prefill=True)
            return
        assert decision.decode is not None
        if decision.decode.node != paired.node_id:  # the paired node went away
            paired.residents.pop(st.info.request_id, None)
            self._assign_decode(st, decision.decode.node, t)
            self.decode[st.decode_node].view.incoming -= 1
            self.decode[st.decode_node].view.incoming_tokens -= st.req.input_tokens
        self._reserve_or_wait(self.decode[st.decode_node], st, t)

    def _cache_prompt(self, node: SimPrefill, hashes: tuple[int, ...]) -> None:
        """Cache every block of the prompt (tail first, so the head stays most recent) and
        publish what changed to the global index."""
        cache = node.cache
        if node.capacity == 0:
            return
        new = [h for h in hashes if h not in cache]
        for h in reversed(hashes):
            if h in cache:
                cache.move_to_end(h)
            else:
                cache[h] = None
        evicted = []
        while len(cache) > node.capacity:
            evicted.append(cache.popitem(last=False)[0])
        node_id = node.view.node_id
        if new:
            self.index.apply(BlockStored(node_id, node.seq, tuple(new)))
            node.seq += 1
        if evicted:
            self.index.apply(BlockRemoved(node_id, node.seq, tuple(evicted)))
            node.seq += 1

    # -- decode --------------------------------------------------------------------------------
    def _assign_decode(self, st: RequestState, node_id: NodeId, ready_at_s: float) -> None:
        """Pair `st` with a decode node: it counts there as incoming until its prefill ends."""
        st.decode_node = self._decode_by_id[node_id]
        rid = st.info.request_id
        view = self.decode[st.decode_node].view
        view.residents[rid] = DecodeResident(rid, st.req.input_tokens, ready_at_s)
        view.incoming += 1
        view.incoming_tokens += st.req.input_tokens

    def _reserve_or_wait(self, dec: SimDecode, st: RequestState, t: float) -> None:
        need = st.req.input_tokens + st.req.output_tokens
        view = dec.view
        if need > view.kv_capacity_tokens:
            view.residents.pop(st.info.request_id, None)
            self._fail(st, t, f"prompt + output ({need} tokens) exceed decode KV capacity {view.kv_capacity_tokens}")
            return
        if not dec.waiting and dec.reserved + need <= view.kv_capacity_tokens:
            self._reserve(dec, st, t)
        else:
            dec.waiting.append(st)
            view.waiting += 1
            view.waiting_tokens += st.req.input_tokens

    def _reserve(self, dec: SimDecode, st: RequestState, t: float) -> None:
        dec.reserved += st.req.input_tokens + st.req.output_tokens
        dec.view.reserved_tokens = dec.reserved
        self._push(t + self.costs.network_s(st.req.input_tokens), _KV_ARRIVED, st)

    def _kv_arrived(self, st: RequestState, t: float) -> None:
        dec = self.decode[st.decode_node]
        st.first_token_s = t
        self._log(t, st, EventKind.FIRST_TOKEN)
        if st.decision is not None and st.decision.prefill is not None:
            self.predictions.record(st.info.request_id, Quantity.TTFT, st.decision.prefill.ttft_s, t - st.req.arrival_s)
        resident = dec.view.residents.get(st.info.request_id)
        if resident is not None:
            resident.ready_at_s = t
            resident.running = True
        if st.req.output_tokens <= 1:
            self._finish(dec, st, t, tokens_held=0)
            self._admit_waiting(dec, t)
            return
        dec.pending.append(st)
        dec.tokens += st.req.input_tokens + 1
        dec.view.running += 1
        dec.view.tokens_in_flight = dec.tokens
        if not dec.stepping:
            self._start_step(dec, t)

    def _start_step(self, dec: SimDecode, t: float) -> None:
        if dec.pending:
            for st in dec.pending:
                st.join_step = dec.step_count
                st.finish_step = dec.step_count + st.req.output_tokens - 1
                heapq.heappush(dec.finishing, (st.finish_step, st.req.index, st))
            dec.batch += len(dec.pending)
            dec.pending.clear()
        dec.stepping = True
        b = dec.step_batch = dec.batch
        m = self._decode_model  # decode_step_s inlined: this runs once per simulated step
        duration = m.s_1 + m.s_b * b + m.s_t * dec.tokens
        dec.step_duration = duration if duration > 0.0 else 0.0
        self._seq += 1
        heapq.heappush(self._heap, (t + dec.step_duration, self._seq, _STEP_END, dec))

    def _step_end(self, dec: SimDecode, t: float) -> None:
        dec.step_ends.append(t)
        dec.step_durations.append(dec.step_duration)
        dec.step_batches.append(dec.step_batch)
        count = dec.step_count = dec.step_count + 1
        dec.tokens += dec.step_batch
        finishing = dec.finishing
        if finishing and finishing[0][0] <= count:
            while finishing and finishing[0][0] <= count:
                _, _, st = heapq.heappop(finishing)
                dec.batch -= 1
                self._finish(dec, st, t, tokens_held=st.req.input_tokens + st.req.output_tokens)
            dec.view.tokens_in_flight = dec.tokens
            self._admit_waiting(dec, t)
        else:
            dec.view.tokens_in_flight = dec.tokens
        if dec.batch or dec.pending:
            self._start_step(dec, t)
        else:
            dec.stepping = False

    def _finish(self, dec: SimDecode, st: RequestState, t: float, tokens_held: int) -> None:
        view = dec.view
        need = st.req.input_tokens + st.req.output_tokens
        dec.reserved -= need
        view.reserved_tokens = dec.reserved
        if tokens_held:
            dec.tokens -= tokens_held
            view.running -= 1
            view.tokens_in_flight = dec.tokens
        view.residents.pop(st.info.request_id, None)
        st.finish_s = t
        st.outcome = Outcome.COMPLETED
        out = st.req.output_tokens
        if out > 1 and st.decision is not None and st.decision.decode is not None:
            mean_gap = (t - st.first_token_s) / (out - 1)
            self.predictions.record(st.info.request_id, Quantity.TBT, st.decision.decode.predicted_tbt_s, mean_gap)
        self._log(t, st, EventKind.COMPLETED)

    def _admit_waiting(self, dec: SimDecode, t: float) -> None:
        view = dec.view
        while dec.waiting:
            st = dec.waiting[0]
            need = st.req.input_tokens + st.req.output_tokens
            if dec.reserved + need > view.kv_capacity_tokens:
                break
            dec.waiting.popleft()
            view.waiting -= 1
            view.waiting_tokens -= st.req.input_tokens
            self._reserve(dec, st, t)


def simulate(requests: list[SimRequest], config: SimConfig, costs: CostModel) -> SimRun:
    return Simulation(requests, config, costs).run()
