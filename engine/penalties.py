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

import numpy as np


@dataclass(slots=True)
class LogitAdjustments:
    vocab_size: int
    presence: float = 0.0
    frequency: float = 0.0
    repetition: float = 1.0
    bias_ids: np.ndarray | None = None  # int64 [k]
    bias_values: np.ndarray | None = None  # float64 [k]
    counts: np.ndarray | None = None  # float64 [vocab]: output token counts (presence / frequency)
    seen: np.ndarray | None = None  # bool [vocab]: prompt and output tokens (repetition)

    @classmethod
    def create(cls, vocab_size: int, *, presence: float = 0.0, frequency: float = 0.0, repetition: float = 1.0,
               logit_bias: tuple[tuple[int, float], ...] = (), prompt: list[int] | tuple[int, ...] = ()
               ) -> "LogitAdjustments | None":
        """None when nothing is to be adjusted."""
        if presence == 0 and frequency == 0 and repetition == 1 and not logit_bias:
            return None
        adj = cls(vocab_size, float(presence), float(frequency), float(repetition))
        if logit_bias:
            adj.bias_ids = np.array([t for t, _ in logit_bias], dtype=np.int64)
            adj.bias_values = np.array([float(v) for _, v in logit_bias], dtype=np.float64)
        if presence or frequency:
            adj.counts = np.zeros(vocab_size, dtype=np.float64)
        if repetition != 1:
            adj.seen = np.zeros(vocab_size, dtype=bool)
            if prompt:
                adj.seen[np.array(list(prompt), dtype=np.int64)] = True
        return adj

    def copy(self) -> "LogitAdjustments":
        return LogitAdjustments(self.vocab_size, self.presence, self.frequency, self.repetition, self.bias_ids,
                                self.bias_values, None if self.counts is None else self.counts.copy(),
                                None if self.seen is None else self.seen.copy())

    def accept(self, token: int) -> None:
        """`token` joined the output."""
        if not 0 <= token < self.vocab_size:
            return
        if self.counts is not None:
            self.counts[token] += 1
        if self.seen is not None:
            self.seen[token] = True

    def apply(self, row: np.ndarray) -> np.ndarray:
        """The adjusted row (float64, a new array)."""
        row = np.array(row, dtype=np.float64)
        n = min(row.size, self.vocab_size)
        if self.bias_ids is not None:
            np.add.at(row, self.bias_ids, self.bias_values)
        if self.seen is not None:
            part = row[:n]
            with np.errstate(invalid="ignore"):
                penalized = np.where(part > 0, part / self.repetition, part * self.repetition)
            row[:n] = np.where(self.seen[:n], penalized, part)
        if self.counts is not None:
            c = self.counts[:n]
            row[:n] -= self.frequency * c + self.presence * (c > 0)
        return row
