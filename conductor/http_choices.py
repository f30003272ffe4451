"""A backend's stream as OpenAI choices: collected whole, or as server-sent events.

One choice per parallel sample (`TokenChunk.index`). With `echo` (completions) each choice's
text starts with the prompt's. With tools offered (`conductor.tools`), a choice's text is
split into content and tool calls: the calls come out as `tool_calls` (a streamed call as one
`delta.tool_calls` entry once its block is complete, in OpenAI's shape: index, id, type,
function name and arguments), and a choice that called a tool ends with finish_reason
`tool_calls`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from conductor.frontend_api import Finished, RequestFailed, TokenChunk
from conductor.http_errors import api_error_from
from conductor.http_responses import DONE, ChatShape, ResponseShape, sse
from conductor.tools import CallStream, ToolCall, ToolUse, parse_calls
from engine.logprobs import TokenLogprob

Item = TokenChunk | Finished


@dataclass
class _Choice:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None


def _finish(reason: str, calls: list[ToolCall]) -> str:
    return "tool_calls" if calls and reason == "stop" else reason


class Choices:
    """How one request's chunks become its choices."""

    def __init__(self, shape: ResponseShape, n: int, *, logprobs: bool, tools: ToolUse | None = None,
                 echo: str = "") -> None:
        self.shape = shape
        self.n = n
        self.logprobs = logprobs
        self.tools = tools if tools is not None and tools.offered and isinstance(shape, ChatShape) else None
        self.echo = echo

    async def collect(self, stream: AsyncIterator[Item]) -> dict[str, Any]:
        """The whole response."""
        choices = [_Choice(text=self.echo) for _ in range(self.n)]
        async for item in stream:
            if isinstance(item, Finished):
                return self._full(choices, item)
            c = choices[item.index]
            c.text += item.text
            c.token_ids.extend(item.token_ids)
            c.logprobs.extend(item.logprobs)
            if item.finish_reason is not None:
                c.finish_reason = item.finish_reason
        raise RequestFailed("the backend's stream ended without a Finished")

    def _full(self, choices: list[_Choice], finished: Finished) -> dict[str, Any]:
        body = []
        for i, c in enumerate(choices):
            reason = c.finish_reason or (finished.samples[i].finish_reason if finished.samples else finished.finish_reason)
            text, calls = c.text, []
            if self.tools is not None:
                content, calls = parse_calls(c.text, self.tools)
                text = content or ""
            body.append(self.shape.choice(i, text, _finish(reason, calls), tuple(c.token_ids),
                                          c.logprobs if self.logprobs else None, calls, offset=len(self.echo)))
        return self.shape.full(body, finished.usage)

    async def events(self, stream: AsyncIterator[Item], first: Item) -> AsyncIterator[bytes]:
        """The SSE body: every choice's opening (and echo), chunks as they come, each choice's
        finish reason, usage if asked, then [DONE]."""
        shape = self.shape
        calls = [CallStream(self.tools) for _ in range(self.n)] if self.tools is not None else None
        offsets = [len(self.echo)] * self.n
        ended: set[int] = set()
        try:
            for i in range(self.n):
                opening = shape.opening(i)
                if opening is not None:
                    yield sse(opening)
                if self.echo:
                    yield sse(shape.delta(self.echo, (), i, [] if self.logprobs else None, 0))
            item = first
            while not isinstance(item, Finished):
                for event in self._chunk_events(item, calls, offsets, ended):
                    yield event
                try:
                    item = await anext(stream)
                except StopAsyncIteration:
                    raise RequestFailed("the backend's stream ended without a Finished") from None
            for i in range(self.n):
                if i not in ended:
                    reason = item.samples[i].finish_reason if item.samples else item.finish_reason
                    for event in self._end_events(i, reason, calls):
                        yield event
            if shape.include_usage:
                yield sse(shape.usage_chunk(item.usage))
        except Exception as exc:  # headers are sent: the error travels as an event
            yield sse(api_error_from(exc).body())
        yield DONE

    def _chunk_events(self, item: TokenChunk, calls: list[CallStream] | None, offsets: list[int],
                      ended: set[int]) -> list[bytes]:
        shape, i, out = self.shape, item.index, []
        text, done = item.text, []
        if calls is not None:
            text, done = calls[i].push(item.text)
        lps = list(item.logprobs) if self.logprobs else None
        if text or lps or (shape.return_token_ids and item.token_ids):
            out.append(sse(shape.delta(text, item.token_ids, i, lps, offsets[i])))
            offsets[i] += len(text)
        if done:
            first = len(calls[i].calls) - len(done)
            out.append(sse(shape.tool_calls_delta(i, list(enumerate(done, first)))))
        if item.finish_reason is not None:
            out += self._end_events(i, item.finish_reason, calls)
            ended.add(i)
        return out

    def _end_events(self, i: int, reason: str, calls: list[CallStream] | None) -> list[bytes]:
        out = []
        made: list[ToolCall] = []
        if calls is not None:
            rest = calls[i].flush()
            if rest:
                out.append(sse(self.shape.delta(rest, (), i)))
            made = calls[i].calls
        out.append(sse(self.shape.closing(_finish(reason, made), i)))
        return out


