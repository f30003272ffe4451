"""`conductor.http_server.HttpServer`: what serving costs per request on loopback."""
from __future__ import annotations

import statistics
import time

import httpx
import pytest
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

from conductor.http_server import serve_http

pytestmark = pytest.mark.timeout(30)


async def ok(request):
    return JSONResponse({"ok": True})


def test_a_response_does_not_wait_for_the_clients_delayed_ack():
    """Before: the listening socket had proto 0, so asyncio never set TCP_NODELAY on accepted
    connections, and each response (headers and body written separately) waited ~40 ms for
    the client's delayed ACK: every HTTP request, and every streamed token, 40 ms late."""
    server = serve_http(Starlette(routes=[Route("/ok", ok)]))
    try:
        with httpx.Client(base_url=server.url, timeout=5) as client:
            client.get("/ok")
            took = []
            for _ in range(20):
                t0 = time.perf_counter()
                assert client.get("/ok").json() == {"ok": True}
                took.append(time.perf_counter() - t0)
    finally:
        server.stop()
    assert statistics.median(took) < 0.02, f"median {statistics.median(took) * 1000:.1f} ms per request"
