"""``halfmoon bench peers``: halfmoon against llama.cpp's server on this machine.

    halfmoon bench peers --json docs/results/peers.json          # full (< ~25 min alone)
    halfmoon bench peers --quick --json docs/results/peers_quick.json   # two rates (< ~8 min)

In turn, each alone on the machine: llama-server (built into the bench's cache on first
run, or skipped with the reason), halfmoon 1P+1D and halfmoon colocated, all with the same
threads. Per system: unloaded latencies of each workload's median request, the quality
prompts, then a rate sweep of each workload through the same HTTP replay client. Then one
SLO rule (``bench.peers.judge``) judges every system's requests, and the bench prints a
table, writes JSON rows and plots, and says which of the issue's targets are met.
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
from collections.abc import Sequence
from pathlib import Path

SYSTEMS = ("llama-server", "halfmoon-1p1d", "halfmoon-colocated")
FULL = {"requests": 24, "rates": (0.5, 1.0, 1.5, 2.0, 2.5, 3.0)}
QUICK = {"requests": 12, "rates": (0.5, 1.5)}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="halfmoon bench peers", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=Path, default=None, help="write the results here (default "
                    "docs/results/peers.json, or peers_quick.json with --quick)")
    ap.add_argument("--plot-dir", type=Path, default=Path("docs/results"))
    ap.add_argument("--log-dir", type=Path, default=Path("out/peers"), help="server logs and generated traces")
    ap.add_argument("--quick", action="store_true", help=f"{QUICK['requests']} requests per run at rates "
                    f"{QUICK['rates']} (default: {FULL['requests']} at {FULL['rates']})")
    ap.add_argument("--systems", default=",".join(SYSTEMS))
    ap.add_argument("--workloads", default="conversation,chat")
    ap.add_argument("--rates", default=None, help="comma-separated offered requests/s (overrides the mode's)")
    ap.add_argument("--requests", type=int, default=None, help="requests per run (overrides the mode's)")
    ap.add_argument("--dtype", default="w8a8", help="halfmoon's model dtype (float32 | bfloat16 | w8a8 | fp8)")
    ap.add_argument("--threads", type=int, default=2, help="threads every system gets (halfmoon splits them "
                    "over its nodes)")
    ap.add_argument("--slots", type=int, default=8, help="llama-server parallel slots (-np)")
    ap.add_argument("--peer-threads", type=int, default=None, help="llama-server's -t/-tb (default: --threads; "
                    "on cores other processes share, -t 1 kept a 10 ms token gap where -t 2 took 80 ms)")
    ap.add_argument("--ttft-x", type=float, default=5.0)
    ap.add_argument("--tbt-x", type=float, default=3.0)
    ap.add_argument("--no-quality", action="store_true", help="skip the fixed-prompt quality check")
    ap.add_argument("--request-timeout", type=float, default=120.0)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from rich.console import Console

    con = Console(width=130)
    mode = QUICK if args.quick else FULL
    rates = tuple(float(x) for x in args.rates.split(",")) if args.rates else mode["rates"]
    n = args.requests or mode["requests"]
    out = args.json or Path("docs/results") / ("peers_quick.json" if args.quick else "peers.json")
    prefix = "peers_quick" if args.quick else "peers"
    systems = [s for s in args.systems.split(",") if s]
    unknown = set(systems) - set(SYSTEMS)
    if unknown:
        con.print(f"[red]error:[/red] unknown system(s) {sorted(unknown)}; choose from {SYSTEMS}")
        return 2
    return asyncio.run(_run(args, con, systems, rates, n, out, prefix))


async def _run(args, con, systems, rates, n, out: Path, prefix: str) -> int:
    from bench.peers import judge, quality, report, workloads
    from bench.replay.client import ClientError

    specs = []
    for w in args.workloads.split(","):
        specs.append(workloads.conversation(n) if w == "conversation" else workloads.chat(n, args.log_dir))
    doc: dict = {"config": {"systems": systems, "workloads": [s.name for s in specs], "rates_rps": list(rates),
                            "requests_per_run": n, "dtype": args.dtype, "threads": args.threads,
                            "slots": args.slots, "peer_threads": args.peer_threads or args.threads, "ttft_x": args.ttft_x, "tbt_x": args.tbt_x, "quick": args.quick},
                 "systems": {}, "skipped": [], "unloaded": [], "rows": [], "capacity": [], "quality": [],
                 "ttft_breakdown": []}

    ref = None
    if not args.no_quality:
        con.print("[bold]quality reference[/bold]: halfmoon fp32 in this process")
        ref = quality.reference(threads=args.threads)

    runs: dict[tuple[str, str], object] = {}
    for system in systems:
        try:
            await _one_system(args, con, system, specs, rates, ref, doc, runs)
        except (RuntimeError, TimeoutError, OSError, ClientError) as e:  # a system that failed to start or serve
            con.print(f"[red]{system} failed ({type(e).__name__}: {e}); going on without it[/red]")
            doc["skipped"].append({"system": system, "reason": f"{type(e).__name__}: {e}"})
            for key in [k for k in runs if k[0] == system]:
                del runs[key]
            doc["unloaded"] = [u for u in doc["unloaded"] if u["system"] != system]

    if not runs:
        con.print("[red]error:[/red] no system ran")
        return 2
    slos = {spec.name: judge.slo_rule([r.unloaded for (s, w), r in runs.items() if w == spec.name],
                                      args.ttft_x, args.tbt_x) for spec in specs}
    doc["slo"] = {w: {"ttft_s": s.ttft_s, "tbt_s": s.tbt_s,
                      "rule": f"{args.ttft_x:g}x / {args.tbt_x:g}x the slowest system's unloaded median "
                              "TTFT / Mooncake TBT"} for w, s in slos.items()}
    per: dict = {}
    caps: dict = {}
    for (system, workload), wr in runs.items():
        rows = [judge.row(system, workload, run, slos[workload]) for run in wr.sweep.runs]
        per[(system, workload)] = (rows, wr.sweep)
        doc["rows"] += report.rows_json(rows)
        cap = judge.capacity(rows).request_rate
        caps[(system, workload)] = cap
        doc["capacity"].append({"system": system, "workload": workload, "effective_capacity_rps": cap})
        if wr.ttft_parts:
            at = cap or rows[0].rate_rps
            i = next(k for k, r in enumerate(rows) if r.rate_rps == at)
            parts = wr.ttft_parts[i] if i < len(wr.ttft_parts) else None
            if parts:
                doc["ttft_breakdown"].append({"system": system, "workload": workload, "rate_rps": at,
                                              **{f"{k}_s": v for k, v in parts.items()},
                                              "client_ttft_p50_s": rows[i].ttft_p50_s})
    doc["targets"] = report.targets([judge.Row(**r) for r in doc["rows"]], caps)
    doc["load_average"] = list(os.getloadavg())
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1) + "\n")
    report.print_table(con, doc)
    for path in report.draw(per, slos, caps, args.plot_dir, prefix):
        con.print(f"wrote {path}")
    con.print(f"wrote {out}")
    return 0


async def _one_system(args, con, system: str, specs, rates, ref, doc: dict, runs: dict) -> None:
    """Start one system alone, ask the quality prompts, sweep every workload, stop it."""
    from bench.peers import install, quality, servers
    from bench.peers.runner import MeteredClient, run_workload
    from bench.replay.http_client import HttpReplayClient
    from engine.loader import gguf_path

    if system == "llama-server":
        peer = install.install_llama_server()
        if isinstance(peer, install.Skipped):
            con.print(f"[yellow]{peer.message}[/yellow]")
            doc["skipped"].append({"system": system, "reason": peer.reason})
            return
        con.print(f"llama-server {peer.version} ({peer.how}): {peer.command[0]}")
        ctx = servers.llama_server(peer.command, gguf_path(),
                                   servers.LlamaServerConfig(threads=args.peer_threads or args.threads,
                                                             slots=args.slots),
                                   args.log_dir / "llama-server.log")
    else:
        ctx = servers.halfmoon(system, args.dtype, args.threads)
    con.print(f"[bold]starting {system}[/bold]")
    with ctx as running:
        con.print(f"  {running.description} at {running.address}")
        doc["systems"][system] = running.description
        if ref is not None:
            qc = HttpReplayClient(running.address, dialect=running.dialect, ignore_eos=False)
            try:
                got = await quality.answers(qc, ref.prompts)
            finally:
                await qc.close()
            cmp = quality.compare(got, ref.answers, ref.eos, ref.decode)
            doc["quality"].append({"system": system, **dataclasses.asdict(cmp)})
            con.print(f"  quality: {cmp.exact}/{cmp.prompts} answers identical to fp32; "
                      f"France -> {cmp.first_answer[:50]!r}")
        inner = HttpReplayClient(running.address, timeout_s=args.request_timeout + 30, dialect=running.dialect)
        client = MeteredClient(inner, running.address) if running.metrics else inner
        try:
            for spec in specs:
                def on_run(i, speedup, count, _w=spec.name):
                    con.print(f"  {_w} run {i + 1}/{len(rates)}: {count} requests at {rates[i]:g} req/s")

                wr = await run_workload(client, spec, system, rates, request_timeout_s=args.request_timeout,
                                        on_run=on_run)
                runs[(system, spec.name)] = wr
                doc["unloaded"].append({"system": system, "workload": spec.name,
                                        "ttft_s": wr.unloaded.ttft_s, "tbt_s": wr.unloaded.tbt_s})
                con.print(f"  {spec.name}: unloaded TTFT {wr.unloaded.ttft_s * 1e3:.0f} ms, "
                          f"TBT {wr.unloaded.tbt_s * 1e3:.1f} ms")
        finally:
            await inner.close()
