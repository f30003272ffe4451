"""`ray job submit -- halfmoon up --config FILE` against a `ray start --head` cluster brings
halfmoon up as detached actors that outlive the job and serve; `halfmoon down` stops them."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import grpc
import pytest
from ray_helpers import RayHead, free_port, wait_for

from cluster.client import Client, make_request
from engine.sampling import SamplingParams

pytestmark = [pytest.mark.slow, pytest.mark.real_model]

BIN = os.path.dirname(sys.executable)


@pytest.fixture
def ray_head():
    env = {**os.environ, "PATH": BIN + os.pathsep + os.environ.get("PATH", ""),
           "RAY_AUTH_MODE": "disabled", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    head = RayHead(num_cpus=3, resources={"prefill": 1, "decode": 1}, env=env)
    try:
        yield head
    finally:
        head.stop()
        assert head.processes() == [], "processes of the test's Ray cluster survived"


def run(head: RayHead, *args: str, timeout_s: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(args, env=head.env, capture_output=True, text=True, timeout=timeout_s)


def test_ray_job_submit_of_halfmoon_up_serves_until_halfmoon_down(tmp_path, ray_head):
    grpc_port, http_port = free_port(), free_port()
    config = tmp_path / "cluster.yaml"
    config.write_text(f"""
prefill: {{count: 1, resources: {{prefill: 1}}}}
decode: {{count: 1, resources: {{decode: 1}}}}
kv: {{num_blocks: 256}}
conductor: {{grpc_port: {grpc_port}, http_port: {http_port}, ttft_slo_s: 600, tbt_slo_s: 60}}
ray: {{namespace: halfmoon-job-test}}
""")
    started = time.monotonic()
    job = run(ray_head, f"{BIN}/ray", "job", "submit", "--address", ray_head.dashboard_url,
              "--", "halfmoon", "up", "--config", str(config), "--timeout", "180")
    assert job.returncode == 0, f"{job.stdout}\n{job.stderr}"
    assert f"gRPC 127.0.0.1:{grpc_port}" in job.stdout and "succeeded" in job.stdout, job.stdout
    print(f"ray job submit -> halfmoon up: {time.monotonic() - started:.1f}s")

    address = f"127.0.0.1:{grpc_port}"
    with Client(address) as c:  # the job has ended; the detached actors serve on
        res = c.generate(make_request(chat=[("user", "What is the capital of France?")],
                                      params=SamplingParams(max_tokens=12)), timeout=120)
        assert "Paris" in res.text and res.final.prefill_node == "prefill-0"

    again = run(ray_head, f"{BIN}/halfmoon", "up", "--config", str(config), "--address", ray_head.gcs_address)
    assert again.returncode == 1 and "already running" in again.stderr, again.stderr

    down = run(ray_head, f"{BIN}/halfmoon", "down", "--config", str(config), "--address", ray_head.gcs_address)
    assert down.returncode == 0, down.stderr
    assert "halfmoon-conductor" in down.stdout and "halfmoon-decode-0" in down.stdout, down.stdout

    def unreachable() -> bool:
        with Client(address) as c:
            try:
                c.status(timeout=2)
            except grpc.RpcError:
                return True
        return False

    assert wait_for(unreachable, timeout_s=30)
    empty = run(ray_head, f"{BIN}/halfmoon", "down", "--config", str(config), "--address", ray_head.gcs_address)
    assert empty.returncode == 0 and "nothing of halfmoon runs" in empty.stdout, empty.stdout
