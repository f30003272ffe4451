"""Connecting `halfmoon up` / `halfmoon down` to an existing Ray cluster, so that they work
the same from a shell on the head as inside `ray job submit`, and never hang.

- Which cluster: `--address`, else the config's `ray.address`; `auto` means what Ray means
  by it (`RAY_ADDRESS`, which Ray sets inside a job; else the cluster `ray start` last
  recorded on this machine; else the one GCS running here).
- Loopback: Ray rewrites a loopback GCS address to the machine's outward address unless
  `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0` (`ray start` is told so in the README and its jobs
  inherit it; a shell is not). A GCS on 127.0.0.1 is reached on 127.0.0.1 here.
- Token auth: `ray start` turns Ray's token auth on when it finds a token
  (`~/.ray/auth_token`, which any earlier local `ray.init()` leaves behind). A command here
  sends the token found here (`RAY_AUTH_TOKEN`, `RAY_AUTH_TOKEN_PATH`, `~/.ray/auth_token`)
  unless `RAY_AUTH_MODE` is set; Ray itself does so only for `auto`. A disabled cluster
  ignores a token it is sent.
- Fail fast: one GCS call with a deadline before `ray.init` tells "nothing listens there",
  "not a Ray GCS" and "token refused" apart within seconds, and `ray.init` runs under a
  watchdog that ends the process with a message if it still hangs.
"""
from __future__ import annotations

import ipaddress
import os
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

PROBE_TIMEOUT_S = 3.0
AUTH_MODE_ENV = "RAY_AUTH_MODE"
_TOKEN_HELP = ("this machine needs the cluster's token: copy the head's ~/.ray/auth_token here, or set "
               "RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH (and RAY_AUTH_MODE=token)")


class RayConnectError(RuntimeError):
    """The Ray cluster could not be reached or refused us; the message says which and why."""


@dataclass(frozen=True, slots=True)
class RayTarget:
    address: str  # what ray.init is given (host:port, or ray://host:port)
    host: str
    port: int

    @property
    def gcs(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def loopback(self) -> bool:
        return is_loopback(self.host)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def token_available() -> bool:
    """Whether a Ray auth token is configured for this process (the places Ray reads)."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return True
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    return Path(path).is_file() if path else (Path.home() / ".ray" / "auth_token").is_file()


def use_token_if_available() -> bool:
    """Send the local token (RAY_AUTH_MODE=token) unless RAY_AUTH_MODE is set; call it before
    Ray is imported, since Ray reads the mode once. True when token mode is on."""
    if AUTH_MODE_ENV not in os.environ and token_available():
        os.environ[AUTH_MODE_ENV] = "token"
    return token_mode()


def token_mode() -> bool:
    return os.environ.get(AUTH_MODE_ENV, "").lower() == "token"


def resolve(address: str) -> RayTarget:
    """The GCS that `address` (host:port, ray://host:port or auto) designates."""
    if address == "local":
        raise RayConnectError("address 'local' would start a new Ray instance; give the cluster's "
                              "GCS as HOST:PORT, or auto")
    text = address
    if address == "auto":
        from ray._private.services import get_ray_address_from_environment

        try:
            text = get_ray_address_from_environment("auto", None)
        except ConnectionError:
            raise RayConnectError("no Ray cluster found on this machine (RAY_ADDRESS is unset and no "
                                  "`ray start` is running here); start one with `ray start --head` "
                                  "or pass --address HOST:PORT") from None
    rest = text.rpartition("://")[2]
    host, colon, port = rest.rpartition(":")
    host = host.strip("[]")
    if not colon or not host or not port.isdigit():
        raise RayConnectError(f"Ray address {text!r} is not HOST:PORT (or auto)")
    return RayTarget(text, host, int(port))


def probe(target: RayTarget, timeout_s: float = PROBE_TIMEOUT_S) -> None:
    """One GCS call (GetClusterId, with our token when token auth is on) under a deadline;
    raises `RayConnectError` saying what is wrong. Ray Client addresses (ray://) and Ray
    versions without these internals get a TCP connect instead."""
    if "://" in target.address:
        return _tcp_probe(target, timeout_s)
    try:
        import grpc
        from ray._private.authentication.grpc_authentication_client_interceptor import (
            SyncAuthenticationMetadataClientInterceptor,
        )
        from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc
    except ImportError:
        return _tcp_probe(target, timeout_s)
    channel = grpc.intercept_channel(grpc.insecure_channel(target.gcs), SyncAuthenticationMetadataClientInterceptor())
    try:
        gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel).GetClusterId(
            gcs_service_pb2.GetClusterIdRequest(), timeout=timeout_s)
    except grpc.RpcError as e:
        code = e.code()
        if code == grpc.StatusCode.UNAUTHENTICATED:
            why = ("refused the token sent from here (it differs from the head's ~/.ray/auth_token)"
                   if token_mode() else f"requires token authentication; {_TOKEN_HELP}")
            raise RayConnectError(f"the Ray cluster at {target.gcs} {why}") from None
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            raise RayConnectError(f"cannot reach a Ray GCS at {target.gcs} within {timeout_s:g}s "
                                  f"({code.name}: {e.details()}); is `ray start --head` running there?") from None
        raise RayConnectError(f"{target.gcs} did not answer as a Ray GCS ({code.name}: {e.details()})") from None
    finally:
        channel.close()


def _tcp_probe(target: RayTarget, timeout_s: float) -> None:
    import socket

    try:
        socket.create_connection((target.host, target.port), timeout=timeout_s).close()
    except OSError as e:
        raise RayConnectError(f"cannot reach {target.gcs} within {timeout_s:g}s ({e.strerror or e}); "
                              "is the Ray cluster running there?") from None


def connect(address: str, namespace: str, timeout_s: float = 30.0) -> RayTarget:
    """`ray.init` against the existing cluster at `address`, as described above. Raises
    `RayConnectError` when it cannot connect; if `ray.init` itself has not returned after
    `timeout_s`, the watchdog prints why to stderr and ends the process (exit code 1): a
    half-made Ray connection cannot be abandoned any other way."""
    from cluster.launch import keep_ray_on_loopback

    use_token_if_available()
    target = resolve(address)
    if target.loopback:
        keep_ray_on_loopback()
    probe(target)
    import ray

    watchdog = threading.Timer(timeout_s, _give_up, (target, timeout_s))
    watchdog.daemon = True
    watchdog.start()
    try:
        ray.init(address=target.address, namespace=namespace, log_to_driver=True)
    except ConnectionError as e:
        raise RayConnectError(f"could not join the Ray cluster at {target.gcs}: {e}") from None
    finally:
        watchdog.cancel()
    return target


def _give_up(target: RayTarget, timeout_s: float) -> None:
    hint = "" if token_mode() else f"; if it uses token authentication, {_TOKEN_HELP}"
    sys.stderr.write(f"error: the Ray GCS at {target.gcs} answered, but joining the cluster did not complete "
                     f"within {timeout_s:g}s{hint}\n")
    sys.stderr.flush()
    os._exit(1)
