"""The live conductor makes the decision the scheduling objects make for the same view.

The conductor runs in-process over fake node stubs (no network): two prefill nodes, one
busy and holding the request's prefix, one idle and empty; two decode nodes.
"""
from __future__ import annotations

import asyncio
import copy
from dataclasses import replace

import pytest

from conductor.frontend_api import Finished, GenerateRequest
from conductor.live import LiveConductor, LiveConfig, cpu_default_costs
from conductor.modes import PolicyName
from conductor.registry import NodeRecord, NodeRegistry
from conductor.request import NodeId
from conductor.scheduler import Scheduler
from conductor.settings import ConductorSettings, SettingsValues
from engine.block_pool import block_hashes
from engine.sampling import SamplingParams
from engine.tokenizer import Tokenizer
from proto.halfmoon.v1 import common_pb2, node_pb2

NOW = 100.0


class FakeCall:
    def __init__(self, outputs):
        self._outputs = list(outputs)
        self.cancelled = False

    def __aiter__(self):
        return self

    async def __anext__(self):
        if not self._outputs:
            raise StopAsyncIteration
        return self._outputs.pop(0)

    def cancel(self):
        self.cancelled = True


class FakePrefill:
    def __init__(self, log, node):
        self.log, self.node = log, node

    async def Prefill(self, req, timeout=None):
        self.log.append(("prefill", self.node, req.request_id))
        return node_pb2.PrefillResponse(first_token=42, num_cached_tokens=0)


class FakeDecode:
    def __init__(self, log, node):
        self.log, self.node = log, node

    async def Reserve(self, req, timeout=None):
        self.log.append(("reserve", self.node, req.request_id))
        n = -(-(req.num_tokens + 1) // 16)
        return node_pb2.ReserveResponse(target=node_pb2.KVTarget(node_id=self.node, block_ids=list(range(n))))

    def Decode(self, req, timeout=None):
        self.log.append(("decode", self.node, req.request_id))
        return FakeCall([node_pb2.DecodeOutput(delta=common_pb2.TokenDelta(text="x", token_ids=[req.first_token]),
                                               finished=True, finish_reason="length", completion_tokens=1)])

    async def Release(self, req, timeout=None):
        self.log.append(("release", self.node, req.request_id))
        return node_pb2.ReleaseResponse(found=True)


def add_node(reg: NodeRegistry, node_id: str, role: str, log) -> NodeRecord:
    layout = node_pb2.KVLayout(block_size=16, block_bytes=46080 * 16, total_blocks=1024)
    rec = NodeRecord(node_id, role, "fake", layout, "", None,
                     FakePrefill(log, node_id) if role == "prefill" else None,
                     FakeDecode(log, node_id) if role == "decode" else None)
    return reg.add(rec, follow_events=False)


@pytest.fixture(scope="module")
def tokenizer(real_model_dir):
    return Tokenizer(real_model_dir)


@pytest.mark.parametrize("policy", [p.value for p in PolicyName])
@pytest.mark.parametrize("busy_s", [0.2, 8.0])
def test_live_decision_equals_the_policy_objects_decision(tokenizer, policy, busy_s):
    log: list = []
    reg = NodeRegistry(block_size=16)
    holder = add_node(reg, "prefill-0", "prefill", log)
    add_node(reg, "prefill-1", "prefill", log)
    add_node(reg, "decode-0", "decode", log)
    busy_dec = add_node(reg, "decode-1", "decode", log)
    busy_dec.decode_view.running, busy_dec.decode_view.tokens_in_flight = 12, 6000
    ids = list(range(1000, 1000 + 640))
    hashes = block_hashes(ids, 16)
    reg.index.store(NodeId("prefill-0"), hashes[:32])  # the first 512 tokens are cached there
    holder.prefill_view.busy_until_s = NOW + busy_s
    holder.prefill_view.queued_requests = 3

    settings = ConductorSettings(SettingsValues(policy=policy, admission="none", ttft_slo_s=60, tbt_slo_s=5))
    live = LiveConductor(LiveConfig("m", 2048, 16), tokenizer, Scheduler(settings, cpu_default_costs()), reg,
                         clock=lambda: NOW)
    from conductor.request import RequestInfo

    info = RequestInfo("r1", len(ids), tuple(hashes), 8)
    expected = Scheduler(ConductorSettings(settings.values), cpu_default_costs()).decide(copy.deepcopy(reg.view),
                                                                                       info, NOW)

    async def run():
        req = GenerateRequest("r1", SamplingParams(max_tokens=8), prompt_token_ids=tuple(ids))
        return [x async for x in live.generate(req)]

    items = asyncio.run(run())
    assert isinstance(items[-1], Finished)
    rid = log[0][2]  # the cluster's own id, on every node RPC; the client's "r1" is only echoed
    assert rid != "r1" and {e[2] for e in log} == {rid}
    assert live.decisions[-1] == replace(expected, request_id=rid)
    assert ("prefill", expected.prefill.node, rid) in log
    assert ("reserve", expected.decode.node, rid) in log and ("decode", expected.decode.node, rid) in log
    if policy == "cache_aware_local":
        # busy for 8 s: recomputing elsewhere wins; busy for 0.2 s: the local cached prefix wins
        assert expected.prefill.node == ("prefill-1" if busy_s == 8.0 else "prefill-0")
    if policy == "kv_centric":
        # pulling 512 tokens of KV from the busy holder beats both waiting and recomputing
        assert (expected.prefill.node, expected.prefill.pull_from) == ("prefill-1", "prefill-0")
    if policy == "longest_prefix":
        assert expected.prefill.node == "prefill-0"
    assert expected.decode.node == "decode-0" or policy in ("random", "round_robin")


# --- a decode reservation outlives a prefill that queues longer than its lease ---
# Found in a trace replay: a burst queued on one prefill node for over a minute, the 60 s
# reservations expired, and Decode then failed with "no reservation". The conductor renews
# the lease while the prefill is pending and stops once Decode claims the blocks.

LEASE_S = 0.3


class SlowPrefill(FakePrefill):
    async def Prefill(self, req, timeout=None):
        await asyncio.sleep(4 * LEASE_S)  # queued behind a burst: longer than the lease
        return await super().Prefill(req, timeout)


class LeasedDecode(FakeDecode):
    """Reservations expire `lease_s` after Reserve or the last Renew, as on a decode node."""

    def __init__(self, log, node):
        super().__init__(log, node)
        self.expires_at: dict[str, float] = {}

    async def Reserve(self, req, timeout=None):
        self.expires_at[req.request_id] = asyncio.get_running_loop().time() + req.lease_s
        return await super().Reserve(req, timeout)

    async def Renew(self, req, timeout=None):
        self.log.append(("renew", self.node, req.request_id))
        live = asyncio.get_running_loop().time() < self.expires_at.get(req.request_id, 0.0)
        if live:
            self.expires_at[req.request_id] = asyncio.get_running_loop().time() + req.lease_s
        return node_pb2.RenewResponse(found=live)

    def Decode(self, req, timeout=None):
        assert asyncio.get_running_loop().time() < self.expires_at.pop(req.request_id), "the lease had expired"
        return super().Decode(req, timeout)


def test_reservation_is_renewed_while_the_prefill_is_pending(tokenizer):
    log: list = []
    reg = NodeRegistry(block_size=16)
    pre = add_node(reg, "prefill-0", "prefill", log)
    dec = add_node(reg, "decode-0", "decode", log)
    pre.prefill_stub = SlowPrefill(log, "prefill-0")
    dec.decode_stub = LeasedDecode(log, "decode-0")
    settings = ConductorSettings(SettingsValues(admission="none", ttft_slo_s=60, tbt_slo_s=5))
    live = LiveConductor(LiveConfig("m", 2048, 16, kv_lease_s=LEASE_S), tokenizer,
                         Scheduler(settings, cpu_default_costs()), reg)

    async def run():
        req = GenerateRequest("r1", SamplingParams(max_tokens=4), prompt_token_ids=tuple(range(100, 164)))
        items = [x async for x in live.generate(req)]
        renews = sum(1 for e in log if e[0] == "renew")
        await asyncio.sleep(2 * LEASE_S)  # after Decode claimed the blocks nothing renews them
        return items, renews

    items, renews = asyncio.run(run())
    assert isinstance(items[-1], Finished)
    assert renews >= 3  # 4 leases of prefill, renewed every third of a lease
    assert sum(1 for e in log if e[0] == "renew") == renews
    kinds = [e[0] for e in log]
    assert kinds.index("decode") > max(i for i, k in enumerate(kinds) if k == "renew")
