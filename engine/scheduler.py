"""Continuous batching with chunked prefill.

Each step gets a token budget (`max_num_batched_tokens`). Running requests that are decoding
take one token each first (so decode latency does not wait behind long prompts), then
partially prefilled requests continue, then waiting requests are admitted in arrival order
while the budget, the running-batch limit and free KV blocks allow. A prompt's blocks are all
allocated when it is admitted (reusing cached prefix blocks); a decoding request grows by one
block when its last block fills. When no block is free for a decode, the most recently
admitted request is preempted: its blocks are freed (its full blocks stay in the prefix
cache) and it re-enters the queue to be recomputed.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from engine.block_pool import BlockPool
from engine.config import EngineConfig
from engine.request import Request, RequestStatus


@dataclass(slots=True)
class ScheduledChunk:
    request: Request
    num_tokens: int  # tokens fed this step, starting at request.num_computed_tokens

    @property
    def completes(self) -> bool:
        """After this chunk every token is computed, so the step samples a next token."""
        return self.request.num_computed_tokens + self.num_tokens == self.request.num_tokens


@dataclass(slots=True)
class SchedulerOutput:
    decodes: list[Request] = field(default_factory=list)
    prefills: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.decodes and not self.prefills

    @property
    def num_tokens(self) -> int:
        return len(self.decodes) + sum(c.num_tokens for c in self.prefills)


class Scheduler:
    def __init__(self, cfg: EngineConfig, pool: BlockPool) -> None:
        self.cfg = cfg
        self.pool = pool
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def add_running(self, req: Request) -> None:
        """A request whose blocks are already filled (KV imported from a prefill node)."""
        req.status = RequestStatus.RUNNING
        self.running.append(req)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.pool.block_size)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.cfg.max_num_batched_tokens
        # 1. decodes
        for req in list(self.running):
            if budget == 0:
                break
            if req.status is not RequestStatus.RUNNING or not req.is_decoding:
                continue
            if not self._grow(req, out):
                continue  # req itself was preempted
            out.decodes.append(req)
            budget -= 1
        # 2. running prefills continue (also tokens a grammar forced after a sampled one:
        # they are fed together, and may need a block more)
        for req in list(self.running):
            if budget == 0:
                break
            if req.is_decoding or req.status is not RequestStatus.RUNNING or req in out.preempted:
                continue
            if not self._grow(req, out):
                continue  # req itself was preempted
            n = min(req.num_uncomputed, budget)
            out.prefills.append(ScheduledChunk(req, n))
            budget -= n
        # 3. admit waiting requests
        while self.waiting and budget > 0 and len(self.running) < self.cfg.max_num_seqs:
            req = self.waiting[0]
            if not self._admit(req):
                break
            self.waiting.popleft()
            self.running.append(req)
            n = min(req.num_uncomputed, budget)
            out.prefills.append(ScheduledChunk(req, n))
            budget -= n
        return out

    def _admit(self, req: Request) -> bool:
        """Reuse cached prefix blocks and allocate the rest of the prompt's blocks."""
        tokens = req.all_token_ids
        bs = self.pool.block_size
        hashes = req.chain_hashes(bs)
        cached = self.pool.match_prefix(hashes, tokens)
        cached = cached[: (len(tokens) - 1) // bs]  # always compute the last token for its logits
        need = self._blocks_for(len(tokens)) - len(cached)
        self.pool.touch(cached)  # take refs first so allocation cannot evict them
        new = self.pool.allocate(need)
        if new is None:
            self.pool.free(cached)
            return False
        # the tiers below the device (engine/tiers) fill the chain's next blocks they hold
        loaded = self.pool.load_prefix(req.request_id, hashes, tokens, cached, new, (len(tokens) - 1) // bs)
        hit = (len(cached) + loaded) * bs
        self.pool.record_lookup(len(tokens), hit)
        req.block_ids = list(cached) + new
        req.block_hashes = list(hashes[: len(cached) + loaded])
        req.num_computed_tokens = hit
        if req.num_preemptions == 0:
            req.num_cached_tokens = hit
        req.status = RequestStatus.RUNNING
        return True

    def _grow(self, req: Request, out: SchedulerOutput) -> bool:
        """Make room for one more token; preempt the newest requests if needed."""
        while len(req.block_ids) < self._blocks_for(req.num_tokens):
            new = self.pool.allocate(1)
            if new is not None:
                req.block_ids += new
                continue
            victim = self.running[-1]
            self._preempt(victim, out)
            if victim is req:
                return False
        return True

    def _preempt(self, req: Request, out: SchedulerOutput) -> None:
        self.running.remove(req)
        self.pool.free(req.block_ids)
        req.block_ids = []
        req.block_hashes = []
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        req.status = RequestStatus.WAITING
        self.waiting.appendleft(req)
        out.preempted.append(req)
        if req in out.decodes:
            out.decodes.remove(req)

    def remove(self, req: Request) -> None:
        """Take a finished or aborted request out of the queues, freeing blocks unless held."""
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        if not req.hold_blocks:
            self.release(req)

    def release(self, req: Request) -> None:
        if req.block_ids:
            self.pool.free(req.block_ids)
            req.block_ids = []
