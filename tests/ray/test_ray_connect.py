"""`cluster.ray_connect`: how `halfmoon up` / `down` find, authenticate to and reach an
existing Ray cluster, and that they fail within seconds, saying why, when they cannot."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from ray_helpers import RayHead, free_port

from cluster.ray_connect import RayConnectError, is_loopback, probe, resolve, use_token_if_available

BIN = os.path.dirname(sys.executable)


@pytest.mark.parametrize("address, host, port, loopback", [
    ("127.0.0.1:6379", "127.0.0.1", 6379, True),
    ("localhost:6379", "localhost", 6379, True),
    ("[::1]:6379", "::1", 6379, True),
    ("10.1.2.3:6380", "10.1.2.3", 6380, False),
    ("ray://127.0.0.1:10001", "127.0.0.1", 10001, True),
    ("head.example.com:6379", "head.example.com", 6379, False),
])
def test_resolve_reads_host_and_port(address, host, port, loopback):
    target = resolve(address)
    assert (target.address, target.host, target.port, target.loopback) == (address, host, port, loopback)


@pytest.mark.parametrize("address", ["6379", "head:", "head:port", ":6379"])
def test_resolve_refuses_what_is_not_host_port(address):
    with pytest.raises(RayConnectError, match=f"Ray address '{address}' is not HOST:PORT"):
        resolve(address)


def test_resolve_refuses_local():
    with pytest.raises(RayConnectError, match="'local' would start a new Ray instance"):
        resolve("local")


def test_is_loopback():
    assert is_loopback("127.0.0.2") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.0.2.2") and not is_loopback("example.com")


@pytest.fixture
def no_ray_auth_env(monkeypatch, tmp_path):
    for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    return tmp_path


def test_a_local_token_turns_token_mode_on(no_ray_auth_env):
    assert use_token_if_available() is False and "RAY_AUTH_MODE" not in os.environ
    (no_ray_auth_env / ".ray").mkdir()
    (no_ray_auth_env / ".ray" / "auth_token").write_text("f" * 64)
    assert use_token_if_available() is True and os.environ["RAY_AUTH_MODE"] == "token"


def test_an_explicit_auth_mode_is_kept(no_ray_auth_env, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.setenv("RAY_AUTH_TOKEN", "f" * 64)
    assert use_token_if_available() is False and os.environ["RAY_AUTH_MODE"] == "disabled"


def test_token_from_env_or_path(no_ray_auth_env, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(no_ray_auth_env / "missing"))
    assert use_token_if_available() is False
    (no_ray_auth_env / "tok").write_text("f" * 64)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(no_ray_auth_env / "tok"))
    assert use_token_if_available() is True


def test_probe_of_a_closed_port_fails_fast():
    port = free_port()
    started = time.monotonic()
    with pytest.raises(RayConnectError, match=rf"cannot reach a Ray GCS at 127.0.0.1:{port} within 3s"):
        probe(resolve(f"127.0.0.1:{port}"))
    assert time.monotonic() - started < 5


def test_probe_of_something_else_names_it():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))  # a gRPC server with no Ray services
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with pytest.raises(RayConnectError, match=rf"127.0.0.1:{port} did not answer as a Ray GCS \(UNIMPLEMENTED"):
            probe(resolve(f"127.0.0.1:{port}"))
    finally:
        server.stop(0)


def shell_env(**extra: str) -> dict[str, str]:
    """An operator's shell: none of the Ray settings this test session runs with."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    return {**env, **extra}


def test_halfmoon_down_without_a_cluster_exits_1_within_seconds(tmp_path):
    started = time.monotonic()
    out = subprocess.run([f"{BIN}/halfmoon", "down", "--address", f"127.0.0.1:{free_port()}"],
                         env=shell_env(HOME=str(tmp_path)), capture_output=True, text=True, timeout=60)
    assert out.returncode == 1, out.stderr
    assert "error: cannot reach a Ray GCS at 127.0.0.1:" in out.stderr and time.monotonic() - started < 15


@pytest.mark.slow
def test_halfmoon_down_reaches_a_loopback_gcs_from_a_plain_shell(tmp_path):
    """The shell lacks RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0: Ray alone would dial the GCS at
    the machine's outward address (where nothing listens) and hang for minutes."""
    head = RayHead(num_cpus=1, resources={}, env=shell_env(RAY_AUTH_MODE="disabled",
                                                          RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0"))
    try:
        started = time.monotonic()
        out = subprocess.run([f"{BIN}/halfmoon", "down", "--address", head.gcs_address, "--namespace", "hm-none"],
                             env=shell_env(HOME=str(tmp_path)), capture_output=True, text=True, timeout=90)
        took = time.monotonic() - started
    finally:
        head.stop()
    assert out.returncode == 0, out.stderr
    assert "nothing of halfmoon runs in Ray namespace 'hm-none'" in out.stdout and took < 30, (took, out.stderr)
    assert f"Connecting to existing Ray cluster at address: {head.gcs_address}" in out.stderr


FAKE_GCS_THEN_CONNECT = """
import os, sys
from concurrent import futures
from pathlib import Path
import grpc
from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc
from cluster.ray_connect import connect

class ClusterIdOnly(gcs_service_pb2_grpc.NodeInfoGcsServiceServicer):
    def GetClusterId(self, request, context):
        return gcs_service_pb2.GetClusterIdReply(cluster_id=os.urandom(28))

server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
gcs_service_pb2_grpc.add_NodeInfoGcsServiceServicer_to_server(ClusterIdOnly(), server)
port = server.add_insecure_port("127.0.0.1:0")
server.start()
connect(f"127.0.0.1:{port}", "x", timeout_s=4)
print("connected")
"""


def test_a_gcs_that_answers_but_never_lets_ray_join_ends_the_command_at_the_watchdog(tmp_path):
    """The probe passes (GetClusterId answers) but every other GCS call fails, so `ray.init`
    keeps retrying; the watchdog ends the process with exit 1 and says why."""
    started = time.monotonic()
    out = subprocess.run([sys.executable, "-c", FAKE_GCS_THEN_CONNECT], env=shell_env(HOME=str(tmp_path)),
                         capture_output=True, text=True, timeout=90, cwd=Path(__file__).resolve().parents[2])
    took = time.monotonic() - started
    assert out.returncode == 1 and "connected" not in out.stdout, out.stderr[-2000:]
    assert re.search(r"error: the Ray GCS at 127\.0\.0\.1:\d+ answered, but joining the cluster did not complete "
                     r"within 4s; if it uses token authentication", out.stderr), out.stderr[-2000:]
    assert 4 <= took < 30, took
