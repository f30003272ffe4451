"""How fast the simulator replays a very large run through the conductor's own core.

    python -m bench.sim.scale --requests 1000000 --nodes 4096 --json out/scale.json
    python -m bench.sim.native run bench.sim.scale --json out/scale.json   # on the compiled core

Generates the requests (one of `bench.sim.workloads`, default `uniform`), scales them to
`--load` of the cluster's capacity, and replays them on nodes/2 prefill + nodes/2 decode
instances with the default policy and admission; every decision goes through `Scheduler`
and every view change through `ClusterState`, whose `LoadIndex` keeps the per-decision work
independent of the node count. Prints the wall time of each phase (generate, simulate,
summarize), decisions per second, and the machine's load average, since the machine may be
shared: a loaded machine stretches every number. Run through `bench.sim.native`, the same
core runs compiled with mypyc (the row's `core` says which ran).

The cyclic garbage collector is off for the run (the objects live until the end and hold
no cycles; reference counting frees what goes). Per-instance prefix caches default to 500
blocks here (`--cache-blocks`) so that a million no-reuse prompts do not hold ~13 M cached
blocks in memory; a no-reuse workload's outcome does not depend on it.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Sequence

from tqdm import tqdm

from bench import flags
from bench.sim import native
from bench.sim.cluster import SimConfig, SimRun, Simulation
from bench.sim.compare import at_load
from bench.sim.metrics import summarize
from bench.sim.trace import to_sim_requests
from bench.sim.workloads import GENERATORS
from conductor.cost_model import gpu_class_default
from conductor.modes import parse_admission, parse_policy
from conductor.settings import SettingsValues


def main(argv: Sequence[str] | None = None, retain: list | None = None) -> int:
    """The run; with `retain`, what it built is appended there instead of freed on return."""
    p = argparse.ArgumentParser(prog="python -m bench.sim.scale", description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=flags.count(2), default=1_000_000)
    p.add_argument("--nodes", type=flags.count(2), default=4096, help="prefill + decode instances (half each)")
    p.add_argument("--workload", default="uniform", choices=sorted(GENERATORS))
    p.add_argument("--load", type=flags.positive, default=0.8, help="of the cluster's capacity (default 0.8)")
    p.add_argument("--seed", type=flags.SEED, default=1)
    p.add_argument("--cache-blocks", type=flags.count(0), default=500)
    p.add_argument("--policy", default=str(SettingsValues().policy))
    p.add_argument("--admission", default=str(SettingsValues().admission))
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    costs = gpu_class_default()
    load_before = os.getloadavg()
    # Millions of long-lived objects (requests, decisions, cache entries) and no reference
    # cycles among them: the cyclic collector would only walk them again and again (a third
    # of the run at 100 k requests, more at a million). Reference counting frees the rest.
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        return flags.run(p.prog, lambda: _run(args, costs, load_before, retain))
    finally:
        if gc_was_enabled:
            gc.enable()


def _run(args, costs, load_before, retain: list | None) -> int:
    t0 = time.perf_counter()
    c0 = time.process_time()
    records = GENERATORS[args.workload](args.requests, seed=args.seed)
    base = to_sim_requests(records)
    del records
    prefill = args.nodes // 2
    config = SimConfig(prefill_nodes=prefill, decode_nodes=args.nodes - prefill, policy=parse_policy(args.policy),
                       admission=parse_admission(args.admission), cache_blocks=args.cache_blocks,
                       record_events=False, max_prediction_records=100_000)
    requests, speedup = at_load(base, args.load, config, costs)
    del base
    config = replace(config, typical_output_tokens=max(1, round(sum(r.output_tokens for r in requests) / len(requests))))
    t1 = time.perf_counter()
    c1 = time.process_time()
    sim = Simulation(requests, config, costs)
    run = run_with_progress(sim)
    t2 = time.perf_counter()
    c2 = time.process_time()
    summary = summarize(run, speedup=speedup, wall_s=t2 - t1)
    if retain is not None:
        retain.append((sim, run, requests))
    t3 = time.perf_counter()
    c3 = time.process_time()
    load_after = os.getloadavg()
    rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    row = {
        "core": "compiled (mypyc)" if native.compiled() else "source",
        "requests": len(requests), "nodes": args.nodes, "prefill_nodes": prefill, "decode_nodes": args.nodes - prefill,
        "workload": args.workload, "load": args.load, "speedup": speedup, "simulated_s": run.end_s,
        "generate_s": t1 - t0, "simulate_s": t2 - t1, "summarize_s": t3 - t2, "total_s": t3 - t0,
        # this process's CPU time per phase: what the wall times come to on an otherwise idle core
        "generate_cpu_s": c1 - c0, "simulate_cpu_s": c2 - c1, "summarize_cpu_s": c3 - c2, "total_cpu_s": c3 - c0,
        "decisions_per_s": len(requests) / (t2 - t1), "max_rss_gb": rss_gb,
        "loadavg_before": load_before, "loadavg_after": load_after, "cpus": os.cpu_count(),
        "summary": {k: v for k, v in asdict(summary).items() if k != "rejections_by_reason"},
        "rejections_by_reason": summary.rejections_by_reason,
    }
    print(f"{len(requests):,} {args.workload} requests on {prefill}P+{args.nodes - prefill}D at load {args.load:g} "
          f"({run.end_s:,.0f} simulated s; {row['core']} core): generate {t1 - t0:.1f} s, simulate {t2 - t1:.1f} s "
          f"(CPU {c2 - c1:.1f} s; {row['decisions_per_s']:,.0f} requests/s), summarize {t3 - t2:.1f} s; total {t3 - t0:.1f} s "
          f"(CPU {c3 - c0:.1f} s); max RSS {rss_gb:.1f} GB")
    print(f"load average {load_before[0]:.1f} before, {load_after[0]:.1f} after, on {os.cpu_count()} CPUs; "
          f"completed {summary.completed:,}, rejected {summary.rejected:,}, TTFT mean {summary.ttft_mean_s:.2f} s, "
          f"goodput {summary.goodput_rps:,.0f} req/s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(row, indent=2, default=lambda v: None) + "\n", encoding="utf-8")
    return 0


def run_with_progress(sim: Simulation, slices: int = 200) -> SimRun:
    """`sim.run()`, in `slices` steps of the arrival span, with a bar of the requests that
    have arrived (on a terminal; a pipe gets none). The same run as `sim.run()`: the loop
    stops between two events and goes on from there."""
    reqs = sim.requests
    if len(reqs) < 2:
        return sim.run()
    first, span = reqs[0].arrival_s, reqs[-1].arrival_s - reqs[0].arrival_s
    with tqdm(total=len(reqs), unit="req", unit_scale=True, desc="simulate", disable=None, file=sys.stderr) as bar:
        for k in range(1, slices + 1):
            sim.run_until(first + span * k / slices)
            bar.update(sim.arrived - bar.n)
    return sim.run()


if __name__ == "__main__":
    # A million requests leave ~3 GB of small objects; freeing them one by one as the run's
    # frame returns and the interpreter exits would add seconds per 100 k requests to the
    # wall time after the work is done. Keep them, flush, and let the OS take the memory back.
    kept: list = []
    code = main(retain=kept)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
