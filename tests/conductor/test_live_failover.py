"""Node failures in the live conductor, in-process over scripted fake node stubs.

A failed RPC that says a node cannot be reached takes it out of rotation at once (and a
probe brings it back); a request nothing reached the client of yet is placed again,
invisibly; a decode node that fails mid-stream has the request resumed on another decode
node with the tokens streamed so far, the client's stream unbroken. The fake "model" makes
each token a function of the whole sequence, so a continuation equals the undisturbed run
only if the resumed tokens were handed over exactly.
"""
from __future__ import annotations

import asyncio

import grpc
import pytest
from prometheus_client import CollectorRegistry

from conductor.metrics import ConductorMetrics
from conductor.frontend_api import Finished, GenerateRequest, RequestFailed, TokenChunk
from conductor.live import LiveConductor, LiveConfig, cpu_default_costs
from conductor.registry import NodeRecord, NodeRegistry
from conductor.scheduler import Scheduler
from conductor.settings import ConductorSettings, SettingsValues
from engine.sampling import SamplingParams
from engine.tokenizer import Tokenizer
from proto.halfmoon.v1 import common_pb2, node_pb2

PROMPT = tuple(range(100, 164))
MAX_TOKENS = 20


def next_token(seq: list[int]) -> int:
    return (seq[-1] * 31 + len(seq)) % 997


def undisturbed(prompt=PROMPT, n=MAX_TOKENS) -> list[int]:
    seq = list(prompt)
    for _ in range(n):
        seq.append(next_token(seq))
    return seq[len(prompt):]


def rpc_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


class Stream:
    def __init__(self, outputs, error=None):
        self._outputs, self._error = list(outputs), error
        self.cancelled = False

    def __aiter__(self):
        return self

    async def __anext__(self):
        await asyncio.sleep(0)
        if self._outputs:
            return self._outputs.pop(0)
        if self._error is not None:
            raise self._error
        raise StopAsyncIteration

    def cancel(self):
        self.cancelled = True


class Silent:
    def __aiter__(self):
        return self

    async def __anext__(self):
        await asyncio.Event().wait()


class FakeNode:
    """Both node stubs, scripted: `dead` makes every call UNAVAILABLE; `reserve_error` /
    `prefill_error` fail those once; `die_after` streams that many tokens, then dies."""

    def __init__(self, name: str, log: list):
        self.name, self.log = name, log
        self.dead = False
        self.reserve_error: grpc.aio.AioRpcError | None = None
        self.prefill_error: grpc.aio.AioRpcError | None = None
        self.decode_error: grpc.aio.AioRpcError | None = None
        self.die_after: int | None = None
        self.decodes: list[node_pb2.DecodeRequest] = []
        self.reserved: set[str] = set()

    def _check(self):
        if self.dead:
            raise rpc_error(grpc.StatusCode.UNAVAILABLE, "failed to connect to all addresses; connection refused")

    async def Reserve(self, req, timeout=None):
        self.log.append(("reserve", self.name))
        self._check()
        if self.reserve_error is not None:
            e, self.reserve_error = self.reserve_error, None
            raise e
        if req.request_id in self.reserved:  # as a decode node refuses it
            raise rpc_error(grpc.StatusCode.ALREADY_EXISTS, f"request_id: {req.request_id!r} already holds a reservation")
        self.reserved.add(req.request_id)
        return node_pb2.ReserveResponse(target=node_pb2.KVTarget(node_id=self.name, block_ids=[1, 2, 3, 4, 5]))

    async def Renew(self, req, timeout=None):
        self._check()
        return node_pb2.RenewResponse(found=False)

    async def Release(self, req, timeout=None):
        self.log.append(("release", self.name))
        self._check()
        await asyncio.sleep(0.05)  # on its way over the network while the conductor goes on
        self.reserved.discard(req.request_id)
        return node_pb2.ReleaseResponse(found=True)

    async def Unpin(self, req, timeout=None):
        self._check()
        return node_pb2.UnpinResponse(found=False)

    def KVEvents(self, req, timeout=None):  # subscribed again when the node comes back: no events
        return Silent()

    async def Prefill(self, req, timeout=None):
        self.log.append(("prefill", self.name))
        self._check()
        if self.prefill_error is not None:
            e, self.prefill_error = self.prefill_error, None
            self.dead = e.code() == grpc.StatusCode.UNAVAILABLE  # the connection broke: it was killed
            raise e
        return node_pb2.PrefillResponse(first_token=next_token(list(req.prompt_token_ids)))

    def Decode(self, req, timeout=None):
        self.log.append(("decode", self.name))
        self.decodes.append(req)
        self.reserved.discard(req.request_id)  # claimed
        if self.dead:
            return Stream([], rpc_error(grpc.StatusCode.UNAVAILABLE, "connection refused"))
        seq = list(req.prompt_token_ids) + list(req.resume_token_ids)
        done = len(req.resume_token_ids)
        outputs = []
        if not (req.recompute or req.colocated):  # the prefill node's first token
            seq.append(req.first_token)
            done += 1
            outputs.append(self._output(req.first_token, done, req))
        while done < req.sampling.max_tokens:
            seq.append(next_token(seq))
            done += 1
            outputs.append(self._output(seq[-1], done, req))
        error = self.decode_error
        if self.die_after is not None:
            outputs = outputs[:self.die_after]
            error = rpc_error(grpc.StatusCode.UNAVAILABLE, "Socket closed")
            self.die_after = None
            self.dead = True
        return Stream(outputs, error)

    def _output(self, tok, done, req):
        last = done == req.sampling.max_tokens
        return node_pb2.DecodeOutput(delta=common_pb2.TokenDelta(text=f"t{tok} ", token_ids=[tok]), finished=last,
                                     finish_reason="length" if last else "", completion_tokens=done)


class Cluster:
    def __init__(self, tokenizer, num_prefill=2, num_decode=2, **cfg):
        self.log: list = []
        self.reg = NodeRegistry(block_size=16, probe_interval_s=0.05)
        self.changes: list[tuple[str, bool]] = []
        self.reg._on_change = lambda rec, up: self.changes.append((rec.node_id, up))
        self.fakes: dict[str, FakeNode] = {}
        for i in range(num_prefill):
            self._add(f"prefill-{i}", "prefill")
        for i in range(num_decode):
            self._add(f"decode-{i}", "decode")
        self.registry = CollectorRegistry()
        settings = ConductorSettings(SettingsValues(admission="none", policy="least_loaded", ttft_slo_s=60,
                                                    tbt_slo_s=5))
        self.live = LiveConductor(LiveConfig("m", 2048, 16, **cfg), tokenizer, Scheduler(settings, cpu_default_costs()),
                                  self.reg, ConductorMetrics(self.registry))

    def _add(self, node_id: str, role: str) -> NodeRecord:
        fake = self.fakes[node_id] = FakeNode(node_id, self.log)
        layout = node_pb2.KVLayout(block_size=16, block_bytes=46080 * 16, total_blocks=1024)
        rec = NodeRecord(node_id, role, "fake", layout, "", None, fake if role == "prefill" else None,
                         fake if role == "decode" else None)
        return self.reg.add(rec, follow_events=False)

    async def generate(self, max_tokens=MAX_TOKENS):
        req = GenerateRequest("client-7", SamplingParams(max_tokens=max_tokens), prompt_token_ids=PROMPT)
        return [x async for x in self.live.generate(req)]

    def metric(self, name, **labels):
        return self.registry.get_sample_value(name, labels) or 0


@pytest.fixture(scope="module")
def tokenizer(real_model_dir):
    return Tokenizer(real_model_dir)


def tokens_of(items) -> list[int]:
    return [t for x in items if isinstance(x, TokenChunk) for t in x.token_ids]


def test_decode_node_dying_mid_stream_migrates_and_the_stream_is_unbroken(tokenizer):
    c = Cluster(tokenizer)
    c.fakes["decode-0"].die_after = 5
    c.reg.nodes["decode-1"].decode_view.running = 3  # decode-0 is chosen first

    items = asyncio.run(c.generate())
    final = items[-1]
    assert isinstance(final, Finished)
    assert tokens_of(items) == undisturbed()  # no token missing or repeated across the seam
    assert "".join(x.text for x in items if isinstance(x, TokenChunk)) == "".join(f"t{t} " for t in undisturbed())
    assert final.usage.completion_tokens == MAX_TOKENS and final.usage.prompt_tokens == len(PROMPT)
    assert (final.prefill_node, final.decode_node, final.finish_reason) == ("prefill-0", "decode-1", "length")
    (resumed,) = c.fakes["decode-1"].decodes
    assert list(resumed.resume_token_ids) == undisturbed()[:5] and resumed.recompute
    assert list(resumed.prompt_token_ids) == list(PROMPT) and resumed.sampling.max_tokens == MAX_TOKENS
    first_id = c.fakes["decode-0"].decodes[0].request_id  # the cluster's id; each attempt its own
    assert resumed.request_id == f"{first_id}.2" and "client-7" not in first_id
    assert not c.reg.nodes["decode-0"].up and ("decode-0", False) in c.changes
    assert c.metric("halfmoon:requests_migrated_total") == 1
    assert c.metric("halfmoon:requests_retried_total", phase="decoding") == 0


def test_reserve_on_a_dead_node_takes_it_out_of_rotation_and_retries_invisibly(tokenizer):
    c = Cluster(tokenizer)
    c.fakes["decode-0"].dead = True  # killed: looks idle, so it is chosen first

    async def run():
        first = await c.generate()
        second = await c.generate()
        return first, second

    first, second = asyncio.run(run())
    assert tokens_of(first) == tokens_of(second) == undisturbed()
    assert first[-1].decode_node == second[-1].decode_node == "decode-1"
    assert c.log.count(("reserve", "decode-0")) == 1  # the second request never tried it
    assert not c.reg.nodes["decode-0"].up and not c.reg.view.decode[0].healthy
    assert c.metric("halfmoon:requests_retried_total", phase="placed") == 1
    assert c.metric("halfmoon:requests_failed_total", reason="decode node decode-0 could not reserve KV blocks") == 0


def test_a_dead_prefill_node_is_left_and_the_request_placed_again(tokenizer):
    c = Cluster(tokenizer)
    c.fakes["prefill-0"].prefill_error = rpc_error(grpc.StatusCode.UNAVAILABLE, "Socket closed")

    async def run():
        items = await c.generate()
        await asyncio.sleep(0.1)  # the first attempt's Release lands
        return items

    items = asyncio.run(run())
    assert tokens_of(items) == undisturbed() and items[-1].prefill_node == "prefill-1"
    assert not c.reg.nodes["prefill-0"].up
    # the first attempt's reservation goes back while the retry reserves again on the same
    # node, under an id of its own
    assert c.log[:4] == [("reserve", "decode-0"), ("prefill", "prefill-0"), ("release", "decode-0"),
                         ("reserve", "decode-0")]
    (decode,) = c.fakes["decode-0"].decodes
    assert decode.request_id.endswith(".2") and c.fakes["decode-0"].reserved == set()
    assert c.metric("halfmoon:requests_retried_total", phase="prefilling") == 1


def test_a_transfer_failure_into_a_dead_decode_node_retries_instead_of_recomputing_there(tokenizer):
    c = Cluster(tokenizer)
    c.fakes["prefill-0"].prefill_error = rpc_error(grpc.StatusCode.ABORTED, "KV transfer to decode node decode-0 "
                                                                           "failed: connection reset")
    c.reg.nodes["decode-1"].decode_view.running = 3

    async def run():
        c.fakes["decode-0"].dead = True  # died during the transfer (its Reserve had answered)
        return await c.generate()

    c.fakes["decode-0"].Reserve = _alive_reserve(c.fakes["decode-0"])
    items = asyncio.run(run())
    assert tokens_of(items) == undisturbed() and items[-1].decode_node == "decode-1"
    assert ("decode", "decode-0") not in c.log  # no recompute asked of the dead node
    assert not c.reg.nodes["decode-0"].up
    assert c.metric("halfmoon:requests_retried_total", phase="prefilling") == 1


def _alive_reserve(fake: FakeNode):
    async def reserve(req, timeout=None):
        fake.log.append(("reserve", fake.name))
        return node_pb2.ReserveResponse(target=node_pb2.KVTarget(node_id=fake.name, block_ids=[1, 2, 3, 4, 5]))
    return reserve


def test_a_node_out_of_rotation_is_probed_back_in_and_its_heartbeats_still_count(tokenizer):
    c = Cluster(tokenizer)
    dead = c.fakes["decode-0"]
    dead.dead = True

    async def run():
        await c.generate()
        rec = c.reg.nodes["decode-0"]
        assert not rec.up and rec.probe_task is not None
        assert c.reg.heartbeat(node_pb2.HeartbeatRequest(node_id="decode-0", load=node_pb2.NodeLoad()))
        await asyncio.sleep(0.3)
        assert not rec.up  # still refused: probing goes on
        dead.dead = False
        for _ in range(40):
            await asyncio.sleep(0.05)
            if rec.up:
                break
        return rec

    rec = asyncio.run(run())
    assert rec.up and rec.decode_view.healthy and rec.probe_task is None and not rec.down.is_set()
    assert c.changes == [("decode-0", False), ("decode-0", True)]


def test_an_error_the_node_answers_with_fails_the_request_and_keeps_the_node(tokenizer):
    c = Cluster(tokenizer)
    c.fakes["decode-0"].decode_error = rpc_error(grpc.StatusCode.INTERNAL, "engine step failed")
    c.fakes["decode-0"].die_after = None
    c.reg.nodes["decode-1"].decode_view.running = 3

    async def run():
        c.fakes["decode-0"].Decode = _failing_decode(c.fakes["decode-0"], after=3)
        return await c.generate()

    with pytest.raises(RequestFailed, match="decode node decode-0 failed: INTERNAL: engine step failed"):
        asyncio.run(run())
    assert c.reg.nodes["decode-0"].up and c.changes == []
    assert c.metric("halfmoon:requests_migrated_total") == 0


def _failing_decode(fake: FakeNode, after: int):
    inner = FakeNode.Decode

    def decode(req, timeout=None):
        stream = inner(fake, req, timeout)
        stream._outputs = stream._outputs[:after]
        return stream
    return decode


def test_migrations_and_retries_are_bounded(tokenizer):
    c = Cluster(tokenizer, max_migrations=0)
    c.fakes["decode-0"].die_after = 4
    c.reg.nodes["decode-1"].decode_view.running = 3
    with pytest.raises(RequestFailed, match=r"decode node decode-0 failed: UNAVAILABLE: Socket closed "
                                            r"\(after 4 tokens; migration limit 0 reached\)"):
        asyncio.run(c.generate())

    lone = Cluster(tokenizer, num_decode=1)
    lone.fakes["decode-0"].dead = True
    with pytest.raises(RequestFailed, match=r"decode node decode-0 could not reserve KV blocks: UNAVAILABLE: .*"
                                            r"\(no other live node to retry on\)"):
        asyncio.run(lone.generate())
    assert lone.metric("halfmoon:requests_retried_total", phase="placed") == 0


def test_a_node_lost_to_the_heartbeat_watchdog_is_not_probed_back_in(tokenizer):
    c = Cluster(tokenizer)

    async def run():
        rec = c.reg.nodes["decode-0"]
        c.reg.mark_down(rec, "missed heartbeats for 5.2s")  # as the watchdog does
        failed = c.reg.rpc_failed(rec, rpc_error(grpc.StatusCode.UNAVAILABLE, "connection refused"))
        await asyncio.sleep(0.2)  # a probe would have answered by now (the fake is alive)
        return rec, failed

    rec, failed = asyncio.run(run())
    assert failed and not rec.up and rec.probe_task is None
    assert not c.reg.heartbeat(node_pb2.HeartbeatRequest(node_id="decode-0", load=node_pb2.NodeLoad()))  # re-register
    assert c.changes == [("decode-0", False)]


def test_a_reserve_that_timed_out_is_released_at_once_not_left_to_its_lease(tokenizer):
    """The node granted the reservation but answered after the conductor's deadline (a
    stalled conductor, a loaded node): the conductor must give those blocks back now, not
    leave them held until the 60 s lease runs out (issue 11 chaos: stop-conductor)."""
    c = Cluster(tokenizer)
    slow = c.fakes["decode-0"]
    granted: list[str] = []

    async def late_reserve(req, timeout=None):
        slow.log.append(("reserve", slow.name))
        slow.reserved.add(req.request_id)  # granted on the node...
        granted.append(req.request_id)
        raise rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")  # ...answered too late

    slow.Reserve = late_reserve

    async def run():
        items = await c.generate()
        await asyncio.sleep(0.2)  # the best-effort Release lands
        return items

    items = asyncio.run(run())
    assert tokens_of(items) == undisturbed()
    assert granted and ("release", "decode-0") in c.log
    assert slow.reserved == set(), f"reservation(s) {slow.reserved} left to their lease"
