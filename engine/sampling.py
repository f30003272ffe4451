"""Sampling parameters (validated) and the sampler that turns logits into token ids.

A row of logits becomes a token in this order (vLLM's): its log-softmax is kept first when
the request asks for logprobs (`engine.logprobs`: raw, before anything below); then the
grammar mask (`engine.structured`), logit_bias and the penalties (`engine.penalties`), the
temperature, top-k, top-p, and the draw. A request asking none of these extras takes the
plain path, unchanged. `n` > 1 parallel samples draw their first tokens from the same row
(one prompt computation), each with its own generator (seed + index when seeded).

The draw for output position k is made with the generator seeded from (seed, k)
(`SamplerState.generator_for_draw`), not from a stream that runs on: a node that takes over
a request after k tokens (the decode node after the prefill node's first token, a migrated
request, tokens a grammar forced without a draw) draws what one engine alone would have.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from engine.errors import InvalidRequestError
from engine.logprobs import MAX_TOP_LOGPROBS, TokenLogprob, log_softmax, token_logprob
from engine.penalties import LogitAdjustments
from engine.structured.constraint import Constraint

if TYPE_CHECKING:  # (for the annotation only)
    from engine.structured.matcher import GrammarState


# Bounds every layer checks (`SamplingParams.validate`), chosen so that every accepted value
# survives the wire unchanged in meaning: the gRPC `SamplingParams` carries max_tokens, top_k
# and stop_token_ids as int32, seed as int64, temperature and top_p as float32.
#
# MAX_TEMPERATURE: above ~100 the softmax of a real model's logits (a spread of a few tens) is
# uniform to within a few percent, so a larger value (1e30, inf) is a client's mistake, not a
# setting. OpenAI's limit of 2 is stricter than some clients send; vLLM sets none.
MAX_TEMPERATURE = 100.0
MAX_N = 128  # parallel samples per request the engine takes; front doors set a lower limit of their own
MAX_PENALTY = 2.0  # presence / frequency penalties in [-2, 2] (OpenAI's range)
MAX_REPETITION_PENALTY = 10.0
MAX_LOGIT_BIAS = 100.0  # |bias| (OpenAI's range)
MAX_LOGIT_BIAS_ENTRIES = 4096
INT32_MAX = 2**31 - 1
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def show_value(v: object) -> str:
    """A `repr` for error messages that stays short and cannot fail (str() of an int over 4,300 digits raises)."""
    if _is_int(v) and not -(10**30) < v < 10**30:
        return f"an integer of {v.bit_length()} bits"
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def _as_float32(x: float) -> float:
    return struct.unpack("<f", struct.pack("<f", x))[0]


def _int_in(field: str, v: object, lo: int, hi: int, what: str) -> None:
    if not _is_int(v) or not lo <= v <= hi:
        raise InvalidRequestError(field, f"must be {what}, got {show_value(v)}")


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How to pick each next token and when to stop.

    temperature == 0 means greedy; any positive temperature up to `MAX_TEMPERATURE` is
    honoured (a tiny one tends to greedy: 1e-40 picks the argmax). `seed` makes a sampled
    request reproducible on its own, whatever else shares its batch.
    """

    max_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    n: int = 1  # parallel samples of the same prompt
    logprobs: int | None = None  # None: off; k: each token's logprob and the top k (0 <= k <= 20)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0  # 1 = off
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias) pairs
    constraint: Constraint | None = None  # structured output (JSON, regex, choice, grammar)

    def validate(self) -> None:
        """Raise `InvalidRequestError` naming the first bad field; never anything else,
        whatever the fields hold (wrong types, NaN, integers of any size)."""
        _int_in("max_tokens", self.max_tokens, 1, INT32_MAX, f"an integer in [1, {INT32_MAX}]")
        t = self.temperature
        if not _is_real(t) or not 0 <= t <= MAX_TEMPERATURE:  # also refuses NaN and inf
            raise InvalidRequestError("temperature", f"must be a number in [0, {MAX_TEMPERATURE:g}], got {show_value(t)}")
        _int_in("top_k", self.top_k, 0, INT32_MAX, f"an integer in [0, {INT32_MAX}] (0 disables it)")
        p = self.top_p
        if not _is_real(p) or not 0 < p <= 1:
            raise InvalidRequestError("top_p", f"must be in (0, 1], got {show_value(p)}")
        if _as_float32(float(p)) == 0.0:
            raise InvalidRequestError("top_p", f"must be in (0, 1], got {show_value(p)}, which is 0 in the float32 "
                                               "the cluster carries it in (the smallest is about 1.4e-45)")
        if self.seed is not None:
            _int_in("seed", self.seed, INT64_MIN, INT64_MAX, "a 64-bit signed integer")
        if not isinstance(self.stop, (tuple, list)) or not all(isinstance(s, str) for s in self.stop):
            raise InvalidRequestError("stop", f"must be a list of strings, got {show_value(self.stop)}")
        for s in self.stop:
            if not s:
                raise InvalidRequestError("stop", "stop strings must be non-empty")
            try:
                s.encode("utf-8")
            except UnicodeEncodeError:
                raise InvalidRequestError("stop", f"{show_value(s)} is not valid Unicode (a lone surrogate)") from None
        if not isinstance(self.stop_token_ids, (tuple, list)):
            raise InvalidRequestError("stop_token_ids", f"must be a list of integers, got {show_value(self.stop_token_ids)}")
        for tid in self.stop_token_ids:
            _int_in("stop_token_ids", tid, 0, INT32_MAX, f"token ids in [0, {INT32_MAX}]")
        if not isinstance(self.ignore_eos, bool):
            raise InvalidRequestError("ignore_eos", f"must be true or false, got {show_value(self.ignore_eos)}")
        _int_in("n", self.n, 1, MAX_N, f"an integer in [1, {MAX_N}]")
        if self.logprobs is not None:
            _int_in("logprobs", self.logprobs, 0, MAX_TOP_LOGPROBS,
                    f"an integer in [0, {MAX_TOP_LOGPROBS}] (how many top alternatives), or unset")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not _is_real(v) or not -MAX_PENALTY <= v <= MAX_PENALTY:
                raise InvalidRequestError(name, f"must be a number in [-{MAX_PENALTY:g}, {MAX_PENALTY:g}], "
                                                f"got {show_value(v)}")
        r = self.repetition_penalty
        if not _is_real(r) or not 0 < r <= MAX_REPETITION_PENALTY:
            raise InvalidRequestError("repetition_penalty", f"must be in (0, {MAX_REPETITION_PENALTY:g}] "
                                                            f"(1 disables it), got {show_value(r)}")
        self._validate_logit_bias()
        if self.constraint is not None:
            if not isinstance(self.constraint, Constraint):
                raise InvalidRequestError("constraint", f"must be a Constraint, got {show_value(self.constraint)}")
            self.constraint.validate(self.constraint.field_name)

    def _validate_logit_bias(self) -> None:
        bias = self.logit_bias
        if not isinstance(bias, (tuple, list)):
            raise InvalidRequestError("logit_bias", f"must be (token id, bias) pairs, got {show_value(bias)}")
        if len(bias) > MAX_LOGIT_BIAS_ENTRIES:
            raise InvalidRequestError("logit_bias", f"{len(bias)} entries; the limit is {MAX_LOGIT_BIAS_ENTRIES}")
        seen: set[int] = set()
        for entry in bias:
            if not isinstance(entry, (tuple, list)) or len(entry) != 2:
                raise InvalidRequestError("logit_bias", f"entries must be (token id, bias) pairs, got {show_value(entry)}")
            tid, value = entry
            _int_in("logit_bias", tid, 0, INT32_MAX, f"keyed by token ids in [0, {INT32_MAX}]")
            if tid in seen:
                raise InvalidRequestError("logit_bias", f"token id {tid} is given twice")
            seen.add(tid)
            if not _is_real(value) or not -MAX_LOGIT_BIAS <= value <= MAX_LOGIT_BIAS:
                raise InvalidRequestError(f"logit_bias.{tid}", f"must be a number in [-{MAX_LOGIT_BIAS:g}, "
                                                               f"{MAX_LOGIT_BIAS:g}], got {show_value(value)}")

    def check_vocab(self, vocab_size: int) -> None:
        """The token ids this request names exist in a vocabulary of `vocab_size`."""
        bad = next((t for t, _ in self.logit_bias if t >= vocab_size), None)
        if bad is not None:
            raise InvalidRequestError("logit_bias", f"token id {bad} outside [0, {vocab_size})")

    @property
    def plain(self) -> bool:
        """None of the extras (logprobs, penalties, bias, constraint, n > 1): the fast path."""
        return (self.n == 1 and self.logprobs is None and self.constraint is None and not self.logit_bias
                and self.presence_penalty == 0 and self.frequency_penalty == 0 and self.repetition_penalty == 1)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def _seed_for(seed: int, index: int) -> int:
    """Sample `index`'s seed: `seed + index`, wrapped into int64."""
    return (seed + index - INT64_MIN) % 2**64 + INT64_MIN


_M64 = 2**64 - 1


def _mix(seed: int, position: int) -> int:
    """splitmix64 of (seed, position): the generator seed of one draw, in [0, 2**64)."""
    z = (seed + (position + 1) * 0x9E3779B97F4A7C15) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


@dataclass(slots=True)
class SamplerState:
    """Per-request sampling state: its random generator, and when the request asks for them,
    its grammar position, its penalty counts, the logprob of the token just sampled, and the
    states of its parallel samples until their first tokens are drawn (`forks`)."""

    generator: torch.Generator | None = field(default=None)
    seed: int = 0  # of a sampled request (its own, or drawn at random)
    position: int = 0  # output tokens so far: the next draw is for this position
    redraws: int = 0  # draws made at this position (the engine makes one; a direct caller may make more)
    grammar: "GrammarState | None" = None  # engine.structured.matcher
    adjust: LogitAdjustments | None = None
    logprobs: int | None = None  # None: off; else how many top alternatives to report
    forks: list["SamplerState"] = field(default_factory=list)
    fork_tokens: list[int] = field(default_factory=list)
    logprob: TokenLogprob | None = None  # of the token sampled last (set by `sample`)

    @classmethod
    def for_params(cls, params: SamplingParams, index: int = 0, *, prompt: list[int] | tuple[int, ...] = (),
                   vocab_size: int = 0, grammar=None) -> "SamplerState":
        gen, seed = None, 0
        if not params.greedy:
            gen = torch.Generator()
            seed = _seed_for(params.seed, index) if params.seed is not None else int(torch.randint(0, 2**62, (1,)).item())
        adjust = None
        if not params.plain:
            adjust = LogitAdjustments.create(vocab_size, presence=params.presence_penalty,
                                             frequency=params.frequency_penalty,
                                             repetition=params.repetition_penalty, logit_bias=params.logit_bias,
                                             prompt=prompt)
        return cls(gen, seed, 0, 0, grammar, adjust, params.logprobs)

    @property
    def plain(self) -> bool:
        return self.grammar is None and self.adjust is None and self.logprobs is None and not self.forks

    def accept(self, token: int) -> bool:
        """`token` joined the output: count it and advance the grammar. False if the grammar
        does not allow it (`grammar.error` says why)."""
        self.position += 1
        self.redraws = 0
        if self.adjust is not None:
            self.adjust.accept(token)
        return self.grammar.consume(token) if self.grammar is not None else True

    def accept_forced(self, token: int) -> None:
        """`token` joined the output as the grammar forced it (the grammar has consumed it)."""
        self.position += 1
        self.redraws = 0
        if self.adjust is not None:
            self.adjust.accept(token)

    def generator_for_draw(self) -> torch.Generator | None:
        """The generator for the draw at `position` (None when greedy)."""
        if self.generator is not None:
            self.generator.manual_seed(_mix(self.seed ^ (self.redraws * 0xD1B54A32D192ED03 & _M64), self.position))
            self.redraws += 1
        return self.generator

    def take_logprob(self) -> TokenLogprob | None:
        lp, self.logprob = self.logprob, None
        return lp


def _finite_logits(logits: torch.Tensor) -> torch.Tensor:
    """Logits every row of which has a finite maximum, picking what the row meant: NaN
    entries are never picked, a row with +inf entries picks among those alone, and a row
    with nothing else left (all -inf or NaN) is uniform."""
    neg = float("-inf")
    x = torch.where(torch.isnan(logits), neg, logits)
    pos = torch.isposinf(x)
    x = torch.where(pos.any(-1, keepdim=True), torch.where(pos, 0.0, neg), x)
    return torch.where(torch.isneginf(x).all(-1, keepdim=True), 0.0, x)


def _finite_row(row: np.ndarray, allowed: np.ndarray | None) -> np.ndarray:
    """`_finite_logits` for one row, keeping to the tokens the grammar allows."""
    if np.isfinite(row.max()):  # the max is NaN if any entry is: no NaN, no +inf, not all -inf
        return row
    row = _finite_logits(torch.from_numpy(row).unsqueeze(0))[0].numpy()
    if allowed is not None and allowed.any():
        row = np.where(allowed, row, -np.inf)
    return row


def _draw(row: torch.Tensor, p: SamplingParams, gen: torch.Generator | None) -> int:
    """One token from a float64 row whose maximum is finite."""
    if p.greedy:
        return int(torch.argmax(row).item())
    row = (row - row.max()) / p.temperature
    if 0 < p.top_k < row.numel():
        kth = torch.topk(row, p.top_k).values[-1]
        row = row.masked_fill(row < kth, float("-inf"))
    probs = torch.softmax(row, dim=-1)
    if p.top_p < 1.0:
        sorted_p, idx = torch.sort(probs, descending=True)
        cum = torch.cumsum(sorted_p, dim=-1)
        # keep the smallest set whose mass reaches top_p (always keep the first)
        drop = (cum - sorted_p) >= p.top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(0, idx, sorted_p)
    return int(torch.multinomial(probs, 1, generator=gen).item())


def _pick(row: np.ndarray, p: SamplingParams, gen: torch.Generator | None) -> int:
    return int(np.argmax(row)) if p.greedy else _draw(torch.from_numpy(row), p, gen)


def _greedy_allowed(row: np.ndarray, allowed: np.ndarray) -> int | None:
    """The greedy pick among the allowed tokens of a float32 row, looking at those alone (a
    grammar usually allows a few hundred of 49k); None when they have no finite maximum."""
    idx = np.flatnonzero(allowed)
    if not idx.size:
        return None
    vals = row[idx]
    j = int(np.argmax(vals))
    return int(idx[j]) if np.isfinite(vals[j]) and not np.isnan(vals).any() else None


def checks_greedy_pick(p: SamplingParams, st: SamplerState) -> bool:
    """A constrained request whose token is the plain greedy pick whenever the grammar allows
    that pick (greedy, no bias or penalties, no parallel samples): its pick is checked against
    the grammar first and a mask is computed only when the grammar refuses it. The same token
    as masking first: the row's first maximum, if allowed, is also the masked row's."""
    return st.grammar is not None and p.greedy and st.adjust is None and not st.forks


def _sample_row(raw: torch.Tensor, host: np.ndarray, p: SamplingParams, st: SamplerState,
                greedy_id: int | None = None, stats=None) -> int:
    """A request with extras: logprobs (raw), grammar mask, bias and penalties, then the draw;
    its parallel samples' first tokens come from the same processed row. `host` is the raw
    row as float32 numpy: the row is worked on in numpy, on one thread, where torch would hand
    each 49k-element op to its thread pool (milliseconds a row on a loaded machine)."""
    lsm = log_softmax(raw) if st.logprobs is not None else None
    if greedy_id is not None and checks_greedy_pick(p, st):
        ok = st.grammar.allows(greedy_id)
        if stats is not None:
            stats.checks += 1
            stats.check_misses += not ok
        if ok:
            st.grammar.drop_pending()
            if lsm is not None:
                st.logprob = token_logprob(lsm, greedy_id, st.logprobs)
            return greedy_id
    allowed = st.grammar.take_mask() if st.grammar is not None else None
    token = None
    if allowed is not None and p.greedy and st.adjust is None and not st.forks:
        token = _greedy_allowed(host, allowed)  # the same token as the full path below
    if token is None:
        if allowed is not None:
            row = np.full(host.shape, -np.inf)
            idx = np.flatnonzero(allowed)
            row[idx] = host[idx]
        else:
            row = host.astype(np.float64)
        if st.adjust is not None:
            row = st.adjust.apply(row)
        row = _finite_row(row, allowed)
        token = _pick(row, p, st.generator_for_draw())
    if lsm is not None:
        st.logprob = token_logprob(lsm, token, st.logprobs)
    if st.forks:
        st.fork_tokens = []
        for fork in st.forks:
            t = _pick(row, p, fork.generator_for_draw())
            st.fork_tokens.append(t)
            if lsm is not None:
                fork.logprob = token_logprob(lsm, t, fork.logprobs)
    return token


def _host_rows(logits: torch.Tensor) -> np.ndarray:
    x = logits.detach()
    if x.device.type != "cpu":
        x = x.cpu()
    if x.dtype != torch.float32:
        x = x.float()
    return x.numpy()


def sample(logits: torch.Tensor, params: list[SamplingParams], states: list[SamplerState], mask_stats=None) -> list[int]:
    """Pick one token per row of `logits` ([batch, vocab]). Safe for every value
    `SamplingParams.validate` accepts and for any logits, inf and NaN included: the row's
    maximum is subtracted before dividing by the temperature (every scaled logit is <= 0, the
    best is 0, so nothing overflows however small the temperature) and the sampled rows are
    computed in float64, so the probabilities are finite and sum to at least 1. The checks
    and greedy picks run in numpy on the host rows (torch's elementwise ops over [batch, 49k]
    went to its thread pool: ~14 ms for isfinite().all() on a loaded 2-core machine, 70 us in
    numpy)."""
    host = _host_rows(logits)
    rows = host
    finite = np.isfinite(host.max(axis=-1))
    if not finite.all():  # a row's max is NaN if any entry is, inf if one is +inf
        rows = _finite_logits(torch.from_numpy(host)).numpy()
    out: list[int] = []
    greedy_ids = rows.argmax(axis=-1).tolist()
    for i, (p, st) in enumerate(zip(params, states)):
        if not st.plain:
            out.append(_sample_row(logits[i], host[i], p, st, greedy_ids[i] if finite[i] else None, mask_stats))
        elif p.greedy:
            out.append(greedy_ids[i])
        else:
            out.append(_draw(torch.from_numpy(rows[i].astype(np.float64)), p, st.generator_for_draw()))
    return out
