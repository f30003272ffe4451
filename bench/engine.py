"""Engine benchmark: halfmoon vs Hugging Face transformers (and llama.cpp where installed).

Same prompts, same dtype (fp32), same thread count, one run. Each system runs in its own
spawned process, one measurement at a time, so peak RSS is per system and the two never
compete for the cores.

    python -m bench.engine --json out/engine.json          # or: halfmoon bench engine ...
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import time
from dataclasses import asdict, dataclass
from pathlib import Path

PROMPT_LEN = 512


@dataclass(frozen=True, slots=True)
class Row:
    system: str
    phase: str  # "prefill" | "decode"
    batch: int
    tokens_per_s: float
    peak_rss_mb: float


def _prompts(batch: int, vocab: int = 49152, seed: int = 0) -> list[list[int]]:
    import torch

    g = torch.Generator().manual_seed(seed + batch)
    return [torch.randint(100, vocab - 1, (PROMPT_LEN,), generator=g).tolist() for _ in range(batch)]


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _run_halfmoon(batch: int, new_tokens: int, threads: int) -> tuple[float, float]:
    """(prefill tok/s, decode tok/s) for `batch` prompts of PROMPT_LEN tokens."""
    import torch

    from engine.config import EngineConfig
    from engine.engine import LLMEngine
    from engine.sampling import SamplingParams

    torch.set_num_threads(threads)
    blocks = batch * (-(-(PROMPT_LEN + new_tokens + 2) // 16)) + 8
    eng = LLMEngine(config=EngineConfig(num_blocks=blocks, max_num_batched_tokens=PROMPT_LEN, max_num_seqs=max(batch, 1)))
    eng.generate([_prompts(1, seed=99)[0][:64]], SamplingParams(max_tokens=2))  # warm-up
    params = SamplingParams(max_tokens=new_tokens + 1, ignore_eos=True)
    for i, p in enumerate(_prompts(batch)):
        eng.add_request(f"b{i}", params, prompt_token_ids=p)
    t0 = time.perf_counter()
    while eng.stats().num_waiting or any(not r.output_token_ids for r in eng.scheduler.running):
        eng.step()  # each prompt is one 512-token chunk; all are prefilled after `batch` steps
    t1 = time.perf_counter()
    n = 0
    while eng.has_unfinished():
        n += len(eng.step())
    t2 = time.perf_counter()
    return batch * PROMPT_LEN / (t1 - t0), n / (t2 - t1)


def _run_hf(batch: int, new_tokens: int, threads: int) -> tuple[float, float]:
    import torch
    from transformers import AutoModelForCausalLM

    from engine.loader import resolve_model_dir

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(str(resolve_model_dir()), dtype=torch.float32,
                                                 attn_implementation="eager")
    model.eval()
    model.generation_config.eos_token_id = None
    ids = torch.tensor(_prompts(batch))
    mask = torch.ones_like(ids)
    kw = dict(attention_mask=mask, do_sample=False, pad_token_id=2)
    with torch.no_grad():
        model.generate(ids[:1, :64], attention_mask=mask[:1, :64], max_new_tokens=2, do_sample=False, pad_token_id=2)
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=1, **kw)
        t1 = time.perf_counter()
        model.generate(ids, max_new_tokens=new_tokens + 1, **kw)
        t2 = time.perf_counter()
    prefill_s = t1 - t0
    return batch * PROMPT_LEN / prefill_s, batch * new_tokens / max((t2 - t1) - prefill_s, 1e-9)


def _run_llamacpp(batch: int, new_tokens: int, threads: int) -> tuple[float, float]:
    from llama_cpp import Llama

    from engine.loader import gguf_path

    llm = Llama(model_path=str(gguf_path()), n_ctx=PROMPT_LEN + new_tokens + 8, n_threads=threads, verbose=False)
    toks = _prompts(1)[0]
    t0 = time.perf_counter()
    llm.eval(toks)
    t1 = time.perf_counter()
    for _ in range(new_tokens):
        llm.eval([llm.sample(temp=0.0)])
    t2 = time.perf_counter()
    return PROMPT_LEN / (t1 - t0), new_tokens / (t2 - t1)


RUNNERS = {"halfmoon": _run_halfmoon, "hf": _run_hf, "llama.cpp": _run_llamacpp}


def _child(system: str, batch: int, new_tokens: int, threads: int, q) -> None:
    try:
        prefill, decode = RUNNERS[system](batch, new_tokens, threads)
        q.put(("ok", prefill, decode, _rss_mb()))
    except Exception as e:  # reported to the parent, which prints it and moves on
        q.put(("error", f"{type(e).__name__}: {e}", 0.0, 0.0))


def measure(system: str, batch: int, new_tokens: int, threads: int) -> tuple[float, float, float] | str:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_child, args=(system, batch, new_tokens, threads, q))
    p.start()
    res = q.get()
    p.join()
    if res[0] == "error":
        return res[1]
    return res[1], res[2], res[3]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="halfmoon bench engine", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=Path, help="write the rows here")
    ap.add_argument("--batches", default="1,8,32", help="decode batch sizes")
    ap.add_argument("--new-tokens", type=int, default=32, help="decode steps timed per batch")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--systems", default="halfmoon,hf,llama.cpp")
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
                res = measure(s, b, args.new_tokens, args.threads)
                prog.advance(task)
                if isinstance(res, str):
                    console.print(f"[yellow]{s} skipped: {res}")
                    continue
                prefill, decode, rss = res
                if b == 1:
                    rows.append(Row(s, "prefill", 1, prefill, rss))
                rows.append(Row(s, "decode", b, decode, rss))

    base = {(r.phase, r.batch): r.tokens_per_s for r in rows if r.system == "hf"}
    table = Table(title=f"engine throughput ({PROMPT_LEN}-token prompts, fp32, {args.threads} threads)")
    for col in ("system", "phase", "batch", "tokens/s", "x HF", "peak RSS MB"):
        table.add_column(col, justify="right" if col not in ("system", "phase") else "left")
    ratios = {}
    for r in rows:
        ref = base.get((r.phase, r.batch))
        ratio = r.tokens_per_s / ref if ref else None
        if r.system == "halfmoon" and ratio:
            ratios[f"{r.phase}_b{r.batch}"] = round(ratio, 3)
        table.add_row(r.system, r.phase, str(r.batch), f"{r.tokens_per_s:.1f}",
                      f"{ratio:.2f}" if ratio else "-", f"{r.peak_rss_mb:.0f}")
    console.print(table)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"rows": [asdict(r) for r in rows], "halfmoon_vs_hf": ratios,
                                         "prompt_len": PROMPT_LEN, "threads": args.threads}, indent=2))
        console.print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
