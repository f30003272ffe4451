"""The cluster as the scheduler sees it: one record per node, plus the global prefix index.

`conductor.cluster_state.ClusterState` is the only writer of these records: the live
conductor and the simulator feed it the same events (dispatches, prefills done, decode
joins, finishes, heartbeats, nodes up and down) and it keeps the records current. Records
are mutable on purpose (updated in place, no per-decision copies); policies only read them.
A test may still build a view by hand.

Times are seconds on the conductor's clock (`now_s` passed to every decision).
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from typing import Callable, Mapping, Protocol, Sequence

from conductor.request import BlockHash, NodeId


class PrefixLookup(Protocol):
    def longest_prefix(self, block_hashes: Sequence[BlockHash]) -> Mapping[NodeId, int]: ...


class TieredLookup(PrefixLookup, Protocol):
    """A lookup that also knows the KV tiers under the device (`GlobalPrefixIndex`)."""

    tiers: Mapping[str, object]

    def lower_tier_chain(self, node: NodeId, block_hashes: Sequence[BlockHash], start: int) -> list[str]: ...

    def tier_holders(self, block_hashes: Sequence[BlockHash]) -> set[NodeId]: ...


@dataclass(slots=True)
class PrefillNodeView:
    """A prefill node's queue, as predicted work.

    `busy_until_s` is when the node is predicted to finish everything it has been given:
    each dispatch adds its predicted service time, a prefill that ends resets it to the end
    plus what is still queued, and a heartbeat (the uncomputed tokens the node reports)
    corrects it. Queue time for a new request is `max(0, busy_until_s - now_s)`.
    """

    node_id: NodeId
    busy_until_s: float = 0.0
    queued_requests: int = 0
    healthy: bool = True

    def queue_s(self, now_s: float) -> float:
        wait = self.busy_until_s - now_s
        return wait if wait > 0.0 else 0.0


@dataclass(slots=True, init=False)
class DecodeResident:
    """A request assigned to a decode node and not finished: incoming, waiting or running.

    `ready_at_s` is when it joined the running batch, or (not joined yet) when it is
    predicted to; `prompt_tokens` is the KV it brings. Used to project the node's load.
    """

    request_id: str
    prompt_tokens: int
    ready_at_s: float
    expected_output_tokens: int | None = None
    running: bool = False

    # Written out (the fields, in order): a compiled dataclass's generated __init__ runs
    # interpreted. tests/bench/test_record_inits.py holds it to the fields.
    def __init__(self, request_id: str, prompt_tokens: int, ready_at_s: float,
                 expected_output_tokens: int | None = None, running: bool = False) -> None:
        self.request_id = request_id
        self.prompt_tokens = prompt_tokens
        self.ready_at_s = ready_at_s
        self.expected_output_tokens = expected_output_tokens
        self.running = running


@dataclass(slots=True)
class DecodeNodeView:
    """A decode node's batch and KV memory.

    `running` / `tokens_in_flight`: the batch and the KV it holds now (drives step time).
    `reserved_tokens`: KV held by the requests in the batch (prompt + tokens so far); the
    reservations of requests not in the batch yet are counted below, never here too.
    `waiting` / `waiting_tokens`: requests whose prefill is done and that are not in the
    batch yet (their KV is landing, or they wait in the node's queue); their KV is reserved.
    `incoming` / `incoming_tokens`: requests assigned here whose prefill is not done yet
    (the conductor counts them itself; a heartbeat cannot know them); KV for their prompts
    is reserved here before their prefill starts.
    `pending_kv_tokens`: KV set aside here for the requests not in the batch yet (incoming
    and waiting): what their reservations hold (the prompt until one is made).
    `residents`: every request assigned here and not finished, for predictive admission.
    KV in use = reserved_tokens + pending_kv_tokens.
    `expected_output_tokens`: the residents' expected outputs summed (`unsized_residents`:
    those with none); `joined_prompt_tokens`: the prompts of those in the batch, so that
    `tokens_in_flight - joined_prompt_tokens` is what the batch generated so far (what is
    left to generate makes the step grow over a new request's life).
    """

    node_id: NodeId
    kv_capacity_tokens: int
    running: int = 0
    tokens_in_flight: int = 0
    reserved_tokens: int = 0
    waiting: int = 0
    waiting_tokens: int = 0
    incoming: int = 0
    incoming_tokens: int = 0
    healthy: bool = True
    residents: dict[str, DecodeResident] = field(default_factory=dict)
    pending_kv_tokens: int = 0
    expected_output_tokens: int = 0
    unsized_residents: int = 0
    joined_prompt_tokens: int = 0


# LoadIndex's heap entries: (key, view position, version, node view), and the backlog's
# (busy_until_s, version, node); an entry is current while its version is the node's.
_DecodeEntry = tuple[float, int, int, DecodeNodeView]
_BusyEntry = tuple[float, int, NodeId]


def _push(heap: list, entry: tuple, versions: dict[NodeId, int]) -> None:
    """Push a (key, position, version, view) entry onto a lazy heap; when the top is stale
    (its node's version moved on), the entry takes its place: one sift instead of two."""
    if heap:
        top = heap[0]
        if versions.get(top[3].node_id) != top[2]:
            heapq.heapreplace(heap, entry)
            return
    heapq.heappush(heap, entry)


_INF = float("inf")


class _MinTree:
    """The least key over positions 0..n-1 (the lowest position among equal keys), kept as
    keys change: a tournament tree, one leaf a position, each inner node the winner of its
    two children. A change replays the matches on its leaf's path to the root."""

    __slots__ = ("cap", "key", "win")

    def __init__(self, keys: Sequence[float] = ()) -> None:
        cap = 1
        while cap < len(keys):
            cap *= 2
        self.cap = cap
        self.key: list[float] = [_INF] * (2 * cap)  # empty leaves: inf, won by no position
        self.win: list[int] = [-1] * (2 * cap)
        key, win = self.key, self.win
        for i, value in enumerate(keys):
            key[cap + i] = value
            win[cap + i] = i
        for j in range(cap - 1, 0, -1):
            self._match(j)

    def _match(self, j: int) -> None:
        key, win = self.key, self.win
        left = 2 * j
        right = left + 1
        if key[right] < key[left]:  # a tie goes left: the lower positions
            key[j] = key[right]
            win[j] = win[right]
        else:
            key[j] = key[left]
            win[j] = win[left]

    def set(self, i: int, value: float) -> None:
        key, win = self.key, self.win
        j = self.cap + i
        key[j] = value
        win[j] = i
        j >>= 1
        while j:
            was_key, was_win = key[j], win[j]
            self._match(j)
            if key[j] == was_key and win[j] == was_win:  # this match's winner stands: so do those above
                return
            j >>= 1

    def top(self) -> tuple[float, int]:
        """(least key, its position); position -1 when no leaf is set or every key is inf."""
        return self.key[1], self.win[1]


class LoadIndex:
    """Orderings of the nodes kept as they change, so a decision on a large cluster need not
    visit every node: the least busy healthy prefill node, and decode nodes by a load key.

    `ClusterState` tells it about every change (`changed_prefill` / `changed_decode`). A
    changed node is only noted; the next query updates each noted node once, and only when
    its key differs from the one in place (a node changes several times between two
    decisions). Prefill nodes are a tournament tree over their positions (`_MinTree`: a
    change replays one path; an unhealthy node's key is inf). Decode nodes (and the backlog)
    are lazy heaps: an entry is stale when its node changed since (its version), left, or
    is unhealthy, and stale entries are dropped when they surface (or, on top, give their
    place to the next entry pushed: one sift instead of two); decode needs the k lowest, not
    only the least. The decode key is set by whoever knows the costs and SLOs
    (`set_decode_key`); without one, no decode order is kept. Positions are view order, for
    ties.
    """

    __slots__ = ("_ptree", "_pat", "_ppos", "_pver", "_pdirty", "_dheap", "_dpos", "_dver", "_dkey", "decode_key_stamp", "prefill_by_id",
                 "decode_by_id", "_busy", "_busy_sum", "_busy_heap", "_busy_now", "_bdirty", "_healthy", "_n_healthy", "_dirty",
                 "_dcur", "_dtop")

    def __init__(self) -> None:
        self._ptree = _MinTree()  # position -> busy_until_s of each healthy prefill node (inf: unhealthy)
        self._pat: list[PrefillNodeView | None] = []  # position -> node
        self._ppos: dict[NodeId, int] = {}  # node -> position
        self._pver: dict[NodeId, int] = {}  # node -> changes seen (the backlog heap's versions)
        self._pdirty: dict[NodeId, PrefillNodeView] = {}  # prefill nodes changed since the last query
        self._dheap: list[_DecodeEntry] = []  # (key, position, version, view)
        self._dpos: dict[NodeId, int] = {}
        self._dver: dict[NodeId, int] = {}
        self._dkey: Callable[[DecodeNodeView], float] | None = None
        self.decode_key_stamp: object = None  # what the decode key was made from (settings, costs)
        self.prefill_by_id: dict[NodeId, tuple[int, PrefillNodeView]] = {}
        self.decode_by_id: dict[NodeId, tuple[int, DecodeNodeView]] = {}
        # the backlog: healthy prefill nodes still busy at `_busy_now`, their busy_until_s summed
        self._busy: dict[NodeId, float] = {}
        self._busy_sum = 0.0
        self._busy_heap: list[_BusyEntry] = []  # (busy_until_s, version, node) of `_busy`, lazily
        self._bdirty: dict[NodeId, None] = {}  # nodes of `_busy` with no entry in `_busy_heap` yet
        self._busy_now = -float("inf")
        self._healthy: dict[NodeId, bool] = {}
        self._n_healthy = 0  # healthy prefill nodes (the True values of `_healthy`)
        self._dirty: dict[NodeId, DecodeNodeView] = {}  # decode nodes changed since the last query
        self._dcur: dict[NodeId, float] = {}  # decode node -> the key of its valid entry (`_dheap` or `_dtop`)
        self._dtop: list[_DecodeEntry] = []  # the last query's candidates, in order: entries taken out of `_dheap`

    def add_prefill(self, view: PrefillNodeView, position: int) -> None:
        self._ppos[view.node_id] = position
        self.prefill_by_id[view.node_id] = (position, view)
        at = self._pat
        while len(at) <= position:
            at.append(None)
        at[position] = view
        if position >= self._ptree.cap:  # a bigger tree (its new leaves are set by the next query)
            self._ptree = _MinTree([_INF] * len(at))
            self._pdirty.update((v.node_id, v) for v in at if v is not None)
        self.changed_prefill(view)

    def add_decode(self, view: DecodeNodeView, position: int) -> None:
        self._dpos[view.node_id] = position
        self.decode_by_id[view.node_id] = (position, view)
        self.changed_decode(view)

    def changed_prefill(self, view: PrefillNodeView) -> None:
        key = view.node_id
        self._pver[key] = self._pver.get(key, 0) + 1
        self._pdirty[key] = view
        busy = view.busy_until_s
        healthy = view.healthy
        was = self._healthy.get(key)
        if was is not healthy:
            self._healthy[key] = healthy
            self._n_healthy += (1 if healthy else 0) - (1 if was else 0)
        old = self._busy.pop(key, None)
        if old is not None:
            self._busy_sum -= old
        if view.healthy and busy > self._busy_now:
            self._busy[key] = busy
            self._busy_sum += busy
            self._bdirty[key] = None  # its heap entry: at the next backlog query

    def _reorder_prefill(self) -> None:
        dirty, pos = self._pdirty, self._ppos
        if 2 * len(dirty) > len(pos):  # most nodes changed (a heartbeat): one tree of them all
            self._ptree = _MinTree([_INF if v is None or not v.healthy else v.busy_until_s for v in self._pat])
            dirty.clear()
            return
        tree = self._ptree
        key, cap = tree.key, tree.cap
        for node, view in dirty.items():
            i = pos.get(node)
            if i is None:
                continue
            value = view.busy_until_s if view.healthy else _INF
            if key[cap + i] != value or tree.win[cap + i] != i:
                tree.set(i, value)
        dirty.clear()

    def backlog_s(self, now_s: float) -> float:
        """Mean predicted queue (seconds) over the healthy prefill nodes at `now_s`."""
        healthy = self._n_healthy
        if not healthy:
            return 0.0
        busy = self._busy
        if now_s < self._busy_now:  # asked about the past: add it up node by node
            views = (v for _, v in self.prefill_by_id.values() if v.healthy and v.busy_until_s > now_s)
            return sum(v.busy_until_s - now_s for v in views) / healthy
        heap, ver = self._busy_heap, self._pver
        if 2 * len(self._bdirty) > len(busy):  # most busy nodes changed (a heartbeat): one heap of them all
            heap = self._busy_heap = [(b, ver[n], n) for n, b in busy.items()]
            heapq.heapify(heap)
            self._bdirty.clear()
        elif self._bdirty:  # entries for what changed since (the same entries, pushed later)
            push = heapq.heappush
            for node in self._bdirty:
                b = busy.get(node)
                if b is not None:
                    entry = (b, ver[node], node)
                    if heap and not self._busy_live(*heap[0]):  # a stale top: take its place
                        heapq.heapreplace(heap, entry)
                        continue
                    push(heap, entry)
            self._bdirty.clear()
            if len(heap) > 4 * len(self._ppos) + 64:
                heap = self._busy_heap = [(b, ver[n], n) for n, b in busy.items()]
                heapq.heapify(heap)
        while heap and heap[0][0] <= now_s:
            b, version, node = heapq.heappop(heap)
            if self._busy_live(b, version, node):
                del busy[node]
                self._busy_sum -= b
        self._busy_now = now_s
        if not busy:
            self._busy_sum = 0.0  # no float drift across an idle period
            return 0.0
        total = self._busy_sum - len(busy) * now_s
        return total / healthy if total > 0.0 else 0.0

    def _busy_live(self, b: float, version: int, node: NodeId) -> bool:
        """Whether a backlog heap entry still stands for its node: no change since, busy until `b`."""
        return self._pver.get(node) == version and self._busy.get(node) == b

    def changed_decode(self, view: DecodeNodeView) -> None:
        """Noted now, ordered at the next query (a node changes several times between two)."""
        if self._dkey is not None:
            self._dirty[view.node_id] = view

    def _reorder_decode(self) -> None:
        fn, heap, ver, pos, cur = self._dkey, self._dheap, self._dver, self._dpos, self._dcur
        if 2 * len(self._dirty) > len(pos):  # most nodes changed (a heartbeat): one heap of them all
            for key, view in self._dirty.items():
                if key in pos:
                    cur[key] = fn(view)  # type: ignore[misc]
            by_id = self.decode_by_id
            heap = self._dheap = []
            for key, value in cur.items():  # every node with an entry (in the heap or `_dtop`)
                version = ver[key] = ver.get(key, 0) + 1
                heap.append((value, pos[key], version, by_id[key][1]))
            heapq.heapify(heap)
            self._dtop = []
            self._dirty.clear()
            return
        for key, view in self._dirty.items():
            if key not in pos:
                continue
            value = fn(view)  # type: ignore[misc]
            if cur.get(key) == value:  # its entry is still in place
                continue
            cur[key] = value
            version = ver[key] = ver.get(key, 0) + 1
            _push(heap, (value, pos[key], version, view), ver)
        self._dirty.clear()
        if len(heap) > 4 * len(pos) + 64:
            self._dheap = [e for e in heap if ver.get(e[3].node_id) == e[2]]
            heapq.heapify(self._dheap)

    def rebuild(self, view: ClusterView) -> None:
        """After nodes left: positions are view order again."""
        self._ppos = {p.node_id: i for i, p in enumerate(view.prefill)}
        self.prefill_by_id = {p.node_id: (i, p) for i, p in enumerate(view.prefill)}
        self._dpos = {d.node_id: i for i, d in enumerate(view.decode)}
        self.decode_by_id = {d.node_id: (i, d) for i, d in enumerate(view.decode)}
        self._busy, self._busy_sum, self._busy_heap, self._healthy, self._n_healthy = {}, 0.0, [], {}, 0
        self._bdirty = {}
        self._pver = {k: self._pver.get(k, 0) for k in self._ppos}
        self._dver = {k: self._dver.get(k, 0) for k in self._dpos}
        self._pat = list(view.prefill)
        self._ptree = _MinTree([_INF] * len(self._pat))
        self._dheap, self._dirty, self._dcur, self._pdirty = [], {}, {}, {}
        self._dtop = []
        for p in view.prefill:
            self.changed_prefill(p)
        for d in view.decode:
            self.changed_decode(d)

    def least_busy_prefill(self) -> tuple[int, PrefillNodeView] | None:
        """(position, node) of the healthy prefill node with the earliest `busy_until_s`
        (the lowest position among equal ones)."""
        if self._pdirty:
            self._reorder_prefill()
        if not self._n_healthy:
            return None
        _, i = self._ptree.top()
        if i >= 0:
            view = self._pat[i]
            if view is not None and view.healthy:
                return i, view
        # every key is inf (the healthy nodes are all busy for ever): tied, so the first healthy one
        for i, view in enumerate(self._pat):
            if view is not None and view.healthy:
                return i, view
        return None

    @property
    def has_decode_key(self) -> bool:
        return self._dkey is not None

    def set_decode_key(self, fn: Callable[[DecodeNodeView], float] | None, decode: Sequence[DecodeNodeView],
                       stamp: object = None) -> None:
        """Order decode nodes by `fn(view)` (lower is better) from now on."""
        self._dkey = fn
        self.decode_key_stamp = stamp
        self._dheap = []
        self._dtop = []
        self._dirty = {}
        self._dcur = {}
        if fn is not None:
            for d in decode:
                self._dirty[d.node_id] = d

    def decode_candidates(self, k: int) -> list[tuple[int, DecodeNodeView]]:
        """Up to `k` (position, node) of healthy decode nodes with the lowest keys.

        The candidates stay out of the heap until the next query (`_dtop`, in order), which
        reads them merged with the heap: consecutive decisions mostly share their candidates
        (only the node just chosen moved), so a query pops about one entry instead of popping
        and pushing back `k`. Entries are unique in (key, position, version): the merged
        order is the order of one heap holding both."""
        if self._dirty:
            self._reorder_decode()
        heap, ver, top = self._dheap, self._dver, self._dtop
        pop = heapq.heappop
        taken: list[_DecodeEntry] = []
        i, n_top = 0, len(top)
        while len(taken) < k:
            if i < n_top and (not heap or top[i] < heap[0]):
                entry = top[i]
                i += 1
            elif heap:
                entry = pop(heap)
            else:
                break
            view = entry[3]
            if ver.get(view.node_id) == entry[2]:
                if view.healthy:
                    taken.append(entry)
                else:  # its entry is gone: the change that makes it healthy pushes it again
                    self._dcur.pop(view.node_id, None)
        for j in range(i, n_top):  # past the k taken: back into the heap
            entry = top[j]
            if ver.get(entry[3].node_id) == entry[2]:
                heapq.heappush(heap, entry)
        self._dtop = taken
        return [(entry[1], entry[3]) for entry in taken]


@dataclass(slots=True)
class ClusterView:
    """Everything a policy may look at. `block_tokens`: tokens per indexed KV block.
    `loads`: orderings for large clusters (None in a hand-built view: policies scan).
    `pending`: the prompt blocks of the prefills queued on each node (they will be cached
    there before anything placed behind them starts), None when not tracked."""

    prefill: list[PrefillNodeView]
    decode: list[DecodeNodeView]
    index: PrefixLookup
    block_tokens: int
    loads: LoadIndex | None = None
    pending: PrefixLookup | None = None
