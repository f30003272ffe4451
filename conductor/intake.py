"""Request intake: a client's request checked, templated, tokenized and block-hashed, with
the CPU-heavy part off the event loop.

The conductor's gRPC and HTTP front doors, its node heartbeats and every stream in flight
share one asyncio loop, so a big request must not hold it: `prepare` runs the work on a
small thread pool unless the input is small enough to take a few milliseconds
(`INLINE_MAX`). The tokenizer releases the GIL while it encodes; the chat template and the
hashing are plain Python, which yields the GIL every few milliseconds and only ever sees
input bounded first (the front doors' byte limit, then the character cap below).

What is refused (`InvalidRequestError` naming the field), cheapest check first:
- sampling fields outside `SamplingParams.validate`'s rules; `n` over this front door's
  limit (`max_n`); logit_bias token ids outside the vocabulary;
- a constraint that does not compile with the model's tokenizer, or whose language is empty
  (a regex that matches nothing), named where the client gave it;
- not exactly one of prompt / messages / prompt_token_ids, or an empty one;
- text that is not valid Unicode (a lone surrogate);
- text longer than the context could hold however it tokenizes (`max_prompt_chars`:
  max_model_len x the most characters one token can stand for), before tokenizing it;
- a prompt of max_model_len tokens or more (no room for one new token); token ids outside
  the vocabulary.

`max_tokens` beyond the room the context leaves (max_model_len - prompt tokens) is capped to
that room, as vLLM does: the request ends with finish_reason "length" when it runs out. A
request that no decode node could hold even alone (`check_fits`) is refused too: that is
bad input, not overload.
"""
from __future__ import annotations

import asyncio
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Callable, Iterable, TypeVar

from conductor.frontend_api import GenerateRequest
from conductor.request import BlockHash
from engine.block_pool import block_hashes
from engine.errors import InvalidRequestError
from engine.sampling import SamplingParams
from engine.structured.backend import GrammarBackend, backend_for
from engine.tokenizer import Message, Tokenizer

T = TypeVar("T")

MAX_REQUEST_BYTES = 4 * 2**20  # the front doors' default limit on one request (HTTP body, gRPC message)
INLINE_MAX = 16_384  # characters (or bytes, or token ids) handled on the loop: ~a few ms
MAX_N = 16  # parallel samples per request, by default
_THREADS = min(4, os.cpu_count() or 1)
_pool: ThreadPoolExecutor | None = None


def _executor() -> ThreadPoolExecutor:
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(max_workers=_THREADS, thread_name_prefix="intake")
    return _pool


async def off_loop(size: int, fn: Callable[..., T], *args: object) -> T:
    """`fn(*args)`, on the intake thread pool when `size` (of its input) is over `INLINE_MAX`,
    else right here: a small input is quicker done than handed over, and never queues
    behind big ones."""
    if size <= INLINE_MAX:
        return fn(*args)
    return await asyncio.get_running_loop().run_in_executor(_executor(), fn, *args)


@dataclass(frozen=True, slots=True)
class Prepared:
    """A request ready to schedule: its prompt tokens, their block hashes, and its sampling
    parameters with max_tokens capped to the room the context leaves."""

    token_ids: list[int]
    block_hashes: tuple[BlockHash, ...]
    sampling: SamplingParams


def _valid_text(field: str, text: str) -> None:
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidRequestError(field, f"is not valid Unicode: a lone surrogate at character {e.start}") from None


class Intake:
    def __init__(self, tokenizer: Tokenizer, max_model_len: int, block_size: int, max_n: int = MAX_N) -> None:
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.block_size = block_size
        self.max_n = max_n
        self._grammar: GrammarBackend | None = None
        self.vocab_size = tokenizer.vocab_size
        per_token = tokenizer.max_token_chars
        self.max_prompt_chars: int | None = None if per_token is None else max_model_len * per_token

    async def prepare(self, req: GenerateRequest) -> Prepared:
        c = req.sampling.constraint  # compiling a grammar takes ~1 ms, more for a big schema
        return await off_loop(_input_size(req) + (INLINE_MAX if c is not None else 0), self.prepare_now, req)

    def prepare_now(self, req: GenerateRequest) -> Prepared:
        """`prepare`, in the calling thread."""
        req.sampling.validate()
        self.check_sampling(req.sampling)
        ids = self.encode(req)
        room = self.max_model_len - len(ids)
        sampling = req.sampling
        if sampling.max_tokens > room:
            sampling = replace(sampling, max_tokens=room)
        return Prepared(ids, tuple(block_hashes(ids, self.block_size)), sampling)

    def check_sampling(self, sampling: SamplingParams) -> None:
        """What `validate` cannot know alone: this front door's `n` limit, the vocabulary, and
        whether the constraint compiles with the model's tokenizer."""
        if sampling.n > self.max_n:
            raise InvalidRequestError("n", f"at most {self.max_n} parallel samples per request, got {sampling.n}")
        sampling.check_vocab(self.vocab_size)
        if sampling.constraint is not None:
            self.grammar().check(sampling.constraint)

    def grammar(self) -> GrammarBackend:
        """The constrained-decoding backend for the model's tokenizer (built on first use)."""
        if self._grammar is None:
            self._grammar = backend_for(self.tokenizer.path, self.vocab_size, ())
        return self._grammar

    def token_bytes(self, token_id: int) -> bytes:
        """A token's own bytes (a byte-level token may hold part of a UTF-8 character)."""
        return self.grammar().tokenizer.decode_bytes([token_id])

    def encode(self, req: GenerateRequest) -> list[int]:
        """The prompt's token ids, checked against the vocabulary and the context."""
        given = [x is not None for x in (req.prompt, req.messages, req.prompt_token_ids)]
        if sum(given) != 1:
            raise InvalidRequestError("prompt", "give exactly one of prompt, messages, prompt_token_ids")
        if req.messages is not None:
            for i, m in enumerate(req.messages):
                _valid_text(f"messages[{i}].content", m.content)
            text = self.tokenizer.apply_chat_template([Message(m.role, m.content) for m in req.messages])
            return self._tokenize("messages", text)
        if req.prompt is not None:
            if not req.prompt:
                raise InvalidRequestError("prompt", "must not be empty")
            _valid_text("prompt", req.prompt)
            return self._tokenize("prompt", req.prompt)
        ids = list(req.prompt_token_ids)
        if not ids:
            raise InvalidRequestError("prompt_token_ids", "must not be empty")
        self._check_fits_context("prompt_token_ids", len(ids))
        bad = next((t for t in ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise InvalidRequestError("prompt_token_ids", f"token id {bad} outside [0, {self.vocab_size})")
        return ids

    def _tokenize(self, field: str, text: str) -> list[int]:
        cap = self.max_prompt_chars
        if cap is not None and len(text) > cap:
            raise InvalidRequestError(field, f"{len(text)} characters cannot fit the context window of "
                                             f"{self.max_model_len} tokens (at most {cap} characters would)")
        ids = self.tokenizer.encode(text)
        self._check_fits_context(field, len(ids))
        return ids

    def _check_fits_context(self, field: str, tokens: int) -> None:
        if tokens >= self.max_model_len:
            raise InvalidRequestError(field, f"{tokens} tokens does not fit the context window of "
                                             f"{self.max_model_len} (prompt + at least one new token)")


def check_fits(prepared: Prepared, kv_capacities_tokens: Iterable[int]) -> None:
    """Refuse a request that no decode node could hold even alone (prompt + max_tokens over
    the largest one's KV capacity): waiting would never help, so it is not overload.
    No capacities (no decode node up yet): nothing to judge here."""
    largest = max(kv_capacities_tokens, default=None)
    if largest is None:
        return
    prompt = len(prepared.token_ids)
    if prompt + 1 > largest:
        raise InvalidRequestError("prompt", f"{prompt} tokens do not fit the KV cache of any decode node "
                                            f"(the largest holds {largest} tokens)")
    need = prompt + prepared.sampling.max_tokens
    if need > largest:
        raise InvalidRequestError("max_tokens", f"{prepared.sampling.max_tokens} new tokens after a {prompt}-token "
                                                f"prompt need {need} tokens of KV cache; the largest decode node "
                                                f"holds {largest} (ask for at most {largest - prompt})")


def _input_size(req: GenerateRequest) -> int:
    if req.prompt is not None:
        return len(req.prompt)
    if req.messages is not None:
        return sum(len(m.content) for m in req.messages)
    return len(req.prompt_token_ids or ())
