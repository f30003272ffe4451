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


@dataclass(frozen=True, slots=True, init=False)
class Rejection:
    reason: RejectReason
    stage: Stage
    detail: str  # a sentence with the numbers behind the verdict
    retry_after_s: float = 1.0

    # Written out (the fields, in order): a compiled dataclass's generated __init__ runs
    # interpreted. tests/bench/test_record_inits.py holds it to the fields.
    def __init__(self, reason: RejectReason, stage: Stage, detail: str, retry_after_s: float = 1.0) -> None:
        object.__setattr__(self, "reason", reason)
        object.__setattr__(self, "stage", stage)
        object.__setattr__(self, "detail", detail)
        object.__setattr__(self, "retry_after_s", retry_after_s)


@dataclass(frozen=True, slots=True, init=False)
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

    # Written out (the fields, in order): a compiled dataclass's generated __init__ runs
    # interpreted. tests/bench/test_record_inits.py holds it to the fields.
    def __init__(self, node: NodeId, cached_blocks: int, pull_from: NodeId | None, pulled_blocks: int,
                 reused_tokens: int, queue_s: float, load_s: float, pull_s: float, prefill_s: float,
                 kv_send_s: float) -> None:
        object.__setattr__(self, "node", node)
        object.__setattr__(self, "cached_blocks", cached_blocks)
        object.__setattr__(self, "pull_from", pull_from)
        object.__setattr__(self, "pulled_blocks", pulled_blocks)
        object.__setattr__(self, "reused_tokens", reused_tokens)
        object.__setattr__(self, "queue_s", queue_s)
        object.__setattr__(self, "load_s", load_s)
        object.__setattr__(self, "pull_s", pull_s)
        object.__setattr__(self, "prefill_s", prefill_s)
        object.__setattr__(self, "kv_send_s", kv_send_s)

    @property
    def ttft_s(self) -> float:
        return self.queue_s + self.load_s + self.pull_s + self.prefill_s + self.kv_send_s

    @property
    def service_s(self) -> float:
        """Predicted time the node is busy with this request (its queue excluded)."""
        return self.load_s + self.pull_s + self.prefill_s


@dataclass(frozen=True, slots=True, init=False)
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

    # Written out (the fields, in order): a compiled dataclass's generated __init__ runs
    # interpreted. tests/bench/test_record_inits.py holds it to the fields.
    def __init__(self, node: NodeId, predicted_tbt_s: float, kv_use: float, at_s: float, basis: LoadBasis) -> None:
        object.__setattr__(self, "node", node)
        object.__setattr__(self, "predicted_tbt_s", predicted_tbt_s)
        object.__setattr__(self, "kv_use", kv_use)
        object.__setattr__(self, "at_s", at_s)
        object.__setattr__(self, "basis", basis)

    @property
    def projected(self) -> bool:
        return self.basis is LoadBasis.PROJECTED

    def load(self, tbt_slo_s: float) -> float:
        tbt_load = self.predicted_tbt_s / tbt_slo_s
        return tbt_load if tbt_load > self.kv_use else self.kv_use


@dataclass(frozen=True, slots=True, init=False)
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

    # Written out (the fields, in order): a compiled dataclass's generated __init__ runs
    # interpreted. tests/bench/test_record_inits.py holds it to the fields.
    def __init__(self, request_id: str, policy: PolicyName, admission: AdmissionMode, decided_at_s: float,
                 prefill: PrefillChoice | None, decode: DecodeChoice | None,
                 rejection: Rejection | None = None) -> None:
        object.__setattr__(self, "request_id", request_id)
        object.__setattr__(self, "policy", policy)
        object.__setattr__(self, "admission", admission)
        object.__setattr__(self, "decided_at_s", decided_at_s)
        object.__setattr__(self, "prefill", prefill)
        object.__setattr__(self, "decode", decode)
        object.__setattr__(self, "rejection", rejection)

    @property
    def admitted(self) -> bool:
        return self.rejection is None
