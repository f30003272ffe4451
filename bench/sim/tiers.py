"""KV tiers in the simulator: host DRAM and local disk under every prefill node's device cache,
and a cluster store (Mooncake Store) shared by all, fed to the conductor through the same
objects the live one uses: tier-tagged stored / removed `KVEvent`s into
`ClusterState` (its `GlobalPrefixIndex` keeps one index per tier), priced by
`CostModel.tier_load_s`, scored by the same policies.

What a simulated node does, as `engine/tiers` does live (write-back, the default policy):

- a block the device evicts goes to the host tier (LRU); a host block displaced goes to disk
  (LRU; what disk displaces is gone); the evicted block is also put to the store with its
  ancestors the store lacks (the device evicts a chain from its tail);
- at prefill start the chain after the node's device blocks is looked up host -> disk ->
  store, block by block (a tier the cost model has no rate for ends it); what is found loads
  at its tier's rate instead of being recomputed, and disk/store blocks land in the host tier;
- a finished request's prompt goes to the store (decode write-back: the trace names only
  prompt blocks, so the answer's are not modelled);
- the store evicts its least recently used blocks when full (a lookup or a put refreshes a
  block, as a read lease does in Mooncake Store) and, like Mooncake Store, tells no one: the
  index keeps those entries as hints until a node's lookup finds them gone. The lookup at
  prefill start asks the store for the rest of the chain once it is past the host and disk
  blocks, and the blocks it lacks are published as removed from the cluster tier, as the live
  tier manager does (`engine/tiers/cluster.py`); `store_evictions` counts what the store
  dropped, `TierRow.stale_store_hints` what the index still believed in at the end. The
  `host+disk+store+events` row publishes every eviction at once instead (`store_events`:
  what subscribing to Mooncake master's KV-event feed, `-enable_kv_events`, would give): the
  difference between the two rows is what the stale hints cost (they credit every node with
  a store hit that is gone, so a repeat is sent away from the node whose own disk holds it).
  The `host+disk+store+lru` row keeps the store silent and lets the conductor model its
  eviction instead (`conductor.store_lru` through `GlobalPrefixIndex.bound_store`, capacity
  = the store's blocks; a stored event or a placement that will load a block refreshes it):
  what the live conductor can do without the store publishing; `TierRow.lost_store_hints`
  counts what that model dropped while the store still had it.

GPU-class tier figures (`GPU_CLASS_TIERS`, per prefill node of 8xA800, LLaMA3-70B at
320 KiB/token, 512-token blocks = 168 MB each), rates from `gpu_class_default()`:
device = the HBM left for the prefix cache (8 x 80 GB - 141 GB of weights - activations,
~335 GB: 2,000 blocks); host = 0.5 TB of the node's DRAM (3,000 blocks) at 128 GB/s PCIe
host-to-device (Mooncake FAST'25: the prefill node's CPU DRAM cache, PCIe); disk = 4 TB of
NVMe (24,000 blocks) at 7 GB/s (PCIe 4.0 x4 data sheets); store = 256 GB of DRAM from each of
16 nodes (24,000 blocks) at 800 Gbps RDMA (Mooncake FAST'25: 8 x 100 Gbps NICs per node).

    halfmoon bench sim.tiers [--json docs/results/sim_tiers.json] [--plot docs/results/sim_tiers.png]
"""
from __future__ import annotations

import argparse
import json
import math
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Sequence

from bench import flags
from bench.sim.cluster import SimConfig, SimRequest, Simulation
from bench.sim.metrics import summarize
from bench.sim.nodes import SimPrefill
from conductor.cost_model import CostModel, gpu_class_default
from conductor.prefix_index import STORE_NODE
from engine.block_pool import REMOVED, STORED, KVEvent

RESULTS = Path(__file__).resolve().parents[2] / "docs" / "results"


@dataclass(frozen=True, slots=True)
class TierSizes:
    """Blocks each tier holds: host and disk per prefill node, store for the cluster (0: off)."""

    host_blocks: int = 0
    disk_blocks: int = 0
    store_blocks: int = 0
    write_back_on_finish: bool = True
    # the store publishes its evictions (Mooncake's master can: -enable_kv_events, a ZMQ feed
    # the live cluster does not subscribe to yet); off, it evicts silently and lookups find out
    store_events: bool = False
    # the conductor's index models the store's LRU eviction (`GlobalPrefixIndex.bound_store` with
    # the store's capacity): what the live conductor can do without the store publishing
    index_bounds_store: bool = False

    @property
    def on(self) -> bool:
        return bool(self.host_blocks or self.store_blocks)


DEVICE_BLOCKS = 2_000
GPU_CLASS_TIERS = TierSizes(host_blocks=3_000, disk_blocks=24_000, store_blocks=24_000)
TIER_SETS: dict[str, TierSizes] = {
    "device": TierSizes(),
    "host": TierSizes(host_blocks=GPU_CLASS_TIERS.host_blocks),
    "host+disk": TierSizes(host_blocks=GPU_CLASS_TIERS.host_blocks, disk_blocks=GPU_CLASS_TIERS.disk_blocks),
    "host+disk+store": GPU_CLASS_TIERS,
    "host+disk+store+lru": replace(GPU_CLASS_TIERS, index_bounds_store=True),
    "host+disk+store+events": replace(GPU_CLASS_TIERS, store_events=True),
}


class LruTier:
    """Block hashes in LRU order with a capacity; `put` returns what it displaced."""

    __slots__ = ("capacity", "blocks")

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.blocks: OrderedDict[int, None] = OrderedDict()

    def __contains__(self, h: int) -> bool:
        return h in self.blocks

    def __len__(self) -> int:
        return len(self.blocks)

    def touch(self, h: int) -> None:
        self.blocks.move_to_end(h)

    def put(self, h: int) -> tuple[bool, list[int]]:
        """(stored anew, displaced blocks); a zero-capacity tier stores nothing."""
        if self.capacity <= 0:
            return False, []
        if h in self.blocks:
            self.blocks.move_to_end(h)
            return False, []
        self.blocks[h] = None
        out = []
        while len(self.blocks) > self.capacity:
            out.append(self.blocks.popitem(last=False)[0])
        return True, out


class TieredSimulation(Simulation):
    """`Simulation` with host / disk tiers under every prefill node and a shared store."""

    def __init__(self, requests: list[SimRequest], config: SimConfig, costs: CostModel, tiers: TierSizes) -> None:
        self.tiers = tiers
        self.host: dict[str, LruTier] = {}
        self.disk: dict[str, LruTier] = {}
        self.store = LruTier(tiers.store_blocks)
        self.parent: dict[int, int | None] = {}  # block -> the block before it in its chain
        self.hits: dict[str, int] = {"host": 0, "disk": 0, "cluster": 0}  # blocks served from each tier
        self.store_evictions = 0  # blocks the store dropped (silently: lookups find out)
        super().__init__(requests, config, costs)
        if tiers.store_blocks and tiers.index_bounds_store:
            self.state.index.bound_store(tiers.store_blocks)
        bt = config.block_tokens
        self._block_s = {t: costs.tier_load_s(t, bt) for t in ("host", "disk", "cluster")}
        for st in self.states:
            prev = None
            for h in st.req.block_hashes:
                self.parent.setdefault(h, prev)
                prev = h

    def add_prefill(self, node_id: str) -> SimPrefill:
        self.host[node_id] = LruTier(self.tiers.host_blocks)
        self.disk[node_id] = LruTier(self.tiers.disk_blocks if self.tiers.host_blocks else 0)
        return super().add_prefill(node_id)

    # -- events into the conductor's index -----------------------------------------------------
    def _publish(self, node: SimPrefill, stored: bool, hashes: Sequence[int], tier: str) -> None:
        if hashes:
            self.state.kv_event(KVEvent(STORED if stored else REMOVED, tuple(hashes), tier=tier, seq=node.seq,
                                        node=node.node_id))
            node.seq += 1

    # -- movement ------------------------------------------------------------------------------
    def _to_host(self, node: SimPrefill, h: int) -> None:
        new, displaced = self.host[node.node_id].put(h)
        if new:
            self._publish(node, True, [h], "host")
        if displaced:
            self._publish(node, False, displaced, "host")
            disk = self.disk[node.node_id]
            stored, gone = [], []
            for v in displaced:
                new_d, out = disk.put(v)
                if new_d:
                    stored.append(v)
                gone += out
            self._publish(node, True, stored, "disk")
            self._publish(node, False, gone, "disk")

    def _put_chain(self, node: SimPrefill, h: int) -> None:
        """`h` and the ancestors the store lacks, root first."""
        chain = [h]
        p = self.parent.get(h)
        while p is not None and p not in self.store:
            chain.append(p)
            p = self.parent.get(p)
        if p is not None:
            self.store.touch(p)  # the live put asks the store first, which refreshes what it has
        stored, gone = [], []
        for b in reversed(chain):
            new, out = self.store.put(b)
            if new:
                stored.append(b)
            gone += out
        self.store_evictions += len(gone)
        self._publish(node, True, stored, "cluster")
        if self.tiers.store_events:  # else silent, as live: a lookup finds them gone
            self._publish(node, False, gone, "cluster")

    def _cache_prompt(self, node: SimPrefill, hashes: tuple[int, ...]) -> list:
        evicted = super()._cache_prompt(node, hashes)
        for h in evicted:
            if self.tiers.host_blocks:
                self._to_host(node, h)
            if self.tiers.store_blocks:
                self._put_chain(node, h)
        return evicted

    def lower_tier_hit(self, node: SimPrefill, hashes, start: int, input_tokens: int) -> tuple[int, float]:
        if not self.tiers.on:
            return 0, 0.0
        bt = self.config.block_tokens
        usable = max(0, (input_tokens - 1) // bt)  # the blocks whose tokens all precede the last one
        host, disk, store = self.host[node.node_id], self.disk[node.node_id], self.store
        blocks, seconds = 0, 0.0
        asked = False
        end = min(len(hashes), usable)
        for i in range(start, end):
            h = hashes[i]
            if not asked and h not in host and h not in disk and self.tiers.store_blocks:
                # past the node's own tiers: the store is asked for the rest of the chain at once
                # (the live prefetch's one `exists`), and the blocks it lacks are reported
                asked = True
                self._publish(node, False, [b for b in hashes[i:end] if b not in store], "cluster")
            tier = "host" if h in host else "disk" if h in disk else "cluster" if h in store else None
            if tier is None or self._block_s[tier] == math.inf:
                break
            seconds += self._block_s[tier]
            blocks += 1
            self.hits[tier] += 1
            if tier == "host":
                host.touch(h)
            else:
                if tier == "disk":
                    disk.touch(h)
                else:
                    store.touch(h)
                if self.tiers.host_blocks:
                    self._to_host(node, h)
        return blocks, seconds

    def completed(self, st, t: float) -> None:
        super().completed(st, t)
        if self.tiers.store_blocks and self.tiers.write_back_on_finish and st.prefill is not None:
            hashes = st.req.block_hashes
            usable = max(0, (st.req.input_tokens - 1) // self.config.block_tokens)
            if usable:
                self._put_chain(st.prefill, hashes[min(usable, len(hashes)) - 1])

    def stale_store_hints(self) -> set[int]:
        """Blocks the conductor's index still places in the store that the store no longer has."""
        idx = self.state.index
        held = idx.tier("cluster").snapshot().get(STORE_NODE, frozenset()) if "cluster" in idx.tiers else frozenset()
        return set(held) - set(self.store.blocks)

    def lost_store_hints(self) -> set[int]:
        """Blocks the store has that the conductor's index does not place there (its LRU model
        dropped them: the store saw refreshes the conductor did not)."""
        idx = self.state.index
        held = idx.tier("cluster").snapshot().get(STORE_NODE, frozenset()) if "cluster" in idx.tiers else frozenset()
        return set(self.store.blocks) - set(held)

    def occupancy(self) -> dict[str, int]:
        return {"host": sum(map(len, self.host.values())), "disk": sum(map(len, self.disk.values())),
                "cluster": len(self.store)}


# -- the benchmark ---------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class TierRow:
    tiers: str
    device_blocks: int
    host_blocks: int
    disk_blocks: int
    store_blocks: int
    requests: int
    hit_rate: float
    hit_share: dict  # tier -> share of prompt blocks served from it
    ttft_mean_s: float
    ttft_p90_s: float
    ttft_p99_s: float
    repeat_fraction: float
    wall_s: float
    store_evictions: int = 0  # blocks the store dropped
    stale_store_hints: int = 0  # of those, still in the conductor's index at the end (no lookup found them gone)
    lost_store_hints: int = 0  # blocks the store has that the index dropped (its LRU model is only a model)


def run_tiers(requests: list[SimRequest], name: str, sizes: TierSizes, *, device_blocks: int = DEVICE_BLOCKS,
              costs: CostModel | None = None, speedup: float = 1.0, **config) -> tuple[TierRow, TieredSimulation]:
    from bench.sim.trace import repeat_fraction

    costs = costs or gpu_class_default()
    cfg = SimConfig(cache_blocks=device_blocks, **config)
    t0 = time.perf_counter()
    sim = TieredSimulation(requests, cfg, costs, sizes)
    run = sim.run()
    wall = time.perf_counter() - t0
    s = summarize(run, speedup=speedup, wall_s=wall)
    prefilled = sum(len(st.req.block_hashes) for st in run.states if st.prefill_start_s == st.prefill_start_s)
    share = {t: (n / prefilled if prefilled else 0.0) for t, n in sim.hits.items()}
    row = TierRow(name, device_blocks, sizes.host_blocks, sizes.disk_blocks, sizes.store_blocks, len(requests),
                  s.prefix_hit_rate, share, s.ttft_mean_s, s.ttft_p90_s, s.ttft_p99_s, repeat_fraction(requests), wall,
                  sim.store_evictions, len(sim.stale_store_hints()), len(sim.lost_store_hints()))
    return row, sim


def print_rows(rows: Sequence[TierRow], title: str) -> None:
    print(title)
    head = (f"{'tiers':<24}{'hit rate':>9}{'host':>7}{'disk':>7}{'store':>7}{'TTFT mean s':>12}{'p90 s':>8}{'p99 s':>8}"
            f"{'evicted':>9}{'stale':>8}{'lost':>8}")
    print(head)
    for r in rows:
        print(f"{r.tiers:<24}{r.hit_rate:>9.3f}{r.hit_share['host']:>7.3f}{r.hit_share['disk']:>7.3f}"
              f"{r.hit_share['cluster']:>7.3f}{r.ttft_mean_s:>12.2f}{r.ttft_p90_s:>8.2f}{r.ttft_p99_s:>8.2f}"
              f"{r.store_evictions:>9}{r.stale_store_hints:>8}{r.lost_store_hints:>8}")
    if rows:
        print(f"repeat fraction of the trace (an unbounded cache's hit rate): {rows[0].repeat_fraction:.3f}")


def write_plot(rows: Sequence[TierRow], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    names = [r.tiers for r in rows]
    a.bar(names, [r.hit_rate for r in rows], color="tab:blue")
    a.axhline(rows[0].repeat_fraction, color="grey", linestyle="--", label="trace repeat fraction")
    a.set_ylabel("prefix hit rate (blocks)")
    a.legend()
    b.bar(names, [r.ttft_mean_s for r in rows], color="tab:orange")
    b.set_ylabel("mean TTFT (s)")
    for ax in (a, b):
        ax.tick_params(axis="x", rotation=20)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="halfmoon bench sim.tiers", description=__doc__.split("\n\n")[0])
    p.add_argument("--trace", help="a Mooncake-format trace (default: the conversation trace)")
    p.add_argument("--limit", type=flags.count(1), help="first N requests only")
    p.add_argument("--speedup", type=flags.positive, default=1.0, help="replay the trace this many times faster")
    p.add_argument("--device-blocks", type=flags.count(0), default=DEVICE_BLOCKS, help="each prefill node's device cache")
    p.add_argument("--json", default=str(RESULTS / "sim_tiers.json"), help="where to write the rows")
    p.add_argument("--plot", default=str(RESULTS / "sim_tiers.png"), help="where to write the PNG ('' for none)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return flags.run(parser.prog, lambda: _main(args))


def _main(args: argparse.Namespace) -> int:
    from bench.sim.trace import DEFAULT_TRACE, load_sim_requests

    requests = load_sim_requests(args.trace or DEFAULT_TRACE, speedup=args.speedup, limit=args.limit)
    rows = [run_tiers(requests, name, sizes, device_blocks=args.device_blocks, speedup=args.speedup)[0]
            for name, sizes in TIER_SETS.items()]
    title = (f"KV tiers in the simulator: {len(requests)} requests, 8P+8D GPU-class, "
             f"device {args.device_blocks} blocks/node, speedup {args.speedup:g}")
    print_rows(rows, title)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"title": title, "rows": [asdict(r) for r in rows]}, indent=2) + "\n")
    if args.plot:
        write_plot(rows, Path(args.plot), title)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
