"""Engine benchmark: halfmoon vs Hugging Face transformers (and llama.cpp where installed).

Same prompts, same dtype (fp32), same thread count, one run. Each system runs in its own
spawned process, one measurement at a time, so peak RSS is per system and the two never
compete for the cores.

What is timed, the same way for every system:

* prefill: one 512-token prompt alone, from submission to its first token (a forward over the
  whole prompt; both compute the LM head on the last position only). The median of
  ``--prefill-repeats`` different prompts.
* decode at batch B: B prompts are prefilled (untimed), then ``--new-tokens`` steps in which
  all B sequences decode are timed one by one. ``tokens/s`` is B / (median step time), robust
  to the bursts of a shared machine; ``mean tok/s`` is B * steps / (time of all steps).
  HF's steps are timed inside one ``generate`` call (a stopping criterion stamps each new token).

    python -m bench.engine --json out/engine.json          # or: halfmoon bench engine ...
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

PROMPT_LEN = 512


@dataclass(frozen=True, slots=True)
class Row:
    system: str
    phase: str  # "prefill" | "decode"
    batch: int
    tokens_per_s: float  # prefill: median over prompts; decode: batch / median step time
    mean_tokens_per_s: float  # prefill: mean over prompts; decode: all tokens / all step time
    peak_rss_mb: float


@dataclass(frozen=True, slots=True)
class Timings:
    prefill_s: list[float]  # per prompt, batch-1 runs only
    step_s: list[float]  # per decode step with every sequence decoding


def _prompts(batch: int, vocab: int = 49152, seed: int = 0) -> list[list[int]]:
    import torch

    g = torch.Generator().manual_seed(seed + batch)
    return [torch.randint(100, vocab - 1, (PROMPT_LEN,), generator=g).tolist() for _ in range(batch)]


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _run_halfmoon(batch: int, new_tokens: int, threads: int, prefill_repeats: int, hf_attn: str) -> Timings:
    import torch

    from engine.config import EngineConfig
    from engine.engine import LLMEngine
    from engine.sampling import SamplingParams

    torch.set_num_threads(threads)
    max_tokens = new_tokens + batch + 1  # nobody finishes inside the timed window
    blocks = (batch + prefill_repeats) * (-(-(PROMPT_LEN + max_tokens + 1) // 16)) + 8
    eng = LLMEngine(config=EngineConfig(num_blocks=blocks, max_num_batched_tokens=PROMPT_LEN,
                                        max_num_seqs=max(batch, 1)))
    eng.generate([_prompts(1, seed=99)[0][:64]], SamplingParams(max_tokens=2))  # warm-up
    prefill_s = []
    if batch == 1:
        for i in range(prefill_repeats):
            t0 = time.perf_counter()
            eng.generate([_prompts(1, seed=1000 + i)[0]], SamplingParams(max_tokens=1))
            prefill_s.append(time.perf_counter() - t0)
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    for i, p in enumerate(_prompts(batch)):
        eng.add_request(f"b{i}", params, prompt_token_ids=p)
    while eng.stats().num_waiting or any(not r.output_token_ids for r in eng.scheduler.running):
        eng.step()  # each prompt is one 512-token chunk; all are prefilled after `batch` steps
    steps = []
    for _ in range(new_tokens):
        t0 = time.perf_counter()
        out = eng.step()
        steps.append(time.perf_counter() - t0)
        if len(out) != batch:
            raise RuntimeError(f"a decode step produced {len(out)} tokens, expected {batch}")
    return Timings(prefill_s, steps)


def _run_hf(batch: int, new_tokens: int, threads: int, prefill_repeats: int, hf_attn: str) -> Timings:
    import torch
    from transformers import AutoModelForCausalLM, StoppingCriteria, StoppingCriteriaList

    from engine.loader import resolve_model_dir

    class Stamp(StoppingCriteria):  # called once per generated token (all rows at once)
        def __init__(self) -> None:
            self.times: list[float] = []

        def __call__(self, input_ids, scores, **kwargs):
            self.times.append(time.perf_counter())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(str(resolve_model_dir()), dtype=torch.float32,
                                                 attn_implementation=hf_attn)
    model.eval()
    model.generation_config.eos_token_id = None

    def generate(prompts: list[list[int]], n: int) -> tuple[float, list[float]]:
        ids = torch.tensor(prompts)
        stamp = Stamp()
        t0 = time.perf_counter()
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                       pad_token_id=2, stopping_criteria=StoppingCriteriaList([stamp]))
        return t0, stamp.times

    with torch.no_grad():
        generate([_prompts(1, seed=99)[0][:64]], 2)  # warm-up
        prefill_s = []
        if batch == 1:
            for i in range(prefill_repeats):
                t0, times = generate([_prompts(1, seed=1000 + i)[0]], 1)
                prefill_s.append(times[0] - t0)
        _, times = generate(_prompts(batch), new_tokens + 1)
    return Timings(prefill_s, [b - a for a, b in zip(times, times[1:])])


def _run_llamacpp(batch: int, new_tokens: int, threads: int, prefill_repeats: int, hf_attn: str) -> Timings:
    from llama_cpp import Llama

    from engine.loader import gguf_path

    if batch != 1:
        raise ValueError("llama.cpp runs batch 1 only here")
    llm = Llama(model_path=str(gguf_path()), n_ctx=PROMPT_LEN + new_tokens + 8, n_threads=threads, verbose=False)
    prefill_s = []
    for i in range(prefill_repeats):
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(_prompts(1, seed=1000 + i)[0])
        prefill_s.append(time.perf_counter() - t0)
    steps = []
    for _ in range(new_tokens):
        t0 = time.perf_counter()
        llm.eval([llm.sample(temp=0.0)])
        steps.append(time.perf_counter() - t0)
    return Timings(prefill_s, steps)


RUNNERS = {"halfmoon": _run_halfmoon, "hf": _run_hf, "hf-sdpa": _run_hf, "llama.cpp": _run_llamacpp}


def _child(system: str, args: tuple, q) -> None:
    try:
        hf_attn = "sdpa" if system == "hf-sdpa" else "eager"
        t = RUNNERS[system](*args, hf_attn)
        q.put(("ok", t, _rss_mb()))
    except Exception as e:  # reported to the parent, which prints it and moves on
        q.put(("error", f"{type(e).__name__}: {e}", 0.0))


def measure(system: str, batch: int, new_tokens: int, threads: int, prefill_repeats: int = 3) -> tuple[Timings, float] | str:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_child, args=(system, (batch, new_tokens, threads, prefill_repeats), q))
    p.start()
    res = q.get()
    p.join()
    if res[0] == "error":
        return res[1]
    return res[1], res[2]


def rows_for(system: str, batch: int, t: Timings, rss: float) -> list[Row]:
    rows = []
    if t.prefill_s:
        rows.append(Row(system, "prefill", 1, PROMPT_LEN / statistics.median(t.prefill_s),
                        PROMPT_LEN * len(t.prefill_s) / sum(t.prefill_s), rss))
    rows.append(Row(system, "decode", batch, batch / statistics.median(t.step_s),
                    batch * len(t.step_s) / sum(t.step_s), rss))
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="halfmoon bench engine", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=Path, help="write the rows here")
    ap.add_argument("--batches", default="1,8,32", help="decode batch sizes")
    ap.add_argument("--new-tokens", type=int, default=32, help="decode steps timed per batch")
    ap.add_argument("--prefill-repeats", type=int, default=3, help="prompts prefilled alone (batch-1 runs)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--systems", default="halfmoon,hf,llama.cpp",
                    help="of halfmoon, hf (eager attention: the baseline), hf-sdpa, llama.cpp")
    args = ap.parse_args(argv)

    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table

    batches = [int(b) for b in args.batches.split(",")]
    systems = args.systems.split(",")
    rows: list[Row] = []
    console = Console()
    with Progress(console=console) as prog:
        task = prog.add_task("benchmarking", total=len(batches) * len(systems))
        for b in batches:
            for s in systems:
                if s == "llama.cpp" and b != 1:
                    prog.advance(task)
                    continue
                prog.update(task, description=f"{s} batch {b}")
                res = measure(s, b, args.new_tokens, args.threads, args.prefill_repeats)
                prog.advance(task)
                if isinstance(res, str):
                    console.print(f"[yellow]{s} skipped: {res}")
                    continue
                rows.extend(rows_for(s, b, *res))

    base = {(r.phase, r.batch): r for r in rows if r.system == "hf"}
    table = Table(title=f"engine throughput ({PROMPT_LEN}-token prompts, fp32, {args.threads} threads)")
    for col in ("system", "phase", "batch", "tokens/s", "x HF", "mean tok/s", "x HF (mean)", "peak RSS MB"):
        table.add_column(col, justify="right" if col not in ("system", "phase") else "left")
    ratios, mean_ratios = {}, {}
    for r in rows:
        ref = base.get((r.phase, r.batch))
        ratio = r.tokens_per_s / ref.tokens_per_s if ref else None
        mean_ratio = r.mean_tokens_per_s / ref.mean_tokens_per_s if ref else None
        if r.system == "halfmoon" and ref:
            ratios[f"{r.phase}_b{r.batch}"] = round(ratio, 3)
            mean_ratios[f"{r.phase}_b{r.batch}"] = round(mean_ratio, 3)
        table.add_row(r.system, r.phase, str(r.batch), f"{r.tokens_per_s:.1f}", f"{ratio:.2f}" if ref else "-",
                      f"{r.mean_tokens_per_s:.1f}", f"{mean_ratio:.2f}" if ref else "-", f"{r.peak_rss_mb:.0f}")
    console.print(table)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"rows": [asdict(r) for r in rows], "halfmoon_vs_hf": ratios,
                                         "halfmoon_vs_hf_mean": mean_ratios, "prompt_len": PROMPT_LEN,
                                         "threads": args.threads, "new_tokens": args.new_tokens}, indent=2))
        console.print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
