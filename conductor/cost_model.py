"""Latency predictors: prefill time, decode step time and KV transfer time.

One `CostModel` feeds the conductor's predictions and drives the simulator's instances,
so a prediction and the thing it predicts come from the same formulas:

    prefill_s(n, p)      = c_nn·n² + c_np·n·p + c_n·n + c_p·p + c_1
                           n = prompt tokens, p = cached prefix tokens that are reused
    decode_step_s(b, T)  = s_1 + s_b·b + s_t·T
                           b = requests in the running batch, T = KV tokens they hold
    network_s(k)         = k · kv_bytes_per_token / network_bytes_per_s
    local_load_s(k)      = k · kv_bytes_per_token / host_to_device_bytes_per_s
    tier_load_s(t, k)    = k · kv_bytes_per_token / tier_bytes_per_s[t] (+ local_load_s(k) below host)
                           t = host | disk | cluster: a prefix hit on a tier under the device

`fit_prefill` / `fit_decode` fit the coefficients by least squares from profiling
samples; `tier_rates` turns measured tier loads (`TierTiming`, what `halfmoon profile`
times through the real tier code) into `tier_bytes_per_s`; `CostModel.save` /
`CostModel.load` keep a model as JSON (what `halfmoon profile` writes and the conductor
reads). `gpu_class_default()` is the sourced GPU-class model.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Sequence

import numpy as np

from conductor.errors import CostModelError

SCHEMA = "halfmoon.cost_model/1"


@dataclass(frozen=True, slots=True)
class PrefillModel:
    """Seconds to prefill `n` prompt tokens of which the first `p` are reused from cache."""

    c_nn: float
    c_np: float
    c_n: float
    c_p: float
    c_1: float

    def seconds(self, n: int, p: int = 0) -> float:
        value = n * (self.c_nn * n + self.c_np * p + self.c_n) + self.c_p * p + self.c_1
        return value if value > 0.0 else 0.0


@dataclass(frozen=True, slots=True)
class DecodeModel:
    """Seconds of one continuous-batching decode step."""

    s_1: float
    s_b: float
    s_t: float

    def step_seconds(self, batch: float, tokens: float) -> float:
        value = self.s_1 + self.s_b * batch + self.s_t * tokens
        return value if value > 0.0 else 0.0


@dataclass(frozen=True, slots=True)
class TransferModel:
    """Moving KV: between nodes over the network, and from host memory onto the device.

    `host_to_device_bytes_per_s` None means a locally cached prefix is free to reuse
    (CPU engines keep it where they compute).
    """

    kv_bytes_per_token: float
    network_bytes_per_s: float
    host_to_device_bytes_per_s: float | None = None
    # KV tiers under the device (engine/tiers): bytes/s a block loads at from each into host
    # memory ("host" is the host -> device copy itself); a tier left out cannot be loaded from
    tier_bytes_per_s: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class FitReport:
    """How well a least-squares fit explains its samples."""

    samples: int
    rmse_s: float
    r2: float
    max_abs_error_s: float


@dataclass(frozen=True, slots=True)
class TierTiming:
    """Blocks loaded from one KV tier, timed: `host` is the host pool -> device copy (the
    promotion at admission), `disk` and `cluster` the load into the host pool that comes
    before it (checksum checked). `block_bytes` is the KV payload of one block, so
    `bytes_per_s` is the rate `tier_load_s` prices tokens at."""

    tier: str
    blocks: int
    block_bytes: int
    seconds_per_block: float

    @property
    def bytes_per_s(self) -> float:
        return self.block_bytes / self.seconds_per_block


def tier_rates(timings: Sequence[TierTiming]) -> dict[str, float]:
    """`TransferModel.tier_bytes_per_s` from measured loads (a tier with no block loaded has no rate)."""
    return {t.tier: t.bytes_per_s for t in timings if t.blocks > 0 and t.seconds_per_block > 0}


@dataclass(frozen=True, slots=True)
class PrefillSample:
    input_tokens: int
    cached_tokens: int
    seconds: float


@dataclass(frozen=True, slots=True)
class DecodeSample:
    batch: int
    tokens: int
    seconds: float


@dataclass(frozen=True, slots=True)
class CostModel:
    prefill: PrefillModel
    decode: DecodeModel
    transfer: TransferModel
    description: str = ""
    prefill_fit: FitReport | None = None
    decode_fit: FitReport | None = None
    tier_timings: tuple[TierTiming, ...] = ()  # the measurements behind transfer.tier_bytes_per_s

    def __post_init__(self) -> None:
        t = self.transfer
        if not t.kv_bytes_per_token > 0 or not t.network_bytes_per_s > 0:
            raise CostModelError("transfer: kv_bytes_per_token and network_bytes_per_s must be > 0")
        if t.host_to_device_bytes_per_s is not None and not t.host_to_device_bytes_per_s > 0:
            raise CostModelError("transfer: host_to_device_bytes_per_s must be > 0 or null")
        for tier, rate in t.tier_bytes_per_s.items():
            if tier not in ("host", "disk", "cluster") or not rate > 0:
                raise CostModelError(f"transfer.tier_bytes_per_s: {tier!r} must be host, disk or cluster "
                                     f"with a rate > 0, got {rate}")
        values = [*asdict(self.prefill).values(), *asdict(self.decode).values()]
        if not all(math.isfinite(v) for v in values):
            raise CostModelError("prefill/decode coefficients must be finite numbers")

    # -- predictions -------------------------------------------------------------------
    def prefill_s(self, input_tokens: int, cached_tokens: int = 0) -> float:
        return self.prefill.seconds(input_tokens, cached_tokens)

    def decode_step_s(self, batch: float, tokens: float) -> float:
        """One decode step of `batch` rows over `tokens` context tokens (means allowed: linear)."""
        return self.decode.step_seconds(batch, tokens)

    def decode_tokens_per_s(self, context_tokens: float, tbt_slo_s: float, kv_capacity_tokens: int,
                            slo_fraction: float = 0.8) -> float:
        """Tokens/s one decode node generates for requests of `context_tokens` each, at the
        largest batch whose step stays within `slo_fraction` × the TBT SLO and whose KV fits."""
        m = self.decode
        per_seq = m.s_b + m.s_t * context_tokens
        budget = slo_fraction * tbt_slo_s - m.s_1
        batch = budget / per_seq if per_seq > 0 else float("inf")
        batch = min(batch, kv_capacity_tokens / max(1.0, context_tokens))
        batch = max(1.0, batch)
        return batch / self.decode_step_s(int(batch), int(batch * context_tokens))

    def network_s(self, tokens: int) -> float:
        """Seconds to send `tokens` tokens of KV between two nodes."""
        return tokens * self.transfer.kv_bytes_per_token / self.transfer.network_bytes_per_s

    def local_load_s(self, tokens: int) -> float:
        """Seconds to bring `tokens` tokens of a locally cached prefix onto the device."""
        h2d = self.transfer.host_to_device_bytes_per_s
        return 0.0 if h2d is None else tokens * self.transfer.kv_bytes_per_token / h2d

    def tier_load_s(self, tier: str, tokens: int) -> float:
        """Seconds to bring `tokens` tokens of a prefix from KV tier `tier` (host, disk,
        cluster) onto the device: disk and cluster blocks are staged in host memory first.
        Infinite for a tier the model has no figure for (score the hit as a miss)."""
        t = self.transfer
        if tier == "host":
            rate = t.tier_bytes_per_s.get("host", t.host_to_device_bytes_per_s)
            return 0.0 if rate is None else tokens * t.kv_bytes_per_token / rate
        rate = t.tier_bytes_per_s.get(tier)
        if rate is None:
            return math.inf
        return tokens * t.kv_bytes_per_token / rate + self.tier_load_s("host", tokens)

    # -- persistence -------------------------------------------------------------------
    def to_dict(self) -> dict[str, object]:
        return {
            "schema": SCHEMA,
            "description": self.description,
            "prefill": asdict(self.prefill),
            "decode": asdict(self.decode),
            "transfer": asdict(self.transfer),
            "fit": {
                "prefill": None if self.prefill_fit is None else asdict(self.prefill_fit),
                "decode": None if self.decode_fit is None else asdict(self.decode_fit),
                "tiers": [{**asdict(t), "bytes_per_s": t.bytes_per_s} for t in self.tier_timings],
            },
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str, *, origin: str = "cost model") -> CostModel:
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise CostModelError(f"{origin}: not JSON ({exc.msg})") from exc
        if not isinstance(raw, dict) or raw.get("schema") != SCHEMA:
            raise CostModelError(f"{origin}: expected a JSON object with schema {SCHEMA!r}")
        try:
            fit = raw.get("fit") or {}
            return cls(
                prefill=PrefillModel(**_floats(raw["prefill"], PrefillModel)),
                decode=DecodeModel(**_floats(raw["decode"], DecodeModel)),
                transfer=TransferModel(**raw["transfer"]),
                description=str(raw.get("description", "")),
                prefill_fit=FitReport(**fit["prefill"]) if fit.get("prefill") else None,
                decode_fit=FitReport(**fit["decode"]) if fit.get("decode") else None,
                tier_timings=tuple(TierTiming(t["tier"], int(t["blocks"]), int(t["block_bytes"]),
                                              float(t["seconds_per_block"])) for t in fit.get("tiers") or ()),
            )
        except (KeyError, TypeError) as exc:
            raise CostModelError(f"{origin}: malformed ({exc})") from exc

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json() + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> CostModel:
        path = Path(path)
        if not path.is_file():
            raise CostModelError(f"cost model file not found: {path} (write one with `halfmoon profile`)")
        return cls.from_json(path.read_text(encoding="utf-8"), origin=str(path))

    @classmethod
    def fit(
        cls,
        prefill_samples: Sequence[PrefillSample],
        decode_samples: Sequence[DecodeSample],
        transfer: TransferModel,
        description: str = "",
    ) -> CostModel:
        prefill, prefill_fit = fit_prefill(prefill_samples)
        decode, decode_fit = fit_decode(decode_samples)
        return cls(prefill, decode, transfer, description, prefill_fit, decode_fit)


def _floats(raw: object, kind: type) -> dict[str, float]:
    if not isinstance(raw, dict):
        raise TypeError(f"{kind.__name__} must be an object")
    return {f.name: float(raw[f.name]) for f in fields(kind)}


def _least_squares(columns: np.ndarray, target: np.ndarray, what: str) -> tuple[np.ndarray, FitReport]:
    """Fit target ≈ columns @ coef; columns are scaled first so n² and 1 can share a fit."""
    rows, terms = columns.shape
    if rows < terms:
        raise CostModelError(f"{what}: need at least {terms} samples, got {rows}")
    scale = np.abs(columns).max(axis=0)
    scale[scale == 0] = 1.0
    scaled = columns / scale
    coef, _, rank, _ = np.linalg.lstsq(scaled, target, rcond=None)
    if rank < terms:
        raise CostModelError(
            f"{what}: samples do not separate the {terms} terms (rank {rank}); vary every input"
        )
    coef = coef / scale
    residual = target - columns @ coef
    total = float(((target - target.mean()) ** 2).sum())
    report = FitReport(
        samples=rows,
        rmse_s=float(np.sqrt((residual**2).mean())),
        r2=1.0 - float((residual**2).sum()) / total if total > 0 else 1.0,
        max_abs_error_s=float(np.abs(residual).max()),
    )
    return coef, report


def fit_prefill(samples: Sequence[PrefillSample]) -> tuple[PrefillModel, FitReport]:
    """Least-squares fit of `PrefillModel` on terms n², n·p, n, p, 1."""
    n = np.array([s.input_tokens for s in samples], dtype=np.float64)
    p = np.array([s.cached_tokens for s in samples], dtype=np.float64)
    y = np.array([s.seconds for s in samples], dtype=np.float64)
    if np.any(p > n) or np.any(n <= 0):
        raise CostModelError("prefill samples need 0 <= cached_tokens <= input_tokens and input_tokens > 0")
    columns = np.stack([n * n, n * p, n, p, np.ones_like(n)], axis=1)
    coef, report = _least_squares(columns, y, "prefill fit")
    return PrefillModel(*map(float, coef)), report


def fit_decode(samples: Sequence[DecodeSample]) -> tuple[DecodeModel, FitReport]:
    """Least-squares fit of `DecodeModel` on terms 1, batch size, tokens in flight."""
    b = np.array([s.batch for s in samples], dtype=np.float64)
    t = np.array([s.tokens for s in samples], dtype=np.float64)
    y = np.array([s.seconds for s in samples], dtype=np.float64)
    columns = np.stack([np.ones_like(b), b, t], axis=1)
    coef, report = _least_squares(columns, y, "decode fit")
    return DecodeModel(*map(float, coef)), report


# ---------------------------------------------------------------------------------------
# The sourced GPU-class default: LLaMA3-70B on one 8×A800 node (Mooncake FAST'25, Eq. 1 and
# Table 1), as summarised in DESIGN.md §4.
LAYERS = 80  # l
HIDDEN = 8192  # d
ATTN_FLOPS_COEF = 4  # a: attention FLOPs per layer = a·n²·d
LINEAR_FLOPS_COEF = 22  # b: projection/MLP FLOPs per layer = b·n·d²
GPUS = 8
PEAK_BF16_FLOPS = 312e12  # per A800/A100 GPU, dense bf16
UTILIZATION = 0.5  # fraction of peak FLOPs we assume prefill achieves
KV_BYTES_PER_TOKEN = LAYERS * 2 * (HIDDEN // 8) * 2  # l · (K,V) · d/gqa · 2 B = 320 KiB
NIC_BYTES_PER_S = 800e9 / 8  # 800 Gbps RDMA per node, line rate
HOST_TO_DEVICE_BYTES_PER_S = 128e9  # PCIe host-to-device per node, line rate
NVME_BYTES_PER_S = 7e9  # one PCIe 4.0 x4 NVMe SSD, sequential read (vendor data sheets: ~7 GB/s)
PARAMS = 70.6e9  # LLaMA3-70B parameters (bf16: 2 B each)
HBM_BYTES_PER_S = 2.039e12  # per A800 80GB SXM GPU
MEMORY_UTILIZATION = 0.5  # fraction of HBM bandwidth a decode step achieves (TP all-reduce, launch gaps)
# n² − p² (causal attention of the new tokens) expressed in the design's basis {n², n·p}:
# the least-squares projection over p ∈ [0, n] that stays exact at p = 0 is n² − 0.75·n·p.
_ATTN_NP_PROJECTION = -0.75


def gpu_class_default() -> CostModel:
    """LLaMA3-70B on 8×A800 at 50% of peak bf16 FLOPs (prefill) and 50% of HBM bandwidth (decode).

    Prefill: l·(a·(n² − p²)·d + b·(n − p)·d²) FLOPs at G = 8 × 312 TFLOPS × 0.5, which is
    1.44 s for a 12k-token prompt; decode step: read 141 GB of weights plus 320 KiB per token
    in flight at 8 × 2.039 TB/s × 0.5 (17.3 ms + 40 ns/token), plus 2·params FLOPs per batched
    sequence (0.11 ms); KV moves at 800 Gbps between nodes and 128 GB/s host-to-device.
    """
    flops_per_s = GPUS * PEAK_BF16_FLOPS * UTILIZATION
    k_attn = LAYERS * ATTN_FLOPS_COEF * HIDDEN / flops_per_s
    k_lin = LAYERS * LINEAR_FLOPS_COEF * HIDDEN * HIDDEN / flops_per_s
    hbm = GPUS * HBM_BYTES_PER_S * MEMORY_UTILIZATION
    return CostModel(
        prefill=PrefillModel(c_nn=k_attn, c_np=_ATTN_NP_PROJECTION * k_attn, c_n=k_lin, c_p=-k_lin, c_1=0.0),
        decode=DecodeModel(s_1=2 * PARAMS / hbm, s_b=2 * PARAMS / flops_per_s, s_t=KV_BYTES_PER_TOKEN / hbm),
        transfer=TransferModel(
            kv_bytes_per_token=KV_BYTES_PER_TOKEN,
            network_bytes_per_s=NIC_BYTES_PER_S,
            host_to_device_bytes_per_s=HOST_TO_DEVICE_BYTES_PER_S,
            # the cluster store (Mooncake Store) reads peers' DRAM over the same 800 Gbps RDMA NIC
            tier_bytes_per_s={"host": HOST_TO_DEVICE_BYTES_PER_S, "disk": NVME_BYTES_PER_S,
                              "cluster": NIC_BYTES_PER_S},
        ),
        description=(
            "GPU-class default: LLaMA3-70B on 8xA800 (Mooncake FAST'25 Eq. 1, Table 1); "
            "prefill at 50% of 8x312 TFLOPS, decode at 50% of 8x2.039 TB/s HBM"
        ),
    )
