"""One exception hierarchy, rooted at :exc:`FederationError`.

Every exception stores exactly its constructor arguments in ``args``, so it
survives :func:`copy.copy` and :mod:`pickle`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._wire._messages import CoordinatorFrame, FederationMessage

__all__ = [
    "AuthenticationError",
    "ConnectionLost",
    "FederationError",
    "HandshakeError",
    "HeartbeatTimeout",
    "MalformedMessage",
    "PolicyViolation",
    "QueueFull",
    "SessionLost",
    "UnsentMessages",
]


class FederationError(Exception):
    """Base class of every error this library raises or reports."""


class QueueFull(FederationError):
    """``send_message`` found ``max_queue_size`` messages already waiting.

    Local back-pressure: nothing was queued. Retry later, or use ``await
    conn.send(msg)``, which waits for room instead.

    Attributes:
        max_size: the queue's bound.
    """

    def __init__(self, max_size: int) -> None:
        super().__init__(max_size)
        self.max_size = max_size

    def __str__(self) -> str:
        return f"message queue full ({self.max_size} messages waiting)"


class MalformedMessage(FederationError):
    """A frame from the peer is not a valid v1 federation message.

    Raised by :func:`~trio_federation.decode_message`; on a live connection it
    is counted in ``errors`` and reported on the errors stream, never raised out
    of ``async for``, and never ends the connection by itself.

    Attributes:
        reason: what was wrong, naming the field.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ConnectionLost(FederationError):
    """The connection closed; raised where that is observed.

    ``async for msg in conn`` raises it when the peer went away abnormally (any
    close code but 1000 and 1001); ``send_message`` raises it on any connection
    that the *peer* closed (for one you closed yourself it raises
    :exc:`trio.ClosedResourceError`, as trio does).

    Attributes:
        code: the WebSocket close code (1006 when the TCP link died without a
            close frame).
        reason: the close reason text, possibly empty.
    """

    def __init__(self, code: int, reason: str = "") -> None:
        super().__init__(code, reason)
        self.code = code
        self.reason = reason

    @property
    def is_normal(self) -> bool:
        """True for the normal close codes 1000 and 1001."""
        return self.code in (1000, 1001)

    def __str__(self) -> str:
        text = f"connection closed with code {self.code}"
        return f"{text}: {self.reason}" if self.reason else text


class HandshakeError(FederationError):
    """The WebSocket upgrade failed or was refused.

    Attributes:
        reason: what went wrong.
        status_code: the HTTP status the listener answered with, when it
            refused the upgrade (None for network errors and time-outs).
    """

    def __init__(self, reason: str, status_code: int | None = None) -> None:
        super().__init__(reason, status_code)
        self.reason = reason
        self.status_code = status_code

    def __str__(self) -> str:
        if self.status_code is None:
            return self.reason
        return f"{self.reason} (HTTP {self.status_code})"


class AuthenticationError(HandshakeError):
    """The listener refused who we are, or could not prove who it is.

    Raised by :func:`~trio_federation.open_orchestrator_connection` when the
    listener answers 401 (no or malformed proof) or 403 (wrong secret, expired
    or replayed proof, unknown orchestrator, certificate not matching the id),
    when TLS refuses a certificate, or when a listener we hold a secret for
    does not prove that it knows it. Retrying with the same credentials cannot
    succeed.
    """


class PolicyViolation(FederationError):
    """A connected peer broke the rules; the message was refused.

    Reported on the errors stream, counted in ``errors`` and logged; never
    raised. The message it refers to was not delivered. A peer that breaks
    them ``max_violations`` times is disconnected with close code 1008.

    Attributes:
        peer: the remote orchestrator's id.
        reason: which rule, and what the peer sent.
    """

    def __init__(self, peer: str, reason: str) -> None:
        super().__init__(peer, reason)
        self.peer = peer
        self.reason = reason

    def __str__(self) -> str:
        return f"refused a message from {self.peer!r}: {self.reason}"


class MessageRefused(FederationError):
    """The peer refused a message we sent it (it broke a rule of the peer's).

    Between trio-federation peers in a session, the receiver tells the sender
    which numbered message it refused and why, before acknowledging past it:
    a refused message is never counted as delivered silently. Reported on the
    sender's errors stream and logged; never raised.

    Attributes:
        peer: the remote orchestrator's id (the one that refused).
        message: the refused message (or coordinator frame), or None if it
            is no longer known.
        reason: the peer's reason.
    """

    def __init__(
        self, peer: str, message: FederationMessage | CoordinatorFrame | None, reason: str
    ) -> None:
        super().__init__(peer, message, reason)
        self.peer = peer
        self.message = message
        self.reason = reason

    def __str__(self) -> str:
        what = "a message" if self.message is None else f"a {self.message.type} message"
        return f"{self.peer!r} refused {what}: {self.reason}"


class HeartbeatTimeout(FederationError):
    """No liveness signal came from a peer within ``heartbeat_timeout``.

    Reported on the errors stream (the connection becomes ``degraded``); never
    raised.

    Attributes:
        peer: the remote orchestrator's id.
        timeout: the heartbeat timeout in seconds.
    """

    def __init__(self, peer: str, timeout: float) -> None:
        super().__init__(peer, timeout)
        self.peer = peer
        self.timeout = timeout

    def __str__(self) -> str:
        return f"no heartbeat received from {self.peer!r} for {self.timeout:g}s"


class UnsentMessages(FederationError):
    """Messages were left unsent when a connection closed.

    Reported on the errors stream and logged when ``disconnect()`` ran out of
    ``disconnect_timeout`` (the peer stopped reading) or the link died with
    messages still queued; never raised.

    Attributes:
        peer: the remote orchestrator's id.
        unsent: how many accepted messages were never written.
    """

    def __init__(self, peer: str, unsent: int) -> None:
        super().__init__(peer, unsent)
        self.peer = peer
        self.unsent = unsent

    def __str__(self) -> str:
        return f"{self.unsent} queued message(s) to {self.peer!r} were never sent"


class SessionLost(FederationError):
    """A resumable session could not be resumed: this is the gap, made explicit.

    Reported on the errors stream and logged, never raised, when the link came
    back but the peer no longer knew the session — its process restarted, or
    it waited longer than its ``resume_timeout`` — or when the connection ended
    while messages were still unacknowledged. The connection then goes on
    with a fresh session (or ends).

    Attributes:
        peer: the remote orchestrator's id.
        unacknowledged: our messages that were sent but never acknowledged, in
            order: the peer's application may or may not have received them.
            Resend them if that is safe for your application.
        reason: why the session was lost.
    """

    def __init__(
        self, peer: str, unacknowledged: tuple[FederationMessage, ...] | Any, reason: str = ""
    ) -> None:
        super().__init__(peer, unacknowledged, reason)
        self.peer = peer
        self.unacknowledged: tuple[FederationMessage, ...] = tuple(unacknowledged)
        self.reason = reason

    def __str__(self) -> str:
        count = len(self.unacknowledged)
        text = f"session with {self.peer!r} lost; {count} unacknowledged message(s) may be lost"
        return f"{text}: {self.reason}" if self.reason else text
