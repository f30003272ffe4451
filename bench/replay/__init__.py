"""Live trace replay (issue 7): send a Mooncake-format trace open-loop to a cluster.

Modules, in the order data flows: ``trace`` (records) -> ``tokens`` (hash ids to token
ids) -> ``workload`` (scaling and window) -> ``sender`` (open-loop replay through a
``client.ReplayClient``; ``fake_client`` stands in for the cluster) -> ``metrics`` and
``summary`` (latency math, SLOs, goodput) -> ``sweep`` (capacity) -> ``report`` and
``plots``. ``runner`` ties one invocation together; ``cli`` parses its flags.
"""

from __future__ import annotations

from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``halfmoon bench replay``; imports lazily to keep CLI start-up light."""
    from bench.replay.cli import main as cli_main

    return cli_main(argv)


__all__ = ["main"]
