"""`halfmoon serve --config FILE` on either launcher: serves the config's cluster, and
SIGTERM stops every process it started (the embedded Ray instance included)."""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading

import psutil
import pytest
from ray_helpers import free_port, wait_for

from cluster.client import Client, make_request
from engine.sampling import SamplingParams

pytestmark = [pytest.mark.slow, pytest.mark.real_model]


@contextlib.contextmanager
def _serving(args: list[str]):
    """`halfmoon serve ...` as a child process, its output collected line by line by a reader
    thread: (process, lines, reader); whatever is still running at the end is killed by PID."""
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    try:
        yield proc, lines, reader
    finally:
        if proc.poll() is None:
            for p in psutil.Process(proc.pid).children(recursive=True):
                p.kill()
            proc.kill()
            proc.wait(10)


@pytest.mark.parametrize("launcher", ["ray", "processes"])
def test_serve_from_a_config_and_stop_on_sigterm(tmp_path, launcher):
    grpc_port, http_port = free_port(), free_port()
    config = tmp_path / "cluster.yaml"
    config.write_text(f"kv: {{num_blocks: 256}}\nconductor: {{grpc_port: {grpc_port}, policy: least_loaded}}\n")
    args = [os.path.join(os.path.dirname(sys.executable), "halfmoon"), "serve", "--config", str(config),
            "--launcher", launcher, "--http-port", str(http_port), "--timeout", "240"]
    with _serving(args) as (proc, lines, reader):
        serving = f"halfmoon serving on 127.0.0.1:{grpc_port} (gRPC) and http://127.0.0.1:{http_port}/v1"
        assert wait_for(lambda: any(serving in line for line in lines) or proc.poll() is not None, timeout_s=300)
        assert proc.poll() is None, "".join(lines)
        with Client(f"127.0.0.1:{grpc_port}") as c:
            st = c.status()
            assert sorted(n.node_id for n in st.nodes) == ["decode-0", "prefill-0"]
            assert {s.name: s.value for s in st.settings}["policy"] == "least_loaded"  # from the file
            res = c.generate(make_request("The capital of France is", params=SamplingParams(max_tokens=6)))
            assert res.final.usage.completion_tokens >= 1
        children = psutil.Process(proc.pid).children(recursive=True)
        assert len(children) >= 3  # conductor + 2 nodes, and for Ray its own processes
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=90) == 0, "".join(lines)
        reader.join(10)
        assert "stopped" in lines[-1]
        _, alive = psutil.wait_procs(children, timeout=30)
        assert not alive, f"left running: {[p.pid for p in alive]}"


def _listener_pid(port: int) -> int:
    (pid,) = {c.pid for c in psutil.net_connections(kind="tcp")
              if c.status == psutil.CONN_LISTEN and c.laddr.port == port and c.pid}
    return pid


def test_serve_on_ray_serves_on_when_a_node_dies_and_stops_when_the_conductor_dies(tmp_path):
    """A node actor killed under `halfmoon serve` (Ray launcher) is logged and the cluster
    serves on with the other nodes; the conductor's death stops it (nothing restarts it)."""
    grpc_port = free_port()
    config = tmp_path / "cluster.yaml"
    config.write_text(f"decode: {{count: 2}}\nkv: {{num_blocks: 256}}\n"
                      f"conductor: {{grpc_port: {grpc_port}, http_port: 0, heartbeat_interval_s: 0.5}}\n")
    args = [os.path.join(os.path.dirname(sys.executable), "halfmoon"), "serve", "--config", str(config),
            "--launcher", "ray", "--timeout", "240"]
    with _serving(args) as (proc, lines, reader):
        assert wait_for(lambda: any("halfmoon serving on" in line for line in lines) or proc.poll() is not None,
                        timeout_s=300)
        assert proc.poll() is None, "".join(lines)
        children = psutil.Process(proc.pid).children(recursive=True)
        with Client(f"127.0.0.1:{grpc_port}") as c:
            nodes = {n.node_id: n for n in c.status().nodes}
            assert sorted(nodes) == ["decode-0", "decode-1", "prefill-0"]
            os.kill(_listener_pid(int(nodes["decode-1"].metrics_address.rsplit(":", 1)[1])), signal.SIGKILL)
            assert wait_for(lambda: {n.node_id: n.state for n in c.status().nodes}["decode-1"] == "down",
                            timeout_s=30)
            assert wait_for(lambda: any("halfmoon-decode-1 died" in line for line in lines), timeout_s=30), \
                "".join(lines)
            assert proc.poll() is None, "".join(lines)  # still serving after several supervision rounds
            for _ in range(3):
                res = c.generate(make_request("The capital of France is", params=SamplingParams(max_tokens=6)))
                assert res.final.usage.completion_tokens >= 1
            assert proc.poll() is None, "".join(lines)
        os.kill(_listener_pid(grpc_port), signal.SIGKILL)  # the conductor
        assert proc.wait(timeout=120) == 0, "".join(lines)
        reader.join(10)
        assert any("halfmoon-conductor died" in line and "stopping" in line for line in lines), "".join(lines)
        assert "stopped" in lines[-1]
        _, alive = psutil.wait_procs(children, timeout=30)
        assert not alive, f"left running: {[p.pid for p in alive]}"
