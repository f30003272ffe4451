"""The conductor's internal generate interface, shared by its gRPC and HTTP front doors.

A front door turns a client call into a `GenerateRequest`, iterates `Backend.generate`,
and maps the typed errors below to its own status codes:

| error                          | gRPC                 | HTTP |
|--------------------------------|----------------------|------|
| engine.errors.InvalidRequestError | INVALID_ARGUMENT  | 400  |
| Rejected                       | RESOURCE_EXHAUSTED   | 429  |
| Unavailable                    | UNAVAILABLE          | 503  |
| RequestFailed                  | INTERNAL / ABORTED   | 500  |
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, AsyncIterator, Protocol

from engine.logprobs import TokenLogprob
from engine.sampling import SamplingParams

if TYPE_CHECKING:
    from conductor.tools import ToolUse


@dataclass(frozen=True, slots=True)
class ChatMessage:
    role: str  # "system" | "user" | "assistant"
    content: str


@dataclass(frozen=True, slots=True)
class GenerateRequest:
    """Exactly one of `prompt`, `messages`, `prompt_token_ids` is set."""

    request_id: str
    sampling: SamplingParams
    prompt: str | None = None
    messages: tuple[ChatMessage, ...] | None = None
    prompt_token_ids: tuple[int, ...] | None = None
    # the chat's tools (`conductor.tools`): already rendered into `messages` (and, for a forced
    # call, into `sampling.constraint`); the front door parses the output's calls with it
    tool_use: "ToolUse | None" = None


@dataclass(frozen=True, slots=True)
class TokenChunk:
    """Newly generated tokens and the text they complete (may be empty mid-codepoint)."""

    text: str
    token_ids: tuple[int, ...]
    index: int = 0  # which parallel sample (sampling.n > 1)
    logprobs: tuple[TokenLogprob, ...] = ()  # one per token id, when sampling.logprobs is set
    finish_reason: str | None = None  # n > 1: set on each sample's last chunk (which may carry no tokens)


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0


@dataclass(frozen=True, slots=True)
class Timing:
    """TTFT and its parts, in seconds, measured at the conductor."""

    queue_s: float = 0.0
    prefill_s: float = 0.0
    kv_transfer_s: float = 0.0
    first_decode_s: float = 0.0
    ttft_s: float = 0.0


@dataclass(frozen=True, slots=True)
class SampleEnd:
    index: int
    finish_reason: str
    completion_tokens: int


@dataclass(frozen=True, slots=True)
class Finished:
    finish_reason: str  # "stop" | "length" | "abort" (sample 0's when n > 1)
    usage: Usage  # completion_tokens: all samples together
    timing: Timing = field(default_factory=Timing)
    prefill_node: str = ""  # where the request ran (empty when not disaggregated)
    decode_node: str = ""
    samples: tuple[SampleEnd, ...] = ()  # every sample's end, in index order (n > 1)


class Rejected(Exception):
    """Admission control refused the request before any work was spent on it."""

    def __init__(self, reason: str, retry_after_s: float = 1.0) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after_s = retry_after_s


class Unavailable(Exception):
    """No healthy node can take the request right now."""


class RequestFailed(Exception):
    """The request was admitted but could not finish (node died, KV transfer failed, ...)."""


class Backend(Protocol):
    model_name: str

    def generate(self, request: GenerateRequest) -> AsyncIterator[TokenChunk | Finished]:
        """Stream chunks, then exactly one `Finished`. Raise the errors above instead of yielding."""
        ...
