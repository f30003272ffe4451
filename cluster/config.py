"""The one typed configuration tree of a halfmoon cluster, and its YAML loader.

`ClusterConfig()` is the embedded default: the conductor, one prefill node and one decode
node, all on loopback. Every section forbids unknown keys, so a typo is an error that names
the key; rules that span fields live on the section (or the root) that sees all of them.
`load_config(path)` reads YAML and raises `ConfigError`, which names the file and each bad
field. Examples: `deploy/*.yaml`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Mapping, TypedDict

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from conductor.errors import InvalidSetting
from conductor.modes import AdmissionMode, PolicyName, parse_admission, parse_policy
from conductor.settings import SettingsValues

_DEFAULTS = SettingsValues()  # the conductor's scheduling defaults: one place (conductor/settings.py)

Port = Annotated[int, Field(ge=0, le=65535, description="0 picks a free port")]
Seconds = Annotated[float, Field(gt=0)]
Role = Literal["prefill", "decode"]

# Ray's own resource names; custom resources must not shadow them.
_RAY_BUILTIN_RESOURCES = frozenset({"CPU", "GPU", "memory", "object_store_memory"})
DEFAULT_NUM_BLOCKS = 512  # used when neither kv.num_blocks nor kv.kv_memory_gb is set


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class FieldProblem(ValueError):
    """Raised by validators that check several fields: `field` is the one to fix, dotted,
    relative to the section whose validator raised it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def _check_quantity(value: float) -> float:
    """Ray's rule: a resource quantity above 1 must be a whole number."""
    if value > 1 and value != int(value):
        raise ValueError(f"quantities above 1 must be whole numbers, got {value}")
    return value


class RayActorOptions(TypedDict):
    """Keyword arguments for `ActorClass.options(...)`."""

    num_cpus: float
    num_gpus: float
    resources: dict[str, float]


class _ActorResources(_Section):
    """What one Ray actor asks for: logical CPUs, GPUs and custom resources."""

    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    resources: dict[str, float] = Field(
        default_factory=dict, description='custom Ray resources, e.g. {"prefill": 1}'
    )

    @field_validator("num_cpus", "num_gpus")
    @classmethod
    def _whole_above_one(cls, value: float) -> float:
        return _check_quantity(value)

    @field_validator("resources")
    @classmethod
    def _custom_resources(cls, value: dict[str, float]) -> dict[str, float]:
        for name, qty in value.items():
            if not name or name in _RAY_BUILTIN_RESOURCES:
                raise FieldProblem(name, "not a custom resource name; use num_cpus / num_gpus")
            if not qty > 0:
                raise FieldProblem(name, f"quantity must be > 0, got {qty}")
            try:
                _check_quantity(qty)
            except ValueError as exc:
                raise FieldProblem(name, str(exc)) from None
        return value

    def ray_options(self) -> RayActorOptions:
        return RayActorOptions(num_cpus=self.num_cpus, num_gpus=self.num_gpus, resources=dict(self.resources))


class ModelConfig(_Section):
    name: str = Field("smollm2-135m-instruct", min_length=1)
    path: Path | None = Field(None, description="a Hugging Face Llama-family directory; None loads `name`")
    dtype: Literal["auto", "float32", "bfloat16", "w8a8", "fp8"] = "auto"  # engine/quant.py
    max_model_len: int = Field(2048, ge=1, description="longest prompt + output, in tokens")

    def resolve_dtype(self, has_gpu: bool) -> str:
        """`auto` is bfloat16 on a GPU and float32 on a CPU."""
        if self.dtype != "auto":
            return self.dtype
        return "bfloat16" if has_gpu else "float32"


class NodeGroupConfig(_ActorResources):
    """A group of identical prefill (or decode) nodes; each node is one Ray actor."""

    count: int = Field(1, ge=0)
    host: str = Field("127.0.0.1", min_length=1, description="address the node's servers bind")
    metrics_port: Port = 0


class KVConfig(_Section):
    block_size: int = Field(16, ge=1, le=4096, description="tokens per KV block")
    num_blocks: int | None = Field(None, ge=1)
    kv_memory_gb: float | None = Field(None, gt=0, description="size the pool by memory instead (on each node's host)")

    @model_validator(mode="after")
    def _one_sizing(self) -> KVConfig:
        if self.num_blocks is not None and self.kv_memory_gb is not None:
            raise FieldProblem("kv_memory_gb", "set kv.num_blocks or kv.kv_memory_gb, not both")
        return self

    def resolve_num_blocks(self, bytes_per_block: int) -> int:
        """Blocks in each node's pool, given the model's KV bytes per block."""
        if bytes_per_block <= 0:
            raise ValueError(f"bytes_per_block must be > 0, got {bytes_per_block}")
        if self.num_blocks is not None:
            return self.num_blocks
        if self.kv_memory_gb is not None:
            return max(1, int(self.kv_memory_gb * 2**30) // bytes_per_block)
        return DEFAULT_NUM_BLOCKS


class SchedulerConfig(_Section):
    max_num_seqs: int = Field(32, ge=1, description="requests in one decode batch")
    max_num_batched_tokens: int = Field(2048, ge=1, description="tokens in one decode-node engine step")
    prefill_chunk_size: int = Field(
        512, ge=1, description="tokens a prefill node computes per step: one chunk, one KV push"
    )

    @model_validator(mode="after")
    def _chunk_fits_step(self) -> SchedulerConfig:
        if self.prefill_chunk_size > self.max_num_batched_tokens:
            raise FieldProblem(
                "prefill_chunk_size",
                f"{self.prefill_chunk_size} must not exceed max_num_batched_tokens ({self.max_num_batched_tokens})",
            )
        return self


class ConductorConfig(_ActorResources):
    """The conductor's servers and its starting scheduling settings (`conductor.settings`
    names; `halfmoon admin set` changes them at runtime)."""

    host: str = Field("127.0.0.1", min_length=1)
    grpc_port: Port = 50051
    http_port: Port = 8000  # the OpenAI-compatible API and /metrics
    control_host: str = Field(
        "127.0.0.1", min_length=1,
        description="address the control plane (nodes' Register / Heartbeat) binds: loopback unless nodes run "
        "on other machines (then 0.0.0.0 or an inside address); calls are signed with auth.control_secret",
    )
    control_port: Port = Field(0, description="0: a free port, told to the nodes by the launcher")
    policy: PolicyName = Field(_DEFAULTS.policy, description="a `conductor.modes.PolicyName` (or alias)")
    admission: AdmissionMode = Field(_DEFAULTS.admission, description="a `conductor.modes.AdmissionMode` (or alias)")
    ttft_slo_s: Seconds = _DEFAULTS.ttft_slo_s
    tbt_slo_s: Seconds = _DEFAULTS.tbt_slo_s
    prefill_reject_threshold: float = Field(_DEFAULTS.prefill_reject_threshold, gt=0,
                                            description="reject when predicted TTFT > this x TTFT SLO")
    decode_reject_threshold: float = Field(_DEFAULTS.decode_reject_threshold, gt=0,
                                           description="reject when predicted decode load > this")
    typical_output_tokens: int = Field(_DEFAULTS.typical_output_tokens, ge=1,
                                       description="assumed output length (predictive admission)")
    cost_model: Path | None = Field(None, description="a `halfmoon profile` file; None: the CPU default")
    heartbeat_interval_s: Seconds = 1.0
    heartbeat_timeout_s: Seconds = 5.0
    elastic_interval_s: float = Field(0.0, ge=0, description="> 0: elastic roles, the role planner moves nodes "
                                                             "between the prefill and decode pools (checked this "
                                                             "often, s); 0: off (`halfmoon admin move` still works)")
    max_request_bytes: int = Field(4 * 2**20, ge=1024, description="an HTTP body or gRPC message over this is "
                                                                  "refused (413 / INVALID_ARGUMENT)")
    store_gb: float | None = Field(
        None, ge=0, description="the cluster KV store's memory, GiB, that the prefix index bounds its cluster tier "
        "to (Mooncake Store evicts LRU without telling; the index drops what it must have evicted); None: "
        "kv_tiers.store_gb (when the launcher starts the master) + kv_tiers.node_segment_gb x nodes, 0 with "
        "the store off; 0: unbounded (every put is kept as a hint until a lookup finds it gone)")
    prometheus_targets_file: Path | None = Field(
        None, description="where the launcher writes node metrics addresses (Prometheus file_sd)"
    )

    @field_validator("policy", mode="before")
    @classmethod
    def _policy(cls, value: object) -> object:
        return parse_policy(value) if isinstance(value, str) else value

    @field_validator("admission", mode="before")
    @classmethod
    def _admission(cls, value: object) -> object:
        return parse_admission(value) if isinstance(value, str) else value

    def settings(self) -> SettingsValues:
        """The scheduling settings the conductor starts with."""
        return SettingsValues(
            ttft_slo_s=self.ttft_slo_s,
            tbt_slo_s=self.tbt_slo_s,
            prefill_reject_threshold=self.prefill_reject_threshold,
            decode_reject_threshold=self.decode_reject_threshold,
            admission=self.admission,
            policy=self.policy,
            typical_output_tokens=self.typical_output_tokens,
        )

    @model_validator(mode="after")
    def _consistent(self) -> ConductorConfig:
        try:  # the conductor's own rules (ranges of SLOs and thresholds), checked now, not at start-up
            self.settings()
        except InvalidSetting as exc:
            raise FieldProblem(exc.name, exc.reason) from None
        if self.grpc_port and self.grpc_port == self.http_port:
            raise FieldProblem("http_port", f"must differ from grpc_port ({self.grpc_port})")
        for name in ("grpc_port", "http_port"):
            if self.control_port and self.control_port == getattr(self, name):
                raise FieldProblem("control_port", f"must differ from {name} ({self.control_port})")
        if self.heartbeat_timeout_s < 2 * self.heartbeat_interval_s:
            raise FieldProblem(
                "heartbeat_timeout_s",
                f"{self.heartbeat_timeout_s} must be at least twice heartbeat_interval_s "
                f"({self.heartbeat_interval_s}): one late heartbeat must not declare a node dead",
            )
        return self


class TransferConfig(_Section):
    transport: Literal["auto", "tcp", "shm", "mooncake"] = "auto"
    token: str | None = Field(None, min_length=1, repr=False, description="shared secret peers must present")
    timeout_s: Seconds = 30.0


class AuthConfig(_Section):
    """Secrets. Left unset, each comes from its environment variable when that is set."""

    api_key: str | None = Field(
        None, min_length=1, repr=False,
        description="clients must send it (HTTP `Authorization: Bearer <key>`, gRPC `authorization` metadata); "
        "unset: $HALFMOON_API_KEY, else no key (warned about when the conductor binds beyond loopback)",
    )

    control_secret: str | None = Field(
        None, min_length=16, repr=False,
        description="shared secret nodes sign their control calls with; unset: $HALFMOON_CONTROL_SECRET, "
        "else the launcher generates one per cluster and gives it to the nodes it starts",
    )


class FailureConfig(_Section):
    on_transfer_failure: Literal["recompute", "fail"] = "recompute"
    kv_lease_s: Seconds = Field(60.0, description="reserved decode blocks unused this long are freed")
    request_timeout_s: Seconds = 600.0
    max_retries: int = Field(3, ge=0, description="times a request is placed again when a node fails before "
                                                  "its first token (invisible to the client)")
    max_migrations: int = Field(3, ge=0, description="times a request moves to another decode node when its "
                                                     "decode node fails mid-stream (0: the request fails)")


class KVTiersConfig(_Section):
    """The KV tiers under each node's device region (engine/tiers): host DRAM, local disk and
    the cluster store on Mooncake Store. Sized for one machine with a few nodes; 0 GB turns a
    tier off, and `host_gb: 0` turns every tier off (the host pool stages the others)."""

    host_gb: float = Field(1.0, ge=0, description="preallocated host DRAM tier per node, GiB")
    disk_gb: float = Field(4.0, ge=0, description="local disk tier per node (one checksummed file per block), GiB")
    disk_dir: Path | None = Field(None, description="where nodes keep disk-tier files (a folder per node); "
                                                    "None: $HALFMOON_CACHE/kv")
    store: bool = Field(True, description="the cluster tier on Mooncake Store, shared by every node")
    store_master: str | None = Field(
        None, description="host:port of a running mooncake_master every node reaches; None: the launcher "
        "starts one beside the conductor (loopback; `halfmoon up`: an actor on the conductor's Ray node)")
    store_metadata: str | None = Field(None, description="the master's HTTP metadata URL; None: "
                                                         "http://<master host>:<master port + 1>/metadata")
    store_gb: float = Field(1.0, gt=0, description="memory the store keeper beside a launcher-started master "
                                                   "mounts into the store, GiB")
    node_segment_gb: float = Field(0.0, ge=0, description="host memory each node also mounts into the store, "
                                                          "GiB (0: nodes are clients only)")
    policy: Literal["write_back", "write_through", "write_through_selective"] = Field(
        "write_back", description="when device blocks are copied down (engine/tiers/policy.py says why "
        "write_back is the default)")
    selective_hits: int = Field(2, ge=1, description="write_through_selective: copy a block down at this many hits")
    decode_write_back: bool = Field(True, description="a request finished on a decode node puts its prompt + "
                                                      "answer KV to the store, so the next turn hits it anywhere")

    @field_validator("store_master")
    @classmethod
    def _host_port(cls, value: str | None) -> str | None:
        if value is not None:
            host, _, port = value.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"must be host:port, got {value!r}")
        return value

    @model_validator(mode="after")
    def _host_stages(self) -> KVTiersConfig:
        if self.host_gb == 0 and (self.disk_gb > 0 or self.store):
            raise FieldProblem("host_gb", "must be > 0 when disk_gb > 0 or store is on: the host tier stages their "
                                          "blocks (set disk_gb: 0 and store: false to run without tiers)")
        return self

    def metadata_url(self) -> str | None:
        if self.store_metadata is not None or self.store_master is None:
            return self.store_metadata
        host, _, port = self.store_master.rpartition(":")
        return f"http://{host}:{int(port) + 1}/metadata"


class RayConfig(_Section):
    address: str | None = Field(
        None, description='the cluster `halfmoon up`/`down` join: GCS "host:port" or "auto" (None: auto); '
        "`halfmoon serve` always starts its own",
    )
    namespace: str = Field("halfmoon", min_length=1)


class ClusterConfig(_Section):
    model: ModelConfig = ModelConfig()
    layout: Literal["disaggregated", "colocated"] = Field(
        "disaggregated",
        description="colocated: one engine doing prefill and decode on each node",
    )
    prefill: NodeGroupConfig = NodeGroupConfig()
    decode: NodeGroupConfig = NodeGroupConfig()
    kv: KVConfig = KVConfig()
    kv_tiers: KVTiersConfig = KVTiersConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    conductor: ConductorConfig = ConductorConfig()
    transfer: TransferConfig = TransferConfig()
    failure: FailureConfig = FailureConfig()
    auth: AuthConfig = AuthConfig()
    ray: RayConfig = RayConfig()

    @model_validator(mode="after")
    def _cross_section(self) -> ClusterConfig:
        for role in ("prefill", "decode"):
            if self.group(role).count < 1:
                raise FieldProblem(f"{role}.count", f"a cluster needs at least one {role} node")
        if self.scheduler.prefill_chunk_size % self.kv.block_size:
            raise FieldProblem(
                "scheduler.prefill_chunk_size",
                f"{self.scheduler.prefill_chunk_size} must be a multiple of kv.block_size "
                f"({self.kv.block_size}) so every KV push is whole blocks",
            )
        if self.kv.num_blocks is not None and self.kv.num_blocks * self.kv.block_size < self.model.max_model_len:
            raise FieldProblem(
                "kv.num_blocks",
                f"{self.kv.num_blocks} blocks of {self.kv.block_size} tokens cannot hold one request "
                f"of model.max_model_len ({self.model.max_model_len}) tokens",
            )
        if self.failure.kv_lease_s <= self.transfer.timeout_s:
            raise FieldProblem(
                "failure.kv_lease_s",
                f"{self.failure.kv_lease_s} must exceed transfer.timeout_s ({self.transfer.timeout_s}), "
                "or blocks may be freed under a transfer that is still in time",
            )
        return self

    def group(self, role: Role) -> NodeGroupConfig:
        return self.prefill if role == "prefill" else self.decode

    def required_resources(self) -> dict[str, float]:
        """Everything the conductor and all nodes ask Ray for, summed (for an embedded cluster)."""
        total: dict[str, float] = {"CPU": self.conductor.num_cpus, "GPU": self.conductor.num_gpus}
        for name, qty in self.conductor.resources.items():
            total[name] = total.get(name, 0.0) + qty
        for group in (self.prefill, self.decode):
            total["CPU"] += group.count * group.num_cpus
            total["GPU"] += group.count * group.num_gpus
            for name, qty in group.resources.items():
                total[name] = total.get(name, 0.0) + group.count * qty
        return total

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


@dataclass(frozen=True, slots=True)
class ConfigProblem:
    field: str  # dotted path, "" when the whole document is wrong
    message: str


class ConfigError(ValueError):
    """A config file could not be read or does not validate; names the file and the fields."""

    def __init__(self, source: str, problems: list[ConfigProblem]) -> None:
        self.source = source
        self.problems = tuple(problems)
        lines = [f"{p.field}: {p.message}" if p.field else p.message for p in problems]
        super().__init__(f"{source}: invalid halfmoon config:\n  " + "\n  ".join(lines))


def _allowed_keys(loc: tuple[Any, ...]) -> list[str]:
    """The keys the section at `loc` accepts (loc ends with the unknown key)."""
    model: type[BaseModel] = ClusterConfig
    for part in loc[:-1]:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return []
        model = field.annotation
    return list(model.model_fields)


def _problems(err: ValidationError) -> list[ConfigProblem]:
    out = []
    for e in err.errors():
        loc = tuple(e["loc"])
        path = ".".join(str(p) for p in loc)
        if e["type"] == "extra_forbidden":
            allowed = _allowed_keys(loc)
            msg = "unknown key" + (f"; allowed: {', '.join(allowed)}" if allowed else "")
        elif isinstance(cause := e.get("ctx", {}).get("error"), FieldProblem):
            path = ".".join(p for p in (path, cause.field) if p)
            msg = cause.message
        else:
            msg = e["msg"].removeprefix("Value error, ")
            if e["type"] not in ("missing", "value_error") and isinstance(e.get("input"), (str, int, float, bool)):
                msg += f" (got {e['input']!r})"
        out.append(ConfigProblem(path, msg))
    return out


def parse_config(text: str, source: str = "<string>") -> ClusterConfig:
    """Validate YAML text; an empty document is the default config."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark is not None else source
        raise ConfigError(where, [ConfigProblem("", f"not valid YAML: {getattr(exc, 'problem', exc)}")]) from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(source, [ConfigProblem("", f"the top level must be a mapping, got {type(data).__name__}")])
    try:
        return ClusterConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(source, _problems(exc)) from None


def with_overrides(config: ClusterConfig, overrides: Mapping[str, object], source: str = "overrides") -> ClusterConfig:
    """`config` with values replaced by dotted path (`{"prefill.count": 2}`), validated again
    as a whole; a bad value raises `ConfigError` naming `source` and the field."""
    data = config.model_dump(mode="json")
    for path, value in overrides.items():
        *parents, key = path.split(".")
        section = data
        for i, part in enumerate(parents):
            if not isinstance(section.get(part), dict):
                raise ConfigError(source, [ConfigProblem(".".join(parents[: i + 1]), "not a config section")])
            section = section[part]
        if key not in section:
            raise ConfigError(source, [ConfigProblem(path, "unknown key")])
        section[key] = value
    try:
        return ClusterConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(source, _problems(exc)) from None


def load_config(path: str | Path) -> ClusterConfig:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(str(path), [ConfigProblem("", f"cannot read the file: {exc.strerror or exc}")]) from exc
    return parse_config(text, source=str(path))


def dump_config(config: ClusterConfig, path: str | Path) -> None:
    Path(path).write_text(config.to_yaml(), encoding="utf-8")
