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

Decode choice: the node with the lowest predicted load (TBT against its SLO, or KV memory
use) once this request joins — now, or projected to when its prefill ends (predictive
admission); `random` and `round_robin` pick the decode node their own way. Ties go to
the first node in view order (for queue-only comparisons: the node idle longest), so
every decision is deterministic for a given seed.
"""
from __future__ import annotations

import random as _random
from abc import ABC, abstractmethod
from typing import ClassVar

from conductor.cost_model import CostModel
from conductor.decision import DecodeChoice, PrefillChoice
from conductor.modes import PolicyName
from conductor.request import NodeId, RequestInfo
from conductor.settings import SettingsValues
from conductor.view import ClusterView, DecodeNodeView, PrefillNodeView

# Predictive decode choice projects the load of at most this many nodes (those with the
# lowest current load): O(nodes) plus O(residents of K nodes) per decision.
PROJECTION_CANDIDATES = 16


def decode_estimate(
    node: DecodeNodeView,
    request: RequestInfo,
    at_s: float,
    projected: bool,
    settings: SettingsValues,
    costs: CostModel,
) -> DecodeChoice:
    """Predicted step time and KV use of `node` once `request` joins it.

    Current: the running batch plus requests waiting for room. Projected to `at_s`: every
    resident whose (predicted) start is before `at_s` and that, lasting a typical decode
    (its expected output × today's step time), is still decoding then.
    """
    n = request.input_tokens
    out = request.expected_output_tokens or settings.typical_output_tokens
    if not projected:
        batch = node.running + node.waiting + 1
        tokens = node.tokens_in_flight + node.waiting_tokens + n
        reserved = node.reserved_tokens + node.waiting_tokens + n + out
    else:
        step = costs.decode_step_s(node.running if node.running > 0 else 1, node.tokens_in_flight)
        typical = settings.typical_output_tokens
        batch, tokens, reserved = 1, n, n + out
        for r in node.residents.values():
            start = r.ready_at_s
            if start > at_s:
                continue
            r_out = r.expected_output_tokens or typical
            generated = (at_s - start) / step if step > 0 else float(r_out)
            if generated >= r_out:
                continue
            batch += 1
            tokens += r.prompt_tokens + int(generated)
            reserved += r.prompt_tokens + r_out
    return DecodeChoice(
        node=node.node_id,
        predicted_tbt_s=costs.decode_step_s(batch, tokens),
        kv_use=reserved / node.kv_capacity_tokens if node.kv_capacity_tokens > 0 else float("inf"),
        at_s=at_s,
        projected=projected,
    )


class Policy(ABC):
    name: ClassVar[PolicyName]

    def __init__(self, costs: CostModel, seed: int = 0) -> None:
        self.costs = costs
        self._rng = _random.Random(seed)

    @abstractmethod
    def choose_prefill(self, view: ClusterView, request: RequestInfo, now_s: float) -> PrefillChoice | None:
        """The prefill node for `request`, or None when no prefill node is healthy."""

    def choose_decode(
        self,
        view: ClusterView,
        request: RequestInfo,
        at_s: float,
        settings: SettingsValues,
        projected: bool = False,
    ) -> DecodeChoice | None:
        """The decode node with the lowest predicted load; None when none is healthy."""
        healthy = [d for d in view.decode if d.healthy]
        if not healthy:
            return None
        slo = settings.tbt_slo_s
        costs = self.costs
        candidates = healthy
        if projected and len(healthy) > PROJECTION_CANDIDATES:
            current = [(decode_estimate(d, request, at_s, False, settings, costs).load(slo), i) for i, d in enumerate(healthy)]
            current.sort()
            candidates = [healthy[i] for i in sorted(i for _, i in current[:PROJECTION_CANDIDATES])]
        best: DecodeChoice | None = None
        best_load = float("inf")
        for node in candidates:
            choice = decode_estimate(node, request, at_s, projected, settings, costs)
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
    ) -> PrefillChoice:
        n = request.input_tokens
        local = _reusable(cached_blocks, view.block_tokens, n)
        reused = _reusable(cached_blocks + pulled_blocks, view.block_tokens, n)
        costs = self.costs
        return PrefillChoice(
            node=node.node_id,
            cached_blocks=cached_blocks,
            pull_from=pull_from,
            pulled_blocks=pulled_blocks,
            reused_tokens=reused,
            queue_s=node.queue_s(now_s),
            load_s=costs.local_load_s(local),
            pull_s=costs.network_s(reused - local),
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


def _healthy(view: ClusterView) -> list[PrefillNodeView]:
    return [p for p in view.prefill if p.healthy]


class RandomPolicy(Policy):
    name = PolicyName.RANDOM

    def choose_prefill(self, view, request, now_s):
        healthy = _healthy(view)
        if not healthy:
            return None
        node = healthy[self._rng.randrange(len(healthy))]
        return self._estimate(view, request, node, now_s, self._match(view, request).get(node.node_id, 0))

    def choose_decode(self, view, request, at_s, settings, projected=False):
        healthy = [d for d in view.decode if d.healthy]
        if not healthy:
            return None
        node = healthy[self._rng.randrange(len(healthy))]
        return decode_estimate(node, request, at_s, projected, settings, self.costs)


class RoundRobinPolicy(Policy):
    name = PolicyName.ROUND_ROBIN

    def __init__(self, costs: CostModel, seed: int = 0) -> None:
        super().__init__(costs, seed)
        self._next_prefill = 0
        self._next_decode = 0

    def choose_prefill(self, view, request, now_s):
        healthy = _healthy(view)
        if not healthy:
            return None
        node = healthy[self._next_prefill % len(healthy)]
        self._next_prefill += 1
        return self._estimate(view, request, node, now_s, self._match(view, request).get(node.node_id, 0))

    def choose_decode(self, view, request, at_s, settings, projected=False):
        healthy = [d for d in view.decode if d.healthy]
        if not healthy:
            return None
        node = healthy[self._next_decode % len(healthy)]
        self._next_decode += 1
        return decode_estimate(node, request, at_s, projected, settings, self.costs)


class LeastLoadedPolicy(Policy):
    name = PolicyName.LEAST_LOADED

    def choose_prefill(self, view, request, now_s):
        best: PrefillNodeView | None = None
        best_busy = 0.0
        for node in view.prefill:
            if node.healthy and (best is None or node.busy_until_s < best_busy):
                best, best_busy = node, node.busy_until_s
        if best is None:
            return None
        return self._estimate(view, request, best, now_s, self._match(view, request).get(best.node_id, 0))


class CacheAwareLocalPolicy(Policy):
    """Min over nodes of queue + local load + prefill of what that node does not cache."""

    name = PolicyName.CACHE_AWARE_LOCAL

    def choose_prefill(self, view, request, now_s):
        match = self._match(view, request)
        n, bt, costs = request.input_tokens, view.block_tokens, self.costs
        cost_at: dict[int, float] = {}
        best: PrefillNodeView | None = None
        best_t, best_depth = 0.0, 0
        for node in view.prefill:
            if not node.healthy:
                continue
            depth = match.get(node.node_id, 0)
            c = cost_at.get(depth)
            if c is None:
                p = _reusable(depth, bt, n)
                c = cost_at[depth] = costs.local_load_s(p) + costs.prefill_s(n, p)
            t = node.queue_s(now_s) + c
            if best is None or t < best_t:
                best, best_t, best_depth = node, t, depth
        if best is None:
            return None
        return self._estimate(view, request, best, now_s, best_depth)


class KvCentricPolicy(Policy):
    """Mooncake's global policy: per node, the better of using its own prefix or pulling the
    cluster's longest one from a peer first; pick the node with the lowest predicted TTFT."""

    name = PolicyName.KV_CENTRIC

    def choose_prefill(self, view, request, now_s):
        match = self._match(view, request)
        n, bt, costs = request.input_tokens, view.block_tokens, self.costs
        # The longest prefix on any healthy prefill node (first in view order on ties).
        top_depth, top_node = 0, None
        if match:
            for node in view.prefill:
                if node.healthy:
                    d = match.get(node.node_id, 0)
                    if d > top_depth:
                        top_depth, top_node = d, node.node_id
        top_tokens = _reusable(top_depth, bt, n)
        top_prefill = costs.prefill_s(n, top_tokens)
        local_at: dict[int, float] = {}
        pull_at: dict[int, float] = {}
        best: PrefillNodeView | None = None
        best_t, best_depth, best_pull = 0.0, 0, False
        for node in view.prefill:
            if not node.healthy:
                continue
            depth = match.get(node.node_id, 0)
            c = local_at.get(depth)
            if c is None:
                p = _reusable(depth, bt, n)
                c = local_at[depth] = costs.local_load_s(p) + costs.prefill_s(n, p)
            pull = False
            if depth < top_depth:
                cp = pull_at.get(depth)
                if cp is None:
                    p = _reusable(depth, bt, n)
                    cp = pull_at[depth] = costs.local_load_s(p) + costs.network_s(top_tokens - p) + top_prefill
                if cp < c:
                    c, pull = cp, True
            t = node.queue_s(now_s) + c
            if best is None or t < best_t:
                best, best_t, best_depth, best_pull = node, t, depth, pull
        if best is None:
            return None
        if best_pull:
            return self._estimate(view, request, best, now_s, best_depth, top_node, top_depth - best_depth)
        return self._estimate(view, request, best, now_s, best_depth)


class LongestPrefixPolicy(Policy):
    name = PolicyName.LONGEST_PREFIX

    def choose_prefill(self, view, request, now_s):
        match = self._match(view, request)
        best: PrefillNodeView | None = None
        best_key = (0, 0.0)
        for node in view.prefill:
            if not node.healthy:
                continue
            key = (-match.get(node.node_id, 0), node.busy_until_s)
            if best is None or key < best_key:
                best, best_key = node, key
        if best is None:
            return None
        return self._estimate(view, request, best, now_s, -best_key[0])


POLICIES: dict[PolicyName, type[Policy]] = {
    cls.name: cls
    for cls in (RandomPolicy, RoundRobinPolicy, LeastLoadedPolicy, CacheAwareLocalPolicy, KvCentricPolicy, LongestPrefixPolicy)
}


def make_policy(name: PolicyName | str, costs: CostModel, seed: int = 0) -> Policy:
    from conductor.modes import parse_policy

    return POLICIES[parse_policy(str(name))](costs, seed)
