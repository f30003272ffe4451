"""The control plane (node Register / Heartbeat) is a listener of its own, and every call
must be signed with the cluster's control secret."""
from __future__ import annotations

import grpc
import pytest
from conductor_thread import SECRET, beat, channel, heartbeat, running_conductor

from conductor.auth import CONTROL_AUTH_KEY, ControlVerifier, is_loopback, sign_control
from conductor.server import ConductorSpec, serve_conductor
from proto.halfmoon.v1 import admin_pb2, admin_pb2_grpc, node_pb2_grpc

pytestmark = pytest.mark.timeout(120)


def up_nodes(client_ch) -> set[str]:
    st = admin_pb2_grpc.AdminStub(client_ch).Status(admin_pb2.StatusRequest(), timeout=5)
    return {n.node_id for n in st.nodes if n.state == "up"}


def test_fake_nodes_are_refused_and_the_signed_node_is_accepted():
    with running_conductor() as c, channel(c.client_address) as client_ch, channel(c.control_address) as control_ch:
        assert c.ports.control_port != c.ports.grpc_port
        # the client port does not serve the control API at all
        with pytest.raises(grpc.RpcError) as err:
            c.register(node_pb2_grpc.ConductorControlStub(client_ch), "evil-0", "decode")
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED

        control = node_pb2_grpc.ConductorControlStub(control_ch)
        req = c.fake_register("evil-1", "decode")
        with pytest.raises(grpc.RpcError) as err:  # unsigned
            control.Register(req, timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert err.value.details() == (f"control plane: no credentials ({CONTROL_AUTH_KEY} metadata): is the node "
                                       "given the cluster's control secret?")
        with pytest.raises(grpc.RpcError) as err:  # signed with another secret
            c.register(control, "evil-2", "decode", secret="not-the-cluster-secret")
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert err.value.details() == "control plane: bad signature: the node's control secret is not the conductor's"
        assert up_nodes(client_ch) == set()

        c.register(control, "decode-0", "decode")  # the right secret
        assert up_nodes(client_ch) == {"decode-0"}
        assert beat(control, "decode-0")

        # a captured call cannot be replayed, nor its signature reused for another body
        md = sign_control(SECRET, "Heartbeat", heartbeat("decode-0"))
        assert control.Heartbeat(heartbeat("decode-0"), timeout=5, metadata=md).known
        with pytest.raises(grpc.RpcError) as err:
            control.Heartbeat(heartbeat("decode-0"), timeout=5, metadata=md)
        assert (err.value.code(), err.value.details()) == (
            grpc.StatusCode.UNAUTHENTICATED, "control plane: replayed call: this nonce was used already")
        md = sign_control(SECRET, "Register", c.fake_register("decode-1", "decode"))
        with pytest.raises(grpc.RpcError) as err:
            control.Register(c.fake_register("evil-3", "decode"), timeout=5, metadata=md)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        md = sign_control(SECRET, "Heartbeat", c.fake_register("decode-0", "decode"))  # another method's signature
        with pytest.raises(grpc.RpcError) as err:
            control.Heartbeat(heartbeat("decode-0"), timeout=5, metadata=md)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert up_nodes(client_ch) == {"decode-0"}


def test_stale_and_malformed_credentials_are_refused():
    now = [1_000_000.0]
    v = ControlVerifier(SECRET, max_skew_s=60, clock=lambda: now[0])
    req = heartbeat("decode-0")
    old = sign_control(SECRET, "Heartbeat", req, clock=lambda: now[0] - 61)
    assert v.check("Heartbeat", req, old).startswith("stale credentials: signed 61s away")
    ahead = sign_control(SECRET, "Heartbeat", req, clock=lambda: now[0] + 59)
    assert v.check("Heartbeat", req, ahead) is None  # within the skew either way
    for bad in ("v1:12:zz:00", "v2:1:" + "00" * 16 + ":00", "v1:1:00:00", "garbage"):
        assert v.check("Heartbeat", req, ((CONTROL_AUTH_KEY, bad),)).startswith("malformed")
    # seen nonces are forgotten only once their timestamps are refused anyway
    fresh = sign_control(SECRET, "Heartbeat", req, clock=lambda: now[0])
    assert v.check("Heartbeat", req, fresh) is None
    assert v.remembered == 2
    now[0] += 121
    assert v.check("Heartbeat", req, fresh).startswith("stale credentials")
    assert v.check("Heartbeat", req, sign_control(SECRET, "Heartbeat", req, clock=lambda: now[0])) is None
    assert v.remembered == 1


def test_the_conductor_does_not_start_without_a_control_secret():
    import asyncio

    with pytest.raises(ValueError, match="control_secret: the conductor's control plane needs a shared secret"):
        asyncio.run(serve_conductor(ConductorSpec(grpc_port=0, http_port=None)))


@pytest.mark.parametrize("host, want", [("127.0.0.1", True), ("127.3.4.5", True), ("::1", True),
                                        ("localhost", True), ("0.0.0.0", False), ("::", False),
                                        ("10.0.0.7", False), ("example.com", False)])
def test_is_loopback(host, want):
    assert is_loopback(host) is want


def test_a_launcher_settles_one_control_secret_per_cluster(monkeypatch):
    from cluster.config import ClusterConfig, ConfigError, parse_config
    from cluster.specs import CONTROL_SECRET_ENV, build_specs, with_secrets

    monkeypatch.delenv(CONTROL_SECRET_ENV, raising=False)
    a, b = with_secrets(ClusterConfig()), with_secrets(ClusterConfig())
    assert len(a.auth.control_secret) >= 32 and a.auth.control_secret != b.auth.control_secret  # generated
    assert "control_secret" not in repr(a.auth)
    conductor, nodes = build_specs(a)
    assert {n.control_secret for n in nodes} == {conductor.control_secret} == {a.auth.control_secret}
    assert a.auth.control_secret not in repr(conductor) + repr(nodes)

    monkeypatch.setenv(CONTROL_SECRET_ENV, "from-the-environment-0123")
    assert with_secrets(ClusterConfig()).auth.control_secret == "from-the-environment-0123"
    configured = parse_config("auth: {control_secret: from-the-config-file-0123}")
    assert with_secrets(configured).auth.control_secret == "from-the-config-file-0123"  # the config wins
    monkeypatch.setenv(CONTROL_SECRET_ENV, "short")
    with pytest.raises(ConfigError, match=r"\$HALFMOON_CONTROL_SECRET.*\n  auth.control_secret: String should have at"):
        with_secrets(ClusterConfig())


def test_the_control_port_is_a_port_of_its_own():
    from cluster.config import ConfigError, parse_config

    with pytest.raises(ConfigError, match=r"conductor.control_port: must differ from grpc_port \(50051\)"):
        parse_config("conductor: {control_port: 50051}")
    assert parse_config("conductor: {control_host: 0.0.0.0, control_port: 50052}").conductor.control_port == 50052
