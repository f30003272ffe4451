"""OpenAI request bodies for `/v1/completions` and `/v1/chat/completions`, validated, and
their mapping onto the conductor's `GenerateRequest`.

Absent sampling fields take `SamplingParams`' defaults (greedy, its max_tokens), so an HTTP
request and a gRPC request with the same fields generate the same text. Extensions beyond
OpenAI: `top_k`, `ignore_eos`, `stop_token_ids`, `repetition_penalty`, vLLM's
`structured_outputs` / `guided_*` constraints (`conductor.openai_extras`), and
`return_token_ids` (as in vLLM: each choice, and each streamed chunk, also carries the
generated `token_ids`; a stream then sends a chunk for every step that generated tokens, even
one whose text is still empty). `n`, `logprobs` (completions: the top k, up to 20; chat:
`logprobs` + `top_logprobs`), the penalties, `logit_bias`, `response_format`, `tools` /
`tool_choice` and tool turns (`conductor.tools`) and `echo` (completions; not with logprobs)
are served. OpenAI fields halfmoon does not implement (`best_of` > 1, `suffix`) are refused
with a 400 naming the field when set to anything but their neutral value; unknown fields and
wrong types are refused too.

Reading a body (`read_request`) is bounded and strict before any of that: the content type
must be `application/json` (charset utf-8 if given; anything else is 415, so a web page's
cross-origin "simple" POST cannot drive the server), a body over the byte limit is 413
(refused on its Content-Length before reading, or as soon as a chunked body passes the
limit), and the JSON must be UTF-8, nested at most `JSON_MAX_DEPTH` deep, with no lone
surrogate in any string and no number Python cannot hold as sent (over 20 digits, 1e400,
NaN): each a 400 naming where it is. Parsing and validating a big body runs off the event
loop (`conductor.intake.off_loop`).
"""
from __future__ import annotations

import json
import math
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, ValidationError
from starlette.requests import Request

from conductor.frontend_api import GenerateRequest
from conductor.http_errors import invalid_request, payload_too_large, unsupported_media_type
from conductor.intake import off_loop
from conductor.openai_extras import StructuredFields, ToolBody, ToolCallBody, ToolChoiceBody, history_calls, tool_use
from conductor.tools import HistoryMessage, call_constraint, render
from engine.errors import InvalidRequestError
from engine.logprobs import MAX_TOP_LOGPROBS
from engine.sampling import SamplingParams

JSON_MAX_DEPTH = 64  # OpenAI bodies nest 4 deep (messages[i].content[j].text)
_MAX_INT_CHARS = 20  # "-9223372036854775808" and 2**64 - 1 have 20; longer cannot fit 64 bits


def _show(value: Any) -> str:
    """A short repr of a client's value, for an error message."""
    if isinstance(value, int) and not isinstance(value, bool) and not -(10**30) < value < 10**30:
        return f"an integer of {value.bit_length()} bits"
    text = repr(value) if not isinstance(value, (list, dict)) or len(value) <= 8 else f"a {type(value).__name__} of {len(value)} items"
    return text if len(text) <= 60 else text[:57] + "..."


def _stop(value: Any) -> Any:
    """OpenAI's `stop` is a string, a list of strings, or null."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return value
    raise ValueError("must be a string or a list of strings")


def _is_token_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _prompt(value: Any) -> Any:
    """A string or a list of token ids; a batch of exactly one of either is unwrapped."""
    if isinstance(value, str):
        if not value:
            raise ValueError("must not be empty")
        return value
    if isinstance(value, list) and value:
        if all(_is_token_id(t) for t in value):
            if any(t < 0 for t in value):
                raise ValueError("token ids must be >= 0")
            return value
        if all(isinstance(p, (str, list)) for p in value):
            if len(value) > 1:
                raise ValueError("batched prompts are not supported; send one prompt per request")
            return _prompt(value[0])
    raise ValueError("must be a non-empty string or a list of token ids")


def _content(value: Any) -> Any:
    """Message content: a string, null, or a list of text parts (joined)."""
    if value is None:
        return ""
    if isinstance(value, list):
        texts = []
        for part in value:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = _show(part.get("type")) if isinstance(part, dict) else f"a {type(part).__name__}"
                raise ValueError(f"only text content parts are supported, got {kind}")
            texts.append(part["text"])
        return "".join(texts)
    return value


Stop = Annotated[list[str], BeforeValidator(_stop)]
Prompt = Annotated[str | list[int], BeforeValidator(_prompt)]
Content = Annotated[str, BeforeValidator(_content)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Body):
    include_usage: bool = False


class _GenerateBody(StructuredFields):
    """Fields both endpoints share."""

    # OpenAI fields halfmoon accepts only unset (null) or at a neutral value.
    NEUTRAL: ClassVar[dict[str, tuple[Any, ...]]] = {}

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: Stop = []
    stop_token_ids: list[int] = []
    ignore_eos: bool | None = None
    return_token_ids: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # an end-user id; accepted and not used
    n: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    logit_bias: dict[str, float] | None = None

    def check_supported(self) -> None:
        for name, neutral in self.NEUTRAL.items():
            value = getattr(self, name)
            if value is not None and not any(type(value) is type(ok) and value == ok for ok in neutral):
                raise InvalidRequestError(name, f"is not supported by halfmoon (got {_show(value)})")
        if self.stream_options is not None and not self.stream:
            raise InvalidRequestError("stream_options", "is only allowed when stream is true")

    def logprobs_k(self) -> int | None:
        """How many top alternatives each token's logprob comes with (None: no logprobs)."""
        return None

    def sampling_params(self, max_tokens: int | None, constraint=None) -> SamplingParams:
        given = {
            "max_tokens": max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "seed": self.seed,
            "ignore_eos": self.ignore_eos,
            "n": self.n,
            "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty,
            "repetition_penalty": self.repetition_penalty,
        }
        params = SamplingParams(
            **{k: v for k, v in given.items() if v is not None},
            stop=tuple(self.stop),
            stop_token_ids=tuple(self.stop_token_ids),
            logprobs=self.logprobs_k(),
            logit_bias=self._logit_bias(),
            constraint=constraint if constraint is not None else self.constraint(),
        )
        params.validate()
        return params

    def _logit_bias(self) -> tuple[tuple[int, float], ...]:
        pairs = []
        for key, value in (self.logit_bias or {}).items():
            if not key.isdigit() or len(key) > 10:
                raise InvalidRequestError(f"logit_bias.{key[:20]}", "keys must be token ids (decimal strings)")
            pairs.append((int(key), value))
        return tuple(sorted(pairs))

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionBody(_GenerateBody):
    NEUTRAL: ClassVar[dict[str, tuple[Any, ...]]] = {
        **_GenerateBody.NEUTRAL,
        "best_of": (1,),
        "suffix": ("",),
    }

    prompt: Prompt
    echo: bool = False  # the prompt's text comes first in the output
    logprobs: int | None = None  # the top k alternatives of each token (0: only the token's own)
    best_of: Any = None
    suffix: Any = None

    def logprobs_k(self) -> int | None:
        return self.logprobs

    def to_request(self, request_id: str) -> GenerateRequest:
        self.check_supported()
        if self.echo and self.logprobs is not None:
            raise InvalidRequestError("echo", "echo with logprobs is not supported (prompt logprobs are not computed)")
        sampling = self.sampling_params(self.max_tokens)
        if isinstance(self.prompt, str):
            return GenerateRequest(request_id, sampling, prompt=self.prompt)
        return GenerateRequest(request_id, sampling, prompt_token_ids=tuple(self.prompt))


class ChatMessageBody(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Content = ""
    name: str | None = None  # a tool turn's function name; accepted and not used on other turns
    tool_calls: list[ToolCallBody] | None = None  # an assistant turn that called tools
    tool_call_id: str | None = None  # a tool turn: the call it answers


class ChatCompletionBody(_GenerateBody):
    messages: list[ChatMessageBody]
    max_completion_tokens: int | None = None  # OpenAI's newer name; wins over max_tokens
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[ToolBody] | None = None
    tool_choice: Any = None  # "auto" | "none" | "required" | {"type": "function", "function": {"name": ...}}
    parallel_tool_calls: bool | None = None  # auto: any number of calls; required / named: one

    def logprobs_k(self) -> int | None:
        k = self.top_logprobs
        if k is not None and not self.logprobs:
            raise InvalidRequestError("top_logprobs", "needs logprobs: true")
        if k is not None and not 0 <= k <= MAX_TOP_LOGPROBS:
            raise InvalidRequestError("top_logprobs", f"must be an integer in [0, {MAX_TOP_LOGPROBS}], got {k}")
        return (self.top_logprobs or 0) if self.logprobs else None

    def _tool_choice(self) -> str | ToolChoiceBody | None:
        tc = self.tool_choice
        if tc is None or isinstance(tc, str):
            return tc
        if isinstance(tc, dict):
            try:
                return ToolChoiceBody.model_validate(tc)
            except ValidationError:
                pass
        raise InvalidRequestError("tool_choice", 'must be "auto", "none", "required" or '
                                                 '{"type": "function", "function": {"name": ...}}')

    def _history(self) -> list[HistoryMessage]:
        out = []
        for i, m in enumerate(self.messages):
            if m.role == "tool" and not m.tool_call_id:
                raise InvalidRequestError(f"messages[{i}].tool_call_id", "is required in a tool message")
            if m.tool_calls is not None and m.role != "assistant":
                raise InvalidRequestError(f"messages[{i}].tool_calls", "only an assistant message calls tools")
            # "developer" is OpenAI's newer name for the system role
            role = "system" if m.role == "developer" else m.role
            out.append(HistoryMessage(role, m.content, history_calls(m.tool_calls), m.tool_call_id, m.name))
        return out

    def to_request(self, request_id: str) -> GenerateRequest:
        self.check_supported()
        if not self.messages:
            raise InvalidRequestError("messages", "must contain at least one message")
        use = tool_use(self.tools, self._tool_choice())
        constraint = call_constraint(use) if use is not None else None
        if constraint is not None and self.constraint() is not None:
            raise InvalidRequestError("tool_choice", f"{self.constraint().source} and a required tool call "
                                                     "cannot both constrain the output")
        newer = self.max_completion_tokens is not None
        try:
            sampling = self.sampling_params(self.max_completion_tokens if newer else self.max_tokens, constraint)
        except InvalidRequestError as e:
            if newer and e.field == "max_tokens":
                raise InvalidRequestError("max_completion_tokens", e.message) from None
            raise
        messages = render(self._history(), use)
        return GenerateRequest(request_id, sampling, messages=messages, tool_use=use)


def _param(loc: tuple[int | str, ...]) -> str:
    """("messages", 0, "role") -> "messages[0].role"."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out if len(out) <= 100 else out[:97] + "..."


class _Unrepresentable:
    """A JSON value Python would not hold as sent (an integer too long to convert, a float
    that overflows to inf, NaN/Infinity); found by `_check_json`, which names where."""

    __slots__ = ("problem",)

    def __init__(self, problem: str) -> None:
        self.problem = problem


def _parse_int(text: str) -> int | _Unrepresentable:
    if len(text) > _MAX_INT_CHARS:  # also before Python's 4,300-digit conversion limit raises
        return _Unrepresentable(f"an integer of {len(text.lstrip('-'))} digits is out of range")
    return int(text)


def _parse_float(text: str) -> float | _Unrepresentable:
    value = float(text)
    if math.isinf(value):
        return _Unrepresentable(f"the number {text[:40]} is out of range")
    return value


def _parse_constant(name: str) -> _Unrepresentable:
    return _Unrepresentable(f"{name} is not a JSON number")


_SCALARS = (int, float, bool, type(None))


def _check_json(data: Any) -> None:
    """Walk the decoded body once (iteratively): depth, lone surrogates, unrepresentable
    numbers. Raises a 400 naming the first place found."""
    stack: list[tuple[Any, tuple[int | str, ...]]] = [(data, ())]
    while stack:
        value, loc = stack.pop()
        if isinstance(value, (dict, list)):
            if len(loc) >= JSON_MAX_DEPTH:
                raise invalid_request(_param(loc), f"{_param(loc)}: nested deeper than {JSON_MAX_DEPTH} levels")
            items = value.items() if isinstance(value, dict) else enumerate(value)
            for key, item in items:
                if isinstance(key, str):
                    _check_text(key, loc, "a key")
                if not isinstance(item, _SCALARS):
                    stack.append((item, loc + (key,)))
        elif isinstance(value, str):
            _check_text(value, loc, "the string")
        elif isinstance(value, _Unrepresentable):
            raise invalid_request(_param(loc) or None, f"{_param(loc) or 'the body'}: {value.problem}")


def _check_text(text: str, loc: tuple[int | str, ...], what: str) -> None:
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        place = _param(loc)
        raise invalid_request(place or None, f"{place or 'the body'}: {what} is not valid Unicode "
                                             f"(a lone surrogate at character {e.start})") from None


def parse_body(model: type[_Body], raw: bytes) -> Any:
    """Decode and validate a JSON request body; errors are 400s naming the field."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise invalid_request(None, f"the request body is not valid UTF-8 (byte {exc.start})") from None
    try:
        data = json.loads(text, parse_int=_parse_int, parse_float=_parse_float, parse_constant=_parse_constant)
    except json.JSONDecodeError as exc:
        raise invalid_request(None, f"the request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise invalid_request(None, f"the request body is nested deeper than {JSON_MAX_DEPTH} levels") from None
    if not isinstance(data, dict):
        raise invalid_request(None, "the request body must be a JSON object")
    _check_json(data)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors(include_url=False, include_context=False, include_input=False)[0]
        param = _param(tuple(first["loc"]))
        if first["type"] == "extra_forbidden":
            message = "unknown field"
        else:
            message = first["msg"].removeprefix("Value error, ")
        raise invalid_request(param, f"{param}: {message}") from None


def parse_request(model: type[_GenerateBody], raw: bytes) -> tuple[Any, GenerateRequest]:
    """`parse_body`, then the `GenerateRequest` it asks for (request_id "": the caller names
    it); every error a 400 naming the field."""
    body = parse_body(model, raw)
    try:
        return body, body.to_request("")
    except InvalidRequestError as e:
        raise invalid_request(e.field or None, str(e)) from None


def _check_content_type(request: Request) -> None:
    value = request.headers.get("content-type")
    if value is None:
        raise unsupported_media_type("send the body as JSON with Content-Type: application/json")
    media, *params = value.split(";")
    if media.strip().lower() != "application/json":
        raise unsupported_media_type(f"Content-Type {_show(value)} is not supported; send application/json")
    for param in params:
        name, _, charset = param.partition("=")
        if name.strip().lower() == "charset" and charset.strip().strip('"').lower() not in ("utf-8", "utf8"):
            raise unsupported_media_type(f"charset {_show(charset.strip())} is not supported; send "
                                         "application/json in utf-8")


async def read_body(request: Request, limit: int) -> bytes:
    """The body, or 413 once it is known to be over `limit` bytes: from Content-Length
    before reading anything, or while reading a chunked body."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise payload_too_large(f"the request body is {int(length)} bytes; the limit is {limit}")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise payload_too_large(f"the request body is over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def read_request(model: type[_GenerateBody], request: Request, limit: int) -> tuple[Any, GenerateRequest]:
    """A POST's JSON body, bounded, parsed and validated (off the loop when big)."""
    _check_content_type(request)
    raw = await read_body(request, limit)
    return await off_loop(len(raw), parse_request, model, raw)
