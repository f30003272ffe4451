"""``halfmoon bench replay``: command-line flags to a ReplayConfig, then run and report.

Exit status: 0 when the replay ran and every request was accounted for, 1 when a
request went unaccounted (a replayer bug), 2 for bad flags, a bad trace or an
unavailable target.
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console

from bench import flags
from bench.replay.client import ClientError
from bench.replay.fake_client import FakeClientConfig
from bench.replay.plots import draw_plots, series_from_json, series_from_result
from bench.replay.report import capacity_line, print_run, print_sweep, write_json
from bench.replay.runner import ReplayConfig, RunResult, SweepResult, run_sweep
from bench.replay.summary import SLO
from bench.replay.sweep import CAPACITY_THRESHOLD, speedups_for_rates
from bench.replay.targets import TargetError, open_target, parse_target
from bench.replay.tokens import TokenSpace
from bench.replay.trace import TraceError, load_trace
from bench.replay.workload import (
    ScaleConfig,
    TraceWindow,
    WindowSelection,
    WorkloadError,
    select_window,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="halfmoon bench replay",
        description="Replay a Mooncake-format trace open-loop against a cluster and measure "
        "TTFT, TBT, TPOT, E2E and goodput under SLOs at the client.",
    )
    parser.add_argument("--trace", type=Path, required=True, help="Mooncake-format JSONL trace")
    parser.add_argument(
        "--target",
        default="fake",
        help="fake | grpc://HOST:PORT | http://HOST:PORT (default: fake)",
    )
    parser.add_argument(
        "--label", default=None, help="name of this layout in tables and plots (default: target)"
    )

    scale = parser.add_argument_group("scaling")
    scale.add_argument(
        "--block-tokens",
        type=int,
        default=16,
        help="tokens per trace block in the replay (default 16)",
    )
    scale.add_argument(
        "--trace-block-tokens",
        type=int,
        default=512,
        help="tokens per hash id in the trace (default 512)",
    )
    scale.add_argument(
        "--output-scale", type=flags.positive, default=1.0, help="multiply output lengths (default 1)"
    )
    scale.add_argument(
        "--max-output-tokens", type=int, default=None, help="cap on scaled output lengths"
    )
    scale.add_argument(
        "--max-input-tokens",
        type=int,
        default=None,
        help="cut longer scaled prompts to this length",
    )
    scale.add_argument(
        "--spread-ms",
        type=flags.non_negative,
        default=0.0,
        help="spread requests sharing a trace timestamp evenly over this many trace ms "
        "(the conversation trace rounds timestamps to 3000 ms; default 0: as recorded)",
    )
    scale.add_argument(
        "--vocab-size", type=int, default=TokenSpace().vocab_size, help="token ids are < this"
    )
    scale.add_argument(
        "--token-low", type=int, default=TokenSpace().token_low, help="token ids are >= this"
    )
    scale.add_argument(
        "--seed", type=flags.SEED, default=0, help="token mapping seed (run i of a sweep uses seed+i)"
    )

    load = parser.add_argument_group("load and window")
    speeds = load.add_mutually_exclusive_group()
    speeds.add_argument(
        "--speedup", type=flags.positive, default=None, help="time speed-up of one run (default 1)"
    )
    speeds.add_argument(
        "--speedups", type=flags.positives, default=None, help="sweep: comma-separated speed-ups"
    )
    speeds.add_argument(
        "--rates", type=flags.positives, default=None, help="sweep: comma-separated request rates (req/s)"
    )
    load.add_argument(
        "--start", type=flags.non_negative, default=0.0, help="skip this many trace seconds (default 0)"
    )
    load.add_argument(
        "--duration",
        type=flags.positive,
        default=None,
        help="trace seconds to replay; wall time ~ duration / speed-up",
    )
    load.add_argument(
        "--max-requests", type=int, default=None, help="replay at most this many requests"
    )
    load.add_argument(
        "--request-timeout",
        type=flags.positive,
        default=60.0,
        help="seconds before a request counts as failed (default 60)",
    )
    load.add_argument(
        "--cooldown", type=flags.non_negative, default=1.0, help="seconds between sweep runs (default 1)"
    )

    slo = parser.add_argument_group("SLOs")
    slo.add_argument("--ttft-slo", type=flags.positive, default=2.0, help="TTFT SLO in seconds (default 2)")
    slo.add_argument(
        "--tbt-slo", type=flags.positive, default=0.2, help="SLO on Mooncake TBT in seconds (default 0.2)"
    )
    slo.add_argument(
        "--capacity-threshold",
        type=flags.fraction,
        default=CAPACITY_THRESHOLD,
        help="share of requests that must meet both SLOs (default 0.9)",
    )

    out = parser.add_argument_group("output")
    out.add_argument("--json", type=Path, default=None, help="write results as JSON here")
    out.add_argument("--plot-dir", type=Path, default=None, help="write PNG plots into this folder")
    out.add_argument(
        "--overlay",
        type=Path,
        action="append",
        default=[],
        help="earlier --json result to draw beside this one (repeatable)",
    )

    fake = parser.add_argument_group("fake target (--target fake)")
    base = FakeClientConfig()
    fake.add_argument(
        "--fake-ttft-base", type=flags.non_negative, default=base.ttft_base_s, help="seconds per prefill"
    )
    fake.add_argument(
        "--fake-ttft-per-token",
        type=flags.non_negative,
        default=base.ttft_per_token_s,
        help="seconds per uncached prompt token",
    )
    fake.add_argument("--fake-tbt", type=flags.non_negative, default=base.tbt_s, help="seconds per decode step")
    fake.add_argument(
        "--fake-tbt-per-running",
        type=flags.non_negative,
        default=base.tbt_per_running_s,
        help="extra decode seconds per other running request",
    )
    fake.add_argument(
        "--fake-max-queue",
        type=flags.positive,
        default=None,
        help="reject when the predicted prefill wait exceeds this many seconds",
    )
    fake.add_argument(
        "--fake-max-prompt-tokens", type=int, default=None, help="reject prompts longer than this"
    )
    return parser


def _speedups(args: argparse.Namespace, selection: WindowSelection) -> tuple[float, ...]:
    """The runs' speed-ups; --rates converts through the window's own request rate."""
    if args.rates is None:
        return tuple(args.speedups or (args.speedup or 1.0,))
    base_rate = selection.request_rate(1.0)
    if base_rate is None:
        raise WorkloadError("--rates needs a window with a request rate; add --duration")
    return tuple(speedups_for_rates(args.rates, base_rate))


def _config(
    args: argparse.Namespace, window: TraceWindow, speedups: tuple[float, ...]
) -> ReplayConfig:
    return ReplayConfig(
        trace=args.trace,
        label=args.label or args.target,
        scale=ScaleConfig(
            block_tokens=args.block_tokens,
            trace_block_tokens=args.trace_block_tokens,
            output_scale=args.output_scale,
            max_output_tokens=args.max_output_tokens,
            max_input_tokens=args.max_input_tokens,
            spread_ms=args.spread_ms,
        ),
        window=window,
        speedups=speedups,
        slo=SLO(args.ttft_slo, args.tbt_slo),
        token_space=TokenSpace(args.vocab_size, args.token_low),
        token_seed=args.seed,
        request_timeout_s=args.request_timeout,
        cooldown_s=args.cooldown,
        capacity_threshold=args.capacity_threshold,
    )


def _fake_config(args: argparse.Namespace) -> FakeClientConfig:
    return FakeClientConfig(
        ttft_base_s=args.fake_ttft_base,
        ttft_per_token_s=args.fake_ttft_per_token,
        tbt_s=args.fake_tbt,
        tbt_per_running_s=args.fake_tbt_per_running,
        cache_block_tokens=args.block_tokens,
        max_prompt_tokens=args.fake_max_prompt_tokens,
        max_queue_s=args.fake_max_queue,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    console = Console()
    if not console.is_terminal:  # logs and CI: wide enough for the tables
        console = Console(width=120)
    try:
        target = parse_target(args.target)
        window = TraceWindow(args.start, args.duration, args.max_requests)
        selection = select_window(load_trace(args.trace), window)
        speedups = _speedups(args, selection)
        config = _config(args, window, speedups)
        fake = _fake_config(args) if target.scheme == "fake" else None
        overlays = [series_from_json(path) for path in args.overlay]
    except (TargetError, TraceError, WorkloadError, ValueError, OSError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        return 2

    def on_run(index: int, speedup: float, requests: int) -> None:
        console.print(
            f"[bold]run {index + 1}/{len(speedups)}[/bold]: {requests} requests at speed-up {speedup:g}"
        )

    def on_done(run: RunResult) -> None:
        print_run(console, run)

    async def go() -> SweepResult:
        async with open_target(target, fake) as client:
            return await run_sweep(config, client, on_run, on_done, selection=selection)

    try:
        result = asyncio.run(go())
    except (TargetError, ClientError) as exc:  # unreachable or refusing cluster
        console.print(f"[red]error:[/red] {exc}")
        return 2
    if len(result.runs) > 1:
        print_sweep(console, result)
    else:
        console.print(capacity_line(result))
    if args.json is not None:
        write_json(result, args.json)
        console.print(f"wrote {args.json}")
    if args.plot_dir is not None:
        for path in draw_plots([*overlays, series_from_result(result)], args.plot_dir):
            console.print(f"wrote {path}")
    return 0 if all(run.summary.accounted for run in result.runs) else 1
