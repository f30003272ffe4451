"""Elastic prefill/decode roles in the simulator, and the comparison with fixed splits.

`ElasticSimulation` runs N nodes that start as a P:D split and lets the conductor's
`RolePlanner` move them: every `interval_s` it reports the work dispatched to each pool and
the TTFT/TBT it observed; a move drains the chosen node (out of rotation: it takes nothing
new and finishes what it has; a prefill node its queue, a decode node its residents), then
the node is out for `switch_s` (the switch's cost: its KV memory re-laid out, its prefix
cache lost) and rejoins the other pool empty. Everything goes through `ClusterState`
(node_down, remove_node, add_prefill / add_decode), as the live conductor would.

    python -m bench.sim.elastic --json out/elastic.json

runs the shifting workload on 16 nodes: every fixed split from 2:14 to 14:2, and the
elastic cluster, and prints goodput side by side (target: elastic >= 1.2x the best fixed).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Sequence

import numpy as np

from bench import flags
from bench.sim.cluster import _TICK, RequestState, SimConfig, SimRequest, Simulation
from bench.sim.load import offered_load
from bench.sim.metrics import SimSummary, summarize
from bench.sim.nodes import SimDecode, SimPrefill
from bench.sim.trace import to_sim_requests
from bench.sim.workloads import ShiftingShape, shifting
from conductor.cost_model import CostModel, gpu_class_default
from conductor.decision import Decision
from conductor.modes import parse_admission
from conductor.settings import SettingsValues
from conductor.request import NodeId
from conductor.role_planner import PlannerSettings, PoolObservation, Role, RolePlanner, pick_drain


@dataclass(frozen=True, slots=True)
class ElasticConfig:
    nodes: int = 16
    initial_prefill: int = 8
    switch_s: float = 20.0
    planner: PlannerSettings = field(default_factory=PlannerSettings)


@dataclass(frozen=True, slots=True)
class RoleSample:
    t_s: float
    prefill: int
    decode: int
    switching: int
    desired_prefill: float


class ElasticSimulation(Simulation):
    def __init__(self, requests: list[SimRequest], config: SimConfig, costs: CostModel, elastic: ElasticConfig) -> None:
        if not 1 <= elastic.initial_prefill < elastic.nodes:
            raise ValueError("elastic: need 1 <= initial_prefill < nodes")
        self.elastic = elastic
        config = replace(config, prefill_nodes=elastic.initial_prefill, decode_nodes=elastic.nodes - elastic.initial_prefill)
        super().__init__(requests, config, costs)
        self.planner = RolePlanner(elastic.planner)
        self.draining: dict[str, Role] = {}  # node -> the role it is leaving for
        self.switching: dict[str, Role] = {}  # drained, not yet back
        self.moves: list[tuple[float, str, Role, str]] = []  # (when, node, to, why)
        self.drained: list[tuple[float, str]] = []  # (when, node): out of its old pool
        self.timeline: list[RoleSample] = []
        self._prefill_work = self._decode_work = 0.0
        self._ttfts: list[float] = []
        self._tbts: list[float] = []
        if requests:
            self._push(requests[0].arrival_s + elastic.planner.interval_s, _TICK, ("plan", None))

    def initial_nodes(self) -> tuple[list[str], list[str]]:
        c = self.config
        ids = [f"n{i}" for i in range(c.prefill_nodes + c.decode_nodes)]
        return ids[: c.prefill_nodes], ids[c.prefill_nodes:]

    # -- what the planner observes -----------------------------------------------------------------
    def _place(self, st: RequestState, decision: Decision, t: float) -> None:
        super()._place(st, decision, t)
        if st.decode is None:  # refused a reservation
            return
        self._prefill_work += decision.prefill.service_s  # type: ignore[union-attr]
        req = st.req
        rate = self.costs.decode_tokens_per_s(req.input_tokens + req.output_tokens / 2, self.config.tbt_slo_s,
                                              self.config.decode_kv_tokens)
        self._decode_work += req.output_tokens / rate

    def _kv_arrived(self, st: RequestState, t: float) -> None:
        self._ttfts.append(t - st.req.arrival_s)
        super()._kv_arrived(st, t)

    def completed(self, st: RequestState, t: float) -> None:
        if st.req.output_tokens > 1:
            self._tbts.append((t - st.first_token_s) / (st.req.output_tokens - 1))

    # -- planner ticks and switches ------------------------------------------------------------------
    def _tick(self, payload, t: float) -> None:
        kind, node_id = payload
        if kind == "join":
            self._rejoin(node_id, t)
            return
        cfg = self.config
        to_p = sum(1 for r in (*self.draining.values(), *self.switching.values()) if r is Role.PREFILL)
        to_d = len(self.draining) + len(self.switching) - to_p
        serving_p = len(self.prefill_by_id) - sum(1 for n in self.draining if n in self.prefill_by_id)
        serving_d = len(self.decode_by_id) - sum(1 for n in self.draining if n in self.decode_by_id)
        obs = PoolObservation(
            now_s=t, prefill_nodes=serving_p, decode_nodes=serving_d, to_prefill=to_p, to_decode=to_d,
            prefill_work_s=self._prefill_work, decode_work_s=self._decode_work,
            ttft_ratio=float(np.percentile(self._ttfts, 90)) / cfg.ttft_slo_s if self._ttfts else math.nan,
            tbt_ratio=float(np.percentile(self._tbts, 90)) / cfg.tbt_slo_s if self._tbts else math.nan,
        )
        self._prefill_work = self._decode_work = 0.0
        self._ttfts, self._tbts = [], []
        move = self.planner.observe(obs)
        if move is not None:
            source = Role.DECODE if move.to is Role.PREFILL else Role.PREFILL
            for _ in range(move.count):
                node = pick_drain(self.view, source, t, frozenset(NodeId(n) for n in self.draining))
                if node is None:
                    break
                self.moves.append((t, node, move.to, move.reason))
                self._drain(node, move.to, t)
        self.timeline.append(RoleSample(t, serving_p, serving_d, to_p + to_d, self.planner.desired_prefill))
        if self._next_arrival < len(self.states) or self._in_flight > 0:
            self._push(t + self.elastic.planner.interval_s, _TICK, ("plan", None))

    def _drain(self, node_id: str, to: Role, t: float) -> None:
        self.draining[node_id] = to
        self.state.node_down(NodeId(node_id))
        pre, dec = self.prefill_by_id.get(node_id), self.decode_by_id.get(node_id)
        if (pre is not None and pre.idle) or (dec is not None and dec.residents == 0):
            self._drained(node_id, t)

    def prefill_idle(self, node: SimPrefill, t: float) -> None:
        if node.node_id in self.draining:
            self._drained(node.node_id, t)

    def decode_idle(self, node: SimDecode, t: float) -> None:
        if node.node_id in self.draining and node.residents == 0:
            self._drained(node.node_id, t)

    def _drained(self, node_id: str, t: float) -> None:
        to = self.draining.pop(node_id)
        left = self.state.remove_node(NodeId(node_id))
        assert not left, f"{node_id} left with requests {left}"
        self.prefill_by_id.pop(node_id, None)
        self.decode_by_id.pop(node_id, None)
        self.drained.append((t, node_id))
        self.switching[node_id] = to
        self._push(t + self.elastic.switch_s, _TICK, ("join", node_id))

    def _rejoin(self, node_id: str, t: float) -> None:
        to = self.switching.pop(node_id)
        if to is Role.PREFILL:
            self.add_prefill(node_id)
        else:
            self.add_decode(node_id)


# -- the comparison ----------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class ElasticResult:
    label: str
    prefill: int  # the fixed split (elastic: where it started)
    decode: int
    summary: SimSummary
    moves: int = 0


def peak_demand(requests: list[SimRequest], config: SimConfig, costs: CostModel, window_s: float = 60.0) -> float:
    """Node-seconds per second of prefill (perfect reuse) and decode together, in the busiest
    `window_s` of the trace: what the cluster must hold with the split always right."""
    peak, start = 0.0, 0
    while start < len(requests):
        t0 = requests[start].arrival_s
        end = start
        while end < len(requests) and requests[end].arrival_s < t0 + window_s:
            end += 1
        window = requests[start:end]
        if len(window) >= 2 and window[-1].arrival_s > window[0].arrival_s:
            o = offered_load(window, costs, block_tokens=config.block_tokens, tbt_slo_s=config.tbt_slo_s,
                             kv_capacity_tokens=config.decode_kv_tokens)
            peak = max(peak, o.prefill_node_s_per_s + o.decode_node_s_per_s)
        start = end
    return peak


# The mix the elastic comparison runs: the two kinds of request cost a node about the same
# (5-8k-token prompts with short answers against 1-2k-token prompts with 0.8-2k-token answers,
# at 20 and 24 requests/s), so whichever pool a fixed split starves, it loses many requests;
# plateaus at each end of a 40-minute swing (before the speed-up).
ELASTIC_SHAPE = ShiftingShape(long_input=(4_000, 8_000), short_output=(16, 64), short_input=(1_000, 2_000),
                              long_output=(800, 2_000), prefill_heavy_rate=20.0, decode_heavy_rate=24.0,
                              period_s=2_400.0, sharpness=3.0)


def scaled_shifting(requests: int, seed: int, nodes: int, load: float, config: SimConfig, costs: CostModel,
                    shape: ShiftingShape = ELASTIC_SHAPE) -> tuple[list[SimRequest], float]:
    """The shifting workload at `load` of what `nodes` nodes hold in its busiest minute with
    the split always right."""
    base = to_sim_requests(shifting(requests, seed=seed, shape=shape))
    speedup = load * nodes / peak_demand(base, config, costs)
    return [replace(r, arrival_s=r.arrival_s / speedup) for r in base], speedup


def compare(requests: list[SimRequest], speedup: float, config: SimConfig, costs: CostModel, elastic: ElasticConfig,
            splits: Sequence[int]) -> tuple[list[ElasticResult], ElasticSimulation]:
    typical = max(1, round(sum(r.output_tokens for r in requests) / len(requests)))
    config = replace(config, typical_output_tokens=typical)
    results = []
    for p in splits:
        started = time.perf_counter()
        from bench.sim.cluster import simulate

        run = simulate(requests, replace(config, prefill_nodes=p, decode_nodes=elastic.nodes - p), costs)
        results.append(ElasticResult(f"fixed {p}:{elastic.nodes - p}", p, elastic.nodes - p,
                                     summarize(run, speedup=speedup, wall_s=time.perf_counter() - started)))
    started = time.perf_counter()
    sim = ElasticSimulation(requests, config, costs, elastic)
    run = sim.run()
    results.append(ElasticResult("elastic", elastic.initial_prefill, elastic.nodes - elastic.initial_prefill,
                                 summarize(run, speedup=speedup, wall_s=time.perf_counter() - started), len(sim.moves)))
    return results, sim


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.sim.elastic", description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=flags.count(2), default=60_000)
    p.add_argument("--period", type=flags.positive, default=ELASTIC_SHAPE.period_s, help="the mix's period before the speed-up, s")
    p.add_argument("--seed", type=flags.SEED, default=1)
    p.add_argument("--nodes", type=flags.count(2), default=16)
    p.add_argument("--load", type=flags.positive, default=0.95,
                   help="of what the nodes hold in the busiest minute with the split always right")
    p.add_argument("--sharpness", type=flags.non_negative, default=ELASTIC_SHAPE.sharpness,
                   help="plateaus of the mix (0: a cosine)")
    p.add_argument("--initial-prefill", type=flags.count(1), help="the elastic run's first split (default: half)")
    p.add_argument("--switch-s", type=flags.non_negative, default=20.0, help="a node's time out of service while switching")
    p.add_argument("--splits", type=flags.counts(1), help="fixed prefill counts to compare (default: 2 .. nodes-2)")
    p.add_argument("--admission", default=str(SettingsValues().admission), help="admission mode (default: %(default)s)")
    p.add_argument("--json", type=Path)
    p.add_argument("--plot", type=Path, help="default: next to --json")
    args = p.parse_args(argv)
    return flags.run(p.prog, lambda: _main(args))


def _main(args: argparse.Namespace) -> int:
    costs = gpu_class_default()
    config = SimConfig(admission=parse_admission(args.admission))
    elastic = ElasticConfig(nodes=args.nodes, initial_prefill=args.initial_prefill or args.nodes // 2,
                            switch_s=args.switch_s)
    shape = replace(ELASTIC_SHAPE, period_s=args.period, sharpness=args.sharpness)
    requests, speedup = scaled_shifting(args.requests, args.seed, args.nodes, args.load, config, costs, shape)
    splits = args.splits or list(range(2, args.nodes - 1))
    started = time.perf_counter()
    results, sim = compare(requests, speedup, config, costs, elastic, splits)
    best = max((r for r in results if r.label != "elastic"), key=lambda r: r.summary.goodput_rps)
    el = results[-1]
    print(f"shifting workload: {len(requests)} requests over {sim.requests[-1].arrival_s:.0f} s on {args.nodes} nodes, "
          f"load {args.load:g} (speed-up {speedup:.2f}), switch {args.switch_s:g} s, admission {config.admission}")
    print(f"{'run':<14}{'goodput r/s':>12}{'SLO att.':>10}{'TTFT mean s':>13}{'TTFT p90 s':>12}{'TBT p99 ms':>12}"
          f"{'rejected':>10}{'moves':>7}")
    for r in results:
        s = r.summary
        print(f"{r.label:<14}{s.goodput_rps:>12.3f}{s.slo_attainment:>10.3f}{s.ttft_mean_s:>13.2f}{s.ttft_p90_s:>12.2f}"
              f"{s.tbt_p99_s * 1000:>12.1f}{s.rejected:>10}{r.moves:>7}")
    gain = el.summary.goodput_rps / best.summary.goodput_rps if best.summary.goodput_rps > 0 else math.inf
    print(f"elastic / best fixed ({best.label}): {gain:.2f}x goodput; {time.perf_counter() - started:.0f} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        data = {"speedup": speedup, "best_fixed": best.label, "gain": gain,
                "results": [{"label": r.label, "prefill": r.prefill, "decode": r.decode, "moves": r.moves,
                             **{k: v for k, v in asdict(r.summary).items() if isinstance(v, (int, float, str))}}
                            for r in results],
                "timeline": [asdict(x) for x in sim.timeline]}
        args.json.write_text(json.dumps(data, indent=2, default=lambda v: None) + "\n", encoding="utf-8")
        _plot(results, sim, args.plot or args.json.with_suffix(".png"))
    return 0


def _plot(results: list[ElasticResult], sim: ElasticSimulation, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    ax = axes[0]
    ax.bar(range(len(results)), [r.summary.goodput_rps for r in results],
           color=["tab:gray"] * (len(results) - 1) + ["tab:green"])
    ax.set_xticks(range(len(results)))
    ax.set_xticklabels([r.label.replace("fixed ", "") for r in results], rotation=60, fontsize=8)
    ax.set_ylabel("goodput (req/s)")
    ax = axes[1]
    t = [x.t_s for x in sim.timeline]
    ax.plot(t, [x.prefill for x in sim.timeline], label="prefill nodes")
    ax.plot(t, [x.decode for x in sim.timeline], label="decode nodes")
    ax.plot(t, [x.desired_prefill for x in sim.timeline], ls="--", label="desired prefill")
    ax.set_xlabel("simulated time (s)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
