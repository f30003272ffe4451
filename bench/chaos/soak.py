"""Soak: a long, steady replay of the conversation trace, watching for slow rot.

    python -m bench.chaos --soak --minutes 30 --rate 0.35 --json out/soak.json

The trace is scaled as `bench.layouts` scales it (512-token blocks -> 16 tokens, outputs
x0.1 capped at 64, prompts cut at 1,024 tokens, requests sharing a rounded timestamp spread
over its 3 s) and sped up so that it offers `--rate` requests per second (the default 0.35
is ~70% of the 0.51 req/s capacity `bench.layouts` measured for 1P+1D); greedy requests
over gRPC, sent open-loop at their trace times whatever the cluster does.

Reported, with the targets of issue #11:
- RSS of every process (conductor and nodes), sampled every `--rss-every` seconds; growth
  from the end of the warm-up window to the end (< 5%);
- leaked KV blocks after the run (the block audit of `bench.chaos.audit`; 0);
- p99 TTFT of the requests sent in the last window vs the first (within 20%); a window is
  5 minutes, or a quarter of the run when that is shorter.
"""
from __future__ import annotations

import asyncio
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import psutil

from bench.chaos.audit import audit_blocks
from bench.chaos.cluster import ChaosCluster, ClusterPlan
from bench.chaos.load import LoadClient
from bench.chaos.report import Audit, Outcome

TRACE = Path(__file__).resolve().parents[2].parent / "shared" / "traces" / "conversation_trace.jsonl"
RSS_GROWTH_LIMIT = 0.05
TTFT_DRIFT_LIMIT = 0.20


@dataclass(frozen=True, slots=True)
class SoakPlan:
    minutes: float = 30.0
    rate: float = 0.35
    trace: Path = TRACE
    rss_every_s: float = 10.0
    timeout_s: float = 300.0
    audit_grace_s: float = 30.0


@dataclass
class SoakResult:
    duration_s: float
    window_s: float
    offered_rate: float
    requests: int
    completed: int
    failed: int
    hung: int
    rss_start: dict[str, int]  # at the end of the warm-up window, bytes
    rss_end: dict[str, int]
    rss_growth: dict[str, float]
    leaked_blocks: int | None
    ttft_p99_first_s: float | None
    ttft_p99_last_s: float | None
    ttft_drift: float | None  # last / first - 1
    errors: dict[str, int] = field(default_factory=dict)

    def verdicts(self) -> dict[str, bool]:
        return {
            "rss_growth_below_5pct": bool(self.rss_growth) and max(self.rss_growth.values()) < RSS_GROWTH_LIMIT,
            "no_leaked_blocks": self.leaked_blocks == 0,
            "ttft_p99_within_20pct": self.ttft_drift is not None and abs(self.ttft_drift) <= TTFT_DRIFT_LIMIT,
            "nothing_failed_or_hung": self.failed == 0 and self.hung == 0,
        }


def trace_requests(plan: SoakPlan):
    """The scaled trace window that offers `plan.rate` req/s for `plan.minutes`."""
    from bench.replay.tokens import TokenMapper
    from bench.replay.trace import load_trace
    from bench.replay.workload import ScaleConfig, TraceWindow, build_workload, select_window

    records = load_trace(plan.trace)
    span_s = (records[-1].timestamp_ms - records[0].timestamp_ms) / 1000.0
    speedup = plan.rate / (len(records) / span_s)
    for _ in range(3):  # the trace's start is not as busy as its average: match the window's own rate
        window = select_window(records, TraceWindow(0.0, plan.minutes * 60.0 * speedup))
        speedup = plan.rate / (len(window.records) / (window.length_s or span_s))
    window = select_window(records, TraceWindow(0.0, plan.minutes * 60.0 * speedup))
    scale = ScaleConfig(block_tokens=16, output_scale=0.1, max_output_tokens=64, max_input_tokens=1024,
                        speedup=speedup, spread_ms=3000.0)
    return build_workload(window, scale, TokenMapper(16), id_prefix="soak")


def p99(xs: list[float]) -> float | None:
    return float(np.percentile(xs, 99)) if xs else None


def summarize(outcomes: list[Outcome], t0: float, duration_s: float, rss: dict[str, list[tuple[float, int]]],
              audit: Audit | None, offered_rate: float) -> SoakResult:
    window = min(300.0, duration_s / 4)
    first = [o.ttft_s for o in outcomes if o.ttft_s is not None and o.sent_s - t0 < window]
    last = [o.ttft_s for o in outcomes if o.ttft_s is not None and o.sent_s - t0 >= duration_s - window]
    f, l_ = p99(first), p99(last)
    start = {name: _at(series, t0 + window) for name, series in rss.items() if series}
    end = {name: series[-1][1] for name, series in rss.items() if series}
    growth = {name: end[name] / start[name] - 1 for name in end if start.get(name)}
    errors: dict[str, int] = {}
    for o in outcomes:
        if o.status != "completed":
            errors[o.error[:100]] = errors.get(o.error[:100], 0) + 1
    return SoakResult(
        duration_s=duration_s, window_s=window, offered_rate=offered_rate, requests=len(outcomes),
        completed=sum(o.status == "completed" for o in outcomes),
        failed=sum(o.status in ("failed_clean", "failed_unclean") for o in outcomes),
        hung=sum(o.status == "hung" for o in outcomes), rss_start=start, rss_end=end, rss_growth=growth,
        leaked_blocks=None if audit is None or audit.unreachable else audit.leaked,
        ttft_p99_first_s=f, ttft_p99_last_s=l_, ttft_drift=None if not f or l_ is None else l_ / f - 1,
        errors=dict(sorted(errors.items(), key=lambda kv: -kv[1])[:5]))


def _at(series: list[tuple[float, int]], t: float) -> int:
    """The first sample taken at or after `t` (the last one if none is)."""
    return next((v for at, v in series if at >= t), series[-1][1])


async def _sample_rss(pids: dict[str, int], every_s: float, out: dict[str, list[tuple[float, int]]],
                      stop: asyncio.Event) -> None:
    procs = {name: psutil.Process(pid) for name, pid in pids.items()}
    while not stop.is_set():
        now = time.monotonic()
        for name, p in procs.items():
            try:
                out.setdefault(name, []).append((now, p.memory_info().rss))
            except psutil.Error:
                pass
        try:
            await asyncio.wait_for(stop.wait(), every_s)
        except TimeoutError:
            pass


async def _replay(cluster: ChaosCluster, plan: SoakPlan, workload, log) -> tuple[list[Outcome], float, dict]:
    client = LoadClient(cluster.grpc_address, None, plan.timeout_s)
    rss: dict[str, list[tuple[float, int]]] = {}
    stop = asyncio.Event()
    sampler = asyncio.ensure_future(_sample_rss(cluster.pids(), plan.rss_every_s, rss, stop))
    t0 = time.monotonic()
    tasks = []
    try:
        for k, req in enumerate(workload.requests):
            await asyncio.sleep(max(0.0, t0 + req.send_offset_s - time.monotonic()))
            tasks.append(asyncio.ensure_future(client.one(k, req.prompt_token_ids, req.max_tokens, "grpc")))
            if k and k % 50 == 0:
                done = [t.result() for t in tasks if t.done()]
                log(f"[soak] {time.monotonic() - t0:.0f}s: {k} sent, {sum(o.status == 'completed' for o in done)} "
                    f"completed, {sum(o.status != 'completed' for o in done)} not")
        outcomes = list(await asyncio.gather(*tasks))
    finally:
        stop.set()
        await sampler
        await client.close()
    return outcomes, t0, rss


def run_soak(plan: SoakPlan, cluster_plan: ClusterPlan, log=print) -> SoakResult:
    workload = trace_requests(plan)
    n = len(workload.requests)
    duration = max(r.send_offset_s for r in workload.requests)
    log(f"[soak] {n} trace requests over {duration / 60:.1f} min ({n / max(duration, 1e-9):.2f} req/s offered); "
        f"starting {cluster_plan.prefill}P+{cluster_plan.decode}D")
    with ChaosCluster(cluster_plan) as cluster:
        outcomes, t0, rss = asyncio.run(_replay(cluster, plan, workload, log))
        audit = audit_blocks(cluster.metrics, plan.audit_grace_s)
    return summarize(outcomes, t0, math.ceil(duration), rss, audit, n / max(duration, 1e-9))


def render(result: SoakResult) -> str:
    lines = [f"soak: {result.requests} requests over {result.duration_s / 60:.1f} min at "
             f"{result.offered_rate:.2f} req/s: {result.completed} completed, {result.failed} failed, "
             f"{result.hung} hung; windows of {result.window_s:.0f}s",
             f"{'process':12s} {'RSS after warm-up':>18s} {'RSS at end':>12s} {'growth':>8s}"]
    for name in sorted(result.rss_end):
        lines.append(f"{name:12s} {result.rss_start.get(name, 0) / 2**20:15.0f} MiB {result.rss_end[name] / 2**20:8.0f} "
                     f"MiB {result.rss_growth.get(name, float('nan')) * 100:7.1f}%")
    fmt = (lambda x: "-" if x is None else f"{x:.2f}s")
    lines.append(f"leaked blocks {result.leaked_blocks}; p99 TTFT first window {fmt(result.ttft_p99_first_s)}, "
                 f"last {fmt(result.ttft_p99_last_s)}"
                 + ("" if result.ttft_drift is None else f" ({result.ttft_drift * 100:+.0f}%)"))
    lines += [f"  {'PASS' if ok else 'FAIL'} {name}" for name, ok in result.verdicts().items()]
    lines += [f"  {n} x {e}" for e, n in result.errors.items()]
    return "\n".join(lines)


def to_json(result: SoakResult) -> dict:
    return asdict(result) | {"verdicts": result.verdicts()}
