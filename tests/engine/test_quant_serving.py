"""Quantized engines in the cluster: nodes must agree on the KV dtype (refused at registration
otherwise), and a w8a8 prefill node + KV transfer + w8a8 decode node give the tokens of one
w8a8 engine."""
from __future__ import annotations

import asyncio
import socket

import pytest

from conductor.registry import NodeRegistry
from proto.halfmoon.v1 import node_pb2


def register_request(node_id: str, kv_dtype: str, block_bytes: int, role=node_pb2.ROLE_DECODE):
    layout = node_pb2.KVLayout(block_size=16, block_bytes=block_bytes, total_blocks=64, model="30x576/3x64/49152",
                               kv_dtype=kv_dtype, dtype="float32" if kv_dtype == "float32" else "w8a8")
    return node_pb2.RegisterRequest(node_id=node_id, role=role, address="127.0.0.1:1", layout=layout)


def test_registration_refuses_a_node_whose_kv_dtype_differs():
    async def scenario():
        reg = NodeRegistry(block_size=16)
        try:
            await reg.register(register_request("decode-0", "float32", 92160 * 4))
            with pytest.raises(ValueError) as e:
                await reg.register(register_request("decode-1", "bfloat16", 92160 * 2))
            assert str(e.value).startswith("layout.kv_dtype: node decode-1 keeps its KV cache in bfloat16, "
                                           "decode-0 in float32: prefill and decode nodes exchange KV blocks")
            assert set(reg.nodes) == {"decode-0"}
            # a node from before the field (kv_dtype "") counts as float32
            await reg.register(register_request("decode-2", "", 92160 * 4))
            assert set(reg.nodes) == {"decode-0", "decode-2"}
        finally:
            for rec in reg.nodes.values():
                await rec.channel.close()

    asyncio.run(scenario())


def test_registration_accepts_equal_kv_dtypes_across_weight_dtypes():
    """w8a8 and bfloat16 nodes both keep bfloat16 KV: they may exchange it."""
    async def scenario():
        reg = NodeRegistry(block_size=16)
        try:
            await reg.register(register_request("decode-0", "bfloat16", 92160 * 2))
            await reg.register(register_request("decode-1", "bfloat16", 92160 * 2))
            assert {r.layout.kv_dtype for r in reg.nodes.values()} == {"bfloat16"}
        finally:
            for rec in reg.nodes.values():
                await rec.channel.close()

    asyncio.run(scenario())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.real_model
def test_w8a8_disaggregated_matches_one_w8a8_engine(real_model_dir):
    from cluster.client import Client, make_request
    from cluster.local import LocalCluster
    from cluster.node_main import NodeSpec
    from conductor.server import ConductorSpec
    from engine.config import EngineConfig
    from engine.engine import LLMEngine
    from engine.sampling import SamplingParams

    eng = LLMEngine(real_model_dir, EngineConfig(num_blocks=128, dtype="w8a8"))  # (also calibrates, once)
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    prompt = eng.tokenizer.encode("The theory of relativity was developed by Albert Einstein, who " * 3)
    want = eng.generate([prompt], params)[0]
    spec = ConductorSpec(grpc_port=_free_port(), http_port=None, settings={"ttft_slo_s": 600.0, "tbt_slo_s": 60.0},
                         heartbeat_interval_s=0.5, heartbeat_timeout_s=5.0)
    node = NodeSpec(role="prefill", node_id="", conductor="", num_blocks=128, num_threads=1, dtype="w8a8")
    cluster = LocalCluster.build(1, 1, conductor=spec, node=node).start()
    try:
        with Client(cluster.address) as c:
            got = c.generate(make_request(token_ids=prompt, params=params))
            assert got.token_ids == want
            assert got.final.prefill_node != got.final.decode_node
    finally:
        cluster.stop()
