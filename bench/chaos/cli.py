"""`python -m bench.chaos` / `halfmoon bench chaos`: run scenarios (or the soak), print the
table, write JSON. Exit status 0 when every row is clean (no hang, no unclean failure, no
leaked block, no answer unlike the baseline's) or the soak met its targets, else 1."""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

from bench.chaos.cluster import ClusterPlan
from bench.chaos.load import APIS, LoadPlan
from bench.chaos.report import table, write_json


def _parser() -> argparse.ArgumentParser:
    from bench.chaos import scenarios

    ap = argparse.ArgumentParser(prog="halfmoon bench chaos", description=__doc__ + "\n\n" + scenarios.__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=Path, help="write the rows (or the soak result) here")
    ap.add_argument("--scenarios", default=",".join(scenarios.SCENARIOS),
                    help="comma-separated, in order (baseline first if the others are to be compared with it)")
    ap.add_argument("--model", default="smollm2-135m-instruct", help="model name or directory")
    ap.add_argument("--prefill", type=int, help="prefill nodes (default 2; soak 1)")
    ap.add_argument("--decode", type=int, help="decode nodes (default 2; soak 1)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per node")
    ap.add_argument("--num-blocks", type=int, help="KV blocks per node (default 512; soak 2048)")
    ap.add_argument("--requests", type=int, default=40, help="requests of the baseline and transfer-fault loads")
    ap.add_argument("--concurrency", type=int, default=6)
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--prompt-tokens", default="48-160", help="MIN-MAX prompt length")
    ap.add_argument("--api", choices=APIS, default="mixed")
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds before a request counts as hung")
    ap.add_argument("--stop-s", type=float, default=8.0, help="how long SIGSTOP lasts")
    ap.add_argument("--tail-s", type=float, default=15.0, help="load kept after a fault is over")
    ap.add_argument("--audit-s", type=float, default=30.0, help="grace for used blocks to return to 0")
    ap.add_argument("--fuzz-count", type=int, default=5000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--soak", action="store_true", help="run the soak instead of the scenarios")
    ap.add_argument("--minutes", type=float, default=30.0, help="soak length")
    ap.add_argument("--rate", type=float, default=0.35, help="soak: offered requests per second")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    lo, _, hi = args.prompt_tokens.partition("-")
    load = LoadPlan(requests=args.requests, concurrency=args.concurrency, max_tokens=args.max_tokens,
                    min_prompt_tokens=int(lo), max_prompt_tokens=int(hi or lo), timeout_s=args.timeout,
                    api=args.api, seed=args.seed)
    if args.soak:
        return _soak(args)
    from bench.chaos.scenarios import SCENARIOS, Options, new_state, run_scenario

    names = [n.strip() for n in args.scenarios.split(",") if n.strip()]
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        print(f"error: unknown scenario(s) {', '.join(unknown)}; choose from {', '.join(SCENARIOS)}", file=sys.stderr)
        return 2
    cluster = ClusterPlan(prefill=args.prefill or 2, decode=args.decode or 2, model=args.model,
                          num_blocks=args.num_blocks or 512, threads=args.threads)
    opts = Options(cluster=cluster, load=load, stop_s=args.stop_s, tail_s=args.tail_s, audit_grace_s=args.audit_s,
                   fuzz_count=args.fuzz_count, fuzz_seed=args.seed)
    state = new_state(opts)
    rows = []
    extra: dict = {"command": "python -m bench.chaos " + shlex.join(argv if argv is not None else sys.argv[1:]),
                   "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "options": _jsonable(opts)}
    for name in names:
        rows.append(run_scenario(SCENARIOS[name], opts, state, log=lambda s: print(s, flush=True)))
        if args.json:  # after every scenario, so a long run that breaks keeps what it found
            write_json(rows, args.json, extra)
    print(table(rows))
    if args.json:
        print(f"wrote {args.json}")
    return 0 if all(r.ok() for r in rows) else 1


def _soak(args) -> int:
    from bench.chaos.soak import SoakPlan, render, run_soak, to_json

    cluster = ClusterPlan(prefill=args.prefill or 1, decode=args.decode or 1, model=args.model,
                          num_blocks=args.num_blocks or 2048, threads=args.threads, max_num_batched_tokens=256)
    result = run_soak(SoakPlan(minutes=args.minutes, rate=args.rate, timeout_s=max(args.timeout, 300.0),
                               audit_grace_s=args.audit_s), cluster, log=lambda s: print(s, flush=True))
    print(render(result))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(to_json(result), indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0 if all(result.verdicts().values()) else 1


def _jsonable(opts) -> dict:
    from dataclasses import asdict

    return json.loads(json.dumps(asdict(opts), default=str))
