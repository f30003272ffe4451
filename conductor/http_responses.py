"""OpenAI response bodies and stream chunks for completions and chat completions.

A `ResponseShape` knows one endpoint's JSON: the whole response, and the chunks of a
stream (an optional opening chunk, one per text delta, a closing chunk with the finish
reason, an optional usage chunk). The frontend drives both endpoints with one loop.
"""
from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

from conductor.frontend_api import Finished, Usage

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
    def opening(self) -> dict[str, Any] | None:
        """The chunk that starts a stream, if the endpoint has one."""

    def _ids(self, choice: dict[str, Any], token_ids: tuple[int, ...]) -> dict[str, Any]:
        if self.return_token_ids:
            choice["token_ids"] = list(token_ids)
        return choice

    @abstractmethod
    def delta(self, text: str, token_ids: tuple[int, ...] = ()) -> dict[str, Any]:
        """A chunk carrying newly generated text (and its tokens)."""

    @abstractmethod
    def closing(self, finish_reason: str) -> dict[str, Any]:
        """The chunk that carries the finish reason."""

    @abstractmethod
    def full(self, text: str, finished: Finished, token_ids: tuple[int, ...] = ()) -> dict[str, Any]:
        """The whole (non-streamed) response."""


class CompletionShape(ResponseShape):
    __slots__ = ()
    id_prefix = "cmpl"
    chunk_object = "text_completion"

    def _choice(self, text: str, finish_reason: str | None) -> dict[str, Any]:
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}

    def opening(self) -> dict[str, Any] | None:
        return None

    def delta(self, text: str, token_ids: tuple[int, ...] = ()) -> dict[str, Any]:
        return self._envelope(self.chunk_object, [self._ids(self._choice(text, None), token_ids)])

    def closing(self, finish_reason: str) -> dict[str, Any]:
        return self._envelope(self.chunk_object, [self._ids(self._choice("", finish_reason), ())])

    def full(self, text: str, finished: Finished, token_ids: tuple[int, ...] = ()) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": [self._ids(self._choice(text, finished.finish_reason), token_ids)],
            "usage": usage_body(finished.usage),
        }


class ChatShape(ResponseShape):
    __slots__ = ()
    id_prefix = "chatcmpl"
    chunk_object = "chat.completion.chunk"

    def _chunk(self, delta: dict[str, Any], finish_reason: str | None,
               token_ids: tuple[int, ...] | None = None) -> dict[str, Any]:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        if token_ids is not None:
            self._ids(choice, token_ids)
        return self._envelope(self.chunk_object, [choice])

    def opening(self) -> dict[str, Any] | None:
        return self._chunk({"role": "assistant", "content": ""}, None)

    def delta(self, text: str, token_ids: tuple[int, ...] = ()) -> dict[str, Any]:
        return self._chunk({"content": text}, None, token_ids)

    def closing(self, finish_reason: str) -> dict[str, Any]:
        return self._chunk({}, finish_reason, ())

    def full(self, text: str, finished: Finished, token_ids: tuple[int, ...] = ()) -> dict[str, Any]:
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "logprobs": None,
            "finish_reason": finished.finish_reason,
        }
        return {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": [self._ids(choice, token_ids)],
            "usage": usage_body(finished.usage),
        }
