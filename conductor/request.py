"""What the scheduling core knows about one request when it decides where it goes."""
from __future__ import annotations

from dataclasses import dataclass
from typing import NewType

BlockHash = NewType("BlockHash", int)  # 64-bit chained hash of one full KV block
NodeId = NewType("NodeId", str)


@dataclass(frozen=True, slots=True, init=False)
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

    # Written out (the fields, in order): a compiled dataclass's generated __init__ runs
    # interpreted. tests/bench/test_record_inits.py holds it to the fields.
    def __init__(self, request_id: str, input_tokens: int, block_hashes: tuple[BlockHash, ...],
                 expected_output_tokens: int | None = None) -> None:
        object.__setattr__(self, "request_id", request_id)
        object.__setattr__(self, "input_tokens", input_tokens)
        object.__setattr__(self, "block_hashes", block_hashes)
        object.__setattr__(self, "expected_output_tokens", expected_output_tokens)
        self.__post_init__()

    def __post_init__(self) -> None:
        if self.input_tokens < 1:
            raise ValueError(f"request {self.request_id}: input_tokens must be >= 1, got {self.input_tokens}")
