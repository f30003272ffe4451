"""Disaggregated vs colocated on this machine: replay the same scaled trace against each
layout at several loads and compare effective request capacity and TBT under SLOs.

    python -m bench.layouts --out out/layouts --speedups 0.05,0.1,0.2,0.3 --duration 60

Requests sharing one of the trace's 3-s-rounded timestamps are spread over those 3 trace
seconds (`--spread-ms 3000`; 0 replays each burst as one instant, which no load can serve
within a TTFT SLO of a few unloaded TTFTs on one prefill core).

For each layout in turn (never both at once, so they get the same two cores): start the
cluster (`1p1d`: one prefill + one decode node; `2co`: two colocated nodes; one thread
per node either way; ``--dtype`` sets the nodes' model dtype, float32 by default), measure
unloaded single-request TTFT and TBT, replay the sweep with
`bench.replay` through gRPC, stop the cluster. SLOs are `--ttft-x` / `--tbt-x` times the
unloaded values of the first layout, unless given in seconds. Writes each layout's
replay JSON, a summary JSON, a comparison table and overlaid plots.

Dtypes side by side: one run per ``--dtype``, each with the same SLOs in seconds (the ``-x``
multiples would judge each dtype against its own unloaded latency), e.g.

    python -m bench.layouts --dtype float32 --layouts 1p1d --speedups 0.12,0.18,0.25,0.35 \
        --duration 10 --ttft-slo 7.2 --tbt-slo 0.144 --out out/layouts_float32
    python -m bench.layouts --dtype w8a8 ... --out out/layouts_w8a8
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from bench import flags

TRACE = Path(__file__).resolve().parents[1].parent / "shared" / "traces" / "conversation_trace.jsonl"
LAYOUTS = {"1p1d": (1, 1, 0), "2co": (0, 0, 2)}


def _start(layout: str, threads: int, dtype: str = "float32"):
    from cluster.local import LocalCluster
    from cluster.node_main import NodeSpec
    from cluster.specs import free_port
    from conductor.server import ConductorSpec

    p, d, co = LAYOUTS[layout]
    spec = ConductorSpec(grpc_port=free_port(), http_port=None, settings={"admission": "none"},
                         heartbeat_interval_s=0.5)
    node = NodeSpec(role="prefill", node_id="", conductor="", num_blocks=2048, num_threads=threads,
                    max_num_batched_tokens=256, dtype=dtype)
    return LocalCluster.build(p, d, conductor=spec, node=node, colocated=co).start()


def unloaded(address: str, prompt_tokens: int, output_tokens: int, n: int = 4) -> tuple[float, float]:
    """Median TTFT and median token gap of single requests, one at a time."""
    import random

    from cluster.client import Client, make_request
    from engine.sampling import SamplingParams

    rng = random.Random(7)
    ttfts, gaps = [], []
    with Client(address) as c:
        for _ in range(n):
            ids = [rng.randrange(100, 40000) for _ in range(prompt_tokens)]
            t0 = time.perf_counter()
            times = []
            for msg in c.stream(make_request(token_ids=ids, params=SamplingParams(max_tokens=output_tokens,
                                                                                  ignore_eos=True))):
                if msg.HasField("delta"):
                    times += [time.perf_counter()] * len(msg.delta.token_ids)
            ttfts.append(times[0] - t0)
            gaps += [b - a for a, b in zip(times, times[1:])]
    return statistics.median(ttfts), statistics.median(gaps)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="halfmoon bench layouts", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trace", type=Path, default=TRACE)
    ap.add_argument("--out", type=Path, default=Path("out/layouts"))
    ap.add_argument("--layouts", default="1p1d,2co")
    ap.add_argument("--speedups", default="0.05,0.1,0.2,0.3")
    ap.add_argument("--duration", type=flags.positive, default=60.0, help="trace seconds per run")
    ap.add_argument("--block-tokens", type=flags.count(1), default=16)
    ap.add_argument("--output-scale", type=flags.positive, default=0.1)
    ap.add_argument("--max-output-tokens", type=flags.count(1), default=64)
    ap.add_argument("--max-input-tokens", type=flags.count(1), default=1024)
    ap.add_argument("--threads", type=flags.count(1), default=1, help="torch threads per node")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "w8a8", "fp8"],
                    help="the nodes' model dtype (engine/quant.py)")
    ap.add_argument("--spread-ms", type=flags.non_negative, default=3000.0,
                    help="spread requests sharing a trace timestamp over this many trace ms (the trace "
                         "rounds timestamps to 3 s; 0 replays each burst as one instant)")
    ap.add_argument("--ttft-x", type=flags.positive, default=5.0)
    ap.add_argument("--tbt-x", type=flags.positive, default=3.0)
    ap.add_argument("--ttft-slo", type=flags.positive, help="seconds (overrides --ttft-x)")
    ap.add_argument("--tbt-slo", type=flags.positive, help="seconds (overrides --tbt-x)")
    ap.add_argument("--reanalyze", metavar="TTFT_S,...",
                    help="only re-judge the saved runs in --out under these TTFT SLOs (same TBT SLO)")
    ap.add_argument("--merge", metavar="DIR", nargs="+", type=Path,
                    help="only combine earlier --out directories into --out: runs pooled per layout and every "
                         "request re-judged under one pair of SLOs (--ttft-slo/--tbt-slo, else the first "
                         "directory's), capacity recomputed, table, summary and plots redrawn")
    args = ap.parse_args(argv)
    if args.merge:
        return merge(args.merge, args.out, args.layouts.split(","), args.ttft_slo, args.tbt_slo)
    if args.reanalyze:
        return reanalyze(args.out, [float(x) for x in args.reanalyze.split(",")], args.layouts.split(","))

    from rich.console import Console

    from bench.replay import main as replay_main

    con = Console(width=120)
    args.out.mkdir(parents=True, exist_ok=True)
    layouts = args.layouts.split(",")
    slo: tuple[float, float] | None = (args.ttft_slo, args.tbt_slo) if args.ttft_slo and args.tbt_slo else None
    summary: dict = {"layouts": {}, "args": {k: str(v) for k, v in vars(args).items()}}
    for layout in layouts:
        con.print(f"[bold]starting {layout}[/bold]")
        cluster = _start(layout, args.threads, args.dtype)
        try:
            ttft0, tbt0 = unloaded(cluster.address, 376, 34)  # the scaled trace's mean request
            con.print(f"{layout}: unloaded TTFT {ttft0 * 1e3:.0f} ms, TBT {tbt0 * 1e3:.1f} ms")
            if slo is None:
                slo = (args.ttft_x * ttft0, args.tbt_x * tbt0)
                con.print(f"SLOs: TTFT <= {slo[0]:.2f} s, TBT (mean of the longest 10% of gaps) <= {slo[1]:.3f} s")
            out = args.out / f"{layout}.json"
            overlays = [a for prev in layouts[: layouts.index(layout)] for a in ("--overlay", str(args.out / f"{prev}.json"))]
            rc = replay_main(["--trace", str(args.trace), "--target", f"grpc://{cluster.address}", "--label", layout,
                              "--speedups", args.speedups, "--duration", str(args.duration),
                              "--block-tokens", str(args.block_tokens), "--output-scale", str(args.output_scale),
                              "--max-output-tokens", str(args.max_output_tokens),
                              "--max-input-tokens", str(args.max_input_tokens), "--request-timeout", "300",
                              "--spread-ms", str(args.spread_ms),
                              "--ttft-slo", f"{slo[0]:.4f}", "--tbt-slo", f"{slo[1]:.4f}", "--cooldown", "3",
                              "--json", str(out), "--plot-dir", str(args.out / "plots"), *overlays])
            result = json.loads(out.read_text())
            summary["layouts"][layout] = {
                "unloaded_ttft_s": ttft0, "unloaded_tbt_s": tbt0, "replay_exit": rc,
                "capacity_req_s": (result.get("capacity") or {}).get("request_rate"),
                "runs": _run_rows(result["runs"]),
            }
        finally:
            cluster.stop()
    summary["slo"] = {"ttft_s": slo[0], "tbt_s": slo[1]}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    _print_table(con, summary)
    con.print(f"wrote {args.out / 'summary.json'} and plots in {args.out / 'plots'}")
    return 0


def _run_rows(runs: list[dict]) -> list[dict]:
    """The summary table's row of each saved run."""
    return [{k: r["summary"].get(k) for k in ("speedup", "request_rate", "slo_attainment", "goodput",
                                              "completed", "rejected", "failed", "prefix_hit_rate")}
            | {"tbt_p99_s": (r["summary"].get("tbt_gaps") or {}).get("p99"),
               "ttft_p99_s": (r["summary"].get("ttft") or {}).get("p99")} for r in runs]


def _capacity(runs: list[dict]):
    from bench.replay.sweep import SweepPoint, effective_capacity

    return effective_capacity([SweepPoint(r["summary"]["speedup"], r["summary"]["request_rate"],
                                          r["summary"]["slo_attainment"]) for r in runs])


def _rejudge(run: dict, slo) -> None:
    """Re-judge a saved run's requests under other SLOs (`bench.replay.summary.SLO`), in place."""
    reqs = run["requests"]
    for q in reqs:
        q["meets_ttft"], q["meets_tbt"] = slo.judge(q["outcome"] == "completed", q["ttft_s"], q["tbt_mooncake_s"])
        q["meets_slo"] = q["meets_ttft"] and q["meets_tbt"]
    summary = run["summary"]
    n = max(1, len(reqs))
    for key, field in (("ttft_attainment", "meets_ttft"), ("tbt_attainment", "meets_tbt"), ("slo_attainment", "meets_slo")):
        summary[key] = sum(q[field] for q in reqs) / n
    met = sum(q["meets_slo"] for q in reqs)
    summary["goodput"] = None if summary["window_s"] is None else met / summary["window_s"]


def merge(dirs: list[Path], out: Path, layouts: list[str], ttft_slo: float | None = None,
          tbt_slo: float | None = None) -> int:
    """Pool the runs of several sweeps of the same layouts, judged under one pair of SLOs."""
    from rich.console import Console

    from bench.replay.plots import draw_plots, series_from_json
    from bench.replay.report import capacity_json
    from bench.replay.summary import SLO

    con = Console(width=120)
    out.mkdir(parents=True, exist_ok=True)
    summaries = [json.loads((d / "summary.json").read_text()) for d in dirs]
    slo = SLO(ttft_slo or summaries[0]["slo"]["ttft_s"], tbt_slo or summaries[0]["slo"]["tbt_s"])
    merged: dict = {"layouts": {}, "merged_from": [str(d) for d in dirs],
                    "slo": {"ttft_s": slo.ttft_s, "tbt_s": slo.tbt_s}}
    paths = []
    for layout in layouts:
        docs = [json.loads((d / f"{layout}.json").read_text()) for d in dirs]
        doc = docs[0] | {"runs": sorted((r for d in docs for r in d["runs"]),
                                        key=lambda r: r["summary"]["request_rate"] or 0.0)}
        doc["config"]["slo"] = merged["slo"]
        for run in doc["runs"]:
            _rejudge(run, slo)
        cap = _capacity(doc["runs"])
        doc["capacity"] = capacity_json(cap)
        path = out / f"{layout}.json"
        path.write_text(json.dumps(doc, indent=1) + "\n")
        paths.append(path)
        first = summaries[0]["layouts"][layout]
        merged["layouts"][layout] = {
            "unloaded_ttft_s": first["unloaded_ttft_s"], "unloaded_tbt_s": first["unloaded_tbt_s"],
            "capacity_req_s": cap.request_rate, "runs": _run_rows(doc["runs"])}
    (out / "summary.json").write_text(json.dumps(merged, indent=1))
    _print_table(con, merged)
    for plot in draw_plots([series_from_json(p) for p in paths], out / "plots"):
        con.print(f"wrote {plot}")
    return 0


def _print_table(con, summary: dict) -> None:
    from rich.table import Table

    ttft, tbt = summary["slo"]["ttft_s"], summary["slo"]["tbt_s"]
    t = Table(title=f"layouts on this machine; SLOs TTFT <= {ttft:.2f} s, TBT <= {tbt * 1e3:.0f} ms")
    for c in ("layout", "speed-up", "req/s", "SLO met", "goodput", "p99 TBT ms", "capacity req/s"):
        t.add_column(c, justify="left" if c == "layout" else "right")
    for layout, s in summary["layouts"].items():
        for i, r in enumerate(s["runs"]):
            t.add_row(layout if i == 0 else "", f"{r['speedup']:g}", f"{r['request_rate'] or 0:.2f}",
                      f"{(r['slo_attainment'] or 0):.0%}", f"{r['goodput'] or 0:.2f}",
                      f"{r['tbt_p99_s'] * 1e3:.0f}" if r["tbt_p99_s"] is not None else "-",
                      f"{s['capacity_req_s']:.2f}" if i == 0 and s["capacity_req_s"] else ("-" if i == 0 else ""))
    con.print(t)


def reanalyze(out: Path, ttft_slos: list[float], layouts: list[str]) -> int:
    """Effective capacity of each saved layout run under other TTFT SLOs (per-request data)."""
    from rich.console import Console
    from rich.table import Table

    from bench.replay.summary import SLO

    saved = json.loads((out / "summary.json").read_text())
    tbt_slo = saved["slo"]["tbt_s"]
    t = Table(title=f"capacity (req/s with >= 90% meeting both SLOs) vs TTFT SLO; TBT SLO {tbt_slo * 1e3:.0f} ms")
    t.add_column("TTFT SLO s", justify="right")
    for layout in layouts:
        t.add_column(f"{layout} capacity", justify="right")
        t.add_column(f"{layout} attainment by load", justify="left")
    saved_runs = {layout: json.loads((out / f"{layout}.json").read_text())["runs"] for layout in layouts}
    result = {}
    for slo in ttft_slos:
        row = [f"{slo:g}"]
        for layout in layouts:
            runs = saved_runs[layout]
            for r in runs:
                _rejudge(r, SLO(slo, tbt_slo))
            points = [(r["summary"]["request_rate"], r["summary"]["slo_attainment"]) for r in runs]
            cap = _capacity(runs).request_rate
            result.setdefault(layout, {})[slo] = {"capacity_req_s": cap, "attainment": points}
            row += [f"{cap:.2f}" if cap else "< lowest", " ".join(f"{a:.0%}" for _, a in points)]
        t.add_row(*row)
    Console(width=140).print(t)
    (out / "reanalysis.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
