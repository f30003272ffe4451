"""Log-probabilities of sampled tokens, OpenAI's `logprobs` / `top_logprobs`.

They are the log-softmax of the model's raw logits for the position: before the grammar
mask, logit_bias, the penalties and the temperature (as vLLM's default `raw_logprobs`, and
as OpenAI reports the model's own distribution). A token the grammar forced is sampled like
any other when logprobs are asked for (fast-forward is off for such a request), so every
output token has its logprob.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

MAX_TOP_LOGPROBS = 20


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # the `k` most likely tokens, most likely first


def log_softmax(raw_logits: torch.Tensor) -> torch.Tensor:
    """One row's log-probabilities, in float32."""
    return torch.log_softmax(raw_logits.to(torch.float32), dim=-1)


def token_logprob(logprobs: torch.Tensor, token: int, k: int) -> TokenLogprob:
    """`token`'s entry of a log-softmax row and the row's top `k` (0: none)."""
    top: tuple[tuple[int, float], ...] = ()
    if k > 0:
        values, ids = torch.topk(logprobs, min(k, logprobs.numel()))
        top = tuple(zip(ids.tolist(), values.tolist()))
    return TokenLogprob(token, float(logprobs[token]), top)
