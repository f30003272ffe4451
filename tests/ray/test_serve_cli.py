"""`halfmoon serve --config FILE` on either launcher: serves the config's cluster, and
SIGTERM stops every process it started (the embedded Ray instance included)."""
from __future__ import annotations

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


@pytest.mark.parametrize("launcher", ["ray", "processes"])
def test_serve_from_a_config_and_stop_on_sigterm(tmp_path, launcher):
    grpc_port, http_port = free_port(), free_port()
    config = tmp_path / "cluster.yaml"
    config.write_text(f"kv: {{num_blocks: 256}}\nconductor: {{grpc_port: {grpc_port}, policy: least_loaded}}\n")
    args = [os.path.join(os.path.dirname(sys.executable), "halfmoon"), "serve", "--config", str(config),
            "--launcher", launcher, "--http-port", str(http_port), "--timeout", "240"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    try:
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
    finally:
        if proc.poll() is None:
            for p in psutil.Process(proc.pid).children(recursive=True):
                p.kill()
            proc.kill()
            proc.wait(10)
