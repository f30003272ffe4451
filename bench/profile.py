"""Profile the real engine and fit the conductor's cost model (`halfmoon profile`).

Times prefill at several prompt lengths with and without a cached prefix, and decode
steps at several batch sizes and context lengths, on this machine with the engine as the
nodes run it; fits `conductor.cost_model` by least squares; times loads from every KV tier
under the device (`measure_tier_loads`: host pool -> device, disk -> host pool, cluster
store -> host pool, through the tier manager's own promotion and prefetch paths) for the
cost model's `tier_load_s`; writes the model as JSON (`--out`, load it with `halfmoon serve
--cost-model FILE` or `halfmoon bench sim --cost-model FILE`) and prints the fit quality
and the tier rates.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from bench import flags


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


def _drop_page_cache(disk) -> None:
    """Make the disk tier's files be read from the device, not the page cache (best-effort)."""
    if not hasattr(os, "posix_fadvise"):
        return
    for h in disk.hashes():
        try:
            fd = os.open(disk.path_of(h), os.O_RDONLY)
        except OSError:
            continue
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _prefetch(tiers, request, tier: str, timeout_s: float):
    """Plan `request` (every block below the host pool) and wait for the loader; the
    `TierTiming` of its loads from `tier`, from the tier manager's own load timings."""
    from conductor.cost_model import TierTiming

    before = tiers.stats().load_latency[tier]
    if tiers.park(request):
        deadline = time.monotonic() + timeout_s
        while request not in tiers.take_ready(wait=True):
            if time.monotonic() > deadline:
                raise RuntimeError(f"loads from the {tier} tier took over {timeout_s:.0f} s")
    tiers.cancel(request.request_id)  # give its pins back: the blocks stay in the host pool
    after = tiers.stats().load_latency[tier]
    n = after.count - before.count
    return TierTiming(tier, n, tiers.block_bytes, (after.total - before.total) / n if n else 0.0)


def measure_tier_loads(engine, tiers, blocks: int, *, rounds: int = 3, cold_disk: bool = True,
                       timeout_s: float = 120.0) -> list:
    """Time `blocks` blocks of KV loaded from each of `tiers`' tiers (host, and disk and the
    cluster store where `tiers` has them) through the real tier code; `TierTiming` per tier.

    Random KV goes into `blocks` device blocks published as one chain, and the device evicts
    them (the write-back demotion: into the host pool, and put to the store with the chain).
    host: `fill` promotes the chain from the host pool into new device blocks, as admission
    does (the median of `rounds` rounds per block); disk: the host pool spills to disk (with
    `cold_disk` the files are dropped from the page cache) and a request for the chain is
    planned, so the loader thread reads every block back (checksums checked), each load
    timed by the manager itself; cluster: disk and host forget the chain and the loader
    gets it from the store. `engine`'s device cache is empty again afterwards."""
    import torch

    from conductor.cost_model import TierTiming
    from engine.block_pool import block_hashes
    from engine.request import Request
    from engine.sampling import SamplingParams

    pool, bs = engine.pool, tiers.block_size
    if 2 * blocks + 2 > tiers.host.num_slots:
        raise ValueError(f"the host pool holds {tiers.host.num_slots} blocks; measuring {blocks} needs "
                         f"{2 * blocks + 2} (loads keep half of it for demotions)")
    if pool.num_free < blocks:
        raise ValueError(f"the device has {pool.num_free} free blocks, fewer than {blocks}")
    g = torch.Generator().manual_seed(2)
    tokens = torch.randint(100, 30000, (blocks * bs + 1,), generator=g).tolist()
    hashes = block_hashes(tokens[:blocks * bs], bs)
    src = pool.allocate(blocks)
    for i, b in enumerate(src):
        tiers._device(b).copy_(torch.randint(0, 256, (tiers.block_bytes,), generator=g, dtype=torch.uint8))
        pool.cache_block(b, hashes[i], tokens[i * bs:(i + 1) * bs], hashes[i - 1] if i else None)
    pool.free(src)
    pool.free(pool.allocate(pool.num_free))  # the device evicts the chain: demoted into the tiers
    if not tiers.flush(timeout_s):
        raise RuntimeError("the tiers' writes did not finish")
    out = []
    per_block = []
    for r in range(rounds):  # host -> device, as admission promotes a prefix
        new = pool.allocate(blocks)
        t0 = time.perf_counter()
        n = tiers.fill(f"tier-profile-host-{r}", hashes, tokens, [], new, blocks)
        dt = time.perf_counter() - t0
        pool.free(new)
        pool.reset_prefix_cache()  # forget the copies without demoting them again
        if n != blocks:
            raise RuntimeError(f"the host pool gave {n} of {blocks} blocks")
        per_block.append(dt / n)
    out.append(TierTiming("host", blocks, tiers.block_bytes, sorted(per_block)[len(per_block) // 2]))
    params = SamplingParams(max_tokens=1)
    if tiers.disk is not None:
        tiers.spill_host()
        if not tiers.flush(timeout_s):
            raise RuntimeError("the disk writes did not finish")
        if cold_disk:
            _drop_page_cache(tiers.disk)
        out.append(_prefetch(tiers, Request("tier-profile-disk", list(tokens), params), "disk", timeout_s))
    if tiers.cluster is not None and tiers.cluster.backend() is not None:
        tiers.spill_host()
        if not tiers.flush(timeout_s):
            raise RuntimeError("the disk writes did not finish")
        if tiers.disk is not None:
            tiers.disk.clear()
        out.append(_prefetch(tiers, Request("tier-profile-cluster", list(tokens), params), "cluster", timeout_s))
    tiers.spill_host()
    tiers.flush(timeout_s)
    return out


def profile_tiers(eng, blocks: int, tier_dir: Path | None, say=print) -> list:
    """Attach host, disk and (where Mooncake Store loads) cluster tiers to `eng`, measure
    (`measure_tier_loads`), detach; the cluster store is a `mooncake_master` started on
    loopback for the run; `say` gets why the cluster tier was not measured, if it was not."""
    from engine.tiers import TierConfig, TierManager
    from engine.tiers.mooncake_store import MooncakeMaster, MooncakeStoreBackend, store_unavailable_reason
    from engine.tiers.record import record_bytes

    rb = record_bytes(eng.kv.block_bytes, eng.config.block_size)
    gib = (2 * blocks + 8) * rb / (1 << 30)
    work = Path(tempfile.mkdtemp(prefix="halfmoon-profile-tiers-", dir=tier_dir))
    master = None
    reason = store_unavailable_reason()
    if reason is None:
        from cluster.specs import free_port

        try:
            master = MooncakeMaster(free_port(), free_port(), free_port(), keeper_gb=max(0.25, 2 * gib),
                                    log_path=work / "mooncake_master.log").start()
        except Exception as e:  # the store is measured where it runs; elsewhere it has no rate
            reason = f"mooncake_master did not start: {e}"
    store = None
    if master is not None:
        store = lambda: MooncakeStoreBackend.connect(local_host="127.0.0.1", master=master.address,  # noqa: E731
                                                     metadata=master.metadata_url, segment_bytes=0)
    try:
        tiers = TierManager.attach(eng, TierConfig(host_gib=gib, disk_gib=gib, disk_dir=str(work / "disk"),
                                                   store=store is not None), store=store, prefetch_timeout_s=120.0)
        try:
            timings = measure_tier_loads(eng, tiers, blocks)
        finally:
            tiers.close()
            eng.tiers = None
    finally:
        if master is not None:
            master.stop()
    if reason is not None:
        say(f"cluster tier not measured: {reason} (the cost model scores its hits as misses)")
    return timings


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="halfmoon profile", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("cost_model.json"), help="where to write the model")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--threads", type=flags.count(1), default=2)
    ap.add_argument("--quick", action="store_true", help="fewer, shorter samples (a rougher fit)")
    ap.add_argument("--network-gbps", type=flags.positive, default=24.0,
                    help="KV transfer bandwidth between nodes in Gbit/s (default: loopback TCP, ~3 GB/s)")
    ap.add_argument("--tier-blocks", type=flags.count(1), help="blocks to load from each KV tier (default 64; quick 16; "
                                                    "0: no tier rates)")
    ap.add_argument("--tier-dir", type=Path, help="where the disk tier is measured (default: the system temp dir; "
                                                  "point it at the disk kv_tiers.disk_dir lives on)")
    args = ap.parse_args(argv)

    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table

    from conductor.cost_model import CostModel, TransferModel, fit_decode, fit_prefill, tier_rates
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
    tier_blocks = args.tier_blocks if args.tier_blocks is not None else (16 if args.quick else 64)
    timings = profile_tiers(eng, tier_blocks, args.tier_dir, con.print) if tier_blocks > 0 else []
    with Progress(console=con) as prog:
        t1 = prog.add_task("prefill", total=len(lengths) * 3)
        t2 = prog.add_task("decode", total=len(batches) * len(contexts))
        pre = _prefill_samples(eng, lengths, reps, prog, t1)
        dec = _decode_samples(eng, batches, contexts, steps, prog, t2)
    pm, pfit = fit_prefill(pre)
    dm, dfit = fit_decode(dec)
    model = CostModel(pm, dm, TransferModel(kv_bytes_per_token=eng.kv.block_bytes / eng.config.block_size,
                                            network_bytes_per_s=args.network_gbps * 1e9 / 8,
                                            tier_bytes_per_s=tier_rates(timings)),
                      description=f"halfmoon profile of {args.model} on this machine ({args.threads} threads)",
                      prefill_fit=pfit, decode_fit=dfit, tier_timings=tuple(timings))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    model.save(args.out)
    t = Table(title=f"cost model fit ({len(pre)} prefill, {len(dec)} decode samples)")
    for c in ("predictor", "samples", "RMSE ms", "R²", "max error ms"):
        t.add_column(c, justify="right" if c != "predictor" else "left")
    for name, f in (("prefill", pfit), ("decode step", dfit)):
        t.add_row(name, str(f.samples), f"{f.rmse_s * 1000:.1f}", f"{f.r2:.3f}", f"{f.max_abs_error_s * 1000:.1f}")
    con.print(t)
    if timings:
        k = Table(title=f"KV tier loads ({eng.kv.block_bytes / 1e3:.0f} kB blocks)")
        for c in ("tier", "blocks", "ms per block", "GB/s", "16-token block onto the device ms"):
            k.add_column(c, justify="right" if c != "tier" else "left")
        for tt in timings:
            k.add_row(tt.tier, str(tt.blocks), f"{tt.seconds_per_block * 1e3:.3f}", f"{tt.bytes_per_s / 1e9:.2f}",
                      f"{model.tier_load_s(tt.tier, eng.config.block_size) * 1e3:.3f}")
        con.print(k)
    con.print(f"prefill 512 tokens: {model.prefill_s(512) * 1000:.0f} ms; with 256 cached: "
              f"{model.prefill_s(512, 256) * 1000:.0f} ms; decode step b=8, 4k tokens: "
              f"{model.decode_step_s(8, 4096) * 1000:.0f} ms")
    con.print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
