"""Sampling parameters (validated) and the sampler that turns logits into token ids."""
from __future__ import annotations

import struct
from dataclasses import dataclass, field

import torch

from engine.errors import InvalidRequestError


# Bounds every layer checks (`SamplingParams.validate`), chosen so that every accepted value
# survives the wire unchanged in meaning: the gRPC `SamplingParams` carries max_tokens, top_k
# and stop_token_ids as int32, seed as int64, temperature and top_p as float32.
#
# MAX_TEMPERATURE: above ~100 the softmax of a real model's logits (a spread of a few tens) is
# uniform to within a few percent, so a larger value (1e30, inf) is a client's mistake, not a
# setting. OpenAI's limit of 2 is stricter than some clients send; vLLM sets none.
MAX_TEMPERATURE = 100.0
INT32_MAX = 2**31 - 1
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def show_value(v: object) -> str:
    """A `repr` for error messages that stays short and cannot fail (str() of an int over 4,300 digits raises)."""
    if _is_int(v) and not -(10**30) < v < 10**30:
        return f"an integer of {v.bit_length()} bits"
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def _as_float32(x: float) -> float:
    return struct.unpack("<f", struct.pack("<f", x))[0]


def _int_in(field: str, v: object, lo: int, hi: int, what: str) -> None:
    if not _is_int(v) or not lo <= v <= hi:
        raise InvalidRequestError(field, f"must be {what}, got {show_value(v)}")


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How to pick each next token and when to stop.

    temperature == 0 means greedy; any positive temperature up to `MAX_TEMPERATURE` is
    honoured (a tiny one tends to greedy: 1e-40 picks the argmax). `seed` makes a sampled
    request reproducible on its own, whatever else shares its batch.
    """

    max_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    def validate(self) -> None:
        """Raise `InvalidRequestError` naming the first bad field; never anything else,
        whatever the fields hold (wrong types, NaN, integers of any size)."""
        _int_in("max_tokens", self.max_tokens, 1, INT32_MAX, f"an integer in [1, {INT32_MAX}]")
        t = self.temperature
        if not _is_real(t) or not 0 <= t <= MAX_TEMPERATURE:  # also refuses NaN and inf
            raise InvalidRequestError("temperature", f"must be a number in [0, {MAX_TEMPERATURE:g}], got {show_value(t)}")
        _int_in("top_k", self.top_k, 0, INT32_MAX, f"an integer in [0, {INT32_MAX}] (0 disables it)")
        p = self.top_p
        if not _is_real(p) or not 0 < p <= 1:
            raise InvalidRequestError("top_p", f"must be in (0, 1], got {show_value(p)}")
        if _as_float32(float(p)) == 0.0:
            raise InvalidRequestError("top_p", f"must be in (0, 1], got {show_value(p)}, which is 0 in the float32 "
                                               "the cluster carries it in (the smallest is about 1.4e-45)")
        if self.seed is not None:
            _int_in("seed", self.seed, INT64_MIN, INT64_MAX, "a 64-bit signed integer")
        if not isinstance(self.stop, (tuple, list)) or not all(isinstance(s, str) for s in self.stop):
            raise InvalidRequestError("stop", f"must be a list of strings, got {show_value(self.stop)}")
        for s in self.stop:
            if not s:
                raise InvalidRequestError("stop", "stop strings must be non-empty")
            try:
                s.encode("utf-8")
            except UnicodeEncodeError:
                raise InvalidRequestError("stop", f"{show_value(s)} is not valid Unicode (a lone surrogate)") from None
        if not isinstance(self.stop_token_ids, (tuple, list)):
            raise InvalidRequestError("stop_token_ids", f"must be a list of integers, got {show_value(self.stop_token_ids)}")
        for tid in self.stop_token_ids:
            _int_in("stop_token_ids", tid, 0, INT32_MAX, f"token ids in [0, {INT32_MAX}]")
        if not isinstance(self.ignore_eos, bool):
            raise InvalidRequestError("ignore_eos", f"must be true or false, got {show_value(self.ignore_eos)}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(slots=True)
class SamplerState:
    """Per-request random state (one generator per seeded request)."""

    generator: torch.Generator | None = field(default=None)

    @classmethod
    def for_params(cls, params: SamplingParams) -> "SamplerState":
        if params.greedy:
            return cls(None)
        gen = torch.Generator()
        gen.manual_seed(params.seed if params.seed is not None else int(torch.randint(0, 2**62, (1,)).item()))
        return cls(gen)


def _finite_logits(logits: torch.Tensor) -> torch.Tensor:
    """Logits every row of which has a finite maximum, picking what the row meant: NaN
    entries are never picked, a row with +inf entries picks among those alone, and a row
    with nothing else left (all -inf or NaN) is uniform."""
    neg = float("-inf")
    x = torch.where(torch.isnan(logits), neg, logits)
    pos = torch.isposinf(x)
    x = torch.where(pos.any(-1, keepdim=True), torch.where(pos, 0.0, neg), x)
    return torch.where(torch.isneginf(x).all(-1, keepdim=True), 0.0, x)


def sample(logits: torch.Tensor, params: list[SamplingParams], states: list[SamplerState]) -> list[int]:
    """Pick one token per row of `logits` ([batch, vocab]). Safe for every value
    `SamplingParams.validate` accepts and for any logits, inf and NaN included: the row's
    maximum is subtracted before dividing by the temperature (every scaled logit is <= 0, the
    best is 0, so nothing overflows however small the temperature) and the sampled rows are
    computed in float64, so the probabilities are finite and sum to at least 1."""
    if not bool(torch.isfinite(logits).all()):
        logits = _finite_logits(logits)
    out: list[int] = []
    greedy_ids = torch.argmax(logits, dim=-1).tolist()
    for i, (p, st) in enumerate(zip(params, states)):
        if p.greedy:
            out.append(greedy_ids[i])
            continue
        row = logits[i].to("cpu", torch.float64)
        row = (row - row.max()) / p.temperature
        if 0 < p.top_k < row.numel():
            kth = torch.topk(row, p.top_k).values[-1]
            row = row.masked_fill(row < kth, float("-inf"))
        probs = torch.softmax(row, dim=-1)
        if p.top_p < 1.0:
            sorted_p, idx = torch.sort(probs, descending=True)
            cum = torch.cumsum(sorted_p, dim=-1)
            # keep the smallest set whose mass reaches top_p (always keep the first)
            drop = (cum - sorted_p) >= p.top_p
            sorted_p = sorted_p.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter_(0, idx, sorted_p)
        out.append(int(torch.multinomial(probs, 1, generator=st.generator).item()))
    return out
