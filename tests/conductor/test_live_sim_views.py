"""The live conductor and the simulator are adapters of one cluster state: fed the same
event sequence, their views are equal field by field.

The simulator (`bench.sim`) runs a small trace on 2P+2D and every call it makes to its
`ClusterState` is recorded, with the view it left. Then the real `LiveConductor` and
`NodeRegistry` (in-process fake node stubs, no processes, a pinned clock) live through the
same events, each one the way a live cluster produces it: a client request (the live
conductor decides, dispatches, reserves and starts the prefill), a KV event on the prefill
node's event stream, a Prefill answer, the first and the last token of a Decode stream, a
node's heartbeat. After each one the two views, the requests each state counts, the global
prefix index and the queued prefixes must be the same (request ids mapped: the live
conductor names requests itself), and every live decision must be the simulator's.

The fake decode node reserves what the simulated one does: prompt + answer. Live prefill
nodes number KV events from 1 (a subscription begins with a snapshot at 0), the simulated
ones from 0: the events and heartbeats carry the node's number, one more than the sim's.
"""
from __future__ import annotations

import asyncio
import inspect
import time
from collections import defaultdict
from dataclasses import asdict, replace

import pytest

from bench.sim.cluster import SimConfig, Simulation, SimRequest
from conductor.frontend_api import Finished, GenerateRequest
from conductor.live import LiveConductor, LiveConfig, cpu_default_costs
from conductor.modes import PolicyName
from conductor.registry import NodeRecord, NodeRegistry
from conductor.request import NodeId
from conductor.scheduler import Scheduler
from conductor.settings import ConductorSettings
from engine.block_pool import block_hashes
from engine.sampling import SamplingParams
from engine.tokenizer import Tokenizer
from proto.convert import kv_event_to_proto
from proto.halfmoon.v1 import common_pb2, node_pb2

BLOCK, OUT, TOTAL_BLOCKS = 16, 16, 1024
EVENTS = ("dispatched", "reserved", "prefill_started", "prefill_done", "decode_joined", "finished",
          "heartbeat_prefill", "heartbeat_decode", "kv_event")


def prompts() -> list[list[int]]:
    """Six prompts of 128 tokens: three share a 64-token system prefix, two another; one alone."""
    sys_a, sys_b = list(range(1000, 1064)), list(range(2000, 2064))
    tail = lambda k: list(range(5000 + 64 * k, 5064 + 64 * k))  # noqa: E731
    return [sys_a + tail(0), sys_b + tail(1), sys_a + tail(2), sys_a + tail(3), sys_b + tail(4), tail(5) + tail(6)]


ARRIVALS = (0.0, 0.1, 0.3, 0.35, 1.0, 2.5)


# --- the simulator's side: record every call into its cluster state -----------------------------
def run_sim(policy: str) -> tuple[list[tuple], SimConfig]:
    config = SimConfig(prefill_nodes=2, decode_nodes=2, policy=PolicyName(policy), block_tokens=BLOCK,
                       cache_blocks=1000, decode_kv_tokens=TOTAL_BLOCKS * BLOCK, ttft_slo_s=60, tbt_slo_s=5,
                       heartbeat_interval_s=0.25)
    reqs = [SimRequest(i, t, len(p), OUT, tuple(block_hashes(p, BLOCK))) for i, (t, p) in
            enumerate(zip(ARRIVALS, prompts()))]
    sim = Simulation(reqs, config, cpu_default_costs())
    calls: list[tuple] = []
    for name in EVENTS:
        orig = getattr(sim.state, name)

        def recorded(*args, _name=name, _orig=orig, **kwargs):
            out = _orig(*args, **kwargs)
            named = inspect.signature(_orig).bind(*args, **kwargs).arguments  # by name, however it was passed
            calls.append((_name, sim.now, args, named, snapshot(sim.state, lambda rid: rid)))
            return out

        setattr(sim.state, name, recorded)
    run = sim.run()
    assert all(st.outcome.value == "completed" for st in run.states)
    return calls, config


def snapshot(state, name_of) -> dict:
    """Everything the policies read, with request ids through `name_of`."""
    view = state.view

    def decode(d):
        v = asdict(d)
        v["residents"] = {name_of(k): {**r, "request_id": name_of(r["request_id"])} for k, r in v["residents"].items()}
        return v

    tracked = {}
    for rid in list(state._requests):
        t = asdict(state.request(rid))
        t["request_id"] = name_of(rid)
        tracked[name_of(rid)] = t
    pending = {n: dict(c) for n, c in state.pending._counts.items() if c}
    return dict(prefill=[asdict(p) for p in view.prefill], decode=[decode(d) for d in view.decode],
                index=state.index.snapshot(), pending=pending, requests=tracked)


# --- the live side: fake nodes the test drives ---------------------------------------------------
class FakeNode:
    """A prefill or decode node whose answers wait for the test (`open`)."""

    def __init__(self, node_id: str, reserved: list) -> None:
        self.node_id = node_id
        self.gates: dict = defaultdict(asyncio.Event)
        self.seen: list[tuple[str, str]] = []
        self.events: asyncio.Queue = asyncio.Queue()
        self.reserved = reserved  # every Reserve, cluster-wide, in order

    def open(self, kind: str, rid: str) -> None:
        self.gates[(kind, rid)].set()

    async def Prefill(self, req, timeout=None):
        self.seen.append(("prefill", req.request_id))
        await self.gates[("prefill", req.request_id)].wait()
        return node_pb2.PrefillResponse(first_token=7, num_cached_tokens=0)

    async def _kv_events(self):
        yield node_pb2.KVEvent(seq=0, kind=node_pb2.KV_EVENT_CLEARED)  # the subscription's snapshot: empty
        yield node_pb2.KVEvent(seq=0, kind=node_pb2.KV_EVENT_STORED)
        while True:
            yield await self.events.get()

    def KVEvents(self, req, timeout=None):
        return self._kv_events()

    async def Reserve(self, req, timeout=None):
        self.seen.append(("reserve", req.request_id))
        self.reserved.append(req.request_id)
        n = -(-(req.num_tokens + OUT) // BLOCK)  # prompt + answer, as the simulated decode node
        return node_pb2.ReserveResponse(target=node_pb2.KVTarget(node_id=self.node_id, block_ids=list(range(n))))

    async def Renew(self, req, timeout=None):
        return node_pb2.RenewResponse(found=True)

    async def Release(self, req, timeout=None):
        return node_pb2.ReleaseResponse(found=True)

    def Decode(self, req, timeout=None):
        self.seen.append(("decode", req.request_id))
        return FakeStream(self, req)


class FakeStream:
    def __init__(self, node: FakeNode, req) -> None:
        self.node, self.req, self.sent = node, req, 0

    def __aiter__(self):
        return self

    async def __anext__(self):
        rid = self.req.request_id
        self.sent += 1
        if self.sent == 1:
            await self.node.gates[("join", rid)].wait()
            return node_pb2.DecodeOutput(delta=common_pb2.TokenDelta(text="a", token_ids=[self.req.first_token]))
        if self.sent == 2:
            await self.node.gates[("finish", rid)].wait()
            return node_pb2.DecodeOutput(delta=common_pb2.TokenDelta(text="b", token_ids=[8] * (OUT - 1)),
                                         finished=True, finish_reason="length", completion_tokens=OUT)
        raise StopAsyncIteration

    def cancel(self):
        pass


async def until(cond, what: str) -> None:
    deadline = time.monotonic() + 10.0
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"the live conductor never reached: {what}")
        await asyncio.sleep(0.001)


@pytest.fixture(scope="module")
def tokenizer(real_model_dir):
    return Tokenizer(real_model_dir)


@pytest.mark.parametrize("policy", [PolicyName.COST_AWARE.value, PolicyName.KV_CENTRIC.value])
def test_live_conductor_and_simulator_keep_equal_views(tokenizer, policy):
    calls, config = run_sim(policy)
    kinds = {c[0] for c in calls}
    assert {"dispatched", "prefill_done", "decode_joined", "finished", "heartbeat_prefill", "heartbeat_decode",
            "kv_event"} <= kinds  # the trace exercises every event

    async def live_side() -> int:
        now = [0.0]
        reserved: list[str] = []
        reg = NodeRegistry(block_size=BLOCK, heartbeat_lag_s=0.0)
        fakes: dict[str, FakeNode] = {}
        layout = node_pb2.KVLayout(block_size=BLOCK, block_bytes=46080 * BLOCK, total_blocks=TOTAL_BLOCKS)
        for node_id, role in (("p0", "prefill"), ("p1", "prefill"), ("d0", "decode"), ("d1", "decode")):
            fake = fakes[node_id] = FakeNode(node_id, reserved)
            reg.add(NodeRecord(node_id, role, "fake", layout, "", None, fake if role == "prefill" else None,
                               fake if role == "decode" else None))
        live = LiveConductor(LiveConfig("m", 2048, BLOCK), tokenizer,
                             Scheduler(ConductorSettings(config.settings()), cpu_default_costs()), reg,
                             clock=lambda: now[0])
        for p in ("p0", "p1"):
            await until(lambda p=p: reg.index.next_seq(NodeId(p)) == 1, f"{p}'s KV event snapshot")
        sim_of: dict[str, str] = {}  # live request id -> the simulator's
        live_of: dict[str, str] = {}
        tasks: dict[str, asyncio.Task] = {}
        sim_decisions: dict[str, object] = {}
        texts = prompts()
        compared = 0

        async def collect(ids):
            req = GenerateRequest("", SamplingParams(max_tokens=OUT, ignore_eos=True), prompt_token_ids=tuple(ids))
            return [x async for x in live.generate(req)]

        for name, t, args, kwargs, expected in calls:
            now[0] = t
            if name == "dispatched":
                info, decision = args[0], args[1]
                sim_decisions[info.request_id] = decision
                n = len(reserved)
                tasks[info.request_id] = asyncio.create_task(collect(texts[int(info.request_id)]))
                await until(lambda: len(reserved) > n, f"request {info.request_id} reserved")
                lrid = reserved[n]
                sim_of[lrid], live_of[info.request_id] = info.request_id, lrid
                pre = fakes[decision.prefill.node]
                await until(lambda: ("prefill", lrid) in pre.seen, f"request {info.request_id} prefilling")
                assert live.decisions[-1] == replace(decision, request_id=lrid)
                continue  # compared after prefill_started: the live conductor reserves and starts it at once
            if name == "reserved":
                continue
            if name == "prefill_started":
                pass
            elif name == "kv_event":
                ev = args[0]
                fakes[ev.node].events.put_nowait(kv_event_to_proto(replace(ev, seq=ev.seq + 1)))
                await until(lambda: reg.index.next_seq(ev.node) == ev.seq + 2, f"KV event {ev.seq} of {ev.node}")
            elif name == "prefill_done":
                lrid = live_of[args[0]]
                fakes[sim_decisions[args[0]].prefill.node].open("prefill", lrid)
                dec = fakes[sim_decisions[args[0]].decode.node]
                await until(lambda: ("decode", lrid) in dec.seen, f"request {args[0]} sent to decode")
            elif name == "decode_joined":
                lrid = live_of[args[0]]
                fakes[sim_decisions[args[0]].decode.node].open("join", lrid)
                await until(lambda: reg.state.request(lrid).phase.value == "decoding", f"request {args[0]} joined")
            elif name == "finished":
                fakes[sim_decisions[args[0]].decode.node].open("finish", live_of[args[0]])
                task = tasks[args[0]]
                await until(task.done, f"request {args[0]} finished")
                items = task.result()
                assert isinstance(items[-1], Finished) and items[-1].usage.completion_tokens == OUT
            elif name == "heartbeat_prefill":
                node, queued = args[0], args[1]
                seq = kwargs["kv_event_seq"] + 1
                assert reg.heartbeat(node_pb2.HeartbeatRequest(node_id=node, load=node_pb2.NodeLoad(
                    queued_prefill_tokens=queued, kv_event_seq=seq)))
            elif name == "heartbeat_decode":
                used = kwargs["used_tokens"]
                assert used % BLOCK == 0
                assert reg.heartbeat(node_pb2.HeartbeatRequest(node_id=args[0], load=node_pb2.NodeLoad(
                    running=kwargs["running"], waiting=kwargs["waiting"], tokens_in_flight=kwargs["tokens_in_flight"],
                    free_blocks=TOTAL_BLOCKS - used // BLOCK)))
            got = snapshot(reg.state, lambda rid: sim_of[rid])
            assert got == expected, f"views differ after {name}{args[:1]} at t={t}"
            compared += 1
        assert len(reg.state) == 0 and all(t.done() for t in tasks.values())
        await reg.close()
        return compared

    compared = asyncio.run(live_side())
    assert compared >= 40
