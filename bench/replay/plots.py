"""PNG figures of a replay: latency CDFs, and goodput / SLO attainment vs request rate.

Figures take ``PlotSeries``, one per layout (label), built from a fresh SweepResult or
from a JSON document written earlier, so ``--overlay other.json`` puts a disaggregated
and a colocated sweep on the same axes. Figures are drawn without pyplot (no GUI
backend, no global state): matplotlib's Agg canvas writes the PNGs.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from bench.replay.report import SCHEMA
from bench.replay.runner import SweepResult

LATENCY_CDF_PNG = "latency_cdf.png"
GOODPUT_PNG = "goodput_vs_rate.png"


@dataclass(frozen=True, slots=True)
class PlotRun:
    speedup: float
    request_rate: float | None
    goodput: float | None
    slo_attainment: float
    ttft_s: list[float]
    tbt_gaps_s: list[float]
    tbt_mooncake_s: list[float]
    tpot_s: list[float]


@dataclass(frozen=True, slots=True)
class PlotSeries:
    label: str
    ttft_slo_s: float
    tbt_slo_s: float
    threshold: float | None
    capacity_rate: float | None
    runs: list[PlotRun]


def _present(values: Sequence[float | None]) -> list[float]:
    return [v for v in values if v is not None]


def series_from_result(result: SweepResult) -> PlotSeries:
    capacity = result.capacity
    return PlotSeries(
        label=result.config.label,
        ttft_slo_s=result.config.slo.ttft_s,
        tbt_slo_s=result.config.slo.tbt_s,
        threshold=None if capacity is None else capacity.threshold,
        capacity_rate=None if capacity is None else capacity.request_rate,
        runs=[
            PlotRun(
                speedup=run.summary.speedup,
                request_rate=run.summary.request_rate,
                goodput=run.summary.goodput,
                slo_attainment=run.summary.slo_attainment,
                ttft_s=_present([m.ttft_s for m in run.requests]),
                tbt_gaps_s=[g for m in run.requests for g in m.tbt_gaps_s],
                tbt_mooncake_s=_present([m.tbt_mooncake_s for m in run.requests]),
                tpot_s=_present([m.tpot_s for m in run.requests]),
            )
            for run in result.runs
        ],
    )


def series_from_json(path: Path) -> PlotSeries:
    """Read a document written by ``report.write_json``; ValueError if it is not one."""
    try:
        return _series_from_doc(json.loads(path.read_text(encoding="utf-8")), path)
    except (KeyError, TypeError) as exc:
        raise ValueError(f"{path}: malformed replay result ({type(exc).__name__}: {exc})") from exc


def _series_from_doc(doc: dict[str, Any], path: Path) -> PlotSeries:
    if doc.get("schema") != SCHEMA:
        raise ValueError(
            f"{path}: not a replay result (schema {doc.get('schema')!r}, want {SCHEMA!r})"
        )
    capacity = doc["capacity"]
    slo = doc["config"]["slo"]
    runs = []
    for run in doc["runs"]:
        summary, requests = run["summary"], run["requests"]
        runs.append(
            PlotRun(
                speedup=summary["speedup"],
                request_rate=summary["request_rate"],
                goodput=summary["goodput"],
                slo_attainment=summary["slo_attainment"],
                ttft_s=_present([m["ttft_s"] for m in requests]),
                tbt_gaps_s=[g for m in requests for g in m["tbt_gaps_s"]],
                tbt_mooncake_s=_present([m["tbt_mooncake_s"] for m in requests]),
                tpot_s=_present([m["tpot_s"] for m in requests]),
            )
        )
    return PlotSeries(
        label=doc["label"],
        ttft_slo_s=slo["ttft_s"],
        tbt_slo_s=slo["tbt_s"],
        threshold=None if capacity is None else capacity["threshold"],
        capacity_rate=None if capacity is None else capacity["request_rate"],
        runs=runs,
    )


LINESTYLES = ("-", "--", ":", "-.")  # one per layout (series); colour follows the load


def _cdf(axis: Any, values_s: list[float], label: str, **style: Any) -> None:
    if not values_s:
        return
    ordered = sorted(v * 1000 for v in values_s)
    shares = [(i + 1) / len(ordered) for i in range(len(ordered))]
    axis.step(ordered, shares, where="post", label=label, **style)


def _load_colour(index: int, count: int) -> Any:
    """Light to dark with the load, the same scale for every series."""
    from matplotlib import colormaps

    return colormaps["viridis"](0.9 - 0.8 * index / max(1, count - 1))


def plot_latency_cdfs(series: Sequence[PlotSeries], path: Path) -> Path:
    figure = Figure(figsize=(12, 8))
    axes = figure.subplots(2, 2)
    panels = [
        (axes[0][0], "TTFT", "ttft_s", lambda s: s.ttft_slo_s),
        (axes[0][1], "TBT, all gaps", "tbt_gaps_s", lambda s: None),
        (
            axes[1][0],
            "TBT, Mooncake (mean of longest 10%)",
            "tbt_mooncake_s",
            lambda s: s.tbt_slo_s,
        ),
        (axes[1][1], "TPOT", "tpot_s", lambda s: None),
    ]
    for axis, title, field, slo_of in panels:
        for number, one in enumerate(series):
            for index, run in enumerate(one.runs):
                rate = "-" if run.request_rate is None else f"{run.request_rate:.2f}"
                _cdf(axis, getattr(run, field), f"{one.label} {rate} req/s",
                     color=_load_colour(index, len(one.runs)), linestyle=LINESTYLES[number % len(LINESTYLES)])
            slo = slo_of(one)
            if slo is not None:
                axis.axvline(slo * 1000, linestyle="--", color="grey", linewidth=1)
        axis.set_title(title)
        axis.set_xlabel("ms")
        axis.set_ylabel("share of requests" if field != "tbt_gaps_s" else "share of gaps")
        axis.set_ylim(0, 1.01)
        axis.grid(alpha=0.3)
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=7)
    figure.suptitle("Client-side latency CDFs (dashed: SLO)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    return path


def plot_goodput(series: Sequence[PlotSeries], path: Path) -> Path:
    figure = Figure(figsize=(12, 4.5))
    left, right = figure.subplots(1, 2)
    top = 0.0
    for one in series:
        points = sorted(
            (r.request_rate, r.goodput or 0.0, r.slo_attainment * 100)
            for r in one.runs
            if r.request_rate is not None
        )
        if not points:
            continue
        rates, goodputs, attainments = zip(*points, strict=True)
        top = max(top, *rates)
        line = left.plot(rates, goodputs, marker="o", label=one.label)[0]
        right.plot(rates, attainments, marker="o", label=one.label)
        if one.capacity_rate is not None:
            right.axvline(one.capacity_rate, linestyle=":", color=line.get_color(), linewidth=1)
        if one.threshold is not None:
            right.axhline(one.threshold * 100, linestyle="--", color="grey", linewidth=1)
    if top:
        left.plot([0, top], [0, top], linestyle=":", color="grey", label="every request meets SLOs")
    left.set_title("Goodput vs offered load")
    left.set_xlabel("offered requests/s")
    left.set_ylabel("requests/s meeting TTFT and TBT SLOs")
    right.set_title("SLO attainment (dotted: effective capacity)")
    right.set_xlabel("offered requests/s")
    right.set_ylabel("% of requests meeting both SLOs")
    right.set_ylim(0, 105)
    for axis, corner in ((left, "upper left"), (right, "lower left")):
        axis.grid(alpha=0.3)
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=8, loc=corner)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    return path


def draw_plots(series: Sequence[PlotSeries], plot_dir: Path) -> list[Path]:
    """Write both figures into ``plot_dir``; return their paths."""
    plot_dir.mkdir(parents=True, exist_ok=True)
    return [
        plot_latency_cdfs(series, plot_dir / LATENCY_CDF_PNG),
        plot_goodput(series, plot_dir / GOODPUT_PNG),
    ]
