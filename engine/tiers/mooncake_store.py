"""The cluster tier's real backend, Mooncake Store, and its master process.

`MooncakeStoreBackend` wraps `mooncake.store.MooncakeDistributedStore` from the
`mooncake-transfer-engine-non-cuda` wheel (TCP here; RDMA where the NICs have it): `setup`
mounts a segment of this process's memory into the cluster's store and connects to the
master, `register_buffer` makes the host pool addressable, and the batched zero-copy calls
do the rest. Mooncake's `setup` retries for about 90 s when the master is not there, so
`connect` first checks that the master's RPC port and metadata server answer (a second at
most) and fails at once with a clear message otherwise.

`MooncakeMaster` runs the `mooncake_master` binary the wheel ships, bound to loopback (RPC,
HTTP metadata server, metrics), with a store keeper beside it (`engine/tiers/keeper.py`)
that mounts `keeper_gb` of memory into the store, and stops both by their PIDs.
"""
from __future__ import annotations

import importlib
import logging
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

log = logging.getLogger(__name__)


class StoreUnavailable(RuntimeError):
    """The cluster tier cannot run: the wheel does not load or the master does not answer."""


def store_unavailable_reason() -> str | None:
    """None when Mooncake Store's client loads here, else why not."""
    try:
        importlib.import_module("mooncake.store")
    except ImportError as exc:
        return (f"Mooncake Store does not load ({exc}): the cluster KV tier is off; install the optional "
                "extra (pip package mooncake-transfer-engine-non-cuda, .ci/install-mooncake.sh)")
    return None


def master_binary() -> Path:
    import mooncake

    return Path(mooncake.__file__).parent / "mooncake_master"


def _split(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    return host, int(port)


def _answers(host: str, port: int, timeout: float) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def master_problem(master: str, metadata: str, timeout: float = 1.0) -> str | None:
    """None when the master's RPC port and its metadata server answer, else what does not."""
    host, port = _split(master)
    if not _answers(host, port, timeout):
        return f"the Mooncake master at {master} does not answer"
    try:
        urllib.request.urlopen(metadata + "?key=halfmoon-probe", timeout=timeout).close()
    except urllib.error.HTTPError:
        pass  # 404 for an unknown key: the server is up
    except (urllib.error.URLError, OSError) as e:
        return f"the Mooncake metadata server at {metadata} does not answer ({e})"
    return None


class MooncakeStoreBackend:
    name = "mooncake"

    def __init__(self, store) -> None:
        self._store = store

    @classmethod
    def connect(cls, *, local_host: str, master: str, metadata: str, segment_bytes: int,
                local_buffer_bytes: int = 16 << 20, protocol: str = "tcp") -> "MooncakeStoreBackend":
        reason = store_unavailable_reason() or master_problem(master, metadata)
        if reason is not None:
            raise StoreUnavailable(reason)
        from mooncake.store import MooncakeDistributedStore

        store = MooncakeDistributedStore()
        rc = store.setup(local_host, metadata, segment_bytes, local_buffer_bytes, protocol, "", master)
        if rc != 0:
            raise StoreUnavailable(f"Mooncake Store setup against master {master} failed (code {rc})")
        return cls(store)

    def register(self, address: int, length: int) -> None:
        rc = self._store.register_buffer(address, length)
        if rc != 0:
            raise StoreUnavailable(f"Mooncake Store refused to register {length} bytes at {address:#x} (code {rc})")

    def exists(self, keys: Sequence[str]) -> list[bool]:
        res = self._store.batch_is_exist(list(keys))
        if any(r < 0 for r in res):
            raise ConnectionError(f"Mooncake Store batch_is_exist failed (codes {sorted(set(r for r in res if r < 0))})")
        return [r == 1 for r in res]

    def get_into(self, keys, addresses, lengths) -> list[int]:
        return list(self._store.batch_get_into(list(keys), list(addresses), list(lengths)))

    def put_from(self, keys, addresses, lengths) -> list[int]:
        return list(self._store.batch_put_from(list(keys), list(addresses), list(lengths)))

    def remove(self, key: str) -> int:
        return self._store.remove(key)

    def close(self) -> None:
        self._store.close()


@dataclass
class MooncakeMaster:
    """A `mooncake_master` process on loopback: RPC on `port`, the HTTP metadata server on
    `metadata_port`, metrics on `metrics_port`."""

    port: int
    metadata_port: int
    metrics_port: int
    host: str = "127.0.0.1"
    lease_ms: int = 200  # how long a read keeps an object from eviction
    keeper_gb: float = 0.0  # memory the keeper beside the master mounts into the store (0: no keeper)
    log_path: Path | None = None
    proc: subprocess.Popen | None = None
    keeper: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def metadata_url(self) -> str:
        return f"http://{self.host}:{self.metadata_port}/metadata"

    def start(self, timeout: float = 20.0) -> "MooncakeMaster":
        reason = store_unavailable_reason()
        if reason is not None:
            raise StoreUnavailable(reason)
        binary = master_binary()
        if not os.access(binary, os.X_OK):
            binary.chmod(binary.stat().st_mode | 0o111)
        args = [str(binary), f"-rpc_address={self.host}", f"-rpc_port={self.port}",
                "-enable_http_metadata_server=true", f"-http_metadata_server_host={self.host}",
                f"-http_metadata_server_port={self.metadata_port}", f"-metrics_host={self.host}",
                f"-metrics_port={self.metrics_port}", f"-default_kv_lease_ttl={self.lease_ms}",
                "-rpc_thread_num=2"]
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        try:
            self.proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        finally:
            if self.log_path:
                out.close()
        deadline = time.monotonic() + timeout
        while master_problem(self.address, self.metadata_url, timeout=0.5) is not None:
            if self.proc.poll() is not None:
                raise StoreUnavailable(f"mooncake_master exited with code {self.proc.returncode} at start"
                                       + (f" (log: {self.log_path})" if self.log_path else ""))
            if time.monotonic() > deadline:
                self.stop()
                raise StoreUnavailable(f"mooncake_master did not answer on {self.address} within {timeout:.0f} s")
            time.sleep(0.1)
        if self.keeper_gb > 0:
            try:
                self._start_keeper(deadline)
            except BaseException:
                self.stop()
                raise
        return self

    def _start_keeper(self, deadline: float) -> None:
        import selectors

        args = [sys.executable, "-m", "engine.tiers.keeper", "--master", self.address, "--metadata",
                self.metadata_url, "--segment-gb", str(self.keeper_gb), "--host", self.host]
        err = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        try:
            self.keeper = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL)
        finally:
            if self.log_path:
                err.close()
        sel = selectors.DefaultSelector()
        sel.register(self.keeper.stdout, selectors.EVENT_READ)
        line = b""
        while not line.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or not sel.select(left):
                raise StoreUnavailable(f"the store keeper did not mount its {self.keeper_gb:g} GiB in time")
            chunk = self.keeper.stdout.read1(256)
            if not chunk:
                break
            line += chunk
        sel.close()
        if line.strip() != b"ready":
            raise StoreUnavailable(f"the store keeper failed: {line.decode(errors='replace').strip() or 'exited'}")

    def stop(self, timeout: float = 5.0) -> None:
        for p in (self.keeper, self.proc):  # the keeper first: it unmounts from a live master
            if p is None or p.poll() is not None:
                continue
            p.terminate()
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout)
        if self.keeper is not None and self.keeper.stdout is not None:
            self.keeper.stdout.close()
