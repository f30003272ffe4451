"""Hand-built cluster views and a round-number cost model for the scheduling-core tests.

Costs (chosen so every expected number can be worked out by hand):
prefill 1 ms per token not cached (`prefill_s(n, p) = (n - p) ms`), local prefix free,
network 0.1 ms per token (kv 1,000 B/token at 10 MB/s), decode step 10 ms + 1 ms per
sequence + 1 µs per token in flight.
"""
from __future__ import annotations

from conductor.cost_model import CostModel, DecodeModel, PrefillModel, TransferModel
from conductor.prefix_index import GlobalPrefixIndex
from conductor.request import BlockHash, NodeId, RequestInfo
from conductor.view import ClusterView, DecodeNodeView, PrefillNodeView

BLOCK = 100  # tokens per block in these views


def costs(network_bytes_per_s: float = 1e7) -> CostModel:
    return CostModel(
        prefill=PrefillModel(c_nn=0.0, c_np=0.0, c_n=0.001, c_p=-0.001, c_1=0.0),
        decode=DecodeModel(s_1=0.010, s_b=0.001, s_t=1e-6),
        transfer=TransferModel(kv_bytes_per_token=1000, network_bytes_per_s=network_bytes_per_s),
    )


def chain(n: int, start: int = 1) -> tuple[BlockHash, ...]:
    return tuple(BlockHash(start + i) for i in range(n))


def request(blocks: int = 10, tokens: int | None = None, rid: str = "r1", start: int = 1,
            output: int | None = None) -> RequestInfo:
    return RequestInfo(rid, tokens if tokens is not None else blocks * BLOCK, chain(blocks, start), output)


def view(prefill: dict[str, float], cached: dict[str, int] | None = None, decode: list[DecodeNodeView] | None = None,
         start: int = 1) -> ClusterView:
    """Prefill nodes by id -> busy_until_s; `cached`: node -> leading blocks of chain(…, start) it holds."""
    index = GlobalPrefixIndex()
    for node, blocks in (cached or {}).items():
        index.store(NodeId(node), chain(blocks, start))
    nodes = [PrefillNodeView(NodeId(n), busy_until_s=b) for n, b in prefill.items()]
    return ClusterView(nodes, decode if decode is not None else [DecodeNodeView(NodeId("d0"), 1_000_000)], index, BLOCK)
