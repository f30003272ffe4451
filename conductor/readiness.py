"""Liveness vs readiness of the conductor.

Live: the process serves (gRPC health, service name ""; HTTP `GET /health`). Ready: a
request could be served now, i.e. at least one prefill-capable and one decode-capable node
is in rotation (a colocated node is both). gRPC health reports readiness under the
Generation service's name (`halfmoon.v1.Generation`), HTTP under `GET /ready`; both follow
every node up/down change, so a client (or a launcher) that waits for readiness is not
answered "no healthy prefill node" next.
"""
from __future__ import annotations

import asyncio

from grpc_health.v1 import health_pb2

from conductor.view import ClusterView

GENERATION_SERVICE = "halfmoon.v1.Generation"
LIVENESS_SERVICE = ""


def not_ready_reason(view: ClusterView) -> str | None:
    """None when a request could be served, else why not (what is missing)."""
    prefill = any(p.healthy for p in view.prefill)
    decode = any(d.healthy for d in view.decode)
    if prefill and decode:
        return None
    if not view.prefill and not view.decode:
        return "no node has registered yet"
    missing = " and no ".join(kind for kind, up in (("prefill", prefill), ("decode", decode)) if not up)
    return f"no {missing}-capable node is up"


class ReadinessPublisher:
    """Keeps a gRPC health servicer's status for `service` equal to the view's readiness.

    `changed()` is called (on the event loop) after every node up/down change; it schedules
    one publication that reads the view when it runs, so a burst of changes ends with the
    latest state however the tasks interleave."""

    def __init__(self, view: ClusterView, health, service: str = GENERATION_SERVICE) -> None:
        self.view = view
        self.health = health
        self.service = service
        self._pending: asyncio.Task | None = None

    def reason(self) -> str | None:
        return not_ready_reason(self.view)

    def changed(self) -> None:
        if self._pending is None or self._pending.done():
            self._pending = asyncio.get_running_loop().create_task(self.publish())

    async def publish(self) -> None:
        self._pending = None
        status = health_pb2.HealthCheckResponse.SERVING if self.reason() is None \
            else health_pb2.HealthCheckResponse.NOT_SERVING
        await self.health.set(self.service, status)
