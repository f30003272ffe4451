"""A discrete-event simulation of a prefill/decode cluster driven by the conductor's own core.

Requests from a Mooncake-format trace arrive at their (sped-up) timestamps and go through the
conductor's `Scheduler` (policy + admission); every change of the view goes through
`ClusterState`, the object the live conductor feeds too, so this module is an adapter: it
simulates the nodes (`bench.sim.nodes`) and reports what they do, exactly where the live
conductor reports an RPC:

    arrival        scheduler.decide -> state.dispatched -> the decode node reserves KV for
                   the request (state.reserved; full: rejected `decode_out_of_blocks`, as a
                   live Reserve answers RESOURCE_EXHAUSTED) -> the prefill node has it
                   (state.prefill_started)
    prefill ends   state.prefill_done (per_stage: scheduler.decide_after_prefill), KV events
                   of the prefix cache into the index (state.kv_event), KV sent
    KV landed      the first token is out: state.decode_joined; the request joins the batch
                   at the next step boundary
    last token     state.finished (the one cleanup path; a rejection after placement uses it too)
    heartbeat      every `heartbeat_interval_s`, each node reports what it has
                   (state.heartbeat_prefill / heartbeat_decode), as live nodes do; a
                   decode node's steps since its last beat calibrate the TBT predictions

TTFT = queue + local load + pull + prefill + KV send. Predictions are logged against what
happened (queue, prefill, TTFT, TBT); `service_noise` makes prefill times deviate from the
cost model, `decode_time_scale` decode steps. Every request leaves a trail in `events` (`bench.sim.events` checks it).
"""
from __future__ import annotations

import bisect
import copy
import heapq
import math
import random
from dataclasses import dataclass, replace
from typing import cast

from mypy_extensions import mypyc_attr

from bench.sim.events import EventKind, Outcome, RequestEvent
from bench.sim.nodes import PrefillJob, SimDecode, SimPrefill
from conductor.cluster_state import ClusterState
from conductor.cost_model import CostModel, DecodeModel
from conductor.decision import Decision, RejectReason, Rejection, Stage
from conductor.modes import AdmissionMode, PolicyName
from conductor.prefix_index import GlobalPrefixIndex
from conductor.predictions import DecodeSteps, PredictionLog, Quantity
from conductor.request import NodeId, RequestInfo
from conductor.scheduler import Scheduler
from conductor.settings import ConductorSettings, SettingsValues
from engine.block_pool import REMOVED, STORED, KVEvent

# A decode node of the default model: 8 × 80 GB of HBM at 90% use, minus 141 GB of
# LLaMA3-70B weights, at 320 KiB of KV per token.
DEFAULT_DECODE_KV_TOKENS = 1_300_000
# A prefill node's KV cache in host DRAM: 6,000 blocks of 512 tokens = 1.0 TB.
DEFAULT_CACHE_BLOCKS = 6_000


@dataclass(frozen=True, slots=True, init=False)
class SimRequest:
    index: int
    arrival_s: float
    input_tokens: int
    output_tokens: int
    block_hashes: tuple[int, ...]

    # Written out (the fields, in order): a compiled dataclass's generated __init__ runs
    # interpreted. tests/bench/test_record_inits.py holds it to the fields.
    def __init__(self, index: int, arrival_s: float, input_tokens: int, output_tokens: int,
                 block_hashes: tuple[int, ...]) -> None:
        object.__setattr__(self, "index", index)
        object.__setattr__(self, "arrival_s", arrival_s)
        object.__setattr__(self, "input_tokens", input_tokens)
        object.__setattr__(self, "output_tokens", output_tokens)
        object.__setattr__(self, "block_hashes", block_hashes)


@dataclass(frozen=True, slots=True)
class SimConfig:
    prefill_nodes: int = 8
    decode_nodes: int = 8
    policy: PolicyName = SettingsValues().policy  # the conductor's default
    admission: AdmissionMode = AdmissionMode.NONE
    cache_blocks: int = DEFAULT_CACHE_BLOCKS  # per prefill instance
    decode_kv_tokens: int = DEFAULT_DECODE_KV_TOKENS  # per decode instance
    block_tokens: int = 512  # tokens per trace hash id
    ttft_slo_s: float = 30.0
    tbt_slo_s: float = 0.1  # the GPU-class cost model's SLO (the conductor's default suits its CPU model)
    prefill_reject_threshold: float = 1.0
    decode_reject_threshold: float = 1.0
    typical_output_tokens: int = 343  # the conversation trace's mean output length
    seed: int = 0
    # σ of a mean-one log-normal factor on every actual prefill time: the cost model is then
    # wrong the way a real engine's timing is, and the logged prediction error shows it.
    service_noise: float = 0.0
    # every simulated decode step takes this times the cost model's step: the model is then
    # wrong by a constant factor, which the TBT calibration (from decode heartbeats) learns
    decode_time_scale: float = 1.0
    heartbeat_interval_s: float = 1.0  # every node reports its load this often (0: never)
    record_events: bool = True  # keep every request's trail (off for very large runs)
    max_prediction_records: int | None = None  # per quantity (None: all; bound it for very large runs)

    def __post_init__(self) -> None:
        if self.prefill_nodes < 1 or self.decode_nodes < 1:
            raise ValueError("need at least one prefill and one decode instance")
        if self.cache_blocks < 0 or self.decode_kv_tokens < 1 or self.block_tokens < 1:
            raise ValueError("cache_blocks >= 0, decode_kv_tokens >= 1 and block_tokens >= 1 required")
        if not 0.0 < self.decode_time_scale <= 10.0:
            raise ValueError(f"decode_time_scale must be in (0, 10], got {self.decode_time_scale}")
        if not 0.0 <= self.service_noise <= 2.0:
            raise ValueError(f"service_noise must be in [0, 2], got {self.service_noise}")
        if self.heartbeat_interval_s < 0:
            raise ValueError(f"heartbeat_interval_s must be >= 0, got {self.heartbeat_interval_s}")

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


# its attributes, which its deepcopy walks (mypy, so mypyc, does not read `__slots__` through the class)
_REQUEST_STATE_FIELDS = ("req", "info", "outcome", "decision", "rejection", "rejected_after_prefill", "failure",
                         "prefill", "decode", "enqueued_s", "prefill_start_s", "prefill_end_s", "service_s",
                         "hit_blocks", "first_token_s", "finish_s", "join_step", "finish_step")


class RequestState:
    __slots__ = _REQUEST_STATE_FIELDS

    def __init__(self, req: SimRequest, info: RequestInfo) -> None:
        self.req = req
        self.info = info
        self.outcome = Outcome.PENDING
        self.decision: Decision | None = None
        self.rejection: Rejection | None = None
        self.rejected_after_prefill = False
        self.failure = ""
        self.prefill: SimPrefill | None = None
        self.decode: SimDecode | None = None
        self.enqueued_s = math.nan
        self.prefill_start_s = math.nan
        self.prefill_end_s = math.nan
        self.service_s = 0.0
        self.hit_blocks = 0
        self.first_token_s = math.nan
        self.finish_s = math.nan
        self.join_step = -1
        self.finish_step = -1

    def __deepcopy__(self, memo: dict) -> RequestState:
        """Its request, info and decisions are immutable (shared); its nodes are copied."""
        new = RequestState(self.req, self.info)  # (a compiled class's __new__ runs __init__ too)
        memo[id(self)] = new
        for name in _REQUEST_STATE_FIELDS:
            setattr(new, name, getattr(self, name))
        if self.prefill is not None:
            new.prefill = copy.deepcopy(self.prefill, memo)
        if self.decode is not None:
            new.decode = copy.deepcopy(self.decode, memo)
        return new

    @property
    def prefill_node(self) -> str:
        return self.prefill.node_id if self.prefill is not None else ""

    @property
    def decode_node(self) -> str:
        return self.decode.node_id if self.decode is not None else ""


# Event kinds (plain ints: compared millions of times per run); ties run in push order.
_PREFILL_DONE, _KV_ARRIVED, _SEGMENT_END, _HEARTBEAT, _TICK = 0, 1, 2, 3, 4


@dataclass(slots=True)
class SimRun:
    """Everything a finished simulation leaves behind, for metrics and checks."""

    config: SimConfig
    states: list[RequestState]
    events: list[RequestEvent]
    decode: list[SimDecode]  # every decode instance that ran (an elastic run's too)
    prefill: list[SimPrefill]
    state: ClusterState
    predictions: PredictionLog
    span_s: float  # first to last arrival, simulated seconds
    end_s: float  # when the last request finished

    @property
    def index(self) -> GlobalPrefixIndex:
        return self.state.index


# Subclassed by the tiered, elastic and counterfactual simulations, which stay interpreted
# when the core is compiled (`bench.sim.native`).
@mypyc_attr(allow_interpreted_subclasses=True)
class Simulation:
    def __init__(self, requests: list[SimRequest], config: SimConfig, costs: CostModel) -> None:
        self.config = config
        self.costs = costs
        self.now = 0.0
        self.settings = ConductorSettings(config.settings(), clock=lambda: self.now)
        self.scheduler = Scheduler(self.settings, costs, seed=config.seed)
        self.state = ClusterState(config.block_tokens)
        self.view = self.state.view
        k = config.decode_time_scale
        m = costs.decode
        self._decode_model = m if k == 1.0 else DecodeModel(m.s_1 * k, m.s_b * k, m.s_t * k)
        self.prefill_by_id: dict[str, SimPrefill] = {}
        self.decode_by_id: dict[str, SimDecode] = {}
        self.all_prefill: list[SimPrefill] = []
        self.all_decode: list[SimDecode] = []
        prefill_ids, decode_ids = self.initial_nodes()
        for node_id in prefill_ids:
            self.add_prefill(node_id)
        for node_id in decode_ids:
            self.add_decode(node_id)
        self.requests = requests
        self.states = [RequestState(r, RequestInfo(str(r.index), r.input_tokens, r.block_hashes, r.output_tokens))  # type: ignore[arg-type]
                       for r in requests]
        self.events: list[RequestEvent] = []
        self._record = config.record_events  # (a detail that takes formatting is built only when it is kept)
        self.predictions = PredictionLog(max_records=config.max_prediction_records)
        # The event queue: a heap of (time, push number, kind, payload, version) entries, so
        # ties run in push order; `version` is a segment end's (its node's end_version when
        # pushed), 0 for the other kinds. (Measured compiled: cheaper than a heap of times
        # with a dict of the events due at each, which hashes a float four times an event.)
        self._events: list[tuple[float, int, int, object, int]] = []
        self._pushed = 0
        self._noise = random.Random(config.seed + 1)
        self._next_arrival = 0
        self._in_flight = 0  # admitted and not ended
        self._max_kv = config.decode_kv_tokens
        # A counterfactual's decisions, by request index: on arrival, and (per_stage) after the
        # prefill (None there: no second verdict); absent: the scheduler decides.
        self.forced: dict[int, Decision] = {}
        self.forced_after: dict[int, Decision | None] = {}
        if config.heartbeat_interval_s > 0 and requests:
            self._push(requests[0].arrival_s + config.heartbeat_interval_s, _HEARTBEAT, None)

    @property
    def arrived(self) -> int:
        """Requests that have arrived so far (the loop's position in the trace)."""
        return self._next_arrival

    # -- nodes -------------------------------------------------------------------------------
    def initial_nodes(self) -> tuple[list[str], list[str]]:
        """Ids of the prefill and decode instances the run starts with."""
        c = self.config
        return [f"p{i}" for i in range(c.prefill_nodes)], [f"d{i}" for i in range(c.decode_nodes)]

    def add_prefill(self, node_id: str) -> SimPrefill:
        node = SimPrefill(node_id, self.config.cache_blocks)
        self.prefill_by_id[node_id] = node
        self.all_prefill.append(node)
        self.state.add_prefill(NodeId(node_id))
        return node

    def add_decode(self, node_id: str) -> SimDecode:
        node = SimDecode(node_id, self.config.decode_kv_tokens, self._decode_model)
        self.decode_by_id[node_id] = node
        self.all_decode.append(node)
        self.state.add_decode(NodeId(node_id), node.kv_capacity_tokens)
        return node

    # -- the loop ----------------------------------------------------------------------------
    def run(self) -> SimRun:
        self.run_until(math.inf)
        for st in self.states:
            if st.outcome is Outcome.PENDING:  # cannot happen unless a stage leaks requests
                self._fail(st, self.now, "simulation ended before the request finished")
        arrivals = [r.arrival_s for r in self.requests]
        span = (max(arrivals) - min(arrivals)) if arrivals else 0.0
        return SimRun(self.config, self.states, self.events, self.all_decode, self.all_prefill, self.state,
                      self.predictions, span, self.now)

    def run_until(self, stop_s: float, until=None) -> None:
        """Process events up to `stop_s` (or until `until()` holds after an event)."""
        events = self._events
        states = self.states
        total = len(states)
        pop = heapq.heappop
        i = self._next_arrival  # only this loop moves it
        next_arrival = states[i].req.arrival_s if i < total else math.inf
        while True:
            if events and events[0][0] <= next_arrival:
                t = events[0][0]
                if t > stop_s:
                    return
                _, _, kind, payload, version = pop(events)
                self.now = t
                if kind == _SEGMENT_END:
                    dec = cast(SimDecode, payload)
                    if version == dec.end_version:
                        self._segment_end(dec, t)
                elif kind == _PREFILL_DONE:
                    self._prefill_done(payload, t)  # type: ignore[arg-type]
                elif kind == _KV_ARRIVED:
                    self._kv_arrived(payload, t)  # type: ignore[arg-type]
                elif kind == _HEARTBEAT:
                    self._heartbeat(t)
                else:
                    self._tick(payload, t)
            elif i < total:
                if next_arrival > stop_s:
                    return
                self.now = next_arrival
                self._next_arrival = i + 1
                self._arrive(states[i], next_arrival)
                i += 1
                next_arrival = states[i].req.arrival_s if i < total else math.inf
            else:
                return
            if until is not None and until():
                return

    def _push(self, t: float, kind: int, payload: object, version: int = 0) -> None:
        n = self._pushed
        self._pushed = n + 1
        heapq.heappush(self._events, (t, n, kind, payload, version))

    def _log(self, t: float, st: RequestState, kind: EventKind, detail: str = "") -> None:
        if self._record:
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

    def _tick(self, payload, t: float) -> None:
        """A timer of a subclass (the elastic planner)."""

    # -- arrival and prefill -------------------------------------------------------------------
    def _arrive(self, st: RequestState, t: float) -> None:
        self._log(t, st, EventKind.ARRIVED)
        req = st.req
        need = req.input_tokens + req.output_tokens
        if need > self._max_kv:  # as the live intake answers INVALID_ARGUMENT: it can never fit
            self._fail(st, t, f"prompt + output ({need} tokens) exceed decode KV capacity {self._max_kv}")
            return
        decision = self.admit(st, t)
        st.decision = decision
        if decision.rejection is not None:
            self._reject(st, t, decision.rejection, after_prefill=False)
            return
        self._place(st, decision, t)

    def admit(self, st: RequestState, t: float) -> Decision:
        """The scheduler's verdict on arrival, unless `forced` says otherwise."""
        forced = self.forced.get(st.req.index)
        if forced is not None:
            return forced
        return self.scheduler.decide(self.view, st.info, t)

    def admit_after_prefill(self, st: RequestState, t: float) -> Decision | None:
        """per_stage: the scheduler's second verdict, after the prefill, unless `forced_after` says."""
        index = st.req.index
        if index in self.forced_after:
            return self.forced_after[index]
        return self.scheduler.decide_after_prefill(self.view, st.info, t, st.decision)  # type: ignore[arg-type]

    def fork(self, horizon_s: float, *, from_index: int | None = None) -> Simulation:
        """An independent copy of the simulation as it is now, with the arrivals of the next
        `horizon_s` seconds only (from request `from_index` on: the one arriving now, say),
        and no event trail or prediction log: what a counterfactual continues from."""
        if hasattr(Simulation, "__mypyc_attrs__"):  # compiled: its objects have no __dict__ to copy
            raise RuntimeError("a fork (counterfactual judging) needs the simulator's source core, "
                               "not the compiled one: run this program without bench.sim.native")
        first = self._next_arrival if from_index is None else from_index
        cls = type(self)
        new = cls.__new__(cls)
        memo: dict[int, object] = {id(self.costs): self.costs}
        for st in self.states:  # immutable: shared
            memo[id(st.req)] = st.req
            memo[id(st.info)] = st.info
        new.now = self.now
        new.settings = ConductorSettings(self.settings.values, clock=lambda: new.now)
        memo[id(self.settings)] = new.settings
        memo[id(self.events)] = []
        memo[id(self.predictions)] = PredictionLog(max_records=None)
        memo[id(self.forced)] = self.forced  # decisions are immutable; a fork gets its own dicts
        memo[id(self.forced_after)] = self.forced_after
        arrivals = [st.req.arrival_s for st in self.states]
        end = bisect.bisect_right(arrivals, self.now + horizon_s, lo=first)
        for key, value in self.__dict__.items():
            if key not in ("states", "requests", "settings", "now"):
                setattr(new, key, copy.deepcopy(value, memo))
        new.states = [copy.deepcopy(st, memo) for st in self.states[first:end]]
        new.requests = [st.req for st in new.states]
        new._next_arrival = 0
        new.config = replace(self.config, record_events=False)
        new._record = False
        return new

    def _place(self, st: RequestState, decision: Decision, t: float) -> None:
        pc, dc = decision.prefill, decision.decode
        assert pc is not None and dc is not None
        state, rid, n = self.state, st.info.request_id, st.req.input_tokens
        state.dispatched(st.info, decision, t)
        dec = self.decode_by_id[dc.node]
        need = n + st.req.output_tokens
        free = dec.free_tokens()
        if need > free:  # the decode node cannot reserve the KV: rejected before any work
            state.finished(rid, t)
            self._reject(st, t, Rejection(RejectReason.DECODE_OUT_OF_BLOCKS, Stage.ARRIVAL,
                                          f"decode node {dec.node_id}: {need} tokens of KV do not fit in {free} free",
                                          1.0), after_prefill=False)
            return
        dec.committed += need
        dec.residents += 1
        st.decode = dec
        state.reserved(rid, need)
        node = self.prefill_by_id[pc.node]
        st.prefill = node
        st.enqueued_s = t
        node.queue.append(PrefillJob(st, pc.service_s))
        node.queued_tokens += n
        state.prefill_started(rid, t)
        self._in_flight += 1
        if node.running is None:
            self._start_prefill(node, t)

    def _start_prefill(self, node: SimPrefill, t: float) -> None:
        job: PrefillJob = node.queue.popleft()
        st = job.state
        n = st.req.input_tokens
        node.queued_tokens -= n
        decision = st.decision
        assert decision is not None and decision.prefill is not None  # (placed: it was decided)
        choice = decision.prefill
        hashes = st.req.block_hashes
        local = node.depth(hashes)
        pulled = 0
        if choice.pull_from is not None:
            target = choice.cached_blocks + choice.pulled_blocks
            source = self.prefill_by_id.get(choice.pull_from)
            if local < target and source is not None:
                pulled = max(0, source.depth(hashes, target) - local)
        bt, costs = self.config.block_tokens, self.costs
        extra, extra_s = (0, 0.0) if pulled else self.lower_tier_hit(node, hashes, local, n)
        p_local = min(local * bt, n - 1)
        p_near = min((local + extra) * bt, n - 1)  # on the node: device, then its lower tiers
        p_total = min((local + extra + pulled) * bt, n - 1)
        service = (costs.local_load_s(p_local) + extra_s + costs.network_s(p_total - p_near)
                   + costs.prefill_s(n, p_total))
        sigma = self.config.service_noise
        if sigma:
            service *= self._noise.lognormvariate(-0.5 * sigma * sigma, sigma)
        st.prefill_start_s = t
        st.service_s = service
        st.hit_blocks = local + extra + pulled
        node.running = job
        node.run_start_s = t
        node.run_end_s = t + service
        node.run_uncached = n - p_total
        if self._record:
            self._log(t, st, EventKind.PREFILL_STARTED, f"{node.node_id} local={local} tiers={extra} pulled={pulled}")
        self._push(t + service, _PREFILL_DONE, node)

    def _prefill_done(self, node: SimPrefill, t: float) -> None:
        job = node.running
        assert job is not None
        st = job.state
        st.prefill_end_s = t
        self._cache_prompt(node, st.req.block_hashes)
        node.running = None
        decision = st.decision
        assert decision is not None and decision.prefill is not None
        choice = decision.prefill
        rid = st.info.request_id
        self.predictions.record(rid, Quantity.QUEUE, choice.queue_s, st.prefill_start_s - st.enqueued_s)
        self.predictions.record(rid, Quantity.PREFILL, job.predicted_service_s, st.service_s)
        self._log(t, st, EventKind.PREFILL_DONE)
        dec = st.decode
        assert dec is not None
        again = None
        if self.settings.values.admission is AdmissionMode.PER_STAGE:  # judged before it counts as landing there
            again = self.admit_after_prefill(st, t)
        self.state.prefill_done(rid, t)
        if node.queue:
            self._start_prefill(node, t)
        else:
            self.prefill_idle(node, t)
        if again is not None and again.rejection is not None:
            st.decision = again
            dec.committed -= st.req.input_tokens + st.req.output_tokens
            dec.residents -= 1
            self.state.finished(rid, t)
            self._in_flight -= 1
            self._reject(st, t, again.rejection, after_prefill=True)
            if dec.residents == 0:
                self.decode_idle(dec, t)
            return
        self._push(t + self.costs.network_s(st.req.input_tokens), _KV_ARRIVED, st)

    def prefill_idle(self, node: SimPrefill, t: float) -> None:
        """`node` has nothing left to do (a hook for the elastic planner)."""

    def decode_idle(self, node: SimDecode, t: float) -> None:
        """`node` may have nothing left to do (a hook for the elastic planner)."""

    def lower_tier_hit(self, node: SimPrefill, hashes, start: int, input_tokens: int) -> tuple[int, float]:
        """(blocks, load seconds) of the chain after `node`'s `start` device blocks that the
        tiers under the device hold (none here; `bench.sim.tiers` models them)."""
        return 0, 0.0

    def _cache_prompt(self, node: SimPrefill, hashes: tuple[int, ...]) -> list:
        """Cache every block of the prompt and publish what changed to the global index;
        returns the blocks the device evicted (`bench.sim.tiers` demotes them)."""
        new, evicted = node.store(hashes)
        node_id = NodeId(node.node_id)
        if new:
            self.state.kv_event(KVEvent(STORED, tuple(new), seq=node.seq, node=node_id))
            node.seq += 1
        if evicted:
            self.state.kv_event(KVEvent(REMOVED, tuple(evicted), seq=node.seq, node=node_id))
            node.seq += 1
        return evicted

    # -- decode --------------------------------------------------------------------------------
    def _kv_arrived(self, st: RequestState, t: float) -> None:
        dec = st.decode
        assert dec is not None
        n = st.req.input_tokens
        st.first_token_s = t
        self._log(t, st, EventKind.FIRST_TOKEN)
        if st.decision is not None and st.decision.prefill is not None:
            predicted = st.decision.prefill.ttft_s
            self.predictions.record(st.info.request_id, Quantity.TTFT, predicted, t - st.req.arrival_s)
            self.scheduler.calibration.observe(Quantity.TTFT, predicted, t - st.req.arrival_s)
        self.state.decode_joined(st.info.request_id, t)
        if st.req.output_tokens <= 1:
            self._finish(dec, st, t)
            return
        dec.pending.append(st)
        dec.pending_tokens += n + 1
        end = dec.cut_for_join(t) if dec.stepping else dec.start_segment(t)
        if end is not None:
            self._push(end, _SEGMENT_END, dec, dec.end_version)

    def _segment_end(self, dec: SimDecode, t: float) -> None:
        for st in dec.end_segment():
            self._finish(dec, st, t)
        end = dec.start_segment(t)
        if end is not None:
            self._push(end, _SEGMENT_END, dec, dec.end_version)

    def _finish(self, dec: SimDecode, st: RequestState, t: float) -> None:
        out = st.req.output_tokens
        st.finish_s = t
        st.outcome = Outcome.COMPLETED
        dec.residents -= 1
        dec.committed -= st.req.input_tokens + out
        self._in_flight -= 1
        self.state.finished(st.info.request_id, t, generated_tokens=max(0, out - 1))
        if out > 1 and st.decision is not None and st.decision.decode is not None:
            mean_gap = (t - st.first_token_s) / (out - 1)
            self.predictions.record(st.info.request_id, Quantity.TBT, st.decision.decode.predicted_tbt_s, mean_gap)
        self._log(t, st, EventKind.COMPLETED)
        self.completed(st, t)
        if dec.residents == 0:
            self.decode_idle(dec, t)

    def completed(self, st: RequestState, t: float) -> None:
        """`st` finished (a hook for a counterfactual run or the elastic planner)."""

    # -- heartbeats ------------------------------------------------------------------------------
    def _heartbeat(self, t: float) -> None:
        prefill_beat, decode_beat = self.state.heartbeat_prefill, self.state.heartbeat_decode
        for node_id, node in self.prefill_by_id.items():  # ids are NodeIds already
            prefill_beat(node_id, node.uncomputed_tokens(t), t, node.seq - 1)  # type: ignore[arg-type]
        observe = self.scheduler.observe_decode_steps
        for node_id, dec in self.decode_by_id.items():
            tokens, totals = dec.beat(t)
            window = decode_beat(node_id, running=dec.batch, waiting=len(dec.pending),  # type: ignore[arg-type]
                                 tokens_in_flight=tokens, used_tokens=dec.committed, now_s=t,
                                 steps=DecodeSteps(*totals))
            if window is not None:
                observe(window)
        if self._next_arrival < len(self.states) or self._in_flight > 0:
            self._push(t + self.config.heartbeat_interval_s, _HEARTBEAT, None)


def simulate(requests: list[SimRequest], config: SimConfig, costs: CostModel) -> SimRun:
    return Simulation(requests, config, costs).run()
