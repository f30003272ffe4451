"""One request's trip through the cluster as named phases (DESIGN.md §2).

A `Trip` is the request as the client sees it: the cluster's own id, the client's id (an
attribute only: echoed back and logged), the prompt, and every token already streamed. An
`Attempt` is one placement of it on nodes and walks the phases

    placed -> reserved -> prefilling -> decoding -> finished     (disaggregated)
    placed -> decoding -> finished        (colocated, or resumed on a new decode node)

`prefilling` covers the prefill node's compute and the KV transfer, which overlap in one
call (each finished chunk is written into the reservation while the next one computes), so
the conductor sees them as one phase. The phase says what the attempt holds: in `reserved`
and `prefilling` the decode blocks are the conductor's to release; from `decoding` on the
Decode call owns them (cancelling it frees them). The live conductor ends every attempt
through one cleanup path (`LiveConductor._close`) that reads exactly this.

When a node fails an attempt (`NodeFailure`; the registry has taken the node out of
rotation), the trip goes on in a new attempt: from scratch if no token reached the client
yet (a retry, invisible to the client), else resumed after the tokens streamed so far on
another decode node (a migration), within the per-request limits.

The first token goes through the conductor: the prefill node answers `Prefill` with it, and
the conductor then calls `Decode`, whose first output is that token. Measured, a direct path
(the prefill node handing the token to the decode node) is not worth building: it could save
at most part of the hop from the conductor's `PrefillResponse` to the decode node's first
output (`Timing.first_decode_s`, histogram `halfmoon:ttft_first_decode_seconds`), and most of
that hop is the wait for the decode engine thread to join the request between two steps,
which a direct path keeps. `python -m bench.first_token_hop --requests 16 --concurrency 1,4`
(1P+1D processes, SmolLM2-135M fp32, 256-token prompts, 16 tokens out, 2 shared cores at load
5-7): hop p50 4.2 ms alone (0.5% of a 0.90 s TTFT, 13% of the 46 ms gap to the second
token), 12 ms at 4 concurrent (0.3% of a 3.2 s TTFT, 18% of a 71 ms gap, mostly the decode
step in progress); the legs a direct path removes are a millisecond or two, below TTFT's
run-to-run noise here. The same measurement found the prefill node answering only after its
engine thread had released the request's blocks, i.e. behind the step in progress there (1.5
s p50 of TTFT at 4 concurrent); it now queues the release and answers at once (that part 1.5
s -> 18 ms, TTFT p50 4.39 -> 3.17 s, before/after in `docs/results/first_token_hop*.json`).
"""
from __future__ import annotations

import asyncio
import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from conductor.decision import Decision
from conductor.request import RequestInfo

if TYPE_CHECKING:  # the registry feeds the cluster state, which uses these phases; the
    # sampling params are only carried here (importing them at run time would load torch
    # into every user of the cluster state: the simulator among them)
    from conductor.registry import NodeRecord
    from engine.sampling import SamplingParams


class Phase(str, enum.Enum):
    PLACED = "placed"  # nodes chosen and counted in the view; nothing held on them yet
    RESERVED = "reserved"  # decode blocks reserved under a lease the conductor renews
    PREFILLING = "prefilling"  # the prefill node computes the prompt and writes its KV into the reservation
    DECODING = "decoding"  # the decode node runs the request (its Decode call owns the blocks)
    FINISHED = "finished"  # ended: finished, failed or cancelled, and cleaned up


_NEXT = {
    Phase.PLACED: {Phase.RESERVED, Phase.DECODING, Phase.FINISHED},
    Phase.RESERVED: {Phase.PREFILLING, Phase.FINISHED},
    Phase.PREFILLING: {Phase.DECODING, Phase.FINISHED},
    Phase.DECODING: {Phase.FINISHED},
    Phase.FINISHED: set(),
}


class NodeDown(Exception):
    """A node the request waits on went out of rotation (`NodeRecord.down` fired)."""

    def __init__(self, rec: NodeRecord) -> None:
        super().__init__(f"{rec.role} node {rec.node_id} went out of rotation"
                         + (f" ({rec.down_reason})" if rec.down_reason else ""))
        self.node = rec


class NodeFailure(Exception):
    """`node` failed an attempt in `phase`; it is out of rotation, the trip may go on elsewhere."""

    def __init__(self, node: NodeRecord, phase: Phase, detail: str) -> None:
        super().__init__(detail)
        self.node = node
        self.phase = phase


async def or_down(aw, *recs: NodeRecord):
    """Await `aw`, but raise NodeDown as soon as one of `recs` goes out of rotation."""
    task = asyncio.ensure_future(aw)
    downs = {asyncio.ensure_future(r.down.wait()): r for r in recs}
    try:
        done, _ = await asyncio.wait({task, *downs}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        for d in downs:
            d.cancel()
    if task in done:
        return task.result()
    task.cancel()
    raise NodeDown(next(r for d, r in downs.items() if d in done))


@dataclass(eq=False)
class Attempt:
    """One placement: `pre` is None when the attempt resumes on a decode node alone. `rid`
    is the id its node RPCs carry: the trip's id, suffixed from the second attempt on, so
    nothing an earlier attempt left behind (a Release or abort still on its way) can meet it."""

    rid: str
    pre: NodeRecord | None
    dec: NodeRecord
    decision: Decision | None = None
    colocated: bool = False
    phase: Phase = Phase.PLACED
    streamed_before: int = 0  # tokens the trip had streamed when this attempt began
    renewer: asyncio.Future | None = None
    decode_call: object | None = None

    def enter(self, phase: Phase) -> None:
        if phase not in _NEXT[self.phase]:
            raise RuntimeError(f"lifecycle: {self.phase.value} -> {phase.value} is not a transition")
        self.phase = phase

    @property
    def holds_reservation(self) -> bool:
        """The decode blocks are the conductor's to release (Decode has not claimed them)."""
        return self.phase in (Phase.RESERVED, Phase.PREFILLING)


@dataclass(eq=False)
class Trip:
    rid: str  # the cluster's own id, unique per request: every node RPC carries it
    client_id: str  # the client's id: only echoed back and logged
    token_ids: list[int]
    params: SamplingParams
    info: RequestInfo
    t0: float
    generated: list[int] = field(default_factory=list)  # tokens streamed to the client so far
    retries: int = 0
    migrations: int = 0
    attempts: int = 0
    # fixed when the first token streams: where the prompt was prefilled and how long it took
    first_at: float | None = None
    prefill_node: str = ""
    cached_tokens: int = 0
    queue_s: float = 0.0
    prefill_s: float = 0.0
    kv_transfer_s: float = 0.0
    first_decode_s: float = 0.0

    def attempt_id(self) -> str:
        """The node-level id of the next attempt."""
        self.attempts += 1
        return self.rid if self.attempts == 1 else f"{self.rid}.{self.attempts}"

    @property
    def label(self) -> str:
        """How logs name the request: its id, and the client's when it gave one."""
        return f"{self.rid} (client id {self.client_id!r})" if self.client_id else self.rid
