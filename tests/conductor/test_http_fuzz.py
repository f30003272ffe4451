"""A seeded fuzz of the HTTP front door: hundreds of mutated bodies (type confusion, extreme
numbers, deep nesting, bad UTF-8, huge arrays, unknown fields, wrong content types) against
the real app, the conductor's real intake and the fake cluster. No answer may be a 5xx,
every 4xx carries an OpenAI-shaped JSON error, and the server stays healthy throughout."""
from __future__ import annotations

import json
import random

import httpx
import pytest
from fakes import IntakeBackend
from prometheus_client import CollectorRegistry

from conductor.http_frontend import build_app, serve_http
from conductor.intake import Intake
from engine.tokenizer import Tokenizer

pytestmark = pytest.mark.timeout(60)

SEED = 1111
CASES = 1000
LIMIT = 256 * 1024

CHAT = {"model": None, "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        "max_tokens": 4, "temperature": 0.7, "top_p": 0.9, "seed": 3, "stop": ["\n"], "stream": False}
COMPLETION = {"prompt": "The capital of France is", "max_tokens": 3, "top_k": 5, "stop_token_ids": [2],
              "ignore_eos": False, "stream": True, "stream_options": {"include_usage": True}}
FIELDS = sorted(set(CHAT) | set(COMPLETION) | {
    "n", "logprobs", "presence_penalty", "frequency_penalty", "logit_bias", "echo", "best_of", "suffix",
    "max_completion_tokens", "top_logprobs", "tools", "tool_choice", "parallel_tool_calls", "response_format",
    "user", "return_token_ids", "bogus", "", "max_tokens\u0000", "\u00e9t\u00e9"})
CONTENT_TYPES = ["application/json", "application/json; charset=utf-8", "APPLICATION/JSON", None, "text/plain",
                 "application/x-www-form-urlencoded", "multipart/form-data; boundary=zz", "application/json; charset=utf-16",
                 "application/json;", "application/*", "", "application/json, text/plain"]
# JSON text spliced in as-is: values json.dumps cannot produce
RAW = ["1e400", "-1e400", "NaN", "Infinity", "-0", "1e-320", "9" * 4400, "-" + "9" * 30, str(2**63), str(2**64),
       str(-(2**63) - 1), '"\\ud800"', '"a\\udfffb"', '"\\u0000"', "[" * 3000 + "]" * 3000, "[" * 63 + "]" * 63,
       '{"a": ' * 80 + "1" + "}" * 80, "true", "null", '""', "[]", "{}", "0.5", "-1", "0"]


def value(rng: random.Random):
    kind = rng.randrange(14)
    if kind == 0:
        return rng.choice([0, 1, -1, 2**31, 2**31 - 1, 2**53 + 1, 10**18, -(10**18)])
    if kind == 1:
        return rng.choice([0.0, -0.0, 1e-45, 1e-300, 0.5, 1.0, 1.0000001, 2.0, 100.0, 100.1, 1e30, 3.4e38, -1.5])
    if kind == 2:
        return rng.choice([True, False, None])
    if kind == 3:
        return rng.choice(["", "x", " ", "\n", "\u00e9", "\U0001f600", "a" * rng.randrange(1, 5000), "<|im_start|>"])
    if kind == 4:
        return [value(rng) for _ in range(rng.randrange(0, 5))]
    if kind == 5:
        return {rng.choice(FIELDS): value(rng) for _ in range(rng.randrange(0, 4))}
    if kind == 6:
        return [rng.randrange(-5, 60000) for _ in range(rng.randrange(0, 3000))]
    if kind == 7:
        return [rng.choice(["a", "", 1, None]) for _ in range(rng.randrange(0, 20_000))]
    if kind == 8:
        return [{"role": rng.choice(["user", "system", "assistant", "developer", "tool", "", 3]),
                 "content": rng.choice(["hi", None, "", [{"type": "text", "text": "x"}], [{"type": "image_url"}], 7])}
                for _ in range(rng.randrange(0, 4))]
    if kind == 9:
        return {"type": rng.choice(["text", "json_object"]), "schema": value(rng)}
    return f"@RAW{rng.randrange(len(RAW))}@"


def body_bytes(rng: random.Random) -> tuple[str, bytes]:
    chat = rng.random() < 0.5
    body = dict(CHAT if chat else COMPLETION)
    body = {k: v for k, v in body.items() if v is not None}
    for _ in range(rng.randrange(1, 4)):
        action = rng.random()
        if action < 0.6:
            body[rng.choice(FIELDS)] = value(rng)
        elif action < 0.9 and body:
            del body[rng.choice(sorted(body))]
    if rng.random() < 0.05:
        body = value(rng)  # the whole body not an object
    raw = json.dumps(body, ensure_ascii=rng.random() < 0.5).encode()
    for i, text in enumerate(RAW):
        raw = raw.replace(f'"@RAW{i}@"'.encode(), text.encode())
    mutation = rng.random()
    if mutation < 0.08 and raw:
        raw = raw[: rng.randrange(len(raw))]  # truncated
    elif mutation < 0.16 and raw:
        at = rng.randrange(len(raw))
        raw = raw[:at] + rng.choice([b"\xff", b"\xed\xa0\x80", b"\xc3", b"\x00", b"\xef\xbb\xbf", b"}"]) + raw[at:]
    elif mutation < 0.2:
        raw = b"\xef\xbb\xbf" + raw
    elif mutation < 0.24:
        raw = rng.randbytes(rng.randrange(0, 200))
    elif mutation < 0.27:
        raw = raw + b" " * LIMIT  # over the limit
    path = "/v1/chat/completions" if chat != (rng.random() < 0.15) else "/v1/completions"
    return path, raw


@pytest.fixture(scope="module")
def server(real_model_dir):
    registry = CollectorRegistry()
    backend = IntakeBackend(registry, Intake(Tokenizer(real_model_dir), max_model_len=2048, block_size=16))
    srv = serve_http(build_app(backend, registry, max_body_bytes=LIMIT))
    yield backend, srv.url
    srv.stop()


def check_error(r: httpx.Response, case: str) -> None:
    assert r.headers["content-type"] == "application/json", case
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}, case
    assert isinstance(err["message"], str) and err["message"], case
    assert err["param"] is None or isinstance(err["param"], str), case
    for word in ("Error", "Exception", "Traceback"):
        assert word not in err["message"], f"{case}: {err['message']}"


def test_fuzzed_bodies_never_get_a_5xx(server):
    backend, url = server
    rng = random.Random(SEED)
    statuses: dict[int, int] = {}
    with httpx.Client(base_url=url, timeout=20) as client:
        for n in range(CASES):
            path, raw = body_bytes(rng)
            content_type = rng.choice(CONTENT_TYPES) if rng.random() < 0.25 else "application/json"
            headers = {} if content_type is None else {"content-type": content_type}
            case = f"case {n}: POST {path} {content_type!r} {raw[:160]!r}"
            r = client.post(path, content=raw, headers=headers)
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
            assert r.status_code < 500, f"{case} -> {r.status_code} {r.text[:300]}"
            if r.status_code >= 400:
                check_error(r, case)
            elif r.headers["content-type"].startswith("text/event-stream"):
                events = [e for e in r.text.split("\n\n") if e]
                assert events[-1] == "data: [DONE]" and '"error"' not in r.text, case
            else:
                assert r.json()["choices"], case
            if n % 100 == 0:
                assert client.get("/health").json() == {"status": "ok"}
    # the fuzz reached every kind of answer, not just one early refusal
    assert statuses.get(200, 0) > 20 and statuses.get(400, 0) > 200, statuses
    assert statuses.get(413, 0) > 5 and statuses.get(415, 0) > 20, statuses
    assert set(statuses) <= {200, 400, 404, 413, 415}, statuses
