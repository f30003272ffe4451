"""Routing policies as pure objects: (cluster view, request, time) in, node choice out.

Prefill choice differs per policy; each returns a `PrefillChoice` whose predicted TTFT
(queue + local prefix load + prefix pull + prefill + KV send) the admission step can judge.
A node always reuses the prefix it caches itself, whichever policy sent the request there;
only `kv_centric` moves KV between prefill nodes.

| policy              | prefill node                                                        |
|---------------------|---------------------------------------------------------------------|
| `random`            | uniformly at random (seeded)                                         |
| `round_robin`       | the next node in view order                                          |
| `least_loaded`      | least queued work; caches ignored                                     |
| `cache_aware_local` | min queue + prefill of the part not in that node's own cache          |
| `kv_centric`        | as above, or pull the cluster's longest matching prefix first when    |
|                     | pull + prefill beats recomputing (the pulled blocks replicate there)  |
| `longest_prefix`    | longest cached prefix, whatever the queues (ties: least queued work)  |
| `cost_aware`        | kv_centric's TTFT + the work the choice costs everyone queued behind  |
| (the default)       | it, prefixes of queued prefills counted where they queue; a request   |
|                     | late everywhere goes to a queue already late (`CostAwarePolicy`)      |

Lower KV tiers: a node reuses what its host and disk tiers and the cluster store hold right
after its device prefix (the engine loads it at admission), so every estimate counts that run
as cached at its load time (`CostModel.tier_load_s`; a tier the cost model has no rate for
ends the run: recomputed), and the cache-aware policies compare nodes by it: a host-tier hit
beats recomputing, a device hit beats a host hit, and the store's blocks count on any node.

Decode choice: the node with the lowest predicted load (TBT against its SLO, or KV memory
use) once this request joins, counting what the admission mode looks at (`LoadBasis`):
the node as it is now, plus the requests assigned to it still in prefill, or projected to
when this prefill ends; `random` and `round_robin` pick the decode node their own way. Ties on
predicted time go to the node busy until the earliest moment (among idle nodes: the one
idle longest), then to the first in view order, so every decision is deterministic for
a given seed.
"""
from __future__ import annotations

import heapq
import math
import random as _random
from abc import ABC, abstractmethod
from typing import Callable, ClassVar, Iterable, cast

from conductor.cost_model import CostModel
from conductor.decision import DecodeChoice, LoadBasis, PrefillChoice
from conductor.modes import PolicyName
from conductor.request import NodeId, RequestInfo
from conductor.settings import SettingsValues
from conductor.view import ClusterView, DecodeNodeView, LoadIndex, PrefillNodeView, TieredLookup

# Predictive decode choice projects the load of at most this many nodes (those with the
# lowest current load): O(nodes) plus O(residents of K nodes) per decision.
PROJECTION_CANDIDATES = 16
# Above this many nodes of a role, a view kept by `ClusterState` is searched through its
# `LoadIndex` instead of node by node: prefill candidates are the nodes caching a prefix of
# the request plus the least busy one (every other node is no better: it has no prefix and
# more queue); decode candidates are the `DECODE_CANDIDATES` nodes of lowest committed load.
SCAN_LIMIT = 64
DECODE_CANDIDATES = 4
# The committed and projected estimates of a decode step are the step over the new
# request's life: every context in the batch grows by a token a step, so the mean step
# while it decodes has the batch this share of the way through the outputs still to come
# (its residents' and its own). One half: the mean over a life in which nothing leaves; those that leave are
# replaced by arrivals that each pass the same check. Without it the estimate is the step
# at the moment of joining, and a node whose requests have long outputs ahead passes the
# SLO later (a prediction that only learnt the growth from finished requests over-learns it
# on a load ramp and over-rejects in steady state: measured, docs/results/sim_admission*).
LIFETIME_GROWTH = 0.5


def decode_estimate(
    node: DecodeNodeView,
    request: RequestInfo,
    at_s: float,
    basis: LoadBasis,
    settings: SettingsValues,
    costs: CostModel,
) -> DecodeChoice:
    """Predicted step time and KV use of `node` once `request` joins it.

    CURRENT: the step as the batch is now plus this request. COMMITTED: also the requests
    headed here still in prefill, and the step over this request's life: the contexts grown
    by `LIFETIME_GROWTH` of the outputs still to come (expected outputs of the residents and
    this request, typical where unknown, less what the batch generated so far). PROJECTED
    (below) grows its batch at `at_s` over the request's life the same way.
    KV use counts what the node holds (`reserved_tokens` of its batch, and
    `pending_kv_tokens` set aside for the requests not in it yet), plus this request's
    prompt and output; COMMITTED also the outputs the requests still in prefill will add.
    PROJECTED to `at_s`: every resident whose (predicted) start is before `at_s` and that,
    lasting a typical decode (its expected output × today's step time), is still decoding
    then — Mooncake's prediction-based early rejection; residents not started by then hold
    what is reserved for them. KV use is never below what the node holds now: the request's
    own KV is reserved on dispatch, not when its prefill ends.
    """
    n = request.input_tokens
    out = request.expected_output_tokens or settings.typical_output_tokens
    if basis is not LoadBasis.PROJECTED:
        batch = node.running + node.waiting + 1
        tokens = node.tokens_in_flight + node.waiting_tokens + n
        reserved = node.reserved_tokens + node.pending_kv_tokens + n + out
        if basis is LoadBasis.COMMITTED:
            batch += node.incoming
            tokens += node.incoming_tokens
            reserved += node.incoming * out
            to_come = float(node.expected_output_tokens + node.unsized_residents * settings.typical_output_tokens + out
                            - (node.tokens_in_flight - node.joined_prompt_tokens))
            if to_come > 0:
                tokens += int(LIFETIME_GROWTH * to_come)
    else:
        step = costs.decode_step_s(node.running if node.running > 0 else 1, node.tokens_in_flight)
        typical = settings.typical_output_tokens
        batch, tokens, reserved = 1, n, n + out
        to_come = float(out)  # outputs the batch at `at_s` still has to generate, this request's too
        for r in node.residents.values():
            start = r.ready_at_s
            r_out = r.expected_output_tokens or typical
            if start > at_s:
                reserved += r.prompt_tokens + r_out
                continue
            generated = (at_s - start) / step if step > 0 else float(r_out)
            if generated >= r_out:
                continue
            batch += 1
            tokens += r.prompt_tokens + int(generated)
            reserved += r.prompt_tokens + r_out
            to_come += r_out - generated
        tokens += int(LIFETIME_GROWTH * to_come)
        now_reserved = node.reserved_tokens + node.pending_kv_tokens + n + out
        if now_reserved > reserved:  # its KV is reserved on dispatch: what is held now must fit too
            reserved = now_reserved
    return DecodeChoice(
        node=node.node_id,
        predicted_tbt_s=costs.decode_step_s(batch, tokens),
        kv_use=reserved / node.kv_capacity_tokens if node.kv_capacity_tokens > 0 else float("inf"),
        at_s=at_s,
        basis=basis,
    )


def committed_load_key(settings: SettingsValues, costs: CostModel) -> Callable[[DecodeNodeView], float]:
    """A decode node's committed load before any new request: the order `LoadIndex` keeps
    decode nodes in on a large cluster (the candidates a decision then scores exactly)."""
    m = costs.decode
    s_1, s_b, s_t = m.s_1, m.s_b, m.s_t
    inv_slo = 1.0 / settings.tbt_slo_s
    out = settings.typical_output_tokens

    def key(d: DecodeNodeView) -> float:
        tbt = (s_1 + s_b * (d.running + d.waiting + d.incoming)
               + s_t * (d.tokens_in_flight + d.waiting_tokens + d.incoming_tokens)) * inv_slo
        cap = d.kv_capacity_tokens
        kv = (d.reserved_tokens + d.pending_kv_tokens + d.incoming * out) / cap if cap > 0 else float("inf")
        return tbt if tbt > kv else kv

    return key


def _loads(
    nodes: Iterable[tuple[int, DecodeNodeView]], request: RequestInfo, settings: SettingsValues, costs: CostModel, committed: bool
) -> list[tuple[float, int, DecodeNodeView]]:
    """(load, position, node) for every healthy decode node of `nodes` ((position, node)
    pairs): `decode_estimate(...).load()` on the CURRENT or COMMITTED basis, inlined because
    it runs for every node on every decision."""
    n = request.input_tokens
    out = request.expected_output_tokens or settings.typical_output_tokens
    m = costs.decode
    s_1, s_b, s_t = m.s_1, m.s_b, m.s_t
    inv_slo = 1.0 / settings.tbt_slo_s
    loads = []
    for i, d in nodes:
        if not d.healthy:
            continue
        batch = d.running + d.waiting + 1
        tokens = d.tokens_in_flight + d.waiting_tokens + n
        reserved = d.reserved_tokens + d.pending_kv_tokens + n + out
        if committed:
            batch += d.incoming
            tokens += d.incoming_tokens
            reserved += d.incoming * out
        tbt = s_1 + s_b * batch + s_t * tokens
        tbt_load = (tbt if tbt > 0.0 else 0.0) * inv_slo
        cap = d.kv_capacity_tokens
        kv = reserved / cap if cap > 0 else float("inf")
        loads.append((tbt_load if tbt_load > kv else kv, i, d))
    return loads


class Policy(ABC):
    name: ClassVar[PolicyName]

    def __init__(self, costs: CostModel, seed: int = 0) -> None:
        self.costs = costs
        self._rng = _random.Random(seed)
        self.settings: SettingsValues | None = None  # the snapshot of this decision (the scheduler sets it)

    @abstractmethod
    def choose_prefill(self, view: ClusterView, request: RequestInfo, now_s: float) -> PrefillChoice | None:
        """The prefill node for `request`, or None when no prefill node is healthy."""

    def choose_decode(
        self,
        view: ClusterView,
        request: RequestInfo,
        at_s: float,
        settings: SettingsValues,
        basis: LoadBasis = LoadBasis.COMMITTED,
    ) -> DecodeChoice | None:
        """The decode node with the lowest predicted load on `basis`; None when none is healthy.

        PROJECTED ranks the `PROJECTION_CANDIDATES` nodes with the lowest committed load by
        their load projected to `at_s`.
        """
        costs = self.costs
        committed = basis is not LoadBasis.CURRENT
        loads = _loads(_decode_candidates(view, settings, costs), request, settings, costs, committed)
        if not loads:
            return None
        if basis is not LoadBasis.PROJECTED:
            best_entry = loads[0]  # the least (load, position), as min(loads, key=entry[:2]) finds it
            for entry in loads:
                if entry[0] < best_entry[0] or (entry[0] == best_entry[0] and entry[1] < best_entry[1]):
                    best_entry = entry
            return decode_estimate(best_entry[2], request, at_s, basis, settings, costs)
        candidates = loads
        if len(loads) > PROJECTION_CANDIDATES:
            candidates = heapq.nsmallest(PROJECTION_CANDIDATES, loads, key=lambda entry: entry[:2])
            candidates.sort(key=lambda entry: entry[1])  # back to view order for ties
        slo = settings.tbt_slo_s
        best: DecodeChoice | None = None
        best_load = float("inf")
        for _, _, node in candidates:
            choice = decode_estimate(node, request, at_s, LoadBasis.PROJECTED, settings, costs)
            load = choice.load(slo)
            if best is None or load < best_load:
                best, best_load = choice, load
        return best

    # -- helpers shared by the policies ---------------------------------------------------
    def _estimate(
        self,
        view: ClusterView,
        request: RequestInfo,
        node: PrefillNodeView,
        now_s: float,
        cached_blocks: int,
        pull_from: NodeId | None = None,
        pulled_blocks: int = 0,
        tiers: LowerTiers | None = None,
    ) -> PrefillChoice:
        """The choice of `node`; without a pull, the node's lower-tier run after its
        `cached_blocks` counts as reused (`reused_tokens`) at its load time (in `load_s`).
        `tiers`: the decision's `LowerTiers`, when the caller made one already."""
        n = request.input_tokens
        costs = self.costs
        tier_blocks, tier_s = 0, 0.0
        if pull_from is None:
            if tiers is None:
                tiers = LowerTiers(view, request, costs)
            tier_blocks, tier_s = tiers.run(node.node_id, cached_blocks)
        local = _reusable(cached_blocks, view.block_tokens, n)
        near = _reusable(cached_blocks + tier_blocks, view.block_tokens, n)  # on the node, any tier
        reused = _reusable(cached_blocks + tier_blocks + pulled_blocks, view.block_tokens, n)
        return PrefillChoice(
            node=node.node_id,
            cached_blocks=cached_blocks,
            pull_from=pull_from,
            pulled_blocks=pulled_blocks,
            reused_tokens=reused,
            queue_s=node.queue_s(now_s),
            load_s=costs.local_load_s(local) + tier_s,
            pull_s=costs.network_s(reused - near),
            prefill_s=costs.prefill_s(n, reused),
            kv_send_s=costs.network_s(n),
        )

    @staticmethod
    def _match(view: ClusterView, request: RequestInfo) -> dict:
        if not request.block_hashes:
            return {}
        return view.index.longest_prefix(request.block_hashes)  # type: ignore[return-value]


def _reusable(blocks: int, block_tokens: int, input_tokens: int) -> int:
    """Prompt tokens a cached prefix of `blocks` blocks saves (the last token is always computed)."""
    tokens = blocks * block_tokens
    return tokens if tokens < input_tokens else input_tokens - 1


class LowerTiers:
    """One decision's view of the KV tiers under the device: how many blocks of the request's
    chain a node can load from its host and disk tiers or the cluster store right after its
    device prefix, and in how many seconds (`CostModel.tier_load_s`, block by block, up to the
    first block of a tier the cost model has no rate for). Off (every run 0) when the view's
    index knows no lower tier (a hand-built lookup, or tiers off on every node)."""

    __slots__ = ("on", "_index", "_hashes", "_block_s")

    def __init__(self, view: ClusterView, request: RequestInfo, costs: CostModel) -> None:
        index = view.index
        self.on = bool(request.block_hashes) and bool(getattr(index, "tiers", None))
        self._index = cast(TieredLookup, index)  # used only when `on`: it has tiers
        self._hashes = request.block_hashes
        bt = view.block_tokens
        self._block_s = {t: costs.tier_load_s(t, bt) for t in ("host", "disk", "cluster")} if self.on else {}

    def run(self, node: NodeId, depth: int) -> tuple[int, float]:
        """(blocks, load seconds) of `node`'s lower-tier run from block `depth` of the chain."""
        if not self.on:
            return 0, 0.0
        blocks, seconds = 0, 0.0
        block_s = self._block_s
        for tier in self._index.lower_tier_chain(node, self._hashes, depth):
            s = block_s[tier]
            if s == math.inf:
                break
            blocks += 1
            seconds += s
        return blocks, seconds

    def holders(self) -> set[NodeId]:
        """Nodes whose own host or disk tier holds the chain's first block."""
        return self._index.tier_holders(self._hashes) if self.on else set()


def _healthy(view: ClusterView) -> list[PrefillNodeView]:
    return [p for p in view.prefill if p.healthy]


class RandomPolicy(Policy):
    name = PolicyName.RANDOM

    def choose_prefill(self, view: ClusterView, request: RequestInfo, now_s: float) -> PrefillChoice | None:
        healthy = _healthy(view)
        if not healthy:
            return None
        node = healthy[self._rng.randrange(len(healthy))]
        return self._estimate(view, request, node, now_s, self._match(view, request).get(node.node_id, 0))

    def choose_decode(self, view: ClusterView, request: RequestInfo, at_s: float, settings: SettingsValues,
                      basis: LoadBasis = LoadBasis.COMMITTED) -> DecodeChoice | None:
        healthy = [d for d in view.decode if d.healthy]
        if not healthy:
            return None
        node = healthy[self._rng.randrange(len(healthy))]
        return decode_estimate(node, request, at_s, basis, settings, self.costs)


class RoundRobinPolicy(Policy):
    name = PolicyName.ROUND_ROBIN

    def __init__(self, costs: CostModel, seed: int = 0) -> None:
        super().__init__(costs, seed)
        self._next_prefill = 0
        self._next_decode = 0

    def choose_prefill(self, view: ClusterView, request: RequestInfo, now_s: float) -> PrefillChoice | None:
        healthy = _healthy(view)
        if not healthy:
            return None
        node = healthy[self._next_prefill % len(healthy)]
        self._next_prefill += 1
        return self._estimate(view, request, node, now_s, self._match(view, request).get(node.node_id, 0))

    def choose_decode(self, view: ClusterView, request: RequestInfo, at_s: float, settings: SettingsValues,
                      basis: LoadBasis = LoadBasis.COMMITTED) -> DecodeChoice | None:
        healthy = [d for d in view.decode if d.healthy]
        if not healthy:
            return None
        node = healthy[self._next_decode % len(healthy)]
        self._next_decode += 1
        return decode_estimate(node, request, at_s, basis, settings, self.costs)


class LeastLoadedPolicy(Policy):
    name = PolicyName.LEAST_LOADED

    def choose_prefill(self, view: ClusterView, request: RequestInfo, now_s: float) -> PrefillChoice | None:
        best: PrefillNodeView | None = None
        loads = _prefill_index(view)
        if loads is not None:
            least = loads.least_busy_prefill()
            best = least[1] if least is not None else None
        else:
            best_busy = 0.0
            for node in view.prefill:
                if node.healthy and (best is None or node.busy_until_s < best_busy):
                    best, best_busy = node, node.busy_until_s
        if best is None:
            return None
        return self._estimate(view, request, best, now_s, self._match(view, request).get(best.node_id, 0))


def _decode_candidates(view: ClusterView, settings: SettingsValues, costs: CostModel):
    """(position, node) pairs a decode choice scores: every node, or on a large cluster with
    a `LoadIndex` the `DECODE_CANDIDATES` of lowest committed load."""
    loads = view.loads
    if loads is None or len(view.decode) <= SCAN_LIMIT:
        return enumerate(view.decode)
    stamp = (settings, costs)
    if loads.decode_key_stamp != stamp:
        loads.set_decode_key(committed_load_key(settings, costs), view.decode, stamp)
    return loads.decode_candidates(DECODE_CANDIDATES)


def _prefill_index(view: ClusterView) -> LoadIndex | None:
    """The view's `LoadIndex` when the cluster is large enough to search prefill nodes
    through it; None: scan them."""
    loads = view.loads
    return loads if loads is not None and len(view.prefill) > SCAN_LIMIT else None


def _prefill_candidates(view: ClusterView, match: dict, tiers: LowerTiers | None = None):
    """(position, node) pairs a prefill choice need look at: every healthy node, or on a
    large cluster with a `LoadIndex` the healthy nodes caching a prefix (on the device or in
    their own lower tiers) plus the least busy (the store's blocks are as near to it)."""
    loads = _prefill_index(view)
    if loads is None:
        return [(i, p) for i, p in enumerate(view.prefill) if p.healthy]
    by_id = loads.prefill_by_id
    out = []
    ids: Iterable[NodeId] = match.keys()
    if tiers is not None and tiers.on:
        ids = set(ids) | tiers.holders()
    for node_id in ids:
        entry = by_id.get(node_id)
        if entry is not None and entry[1].healthy:
            out.append(entry)
    least = loads.least_busy_prefill()
    if least is not None and least[1].node_id not in match:
        out.append(least)
    return out


def _first_holder(view: ClusterView, match: dict, depth: int) -> NodeId:
    """The first healthy node in view order that caches `depth` blocks of the request."""
    loads = _prefill_index(view)
    if loads is None:
        return next(p.node_id for p in view.prefill if p.healthy and match.get(p.node_id, 0) == depth)
    by_id = loads.prefill_by_id
    return min((by_id[n][0], n) for n, d in match.items() if d == depth and n in by_id and by_id[n][1].healthy)[1]


def _has_holder(view: ClusterView, match: dict, depth: int) -> bool:
    """Whether a healthy node caches `depth` blocks of the request (`_first_holder` exists);
    stops at the first one found."""
    loads = _prefill_index(view)
    if loads is None:
        return any(p.healthy and match.get(p.node_id, 0) == depth for p in view.prefill)
    by_id = loads.prefill_by_id
    for node_id, d in match.items():
        if d == depth:
            entry = by_id.get(node_id)
            if entry is not None and entry[1].healthy:
                return True
    return False


def _least_busy_by_depth(
    view: ClusterView, match: dict, tiers: LowerTiers | None = None
) -> dict[tuple[int, int, float], tuple[float, int, PrefillNodeView]]:
    """(depth of cached prefix, blocks of the lower-tier run after it, the run's load
    seconds) -> (busy_until_s, position, node) of the least busy healthy node with that
    prefix. Nodes with equal prefixes cost the same to prefill on, so only the least busy of
    each can win: the per-node loop stays this small."""
    on = tiers is not None and tiers.on
    loads = _prefill_index(view)
    if not on and loads is not None:
        return _least_busy_by_depth_indexed(loads, match)
    groups: dict[tuple[int, int, float], tuple[float, int, PrefillNodeView]] = {}
    get = match.get
    for i, node in _prefill_candidates(view, match, tiers):
        depth = get(node.node_id, 0)
        key = (depth, *tiers.run(node.node_id, depth)) if on else (depth, 0, 0.0)  # type: ignore[union-attr]
        busy = node.busy_until_s
        best = groups.get(key)
        if best is None or busy < best[0] or (busy == best[0] and i < best[1]):
            groups[key] = (busy, i, node)
    return groups


def _least_busy_by_depth_indexed(
    loads: LoadIndex, match: dict
) -> dict[tuple[int, int, float], tuple[float, int, PrefillNodeView]]:
    """`_least_busy_by_depth` on a large cluster without lower tiers: the same groups in the
    same order, from one pass over the holders (a prefix cached cluster-wide makes them
    every node, so this loop is the decision's cost) and the least busy node."""
    by_id = loads.prefill_by_id
    best_of: dict[int, tuple[float, int, PrefillNodeView]] = {}
    for node_id, depth in match.items():
        entry = by_id.get(node_id)
        if entry is None:
            continue
        i, node = entry
        if not node.healthy:
            continue
        busy = node.busy_until_s
        best = best_of.get(depth)
        if best is None or busy < best[0] or (busy == best[0] and i < best[1]):
            best_of[depth] = (busy, i, node)
    least = loads.least_busy_prefill()
    if least is not None and least[1].node_id not in match:
        i, node = least
        busy = node.busy_until_s
        best = best_of.get(0)
        if best is None or busy < best[0] or (busy == best[0] and i < best[1]):
            best_of[0] = (busy, i, node)
    return {(depth, 0, 0.0): best for depth, best in best_of.items()}


def _service(costs: CostModel, n: int, bt: int, depth: int, extra: int, extra_s: float, top_depth: int,
             top_tokens: int, top_prefill_s: float) -> tuple[float, bool]:
    """Predicted prefill service of an `n`-token prompt on a node caching `depth` blocks of it
    (and the `extra` blocks after them in its own lower tiers, loaded in `extra_s`), and
    whether pulling the cluster's longest prefix (`top_depth` blocks = `top_tokens`, then
    `top_prefill_s` of compute; 0 blocks: nothing to pull) first is what makes it cheapest."""
    p = _reusable(depth, bt, n)
    service = costs.local_load_s(p) + extra_s + costs.prefill_s(n, _reusable(depth + extra, bt, n))
    if depth + extra < top_depth:  # (a pull fetches the blocks its lower tiers hold too)
        pull_s = costs.local_load_s(p) + costs.network_s(top_tokens - p) + top_prefill_s
        if pull_s < service:
            return pull_s, True
    return service, False


class CacheAwareLocalPolicy(Policy):
    """Min over nodes of queue + local load + prefill of what that node does not cache."""

    name = PolicyName.CACHE_AWARE_LOCAL

    def choose_prefill(self, view: ClusterView, request: RequestInfo, now_s: float) -> PrefillChoice | None:
        groups = _least_busy_by_depth(view, self._match(view, request), LowerTiers(view, request, self.costs))
        if not groups:
            return None
        n, bt, costs = request.input_tokens, view.block_tokens, self.costs
        best_key, best_node, best_depth = None, None, 0
        for (depth, extra, extra_s), (busy, i, node) in groups.items():
            p = _reusable(depth + extra, bt, n)
            queue = busy - now_s if busy > now_s else 0.0
            key = (queue + costs.local_load_s(_reusable(depth, bt, n)) + extra_s + costs.prefill_s(n, p), busy, i)
            if best_key is None or key < best_key:
                best_key, best_node, best_depth = key, node, depth
        assert best_node is not None  # (groups is not empty)
        return self._estimate(view, request, best_node, now_s, best_depth)


class KvCentricPolicy(Policy):
    """Mooncake's global policy: per node, the better of using its own prefix or pulling the
    cluster's longest one from a peer first; pick the node with the lowest predicted TTFT."""

    name = PolicyName.KV_CENTRIC

    def choose_prefill(self, view: ClusterView, request: RequestInfo, now_s: float) -> PrefillChoice | None:
        match = self._match(view, request)
        groups = _least_busy_by_depth(view, match, LowerTiers(view, request, self.costs))
        if not groups:
            return None
        n, bt, costs = request.input_tokens, view.block_tokens, self.costs
        top_depth = max(key[0] for key in groups)
        top_node = None
        if top_depth > 0:  # the source: first healthy node in view order with the longest prefix
            top_node = _first_holder(view, match, top_depth)
        top_tokens = _reusable(top_depth, bt, n)
        top_prefill = costs.prefill_s(n, top_tokens)
        best_key, best_node, best_depth, best_pull = None, None, 0, False
        for (depth, extra, extra_s), (busy, i, node) in groups.items():
            cost, pull = _service(costs, n, bt, depth, extra, extra_s, top_depth, top_tokens, top_prefill)
            queue = busy - now_s if busy > now_s else 0.0
            key = (queue + cost, busy, i)
            if best_key is None or key < best_key:
                best_key, best_node, best_depth, best_pull = key, node, depth, pull
        assert best_node is not None  # (groups is not empty)
        if best_pull:
            return self._estimate(view, request, best_node, now_s, best_depth, top_node, top_depth - best_depth)
        return self._estimate(view, request, best_node, now_s, best_depth)


class LongestPrefixPolicy(Policy):
    name = PolicyName.LONGEST_PREFIX

    def choose_prefill(self, view: ClusterView, request: RequestInfo, now_s: float) -> PrefillChoice | None:
        match = self._match(view, request)
        best: PrefillNodeView | None = None
        best_key = (0, 0.0, 0)
        for i, node in _prefill_candidates(view, match):
            key = (-match.get(node.node_id, 0), node.busy_until_s, i)
            if best is None or key < best_key:
                best, best_key = node, key
        if best is None:
            return None
        return self._estimate(view, request, best, now_s, -best_key[0])


class CostAwarePolicy(Policy):
    """kv_centric's predicted TTFT plus what the choice costs the rest of the cluster.

    Per candidate node (the least busy node of each cached-prefix depth, as kv_centric, with
    the same choice between its own prefix and pulling the longest one). A node's prefix
    counts what its queued prefills will have cached by the time this one starts
    (`view.pending`: a session's next turn finds its previous turn where that one queued,
    before any KV event says so); only computed blocks can be pulled.

        score = queue + service + weight × (service − least service over candidates)

    `service − least service` is work the cluster does only because the request did not go
    where its prefix is (tokens recomputed, or pulled): every request queued behind it waits
    that much longer. `weight` is how many requests that is: the cluster's backlog (mean
    queued seconds per healthy prefill node) over the typical service time (a running mean),
    at most `MAX_WEIGHT`. An idle cluster gives 0 (kv_centric: the lowest TTFT wins, hot
    prefixes spread); a backlogged one keeps requests where their prefix is unless the queue
    there outweighs the extra work.
    """

    name = PolicyName.COST_AWARE
    MAX_WEIGHT = 16.0
    LATE_QUEUE_SLOS = 4.0  # a queue already past the TTFT SLO takes late requests up to this many SLOs
    PREFER_FITS = True
    LATE_ROUTING = True
    LATE_BACKLOG_SLOS = 0.5
    SERVICE_EWMA = 0.02  # weight of each decision in the running mean service time

    def __init__(self, costs: CostModel, seed: int = 0) -> None:
        super().__init__(costs, seed)
        self._typical_service_s = 0.0

    def choose_prefill(self, view: ClusterView, request: RequestInfo, now_s: float) -> PrefillChoice | None:
        cached = self._match(view, request)
        match = cached
        if view.pending is not None and request.block_hashes:
            pending = view.pending.longest_prefix(request.block_hashes)
            if pending:
                match = dict(cached)
                for node_id, depth in pending.items():
                    if depth > match.get(node_id, 0):
                        match[node_id] = depth
        tiers = LowerTiers(view, request, self.costs)
        groups = _least_busy_by_depth(view, match, tiers)
        if not groups:
            return None
        n, bt, costs = request.input_tokens, view.block_tokens, self.costs
        top_depth = max(cached.values(), default=0)  # what can be pulled: computed blocks only
        top_tokens = _reusable(top_depth, bt, n)
        top_prefill = costs.prefill_s(n, top_tokens)
        options = []
        least = float("inf")
        pullable = top_depth if top_depth > 0 and _has_holder(view, cached, top_depth) else 0
        for (depth, extra, extra_s), (busy, i, node) in groups.items():
            service, pull = _service(costs, n, bt, depth, extra, extra_s, pullable, top_tokens, top_prefill)
            options.append((service, busy, i, node, depth, pull))
            if service < least:
                least = service
        typical = self._typical_service_s
        typical = least if typical == 0.0 else typical + self.SERVICE_EWMA * (least - typical)
        self._typical_service_s = typical
        # The backlog is asked for only where it can change the choice (it costs a heap
        # walk on a large cluster): to weigh two or more options, or to route a late request.
        backlog = -1.0  # not asked yet
        slo = self.settings.ttft_slo_s if self.settings is not None else float("inf")
        send = costs.network_s(n)
        fits = [o for o in options if (o[1] - now_s if o[1] > now_s else 0.0) + o[0] + send <= slo]
        if fits:
            if self.PREFER_FITS:
                options = fits
        elif self.LATE_ROUTING and (least + send <= slo
                                    or (backlog := _backlog_s(view, now_s)) > self.LATE_BACKLOG_SLOS * slo):
            # queues make it miss its TTFT SLO wherever it goes (an idle node would not): go
            # where those queued behind it miss theirs anyway
            late = self._late_options(view, match, request, now_s, slo - send, self.LATE_QUEUE_SLOS * slo,
                                      top_depth, top_tokens, top_prefill, tiers)
            if late:
                options = late
        weight = 0.0  # one option: nothing to weigh
        if len(options) > 1:
            if backlog < 0.0:
                backlog = _backlog_s(view, now_s)
            weight = backlog / typical if typical > 0.0 else 0.0
            if weight > self.MAX_WEIGHT:
                weight = self.MAX_WEIGHT
        best_key, best = None, None
        for option in options:
            service, busy, i = option[0], option[1], option[2]
            queue = busy - now_s if busy > now_s else 0.0
            key = (queue + service + weight * (service - least), busy, i)
            if best_key is None or key < best_key:
                best_key, best = key, option
        assert best is not None  # (options is not empty)
        _, _, _, node, depth, pull = best
        if pull:
            return self._estimate(view, request, node, now_s, depth, _first_holder(view, cached, top_depth),
                                  top_depth - depth)
        return self._estimate(view, request, node, now_s, depth, tiers=tiers)


    def _late_options(self, view, match, request, now_s, queue_limit_s, queue_cap_s, top_depth, top_tokens,
                      top_prefill, tiers):
        """Options on the healthy nodes whose queue alone passes `queue_limit_s` but not
        `queue_cap_s` (the least busy of each prefix among them)."""
        groups: dict[tuple[int, int, float], tuple[float, int, PrefillNodeView]] = {}
        limit, cap = now_s + queue_limit_s, now_s + queue_cap_s
        for i, node in enumerate(view.prefill):
            busy = node.busy_until_s
            if not node.healthy or busy <= limit or busy > cap:
                continue
            depth = match.get(node.node_id, 0)
            key = (depth, *tiers.run(node.node_id, depth)) if tiers.on else (depth, 0, 0.0)
            best = groups.get(key)
            if best is None or busy < best[0]:
                groups[key] = (busy, i, node)
        n, bt, costs = request.input_tokens, view.block_tokens, self.costs
        out = []
        for (depth, extra, extra_s), (busy, i, node) in groups.items():
            p = _reusable(depth, bt, n)
            service = costs.local_load_s(p) + extra_s + costs.prefill_s(n, _reusable(depth + extra, bt, n))
            pull = False
            if depth + extra < top_depth:
                pull_service = costs.local_load_s(p) + costs.network_s(top_tokens - p) + top_prefill
                if pull_service < service:
                    service, pull = pull_service, True
            out.append((service, busy, i, node, depth, pull))
        return out


def _backlog_s(view: ClusterView, now_s: float) -> float:
    """Mean predicted queue (seconds) over the healthy prefill nodes."""
    loads = _prefill_index(view)
    if loads is not None:
        return loads.backlog_s(now_s)
    total, count = 0.0, 0
    for p in view.prefill:
        if p.healthy:
            count += 1
            if p.busy_until_s > now_s:
                total += p.busy_until_s - now_s
    return total / count if count else 0.0


POLICIES: dict[PolicyName, type[Policy]] = {
    cls.name: cls
    for cls in (RandomPolicy, RoundRobinPolicy, LeastLoadedPolicy, CacheAwareLocalPolicy, KvCentricPolicy,
                LongestPrefixPolicy, CostAwarePolicy)
}


def make_policy(name: PolicyName | str, costs: CostModel, seed: int = 0) -> Policy:
    from conductor.modes import parse_policy

    return POLICIES[parse_policy(str(name))](costs, seed)
