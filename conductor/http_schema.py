"""OpenAI request bodies for `/v1/completions` and `/v1/chat/completions`, validated, and
their mapping onto the conductor's `GenerateRequest`.

Absent sampling fields take `SamplingParams`' defaults (greedy, its max_tokens), so an HTTP
request and a gRPC request with the same fields generate the same text. Extensions beyond
OpenAI: `top_k`, `ignore_eos`, `stop_token_ids`, and `return_token_ids` (as in vLLM: each
choice, and each streamed chunk, also carries the generated `token_ids`; a stream then
sends a chunk for every step that generated tokens, even one whose text is still empty).
OpenAI fields halfmoon does not implement (n > 1, logprobs, echo, penalties, tools, ...)
are refused with a 400 naming the field when set to anything but their neutral value;
unknown fields and wrong types are refused too.
"""
from __future__ import annotations

import json
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, ValidationError

from conductor.frontend_api import ChatMessage, GenerateRequest
from conductor.http_errors import invalid_request
from engine.errors import InvalidRequestError
from engine.sampling import SamplingParams


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
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise ValueError(f"only text content parts are supported, got {kind!r}")
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


class _GenerateBody(_Body):
    """Fields both endpoints share."""

    # OpenAI fields halfmoon accepts only unset (null) or at a neutral value.
    NEUTRAL: ClassVar[dict[str, tuple[Any, ...]]] = {
        "n": (1,),
        "logprobs": (False,),
        "presence_penalty": (0, 0.0),
        "frequency_penalty": (0, 0.0),
        "logit_bias": ({},),
    }

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
    n: Any = None
    logprobs: Any = None
    presence_penalty: Any = None
    frequency_penalty: Any = None
    logit_bias: Any = None

    def check_supported(self) -> None:
        for name, neutral in self.NEUTRAL.items():
            value = getattr(self, name)
            if value is not None and not any(type(value) is type(ok) and value == ok for ok in neutral):
                raise InvalidRequestError(name, f"is not supported by halfmoon (got {value!r})")
        if self.stream_options is not None and not self.stream:
            raise InvalidRequestError("stream_options", "is only allowed when stream is true")

    def sampling_params(self, max_tokens: int | None) -> SamplingParams:
        given = {
            "max_tokens": max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "seed": self.seed,
            "ignore_eos": self.ignore_eos,
        }
        params = SamplingParams(
            **{k: v for k, v in given.items() if v is not None},
            stop=tuple(self.stop),
            stop_token_ids=tuple(self.stop_token_ids),
        )
        params.validate()
        return params

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionBody(_GenerateBody):
    NEUTRAL: ClassVar[dict[str, tuple[Any, ...]]] = {
        **_GenerateBody.NEUTRAL,
        "echo": (False,),
        "best_of": (1,),
        "suffix": ("",),
    }

    prompt: Prompt
    echo: Any = None
    best_of: Any = None
    suffix: Any = None

    def to_request(self, request_id: str) -> GenerateRequest:
        self.check_supported()
        sampling = self.sampling_params(self.max_tokens)
        if isinstance(self.prompt, str):
            return GenerateRequest(request_id, sampling, prompt=self.prompt)
        return GenerateRequest(request_id, sampling, prompt_token_ids=tuple(self.prompt))


class ChatMessageBody(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: Content
    name: str | None = None  # accepted and not used


class ChatCompletionBody(_GenerateBody):
    NEUTRAL: ClassVar[dict[str, tuple[Any, ...]]] = {
        **_GenerateBody.NEUTRAL,
        "top_logprobs": (0,),
        "tools": ([],),
        "tool_choice": ("none",),
        "parallel_tool_calls": (True, False),  # meaningless without tools
        "response_format": ({"type": "text"},),
    }

    messages: list[ChatMessageBody]
    max_completion_tokens: int | None = None  # OpenAI's newer name; wins over max_tokens
    top_logprobs: Any = None
    tools: Any = None
    tool_choice: Any = None
    parallel_tool_calls: Any = None
    response_format: Any = None

    def to_request(self, request_id: str) -> GenerateRequest:
        self.check_supported()
        if not self.messages:
            raise InvalidRequestError("messages", "must contain at least one message")
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        sampling = self.sampling_params(max_tokens)
        messages = tuple(
            # "developer" is OpenAI's newer name for the system role
            ChatMessage("system" if m.role == "developer" else m.role, m.content)
            for m in self.messages
        )
        return GenerateRequest(request_id, sampling, messages=messages)


def _param(loc: tuple[int | str, ...]) -> str:
    """("messages", 0, "role") -> "messages[0].role"."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out


def parse_body(model: type[_Body], raw: bytes) -> Any:
    """Decode and validate a JSON request body; errors are 400s naming the field."""
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise invalid_request(None, f"the request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise invalid_request(None, "the request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = _param(tuple(first["loc"]))
        if first["type"] == "extra_forbidden":
            message = "unknown field"
        else:
            message = first["msg"].removeprefix("Value error, ")
        raise invalid_request(param, f"{param}: {message}") from None
