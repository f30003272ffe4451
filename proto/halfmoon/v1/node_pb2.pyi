from proto.halfmoon.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Role(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ROLE_UNSPECIFIED: _ClassVar[Role]
    ROLE_PREFILL: _ClassVar[Role]
    ROLE_DECODE: _ClassVar[Role]
    ROLE_COLOCATED: _ClassVar[Role]

class KVEventKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    KV_EVENT_UNSPECIFIED: _ClassVar[KVEventKind]
    KV_EVENT_STORED: _ClassVar[KVEventKind]
    KV_EVENT_REMOVED: _ClassVar[KVEventKind]
    KV_EVENT_CLEARED: _ClassVar[KVEventKind]
ROLE_UNSPECIFIED: Role
ROLE_PREFILL: Role
ROLE_DECODE: Role
ROLE_COLOCATED: Role
KV_EVENT_UNSPECIFIED: KVEventKind
KV_EVENT_STORED: KVEventKind
KV_EVENT_REMOVED: KVEventKind
KV_EVENT_CLEARED: KVEventKind

class KVLayout(_message.Message):
    __slots__ = ("block_size", "block_bytes", "total_blocks", "model", "kv_dtype", "dtype")
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    BLOCK_BYTES_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    KV_DTYPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    block_size: int
    block_bytes: int
    total_blocks: int
    model: str
    kv_dtype: str
    dtype: str
    def __init__(self, block_size: _Optional[int] = ..., block_bytes: _Optional[int] = ..., total_blocks: _Optional[int] = ..., model: _Optional[str] = ..., kv_dtype: _Optional[str] = ..., dtype: _Optional[str] = ...) -> None: ...

class NodeLoad(_message.Message):
    __slots__ = ("waiting", "running", "queued_prefill_tokens", "free_blocks", "tokens_in_flight", "prefix_queries_tokens", "prefix_hits_tokens", "kv_event_seq", "tiers", "gpu", "decode_steps", "decode_step_seconds", "decode_step_rows", "decode_step_tokens")
    WAITING_FIELD_NUMBER: _ClassVar[int]
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    QUEUED_PREFILL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    FREE_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    PREFIX_QUERIES_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PREFIX_HITS_TOKENS_FIELD_NUMBER: _ClassVar[int]
    KV_EVENT_SEQ_FIELD_NUMBER: _ClassVar[int]
    TIERS_FIELD_NUMBER: _ClassVar[int]
    GPU_FIELD_NUMBER: _ClassVar[int]
    DECODE_STEPS_FIELD_NUMBER: _ClassVar[int]
    DECODE_STEP_SECONDS_FIELD_NUMBER: _ClassVar[int]
    DECODE_STEP_ROWS_FIELD_NUMBER: _ClassVar[int]
    DECODE_STEP_TOKENS_FIELD_NUMBER: _ClassVar[int]
    waiting: int
    running: int
    queued_prefill_tokens: int
    free_blocks: int
    tokens_in_flight: int
    prefix_queries_tokens: int
    prefix_hits_tokens: int
    kv_event_seq: int
    tiers: _containers.RepeatedCompositeFieldContainer[_common_pb2.KVTierUse]
    gpu: _common_pb2.GPUUse
    decode_steps: int
    decode_step_seconds: float
    decode_step_rows: int
    decode_step_tokens: int
    def __init__(self, waiting: _Optional[int] = ..., running: _Optional[int] = ..., queued_prefill_tokens: _Optional[int] = ..., free_blocks: _Optional[int] = ..., tokens_in_flight: _Optional[int] = ..., prefix_queries_tokens: _Optional[int] = ..., prefix_hits_tokens: _Optional[int] = ..., kv_event_seq: _Optional[int] = ..., tiers: _Optional[_Iterable[_Union[_common_pb2.KVTierUse, _Mapping]]] = ..., gpu: _Optional[_Union[_common_pb2.GPUUse, _Mapping]] = ..., decode_steps: _Optional[int] = ..., decode_step_seconds: _Optional[float] = ..., decode_step_rows: _Optional[int] = ..., decode_step_tokens: _Optional[int] = ...) -> None: ...

class RegisterRequest(_message.Message):
    __slots__ = ("node_id", "role", "address", "layout", "transfer_descriptor", "metrics_address", "load")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_DESCRIPTOR_FIELD_NUMBER: _ClassVar[int]
    METRICS_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    role: Role
    address: str
    layout: KVLayout
    transfer_descriptor: bytes
    metrics_address: str
    load: NodeLoad
    def __init__(self, node_id: _Optional[str] = ..., role: _Optional[_Union[Role, str]] = ..., address: _Optional[str] = ..., layout: _Optional[_Union[KVLayout, _Mapping]] = ..., transfer_descriptor: _Optional[bytes] = ..., metrics_address: _Optional[str] = ..., load: _Optional[_Union[NodeLoad, _Mapping]] = ...) -> None: ...

class RegisterResponse(_message.Message):
    __slots__ = ("heartbeat_interval_s",)
    HEARTBEAT_INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    heartbeat_interval_s: float
    def __init__(self, heartbeat_interval_s: _Optional[float] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("node_id", "load")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    load: NodeLoad
    def __init__(self, node_id: _Optional[str] = ..., load: _Optional[_Union[NodeLoad, _Mapping]] = ...) -> None: ...

class HeartbeatResponse(_message.Message):
    __slots__ = ("known", "switch_role")
    KNOWN_FIELD_NUMBER: _ClassVar[int]
    SWITCH_ROLE_FIELD_NUMBER: _ClassVar[int]
    known: bool
    switch_role: Role
    def __init__(self, known: _Optional[bool] = ..., switch_role: _Optional[_Union[Role, str]] = ...) -> None: ...

class KVTarget(_message.Message):
    __slots__ = ("node_id", "transfer_descriptor", "region_id", "block_ids", "block_bytes")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_DESCRIPTOR_FIELD_NUMBER: _ClassVar[int]
    REGION_ID_FIELD_NUMBER: _ClassVar[int]
    BLOCK_IDS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_BYTES_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    transfer_descriptor: bytes
    region_id: int
    block_ids: _containers.RepeatedScalarFieldContainer[int]
    block_bytes: int
    def __init__(self, node_id: _Optional[str] = ..., transfer_descriptor: _Optional[bytes] = ..., region_id: _Optional[int] = ..., block_ids: _Optional[_Iterable[int]] = ..., block_bytes: _Optional[int] = ...) -> None: ...

class PrefixSource(_message.Message):
    __slots__ = ("node_id", "address", "transfer_descriptor", "num_blocks")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_DESCRIPTOR_FIELD_NUMBER: _ClassVar[int]
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    address: str
    transfer_descriptor: bytes
    num_blocks: int
    def __init__(self, node_id: _Optional[str] = ..., address: _Optional[str] = ..., transfer_descriptor: _Optional[bytes] = ..., num_blocks: _Optional[int] = ...) -> None: ...

class PrefillRequest(_message.Message):
    __slots__ = ("request_id", "prompt_token_ids", "sampling", "target", "pull", "block_hashes")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    PULL_FIELD_NUMBER: _ClassVar[int]
    BLOCK_HASHES_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    sampling: _common_pb2.SamplingParams
    target: KVTarget
    pull: PrefixSource
    block_hashes: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, request_id: _Optional[str] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., sampling: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., target: _Optional[_Union[KVTarget, _Mapping]] = ..., pull: _Optional[_Union[PrefixSource, _Mapping]] = ..., block_hashes: _Optional[_Iterable[int]] = ...) -> None: ...

class PrefillResponse(_message.Message):
    __slots__ = ("first_token", "num_cached_tokens", "queue_s", "prefill_s", "kv_transfer_s", "kv_bytes", "pulled_tokens", "pull_s", "pull_error", "first_tokens", "first_logprobs")
    FIRST_TOKEN_FIELD_NUMBER: _ClassVar[int]
    NUM_CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_S_FIELD_NUMBER: _ClassVar[int]
    PREFILL_S_FIELD_NUMBER: _ClassVar[int]
    KV_TRANSFER_S_FIELD_NUMBER: _ClassVar[int]
    KV_BYTES_FIELD_NUMBER: _ClassVar[int]
    PULLED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PULL_S_FIELD_NUMBER: _ClassVar[int]
    PULL_ERROR_FIELD_NUMBER: _ClassVar[int]
    FIRST_TOKENS_FIELD_NUMBER: _ClassVar[int]
    FIRST_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    first_token: int
    num_cached_tokens: int
    queue_s: float
    prefill_s: float
    kv_transfer_s: float
    kv_bytes: int
    pulled_tokens: int
    pull_s: float
    pull_error: str
    first_tokens: _containers.RepeatedScalarFieldContainer[int]
    first_logprobs: _containers.RepeatedCompositeFieldContainer[_common_pb2.TokenLogprob]
    def __init__(self, first_token: _Optional[int] = ..., num_cached_tokens: _Optional[int] = ..., queue_s: _Optional[float] = ..., prefill_s: _Optional[float] = ..., kv_transfer_s: _Optional[float] = ..., kv_bytes: _Optional[int] = ..., pulled_tokens: _Optional[int] = ..., pull_s: _Optional[float] = ..., pull_error: _Optional[str] = ..., first_tokens: _Optional[_Iterable[int]] = ..., first_logprobs: _Optional[_Iterable[_Union[_common_pb2.TokenLogprob, _Mapping]]] = ...) -> None: ...

class PinRequest(_message.Message):
    __slots__ = ("pin_id", "token_ids", "lease_s", "block_hashes")
    PIN_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    LEASE_S_FIELD_NUMBER: _ClassVar[int]
    BLOCK_HASHES_FIELD_NUMBER: _ClassVar[int]
    pin_id: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    lease_s: float
    block_hashes: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, pin_id: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., lease_s: _Optional[float] = ..., block_hashes: _Optional[_Iterable[int]] = ...) -> None: ...

class PinResponse(_message.Message):
    __slots__ = ("region_id", "block_ids", "block_bytes")
    REGION_ID_FIELD_NUMBER: _ClassVar[int]
    BLOCK_IDS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_BYTES_FIELD_NUMBER: _ClassVar[int]
    region_id: int
    block_ids: _containers.RepeatedScalarFieldContainer[int]
    block_bytes: int
    def __init__(self, region_id: _Optional[int] = ..., block_ids: _Optional[_Iterable[int]] = ..., block_bytes: _Optional[int] = ...) -> None: ...

class UnpinRequest(_message.Message):
    __slots__ = ("pin_id",)
    PIN_ID_FIELD_NUMBER: _ClassVar[int]
    pin_id: str
    def __init__(self, pin_id: _Optional[str] = ...) -> None: ...

class UnpinResponse(_message.Message):
    __slots__ = ("found",)
    FOUND_FIELD_NUMBER: _ClassVar[int]
    found: bool
    def __init__(self, found: _Optional[bool] = ...) -> None: ...

class AbortRequest(_message.Message):
    __slots__ = ("request_id",)
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    def __init__(self, request_id: _Optional[str] = ...) -> None: ...

class AbortResponse(_message.Message):
    __slots__ = ("found",)
    FOUND_FIELD_NUMBER: _ClassVar[int]
    found: bool
    def __init__(self, found: _Optional[bool] = ...) -> None: ...

class KVEvent(_message.Message):
    __slots__ = ("seq", "kind", "block_hashes", "tier", "parent_hash")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    BLOCK_HASHES_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    PARENT_HASH_FIELD_NUMBER: _ClassVar[int]
    seq: int
    kind: KVEventKind
    block_hashes: _containers.RepeatedScalarFieldContainer[int]
    tier: str
    parent_hash: int
    def __init__(self, seq: _Optional[int] = ..., kind: _Optional[_Union[KVEventKind, str]] = ..., block_hashes: _Optional[_Iterable[int]] = ..., tier: _Optional[str] = ..., parent_hash: _Optional[int] = ...) -> None: ...

class KVEventsRequest(_message.Message):
    __slots__ = ("subscriber",)
    SUBSCRIBER_FIELD_NUMBER: _ClassVar[int]
    subscriber: str
    def __init__(self, subscriber: _Optional[str] = ...) -> None: ...

class ReserveRequest(_message.Message):
    __slots__ = ("request_id", "num_tokens", "lease_s")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    LEASE_S_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    num_tokens: int
    lease_s: float
    def __init__(self, request_id: _Optional[str] = ..., num_tokens: _Optional[int] = ..., lease_s: _Optional[float] = ...) -> None: ...

class ReserveResponse(_message.Message):
    __slots__ = ("target",)
    TARGET_FIELD_NUMBER: _ClassVar[int]
    target: KVTarget
    def __init__(self, target: _Optional[_Union[KVTarget, _Mapping]] = ...) -> None: ...

class ReleaseRequest(_message.Message):
    __slots__ = ("request_id",)
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    def __init__(self, request_id: _Optional[str] = ...) -> None: ...

class ReleaseResponse(_message.Message):
    __slots__ = ("found",)
    FOUND_FIELD_NUMBER: _ClassVar[int]
    found: bool
    def __init__(self, found: _Optional[bool] = ...) -> None: ...

class RenewRequest(_message.Message):
    __slots__ = ("request_id", "lease_s")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    LEASE_S_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    lease_s: float
    def __init__(self, request_id: _Optional[str] = ..., lease_s: _Optional[float] = ...) -> None: ...

class RenewResponse(_message.Message):
    __slots__ = ("found",)
    FOUND_FIELD_NUMBER: _ClassVar[int]
    found: bool
    def __init__(self, found: _Optional[bool] = ...) -> None: ...

class DecodeRequest(_message.Message):
    __slots__ = ("request_id", "prompt_token_ids", "sampling", "first_token", "num_cached_tokens", "recompute", "colocated", "kv_bytes", "kv_transfer_s", "resume_token_ids", "first_tokens", "first_logprobs", "block_hashes")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    FIRST_TOKEN_FIELD_NUMBER: _ClassVar[int]
    NUM_CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    RECOMPUTE_FIELD_NUMBER: _ClassVar[int]
    COLOCATED_FIELD_NUMBER: _ClassVar[int]
    KV_BYTES_FIELD_NUMBER: _ClassVar[int]
    KV_TRANSFER_S_FIELD_NUMBER: _ClassVar[int]
    RESUME_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    FIRST_TOKENS_FIELD_NUMBER: _ClassVar[int]
    FIRST_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_HASHES_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    sampling: _common_pb2.SamplingParams
    first_token: int
    num_cached_tokens: int
    recompute: bool
    colocated: bool
    kv_bytes: int
    kv_transfer_s: float
    resume_token_ids: _containers.RepeatedScalarFieldContainer[int]
    first_tokens: _containers.RepeatedScalarFieldContainer[int]
    first_logprobs: _containers.RepeatedCompositeFieldContainer[_common_pb2.TokenLogprob]
    block_hashes: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, request_id: _Optional[str] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., sampling: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., first_token: _Optional[int] = ..., num_cached_tokens: _Optional[int] = ..., recompute: _Optional[bool] = ..., colocated: _Optional[bool] = ..., kv_bytes: _Optional[int] = ..., kv_transfer_s: _Optional[float] = ..., resume_token_ids: _Optional[_Iterable[int]] = ..., first_tokens: _Optional[_Iterable[int]] = ..., first_logprobs: _Optional[_Iterable[_Union[_common_pb2.TokenLogprob, _Mapping]]] = ..., block_hashes: _Optional[_Iterable[int]] = ...) -> None: ...

class DecodeOutput(_message.Message):
    __slots__ = ("delta", "finished", "finish_reason", "completion_tokens", "num_cached_tokens", "index", "forced_tokens")
    DELTA_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NUM_CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    FORCED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    delta: _common_pb2.TokenDelta
    finished: bool
    finish_reason: str
    completion_tokens: int
    num_cached_tokens: int
    index: int
    forced_tokens: int
    def __init__(self, delta: _Optional[_Union[_common_pb2.TokenDelta, _Mapping]] = ..., finished: _Optional[bool] = ..., finish_reason: _Optional[str] = ..., completion_tokens: _Optional[int] = ..., num_cached_tokens: _Optional[int] = ..., index: _Optional[int] = ..., forced_tokens: _Optional[int] = ...) -> None: ...
