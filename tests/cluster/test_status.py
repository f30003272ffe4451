"""`halfmoon status` against a conductor's Admin API (an in-process fake serving a fixed
Status): off a terminal every node name and address is printed whole, one line per node,
whatever the width; `--json` is the documented schema; no conductor is a prompt exit 1."""
from __future__ import annotations

import json
import time
from concurrent import futures

import grpc
import pytest
from typer.testing import CliRunner

from cluster.cli import app
from cluster.specs import free_port
from proto.halfmoon.v1 import admin_pb2, admin_pb2_grpc

LONG_PREFILL = "prefill-us-east-1a-rack07-gpu3-very-long-node-name"
LONG_DECODE = "decode-us-east-1b-rack11-gpu0"
V6 = "[2001:db8:aaaa:bbbb:cccc:dddd:eeee:1]:40101"

STATUS = admin_pb2.StatusResponse(
    model="smollm2-135m-instruct",
    nodes=[
        admin_pb2.NodeStatus(node_id=LONG_DECODE, role="decode", address="10.20.30.40:45678", state="down",
                             running=2, waiting=1, kv_blocks_used=40, kv_blocks_total=2048,
                             last_heartbeat_age_s=7.25, metrics_address="10.20.30.40:9100"),
        admin_pb2.NodeStatus(node_id=LONG_PREFILL, role="prefill", address=V6, state="up", running=1, waiting=3,
                             kv_blocks_used=12, kv_blocks_total=512, prefix_queries_tokens=300,
                             prefix_hits_tokens=100, last_heartbeat_age_s=0.4004, metrics_address="[2001:db8::1]:9100"),
    ],
    settings=[admin_pb2.Setting(name="ttft_slo_s", value="10"), admin_pb2.Setting(name="policy", value="kv_centric")],
)


class FakeAdmin(admin_pb2_grpc.AdminServicer):
    def Status(self, request, context):
        return STATUS


@pytest.fixture
def conductor():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    admin_pb2_grpc.add_AdminServicer_to_server(FakeAdmin(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(0)


def run(*args: str, columns: int = 80):
    return CliRunner().invoke(app, ["status", *args], env={"COLUMNS": str(columns), "TERM": "dumb"})


def test_status_off_a_terminal_prints_names_and_addresses_whole(conductor):
    res = run("--address", conductor)
    assert res.exit_code == 0, res.output
    assert "…" not in res.output
    lines = res.output.splitlines()
    (prefill,) = [ln for ln in lines if LONG_PREFILL in ln]
    (decode,) = [ln for ln in lines if LONG_DECODE in ln]
    assert V6 in prefill and " up " in prefill and "12/512" in prefill and "33.3%" in prefill
    assert "0.4s ago" in prefill
    assert "10.20.30.40:45678" in decode and " down " in decode and "7.2s ago" in decode
    # a down node's counters are its last report, marked as such; an up node's are bare
    assert "(2)" in decode and "(1)" in decode and "(40/2048)" in decode and "(-)" in decode
    assert "(" not in prefill.replace(V6, "")
    assert any("last report before it went down" in ln for ln in lines)
    assert lines.index(prefill) < lines.index(decode)  # prefill nodes first
    assert any("ttft_slo_s" in ln and "10" in ln for ln in lines)


def test_status_json_has_the_documented_schema(conductor):
    res = run("--address", conductor, "--json", columns=40)
    assert res.exit_code == 0, res.output
    assert json.loads(res.output) == {
        "schema": "halfmoon.status/v1",
        "conductor": conductor,
        "model": "smollm2-135m-instruct",
        "nodes": [
            {"id": LONG_PREFILL, "role": "prefill", "address": V6, "state": "up", "running": 1, "waiting": 3,
             "kv_blocks_used": 12, "kv_blocks_total": 512, "prefix_queries_tokens": 300, "prefix_hits_tokens": 100,
             "prefix_hit_rate": 0.3333, "heartbeat_age_s": 0.4, "metrics_address": "[2001:db8::1]:9100"},
            {"id": LONG_DECODE, "role": "decode", "address": "10.20.30.40:45678", "state": "down", "running": 2,
             "waiting": 1, "kv_blocks_used": 40, "kv_blocks_total": 2048, "prefix_queries_tokens": 0,
             "prefix_hits_tokens": 0, "prefix_hit_rate": None, "heartbeat_age_s": 7.25,
             "metrics_address": "10.20.30.40:9100"},
        ],
        "settings": {"ttft_slo_s": "10", "policy": "kv_centric"},
    }


def test_status_without_a_conductor_fails_at_once():
    started = time.monotonic()
    res = run("--address", f"127.0.0.1:{free_port('127.0.0.1')}", "--json")
    assert res.exit_code == 1
    assert "error: UNAVAILABLE" in res.output and time.monotonic() - started < 10


def test_admin_get_without_a_conductor_fails_at_once():
    res = CliRunner().invoke(app, ["admin", "get", "--address", f"127.0.0.1:{free_port('127.0.0.1')}"])
    assert res.exit_code == 1 and "error: UNAVAILABLE" in res.output, res.output
