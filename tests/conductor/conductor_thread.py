"""The real conductor (`serve_conductor`) on a thread of the test process, with fake nodes
that register and heartbeat over its control API (signed with `SECRET`). Their address is
a `FakeNodeServer`: it answers the conductor's probes and KV-event subscription (an empty
cache) and serves no requests."""
from __future__ import annotations

import contextlib
import socket
import threading
import time
from concurrent import futures
from dataclasses import dataclass

import grpc

from cluster.ray_actors import ServerThread
from conductor.auth import sign_control
from conductor.server import ConductorSpec, Listening, serve_conductor
from proto.halfmoon.v1 import node_pb2, node_pb2_grpc

SECRET = "test-control-secret-0123456789"
ROLES = {"prefill": node_pb2.ROLE_PREFILL, "decode": node_pb2.ROLE_DECODE, "colocated": node_pb2.ROLE_COLOCATED}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _FakeNode(node_pb2_grpc.PrefillNodeServicer, node_pb2_grpc.DecodeNodeServicer):
    def KVEvents(self, request, context):
        yield node_pb2.KVEvent(seq=0, kind=node_pb2.KV_EVENT_CLEARED)
        yield node_pb2.KVEvent(seq=0, kind=node_pb2.KV_EVENT_STORED)
        while context.is_active():
            time.sleep(0.05)

    def Unpin(self, request, context):
        return node_pb2.UnpinResponse(found=False)

    def Renew(self, request, context):
        return node_pb2.RenewResponse(found=False)


@contextlib.contextmanager
def fake_node_server():
    """Yields the address of a server any number of fake nodes can claim as theirs."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    node_pb2_grpc.add_PrefillNodeServicer_to_server(_FakeNode(), server)
    node_pb2_grpc.add_DecodeNodeServicer_to_server(_FakeNode(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(0)


def heartbeat(node_id: str) -> node_pb2.HeartbeatRequest:
    return node_pb2.HeartbeatRequest(node_id=node_id, load=node_pb2.NodeLoad(free_blocks=64))


@dataclass
class RunningConductor:
    spec: ConductorSpec
    ports: Listening
    node_address: str  # where the fake nodes say they serve

    @property
    def client_address(self) -> str:
        return f"127.0.0.1:{self.ports.grpc_port}"

    @property
    def control_address(self) -> str:
        return f"127.0.0.1:{self.ports.control_port}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.spec.http_port}"

    def fake_register(self, node_id: str, role: str) -> node_pb2.RegisterRequest:
        return node_pb2.RegisterRequest(
            node_id=node_id, role=ROLES[role], address=self.node_address,
            layout=node_pb2.KVLayout(block_size=16, block_bytes=4096, total_blocks=64, model="fake"))

    def register(self, control, node_id: str, role: str, secret: str = SECRET) -> node_pb2.RegisterResponse:
        req = self.fake_register(node_id, role)
        return control.Register(req, timeout=5, metadata=sign_control(secret, "Register", req))


def beat(control, node_id: str, secret: str = SECRET) -> bool:
    req = heartbeat(node_id)
    return control.Heartbeat(req, timeout=5, metadata=sign_control(secret, "Heartbeat", req)).known


@contextlib.contextmanager
def heartbeating(control, node_ids: set[str], interval_s: float = 0.1):
    """Heartbeats every node in `node_ids` (a set the caller may change) until the block ends."""
    done = threading.Event()

    def run() -> None:
        while not done.wait(interval_s):
            for node_id in list(node_ids):
                with contextlib.suppress(grpc.RpcError):
                    beat(control, node_id)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield node_ids
    finally:
        done.set()
        thread.join(10)


@contextlib.contextmanager
def running_conductor(**spec_kw):
    """Yields a `RunningConductor` serving until the block ends."""
    spec = ConductorSpec(**({"grpc_port": free_port(), "http_port": free_port(), "heartbeat_interval_s": 0.2,
                             "heartbeat_timeout_s": 2.0, "control_secret": SECRET} | spec_kw))
    with fake_node_server() as node_address:
        server = ServerThread("conductor", lambda stop, started: serve_conductor(spec, stop, started)).start()
        try:
            yield RunningConductor(spec, server.wait_started(60), node_address)
        finally:
            server.stop(15)


@contextlib.contextmanager
def channel(address: str):
    ch = grpc.insecure_channel(address)
    try:
        yield ch
    finally:
        ch.close()
