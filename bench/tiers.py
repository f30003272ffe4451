"""The KV tiers' gain, live on 1P+1D: the prefill node's device tier is sized below the
working set, and each tier configuration replays the same workloads over a sweep of rates.

    halfmoon bench tiers --json out/tiers.json            # the full sweep (~20 minutes)
    halfmoon bench tiers --json out/tiers.json --quick    # two rates, short windows (~8 minutes)

Runtime is bounded by `--budget-min` (default 20; quick 8): every (tier set, workload, rate)
cell gets the same share of it after a fixed allowance for starting clusters and the
micro-benchmark, three fifths of it as the arrival window (`--window` overrides) and the
rest to drain: a request not done by the cell's deadline is cut and counts as failed (it
missed its SLOs anyway), so an overloaded rate cannot stretch the run. Requests per rate
are rate x window (at least 3, at most `--requests`).

Tier configurations (`--tiers`): `device` (no tiers), `host`, `host+disk`,
`host+disk+store` (a Mooncake master and store keeper started beside the conductor; the
decode node writes every finished turn's prompt + answer KV back to the store). The tiers
are the prefill node's: the decode node runs only the write-back's staging pool, as every
decode node does (`cluster.kv_tiers.role_tiers`). Sizes
(`size_tiers`): the prefill node's device tier holds half the chat's shared system prompts
(its hot set: every conversation starts with one of them; at least the 72 blocks a
1024-token trace prompt needs), so `device` keeps recomputing them; the host pool holds
all of them and about half the whole working set, the disk tier all of it.

Workloads (`--workloads`):
* `trace`: Mooncake's conversation trace through `bench.replay`, scaled as in
  `bench.layouts` (16-token blocks, outputs x0.1 capped at 64, inputs cut at 1024, bursts
  spread over 3 s). Every rate maps the trace's hash ids with a fresh seed, so no run hits
  an earlier run's blocks.
* `chat`: multi-turn conversations, closed loop per conversation: a few long system
  prompts shared by every conversation, each turn's prompt is the whole history (system,
  earlier user turns and the answers the cluster gave) plus a new user message. Its
  repeat fraction (prompt tokens in whole blocks an unbounded cache would hold) is reported.

Rates (`--rates`, default 0.5,1,2,3 req/s): up to where `device` misses its SLOs (it
recomputes most system prompts: ~0.5-1 s of prefill a turn on this CPU) and past it, so the
tiers' gain shows as capacity.

Rows (`--json`): per workload, tiers and rate `{"workload", "tiers", "rate_rps",
"hit_rate", "ttft_p50_s", "ttft_p99_s", "tbt_p99_s", "goodput_rps", ...}`; per workload
and tiers `{"workload", "tiers", "effective_capacity_rps"}` (highest rate with >= 90% of
requests meeting both SLOs); and `{"micro": ...}`: per-tier load bandwidth against a plain
memcpy measured in the same run, and a host-tier block's load time against recomputing
its 16 tokens with the real model. SLOs are `--ttft-x` / `--tbt-x` times the unloaded
TTFT / TBT of a typical request measured on the `device` configuration first, unless given.
Plots go to `--plot-dir` (default docs/results/).
"""
from __future__ import annotations

import argparse
import asyncio
import ctypes
import json
import math
import random
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from bench import flags

TRACE = Path(__file__).resolve().parents[1].parent / "shared" / "traces" / "conversation_trace.jsonl"
TIER_SETS = ("device", "host", "host+disk", "host+disk+store")
BLOCK = 16


@dataclass(frozen=True, slots=True)
class ChatWorkload:
    systems: int = 6  # distinct long system prompts, shared by all conversations (and rates)
    system_tokens: int = 384
    turns: int = 3
    user_tokens: int = 32
    answer_tokens: int = 24
    think_s: float = 1.0  # between an answer and the next turn

    def working_set_blocks(self, conversations: int) -> int:
        per_conv = self.turns * (self.user_tokens + self.answer_tokens)
        return (self.systems * self.system_tokens + conversations * per_conv) // BLOCK


# --- cluster ---------------------------------------------------------------------------
TRACE_PROMPT_BLOCKS = 72  # a 1024-token trace prompt (64 blocks) and room to decode its first token


@dataclass(frozen=True, slots=True)
class Sizes:
    device_blocks: int  # the prefill node's device tier
    host_blocks: int
    disk_blocks: int
    store_gb: float


def size_tiers(wl: ChatWorkload, working_set: int, record: int, device_blocks: int | None = None) -> Sizes:
    """The tiers for a run whose chat working set is `working_set` blocks: the device holds
    half the system prompts (the hot set), the host pool all of them and half the working
    set, the disk tier and the store all of it."""
    hot = wl.systems * wl.system_tokens // BLOCK
    return Sizes(device_blocks=device_blocks or max(TRACE_PROMPT_BLOCKS, hot // 2),
                 host_blocks=max(hot + 16, working_set // 2), disk_blocks=2 * working_set + 512,
                 store_gb=max(0.25, 2 * working_set * record / 2**30))


def tier_config(name: str, sizes: Sizes, record: int, master, disk_dir: Path):
    from engine.tiers import TierConfig

    if name == "device":
        return None
    gib = lambda blocks: blocks * record / (1 << 30)  # noqa: E731
    cfg = TierConfig(host_gib=gib(sizes.host_blocks), disk_dir=str(disk_dir))
    if "disk" in name:
        cfg = replace(cfg, disk_gib=gib(sizes.disk_blocks))
    if "store" in name:
        cfg = replace(cfg, store=True, store_master=master.address, store_metadata=master.metadata_url,
                      store_segment_gib=0.0)
    return cfg


def start_cluster(name: str, sizes: Sizes, record: int, threads: int, work: Path):
    """(cluster, master or None) for tier configuration `name`."""
    from cluster.local import LocalCluster
    from cluster.node_main import NodeSpec
    from cluster.specs import free_port
    from conductor.server import ConductorSpec
    from engine.tiers.mooncake_store import MooncakeMaster

    master = None
    if "store" in name:
        master = MooncakeMaster(free_port(), free_port(), free_port(), keeper_gb=sizes.store_gb,
                                log_path=work / "mooncake_master.log").start()
    spec = ConductorSpec(grpc_port=free_port(), http_port=None, settings={"admission": "none"},
                         heartbeat_interval_s=0.5)
    node = NodeSpec(role="prefill", node_id="", conductor="", num_threads=threads, max_num_batched_tokens=256)
    cluster = LocalCluster.build(1, 1, conductor=spec, node=node)
    nodes = []
    for n in cluster.nodes:
        tiers = tier_config(name, sizes, record, master, work / name / n.node_id)
        if tiers is not None:  # each node runs what its role uses of it (`cluster.kv_tiers.role_tiers`)
            tiers = replace(tiers, write_back_on_finish=tiers.store)
        nodes.append(replace(n, kv_tiers=tiers, num_blocks=sizes.device_blocks if n.role == "prefill" else 1024))
    cluster.nodes = nodes
    try:
        cluster.start()
    except BaseException:
        if master is not None:
            master.stop()
        raise
    return cluster, master


# --- the chat workload (closed loop per conversation) ------------------------------------------
@dataclass
class Record:
    prompt_tokens: int
    repeat_tokens: int  # prompt tokens (whole blocks) an unbounded cache would hold
    outcome: str = "failed"  # completed | rejected | failed
    ttft_s: float | None = None
    gaps: list[float] | None = None
    cached_tokens: int = 0


def chat_systems(wl: ChatWorkload, seed: int = 1) -> list[list[int]]:
    """The workload's long system prompts (the same for every tier set: `seed`)."""
    rng = random.Random(seed)
    return [[rng.randrange(200, 40000) for _ in range(wl.system_tokens)] for _ in range(wl.systems)]


async def run_chat(address: str, wl: ChatWorkload, rate_rps: float, duration_s: float, seed: int,
                   timeout_s: float, deadline_s: float | None = None, systems: list[list[int]] | None = None,
                   seen_systems: set[int] | None = None) -> tuple[list[Record], float]:
    """Conversations arrive (Poisson) at rate_rps / turns for `duration_s` seconds; returns
    every turn's record and the arrival window. At `deadline_s` after the start, requests
    still running are cut (their records stay `failed`) and no turn starts any more.
    `systems` / `seen_systems` carry the system prompts (and which were sent already) from
    one rate to the next, so a sweep's later rates reuse them as a chat service would."""
    import grpc

    from proto.halfmoon.v1 import common_pb2, generate_pb2, generate_pb2_grpc

    rng = random.Random(seed)
    tok = lambda n: [rng.randrange(200, 40000) for _ in range(n)]  # noqa: E731
    if systems is None:
        systems = [tok(wl.system_tokens) for _ in range(wl.systems)]
    if seen_systems is None:
        seen_systems = set()
    records: list[Record] = []
    channel = grpc.aio.insecure_channel(address)
    stub = generate_pb2_grpc.GenerationStub(channel)

    async def one(ids: list[int], repeat: int) -> tuple[Record, list[int]]:
        rec = Record(len(ids), repeat)
        records.append(rec)  # before it runs: a request cut at the deadline stays `failed`
        req = generate_pb2.GenerateRequest(prompt_token_ids=generate_pb2.TokenIds(ids=ids),
                                           sampling=common_pb2.SamplingParams(max_tokens=wl.answer_tokens,
                                                                              temperature=0.0, ignore_eos=True))
        out: list[int] = []
        times: list[float] = []
        t0 = time.perf_counter()
        try:
            async for msg in stub.Generate(req, timeout=timeout_s):
                if msg.HasField("delta") and msg.delta.token_ids:
                    times += [time.perf_counter()] * len(msg.delta.token_ids)
                    out += list(msg.delta.token_ids)
                elif msg.HasField("final"):
                    rec.cached_tokens = msg.final.usage.cached_tokens
            rec.outcome = "completed"
        except grpc.aio.AioRpcError as e:
            rec.outcome = "rejected" if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED else "failed"
        if times:
            rec.ttft_s = times[0] - t0
            rec.gaps = [b - a for a, b in zip(times, times[1:])]
        return rec, out

    async def conversation(k: int, start: float) -> None:
        await asyncio.sleep(start)
        s = pick[k]
        history = list(systems[s])
        known = (wl.system_tokens // BLOCK) * BLOCK if s in seen_systems else 0
        seen_systems.add(s)
        for _ in range(wl.turns):
            ids = history + tok(wl.user_tokens)
            rec, out = await one(ids, known)
            if rec.outcome != "completed":
                return
            history = ids + out
            known = (len(history) - 1) // BLOCK * BLOCK  # computed by this turn: what the next may reuse
            await asyncio.sleep(wl.think_s)

    starts, t = [], rng.expovariate(rate_rps / wl.turns)
    while t < duration_s:
        starts.append(t)
        t += rng.expovariate(rate_rps / wl.turns)
    pick = [rng.randrange(wl.systems) for _ in starts]  # each conversation's system prompt
    tasks = [asyncio.ensure_future(conversation(k, s)) for k, s in enumerate(starts)]
    try:
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=deadline_s)
            for t in late:
                t.cancel()
            await asyncio.gather(*late, return_exceptions=True)
    finally:
        await channel.close()
    return records, duration_s


def chat_row(records: list[Record], window_s: float, slo: tuple[float, float]) -> dict:
    from bench.replay.metrics import mooncake_tbt, percentile

    done = [r for r in records if r.outcome == "completed"]
    met = sum(1 for r in done if r.ttft_s is not None and r.ttft_s <= slo[0]
              and (mooncake_tbt(r.gaps or []) or 0.0) <= slo[1])
    gaps = [g for r in done for g in (r.gaps or [])]
    ttfts = [r.ttft_s for r in done if r.ttft_s is not None]
    prompt = sum(r.prompt_tokens for r in done)
    return {
        "rate_rps": len(records) / window_s,
        "hit_rate": sum(r.cached_tokens for r in done) / prompt if prompt else None,
        "repeat_fraction": sum(r.repeat_tokens for r in done) / prompt if prompt else None,
        "ttft_p50_s": percentile(ttfts, 50) if ttfts else None,
        "ttft_p99_s": percentile(ttfts, 99) if ttfts else None,
        "tbt_p99_s": percentile(gaps, 99) if gaps else None,
        "goodput_rps": met / window_s,
        "slo_attainment": met / len(records) if records else 0.0,
        "requests": len(records), "completed": len(done),
        "rejected": sum(r.outcome == "rejected" for r in records),
        "failed": sum(r.outcome == "failed" for r in records),
    }


# --- the trace workload (bench.replay) ----------------------------------------------------------
def run_trace(address: str, name: str, rates: list[float], plan: "Plan", slo: tuple[float, float],
              out: Path, trace: Path) -> list[dict]:
    """`plan.requests(rate)` of the trace's opening window at each rate (its own rate is
    ~3.4 req/s), each request given until the cell's drain allowance to finish."""
    from bench.replay import main as replay_main

    rows = []
    for i, rate in enumerate(rates):
        n = plan.requests(rate)
        path = out / f"trace-{name}-{i}.json"
        replay_main(["--trace", str(trace), "--target", f"grpc://{address}", "--label", name,
                     "--rates", f"{rate:g}", "--duration", f"{n / 3.4 * 1.5:.1f}", "--max-requests", str(n),
                     "--seed", str(i), "--block-tokens", str(BLOCK), "--output-scale", "0.1",
                     "--max-output-tokens", "64", "--max-input-tokens", "1024", "--spread-ms", "3000",
                     "--request-timeout", f"{plan.request_timeout_s:.1f}", "--ttft-slo", f"{slo[0]:.4f}",
                     "--tbt-slo", f"{slo[1]:.4f}", "--cooldown", f"{COOLDOWN_S:g}", "--json", str(path)])
        rows += _trace_rows(json.loads(path.read_text()))
    return rows


def _trace_rows(doc: dict) -> list[dict]:
    rows = []
    for run in doc["runs"]:
        s = run["summary"]
        rows.append({"rate_rps": s["request_rate"], "hit_rate": s.get("prefix_hit_rate"),
                     "repeat_fraction": s.get("ideal_block_hit_rate"),
                     "ttft_p50_s": (s.get("ttft") or {}).get("p50"), "ttft_p99_s": (s.get("ttft") or {}).get("p99"),
                     "tbt_p99_s": (s.get("tbt_gaps") or {}).get("p99"), "goodput_rps": s.get("goodput"),
                     "slo_attainment": s["slo_attainment"], "requests": s["requests"], "completed": s["completed"],
                     "rejected": s["rejected"], "failed": s["failed"]})
    return rows


COOLDOWN_S = 2.0  # between two cells
START_S = 25.0  # starting a 1P+1D cluster (and a master) and the unloaded-latency probe, per tier set
MICRO_S = 40.0  # the micro-benchmark


@dataclass(frozen=True, slots=True)
class Plan:
    """How a run spends its time budget: each cell's arrival window and drain allowance."""

    window_s: float
    drain_s: float
    max_requests: int

    @property
    def request_timeout_s(self) -> float:
        """Each request's own limit: the drain allowance (one that needs longer has missed its
        TTFT SLO many times over), so the last one sent ends by the cell's deadline."""
        return max(10.0, self.drain_s)

    def requests(self, rate: float) -> int:
        return max(3, min(self.max_requests, round(rate * self.window_s)))

    @classmethod
    def fit(cls, budget_s: float, tier_sets: int, workloads: int, rates: int, *, micro: bool,
            max_requests: int, window_s: float | None = None) -> "Plan":
        cells = max(1, tier_sets * workloads * rates)
        per_cell = (budget_s - tier_sets * START_S - (MICRO_S if micro else 0.0)) / cells - COOLDOWN_S
        per_cell = max(per_cell, 20.0)
        window = window_s if window_s is not None else 0.6 * per_cell
        return cls(window, max(10.0, per_cell - window), max_requests)

    def estimate_s(self, tier_sets: int, workloads: int, rates: int, *, micro: bool) -> float:
        """The longest the run can take (every cell to its deadline)."""
        cells = tier_sets * workloads * rates
        return (tier_sets * START_S + (MICRO_S if micro else 0.0)
                + cells * (self.window_s + self.request_timeout_s + COOLDOWN_S))


def capacity(rows: list[dict]) -> float | None:
    from bench.replay.sweep import SweepPoint, effective_capacity

    return effective_capacity([SweepPoint(0.0, r["rate_rps"], r["slo_attainment"]) for r in rows]).request_rate


# --- unloaded latency and the micro-benchmark --------------------------------------------------
def unloaded(address: str, prompt_tokens: int, output_tokens: int, n: int = 3) -> tuple[float, float]:
    from bench.layouts import unloaded as layouts_unloaded

    return layouts_unloaded(address, prompt_tokens, output_tokens, n)


def micro(model: str, blocks: int, work: Path) -> dict:
    """Per-tier load bandwidth of this machine against memcpy, and a host-tier block's load
    against recomputing its tokens (the real model, in this process). The tiers are timed
    as `halfmoon profile` times them (`bench.profile.measure_tier_loads`: through the tier
    manager's promotion and prefetch paths, checksums checked, disk with a cold page cache)."""
    import torch

    from bench.profile import profile_tiers
    from engine.config import EngineConfig
    from engine.engine import LLMEngine
    from engine.sampling import SamplingParams

    eng = LLMEngine(model, EngineConfig(num_blocks=blocks + 8))
    bb = eng.kv.block_bytes
    out: dict = {"block_bytes": bb, "blocks": blocks}
    rng = torch.Generator().manual_seed(0)
    src = torch.randint(0, 256, (blocks, bb), generator=rng, dtype=torch.uint8)
    dst = src.clone()
    t0 = time.perf_counter()
    for _ in range(3):  # the same bytes as the tiers move, one block at a time, between touched pages
        for i in range(blocks):
            ctypes.memmove(dst[i].data_ptr(), src[i].data_ptr(), bb)
    out["memcpy_gbps"] = 3 * blocks * bb / (time.perf_counter() - t0) / 1e9
    notes: list[str] = []
    timings = {t.tier: t for t in profile_tiers(eng, blocks, work, notes.append)}
    out["host_to_device_gbps"] = timings["host"].bytes_per_s / 1e9
    out["host_block_load_s"] = timings["host"].seconds_per_block
    out["disk_to_host_gbps"] = timings["disk"].bytes_per_s / 1e9
    out["store_backend"] = "mooncake" if "cluster" in timings else "; ".join(notes)
    if "cluster" in timings:
        out["store_to_host_gbps"] = timings["cluster"].bytes_per_s / 1e9
        out["store_blocks_read"] = timings["cluster"].blocks
    # recompute: prefill a long prompt with no cache hit, per 16-token block
    prompt = list(range(1000, 1000 + 32 * BLOCK))
    eng.generate([prompt[:64]], SamplingParams(max_tokens=1))  # warm-up
    eng.pool.reset_prefix_cache()
    t0 = time.perf_counter()
    eng.generate([prompt], SamplingParams(max_tokens=1))
    out["recompute_block_s"] = (time.perf_counter() - t0) / 32
    out["recompute_over_host_load"] = out["recompute_block_s"] / out["host_block_load_s"]
    return out


# --- plots -----------------------------------------------------------------------------------
def plot(rows: list[dict], plot_dir: Path) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    plot_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for wl in sorted({r["workload"] for r in rows if "rate_rps" in r}):
        fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
        for tiers in TIER_SETS:
            pts = sorted((r["rate_rps"], r["goodput_rps"] or 0.0, r["ttft_p50_s"] or math.nan) for r in rows
                         if r.get("workload") == wl and r.get("tiers") == tiers and "rate_rps" in r)
            if pts:
                a.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=tiers)
                b.plot([p[0] for p in pts], [p[2] for p in pts], marker="o", label=tiers)
        a.set(xlabel="offered requests/s", ylabel="goodput (requests/s meeting both SLOs)", title=f"{wl}: goodput")
        b.set(xlabel="offered requests/s", ylabel="TTFT p50 (s)", title=f"{wl}: TTFT p50", yscale="log")
        a.legend()
        fig.tight_layout()
        path = plot_dir / f"tiers_{wl}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


# --- main ----------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="halfmoon bench tiers", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=Path, required=True, help="write the rows here")
    ap.add_argument("--quick", action="store_true", help="two rates, short windows, a smaller chat workload")
    ap.add_argument("--tiers", default=",".join(TIER_SETS))
    ap.add_argument("--workloads", default="chat,trace")
    ap.add_argument("--rates", help="comma-separated request rates (default 0.5,1,2,3 req/s; quick: 0.8,2)")
    ap.add_argument("--requests", type=flags.count(1), help="at most this many requests per rate and workload (default 60; "
                                                 "quick: 16)")
    ap.add_argument("--budget-min", type=flags.positive, help="the whole run's time budget, minutes (default 20; quick 8)")
    ap.add_argument("--window", type=flags.positive, help="arrival window per rate, seconds (default: from the budget)")
    ap.add_argument("--trace", type=Path, default=TRACE)
    ap.add_argument("--threads", type=flags.count(1), default=1, help="torch threads per node")
    ap.add_argument("--device-blocks", type=flags.count(1), help="the prefill node's device tier (default: half the chat's "
                                                        "system prompts, at least 72)")
    ap.add_argument("--ttft-x", type=flags.positive, default=5.0)
    ap.add_argument("--tbt-x", type=flags.positive, default=3.0)
    ap.add_argument("--ttft-slo", type=flags.positive)
    ap.add_argument("--tbt-slo", type=flags.positive)
    ap.add_argument("--skip-micro", action="store_true")
    ap.add_argument("--plot-dir", type=Path, default=Path(__file__).resolve().parents[1] / "docs" / "results")
    args = ap.parse_args(argv)

    from engine.config import ModelConfig
    from engine.loader import resolve_model_dir
    from engine.tiers.record import record_bytes

    model = "smollm2-135m-instruct"
    mc = ModelConfig.from_dir(resolve_model_dir(model, progress=False))
    block_bytes = mc.kv_bytes_per_token(4) * BLOCK
    record = record_bytes(block_bytes, BLOCK)
    wl = ChatWorkload(systems=4, system_tokens=384, turns=3, user_tokens=24, answer_tokens=16, think_s=0.5) \
        if args.quick else ChatWorkload()
    rates = [float(x) for x in args.rates.split(",")] if args.rates else ([0.8, 2.0] if args.quick else
                                                                          [0.5, 1.0, 2.0, 3.0])
    tier_sets = args.tiers.split(",")
    workloads = args.workloads.split(",")
    plan = Plan.fit(60.0 * (args.budget_min or (8.0 if args.quick else 20.0)), len(tier_sets), len(workloads),
                    len(rates), micro=not args.skip_micro, max_requests=args.requests or (16 if args.quick else 60),
                    window_s=args.window)
    # the working set of one tier set's run: the system prompts and every rate's conversations
    ws = wl.working_set_blocks(sum(plan.requests(r) // wl.turns + 1 for r in rates))
    sizes = size_tiers(wl, ws, record, args.device_blocks)
    work = Path(tempfile.mkdtemp(prefix="halfmoon-bench-tiers-"))
    longest = plan.estimate_s(len(tier_sets), len(workloads), len(rates), micro=not args.skip_micro)
    rows: list[dict] = [{"config": {"sizes": asdict(sizes), "chat": asdict(wl), "rates": rates,
                                    "requests_per_rate": {f"{r:g}": plan.requests(r) for r in rates},
                                    "plan": asdict(plan), "longest_s": longest, "quick": args.quick,
                                    "working_set_blocks": ws, "record_bytes": record}}]
    t_start = time.monotonic()
    print(f"chat working set ~{ws} blocks; prefill device {sizes.device_blocks}, host {sizes.host_blocks}, "
          f"disk {sizes.disk_blocks} blocks; rates {rates}; requests per rate "
          f"{[plan.requests(r) for r in rates]} in {plan.window_s:.0f} s windows (+{plan.drain_s:.0f} s to drain); "
          f"at most {longest / 60:.0f} min; work dir {work}", flush=True)
    slo: tuple[float, float] | None = (args.ttft_slo, args.tbt_slo) if args.ttft_slo and args.tbt_slo else None

    def save() -> None:
        rows[0]["config"]["elapsed_s"] = round(time.monotonic() - t_start, 1)
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=1) + "\n")

    if not args.skip_micro:
        m = micro(model, 64, work)
        rows.append({"micro": m})
        print("micro: " + ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in m.items()),
              flush=True)
        save()
    for name in tier_sets:
        if name not in TIER_SETS:
            raise SystemExit(f"--tiers: unknown tier set {name!r}; choose from {', '.join(TIER_SETS)}")
        print(f"== {name}: starting 1P+1D", flush=True)
        cluster, master = start_cluster(name, sizes, record, args.threads, work)
        try:
            if slo is None:
                ttft0, tbt0 = unloaded(cluster.address, wl.system_tokens + wl.user_tokens, wl.answer_tokens)
                slo = (args.ttft_x * ttft0, args.tbt_x * tbt0)
                rows[0]["config"]["slo"] = {"ttft_s": slo[0], "tbt_s": slo[1], "unloaded_ttft_s": ttft0,
                                            "unloaded_tbt_s": tbt0}
                print(f"SLOs: TTFT <= {slo[0]:.2f} s, TBT <= {slo[1] * 1e3:.0f} ms "
                      f"(unloaded {ttft0:.2f} s / {tbt0 * 1e3:.0f} ms)", flush=True)
            systems, seen = chat_systems(wl), set()  # shared by every rate of this tier set
            for workload in workloads:
                if workload == "chat":
                    got = []
                    for i, rate in enumerate(rates):
                        window = plan.requests(rate) / rate
                        recs, window = asyncio.run(run_chat(cluster.address, wl, rate, window, seed=1000 * i + 7,
                                                            timeout_s=plan.request_timeout_s,
                                                            deadline_s=window + plan.request_timeout_s,
                                                            systems=systems, seen_systems=seen))
                        got.append(chat_row(recs, window, slo))
                        time.sleep(COOLDOWN_S)
                elif workload == "trace":
                    got = run_trace(cluster.address, name, rates, plan, slo, work, args.trace)
                else:
                    raise SystemExit(f"--workloads: unknown workload {workload!r} (chat, trace)")
                for r in got:
                    row = {"workload": workload, "tiers": name, **r}
                    rows.append(row)
                    print(f"{workload:6} {name:16} {r['rate_rps']:.2f} req/s: hit {r['hit_rate'] or 0:.0%} "
                          f"(repeat {r.get('repeat_fraction') or 0:.0%}), TTFT p50 {r['ttft_p50_s'] or 0:.2f} s "
                          f"p99 {r['ttft_p99_s'] or 0:.2f} s, TBT p99 {(r['tbt_p99_s'] or 0) * 1e3:.0f} ms, "
                          f"goodput {r['goodput_rps'] or 0:.2f}/s ({r['slo_attainment']:.0%} met)", flush=True)
                cap = capacity(got)
                rows.append({"workload": workload, "tiers": name, "effective_capacity_rps": cap})
                save()
        finally:
            cluster.stop()
            if master is not None:
                master.stop()
    for path in plot(rows, args.plot_dir):
        print(f"wrote {path}")
    save()
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
