"""The chaos scenarios. Each runs on a fresh cluster (so a leak or a wedged process in one
cannot colour the next), under the steady load of `bench.chaos.load`, and ends with the
block audit of every surviving node.

| scenario | fault |
|---|---|
| baseline | none: the reference answers every other scenario is compared with |
| kill-decode / kill-prefill | SIGKILL of one node under load; respawned (same id) once out of rotation |
| kill-conductor | SIGKILL of the conductor; respawned on the same ports after `conductor_down_s` |
| stop-decode / stop-prefill / stop-conductor | SIGSTOP for `stop_s`, then SIGCONT |
| transfer-fail / transfer-delay | every node's transfer engine fails / delays 10% of its batches |
| overload-3x | an open-loop burst at 3x the rate the cluster just completed, admission on |
| fuzz | `bench.fuzz` across both APIs while /health is polled, then a canary load |

A fault scenario warms up (`2 x concurrency` requests sent), applies the fault, waits for
it to be detected and repaired, keeps the load going `tail_s` more seconds, then stops
sending and waits for what is in flight. Clients back off `backoff_s` after a failure, as
a real client would, so an outage does not burn through the load in a second.
"""
from __future__ import annotations

import asyncio
import signal
import time
import traceback
from dataclasses import dataclass, field, replace
from typing import Awaitable, Callable

from bench.chaos.audit import audit_blocks
from bench.chaos.cluster import CONDUCTOR, ChaosCluster, ClusterPlan, RotationWatch, in_rotation, out_of_rotation
from bench.chaos.load import ClosedLoop, LoadClient, LoadPlan, make_prompts, open_loop
from bench.chaos.report import Audit, Outcome, Row, summarize
from transfer_engine.faults import ENV_VAR as FAULTS_ENV


@dataclass(frozen=True, slots=True)
class Options:
    cluster: ClusterPlan = field(default_factory=ClusterPlan)
    load: LoadPlan = field(default_factory=LoadPlan)
    stop_s: float = 8.0  # how long SIGSTOP lasts (above the conductor's 5-s heartbeat timeout)
    conductor_down_s: float = 2.0  # a killed conductor stays dead this long
    tail_s: float = 15.0  # load kept after the fault is over
    backoff_s: float = 0.5  # a client's pause after a failed request
    audit_grace_s: float = 30.0
    detect_timeout_s: float = 30.0
    recover_timeout_s: float = 240.0
    transfer_fail: str = "fail=0.1,seed=7"
    transfer_delay: str = "delay=0.1:0.2,seed=7"
    overload_x: float = 3.0
    burst_s: float = 20.0
    overload_settings: dict = field(default_factory=lambda: {"ttft_slo_s": 15.0, "tbt_slo_s": 1.0})
    fuzz_count: int = 5000
    fuzz_seed: int = 0
    fuzz_concurrency: int = 8


@dataclass
class SuiteState:
    prompts: list[tuple[int, ...]]
    reference: dict[int, tuple[int, ...]] | None = None  # baseline answers by prompt index


@dataclass
class Result:
    """What a scenario's body hands back for the audit and the row."""

    outcomes: list[Outcome]
    fault_at: float | None = None
    detect_s: float | None = None
    recover_s: float | None = None
    lost: tuple[str, ...] = ()  # nodes that are not back: left out of the audit
    notes: str = ""
    extra: dict = field(default_factory=dict)  # goes to the row's `details`


Body = Callable[[ChaosCluster, Options, SuiteState], Awaitable[Result]]


@dataclass(frozen=True, slots=True)
class Scenario:
    name: str
    body: Body
    plan: Callable[[Options], ClusterPlan] = lambda o: o.cluster


# --- scenario bodies ---------------------------------------------------------------------

def _client(cluster: ChaosCluster, opts: Options) -> LoadClient:
    return LoadClient(cluster.grpc_address, cluster.http_address, opts.load.timeout_s)


def _loop(client: LoadClient, opts: Options, state: SuiteState, count: int | None = None) -> ClosedLoop:
    return ClosedLoop(client, opts.load, state.prompts, count=count or 10**9, backoff_s=opts.backoff_s)


async def baseline(cluster: ChaosCluster, opts: Options, state: SuiteState) -> Result:
    client = _client(cluster, opts)
    try:
        outcomes = await _loop(client, opts, state, opts.load.requests).run()
    finally:
        await client.close()
    return Result(outcomes)


async def _under_load(cluster: ChaosCluster, opts: Options, state: SuiteState,
                      fault: Callable[[RotationWatch], Awaitable[Result]]) -> Result:
    """Warm up, run `fault` (it fills detect/recover/lost), keep the load `tail_s`, drain."""
    client = _client(cluster, opts)
    stop = asyncio.Event()
    try:
        async with RotationWatch(cluster.grpc_address) as watch:
            loop = _loop(client, opts, state)
            task = asyncio.ensure_future(loop.run(stop))
            await loop.wait_sent(2 * opts.load.concurrency)
            try:
                result = await fault(watch)
                await asyncio.sleep(opts.tail_s)
            finally:
                stop.set()
            result.outcomes = await task
    finally:
        await client.close()
    return result


def kill_node(victim: str) -> Body:
    async def body(cluster: ChaosCluster, opts: Options, state: SuiteState) -> Result:
        async def fault(watch: RotationWatch) -> Result:
            at = time.monotonic()
            cluster.signal(victim, signal.SIGKILL)
            detect = await watch.wait(at, out_of_rotation(victim), opts.detect_timeout_s)
            cluster.respawn(victim)
            back = time.monotonic()
            recover = await watch.wait(back, in_rotation(victim), opts.recover_timeout_s)
            return Result([], at, detect, recover, lost=() if recover is not None else (victim,),
                          notes=f"SIGKILL {victim}, respawned after {back - at:.1f}s")
        return await _under_load(cluster, opts, state, fault)
    return body


def stop_node(victim: str) -> Body:
    async def body(cluster: ChaosCluster, opts: Options, state: SuiteState) -> Result:
        async def fault(watch: RotationWatch) -> Result:
            at = time.monotonic()
            cluster.signal(victim, signal.SIGSTOP)
            try:
                detect = await watch.wait(at, out_of_rotation(victim), opts.stop_s)
                await asyncio.sleep(max(0.0, at + opts.stop_s - time.monotonic()))
            finally:
                cluster.signal(victim, signal.SIGCONT)
            cont = time.monotonic()
            recover = await watch.wait(cont, in_rotation(victim), opts.recover_timeout_s)
            return Result([], at, detect, recover, notes=f"SIGSTOP {victim} for {opts.stop_s:g}s"
                          + ("" if detect is not None else ", never taken out of rotation"))
        return await _under_load(cluster, opts, state, fault)
    return body


async def kill_conductor(cluster: ChaosCluster, opts: Options, state: SuiteState) -> Result:
    async def fault(watch: RotationWatch) -> Result:
        at = time.monotonic()
        cluster.signal(CONDUCTOR, signal.SIGKILL)
        await asyncio.sleep(opts.conductor_down_s)
        cluster.respawn(CONDUCTOR)
        back = time.monotonic()
        recover = await watch.wait(back, in_rotation(*cluster.node_ids), opts.recover_timeout_s)
        return Result([], at, None, recover, notes=f"SIGKILL conductor, respawned after {opts.conductor_down_s:g}s"
                      + ("" if recover is not None else ", nodes never all re-registered"))
    return await _under_load(cluster, opts, state, fault)


async def stop_conductor(cluster: ChaosCluster, opts: Options, state: SuiteState) -> Result:
    async def fault(watch: RotationWatch) -> Result:
        at = time.monotonic()
        cluster.signal(CONDUCTOR, signal.SIGSTOP)
        try:
            await asyncio.sleep(opts.stop_s)
        finally:
            cluster.signal(CONDUCTOR, signal.SIGCONT)
        cont = time.monotonic()
        recover = await watch.wait(cont, in_rotation(*cluster.node_ids), opts.recover_timeout_s)
        return Result([], at, None, recover, notes=f"SIGSTOP conductor for {opts.stop_s:g}s")
    return await _under_load(cluster, opts, state, fault)


async def transfer_faults(cluster: ChaosCluster, opts: Options, state: SuiteState) -> Result:
    client = _client(cluster, opts)
    try:
        at = time.monotonic()
        outcomes = await _loop(client, opts, state, opts.load.requests).run()
    finally:
        await client.close()
    return Result(outcomes, fault_at=at, notes=f"{FAULTS_ENV}={cluster.plan.env[FAULTS_ENV]} in every node")


async def overload(cluster: ChaosCluster, opts: Options, state: SuiteState) -> Result:
    """Measure the completion rate of the steady load, then offer `overload_x` times it."""
    client = _client(cluster, opts)
    try:
        warm = 2 * opts.load.concurrency
        t0 = time.monotonic()
        first = await _loop(client, opts, state, warm).run()
        done = sum(o.status == "completed" for o in first)
        rate = max(done, 1) / (time.monotonic() - t0)
        at = time.monotonic()
        burst = await open_loop(client, opts.load, state.prompts, opts.overload_x * rate, opts.burst_s, start=warm)
    finally:
        await client.close()
    ok = sum(o.status == "completed" for o in burst)
    return Result(first + burst, fault_at=at,
                  notes=f"steady {rate:.2f} req/s, burst {opts.overload_x * rate:.2f} req/s for {opts.burst_s:g}s: "
                        f"{ok}/{len(burst)} completed")


async def fuzz(cluster: ChaosCluster, opts: Options, state: SuiteState) -> Result:
    from bench.fuzz import FuzzConfig, run_fuzz

    report = await run_fuzz(FuzzConfig(cluster.grpc_address, cluster.http_address, count=opts.fuzz_count,
                                       seed=opts.fuzz_seed, concurrency=opts.fuzz_concurrency))
    client = _client(cluster, opts)  # does it still serve? (compared with the baseline's answers)
    try:
        canary = await _loop(client, opts, state, 2 * opts.load.concurrency).run()
    finally:
        await client.close()
    return Result(report.outcomes + canary, fault_at=None, notes=report.summary_line() + (
        f"; canary {sum(o.status == 'completed' for o in canary)}/{len(canary)} completed"),
        extra={"fuzz": report.to_json()})


def _with_faults(spec: str) -> Callable[[Options], ClusterPlan]:
    return lambda o: replace(o.cluster, env={**o.cluster.env, FAULTS_ENV: spec})


SCENARIOS: dict[str, Scenario] = {s.name: s for s in (
    Scenario("baseline", baseline),
    Scenario("kill-decode", kill_node("decode-0")),
    Scenario("kill-prefill", kill_node("prefill-0")),
    Scenario("kill-conductor", kill_conductor),
    Scenario("stop-decode", stop_node("decode-0")),
    Scenario("stop-prefill", stop_node("prefill-0")),
    Scenario("stop-conductor", stop_conductor),
    Scenario("transfer-fail", transfer_faults, lambda o: _with_faults(o.transfer_fail)(o)),
    Scenario("transfer-delay", transfer_faults, lambda o: _with_faults(o.transfer_delay)(o)),
    Scenario("overload-3x", overload, lambda o: replace(o.cluster, settings={**o.cluster.settings,
                                                                             **o.overload_settings})),
    Scenario("fuzz", fuzz),
)}


# --- running one -------------------------------------------------------------------------

def run_scenario(sc: Scenario, opts: Options, state: SuiteState, log: Callable[[str], None] = print, *,
                 make_cluster: Callable[[ClusterPlan], ChaosCluster] = ChaosCluster,
                 audit: Callable[[dict[str, str], float], Audit] = audit_blocks) -> Row:
    """Fresh cluster, body, audit of the survivors, row. A harness or start-up error
    becomes a row saying so, so one broken scenario does not stop the suite."""
    plan = sc.plan(opts)
    log(f"[{sc.name}] starting {plan.prefill}P+{plan.decode}D ({plan.model})")
    t0 = time.monotonic()
    try:
        cluster = make_cluster(plan).start()
    except Exception as e:
        return Row(sc.name, 0, 0, 0, 0, None, None, notes=f"cluster did not start: {type(e).__name__}: {e}")
    try:
        log(f"[{sc.name}] cluster up after {time.monotonic() - t0:.0f}s; running")
        try:
            result = asyncio.run(sc.body(cluster, opts, state))
        except Exception as e:
            log(traceback.format_exc())
            return Row(sc.name, 0, 0, 0, 0, None, None, notes=f"harness error: {type(e).__name__}: {e}")
        try:
            cluster.refresh_metrics()  # a respawned node serves /metrics on a new port
        except Exception:
            pass
        survivors = {n: a for n, a in cluster.metrics.items() if n not in result.lost}
        blocks = audit(survivors, opts.audit_grace_s)
    finally:
        cluster.stop()
    if sc.name == "baseline":
        state.reference = {o.index: o.tokens for o in result.outcomes if o.status == "completed"}
    reference = state.reference if sc.name not in ("baseline", "fuzz") else None
    if sc.name == "fuzz" and state.reference is not None:  # the canary is the comparable part
        reference = state.reference
    row = summarize(sc.name, result.outcomes, blocks, fault_at=result.fault_at, detect_s=result.detect_s,
                    recover_s=result.recover_s, reference=reference, notes=result.notes, details=result.extra)
    log(f"[{sc.name}] done in {time.monotonic() - t0:.0f}s: {row.completed}/{row.requests} completed, "
        f"{row.failed_clean} failed clean, {row.failed_unclean} unclean, {row.hung} hung, "
        f"{row.leaked_blocks} leaked")
    return row


def new_state(opts: Options) -> SuiteState:
    """The prompt pool: as many prompts as the baseline sends, so it answers each once."""
    return SuiteState(make_prompts(opts.load.requests, opts.load))
