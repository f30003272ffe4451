"""How much of a cluster a trace asks for: the offered load, so comparisons can be run at
chosen fractions of a cluster's capacity.

- prefill: node-seconds of prefill per second with *perfect* reuse (every block seen
  before anywhere in the trace is reused): the least work any policy can get away with, so
  a load of 1.0 saturates the prefill pool whatever the routing.
- decode: node-seconds per second at the rate one decode node sustains within the TBT SLO:
  the largest batch whose step time stays within `slo_fraction` of the SLO and whose KV
  (prompt + answer of each, at the trace's token-weighted mean) fits the node.

`offered_load(...).of(prefill_nodes, decode_nodes)` is the larger of the two utilisations.

It is an estimate from the work alone: it does not see what a queue costs while it lasts
(a decode node reserves a request's KV on dispatch, so prompts waiting for a prefill hold
decode memory) nor the hit rate a policy really reaches, so on some workloads the cluster
serves well below (or above) its 1.0 within the SLOs. Where a load must mean a multiple of
what the cluster serves (the admission grid's "2x overload"), `bench.sim.capacity`
measures it instead and scales from there.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from bench.sim.cluster import SimRequest
from conductor.cost_model import CostModel


@dataclass(frozen=True, slots=True)
class OfferedLoad:
    prefill_node_s_per_s: float  # perfect reuse
    prefill_no_reuse_node_s_per_s: float
    decode_node_s_per_s: float

    def of(self, prefill_nodes: int, decode_nodes: int) -> float:
        return max(self.prefill_node_s_per_s / prefill_nodes, self.decode_node_s_per_s / decode_nodes)


def offered_load(requests: Sequence[SimRequest], costs: CostModel, *, block_tokens: int, tbt_slo_s: float,
                 kv_capacity_tokens: int) -> OfferedLoad:
    if len(requests) < 2:
        raise ValueError("need at least two requests to measure a rate")
    span = requests[-1].arrival_s - requests[0].arrival_s
    if span <= 0:
        raise ValueError("the requests arrive all at once: no rate")
    # Hashes as objects, not ints: compiled (`bench.sim.native`), an int loop would unbox
    # each hash and box it again for the set.
    seen: set[Any] = set()
    ideal = none = 0.0
    out_tokens = 0
    weighted_context = 0.0
    for r in requests:
        n = r.input_tokens
        depth = 0
        hashes: Sequence[Any] = r.block_hashes
        while depth < len(hashes) and hashes[depth] in seen:
            depth += 1
        seen.update(hashes)
        p = min(depth * block_tokens, n - 1)
        ideal += costs.prefill_s(n, p)
        none += costs.prefill_s(n, 0)
        out_tokens += r.output_tokens
        weighted_context += r.output_tokens * (n + r.output_tokens / 2.0)
    context = weighted_context / out_tokens if out_tokens else 1.0
    rate = costs.decode_tokens_per_s(context, tbt_slo_s, kv_capacity_tokens)
    return OfferedLoad(ideal / span, none / span, out_tokens / rate / span)
