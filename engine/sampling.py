"""Sampling parameters (validated) and the sampler that turns logits into token ids."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from engine.errors import InvalidRequestError


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How to pick each next token and when to stop.

    temperature == 0 means greedy. `seed` makes a sampled request reproducible on its own,
    whatever else shares its batch.
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
        if not isinstance(self.max_tokens, int) or self.max_tokens <= 0:
            raise InvalidRequestError("max_tokens", f"must be a positive integer, got {self.max_tokens!r}")
        if not self.temperature >= 0.0:  # also catches NaN
            raise InvalidRequestError("temperature", f"must be >= 0, got {self.temperature!r}")
        if self.top_k < 0:
            raise InvalidRequestError("top_k", f"must be >= 0 (0 disables it), got {self.top_k!r}")
        if not (0.0 < self.top_p <= 1.0):
            raise InvalidRequestError("top_p", f"must be in (0, 1], got {self.top_p!r}")
        if any(not s for s in self.stop):
            raise InvalidRequestError("stop", "stop strings must be non-empty")
        if any(t < 0 for t in self.stop_token_ids):
            raise InvalidRequestError("stop_token_ids", "token ids must be >= 0")

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


def sample(logits: torch.Tensor, params: list[SamplingParams], states: list[SamplerState]) -> list[int]:
    """Pick one token per row of `logits` ([batch, vocab], float32)."""
    out: list[int] = []
    greedy_ids = torch.argmax(logits, dim=-1).tolist()
    for i, (p, st) in enumerate(zip(params, states)):
        if p.greedy:
            out.append(greedy_ids[i])
            continue
        row = logits[i].float() / p.temperature
        if p.top_k > 0 and p.top_k < row.numel():
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
            probs = probs / probs.sum()
        out.append(int(torch.multinomial(probs, 1, generator=st.generator).item()))
    return out
