"""Issue 13's evaluations: every routing policy, and every admission mode, on every workload
at several loads.

    python -m bench.sim.compare policies --json out/policies.json        # the full grid
    python -m bench.sim.compare policies --workloads tool_agent --loads 0.5,1.0 --requests 3000
    python -m bench.sim.compare admission --json out/admission.json      # with counterfactuals

Cells: {conversation trace, tool_agent, uniform, shifting} x {loads as fractions of the
cluster's capacity}, on 8P+8D of the GPU-class cost model. What capacity is (`--capacity`):

- `offered` (the policy grid's default): the offered-load estimate of `bench.sim.load`,
  perfect-reuse prefill work or decode work at the TBT SLO's rate, whichever binds;
- `calibrated` (the admission grid's default): measured per workload (`bench.sim.capacity`):
  the fastest replay at which the default policy without admission keeps both SLOs for 90%
  of the requests, found by a bisection of whole-workload runs. "2x overload" is then twice
  what the cluster really serves, whatever the estimate says about the workload.

`policies`: admission `none` (routing alone); per cell every policy's mean TTFT and goodput
and the default policy's ratio to the best of the others (target: TTFT <= 1.05x, goodput
>= 0.95x). `admission`: the default policy under every admission mode; per cell each mode's
goodput, the default mode's ratio to `none` (targets: >= 1 everywhere, >= 5 at 2x
overload) and the precision of its rejections, each judged by a counterfactual run
(`bench.sim.counterfactual`; target >= 90%). Both write every row as JSON and a PNG.
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

from bench import flags
from bench.sim.cluster import SimConfig, SimRequest, simulate
from bench.sim.counterfactual import (DECODE_REASONS, PREFILL_REASONS, Counterfactual, CounterfactualSimulation,
                                     DecodeMargin, Precision)
from bench.sim.capacity import Capacity, calibrate, offered_fraction, sped_up
from bench.sim.metrics import SimSummary, summarize
from bench.sim.trace import DEFAULT_TRACE, load_sim_requests, to_sim_requests
from bench.sim.workloads import GENERATORS, shifting_requests
from conductor.cost_model import CostModel, gpu_class_default
from conductor.modes import AdmissionMode, PolicyName, parse_admission, parse_policy
from conductor.settings import SettingsValues

WORKLOADS = ("conversation", "tool_agent", "uniform", "shifting")
LOADS = (0.5, 0.8, 1.1, 1.5)
ADMISSION_LOADS = (0.5, 0.8, 1.1, 1.5, 2.0)
DEFAULT_POLICY = SettingsValues().policy
DEFAULT_ADMISSION = SettingsValues().admission
TTFT_TARGET, GOODPUT_TARGET = 1.05, 0.95
OVERLOAD, OVERLOAD_GAIN, PRECISION_TARGET = 2.0, 5.0, 0.9
REQUESTS = 12_000
# A time-varying workload is judged over whole swings of its mix: 12,000 shifting requests
# cover 0.83 of one, so a run ended on the way into its decode-heavy half, and whatever
# admitted the most requests just before the last arrival won on goodput with the decode
# work it did after it (measured: docs/results/sim_admission.json, the shifting rows).
SHIFTING_PERIODS = 2


def default_requests(workload: str, given: int | None = None) -> int:
    """Requests per workload: `given` (`--requests`), else the workload's default."""
    if given is not None:
        return given
    return shifting_requests(SHIFTING_PERIODS) if workload == "shifting" else REQUESTS


@dataclass(frozen=True, slots=True)
class Cell:
    workload: str
    load: float
    speedup: float
    rows: tuple[SimSummary, ...]
    capacity: Capacity | None = None  # what load 1.0 is, when measured (None: the offered-load estimate)

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


def at_load(requests: list[SimRequest], load: float, config: SimConfig, costs: CostModel,
            capacity: Capacity | None = None) -> tuple[list[SimRequest], float]:
    """The requests sped up (or slowed down) so they offer `load` of the cluster's capacity:
    the measured one when `capacity` is given (`bench.sim.capacity`), else the offered-load
    estimate (`bench.sim.load`)."""
    speedup = capacity.speedup_at(load) if capacity is not None else load / offered_fraction(requests, config, costs)
    return sped_up(requests, speedup), speedup


def run_cell(workload: str, load: float, requests: list[SimRequest], config: SimConfig, costs: CostModel,
             policies: Sequence[PolicyName], capacity: Capacity | None = None) -> Cell:
    scaled, speedup = at_load(requests, load, config, costs, capacity)
    typical = max(1, round(sum(r.output_tokens for r in scaled) / len(scaled)))
    rows = []
    for policy in policies:
        started = time.perf_counter()
        run = simulate(scaled, replace(config, policy=policy, typical_output_tokens=typical), costs)
        rows.append(summarize(run, speedup=speedup, wall_s=time.perf_counter() - started))
    return Cell(workload, load, speedup, tuple(rows), capacity)


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
    print_capacities(cells, out)
    return misses


def _fmt(x: float) -> str:
    return "-" if math.isnan(x) else (f"{x:.2f}" if x < 100 else f"{x:.0f}")


def write_json(cells: Sequence[Cell], default: str, path: Path) -> None:
    data = [{"workload": c.workload, "load": c.load, "speedup": c.speedup, **_scale(c), **verdict(c, default),
             "rows": [_clean(asdict(r)) for r in c.rows]} for c in cells]
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def _scale(cell) -> dict[str, object]:
    """What the cell's load is a fraction of (JSON fields)."""
    c = cell.capacity
    if c is None:
        return {"load_scale": "offered"}
    return {"load_scale": "calibrated", "capacity": {"offered_load": c.offered_load, "speedup": c.speedup,
                                                      "attainment": c.attainment, "target": c.target,
                                                      "policy": c.policy, "probes": [list(p) for p in c.probes]}}


def _load_label(cells) -> str:
    nodes = f"{cells[0].rows[0].prefill_nodes}P+{cells[0].rows[0].decode_nodes}D"
    if all(c.capacity is not None for c in cells):
        return f"load (fraction of {nodes}'s measured capacity: 90% within SLOs, no admission)"
    return f"offered load (fraction of {nodes} capacity, bench.sim.load estimate)"


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
        ax.set_xlabel(_load_label(cells))
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- admission ---------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class AdmissionCell:
    workload: str
    load: float
    speedup: float
    rows: tuple[SimSummary, ...]
    precision: tuple[Precision, ...]  # per row
    reference: SimSummary | None = None  # `none` under the reference policy (Mooncake's kv_centric)
    capacity: Capacity | None = None  # what load 1.0 is, when measured (None: the offered-load estimate)
    counterfactual: str = Counterfactual.REPLAY.value  # how its rejections were judged
    # per row: the precision of its rejections on TTFT (prefill) and on TBT (decode) apart,
    # and how near the SLO its wrong decode rejections were
    by_stage: tuple[tuple[Precision, Precision], ...] = ()
    margins: tuple[DecodeMargin, ...] = ()

    def row(self, mode: str) -> tuple[SimSummary, Precision]:
        return self.rows[self._at(mode)], self.precision[self._at(mode)]

    def stages(self, mode: str) -> tuple[Precision, Precision, DecodeMargin]:
        i = self._at(mode)
        return (*self.by_stage[i], self.margins[i])

    def _at(self, mode: str) -> int:
        return next(i for i, r in enumerate(self.rows) if r.admission == mode)


def run_admission_cell(workload: str, load: float, requests: list[SimRequest], config: SimConfig, costs: CostModel,
                       modes: Sequence[AdmissionMode], sample: int, reference: PolicyName | None = None,
                       capacity: Capacity | None = None,
                       counterfactual: Counterfactual = Counterfactual.REPLAY) -> AdmissionCell:
    scaled, speedup = at_load(requests, load, config, costs, capacity)
    typical = max(1, round(sum(r.output_tokens for r in scaled) / len(scaled)))
    ref = None
    if reference is not None:
        started = time.perf_counter()
        run = simulate(scaled, replace(config, policy=reference, admission=AdmissionMode.NONE,
                                       typical_output_tokens=typical), costs)
        ref = summarize(run, speedup=speedup, wall_s=time.perf_counter() - started)
    rows, precision, by_stage, margins = [], [], [], []
    for mode in modes:
        started = time.perf_counter()
        sim = CounterfactualSimulation(scaled, replace(config, admission=mode, typical_output_tokens=typical), costs,
                                       sample=sample, mode=counterfactual)
        run = sim.run()
        rows.append(summarize(run, speedup=speedup, wall_s=time.perf_counter() - started))
        precision.append(sim.precision())
        by_stage.append((sim.precision(PREFILL_REASONS), sim.precision(DECODE_REASONS)))
        margins.append(sim.decode_margin())
    return AdmissionCell(workload, load, speedup, tuple(rows), tuple(precision), ref, capacity,
                         Counterfactual(counterfactual).value, tuple(by_stage), tuple(margins))


def admission_verdict(cell: AdmissionCell, default: str) -> dict[str, float]:
    d, p = cell.row(default)
    none, _ = cell.row(AdmissionMode.NONE.value)
    gain = d.goodput_rps / none.goodput_rps if none.goodput_rps > 0 else math.inf
    ref = cell.reference
    ref_gain = (d.goodput_rps / ref.goodput_rps if ref.goodput_rps > 0 else math.inf) if ref else math.nan
    prefill, decode, margin = cell.stages(default)
    return {"goodput_vs_none": gain, "goodput_ceiling_vs_none": goodput_ceiling(none),
            "goodput_vs_reference_none": ref_gain, "precision": p.precision,
            "precision_low95": p.wilson_low(), "net_precision": p.net_precision,
            "net_precision_low95": p.wilson_low(net=True), "rejections": p.rejections, "judged": p.judged,
            "prefill_precision": prefill.precision, "prefill_judged": prefill.judged,
            "prefill_rejections": prefill.rejections,
            "decode_precision": decode.precision, "decode_net_precision": decode.net_precision,
            "decode_judged": decode.judged, "decode_rejections": decode.rejections,
            "decode_wrong_slack": margin.slack, "decode_wrong_own_step": margin.own_step}


def goodput_ceiling(none: SimSummary) -> float:
    """The most any admission mode's goodput can be, as a multiple of `none`'s on the same
    requests: every request within both SLOs, over the same span (first to last arrival),
    so 1 / `none`'s SLO attainment. Where it is below the 5x asked at 2x overload, no
    admission can reach 5x: `none` already serves that share of the requests in time."""
    met = none.slo_attainment
    return 1.0 / met if met > 0 else math.inf


def print_admission(cells: Sequence[AdmissionCell], default: str, out=None) -> int:
    out = out or sys.stdout
    modes = [r.admission for r in cells[0].rows]
    print(f"goodput req/s per admission mode (policy {cells[0].rows[0].policy}); default = {default}; "
          "precision = rejections that would have missed an SLO, net = also those whose admission would have "
          "cost as many others theirs (judged / rejected by admission)", file=out)
    ref = cells[0].reference
    ref_head = f" | none/{ref.policy[:10]:<10} x" if ref is not None else ""
    print(f"{'workload':<13}{'load':>5}{'speed':>7} | " + " ".join(f"{m:>11}" for m in modes)
          + " | vs none ceiling  precision    net (judged/rejected)  ttft   tbt" + ref_head, file=out)
    misses = 0
    for c in cells:
        v = admission_verdict(c, default)
        gain_ok = c.load < OVERLOAD or v["goodput_vs_none"] >= OVERLOAD_GAIN
        ok = v["goodput_vs_none"] >= 1.0 and gain_ok and (v["judged"] == 0 or v["precision"] >= PRECISION_TARGET)
        misses += not ok
        # 5x asked where no admission can reach it (every request in time would not)
        beyond = not gain_ok and v["goodput_ceiling_vs_none"] < OVERLOAD_GAIN
        vals = " ".join(f"{c.row(m)[0].goodput_rps:>11.2f}" for m in modes)
        prec = "-" if not v["judged"] else f"{v['precision']:.3f}"
        net = "-" if not v["judged"] else f"{v['net_precision']:.3f}"
        ref_col = (f" | {c.reference.goodput_rps:>10.2f} {v['goodput_vs_reference_none']:>6.1f}"
                   if c.reference is not None else "")
        stage = " ".join("    -" if not v[f"{k}_judged"] else f"{v[f'{k}_precision']:>5.2f}" for k in ("prefill", "decode"))
        miss = "" if ok else "  MISS" + (f" (5x > ceiling {v['goodput_ceiling_vs_none']:.2f}x)" if beyond else "")
        print(f"{c.workload:<13}{c.load:>5.2f}{c.speedup:>7.2f} | {vals} | {v['goodput_vs_none']:>7.3f} "
              f"{v['goodput_ceiling_vs_none']:>7.2f}  {prec:>9} {net:>6} ({v['judged']}/{v['rejections']})  {stage}"
              f"{ref_col}{miss}", file=out)
    print("ceiling = the most any admission could gain over none (every request within both SLOs); ttft / tbt = "
          "precision of the rejections on predicted TTFT / on predicted TBT", file=out)
    margins = [(c, c.stages(default)[2]) for c in cells if c.stages(default)[2].wrong]
    for c, m in margins:
        print(f"{c.workload} at {c.load:g}: {m.wrong} decode rejections judged wrong would have had a TBT "
              f"{m.slack:.1%} under the SLO (median); one request adds {m.own_step:.2%} of it to a step", file=out)
    print_capacities(cells, out)
    return misses


def print_capacities(cells, out) -> None:
    """What load 1.0 is, per workload, when measured."""
    seen = {}
    for c in cells:
        if c.capacity is not None:
            seen.setdefault(c.workload, c.capacity)
    for workload, cap in seen.items():
        print(f"load 1.0 of {workload} = {cap.offered_load:.3f} of the offered-load estimate, {cap.speedup:.3g}x its "
              f"own rate ({cap.attainment:.1%} within both SLOs under {cap.policy} without admission)", file=out)


def write_admission_json(cells: Sequence[AdmissionCell], default: str, path: Path) -> None:
    data = [{"workload": c.workload, "load": c.load, "speedup": c.speedup, **_scale(c), **admission_verdict(c, default),
             "counterfactual": c.counterfactual, "rows": [{**_clean(asdict(r)), "precision": _clean(p.precision), "judged": p.judged,
                       "judged_right": p.right, "admission_rejections": p.rejections,
                       "displaced_per_judged": p.displaced / p.judged if p.judged else None}
                      for r, p in zip(c.rows, c.precision)],
             "reference_none": _clean(asdict(c.reference)) if c.reference else None} for c in cells]
    path.write_text(json.dumps(_clean(data), indent=2) + "\n", encoding="utf-8")


def write_admission_plot(cells: Sequence[AdmissionCell], default: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for w in dict.fromkeys(c.workload for c in cells):
        row = [c for c in cells if c.workload == w]
        axes[0].plot([c.load for c in row], [admission_verdict(c, default)["goodput_vs_none"] for c in row],
                     marker="o", label=w)
        line, = axes[1].plot([c.load for c in row], [admission_verdict(c, default)["precision"] for c in row],
                             marker="o", label=f"{w} (own SLOs)")
        axes[1].plot([c.load for c in row], [admission_verdict(c, default)["net_precision"] for c in row],
                     marker="s", ls=":", color=line.get_color(), label=f"{w} (net)")
    axes[0].axhline(1.0, color="red", ls="--")
    axes[0].set_yscale("log")
    axes[0].set_ylabel(f"goodput: {default} / none")
    axes[1].axhline(PRECISION_TARGET, color="red", ls="--")
    axes[1].set_ylabel("rejection precision (counterfactual)")
    for ax in axes:
        ax.set_xlabel(_load_label(cells))
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.sim.compare", description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=("policies", "admission"))
    p.add_argument("--workloads", type=flags.names(WORKLOADS), default=list(WORKLOADS))
    p.add_argument("--loads", type=flags.positives, help=f"fractions of capacity (default {','.join(map(str, LOADS))}; admission: "
                                   f"{','.join(map(str, ADMISSION_LOADS))})")
    p.add_argument("--policies", help="comma-separated (default: every policy)")
    p.add_argument("--default", help="the policy (policies) or admission mode (admission) judged")
    p.add_argument("--admissions", help="comma-separated admission modes (default: every mode but per_stage)")
    p.add_argument("--sample", type=flags.count(1), default=1, help="admission: judge every n-th rejection (default 1: all)")
    p.add_argument("--counterfactual", choices=[c.value for c in Counterfactual], default=Counterfactual.REPLAY.value,
                   help="admission: what a judging fork keeps of the real run: replay (every other decision; "
                        "the default) or free (its scheduler goes on deciding); see bench.sim.counterfactual")
    p.add_argument("--reference", default=PolicyName.KV_CENTRIC.value,
                   help="admission: also run `none` under this policy, for reference ('' for none)")
    p.add_argument("--requests", type=flags.count(2), help=f"requests per workload (default {REQUESTS:,}; shifting: "
                                                 f"{default_requests('shifting'):,}, {SHIFTING_PERIODS} swings of its mix)")
    p.add_argument("--seed", type=flags.SEED, default=1)
    p.add_argument("--prefill", type=flags.count(1), default=8)
    p.add_argument("--decode", type=flags.count(1), default=8)
    p.add_argument("--admission", default=AdmissionMode.NONE.value, help="policies: the admission mode")
    p.add_argument("--capacity", choices=("calibrated", "offered"),
                   help="what load 1.0 is: the rate the default policy without admission keeps within the SLOs "
                        "for 90%% of requests, measured per workload (calibrated: the admission default), or "
                        "the offered-load estimate of bench.sim.load (offered: the policies default)")
    p.add_argument("--decode-threshold", type=flags.positive, default=SimConfig().decode_reject_threshold,
                   help="decode load (predicted TBT / SLO) above which admission rejects (default %(default)s)")
    p.add_argument("--json", type=Path)
    p.add_argument("--plot", type=Path, help="default: next to --json")
    args = p.parse_args(argv)
    return flags.run(p.prog, lambda: _main(args))


def _main(args: argparse.Namespace) -> int:
    costs = gpu_class_default()
    config = SimConfig(prefill_nodes=args.prefill, decode_nodes=args.decode, admission=parse_admission(args.admission),
                       decode_reject_threshold=args.decode_threshold)
    started = time.perf_counter()
    if args.what == "admission":
        return _admission(args, config, costs, started)
    policies = [parse_policy(x) for x in args.policies.split(",")] if args.policies else list(PolicyName)
    default = str(parse_policy(args.default or str(DEFAULT_POLICY)))
    if default not in policies:
        policies.append(PolicyName(default))
    cells = _grid(args, LOADS, started, replace(config, policy=PolicyName(default)), costs, "offered",
                  lambda workload, load, requests, capacity: run_cell(workload, load, requests, config, costs,
                                                                      policies, capacity),
                  lambda cells: _checkpoint(args, cells, default, write_json))
    misses = print_cells(cells, default)
    print(f"{len(cells) - misses}/{len(cells)} cells meet both targets; {time.perf_counter() - started:.0f} s")
    _write(args, cells, default, write_json, write_plot)
    return 0


def _grid(args, default_loads, started: float, config: SimConfig, costs: CostModel, default_scale: str, run,
          checkpoint=None) -> list:
    """`run(workload, load, requests, capacity)` for every workload and load the arguments
    name; `capacity` is each workload's measured capacity under `config` (its policy, no
    admission) when the load scale is calibrated, else None. `checkpoint(cells)` after
    every cell (a long grid keeps what it has done if it is stopped)."""
    loads = args.loads or list(default_loads)
    cells = []
    for workload in args.workloads:
        requests = base_requests(workload, default_requests(workload, args.requests), args.seed)
        capacity = None
        if (args.capacity or default_scale) == "calibrated":
            capacity = calibrate(requests, config, costs)
            probes = ", ".join(f"{x:.3g}:{a:.3f}" for x, a in capacity.probes)
            print(f"  {workload}: capacity = {capacity.offered_load:.3f} of the offered-load estimate (speed-up "
                  f"{capacity.speedup:.3g}, SLO attainment {capacity.attainment:.3f} under {capacity.policy}/none; "
                  f"probes load:attainment {probes}) ({time.perf_counter() - started:.0f} s)", file=sys.stderr)
        for load in loads:
            cells.append(run(workload, load, requests, capacity))
            if checkpoint is not None:
                checkpoint(cells)
            print(f"  {workload} at load {load:g}: done ({time.perf_counter() - started:.0f} s)", file=sys.stderr)
    return cells


def _checkpoint(args, cells: list, default: str, write_json) -> None:
    """The rows so far, as JSON (the plot waits for the whole grid)."""
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        write_json(cells, default, args.json)


def _write(args, cells: list, default: str, write_json, write_plot) -> None:
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        write_json(cells, default, args.json)
        write_plot(cells, default, args.plot or args.json.with_suffix(".png"))


def _admission(args, config: SimConfig, costs: CostModel, started: float) -> int:
    default = str(parse_admission(args.default or str(DEFAULT_ADMISSION)))
    modes = ([parse_admission(x) for x in args.admissions.split(",")] if args.admissions
             else [m for m in AdmissionMode if m is not AdmissionMode.PER_STAGE])
    for needed in (AdmissionMode.NONE, AdmissionMode(default)):
        if needed not in modes:
            modes.append(needed)
    config = replace(config, policy=DEFAULT_POLICY)
    reference = parse_policy(args.reference) if args.reference else None
    cells = _grid(args, ADMISSION_LOADS, started, config, costs, "calibrated",
                  lambda workload, load, requests, capacity: run_admission_cell(
                      workload, load, requests, config, costs, modes, args.sample, reference, capacity,
                      Counterfactual(args.counterfactual)),
                  lambda cells: _checkpoint(args, cells, default, write_admission_json))
    misses = print_admission(cells, default)
    print(f"{len(cells) - misses}/{len(cells)} cells meet every target; {time.perf_counter() - started:.0f} s")
    _write(args, cells, default, write_admission_json, write_admission_plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
