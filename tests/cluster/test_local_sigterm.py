"""SIGTERM to a process that is starting a local cluster stops the processes it started."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

SCRIPT = textwrap.dedent("""
    import sys, threading, time
    from cluster.local import LocalCluster
    from conductor.server import ConductorSpec
    from cluster.specs import free_port

    cluster = LocalCluster(ConductorSpec(grpc_port=free_port(), http_port=None), [])

    def report():
        while "conductor" not in cluster.procs or cluster.procs["conductor"].pid is None:
            time.sleep(0.05)
        print(cluster.procs["conductor"].pid, flush=True)

    threading.Thread(target=report, daemon=True).start()
    cluster.start(timeout_s=120)  # no node ever registers: waits until the SIGTERM
""")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie is not running
        return f.read().split(")")[-1].split()[0] != "Z"


def test_sigterm_while_starting_stops_the_conductor_it_started():
    parent = subprocess.Popen([sys.executable, "-c", SCRIPT], stdout=subprocess.PIPE, text=True,
                              cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    child = None
    try:
        child = int(parent.stdout.readline())
        assert _alive(child)
        time.sleep(1.0)  # the conductor is up and the parent waits for nodes
        os.kill(parent.pid, signal.SIGTERM)
        assert parent.wait(30) == 128 + signal.SIGTERM
        deadline = time.monotonic() + 15
        while _alive(child) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(child), "the conductor outlived the process that started it"
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait(10)
        if child is not None and _alive(child):
            os.kill(child, signal.SIGKILL)
