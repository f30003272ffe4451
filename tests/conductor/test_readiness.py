"""Readiness vs liveness: the conductor is live once it serves, and ready (gRPC health of
`halfmoon.v1.Generation`, HTTP `/ready`) only while a prefill + decode pair is up."""
from __future__ import annotations

import time

import httpx
import pytest
from conductor_thread import channel, heartbeating, running_conductor
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conductor.readiness import GENERATION_SERVICE, not_ready_reason
from conductor.request import NodeId
from conductor.view import ClusterView, DecodeNodeView, PrefillNodeView
from proto.halfmoon.v1 import generate_pb2, node_pb2_grpc

pytestmark = pytest.mark.timeout(120)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def view(prefill: list[bool], decode: list[bool]) -> ClusterView:
    return ClusterView(prefill=[PrefillNodeView(NodeId(f"p{i}"), healthy=h) for i, h in enumerate(prefill)],
                       decode=[DecodeNodeView(NodeId(f"d{i}"), 1024, healthy=h) for i, h in enumerate(decode)],
                       index=None, block_tokens=16)


def test_the_generation_service_name_is_the_protos():
    assert GENERATION_SERVICE == generate_pb2.DESCRIPTOR.services_by_name["Generation"].full_name


@pytest.mark.parametrize("prefill, decode, reason", [
    ([], [], "no node has registered yet"),
    ([True], [], "no decode-capable node is up"),
    ([], [True], "no prefill-capable node is up"),
    ([False], [False], "no prefill and no decode-capable node is up"),
    ([False, True], [True], None),
    ([True], [False, False], "no decode-capable node is up"),
])
def test_not_ready_reason_names_what_is_missing(prefill, decode, reason):
    assert not_ready_reason(view(prefill, decode)) == reason


def wait_status(health, service: str, want, timeout_s: float = 10.0):
    deadline = time.monotonic() + timeout_s
    while True:
        got = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status
        if got == want or time.monotonic() > deadline:
            return got
        time.sleep(0.05)


def test_generation_is_serving_only_while_a_prefill_decode_pair_is_up():
    with running_conductor() as c, channel(c.client_address) as client_ch, channel(c.control_address) as control_ch:
        health = health_pb2_grpc.HealthStub(client_ch)
        control = node_pb2_grpc.ConductorControlStub(control_ch)
        http = c.http_url

        def check(service: str):
            return health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status

        # live at once, not ready before any node registered
        assert check("") == SERVING
        assert check(GENERATION_SERVICE) == NOT_SERVING
        r = httpx.get(f"{http}/ready", timeout=5)
        assert r.status_code == 503 and r.json()["error"]["message"] == "not ready: no node has registered yet"
        assert httpx.get(f"{http}/health", timeout=5).status_code == 200

        with heartbeating(control, set()) as alive:
            c.register(control, "prefill-0", "prefill")
            alive.add("prefill-0")
            assert wait_status(health, GENERATION_SERVICE, SERVING, timeout_s=1.0) == NOT_SERVING  # half a pair
            assert httpx.get(f"{http}/ready", timeout=5).json()["error"]["message"] == \
                "not ready: no decode-capable node is up"

            c.register(control, "decode-0", "decode")
            alive.add("decode-0")
            assert wait_status(health, GENERATION_SERVICE, SERVING) == SERVING
            assert httpx.get(f"{http}/ready", timeout=5).json() == {"status": "ready"}

            alive.discard("decode-0")  # it stops heartbeating and is marked down
            assert wait_status(health, GENERATION_SERVICE, NOT_SERVING, timeout_s=15) == NOT_SERVING
            assert httpx.get(f"{http}/ready", timeout=5).json()["error"]["message"] == \
                "not ready: no decode-capable node is up"
            assert check("") == SERVING and httpx.get(f"{http}/health", timeout=5).status_code == 200

            c.register(control, "decode-0", "decode")  # back: ready again
            assert wait_status(health, GENERATION_SERVICE, SERVING) == SERVING
