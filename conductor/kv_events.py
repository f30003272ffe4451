"""Typed KV events a node publishes so the conductor's global prefix index stays exact.

Each node numbers its events 0, 1, 2, ... (`seq`); a jump in that sequence means events were
lost, and the index marks the node for a resync (see `prefix_index.GlobalPrefixIndex`).
"""
from __future__ import annotations

from dataclasses import dataclass

from conductor.request import BlockHash, NodeId


@dataclass(frozen=True, slots=True)
class BlockStored:
    """`block_hashes` (a chain, parent first) are now cached on `node`.

    `parent_hash` is the block before the first one (None at the start of a prompt); the
    index does not need it, since a lookup walks a request's own chain, but it keeps the
    event self-describing for replay and debugging.
    """

    node: NodeId
    seq: int
    block_hashes: tuple[BlockHash, ...]
    parent_hash: BlockHash | None = None
    tier: str = "device"  # device | host | disk (the node's) | cluster (put to the store by it)


@dataclass(frozen=True, slots=True)
class BlockRemoved:
    """`block_hashes` were evicted from `node`."""

    node: NodeId
    seq: int
    block_hashes: tuple[BlockHash, ...]
    tier: str = "device"


@dataclass(frozen=True, slots=True)
class AllBlocksCleared:
    """`node` dropped its whole cache (restart, reset)."""

    node: NodeId
    seq: int


KvEvent = BlockStored | BlockRemoved | AllBlocksCleared
