"""The two workloads every system replays, as Mooncake-format traces for ``bench.replay``.

- ``conversation``: ``../shared/traces/conversation_trace.jsonl`` scaled as
  ``bench.layouts`` scales it (a 512-token trace block -> 16 tokens, outputs x0.1 capped at
  64, prompts cut at 1,024 tokens, each 3-s timestamp burst spread over 3 s), the first
  ``requests`` arrivals.
- ``chat``: a seeded multi-turn chat workload with shared system prompts, written in replay
  tokens (one hash id per 16-token block, so the trace block *is* the replay block):
  ``system_prompts`` system prompts of ``system_blocks`` blocks; conversations start as a
  Poisson process, each picks a system prompt, and every turn's prompt is the system
  prompt + the earlier turns (user message, then the answer) + a new user message of
  2-6 blocks; answers are ``answer_tokens`` long (whole blocks); the next turn comes a
  think time after. Equal hash ids are equal tokens, so turns share their conversation's
  prefix and conversations share their system prompt.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from bench.replay.trace import TraceRecord
from bench.replay.workload import ScaleConfig, TraceWindow

TRACE = Path(__file__).resolve().parents[2].parent / "shared" / "traces" / "conversation_trace.jsonl"
BLOCK = 16


@dataclass(frozen=True, slots=True)
class WorkloadSpec:
    name: str
    trace: Path
    scale: ScaleConfig
    window: TraceWindow
    token_seed: int = 0  # run i maps hash ids with token_seed + i: workloads never share tokens


def conversation(requests: int, trace: Path = TRACE) -> WorkloadSpec:
    return WorkloadSpec("conversation", trace,
                        ScaleConfig(block_tokens=BLOCK, output_scale=0.1, max_output_tokens=64,
                                    max_input_tokens=1024, spread_ms=3000.0),
                        TraceWindow(0.0, None, requests))


@dataclass(frozen=True, slots=True)
class ChatShape:
    system_prompts: int = 4
    system_blocks: int = 16  # 256 tokens
    turns: tuple[int, int] = (2, 4)  # turns per conversation, inclusive
    user_blocks: tuple[int, int] = (2, 6)  # 32..96 tokens per user message
    answer_tokens: int = 32  # a multiple of BLOCK
    conversation_gap_s: float = 2.0  # mean seconds between conversation starts
    think_s: tuple[float, float] = (3.0, 8.0)


def chat_records(requests: int, seed: int = 0, shape: ChatShape = ChatShape()) -> list[TraceRecord]:
    """``requests`` chat turns in arrival order (see the module docstring)."""
    if requests < 1:
        raise ValueError(f"requests must be >= 1, got {requests}")
    if shape.answer_tokens % BLOCK:
        raise ValueError(f"answer_tokens must be a multiple of {BLOCK}, got {shape.answer_tokens}")
    rng = random.Random(seed)
    next_id = 0

    def ids(n: int) -> list[int]:
        nonlocal next_id
        out = list(range(next_id, next_id + n))
        next_id += n
        return out

    systems = [ids(shape.system_blocks) for _ in range(shape.system_prompts)]
    rows: list[tuple[int, int, list[int]]] = []  # (timestamp ms, output tokens, hash ids)
    start = 0.0
    while len(rows) < requests:
        start += rng.expovariate(1.0 / shape.conversation_gap_s)
        context = list(rng.choice(systems))
        t = start
        for turn in range(rng.randint(*shape.turns)):
            if turn:
                context += ids(shape.answer_tokens // BLOCK)  # the previous answer
                t += rng.uniform(*shape.think_s)
            context += ids(rng.randint(*shape.user_blocks))
            rows.append((round(t * 1000), shape.answer_tokens, list(context)))
    rows.sort(key=lambda r: r[0])
    rows = rows[:requests]
    return [TraceRecord(line=i + 1, timestamp_ms=ts, input_length=len(h) * BLOCK, output_length=out,
                        hash_ids=tuple(h)) for i, (ts, out, h) in enumerate(rows)]


def write_trace(records: list[TraceRecord], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for r in records:
            f.write(json.dumps({"timestamp": r.timestamp_ms, "input_length": r.input_length,
                                "output_length": r.output_length, "hash_ids": list(r.hash_ids)}) + "\n")
    return path


def chat(requests: int, out_dir: Path, seed: int = 0, shape: ChatShape = ChatShape()) -> WorkloadSpec:
    path = write_trace(chat_records(requests, seed, shape), out_dir / f"chat_trace_{requests}_{seed}.jsonl")
    return WorkloadSpec("chat", path, ScaleConfig(block_tokens=BLOCK, trace_block_tokens=BLOCK),
                        TraceWindow(0.0, None, requests), token_seed=1000)
