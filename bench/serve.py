"""Closed-loop load against a running cluster (`halfmoon serve`), measured at the client.

    python -m bench.serve --address 127.0.0.1:50051 --requests 64 --concurrency 8 \\
        --prompt-tokens 256 --output-tokens 64 --json out/serve.json

Each of `--concurrency` workers sends its next request as soon as the previous one ends.
Prompts are distinct random token ids (no prefix-cache hits) of exactly `--prompt-tokens`;
decoding is greedy with EOS ignored, so every answer has exactly `--output-tokens` tokens.
Reports TTFT p50/p99 with the conductor's breakdown (queue, prefill, KV transfer, first
decode step), TBT p50/p99 over all token gaps, and output tokens/s.

With ``--dtype`` (float32, bfloat16, w8a8, fp8) it starts its own local cluster instead
(``--prefill`` + ``--decode`` nodes in that model dtype, one process each, admission off) and
stops it afterwards; ``--address`` is then ignored:

    python -m bench.serve --dtype w8a8 --requests 64 --concurrency 8 --json out/serve_w8a8.json
"""
from __future__ import annotations

import argparse
import json
import random
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from bench import flags


@dataclass
class Sample:
    ttft_s: float
    gaps_s: list[float]
    tokens: int
    e2e_s: float
    queue_s: float
    prefill_s: float
    kv_transfer_s: float
    first_decode_s: float
    server_ttft_s: float


@dataclass
class Outcome:
    samples: list[Sample] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def _pct(xs: list[float], q: float) -> float:
    return float(np.percentile(xs, q)) if xs else float("nan")


def run(address: str, requests: int, concurrency: int, prompt_tokens: int, output_tokens: int,
        seed: int = 0, progress=None) -> tuple[Outcome, float]:
    import grpc

    from cluster.client import Client, make_request
    from engine.sampling import SamplingParams

    rng = random.Random(seed)
    prompts = [[rng.randrange(100, 40000) for _ in range(prompt_tokens)] for _ in range(requests)]
    params = SamplingParams(max_tokens=output_tokens, ignore_eos=True)
    out = Outcome()
    lock = threading.Lock()
    next_i = iter(range(requests))

    def worker() -> None:
        with Client(address) as c:
            while True:
                with lock:
                    i = next(next_i, None)
                if i is None:
                    return
                t0 = time.perf_counter()
                times: list[float] = []
                final = None
                try:
                    for msg in c.stream(make_request(token_ids=prompts[i], params=params), timeout=600):
                        if msg.HasField("delta"):
                            times += [time.perf_counter()] * len(msg.delta.token_ids)
                        else:
                            final = msg.final
                except grpc.RpcError as e:
                    with lock:
                        out.errors.append(f"{e.code().name}: {e.details()}")
                    continue
                t = final.timing
                s = Sample(times[0] - t0, list(np.diff(times)), len(times), time.perf_counter() - t0, t.queue_s,
                           t.prefill_s, t.kv_transfer_s, t.first_decode_s, t.ttft_s)
                with lock:
                    out.samples.append(s)
                if progress:
                    progress()

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="halfmoon bench serve", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--address", default="127.0.0.1:50051")
    ap.add_argument("--requests", type=flags.count(1), default=64)
    ap.add_argument("--concurrency", type=flags.count(1), default=8)
    ap.add_argument("--prompt-tokens", type=flags.count(1), default=256)
    ap.add_argument("--output-tokens", type=flags.count(1), default=64)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "w8a8", "fp8"],
                    help="start a local cluster with nodes in this model dtype (else use --address)")
    ap.add_argument("--prefill", type=flags.count(1), default=1, help="with --dtype: prefill nodes")
    ap.add_argument("--decode", type=flags.count(1), default=1, help="with --dtype: decode nodes")
    ap.add_argument("--threads", type=flags.count(1), default=1, help="with --dtype: torch threads per node")
    args = ap.parse_args(argv)
    if args.dtype is None:
        return _measure(args, args.address)
    cluster = start_cluster(args.dtype, args.prefill, args.decode, args.threads)
    try:
        return _measure(args, cluster.address)
    finally:
        cluster.stop()


def start_cluster(dtype: str, prefill: int, decode: int, threads: int):
    """A local cluster (`cluster.local.LocalCluster`) whose nodes run the model in `dtype`."""
    from cluster.local import LocalCluster
    from cluster.node_main import NodeSpec
    from cluster.specs import free_port
    from conductor.server import ConductorSpec

    spec = ConductorSpec(grpc_port=free_port(), http_port=None, settings={"admission": "none"},
                         heartbeat_interval_s=0.5)
    node = NodeSpec(role="prefill", node_id="", conductor="", num_blocks=2048, num_threads=threads, dtype=dtype)
    return LocalCluster.build(prefill, decode, conductor=spec, node=node).start()


def _measure(args, address: str) -> int:

    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table

    con = Console()
    with Progress(console=con) as prog:
        task = prog.add_task("requests", total=args.requests)
        res, wall = run(address, args.requests, args.concurrency, args.prompt_tokens, args.output_tokens,
                        progress=lambda: prog.advance(task))
    s = res.samples
    gaps = [g for x in s for g in x.gaps_s]
    summary = {
        "requests": args.requests, "completed": len(s), "errors": len(res.errors), "dtype": args.dtype,
        "concurrency": args.concurrency, "prompt_tokens": args.prompt_tokens, "output_tokens": args.output_tokens,
        "wall_s": wall, "output_tokens_per_s": sum(x.tokens for x in s) / wall,
        "ttft_p50_s": _pct([x.ttft_s for x in s], 50), "ttft_p99_s": _pct([x.ttft_s for x in s], 99),
        "tbt_p50_s": _pct(gaps, 50), "tbt_p99_s": _pct(gaps, 99),
        "e2e_p50_s": _pct([x.e2e_s for x in s], 50),
        "ttft_breakdown_p50_s": {k: _pct([getattr(x, k) for x in s], 50)
                                 for k in ("queue_s", "prefill_s", "kv_transfer_s", "first_decode_s", "server_ttft_s")},
        "ttft_breakdown_p99_s": {k: _pct([getattr(x, k) for x in s], 99)
                                 for k in ("queue_s", "prefill_s", "kv_transfer_s", "first_decode_s", "server_ttft_s")},
    }
    t = Table(title=f"closed loop: {args.requests} requests, concurrency {args.concurrency}, "
                    f"{args.prompt_tokens}+{args.output_tokens} tokens"
                    + (f", {args.prefill}P+{args.decode}D in {args.dtype}" if args.dtype else ""))
    t.add_column("metric")
    t.add_column("p50", justify="right")
    t.add_column("p99", justify="right")
    t.add_row("TTFT (client) ms", f"{summary['ttft_p50_s'] * 1e3:.0f}", f"{summary['ttft_p99_s'] * 1e3:.0f}")
    for k, name in (("queue_s", "  queue"), ("prefill_s", "  prefill"), ("kv_transfer_s", "  KV transfer"),
                    ("first_decode_s", "  first decode step"), ("server_ttft_s", "  TTFT at conductor")):
        t.add_row(f"{name} ms", f"{summary['ttft_breakdown_p50_s'][k] * 1e3:.1f}",
                  f"{summary['ttft_breakdown_p99_s'][k] * 1e3:.1f}")
    t.add_row("TBT ms", f"{summary['tbt_p50_s'] * 1e3:.1f}", f"{summary['tbt_p99_s'] * 1e3:.1f}")
    t.add_row("E2E s", f"{summary['e2e_p50_s']:.2f}", "")
    t.caption = (f"{summary['output_tokens_per_s']:.1f} output tokens/s over {wall:.1f} s; "
                 f"{len(s)} completed, {len(res.errors)} errors")
    con.print(t)
    for e in sorted(set(res.errors))[:5]:
        con.print(f"[red]error: {e}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"summary": summary, "samples": [asdict(x) for x in s],
                                         "errors": res.errors}, indent=1))
        con.print(f"wrote {args.json}")
    return 0 if not res.errors else 1


if __name__ == "__main__":
    raise SystemExit(main())
