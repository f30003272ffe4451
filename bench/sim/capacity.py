"""A workload's measured capacity on a cluster: what "load 1.0" means in the grids.

`bench.sim.load` estimates the offered load from the work a trace asks for (prefill with
perfect reuse, decode at the TBT SLO's rate), which says nothing about what holds up while
a run queues: the decode node reserves a request's KV on dispatch, so prompts waiting for a
prefill node hold decode memory too, and the prefix hit rate a policy reaches is below the
perfect-reuse bound. On some workloads that estimate is near the capacity, on others not.

`calibrate` measures it instead: the highest speed-up at which the policy without
admission (`none`) keeps both SLOs for at least `target` (90%) of the requests, found by a
bisection in the simulator on the offered-load scale (each probe one run of the whole
workload). `Capacity.speedup_at(load)` is then the speed-up of `load` times that capacity:
load 2.0 is twice the rate the cluster serves within its SLOs without admission.

SLO attainment is not strictly monotone in the rate (a faster replay can line bursts up
differently), so the bisection finds *a* crossing of the target between a probe that meets
it and a faster one that does not; the probes are kept so a reader can see how sharp the
knee is.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Sequence

from bench.sim.cluster import SimConfig, SimRequest, simulate
from bench.sim.load import offered_load
from bench.sim.metrics import summarize
from conductor.cost_model import CostModel
from conductor.modes import AdmissionMode

TARGET_ATTAINMENT = 0.9


@dataclass(frozen=True, slots=True)
class Capacity:
    """The calibrated load 1.0 of a workload on a cluster."""

    offered_load: float  # the offered-load fraction (`bench.sim.load`) the cluster keeps within the SLOs
    speedup: float  # the workload's speed-up at that load
    attainment: float  # SLO attainment measured there
    target: float
    policy: str
    probes: tuple[tuple[float, float], ...]  # (offered load, SLO attainment) of every run, in order

    def speedup_at(self, load: float) -> float:
        return load * self.speedup


def offered_fraction(requests: Sequence[SimRequest], config: SimConfig, costs: CostModel) -> float:
    """The requests' offered load on `config`'s cluster at their own speed (`bench.sim.load`)."""
    return offered_load(requests, costs, block_tokens=config.block_tokens, tbt_slo_s=config.tbt_slo_s,
                        kv_capacity_tokens=config.decode_kv_tokens).of(config.prefill_nodes, config.decode_nodes)


def sped_up(requests: Sequence[SimRequest], speedup: float) -> list[SimRequest]:
    """The requests with every arrival time divided by `speedup`."""
    return [SimRequest(r.index, r.arrival_s / speedup, r.input_tokens, r.output_tokens, r.block_hashes)
            for r in requests]


def attainment(requests: Sequence[SimRequest], speedup: float, config: SimConfig, costs: CostModel) -> float:
    """SLO attainment of one run of `requests` at `speedup` under `config` with admission `none`."""
    run_requests = sped_up(requests, speedup)
    typical = max(1, round(sum(r.output_tokens for r in run_requests) / len(run_requests)))
    run = simulate(run_requests, replace(config, admission=AdmissionMode.NONE, typical_output_tokens=typical,
                                         record_events=False), costs)
    return summarize(run, speedup=speedup, wall_s=0.0).slo_attainment


def calibrate(requests: Sequence[SimRequest], config: SimConfig, costs: CostModel, *,
              target: float = TARGET_ATTAINMENT, low: float = 0.25, high: float = 2.0,
              steps: int = 7) -> Capacity:
    """The highest offered load (found to 2^(log2(high/low) / 2^steps)) at which `config`'s
    policy without admission meets both SLOs for >= `target` of `requests`. The bracket
    [`low`, `high`] widens (by halving / doubling, at most 4 times each) until `low` meets
    the target and `high` does not."""
    if not 0.0 < target <= 1.0 or not 0.0 < low < high or steps < 1:
        raise ValueError("calibrate: need 0 < target <= 1, 0 < low < high, steps >= 1")
    base = offered_fraction(requests, config, costs)
    probes: list[tuple[float, float]] = []

    def probe(load: float) -> float:
        value = attainment(requests, load / base, config, costs)
        probes.append((load, value))
        return value

    lo_value = probe(low)
    for _ in range(4):
        if lo_value >= target:
            break
        high, low = low, low / 2.0
        lo_value = probe(low)
    hi_value = probe(high)
    for _ in range(4):
        if hi_value < target:
            break
        low, lo_value = high, hi_value
        high *= 2.0
        hi_value = probe(high)
    for _ in range(steps):
        mid = math.sqrt(low * high)
        value = probe(mid)
        if value >= target:
            low, lo_value = mid, value
        else:
            high = mid
    return Capacity(offered_load=low, speedup=low / base, attainment=lo_value, target=target,
                    policy=str(config.policy), probes=tuple(probes))
