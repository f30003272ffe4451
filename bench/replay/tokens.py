"""Deterministic, prefix-preserving token ids for trace hash ids.

A trace names each prompt block by a chained hash id. The replayer turns each id into
``block_tokens`` token ids drawn from ``[token_low, vocab_size)`` by keyed BLAKE2b of
the id, so the same id always gives the same tokens (on any machine, in any process),
and a prompt is the concatenation of its blocks' tokens cut to the scaled prompt
length. Requests whose hash ids share a leading run therefore share that many blocks of
prompt tokens, which is what a prefix cache needs to see.

``seed`` keys the hash: two mappers with different seeds give unrelated tokens, which
lets a rate sweep start every run with a cold prefix cache.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

_DIGEST_BYTES = 64  # BLAKE2b's largest digest: 16 draws of 4 bytes per call
_DRAW_BYTES = 4


@dataclass(frozen=True, slots=True)
class TokenSpace:
    """The range token ids are drawn from: ``[token_low, vocab_size)``.

    ``token_low`` keeps ids clear of a tokenizer's special tokens (BOS, EOS, chat
    markers), which sit at the low end of Llama-family vocabularies.
    """

    vocab_size: int = 49_152  # SmolLM2's vocabulary
    token_low: int = 100

    def __post_init__(self) -> None:
        if self.token_low < 0:
            raise ValueError(f"token_low must be >= 0, got {self.token_low}")
        if self.vocab_size <= self.token_low:
            raise ValueError(
                f"vocab_size ({self.vocab_size}) must exceed token_low ({self.token_low})"
            )

    @property
    def span(self) -> int:
        return self.vocab_size - self.token_low


class TokenMapper:
    """Maps trace hash ids to token ids; memoizes each id's block."""

    def __init__(self, block_tokens: int, space: TokenSpace | None = None, seed: int = 0) -> None:
        if block_tokens < 1:
            raise ValueError(f"block_tokens must be >= 1, got {block_tokens}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.block_tokens = block_tokens
        self.space = space or TokenSpace()
        self.seed = seed
        self._key = seed.to_bytes(16, "little")
        self._blocks: dict[int, tuple[int, ...]] = {}

    def block(self, hash_id: int) -> tuple[int, ...]:
        """The ``block_tokens`` token ids standing for one trace block."""
        cached = self._blocks.get(hash_id)
        if cached is None:
            cached = self._draw(hash_id)
            self._blocks[hash_id] = cached
        return cached

    def prompt(self, hash_ids: Sequence[int], length: int) -> list[int]:
        """The prompt for a request: its blocks' tokens concatenated, cut to ``length``.

        Every hash id must contribute at least one token, so ``length`` lies in
        ``((len(hash_ids) - 1) * block_tokens, len(hash_ids) * block_tokens]``.
        """
        lowest = (len(hash_ids) - 1) * self.block_tokens + 1
        highest = len(hash_ids) * self.block_tokens
        if not hash_ids or not lowest <= length <= highest:
            raise ValueError(
                f"a prompt of {len(hash_ids)} block(s) of {self.block_tokens} tokens must be "
                f"{max(lowest, 1)}..{highest} tokens long, got {length}"
            )
        tokens: list[int] = []
        for hash_id in hash_ids:
            tokens.extend(self.block(hash_id))
        del tokens[length:]
        return tokens

    def _draw(self, hash_id: int) -> tuple[int, ...]:
        if hash_id < 0:
            raise ValueError(f"hash ids are non-negative, got {hash_id}")
        ident = hash_id.to_bytes(16, "little")
        span, low = self.space.span, self.space.token_low
        tokens: list[int] = []
        counter = 0
        while len(tokens) < self.block_tokens:
            digest = hashlib.blake2b(
                ident + counter.to_bytes(4, "little"), digest_size=_DIGEST_BYTES, key=self._key
            ).digest()
            for offset in range(0, _DIGEST_BYTES, _DRAW_BYTES):
                draw = int.from_bytes(digest[offset : offset + _DRAW_BYTES], "little")
                tokens.append(low + draw % span)
            counter += 1
        return tuple(tokens[: self.block_tokens])
