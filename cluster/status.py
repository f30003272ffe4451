"""What `halfmoon status` shows: the conductor's Admin `Status` as typed rows, printed as
tables (names and addresses always whole) or as one JSON document of a fixed schema.

JSON (`--json`), schema "halfmoon.status/v1"; fields are only ever added:

    {"schema": "halfmoon.status/v1", "conductor": "127.0.0.1:50051", "model": "...",
     "nodes": [{"id": "prefill-0", "role": "prefill", "address": "127.0.0.1:40101",
                "state": "up", "running": 0, "waiting": 0,
                "kv_blocks_used": 3, "kv_blocks_total": 512,
                "prefix_queries_tokens": 96, "prefix_hits_tokens": 32,
                "prefix_hit_rate": 0.3333,          # null before any lookup
                "heartbeat_age_s": 0.41, "metrics_address": "127.0.0.1:43127",
                "tiers": [{"tier": "host", "used_blocks": 40, "capacity_blocks": 1450,   # only on nodes
                           "hit_tokens": 64, "hit_rate": 0.2133}, ...],                 # with KV tiers
                "gpu": {"index": 0, "name": "NVIDIA H100", "memory_used_bytes": ...,      # only on GPU
                        "memory_total_bytes": ..., "utilization_pct": 37.0}}],           # nodes
     "settings": {"ttft_slo_s": "10", "policy": "kv_centric", ...}}

A node's `tiers` (device, host, disk, cluster) give each tier's use and the share of the
node's looked-up prompt tokens it served (`hit_rate`, null before any lookup). A node on a GPU
reports its memory and utilization (NVML, engine/gpu_stats.py); the table then shows them.

Nodes come prefill first, then decode, each kind by id.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from proto.halfmoon.v1 import admin_pb2

SCHEMA = "halfmoon.status/v1"


@dataclass(frozen=True, slots=True)
class NodeRow:
    id: str
    role: str
    address: str
    state: str
    running: int
    waiting: int
    kv_blocks_used: int
    kv_blocks_total: int
    prefix_queries_tokens: int
    prefix_hits_tokens: int
    prefix_hit_rate: float | None
    heartbeat_age_s: float
    metrics_address: str
    tiers: tuple[TierRow, ...] = ()
    gpu: GPURow | None = None


@dataclass(frozen=True, slots=True)
class GPURow:
    index: int
    name: str
    memory_used_bytes: int
    memory_total_bytes: int
    utilization_pct: float


@dataclass(frozen=True, slots=True)
class TierRow:
    tier: str
    used_blocks: int
    capacity_blocks: int
    hit_tokens: int
    hit_rate: float | None


@dataclass(frozen=True, slots=True)
class ClusterStatus:
    conductor: str
    model: str
    nodes: tuple[NodeRow, ...]
    settings: dict[str, str]

    def to_json(self) -> dict:
        nodes = []
        for n in self.nodes:
            row = asdict(n)
            if not n.tiers:
                del row["tiers"]
            if n.gpu is None:
                del row["gpu"]
            nodes.append(row)
        return {"schema": SCHEMA, "conductor": self.conductor, "model": self.model,
                "nodes": nodes, "settings": dict(self.settings)}


def from_proto(conductor: str, st: admin_pb2.StatusResponse) -> ClusterStatus:
    nodes = tuple(
        NodeRow(n.node_id, n.role, n.address, n.state, n.running, n.waiting, n.kv_blocks_used, n.kv_blocks_total,
                n.prefix_queries_tokens, n.prefix_hits_tokens,
                round(n.prefix_hits_tokens / n.prefix_queries_tokens, 4) if n.prefix_queries_tokens else None,
                round(n.last_heartbeat_age_s, 3), n.metrics_address,
                tuple(TierRow(t.tier, t.used_blocks, t.capacity_blocks, t.hit_tokens,
                              round(t.hit_tokens / n.prefix_queries_tokens, 4) if n.prefix_queries_tokens else None)
                      for t in n.tiers),
                GPURow(n.gpu.index, n.gpu.name, n.gpu.memory_used_bytes, n.gpu.memory_total_bytes,
                       round(n.gpu.utilization_pct, 1)) if n.HasField("gpu") else None)
        for n in sorted(st.nodes, key=lambda n: (n.role != "prefill", n.node_id)))
    return ClusterStatus(conductor, st.model, nodes, {s.name: s.value for s in st.settings})


def tables(status: ClusterStatus) -> list:
    """The nodes table, the KV tiers table (when a node has tiers) and the settings table
    (rich renderables)."""
    from rich.table import Table

    down = any(n.state != "up" for n in status.nodes)
    t = Table(title=f"halfmoon at {status.conductor} ({status.model})",
              caption="(in parentheses: a node's last report before it went down)" if down else None)
    for col in ("node", "role", "address"):  # never cut: on a narrow terminal they fold instead
        t.add_column(col, overflow="fold")
    t.add_column("state")
    gpus = any(n.gpu is not None for n in status.nodes)
    for col in ("running", "waiting", "KV used", "cache hit", "heartbeat", *(("GPU memory", "GPU util") if gpus else ())):
        t.add_column(col, justify="right", no_wrap=True)
    for n in status.nodes:
        hit = f"{n.prefix_hit_rate:.1%}" if n.prefix_hit_rate is not None else "-"
        gpu = []
        if gpus:
            g = n.gpu
            gpu = (["-", "-"] if g is None else
                   [f"{g.memory_used_bytes / 2**30:.1f}/{g.memory_total_bytes / 2**30:.1f} GiB", f"{g.utilization_pct:.0f}%"])
        load = [str(n.running), str(n.waiting), f"{n.kv_blocks_used}/{n.kv_blocks_total}", hit]
        if n.state != "up":  # what it last said, not what it runs now
            load = [f"({cell})" for cell in load]
        t.add_row(n.id, n.role, n.address, n.state, *load, f"{n.heartbeat_age_s:.1f}s ago", *gpu)
    out = [t]
    if any(n.tiers for n in status.nodes):
        k = Table(title="KV tiers (use, and the share of looked-up prompt tokens each served)")
        k.add_column("node", overflow="fold")
        k.add_column("tier")
        for col in ("blocks used", "hit tokens", "hit rate"):
            k.add_column(col, justify="right", no_wrap=True)
        for n in status.nodes:
            for i, tr in enumerate(n.tiers):
                used = f"{tr.used_blocks}/{tr.capacity_blocks}" if tr.capacity_blocks else "-"
                k.add_row(n.id if i == 0 else "", tr.tier, used, str(tr.hit_tokens),
                          f"{tr.hit_rate:.1%}" if tr.hit_rate is not None else "-")
        out.append(k)
    s = Table(title="admission settings")
    s.add_column("setting", overflow="fold")
    s.add_column("value", overflow="fold")
    for name, value in status.settings.items():
        s.add_row(name, value)
    return [*out, s]


def print_tables(status: ClusterStatus) -> None:
    """On a terminal, fit its width (long cells fold onto more lines); otherwise (a pipe, a
    file, a test) print every table as wide as its content, so each node is one whole line."""
    from rich.console import Console
    from rich.measure import Measurement

    console = Console()
    renderables = tables(status)
    if not console.is_terminal:
        wide = console.options.update(width=10_000)
        need = max(Measurement.get(console, wide, r).maximum for r in renderables)
        console = Console(width=max(need, console.width))
    for r in renderables:
        console.print(r)
