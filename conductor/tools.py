"""Tool calls (OpenAI `tools` / `tool_choice`), for a model whose chat template knows none.

The convention (Hermes / Qwen style, which small instruct models have seen):

- Offered tools go into the system message: their JSON signatures inside `<tools></tools>`
  and the instruction to answer a call as
  `<tool_call>{"name": <function name>, "arguments": <arguments object>}</tool_call>`.
- An assistant turn of the history that called tools is rendered with those blocks after its
  text; a `tool` turn (a function's result) becomes a user turn holding
  `<tool_response>...</tool_response>`.
- `tool_choice`:
  - `auto` (the default when tools are given): the tools are offered and the output is free;
    every well-formed `<tool_call>` block naming a declared function is parsed into
    `tool_calls` (finish_reason `tool_calls`), the rest of the text stays `content`;
  - `required` / a named function: the tools are offered and the output is constrained to
    exactly one block `<tool_call>{"name": ..., "arguments": ...}</tool_call>`, the arguments
    valid under that function's `parameters` (any declared function for `required`);
  - `none`: the tools are not offered and nothing is parsed.
"""
from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

from conductor.frontend_api import ChatMessage
from engine.errors import InvalidRequestError
from engine.structured import Constraint
from engine.structured.backend import JSON_OPTIONS

OPEN, CLOSE = "<tool_call>", "</tool_call>"
MODES = ("auto", "none", "required")


@dataclass(frozen=True, slots=True)
class ToolSpec:
    name: str
    description: str = ""
    parameters: str = '{"type": "object", "properties": {}}'  # the arguments' JSON schema, as JSON text

    def signature(self) -> dict[str, Any]:
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": json.loads(self.parameters)}}


@dataclass(frozen=True, slots=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text


@dataclass(frozen=True, slots=True)
class ToolUse:
    """What a request asked of tools: the declared functions and the choice among them
    (`mode` one of MODES, or `function` naming the one to call)."""

    tools: tuple[ToolSpec, ...]
    mode: str = "auto"
    function: str | None = None

    @property
    def offered(self) -> bool:
        return bool(self.tools) and self.mode != "none"

    @property
    def forced(self) -> bool:
        return self.offered and (self.mode == "required" or self.function is not None)


def check_tools(tools: tuple[ToolSpec, ...], mode: str | None, function: str | None,
                field: str = "tool_choice") -> ToolUse:
    """A `ToolUse`, or `InvalidRequestError` naming the field: names unique and non-empty,
    parameters a JSON object schema, a named function declared."""
    seen: set[str] = set()
    for i, t in enumerate(tools):
        if not t.name or not all(c.isalnum() or c in "_-." for c in t.name) or len(t.name) > 64:
            raise InvalidRequestError(f"tools[{i}].function.name", "must be 1-64 letters, digits, _ - or .")
        if t.name in seen:
            raise InvalidRequestError(f"tools[{i}].function.name", f"{t.name!r} is declared twice")
        seen.add(t.name)
        try:
            params = json.loads(t.parameters)
        except ValueError:
            raise InvalidRequestError(f"tools[{i}].function.parameters", "must be a JSON schema object") from None
        if not isinstance(params, dict):
            raise InvalidRequestError(f"tools[{i}].function.parameters", "must be a JSON schema object")
    if function is not None:
        if function not in seen:
            raise InvalidRequestError(f"{field}.function.name", f"{function!r} is not one of the declared tools "
                                                                f"({', '.join(sorted(seen)) or 'none declared'})")
        return ToolUse(tools, "required", function)
    mode = mode or "auto"
    if mode not in MODES:
        raise InvalidRequestError(field, f"must be one of {', '.join(MODES)} or a named function, got {mode!r}")
    if mode == "required" and not tools:
        raise InvalidRequestError(field, "required needs at least one tool in tools")
    return ToolUse(tools, mode)


def _system_text(tools: tuple[ToolSpec, ...]) -> str:
    sigs = "\n".join(json.dumps(t.signature()) for t in tools)
    return ("You may call one or more functions to assist with the user query. The functions you can call are "
            f"given inside <tools></tools>:\n<tools>\n{sigs}\n</tools>\nTo call a function, answer with a JSON "
            f'object inside <tool_call></tool_call> tags:\n{OPEN}{{"name": <function-name>, "arguments": '
            f"<arguments-json-object>}}{CLOSE}")


def call_block(name: str, arguments: str) -> str:
    return f'{OPEN}{{"name": {json.dumps(name)}, "arguments": {arguments}}}{CLOSE}'


@dataclass(frozen=True, slots=True)
class HistoryMessage:
    """A chat turn as a client sends it: `tool_calls` on an assistant turn, `tool_call_id`
    (and `name`) on a tool turn."""

    role: str
    content: str
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None
    name: str | None = None


def render(messages: list[HistoryMessage], use: ToolUse | None) -> tuple[ChatMessage, ...]:
    """The turns as the chat template takes them (system / user / assistant)."""
    out: list[ChatMessage] = []
    for m in messages:
        if m.role == "tool":
            label = f' name="{m.name}"' if m.name else ""
            out.append(ChatMessage("user", f"<tool_response{label}>\n{m.content}\n</tool_response>"))
        elif m.role == "assistant" and m.tool_calls:
            blocks = "\n".join(call_block(c.name, c.arguments) for c in m.tool_calls)
            out.append(ChatMessage("assistant", f"{m.content}\n{blocks}" if m.content else blocks))
        else:
            out.append(ChatMessage(m.role, m.content))
    if use is not None and use.offered:
        offer = _system_text(use.tools)
        if out and out[0].role == "system":
            out[0] = ChatMessage("system", f"{out[0].content}\n\n{offer}")
        else:
            out.insert(0, ChatMessage("system", offer))
    return tuple(out)


def _call_schema(t: ToolSpec) -> dict[str, Any]:
    return {"type": "object", "properties": {"name": {"const": t.name}, "arguments": json.loads(t.parameters)},
            "required": ["name", "arguments"], "additionalProperties": False}


def call_constraint(use: ToolUse) -> Constraint | None:
    """For `required` / a named function: exactly one call block, its JSON valid."""
    if not use.forced:
        return None
    tools = [t for t in use.tools if use.function is None or t.name == use.function]
    schema = _call_schema(tools[0]) if len(tools) == 1 else {"anyOf": [_call_schema(t) for t in tools]}
    schema["x-guidance"] = {**JSON_OPTIONS, "lenient": True}
    lark = f"start: {json.dumps(OPEN)} call {json.dumps(CLOSE)}\ncall: %json {json.dumps(schema)}\n"
    return Constraint("grammar", lark, source="tools")


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _parse_call(body: str, names: set[str]) -> tuple[str, str] | None:
    try:
        obj = json.loads(body)
    except ValueError:
        return None
    if not isinstance(obj, dict) or obj.get("name") not in names:
        return None
    args = obj.get("arguments", {})
    if isinstance(args, str):  # some models quote the arguments
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return obj["name"], json.dumps(args)


def parse_calls(text: str, use: ToolUse) -> tuple[str | None, list[ToolCall]]:
    """(content, calls) of a finished output: the well-formed blocks naming declared
    functions become calls; what is left (stripped) is the content, None if nothing."""
    names = {t.name for t in use.tools}
    calls: list[ToolCall] = []
    rest: list[str] = []
    pos = 0
    while True:
        start = text.find(OPEN, pos)
        end = text.find(CLOSE, start + len(OPEN)) if start >= 0 else -1
        if start < 0 or end < 0:
            rest.append(text[pos:])
            break
        parsed = _parse_call(text[start + len(OPEN):end].strip(), names)
        if parsed is None:
            rest.append(text[pos:end + len(CLOSE)])
        else:
            rest.append(text[pos:start])
            calls.append(ToolCall(new_call_id(), *parsed))
        pos = end + len(CLOSE)
    content = "".join(rest).strip() if calls else text
    return (content or None) if calls else content, calls


class CallStream:
    """Splits a streamed output into content deltas and completed calls, holding back any
    text that may still turn out to be part of a `<tool_call>` block."""

    def __init__(self, use: ToolUse) -> None:
        self.use = use
        self.names = {t.name for t in use.tools}
        self.buffer = ""
        self.calls: list[ToolCall] = []

    def push(self, text: str) -> tuple[str, list[ToolCall]]:
        """New text -> (content that is certainly not a call, calls completed by it)."""
        self.buffer += text
        content, done = "", []
        while True:
            start = self.buffer.find(OPEN)
            if start < 0:
                keep = _partial_suffix(self.buffer, OPEN)
                content += self.buffer[: len(self.buffer) - keep]
                self.buffer = self.buffer[len(self.buffer) - keep:]
                return content, done
            content += self.buffer[:start]
            self.buffer = self.buffer[start:]
            end = self.buffer.find(CLOSE)
            if end < 0:
                return content, done
            block = self.buffer[: end + len(CLOSE)]
            self.buffer = self.buffer[end + len(CLOSE):]
            parsed = _parse_call(block[len(OPEN):-len(CLOSE)].strip(), self.names)
            if parsed is None:
                content += block
            else:
                call = ToolCall(new_call_id(), *parsed)
                self.calls.append(call)
                done.append(call)

    def flush(self) -> str:
        """The end of the output: whatever was held back is content."""
        rest, self.buffer = self.buffer, ""
        return rest


def _partial_suffix(text: str, tag: str) -> int:
    """The length of the longest suffix of `text` that is a proper prefix of `tag`."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0
