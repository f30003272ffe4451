"""A request's prompt is hashed once in the whole cluster: the conductor hashes it at intake
and sends the chain with Prefill and Decode; the prefill and the decode node only check it
(the first and the last block's hash, `engine.block_pool.chain_mismatch`) and reuse it. The
decode node hashes, besides, the blocks the answer fills (each once). Without the chain each
node hashed the whole prompt again: n + n + n + answer blocks, against n + 2 + 2 + answer
blocks now. A 1P+1D cluster in this process (conductor and nodes on one event loop) on the
tiny model, so one counter sees every hash."""
from __future__ import annotations

import pytest

import engine.block_pool as block_pool
from cluster.client import Client, make_request
from engine.sampling import SamplingParams

SETTINGS = {"ttft_slo_s": 600.0, "tbt_slo_s": 60.0, "admission": "none"}
BS = 16  # the cluster's block size (NodeSpec and ConductorSpec defaults)
MAX_TOKENS = 24


class CountingXxhash:
    def __init__(self, real) -> None:
        self.real, self.calls = real, 0

    def xxh64(self, *args, **kwargs):
        self.calls += 1
        return self.real.xxh64(*args, **kwargs)


def test_a_chat_request_hashes_each_block_once_across_conductor_prefill_and_decode(tiny_model_dir, in_process_cluster,
                                                                                  monkeypatch):
    cluster = in_process_cluster(1, 1, settings=SETTINGS, model=str(tiny_model_dir), max_model_len=1024)
    counter = CountingXxhash(block_pool.xxhash)
    monkeypatch.setattr(block_pool, "xxhash", counter)
    chat = [("system", "You are a terse assistant who answers questions about geography. " * 3),
            ("user", "What is the capital of France, and which river runs through it?")]
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    with Client(cluster.address) as c:
        for turn in range(2):  # the second time the prefill node's prefix cache serves the prompt
            counter.calls = 0
            res = c.generate(make_request(chat=chat, params=params))
            prompt = res.final.usage.prompt_tokens
            assert len(res.token_ids) == MAX_TOKENS
            n = prompt // BS
            assert n >= 4
            answer_blocks = (prompt + MAX_TOKENS - 1) // BS - n  # the decode node computes all but the last token
            assert counter.calls == n + 2 + 2 + answer_blocks, (turn, prompt)
            if turn:
                assert res.final.usage.cached_tokens == (prompt - 1) // BS * BS  # the last token is always computed


def test_a_refused_chain_is_counted_in_the_nodes_metrics(tiny_model_dir, in_process_cluster):
    """A chain that fails a node's check (here: of another block size, as a mismatched
    conductor would send) is dropped, the answer is unchanged, and the node's
    `halfmoon:block_hashes_refused_total` says so at its next heartbeat."""
    import time
    import urllib.request

    import grpc

    from engine.block_pool import block_hashes
    from proto.convert import sampling_to_proto
    from proto.halfmoon.v1 import node_pb2, node_pb2_grpc

    cluster = in_process_cluster(1, 1, settings=SETTINGS, model=str(tiny_model_dir), max_model_len=1024)
    prompt = list(range(500, 500 + 5 * BS + 3))
    params = sampling_to_proto(SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))
    with Client(cluster.address) as c:
        dec = next(n for n in c.status().nodes if n.role == "decode")

    def refused() -> float:
        text = urllib.request.urlopen(f"http://{dec.metrics_address}/metrics", timeout=10).read().decode()
        line = next((ln for ln in text.splitlines() if ln.startswith("halfmoon:block_hashes_refused_total{")), None)
        return float(line.rsplit(" ", 1)[1]) if line else 0.0

    with grpc.insecure_channel(dec.address) as ch:
        stub = node_pb2_grpc.DecodeNodeStub(ch)

        def decode(rid: str, hashes) -> list[int]:
            req = node_pb2.DecodeRequest(request_id=rid, prompt_token_ids=prompt, sampling=params, recompute=True,
                                         block_hashes=hashes)
            return [t for out in stub.Decode(req, timeout=60) for t in out.delta.token_ids]

        assert refused() == 0
        want = decode("right", block_hashes(prompt, BS))
        assert decode("wrong", block_hashes(prompt, 2 * BS)) == want
    deadline = time.monotonic() + 10
    while refused() < 1 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert refused() == 1
