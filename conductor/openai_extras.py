"""The OpenAI request fields beyond plain sampling, as typed bodies, and their mapping onto
`SamplingParams` extras and a chat's tool use; plus the logprobs JSON of both endpoints.

Structured output, at most one source per request (else 400 naming the second):
- `response_format`: `{"type": "text"}`, `{"type": "json_object"}`, or
  `{"type": "json_schema", "json_schema": {"name", "schema", "strict", "description"}}`;
- vLLM's `structured_outputs`: one of `json` (a schema, object or text), `regex`, `choice`
  (a list of strings), `grammar` (Lark, or GBNF / EBNF), `json_object: true`;
- vLLM's older `guided_json`, `guided_regex`, `guided_choice`, `guided_grammar`;
- tools with `tool_choice` `required` or a named function (`conductor.tools`).

logprobs are the model's raw distribution (`engine.logprobs`): before the grammar mask,
penalties and temperature. A log-probability of minus infinity is sent as -9999.0.
"""
from __future__ import annotations

import json
from typing import Any, Callable, Literal

from pydantic import BaseModel, ConfigDict, Field

from engine.errors import InvalidRequestError
from engine.logprobs import TokenLogprob
from engine.structured import Constraint
from conductor.tools import ToolCall, ToolSpec, ToolUse, check_tools

NEG_INF_LOGPROB = -9999.0


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class JsonSchemaFormat(_Body):
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | bool | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputs(_Body):
    json_: dict[str, Any] | str | bool | None = Field(default=None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None


class FunctionDef(_Body):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolBody(_Body):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(_Body):
    name: str


class ToolChoiceBody(_Body):
    type: Literal["function"]
    function: NamedFunction


class FunctionCall(_Body):
    name: str
    arguments: str


class ToolCallBody(_Body):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


def _schema_text(value: dict | str | bool, field: str) -> str:
    if isinstance(value, str):
        try:
            json.loads(value)
        except ValueError as e:
            raise InvalidRequestError(field, f"is not JSON: {e}") from None
        return value
    return json.dumps(value)


class StructuredFields(_Body):
    """The structured-output fields of a body (`response_format`, vLLM's extensions)."""

    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    def constraint(self) -> Constraint | None:
        found: list[Constraint] = []
        rf = self.response_format
        if rf is not None and rf.type == "json_object":
            found.append(Constraint("json_object", source="response_format"))
        elif rf is not None and rf.type == "json_schema":
            js = rf.json_schema
            if js is None or js.schema_ is None:
                raise InvalidRequestError("response_format.json_schema.schema", "is required for type json_schema")
            found.append(Constraint("json_schema", json.dumps(js.schema_), strict=bool(js.strict),
                                    source="response_format.json_schema.schema"))
        elif rf is not None and rf.json_schema is not None:
            raise InvalidRequestError("response_format.json_schema", f"is only for type json_schema, not {rf.type}")
        so = self.structured_outputs
        if so is not None:
            given = [k for k, v in (("json", so.json_), ("regex", so.regex), ("choice", so.choice),
                                    ("grammar", so.grammar), ("json_object", so.json_object)) if v not in (None, False)]
            if len(given) > 1:
                raise InvalidRequestError(f"structured_outputs.{given[1]}", f"give one of json, regex, choice, grammar, "
                                                                            f"json_object (also got {given[0]})")
            if not given:
                raise InvalidRequestError("structured_outputs", "give one of json, regex, choice, grammar, json_object")
            found.append(_one("structured_outputs", given[0], getattr(so, "json_" if given[0] == "json" else given[0])))
        for name in ("guided_json", "guided_regex", "guided_choice", "guided_grammar"):
            value = getattr(self, name)
            if value is not None:
                found.append(_one("", name, value))
        if len(found) > 1:
            raise InvalidRequestError(found[1].source.split(".")[0], f"only one structured-output constraint per "
                                                                     f"request (also got {found[0].source})")
        return found[0] if found else None


def _one(prefix: str, kind: str, value: Any) -> Constraint:
    field = f"{prefix}.{kind}" if prefix else kind
    kind = kind.removeprefix("guided_")
    if kind == "json_object":
        return Constraint("json_object", source=field)
    if kind == "json":
        return Constraint("json_schema", _schema_text(value, field), source=field)
    if kind == "choice":
        return Constraint("choice", choices=tuple(value), source=field)
    return Constraint(kind, value, source=field)  # regex | grammar


def tool_use(tools: list[ToolBody] | None, tool_choice: str | ToolChoiceBody | None) -> ToolUse | None:
    """The request's tool use (None: no tools and no choice)."""
    if tools is None and tool_choice is None:
        return None
    specs = tuple(ToolSpec(t.function.name, t.function.description or "",
                           json.dumps(t.function.parameters if t.function.parameters is not None
                                      else {"type": "object", "properties": {}}))
                  for t in tools or [])
    if isinstance(tool_choice, ToolChoiceBody):
        return check_tools(specs, None, tool_choice.function.name)
    return check_tools(specs, tool_choice, None)


def history_calls(calls: list[ToolCallBody] | None) -> tuple[ToolCall, ...]:
    return tuple(ToolCall(c.id, c.function.name, c.function.arguments) for c in calls or [])


# --- logprobs JSON ----------------------------------------------------------------------
TokenBytes = Callable[[int], bytes]


def _lp(value: float) -> float:
    return value if value > NEG_INF_LOGPROB else NEG_INF_LOGPROB


def _text(b: bytes) -> str:
    return b.decode("utf-8", errors="replace")


def chat_logprobs(lps: list[TokenLogprob], token_bytes: TokenBytes) -> dict[str, Any]:
    """`choice.logprobs` of a chat completion (or of one streamed chunk)."""
    def entry(tid: int, lp: float) -> dict[str, Any]:
        b = token_bytes(tid)
        return {"token": _text(b), "logprob": _lp(lp), "bytes": list(b)}

    return {"content": [{**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]}
                        for lp in lps], "refusal": None}


def completion_logprobs(lps: list[TokenLogprob], token_bytes: TokenBytes, offset: int = 0) -> dict[str, Any]:
    """`choice.logprobs` of a (legacy) completion: tokens, token_logprobs, top_logprobs
    (one {token: logprob} per token) and text_offset (each token's start in the text,
    counted from `offset`)."""
    tokens, offsets, pos = [], [], offset
    for lp in lps:
        t = _text(token_bytes(lp.token_id))
        tokens.append(t)
        offsets.append(pos)
        pos += len(t)
    return {"tokens": tokens, "token_logprobs": [_lp(lp.logprob) for lp in lps],
            "top_logprobs": [{_text(token_bytes(t)): _lp(v) for t, v in lp.top} for lp in lps],
            "text_offset": offsets}
