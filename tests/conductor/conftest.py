"""Fixtures for the conductor's front doors: the real HTTP frontend on loopback over the
in-process fake backend (`fakes.FakeBackend`), shared by a module's tests."""
from __future__ import annotations

import pytest
from fakes import FakeBackend
from prometheus_client import CollectorRegistry

from conductor.http_frontend import build_app, serve_http


@pytest.fixture(scope="module")
def served():
    registry = CollectorRegistry()
    backend = FakeBackend(registry)
    server = serve_http(build_app(backend, registry))
    yield backend, server
    server.stop()


@pytest.fixture
def backend(served) -> FakeBackend:
    served[0].reset()
    return served[0]


@pytest.fixture
def url(served) -> str:
    return served[1].url
