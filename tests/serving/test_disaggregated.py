"""End to end: conductor -> prefill node -> KV transfer -> decode node -> client, with the
real model, 2 prefill + 2 decode node processes on loopback."""
from __future__ import annotations

import threading
import time

import grpc
import pytest

from cluster.client import Client, make_request
from engine.config import EngineConfig
from engine.engine import LLMEngine
from engine.sampling import SamplingParams

pytestmark = [pytest.mark.slow, pytest.mark.real_model]

GREEDY = SamplingParams(max_tokens=24, ignore_eos=True)
SHARED = ("You are halfmoon's test assistant. You answer in one short sentence, you never use lists, "
          "and you always mention the city you are asked about. ") * 3


@pytest.fixture(scope="module")
def local_engine(real_model_dir):
    return LLMEngine(real_model_dir, EngineConfig(num_blocks=512))


def wait_for(pred, timeout=15.0, every=0.25):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(every)
    return pred()


def used_blocks(client: Client) -> dict[str, int]:
    return {n.node_id: n.kv_blocks_used for n in client.status().nodes if n.state == "up"}


def test_greedy_tokens_match_single_process_engine_including_prefix_hits(cluster_2p2d, local_engine):
    prompts = ["The capital of France is", "def add(a, b):\n    return", SHARED + "Tell me about Paris.",
               SHARED + "Tell me about Rome."]
    with Client(cluster_2p2d.address) as c:
        for p in prompts + prompts[2:]:  # the repeats hit the prefill node's prefix cache
            ids = local_engine.tokenizer.encode(p)
            want = local_engine.generate([ids], GREEDY)[0]
            res = c.generate(make_request(token_ids=ids, params=GREEDY))
            assert res.token_ids == want, p
            assert res.final.finish_reason == "length"
            assert res.final.usage.completion_tokens == 24
        again = c.generate(make_request(SHARED + "Tell me about Paris.", params=GREEDY))
        assert again.final.usage.cached_tokens >= 96
        assert again.final.timing.ttft_s > 0 and again.final.timing.prefill_s > 0


def test_shared_prefix_routes_to_the_node_holding_it_and_distinct_prompts_spread(cluster_2p2d):
    with Client(cluster_2p2d.address) as c:
        first = c.generate(make_request(SHARED + "What about Berlin?", params=SamplingParams(max_tokens=2)))
        holder = first.final.prefill_node
        for city in ("Madrid", "Lisbon", "Vienna"):
            r = c.generate(make_request(SHARED + f"What about {city}?", params=SamplingParams(max_tokens=2)))
            assert r.final.prefill_node == holder
            assert r.final.usage.cached_tokens >= 64  # the shared part, in whole 16-token blocks
        # distinct prompts sent together: the second finds the first node busy and goes elsewhere
        used: list[str] = []
        lock = threading.Lock()

        def one(i: int) -> None:
            r = c.generate(make_request(f"Story number {i}: " + "once upon a time " * 40,
                                        params=SamplingParams(max_tokens=2)))
            with lock:
                used.append(r.final.prefill_node)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert len(used) == 4 and set(used) == {"prefill-0", "prefill-1"}


@pytest.mark.parametrize("req, field", [  # fields named by their path in halfmoon.v1.GenerateRequest
    (make_request(""), "prompt"),
    (make_request("x" * 1, params=SamplingParams(max_tokens=0)), "sampling.max_tokens"),
    (make_request("hi", params=SamplingParams(temperature=-1.0)), "sampling.temperature"),
    (make_request("hi", params=SamplingParams(top_p=0.0)), "sampling.top_p"),
    (make_request("hi", params=SamplingParams(top_p=1.5)), "sampling.top_p"),
    (make_request(token_ids=list(range(100, 2200))), "prompt_token_ids.ids"),
    (make_request(token_ids=[5, 10**7]), "prompt_token_ids.ids"),
    (make_request(chat=[("wizard", "hi")]), "chat.messages[0].role"),
])
def test_bad_requests_are_invalid_argument_naming_the_field(cluster_2p2d, req, field):
    with Client(cluster_2p2d.address) as c:
        with pytest.raises(grpc.RpcError) as e:
            c.generate(req, timeout=30)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert e.value.details().startswith(field + ":"), e.value.details()
        ok = c.generate(make_request("Hello", params=SamplingParams(max_tokens=3)))
        assert ok.final.usage.completion_tokens == 3


def test_unknown_field_is_invalid_argument(cluster_2p2d):
    from proto.halfmoon.v1 import generate_pb2_grpc

    raw = make_request("hi").SerializeToString() + bytes([0x98, 0x06, 0x01])  # field 99 = 1
    with grpc.insecure_channel(cluster_2p2d.address) as ch:
        call = ch.unary_stream(f"/{generate_pb2_grpc.GenerationServicer.__module__ and 'halfmoon.v1.Generation'}/Generate",
                               request_serializer=lambda b: b, response_deserializer=lambda b: b)
        with pytest.raises(grpc.RpcError) as e:
            list(call(raw, timeout=30))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "GenerateRequest.#99" in e.value.details()


def test_cancelled_request_leaves_no_blocks(cluster_2p2d):
    with Client(cluster_2p2d.address) as c:
        stream = c.stream(make_request("Count slowly: one, two, three,", params=SamplingParams(max_tokens=400, ignore_eos=True)))
        got = 0
        for msg in stream:
            got += len(msg.delta.token_ids)
            if got >= 3:
                stream.cancel()
                break
        assert wait_for(lambda: all(v == 0 for v in used_blocks(c).values()), timeout=20), used_blocks(c)


def prefix_queries(client: Client) -> dict[str, int]:
    return {n.node_id: n.prefix_queries_tokens for n in client.status().nodes}


def settled_prefix_queries(client: Client) -> dict[str, int]:
    """The counters once a heartbeat (0.5 s) brings nothing new: the status lags the nodes by
    up to one heartbeat, so an earlier test's request may still arrive in it."""
    last = prefix_queries(client)
    for _ in range(20):
        time.sleep(1.2)
        now = prefix_queries(client)
        if now == last:
            return now
        last = now
    raise AssertionError(f"prefix counters still moving: {last}")


def test_admission_rejects_before_any_prefill_work_when_saturated(cluster_2p2d):
    with Client(cluster_2p2d.address) as c:
        # Both prefill nodes busy with a long prompt each: a request that would now wait
        # behind a queue is the one admission refuses (one late only by its own size on an
        # idle node is admitted: a late answer beats a refusal when the cluster has room).
        busy = [threading.Thread(target=c.generate, args=(make_request(f"Busy {i}: the long history of Rome. " * 160,
                                                                    params=SamplingParams(max_tokens=1)),))
                for i in range(2)]
        for t in busy:
            t.start()
        time.sleep(1.5)  # both dispatched and counted by their nodes
        before = settled_prefix_queries(c)
        c.set_settings({"ttft_slo_s": "0.05"})
        try:
            with pytest.raises(grpc.RpcError) as e:
                c.generate(make_request("Explain the history of Rome. " * 60, params=SamplingParams(max_tokens=4)))
            assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "prefill_overloaded" in e.value.details()
            time.sleep(1.2)  # a heartbeat later: no prefill node looked at the prompt
            assert prefix_queries(c) == before
        finally:
            c.set_settings({"ttft_slo_s": "600"})
            for t in busy:
                t.join(180)
        with pytest.raises(grpc.RpcError) as bad:
            c.set_settings({"ttft_slo_s": "-1", "policy": "random"})
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        values = {s.name: s.value for s in c.status().settings}
        assert values["policy"] == "cost_aware" and float(values["ttft_slo_s"]) == 600


def test_kv_centric_pulls_a_busy_nodes_prefix_and_output_is_unchanged(cluster_2p2d, local_engine):
    """A long prefix cached on one prefill node, which is then given a long prompt with the
    same prefix (so it is busy for seconds); the next request with the prefix goes to the
    other node, which pulls the KV instead of recomputing it; tokens equal the engine's."""
    prefix = "Pulled prefix: the history of the Roman Empire in many words. " * 12
    ids = local_engine.tokenizer.encode(prefix + "Continue.")
    want = local_engine.generate([ids], GREEDY)[0]
    with Client(cluster_2p2d.address) as c:
        first = c.generate(make_request(prefix + "Start.", params=SamplingParams(max_tokens=1)))
        holder = first.final.prefill_node
        other = ({"prefill-0", "prefill-1"} - {holder}).pop()
        busy_result: list = []
        busy = threading.Thread(target=lambda: busy_result.append(c.generate(make_request(
            prefix + "Now a long digression. " * 200, params=SamplingParams(max_tokens=1)))))
        busy.start()
        time.sleep(0.5)  # dispatched (the conductor's view has the holder busy), still computing
        res = c.generate(make_request(token_ids=ids, params=GREEDY))
        busy.join(180)
    assert busy_result and busy_result[0].final.prefill_node == holder
    assert res.final.prefill_node == other, f"expected a pull onto {other}, ran on {res.final.prefill_node}"
    assert res.token_ids == want
    shared_blocks = len(local_engine.tokenizer.encode(prefix)) // 16 - 1
    assert res.final.usage.cached_tokens >= 16 * shared_blocks  # pulled blocks count as cached


def test_killed_decode_node_migrates_its_requests_and_leaks_nothing(cluster_2p2d):
    """Runs last in this module: it SIGKILLs a decode node that is running requests; they
    continue on the other decode node (migration) with all their tokens."""
    with Client(cluster_2p2d.address) as c:
        errors: list[grpc.RpcError] = []
        counts: list[int] = []
        started = threading.Event()

        def long_request(i: int) -> None:
            n = 0
            try:
                for msg in c.stream(make_request(f"Request {i}: tell a very long story.",
                                                 params=SamplingParams(max_tokens=300, ignore_eos=True)), timeout=90):
                    if msg.HasField("delta"):
                        n += len(msg.delta.token_ids)
                        started.set()
                counts.append(n)
            except grpc.RpcError as e:
                errors.append(e)

        threads = [threading.Thread(target=long_request, args=(i,)) for i in range(4)]
        t0 = time.monotonic()
        for t in threads:
            t.start()
        assert started.wait(60)
        busy = wait_for(lambda: [n.node_id for n in c.status().nodes if n.role == "decode" and n.running > 0])
        assert busy, "no decode node reports running requests"
        victim = busy[0]
        survivor = ({"decode-0", "decode-1"} - {victim}).pop()
        cluster_2p2d.kill(victim)
        for t in threads:
            t.join(90)
        assert all(not t.is_alive() for t in threads)
        # every stream finished with all its tokens or (on a very slow machine) ended at its
        # deadline: none failed with the node, none hangs
        assert all(e.code() == grpc.StatusCode.DEADLINE_EXCEEDED for e in errors), \
            [(e.code(), e.details()) for e in errors]
        assert len(counts) + len(errors) == 4 and all(n == 300 for n in counts), counts
        assert time.monotonic() - t0 < 120
        # the surviving nodes hold no blocks once the rest finish; the victim leaves rotation
        assert wait_for(lambda: all(v == 0 for v in used_blocks(c).values()), timeout=60), used_blocks(c)
        assert wait_for(lambda: {n.node_id: n.state for n in c.status().nodes}[victim] == "down", timeout=10)
        r = c.generate(make_request("Hello again", params=SamplingParams(max_tokens=3)))
        assert r.final.decode_node == survivor
