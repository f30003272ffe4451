"""The one writer of the cluster view: node events and request transitions, applied in one place.

The live conductor and the simulator are adapters around this object: each turns what it
observes (an RPC answered, a heartbeat, a simulated prefill that ended) into one call here,
and the policies read the `ClusterView` it keeps. Pure: no I/O, no clock (every call takes
`now_s`), no threads.

A request placed on nodes walks the lifecycle of `conductor.lifecycle.Phase` (the live
conductor's own phases; `TRANSITIONS` is the same table):

    dispatched  -> PLACED       counted in its prefill node's queue and as incoming on its decode node
    reserved    -> RESERVED     the decode node holds KV for its prompt (before the prefill, as live)
    prefill_started -> PREFILLING
    prefill_done               (still PREFILLING: its KV is on the way) leaves the prefill queue;
                                on the decode node it moves from incoming to waiting
    decode_joined -> DECODING   in the decode node's running batch
    finished    -> FINISHED     from any phase: the one cleanup path (whatever the request still
                                counts in, it stops counting there)

A request resumed on a new decode node (no prefill node) is `placed_on_decode` and goes
PLACED -> DECODING; a colocated one is dispatched (its node's prefill queue counts it) and
goes PLACED -> DECODING too: `decode_joined` ends its prefill, which the node ran itself.

What each view field means (DESIGN.md §2; `conductor.view` documents the records):

- prefill `busy_until_s`: now + predicted service of everything still queued there. A
  dispatch adds its predicted service; a prefill that ends sets it to end + what is still
  queued (FIFO: the next one starts then); a heartbeat's `queued_prefill_tokens` (uncomputed
  tokens the node still has) rescales the predicted remainder of what the node has seen, so
  a node that runs faster or slower than predicted stops drifting.
- decode `running` / `tokens_in_flight`: its batch; joins and finishes move them at once, a
  heartbeat sets them to what the node reports.
- decode `reserved_tokens`: KV held by the requests that joined (prompt + tokens so far, or
  what a node reserved for them); `pending_kv_tokens`: what is set aside for the requests
  not joined yet (their reservations; the prompt until one is made), never counted twice:
  a heartbeat's used KV minus the reservations this object knows of.
- decode `waiting` / `waiting_tokens`: requests whose prefill is done and that are not in the
  batch yet: those whose KV is still landing (known here) plus the node's own queue (the
  heartbeat's `waiting`, at the mean prompt size of what runs there).
- `kv_event_seq` in a prefill heartbeat is the node's last published KV event: when the
  index stays behind it across two heartbeats, the node is marked stale in the index and
  `heartbeat_prefill` answers True (the adapter resubscribes for a snapshot).
"""
from __future__ import annotations

from dataclasses import dataclass

from conductor.decision import Decision
from conductor.errors import ConductorError
from conductor.lifecycle import Phase
from conductor.predictions import DecodeSteps
from conductor.prefix_index import ApplyStatus, GlobalPrefixIndex, PendingPrefixes
from conductor.request import NodeId, RequestInfo
from conductor.view import ClusterView, DecodeNodeView, DecodeResident, LoadIndex, PrefillNodeView
from engine.block_pool import KVEvent

# The lifecycle's legal moves (the same table as `conductor.lifecycle`; a test pins that).
TRANSITIONS: dict[Phase, frozenset[Phase]] = {
    Phase.PLACED: frozenset({Phase.RESERVED, Phase.DECODING, Phase.FINISHED}),
    Phase.RESERVED: frozenset({Phase.PREFILLING, Phase.FINISHED}),
    Phase.PREFILLING: frozenset({Phase.DECODING, Phase.FINISHED}),
    Phase.DECODING: frozenset({Phase.FINISHED}),
    Phase.FINISHED: frozenset(),
}


class LifecycleError(ConductorError):
    """An event that does not fit the request's phase (or names an unknown request or node)."""


@dataclass(slots=True, init=False)
class Tracked:
    """One request placed on nodes, as this object counts it."""

    request_id: str
    prefill: NodeId | None
    decode: NodeId
    input_tokens: int
    expected_output_tokens: int | None
    service_s: float  # predicted prefill service (0 without a prefill)
    uncached_tokens: int  # prompt tokens the prefill computes
    dispatched_at_s: float
    block_hashes: tuple = ()  # the prompt's blocks, pending on its prefill node until done
    phase: Phase = Phase.PLACED
    prefill_pending: bool = False  # counted in its prefill node's queue
    in_transfer: bool = False  # prefill done, not joined: counted in the decode node's waiting
    reserved_tokens: int = 0  # decode KV reserved before the prefill (not joined yet)
    pending_kv: int = 0  # its share of the decode view's pending_kv_tokens
    held_tokens: int = 0  # decode KV counted in `reserved_tokens` of the view once joined

    # Written out (the fields, in order): a compiled dataclass's generated __init__ runs
    # interpreted. tests/bench/test_record_inits.py holds it to the fields.
    def __init__(self, request_id: str, prefill: NodeId | None, decode: NodeId, input_tokens: int,
                 expected_output_tokens: int | None, service_s: float, uncached_tokens: int, dispatched_at_s: float,
                 block_hashes: tuple = (), phase: Phase = Phase.PLACED, prefill_pending: bool = False,
                 in_transfer: bool = False, reserved_tokens: int = 0, pending_kv: int = 0,
                 held_tokens: int = 0) -> None:
        self.request_id = request_id
        self.prefill = prefill
        self.decode = decode
        self.input_tokens = input_tokens
        self.expected_output_tokens = expected_output_tokens
        self.service_s = service_s
        self.uncached_tokens = uncached_tokens
        self.dispatched_at_s = dispatched_at_s
        self.block_hashes = block_hashes
        self.phase = phase
        self.prefill_pending = prefill_pending
        self.in_transfer = in_transfer
        self.reserved_tokens = reserved_tokens
        self.pending_kv = pending_kv
        self.held_tokens = held_tokens


@dataclass(slots=True)
class _PrefillBook:
    view: PrefillNodeView
    pending: dict  # request id -> Tracked, FIFO (dispatch order)
    pending_s: float = 0.0  # predicted service of `pending`
    lag_seq: int = -1  # index.next_seq when a heartbeat last found the index behind


@dataclass(slots=True)
class _DecodeBook:
    view: DecodeNodeView
    unjoined_reserved: int = 0  # KV reserved by requests that have not joined
    joined: int = 0  # requests joined and not finished (for the mean prompt size: view.joined_prompt_tokens)
    transferring: int = 0  # prefill done, KV landing: this object's share of `waiting`
    transferring_tokens: int = 0
    node_waiting: int = 0  # the node's own queue, as last reported
    steps: DecodeSteps | None = None  # the node's decode-step totals, as last reported


class ClusterState:
    """The cluster view and the requests in it, changed only through these methods.

    `heartbeat_lag_s`: requests dispatched this recently are assumed not yet in a prefill
    node's reported queue (its heartbeat was taken before they reached it).
    """

    def __init__(self, block_tokens: int, *, index: GlobalPrefixIndex | None = None,
                 heartbeat_lag_s: float = 0.0) -> None:
        self.index = index if index is not None else GlobalPrefixIndex()
        self.loads = LoadIndex()
        self.pending = PendingPrefixes()
        self.view = ClusterView(prefill=[], decode=[], index=self.index, block_tokens=block_tokens, loads=self.loads,
                                pending=self.pending)
        self.heartbeat_lag_s = heartbeat_lag_s
        self._prefill: dict[NodeId, _PrefillBook] = {}
        self._decode: dict[NodeId, _DecodeBook] = {}
        self._requests: dict[str, Tracked] = {}

    # -- queries ------------------------------------------------------------------------------
    def request(self, request_id: str) -> Tracked | None:
        return self._requests.get(request_id)

    def requests_on(self, node: NodeId) -> list[str]:
        """Ids of the requests that count on `node` (prefill queue or decode node), oldest first."""
        return [rid for rid, t in self._requests.items()
                if t.decode == node or (t.prefill == node and t.prefill_pending)]

    def __len__(self) -> int:
        return len(self._requests)

    def prefill_view(self, node: NodeId) -> PrefillNodeView:
        return self._pbook(node).view

    def decode_view(self, node: NodeId) -> DecodeNodeView:
        return self._dbook(node).view

    # -- membership ---------------------------------------------------------------------------
    def add_prefill(self, node: NodeId) -> PrefillNodeView:
        if node in self._prefill:
            raise LifecycleError(f"prefill node {node} is already in the view")
        view = PrefillNodeView(node)
        self._prefill[node] = _PrefillBook(view, {})
        self.view.prefill.append(view)
        self.loads.add_prefill(view, len(self.view.prefill) - 1)
        return view

    def add_decode(self, node: NodeId, kv_capacity_tokens: int) -> DecodeNodeView:
        if node in self._decode:
            raise LifecycleError(f"decode node {node} is already in the view")
        view = DecodeNodeView(node, kv_capacity_tokens)
        self._decode[node] = _DecodeBook(view)
        self.view.decode.append(view)
        self.loads.add_decode(view, len(self.view.decode) - 1)
        return view

    def node_down(self, node: NodeId, *, forget_cache: bool = False) -> None:
        """Out of rotation (failed, draining): policies stop choosing it. A prefill node's
        cache leaves the index when it is `remove_node`d, or here with `forget_cache` (the
        adapter stops following its KV events; a snapshot brings them back with it)."""
        self._set_healthy(node, False)
        if forget_cache and node in self._prefill:
            self.index.remove_node(node)

    def node_up(self, node: NodeId) -> None:
        self._set_healthy(node, True)

    def remove_node(self, node: NodeId) -> list[str]:
        """Drop `node` from the view (it left, died, or switches role). Its requests are
        finished here first (their count elsewhere goes too); their ids are returned so the
        adapter can fail, retry or migrate them."""
        ended = self.requests_on(node)
        for rid in ended:
            self.finished(rid, 0.0)
        book = self._prefill.pop(node, None)
        if book is not None:
            self.view.prefill.remove(book.view)
            self.index.remove_node(node)
            self.pending.forget(node)
        dbook = self._decode.pop(node, None)
        if dbook is not None:
            self.view.decode.remove(dbook.view)
        if book is None and dbook is None:
            raise LifecycleError(f"node {node} is not in the view")
        self.loads.rebuild(self.view)
        return ended

    def _set_healthy(self, node: NodeId, healthy: bool) -> None:
        pbook, dbook = self._prefill.get(node), self._decode.get(node)
        if pbook is None and dbook is None:
            raise LifecycleError(f"node {node} is not in the view")
        if pbook is not None:
            pbook.view.healthy = healthy
            self.loads.changed_prefill(pbook.view)
        if dbook is not None:
            dbook.view.healthy = healthy
            self.loads.changed_decode(dbook.view)

    def _pbook(self, node: NodeId) -> _PrefillBook:
        book = self._prefill.get(node)
        if book is None:
            raise LifecycleError(f"prefill node {node} is not in the view")
        return book

    def _dbook(self, node: NodeId) -> _DecodeBook:
        book = self._decode.get(node)
        if book is None:
            raise LifecycleError(f"decode node {node} is not in the view")
        return book

    # -- request transitions -----------------------------------------------------------------------
    def dispatched(self, info: RequestInfo, decision: Decision, now_s: float) -> Tracked:
        """An admitted decision: count the request in its prefill node's queue and as
        incoming on its decode node."""
        pc, dc = decision.prefill, decision.decode
        if pc is None or dc is None or decision.rejection is not None:
            raise LifecycleError(f"request {info.request_id}: only an admitted decision can be dispatched")
        rid = info.request_id
        if rid in self._requests:
            raise LifecycleError(f"request {rid} is already placed")
        pbook, dbook = self._pbook(pc.node), self._dbook(dc.node)
        t = Tracked(rid, pc.node, dc.node, info.input_tokens, info.expected_output_tokens, pc.service_s,
                    info.input_tokens - pc.reused_tokens, now_s, info.block_hashes, prefill_pending=True)
        self._requests[rid] = t
        if info.block_hashes:
            self.pending.add(pc.node, info.block_hashes)
            self.index.store_hit(pc.node, info.block_hashes)  # refreshes the store blocks it will load
        pbook.pending[rid] = t
        pbook.pending_s += pc.service_s
        pv = pbook.view
        busy = pv.busy_until_s
        pv.busy_until_s = (busy if busy > now_s else now_s) + pc.service_s
        pv.queued_requests += 1
        self.loads.changed_prefill(pv)
        dv = dbook.view
        dv.incoming += 1
        dv.incoming_tokens += info.input_tokens
        t.pending_kv = info.input_tokens
        dv.pending_kv_tokens += info.input_tokens
        dv.residents[rid] = DecodeResident(rid, info.input_tokens, now_s + pc.ttft_s, info.expected_output_tokens)
        _add_output(dv, info.expected_output_tokens, 1)
        self.loads.changed_decode(dv)
        return t

    def placed_on_decode(self, info: RequestInfo, node: NodeId, now_s: float) -> Tracked:
        """A request that needs no prefill node (colocated, or resumed after a decode node
        failed): it joins `node` next (`decode_joined`)."""
        rid = info.request_id
        if rid in self._requests:
            raise LifecycleError(f"request {rid} is already placed")
        dbook = self._dbook(node)
        t = Tracked(rid, None, node, info.input_tokens, info.expected_output_tokens, 0.0, 0, now_s)
        self._requests[rid] = t
        dbook.view.residents[rid] = DecodeResident(rid, info.input_tokens, now_s, info.expected_output_tokens)
        _add_output(dbook.view, info.expected_output_tokens, 1)
        return t

    def reserved(self, request_id: str, tokens: int) -> None:
        """The decode node reserved `tokens` of KV for the prompt (before its prefill)."""
        t = self._move(request_id, Phase.RESERVED)
        t.reserved_tokens = tokens
        book = self._decode[t.decode]
        book.unjoined_reserved += tokens
        book.view.pending_kv_tokens += tokens - t.pending_kv
        t.pending_kv = tokens
        self.loads.changed_decode(book.view)

    def prefill_started(self, request_id: str, now_s: float) -> None:
        self._move(request_id, Phase.PREFILLING)

    def prefill_done(self, request_id: str, now_s: float) -> None:
        """The prompt's KV is computed: the request leaves its prefill node's queue and, on
        its decode node, moves from incoming to waiting (its KV is landing)."""
        t = self._get(request_id)
        if t.phase is not Phase.PREFILLING or not t.prefill_pending:
            raise LifecycleError(f"request {request_id}: prefill_done in phase {t.phase.value}"
                                 + ("" if t.prefill_pending else " (prefill already done)"))
        self._leave_prefill(t, now_s, done=True)
        book = self._decode[t.decode]
        dv = book.view
        dv.incoming -= 1
        dv.incoming_tokens -= t.input_tokens
        t.in_transfer = True
        book.transferring += 1
        book.transferring_tokens += t.input_tokens
        dv.waiting += 1
        dv.waiting_tokens += t.input_tokens
        res = dv.residents.get(request_id)
        if res is not None:
            res.ready_at_s = now_s
        self.loads.changed_decode(dv)

    def decode_joined(self, request_id: str, now_s: float) -> None:
        """The request is in its decode node's running batch (its first token is out). A
        request dispatched and never reserved (colocated: the decode node computes the prompt
        itself) leaves its prefill queue and its decode node's incoming count here."""
        t = self._get(request_id)
        colocated = t.prefill_pending and t.phase is Phase.PLACED
        if t.prefill_pending and not colocated:
            raise LifecycleError(f"request {request_id}: decode_joined before its prefill is done")
        self._move(request_id, Phase.DECODING)
        book = self._decode[t.decode]
        dv = book.view
        n = t.input_tokens
        if colocated:
            self._leave_prefill(t, now_s, done=True)
            dv.incoming -= 1
            dv.incoming_tokens -= n
        if t.in_transfer:
            t.in_transfer = False
            book.transferring -= 1
            book.transferring_tokens -= n
            dv.waiting -= 1
            dv.waiting_tokens -= n
        book.unjoined_reserved -= t.reserved_tokens
        dv.pending_kv_tokens -= t.pending_kv
        t.pending_kv = 0
        t.held_tokens = t.reserved_tokens if t.reserved_tokens > n + 1 else n + 1
        t.reserved_tokens = 0
        book.joined += 1
        dv.joined_prompt_tokens += n
        dv.running += 1
        dv.tokens_in_flight += n + 1
        dv.reserved_tokens += t.held_tokens
        res = dv.residents.get(request_id)
        if res is not None:
            res.running = True
            res.ready_at_s = now_s
        self.loads.changed_decode(dv)

    def finished(self, request_id: str, now_s: float, generated_tokens: int = 0) -> Tracked:
        """The one cleanup path, from any phase: finished, failed, cancelled or rejected
        after placement. `generated_tokens`: tokens it generated on its decode node."""
        t = self._get(request_id)
        if t.prefill_pending:
            self._leave_prefill(t, now_s, done=False)
        book = self._decode.get(t.decode)
        if book is not None:
            dv = book.view
            n = t.input_tokens
            if t.phase is Phase.DECODING:
                book.joined -= 1
                dv.joined_prompt_tokens -= n
                grown = n + 1 + generated_tokens
                held = t.held_tokens if t.held_tokens > grown else grown
                dv.running = dv.running - 1 if dv.running > 0 else 0
                dv.tokens_in_flight = dv.tokens_in_flight - grown if dv.tokens_in_flight > grown else 0
                dv.reserved_tokens = dv.reserved_tokens - held if dv.reserved_tokens > held else 0
            elif t.in_transfer:
                book.transferring -= 1
                book.transferring_tokens -= n
                dv.waiting -= 1
                dv.waiting_tokens -= n
            elif t.prefill is not None:  # still incoming
                dv.incoming -= 1
                dv.incoming_tokens -= n
            book.unjoined_reserved -= t.reserved_tokens
            dv.pending_kv_tokens -= t.pending_kv
            if dv.residents.pop(request_id, None) is not None:
                _add_output(dv, t.expected_output_tokens, -1)
            self.loads.changed_decode(dv)
        t.phase = Phase.FINISHED
        del self._requests[request_id]
        return t

    def _leave_prefill(self, t: Tracked, now_s: float, *, done: bool) -> None:
        t.prefill_pending = False
        if t.block_hashes:
            self.pending.discard(t.prefill, t.block_hashes)  # type: ignore[arg-type]
        book = self._prefill.get(t.prefill)  # type: ignore[arg-type]
        if book is None:
            return
        book.pending.pop(t.request_id, None)
        pv = book.view
        pv.queued_requests -= 1
        if not book.pending:
            book.pending_s = 0.0  # no float drift across an idle period
            if done or pv.busy_until_s < now_s:
                pv.busy_until_s = now_s
            else:
                pv.busy_until_s = max(now_s, pv.busy_until_s - t.service_s)
        else:
            book.pending_s -= t.service_s
            if done:  # FIFO: the next one starts now
                pv.busy_until_s = now_s + book.pending_s
            else:
                left = pv.busy_until_s - t.service_s
                pv.busy_until_s = left if left > now_s else now_s
        self.loads.changed_prefill(pv)

    def _get(self, request_id: str) -> Tracked:
        t = self._requests.get(request_id)
        if t is None:
            raise LifecycleError(f"request {request_id} is not placed (or already finished)")
        return t

    def _move(self, request_id: str, phase: Phase) -> Tracked:
        t = self._get(request_id)
        if phase not in TRANSITIONS[t.phase]:
            raise LifecycleError(f"request {request_id}: {t.phase.value} -> {phase.value} is not a transition")
        t.phase = phase
        return t

    # -- heartbeats and KV events ---------------------------------------------------------------
    def heartbeat_prefill(self, node: NodeId, queued_prefill_tokens: int, now_s: float,
                          kv_event_seq: int | None = None, *, fallback_s_per_token: float = 0.0) -> bool:
        """What a prefill node reports: its uncomputed prompt tokens (queued and running) and
        its last published KV event; True when the index should be resynced.

        The requests it has seen (dispatched more than `heartbeat_lag_s` ago) are predicted
        to leave `predicted` tokens uncomputed by now, counted the way an engine counts them:
        the head of the FIFO part-way through the prompt tokens it computes, each one behind
        it its whole prompt (an engine applies a prefix hit when it admits the request). The
        difference from what the node reports, at the seen requests' mean predicted seconds
        per computed token, moves `busy_until_s`; exact predictions move nothing. Tokens of
        requests this object does not know (a conductor restart) cost
        `fallback_s_per_token` each."""
        book = self._pbook(node)
        pv = book.view
        if not book.pending and queued_prefill_tokens == 0:  # idle, as this object thinks: nothing to correct
            if pv.busy_until_s > now_s:
                pv.busy_until_s = now_s
                self.loads.changed_prefill(pv)
            return self._check_events(book, node, kv_event_seq)
        cutoff = now_s - self.heartbeat_lag_s
        seen_s = recent_s = 0.0
        seen_uncached = behind_tokens = 0
        head: Tracked | None = None
        for t in book.pending.values():
            if t.dispatched_at_s <= cutoff:
                if head is None:
                    head = t
                else:
                    behind_tokens += t.input_tokens
                seen_s += t.service_s
                seen_uncached += t.uncached_tokens
            else:
                recent_s += t.service_s
        left = pv.busy_until_s - now_s - recent_s  # predicted seconds left of the seen requests
        if left < 0.0:
            left = 0.0
        if head is None:
            left = queued_prefill_tokens * fallback_s_per_token
        else:
            rest_s = seen_s - head.service_s
            head_left = (left - rest_s) / head.service_s if head.service_s > 0 else 0.0
            head_left = 0.0 if head_left < 0.0 else 1.0 if head_left > 1.0 else head_left
            predicted = head.uncached_tokens * head_left + behind_tokens
            per_token = seen_s / seen_uncached if seen_uncached > 0 else fallback_s_per_token
            left += (queued_prefill_tokens - predicted) * per_token
            if left < 0.0:
                left = 0.0
        if left + recent_s > 0.0 or pv.busy_until_s > now_s:  # an idle node keeps when it went idle (ties)
            pv.busy_until_s = now_s + left + recent_s
            self.loads.changed_prefill(pv)
        return self._check_events(book, node, kv_event_seq)

    def _check_events(self, book: _PrefillBook, node: NodeId, kv_event_seq: int | None) -> bool:
        resync = False
        if kv_event_seq is not None:
            expected = self.index.next_seq(node)
            if kv_event_seq >= expected:  # the node published events the index has not applied
                if book.lag_seq == expected:  # and none arrived since the last heartbeat
                    self.index.mark_stale(node)
                    resync = True
                book.lag_seq = expected
            else:
                book.lag_seq = -1
        return resync

    def heartbeat_decode(self, node: NodeId, *, running: int, waiting: int, tokens_in_flight: int,
                         used_tokens: int, now_s: float, steps: DecodeSteps | None = None) -> DecodeSteps | None:
        """What a decode node reports: its batch, its own queue and the KV it holds (every
        block in use, reservations included), and the totals of the decode steps it ran;
        answers the steps run since its last report (None: none, or no totals), for the
        TBT calibration (`Scheduler.observe_decode_steps`)."""
        book = self._dbook(node)
        window = None
        if steps is not None:
            window = steps.since(book.steps)
            book.steps = steps
        dv = book.view
        dv.running = running
        dv.tokens_in_flight = tokens_in_flight
        book.node_waiting = waiting
        mean_prompt = dv.joined_prompt_tokens // book.joined if book.joined else 0
        queued_tokens = waiting * mean_prompt
        held = used_tokens - book.unjoined_reserved  # the joined requests', queued in the node or not
        dv.reserved_tokens = held if held > 0 else 0
        dv.waiting = book.transferring + waiting
        dv.waiting_tokens = book.transferring_tokens + queued_tokens
        self.loads.changed_decode(dv)
        return window

    def kv_event(self, event: KVEvent) -> ApplyStatus:
        """A KV event from a prefill node (its `node` and `seq` set), into the global prefix index."""
        return self.index.apply(event)

    def kv_snapshot(self, node: NodeId, block_hashes, next_seq: int, *, tier: str = "device") -> None:
        """A prefill node's whole cache on `tier`, as a new KV-event subscription begins: it
        replaces what the index holds for the node (the device tier's snapshot comes first
        and resets its sequence to `next_seq`; a lower tier's part only adds its blocks)."""
        if tier == "device":
            self.index.resync(node, block_hashes, next_seq)
        else:
            self.index.tier(tier).store(node, block_hashes)


def _add_output(dv: DecodeNodeView, expected_output_tokens: int | None, sign: int) -> None:
    """Count a resident's expected output in (`sign` 1) or out (-1) of `dv`'s sums."""
    if expected_output_tokens is None:
        dv.unsized_residents += sign
    else:
        dv.expected_output_tokens += sign * expected_output_tokens
