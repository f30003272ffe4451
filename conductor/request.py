"""What the scheduling core knows about one request when it decides where it goes."""
from __future__ import annotations

from dataclasses import dataclass
from typing import NewType

BlockHash = NewType("BlockHash", int)  # 64-bit chained hash of one full KV block
NodeId = NewType("NodeId", str)


@dataclass(frozen=True, slots=True)
class RequestInfo:
    """A request as the scheduler sees it: lengths and the chained hashes of its prompt blocks.

    `block_hashes[i]` identifies the first `(i + 1) * block_tokens` prompt tokens (the cluster
    view says how many tokens a block holds), so equal leading hashes mean equal prefixes.
    `expected_output_tokens` is what the client asked for at most, or None when unknown;
    predictors then assume the typical length from the settings.
    """

    request_id: str
    input_tokens: int
    block_hashes: tuple[BlockHash, ...]
    expected_output_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.input_tokens < 1:
            raise ValueError(f"request {self.request_id}: input_tokens must be >= 1, got {self.input_tokens}")
