"""The gRPC front door's request intake: undecodable bytes, oversized messages and values
out of range are INVALID_ARGUMENT with a clear message (never UNKNOWN with a Python class
name), sent as raw bytes through a channel with no serializer, as a third-party client
built from the .proto files (or a fuzzer) can."""
from __future__ import annotations

import asyncio
import struct

import grpc
import pytest
from fakes import IntakeBackend
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry

from conductor.grpc_api import AdminService, GenerationService
from conductor.grpc_intake import RequestParsing, transport_options
from conductor.intake import Intake
from conductor.registry import NodeRegistry
from conductor.settings import ConductorSettings, SettingsValues
from engine.tokenizer import Tokenizer
from proto.halfmoon.v1 import admin_pb2, admin_pb2_grpc, common_pb2, generate_pb2, generate_pb2_grpc

pytestmark = pytest.mark.timeout(60)

LIMIT = 64 * 1024
GENERATE = "/halfmoon.v1.Generation/Generate"


@pytest.fixture(scope="module")
def tokenizer(real_model_dir) -> Tokenizer:
    return Tokenizer(real_model_dir)


def varint(n: int) -> bytes:
    out = b""
    while True:
        low, n = n & 0x7F, n >> 7
        if not n:
            return out + bytes([low])
        out += bytes([low | 0x80])


def field(number: int, payload: bytes) -> bytes:
    """A length-delimited field (strings, messages)."""
    return varint(number << 3 | 2) + varint(len(payload)) + payload


def with_sampling(sampling: bytes, prompt: bytes = b"Hello") -> bytes:
    return field(2, prompt) + field(5, sampling)


class Served:
    def __init__(self, backend: IntakeBackend, channel: grpc.aio.Channel) -> None:
        self.backend = backend
        self.channel = channel

    async def generate_raw(self, raw: bytes) -> list[generate_pb2.GenerateResponse]:
        call = self.channel.unary_stream(GENERATE, request_serializer=None,
                                         response_deserializer=generate_pb2.GenerateResponse.FromString)
        return [item async for item in call(raw, timeout=20)]

    async def status_of(self, raw: bytes, method: str = GENERATE) -> tuple[grpc.StatusCode, str]:
        try:
            if method == GENERATE:
                await self.generate_raw(raw)
            else:
                await self.channel.unary_unary(method, request_serializer=None, response_deserializer=None)(
                    raw, timeout=20)
        except grpc.aio.AioRpcError as e:
            return e.code(), e.details()
        return grpc.StatusCode.OK, ""


def run(tokenizer, test, limit: int = LIMIT):
    """`await test(served)` against a conductor-like gRPC server (Generation over the real
    intake and the fake cluster, Admin, health) behind `RequestParsing(limit)`."""

    async def main():
        backend = IntakeBackend(CollectorRegistry(), Intake(tokenizer, max_model_len=2048, block_size=16))
        server = grpc.aio.server(interceptors=[RequestParsing(limit)], options=transport_options(limit))
        generate_pb2_grpc.add_GenerationServicer_to_server(GenerationService(backend), server)
        admin_pb2_grpc.add_AdminServicer_to_server(
            AdminService(ConductorSettings(SettingsValues()), NodeRegistry(16), "m"), server)
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=[
                    ("grpc.max_send_message_length", 64 * LIMIT)]) as channel:
                return await test(Served(backend, channel))
        finally:
            await server.stop(None)

    return asyncio.run(main())


VALID = generate_pb2.GenerateRequest(prompt="The capital of France is",
                                     sampling=common_pb2.SamplingParams(max_tokens=3)).SerializeToString()


@pytest.mark.parametrize("raw", [
    b"\xff\xff\xff\xff",  # garbage
    VALID[:-3],  # truncated inside the sampling message
    field(2, b"\xed\xa0\x80"),  # prompt: a UTF-8-encoded lone surrogate
    field(2, b"ok \xff"),  # prompt: not UTF-8 at all
    field(1, b"\xc3") + field(2, b"x"),  # request_id: a cut-off two-byte character
    field(3, field(1, field(1, b"user") + field(2, b"\xe2\x82"))),  # chat.messages[0].content
    with_sampling(varint(5 << 3 | 0) + b"\xff" * 10 + b"\x01"),  # seed: an 11-byte varint
    with_sampling(field(6, b"\xed\xbf\xbf")),  # sampling.stop[0]
], ids=["garbage", "truncated", "surrogate-prompt", "bad-utf8-prompt", "bad-utf8-request-id", "bad-utf8-chat",
        "long-varint", "bad-utf8-stop"])
def test_undecodable_requests_are_invalid_argument(tokenizer, raw):
    """Before: UNKNOWN, "Unexpected <class 'google.protobuf.message.DecodeError'>: ..."."""

    async def test(served: Served):
        status = await served.status_of(raw)
        ok = await served.generate_raw(VALID)  # and the server carries on
        return status, ok, served.backend.requests

    (code, details), ok, seen = run(tokenizer, test)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.startswith("the request does not parse: Error parsing message with type "
                              "'halfmoon.v1.GenerateRequest'"), details
    assert "<class" not in details and "DecodeError" not in details
    assert ok[-1].final.usage.completion_tokens == 3 and len(seen) == 1


@pytest.mark.parametrize("method, raw", [
    ("/halfmoon.v1.Admin/SetSettings", field(1, field(1, b"\xff") + field(2, b"x"))),  # values: a map<string, string>
    ("/halfmoon.v1.Admin/Status", b"\x0a\x05ab"),  # truncated
    ("/grpc.health.v1.Health/Check", field(1, b"\xed\xa0\x80")),  # service name
])
def test_other_services_refuse_undecodable_requests_too(tokenizer, method, raw):
    code, details = run(tokenizer, lambda served: served.status_of(raw, method))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("the request does not parse: ")


def test_a_message_over_the_limit_is_invalid_argument_naming_the_limit(tokenizer):
    big = generate_pb2.GenerateRequest(prompt="x" * LIMIT).SerializeToString()
    huge = generate_pb2.GenerateRequest(prompt="x" * (2 * LIMIT + 1)).SerializeToString()

    async def test(served: Served):
        return await served.status_of(big), await served.status_of(huge), served.backend.requests

    (code, details), (huge_code, huge_details), seen = run(tokenizer, test)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details == f"the request is {len(big)} bytes; the limit is {LIMIT}"
    # past twice the limit grpc itself refuses the message before buffering it
    assert huge_code == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in huge_details
    assert seen == []


def f32(x: float) -> bytes:
    return struct.pack("<f", x)


@pytest.mark.parametrize("raw, message", [
    # an int32 field sent a 64-bit value: protobuf keeps the low 32 bits (here 0)
    (with_sampling(varint(1 << 3) + varint(2**40)), "sampling.max_tokens: must be an integer in [1, 2147483647], got 0"),
    (with_sampling(varint(4 << 3) + varint(2**64 - 1)), "sampling.top_k: must be an integer in [0, 2147483647] "
                                                          "(0 disables it), got -1"),
    (with_sampling(varint(2 << 3 | 5) + f32(float("inf"))), "sampling.temperature: must be a number in [0, 100], got inf"),
    (with_sampling(varint(3 << 3 | 5) + f32(float("nan"))), "sampling.top_p: must be in (0, 1], got nan"),
    (with_sampling(field(7, varint(2**64 - 5))), "sampling.stop_token_ids: must be token ids in [0, 2147483647], "
                                                  "got -5"),
    (field(4, field(1, varint(7) + varint(2**64 - 1))), "prompt_token_ids.ids: token id -1 outside [0, 49152)"),
    (field(4, field(1, varint(49152))), "prompt_token_ids.ids: token id 49152 outside [0, 49152)"),
    (field(3, field(1, field(1, b"function") + field(2, b"x"))), "chat.messages[0].role: must be one of "
                                                                  "system, user, assistant, tool, got 'function'"),
    (field(2, b"x" * (2048 * 81 + 1)), "prompt: 165889 characters cannot fit the context window of 2048 tokens "
                                        "(at most 165888 characters would)"),
    (b"", "prompt: give one of prompt, chat, prompt_token_ids"),
])
def test_values_out_of_range_are_invalid_argument_naming_the_field(tokenizer, raw, message):
    code, details = run(tokenizer, lambda served: served.status_of(raw), limit=4 * LIMIT)
    assert (code, details) == (grpc.StatusCode.INVALID_ARGUMENT, message)


def test_a_valid_request_streams_through_the_parsing_and_a_cancel_reaches_the_backend(tokenizer):
    async def test(served: Served):
        items = await served.generate_raw(VALID)
        served.backend.token_delay_s = 0.05
        slow = generate_pb2.GenerateRequest(prompt="x", sampling=common_pb2.SamplingParams(
            max_tokens=500, ignore_eos=True)).SerializeToString()
        call = served.channel.unary_stream(GENERATE, request_serializer=None,
                                           response_deserializer=generate_pb2.GenerateResponse.FromString)(slow)
        await call.read()
        call.cancel()
        closed = await asyncio.get_running_loop().run_in_executor(None, served.backend.closed_early.wait, 5)
        return items, closed

    items, closed = run(tokenizer, test)
    assert "".join(i.delta.text for i in items[:-1]) == "The capital of"
    assert items[-1].final.finish_reason == "length" and items[-1].final.usage.completion_tokens == 3
    assert closed, "the backend kept generating for a cancelled call"


def test_the_conductor_process_parses_requests_itself_and_limits_both_front_doors():
    """`serve_conductor` wires `RequestParsing` behind the API key check and gives its HTTP
    frontend the same `max_request_bytes`."""
    import httpx
    from conductor_thread import running_conductor

    with running_conductor(max_request_bytes=LIMIT, api_key="k" * 32) as c:
        with grpc.insecure_channel(c.client_address) as ch:
            call = ch.unary_stream(GENERATE, request_serializer=None, response_deserializer=None)
            key = (("authorization", "Bearer " + "k" * 32),)
            results = []
            for raw, metadata in ((b"\xff\xff", key), (field(2, b"x" * LIMIT), key), (b"\xff\xff", None)):
                with pytest.raises(grpc.RpcError) as err:
                    list(call(raw, timeout=10, metadata=metadata))
                results.append((err.value.code(), err.value.details()))
        r = httpx.post(f"{c.http_url}/v1/completions", content=b"{" + b" " * LIMIT + b"}", timeout=10,
                       headers={"content-type": "application/json", "authorization": "Bearer " + "k" * 32})
    assert results[0][0] == grpc.StatusCode.INVALID_ARGUMENT and "does not parse" in results[0][1]
    assert results[1] == (grpc.StatusCode.INVALID_ARGUMENT, f"the request is {LIMIT + 4} bytes; the limit is {LIMIT}")
    assert results[2][0] == grpc.StatusCode.UNAUTHENTICATED  # the key is checked before anything is parsed
    assert r.status_code == 413


def test_fuzzed_messages_get_ok_or_invalid_argument_only(tokenizer):
    """400 seeded mutations (flipped, inserted, dropped bytes; cuts; splices) of valid
    requests of each input kind: each is served or refused with INVALID_ARGUMENT."""
    import random

    rng = random.Random(20261101)
    sampling = common_pb2.SamplingParams(max_tokens=2, temperature=0.5, top_p=0.9, top_k=40, seed=9,
                                         stop=["\n"], stop_token_ids=[2])
    seeds = [
        generate_pb2.GenerateRequest(request_id="r-1", prompt="The capital of France is", sampling=sampling),
        generate_pb2.GenerateRequest(chat=generate_pb2.ChatMessages(messages=[
            generate_pb2.ChatMessage(role="system", content="Be brief."),
            generate_pb2.ChatMessage(role="user", content="Hi \u00e9\U0001f600")]), sampling=sampling),
        generate_pb2.GenerateRequest(prompt_token_ids=generate_pb2.TokenIds(ids=[1, 2, 3, 400]), sampling=sampling),
    ]
    raws = [m.SerializeToString() for m in seeds]

    def mutate(raw: bytes) -> bytes:
        data = bytearray(raw)
        for _ in range(rng.randrange(1, 4)):
            op = rng.randrange(5)
            at = rng.randrange(len(data)) if data else 0
            if op == 0 and data:
                data[at] ^= 1 << rng.randrange(8)
            elif op == 1:
                data[at:at] = bytes([rng.choice([0x00, 0x7F, 0x80, 0xC3, 0xED, 0xFF, rng.randrange(256)])])
            elif op == 2 and data:
                del data[at]
            elif op == 3:
                data = data[:at]
            else:
                data[at:at] = rng.choice(raws)[: rng.randrange(1, 40)]
        return bytes(data)

    async def test(served: Served):
        seen: dict[grpc.StatusCode, int] = {}
        for n in range(400):
            raw = mutate(rng.choice(raws))
            code, details = await served.status_of(raw)
            seen[code] = seen.get(code, 0) + 1
            assert code in (grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT), (n, raw, code, details)
            assert "<class" not in details and "Traceback" not in details, (n, raw, details)
        return seen

    seen = run(tokenizer, test)
    assert seen.get(grpc.StatusCode.OK, 0) >= 10 and seen.get(grpc.StatusCode.INVALID_ARGUMENT, 0) >= 100, seen
