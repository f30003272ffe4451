"""What the scheduler answers: where a request goes, what that should cost, or why not."""
from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from conductor.modes import AdmissionMode, PolicyName
from conductor.request import NodeId


class RejectReason(StrEnum):
    PREFILL_OVERLOADED = "prefill_overloaded"  # predicted TTFT above its threshold
    DECODE_OVERLOADED = "decode_overloaded"  # decode load now above its threshold
    DECODE_OVERLOADED_PROJECTED = "decode_overloaded_projected"  # ... at the end of this prefill
    DECODE_OUT_OF_BLOCKS = "decode_out_of_blocks"  # the decode node could not reserve the prompt's KV
    NO_PREFILL_NODE = "no_prefill_node"
    NO_DECODE_NODE = "no_decode_node"


class LoadBasis(StrEnum):
    """Which requests count towards a decode node's load."""

    CURRENT = "current"  # the running batch and those waiting for room: the node as it is
    COMMITTED = "committed"  # ... plus those assigned to it whose prefill is not done
    PROJECTED = "projected"  # residents still decoding at a future moment (`at_s`)


class Stage(StrEnum):
    ARRIVAL = "arrival"  # before any work was spent
    AFTER_PREFILL = "after_prefill"  # the prefill ran and its work is lost


@dataclass(frozen=True, slots=True)
class Rejection:
    reason: RejectReason
    stage: Stage
    detail: str  # a sentence with the numbers behind the verdict
    retry_after_s: float = 1.0


@dataclass(frozen=True, slots=True)
class PrefillChoice:
    """The chosen prefill node and its predicted TTFT, in parts.

    `cached_blocks` leading blocks are on the node itself; when `pull_from` is set the node
    first pulls blocks `cached_blocks .. cached_blocks + pulled_blocks` from that peer.
    `reused_tokens` prompt tokens are not recomputed.
    """

    node: NodeId
    cached_blocks: int
    pull_from: NodeId | None
    pulled_blocks: int
    reused_tokens: int
    queue_s: float
    load_s: float  # bringing the local prefix onto the device
    pull_s: float  # pulling the peer's prefix over the network
    prefill_s: float
    kv_send_s: float  # sending the prompt's KV to the decode node

    @property
    def ttft_s(self) -> float:
        return self.queue_s + self.load_s + self.pull_s + self.prefill_s + self.kv_send_s

    @property
    def service_s(self) -> float:
        """Predicted time the node is busy with this request (its queue excluded)."""
        return self.load_s + self.pull_s + self.prefill_s


@dataclass(frozen=True, slots=True)
class DecodeChoice:
    """The chosen decode node and its predicted load once this request joins.

    `predicted_tbt_s` is the step time with this request in the batch; `kv_use` the share
    of the node's KV memory then reserved; `basis` which requests were counted, as of `at_s`
    (the decision time unless projected).
    """

    node: NodeId
    predicted_tbt_s: float
    kv_use: float
    at_s: float
    basis: LoadBasis

    @property
    def projected(self) -> bool:
        return self.basis is LoadBasis.PROJECTED

    def load(self, tbt_slo_s: float) -> float:
        tbt_load = self.predicted_tbt_s / tbt_slo_s
        return tbt_load if tbt_load > self.kv_use else self.kv_use


@dataclass(frozen=True, slots=True)
class Decision:
    """The scheduler's verdict on one request at one stage.

    Admitted: `prefill` and `decode` are set. Rejected: `rejection` says why; the choices
    made before the verdict are kept for logging.
    """

    request_id: str
    policy: PolicyName
    admission: AdmissionMode
    decided_at_s: float
    prefill: PrefillChoice | None
    decode: DecodeChoice | None
    rejection: Rejection | None = None

    @property
    def admitted(self) -> bool:
        return self.rejection is None
