"""In-process stand-ins for the conductor, for testing its front doors without a cluster."""
from __future__ import annotations

import asyncio
import re
import threading
from dataclasses import replace
from typing import AsyncIterator

from prometheus_client import CollectorRegistry

from conductor.metrics import ConductorMetrics
from conductor.frontend_api import Finished, GenerateRequest, Rejected, Timing, TokenChunk, Usage


def words(text: str) -> list[str]:
    """The fake's "tokens": words with their leading whitespace."""
    return re.findall(r"\s*\S+", text)


class FakeBackend:
    """Answers every request with `reply`, one word per token, up to `max_tokens`.

    Records what it was asked (`requests`), raises `fail_next` (once) after
    `fail_after_tokens` tokens, waits `token_delay_s` before each token, and sets `closed_early` when a
    consumer stops iterating before the `Finished`. Records metrics like the real
    conductor does, so `/metrics` moves.
    """

    model_name = "fake-model"

    def __init__(self, registry: CollectorRegistry, reply: str = "The capital of France is Paris.") -> None:
        self.metrics = ConductorMetrics(registry)
        self.reply = reply
        self.requests: list[GenerateRequest] = []
        self.fail_next: Exception | None = None
        self.fail_after_tokens = 0
        self.token_delay_s = 0.0
        self.closed_early = threading.Event()

    def reset(self) -> None:
        self.requests.clear()
        self.fail_next = None
        self.fail_after_tokens = 0
        self.token_delay_s = 0.0
        self.closed_early.clear()

    async def generate(self, request: GenerateRequest) -> AsyncIterator[TokenChunk | Finished]:
        self.requests.append(request)
        clock = self.metrics.start_request()
        failure, self.fail_next = self.fail_next, None
        reply = words(self.reply)
        n = min(len(reply), request.sampling.max_tokens)
        if request.sampling.ignore_eos:
            n = request.sampling.max_tokens
            reply = reply * (n // len(reply) + 1)
        prompt_tokens = len(request.prompt_token_ids or ()) or len(words(request.prompt or "")) or sum(
            len(words(m.content)) for m in request.messages or ()
        )
        done = failure is not None  # failing on purpose is not closing early
        try:
            for i in range(n):
                if failure is not None and i == self.fail_after_tokens:
                    if isinstance(failure, Rejected):
                        self.metrics.observe_rejected(failure.reason)
                    raise failure
                if self.token_delay_s:
                    await asyncio.sleep(self.token_delay_s)
                clock.on_tokens(1)
                yield TokenChunk(reply[i], (i,))
            finished = Finished(
                "length" if n < len(words(self.reply)) or request.sampling.ignore_eos else "stop",
                Usage(prompt_tokens=prompt_tokens, completion_tokens=n, cached_tokens=0),
                Timing(queue_s=0.001, prefill_s=0.002, kv_transfer_s=0.001, first_decode_s=0.001, ttft_s=0.005),
            )
            clock.on_finished(finished)
            done = True
            yield finished
        finally:
            if not done:
                self.closed_early.set()


class IntakeBackend(FakeBackend):
    """The conductor's real intake (`conductor.intake.Intake`: validation, character cap,
    tokenizing, max_tokens capping) in front of the fake cluster: what the front doors see
    of the live conductor before any node is involved. `prepared` records what it made."""

    def __init__(self, registry: CollectorRegistry, intake) -> None:
        super().__init__(registry)
        self.intake = intake
        self.prepared: list = []
        self.intake_started = threading.Event()

    def reset(self) -> None:
        super().reset()
        self.prepared.clear()
        self.intake_started.clear()

    async def generate(self, request: GenerateRequest) -> AsyncIterator[TokenChunk | Finished]:
        self.intake_started.set()
        prepared = await self.intake.prepare(request)
        self.prepared.append(prepared)
        async for item in super().generate(replace(request, sampling=prepared.sampling)):
            yield item
