"""halfmoon's transfer engine: moves KV blocks from one process's registered memory into
memory a peer registered for them, in batches, over TCP, POSIX shared memory or Mooncake.

Model (after Mooncake's Transfer Engine and NIXL). Each process runs one
`TransferEngine` with a segment name and a TCP listener. It registers memory regions
(`register`, `allocate_tensor`), publishes them in a `PeerDescriptor`, and issues
batches of (local_region, local_offset, remote_region, remote_offset, length) entries
with `write` / `read`. A batch returns a `TransferHandle` to `poll()`, `wait()`,
`await` or `cancel()`; it ends exactly once, DONE, FAILED or CANCELLED. DONE means every
byte is in the destination memory: over TCP the receiver has acknowledged it, over
shared memory the copy into the receiver's mapping has returned, over Mooncake its
engine reported completion.

Handshake (peer to peer, on the engine's TCP listener; no metadata service). A client
connects and receives SERVER_HELLO (a 16-byte random nonce, and whether a token is
required). It answers CLIENT_HELLO: HMAC-SHA256(token, nonce + its segment name) and the
name. The server checks the MAC (when it has a token) and replies WELCOME carrying its
descriptor as JSON (segment, host, port, host id, regions with size / read-only flag /
shm name / address for Mooncake, Mooncake session), or a refusal, and closes. The token
never crosses the wire. `connect("host:port")` or `connect(descriptor)` runs this
handshake; a control plane may carry `descriptor().to_bytes()` to peers in advance.

Wire protocol (TCP, after the handshake; see `protocol.py`). Frames have a 28-byte
little-endian header (magic "HMTE", version, kind, status, body length, frame id,
payload length). WRITE carries a table of (region id, offset, length) entries and then
the payload, sent straight from the registered memory; the receiver validates every
entry before touching memory, receives the payload straight into its region with
`recvmsg_into`, and replies ACK (OK, or REFUSED with the reason after discarding the
payload). READ carries an entry table; the reply READ_DATA carries the data, received
straight into the local region. Replies come back in frame order per connection, so a
connection pipelines frames. Each peer gets a small pool of connections; batches are cut
into frames of at most 8 MiB and large batches are striped across the pool. Batches up
to 4 MiB are sent by the calling thread when a connection is idle (one thread hand-off
less); larger ones by the connection's sender thread, so `write` returns at once.

Shared memory. `allocate_tensor` / `allocate_buffer` memory lives in a POSIX segment
named `hm-te-<segment>-<pid>-<random>`; a peer on the same host maps it (once, with
MAP_POPULATE) and copies into it. The name is unlinked when its engine closes; segments
left by killed processes are swept (by their pid) when the next engine starts.

Transport choice (`transport="auto"`): shared memory when the peer shares this host's
kernel and /dev/shm and the destination regions are shm-backed (`allocate_*`), TCP
otherwise. "tcp", "shm" and "mooncake" force one (Mooncake needs both ends started with
it and the optional `mooncake-transfer-engine-non-cuda` package).

Fault injection (`faults.py`, for chaos tests): an engine given a `FaultPlan` (or started
with `HALFMOON_TRANSFER_FAULTS="fail=0.1,delay=0.1:0.2,seed=7"`) fails or delays a seeded
fraction of the batches it issues.
"""

from .config import EngineConfig
from .engine import TransferEngine
from .errors import (
    AuthenticationError,
    DescriptorError,
    EngineClosed,
    InvalidTransfer,
    PeerConnectionError,
    PeerDisconnected,
    PeerUnreachable,
    ProtocolError,
    RegistrationError,
    TransferCancelled,
    TransferError,
    TransferRefused,
    TransferTimeout,
    TransportUnavailable,
    WaitTimeout,
)
from .faults import FaultPlan, InjectedFault
from .handle import TransferHandle
from .mooncake import mooncake_unavailable_reason
from .records import (
    EngineStats,
    PeerDescriptor,
    Region,
    RegionId,
    RegionInfo,
    TransferEntry,
    TransferOp,
    TransferState,
    TransportKind,
)
from .transport import Peer

__all__ = [
    "AuthenticationError",
    "DescriptorError",
    "EngineClosed",
    "EngineConfig",
    "EngineStats",
    "FaultPlan",
    "InjectedFault",
    "InvalidTransfer",
    "Peer",
    "PeerDescriptor",
    "PeerConnectionError",
    "PeerDisconnected",
    "PeerUnreachable",
    "ProtocolError",
    "Region",
    "RegionId",
    "RegionInfo",
    "RegistrationError",
    "TransferCancelled",
    "TransferEngine",
    "TransferEntry",
    "TransferError",
    "TransferHandle",
    "TransferOp",
    "TransferRefused",
    "TransferState",
    "TransferTimeout",
    "TransportKind",
    "TransportUnavailable",
    "WaitTimeout",
    "mooncake_unavailable_reason",
]
