"""The colocated baseline layout: each node runs one engine that does prefill and decode,
behind the same conductor and API."""
from __future__ import annotations

import pytest

from cluster.client import Client, make_request
from engine.config import EngineConfig
from engine.engine import LLMEngine
from engine.sampling import SamplingParams

from conftest import start_cluster

pytestmark = [pytest.mark.slow, pytest.mark.real_model]


def test_colocated_layout_serves_same_tokens_and_routes_by_prefix(real_model_dir):
    from cluster.local import LocalCluster

    cluster = start_cluster(0, 0, settings={"ttft_slo_s": 600.0, "tbt_slo_s": 60.0}, colocated=2)
    try:
        eng = LLMEngine(real_model_dir, EngineConfig(num_blocks=256))
        shared = "A long shared system prompt about geography and capitals of Europe. " * 4
        with Client(cluster.address) as c:
            nodes = {n.node_id: n.role for n in c.status().nodes}
            assert nodes == {"colocated-0": "colocated", "colocated-1": "colocated"}
            p = eng.tokenizer.encode(shared + "Name a capital.")
            want = eng.generate([p], SamplingParams(max_tokens=16, ignore_eos=True))[0]
            first = c.generate(make_request(token_ids=p, params=SamplingParams(max_tokens=16, ignore_eos=True)))
            assert first.token_ids == want
            assert first.final.prefill_node == first.final.decode_node
            again = c.generate(make_request(shared + "Name another capital.", params=SamplingParams(max_tokens=4)))
            assert again.final.prefill_node == first.final.prefill_node
            assert again.final.usage.cached_tokens >= 48
            assert again.final.timing.ttft_s > 0
    finally:
        cluster.stop()
