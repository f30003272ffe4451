"""The conductor process: gRPC (Generation, Admin, ConductorControl, health, reflection),
the OpenAI-compatible HTTP frontend with /metrics, and the live scheduler.

Health: gRPC health's "" (and HTTP `/health`) is liveness, SERVING while the process
serves; `halfmoon.v1.Generation` (and HTTP `/ready`) is readiness, SERVING only while a
request could be served (`conductor.readiness`).

Listeners: the client port (`grpc_port`: Generation, Admin, health, reflection; `http_port`:
the HTTP frontend; both behind `api_key` when one is set, health excepted) and the control
port (`control_host:control_port`, loopback by default: ConductorControl only, every call
signed with `control_secret`, see `conductor.auth`). A node that dials the client port to
register finds no such service there."""
from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

log = logging.getLogger("halfmoon.conductor")


@dataclass(frozen=True, slots=True)
class ConductorSpec:
    host: str = "127.0.0.1"
    grpc_port: int = 50051
    http_port: int | None = 8000  # None: no HTTP frontend
    control_host: str = "127.0.0.1"  # nodes' Register / Heartbeat listen here
    control_port: int = 0  # 0: a free port (`started` resolves with the one chosen)
    control_secret: str | None = field(default=None, repr=False)  # required: nodes sign with it
    api_key: str | None = field(default=None, repr=False)  # clients must send it (None: no key)
    model: str = "smollm2-135m-instruct"
    block_size: int = 16
    max_model_len: int = 2048
    settings: dict = field(default_factory=dict)  # SettingsValues fields (policy, admission, SLOs, ...)
    cost_model: str | None = None  # a `halfmoon profile` file; None: the CPU default
    heartbeat_interval_s: float = 1.0
    heartbeat_timeout_s: float = 5.0
    on_transfer_failure: str = "recompute"
    kv_lease_s: float = 60.0
    request_timeout_s: float = 600.0
    max_request_bytes: int = 4 * 2**20  # an HTTP body or gRPC message over this is refused (conductor.intake)
    max_retries: int = 3  # placements after a node failed before the first token
    max_migrations: int = 3  # moves to another decode node after one failed mid-stream
    elastic_interval_s: float = 0.0  # > 0: the role planner moves nodes between the pools (conductor.elastic)
    store_gib: float = 0.0  # > 0: the cluster KV store's memory; the index models its LRU eviction (conductor.store_lru)


@dataclass(frozen=True, slots=True)
class Listening:
    """What `serve_conductor` resolves `started` with: the ports it listens on."""

    grpc_port: int
    control_port: int


# a second conductor on the same ports must fail to bind, not share them with the first
SERVER_OPTIONS = (("grpc.so_reuseport", 0),)


def run_conductor(spec: ConductorSpec) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s conductor %(levelname)s %(message)s")
    asyncio.run(serve_conductor(spec))


async def serve_conductor(spec: ConductorSpec, stop: asyncio.Event | None = None,
                          started: asyncio.Future | None = None) -> None:
    from prometheus_client import CollectorRegistry

    from conductor.metrics import ConductorMetrics
    from conductor.cost_model import CostModel
    from conductor.auth import ApiKeyInterceptor, ControlVerifier, exposure_warning
    from conductor.grpc_api import AdminService, ControlService, GenerationService
    from conductor.grpc_intake import RequestParsing, transport_options
    from conductor.live import LiveConductor, LiveConfig, cpu_default_costs
    from conductor.readiness import LIVENESS_SERVICE, ReadinessPublisher
    from conductor.registry import NodeRegistry
    from conductor.scheduler import Scheduler
    from conductor.settings import ConductorSettings, SettingsValues
    from engine.loader import resolve_model_dir
    from engine.tokenizer import Tokenizer
    from proto.halfmoon.v1 import admin_pb2, admin_pb2_grpc, generate_pb2, generate_pb2_grpc, node_pb2_grpc

    verifier = ControlVerifier(spec.control_secret or "")  # refuses to start without a secret
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (RuntimeError, ValueError):
            pass
    metrics_registry = CollectorRegistry()
    metrics = ConductorMetrics(metrics_registry)
    settings = ConductorSettings(SettingsValues(**spec.settings))

    def publish_settings(_change=None) -> None:
        v = settings.values
        metrics.set_settings(policy=v.policy.value, admission=v.admission.value, ttft_slo_s=v.ttft_slo_s,
                             tbt_slo_s=v.tbt_slo_s)

    publish_settings()
    settings.add_listener(publish_settings)
    costs = CostModel.load(spec.cost_model) if spec.cost_model else cpu_default_costs()
    health_servicer = health.aio.HealthServicer()

    def node_changed(rec, up: bool) -> None:
        metrics.set_node_up(rec.node_id, rec.role, up)
        readiness.changed()

    registry = NodeRegistry(spec.block_size, spec.heartbeat_interval_s, spec.heartbeat_timeout_s,
                            on_change=node_changed, store_gib=spec.store_gib)
    readiness = ReadinessPublisher(registry.view, health_servicer)
    tokenizer = Tokenizer(resolve_model_dir(spec.model))
    backend = LiveConductor(
        LiveConfig(spec.model, spec.max_model_len, spec.block_size, spec.on_transfer_failure, spec.kv_lease_s,
                   spec.request_timeout_s, max_retries=spec.max_retries, max_migrations=spec.max_migrations),
        tokenizer, Scheduler(settings, costs), registry, metrics)
    elastic_task = None
    if spec.elastic_interval_s > 0:
        from conductor.elastic import ElasticRoles
        from conductor.role_planner import PlannerSettings, RolePlanner

        backend.elastic = ElasticRoles(registry, costs, settings,
                                       RolePlanner(PlannerSettings(interval_s=spec.elastic_interval_s)))
        elastic_task = asyncio.create_task(backend.elastic.run())

    server = grpc.aio.server(options=(*SERVER_OPTIONS, *transport_options(spec.max_request_bytes)),
                             interceptors=[*([ApiKeyInterceptor(spec.api_key)] if spec.api_key else []),
                                           RequestParsing(spec.max_request_bytes)])
    generate_pb2_grpc.add_GenerationServicer_to_server(GenerationService(backend), server)
    admin_pb2_grpc.add_AdminServicer_to_server(AdminService(settings, registry, spec.model), server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = [generate_pb2.DESCRIPTOR.services_by_name["Generation"].full_name,
             admin_pb2.DESCRIPTOR.services_by_name["Admin"].full_name,
             health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME]
    reflection.enable_server_reflection(names, server)
    port = server.add_insecure_port(f"{spec.host}:{spec.grpc_port}")
    if port == 0:
        raise OSError(f"cannot listen on {spec.host}:{spec.grpc_port}")
    control = grpc.aio.server(options=SERVER_OPTIONS)
    node_pb2_grpc.add_ConductorControlServicer_to_server(ControlService(registry, verifier), control)
    control_port = control.add_insecure_port(f"{spec.control_host}:{spec.control_port}")
    if control_port == 0:
        raise OSError(f"cannot listen on {spec.control_host}:{spec.control_port} (conductor.control_port)")
    await server.start()
    await control.start()
    registry.start()
    for name in (LIVENESS_SERVICE, names[1]):  # live; Admin answers with or without nodes
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    await readiness.publish()  # Generation: NOT_SERVING until a prefill + decode pair is up
    http = None
    http_task = None
    if spec.http_port is not None:
        from conductor.http_frontend import build_app
        from conductor.http_server import HttpServer

        app = build_app(backend, metrics_registry, ready=readiness.reason, api_key=spec.api_key,
                        max_body_bytes=spec.max_request_bytes)
        http = HttpServer(app, spec.host, spec.http_port)
        http_task = asyncio.create_task(http.serve())
    log.info("conductor gRPC on %s:%d%s, control plane on %s:%d", spec.host, port,
             f", HTTP on {spec.host}:{spec.http_port}" if spec.http_port is not None else "",
             spec.control_host, control_port)
    warning = exposure_warning(spec.host, spec.api_key)
    if warning:
        banner = "!" * 100
        log.warning("%s\n%s\n%s", banner, warning, banner)
    if started is not None and not started.done():
        started.set_result(Listening(port, control_port))
    try:
        await stop.wait()
    finally:
        if elastic_task is not None:
            elastic_task.cancel()
        await health_servicer.enter_graceful_shutdown()
        if http is not None:
            await http.shutdown()
            if http_task:
                http_task.cancel()
        await control.stop(grace=None)
        await server.stop(grace=1.0)
        await registry.close()
