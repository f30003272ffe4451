"""Helpers for the Ray tests: ports, polling, shared-memory segments, Prometheus text."""
from __future__ import annotations

import os
import socket
import time
from typing import Callable, TypeVar

T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(pred: Callable[[], T], timeout_s: float = 30.0, every_s: float = 0.25) -> T:
    """`pred()` once it is truthy; its last value when `timeout_s` runs out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(every_s)
    return pred()


def shm_segments_of(pid: int) -> list[str]:
    """Transfer-engine shared-memory segments created by `pid` (`hm-te-<seg>-<pid>-<rand>`)."""
    return [n for n in os.listdir("/dev/shm") if n.startswith("hm-te-") and n.rsplit("-", 2)[-2] == str(pid)]


def metric_samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Prometheus text -> {(sample name, sorted labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def metric(samples: dict, name: str, **labels: str) -> float:
    """Sum of `name` over the samples whose labels include `labels` (0 when none)."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= set(ls))
