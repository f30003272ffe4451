"""Who may talk to the conductor.

**Control plane** (nodes' `Register` / `Heartbeat`, served on a listener of its own, not on
the client port): every call carries the metadata `x-halfmoon-control-auth:
v1:<unix ms>:<nonce hex>:<mac hex>`, the MAC an HMAC-SHA256 keyed by the cluster's control
secret over the method name, the timestamp, the nonce and the request's serialized bytes
(the transfer engine's handshake uses the same primitive over its server's nonce). The
conductor answers UNAUTHENTICATED, naming the problem, when the metadata is missing or
malformed, the MAC is wrong (another secret, or a body changed in flight), the timestamp
is further than `MAX_SKEW_S` from its clock, or the nonce was seen before (a replay).

**Client API key** (optional; off unless configured): with a key, every gRPC call of
Generation and Admin must carry the metadata `authorization: Bearer <key>` and every HTTP
`/v1/...` request the header `Authorization: Bearer <key>`; otherwise gRPC UNAUTHENTICATED
/ HTTP 401. Health checks, reflection, `/health`, `/ready` and `/metrics` stay open. A
conductor whose client port binds beyond loopback without a key logs a loud warning.
"""
from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import time
from collections import OrderedDict
from typing import Callable, Iterable, NamedTuple

import grpc
from google.protobuf.message import Message

CONTROL_AUTH_KEY = "x-halfmoon-control-auth"
_VERSION = "v1"
NONCE_BYTES = 16
MAX_SKEW_S = 60.0  # the node's and the conductor's clocks may differ this much
API_KEY_ENV = "HALFMOON_API_KEY"
# services a client may call without the key: load balancers' health checks and reflection
OPEN_SERVICES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and localhost; a wildcard or an outward address is not."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def control_mac(secret: str, method: str, timestamp_ms: int, nonce: bytes, body: bytes) -> bytes:
    msg = b"halfmoon-control-%s\n%s\n%d\n" % (_VERSION.encode(), method.encode(), timestamp_ms) + nonce + body
    return hmac.new(secret.encode(), msg, hashlib.sha256).digest()


def _body(request: Message) -> bytes:
    return request.SerializeToString(deterministic=True)


def sign_control(secret: str, method: str, request: Message,
                 clock: Callable[[], float] = time.time) -> tuple[tuple[str, str], ...]:
    """The metadata a node sends with control call `method` ("Register", "Heartbeat")."""
    ts = int(clock() * 1000)
    nonce = os.urandom(NONCE_BYTES)
    mac = control_mac(secret, method, ts, nonce, _body(request))
    return ((CONTROL_AUTH_KEY, f"{_VERSION}:{ts}:{nonce.hex()}:{mac.hex()}"),)


class ControlVerifier:
    """Checks control-plane calls signed by `sign_control` with the same secret."""

    def __init__(self, secret: str, max_skew_s: float = MAX_SKEW_S, clock: Callable[[], float] = time.time) -> None:
        if not secret:
            raise ValueError("control_secret: the conductor's control plane needs a shared secret (the "
                             "launchers generate one per cluster and give it to the nodes they start)")
        self._secret = secret
        self.max_skew_s = max_skew_s
        self._clock = clock
        self._seen: OrderedDict[bytes, float] = OrderedDict()  # nonce -> when it may be forgotten

    @property
    def remembered(self) -> int:
        """Nonces held to refuse replays (those of the last 2 x max_skew_s)."""
        return len(self._seen)

    def check(self, method: str, request: Message, metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
        """None if the call is authentic, else what is wrong with it."""
        value = next((v for k, v in metadata or () if k == CONTROL_AUTH_KEY), None)
        if value is None:
            return f"no credentials ({CONTROL_AUTH_KEY} metadata): is the node given the cluster's control secret?"
        if isinstance(value, bytes):
            value = value.decode("ascii", "replace")
        parts = value.split(":")
        try:
            if len(parts) != 4 or parts[0] != _VERSION:
                raise ValueError
            ts, nonce, mac = int(parts[1]), bytes.fromhex(parts[2]), bytes.fromhex(parts[3])
            if len(nonce) != NONCE_BYTES:
                raise ValueError
        except ValueError:
            return f"malformed {CONTROL_AUTH_KEY} metadata (want {_VERSION}:<unix ms>:<nonce hex>:<mac hex>)"
        if not hmac.compare_digest(control_mac(self._secret, method, ts, nonce, _body(request)), mac):
            return "bad signature: the node's control secret is not the conductor's"
        now = self._clock()
        skew = abs(now - ts / 1000)
        if skew > self.max_skew_s:
            return (f"stale credentials: signed {skew:.0f}s away from the conductor's clock (limit "
                    f"{self.max_skew_s:g}s): a replay, or clocks out of sync")
        while self._seen and next(iter(self._seen.values())) < now:
            self._seen.popitem(last=False)
        if nonce in self._seen:
            return "replayed call: this nonce was used already"
        self._seen[nonce] = now + 2 * self.max_skew_s  # past then, the timestamp check refuses it
        return None


# --- client API key -------------------------------------------------------------------------
def key_problem(expected: str, authorization: str | None) -> str | None:
    """None if `authorization` (an HTTP header / gRPC metadata value) is `Bearer <expected>`."""
    if not authorization:
        return "missing API key: send the header `Authorization: Bearer <key>`"
    scheme, _, given = authorization.partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        return "malformed Authorization: expected `Bearer <key>`"
    if not hmac.compare_digest(given.strip().encode(), expected.encode()):
        return "incorrect API key"
    return None


def exposure_warning(host: str, api_key: str | None) -> str | None:
    """The warning for a client API reachable beyond this machine with no key, else None."""
    if api_key or is_loopback(host):
        return None
    return (f"the client API (gRPC and HTTP) binds {host} WITHOUT AN API KEY: anyone who can reach this "
            f"address can generate and change settings; set auth.api_key, ${API_KEY_ENV} or --api-key")


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls to the client port's services without `authorization: Bearer <key>`."""

    def __init__(self, api_key: str) -> None:
        self._key = api_key

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if handler is None or details.method.startswith(OPEN_SERVICES):
            return handler
        value = next((v for k, v in details.invocation_metadata or () if k == "authorization"), None)
        problem = key_problem(self._key, value if isinstance(value, str) or value is None else value.decode())
        return handler if problem is None else _refusal(handler, problem)


def _refusal(handler: grpc.RpcMethodHandler, problem: str) -> grpc.RpcMethodHandler:
    """A handler of `handler`'s shape that answers UNAUTHENTICATED without running it."""

    async def unary(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, problem)

    async def streaming(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, problem)
        yield  # an async generator, as the streaming handlers are

    make = {(False, False): grpc.unary_unary_rpc_method_handler, (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler, (True, True): grpc.stream_stream_rpc_method_handler}
    shape = (handler.request_streaming, handler.response_streaming)
    return make[shape](streaming if shape[1] else unary, request_deserializer=handler.request_deserializer,
                       response_serializer=handler.response_serializer)


class _CallDetails(NamedTuple):
    method: str
    timeout: float | None
    metadata: tuple | None
    credentials: object
    wait_for_ready: bool | None
    compression: object


class BearerKey(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """Adds `authorization: Bearer <key>` to every call of a (synchronous) channel:
    `grpc.intercept_channel(channel, BearerKey(key))`."""

    def __init__(self, api_key: str) -> None:
        self._md = ("authorization", f"Bearer {api_key}")

    def _details(self, details) -> _CallDetails:
        return _CallDetails(details.method, details.timeout, (*(details.metadata or ()), self._md),
                            details.credentials, details.wait_for_ready, details.compression)

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._details(details), request)


def keyed_channel(address: str, api_key: str | None) -> grpc.Channel:
    """An insecure channel to `address` that sends `api_key` (if any) with every call."""
    channel = grpc.insecure_channel(address)
    return grpc.intercept_channel(channel, BearerKey(api_key)) if api_key else channel
