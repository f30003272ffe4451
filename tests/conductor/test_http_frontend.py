"""The OpenAI-compatible HTTP frontend, driven by the official `openai` client (and raw
httpx where the client hides the wire) against a real uvicorn server on loopback."""
from __future__ import annotations

import asyncio
import json
import socket

import httpx
import openai
import pytest
from fakes import FakeBackend, words
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from conductor.frontend_api import Rejected, RequestFailed, Unavailable
from conductor.http_frontend import build_app, serve_http
from conductor.http_server import HttpServer

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def client(url) -> openai.OpenAI:
    with openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=10) as c:
        yield c


def post(url: str, path: str, body: object, timeout: float = 10) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(f"{url}{path}", content=content, headers={"content-type": "application/json"}, timeout=timeout)


def scrape(url: str) -> dict[tuple[str, frozenset], float]:
    """Every sample of /metrics, keyed by (name, labels)."""
    # Prometheus asks for OpenMetrics first; the answer must keep the "halfmoon:" names
    r = httpx.get(f"{url}/metrics", headers={"Accept": "application/openmetrics-text;version=1.0.0"}, timeout=10)
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    text = r.text
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: dict[tuple[str, frozenset], float], name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def test_streamed_chat_completion(client, backend):
    stream = client.chat.completions.create(
        model=backend.model_name,
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    with_choices = [c for c in chunks if c.choices]
    assert with_choices[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in with_choices) == backend.reply
    assert with_choices[-1].choices[0].finish_reason == "stop"
    assert chunks[-1].usage.completion_tokens == len(words(backend.reply))
    assert {c.id for c in chunks} == {chunks[0].id} and chunks[0].id.startswith("chatcmpl-")
    sent = backend.requests[-1].messages
    assert [(m.role, m.content) for m in sent] == [("system", "Be brief."), ("user", "Capital of France?")]


def test_non_streamed_completion_maps_sampling_fields(client, backend):
    out = client.completions.create(
        model=backend.model_name,
        prompt="The capital of France is",
        max_tokens=3,
        temperature=0.5,
        top_p=0.9,
        seed=7,
        stop=["\n", "."],
        extra_body={"top_k": 5, "ignore_eos": False},
    )
    assert out.object == "text_completion" and out.id.startswith("cmpl-") and out.model == backend.model_name
    assert out.choices[0].text == "".join(words(backend.reply)[:3])
    assert out.choices[0].finish_reason == "length"
    assert (out.usage.prompt_tokens, out.usage.completion_tokens, out.usage.total_tokens) == (5, 3, 8)
    sampling = backend.requests[-1].sampling
    assert (sampling.max_tokens, sampling.temperature, sampling.top_p, sampling.top_k, sampling.seed) == (3, 0.5, 0.9, 5, 7)
    assert sampling.stop == ("\n", ".")
    assert backend.requests[-1].prompt == "The capital of France is"


def test_non_streamed_chat_and_token_id_prompt(client, backend):
    chat = client.chat.completions.create(model=backend.model_name, messages=[{"role": "user", "content": "Hi"}])
    assert chat.choices[0].message.content == backend.reply
    assert chat.choices[0].message.role == "assistant" and chat.object == "chat.completion"
    out = client.completions.create(model=backend.model_name, prompt=[1, 2, 3], max_tokens=2)
    assert backend.requests[-1].prompt_token_ids == (1, 2, 3)
    assert out.usage.prompt_tokens == 3


def test_streamed_completion_is_sse_ending_in_done(url, backend):
    r = post(url, "/v1/completions", {"model": backend.model_name, "prompt": "x", "stream": True, "max_tokens": 2})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = [e for e in r.text.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    bodies = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
    assert "".join(b["choices"][0]["text"] for b in bodies) == "".join(words(backend.reply)[:2])
    assert bodies[-1]["choices"][0]["finish_reason"] == "length"


def test_bad_value_is_400_naming_the_field(client, backend):
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=backend.model_name, prompt="x", top_p=1.5)
    assert info.value.status_code == 400
    assert info.value.param == "top_p" and info.value.type == "invalid_request_error"
    assert "top_p" in info.value.message
    assert backend.requests == []  # refused before the backend saw it


@pytest.mark.parametrize(
    "body, param",
    [
        ({"prompt": "x", "bogus": 1}, "bogus"),
        ({"prompt": "x", "max_tokens": "many"}, "max_tokens"),
        ({"prompt": "x", "n": 0}, "n"),
        ({"prompt": ["a", "b"]}, "prompt"),
        ({}, "prompt"),
    ],
)
def test_bad_completion_bodies(url, backend, body, param):
    r = post(url, "/v1/completions", body)
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error" and err["message"]
    assert set(err) == {"message", "type", "param", "code"}


def test_bad_chat_message_names_its_index(url):
    r = post(url, "/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}, {"role": "function", "content": "b"}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages[1].role"


def test_malformed_json_is_400(url):
    r = post(url, "/v1/completions", b"{not json")
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as info:
        client.completions.create(model="gpt-17", prompt="x")
    assert info.value.param == "model" and info.value.code == "model_not_found"


@pytest.mark.parametrize("stream", [False, True])
def test_rejection_is_429_with_retry_after(client, backend, stream):
    backend.fail_next = Rejected("ttft_slo", retry_after_s=2.5)
    with pytest.raises(openai.RateLimitError) as info:
        client.completions.create(model=backend.model_name, prompt="x", stream=stream)
    assert info.value.status_code == 429
    assert info.value.response.headers["retry-after"] == "3"
    assert "ttft_slo" in info.value.message
    assert not backend.closed_early.is_set()


@pytest.mark.parametrize("error, status", [(Unavailable("all decode nodes are down"), 503), (RequestFailed("kv transfer failed"), 500)])
def test_backend_errors_map_to_status(url, backend, error, status):
    backend.fail_next = error
    r = post(url, "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == status
    assert str(error) in r.json()["error"]["message"]


def test_error_mid_stream_reaches_the_client(client, backend):
    backend.fail_next, backend.fail_after_tokens = RequestFailed("decode node died"), 2
    stream = client.chat.completions.create(model=backend.model_name, messages=[{"role": "user", "content": "x"}], stream=True)
    seen = []
    with pytest.raises(openai.APIError, match="decode node died"):
        for chunk in stream:
            seen.append(chunk.choices[0].delta.content)
    assert "".join(c or "" for c in seen) == "".join(words(backend.reply)[:2])


def test_models_health_and_unknown_route(client, url, backend):
    assert [m.id for m in client.models.list().data] == [backend.model_name]
    assert httpx.get(f"{url}/health").json() == {"status": "ok"}
    r = httpx.get(f"{url}/v1/nope")
    assert r.status_code == 404 and r.json()["error"]["type"] == "invalid_request_error"


def test_metrics_move_after_requests(client, url, backend):
    before = scrape(url)
    client.completions.create(model=backend.model_name, prompt="x", max_tokens=3)
    backend.fail_next = Rejected("queue_full")
    with pytest.raises(openai.RateLimitError):
        client.completions.create(model=backend.model_name, prompt="x")
    after = scrape(url)

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("halfmoon:time_to_first_token_seconds_count") == 1
    assert moved("halfmoon:inter_token_latency_seconds_count") == 2  # 3 tokens, 2 gaps
    assert moved("halfmoon:ttft_prefill_seconds_count") == 1
    assert moved("halfmoon:request_success_total", finish_reason="length") == 1
    assert moved("halfmoon:generation_tokens_total") == 3
    assert moved("halfmoon:requests_rejected_total", reason="queue_full") == 1
    assert moved("halfmoon:http_requests_total", route="/v1/completions", status="200") == 1
    assert moved("halfmoon:http_requests_total", route="/v1/completions", status="429") == 1


def test_disconnect_mid_stream_stops_the_backend(url, backend):
    backend.token_delay_s = 0.02
    body = {"model": backend.model_name, "prompt": "x", "stream": True, "max_tokens": 500, "ignore_eos": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=10) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
    # leaving the block closed the connection: the backend's generator must be closed
    assert backend.closed_early.wait(5), "the backend kept generating for a client that left"
    assert len(backend.requests) == 1


def test_disconnect_while_waiting_stops_the_backend(url, backend):
    backend.token_delay_s = 0.05
    body = {"model": backend.model_name, "prompt": "x", "max_tokens": 500, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        post(url, "/v1/completions", body, timeout=0.3)
    assert backend.closed_early.wait(5), "the backend kept generating for a client that left"


def test_server_runs_as_a_task_in_an_existing_loop():
    registry = CollectorRegistry()
    server = HttpServer(build_app(FakeBackend(registry), registry))

    async def main() -> int:
        task = asyncio.create_task(server.serve())
        while not server.started:
            await asyncio.sleep(0.01)
        async with httpx.AsyncClient() as c:
            status = (await c.get(f"{server.url}/health")).status_code
        await server.shutdown()
        await asyncio.wait_for(task, 5)
        return status

    assert asyncio.run(main()) == 200


def test_ready_follows_the_readiness_check_and_health_stays_live():
    registry = CollectorRegistry()
    reason: list[str | None] = ["no decode-capable node is up"]
    server = serve_http(build_app(FakeBackend(registry), registry, ready=lambda: reason[0]))
    try:
        r = httpx.get(f"{server.url}/ready")
        assert r.status_code == 503
        assert r.json()["error"] == {"message": "not ready: no decode-capable node is up",
                                     "type": "service_unavailable", "param": None, "code": "not_ready"}
        assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}  # alive all along
        reason[0] = None
        assert httpx.get(f"{server.url}/ready").json() == {"status": "ready"}
    finally:
        server.stop()


def test_port_in_use_names_the_address():
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        with pytest.raises(OSError, match=f"127.0.0.1:{port}"):
            HttpServer(build_app(FakeBackend(CollectorRegistry()), CollectorRegistry()), "127.0.0.1", port)
