"""Profile the real engine and fit the conductor's cost model (`halfmoon profile`).

Times prefill at several prompt lengths with and without a cached prefix, and decode
steps at several batch sizes and context lengths, on this machine with the engine as the
nodes run it; fits `conductor.cost_model` by least squares; writes the model as JSON
(`--out`, load it with `halfmoon serve --cost-model FILE` or `halfmoon bench sim
--cost-model FILE`) and prints the fit quality.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path


def _prefill_samples(eng, lengths: list[int], reps: int, progress, task) -> list:
    import torch

    from conductor.cost_model import PrefillSample
    from engine.sampling import SamplingParams

    one = SamplingParams(max_tokens=1)
    g = torch.Generator().manual_seed(0)
    out = []
    for n in lengths:
        for cached_frac in (0.0, 0.5, 0.9):
            for r in range(reps):
                prompt = torch.randint(100, 40000, (n,), generator=g).tolist()
                p = int(n * cached_frac) // eng.config.block_size * eng.config.block_size
                if p:
                    eng.generate([prompt[:p] + [7]], one)  # put the prefix in the cache
                eng.add_request(f"p{n}-{p}-{r}", one, prompt_token_ids=prompt)
                t0 = time.perf_counter()
                cached = 0
                while eng.has_unfinished():
                    for o in eng.step():
                        cached = o.num_cached_tokens
                out.append(PrefillSample(n, cached, time.perf_counter() - t0))
            progress.advance(task)
    return out


def _decode_samples(eng, batches: list[int], contexts: list[int], steps: int, progress, task) -> list:
    import torch

    from conductor.cost_model import DecodeSample
    from engine.sampling import SamplingParams

    g = torch.Generator().manual_seed(1)
    out = []
    for b in batches:
        for ctx in contexts:
            params = SamplingParams(max_tokens=steps + 1, ignore_eos=True)
            for i in range(b):
                eng.add_request(f"d{b}-{ctx}-{i}", params,
                                prompt_token_ids=torch.randint(100, 40000, (ctx,), generator=g).tolist())
            while any(not r.output_token_ids for r in eng.scheduler.running) or eng.scheduler.waiting:
                eng.step()
            while eng.has_unfinished():
                tokens = sum(r.num_tokens for r in eng.scheduler.running)
                t0 = time.perf_counter()
                n = len(eng.step())
                if n == b:
                    out.append(DecodeSample(b, tokens, time.perf_counter() - t0))
            progress.advance(task)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="halfmoon profile", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("cost_model.json"), help="where to write the model")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="fewer, shorter samples (a rougher fit)")
    ap.add_argument("--network-gbps", type=float, default=24.0,
                    help="KV transfer bandwidth between nodes in Gbit/s (default: loopback TCP, ~3 GB/s)")
    args = ap.parse_args(argv)

    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table

    from conductor.cost_model import CostModel, TransferModel, fit_decode, fit_prefill
    from engine.config import EngineConfig
    from engine.engine import LLMEngine

    lengths = [64, 256, 512] if args.quick else [64, 128, 256, 512, 1024, 1536]
    batches = [1, 4] if args.quick else [1, 2, 4, 8, 16]
    contexts = [64, 256] if args.quick else [64, 256, 768]
    steps = 4 if args.quick else 8
    reps = 1 if args.quick else 2
    eng = LLMEngine(args.model, EngineConfig(num_blocks=4096, max_num_batched_tokens=2048, max_num_seqs=64,
                                             num_threads=args.threads), progress=True)
    con = Console()
    with Progress(console=con) as prog:
        t1 = prog.add_task("prefill", total=len(lengths) * 3)
        t2 = prog.add_task("decode", total=len(batches) * len(contexts))
        pre = _prefill_samples(eng, lengths, reps, prog, t1)
        dec = _decode_samples(eng, batches, contexts, steps, prog, t2)
    pm, pfit = fit_prefill(pre)
    dm, dfit = fit_decode(dec)
    mc = eng.model_config
    model = CostModel(pm, dm, TransferModel(kv_bytes_per_token=mc.kv_bytes_per_token(),
                                            network_bytes_per_s=args.network_gbps * 1e9 / 8),
                      description=f"halfmoon profile of {args.model} on this machine ({args.threads} threads)",
                      prefill_fit=pfit, decode_fit=dfit)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    model.save(args.out)
    t = Table(title=f"cost model fit ({len(pre)} prefill, {len(dec)} decode samples)")
    for c in ("predictor", "samples", "RMSE ms", "R²", "max error ms"):
        t.add_column(c, justify="right" if c != "predictor" else "left")
    for name, f in (("prefill", pfit), ("decode step", dfit)):
        t.add_row(name, str(f.samples), f"{f.rmse_s * 1000:.1f}", f"{f.r2:.3f}", f"{f.max_abs_error_s * 1000:.1f}")
    con.print(t)
    con.print(f"prefill 512 tokens: {model.prefill_s(512) * 1000:.0f} ms; with 256 cached: "
              f"{model.prefill_s(512, 256) * 1000:.0f} ms; decode step b=8, 4k tokens: "
              f"{model.decode_step_s(8, 4096) * 1000:.0f} ms")
    con.print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
