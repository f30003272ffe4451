"""From a ``--target`` string to a connected ReplayClient.

``fake`` gives the in-process FakeClient; ``grpc://HOST:PORT`` the conductor's client API
(`bench/replay/grpc_client.py`); ``http://HOST:PORT`` its OpenAI-compatible HTTP API
(`bench/replay/http_client.py`). ``open_target`` closes the client after the replay.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

from bench.replay.client import ReplayClient
from bench.replay.fake_client import FakeClient, FakeClientConfig


class TargetError(ValueError):
    """The --target string names nothing the replayer can drive."""


@dataclass(frozen=True, slots=True)
class Target:
    scheme: str  # "fake", "grpc" or "http"
    address: str  # HOST:PORT, or "" for the fake


def parse_target(text: str) -> Target:
    if text == "fake":
        return Target("fake", "")
    scheme, sep, address = text.partition("://")
    if not sep or scheme not in ("grpc", "http"):
        raise TargetError(
            f"--target {text!r}: expected 'fake', grpc://HOST:PORT or http://HOST:PORT"
        )
    host, colon, port = address.rpartition(":")
    if not colon or not host or not port.isdigit():
        raise TargetError(f"--target {text!r}: the address must be HOST:PORT")
    return Target(scheme, address)


@contextlib.asynccontextmanager
async def open_target(
    target: Target, fake: FakeClientConfig | None = None
) -> AsyncIterator[ReplayClient]:
    """Connect to ``target`` for the duration of the block."""
    if target.scheme == "fake":
        yield FakeClient(fake)
        return
    if target.scheme == "grpc":
        from bench.replay.grpc_client import GrpcReplayClient

        client = GrpcReplayClient(target.address)
    else:
        from bench.replay.http_client import HttpReplayClient

        client = HttpReplayClient(target.address)
    try:
        await client.check()
        yield client
    finally:
        await client.close()
