"""What admission's decode threshold trades: goodput against the precision of its rejections.

    python -m bench.sim.threshold --workloads shifting --loads 1.1,2.0 --thresholds 1.0,1.03,1.05,1.06 \
        --json docs/results/sim_threshold.json

Per cell (workload x load, as `bench.sim.compare admission` makes them: the default policy on
8P+8D, load as a fraction of the calibrated capacity) and decode reject threshold (predicted
TBT / TBT SLO above which the default mode rejects), the default mode's goodput, its ratio
to `none`, and the precision of its rejections judged by counterfactual runs (own SLOs and
net, `bench.sim.counterfactual`). Every decode step is shared by its batch and the TBT SLO
is on each request's mean gap, so a batch that passes the SLO fails all its residents: a
threshold set with a margin keeps the batch under it and its rejections at the margin would
each have met their SLOs alone; a threshold without one finds the cliff. Writes every row as
JSON and a PNG (goodput and precision against the threshold, one panel per cell).
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Sequence

from bench import flags
from bench.sim.capacity import calibrate
from bench.sim.cluster import SimConfig
from bench.sim.compare import (DEFAULT_ADMISSION, DEFAULT_POLICY, PRECISION_TARGET, WORKLOADS, _clean,
                               base_requests, default_requests, run_admission_cell)
from conductor.cost_model import gpu_class_default
from conductor.modes import AdmissionMode, parse_admission


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.sim.threshold", description=__doc__.split("\n\n")[0])
    p.add_argument("--workloads", type=flags.names(WORKLOADS), default=["shifting"])
    p.add_argument("--loads", type=flags.positives, default=[1.1, 2.0])
    p.add_argument("--thresholds", type=flags.positives, default=[1.0, 1.02, 1.04, 1.05, 1.06, 1.08])
    p.add_argument("--admission", default=str(DEFAULT_ADMISSION), help="the mode judged (default %(default)s)")
    p.add_argument("--sample", type=flags.count(1), default=10, help="judge every n-th rejection (default %(default)s)")
    p.add_argument("--requests", type=flags.count(2), help="per workload (default: as bench.sim.compare)")
    p.add_argument("--seed", type=flags.SEED, default=1)
    p.add_argument("--json", type=Path)
    p.add_argument("--plot", type=Path, help="default: next to --json")
    args = p.parse_args(argv)
    return flags.run(p.prog, lambda: _main(args))


def _main(args: argparse.Namespace) -> int:
    thresholds, loads, workloads = args.thresholds, args.loads, args.workloads
    mode = parse_admission(args.admission)
    costs = gpu_class_default()
    config = SimConfig(prefill_nodes=8, decode_nodes=8, policy=DEFAULT_POLICY)
    started = time.perf_counter()
    rows = []
    print(f"{'workload':<11}{'load':>5} {'threshold':>9} | {'goodput':>8} {'vs none':>8} | {'precision':>9} {'net':>6} "
          f"(judged/rejected)")
    for workload in workloads:
        requests = base_requests(workload, default_requests(workload, args.requests), args.seed)
        capacity = calibrate(requests, config, costs)
        for load in loads:
            none = run_admission_cell(workload, load, requests, config, costs, [AdmissionMode.NONE], 1,
                                      capacity=capacity).rows[0]
            for thr in thresholds:
                cell = run_admission_cell(workload, load, requests, replace(config, decode_reject_threshold=thr),
                                          costs, [mode], args.sample, capacity=capacity)
                (row, prec), = zip(cell.rows, cell.precision)
                gain = row.goodput_rps / none.goodput_rps if none.goodput_rps > 0 else float("inf")
                rows.append({"workload": workload, "load": load, "threshold": thr, "speedup": cell.speedup,
                             "goodput_rps": row.goodput_rps, "none_goodput_rps": none.goodput_rps,
                             "goodput_vs_none": gain, "precision": prec.precision, "net_precision": prec.net_precision,
                             "judged": prec.judged, "rejections": prec.rejections, "row": asdict(row)})
                print(f"{workload:<11}{load:>5.2f} {thr:>9.3f} | {row.goodput_rps:>8.2f} {gain:>8.2f} | "
                      f"{prec.precision:>9.3f} {prec.net_precision:>6.3f} ({prec.judged}/{prec.rejections})", flush=True)
    print(f"{len(rows)} rows; {time.perf_counter() - started:.0f} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(_clean(rows), indent=2) + "\n", encoding="utf-8")
        write_plot(rows, args.plot or args.json.with_suffix(".png"))
    return 0


def write_plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = list(dict.fromkeys((r["workload"], r["load"]) for r in rows))
    fig, axes = plt.subplots(1, len(cells), figsize=(5.5 * len(cells), 4.2), squeeze=False)
    for ax, (workload, load) in zip(axes[0], cells):
        mine = [r for r in rows if (r["workload"], r["load"]) == (workload, load)]
        x = [r["threshold"] for r in mine]
        ax.plot(x, [r["goodput_rps"] for r in mine], marker="o", color="black", label="goodput (default mode)")
        ax.axhline(mine[0]["none_goodput_rps"], color="black", ls=":", label="goodput (none)")
        ax.set_xlabel("decode reject threshold (predicted TBT / SLO)")
        ax.set_ylabel("goodput req/s")
        ax.set_title(f"{workload} at load {load:g}")
        twin = ax.twinx()
        twin.plot(x, [r["precision"] for r in mine], marker="s", color="tab:red", label="precision (own SLOs)")
        twin.plot(x, [r["net_precision"] for r in mine], marker="^", color="tab:blue", ls="--", label="precision (net)")
        twin.axhline(PRECISION_TARGET, color="tab:red", ls=":", lw=0.8)
        twin.set_ylim(0, 1.05)
        twin.set_ylabel("precision")
        lines = ax.get_legend_handles_labels()
        more = twin.get_legend_handles_labels()
        ax.legend(lines[0] + more[0], lines[1] + more[1], fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
