"""One system, already started: unloaded latencies, quality answers, then a rate sweep per
workload, all through ``bench.replay``'s HTTP client.

The sweep is ``bench.replay.runner.run_sweep`` (open loop; run ``i`` maps hash ids with
seed ``i``, so every load starts from a cold prefix cache and every system sees the same
prompts run for run) under a provisional SLO; ``judge`` re-judges afterwards. For halfmoon
the client is wrapped in ``MeteredClient``, which scrapes the conductor's ``/metrics``
around every run (``run_sweep`` asks for node metrics before and after each), so each run
gets its mean TTFT parts (queue / prefill / KV transfer / first decode) from the
conductor's per-request Timing histograms.
"""
from __future__ import annotations

import random
import statistics
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import httpx

from bench.peers.judge import Unloaded
from bench.peers.workloads import WorkloadSpec
from bench.replay.client import StreamEvent
from bench.replay.metrics import mooncake_tbt, token_gaps
from bench.replay.runner import ReplayConfig, SweepResult, run_sweep
from bench.replay.summary import SLO
from bench.replay.sweep import speedups_for_rates
from bench.replay.trace import load_trace
from bench.replay.workload import select_window

TTFT_PARTS = ("queue", "prefill", "kv_transfer", "first_decode")
_PART_METRIC = {p: f"halfmoon:ttft_{p}_seconds" for p in TTFT_PARTS}
_TTFT_METRIC = "halfmoon:time_to_first_token_seconds"


def parse_histogram_sums(text: str) -> dict[str, float]:
    """``NAME_sum`` and ``NAME_count`` samples without labels from Prometheus text."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#") or "{" in line:
            continue
        parts = line.split()
        if len(parts) >= 2 and (parts[0].endswith("_sum") or parts[0].endswith("_count")):
            try:
                out[parts[0]] = float(parts[1])
            except ValueError:
                continue
    return out


def ttft_parts(before: dict[str, float], after: dict[str, float]) -> dict[str, float] | None:
    """Mean seconds of each TTFT part over the requests that finished between two scrapes."""
    out: dict[str, float] = {}
    for part, name in [*_PART_METRIC.items(), ("ttft", _TTFT_METRIC)]:
        n = after.get(f"{name}_count", 0.0) - before.get(f"{name}_count", 0.0)
        if n <= 0:
            return None
        out[part] = (after.get(f"{name}_sum", 0.0) - before.get(f"{name}_sum", 0.0)) / n
    return out


class MeteredClient:
    """A ReplayClient that passes requests through and scrapes ``/metrics`` on every
    ``node_metrics`` call, keeping each scrape (``snapshots``)."""

    def __init__(self, inner, address: str) -> None:
        self.inner = inner
        self.address = address
        self.snapshots: list[dict[str, float]] = []

    def generate(self, request_id: str, prompt_token_ids: list[int], max_tokens: int) -> AsyncIterator[StreamEvent]:
        return self.inner.generate(request_id, prompt_token_ids, max_tokens)

    async def node_metrics(self) -> dict[str, float]:
        async with httpx.AsyncClient(timeout=10.0) as http:
            r = await http.get(f"http://{self.address}/metrics")
        snap = parse_histogram_sums(r.text) if r.status_code == 200 else {}
        self.snapshots.append(snap)
        return {}


async def unloaded(client, prompt_tokens: int, output_tokens: int, n: int = 3, seed: int = 7) -> Unloaded:
    """Median TTFT and median Mooncake TBT of single fresh requests, one at a time (after one
    warm-up request that is not counted)."""
    rng = random.Random(seed)
    ttfts, tbts = [], []
    for i in range(n + 1):
        ids = [rng.randrange(100, 40000) for _ in range(prompt_tokens)]
        t0 = time.perf_counter()
        times: list[float] = []
        async for event in client.generate(f"unloaded-{i}", ids, output_tokens):
            times += [time.perf_counter()] * len(event.token_ids)
        if i == 0 or not times:
            continue
        ttfts.append(times[0] - t0)
        tbt = mooncake_tbt(token_gaps(times))
        if tbt is not None:
            tbts.append(tbt)
    if not ttfts or not tbts:
        raise RuntimeError("unloaded requests returned too few tokens to time")
    return Unloaded(statistics.median(ttfts), statistics.median(tbts))


def median_shape(spec: WorkloadSpec) -> tuple[int, int]:
    """The workload's median (prompt tokens, output tokens) after scaling."""
    sel = select_window(load_trace(spec.trace), spec.window)
    ins, outs = [], []
    for r in sel.records:
        n = spec.scale.input_tokens(r)
        if spec.scale.max_input_tokens is not None:
            n = min(n, spec.scale.max_input_tokens)
        ins.append(n)
        outs.append(spec.scale.output_tokens(r))
    return int(statistics.median(ins)), max(2, int(statistics.median(outs)))


@dataclass
class WorkloadRun:
    workload: str
    unloaded: Unloaded
    sweep: SweepResult
    ttft_parts: list[dict[str, float] | None] = field(default_factory=list)  # per run; halfmoon only


async def sweep(client, spec: WorkloadSpec, system: str, rates: tuple[float, ...],
                request_timeout_s: float = 120.0, cooldown_s: float = 3.0, on_run=None, on_done=None) -> SweepResult:
    sel = select_window(load_trace(spec.trace), spec.window)
    base = sel.request_rate(1.0)
    if base is None:
        raise ValueError(f"workload {spec.name}: the window has no request rate")
    config = ReplayConfig(trace=spec.trace, label=f"{system}/{spec.name}", scale=spec.scale, window=spec.window,
                          speedups=tuple(speedups_for_rates(rates, base)), slo=SLO(1e9, 1e9),
                          token_seed=spec.token_seed,
                          request_timeout_s=request_timeout_s, cooldown_s=cooldown_s)
    return await run_sweep(config, client, on_run, on_done, selection=sel)


async def run_workload(client, spec: WorkloadSpec, system: str, rates: tuple[float, ...], **kw) -> WorkloadRun:
    """Unloaded latencies of the workload's median request, then its sweep."""
    prompt, output = median_shape(spec)
    free = await unloaded(client, prompt, output)
    before = len(client.snapshots) if isinstance(client, MeteredClient) else 0
    result = await sweep(client, spec, system, rates, **kw)
    parts: list[dict[str, float] | None] = []
    if isinstance(client, MeteredClient):
        s = client.snapshots[before:]
        parts = [ttft_parts(s[i], s[i + 1]) for i in range(0, len(s) - 1, 2)]
    return WorkloadRun(spec.name, free, result, parts)
