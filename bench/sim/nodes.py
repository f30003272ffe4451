"""The simulated nodes: what a prefill and a decode instance do with their work.

Neither writes the conductor's view: the simulation loop (`bench.sim.cluster`) reports what
they do to `conductor.cluster_state.ClusterState`, as the live conductor reports RPCs.

- `SimPrefill`: a FIFO queue served one request at a time, with an LRU prefix cache of
  `capacity` blocks (a chain is touched children first, so it is evicted from its tail).
- `SimDecode`: continuous batching over a KV memory of `kv_capacity_tokens`. KV is reserved
  before the prefill (as the live decode node's Reserve does), for the prompt and the room
  its answer will take (the live node reserves the prompt and grows it block by block; a
  simulated node never preempts, so it holds what a request will need), and a request
  joins the batch at the first step boundary after its KV landed. Steps are not simulated
  one by one: between two changes of the batch (a join or a finish) its size `b` is fixed
  and step `i` of that *segment* lasts `a + s_t·(T0 + b·i)` (`a = s_1 + s_b·b`, `T0` the KV
  tokens in flight when the segment began), so the loop handles one event per segment and
  the step times are rebuilt afterwards (`step_arrays`), exactly as if each had been an event.
"""
from __future__ import annotations

import copy
import heapq
import math
from array import array
from collections import OrderedDict, deque
from typing import TYPE_CHECKING

import numpy as np

from conductor.cost_model import DecodeModel

if TYPE_CHECKING:  # (cluster imports this module)
    from bench.sim.cluster import RequestState


# What `SimDecode.segments` holds per finished segment: start time, first step, steps,
# a = s_1 + s_b·b, KV tokens at the start (T0), batch size (b).
SEGMENT_FIELDS = ("t0", "step0", "k", "a", "T0", "b")


class PrefillJob:
    __slots__ = ("state", "predicted_service_s")

    def __init__(self, state: RequestState, predicted_service_s: float) -> None:
        self.state = state
        self.predicted_service_s = predicted_service_s

    def __deepcopy__(self, memo: dict) -> PrefillJob:
        new = PrefillJob(copy.deepcopy(self.state, memo), self.predicted_service_s)
        memo[id(self)] = new
        return new


# its attributes, which its deepcopy walks (mypy, so mypyc, does not read `__slots__` through the class)
_SIM_PREFILL_FIELDS = ("node_id", "capacity", "cache", "queue", "running", "run_start_s", "run_end_s",
                       "run_uncached", "queued_tokens", "seq")


class SimPrefill:
    __slots__ = _SIM_PREFILL_FIELDS

    def __init__(self, node_id: str, capacity: int) -> None:
        self.node_id = node_id
        self.capacity = capacity
        self.cache: OrderedDict = OrderedDict()  # block hash -> None, LRU first
        self.queue: deque = deque()
        self.running: PrefillJob | None = None
        self.run_start_s = 0.0
        self.run_end_s = 0.0
        self.run_uncached = 0  # prompt tokens the running prefill computes
        self.queued_tokens = 0  # prompt tokens of the queued jobs (not started)
        self.seq = 0  # next KV event number

    def __deepcopy__(self, memo: dict) -> SimPrefill:
        new = SimPrefill(self.node_id, self.capacity)  # (a compiled class's __new__ runs __init__ too)
        memo[id(self)] = new
        for name in _SIM_PREFILL_FIELDS:
            value = getattr(self, name)
            if name == "cache":
                value = OrderedDict(value)  # block hashes: nothing inside to copy
            elif name in ("queue", "running"):
                value = copy.deepcopy(value, memo)
            setattr(new, name, value)
        return new

    def depth(self, hashes, limit: int | None = None) -> int:
        """Leading blocks of `hashes` cached here, touched in the LRU (children first, so a
        chain is evicted from its tail)."""
        cache = self.cache
        end = len(hashes) if limit is None else min(limit, len(hashes))
        d = 0
        while d < end and hashes[d] in cache:
            d += 1
        for i in range(d - 1, -1, -1):
            cache.move_to_end(hashes[i])
        return d

    def store(self, hashes) -> tuple[list, list]:
        """Cache every block of a prompt (tail first, so the head stays most recent): the
        blocks newly stored and those evicted to make room."""
        cache = self.cache
        if self.capacity == 0:
            return [], []
        new = []
        touch = cache.move_to_end
        for h in reversed(hashes):
            if h in cache:
                touch(h)
            else:
                cache[h] = None
                new.append(h)
        new.reverse()  # chain order
        evicted = []
        over = len(cache) - self.capacity
        if over > 0:  # the least recent first (a loop of popitem(last=False) does the same, slower compiled)
            oldest = iter(cache)
            for _ in range(over):
                evicted.append(next(oldest))
            for h in evicted:
                del cache[h]
        return new, evicted

    def uncomputed_tokens(self, t: float) -> int:
        """What an engine reports as queued prefill work: the running prompt's tokens not
        computed yet, and every queued prompt whole."""
        q = self.queued_tokens
        job = self.running
        if job is not None:
            span = self.run_end_s - self.run_start_s
            left = (self.run_end_s - t) / span if span > 0 else 0.0
            q += int(round(self.run_uncached * (left if left > 0.0 else 0.0)))
        return q

    @property
    def idle(self) -> bool:
        return self.running is None and not self.queue


# its attributes, which its deepcopy walks (mypy, so mypyc, does not read `__slots__` through the class)
_SIM_DECODE_FIELDS = ("node_id", "kv_capacity_tokens", "model", "batch", "tokens", "step", "stepping", "seg_t0",
                      "seg_a", "seg_k", "end_version", "pending", "pending_tokens", "committed", "finishing",
                      "segments", "residents", "done_s", "done_rows", "done_tokens")


class SimDecode:
    __slots__ = _SIM_DECODE_FIELDS

    def __init__(self, node_id: str, kv_capacity_tokens: int, model: DecodeModel) -> None:
        self.node_id = node_id
        self.kv_capacity_tokens = kv_capacity_tokens
        self.model = model
        self.batch = 0  # requests in the running batch
        self.tokens = 0  # KV tokens they hold at the start of the segment
        self.step = 0  # steps run before the segment
        self.stepping = False
        self.seg_t0 = 0.0
        self.seg_a = 0.0
        self.seg_k = 0  # steps the segment runs unless a join cuts it
        self.end_version = 0
        self.pending: list = []  # KV landed: they join at the next step boundary
        self.pending_tokens = 0
        self.committed = 0  # KV reserved for every request here (prompt + answer)
        self.finishing: list = []  # heap of (finish_step, request index, state)
        self.residents = 0  # requests assigned here and not finished (reserved .. done)
        # finished segments, SEGMENT_FIELDS doubles each (the counts are exact: < 2**53)
        self.segments = array("d")
        # the finished segments' steps: seconds, batch rows and context tokens summed
        self.done_s = 0.0
        self.done_rows = 0
        self.done_tokens = 0

    def __deepcopy__(self, memo: dict) -> SimDecode:
        new = SimDecode(self.node_id, self.kv_capacity_tokens, self.model)
        memo[id(self)] = new
        for name in _SIM_DECODE_FIELDS:
            value = getattr(self, name)
            if name == "segments":
                value = array(value.typecode, value)
            elif name in ("pending", "finishing"):
                value = copy.deepcopy(value, memo)
            setattr(new, name, value)
        return new

    # -- time within the current segment -----------------------------------------------------
    def boundary(self, j: int) -> float:
        """End of the segment's `j`-th step (0: its start)."""
        s_t = self.model.s_t
        return self.seg_t0 + j * self.seg_a + s_t * (j * self.tokens + self.batch * j * (j - 1) / 2)

    def steps_done(self, t: float) -> int:
        """Steps of the current segment finished by `t` (within it: at most `seg_k`)."""
        if not self.stepping:
            return 0
        c = t - self.seg_t0
        if c <= 0.0:
            return 0
        s_t = self.model.s_t
        qa = s_t * self.batch / 2
        qb = self.seg_a + s_t * self.tokens - qa
        if qa > 0.0:
            j = int((-qb + math.sqrt(qb * qb + 4.0 * qa * c)) / (2.0 * qa))
        elif qb > 0.0:
            j = int(c / qb)
        else:
            j = self.seg_k
        j = max(0, min(j, self.seg_k))
        while j < self.seg_k and self.boundary(j + 1) <= t:
            j += 1
        while j > 0 and self.boundary(j) > t:
            j -= 1
        return j

    def beat(self, t: float) -> tuple[int, tuple[int, float, int, int]]:
        """What a heartbeat at `t` reports: the KV tokens the batch holds, and the totals of the
        steps finished by then since the node started: how many, their seconds, the batch rows
        and the context tokens they ran on (as a live node's heartbeat does)."""
        if not self.stepping:
            return self.tokens, (self.step, self.done_s, self.done_rows, self.done_tokens)
        j = self.steps_done(t)
        secs, rows, tokens = self._first_steps(j)
        return (self.tokens + self.batch * j,
                (self.step + j, self.done_s + secs, self.done_rows + rows, self.done_tokens + tokens))

    def _first_steps(self, j: int) -> tuple[float, int, int]:
        """The current segment's first `j` steps: their seconds, batch rows and context tokens."""
        if j == 0:
            return 0.0, 0, 0
        b = self.batch
        return self.boundary(j) - self.seg_t0, b * j, j * self.tokens + b * j * (j - 1) // 2

    def free_tokens(self) -> int:
        """KV not reserved by any request here."""
        return self.kv_capacity_tokens - self.committed

    # -- the batch ---------------------------------------------------------------------------
    def start_segment(self, t: float) -> float | None:
        """Join what is pending and begin a segment at `t`; the time it ends (None: idle)."""
        if self.pending:
            step = self.step
            finishing = self.finishing
            for st in self.pending:
                st.join_step = step
                st.finish_step = step + st.req.output_tokens - 1
                heapq.heappush(finishing, (st.finish_step, st.req.index, st))
            self.batch += len(self.pending)
            self.tokens += self.pending_tokens
            self.pending = []
            self.pending_tokens = 0
        if self.batch == 0:
            self.stepping = False
            return None
        m = self.model
        a = m.s_1 + m.s_b * self.batch
        self.seg_a = a if a > 0.0 else 0.0
        self.seg_t0 = t
        self.seg_k = self.finishing[0][0] - self.step
        self.stepping = True
        self.end_version += 1
        return self.boundary(self.seg_k)

    def cut_for_join(self, t: float) -> float | None:
        """A request's KV landed at `t` while stepping: end the segment at the step boundary
        it will join at. The new end time, or None when the segment already ends there."""
        j = self.steps_done(t)
        m = j if (j > 0 and self.boundary(j) == t) else j + 1
        if m >= self.seg_k:
            return None
        self.seg_k = m
        self.end_version += 1
        return self.boundary(m)

    def end_segment(self) -> list:
        """The segment's last step ended: record it, advance, and return the requests that
        finished (their KV freed)."""
        k, b = self.seg_k, self.batch
        self.segments.fromlist([self.seg_t0, self.step, k, self.seg_a, self.tokens, b])
        secs, rows, tokens = self._first_steps(k)
        self.done_s += secs
        self.done_rows += rows
        self.done_tokens += tokens
        self.step += k
        self.tokens += b * k
        done = []
        finishing = self.finishing
        while finishing and finishing[0][0] <= self.step:
            _, _, st = heapq.heappop(finishing)
            done.append(st)
            self.batch -= 1
            self.tokens -= st.req.input_tokens + st.req.output_tokens
        self.stepping = False
        return done

    def segment_columns(self) -> dict[str, np.ndarray]:
        """Every finished segment's SEGMENT_FIELDS as columns (views; counts int64)."""
        rows = np.frombuffer(self.segments, dtype=np.float64).reshape(-1, len(SEGMENT_FIELDS))
        return {name: rows[:, i].astype(np.int64) if name in ("step0", "k", "b") else rows[:, i]
                for i, name in enumerate(SEGMENT_FIELDS)}

    def step_arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(end time, duration, batch size) of every step this node ran, in order."""
        if not self.segments:
            empty = np.zeros(0)
            return empty, empty, np.zeros(0, dtype=np.int64)
        cols = self.segment_columns()
        k = cols["k"]
        total = int(k.sum())
        if total == 0:
            empty = np.zeros(0)
            return empty, empty, np.zeros(0, dtype=np.int64)
        t0: np.ndarray = np.repeat(cols["t0"], k)
        a: np.ndarray = np.repeat(cols["a"], k)
        tok: np.ndarray = np.repeat(cols["T0"], k)
        b: np.ndarray = np.repeat(cols["b"], k)
        starts = np.cumsum(k) - k
        i = np.arange(total, dtype=np.float64) - np.repeat(starts, k)
        s_t = self.model.s_t
        durations = a + s_t * (tok + b * i)
        ends = t0 + (i + 1) * a + s_t * ((i + 1) * tok + b * (i + 1) * i / 2)
        return ends, durations, b
