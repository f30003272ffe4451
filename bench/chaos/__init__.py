"""The chaos suite: faults under load on a local multi-process cluster, each followed by a
block audit; a table and JSON rows `{"scenario", "requests", "completed", "failed_clean",
"hung", "leaked_blocks", "detect_s", ...}`. A soak mode replays the conversation trace for
a long run and reports memory growth, leaks and latency drift.

    python -m bench.chaos --json out/chaos.json                   # every scenario
    python -m bench.chaos --scenarios baseline,kill-decode --json out/chaos.json
    python -m bench.chaos --soak --minutes 30 --rate 0.35 --json out/soak.json
    halfmoon bench chaos ...                                     # the same

Modules: `load` (the client load), `cluster` (a cluster to hurt, and the conductor's view
of it over time), `scenarios`, `audit` (used KV blocks on every node), `report` (rows,
table, JSON), `soak`, `cli`. The API fuzzer is `bench.fuzz`.
"""
from bench.chaos.cli import main

__all__ = ["main"]
