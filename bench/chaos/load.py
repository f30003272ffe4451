"""The chaos suite's client load: fixed, seeded prompts sent greedily (EOS ignored, so every
answer has exactly `max_tokens` tokens and the same prompt gives the same tokens on any
healthy cluster), over gRPC, HTTP or alternating, each request bounded by a timeout.

`ClosedLoop` keeps `concurrency` requests in flight until it has sent `requests` of them
(or is stopped); `open_loop` sends at a fixed rate whatever happens. Request n carries
prompt n mod len(prompts), so a long run cycles through the pool and every answer can
be compared with the fault-free run's answer to the same prompt; with `api="mixed"` the
API alternates by request number, so each prompt is asked over both.
Each request ends as one `Outcome` (see `bench.chaos.report` for what the statuses mean).
"""
from __future__ import annotations

import asyncio
import json
import random
import time
import uuid
from dataclasses import dataclass

import grpc
import httpx

from bench.chaos.report import Outcome, names_exception_class
from proto.halfmoon.v1 import common_pb2, generate_pb2, generate_pb2_grpc

UNCLEAN_GRPC = (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)
APIS = ("grpc", "http", "mixed")


@dataclass(frozen=True, slots=True)
class LoadPlan:
    requests: int = 40
    concurrency: int = 6
    max_tokens: int = 24
    min_prompt_tokens: int = 48
    max_prompt_tokens: int = 160
    timeout_s: float = 60.0  # a request not ended by then is `hung`
    api: str = "mixed"  # "grpc" | "http" | "mixed" (even requests gRPC, odd HTTP)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.api not in APIS:
            raise ValueError(f"api must be one of {APIS}, got {self.api!r}")
        if not 1 <= self.min_prompt_tokens <= self.max_prompt_tokens:
            raise ValueError("prompt lengths: need 1 <= min_prompt_tokens <= max_prompt_tokens")
        if self.requests < 1 or self.concurrency < 1 or self.max_tokens < 1 or self.timeout_s <= 0:
            raise ValueError("requests, concurrency, max_tokens and timeout_s must be positive")

    def api_of(self, index: int) -> str:
        return ("grpc", "http")[index % 2] if self.api == "mixed" else self.api


def make_prompts(n: int, plan: LoadPlan, vocab: tuple[int, int] = (100, 40000)) -> list[tuple[int, ...]]:
    """Prompt i of every run with this plan's seed: distinct random token ids (no shared prefixes)."""
    rng = random.Random(plan.seed)
    return [tuple(rng.randrange(*vocab) for _ in range(rng.randint(plan.min_prompt_tokens, plan.max_prompt_tokens)))
            for _ in range(n)]


def classify_http_error(status: int, raw: bytes) -> tuple[str, str]:
    """(status, message) of an HTTP error answer: 5xx without an OpenAI-shaped body naming
    the failure, or an internal error, is unclean."""
    try:
        err = json.loads(raw)["error"]
        message, code = str(err["message"]), err.get("code")
    except (ValueError, KeyError, TypeError):
        message, code = raw.decode(errors="replace")[:300], None
    text = f"HTTP {status}: {message}"
    if status >= 500 and (code is None or code == "internal_error"):
        return "failed_unclean", text
    return "failed_clean", text


class LoadClient:
    """One gRPC channel and one HTTP connection pool to the conductor."""

    def __init__(self, grpc_address: str, http_address: str | None, timeout_s: float) -> None:
        self._channel = grpc.aio.insecure_channel(grpc_address)
        self._gen = generate_pb2_grpc.GenerationStub(self._channel)
        self._http = None if http_address is None else httpx.AsyncClient(
            base_url=f"http://{http_address}", timeout=httpx.Timeout(timeout_s + 5, connect=5.0),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=64))
        self.timeout_s = timeout_s

    async def close(self) -> None:
        await self._channel.close()
        if self._http is not None:
            await self._http.aclose()

    async def one(self, index: int, prompt: tuple[int, ...], max_tokens: int, api: str) -> Outcome:
        t0 = time.monotonic()
        tokens: list[int] = []
        first: list[float] = []
        try:
            async with asyncio.timeout(self.timeout_s):
                if api == "grpc":
                    status, error = await self._grpc(prompt, max_tokens, tokens, first)
                else:
                    status, error = await self._http_stream(prompt, max_tokens, tokens, first)
        except TimeoutError:
            status, error = "hung", f"no end within {self.timeout_s:g}s ({len(tokens)} tokens so far)"
        if status == "failed_clean" and names_exception_class(error):
            status = "failed_unclean"  # a clean status around a leaked internal error
        return Outcome(index, api, t0, time.monotonic(), status, error, tuple(tokens),
                       first[0] - t0 if first else None)

    async def _grpc(self, prompt, max_tokens: int, tokens: list[int], first: list[float]) -> tuple[str, str]:
        req = generate_pb2.GenerateRequest(
            request_id=f"chaos-{uuid.uuid4().hex[:12]}", prompt_token_ids=generate_pb2.TokenIds(ids=prompt),
            sampling=common_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
        call = self._gen.Generate(req, timeout=self.timeout_s + 5)
        final = None
        try:
            async for msg in call:
                if msg.HasField("delta") and msg.delta.token_ids:
                    if not first:
                        first.append(time.monotonic())
                    tokens.extend(msg.delta.token_ids)
                elif msg.HasField("final"):
                    final = msg.final
        except grpc.aio.AioRpcError as e:
            text = f"{e.code().name}: {e.details()}"
            if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                return "hung", text
            return ("failed_unclean" if e.code() in UNCLEAN_GRPC else "failed_clean"), text
        finally:
            call.cancel()
        if final is None:
            return "failed_unclean", "the stream ended without a Final"
        if final.finish_reason == "abort":
            return "failed_clean", "finish_reason abort"
        return "completed", ""

    async def _http_stream(self, prompt, max_tokens: int, tokens: list[int], first: list[float]) -> tuple[str, str]:
        if self._http is None:
            raise ValueError("this load client has no HTTP address")
        body = {"prompt": list(prompt), "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True,
                "stream": True, "return_token_ids": True}
        try:
            async with self._http.stream("POST", "/v1/completions", json=body) as response:
                if response.status_code != 200:
                    return classify_http_error(response.status_code, await response.aread())
                async for line in response.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line.removeprefix("data: ")
                    if data == "[DONE]":
                        return "completed", ""
                    event = json.loads(data)
                    if "error" in event:
                        status, text = classify_http_error(500, data.encode())
                        return status, "error event: " + text.removeprefix("HTTP 500: ")
                    for choice in event.get("choices", ()):
                        ids = choice.get("token_ids")
                        if ids:
                            if not first:
                                first.append(time.monotonic())
                            tokens.extend(ids)
            return "failed_unclean", "the stream ended without [DONE]"
        except httpx.TimeoutException as e:
            return "hung", f"HTTP: {e!r}"
        except httpx.HTTPError as e:  # refused or dropped connection: the client knows at once
            return "failed_clean", f"HTTP connection failed: {e or 'closed'}"


class ClosedLoop:
    """`concurrency` workers, each sending its next request when the last one ends (after
    `backoff_s` if it failed), until `count` were sent or `stop` is set."""

    def __init__(self, client: LoadClient, plan: LoadPlan, prompts: list[tuple[int, ...]], start: int = 0,
                 count: int | None = None, backoff_s: float = 0.0) -> None:
        self.client = client
        self.plan = plan
        self.prompts = prompts
        self.backoff_s = backoff_s
        self._next = start
        self._end = start + (plan.requests if count is None else count)
        self.sent = 0
        self.outcomes: list[Outcome] = []
        self._progress = asyncio.Condition()

    async def wait_sent(self, k: int) -> None:
        """Until at least `k` requests have been sent (or every one there is to send)."""
        async with self._progress:
            await self._progress.wait_for(lambda: self.sent >= k or self._next >= self._end)

    async def _worker(self, stop: asyncio.Event | None) -> None:
        while self._next < self._end and not (stop is not None and stop.is_set()):
            n = self._next
            self._next += 1
            self.sent += 1
            async with self._progress:
                self._progress.notify_all()
            out = await send(self.client, self.plan, self.prompts, n)
            self.outcomes.append(out)
            if out.status != "completed" and self.backoff_s:
                await asyncio.sleep(self.backoff_s)

    async def run(self, stop: asyncio.Event | None = None) -> list[Outcome]:
        try:
            await asyncio.gather(*(self._worker(stop) for _ in range(self.plan.concurrency)))
        finally:
            self._next = self._end
            async with self._progress:
                self._progress.notify_all()
        return sorted(self.outcomes, key=lambda o: o.sent_s)


def send(client: LoadClient, plan: LoadPlan, prompts: list[tuple[int, ...]], n: int):
    """Request number n of a load."""
    i = n % len(prompts)
    return client.one(i, prompts[i], plan.max_tokens, plan.api_of(n))


async def open_loop(client: LoadClient, plan: LoadPlan, prompts: list[tuple[int, ...]], rate: float,
                    duration_s: float, start: int = 0) -> list[Outcome]:
    """Send requests start, start+1, ... at `rate` per second for `duration_s`, not waiting
    for answers; returns once every request sent has ended."""
    t0 = time.monotonic()
    tasks = []
    for k in range(max(1, round(rate * duration_s))):
        await asyncio.sleep(max(0.0, t0 + k / rate - time.monotonic()))
        tasks.append(asyncio.ensure_future(send(client, plan, prompts, start + k)))
    return list(await asyncio.gather(*tasks))
