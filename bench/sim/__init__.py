"""The trace-driven cluster simulator (`halfmoon bench sim`, `python -m bench.sim`).

The simulated nodes are adapters around the conductor's own core: every arrival goes
through `conductor.scheduler.Scheduler` (policy + admission) and every change of the
cluster view through `conductor.cluster_state.ClusterState`, the same object the live
conductor feeds. Modules, in the order data flows: ``trace`` (Mooncake-format records to
requests) and ``workloads`` (seeded generators of more shapes) -> ``cluster`` (the
discrete-event loop) over ``nodes`` (a FIFO prefill instance with an LRU prefix cache, a
continuous-batching decode instance) -> ``events`` (each request's trail and its check)
-> ``metrics`` (TTFT, TBT, goodput) -> ``report`` (table, JSON, PNG). ``cli`` parses the
flags; ``compare`` runs the policy and admission evaluations of issue 13; ``native``
compiles the loop and the core under it with mypyc and runs a program on that build.
"""

from __future__ import annotations

from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``halfmoon bench sim``; imports lazily to keep CLI start-up light."""
    from bench.sim.cli import main as cli_main

    return cli_main(argv)


__all__ = ["main"]
