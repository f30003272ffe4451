"""Helpers for the Ray tests: ports, polling, shared-memory segments, Prometheus text, and
stopping exactly the processes a test started."""
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


def session_processes(sid: int, marker: str | None = None) -> list:
    """Live processes of the session `sid` (what a command started with `start_new_session`
    spawned, daemons included: Ray's never leave their session), those whose command line
    names `marker`, and the descendants of all of them."""
    import psutil

    roots = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if proc.pid == os.getpid():
                continue
            if os.getsid(proc.pid) == sid or (marker and any(marker in a for a in proc.info["cmdline"] or ())):
                roots.append(proc)
        except (psutil.Error, OSError):
            pass
    found = {p.pid: p for p in roots}
    for root in roots:
        try:
            found.update({c.pid: c for c in root.children(recursive=True)})
        except psutil.Error:
            pass
    return [p for p in found.values() if p.pid != os.getpid()]


def stop_processes(procs: list, grace_s: float = 15.0) -> None:
    """SIGTERM each of `procs`, then SIGKILL those still alive after `grace_s`."""
    import psutil

    for p in procs:
        try:
            p.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=5)


class RayHead:
    """A `ray start --head` cluster of our own: loopback only, its own temp dir and ports.

    `ray start` runs in a session of its own; `stop()` ends exactly that session's processes
    (GCS, raylet, dashboard, Ray Client server, workers, the job's driver) and any naming the
    (unique) temp dir - never by name."""

    def __init__(self, *, num_cpus: int, resources: dict[str, float], env: dict[str, str]) -> None:
        import json
        import subprocess
        import sys
        import tempfile

        self.temp_dir = tempfile.mkdtemp(prefix="hmray-", dir="/tmp")  # short: Ray's socket paths must fit
        self.env = env
        self.sid: int | None = None
        self.gcs_address = f"127.0.0.1:{free_port()}"
        self.dashboard_url = f"http://127.0.0.1:{free_port()}"
        bin_dir = os.path.dirname(sys.executable)
        args = [os.path.join(bin_dir, "ray"), "start", "--head", "--node-ip-address", "127.0.0.1",
                "--port", self.gcs_address.rsplit(":", 1)[1], "--temp-dir", self.temp_dir,
                "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
                "--dashboard-port", self.dashboard_url.rsplit(":", 1)[1],
                "--dashboard-agent-listen-port", str(free_port()), "--ray-client-server-port", str(free_port()),
                "--num-cpus", str(num_cpus), "--resources", json.dumps(resources),
                "--object-store-memory", str(100 * 2**20), "--disable-usage-stats"]
        try:
            proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                    start_new_session=True)
            self.sid = proc.pid
            out, err = proc.communicate(timeout=180)
        except BaseException:
            self.stop()
            raise
        if proc.returncode != 0:
            self.stop()
            raise RuntimeError(f"ray start failed ({proc.returncode}):\n{out}\n{err}")

    def processes(self) -> list:
        return session_processes(self.sid if self.sid is not None else -1, self.temp_dir)

    def stop(self, grace_s: float = 15.0) -> None:
        import shutil

        stop_processes(self.processes(), grace_s)
        shutil.rmtree(self.temp_dir, ignore_errors=True)
