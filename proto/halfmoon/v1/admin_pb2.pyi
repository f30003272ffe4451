from proto.halfmoon.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class NodeStatus(_message.Message):
    __slots__ = ("node_id", "role", "address", "state", "running", "waiting", "kv_blocks_used", "kv_blocks_total", "prefix_queries_tokens", "prefix_hits_tokens", "last_heartbeat_age_s", "metrics_address", "tiers", "gpu")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    WAITING_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_USED_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    PREFIX_QUERIES_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PREFIX_HITS_TOKENS_FIELD_NUMBER: _ClassVar[int]
    LAST_HEARTBEAT_AGE_S_FIELD_NUMBER: _ClassVar[int]
    METRICS_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    TIERS_FIELD_NUMBER: _ClassVar[int]
    GPU_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    role: str
    address: str
    state: str
    running: int
    waiting: int
    kv_blocks_used: int
    kv_blocks_total: int
    prefix_queries_tokens: int
    prefix_hits_tokens: int
    last_heartbeat_age_s: float
    metrics_address: str
    tiers: _containers.RepeatedCompositeFieldContainer[_common_pb2.KVTierUse]
    gpu: _common_pb2.GPUUse
    def __init__(self, node_id: _Optional[str] = ..., role: _Optional[str] = ..., address: _Optional[str] = ..., state: _Optional[str] = ..., running: _Optional[int] = ..., waiting: _Optional[int] = ..., kv_blocks_used: _Optional[int] = ..., kv_blocks_total: _Optional[int] = ..., prefix_queries_tokens: _Optional[int] = ..., prefix_hits_tokens: _Optional[int] = ..., last_heartbeat_age_s: _Optional[float] = ..., metrics_address: _Optional[str] = ..., tiers: _Optional[_Iterable[_Union[_common_pb2.KVTierUse, _Mapping]]] = ..., gpu: _Optional[_Union[_common_pb2.GPUUse, _Mapping]] = ...) -> None: ...

class Setting(_message.Message):
    __slots__ = ("name", "value", "description")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    name: str
    value: str
    description: str
    def __init__(self, name: _Optional[str] = ..., value: _Optional[str] = ..., description: _Optional[str] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatusResponse(_message.Message):
    __slots__ = ("nodes", "settings", "model")
    NODES_FIELD_NUMBER: _ClassVar[int]
    SETTINGS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    nodes: _containers.RepeatedCompositeFieldContainer[NodeStatus]
    settings: _containers.RepeatedCompositeFieldContainer[Setting]
    model: str
    def __init__(self, nodes: _Optional[_Iterable[_Union[NodeStatus, _Mapping]]] = ..., settings: _Optional[_Iterable[_Union[Setting, _Mapping]]] = ..., model: _Optional[str] = ...) -> None: ...

class GetSettingsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetSettingsResponse(_message.Message):
    __slots__ = ("settings",)
    SETTINGS_FIELD_NUMBER: _ClassVar[int]
    settings: _containers.RepeatedCompositeFieldContainer[Setting]
    def __init__(self, settings: _Optional[_Iterable[_Union[Setting, _Mapping]]] = ...) -> None: ...

class SetSettingsRequest(_message.Message):
    __slots__ = ("values", "actor")
    class ValuesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    VALUES_FIELD_NUMBER: _ClassVar[int]
    ACTOR_FIELD_NUMBER: _ClassVar[int]
    values: _containers.ScalarMap[str, str]
    actor: str
    def __init__(self, values: _Optional[_Mapping[str, str]] = ..., actor: _Optional[str] = ...) -> None: ...

class SetSettingsResponse(_message.Message):
    __slots__ = ("settings", "changed")
    SETTINGS_FIELD_NUMBER: _ClassVar[int]
    CHANGED_FIELD_NUMBER: _ClassVar[int]
    settings: _containers.RepeatedCompositeFieldContainer[Setting]
    changed: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, settings: _Optional[_Iterable[_Union[Setting, _Mapping]]] = ..., changed: _Optional[_Iterable[str]] = ...) -> None: ...

class MoveNodeRequest(_message.Message):
    __slots__ = ("node_id", "role", "timeout_s", "actor")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    ACTOR_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    role: str
    timeout_s: float
    actor: str
    def __init__(self, node_id: _Optional[str] = ..., role: _Optional[str] = ..., timeout_s: _Optional[float] = ..., actor: _Optional[str] = ...) -> None: ...

class MoveNodeResponse(_message.Message):
    __slots__ = ("node_id", "from_role", "role", "drained_s", "switched_s")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    FROM_ROLE_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    DRAINED_S_FIELD_NUMBER: _ClassVar[int]
    SWITCHED_S_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    from_role: str
    role: str
    drained_s: float
    switched_s: float
    def __init__(self, node_id: _Optional[str] = ..., from_role: _Optional[str] = ..., role: _Optional[str] = ..., drained_s: _Optional[float] = ..., switched_s: _Optional[float] = ...) -> None: ...
