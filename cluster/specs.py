"""From the one typed config to what each server runs with: `ClusterConfig` ->
`ConductorSpec` + one `NodeSpec` per node, plus the Ray resources each asks for.

Both launchers (processes: `cluster.local`; Ray: `cluster.ray_launcher`) start servers only
from these specs, so a config means the same thing whichever starts it. Where a value
depends on the machine a node lands on, the node's `NodePlan.resolve` settles it there:

- a wildcard bind host (`0.0.0.0`, `::`) becomes the host's own address (what Ray reports
  for it), because a node advertises the address it binds to its peers and the conductor;
- `kv.kv_memory_gb` becomes a block count from the model's shape, read on that host (the
  model directory may exist only on the GPU machines).

Secrets are settled once per cluster by `with_secrets`, before any spec is made: the
control secret the conductor checks and every node signs with comes from the config, else
`$HALFMOON_CONTROL_SECRET`, else is generated; the client API key from the config, else
`$HALFMOON_API_KEY`, else there is none.

How the config maps: prefill nodes compute `scheduler.prefill_chunk_size` tokens per step
(their engine's step budget, so one chunk is one KV push); decode nodes batch up to
`scheduler.max_num_batched_tokens` per step; each node gets as many torch threads as the
whole CPUs it asks Ray for.
"""
from __future__ import annotations

import os
import secrets
import socket
from dataclasses import dataclass, replace

from cluster.config import DEFAULT_NUM_BLOCKS, ClusterConfig, NodeGroupConfig, RayActorOptions, Role, with_overrides
from cluster.kv_tiers import node_tiers
from cluster.node_main import NodeSpec
from conductor.auth import API_KEY_ENV
from conductor.server import ConductorSpec

WILDCARD_HOSTS = frozenset({"0.0.0.0", "::", ""})
LOOPBACK = "127.0.0.1"
ROLES: tuple[Role, ...] = ("prefill", "decode")
CONTROL_SECRET_ENV = "HALFMOON_CONTROL_SECRET"


def new_secret() -> str:
    return secrets.token_urlsafe(32)


def with_secrets(config: ClusterConfig) -> ClusterConfig:
    """`config` with `auth.control_secret` settled (the config's, else $HALFMOON_CONTROL_SECRET,
    else a new one) and `auth.api_key` (the config's, else $HALFMOON_API_KEY, if set). A
    launcher calls this once, so the conductor and its nodes share the secret."""
    if config.auth.api_key is None and os.environ.get(API_KEY_ENV):
        config = with_overrides(config, {"auth.api_key": os.environ[API_KEY_ENV]}, source=f"${API_KEY_ENV}")
    if config.auth.control_secret is not None:
        return config
    from_env = os.environ.get(CONTROL_SECRET_ENV)
    source = f"${CONTROL_SECRET_ENV}" if from_env else "generated secret"
    return with_overrides(config, {"auth.control_secret": from_env or new_secret()}, source=source)


def model_ref(config: ClusterConfig) -> str:
    """What servers load: the configured directory, else the model's name."""
    return str(config.model.path) if config.model.path is not None else config.model.name


def store_gib(config: ClusterConfig) -> float:
    """The cluster store's memory the conductor's index models (`conductor.store_gb`, else
    derived: the keeper a launcher-started master mounts plus every node's own segment; a
    decode node mounts one only for the write-back, `kv_tiers.role_tiers`)."""
    if config.conductor.store_gb is not None:
        return config.conductor.store_gb
    t = config.kv_tiers
    if not t.store or t.host_gb <= 0:
        return 0.0
    decoders = 0 if config.layout == "colocated" or not t.decode_write_back else config.decode.count
    nodes = config.prefill.count + decoders
    return (t.store_gb if t.store_master is None else 0.0) + t.node_segment_gb * nodes


def conductor_spec(config: ClusterConfig) -> ConductorSpec:
    c = config.conductor
    values = c.settings()
    return ConductorSpec(
        host=c.host,
        grpc_port=c.grpc_port,
        http_port=c.http_port,
        control_host=c.control_host,
        control_port=c.control_port,
        control_secret=config.auth.control_secret,
        api_key=config.auth.api_key,
        model=model_ref(config),
        block_size=config.kv.block_size,
        max_model_len=config.model.max_model_len,
        settings={
            "policy": values.policy.value,
            "admission": values.admission.value,
            "ttft_slo_s": values.ttft_slo_s,
            "tbt_slo_s": values.tbt_slo_s,
            "prefill_reject_threshold": values.prefill_reject_threshold,
            "decode_reject_threshold": values.decode_reject_threshold,
            "typical_output_tokens": values.typical_output_tokens,
        },
        cost_model=str(c.cost_model) if c.cost_model is not None else None,
        heartbeat_interval_s=c.heartbeat_interval_s,
        heartbeat_timeout_s=c.heartbeat_timeout_s,
        elastic_interval_s=c.elastic_interval_s,
        max_request_bytes=c.max_request_bytes,
        store_gib=store_gib(config),
        on_transfer_failure=config.failure.on_transfer_failure,
        kv_lease_s=config.failure.kv_lease_s,
        request_timeout_s=config.failure.request_timeout_s,
        max_retries=config.failure.max_retries,
        max_migrations=config.failure.max_migrations,
    )


@dataclass(frozen=True, slots=True)
class NodePlan:
    """One node to start: its spec, what it asks Ray for, and what its host still settles."""

    spec: NodeSpec  # num_blocks is final unless kv_memory_gb is set
    options: RayActorOptions
    kv_memory_gb: float | None = None

    @property
    def node_id(self) -> str:
        return self.spec.node_id

    def resolve(self, host_address: str = LOOPBACK) -> NodeSpec:
        """The spec to serve with on this host (`host_address`: this host's reachable address)."""
        spec = self.spec
        if spec.host in WILDCARD_HOSTS:
            spec = replace(spec, host=host_address)
        if self.kv_memory_gb is not None:
            per_block = kv_bytes_per_block(spec.model, spec.block_size, spec.dtype)
            blocks = max(1, int(self.kv_memory_gb * 2**30) // per_block)
            spec = replace(spec, num_blocks=blocks)
        return spec


def kv_bytes_per_block(model: str, block_size: int, dtype: str = "float32") -> int:
    """Bytes of one KV block of `model` in the engine's KV cache (K and V, all layers, in the KV
    dtype that model dtype `dtype` keeps)."""
    import torch

    from engine.config import ModelConfig
    from engine.kv_cache import kv_shape
    from engine.loader import resolve_model_dir

    shape = kv_shape(ModelConfig.from_dir(resolve_model_dir(model, progress=False)), 1, block_size)
    elements = 1
    for n in shape:
        elements *= n
    from engine.config import EngineConfig

    return elements * torch.empty((), dtype=EngineConfig(dtype=dtype).kv_torch_dtype).element_size()


def _threads(group: NodeGroupConfig) -> int:
    return max(1, int(group.num_cpus))


def node_plans(config: ClusterConfig, control_address: str) -> list[NodePlan]:
    """Every node of the config, prefill first, named `<role>-<i>`, pointed at the
    conductor's control listener (`control_address`) with the cluster's control secret.

    The colocated layout runs `prefill.count` colocated nodes (one engine doing prefill and
    decode each) with the prefill group's resources; the decode group is not used."""
    s = config.scheduler
    plans = []
    colocated = config.layout == "colocated"
    for role in ("prefill",) if colocated else ROLES:
        group = config.group(role)
        node_role = "colocated" if colocated else role
        for i in range(group.count):
            spec = NodeSpec(
                role=node_role,
                node_id=f"{node_role}-{i}",
                conductor=control_address,
                model=model_ref(config),
                host=group.host,
                block_size=config.kv.block_size,
                num_blocks=config.kv.num_blocks or DEFAULT_NUM_BLOCKS,
                max_num_batched_tokens=s.prefill_chunk_size if node_role == "prefill" else s.max_num_batched_tokens,
                max_num_seqs=s.max_num_seqs,
                max_model_len=config.model.max_model_len,
                dtype=config.model.resolve_dtype(has_gpu=group.num_gpus > 0),
                transport=config.transfer.transport,
                transfer_token=config.transfer.token,
                transfer_timeout_s=config.transfer.timeout_s,
                num_threads=_threads(group),
                metrics_port=group.metrics_port,
                control_secret=config.auth.control_secret,
                kv_tiers=node_tiers(config, f"{node_role}-{i}"),
            )
            plans.append(NodePlan(spec, group.ray_options(), config.kv.kv_memory_gb))
    return plans


def free_port(host: str = LOOPBACK) -> int:
    """A port nothing listens on at `host` now (for servers configured with port 0)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def local_address(host: str, port: int) -> str:
    """`host:port` as a client on the same machine dials it (a wildcard bind is loopback)."""
    return f"{LOOPBACK if host in WILDCARD_HOSTS else host}:{port}"


def build_specs(config: ClusterConfig) -> tuple[ConductorSpec, list[NodeSpec]]:
    """Specs for a cluster on this machine (the process launcher): secrets settled, every
    node resolved here and pointed at the conductor's control port (a free one when the
    config says 0); the client port must be fixed."""
    config = with_secrets(config)
    conductor = conductor_spec(config)
    if conductor.grpc_port == 0:
        raise ValueError("conductor.grpc_port: the process launcher needs a fixed port, got 0")
    if conductor.control_port == 0:
        conductor = replace(conductor, control_port=free_port(conductor.control_host))
    address = local_address(conductor.control_host, conductor.control_port)
    return conductor, [plan.resolve(LOOPBACK) for plan in node_plans(config, address)]
