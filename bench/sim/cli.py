"""`halfmoon bench sim`: replay a Mooncake-format trace through the conductor's own policy and
admission objects on a simulated cluster, and compare policies or admission modes.

    halfmoon bench sim --trace FILE --prefill 8 --decode 8 --policy cost_aware \\
        --admission none --speedup 1 --json out/sim.json
    halfmoon bench sim --compare                 # every policy, side by side
    halfmoon bench sim --compare admission       # every admission mode (also --compare-admission)

Prints a table, writes JSON rows (`--json`) and a PNG (`--plot`, default: the JSON path with
`.png`). The default cost model is the GPU-class one of `conductor.cost_model`
(LLaMA3-70B on 8×A800); `--cost-model FILE` swaps in another (e.g. what `halfmoon profile`
fits for this CPU). Also runnable as `python -m bench.sim`.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Sequence

from bench import flags
from bench.sim.cluster import DEFAULT_CACHE_BLOCKS, DEFAULT_DECODE_KV_TOKENS, SimConfig, simulate
from bench.sim.events import check_event_log
from bench.sim.metrics import SimSummary, summarize
from bench.sim.trace import DEFAULT_TRACE, load_sim_requests, repeat_fraction
from conductor.cost_model import CostModel, gpu_class_default
from conductor.modes import AdmissionMode, PolicyName, parse_admission, parse_policy
from conductor.settings import SettingsValues


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="halfmoon bench sim", description=__doc__.split("\n\n")[0])
    p.add_argument("--trace", type=Path, default=DEFAULT_TRACE, help="Mooncake-format JSONL trace (default: %(default)s)")
    p.add_argument("--prefill", type=int, default=8, help="prefill instances (default 8)")
    p.add_argument("--decode", type=int, default=8, help="decode instances (default 8)")
    p.add_argument("--policy", default=str(SettingsValues().policy), help="routing policy (default: %(default)s)")
    p.add_argument("--admission", default=AdmissionMode.NONE.value, help="admission mode (default none)")
    p.add_argument("--speedup", type=float, default=1.0, help="divide every arrival time by this (default 1)")
    p.add_argument("--compare", nargs="?", const="policies", choices=("policies", "admission"),
                   help="run every policy (or every admission mode) side by side")
    p.add_argument("--compare-admission", action="store_true", help="same as --compare admission")
    p.add_argument("--policies", help="comma-separated policies for --compare (default: all)")
    p.add_argument("--admissions", help="comma-separated admission modes for --compare admission (default: all)")
    p.add_argument("--cost-model", type=Path, help="cost-model JSON (default: the GPU-class model)")
    p.add_argument("--cache-blocks", type=int, default=DEFAULT_CACHE_BLOCKS,
                   help="prefix-cache capacity of each prefill instance, in trace blocks (default %(default)s)")
    p.add_argument("--decode-kv-tokens", type=int, default=DEFAULT_DECODE_KV_TOKENS,
                   help="KV capacity of each decode instance, in tokens (default %(default)s)")
    p.add_argument("--block-tokens", type=int, default=512, help="tokens per trace hash id (default 512)")
    p.add_argument("--ttft-slo", type=float, default=30.0, help="TTFT SLO, s (default 30)")
    p.add_argument("--tbt-slo", type=float, default=0.1, help="TBT SLO, s (default 0.1)")
    p.add_argument("--prefill-threshold", type=float, default=1.0, help="reject when predicted TTFT > this x TTFT SLO")
    p.add_argument("--decode-threshold", type=float, default=1.0, help="reject when predicted decode load > this")
    p.add_argument("--typical-output", type=int, help="output tokens assumed per request (default: the trace mean)")
    p.add_argument("--limit", type=int, help="replay only the first N requests")
    p.add_argument("--seed", type=int, default=0, help="seed of the random policy and of --noise (default 0)")
    p.add_argument("--noise", type=float, default=0.0,
                   help="sigma of a log-normal error on every simulated prefill time (default 0: the cost model is exact)")
    p.add_argument("--json", type=Path, help="write the result rows here")
    p.add_argument("--plot", type=Path, help="write the comparison PNG here (default: next to --json)")
    p.add_argument("--check", action="store_true", help="verify every request's event trail; exit 1 on a problem")
    return p


def _names(text: str | None, parse, all_values) -> list:
    if not text:
        return list(all_values)
    return [parse(part) for part in text.split(",") if part.strip()]


def run_one(requests, config: SimConfig, costs: CostModel, speedup: float, check: bool = False) -> tuple[SimSummary, list[str]]:
    started = time.perf_counter()
    run = simulate(requests, config, costs)
    wall = time.perf_counter() - started
    problems = check_event_log(run) if check else []
    return summarize(run, speedup=speedup, wall_s=wall), problems


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return flags.run("halfmoon bench sim", lambda: _main(args))


def _main(args: argparse.Namespace) -> int:
    compare = "admission" if args.compare_admission else args.compare
    policy = parse_policy(args.policy)
    admission = parse_admission(args.admission)
    costs = CostModel.load(args.cost_model) if args.cost_model else gpu_class_default()
    requests = load_sim_requests(args.trace, speedup=args.speedup, limit=args.limit)
    if not requests:
        raise ValueError("the trace selection holds no requests")
    typical = args.typical_output or max(1, round(sum(r.output_tokens for r in requests) / len(requests)))
    base = SimConfig(
        prefill_nodes=args.prefill,
        decode_nodes=args.decode,
        policy=policy,
        admission=admission,
        cache_blocks=args.cache_blocks,
        decode_kv_tokens=args.decode_kv_tokens,
        block_tokens=args.block_tokens,
        ttft_slo_s=args.ttft_slo,
        tbt_slo_s=args.tbt_slo,
        prefill_reject_threshold=args.prefill_threshold,
        decode_reject_threshold=args.decode_threshold,
        typical_output_tokens=typical,
        seed=args.seed,
        service_noise=args.noise,
    )
    if compare == "policies":
        configs = [_replace(base, policy=p) for p in _names(args.policies, parse_policy, PolicyName)]
    elif compare == "admission":
        configs = [_replace(base, admission=a) for a in _names(args.admissions, parse_admission, AdmissionMode)]
    else:
        configs = [base]
    summaries: list[SimSummary] = []
    failed_checks = 0
    for config in configs:
        summary, problems = run_one(requests, config, costs, args.speedup, check=args.check)
        summaries.append(summary)
        for problem in problems[:10]:
            print(f"event log [{config.policy}/{config.admission}]: {problem}", file=sys.stderr)
        failed_checks += bool(problems)
    title = (
        f"{args.trace.name}: {len(requests)} requests, {args.prefill}P+{args.decode}D, speed-up {args.speedup:g}, "
        f"cache {args.cache_blocks} blocks/instance, SLO TTFT {args.ttft_slo:g} s / TBT {args.tbt_slo * 1000:g} ms, "
        f"repeat fraction {repeat_fraction(requests):.1%}"
    )
    from bench.sim.report import print_table, write_json, write_plot

    print_table(summaries, title)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        write_json(summaries, args.json)
    plot = args.plot or (args.json.with_suffix(".png") if args.json else None)
    if plot:
        plot.parent.mkdir(parents=True, exist_ok=True)
        write_plot(summaries, plot, title)
    return 1 if failed_checks else 0


def _replace(config: SimConfig, **changes) -> SimConfig:
    from dataclasses import replace

    return replace(config, **changes)


if __name__ == "__main__":
    raise SystemExit(main())
