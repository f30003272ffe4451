"""A request's state inside one engine: its tokens, its KV blocks, how far it is computed."""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Sequence

from engine.block_pool import chain_mismatch, hash_block
from engine.sampling import SamplerState, SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"  # queued; holds no blocks
    RUNNING = "running"  # holds blocks; prefilling (chunk by chunk) or decoding
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    STOP = "stop"  # EOS, a stop token id or a stop string
    LENGTH = "length"  # max_tokens or the context window
    ABORT = "abort"  # cancelled by the caller


def sample_id(request_id: str, index: int) -> str:
    """The engine's id of parallel sample `index` of `request_id` (sample 0 keeps the id)."""
    return request_id if index == 0 else f"{request_id}#{index}"


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float = field(default_factory=time.monotonic)
    output_token_ids: list[int] = field(default_factory=list)
    block_ids: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)  # hashes of computed full blocks, in order
    num_computed_tokens: int = 0  # tokens whose K/V are in this request's blocks
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache at admission
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: FinishReason | None = None
    hold_blocks: bool = False  # keep blocks after finishing until release() (prefill-node export)
    sampler: SamplerState = field(default_factory=SamplerState)
    text: str = ""  # generated text so far (stop strings are checked against it)
    num_preemptions: int = 0
    index: int = 0  # which of the request's `n` parallel samples this is (0: the one given the id)
    children: list["Request"] = field(default_factory=list)  # samples 1..n-1, once forked (`sample_id`)
    parent_id: str | None = None  # a sample 1..n-1: the id of sample 0
    num_forced_tokens: int = 0  # output tokens the grammar forced (fast-forward: no model step of their own)
    error: str | None = None  # why the engine ended it, when it did so on its own (a grammar failure)
    _hashes: list[int] = field(default_factory=list, repr=False)  # `chain_hashes`' memo

    def chain_hashes(self, block_size: int, blocks: int | None = None) -> list[int]:
        """Chained hashes of the first `blocks` full blocks of `all_token_ids` (all of them by
        default). Each is computed once per request: admission, the tiers' prefetch plan and
        the prefix cache share them, and blocks completed later extend the memo (tokens are
        only ever appended to a request). Returns a copy: callers may keep it."""
        memo = self._hashes
        full = self.num_tokens // block_size
        end = full if blocks is None or blocks > full else blocks
        if len(memo) < end:
            toks = self.all_token_ids
            parent = memo[-1] if memo else None
            for i in range(len(memo), end):
                parent = hash_block(parent, toks[i * block_size:(i + 1) * block_size])
                memo.append(parent)
        return memo[:end]

    def adopt_hashes(self, hashes: Sequence[int], block_size: int) -> str | None:
        """Start `chain_hashes`' memo from `hashes`, the chain of the prompt's full blocks
        computed elsewhere (the conductor hashes every prompt at intake), once they pass
        `block_pool.chain_mismatch`'s cheap check; returns why they were refused (then the
        memo is left to compute them here) or None."""
        why = chain_mismatch(hashes, self.prompt_token_ids, block_size)
        if why is None and not self._hashes:
            self._hashes = [int(h) for h in hashes]
        return why

    def share_hashes(self, other: "Request", block_size: int, blocks: int) -> None:
        """Start the memo from `other`'s first `blocks` hashes (a parallel sample forked from
        it: the same prompt), so the sample hashes none of them again."""
        if not self._hashes:
            self._hashes = other.chain_hashes(block_size, blocks)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_uncomputed(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_decoding(self) -> bool:
        """Only the last sampled token is missing from the cache."""
        return self.num_computed_tokens > 0 and self.num_uncomputed == 1 and bool(self.output_token_ids)

    @property
    def finished(self) -> bool:
        return self.status is RequestStatus.FINISHED
