"""Issue 13's policy evaluation: every routing policy on every workload at several loads.

    python -m bench.sim.compare policies --json out/policies.json        # the full grid
    python -m bench.sim.compare policies --workloads tool_agent --loads 0.5,1.0 --requests 3000

Cells: {conversation trace, tool_agent, uniform, shifting} x {loads as fractions of the
cluster's capacity (`bench.sim.load`: perfect-reuse prefill work or decode work, whichever
binds)}, on 8P+8D of the GPU-class cost model, admission `none` (routing alone). Per cell it
prints every policy's mean TTFT and goodput and the default policy's ratio to the best of
the others (target: TTFT <= 1.05x, goodput >= 0.95x), writes every row as JSON and a PNG of
the ratios.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Sequence

from bench.sim.cluster import SimConfig, SimRequest, simulate
from bench.sim.load import offered_load
from bench.sim.metrics import SimSummary, summarize
from bench.sim.trace import DEFAULT_TRACE, load_sim_requests, to_sim_requests
from bench.sim.workloads import GENERATORS
from conductor.cost_model import CostModel, gpu_class_default
from conductor.modes import AdmissionMode, PolicyName, parse_admission, parse_policy
from conductor.settings import SettingsValues

WORKLOADS = ("conversation", "tool_agent", "uniform", "shifting")
LOADS = (0.5, 0.8, 1.1, 1.5)
DEFAULT_POLICY = SettingsValues().policy
TTFT_TARGET, GOODPUT_TARGET = 1.05, 0.95


@dataclass(frozen=True, slots=True)
class Cell:
    workload: str
    load: float
    speedup: float
    rows: tuple[SimSummary, ...]

    def best(self, field: str, lower: bool) -> SimSummary:
        rows = [r for r in self.rows if not math.isnan(getattr(r, field))]
        return (min if lower else max)(rows, key=lambda r: getattr(r, field))

    def row(self, policy: str) -> SimSummary:
        return next(r for r in self.rows if r.policy == policy)


def base_requests(workload: str, requests: int, seed: int) -> list[SimRequest]:
    """The workload at its own speed (the conversation trace: its first `requests`)."""
    if workload == "conversation":
        return load_sim_requests(DEFAULT_TRACE, limit=requests)
    if workload not in GENERATORS:
        raise ValueError(f"unknown workload {workload!r}; choose from {', '.join(WORKLOADS)}")
    return to_sim_requests(GENERATORS[workload](requests, seed=seed))


def at_load(requests: list[SimRequest], load: float, config: SimConfig, costs: CostModel) -> tuple[list[SimRequest], float]:
    """The requests sped up (or slowed down) so they offer `load` of the cluster's capacity."""
    offered = offered_load(requests, costs, block_tokens=config.block_tokens, tbt_slo_s=config.tbt_slo_s,
                           kv_capacity_tokens=config.decode_kv_tokens).of(config.prefill_nodes, config.decode_nodes)
    speedup = load / offered
    return [replace(r, arrival_s=r.arrival_s / speedup) for r in requests], speedup


def run_cell(workload: str, load: float, requests: list[SimRequest], config: SimConfig, costs: CostModel,
             policies: Sequence[PolicyName]) -> Cell:
    scaled, speedup = at_load(requests, load, config, costs)
    typical = max(1, round(sum(r.output_tokens for r in scaled) / len(scaled)))
    rows = []
    for policy in policies:
        started = time.perf_counter()
        run = simulate(scaled, replace(config, policy=policy, typical_output_tokens=typical), costs)
        rows.append(summarize(run, speedup=speedup, wall_s=time.perf_counter() - started))
    return Cell(workload, load, speedup, tuple(rows))


def verdict(cell: Cell, default: str) -> dict[str, float]:
    d = cell.row(default)
    others = [r for r in cell.rows if r.policy != default]
    best_ttft = min(r.ttft_mean_s for r in others)
    best_goodput = max(r.goodput_rps for r in others)
    return {
        "ttft_ratio": d.ttft_mean_s / best_ttft if best_ttft > 0 else math.nan,
        "goodput_ratio": d.goodput_rps / best_goodput if best_goodput > 0 else 1.0,
        "best_other_ttft_policy": min(others, key=lambda r: r.ttft_mean_s).policy,
        "best_other_goodput_policy": max(others, key=lambda r: r.goodput_rps).policy,
    }


def print_cells(cells: Sequence[Cell], default: str, out=None) -> int:
    """The table; returns how many cells miss a target."""
    out = out or sys.stdout
    policies = [r.policy for r in cells[0].rows]
    head = f"{'workload':<13}{'load':>5}{'speed':>7} | " + " ".join(f"{p[:14]:>14}" for p in policies)
    print("mean TTFT s (goodput req/s) per policy; ratio = default / best other", file=out)
    print(head + " | TTFT ratio  goodput ratio", file=out)
    misses = 0
    for c in cells:
        v = verdict(c, default)
        ok = v["ttft_ratio"] <= TTFT_TARGET and v["goodput_ratio"] >= GOODPUT_TARGET
        misses += not ok
        vals = " ".join(f"{_fmt(c.row(p).ttft_mean_s)}({c.row(p).goodput_rps:5.2f})".rjust(14) for p in policies)
        print(f"{c.workload:<13}{c.load:>5.2f}{c.speedup:>7.2f} | {vals} | {v['ttft_ratio']:>10.3f}  "
              f"{v['goodput_ratio']:>13.3f}{'' if ok else '  MISS'}", file=out)
    return misses


def _fmt(x: float) -> str:
    return "-" if math.isnan(x) else (f"{x:.2f}" if x < 100 else f"{x:.0f}")


def write_json(cells: Sequence[Cell], default: str, path: Path) -> None:
    data = [{"workload": c.workload, "load": c.load, "speedup": c.speedup, **verdict(c, default),
             "rows": [_clean(asdict(r)) for r in c.rows]} for c in cells]
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def _clean(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    return value


def write_plot(cells: Sequence[Cell], default: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = list(dict.fromkeys(c.workload for c in cells))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for w in workloads:
        row = [c for c in cells if c.workload == w]
        v = [verdict(c, default) for c in row]
        axes[0].plot([c.load for c in row], [x["ttft_ratio"] for x in v], marker="o", label=w)
        axes[1].plot([c.load for c in row], [x["goodput_ratio"] for x in v], marker="o", label=w)
    axes[0].axhline(TTFT_TARGET, color="red", ls="--")
    axes[1].axhline(GOODPUT_TARGET, color="red", ls="--")
    axes[0].set_ylabel(f"mean TTFT: {default} / best other")
    axes[1].set_ylabel(f"goodput: {default} / best other")
    for ax in axes:
        ax.set_xlabel("offered load (fraction of 8P+8D capacity)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.sim.compare", description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=("policies",))
    p.add_argument("--workloads", default=",".join(WORKLOADS))
    p.add_argument("--loads", default=",".join(f"{x:g}" for x in LOADS))
    p.add_argument("--policies", help="comma-separated (default: every policy)")
    p.add_argument("--default", default=str(DEFAULT_POLICY), help="the policy judged against the others")
    p.add_argument("--requests", type=int, default=12_000, help="requests per workload (default 12,000)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--prefill", type=int, default=8)
    p.add_argument("--decode", type=int, default=8)
    p.add_argument("--admission", default=AdmissionMode.NONE.value)
    p.add_argument("--json", type=Path)
    p.add_argument("--plot", type=Path, help="default: next to --json")
    args = p.parse_args(argv)
    costs = gpu_class_default()
    policies = [parse_policy(x) for x in args.policies.split(",")] if args.policies else list(PolicyName)
    default = str(parse_policy(args.default))
    if default not in policies:
        policies.append(PolicyName(default))
    config = SimConfig(prefill_nodes=args.prefill, decode_nodes=args.decode, admission=parse_admission(args.admission))
    cells = []
    started = time.perf_counter()
    for workload in args.workloads.split(","):
        requests = base_requests(workload, args.requests, args.seed)
        for load in (float(x) for x in args.loads.split(",")):
            cells.append(run_cell(workload, load, requests, config, costs, policies))
            print(f"  {workload} at load {load:g}: done ({time.perf_counter() - started:.0f} s)", file=sys.stderr)
    misses = print_cells(cells, default)
    print(f"{len(cells) - misses}/{len(cells)} cells meet both targets; {time.perf_counter() - started:.0f} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        write_json(cells, default, args.json)
        write_plot(cells, default, args.plot or args.json.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
