"""The real conductor (`serve_conductor`) on a thread of the test process, with fake nodes
that register and heartbeat over its control API but serve nothing."""
from __future__ import annotations

import contextlib
import socket
from dataclasses import replace

import grpc

from cluster.ray_actors import ServerThread
from conductor.server import ConductorSpec, serve_conductor
from proto.halfmoon.v1 import node_pb2

ROLES = {"prefill": node_pb2.ROLE_PREFILL, "decode": node_pb2.ROLE_DECODE, "colocated": node_pb2.ROLE_COLOCATED}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fake_register(node_id: str, role: str) -> node_pb2.RegisterRequest:
    """A node nobody serves at (port 1 refuses connections): enough for the registry."""
    return node_pb2.RegisterRequest(
        node_id=node_id, role=ROLES[role], address="127.0.0.1:1",
        layout=node_pb2.KVLayout(block_size=16, block_bytes=4096, total_blocks=64, model="fake"))


def heartbeat(node_id: str) -> node_pb2.HeartbeatRequest:
    return node_pb2.HeartbeatRequest(node_id=node_id, load=node_pb2.NodeLoad(free_blocks=64))


@contextlib.contextmanager
def running_conductor(**spec_kw):
    """Yields (spec, listening ports) of a conductor serving until the block ends."""
    spec = ConductorSpec(**({"grpc_port": free_port(), "http_port": free_port(), "heartbeat_interval_s": 0.2,
                             "heartbeat_timeout_s": 1.0} | spec_kw))
    server = ServerThread("conductor", lambda stop, started: serve_conductor(spec, stop, started)).start()
    try:
        ports = server.wait_started(60)
        yield replace(spec), ports
    finally:
        server.stop(15)


@contextlib.contextmanager
def channel(address: str):
    ch = grpc.insecure_channel(address)
    try:
        yield ch
    finally:
        ch.close()
