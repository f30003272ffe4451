"""The API fuzzer: its inputs are the same for a seed and cover every category (with the
inputs each category promises), its hand-made protobuf bytes mean what they say, its
verdicts are right, and a run against controlled fake servers counts exactly the
answers those servers give."""
from __future__ import annotations

import asyncio
import hashlib
import json
from collections import Counter

import grpc
import pytest
from google.protobuf.message import DecodeError

from bench.fuzz import (CATEGORIES, GRPC_CATEGORIES, HTTP_CATEGORIES, Case, FuzzConfig, FuzzReport, _http_verdict,
                        _Sender, cases, generate_request, pb_bytes, pb_float, pb_int, run_fuzz, sampling)
from proto.halfmoon.v1 import generate_pb2


def fingerprint(case) -> tuple:
    return (case.index, case.category, case.api, case.method, case.path, case.headers, case.copies, case.slow,
            hashlib.sha256(case.body).hexdigest())


def test_the_same_seed_gives_the_same_inputs_and_another_seed_others():
    a = [fingerprint(c) for c in cases(400, seed=3)]
    b = [fingerprint(c) for c in cases(400, seed=3)]
    c = [fingerprint(c) for c in cases(400, seed=4)]
    assert a == b
    assert sum(x != y for x, y in zip(a, c)) > 300


@pytest.fixture(scope="module")
def many():
    return list(cases(1500, seed=0))


def test_every_category_comes_first_once_then_by_weight_across_both_apis(many):
    got = many
    assert [c.category for c in got[: len(CATEGORIES)]] == list(CATEGORIES)
    counts = Counter(c.category for c in got)
    assert set(counts) == set(CATEGORIES)
    assert {c.api for c in got if c.category in HTTP_CATEGORIES} == {"http"}
    assert {c.api for c in got if c.category in GRPC_CATEGORIES} == {"grpc"}
    # weights hold roughly: extreme numbers (14) far more often than huge bodies (1)
    assert counts["extreme_numbers"] > 5 * counts["huge_body"]
    assert 0.4 < sum(c.api == "http" for c in got) / len(got) < 0.75


def test_the_categories_hold_what_they_promise(many):
    def _bodies(category: str):
        return [c for c in many if c.category == category]

    extreme = b"".join(c.body for c in _bodies("extreme_numbers"))
    for token in (b"1e400", b"9" * 4301, b"NaN", b"1e-320", b"18446744073709551616", b"-9223372036854775809"):
        assert token in extreme, token
    filling = [c for c in _bodies("extreme_numbers") if c.body.count(b",") > 2000]  # context-filling prompts
    filling += [c for c in _bodies("proto_extreme") if c.what in ("max_tokens=8192", "max_tokens=2147483647")]
    assert filling and all(c.slow for c in filling)  # a 2,044-token prefill is slow, not hung
    assert all(c.slow for c in _bodies("huge_body") + _bodies("proto_huge"))
    assert not any(c.slow for c in _bodies("valid") + _bodies("malformed_json"))
    bad = _bodies("bad_utf8")
    raw = [c for c in bad if "raw" in c.what]
    assert raw and all(_undecodable(c.body) for c in raw)
    assert any(b"\\ud800" in c.body for c in bad)
    deep = _bodies("deep_nesting")
    assert max(c.body.count(b"[") + c.body.count(b'{"a"') for c in deep) >= 100_000
    ctypes = {dict(c.headers).get("content-type") for c in _bodies("wrong_content_type")}
    assert {"text/plain", "application/x-www-form-urlencoded", None} <= ctypes
    assert max(len(c.body) for c in _bodies("huge_body")) >= 4 << 20
    assert all(c.copies >= 2 for c in _bodies("duplicate_ids") + _bodies("proto_duplicate_ids"))
    assert {c.method for c in _bodies("wrong_route")} >= {"GET", "PUT", "DELETE"}
    assert all(json.loads(c.body)["max_tokens"] <= 3 for c in _bodies("valid"))  # the model's time stays small
    undecodable = [c for c in _bodies("proto_bad_utf8")]
    assert undecodable and all(_fails_to_parse(c.body) for c in undecodable)
    assert any(_fails_to_parse(c.body) for c in _bodies("random_proto"))
    for c in _bodies("proto_valid") + _bodies("proto_unknown_fields"):
        generate_pb2.GenerateRequest.FromString(c.body)  # parse (unknown fields kept aside)


def _undecodable(body: bytes) -> bool:
    try:
        body.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


def _fails_to_parse(body: bytes) -> bool:
    try:
        generate_pb2.GenerateRequest.FromString(body)
    except DecodeError:
        return True
    return False


def test_hand_made_protobuf_bytes_mean_what_they_say():
    msg = generate_pb2.GenerateRequest.FromString(generate_request(prompt=b"Hi", request_id=b"r1"))
    assert (msg.request_id, msg.prompt, msg.sampling.max_tokens, msg.sampling.temperature) == ("r1", "Hi", 2, 0.0)
    msg = generate_pb2.GenerateRequest.FromString(generate_request(
        token_ids=[1, 2, 300], sampling_bytes=sampling(top_k=pb_int(4, -1), seed=pb_int(5, -2**63),
                                                       top_p=pb_float(3, 0.5), stop=pb_bytes(6, b"xy"))))
    assert list(msg.prompt_token_ids.ids) == [1, 2, 300]
    assert (msg.sampling.top_k, msg.sampling.seed, msg.sampling.top_p, list(msg.sampling.stop)) == (
        -1, -2**63, 0.5, ["xy"])
    chat = generate_pb2.GenerateRequest.FromString(generate_request(chat=[(b"user", b"hello")]))
    assert [(m.role, m.content) for m in chat.chat.messages] == [("user", "hello")]
    assert generate_pb2.GenerateRequest.FromString(generate_request(prompt=None)).WhichOneof("input") is None


def test_http_verdicts():
    shaped = json.dumps({"error": {"message": "temperature: must be finite", "type": "invalid_request_error"}})
    assert _http_verdict(400, shaped.encode(), False) == ("failed_clean", "HTTP 400: temperature: must be finite",
                                                         True)
    assert _http_verdict(415, b"nope", False) == ("failed_clean", "HTTP 415: nope", False)
    assert _http_verdict(500, shaped.encode(), False)[0] == "failed_unclean"
    assert _http_verdict(503, b"", False)[0] == "failed_unclean"
    assert _http_verdict(200, b'{"choices": []}', False) == ("completed", "HTTP 200", True)
    sse = b'data: {"choices": []}\n\ndata: {"error": {"message": "m", "type": "server_error"}}\n\ndata: [DONE]\n\n'
    assert _http_verdict(200, sse, True) == ("failed_unclean", "HTTP 200 error event: m", True)
    sse = sse.replace(b"server_error", b"rate_limit_error")
    assert _http_verdict(200, sse, True)[0] == "failed_clean"


# --- a run against controlled fake servers -------------------------------------------------------

async def _fake_servers():
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from cluster.specs import free_port
    from conductor.http_server import HttpServer

    async def anything(request):
        body = await request.body()
        if request.url.path == "/v1/models":
            return JSONResponse({"object": "list", "data": [{"id": "fake-model"}]})
        if request.url.path == "/health":
            return JSONResponse({"status": "ok"})
        if b"zzz" in body:  # never answers
            await asyncio.sleep(3600)
        if b"1e400" in body:  # the fake's one "bug"
            return JSONResponse({"error": {"message": "overflow", "type": "server_error"}}, status_code=500)
        return JSONResponse({"error": {"message": "no", "type": "invalid_request_error"}}, status_code=400)

    methods = ["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"]
    app = Starlette(routes=[Route("/{path:path}", anything, methods=methods)])
    port = free_port()
    http = HttpServer(app, "127.0.0.1", port)
    task = asyncio.ensure_future(http.serve())

    async def generate(raw, context):
        try:
            msg = generate_pb2.GenerateRequest.FromString(raw)
        except DecodeError:
            await context.abort(grpc.StatusCode.INTERNAL, "Exception deserializing request!")
        if msg.prompt == "zzz":
            await asyncio.sleep(3600)
        yield b""

    handler = grpc.method_handlers_generic_handler("halfmoon.v1.Generation", {
        "Generate": grpc.unary_stream_rpc_method_handler(generate)})
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 64 << 20)])
    server.add_generic_rpc_handlers((handler,))
    hs = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(hs, server)
    gport = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    await hs.set("", health_pb2.HealthCheckResponse.SERVING)
    for _ in range(100):
        try:
            _, w = await asyncio.open_connection("127.0.0.1", port)
            w.close()
            break
        except OSError:
            await asyncio.sleep(0.05)
    return http, task, server, f"127.0.0.1:{gport}", f"127.0.0.1:{port}"


def test_a_run_counts_exactly_what_the_servers_answer():
    n = 60

    async def go():
        http, task, server, gaddr, haddr = await _fake_servers()
        try:
            return await run_fuzz(FuzzConfig(gaddr, haddr, count=n, seed=5, concurrency=6, health_every_s=0.05))
        finally:
            await http.shutdown()
            task.cancel()
            await server.stop(0)

    report = asyncio.run(go())
    sent = list(cases(n, seed=5, model="fake-model"))
    sends = sum(c.copies for c in sent)
    unclean = sum(c.copies for c in sent if c.api == "http" and c.method not in ("GET", "HEAD", "OPTIONS")
                  and b"1e400" in c.body)
    unclean += sum(c.copies for c in sent if c.api == "grpc" and _fails_to_parse(c.body))
    assert unclean > 0
    assert len(report.outcomes) == sends
    assert report.count("failed_unclean") == unclean
    assert report.count("hung") == 0
    assert report.count("completed") >= sum(c.copies for c in sent if c.api == "grpc" and not _fails_to_parse(c.body))
    assert set(report.by_category) == set(CATEGORIES)
    assert report.health_polls >= 1 and report.health_lost == 0
    assert not report.passed
    doc = report.to_json()
    assert doc["failed_unclean"] == unclean and doc["inputs"] == sends
    assert all(len(v) <= 5 for v in doc["examples"].values())


def test_an_unanswered_input_is_hung_after_the_timeout_and_a_slow_one_gets_longer():
    async def go():
        http, task, server, gaddr, haddr = await _fake_servers()
        report = FuzzReport()
        sender = _Sender(FuzzConfig(gaddr, haddr, timeout_s=0.3, slow_timeout_s=0.6), report)
        t0 = asyncio.get_running_loop().time()
        try:
            await asyncio.gather(
                sender.send(Case(0, "valid", "grpc", "sleepy", generate_request(prompt=b"zzz"))),
                sender.send(Case(1, "valid", "http", "sleepy", b'{"prompt": "zzz"}')),
                sender.send(Case(2, "huge_body", "http", "sleepy and slow", b'{"prompt": "zzz"}', slow=True, copies=2)))
            return report, asyncio.get_running_loop().time() - t0
        finally:
            await sender.close()
            await http.shutdown()
            task.cancel()
            await server.stop(0)

    report, took = asyncio.run(go())
    assert [o.status for o in report.outcomes] == ["hung"] * 4
    assert sorted(o.error for o in report.outcomes) == ["huge_body: no answer within 0.6s"] * 2 + [
        "valid: no answer within 0.3s"] * 2
    assert took < 5
    assert sorted(report.examples["valid"]) == ["#0 sleepy -> no answer within 0.3s",
                                                "#1 sleepy -> no answer within 0.3s"]
