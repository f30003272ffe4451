"""Showing simulator results: a rich table, JSON rows and a PNG comparing runs."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

from rich.console import Console
from rich.table import Table

from bench.sim.metrics import SimSummary


def _num(value: float, fmt: str) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, fmt)


def table(summaries: Sequence[SimSummary], title: str) -> Table:
    t = Table(title=title)
    for name, justify in (
        ("policy", "left"), ("admission", "left"), ("requests", "right"), ("completed", "right"),
        ("rejected", "right"), ("after prefill", "right"), ("TTFT mean s", "right"), ("TTFT p90 s", "right"),
        ("TTFT p99 s", "right"), ("TBT p90 ms", "right"), ("TBT p99 ms", "right"), ("SLO att.", "right"),
        ("goodput r/s", "right"), ("prefix hit", "right"), ("wall s", "right"),
    ):
        t.add_column(name, justify=justify)  # type: ignore[arg-type]
    for s in summaries:
        t.add_row(
            s.policy, s.admission, str(s.requests), str(s.completed), str(s.rejected), str(s.rejected_after_prefill),
            _num(s.ttft_mean_s, ".2f"), _num(s.ttft_p90_s, ".2f"), _num(s.ttft_p99_s, ".2f"),
            _num(s.tbt_p90_s * 1000, ".1f"), _num(s.tbt_p99_s * 1000, ".1f"), _num(s.slo_attainment, ".3f"),
            _num(s.goodput_rps, ".3f"), _num(s.prefix_hit_rate, ".3f"), _num(s.wall_s, ".1f"),
        )
    return t


def print_table(summaries: Sequence[SimSummary], title: str, console: Console | None = None) -> None:
    if console is None:
        console = Console()
        if not console.is_terminal:  # a pipe or a log file: do not squeeze the columns to 80
            console = Console(width=200)
    console.print(table(summaries, title))


def _jsonable(value: object) -> object:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


def write_json(summaries: Sequence[SimSummary], path: str | Path) -> None:
    """A JSON array with one row per run (NaN, e.g. no completed request, becomes null)."""
    rows = [{k: _jsonable(v) for k, v in s.row().items()} for s in summaries]
    Path(path).write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")


def write_plot(summaries: Sequence[SimSummary], path: str | Path, title: str) -> None:
    """Four panels: TTFT (mean, p90), rejections (at arrival / after prefill), SLO
    attainment and prefix hit rate, one bar group per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [s.policy if len({x.admission for x in summaries}) == 1 else f"{s.policy}\n{s.admission}" for s in summaries]
    if len({x.policy for x in summaries}) == 1 and len(summaries) > 1:
        labels = [s.admission for s in summaries]
    x = list(range(len(summaries)))
    fig, axes = plt.subplots(2, 2, figsize=(max(8, 1.6 * len(summaries) + 4), 7))
    width = 0.4
    ax = axes[0][0]
    ax.bar([i - width / 2 for i in x], [_finite(s.ttft_mean_s) for s in summaries], width, label="mean")
    ax.bar([i + width / 2 for i in x], [_finite(s.ttft_p90_s) for s in summaries], width, label="p90")
    ax.set_ylabel("TTFT (s)")
    ax.legend()
    ax = axes[0][1]
    early = [s.rejected - s.rejected_after_prefill for s in summaries]
    late = [s.rejected_after_prefill for s in summaries]
    ax.bar(x, early, label="on arrival")
    ax.bar(x, late, bottom=early, label="after prefill")
    ax.set_ylabel("rejected requests")
    ax.legend()
    ax = axes[1][0]
    ax.bar(x, [_finite(s.slo_attainment) for s in summaries])
    ax.set_ylabel("SLO attainment")
    ax.set_ylim(0, 1)
    ax = axes[1][1]
    ax.bar(x, [_finite(s.prefix_hit_rate) for s in summaries])
    ax.set_ylabel("prefix hit rate (blocks)")
    for row in axes:
        for ax in row:
            ax.set_xticks(x)
            ax.set_xticklabels(labels, fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _finite(value: float) -> float:
    return value if isinstance(value, (int, float)) and math.isfinite(value) else 0.0
