"""The replayer's client for the conductor's OpenAI-compatible HTTP API.

Each request is a streamed `POST /v1/completions` with the prompt as token ids, greedy,
`ignore_eos`, and halfmoon's `return_token_ids` extension, so every server-sent chunk
names the tokens it carries and the replayer can time each one (OpenAI chunks carry only
text, which can lag a token mid-codepoint). HTTP 429 is a rejection (with `Retry-After`);
any other error status, or an error event inside the stream, fails the request with the
server's message. The HTTP API exposes no per-node counters, so `node_metrics` is empty
and the prefix-cache hit rate is not reported for this target (use grpc:// for it).

`dialect="llama.cpp"` drives llama.cpp's `llama-server` the same way through its native
streamed `POST /completion` (token-id prompt, `n_predict`, `ignore_eos`, `cache_prompt`,
`return_tokens`: every chunk names its tokens; the last carries `"stop": true`) and waits
on its `GET /health` (503 while the model loads). `ignore_eos=False` lets answers end at
the model's end-of-sequence token (bench.peers' quality check).
"""
from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator

import httpx

from bench.replay.client import Rejected, RequestFailed, StreamEvent


DIALECTS = ("halfmoon", "llama.cpp")


class HttpReplayClient:
    def __init__(self, address: str, timeout_s: float = 600.0, *, dialect: str = "halfmoon",
                 ignore_eos: bool = True) -> None:
        if dialect not in DIALECTS:
            raise ValueError(f"dialect must be one of {DIALECTS}, got {dialect!r}")
        self.address = address
        self.dialect = dialect
        self.ignore_eos = ignore_eos
        self._http = httpx.AsyncClient(base_url=f"http://{address}",
                                       timeout=httpx.Timeout(timeout_s, connect=5.0),
                                       limits=httpx.Limits(max_connections=None, max_keepalive_connections=64))

    async def check(self, timeout_s: float = 5.0) -> None:
        """Fail fast, with the address, if no frontend answers or it cannot serve yet (`/ready`)."""
        try:
            r = await self._http.get("/ready" if self.dialect == "halfmoon" else "/health", timeout=timeout_s)
        except httpx.HTTPError as e:
            raise RequestFailed(f"no HTTP frontend at {self.address}: {e!r}") from None
        if r.status_code != 200:
            raise RequestFailed(f"HTTP frontend at {self.address} is not ready: {r.status_code} {r.text[:200]}")

    async def generate(self, request_id: str, prompt_token_ids: list[int], max_tokens: int
                       ) -> AsyncIterator[StreamEvent]:
        if self.dialect == "halfmoon":
            path = "/v1/completions"
            body = {"prompt": prompt_token_ids, "max_tokens": max_tokens, "temperature": 0.0,
                    "ignore_eos": self.ignore_eos, "stream": True, "return_token_ids": True,
                    "user": f"{request_id}-{uuid.uuid4().hex[:8]}"}
        else:
            path = "/completion"
            body = {"prompt": prompt_token_ids, "n_predict": max_tokens, "temperature": 0.0,
                    "ignore_eos": self.ignore_eos, "stream": True, "return_tokens": True, "cache_prompt": True}
        try:
            async with self._http.stream("POST", path, json=body) as response:
                if response.status_code != 200:
                    raise _status_error(response.status_code, await response.aread(), response.headers)
                async for line in response.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line.removeprefix("data: ")
                    if data == "[DONE]":
                        return
                    event = json.loads(data)
                    if "error" in event:
                        raise RequestFailed(f"error event: {_message(event)}")
                    if self.dialect == "llama.cpp":
                        if event.get("tokens"):
                            yield StreamEvent(tuple(event["tokens"]))
                        if event.get("stop"):
                            return
                        continue
                    for choice in event.get("choices", ()):
                        ids = choice.get("token_ids")
                        if ids:
                            yield StreamEvent(tuple(ids))
            raise RequestFailed("the stream ended without [DONE]")
        except httpx.HTTPError as e:
            raise RequestFailed(f"HTTP: {e!r}") from None

    async def node_metrics(self) -> dict[str, float]:
        return {}

    async def close(self) -> None:
        await self._http.aclose()


def _message(body: object) -> str:
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return str(body["error"].get("message", body["error"]))
    return str(body)[:500]


def _status_error(status: int, raw: bytes, headers: httpx.Headers) -> Rejected | RequestFailed:
    try:
        message = _message(json.loads(raw))
    except ValueError:
        message = raw.decode(errors="replace")[:500]
    if status == 429:
        retry = headers.get("retry-after")
        try:
            return Rejected(message, float(retry) if retry else None)
        except ValueError:
            return Rejected(message)
    return RequestFailed(f"HTTP {status}: {message}")
