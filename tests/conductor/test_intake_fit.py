"""max_tokens beyond the context, on an idle cluster, through the live conductor and both
front doors (issue 11, item 5). Before: admission sized the decode node's KV use by the
max_tokens asked for (8,192 on a 2,048-token context), judged the idle node over-full and
answered 429 / RESOURCE_EXHAUSTED with Retry-After, which OpenAI clients retry for ~28 s.
Now max_tokens is capped to the room the context leaves (as vLLM does), and a request no
decode node could hold even alone is 400 / INVALID_ARGUMENT, never overload."""
from __future__ import annotations

import asyncio

import grpc
import httpx
import pytest
from prometheus_client import CollectorRegistry

from conductor.grpc_api import GenerationService
from conductor.http_frontend import build_app, serve_http
from conductor.live import LiveConductor, LiveConfig, cpu_default_costs
from conductor.registry import NodeRecord, NodeRegistry
from conductor.scheduler import Scheduler
from conductor.settings import ConductorSettings, SettingsValues
from engine.tokenizer import Tokenizer
from proto.halfmoon.v1 import common_pb2, generate_pb2, generate_pb2_grpc, node_pb2

pytestmark = pytest.mark.timeout(60)

CONTEXT = 2048
PROMPT = list(range(1000, 1100))  # 100 tokens


class Stream:
    def __init__(self, outputs):
        self._outputs = list(outputs)

    def __aiter__(self):
        return self

    async def __anext__(self):
        if not self._outputs:
            raise StopAsyncIteration
        return self._outputs.pop(0)

    def cancel(self):
        pass


class Prefill:
    async def Prefill(self, req, timeout=None):
        return node_pb2.PrefillResponse(first_token=7)


class Decode:
    """Generates exactly the max_tokens it is sent (one output), as a node at the context's end."""

    def __init__(self) -> None:
        self.max_tokens: list[int] = []

    async def Reserve(self, req, timeout=None):
        return node_pb2.ReserveResponse(target=node_pb2.KVTarget(node_id="decode-0", block_ids=[0]))

    def Decode(self, req, timeout=None):
        n = req.sampling.max_tokens
        self.max_tokens.append(n)
        return Stream([node_pb2.DecodeOutput(delta=common_pb2.TokenDelta(text="x" * n, token_ids=[7] * n),
                                             finished=True, finish_reason="length", completion_tokens=n)])

    async def Release(self, req, timeout=None):
        return node_pb2.ReleaseResponse(found=True)

    async def Renew(self, req, timeout=None):
        return node_pb2.RenewResponse(found=True)


def conductor(tokenizer: Tokenizer, decode_blocks: int) -> tuple[LiveConductor, Decode]:
    """An idle 1P+1D cluster: the decode node holds `decode_blocks` blocks of 16 tokens."""
    reg = NodeRegistry(block_size=16)
    decode = Decode()
    for node_id, role in (("prefill-0", "prefill"), ("decode-0", "decode")):
        layout = node_pb2.KVLayout(block_size=16, block_bytes=46080 * 16, total_blocks=decode_blocks)
        rec = NodeRecord(node_id, role, "fake", layout, "", None, Prefill() if role == "prefill" else None,
                         decode if role == "decode" else None)
        reg.add(rec, follow_events=False)
    settings = ConductorSettings(SettingsValues(admission="early"))
    live = LiveConductor(LiveConfig("m", CONTEXT, 16), tokenizer, Scheduler(settings, cpu_default_costs()), reg)
    return live, decode


@pytest.fixture(scope="module")
def tokenizer(real_model_dir) -> Tokenizer:
    return Tokenizer(real_model_dir)


def http_completion(live: LiveConductor, body: dict) -> httpx.Response:
    registry = CollectorRegistry()
    server = serve_http(build_app(live, registry))
    try:
        return httpx.post(f"{server.url}/v1/completions", json=body, timeout=20)
    finally:
        server.stop()


def grpc_generate(live: LiveConductor, max_tokens: int) -> tuple[grpc.StatusCode, str, list]:
    async def main():
        server = grpc.aio.server()
        generate_pb2_grpc.add_GenerationServicer_to_server(GenerationService(live), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                call = generate_pb2_grpc.GenerationStub(channel).Generate(generate_pb2.GenerateRequest(
                    prompt_token_ids=generate_pb2.TokenIds(ids=PROMPT),
                    sampling=common_pb2.SamplingParams(max_tokens=max_tokens)), timeout=20)
                try:
                    return grpc.StatusCode.OK, "", [item async for item in call]
                except grpc.aio.AioRpcError as e:
                    return e.code(), e.details(), []
        finally:
            await server.stop(None)

    return asyncio.run(main())


def test_max_tokens_beyond_the_context_is_capped_over_http(tokenizer):
    live, decode = conductor(tokenizer, decode_blocks=512)  # 8,192 tokens of KV: room for a whole context
    r = http_completion(live, {"prompt": PROMPT, "max_tokens": 8192})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["choices"][0]["finish_reason"] == "length"
    assert out["usage"]["prompt_tokens"] == 100 and out["usage"]["completion_tokens"] == CONTEXT - 100
    assert decode.max_tokens == [CONTEXT - 100]


def test_max_tokens_beyond_the_context_is_capped_over_grpc(tokenizer):
    live, decode = conductor(tokenizer, decode_blocks=512)
    code, details, items = grpc_generate(live, 8192)
    assert code == grpc.StatusCode.OK, details
    assert items[-1].final.finish_reason == "length"
    assert items[-1].final.usage.completion_tokens == CONTEXT - 100
    assert decode.max_tokens == [CONTEXT - 100]


def test_a_request_no_decode_node_can_hold_is_400_over_http(tokenizer):
    live, decode = conductor(tokenizer, decode_blocks=64)  # 1,024 tokens: less than one context
    r = http_completion(live, {"prompt": PROMPT, "max_tokens": 2000})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "max_tokens"
    assert err["message"] == ("max_tokens: 1948 new tokens after a 100-token prompt need 2048 tokens of KV cache; "
                              "the largest decode node holds 1024 (ask for at most 924)")
    assert "retry-after" not in r.headers and decode.max_tokens == []
    assert http_completion(live, {"prompt": PROMPT, "max_tokens": 924}).status_code == 200


def test_a_request_no_decode_node_can_hold_is_invalid_argument_over_grpc(tokenizer):
    live, decode = conductor(tokenizer, decode_blocks=64)
    code, details, _ = grpc_generate(live, 2000)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.startswith("sampling.max_tokens: 1948 new tokens after a 100-token prompt need 2048 tokens")
    assert decode.max_tokens == []


def test_a_prompt_that_fills_the_context_is_400_not_429(tokenizer):
    live, _ = conductor(tokenizer, decode_blocks=512)
    r = http_completion(live, {"prompt": list(range(1000, 1000 + CONTEXT)), "max_tokens": 1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt_token_ids"
