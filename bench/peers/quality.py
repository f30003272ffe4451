"""Output quality side by side: a fixed prompt set, greedy, each system vs halfmoon fp32.

Every prompt is one user message rendered with the model's chat template into token ids by
halfmoon's tokenizer, so every system gets identical prompt tokens. The reference is
halfmoon's fp32 engine in this process (the dequantized GGUF, the model's own dtype
after dequantization); each system answers through the same HTTP client with EOS honoured
(``ignore_eos=False``). Compared per prompt: whether the answers are identical token for
token (end-of-sequence ids stripped), and the first position where they differ (the
shorter length when one is a prefix of the other; the full length when identical).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

PROMPTS = (
    "What is the capital of France?",
    "What is 12 times 7?",
    "Name three primary colors.",
    "Translate 'good morning' into Spanish.",
    "Write a haiku about the sea.",
    "What is the boiling point of water in Celsius?",
    "Who wrote Romeo and Juliet?",
    "Give me a synonym for 'happy'.",
    "What is the largest planet in the solar system?",
    "Explain what a CPU does in one sentence.",
    "List the days of the week.",
    "What is the square root of 81?",
)
MAX_TOKENS = 32


@dataclass(frozen=True, slots=True)
class Comparison:
    prompts: int
    exact: int  # answers identical to the reference
    mean_first_divergence: float  # tokens
    first_answer: str  # the decoded answer to PROMPTS[0]

    @property
    def exact_share(self) -> float:
        return self.exact / self.prompts if self.prompts else 0.0


def first_divergence(a: Sequence[int], b: Sequence[int]) -> int:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return min(len(a), len(b))


def strip_eos(ids: Sequence[int], eos: set[int]) -> list[int]:
    out = list(ids)
    while out and out[-1] in eos:
        out.pop()
    return out


def compare(answers: Sequence[Sequence[int]], reference: Sequence[Sequence[int]], eos: set[int],
            decode=lambda ids: "") -> Comparison:
    if len(answers) != len(reference):
        raise ValueError(f"{len(answers)} answers for {len(reference)} reference answers")
    a = [strip_eos(x, eos) for x in answers]
    r = [strip_eos(x, eos) for x in reference]
    exact = sum(x == y for x, y in zip(a, r))
    div = [first_divergence(x, y) for x, y in zip(a, r)]
    return Comparison(len(a), exact, sum(div) / len(div) if div else 0.0, decode(a[0]) if a else "")


@dataclass(frozen=True, slots=True)
class Reference:
    prompts: list[list[int]]  # chat-templated token ids
    answers: list[list[int]]  # halfmoon fp32, greedy
    eos: set[int]
    decode: object  # ids -> text


def reference(model: str = "smollm2-135m-instruct", threads: int = 2) -> Reference:
    """Render the prompts and answer them with halfmoon's fp32 engine in this process."""
    from engine.config import EngineConfig
    from engine.engine import LLMEngine
    from engine.sampling import SamplingParams
    from engine.tokenizer import Message

    eng = LLMEngine(model, EngineConfig(dtype="float32", num_threads=threads))
    prompts = [eng.tokenizer.encode_chat([Message("user", p)]) for p in PROMPTS]
    answers = eng.generate(prompts, SamplingParams(max_tokens=MAX_TOKENS))
    return Reference(prompts, answers, set(eng.model_config.eos_token_ids), eng.tokenizer.decode)


async def answers(client, prompts: Sequence[Sequence[int]]) -> list[list[int]]:
    """Greedy answers, one prompt at a time (``client`` built with ``ignore_eos=False``)."""
    out = []
    for i, prompt in enumerate(prompts):
        ids: list[int] = []
        async for event in client.generate(f"quality-{i}", list(prompt), MAX_TOKENS):
            ids.extend(event.token_ids)
        out.append(ids)
    return out
