"""How long the first token's trip through the conductor takes (issue 13): the hop from the
prefill node's answer to the decode node's first output, against TTFT and the first token gap.

    python -m bench.first_token_hop --requests 24 --concurrency 1,4 --json docs/results/first_token_hop.json

Today the prefill node answers the conductor with the first token, and the conductor then
calls `Decode` on the decode node, whose first output is that token. The conductor measures
the hop as `Timing.first_decode_s` (its `PrefillResponse` in -> the decode node's first
output in: the Decode call's trip, the wait for the decode engine thread, the token's way
back). Sending the first token from the prefill node straight to the decode node could save
at most this hop and the prefill answer's own way back to the conductor (inside `other`,
the part of the conductor's TTFT no phase accounts for); the engine-thread wait would stay.
The table gives the hop's share of the client's TTFT and of the gap from the first to the
second token (which the first decode step makes, after the hop), per concurrency.

Starts its own local cluster (one conductor, one prefill and one decode node, separate
processes on loopback, admission off) on the real model in fp32 and stops it afterwards;
closed-loop load from `bench.serve` (distinct random prompts, greedy, EOS ignored).
"""
from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import asdict
from pathlib import Path

import numpy as np

from bench import flags
from bench.serve import Sample, run, start_cluster


def summarize(samples: list[Sample]) -> dict[str, float]:
    def p50(xs):
        return float(np.percentile(xs, 50)) if xs else float("nan")

    hop = [s.first_decode_s for s in samples]
    ttft = [s.ttft_s for s in samples]
    gap = [s.gaps_s[0] for s in samples if s.gaps_s]
    other = [s.server_ttft_s - s.queue_s - s.prefill_s - s.kv_transfer_s - s.first_decode_s for s in samples]
    return {
        "requests": len(samples),
        "hop_p50_ms": p50(hop) * 1e3, "hop_mean_ms": statistics.fmean(hop) * 1e3 if hop else float("nan"),
        "hop_max_ms": max(hop) * 1e3 if hop else float("nan"),
        "other_p50_ms": p50(other) * 1e3,
        "queue_p50_ms": p50([s.queue_s for s in samples]) * 1e3,
        "prefill_p50_ms": p50([s.prefill_s for s in samples]) * 1e3,
        "kv_transfer_p50_ms": p50([s.kv_transfer_s for s in samples]) * 1e3,
        "ttft_p50_ms": p50(ttft) * 1e3, "first_gap_p50_ms": p50(gap) * 1e3,
        "hop_share_of_ttft": float(np.median([h / t for h, t in zip(hop, ttft)])) if hop else float("nan"),
        "hop_share_of_first_gap": float(np.median([s.first_decode_s / s.gaps_s[0] for s in samples if s.gaps_s]))
        if gap else float("nan"),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.first_token_hop", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=flags.count(1), default=24, help="per concurrency")
    ap.add_argument("--concurrency", default="1,4", help="comma-separated closed-loop concurrencies")
    ap.add_argument("--prompt-tokens", type=flags.count(1), default=256)
    ap.add_argument("--output-tokens", type=flags.count(1), default=16)
    ap.add_argument("--threads", type=flags.count(1), default=1, help="torch threads per node")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)

    from rich.console import Console
    from rich.table import Table

    levels = [int(c) for c in args.concurrency.split(",")]
    cluster = start_cluster("float32", 1, 1, args.threads)
    rows, errors = [], []
    try:
        run(cluster.address, 2, 1, args.prompt_tokens, args.output_tokens, seed=99)  # warm up both nodes
        for i, conc in enumerate(levels):
            res, wall = run(cluster.address, args.requests, conc, args.prompt_tokens, args.output_tokens, seed=i)
            errors += res.errors
            rows.append({"concurrency": conc, "wall_s": wall, **summarize(res.samples),
                         "samples": [asdict(x) for x in res.samples]})
    finally:
        cluster.stop()
    t = Table(title=f"first token via the conductor: 1P+1D, {args.prompt_tokens}+{args.output_tokens} tokens")
    for col in ("concurrency", "requests", "hop p50 ms", "hop mean ms", "hop max ms", "other p50 ms",
                "TTFT p50 ms", "1st gap p50 ms", "hop / TTFT", "hop / 1st gap"):
        t.add_column(col, justify="right")
    for r in rows:
        t.add_row(str(r["concurrency"]), str(r["requests"]), f"{r['hop_p50_ms']:.2f}", f"{r['hop_mean_ms']:.2f}",
                  f"{r['hop_max_ms']:.1f}", f"{r['other_p50_ms']:.2f}", f"{r['ttft_p50_ms']:.0f}",
                  f"{r['first_gap_p50_ms']:.1f}", f"{r['hop_share_of_ttft']:.1%}", f"{r['hop_share_of_first_gap']:.1%}")
    con = Console()
    con.print(t)
    for e in sorted(set(errors))[:5]:
        con.print(f"[red]error: {e}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows,
                                         "errors": errors}, indent=1))
        con.print(f"wrote {args.json}")
    return 0 if not errors else 1


if __name__ == "__main__":
    raise SystemExit(main())
