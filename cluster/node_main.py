"""One prefill or decode node process: engine + worker thread + transfer engine + gRPC
control service + /metrics, registered with the conductor and heartbeating to it.

Conductor restart: the calls the old conductor held break, which aborts their requests
here; heartbeats keep trying (reconnecting within about a second) and the new conductor
answers `known=False`, so the node frees the KV reservations nobody will claim now and
registers again (a prefill node's KV-event subscription then starts with a snapshot, which
rebuilds the conductor's prefix index)."""
from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import grpc

from conductor.auth import sign_control

if TYPE_CHECKING:
    from engine.tiers.config import TierConfig

log = logging.getLogger(__name__)

# reach a restarted conductor within about a second, not after gRPC's default backoff (up to 120 s)
RECONNECT_OPTIONS = (("grpc.initial_reconnect_backoff_ms", 200), ("grpc.min_reconnect_backoff_ms", 200),
                     ("grpc.max_reconnect_backoff_ms", 1000))


@dataclass(frozen=True, slots=True)
class NodeSpec:
    role: str  # "prefill" | "decode" | "colocated"
    node_id: str
    conductor: str  # host:port of the conductor's control listener (ConductorControl)
    model: str = "smollm2-135m-instruct"
    host: str = "127.0.0.1"
    block_size: int = 16
    num_blocks: int = 1024
    max_num_batched_tokens: int = 512
    max_num_seqs: int = 32
    max_model_len: int = 2048
    dtype: str = "float32"  # model dtype (engine/quant.py): float32 | bfloat16 | w8a8 | fp8
    transport: str = "auto"
    transfer_token: str | None = None
    transfer_timeout_s: float = 30.0
    num_threads: int | None = None
    metrics_port: int = 0
    block_audit_interval_s: float = 10.0  # reclaim KV blocks no live request, reservation or pin holds
    control_secret: str | None = field(default=None, repr=False)  # signs Register / Heartbeat
    kv_tiers: TierConfig | None = None  # host / disk / cluster KV tiers under the device region (engine/tiers)


def run_node(spec: NodeSpec) -> None:
    """Process entry point (also the body of the node's Ray actor)."""
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {spec.node_id} %(levelname)s %(message)s")
    asyncio.run(serve_node(spec))


async def serve_node(spec: NodeSpec, stop: asyncio.Event | None = None) -> None:
    """Serve as `spec.role` until `stop`; when the conductor moves the node to the other role
    (a heartbeat's `switch_role`, once it drained the node), stop serving, start again in
    that role under the same node id, and register again."""
    from dataclasses import replace

    stop = stop or asyncio.Event()
    while not stop.is_set():
        role = await _serve_role(spec, stop)
        if role is None:
            return
        log.info("node %s: switching role %s -> %s", spec.node_id, spec.role, role)
        spec = replace(spec, role=role)


async def _serve_role(spec: NodeSpec, stop: asyncio.Event) -> str | None:
    """One life of the node in `spec.role`; the role to restart in, or None when stopped."""
    from prometheus_client import CollectorRegistry

    from cluster.kv_tiers import role_tiers
    from conductor.metrics import MetricsServer, NodeMetrics
    from decode_node.service import DecodeService
    from engine.audit import audit_periodically
    from engine.config import EngineConfig
    from engine import gpu_stats
    from engine.engine import LLMEngine
    from engine.kv_cache import kv_shape
    from engine.loader import load_model
    from engine.worker import EngineWorker
    from prefill_node.service import PrefillService
    from proto.halfmoon.v1 import node_pb2, node_pb2_grpc
    from transfer_engine import TransferEngine

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (RuntimeError, ValueError):  # not the main thread (e.g. inside a test)
            pass
    tiers = role_tiers(spec.kv_tiers, spec.role)
    cfg = EngineConfig(block_size=spec.block_size, num_blocks=spec.num_blocks,
                       max_num_batched_tokens=spec.max_num_batched_tokens, max_num_seqs=spec.max_num_seqs,
                       max_model_len=spec.max_model_len, num_threads=spec.num_threads, dtype=spec.dtype)
    transfer = TransferEngine(spec.node_id, host=spec.host, token=spec.transfer_token, transport=spec.transport)
    registry = CollectorRegistry()
    metrics = NodeMetrics(registry, spec.node_id, spec.role)
    metrics_server = MetricsServer(registry, spec.host, spec.metrics_port)
    server = grpc.aio.server()
    decode_service: DecodeService | None = None  # holds the reservations a lost conductor orphans
    if spec.role == "decode":
        shape = kv_shape(load_model(spec.model, progress=False).config, spec.num_blocks, spec.block_size)
        region, kv = transfer.allocate_tensor(shape, dtype=cfg.kv_torch_dtype)
        engine = LLMEngine(spec.model, cfg, kv_tensor=kv, tiers=tiers)
        worker = EngineWorker(engine, name=f"{spec.node_id}-engine")
        service = decode_service = DecodeService(worker, spec.node_id, region.id, transfer.descriptor().to_bytes(),
                                                 metrics=metrics)
        node_pb2_grpc.add_DecodeNodeServicer_to_server(service, server)
        role = node_pb2.ROLE_DECODE
    elif spec.role == "prefill":
        engine = LLMEngine(spec.model, cfg, tiers=tiers)
        region = transfer.register(engine.kv.tensor)
        worker = EngineWorker(engine, name=f"{spec.node_id}-engine")
        service = PrefillService(worker, transfer, region.id, transfer_timeout_s=spec.transfer_timeout_s,
                                 metrics=metrics)
        node_pb2_grpc.add_PrefillNodeServicer_to_server(service, server)
        role = node_pb2.ROLE_PREFILL
    elif spec.role == "colocated":  # one engine, prefill and decode: the baseline layout
        engine = LLMEngine(spec.model, cfg, tiers=tiers)
        worker = EngineWorker(engine, name=f"{spec.node_id}-engine")
        service = PrefillService(worker, None, 0, metrics=metrics)  # its KV events feed the index
        node_pb2_grpc.add_PrefillNodeServicer_to_server(service, server)
        decode_service = DecodeService(worker, spec.node_id, 0, b"", metrics=metrics)
        node_pb2_grpc.add_DecodeNodeServicer_to_server(decode_service, server)
        role = node_pb2.ROLE_COLOCATED
    else:
        raise ValueError(f"role must be 'prefill', 'decode' or 'colocated', got {spec.role!r}")
    if engine.tiers is not None:  # the host tier is registered memory too (peers may read it)
        transfer.register(engine.tiers.host.tensor)
        engine.tiers.rec.on_latency = metrics.observe_tier_load
    port = server.add_insecure_port(f"{spec.host}:0")
    await server.start()
    audit = asyncio.ensure_future(audit_periodically(  # one engine, one audit (colocated: both services)
        worker, spec.block_audit_interval_s, spec.node_id, lambda r: metrics.observe_blocks_reclaimed(r.num_reclaimed)))
    address = f"{spec.host}:{port}"
    mc = engine.model_config
    layout = node_pb2.KVLayout(block_size=spec.block_size, block_bytes=engine.kv.block_bytes,
                               total_blocks=spec.num_blocks,
                               model=f"{mc.num_layers}x{mc.hidden_size}/{mc.num_kv_heads}x{mc.head_dim}/{mc.vocab_size}",
                               kv_dtype=engine.kv.dtype_name, dtype=spec.dtype)
    register = node_pb2.RegisterRequest(node_id=spec.node_id, role=role, address=address, layout=layout,
                                        transfer_descriptor=transfer.descriptor().to_bytes(),
                                        metrics_address=metrics_server.address)
    log.info("%s node %s serving on %s (metrics %s)", spec.role, spec.node_id, address, metrics_server.address)
    channel = grpc.aio.insecure_channel(spec.conductor, options=RECONNECT_OPTIONS)
    control = node_pb2_grpc.ConductorControlStub(channel)
    seen = (0, 0)
    refused = 0  # the engine's block-hash chains refused, as far as the metric has them
    gpu_index = gpu_stats.device_index(engine.kv.tensor.device)  # None on CPU: no GPU stats
    lost = False  # the last heartbeat got no answer
    switch_to: str | None = None
    try:
        register.load.CopyFrom(_first_load(engine, service, gpu_index))
        interval = await _register(control, register, spec.control_secret, stop)
        while not stop.is_set():
            st = engine.stats()
            metrics.set_load(running=st.num_running, waiting=st.num_waiting,
                             kv_blocks_used=st.num_blocks_total - st.num_blocks_free, kv_blocks_free=st.num_blocks_free)
            metrics.observe_prefix_lookup(st.prefix_queries_tokens - seen[0], st.prefix_hits_tokens - seen[1])
            seen = (st.prefix_queries_tokens, st.prefix_hits_tokens)
            now_refused = engine.refused_hashes  # (read once: the engine thread may count one meanwhile)
            metrics.observe_hashes_refused(now_refused - refused)
            refused = now_refused
            tier_stats = engine.tiers.stats() if engine.tiers is not None else None
            if tier_stats is not None:
                metrics.observe_tiers(tier_stats)
            load = _load(engine, service, st, tier_stats, gpu_index)
            try:
                beat = node_pb2.HeartbeatRequest(node_id=spec.node_id, load=load)
                resp = await control.Heartbeat(beat, timeout=5, metadata=_signed(spec.control_secret, "Heartbeat", beat))
                if lost:
                    log.info("the conductor at %s answers again", spec.conductor)
                    lost = False
                if resp.switch_role:  # drained by the conductor: restart in that role
                    switch_to = {node_pb2.ROLE_PREFILL: "prefill", node_pb2.ROLE_DECODE: "decode"}.get(resp.switch_role)
                    if switch_to is not None:
                        break
                if not resp.known:  # it restarted, or took this node out and ended its requests
                    _drop_orphans(decode_service)
                    register.load.CopyFrom(_first_load(engine, service, gpu_index))
                    interval = await _register(control, register, spec.control_secret, stop)
            except grpc.aio.AioRpcError as e:
                if not lost:  # once per outage; the streams it held broke, which aborted their requests
                    log.warning("heartbeat to %s failed (%s); retrying every %.1fs", spec.conductor, e.code().name,
                                interval)
                lost = True
            try:
                await asyncio.wait_for(stop.wait(), interval)
            except asyncio.TimeoutError:
                pass
    finally:
        audit.cancel()
        await server.stop(grace=1.0)
        await channel.close()
        worker.stop()
        if engine.tiers is not None:
            engine.tiers.close()
        transfer.close()
        metrics_server.close()
    return switch_to


def _load(engine, service, st, tier_stats, gpu_index: int | None):
    """What the node reports of itself (a `NodeLoad`): its queues, KV blocks, prefix hits, KV
    tiers (their use, from `tier_stats`) and GPU; `st` is the engine's `stats()`."""
    from cluster.kv_tiers import tier_use
    from engine import gpu_stats
    from proto.halfmoon.v1 import common_pb2, node_pb2

    load = node_pb2.NodeLoad(
        waiting=st.num_waiting, running=st.num_running,
        queued_prefill_tokens=getattr(service, "queued_prefill_tokens", 0),
        free_blocks=st.num_blocks_free,
        tokens_in_flight=sum(r.num_tokens for r in list(engine.scheduler.running)),
        prefix_queries_tokens=st.prefix_queries_tokens, prefix_hits_tokens=st.prefix_hits_tokens,
        kv_event_seq=getattr(getattr(service, "events", None), "seq", 0),
        tiers=tier_use(engine, tier_stats) if tier_stats is not None else [],
        decode_steps=st.decode_steps, decode_step_seconds=st.decode_step_s,
        decode_step_rows=st.decode_step_rows, decode_step_tokens=st.decode_step_tokens)
    gpu = gpu_stats.read(gpu_index) if gpu_index is not None else None
    if gpu is not None:
        load.gpu.CopyFrom(common_pb2.GPUUse(
            index=gpu.index, name=gpu.name, memory_used_bytes=gpu.memory_used_bytes,
            memory_total_bytes=gpu.memory_total_bytes, utilization_pct=gpu.utilization_pct))
    return load


def _first_load(engine, service, gpu_index: int | None):
    """The load a registration carries, so that Status shows a node whole (its tiers, its
    KV) from the moment it is up, not only after its first heartbeat."""
    return _load(engine, service, engine.stats(), engine.tiers.stats() if engine.tiers is not None else None,
                 gpu_index)


def _drop_orphans(decode_service) -> None:
    """The conductor does not know this node: its requests here were ended (a restarted
    conductor never saw them), so their cancelled calls aborted them; free the KV
    reservations nobody will claim now, before registering again."""
    freed = decode_service.expire_reservations() if decode_service is not None else 0
    log.warning("the conductor does not know this node (it restarted, or took the node out): "
                "freed %d reserved blocks no request will claim; registering again", freed)


def _signed(secret: str | None, method: str, request) -> tuple[tuple[str, str], ...]:
    return sign_control(secret, method, request) if secret else ()


async def _register(control, register, secret: str | None, stop: asyncio.Event) -> float:
    """Register with the conductor, retrying until it answers (it may start after us). A
    refusal (wrong control secret, a layout the cluster does not use) is logged as an error
    and retried less often: it lasts until an operator fixes the configuration."""
    delay = 0.1
    while not stop.is_set():
        try:
            resp = await control.Register(register, timeout=5, metadata=_signed(secret, "Register", register))
            return resp.heartbeat_interval_s or 1.0
        except grpc.aio.AioRpcError as e:
            refused = e.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.FAILED_PRECONDITION)
            if refused:
                log.error("the conductor refused to register this node: %s: %s", e.code().name, e.details())
            else:
                log.info("conductor not reachable yet (%s); retrying", e.code().name)
            try:
                await asyncio.wait_for(stop.wait(), delay)
            except asyncio.TimeoutError:
                pass
            delay = min(delay * 2, 10.0 if refused else 2.0)
    return 1.0
