"""Presenting a sweep: rich tables for the terminal and a JSON document for tools.

The JSON document (``schema`` = SCHEMA) holds the config, the SLOs, the capacity verdict
and, per run, the summary and every request's metrics; ``plots.series_from_json`` reads
it back, so results of different layouts can be drawn on one figure.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from bench.replay.metrics import Distribution
from bench.replay.runner import RunResult, SweepResult
from bench.replay.summary import RunSummary
from bench.replay.sweep import Capacity

SCHEMA = "halfmoon.replay/1"
_NUMBER = re.compile(r"\d+(?:\.\d+)?")
_FLOAT_DIGITS = 6


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.1f}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.1f}%"


def _num(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def run_table(summary: RunSummary) -> Table:
    """Latency distributions of one run, in milliseconds."""
    rate = _num(summary.request_rate)
    table = Table(
        title=f"{summary.label} @ speed-up {summary.speedup:g} ({rate} req/s offered)",
        title_justify="left",
    )
    table.add_column("latency (ms)")
    for column in ("n", "mean", "p50", "p90", "p99", "max"):
        table.add_column(column, justify="right")
    rows: list[tuple[str, Distribution | None]] = [
        ("TTFT", summary.ttft),
        ("TBT (all gaps)", summary.tbt_gaps),
        ("TBT (Mooncake)", summary.tbt_mooncake),
        ("TPOT", summary.tpot),
        ("E2E", summary.e2e),
    ]
    for name, dist in rows:
        if dist is None:
            table.add_row(name, "0", *["-"] * 5)
        else:
            table.add_row(
                name,
                str(dist.count),
                *(_ms(v) for v in (dist.mean, dist.p50, dist.p90, dist.p99, dist.max)),
            )
    return table


def run_facts(summary: RunSummary) -> Text:
    """Counts, SLO attainment, goodput and cache facts of one run, as lines of text."""
    lines = [
        f"requests {summary.requests}: completed {summary.completed}, rejected "
        f"{summary.rejected}, failed {summary.failed}"
        + ("" if summary.accounted else "  [NOT ALL ACCOUNTED FOR]"),
        (
            f"SLO attainment: TTFT {_pct(summary.ttft_attainment)}, "
            f"TBT {_pct(summary.tbt_attainment)}, both {_pct(summary.slo_attainment)}; "
            f"goodput {_num(summary.goodput)} req/s"
        ),
        (
            f"wall {summary.wall_s:.1f}s, window {_num(summary.window_s, 1)}s, "
            f"{summary.output_tokens_per_s:.1f} output tok/s, "
            f"max send lag {_ms(summary.max_send_lag_s)} ms"
        ),
        f"prefix-cache hit rate {_pct(summary.prefix_hit_rate)} (unbounded-cache bound over "
        f"trace blocks {_pct(summary.ideal_block_hit_rate)})"
        + (f"; metrics unavailable: {summary.metrics_error}" if summary.metrics_error else ""),
    ]
    for title, reasons in (
        ("rejected", summary.rejection_reasons),
        ("failed", summary.failure_reasons),
    ):
        top = sorted(group_reasons(reasons).items(), key=lambda item: -item[1])[:5]
        lines.extend(f"  {title} x{count}: {reason}" for reason, count in top)
    return Text("\n".join(lines))


def group_reasons(reasons: dict[str, int]) -> dict[str, int]:
    """Merge reasons that differ only in their numbers ("wait 3.1s" and "wait 3.4s")."""
    grouped: Counter[str] = Counter()
    for reason, count in reasons.items():
        grouped[_NUMBER.sub("#", reason)] += count
    return dict(grouped)


def sweep_table(result: SweepResult) -> Table:
    """One row per load, and the capacity verdict in the caption."""
    slo = result.config.slo
    table = Table(
        title=f"{result.config.label}: SLOs TTFT <= {slo.ttft_s * 1000:g} ms, "
        f"TBT (Mooncake) <= {slo.tbt_s * 1000:g} ms; latencies p90 in ms",
        title_justify="left",
    )
    for column in (
        "speedup",
        "req/s",
        "done",
        "rej",
        "fail",
        "TTFT",
        "TBT",
        "SLO met",
        "goodput",
    ):
        table.add_column(column, justify="right")
    for run in result.runs:
        s = run.summary
        table.add_row(
            f"{s.speedup:g}",
            _num(s.request_rate),
            str(s.completed),
            str(s.rejected),
            str(s.failed),
            _ms(s.ttft.p90 if s.ttft else None),
            _ms(s.tbt_mooncake.p90 if s.tbt_mooncake else None),
            _pct(s.slo_attainment),
            _num(s.goodput),
        )
    table.caption = capacity_line(result)
    table.caption_justify = "left"
    return table


def capacity_line(result: SweepResult) -> str:
    capacity = result.capacity
    if capacity is None:
        return "effective request capacity: undefined (a run's request rate is undefined)"
    share = f">= {capacity.threshold * 100:g}% of requests meeting both SLOs"
    if capacity.point is None:
        return f"effective request capacity: below every load tried (none had {share})"
    line = (
        f"effective request capacity: {capacity.point.request_rate:.2f} req/s "
        f"(speed-up {capacity.point.speedup:g}; {share})"
    )
    miss = capacity.first_miss_below_capacity
    if miss is not None:
        line += f"; note: a lower load ({miss.request_rate:.2f} req/s) missed the threshold"
    return line


def print_run(console: Console, run: RunResult) -> None:
    console.print(Group(run_table(run.summary), run_facts(run.summary)))


def print_sweep(console: Console, result: SweepResult) -> None:
    console.print(sweep_table(result))


def _plain(value: Any) -> Any:
    """Dataclasses, enums and paths as JSON values; floats rounded to microseconds."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, float):
        return round(value, _FLOAT_DIGITS)
    return value


def capacity_json(capacity: Capacity | None) -> dict[str, Any] | None:
    if capacity is None:
        return None
    return {
        "threshold": capacity.threshold,
        "request_rate": capacity.request_rate,
        "speedup": None if capacity.point is None else capacity.point.speedup,
        "first_miss_below_capacity": _plain(capacity.first_miss_below_capacity),
    }


def to_json(result: SweepResult) -> dict[str, Any]:
    return {
        "schema": SCHEMA,
        "label": result.config.label,
        "config": _plain(result.config),
        "capacity": capacity_json(result.capacity),
        "runs": [
            {
                "summary": {**_plain(run.summary), "accounted": run.summary.accounted},
                "requests": [{**_plain(m), "meets_slo": m.meets_slo} for m in run.requests],
            }
            for run in result.runs
        ],
    }


def write_json(result: SweepResult, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(to_json(result), indent=1) + "\n", encoding="utf-8")
