"""Fixtures for the transfer engine tests: an engine in this process and peers in others."""

from __future__ import annotations

from typing import Iterator

import pytest

from transfer_engine import EngineConfig, TransferEngine
from transfer_engine.testing import KV_BLOCK_BYTES, PeerProcess, PeerSpec

MiB = 1 << 20

# region 0: shm-backed, room for 44 KV blocks; region 1: plain registered memory (TCP only)
REMOTE_SIZES = (44 * KV_BLOCK_BYTES, 2 * MiB)


@pytest.fixture(scope="module")
def remote() -> Iterator[PeerProcess]:
    """A peer process: region 0 shm-backed (44 KV blocks), region 1 plain memory (TCP only)."""
    with PeerProcess(PeerSpec(segment="remote", region_sizes=REMOTE_SIZES, plain_regions=(1,))) as peer:
        yield peer


@pytest.fixture
def make_engine() -> Iterator:
    engines: list[TransferEngine] = []

    def make(segment: str = "local", transport: str = "auto", token: str | None = None,
             config: EngineConfig | None = None) -> TransferEngine:
        engine = TransferEngine(segment, "127.0.0.1", 0, token, transport, config)
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.close()
