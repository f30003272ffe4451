"""The transfer engine's exception hierarchy.

Everything the engine raises, or records as a batch's failure, is a `TransferError`.
Errors raised at submit time (`InvalidTransfer`, `RegistrationError`) are about the
caller's own arguments; every other error arrives through a batch handle and says what
the peer or the network did.
"""

from __future__ import annotations


class TransferError(Exception):
    """Base class of every transfer engine error."""


class InvalidTransfer(TransferError, ValueError):
    """A request is malformed on our side: unknown local region, range out of bounds,
    a peer that belongs to another engine. Raised by `write`/`read` before anything moves."""


class RegistrationError(TransferError, ValueError):
    """A buffer cannot be registered (not contiguous, not on the CPU, empty...)."""


class DescriptorError(TransferError, ValueError):
    """A peer descriptor cannot be decoded."""


class TransferRefused(TransferError):
    """The peer refused the request (unknown region, out of bounds, read-only region).

    The peer touched none of its memory for the refused request."""


class AuthenticationError(TransferRefused):
    """The peer refused our handshake: the shared tokens differ (or one side has none)."""


class ProtocolError(TransferError):
    """A peer sent bytes that do not follow the wire protocol (or another version of it)."""


class PeerConnectionError(TransferError):
    """The peer cannot be reached or went away (see the two subclasses)."""


class PeerUnreachable(PeerConnectionError):
    """No connection to the peer could be opened or its handshake did not finish."""


class PeerDisconnected(PeerConnectionError):
    """The connection to the peer broke while a batch was in flight."""


class TransportUnavailable(TransferError):
    """The requested transport cannot reach this peer (different host, no shared
    memory, Mooncake not installed or not enabled on both ends)."""


class TransferTimeout(TransferError, TimeoutError):
    """The batch did not complete within its timeout; it is FAILED."""


class WaitTimeout(TransferError, TimeoutError):
    """`wait(timeout)` gave up waiting; the batch itself is still in flight."""


class TransferCancelled(TransferError):
    """The batch was cancelled before it completed."""


class EngineClosed(TransferError):
    """The engine was closed; batches still in flight when it closed fail with this."""
