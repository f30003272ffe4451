"""The OpenAI surface beyond plain text, driven by the official `openai` client (and raw
httpx for the wire) over a scripted backend: parallel choices, logprobs in both endpoints'
shapes, tools (offered, forced, parsed, streamed), tool turns in the history, echo,
structured-output fields mapped onto the request, and 400s naming the field."""
from __future__ import annotations

import json
import math

import httpx
import openai
import pytest
from prometheus_client import CollectorRegistry

from conductor.frontend_api import Finished, GenerateRequest, SampleEnd, TokenChunk, Usage
from conductor.http_frontend import build_app, serve_http
from engine.logprobs import TokenLogprob

pytestmark = pytest.mark.timeout(30)


class ScriptedBackend:
    """Sample i answers `replies[i % len(replies)]`, one character per "token" (id = its
    code point); with logprobs each token gets -0.5 * its position and a top list."""

    model_name = "org/scripted-model"

    def __init__(self) -> None:
        self.replies = ["Hello"]
        self.requests: list[GenerateRequest] = []

    def token_bytes(self, token_id: int) -> bytes:
        return chr(token_id).encode()

    async def generate(self, request: GenerateRequest):
        self.requests.append(request)
        p = request.sampling
        ends = []
        for i in range(p.n):
            reply = self.replies[i % len(self.replies)]
            for j, ch in enumerate(reply):
                lps = ()
                if p.logprobs is not None:
                    top = tuple((ord(ch) + k, -0.5 * j - k) for k in range(p.logprobs))
                    lps = (TokenLogprob(ord(ch), -0.5 * j if j else -math.inf, top),)
                last = j == len(reply) - 1
                yield TokenChunk(ch, (ord(ch),), i, lps, "stop" if last and p.n > 1 else None)
            ends.append(SampleEnd(i, "stop", len(reply)))
        yield Finished("stop", Usage(3, sum(e.completion_tokens for e in ends)), samples=tuple(ends) if p.n > 1 else ())


@pytest.fixture(scope="module")
def served():
    registry = CollectorRegistry()
    backend = ScriptedBackend()
    server = serve_http(build_app(backend, registry))
    yield backend, server
    server.stop()


@pytest.fixture
def backend(served) -> ScriptedBackend:
    served[0].replies = ["Hello"]
    served[0].requests.clear()
    return served[0]


@pytest.fixture
def url(served) -> str:
    return served[1].url


@pytest.fixture
def client(url):
    with openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=10) as c:
        yield c


def post(url: str, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{url}{path}", json=body, timeout=10)


def events(url: str, path: str, body: dict) -> list[dict]:
    r = post(url, path, {**body, "stream": True})
    assert r.status_code == 200, r.text
    lines = [ln[6:] for ln in r.text.split("\n\n") if ln.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(x) for x in lines[:-1]]


MSG = [{"role": "user", "content": "hi"}]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}},
         {"type": "function", "function": {"name": "add", "parameters": {
             "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}}}}]
CALL = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'


def test_get_model_by_id(client, url, backend):
    assert client.models.retrieve(backend.model_name).id == backend.model_name  # the id holds a slash
    r = httpx.get(f"{url}/v1/models/gpt-17", timeout=10)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_n_choices_whole_and_streamed(client, url, backend):
    backend.replies = ["ab", "cde", "f"]
    out = client.chat.completions.create(model=backend.model_name, messages=MSG, n=3, temperature=1.0)
    assert [(c.index, c.message.content, c.finish_reason) for c in out.choices] == [
        (0, "ab", "stop"), (1, "cde", "stop"), (2, "f", "stop")]
    assert out.usage.completion_tokens == 6 and backend.requests[-1].sampling.n == 3
    chunks = events(url, "/v1/chat/completions", {"messages": MSG, "n": 3})
    text: dict[int, str] = {}
    reasons: dict[int, str] = {}
    for c in chunks:
        for ch in c["choices"]:
            text[ch["index"]] = text.get(ch["index"], "") + (ch["delta"].get("content") or "")
            if ch["finish_reason"]:
                reasons[ch["index"]] = ch["finish_reason"]
    assert text == {0: "ab", 1: "cde", 2: "f"} and reasons == {0: "stop", 1: "stop", 2: "stop"}
    comp = client.completions.create(model=backend.model_name, prompt="x", n=2)
    assert [(c.index, c.text) for c in comp.choices] == [(0, "ab"), (1, "cde")]


def test_chat_logprobs_shape(client, backend):
    out = client.chat.completions.create(model=backend.model_name, messages=MSG, logprobs=True, top_logprobs=2)
    assert backend.requests[-1].sampling.logprobs == 2
    content = out.choices[0].logprobs.content
    assert [t.token for t in content] == list("Hello") and [t.bytes for t in content] == [[b] for b in b"Hello"]
    assert content[0].logprob == -9999.0 and content[1].logprob == -0.5  # -inf is sent as -9999
    assert [(x.token, x.logprob) for x in content[1].top_logprobs] == [("e", -0.5), ("f", -1.5)]
    plain = client.chat.completions.create(model=backend.model_name, messages=MSG, logprobs=True)
    assert backend.requests[-1].sampling.logprobs == 0 and plain.choices[0].logprobs.content[2].top_logprobs == []
    none = client.chat.completions.create(model=backend.model_name, messages=MSG)
    assert backend.requests[-1].sampling.logprobs is None and none.choices[0].logprobs is None


def test_completion_logprobs_shape_whole_and_streamed(client, url, backend):
    out = client.completions.create(model=backend.model_name, prompt="x", logprobs=1)
    lp = out.choices[0].logprobs
    assert lp.tokens == list("Hello") and lp.token_logprobs[1:] == [-0.5, -1.0, -1.5, -2.0]
    assert lp.text_offset == [0, 1, 2, 3, 4] and lp.top_logprobs[1] == {"e": -0.5}
    chunks = events(url, "/v1/completions", {"prompt": "x", "logprobs": 0})
    streamed = [t for c in chunks for ch in c["choices"] if ch["logprobs"] for t in ch["logprobs"]["tokens"]]
    offsets = [o for c in chunks for ch in c["choices"] if ch["logprobs"] for o in ch["logprobs"]["text_offset"]]
    assert streamed == list("Hello") and offsets == [0, 1, 2, 3, 4]


def test_echo_puts_the_prompt_first(client, url, backend):
    out = client.completions.create(model=backend.model_name, prompt="Say: ", echo=True)
    assert out.choices[0].text == "Say: Hello"
    chunks = events(url, "/v1/completions", {"prompt": "Say: ", "echo": True})
    assert "".join(ch["text"] for c in chunks for ch in c["choices"]) == "Say: Hello"
    r = post(url, "/v1/completions", {"prompt": "x", "echo": True, "logprobs": 1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "echo"


def test_auto_tools_are_offered_and_calls_parsed(client, backend):
    backend.replies = ["Let me check. " + CALL]
    out = client.chat.completions.create(model=backend.model_name, messages=MSG, tools=TOOLS)
    req = backend.requests[-1]
    assert req.sampling.constraint is None and req.tool_use.mode == "auto"
    assert req.messages[0].role == "system" and '"name": "get_weather"' in req.messages[0].content
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Let me check."
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    backend.replies = ["No tool needed."]
    out = client.chat.completions.create(model=backend.model_name, messages=MSG, tools=TOOLS)
    assert out.choices[0].finish_reason == "stop" and out.choices[0].message.tool_calls is None


def test_streamed_tool_call_deltas_in_openai_shape(client, backend):
    backend.replies = ["Sure. " + CALL + " " + CALL.replace("Paris", "Rome")]
    stream = client.chat.completions.create(model=backend.model_name, messages=MSG, tools=TOOLS, stream=True)
    content, calls, reason = "", {}, None
    for chunk in stream:
        for ch in chunk.choices:
            content += ch.delta.content or ""
            for tc in ch.delta.tool_calls or []:
                entry = calls.setdefault(tc.index, {"id": None, "name": "", "arguments": ""})
                entry["id"] = entry["id"] or tc.id
                entry["name"] += tc.function.name or ""
                entry["arguments"] += tc.function.arguments or ""
            reason = ch.finish_reason or reason
    assert "<tool_call>" not in content and content.strip() == "Sure."
    assert [(c["name"], json.loads(c["arguments"])) for c in calls.values()] == [
        ("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Rome"})]
    assert sorted(calls) == [0, 1] and all(c["id"].startswith("call_") for c in calls.values())
    assert reason == "tool_calls"


def test_required_and_named_tool_choice_constrain_the_output(client, backend):
    backend.replies = [CALL]
    out = client.chat.completions.create(model=backend.model_name, messages=MSG, tools=TOOLS, tool_choice="required")
    c = backend.requests[-1].sampling.constraint
    assert c.kind == "grammar" and '"const": "get_weather"' in c.spec and '"const": "add"' in c.spec
    assert out.choices[0].message.tool_calls[0].function.name == "get_weather"
    client.chat.completions.create(model=backend.model_name, messages=MSG, tools=TOOLS,
                                   tool_choice={"type": "function", "function": {"name": "add"}})
    c = backend.requests[-1].sampling.constraint
    assert '"const": "add"' in c.spec and "get_weather" not in c.spec.split("\n", 1)[1].split('"const"')[1]
    client.chat.completions.create(model=backend.model_name, messages=MSG, tools=TOOLS, tool_choice="none")
    req = backend.requests[-1]
    assert req.sampling.constraint is None and "<tools>" not in "".join(m.content for m in req.messages)


def test_tool_turns_in_the_history_are_rendered(client, backend):
    history = MSG + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp_c": 21}'},
    ]
    client.chat.completions.create(model=backend.model_name, messages=history, tools=TOOLS)
    sent = backend.requests[-1].messages
    assert [m.role for m in sent] == ["system", "user", "assistant", "user"]
    assert sent[2].content == '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
    assert sent[3].content == '<tool_response>\n{"temp_c": 21}\n</tool_response>'


def test_structured_output_fields_map_onto_the_constraint(client, backend):
    schema = {"type": "object", "properties": {"x": {"type": "integer"}}}
    cases = [
        ({"response_format": {"type": "json_object"}}, ("json_object", "", "response_format")),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": schema, "strict": True}}},
         ("json_schema", json.dumps(schema), "response_format.json_schema.schema")),
        ({"structured_outputs": {"regex": "[a-z]+"}}, ("regex", "[a-z]+", "structured_outputs.regex")),
        ({"structured_outputs": {"choice": ["yes", "no"]}}, ("choice", "", "structured_outputs.choice")),
        ({"structured_outputs": {"grammar": 'start: "a"'}}, ("grammar", 'start: "a"', "structured_outputs.grammar")),
        ({"structured_outputs": {"json": schema}}, ("json_schema", json.dumps(schema), "structured_outputs.json")),
        ({"guided_regex": "b+"}, ("regex", "b+", "guided_regex")),
        ({"guided_choice": ["a", "b"]}, ("choice", "", "guided_choice")),
        ({"guided_json": json.dumps(schema)}, ("json_schema", json.dumps(schema), "guided_json")),
    ]
    for extra, (kind, spec, source) in cases:
        client.chat.completions.create(model=backend.model_name, messages=MSG,
                                       **({"response_format": extra["response_format"]} if "response_format" in extra
                                          else {"extra_body": extra}))
        c = backend.requests[-1].sampling.constraint
        assert (c.kind, c.spec, c.source) == (kind, spec, source), extra
    assert backend.requests[-2].sampling.constraint.choices == ("a", "b")
    client.chat.completions.create(model=backend.model_name, messages=MSG, presence_penalty=0.5,
                                   frequency_penalty=-0.25, logit_bias={"17": 3.0, "5": -100},
                                   extra_body={"repetition_penalty": 1.2})
    p = backend.requests[-1].sampling
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (0.5, -0.25, 1.2)
    assert p.logit_bias == ((5, -100.0), (17, 3.0))


@pytest.mark.parametrize("body, param", [
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice.function.name"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [TOOLS[0], TOOLS[0]]}, "tools[1].function.name"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema.schema"),
    ({"response_format": {"type": "yaml"}}, "response_format.type"),
    ({"response_format": {"type": "json_object"}, "guided_regex": "a"}, "guided_regex"),
    ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs.choice"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
    ({"top_logprobs": 3}, "top_logprobs"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"logprobs": True, "top_logprobs": -1}, "top_logprobs"),
    ({"n": 0}, "n"),
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"logit_bias": {"abc": 1}}, "logit_bias.abc"),
    ({"logit_bias": {"5": 101}}, "logit_bias.5"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].tool_call_id"),
    ({"messages": [{"role": "user", "content": "x", "tool_calls": []}]}, "messages[0].tool_calls"),
])
def test_bad_extras_are_400_naming_the_field(url, backend, body, param):
    r = post(url, "/v1/chat/completions", {"messages": MSG, **body})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.json()
    assert not backend.requests  # refused before the backend saw it
