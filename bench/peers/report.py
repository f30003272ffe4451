"""The peers bench's outputs: the printed table, the JSON document and the plots.

Plots, one pair per workload: ``peers[_quick]_goodput_<workload>.png`` (goodput vs offered
rate, one line per system, the y = x line for reference) and
``peers[_quick]_cdf_<workload>.png`` (TTFT and token-gap CDFs of every system at one
offered rate: the highest at which any system kept the SLOs, else the lowest swept).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from bench.peers.judge import Row, rejudge


def targets(rows: Sequence[Row], capacities: dict[tuple[str, str], float | None], peer: str = "llama-server"
            ) -> list[dict]:
    """The issue's targets per halfmoon system and workload: capacity >= 1.5x the peer's, and
    p99 TBT at halfmoon's capacity load <= the peer's at that load."""
    out = []
    for (system, workload), cap in capacities.items():
        if system == peer or (peer, workload) not in capacities:
            continue
        peer_cap = capacities[(peer, workload)]
        ratio = None if not cap or not peer_cap else cap / peer_cap
        at = cap or min((r.rate_rps for r in rows if r.system == system and r.workload == workload), default=None)
        mine = next((r for r in rows if r.system == system and r.workload == workload and r.rate_rps == at), None)
        theirs = min((r for r in rows if r.system == peer and r.workload == workload and at is not None),
                     key=lambda r: abs(r.rate_rps - at), default=None)
        tbt_ok = (mine is not None and theirs is not None and mine.tbt_p99_s is not None
                  and theirs.tbt_p99_s is not None and mine.tbt_p99_s <= theirs.tbt_p99_s)
        out.append({"system": system, "workload": workload, "capacity_rps": cap, "peer_capacity_rps": peer_cap,
                    "capacity_ratio": ratio, "capacity_target_met": ratio is not None and ratio >= 1.5
                    or (bool(cap) and peer_cap is None),
                    "at_rate_rps": at, "tbt_p99_s": mine.tbt_p99_s if mine else None,
                    "peer_tbt_p99_s": theirs.tbt_p99_s if theirs else None, "tbt_target_met": tbt_ok})
    return out


def print_table(console, doc: dict) -> None:
    from rich.table import Table

    for workload, slo in doc["slo"].items():
        t = Table(title=f"{workload}: SLOs TTFT <= {slo['ttft_s']:.2f} s, TBT <= {slo['tbt_s'] * 1e3:.0f} ms "
                        f"(load average {doc['load_average'][0]:.1f})")
        for c in ("system", "req/s", "SLO met", "goodput", "TTFT p50", "TTFT p99", "TBT p99 ms", "out tok/s",
                  "capacity"):
            t.add_column(c, justify="left" if c == "system" else "right")
        caps = {(c["system"], c["workload"]): c["effective_capacity_rps"] for c in doc["capacity"]}
        last = None
        for r in doc["rows"]:
            if r["workload"] != workload:
                continue
            first = r["system"] != last
            last = r["system"]
            cap = caps.get((r["system"], workload))
            t.add_row(r["system"] if first else "", f"{r['rate_rps']:.2f}", f"{r['slo_attainment']:.0%}",
                      f"{r['goodput_rps']:.2f}", _s(r["ttft_p50_s"]), _s(r["ttft_p99_s"]),
                      f"{r['tbt_p99_s'] * 1e3:.0f}" if r["tbt_p99_s"] is not None else "-",
                      f"{r['output_tok_s']:.1f}", (f"{cap:.2f}" if cap else "< lowest") if first else "")
        console.print(t)
    if doc["quality"]:
        t = Table(title="greedy answers vs halfmoon fp32 (12 chat prompts, 32 tokens)")
        for c in ("system", "identical", "mean first divergence (tokens)", "'What is the capital of France?'"):
            t.add_column(c)
        for q in doc["quality"]:
            t.add_row(q["system"], f"{q['exact']}/{q['prompts']}", f"{q['mean_first_divergence']:.1f}",
                      q["first_answer"][:60].replace("\n", " "))
        console.print(t)
    if doc["ttft_breakdown"]:
        t = Table(title="halfmoon TTFT parts (means at the conductor) at the capacity load")
        for c in ("system", "workload", "req/s", "queue", "prefill", "KV transfer", "first decode", "TTFT"):
            t.add_column(c)
        for b in doc["ttft_breakdown"]:
            t.add_row(b["system"], b["workload"], f"{b['rate_rps']:.2f}",
                      *(_s(b[k]) for k in ("queue_s", "prefill_s", "kv_transfer_s", "first_decode_s", "ttft_s")))
        console.print(t)
    for g in doc["targets"]:
        cap = (f"x{g['capacity_ratio']:.2f} llama-server's" if g["capacity_ratio"] else
               f"{_rps(g['capacity_rps'])} vs llama-server's {_rps(g['peer_capacity_rps'])}")
        console.print(f"{g['system']} / {g['workload']}: capacity {cap} (target 1.5x: "
                      f"{'met' if g['capacity_target_met'] else 'missed'}); p99 TBT {_ms(g['tbt_p99_s'])} vs "
                      f"{_ms(g['peer_tbt_p99_s'])} at {_rps(g['at_rate_rps'])} "
                      f"(target <=: {'met' if g['tbt_target_met'] else 'missed'})")


def _s(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f} s"


def _rps(v: float | None) -> str:
    return "none" if not v else f"{v:.2f} req/s"


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v * 1e3:.0f} ms"


def rows_json(rows: Sequence[Row]) -> list[dict]:
    return [asdict(r) for r in rows]


def draw(results: dict, slos: dict, capacities: dict, plot_dir: Path, prefix: str) -> list[Path]:
    """``results[(system, workload)]`` = (rows, SweepResult); returns the PNGs written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plot_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for workload in sorted({w for _, w in results}):
        systems = [s for s, w in results if w == workload]
        fig, ax = plt.subplots(figsize=(6, 4))
        top = 0.0
        for s in systems:
            rows = results[(s, workload)][0]
            ax.plot([r.rate_rps for r in rows], [r.goodput_rps for r in rows], marker="o", label=s)
            top = max(top, *(r.rate_rps for r in rows))
        ax.plot([0, top], [0, top], color="grey", linestyle=":", label="offered")
        ax.set_xlabel("offered requests/s")
        ax.set_ylabel("goodput (requests/s meeting both SLOs)")
        slo = slos[workload]
        ax.set_title(f"{workload}: TTFT <= {slo.ttft_s:.2f} s, TBT <= {slo.tbt_s * 1e3:.0f} ms")
        ax.legend()
        fig.tight_layout()
        path = plot_dir / f"{prefix}_goodput_{workload}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)

        caps = [c for (s, w), c in capacities.items() if w == workload and c]
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
        for s in systems:
            rows, sweep = results[(s, workload)]
            rates = [r.rate_rps for r in rows]
            want = max(caps) if caps else min(rates)
            i = min(range(len(rates)), key=lambda k: abs(rates[k] - want))
            reqs = rejudge(sweep.runs[i].requests, slo)
            ttft = sorted(m.ttft_s for m in reqs if m.ttft_s is not None)
            gaps = sorted(g * 1e3 for m in reqs for g in m.tbt_gaps_s)
            for ax, vals in ((a1, ttft), (a2, gaps)):
                if vals:
                    ax.plot(vals, [(k + 1) / len(vals) for k in range(len(vals))], label=f"{s} @ {rates[i]:.2f}/s")
        a1.axvline(slo.ttft_s, color="grey", linestyle=":")
        a1.set_xlabel("TTFT (s)")
        a2.set_xlabel("token gap (ms)")
        a2.set_xscale("log")
        for ax in (a1, a2):
            ax.set_ylabel("share of samples")
            ax.legend(fontsize=8)
        fig.suptitle(f"{workload}: latency CDFs")
        fig.tight_layout()
        path = plot_dir / f"{prefix}_cdf_{workload}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths
