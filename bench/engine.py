"""Engine benchmark: halfmoon in every model dtype vs Hugging Face transformers (fp32, SDPA
attention) and llama.cpp (the same GGUF, Q4_1) where `llama-cpp-python` is installed.

Same prompts, same thread count, one run. Each system (each halfmoon dtype too) runs in its
own spawned worker process, so peak RSS is per system; the parent drives the workers in turn,
one timed operation at a time, alternating which goes first -- they never compute at the same
time, and on a shared machine all see the same background load. Decode steps run in blocks of
``STEP_BLOCK`` consecutive steps per system (blocks alternate between systems, order
reversed each round), and the first step after a switch is not timed: a system measured
step by step in turn with the others ran cold -- the others' weights had flushed its share of
the L3 cache, and their thread pools (OpenMP's and ggml's both busy-wait after their work
returns) still spun on the 2 cores. Measured here that way, halfmoon w8a8 decode b1 fell from
99-112 tok/s alone to 65-90 beside llama.cpp, and llama.cpp from 117 to 97-110; a real
server runs its steps back to back, which is what the blocks measure. Every row names its
`dtype` and the weight memory its forward reads (`weight_mb`).

What is timed, the same way for every system:

* prefill: one 512-token prompt alone, from submission to its first token (a forward over the
  whole prompt; all compute the LM head on the last position only). The median over
  ``--prefill-repeats`` prompts.
* decode at batch B: B prompts are prefilled (untimed), then ``--new-tokens`` steps in which
  all B sequences decode are timed one by one (HF's inside one ``generate`` call: a stopping
  criterion stamps each token and waits for the parent's go). ``tokens/s`` is
  B / (median step time), robust to bursts of other load; ``mean tok/s`` is
  B * steps / (sum of step times).

    python -m bench.engine --json out/engine.json          # or: halfmoon bench engine ...
    python -m bench.engine --batches 1 --systems halfmoon --dtypes w8a8,w8a8:step=calls
                                                           # an A/B of variants, interleaved

`targets` in the JSON (and printed, met / MISSED): the issue's goals, w8a8 vs llama.cpp (decode b1
>= 1.2x, prefill >= 2x), w8a8 vs hf-sdpa fp32 (decode b8 / b32 >= 2x), bfloat16 vs halfmoon
float32 (decode b1 >= 1.6x); each other dtype vs hf-sdpa is listed without a goal. Every row also
carries the hardware arithmetic: decode ``weight_gb_per_s`` (weight MB x steps/s, the bandwidth
spent streaming weights) and prefill ``linear_gflop_per_s``; ``bandwidth_notes`` gives each
dtype's batch-1 ceiling at the fastest weight-streaming rate measured.

llama.cpp is an optional extra (``pip install '.[llamacpp]'``, builds from its sdist in
minutes); without it its rows are skipped with a note.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from bench import flags

PROMPT_LEN = 512
STEP_BLOCK = 8  # timed decode steps a system runs back to back before the next system's turn


def decode_steps(new_tokens: int) -> int:
    """Decode steps a worker takes for `new_tokens` timed ones: plus one untimed step per block."""
    return new_tokens + -(-new_tokens // STEP_BLOCK)


HALFMOON_DTYPES = ("float32", "bfloat16", "w8a8", "fp8")


STEP_MODES = ("one", "calls", "layers")


def halfmoon_variant(spec: str) -> tuple[str, dict[str, str], str]:
    """``dtype[:field=value[+field=value]]`` -> (dtype, recipe changes, decode step mode):
    ``w8a8:lm_head=bf16`` is w8a8 with a bfloat16 LM head (`engine.quant.Recipe`'s fields
    linear / lm_head); ``step=`` how decode steps run: ``one`` (the default) one C++ call, in
    one parallel region where the forms allow (`engine.model.DECODE_REGION`), ``calls`` one C++
    call of a parallel region per kernel (DECODE_REGION off), ``layers`` layer by layer
    (`engine.model.DECODE_STEP` off). A variant is a worker of its own beside the others, so old
    and new run interleaved in one run: an A/B."""
    base, _, opts = spec.partition(":")
    changes: dict[str, str] = {}
    step = "one"
    for kv in filter(None, opts.split("+")):
        k, eq, v = kv.partition("=")
        if eq and k in ("linear", "lm_head"):
            changes[k] = v
        elif eq and k == "step" and v in STEP_MODES:
            step = v
        else:
            raise ValueError(f"--dtypes: {spec!r}: options are linear=FORM, lm_head=FORM, step=one|calls|layers")
    return base, changes, step


@dataclass(frozen=True, slots=True)
class Row:
    system: str
    dtype: str  # halfmoon: its model dtype; hf: float32; llama.cpp: the GGUF's Q4_1
    phase: str  # "prefill" | "decode"
    batch: int
    tokens_per_s: float  # prefill: 512 / median prompt time; decode: batch / median step time
    mean_tokens_per_s: float  # prefill: over the summed prompt times; decode: over the summed step times
    peak_rss_mb: float
    weight_mb: float  # weights the forward reads (halfmoon: the engine's; hf: its parameters; llama.cpp: the GGUF)


def _prompts(batch: int, vocab: int = 49152, seed: int = 0) -> list[list[int]]:
    import torch

    g = torch.Generator().manual_seed(seed + batch)
    return [torch.randint(100, vocab - 1, (PROMPT_LEN,), generator=g).tolist() for _ in range(batch)]


def _prefill_prompt(i: int) -> list[int]:
    return _prompts(1, seed=1000 + i)[0]


def machine_load() -> dict[str, float]:
    """How busy the machine is (other tenants included): 1-min load average and, where the
    kernel exposes it, the share of the last 60 s in which some task waited for a CPU."""
    out = {"cpus": float(os.cpu_count() or 0), "loadavg_1m": os.getloadavg()[0]}
    try:
        line = Path("/proc/pressure/cpu").read_text().splitlines()[0]  # "some avg10=.. avg60=.. ..."
        out["cpu_pressure_some_avg60"] = float(dict(f.split("=") for f in line.split()[1:])["avg60"])
    except (OSError, KeyError, ValueError, IndexError):
        pass
    return out


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --- workers: each answers the parent's commands over a pipe -------------------------------
# ("prefill", i) -> seconds; ("decode_start", batch, steps) -> None; ("step",) -> seconds;
# ("decode_end",) -> None; ("rss",) -> MB; ("weights",) -> MB; ("quit",) -> exits.

def _answer(conn, prefill, decode_start, step, decode_end, weight_mb: float) -> None:
    """The command loop of a system whose decode steps this process drives one at a time:
    `prefill(i)` and `step()` return their own timing, in seconds."""
    conn.send(None)  # loaded and warmed up
    while True:
        cmd = conn.recv()
        if cmd[0] == "prefill":
            conn.send(prefill(cmd[1]))
        elif cmd[0] == "decode_start":
            decode_start(cmd[1])
            conn.send(None)
        elif cmd[0] == "step":
            conn.send(step())
        elif cmd[0] == "decode_end":
            decode_end()
            conn.send(None)
        elif cmd[0] == "rss":
            conn.send(_rss_mb())
        elif cmd[0] == "weights":
            conn.send(weight_mb)
        else:
            return


def _serve_halfmoon(conn, threads: int, max_batch: int, new_tokens: int, prefill_repeats: int,
                    dtype: str = "float32") -> None:
    import torch

    import engine.model
    from engine.config import EngineConfig
    from engine.engine import LLMEngine
    from engine.quant import recipe_variant
    from engine.sampling import SamplingParams

    torch.set_num_threads(threads)
    base, changes, step_mode = halfmoon_variant(dtype)
    engine.model.DECODE_STEP = step_mode != "layers"
    engine.model.DECODE_REGION = step_mode == "one"
    max_tokens = decode_steps(new_tokens) + max_batch + 2  # nobody finishes inside the timed steps
    blocks = (max_batch + prefill_repeats) * (-(-(PROMPT_LEN + max_tokens + 1) // 16)) + 8
    with recipe_variant(base, **changes):
        eng = LLMEngine(config=EngineConfig(num_blocks=blocks, max_num_batched_tokens=PROMPT_LEN,
                                            max_num_seqs=max(max_batch, 1), dtype=base))
    eng.generate([_prompts(1, seed=99)[0][:64]], SamplingParams(max_tokens=2))  # warm-up
    batch = 0

    def prefill(i: int) -> float:
        t0 = time.perf_counter()
        eng.generate([_prefill_prompt(i)], SamplingParams(max_tokens=1))
        return time.perf_counter() - t0

    def decode_start(b: int) -> None:
        nonlocal batch
        batch = b
        params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
        for i, p in enumerate(_prompts(batch)):
            eng.add_request(f"b{i}", params, prompt_token_ids=p)
        while eng.stats().num_waiting or any(not r.output_token_ids for r in eng.scheduler.running):
            eng.step()  # each prompt is one 512-token chunk

    def step() -> float:
        t0 = time.perf_counter()
        out = eng.step()
        dt = time.perf_counter() - t0
        if len(out) != batch:
            raise RuntimeError(f"a decode step produced {len(out)} tokens, expected {batch}")
        return dt

    def decode_end() -> None:
        for i in range(batch):
            eng.abort(f"b{i}")

    _answer(conn, prefill, decode_start, step, decode_end, eng.runner.model.weight_bytes / 1e6)


def _serve_hf(conn, threads: int, max_batch: int, new_tokens: int, prefill_repeats: int, attn: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, StoppingCriteria, StoppingCriteriaList

    from engine.loader import resolve_model_dir

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(str(resolve_model_dir()), dtype=torch.float32,
                                                 attn_implementation=attn)
    model.eval()
    model.generation_config.eos_token_id = None

    class Driven(StoppingCriteria):
        """Called once per generated token: report the step's time, then wait for the parent."""

        def __init__(self) -> None:
            self.t_go = None

        def __call__(self, input_ids, scores, **kwargs):
            now = time.perf_counter()
            conn.send(None if self.t_go is None else now - self.t_go)  # None: prefill done
            cmd = conn.recv()
            self.t_go = time.perf_counter()
            return torch.full((input_ids.shape[0],), cmd[0] != "step", dtype=torch.bool)

    def generate(ids: torch.Tensor, n: int, criteria: list) -> None:
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                       pad_token_id=2, stopping_criteria=StoppingCriteriaList(criteria))

    with torch.no_grad():
        generate(torch.tensor([_prompts(1, seed=99)[0][:64]]), 2, [])  # warm-up
        conn.send(None)
        while True:
            cmd = conn.recv()
            if cmd[0] == "prefill":
                t0 = time.perf_counter()
                generate(torch.tensor([_prefill_prompt(cmd[1])]), 1, [])
                conn.send(time.perf_counter() - t0)
            elif cmd[0] == "decode_start":  # the criterion answers this, the steps and decode_end
                generate(torch.tensor(_prompts(cmd[1])), cmd[2] + 2, [Driven()])
                conn.send(None)  # for decode_end
            elif cmd[0] == "rss":
                conn.send(_rss_mb())
            elif cmd[0] == "weights":
                conn.send(sum(p.numel() * p.element_size() for p in model.parameters()) / 1e6)
            else:
                return


def _serve_llamacpp(conn, threads: int, max_batch: int, new_tokens: int, prefill_repeats: int) -> None:
    try:
        from llama_cpp import Llama
    except ImportError:
        raise RuntimeError("llama-cpp-python is not installed (an optional extra: pip install '.[llamacpp]')") from None

    from engine.loader import gguf_path

    if max_batch != 1:
        raise ValueError("llama.cpp runs batch 1 only here")
    llm = Llama(model_path=str(gguf_path()), n_ctx=PROMPT_LEN + decode_steps(new_tokens) + 8, n_threads=threads, verbose=False)

    def prefill(i: int) -> float:
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(_prefill_prompt(i))
        return time.perf_counter() - t0

    def decode_start(batch: int) -> None:
        llm.reset()
        llm.eval(_prompts(1)[0])

    def step() -> float:
        t0 = time.perf_counter()
        llm.eval([llm.sample(temp=0.0)])
        return time.perf_counter() - t0

    _answer(conn, prefill, decode_start, step, lambda: None, gguf_path().stat().st_size / 1e6)


def _worker(system: str, conn, *args) -> None:
    try:
        if system.startswith("halfmoon/"):
            _serve_halfmoon(conn, *args, system.split("/", 1)[1])
        elif system in ("hf", "hf-sdpa"):
            _serve_hf(conn, *args, "sdpa" if system == "hf-sdpa" else "eager")
        elif system == "llama.cpp":
            _serve_llamacpp(conn, *args)
        else:
            raise ValueError(f"unknown system {system!r}")
    except Exception as e:  # reported to the parent, which prints it and drops the system
        conn.send(RuntimeError(f"{type(e).__name__}: {e}"))


def system_dtype(system: str) -> str:
    """A worker's dtype: halfmoon/<dtype>, hf and hf-sdpa in float32, llama.cpp the GGUF's Q4_1."""
    return system.split("/", 1)[1] if "/" in system else "Q4_1" if system == "llama.cpp" else "float32"


class Worker:
    def __init__(self, system: str, *args) -> None:
        ctx = mp.get_context("spawn")
        self.system = system
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker, args=(system, child, *args), daemon=True)
        self.proc.start()

    def call(self, *cmd):
        if cmd:
            self.conn.send(cmd)
        res = self.conn.recv()
        if isinstance(res, Exception):
            raise res
        return res

    def close(self) -> None:
        try:
            self.conn.send(("quit",))
        except OSError:
            pass
        self.proc.join(timeout=30)
        if self.proc.is_alive():
            self.proc.kill()


def run_batch(systems: list[str], batch: int, new_tokens: int, threads: int, prefill_repeats: int,
              log=print) -> list[Row]:
    """One worker per system, driven in turn: batch-1 runs also time the prefills."""
    workers = []
    for s in systems:
        w = Worker(s, threads, batch, new_tokens, prefill_repeats)
        try:
            w.call()  # loaded and warmed up
            workers.append(w)
        except Exception as e:
            log(f"{s} skipped: {e}")
            w.close()
    prefill: dict[str, list[float]] = {w.system: [] for w in workers}
    steps: dict[str, list[float]] = {w.system: [] for w in workers}
    try:
        if batch == 1:
            for i in range(prefill_repeats):
                for w in workers[:: 1 if i % 2 == 0 else -1]:
                    prefill[w.system].append(w.call("prefill", i))
        for w in workers:
            w.call("decode_start", batch, decode_steps(new_tokens))
        for r in range(-(-new_tokens // STEP_BLOCK)):
            n = min(STEP_BLOCK, new_tokens - r * STEP_BLOCK)
            for w in workers[:: 1 if r % 2 == 0 else -1]:
                w.call("step")  # untimed: the first step back on the cores after another system's turn
                steps[w.system].extend(w.call("step") for _ in range(n))
        for w in workers:
            w.call("decode_end")
        rss = {w.system: w.call("rss") for w in workers}
        weights = {w.system: w.call("weights") for w in workers}
    finally:
        for w in workers:
            w.close()
    rows = []
    for w in workers:
        p, d = prefill[w.system], steps[w.system]
        name, dtype = w.system.split("/", 1)[0], system_dtype(w.system)
        if p:
            rows.append(Row(name, dtype, "prefill", 1, PROMPT_LEN / statistics.median(p),
                            PROMPT_LEN * len(p) / sum(p), rss[w.system], weights[w.system]))
        rows.append(Row(name, dtype, "decode", batch, batch / statistics.median(d), batch * len(d) / sum(d),
                        rss[w.system], weights[w.system]))
    return rows


# The targets: (name, numerator row, denominator row, goal ratio).
TARGETS: list[tuple[str, tuple, tuple, float]] = [
    ("w8a8 decode b1 vs llama.cpp", ("halfmoon", "w8a8", "decode", 1), ("llama.cpp", "Q4_1", "decode", 1), 1.2),
    ("w8a8 prefill vs llama.cpp", ("halfmoon", "w8a8", "prefill", 1), ("llama.cpp", "Q4_1", "prefill", 1), 2.0),
    *[(f"w8a8 decode b{b} vs hf-sdpa fp32", ("halfmoon", "w8a8", "decode", b), ("hf-sdpa", "float32", "decode", b), 2.0)
      for b in (8, 32)],
    ("bfloat16 decode b1 vs float32", ("halfmoon", "bfloat16", "decode", 1), ("halfmoon", "float32", "decode", 1), 1.6),
]


def targets(rows: list[Row]) -> dict[str, dict]:
    """The issue's ratios, from rows measured side by side (missing systems are left out), and
    for the other halfmoon dtypes the same decode ratios against hf-sdpa (no goal)."""
    by = {(r.system, r.dtype, r.phase, r.batch): r.tokens_per_s for r in rows}
    out: dict[str, dict] = {}
    for name, a, b, goal in TARGETS:
        if a in by and b in by:
            ratio = by[a] / by[b]
            out[name] = {"ratio": round(ratio, 3), "goal": goal, "met": ratio >= goal}
    for dtype in HALFMOON_DTYPES:
        for b in sorted({r.batch for r in rows if r.batch > 1}):
            a, ref = ("halfmoon", dtype, "decode", b), ("hf-sdpa", "float32", "decode", b)
            name = f"{dtype} decode b{b} vs hf-sdpa fp32"
            if a in by and ref in by and name not in out:
                out[name] = {"ratio": round(by[a] / by[ref], 3), "goal": None, "met": None}
    return out


def summary_table(rows: list[Row], batches: list[int]):
    """The issue's layout: one line per system and dtype, prefill and decode tok/s per batch."""
    from rich.table import Table

    by = {(r.system, r.dtype, r.phase, r.batch): r.tokens_per_s for r in rows}
    t = Table(title="tokens/s (median)")
    for col in ("system", "dtype", "prefill", *[f"decode b{b}" for b in batches]):
        t.add_column(col, justify="left" if col in ("system", "dtype") else "right")
    for system, dtype in dict.fromkeys((r.system, r.dtype) for r in rows):
        cells = [by.get((system, dtype, "prefill", 1)), *[by.get((system, dtype, "decode", b)) for b in batches]]
        t.add_row(system, dtype, *["-" if v is None else f"{v:.1f}" for v in cells])
    return t


def matmul_params(model_dir=None) -> int:
    """Multiply-adds per token of the model's linears (layers + LM head), from its config."""
    from engine.config import ModelConfig
    from engine.loader import resolve_model_dir

    c = ModelConfig.from_dir(model_dir or resolve_model_dir(progress=False))
    q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    per_layer = c.hidden_size * (q + 2 * kv) + q * c.hidden_size + 3 * c.hidden_size * c.intermediate_size
    return c.num_layers * per_layer + c.vocab_size * c.hidden_size


def arithmetic(r: Row, params: int) -> dict[str, float]:
    """What a row's rate means in hardware terms. Decode: every step streams the weights once,
    so weight MB x steps/s is the memory bandwidth spent on weights (GB/s). Prefill: 2 flops per
    multiply-add of the linears per token (attention left out): GFLOP/s."""
    if r.phase == "decode":
        return {"weight_gb_per_s": round(r.weight_mb / 1e3 * r.tokens_per_s / r.batch, 2)}
    return {"linear_gflop_per_s": round(2 * params * r.tokens_per_s / 1e9, 1)}


def bandwidth_notes(rows: list[Row]) -> list[str]:
    """For each halfmoon decode b1 row: the tok/s ceiling if it streamed its weights as fast as
    the fastest b1 row of any dtype did (bandwidth the machine showed it has)."""
    b1 = [r for r in rows if r.system == "halfmoon" and r.phase == "decode" and r.batch == 1]
    if not b1:
        return []
    best = max(b1, key=lambda r: r.weight_mb * r.tokens_per_s)
    gbs = best.weight_mb * best.tokens_per_s / 1e3
    return [f"{r.dtype}: {r.weight_mb:.0f} MB a step -> ceiling {gbs * 1e3 / r.weight_mb:.0f} tok/s at {gbs:.1f} GB/s "
            f"({best.dtype}'s rate), measured {r.tokens_per_s:.1f}" for r in b1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="halfmoon bench engine", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=Path, help="write the rows here")
    ap.add_argument("--batches", default="1,8,32", help="decode batch sizes")
    ap.add_argument("--new-tokens", type=flags.count(1), default=32, help="decode steps timed per batch")
    ap.add_argument("--prefill-repeats", type=flags.count(1), default=5, help="prompts prefilled alone (in the batch-1 run)")
    ap.add_argument("--threads", type=flags.count(1), default=2)
    ap.add_argument("--systems", default="halfmoon,hf-sdpa,llama.cpp",
                    help="of halfmoon (one worker per --dtypes), hf (eager attention), hf-sdpa, llama.cpp "
                         "(skipped with a note when llama-cpp-python is not installed)")
    ap.add_argument("--dtypes", default=",".join(HALFMOON_DTYPES),
                    help="halfmoon's model dtypes; a variant as dtype:field=value[+field=value], e.g. "
                         "w8a8:lm_head=bf16 or w8a8:step=calls (halfmoon_variant)")
    args = ap.parse_args(argv)
    for d in args.dtypes.split(","):
        try:
            halfmoon_variant(d)
        except ValueError as e:
            ap.error(str(e))

    from rich.console import Console
    from rich.table import Table

    batches = [int(b) for b in args.batches.split(",")]
    systems = [x for s in args.systems.split(",")
               for x in ([f"halfmoon/{d}" for d in args.dtypes.split(",")] if s == "halfmoon" else [s])]
    rows: list[Row] = []
    console = Console(width=max(160, Console().width))  # the wide table whole, also off a terminal
    load_before = machine_load()
    for b in batches:
        here = [s for s in systems if s != "llama.cpp" or b == 1]
        with console.status(f"batch {b}: {', '.join(here)}"):
            rows.extend(run_batch(here, b, args.new_tokens, args.threads, args.prefill_repeats,
                                  log=lambda m: console.print(f"[yellow]{m}")))

    base_name = "hf" if any(r.system == "hf" for r in rows) else "hf-sdpa"
    base = {(r.phase, r.batch): r for r in rows if r.system == base_name}
    table = Table(title=f"engine throughput ({PROMPT_LEN}-token prompts, {args.threads} threads)")
    params = matmul_params()
    for col in ("system", "dtype", "phase", "batch", "tokens/s", f"x {base_name}", "mean tok/s",
                f"x {base_name} (mean)", "weights MB", "peak RSS MB", "weight GB/s | GFLOP/s"):
        table.add_column(col, justify="right" if col not in ("system", "dtype", "phase") else "left")
    ratios, mean_ratios = {}, {}
    for r in rows:
        ref = base.get((r.phase, r.batch))
        ratio = r.tokens_per_s / ref.tokens_per_s if ref else None
        mean_ratio = r.mean_tokens_per_s / ref.mean_tokens_per_s if ref else None
        if r.system == "halfmoon" and ref:
            key = f"{r.phase}_b{r.batch}" if r.dtype == "float32" else f"{r.dtype}_{r.phase}_b{r.batch}"
            ratios[key] = round(ratio, 3)
            mean_ratios[key] = round(mean_ratio, 3)
        table.add_row(r.system, r.dtype, r.phase, str(r.batch), f"{r.tokens_per_s:.1f}", f"{ratio:.2f}" if ref else "-",
                      f"{r.mean_tokens_per_s:.1f}", f"{mean_ratio:.2f}" if ref else "-", f"{r.weight_mb:.0f}",
                      f"{r.peak_rss_mb:.0f}", " ".join(f"{v:g}" for v in arithmetic(r, params).values()))
    load_after = machine_load()
    console.print(table)
    console.print(summary_table(rows, batches))
    goals = targets(rows)
    for k, v in goals.items():
        verdict = "" if v["goal"] is None else f" (target >= {v['goal']}x: {'met' if v['met'] else 'MISSED'})"
        console.print(f"  {k}: {v['ratio']:.2f}x{verdict}")
    for line in bandwidth_notes(rows):
        console.print(f"  decode b1 bandwidth: {line}")
    console.print("machine load before / after: " + ", ".join(
        f"{k} {load_before[k]:.1f} / {load_after.get(k, float('nan')):.1f}" for k in load_before))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"rows": [asdict(r) | arithmetic(r, params) for r in rows],
                                         "bandwidth_notes": bandwidth_notes(rows), f"halfmoon_vs_{base_name}": ratios,
                                         f"halfmoon_vs_{base_name}_mean": mean_ratios, "targets": goals,
                                         "prompt_len": PROMPT_LEN,
                                         "threads": args.threads, "new_tokens": args.new_tokens,
                                         "prefill_repeats": args.prefill_repeats,
                                         "machine_load": {"before": load_before, "after": load_after}}, indent=2))
        console.print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
