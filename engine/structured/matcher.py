"""One constrained request's place in its grammar, and the token masks it allows.

A request's `GrammarState` consumes every token the request accepts (sampled, forced, or
replayed after a handoff or a migration). Before each engine step the engine hands the states
of the requests it will sample to a `MaskComputer`, which fills their masks on a thread of its
own while the forward pass runs (llguidance works without the GIL); the sampler then takes
each mask, waiting only for what the overlap did not hide.
"""
from __future__ import annotations

import os
import sys
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor

import llguidance as llg
import numpy as np
import torch

assert sys.byteorder == "little"  # `unpack` reads the int32 words' bytes in memory order


def words_for(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


def unpack(words: torch.Tensor, vocab_size: int) -> np.ndarray:
    """A bitmask (int32 words, bit j of word i = token 32 i + j) as a bool vector, in numpy:
    ~10 us for a 49k vocabulary, where torch's elementwise ops on it (shift, and, to bool)
    went to its thread pool and took milliseconds each on a loaded machine."""
    return np.unpackbits(words.numpy().view(np.uint8), bitorder="little")[:vocab_size].astype(bool)


class GrammarState:
    def __init__(self, matcher: llg.LLMatcher, vocab_size: int, *, fast_forward: bool = True) -> None:
        self.matcher = matcher
        self.vocab_size = vocab_size
        self.fast_forward = fast_forward  # off when the request asks for logprobs: every token is sampled
        self._pending: tuple[Future, torch.Tensor, int] | None = None
        self.error: str | None = None

    def copy(self) -> "GrammarState":
        """An independent state at the same position (a parallel sample's)."""
        return GrammarState(self.matcher.deep_copy(), self.vocab_size, fast_forward=self.fast_forward)

    @property
    def done(self) -> bool:
        """The grammar can take no more tokens (it ended, or it failed: see `error`)."""
        return self.error is not None or self.matcher.is_stopped()

    def consume(self, token: int) -> bool:
        """Advance by `token`; False (and `error` set) if the grammar does not allow it."""
        if self.error is not None:
            return False
        if not self.matcher.consume_token(token):
            self.error = self.matcher.get_error() or f"token {token} is not allowed here"
            return False
        return True

    def forced(self, limit: int) -> list[int]:
        """Consume and return the tokens the grammar allows as the only continuation (at most
        `limit`): they need no model step. Empty when fast-forward is off."""
        if not self.fast_forward or limit <= 0 or self.done:
            return []
        tokens = self.matcher.compute_ff_tokens()[:limit]
        if tokens and not self.matcher.consume_tokens(tokens):
            self.error = self.matcher.get_error() or "fast-forward failed"
            return []
        return tokens

    def allows(self, token: int) -> bool:
        """Whether the grammar takes `token` next (nothing consumed): one token checked, where
        a mask checks the whole vocabulary."""
        return self.error is None and not self.matcher.is_stopped() and self.matcher.validate_tokens([token]) == 1

    def drop_pending(self) -> None:
        self._pending = None

    def set_pending(self, future: Future, buffer: torch.Tensor, row: int) -> None:
        self._pending = (future, buffer, row)

    def take_mask(self) -> np.ndarray:
        """The tokens allowed next, as a bool vector over the vocabulary."""
        pending, self._pending = self._pending, None
        if pending is not None:
            future, buffer, row = pending
            future.result()
            words = buffer[row]
        else:
            words = torch.frombuffer(bytearray(self.matcher.compute_bitmask()), dtype=torch.int32)
        return unpack(words, self.vocab_size)


class MaskStats:
    """How long masks took: per-mask times (a bounded window) and the sampler's waits."""

    def __init__(self, window: int = 100_000) -> None:
        self.per_mask_s: deque[float] = deque(maxlen=window)
        self.masks = 0
        self.checks = 0  # greedy picks checked against the grammar alone (no mask)
        self.check_misses = 0  # of those, picks the grammar refused (a mask was computed then)
        self.compute_s = 0.0  # total time filling masks (on the mask thread when overlapped)
        self.wait_s = 0.0  # total time the engine thread waited for them (what overlap did not hide)

    def reset(self) -> None:
        self.per_mask_s.clear()
        self.masks, self.checks, self.check_misses, self.compute_s, self.wait_s = 0, 0, 0, 0.0, 0.0


class MaskComputer:
    """Fills the masks of one step's constrained requests, overlapped with the forward pass
    (`overlap=True`, the default) or at once on the calling thread."""

    def __init__(self, vocab_size: int, *, overlap: bool = True, threads: int | None = None) -> None:
        self.vocab_size = vocab_size
        self.words = words_for(vocab_size)
        self.overlap = overlap
        self.stats = MaskStats()
        self._threads = threads or max(1, min(4, (os.cpu_count() or 2) // 2))
        self._executor: llg.LLExecutor | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    def _fill(self, states: list[GrammarState], buffer: torch.Tensor) -> None:
        t = time.perf_counter()
        if len(states) == 1:
            states[0].matcher.unsafe_compute_mask_ptr(buffer.data_ptr(), self.words * 4)
        else:
            if self._executor is None:
                self._executor = llg.LLExecutor(num_threads=self._threads)
            self._executor.unsafe_compute_mask_ptr([(s.matcher, i) for i, s in enumerate(states)],
                                                   buffer.data_ptr(), self.words * 4, len(states))
        spent = time.perf_counter() - t
        with self._lock:
            self.stats.masks += len(states)
            self.stats.compute_s += spent
            self.stats.per_mask_s.extend([spent / len(states)] * len(states))

    def start(self, states: list[GrammarState]) -> None:
        """Begin filling the masks of `states`; each one's `take_mask` waits for its own."""
        if not states:
            return
        buffer = torch.zeros((len(states), self.words), dtype=torch.int32)
        if self.overlap:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(1, thread_name_prefix="grammar-masks")
            future = self._pool.submit(self._fill, states, buffer)
        else:
            future = Future()
            self._fill(states, buffer)
            future.set_result(None)
        waited = _Waited(future, self.stats, self._lock)
        for i, s in enumerate(states):
            s.set_pending(waited, buffer, i)


class _Waited:
    """A future whose first `result()` wait is added to `stats.wait_s`."""

    __slots__ = ("_future", "_stats", "_lock", "_seen")

    def __init__(self, future: Future, stats: MaskStats, lock: threading.Lock) -> None:
        self._future, self._stats, self._lock, self._seen = future, stats, lock, False

    def result(self):
        if self._seen:
            return self._future.result()
        t = time.perf_counter()
        out = self._future.result()
        with self._lock:
            self._stats.wait_s += time.perf_counter() - t
        self._seen = True
        return out
