"""The client API key: off by default; when set, both front doors (HTTP `/v1/...`, gRPC
Generation and Admin) refuse calls without `Bearer <key>`, and health stays open."""
from __future__ import annotations

import grpc
import httpx
import openai
import pytest
from conductor_thread import channel, running_conductor
from fakes import FakeBackend
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry

from cluster.client import Client, make_request
from conductor.auth import exposure_warning, key_problem
from conductor.http_frontend import build_app, serve_http
from proto.halfmoon.v1 import admin_pb2, admin_pb2_grpc, generate_pb2_grpc

pytestmark = pytest.mark.timeout(120)
KEY = "sk-halfmoon-test-key"


@pytest.fixture(scope="module")
def keyed_http():
    registry = CollectorRegistry()
    server = serve_http(build_app(FakeBackend(registry), registry, api_key=KEY))
    yield server.url
    server.stop()


@pytest.mark.parametrize("headers, message", [
    ({}, "missing API key: send the header `Authorization: Bearer <key>`"),
    ({"Authorization": "Bearer wrong"}, "incorrect API key"),
    ({"Authorization": KEY}, "malformed Authorization: expected `Bearer <key>`"),
    ({"Authorization": f"Basic {KEY}"}, "malformed Authorization: expected `Bearer <key>`"),
])
@pytest.mark.parametrize("method, path", [("POST", "/v1/completions"), ("POST", "/v1/chat/completions"),
                                          ("GET", "/v1/models")])
def test_http_without_the_key_is_401(keyed_http, headers, message, method, path):
    r = httpx.request(method, f"{keyed_http}{path}", headers=headers | {"content-type": "application/json"},
                      content=b'{"prompt": "x", "messages": [{"role": "user", "content": "x"}]}', timeout=10)
    assert r.status_code == 401
    assert r.headers["www-authenticate"] == 'Bearer realm="halfmoon"'
    assert r.json() == {"error": {"message": message, "type": "invalid_request_error", "param": None,
                                  "code": "invalid_api_key"}}


def test_http_with_the_key_serves_and_health_stays_open(keyed_http):
    with openai.OpenAI(base_url=f"{keyed_http}/v1", api_key=KEY, max_retries=0, timeout=10) as client:
        out = client.completions.create(model="fake-model", prompt="x", max_tokens=3)
        assert out.choices[0].text == "The capital of"
    with openai.OpenAI(base_url=f"{keyed_http}/v1", api_key="wrong", max_retries=0, timeout=10) as client:
        with pytest.raises(openai.AuthenticationError, match="incorrect API key"):
            client.models.list()
    for path in ("/health", "/ready", "/metrics"):
        assert httpx.get(f"{keyed_http}{path}", timeout=10).status_code == 200, path


def test_http_without_a_configured_key_needs_none(url):  # the shared frontend fixture: no key
    assert httpx.get(f"{url}/v1/models", timeout=10).status_code == 200


def test_grpc_needs_the_key_for_generation_and_admin_not_for_health():
    with running_conductor(api_key=KEY) as c, channel(c.client_address) as ch:
        admin = admin_pb2_grpc.AdminStub(ch)
        for metadata, message in ((None, "missing API key: send the header `Authorization: Bearer <key>`"),
                                  ((("authorization", "Bearer nope"),), "incorrect API key")):
            with pytest.raises(grpc.RpcError) as err:
                admin.Status(admin_pb2.StatusRequest(), timeout=5, metadata=metadata)
            assert (err.value.code(), err.value.details()) == (grpc.StatusCode.UNAUTHENTICATED, message)
            with pytest.raises(grpc.RpcError) as err:  # a server-streaming method too
                list(generate_pb2_grpc.GenerationStub(ch).Generate(make_request("hi"), timeout=5, metadata=metadata))
            assert (err.value.code(), err.value.details()) == (grpc.StatusCode.UNAUTHENTICATED, message)
        health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.SERVING

        with Client(c.client_address, api_key=KEY) as client:
            assert client.status().model == c.spec.model
            # past the key check: the request is judged on its merits (no node has registered)
            with pytest.raises(grpc.RpcError) as err:
                client.generate(make_request("hi"), timeout=10)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "no healthy prefill node" in err.value.details()


def test_grpc_without_a_configured_key_needs_none(monkeypatch):
    monkeypatch.delenv("HALFMOON_API_KEY", raising=False)
    with running_conductor() as c, Client(c.client_address) as client:
        assert client.status().model == c.spec.model


def test_the_client_takes_the_key_from_the_environment(monkeypatch):
    monkeypatch.setenv("HALFMOON_API_KEY", KEY)
    with running_conductor(api_key=KEY) as c, Client(c.client_address) as client:
        assert client.status().model == c.spec.model


def test_the_api_key_reaches_the_conductor_from_config_env_and_flag(monkeypatch):
    from typer.testing import CliRunner

    from cluster import cli
    from cluster.config import ClusterConfig, parse_config
    from cluster.specs import build_specs

    monkeypatch.delenv("HALFMOON_API_KEY", raising=False)
    assert build_specs(ClusterConfig())[0].api_key is None  # off by default
    assert build_specs(parse_config("auth: {api_key: from-file}"))[0].api_key == "from-file"
    monkeypatch.setenv("HALFMOON_API_KEY", "from-env")
    assert build_specs(ClusterConfig())[0].api_key == "from-env"
    assert build_specs(parse_config("auth: {api_key: from-file}"))[0].api_key == "from-file"
    assert "from-file" not in repr(build_specs(parse_config("auth: {api_key: from-file}"))[0])

    seen = {}

    def launcher(config, timeout_s):
        seen["config"] = config
        raise RuntimeError("not starting anything in this test")

    monkeypatch.setattr("cluster.launch.LAUNCHERS", {"processes": launcher})
    result = CliRunner().invoke(cli.app, ["serve", "--launcher", "processes", "--api-key", "from-flag"])
    assert result.exit_code == 1 and seen["config"].auth.api_key == "from-flag"


def test_key_checks_and_the_exposure_warning():
    assert key_problem(KEY, f"Bearer {KEY}") is None and key_problem(KEY, f"bearer  {KEY} ") is None
    assert key_problem(KEY, f"Bearer {KEY}x") == "incorrect API key"
    assert exposure_warning("127.0.0.1", None) is None and exposure_warning("0.0.0.0", KEY) is None
    warning = exposure_warning("0.0.0.0", None)
    assert "binds 0.0.0.0 WITHOUT AN API KEY" in warning and "HALFMOON_API_KEY" in warning
