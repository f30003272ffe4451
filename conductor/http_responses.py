"""OpenAI response bodies and stream chunks for completions and chat completions.

A `ResponseShape` knows one endpoint's JSON: the whole response, and the chunks of a
stream (an optional opening chunk, one per text delta, a closing chunk with the finish
reason, an optional usage chunk). The frontend drives both endpoints with one loop
(`conductor.http_choices`). Every chunk and choice names its `index` (n > 1 parallel
samples), and carries the endpoint's `logprobs` object when asked for.
"""
from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

from conductor.frontend_api import Usage
from conductor.openai_extras import chat_logprobs, completion_logprobs
from conductor.tools import ToolCall
from engine.logprobs import TokenLogprob

DONE = b"data: [DONE]\n\n"


def sse(data: dict[str, Any]) -> bytes:
    """One server-sent event carrying a JSON object."""
    return b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"


def usage_body(usage: Usage) -> dict[str, Any]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
    }


@dataclass(frozen=True, slots=True)
class ResponseShape(ABC):
    id: str
    created: int  # unix seconds
    model: str
    include_usage: bool = False  # stream_options.include_usage
    return_token_ids: bool = False  # extension: choices carry the generated token ids
    token_bytes: Callable[[int], bytes] = field(default=lambda t: str(t).encode())  # a token id's bytes

    def _envelope(self, obj: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        body: dict[str, Any] = {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }
        if self.include_usage:
            body["usage"] = None  # OpenAI: null on every chunk but the last
        return body

    def usage_chunk(self, usage: Usage) -> dict[str, Any]:
        chunk = self._envelope(self.chunk_object, [])
        chunk["usage"] = usage_body(usage)
        return chunk

    # Per endpoint ----------------------------------------------------------------------
    id_prefix: ClassVar[str]
    chunk_object: ClassVar[str]

    @abstractmethod
    def opening(self, index: int = 0) -> dict[str, Any] | None:
        """The chunk that starts choice `index`'s stream, if the endpoint has one."""

    def _ids(self, choice: dict[str, Any], token_ids: tuple[int, ...]) -> dict[str, Any]:
        if self.return_token_ids:
            choice["token_ids"] = list(token_ids)
        return choice

    @abstractmethod
    def delta(self, text: str, token_ids: tuple[int, ...] = (), index: int = 0,
              logprobs: list[TokenLogprob] | None = None, offset: int = 0) -> dict[str, Any]:
        """A chunk carrying newly generated text (its tokens, their logprobs; `offset`: where
        the text starts in the choice's whole text)."""

    @abstractmethod
    def closing(self, finish_reason: str, index: int = 0) -> dict[str, Any]:
        """The chunk that carries a choice's finish reason."""

    @abstractmethod
    def choice(self, index: int, text: str, finish_reason: str, token_ids: tuple[int, ...] = (),
               logprobs: list[TokenLogprob] | None = None, tool_calls: list[ToolCall] | None = None
               ) -> dict[str, Any]:
        """One whole choice of a non-streamed response (`tool_calls`: the calls parsed out of
        it, `text` then being the content left)."""

    @abstractmethod
    def full(self, choices: list[dict[str, Any]], usage: Usage) -> dict[str, Any]:
        """The whole (non-streamed) response."""


class CompletionShape(ResponseShape):
    __slots__ = ()
    id_prefix = "cmpl"
    chunk_object = "text_completion"

    def _choice(self, text: str, finish_reason: str | None, index: int = 0,
                logprobs: list[TokenLogprob] | None = None, offset: int = 0) -> dict[str, Any]:
        lp = completion_logprobs(logprobs, self.token_bytes, offset) if logprobs is not None else None
        return {"index": index, "text": text, "logprobs": lp, "finish_reason": finish_reason}

    def opening(self, index: int = 0) -> dict[str, Any] | None:
        return None

    def delta(self, text: str, token_ids: tuple[int, ...] = (), index: int = 0,
              logprobs: list[TokenLogprob] | None = None, offset: int = 0) -> dict[str, Any]:
        return self._envelope(self.chunk_object, [self._ids(self._choice(text, None, index, logprobs, offset),
                                                            token_ids)])

    def closing(self, finish_reason: str, index: int = 0) -> dict[str, Any]:
        return self._envelope(self.chunk_object, [self._ids(self._choice("", finish_reason, index), ())])

    def choice(self, index: int, text: str, finish_reason: str, token_ids: tuple[int, ...] = (),
               logprobs: list[TokenLogprob] | None = None, tool_calls: list[ToolCall] | None = None,
               offset: int = 0) -> dict[str, Any]:
        return self._ids(self._choice(text, finish_reason, index, logprobs, offset), token_ids)

    def full(self, choices: list[dict[str, Any]], usage: Usage) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": choices,
            "usage": usage_body(usage),
        }


class ChatShape(ResponseShape):
    __slots__ = ()
    id_prefix = "chatcmpl"
    chunk_object = "chat.completion.chunk"

    def _chunk(self, delta: dict[str, Any], finish_reason: str | None, token_ids: tuple[int, ...] | None = None,
               index: int = 0, logprobs: list[TokenLogprob] | None = None) -> dict[str, Any]:
        lp = chat_logprobs(logprobs, self.token_bytes) if logprobs is not None else None
        choice = {"index": index, "delta": delta, "logprobs": lp, "finish_reason": finish_reason}
        if token_ids is not None:
            self._ids(choice, token_ids)
        return self._envelope(self.chunk_object, [choice])

    def opening(self, index: int = 0) -> dict[str, Any] | None:
        return self._chunk({"role": "assistant", "content": ""}, None, index=index)

    def delta(self, text: str, token_ids: tuple[int, ...] = (), index: int = 0,
              logprobs: list[TokenLogprob] | None = None, offset: int = 0) -> dict[str, Any]:
        return self._chunk({"content": text}, None, token_ids, index, logprobs)

    def tool_calls_delta(self, index: int, calls: list[tuple[int, ToolCall]]) -> dict[str, Any]:
        """Completed calls of choice `index` (each with its position among the choice's calls)."""
        return self._chunk({"tool_calls": [{"index": i, "id": c.id, "type": "function",
                                            "function": {"name": c.name, "arguments": c.arguments}}
                                           for i, c in calls]}, None, index=index)

    def closing(self, finish_reason: str, index: int = 0) -> dict[str, Any]:
        return self._chunk({}, finish_reason, (), index)

    def choice(self, index: int, text: str, finish_reason: str, token_ids: tuple[int, ...] = (),
               logprobs: list[TokenLogprob] | None = None, tool_calls: list[ToolCall] | None = None,
               offset: int = 0) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": text if text or not tool_calls else None}
        if tool_calls:
            message["tool_calls"] = [{"id": c.id, "type": "function",
                                      "function": {"name": c.name, "arguments": c.arguments}} for c in tool_calls]
        choice = {
            "index": index,
            "message": message,
            "logprobs": chat_logprobs(logprobs, self.token_bytes) if logprobs is not None else None,
            "finish_reason": finish_reason,
        }
        return self._ids(choice, token_ids)

    def full(self, choices: list[dict[str, Any]], usage: Usage) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": choices,
            "usage": usage_body(usage),
        }
