"""The cluster as the scheduler sees it: one record per node, plus the global prefix index.

The live conductor keeps these records up to date from node heartbeats and from its own
dispatch decisions; the simulator updates the same records from its simulated instances.
Records are mutable on purpose (updated in place, no per-decision copies); policies only
read them.

Times are seconds on the conductor's clock (`now_s` passed to every decision).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Protocol, Sequence

from conductor.request import BlockHash, NodeId


class PrefixLookup(Protocol):
    def longest_prefix(self, block_hashes: Sequence[BlockHash]) -> Mapping[NodeId, int]: ...


@dataclass(slots=True)
class PrefillNodeView:
    """A prefill node's queue, as predicted work.

    `busy_until_s` is when the node is predicted to finish everything it has been given:
    the conductor adds each dispatched request's predicted service time, and a heartbeat
    (queued work the node reports) corrects it. Queue time for a new request is
    `max(0, busy_until_s - now_s)`.
    """

    node_id: NodeId
    busy_until_s: float = 0.0
    queued_requests: int = 0
    healthy: bool = True

    def queue_s(self, now_s: float) -> float:
        wait = self.busy_until_s - now_s
        return wait if wait > 0.0 else 0.0


@dataclass(slots=True)
class DecodeResident:
    """A request assigned to a decode node and not finished: incoming, waiting or running.

    `ready_at_s` is when it joined the running batch, or (not joined yet) when it is
    predicted to; `prompt_tokens` is the KV it brings. Used to project the node's load.
    """

    request_id: str
    prompt_tokens: int
    ready_at_s: float
    expected_output_tokens: int | None = None
    running: bool = False


@dataclass(slots=True)
class DecodeNodeView:
    """A decode node's batch and KV memory.

    `running` / `tokens_in_flight`: the batch and the KV it holds now (drives step time).
    `reserved_tokens`: KV reserved for the running batch, including room for its outputs.
    `waiting` / `waiting_tokens`: requests whose prefill is done but that wait for room.
    `incoming` / `incoming_tokens`: requests assigned here whose prefill is not done yet
    (the conductor counts them itself; a heartbeat cannot know them).
    `residents`: every request assigned here and not finished, for predictive admission.
    """

    node_id: NodeId
    kv_capacity_tokens: int
    running: int = 0
    tokens_in_flight: int = 0
    reserved_tokens: int = 0
    waiting: int = 0
    waiting_tokens: int = 0
    incoming: int = 0
    incoming_tokens: int = 0
    healthy: bool = True
    residents: dict[str, DecodeResident] = field(default_factory=dict)


@dataclass(slots=True)
class ClusterView:
    """Everything a policy may look at. `block_tokens`: tokens per indexed KV block."""

    prefill: list[PrefillNodeView]
    decode: list[DecodeNodeView]
    index: PrefixLookup
    block_tokens: int
