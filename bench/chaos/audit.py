"""The block audit: once the load has ended, every surviving node must report 0 used KV
blocks. Read from each node's own /metrics (`halfmoon:kv_blocks_used`), so it needs no
live conductor, and polled until every node reads 0 or the grace period ends (a node
refreshes its gauges once per heartbeat interval; leases and periodic audits free blocks
a little after the request that held them)."""
from __future__ import annotations

import time
import urllib.error
import urllib.request
from typing import Callable, Mapping

from bench.chaos.report import Audit

USED = "halfmoon:kv_blocks_used"


def parse_gauge(text: str, name: str) -> dict[str, float]:
    """{node label: value} of one metric in Prometheus text exposition."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line.startswith(name) or line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        metric, _, labels = head.partition("{")
        if metric != name:
            continue
        node = ""
        for pair in labels.rstrip("}").split(","):
            key, _, quoted = pair.partition("=")
            if key.strip() == "node":
                node = quoted.strip().strip('"')
        out[node] = float(value)
    return out


def scrape_used(address: str, timeout_s: float = 2.0) -> int:
    """Blocks used on the node serving /metrics at `address` (host:port)."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=timeout_s) as r:
        values = parse_gauge(r.read().decode(), USED)
    if not values:
        raise ValueError(f"{address}/metrics has no {USED}")
    return int(sum(values.values()))


def audit_blocks(nodes: Mapping[str, str], grace_s: float = 30.0, every_s: float = 0.5,
                 scrape: Callable[[str], int] = scrape_used, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> Audit:
    """Poll `nodes` (node id -> metrics address) until all read 0 used blocks or `grace_s`
    passes; the last reading of each counts."""
    start = clock()
    used: dict[str, int] = {}
    unreachable: set[str] = set()
    while True:
        for node, address in nodes.items():
            try:
                used[node] = scrape(address)
                unreachable.discard(node)
            except (OSError, ValueError, urllib.error.URLError):
                unreachable.add(node)
        if not unreachable and not any(used.values()):
            return Audit(dict(used), clock() - start)
        if clock() - start >= grace_s:
            return Audit({n: used.get(n, 0) for n in nodes if n not in unreachable}, None, tuple(sorted(unreachable)))
        sleep(every_s)
