"""One replay invocation: load the trace, build each run's workload, send, summarize.

A single run is a sweep of one speed-up. Run ``i`` of a sweep maps hash ids with seed
``token_seed + i``, so no run finds prompts cached by an earlier run: every load starts
from a cold prefix cache, while requests inside a run still share prefixes. Two
layouts replayed with the same config see identical prompts, run for run.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.replay.client import ReplayClient
from bench.replay.sender import replay
from bench.replay.summary import SLO, RequestMetrics, RunSummary, summarize
from bench.replay.sweep import CAPACITY_THRESHOLD, Capacity, SweepPoint, effective_capacity
from bench.replay.tokens import TokenMapper, TokenSpace
from bench.replay.trace import load_trace
from bench.replay.workload import (
    ScaleConfig,
    TraceWindow,
    WindowSelection,
    build_workload,
    select_window,
)


@dataclass(frozen=True, slots=True)
class ReplayConfig:
    trace: Path
    label: str
    scale: ScaleConfig  # its speedup is ignored: ``speedups`` sets each run's
    window: TraceWindow
    speedups: tuple[float, ...]
    slo: SLO
    token_space: TokenSpace = dataclasses.field(default_factory=TokenSpace)
    token_seed: int = 0
    request_timeout_s: float = 60.0
    cooldown_s: float = 1.0  # pause between sweep runs so the cluster drains
    capacity_threshold: float = CAPACITY_THRESHOLD

    def __post_init__(self) -> None:
        if not self.speedups or any(s <= 0 for s in self.speedups):
            raise ValueError(
                f"speed-ups must be a non-empty list of values > 0, got {self.speedups}"
            )
        if self.cooldown_s < 0:
            raise ValueError(f"cooldown must be >= 0 s, got {self.cooldown_s}")


@dataclass(frozen=True, slots=True)
class RunResult:
    summary: RunSummary
    requests: list[RequestMetrics]


@dataclass(frozen=True, slots=True)
class SweepResult:
    config: ReplayConfig
    runs: list[RunResult]
    capacity: Capacity | None  # None when a run's request rate is undefined


def load_window(config: ReplayConfig) -> WindowSelection:
    return select_window(load_trace(config.trace), config.window)


def sweep_capacity(runs: Sequence[RunResult], threshold: float) -> Capacity | None:
    points = []
    for run in runs:
        if run.summary.request_rate is None:
            return None
        points.append(
            SweepPoint(run.summary.speedup, run.summary.request_rate, run.summary.slo_attainment)
        )
    return effective_capacity(points, threshold)


async def run_sweep(
    config: ReplayConfig,
    client: ReplayClient,
    on_run: Callable[[int, float, int], None] | None = None,
    on_done: Callable[[RunResult], None] | None = None,
    selection: WindowSelection | None = None,
) -> SweepResult:
    """Replay the window once per speed-up, in the order given.

    ``on_run(index, speedup, requests)`` fires before a run, ``on_done(result)`` after;
    ``selection`` saves reloading the trace when the caller already selected the window.
    """
    if selection is None:
        selection = load_window(config)
    runs: list[RunResult] = []
    for index, speedup in enumerate(config.speedups):
        if index and config.cooldown_s:
            await asyncio.sleep(config.cooldown_s)
        scale = dataclasses.replace(config.scale, speedup=speedup)
        mapper = TokenMapper(scale.block_tokens, config.token_space, seed=config.token_seed + index)
        workload = build_workload(selection, scale, mapper, id_prefix=f"{config.label}-{index}")
        if on_run is not None:
            on_run(index, speedup, len(workload.requests))
        run = await replay(workload.requests, client, request_timeout_s=config.request_timeout_s)
        summary, per_request = summarize(
            run, workload, config.slo, label=config.label, speedup=speedup
        )
        result = RunResult(summary, per_request)
        runs.append(result)
        if on_done is not None:
            on_done(result)
    return SweepResult(config, runs, sweep_capacity(runs, config.capacity_threshold))
