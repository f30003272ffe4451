"""Seeded workload generators in Mooncake's trace format (`bench.replay.trace.TraceRecord`).

Three shapes besides the released conversation trace, each a pure function of its seed:

- `tool_agent`: agent sessions over a dozen long shared system/tool prefixes with skewed
  (Zipf) popularity; each session extends its own history turn after turn (a tool result
  and the previous answer appended), sessions start in bursts. Most prompt blocks repeat.
- `uniform`: independent requests, lengths uniform in a range, Poisson arrivals, no prefix
  shared with any other request.
- `shifting`: a time-varying mix: the share of long-prompt/short-answer requests against
  short-prompt/long-answer ones swings over the run (a cosine), so the prompt/output ratio
  of the offered load, and the prefill:decode split it needs, shift while it runs.

Hash ids follow the format: one id per 512-token block of the prompt (the last one partial),
chained, so two prompts share leading ids exactly when they share that prefix. A block id
is never reused for another prefix.

    python -m bench.sim.workloads tool_agent --requests 12000 --seed 1 --out out/agent.jsonl
"""
from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from bench import flags
from bench.replay.trace import TraceRecord

BLOCK = 512  # tokens per trace hash id


class _Ids:
    """Fresh block ids, never repeated."""

    def __init__(self) -> None:
        self.next = 0

    def take(self, n: int) -> list[int]:
        start = self.next
        self.next += n
        return list(range(start, start + n))


def _blocks(tokens: int) -> int:
    return max(1, math.ceil(tokens / BLOCK))


def _records(rows: list[tuple[float, int, int, list[int]]]) -> list[TraceRecord]:
    """(arrival s, input, output, hash ids) rows -> records sorted by time, timestamps in ms
    from the first arrival."""
    rows.sort(key=lambda r: r[0])
    start = rows[0][0] if rows else 0.0
    return [TraceRecord(i + 1, int(round((t - start) * 1000.0)), n, out, tuple(ids))
            for i, (t, n, out, ids) in enumerate(rows)]


# -- tool-agent sessions ---------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class AgentShape:
    prefixes: int = 12  # shared system/tool prompts
    prefix_blocks: tuple[int, int] = (12, 40)  # each 6k-20k tokens, whole blocks
    zipf_s: float = 1.2  # popularity of the prefixes
    mean_turns: float = 12.0  # geometric, at least 1
    max_turns: int = 40
    user_tokens: tuple[int, int] = (100, 800)  # the first turn's own message
    tool_tokens_mean: float = 600.0  # appended per later turn (tool result + next message), log-normal
    output_mean: float = 160.0  # log-normal, 8 .. 1,500 tokens
    turn_gap_s: float = 6.0  # between a session's turns (log-normal mean)
    session_rate: float = 0.3  # sessions/s outside bursts
    burst_factor: float = 4.0  # sessions arrive this much faster in a burst
    calm_s: float = 120.0  # mean length of a calm spell
    burst_s: float = 20.0  # mean length of a burst
    max_input_tokens: int = 48_000  # a session ends when its context would pass this


def tool_agent(requests: int, seed: int = 0, shape: AgentShape = AgentShape()) -> list[TraceRecord]:
    """`requests` requests of agent sessions (the last session is cut to fit)."""
    rng = np.random.default_rng(seed)
    ids = _Ids()
    prefix_ids = [ids.take(int(rng.integers(shape.prefix_blocks[0], shape.prefix_blocks[1] + 1)))
                  for _ in range(shape.prefixes)]
    weights = 1.0 / np.arange(1, shape.prefixes + 1) ** shape.zipf_s
    weights /= weights.sum()
    rows: list[tuple[float, int, int, list[int]]] = []
    t, bursting = 0.0, False
    spell_end = rng.exponential(shape.calm_s)
    while len(rows) < requests:
        rate = shape.session_rate * (shape.burst_factor if bursting else 1.0)
        t += rng.exponential(1.0 / rate)
        while t > spell_end:  # switch between calm and burst spells
            bursting = not bursting
            spell_end += rng.exponential(shape.burst_s if bursting else shape.calm_s)
        prefix = prefix_ids[int(rng.choice(shape.prefixes, p=weights))]
        turns = min(shape.max_turns, int(rng.geometric(1.0 / shape.mean_turns)))
        history = len(prefix) * BLOCK  # tokens; the prefix is whole blocks
        full_ids = list(prefix)  # ids of the full blocks of the history so far
        tail = int(rng.integers(shape.user_tokens[0], shape.user_tokens[1] + 1))
        at = t
        for turn in range(turns):
            if len(rows) >= requests:
                break
            n = history + tail
            if n > shape.max_input_tokens:
                break
            total = _blocks(n)
            own = ids.take(total - len(full_ids))  # new blocks, the last one partial
            prompt_ids = full_ids + own
            out = int(np.clip(rng.lognormal(math.log(shape.output_mean) - 0.5, 1.0), 8, 1500))
            rows.append((at, n, out, prompt_ids))
            # the next turn's prompt: this prompt + its answer + a tool result; the blocks that
            # were full in this prompt stay, the partial one changes
            history = n + out
            full_ids = prompt_ids[: n // BLOCK]
            tail = int(np.clip(rng.lognormal(math.log(shape.tool_tokens_mean) - 0.5, 1.0), 20, 8000))
            at += rng.lognormal(math.log(shape.turn_gap_s) - 0.5, 1.0)
    return _records(rows)


# -- uniform, no reuse -------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class UniformShape:
    input_tokens: tuple[int, int] = (1_000, 12_000)
    output_tokens: tuple[int, int] = (20, 700)
    rate: float = 3.5  # requests/s, Poisson


def uniform(requests: int, seed: int = 0, shape: UniformShape = UniformShape()) -> list[TraceRecord]:
    rng = np.random.default_rng(seed)
    gaps = rng.exponential(1.0 / shape.rate, requests)
    ins = rng.integers(shape.input_tokens[0], shape.input_tokens[1] + 1, requests)
    outs = rng.integers(shape.output_tokens[0], shape.output_tokens[1] + 1, requests)
    t = np.cumsum(gaps)  # increasing: already in arrival order
    # as `_records` and `_blocks` compute them, a whole array at a time (the same floats)
    stamps = np.rint((t - t[0]) * 1000.0).astype(np.int64) if requests else t
    blocks = np.maximum(1, np.ceil(ins / BLOCK)).astype(np.int64)
    firsts = np.cumsum(blocks) - blocks
    return [TraceRecord(i + 1, ts, n, out, tuple(range(first, first + b)))
            for i, (ts, n, out, first, b) in enumerate(zip(stamps.tolist(), ins.tolist(), outs.tolist(),
                                                            firsts.tolist(), blocks.tolist()))]


# -- a shifting prompt/output mix ---------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class ShiftingShape:
    # long prompts, short answers (prefill-heavy) ...
    long_input: tuple[int, int] = (8_000, 16_000)
    short_output: tuple[int, int] = (16, 96)
    # ... against short prompts, long answers (decode-heavy)
    short_input: tuple[int, int] = (200, 1_200)
    long_output: tuple[int, int] = (400, 1_600)
    prefill_heavy_rate: float = 8.0  # requests/s when the mix is all prefill-heavy
    decode_heavy_rate: float = 40.0  # requests/s when it is all decode-heavy
    period_s: float = 600.0  # one full swing of the mix
    shared_prefix_blocks: int = 4  # a system prompt every request opens with (some reuse)
    sharpness: float = 0.0  # 0: a cosine swing; > 0: flatter plateaus at each end, steeper turns


def prefill_heavy_share(t_s: float, shape: ShiftingShape) -> float:
    """Share of prefill-heavy requests at `t_s`: 1 at the start, 0 half a period later."""
    c = math.cos(2.0 * math.pi * t_s / shape.period_s)
    if shape.sharpness > 0:
        c = math.tanh(shape.sharpness * c) / math.tanh(shape.sharpness)
    return 0.5 + 0.5 * c


def shifting_requests(periods: float, shape: ShiftingShape = ShiftingShape()) -> int:
    """About how many requests `shifting` makes in `periods` full swings of its mix: the two
    streams' rates average to half their sum over a period (the share's swing is symmetric)."""
    return max(2, round(periods * shape.period_s * 0.5 * (shape.prefill_heavy_rate + shape.decode_heavy_rate)))


def shifting(requests: int, seed: int = 0, shape: ShiftingShape = ShiftingShape()) -> list[TraceRecord]:
    """Two Poisson streams whose rates swing in opposite phase (thinning of the fastest)."""
    rng = np.random.default_rng(seed)
    ids = _Ids()
    system = ids.take(shape.shared_prefix_blocks)
    top = max(shape.prefill_heavy_rate, shape.decode_heavy_rate)
    rows: list[tuple[float, int, int, list[int]]] = []
    t = 0.0
    while len(rows) < requests:
        t += rng.exponential(1.0 / (2.0 * top))
        share = prefill_heavy_share(t, shape)
        u = rng.random() * 2.0 * top
        if u < shape.prefill_heavy_rate * share:
            n = int(rng.integers(shape.long_input[0], shape.long_input[1] + 1))
            out = int(rng.integers(shape.short_output[0], shape.short_output[1] + 1))
        elif u < shape.prefill_heavy_rate * share + shape.decode_heavy_rate * (1.0 - share):
            n = int(rng.integers(shape.short_input[0], shape.short_input[1] + 1))
            out = int(rng.integers(shape.long_output[0], shape.long_output[1] + 1))
        else:
            continue
        total = _blocks(n)
        shared = min(len(system), n // BLOCK)
        rows.append((t, n, out, system[:shared] + ids.take(total - shared)))
    return _records(rows)


GENERATORS: dict[str, Callable[..., list[TraceRecord]]] = {
    "tool_agent": tool_agent,
    "uniform": uniform,
    "shifting": shifting,
}


# -- statistics and files ----------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class TraceStats:
    requests: int
    span_s: float
    mean_input_tokens: float
    mean_output_tokens: float
    repeat_fraction: float  # prompt blocks seen before in the trace
    distinct_first_blocks: int


def repeated_share(chains: Iterable[Sequence[int]]) -> float:
    """Share of the blocks of these hash chains seen before: the hit rate of an unbounded cache."""
    seen: set[int] = set()
    total = repeats = 0
    for chain in chains:
        for h in chain:
            total += 1
            if h in seen:
                repeats += 1
            else:
                seen.add(h)
    return repeats / total if total else 0.0


def stats(records: Sequence[TraceRecord]) -> TraceStats:
    n = len(records)
    return TraceStats(
        requests=n,
        span_s=(records[-1].timestamp_ms - records[0].timestamp_ms) / 1000.0 if n else 0.0,
        mean_input_tokens=sum(r.input_length for r in records) / n if n else 0.0,
        mean_output_tokens=sum(r.output_length for r in records) / n if n else 0.0,
        repeat_fraction=repeated_share(r.hash_ids for r in records),
        distinct_first_blocks=len({r.hash_ids[0] for r in records if r.hash_ids}),
    )


def write_trace(records: Sequence[TraceRecord], path: str | Path) -> None:
    """One JSON object per line, as Mooncake's released traces."""
    with Path(path).open("w", encoding="utf-8") as fh:
        for r in records:
            fh.write(json.dumps({"timestamp": r.timestamp_ms, "input_length": r.input_length,
                                 "output_length": r.output_length, "hash_ids": list(r.hash_ids)}) + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.sim.workloads", description=__doc__.split("\n\n")[0])
    p.add_argument("shape", choices=sorted(GENERATORS))
    p.add_argument("--requests", type=flags.count(1), default=12_000)
    p.add_argument("--seed", type=flags.SEED, default=0)
    p.add_argument("--out", type=Path, required=True, help="JSONL trace to write")
    args = p.parse_args(argv)
    return flags.run(p.prog, lambda: _main(args))


def _main(args: argparse.Namespace) -> int:
    records = GENERATORS[args.shape](args.requests, seed=args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_trace(records, args.out)
    s = stats(records)
    print(f"{args.shape}: {s.requests} requests over {s.span_s:.0f} s, mean input {s.mean_input_tokens:.0f} / "
          f"output {s.mean_output_tokens:.0f} tokens, repeat fraction {s.repeat_fraction:.1%} -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
