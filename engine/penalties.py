"""logit_bias and the repetition penalties, applied to one request's logits row.

Order, as vLLM applies them (after the grammar mask, before the temperature):
1. `logit_bias`: the given value is added to each listed token's logit (OpenAI: -100..100);
2. `repetition_penalty` r (HF / vLLM; 1 = off), over every token of the prompt and the output:
   a positive logit is divided by r, a negative one multiplied by r;
3. `frequency_penalty` f and `presence_penalty` p (OpenAI; 0 = off), over the output tokens:
   logit -= f * count(token) + p * (count(token) > 0).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(slots=True)
class LogitAdjustments:
    vocab_size: int
    presence: float = 0.0
    frequency: float = 0.0
    repetition: float = 1.0
    bias_ids: torch.Tensor | None = None  # long [k]
    bias_values: torch.Tensor | None = None  # float64 [k]
    counts: torch.Tensor | None = None  # float64 [vocab]: output token counts (presence / frequency)
    seen: torch.Tensor | None = None  # bool [vocab]: prompt and output tokens (repetition)

    @classmethod
    def create(cls, vocab_size: int, *, presence: float = 0.0, frequency: float = 0.0, repetition: float = 1.0,
               logit_bias: tuple[tuple[int, float], ...] = (), prompt: list[int] | tuple[int, ...] = ()
               ) -> "LogitAdjustments | None":
        """None when nothing is to be adjusted."""
        if presence == 0 and frequency == 0 and repetition == 1 and not logit_bias:
            return None
        adj = cls(vocab_size, float(presence), float(frequency), float(repetition))
        if logit_bias:
            adj.bias_ids = torch.tensor([t for t, _ in logit_bias], dtype=torch.long)
            adj.bias_values = torch.tensor([float(v) for _, v in logit_bias], dtype=torch.float64)
        if presence or frequency:
            adj.counts = torch.zeros(vocab_size, dtype=torch.float64)
        if repetition != 1:
            adj.seen = torch.zeros(vocab_size, dtype=torch.bool)
            if prompt:
                adj.seen[torch.tensor(list(prompt), dtype=torch.long)] = True
        return adj

    def copy(self) -> "LogitAdjustments":
        return LogitAdjustments(self.vocab_size, self.presence, self.frequency, self.repetition, self.bias_ids,
                                self.bias_values, None if self.counts is None else self.counts.clone(),
                                None if self.seen is None else self.seen.clone())

    def accept(self, token: int) -> None:
        """`token` joined the output."""
        if not 0 <= token < self.vocab_size:
            return
        if self.counts is not None:
            self.counts[token] += 1
        if self.seen is not None:
            self.seen[token] = True

    def apply(self, row: torch.Tensor) -> torch.Tensor:
        """The adjusted row (float64, a new tensor)."""
        row = row.to(torch.float64, copy=True)
        n = min(row.numel(), self.vocab_size)
        if self.bias_ids is not None:
            row.index_add_(0, self.bias_ids, self.bias_values)
        if self.seen is not None:
            part = row[:n]
            penalized = torch.where(part > 0, part / self.repetition, part * self.repetition)
            row[:n] = torch.where(self.seen[:n], penalized, part)
        if self.counts is not None:
            c = self.counts[:n]
            row[:n] -= self.frequency * c + self.presence * (c > 0).to(torch.float64)
        return row
