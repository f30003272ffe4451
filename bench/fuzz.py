"""A seeded fuzzer of both client APIs: the OpenAI-compatible HTTP routes and the gRPC
Generation service.

    python -m bench.fuzz --grpc 127.0.0.1:50051 --http 127.0.0.1:8000 --count 5000 --json out/fuzz.json

`cases(count, seed)` yields the same inputs for the same seed, one category at a time in
a seeded order (each category at least once, then by weight):

- HTTP: malformed JSON, extreme numbers (1e400, 2**64, 4,301-digit integers, NaN, 1e-320,
  ...) in every numeric field, deep nesting, bad UTF-8 (raw bytes and lone surrogate
  escapes) in every string field, wrong content types, huge bodies, duplicate request
  ids sent concurrently, wrong types, wrong methods and paths, and valid requests with
  random sampling settings (short answers, so the model's time stays small);
- gRPC: random and mangled protobuf bytes, extreme values in every sampling field, bad
  UTF-8 in every string field, unknown fields, huge messages, duplicate request ids.

Every call is bounded by a timeout (`--timeout`, 60 s; 180 s for inputs slow by nature:
huge bodies, prompts that fill the context). A verdict per input (`bench.chaos.report.Outcome`):
`completed` (2xx / OK), `failed_clean` (4xx, or a gRPC status other than INTERNAL /
UNKNOWN), `failed_unclean` (any 5xx, an error event inside a 200 stream that is a server
error, INTERNAL, UNKNOWN, or no answer at all), `hung` (timeout). Meanwhile /health and the
gRPC health service are polled every 0.25 s; a poll that fails or takes over 2 s counts
as health lost. The run passes with 0 unclean, 0 hung and health never lost.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import struct
import sys
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from bench import flags
from bench.chaos.report import Outcome, names_exception_class

HTTP_CATEGORIES = {  # category -> weight
    "malformed_json": 10, "extreme_numbers": 14, "deep_nesting": 4, "bad_utf8": 10, "wrong_content_type": 6,
    "huge_body": 1, "duplicate_ids": 3, "wrong_types": 10, "wrong_route": 4, "valid": 6,
}
GRPC_CATEGORIES = {
    "random_proto": 10, "proto_extreme": 14, "proto_bad_utf8": 8, "proto_unknown_fields": 4, "proto_huge": 1,
    "proto_duplicate_ids": 3, "proto_valid": 5,
}
CATEGORIES = {**HTTP_CATEGORIES, **GRPC_CATEGORIES}
GENERATE = "/halfmoon.v1.Generation/Generate"
MAX_MODEL_LEN = 2048


@dataclass(frozen=True, slots=True)
class Case:
    index: int
    category: str
    api: str  # "http" | "grpc"
    what: str  # a short description, for the report
    body: bytes = b""  # HTTP body, or the serialized gRPC request
    method: str = "POST"
    path: str = "/v1/completions"
    headers: tuple[tuple[str, str], ...] = (("content-type", "application/json"),)
    copies: int = 1  # sent this many times at once (duplicate ids)
    slow: bool = False  # slow by nature (huge body, context-filling prompt): the longer timeout


# --- protobuf wire format, by hand (for bytes the generated classes refuse to build) ----

def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _key(field_no: int, wire: int) -> bytes:
    return _varint(field_no << 3 | wire)


def pb_int(field_no: int, value: int) -> bytes:
    return _key(field_no, 0) + _varint(value)


def pb_bytes(field_no: int, value: bytes) -> bytes:
    return _key(field_no, 2) + _varint(len(value)) + value


def pb_float(field_no: int, value: float) -> bytes:
    return _key(field_no, 5) + struct.pack("<f", value)


def pb_packed(field_no: int, values: list[int]) -> bytes:
    return pb_bytes(field_no, b"".join(_varint(v) for v in values))


def sampling(max_tokens: int = 2, **extra: bytes) -> bytes:
    """SamplingParams bytes: max_tokens, greedy, plus any raw fields given."""
    return pb_int(1, max_tokens) + pb_float(2, 0.0) + b"".join(extra.values())


def generate_request(*, prompt: bytes | None = b"Hello", request_id: bytes = b"", sampling_bytes: bytes | None = None,
                     token_ids: list[int] | None = None, chat: list[tuple[bytes, bytes]] | None = None) -> bytes:
    out = pb_bytes(1, request_id) if request_id else b""
    if chat is not None:
        out += pb_bytes(3, b"".join(pb_bytes(1, pb_bytes(1, r) + pb_bytes(2, c)) for r, c in chat))
    elif token_ids is not None:
        out += pb_bytes(4, pb_packed(1, token_ids))
    elif prompt is not None:
        out += pb_bytes(2, prompt)
    return out + pb_bytes(5, sampling() if sampling_bytes is None else sampling_bytes)


# --- the values -------------------------------------------------------------------------

BIG_DIGITS = "9" * 4301
EXTREME_NUMBERS = ("0", "-1", "-0.0", "1e-40", "1e-320", "5e-324", "1e30", "1e308", "1e400", "-1e400", "NaN",
                   "Infinity", "-Infinity", "2147483648", "9007199254740993", "9223372036854775807",
                   "9223372036854775808", "-9223372036854775809", "18446744073709551616", "1" + "0" * 100,
                   BIG_DIGITS, "-" + BIG_DIGITS, "1.5", "true", "\"7\"", "null", "[]", "{}")
NUMERIC_FIELDS = ("max_tokens", "temperature", "top_p", "top_k", "seed", "n", "presence_penalty",
                  "frequency_penalty", "max_completion_tokens", "logprobs", "best_of")
BAD_BYTES = (b"\xff", b"\xfe\xff", b"\xed\xa0\x80", b"\xed\xbf\xbf", b"\xc0\xaf", b"\xe2\x82", b"\xf8\x88\x80\x80\x80",
             b"\x80", b"\xf4\x90\x80\x80")
BAD_ESCAPES = ("\\ud800", "\\udfff", "\\ud800\\ud800", "\\udc00\\ud800", "x\\ud83d", "\\u0000")
STRING_FIELDS = ("prompt", "stop", "model", "user", "content", "role", "name")
CONTENT_TYPES = ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
                 "application/xml", "", "application/json; charset=latin-1", "application/json; charset=utf-16",
                 "APPLICATION/JSON", "application/json-patch+json", "text/html", None)
WRONG_TYPES = (
    ("prompt", "5"), ("prompt", "true"), ("prompt", "{}"), ("prompt", "[[1, 2], [3]]"), ("prompt", "[1.5]"),
    ("prompt", "[\"a\", 1]"), ("prompt", "\"\""), ("prompt", "[]"), ("prompt", "[-1]"), ("prompt", "[49152]"),
    ("prompt", "[\"a\", \"b\"]"), ("stream", "\"yes\""), ("stream", "1"), ("stop", "5"), ("stop", "[1]"),
    ("stop", "[\"\"]"), ("model", "5"), ("temperature", "\"0.5\""), ("stream_options", "{\"include_usage\": \"x\"}"),
    ("stream_options", "{\"include_usage\": true}"), ("n", "2"), ("logprobs", "true"), ("echo", "true"),
    ("suffix", "\"x\""), ("logit_bias", "{\"1\": 100}"), ("stop_token_ids", "\"1\""), ("stop_token_ids", "[-1]"),
    ("ignore_eos", "\"no\""), ("user", "[]"), ("extra_field", "1"), ("return_token_ids", "null"),
)
WRONG_CHAT = ("\"hi\"", "[]", "[{}]", "[{\"role\": \"wizard\", \"content\": \"x\"}]", "[{\"role\": \"user\"}]",
              "[{\"role\": \"user\", \"content\": 5}]", "[{\"role\": \"user\", \"content\": [{\"type\": \"image_url\"}]}]",
              "[{\"role\": \"user\", \"content\": [{\"type\": \"text\"}]}]", "[null]", "{\"role\": \"user\"}",
              "[{\"role\": \"user\", \"content\": \"x\", \"tool_calls\": []}]")
ROUTES = (("GET", "/v1/completions"), ("PUT", "/v1/completions"), ("DELETE", "/v1/chat/completions"),
          ("POST", "/v1/models"), ("POST", "/v1/completions/"), ("POST", "//v1/completions"), ("GET", "/v1/%ff"),
          ("GET", "/v1/../health"), ("GET", "/health?x=%zz"), ("GET", "/" + "a" * 8000), ("HEAD", "/health"),
          ("OPTIONS", "/v1/completions"), ("POST", "/v1/embeddings"), ("GET", "/metrics/x"), ("PATCH", "/health"))
WORDS = ("the", "capital", "of", "France", "is", "Paris", "😀", "naïve", "日本", "\t", "\n", "<|im_start|>",
         "<|endoftext|>", "\\", "\"", "'", "{", "}", "%s", "\u202e", "\ufeff", "\u200b")


def _many_ids(n: int, start: int) -> list[int]:
    """n valid token ids, cheaply (huge bodies need no randomness inside)."""
    return [(start + 7919 * k) % 49152 for k in range(n)]


class _Gen:
    def __init__(self, seed: int, model: str) -> None:
        self.rng = random.Random(seed)
        self.model = model

    # helpers
    def text(self, lo: int = 1, hi: int = 8) -> str:
        return " ".join(self.rng.choice(WORDS) for _ in range(self.rng.randint(lo, hi)))

    def ids(self, lo: int = 1, hi: int = 16) -> list[int]:
        return [self.rng.randrange(0, 49152) for _ in range(self.rng.randint(lo, hi))]

    def small_body(self, chat: bool | None = None) -> dict:
        """A valid request with a short answer."""
        chat = self.rng.random() < 0.5 if chat is None else chat
        body: dict = {"model": self.model, "max_tokens": self.rng.randint(1, 3), "temperature": 0.0}
        if chat:
            body["messages"] = [{"role": "user", "content": self.text()}]
        else:
            body["prompt"] = self.text() if self.rng.random() < 0.7 else self.ids()
        return body

    def path_for(self, body: dict) -> str:
        return "/v1/chat/completions" if "messages" in body else "/v1/completions"

    def with_raw(self, body: dict, key: str, raw: str) -> bytes:
        """`body` as JSON with `key` set to the raw JSON text `raw` (which json.dumps cannot write)."""
        body = dict(body)
        body[key] = "\x00PLACEHOLDER\x00"
        return json.dumps(body).replace('"\\u0000PLACEHOLDER\\u0000"', raw).encode()

    # HTTP
    def malformed_json(self, i: int) -> Case:
        body = self.small_body()
        text = json.dumps(body)
        kind = self.rng.randrange(12)
        if kind == 0:
            raw, what = text[: self.rng.randrange(len(text))], "truncated"
        elif kind == 1:
            p = self.rng.randrange(len(text))
            raw, what = text[:p] + self.rng.choice("{}[],:\"\\x") + text[p:], "stray character"
        elif kind == 2:
            raw, what = text.replace('"', "'"), "single quotes"
        elif kind == 3:
            raw, what = text[:-1] + ",}", "trailing comma"
        elif kind == 4:
            raw, what = text + self.rng.choice(["x", "{}", "\x00", " ]"]), "trailing garbage"
        elif kind == 5:
            raw, what = self.rng.choice(["", " ", "null", "[]", "123", "\"s\"", "true", "[{}]"]), "not an object"
        elif kind == 6:
            raw, what = "\ufeff" + text, "BOM prefix"
        elif kind == 7:
            raw, what = text.replace("0.0", "NaN"), "NaN literal"
        elif kind == 8:
            raw, what = text.replace('": ', '": ' * 2, 1), "double colon"
        elif kind == 9:
            return Case(i, "malformed_json", "http", "random bytes", bytes(self.rng.randrange(256) for _ in
                                                                              range(self.rng.randint(1, 300))),
                        path=self.path_for(body))
        elif kind == 10:
            raw, what = text.replace("}", ', "model": "x", "model": "y"}', 1), "duplicate keys"
        else:
            raw, what = text[:1] + "/* c */" + text[1:], "comment"
        return Case(i, "malformed_json", "http", what, raw.encode("utf-8", "surrogatepass"), path=self.path_for(body))

    def extreme_numbers(self, i: int) -> Case:
        body = self.small_body()
        key = self.rng.choice(NUMERIC_FIELDS + ("stop_token_ids", "prompt_ids"))
        value = self.rng.choice(EXTREME_NUMBERS)
        if key == "stop_token_ids":
            return Case(i, "extreme_numbers", "http", f"stop_token_ids=[{value[:20]}]",
                        self.with_raw(body, key, f"[{value}]"), path=self.path_for(body))
        if key == "prompt_ids":
            body.pop("messages", None)
            return Case(i, "extreme_numbers", "http", f"prompt=[{value[:20]}]",
                        self.with_raw(body, "prompt", f"[1, {value}]"))
        slow = False
        if key in ("max_tokens", "max_completion_tokens") and value in ("9007199254740993", "2147483648") \
                and self.rng.random() < 0.5:
            # beyond the context window with a prompt that fills it: capped or refused, never run long
            # (a 2,044-token prefill takes ~13 s on two loaded CPU cores: allow for a queue)
            body.pop("messages", None)
            body["prompt"] = self.ids(MAX_MODEL_LEN - 4, MAX_MODEL_LEN - 4)
            value = str(self.rng.choice([8192, 2**31 - 1]))
            slow = True
        if key == "max_tokens" and value == "1" + "0" * 100:
            value = BIG_DIGITS
        return Case(i, "extreme_numbers", "http", f"{key}={value[:20]}", self.with_raw(body, key, value),
                    path=self.path_for(body), slow=slow)

    def deep_nesting(self, i: int) -> Case:
        depth = self.rng.choice([64, 500, 1000, 5000, 100_000])
        kind = self.rng.choice(["[", "{"])
        raw = ("[" * depth + "]" * depth) if kind == "[" else ('{"a": ' * depth + "1" + "}" * depth)
        body = self.small_body()
        key = self.rng.choice(["prompt", "stop", "logit_bias", "extra", "messages", "stream_options"])
        return Case(i, "deep_nesting", "http", f"{key}: {kind} x {depth}", self.with_raw(body, key, raw),
                    path=self.path_for(body) if key != "messages" else "/v1/chat/completions")

    def bad_utf8(self, i: int) -> Case:
        key = self.rng.choice(STRING_FIELDS)
        chat = key in ("content", "role", "name")
        body = self.small_body(chat=chat)
        if self.rng.random() < 0.5:
            bad = self.rng.choice(BAD_BYTES)
            what = f"{key} with raw {bad!r}"
            marker = "BADBYTESHERE"
            value: object = f"ab{marker}cd"
        else:
            bad = None
            esc = self.rng.choice(BAD_ESCAPES)
            what = f"{key} with escape {esc}"
            marker = "BADESCAPEHERE"
            value = f"ab{marker}cd"
        if key == "stop":
            body["stop"] = [value]
        elif chat:
            body["messages"] = [{"role": "user", "content": "hi"} | {key: value}]
        else:
            body[key] = value
        raw = json.dumps(body).encode()
        raw = raw.replace(marker.encode(), bad if bad is not None else esc.encode())
        return Case(i, "bad_utf8", "http", what, raw, path=self.path_for(body))

    def wrong_content_type(self, i: int) -> Case:
        body = self.small_body()
        ctype = self.rng.choice(CONTENT_TYPES)
        if ctype == "application/x-www-form-urlencoded" and self.rng.random() < 0.5:
            raw = f"model={self.model}&prompt=hello&max_tokens=1".encode()
        elif ctype == "application/json; charset=utf-16":
            raw = json.dumps(body).encode("utf-16")
        else:
            raw = json.dumps(body).encode()
        headers = () if ctype is None else (("content-type", ctype),)
        return Case(i, "wrong_content_type", "http", f"content-type {ctype!r}", raw, path=self.path_for(body),
                    headers=headers)

    def huge_body(self, i: int) -> Case:
        size = self.rng.choices([256 << 10, 1 << 20, 4 << 20, 8 << 20, 16 << 20], weights=[4, 4, 2, 2, 1])[0]
        kind = self.rng.choice(["prompt", "ids", "messages", "stop", "unknown"])
        body = self.small_body(chat=kind == "messages")
        if kind == "prompt":
            body["prompt"] = ("lorem ipsum " * (size // 12 + 1))[:size]
        elif kind == "ids":
            body["prompt"] = _many_ids(size // 6, self.rng.randrange(49152))
        elif kind == "messages":
            body["messages"] = [{"role": "user", "content": "hi there"}] * (size // 40)
        elif kind == "stop":
            body["stop"] = ["x" * 10] * (size // 14)
        else:
            body["padding"] = "z" * size
        return Case(i, "huge_body", "http", f"{kind} {size >> 10} KiB", json.dumps(body).encode(),
                    path=self.path_for(body), slow=True)

    def duplicate_ids(self, i: int) -> Case:
        body = self.small_body() | {"user": f"dup-{self.rng.randrange(1000)}"}
        n = self.rng.randint(2, 5)
        return Case(i, "duplicate_ids", "http", f"{n} concurrent with user={body['user']}", json.dumps(body).encode(),
                    path=self.path_for(body), copies=n,
                    headers=(("content-type", "application/json"), ("x-request-id", body["user"])))

    def wrong_types(self, i: int) -> Case:
        if self.rng.random() < 0.3:
            body = self.small_body(chat=True)
            raw = self.rng.choice(WRONG_CHAT)
            return Case(i, "wrong_types", "http", f"messages={raw[:40]}", self.with_raw(body, "messages", raw),
                        path="/v1/chat/completions")
        key, raw = self.rng.choice(WRONG_TYPES)
        body = self.small_body(chat=key != "prompt" and self.rng.random() < 0.3)
        if key == "prompt":
            body.pop("messages", None)
        return Case(i, "wrong_types", "http", f"{key}={raw[:40]}", self.with_raw(body, key, raw),
                    path=self.path_for(body))

    def wrong_route(self, i: int) -> Case:
        method, path = self.rng.choice(ROUTES)
        return Case(i, "wrong_route", "http", f"{method} {path[:40]}", json.dumps(self.small_body()).encode(),
                    method=method, path=path)

    def valid(self, i: int) -> Case:
        body = self.small_body()
        r = self.rng
        if r.random() < 0.5:
            body["temperature"] = r.choice([0.0, 1e-6, 0.3, 0.7, 1.0, 1.5, 2.0])
        if r.random() < 0.4:
            body["top_p"] = r.choice([1e-6, 0.1, 0.5, 0.9, 1.0])
        if r.random() < 0.3:
            body["top_k"] = r.choice([0, 1, 5, 50])
        if r.random() < 0.3:
            body["seed"] = r.randrange(-2**63, 2**63)
        if r.random() < 0.3:
            body["stop"] = [self.text(1, 2) for _ in range(r.randint(1, 3))]
        if r.random() < 0.3:
            body["stream"] = True
            if r.random() < 0.5:
                body["stream_options"] = {"include_usage": True}
        if r.random() < 0.2:
            body["return_token_ids"] = True
        return Case(i, "valid", "http", "valid " + ",".join(sorted(body)), json.dumps(body).encode(),
                    path=self.path_for(body))

    # gRPC
    def random_proto(self, i: int) -> Case:
        kind = self.rng.randrange(3)
        if kind == 0:
            raw, what = bytes(self.rng.randrange(256) for _ in range(self.rng.randint(0, 200))), "random bytes"
        else:
            good = generate_request(prompt=self.text().encode(), request_id=f"r{i}".encode())
            if kind == 1:
                raw, what = good[: self.rng.randrange(len(good))], "truncated"
            else:
                b = bytearray(good)
                for _ in range(self.rng.randint(1, 4)):
                    b[self.rng.randrange(len(b))] = self.rng.randrange(256)
                raw, what = bytes(b), "flipped bytes"
        return Case(i, "random_proto", "grpc", what, raw)

    def proto_extreme(self, i: int) -> Case:
        r = self.rng
        fld = r.choice(["max_tokens", "temperature", "top_p", "top_k", "seed", "stop_token_ids", "prompt_token_ids",
                        "empty_input", "empty_ids", "long_request_id", "many_stops", "nul_stop"])
        s, kw, what, slow = None, {}, fld, False
        if fld == "max_tokens":
            v = r.choice([-2**31, -1, 0, 2**40, 2**63, 8192, 2**31 - 1])
            if v in (8192, 2**31 - 1):  # with a prompt that fills the context: capped or refused, never long
                kw["token_ids"] = self.ids(MAX_MODEL_LEN - 4, MAX_MODEL_LEN - 4)
                slow = True
            s, what = pb_int(1, v) + pb_float(2, 0.0), f"max_tokens={v}"
        elif fld in ("temperature", "top_p"):
            v = r.choice([float("nan"), float("inf"), float("-inf"), 1e-40, 1e-45, 1e30, 3.4e38, -0.0, -1.0, 0.0,
                          1.0000001])
            s, what = sampling(**{fld: pb_float(2 if fld == "temperature" else 3, v)}), f"{fld}={v}"
        elif fld == "top_k":
            v = r.choice([-1, -2**31, 2**31 - 1, 2**40])
            s, what = sampling(top_k=pb_int(4, v)), f"top_k={v}"
        elif fld == "seed":
            v = r.choice([-2**63, 2**63 - 1, 2**64 - 1, 0])
            s, what = sampling(seed=pb_int(5, v)), f"seed={v}"
        elif fld == "stop_token_ids":
            v = r.choice([-1, 2**31 - 1, 49152, 2**40])
            s, what = sampling(stop_ids=pb_packed(7, [v])), f"stop_token_ids=[{v}]"
        elif fld == "prompt_token_ids":
            v = r.choice([-1, 2**31 - 1, 49152, 2**40])
            kw["token_ids"], what = [1, v], f"prompt_token_ids=[1, {v}]"
        elif fld == "empty_input":
            kw["prompt"] = None
        elif fld == "empty_ids":
            kw["token_ids"] = []
        elif fld == "long_request_id":
            kw["request_id"] = b"r" * r.choice([1000, 100_000])
        elif fld == "many_stops":
            s = sampling(stops=b"".join(pb_bytes(6, b"x") for _ in range(r.choice([100, 10_000]))))
        else:
            s = sampling(stop=pb_bytes(6, b"\x00"))
        return Case(i, "proto_extreme", "grpc", what, generate_request(sampling_bytes=s, **kw), slow=slow)

    def proto_bad_utf8(self, i: int) -> Case:
        bad = self.rng.choice(BAD_BYTES)
        where = self.rng.choice(["prompt", "request_id", "chat.role", "chat.content", "stop"])
        if where == "prompt":
            raw = generate_request(prompt=b"ab" + bad)
        elif where == "request_id":
            raw = generate_request(request_id=b"id" + bad)
        elif where == "chat.role":
            raw = generate_request(chat=[(b"user" + bad, b"hi")])
        elif where == "chat.content":
            raw = generate_request(chat=[(b"user", b"hi" + bad)])
        else:
            raw = generate_request(sampling_bytes=sampling(stop=pb_bytes(6, bad)))
        return Case(i, "proto_bad_utf8", "grpc", f"{where} with {bad!r}", raw)

    def proto_unknown_fields(self, i: int) -> Case:
        extra = self.rng.choice([pb_int(99, 1), pb_bytes(1000, b"x" * 10), pb_int(536870911, 7), pb_float(15, 1.0)])
        where = self.rng.choice(["request", "sampling"])
        if where == "request":
            raw = generate_request() + extra
        else:
            raw = generate_request(sampling_bytes=sampling() + extra)
        return Case(i, "proto_unknown_fields", "grpc", f"unknown field in {where}", raw)

    def proto_huge(self, i: int) -> Case:
        size = self.rng.choices([1 << 20, 3 << 20, 8 << 20], weights=[3, 2, 1])[0]
        if self.rng.random() < 0.5:
            raw, what = generate_request(prompt=b"lorem ipsum " * (size // 12)), f"prompt {size >> 10} KiB"
        else:
            raw, what = generate_request(token_ids=_many_ids(size // 3, self.rng.randrange(49152))), \
                f"{size // 3} token ids"
        return Case(i, "proto_huge", "grpc", what, raw, slow=True)

    def proto_duplicate_ids(self, i: int) -> Case:
        n = self.rng.randint(2, 5)
        rid = f"dup-{self.rng.randrange(1000)}".encode()
        return Case(i, "proto_duplicate_ids", "grpc", f"{n} concurrent with request_id={rid.decode()}",
                    generate_request(prompt=self.text().encode(), request_id=rid), copies=n)

    def proto_valid(self, i: int) -> Case:
        r = self.rng
        extra = {}
        if r.random() < 0.5:
            extra["t"] = pb_float(2, r.choice([1e-6, 0.5, 1.0, 2.0]))
        if r.random() < 0.4:
            extra["p"] = pb_float(3, r.choice([1e-6, 0.5, 1.0]))
        if r.random() < 0.3:
            extra["k"] = pb_int(4, r.choice([0, 1, 40]))
        if r.random() < 0.3:
            extra["s"] = pb_int(5, r.randrange(-2**63, 2**63))
        if r.random() < 0.3:
            extra["stop"] = pb_bytes(6, self.text(1, 1).encode())
        s = pb_int(1, r.randint(1, 3)) + b"".join(extra.values())
        kind = r.randrange(3)
        if kind == 0:
            raw = generate_request(prompt=self.text().encode(), sampling_bytes=s)
        elif kind == 1:
            raw = generate_request(token_ids=self.ids(), sampling_bytes=s)
        else:
            raw = generate_request(chat=[(b"system", b"Be brief."), (b"user", self.text().encode())], sampling_bytes=s)
        return Case(i, "proto_valid", "grpc", "valid " + ",".join(sorted(extra)), raw)


def cases(count: int, seed: int = 0, model: str = "smollm2-135m-instruct") -> Iterator[Case]:
    """`count` inputs, the same ones for the same seed: every category once, then by weight."""
    gen = _Gen(seed, model)
    names = list(CATEGORIES)
    weights = [CATEGORIES[n] for n in names]
    for i in range(count):
        name = names[i] if i < len(names) else gen.rng.choices(names, weights)[0]
        yield getattr(gen, name)(i)


# --- sending ------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class FuzzConfig:
    grpc_address: str
    http_address: str
    count: int = 5000
    seed: int = 0
    concurrency: int = 8
    timeout_s: float = 60.0  # an input not answered by then is `hung`
    slow_timeout_s: float = 180.0  # for inputs slow by nature (a 2,044-token prefill takes ~13 s on 2 loaded cores)
    health_every_s: float = 0.25
    health_limit_s: float = 2.0


@dataclass
class FuzzReport:
    outcomes: list[Outcome] = field(default_factory=list)
    by_category: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))
    examples: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))  # non-clean, per category
    class_names: int = 0  # error messages naming a Python exception class
    unshaped: int = 0  # HTTP 4xx/5xx whose body is not {"error": {"message": ...}}
    health_polls: int = 0
    health_lost: int = 0
    health_worst_s: float = 0.0
    health_examples: list[str] = field(default_factory=list)
    wall_s: float = 0.0

    def count(self, status: str) -> int:
        return sum(1 for o in self.outcomes if o.status == status)

    @property
    def passed(self) -> bool:
        return self.count("failed_unclean") == 0 and self.count("hung") == 0 and self.health_lost == 0

    def summary_line(self) -> str:
        return (f"fuzz: {len(self.outcomes)} inputs in {self.wall_s:.0f}s, {self.count('failed_unclean')} unclean, "
                f"{self.count('hung')} hung, health lost {self.health_lost}/{self.health_polls} polls "
                f"(worst {self.health_worst_s:.2f}s), {self.class_names} messages naming an exception class, "
                f"{self.unshaped} unshaped HTTP errors")

    def to_json(self) -> dict:
        return {"inputs": len(self.outcomes), "completed": self.count("completed"),
                "failed_clean": self.count("failed_clean"), "failed_unclean": self.count("failed_unclean"),
                "hung": self.count("hung"), "passed": self.passed, "wall_s": self.wall_s,
                "health": {"polls": self.health_polls, "lost": self.health_lost, "worst_s": self.health_worst_s,
                           "examples": self.health_examples[:10]},
                "class_names": self.class_names, "unshaped": self.unshaped,
                "by_category": {k: dict(v) for k, v in sorted(self.by_category.items())},
                "examples": {k: v for k, v in sorted(self.examples.items())}}


def _http_verdict(status: int, raw: bytes, streamed: bool) -> tuple[str, str, bool]:
    """(status, the answer in brief, whether an error body is OpenAI-shaped)."""
    shaped = True
    message = ""
    if status >= 400:
        try:
            err = json.loads(raw)["error"]
            message = str(err["message"])
        except (ValueError, KeyError, TypeError):
            shaped = False
            message = raw[:200].decode(errors="replace")
    if status >= 500:
        return "failed_unclean", f"HTTP {status}: {message[:200]}", shaped
    if status >= 400:
        return "failed_clean", f"HTTP {status}: {message[:200]}", shaped
    if streamed:
        for line in raw.decode(errors="replace").splitlines():
            if line.startswith("data: {") and '"error"' in line:
                try:
                    err = json.loads(line.removeprefix("data: "))["error"]
                except (ValueError, KeyError):
                    return "failed_unclean", f"HTTP {status} stream with a broken error event", False
                kind = "failed_unclean" if err.get("type") == "server_error" else "failed_clean"
                return kind, f"HTTP {status} error event: {str(err.get('message'))[:200]}", True
    return "completed", f"HTTP {status}", True


class _Sender:
    def __init__(self, cfg: FuzzConfig, report: FuzzReport) -> None:
        import grpc
        import httpx

        self.grpc = grpc
        self.httpx = httpx
        self.cfg = cfg
        self.report = report
        self.http = httpx.AsyncClient(base_url=f"http://{cfg.http_address}",
                                      timeout=httpx.Timeout(cfg.slow_timeout_s + 10, connect=5.0),
                                      limits=httpx.Limits(max_connections=None, max_keepalive_connections=32))
        self.channel = grpc.aio.insecure_channel(cfg.grpc_address, options=[
            ("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)])
        self.generate = self.channel.unary_stream(GENERATE, request_serializer=None, response_deserializer=None)

    async def close(self) -> None:
        await self.http.aclose()
        await self.channel.close()

    async def send(self, case: Case) -> None:
        outs = await asyncio.gather(*(self._one(case, k) for k in range(case.copies)))
        for status, answer, shaped in outs:
            self._record(case, status, answer, shaped)

    def _record(self, case: Case, status: str, answer: str, shaped: bool) -> None:
        r = self.report
        now = time.monotonic()
        r.outcomes.append(Outcome(-1 - case.index, case.api, now, now, status,
                                  "" if status == "completed" else f"{case.category}: {answer}"))
        r.by_category[case.category][status] += 1
        if names_exception_class(answer):
            r.class_names += 1
        if not shaped:
            r.unshaped += 1
        if status in ("failed_unclean", "hung") and len(r.examples[case.category]) < 5:
            r.examples[case.category].append(f"#{case.index} {case.what} -> {answer}")

    async def _one(self, case: Case, copy: int) -> tuple[str, str, bool]:
        timeout_s = self.cfg.slow_timeout_s if case.slow else self.cfg.timeout_s
        try:
            async with asyncio.timeout(timeout_s):
                if case.api == "http":
                    return await self._http(case)
                return await self._grpc(case, timeout_s)
        except TimeoutError:
            return "hung", f"no answer within {timeout_s:g}s", True

    async def _http(self, case: Case) -> tuple[str, str, bool]:
        httpx = self.httpx
        try:
            req = self.http.build_request(case.method, case.path, content=case.body if case.method not in (
                "GET", "HEAD", "OPTIONS") else None, headers=dict(case.headers))
            resp = await self.http.send(req)
            streamed = resp.headers.get("content-type", "").startswith("text/event-stream")
            return _http_verdict(resp.status_code, resp.content, streamed)
        except httpx.TimeoutException:
            return "hung", "HTTP timeout", True
        except (httpx.HTTPError, UnicodeError) as e:
            return "failed_unclean", f"no HTTP answer: {e or 'the connection closed'}", True

    async def _grpc(self, case: Case, timeout_s: float) -> tuple[str, str, bool]:
        grpc = self.grpc
        call = self.generate(case.body, timeout=timeout_s + 5)
        try:
            async for _ in call:
                pass
            return "completed", "OK", True
        except grpc.aio.AioRpcError as e:
            answer = f"{e.code().name}: {(e.details() or '')[:200]}"
            if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                return "hung", answer, True
            if e.code() in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN):
                return "failed_unclean", answer, True
            return "failed_clean", answer, True
        finally:
            call.cancel()


def _watch_health(cfg: FuzzConfig, report: FuzzReport, stop: threading.Event) -> None:
    """Poll /health and gRPC health until `stop`; runs in a thread of its own, so neither
    the fuzzer's own work nor its event loop can delay a poll."""
    import grpc
    import httpx
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with httpx.Client(base_url=f"http://{cfg.http_address}") as http, grpc.insecure_channel(cfg.grpc_address) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while not stop.is_set():
            t0 = time.monotonic()
            problem = ""
            try:
                r = http.get("/health", timeout=cfg.health_limit_s)
                if r.status_code != 200:
                    problem = f"/health answered {r.status_code}"
                res = stub.Check(health_pb2.HealthCheckRequest(), timeout=cfg.health_limit_s)
                if res.status != health_pb2.HealthCheckResponse.SERVING:
                    problem = f"gRPC health {health_pb2.HealthCheckResponse.ServingStatus.Name(res.status)}"
            except (httpx.HTTPError, grpc.RpcError) as e:
                problem = f"{type(e).__name__}: {e}"[:200]
            took = time.monotonic() - t0
            report.health_polls += 1
            report.health_worst_s = max(report.health_worst_s, took)
            if problem or took > cfg.health_limit_s:
                report.health_lost += 1
                if len(report.health_examples) < 10:
                    report.health_examples.append(problem or f"health took {took:.2f}s")
            stop.wait(max(0.0, t0 + cfg.health_every_s - time.monotonic()))


async def _model_name(cfg: FuzzConfig) -> str:
    import httpx

    async with httpx.AsyncClient(base_url=f"http://{cfg.http_address}") as http:
        r = await http.get("/v1/models", timeout=10)
        r.raise_for_status()
        return r.json()["data"][0]["id"]


async def run_fuzz(cfg: FuzzConfig, progress=None) -> FuzzReport:
    report = FuzzReport()
    model = await _model_name(cfg)
    sender = _Sender(cfg, report)
    stop = threading.Event()
    health = threading.Thread(target=_watch_health, args=(cfg, report, stop), name="fuzz-health", daemon=True)
    health.start()
    loop = asyncio.get_running_loop()
    t0 = time.monotonic()
    slots = asyncio.Semaphore(cfg.concurrency)
    pending: set[asyncio.Task] = set()

    async def one(case: Case) -> None:
        try:
            await sender.send(case)
        finally:
            slots.release()
            if progress:
                progress()

    inputs = cases(cfg.count, cfg.seed, model)
    try:
        while (case := await loop.run_in_executor(None, next, inputs, None)) is not None:  # huge ones take a while
            await slots.acquire()
            task = asyncio.ensure_future(one(case))
            pending.add(task)
            task.add_done_callback(pending.discard)
        if pending:
            await asyncio.gather(*pending)
    finally:
        report.wall_s = time.monotonic() - t0
        stop.set()
        await loop.run_in_executor(None, health.join)
        await sender.close()
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="halfmoon bench fuzz", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--grpc", default="127.0.0.1:50051", help="the conductor's gRPC address")
    ap.add_argument("--http", default="127.0.0.1:8000", help="the conductor's HTTP address")
    ap.add_argument("--count", type=flags.count(1), default=5000)
    ap.add_argument("--seed", type=flags.SEED, default=0)
    ap.add_argument("--concurrency", type=flags.count(1), default=8)
    ap.add_argument("--timeout", type=flags.positive, default=60.0, help="seconds before an input counts as hung")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    done = [0]

    def progress() -> None:
        done[0] += 1
        if done[0] % 500 == 0:
            print(f"{done[0]}/{args.count} inputs", file=sys.stderr)

    report = asyncio.run(run_fuzz(FuzzConfig(args.grpc, args.http, args.count, args.seed, args.concurrency,
                                             timeout_s=args.timeout, slow_timeout_s=3 * args.timeout), progress))
    print(report.summary_line())
    for category, counts in sorted(report.by_category.items()):
        print(f"  {category:22s} " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    for category, examples in sorted(report.examples.items()):
        for e in examples:
            print(f"  ! {category}: {e}")
    for e in report.health_examples:
        print(f"  ! health: {e}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report.to_json(), indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0 if report.passed else 1


if __name__ == "__main__":
    raise SystemExit(main())
