"""Every Prometheus metric halfmoon exports, named once, and the typed recorders servers call.

Names follow vLLM's convention with our prefix: `halfmoon:<what>_<unit>`; counters end in
`_total`. Each process passes its own `CollectorRegistry`: nothing registers globally, so
tests and several in-process components never clash. This module is a leaf (it imports
only prometheus_client), so the conductor and both node kinds may use it; it lives in
`conductor` so that the conductor needs nothing of `cluster`; the launchers and node
processes import it from here too.

Who exports what (so a `sum()` over all scrape targets never counts a thing twice):
- the conductor (`ConductorMetrics`): request timings measured at the front door (TTFT and
  its parts, token gaps = TBT, end to end), outcomes (finished by reason, rejected by
  reason, failed), predictor error and calibration, node liveness and the admission
  settings in force;
- every node (`NodeMetrics`, labels `node`, `role`): its load (running / waiting requests,
  KV blocks used / free), prefix-cache lookups and hits counted in *tokens*, and the KV
  bytes it sent (prefill) or received (decode);
- the HTTP frontend (`HttpMetrics`): responses by route and status.
"""
from __future__ import annotations

import json
import math
import os
import threading
import time
import weakref
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Literal, Sequence, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest

if TYPE_CHECKING:
    from conductor.frontend_api import Finished

Role = Literal["prefill", "decode", "colocated"]
PredictionKind = Literal["ttft", "tbt"]
_ROLES = ("prefill", "decode", "colocated")
_PREDICTION_KINDS = ("ttft", "tbt")


class Kind(Enum):
    COUNTER = "counter"
    GAUGE = "gauge"
    HISTOGRAM = "histogram"


@dataclass(frozen=True, slots=True)
class MetricSpec:
    name: str  # as exposed; a counter's name ends in _total
    kind: Kind
    help: str
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()  # histograms only


TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 60.0, 120.0)
GAP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0)
E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)
TRANSFER_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
ERROR_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

_H, _C, _G = Kind.HISTOGRAM, Kind.COUNTER, Kind.GAUGE
_NODE = ("node", "role")

# --- the conductor -------------------------------------------------------------------
TTFT = MetricSpec(
    "halfmoon:time_to_first_token_seconds", _H, "Client send to first token, at the conductor.", buckets=TTFT_BUCKETS,
)
INTER_TOKEN_LATENCY = MetricSpec(
    "halfmoon:inter_token_latency_seconds", _H, "Gap between consecutive streamed tokens (TBT).", buckets=GAP_BUCKETS,
)
REQUEST_TBT = MetricSpec(
    "halfmoon:request_tbt_seconds",
    _H,
    "Per-request TBT as the SLO reads it: mean of the request's longest 10% of token gaps.",
    buckets=GAP_BUCKETS,
)
E2E_LATENCY = MetricSpec(
    "halfmoon:e2e_request_latency_seconds", _H, "Client send to the last token, at the conductor.", buckets=E2E_BUCKETS,
)
TTFT_QUEUE = MetricSpec(
    "halfmoon:ttft_queue_seconds", _H, "TTFT part: waiting for the prefill node.", buckets=TTFT_BUCKETS,
)
TTFT_PREFILL = MetricSpec(
    "halfmoon:ttft_prefill_seconds", _H, "TTFT part: computing the prompt's KV.", buckets=TTFT_BUCKETS,
)
TTFT_KV_TRANSFER = MetricSpec(
    "halfmoon:ttft_kv_transfer_seconds",
    _H,
    "TTFT part: moving the prompt's KV to the decode node.",
    buckets=TTFT_BUCKETS,
)
TTFT_FIRST_DECODE = MetricSpec(
    "halfmoon:ttft_first_decode_seconds", _H,
    "TTFT part: the prefill node's answer in -> the decode node's first output in (the Decode call, its wait "
    "for the decode engine thread, the first token back).", buckets=TTFT_BUCKETS,
)
PROMPT_TOKENS = MetricSpec("halfmoon:prompt_tokens_total", _C, "Prompt tokens of finished requests.")
GENERATION_TOKENS = MetricSpec("halfmoon:generation_tokens_total", _C, "Generated tokens of finished requests.")
REQUEST_SUCCESS = MetricSpec(
    "halfmoon:request_success_total", _C, "Requests that finished, by finish reason.", ("finish_reason",),
)
REQUESTS_REJECTED = MetricSpec(
    "halfmoon:requests_rejected_total", _C, "Requests refused by admission control, by reason.", ("reason",),
)
REQUESTS_FAILED = MetricSpec(
    "halfmoon:requests_failed_total", _C, "Admitted requests that could not finish, by reason.", ("reason",),
)
PREDICTION_ERROR = MetricSpec(
    "halfmoon:prediction_error_seconds",
    _H,
    "Absolute error of the conductor's TTFT / TBT predictions.",
    ("kind",),
    ERROR_BUCKETS,
)
CALIBRATION = MetricSpec(
    "halfmoon:prediction_calibration_factor", _G,
    "Measured / predicted ratio admission multiplies its predictions by, by kind (ttft: requests' TTFT; tbt: "
    "decode steps against the cost model's); 1 until enough samples.", ("kind",),
)
NODE_UP = MetricSpec("halfmoon:node_up", _G, "1 while the conductor hears a node's heartbeats, else 0.", _NODE)
SLO_SECONDS = MetricSpec("halfmoon:slo_seconds", _G, "SLOs in force, by kind (ttft, tbt).", ("kind",))
ADMISSION_INFO = MetricSpec(
    "halfmoon:admission_info", _G, "1 for the routing policy and admission mode in force.", ("policy", "admission"),
)
SETTINGS_CHANGES = MetricSpec(
    "halfmoon:settings_changes_total", _C, "Runtime changes of SLOs, policy or admission mode.",
)
REQUESTS_RETRIED = MetricSpec(
    "halfmoon:requests_retried_total",
    _C,
    "Requests placed again after a node failed before any token reached the client, by the phase it failed in.",
    ("phase",),
)
REQUESTS_MIGRATED = MetricSpec(
    "halfmoon:requests_migrated_total",
    _C,
    "Requests whose decode node failed mid-stream, continued on another decode node.",
)

# --- every node -------------------------------------------------------------------------
REQUESTS_RUNNING = MetricSpec("halfmoon:num_requests_running", _G, "Requests the node is computing.", _NODE)
REQUESTS_WAITING = MetricSpec("halfmoon:num_requests_waiting", _G, "Requests queued at the node.", _NODE)
KV_BLOCKS_USED = MetricSpec("halfmoon:kv_blocks_used", _G, "KV blocks held by requests (or reserved for them).", _NODE)
KV_BLOCKS_FREE = MetricSpec("halfmoon:kv_blocks_free", _G, "KV blocks free (including evictable cached ones).", _NODE)
PREFIX_CACHE_QUERIES = MetricSpec(
    "halfmoon:prefix_cache_queries_total", _C, "Prompt tokens looked up in the prefix cache.", _NODE,
)
PREFIX_CACHE_HITS = MetricSpec(
    "halfmoon:prefix_cache_hits_total", _C, "Prompt tokens found in the prefix cache.", _NODE,
)
KV_TRANSFER_BYTES = MetricSpec(
    "halfmoon:kv_transfer_bytes_total", _C, "KV bytes sent (prefill) or received (decode).", _NODE,
)
KV_TRANSFER_SECONDS = MetricSpec(
    "halfmoon:kv_transfer_seconds", _H, "Duration of one KV write between nodes.", _NODE, TRANSFER_BUCKETS,
)
KV_TRANSFER_FAILURES = MetricSpec("halfmoon:kv_transfer_failures_total", _C, "KV writes that failed.", _NODE)
RECOMPUTED_PREFILLS = MetricSpec(
    "halfmoon:recomputed_prefills_total", _C, "Prefills a decode node recomputed after a failed KV transfer.", _NODE,
)
KV_LEASE_EXPIRED = MetricSpec(
    "halfmoon:kv_lease_expired_blocks_total", _C, "Reserved KV blocks freed because their lease ran out.", _NODE,
)
BLOCK_HASHES_REFUSED = MetricSpec(
    "halfmoon:block_hashes_refused_total",
    _C,
    "Block-hash chains sent with requests (the conductor's, of the prompt) that failed the node's check: "
    "the node hashed the prompt itself (a conductor of another block size or hash version).",
    _NODE,
)
KV_BLOCKS_RECLAIMED = MetricSpec(
    "halfmoon:kv_blocks_reclaimed_total",
    _C,
    "Leaked KV blocks (held by no live request, reservation or pin) the periodic block audit freed.",
    _NODE,
)

# --- every node's KV tiers (engine/tiers) --------------------------------------------------
TIER_LOAD_BUCKETS = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0)  # = engine/tiers/stats.py
KV_TIER_HITS = MetricSpec(
    "halfmoon:kv_tier_hit_tokens_total", _C,
    "Prompt tokens served at admission from each KV tier (device, host, disk, cluster).", _NODE + ("tier",),
)
KV_TIER_MOVED = MetricSpec(
    "halfmoon:kv_tier_moved_bytes_total", _C, "KV bytes moved between tiers (src -> dst).", _NODE + ("src", "dst"),
)
KV_TIER_LOAD = MetricSpec(
    "halfmoon:kv_tier_load_seconds", _H,
    "Time to load KV from a tier: one block from disk or the store, one request's blocks from host.",
    _NODE + ("tier",), buckets=TIER_LOAD_BUCKETS,
)
KV_TIER_USED = MetricSpec("halfmoon:kv_tier_blocks_used", _G, "Blocks held in a KV tier (host, disk).",
                          _NODE + ("tier",))
KV_TIER_CAPACITY = MetricSpec("halfmoon:kv_tier_blocks_capacity", _G, "Blocks a KV tier can hold (host, disk).",
                              _NODE + ("tier",))
KV_STORE_PUT_FAILURES = MetricSpec(
    "halfmoon:kv_store_put_failures_total", _C,
    "Block puts the cluster store refused or failed, or that were dropped for a full write queue.", _NODE,
)
KV_STORE_EVICTED = MetricSpec(
    "halfmoon:kv_store_evicted_blocks_total", _C,
    "Blocks a node had put to or seen in the cluster store that a later lookup found gone (the store "
    "evicts without telling; each miss is reported to the conductor's index as removed).", _NODE,
)
KV_TIER_CORRUPT = MetricSpec(
    "halfmoon:kv_tier_corrupt_blocks_total", _C,
    "Disk or store blocks refused by their checksum (recomputed instead).", _NODE,
)
KV_STORE_UP = MetricSpec("halfmoon:kv_store_up", _G, "1 while the node's cluster KV tier is connected.", _NODE)

# --- the HTTP frontend ------------------------------------------------------------------
HTTP_REQUESTS = MetricSpec(
    "halfmoon:http_requests_total", _C, "HTTP responses by route and status.", ("route", "status"),
)

CONDUCTOR_METRICS = (
    TTFT, INTER_TOKEN_LATENCY, REQUEST_TBT, E2E_LATENCY, TTFT_QUEUE, TTFT_PREFILL, TTFT_KV_TRANSFER,
    TTFT_FIRST_DECODE, PROMPT_TOKENS, GENERATION_TOKENS, REQUEST_SUCCESS, REQUESTS_REJECTED,
    REQUESTS_FAILED, PREDICTION_ERROR, CALIBRATION, NODE_UP, SLO_SECONDS, ADMISSION_INFO, SETTINGS_CHANGES,
    REQUESTS_RETRIED, REQUESTS_MIGRATED,
)
NODE_METRICS = (
    REQUESTS_RUNNING, REQUESTS_WAITING, KV_BLOCKS_USED, KV_BLOCKS_FREE, PREFIX_CACHE_QUERIES,
    PREFIX_CACHE_HITS, KV_TRANSFER_BYTES, KV_TRANSFER_SECONDS, KV_TRANSFER_FAILURES,
    RECOMPUTED_PREFILLS, KV_LEASE_EXPIRED, KV_BLOCKS_RECLAIMED, BLOCK_HASHES_REFUSED,
)
TIER_METRICS = (  # node metrics with a tier (or src/dst) label; NodeMetrics records them
    KV_TIER_HITS, KV_TIER_MOVED, KV_TIER_LOAD, KV_TIER_USED, KV_TIER_CAPACITY, KV_STORE_PUT_FAILURES,
    KV_STORE_EVICTED, KV_TIER_CORRUPT, KV_STORE_UP,
)
HTTP_METRICS = (HTTP_REQUESTS,)
ALL_METRICS = CONDUCTOR_METRICS + NODE_METRICS + TIER_METRICS + HTTP_METRICS

Metric = Counter | Gauge | Histogram
# One set of metric objects per registry, so several recorders (say, two nodes in one
# test process) can share a registry without registering a name twice.
_created: weakref.WeakKeyDictionary[CollectorRegistry, dict[str, Metric]] = weakref.WeakKeyDictionary()
_created_lock = threading.Lock()


def _metric(registry: CollectorRegistry, spec: MetricSpec) -> Metric:
    with _created_lock:
        made = _created.setdefault(registry, {})
        if spec.name not in made:
            args = (spec.name, spec.help, spec.labels)
            if spec.kind is Kind.COUNTER:
                made[spec.name] = Counter(*args, registry=registry)
            elif spec.kind is Kind.GAUGE:
                made[spec.name] = Gauge(*args, registry=registry)
            else:
                made[spec.name] = Histogram(*args, registry=registry, buckets=spec.buckets)
        return made[spec.name]


M = TypeVar("M", Counter, Gauge, Histogram)


def _typed(registry: CollectorRegistry, spec: MetricSpec, kind: type[M]) -> M:
    metric = _metric(registry, spec)
    if not isinstance(metric, kind):
        raise TypeError(f"{spec.name} is a {spec.kind.value}, not a {kind.__name__}")
    return metric


def _seconds(value: float) -> float:
    """Durations come from monotonic clocks; a negative one is clamped, never recorded."""
    return value if value > 0.0 else 0.0


def tail_tbt(gaps: Sequence[float], fraction: float = 0.1) -> float:
    """Mooncake's per-request TBT: the mean of the longest ceil(`fraction` x gaps) token gaps
    (the same count bench/replay uses)."""
    if not gaps:
        return 0.0
    k = max(1, math.ceil(len(gaps) * fraction))
    longest = sorted(gaps, reverse=True)[:k]
    return sum(longest) / k


class ConductorMetrics:
    """What the conductor records; one per conductor process."""

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self._ttft = _typed(r, TTFT, Histogram)
        self._gap = _typed(r, INTER_TOKEN_LATENCY, Histogram)
        self._request_tbt = _typed(r, REQUEST_TBT, Histogram)
        self._e2e = _typed(r, E2E_LATENCY, Histogram)
        parts = (TTFT_QUEUE, TTFT_PREFILL, TTFT_KV_TRANSFER, TTFT_FIRST_DECODE)  # in Timing's order
        self._parts = tuple(_typed(r, s, Histogram) for s in parts)
        self._prompt_tokens = _typed(r, PROMPT_TOKENS, Counter)
        self._generation_tokens = _typed(r, GENERATION_TOKENS, Counter)
        self._success = _typed(r, REQUEST_SUCCESS, Counter)
        self._rejected = _typed(r, REQUESTS_REJECTED, Counter)
        self._failed = _typed(r, REQUESTS_FAILED, Counter)
        self._prediction_error = _typed(r, PREDICTION_ERROR, Histogram)
        self._calibration = _typed(r, CALIBRATION, Gauge)
        self._node_up = _typed(r, NODE_UP, Gauge)
        self._slo = _typed(r, SLO_SECONDS, Gauge)
        self._admission = _typed(r, ADMISSION_INFO, Gauge)
        self._settings_changes = _typed(r, SETTINGS_CHANGES, Counter)
        self._retried = _typed(r, REQUESTS_RETRIED, Counter)
        self._migrated = _typed(r, REQUESTS_MIGRATED, Counter)
        self._settings: tuple[str, str, float, float] | None = None

    def start_request(self, now: Callable[[], float] = time.monotonic) -> RequestClock:
        return RequestClock(self, now)

    def observe_first_token(self, ttft_s: float) -> None:
        self._ttft.observe(_seconds(ttft_s))

    def observe_token_gap(self, gap_s: float) -> None:
        self._gap.observe(_seconds(gap_s))

    def observe_finished(self, finished: Finished, e2e_s: float, token_gaps: Sequence[float] = ()) -> None:
        """A request ended (any finish reason): its TTFT parts, tokens, E2E and tail TBT."""
        t = finished.timing
        parts = (t.queue_s, t.prefill_s, t.kv_transfer_s, t.first_decode_s)
        if any(parts) or t.ttft_s:  # an all-zero Timing means "not measured"
            for histogram, value in zip(self._parts, parts):
                histogram.observe(_seconds(value))
        self._success.labels(finished.finish_reason).inc()
        self._prompt_tokens.inc(finished.usage.prompt_tokens)
        self._generation_tokens.inc(finished.usage.completion_tokens)
        self._e2e.observe(_seconds(e2e_s))
        if token_gaps:
            self._request_tbt.observe(tail_tbt(token_gaps))

    def observe_rejected(self, reason: str) -> None:
        self._rejected.labels(reason).inc()

    def observe_failed(self, reason: str) -> None:
        self._failed.labels(reason).inc()

    def observe_retried(self, phase: str) -> None:
        """A node failed before the request's first token; it was placed again."""
        self._retried.labels(phase).inc()

    def observe_migrated(self) -> None:
        """A decode node failed mid-stream; the request continues on another."""
        self._migrated.inc()

    def observe_prediction(self, kind: PredictionKind, predicted_s: float, actual_s: float) -> None:
        if kind not in _PREDICTION_KINDS:
            raise ValueError(f"prediction kind must be one of {_PREDICTION_KINDS}, got {kind!r}")
        self._prediction_error.labels(kind).observe(abs(actual_s - predicted_s))

    def set_calibration(self, kind: PredictionKind, factor: float) -> None:
        if kind not in _PREDICTION_KINDS:
            raise ValueError(f"prediction kind must be one of {_PREDICTION_KINDS}, got {kind!r}")
        self._calibration.labels(kind).set(factor)

    def set_node_up(self, node: str, role: Role, up: bool) -> None:
        _check_role(role)
        self._node_up.labels(node, role).set(1.0 if up else 0.0)

    def forget_node(self, node: str, role: Role) -> None:
        """Drop a deregistered node's series (a dead but registered node stays at 0)."""
        _remove(self._node_up, node, role)

    def set_settings(self, *, policy: str, admission: str, ttft_slo_s: float, tbt_slo_s: float) -> None:
        """Publish the settings in force; every call after the first that changes them counts."""
        new = (policy, admission, float(ttft_slo_s), float(tbt_slo_s))
        old, self._settings = self._settings, new
        if old == new:
            return
        if old is not None:
            self._settings_changes.inc()
            if old[:2] != new[:2]:
                _remove(self._admission, old[0], old[1])
        self._admission.labels(policy, admission).set(1.0)
        self._slo.labels("ttft").set(ttft_slo_s)
        self._slo.labels("tbt").set(tbt_slo_s)


class RequestClock:
    """Times one request at the conductor: TTFT at its first token, a TBT sample per later
    token, then E2E and the request's tail TBT when it finishes."""

    def __init__(self, metrics: ConductorMetrics, now: Callable[[], float] = time.monotonic) -> None:
        self._metrics = metrics
        self._now = now
        self._start = now()
        self._last: float | None = None
        self.ttft_s: float | None = None
        self.gaps: list[float] = []

    def on_tokens(self, count: int) -> None:
        """`count` tokens arrived together; the first closes a gap, the others follow at 0 s."""
        if count <= 0:
            return
        t = self._now()
        if self._last is None:
            self.ttft_s = t - self._start
            self._metrics.observe_first_token(self.ttft_s)
            new_gaps = [0.0] * (count - 1)
        else:
            new_gaps = [t - self._last] + [0.0] * (count - 1)
        for gap in new_gaps:
            self._metrics.observe_token_gap(gap)
        self.gaps.extend(new_gaps)
        self._last = t

    def on_finished(self, finished: Finished) -> None:
        self._metrics.observe_finished(finished, self._now() - self._start, self.gaps)


class NodeMetrics:
    """What one prefill or decode node records; every series carries its `node` and `role`."""

    def __init__(self, registry: CollectorRegistry, node: str, role: Role) -> None:
        _check_role(role)
        if not node:
            raise ValueError("node name must be non-empty")
        self.node, self.role = node, role
        self._metrics = {spec.name: _metric(registry, spec) for spec in NODE_METRICS}
        self._series = {name: m.labels(node, role) for name, m in self._metrics.items()}
        self._tier = {spec.name: _metric(registry, spec) for spec in TIER_METRICS}
        self._tier_labels: set[tuple[str, tuple[str, ...]]] = set()
        self._tier_seen: dict[tuple[str, tuple[str, ...]], float] = {}

    def set_load(self, *, running: int, waiting: int, kv_blocks_used: int, kv_blocks_free: int) -> None:
        self._series[REQUESTS_RUNNING.name].set(running)
        self._series[REQUESTS_WAITING.name].set(waiting)
        self._series[KV_BLOCKS_USED.name].set(kv_blocks_used)
        self._series[KV_BLOCKS_FREE.name].set(kv_blocks_free)

    def observe_prefix_lookup(self, query_tokens: int, hit_tokens: int) -> None:
        if not 0 <= hit_tokens <= query_tokens:
            raise ValueError(f"hit_tokens must be in [0, query_tokens={query_tokens}], got {hit_tokens}")
        self._series[PREFIX_CACHE_QUERIES.name].inc(query_tokens)
        self._series[PREFIX_CACHE_HITS.name].inc(hit_tokens)

    def observe_kv_transfer(self, nbytes: int, seconds: float) -> None:
        if nbytes < 0:
            raise ValueError(f"nbytes must be >= 0, got {nbytes}")
        self._series[KV_TRANSFER_BYTES.name].inc(nbytes)
        self._series[KV_TRANSFER_SECONDS.name].observe(_seconds(seconds))

    def observe_kv_transfer_failed(self) -> None:
        self._series[KV_TRANSFER_FAILURES.name].inc()

    def observe_recomputed_prefill(self) -> None:
        self._series[RECOMPUTED_PREFILLS.name].inc()

    def observe_lease_expired(self, blocks: int) -> None:
        self._series[KV_LEASE_EXPIRED.name].inc(blocks)

    def observe_blocks_reclaimed(self, blocks: int) -> None:
        if blocks < 0:
            raise ValueError(f"blocks must be >= 0, got {blocks}")
        self._series[KV_BLOCKS_RECLAIMED.name].inc(blocks)

    def observe_hashes_refused(self, chains: int) -> None:
        if chains < 0:
            raise ValueError(f"chains must be >= 0, got {chains}")
        self._series[BLOCK_HASHES_REFUSED.name].inc(chains)

    def _tier_series(self, spec: MetricSpec, *extra: str):
        self._tier_labels.add((spec.name, extra))
        return self._tier[spec.name].labels(self.node, self.role, *extra)

    def _tier_count(self, spec: MetricSpec, total: float, *extra: str) -> None:
        """Counters from the tiers' running totals: add what is new since the last snapshot."""
        key = (spec.name, extra)
        delta = total - self._tier_seen.get(key, 0)
        if delta > 0:
            self._tier_series(spec, *extra).inc(delta)
        self._tier_seen[key] = max(total, self._tier_seen.get(key, 0))

    def observe_tiers(self, stats) -> None:
        """A snapshot of the node's KV tiers (`engine.tiers.TierStats`): hits, bytes moved,
        failures, occupancy and the store's state."""
        for tier, tokens in stats.hit_tokens.items():
            self._tier_count(KV_TIER_HITS, tokens, tier)
        for path, nbytes in stats.bytes_moved.items():
            src, _, dst = path.partition("->")
            self._tier_count(KV_TIER_MOVED, nbytes, src, dst)
        ev = stats.events
        self._tier_count(KV_STORE_PUT_FAILURES, ev.get("put_failures", 0) + ev.get("put_dropped", 0))
        self._tier_count(KV_STORE_EVICTED, ev.get("store_evicted", 0))
        self._tier_count(KV_TIER_CORRUPT, ev.get("corrupt_blocks", 0))
        for tier, use in stats.use.items():
            self._tier_series(KV_TIER_USED, tier).set(use.used_blocks)
            self._tier_series(KV_TIER_CAPACITY, tier).set(use.capacity_blocks)
        self._tier_series(KV_STORE_UP).set(1 if stats.store_state == "up" else 0)

    def observe_tier_load(self, tier: str, seconds: float) -> None:
        """One load from `tier` (called by the tiers' threads as it happens)."""
        self._tier_series(KV_TIER_LOAD, tier).observe(_seconds(seconds))

    def close(self) -> None:
        """Drop this node's series (when it leaves a process that keeps the registry)."""
        for metric in self._metrics.values():
            _remove(metric, self.node, self.role)
        for name, extra in self._tier_labels:
            _remove(self._tier[name], self.node, self.role, *extra)


class HttpMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self._requests = _typed(registry, HTTP_REQUESTS, Counter)

    def observe_response(self, route: str, status: int) -> None:
        """`route` is the route template (bounded), never the raw URL."""
        self._requests.labels(route, str(status)).inc()


def _check_role(role: str) -> None:
    if role not in _ROLES:
        raise ValueError(f"role must be one of {_ROLES}, got {role!r}")


def _remove(metric: Metric, *labels: str) -> None:
    try:
        metric.remove(*labels)
    except KeyError:
        pass  # never set: nothing to drop


# --- exposition -------------------------------------------------------------------------
# Always the classic text format (0.0.4), whatever the scraper's Accept header says:
# prometheus_client's OpenMetrics output "escapes" the ':' of sample names to '_'
# (halfmoon:x_total becomes halfmoon_x_total), which would break every query and dashboard.
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4


def exposition(registry: CollectorRegistry) -> bytes:
    """The registry in Prometheus text format (serve it with `CONTENT_TYPE`)."""
    return generate_latest(registry)


class MetricsServer:
    """A node's `GET /metrics` endpoint, on its own daemon thread."""

    def __init__(self, registry: CollectorRegistry, host: str = "127.0.0.1", port: int = 0) -> None:
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                if self.path.split("?", 1)[0] != "/metrics":
                    self.send_error(404, "only /metrics is served here")
                    return
                payload = exposition(registry)
                self.send_response(200)
                self.send_header("Content-Type", CONTENT_TYPE)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, format: str, *args: object) -> None:
                pass  # scrapes every few seconds would flood the node's log

        try:
            self._server = ThreadingHTTPServer((host, port), Handler)
        except OSError as exc:
            raise OSError(exc.errno, f"cannot serve metrics on {host}:{port}: {exc.strerror}") from exc
        self._server.daemon_threads = True
        self.host = host
        self.port: int = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name=f"metrics:{self.port}", daemon=True)
        self._thread.start()

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5.0)


@dataclass(frozen=True, slots=True)
class ScrapeTarget:
    address: str  # host:port of a /metrics endpoint
    node: str
    role: str  # "conductor" | "prefill" | "decode"


def write_scrape_targets(path: str | Path, targets: Iterable[ScrapeTarget]) -> None:
    """Write Prometheus `file_sd` targets atomically (Prometheus re-reads the file on change)."""
    path = Path(path)
    doc = [{"targets": [t.address], "labels": {"node": t.node, "role": t.role}} for t in targets]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)
