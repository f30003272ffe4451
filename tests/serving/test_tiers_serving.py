"""The KV tiers in a real cluster (processes on loopback, the real model, a real Mooncake
master with its store keeper): turn 2 of a chat reuses turn 1's prompt and answer through
the decode write-back; a prefix computed on one prefill node and evicted there is served to
the other from the cluster store, also after the first node was killed."""
from __future__ import annotations

import socket
import time
from dataclasses import replace

import pytest

from cluster.client import Client, make_request
from engine.config import EngineConfig
from engine.engine import LLMEngine
from engine.sampling import SamplingParams
from engine.tiers import TierConfig
from engine.tiers.mooncake_store import MooncakeMaster, store_unavailable_reason
from engine.tokenizer import Message

pytestmark = pytest.mark.skipif(store_unavailable_reason() is not None, reason=str(store_unavailable_reason()))

SYSTEM = ("You are the assistant of a museum of natural history. Answer visitors' questions briefly and "
          "politely, with one fact they may not know. ") * 3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def master(tmp_path_factory):
    m = MooncakeMaster(free_port(), free_port(), free_port(), keeper_gb=0.25,
                       log_path=tmp_path_factory.mktemp("mc") / "master.log").start()
    yield m
    m.stop()


@pytest.fixture(scope="module")
def local_engine(real_model_dir):
    return LLMEngine(real_model_dir, EngineConfig(num_blocks=256))


def tiered_cluster(master: MooncakeMaster, tmp_path, num_prefill: int, *, num_blocks: int, decode_write_back: bool,
                   settings: dict):
    from cluster.local import LocalCluster
    from cluster.node_main import NodeSpec
    from conductor.server import ConductorSpec

    spec = ConductorSpec(grpc_port=free_port(), http_port=None, heartbeat_interval_s=0.5, heartbeat_timeout_s=3.0,
                         settings={"ttft_slo_s": 600.0, "tbt_slo_s": 60.0, "admission": "none", **settings})
    node = NodeSpec(role="prefill", node_id="", conductor="", num_blocks=num_blocks, num_threads=1)
    cluster = LocalCluster.build(num_prefill, 1, conductor=spec, node=node)
    tiers = TierConfig(host_gib=0.1, disk_gib=0.0, store=True, store_master=master.address,
                       store_metadata=master.metadata_url)
    cluster.nodes = [replace(n, kv_tiers=replace(tiers, disk_dir=str(tmp_path / n.node_id),
                                                 write_back_on_finish=decode_write_back and n.role == "decode"),
                             num_blocks=num_blocks if n.role == "prefill" else 256)  # the prefill devices are small
                     for n in cluster.nodes]
    return cluster.start()


def test_turn_two_reuses_turn_ones_prompt_and_answer(master, tmp_path, local_engine):
    cluster = tiered_cluster(master, tmp_path, 1, num_blocks=256, decode_write_back=True, settings={})
    try:
        with Client(cluster.address) as c:
            chat = [("system", SYSTEM), ("user", "Why are flamingos pink?")]
            turn1 = c.generate(make_request(chat=chat, params=SamplingParams(max_tokens=40, ignore_eos=True)))
            prompt1 = local_engine.tokenizer.encode_chat([Message(r, t) for r, t in chat])
            answer1 = turn1.token_ids
            assert len(answer1) == 40
            follow = local_engine.tokenizer.encode("<|im_end|>\n<|im_start|>user\nAnd the tallest dinosaur?"
                                                   "<|im_end|>\n<|im_start|>assistant\n")
            ids2 = prompt1 + answer1 + follow
            params2 = SamplingParams(max_tokens=16, ignore_eos=True)
            time.sleep(2.0)  # a user's next turn comes seconds later; the write-back puts (~1 ms a block) are async
            turn2 = c.generate(make_request(token_ids=ids2, params=params2))
        assert turn2.final.usage.cached_tokens >= len(prompt1) + len(answer1) - 16
        assert turn2.token_ids == local_engine.generate([ids2], params2)[0]
    finally:
        cluster.stop()


def test_prefix_evicted_on_one_prefill_node_is_served_to_the_other_from_the_store(master, tmp_path,
                                                                                   local_engine):
    """Round robin makes the order deterministic: P on X, filler on Y, filler on X (evicts P
    there: demoted and put to the store), P on Y (from the store); then R on X, fillers, X
    killed, R on Y (the store's copy lives in the keeper's segment, not X's)."""
    cluster = tiered_cluster(master, tmp_path, 2, num_blocks=48, decode_write_back=False,
                             settings={"policy": "round_robin"})
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    words = "granite basalt quartz feldspar mica obsidian pumice slate marble gneiss schist shale ".split()

    def filler(seed: int) -> list[int]:
        text = " ".join(words[(seed + i) % len(words)] for i in range(520))
        return local_engine.tokenizer.encode(text)[:47 * 16 + 8]  # all 48 blocks: P is evicted whole

    try:
        with Client(cluster.address) as c:
            p = local_engine.tokenizer.encode(SYSTEM + " Visitors ask about fossils.")
            r = local_engine.tokenizer.encode(SYSTEM + " Visitors ask about minerals and gems.")
            full = lambda ids: (len(ids) - 1) // 16 * 16  # noqa: E731 (what any tier can serve)
            first = c.generate(make_request(token_ids=p, params=params))
            x = first.final.prefill_node
            assert c.generate(make_request(token_ids=filler(1), params=params)).final.prefill_node != x
            assert c.generate(make_request(token_ids=filler(2), params=params)).final.prefill_node == x
            again = c.generate(make_request(token_ids=p, params=params))
            y = again.final.prefill_node
            assert y != x
            assert again.final.usage.cached_tokens == full(p)  # nothing of P was ever on y
            assert again.token_ids == first.token_ids

            r1 = c.generate(make_request(token_ids=r, params=params))
            assert r1.final.prefill_node == x
            assert c.generate(make_request(token_ids=filler(3), params=params)).final.prefill_node == y
            assert c.generate(make_request(token_ids=filler(4), params=params)).final.prefill_node == x
            cluster.kill(x)
            r2 = c.generate(make_request(token_ids=r, params=params))
        assert r2.final.prefill_node == y
        assert r2.final.usage.cached_tokens == full(r)
        assert r2.token_ids == r1.token_ids == local_engine.generate([r], params)[0]
    finally:
        cluster.stop()
