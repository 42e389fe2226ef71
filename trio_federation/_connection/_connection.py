"""OrchestratorConnection: the trio shell around the sans-IO connection state.

Task tree of an open connection (all inside ``async with conn``)::

    runner                      one task in the caller's nursery; its body
    │                           runs one transport after another:
    └── transport nursery       lives as long as one WebSocket
        ├── reader              the runner itself: the only caller of
        │                       socket.get_message()
        ├── writer              the only caller of socket.send_message()
        └── watchdog            sleeps until ConnectionState.next_deadline();
                                pings, and queues our heartbeat message

Three tasks per connection (and the caller's own): the watchdog has nothing
to do between transports (no deadline while the link is down), so it lives in
the transport's nursery, and it is the pinger too. On our own transport
(``WireConnection``) its ping is put in the socket's outbox, and goes out with
the heartbeat message it queues, in the writer's next write; the reader hands
the pong back (``on_pong``), so no task waits for it. On a trio-websocket
socket, whose ``ping()`` waits for the pong, a short-lived task in the
transport nursery sends each ping (one in flight at most).

A connection made by a reconnecting dialer, or a listener's connection to a
peer that negotiated a resumable session, outlives its transports: when one
fails, the runner waits for the next (dialled again, or attached by the
listener when the peer comes back) and carries on with the same queue,
streams and subscriptions.

The children never raise: a failure is recorded as the connection's terminal
reason and surfaces where the user looks (``async for``, ``send_message``, the
errors stream), so the boundary raises one plain exception.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import Any, Final, Self, TypeVar

import attrs
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection

from .._exceptions import (
    ConnectionLost,
    FederationError,
    HeartbeatTimeout,
    MalformedMessage,
    MessageRefused,
    PolicyViolation,
    QueueFull,
    SessionLost,
    UnsentMessages,
)
from .._wire._capabilities import unmet_requirement
from .._wire._codec import MAX_FRAME_SIZE, decode_frame, encode_coordinator_frame, encode_message
from .._wire._compat import release_stream
from .._wire._flag import Flag
from .._wire._frames import WireConnection
from .._wire._messages import (
    Capability,
    ConnectionHealth,
    ConnectionStatus,
    CoordinatorFrame,
    DelegationRequest,
    DelegationResponse,
    FederationMessage,
    HeartbeatPayload,
    HeartbeatStatus,
    MessageType,
    OrchestratorCapabilities,
)
from ._protocol import ConnectionState, TokenBucket
from ._session import (
    BATCH_CHARS,
    BATCH_EXTENSION,
    BATCH_PREFIX,
    ReceiveWindow,
    ResumeOffer,
    SendWindow,
    SessionError,
    ack_frame,
    batch_frames,
    parse_refusal,
    refusal_frame,
    sequenced_frame,
    split_batch,
    split_frame,
)
from ._streams import EventStream, MessageStream, OutboundQueue

__all__ = ["OrchestratorConnection"]

logger = logging.getLogger("trio_federation.connection")

DEFAULT_HEARTBEAT_TIMEOUT: Final = 60.0
"""Seconds without a liveness signal before a connection is degraded."""
DEFAULT_MAX_QUEUE_SIZE: Final = 1000
"""Messages that may wait to be written before ``send_message`` raises QueueFull."""
DEFAULT_DISCONNECT_TIMEOUT: Final = 10.0
"""Seconds ``disconnect()`` may take to drain and close before it aborts."""
DEFAULT_IDLE_TIMEOUT: Final = 30.0
"""Seconds without a data message before ``active`` becomes ``idle``."""
DEFAULT_RECEIVE_BUFFER: Final = 64
"""Incoming data messages buffered for ``async for`` (and per subscription)."""
EVENT_BUFFER: Final = 256
"""Status changes or errors buffered per watcher before the oldest are dropped."""
CANCEL_CLOSE_GRACE: Final = 2.0
"""Upper bound, in seconds, on the close handshake when the block is cancelled."""
DEFAULT_RATE_LIMIT: Final = 10_000.0
"""Incoming messages a second a peer may send, on average (None: no limit).

About a fifth of what one connection carries on one core (~50,000 messages/s
of 500 bytes): one peer cannot take a whole core. In a session (between
trio-federation peers) the limit paces the sender; from a v1 peer, frames
beyond it are refused and the peer is cut off after ``max_violations``."""
DEFAULT_RATE_BURST: Final = 10_000
"""Incoming messages a peer may send at once above the rate."""
DEFAULT_MAX_VIOLATIONS: Final = 20
"""Refused messages (spoofed, misaddressed, over the rate) before a peer is cut off."""
DEFAULT_MAX_SUBSCRIPTIONS: Final = 64
"""Subscriptions open at once on one connection."""
CLOSE_POLICY_VIOLATION: Final = 1008
"""Close code for a peer cut off after ``max_violations`` refused messages."""
BROADCAST_ADDRESSES: Final = frozenset({"*", "broadcast"})
"""Recipients (``to``) that address every orchestrator."""
ACK_DELAY: Final = 0.02
"""Seconds a caught-up receiver waits before acknowledging, to coalesce acks."""
MAX_WRITE_BATCH: Final = 64 * 1024
"""Characters of queued frames the writer coalesces into one write (at least one frame)."""
CLOSE_RESTARTING: Final = 1012
"""Close code meaning "restarting: reconnect and resume" (RFC 6455 Service Restart)."""
RESUMABLE_CODES: Final = frozenset({1006, CLOSE_RESTARTING})
"""Transport ends after which a resumable connection waits for the next transport."""

DATA_TYPES: Final = frozenset({MessageType.DELEGATION, MessageType.CALLBACK, MessageType.BROADCAST})
NORMAL_CLOSE_CODES: Final = frozenset({1000, 1001})

_QueueItem = tuple[FederationMessage | CoordinatorFrame, str]
_Delivery = tuple[int, int, FederationMessage]  # (session epoch, sequence number or 0, message)
_FrameDelivery = tuple[int, int, CoordinatorFrame]

_T = TypeVar("_T")

_Socket = WebSocketConnection | WireConnection
"""A trio-websocket connection (wrapped by the user) or our own (dialed or accepted)."""


@attrs.define
class _Transport:
    """One WebSocket handed to a connection, and how it ended."""

    socket: _Socket
    offer: ResumeOffer | None
    done: Flag = attrs.field(factory=Flag)
    resume: bool = False  # the connection waits for another transport


def check_seconds(name: str, value: float) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"{name} must be a number of seconds, got {type(value).__name__}")
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a positive, finite number of seconds, got {value!r}")
    return float(value)


def _check_size(name: str, value: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be at least 1, got {value!r}")
    return value


def normalize_capabilities(capabilities: Iterable[str], *, strict: bool) -> tuple[str, ...]:
    """Validate capability names into a tuple (unknown names refused if ``strict``)."""
    if isinstance(capabilities, str):
        raise TypeError(f"capabilities must be a list of names, not the string {capabilities!r}")
    result: list[str] = []
    for cap in capabilities:
        if not isinstance(cap, str):
            raise TypeError(f"a capability must be a string, got {type(cap).__name__}")
        if strict and cap not in Capability._value2member_map_:
            allowed = ", ".join(c.value for c in Capability)
            raise ValueError(f"unknown capability {cap!r} (one of: {allowed})")
        result.append(Capability(cap) if cap in Capability._value2member_map_ else cap)
    return tuple(result)


@contextlib.contextmanager
def _shielded_deadline(deadline: float) -> Iterator[trio.CancelScope]:
    with trio.CancelScope(shield=True), trio.move_on_at(deadline) as scope:
        yield scope


class _Subscription:
    __slots__ = ("failure", "predicate", "send_channel", "types")

    def __init__(
        self,
        types: frozenset[MessageType],
        predicate: Callable[[FederationMessage], bool] | None,
        send_channel: trio.MemorySendChannel[_Delivery],
    ) -> None:
        self.types = types
        self.predicate = predicate
        self.send_channel = send_channel
        self.failure: Exception | None = None

    def matches(self, message: FederationMessage) -> bool:
        if message.type not in self.types:
            return False
        return self.predicate is None or bool(self.predicate(message))


class OrchestratorConnection:
    """A live link to one remote orchestrator.

    Get one from :func:`~trio_federation.open_orchestrator_connection` (dialing),
    from the handler of :func:`~trio_federation.serve_federation` (listening), or
    by wrapping an open trio-websocket connection and entering it with ``async
    with conn:``. Until the block is entered the connection is ``connecting``:
    :meth:`send_message` queues, and the queue is written as soon as it opens.

    Leaving the block disconnects gracefully (:meth:`disconnect`) and closes the
    socket; if the block raised, the queue is still drained within
    ``disconnect_timeout`` and the close code is 1011; on cancellation,
    KeyboardInterrupt or SystemExit it is 1001 ("going away"), bounded by
    ``CANCEL_CLOSE_GRACE``. The block never raises because the link
    died earlier unseen: that is raised where it is observed, by ``async for``
    and :meth:`send_message`.

    A connection from a reconnecting dialer, or a listener's connection to a
    peer that negotiated a resumable session, survives the loss of its
    transport (see :doc:`/resilience`): the status is ``disconnected`` (or
    ``connecting`` while dialling) during the gap, and the same streams,
    subscriptions and queue carry on over the next transport.

    Args:
        id: the remote orchestrator's id ("" if not known yet: it is then taken
            from the ``from`` of the first message received).
        socket: an open :class:`trio_websocket.WebSocketConnection`. The
            connection becomes its only reader and writer. (None is for the
            library's own dialer and listener, which attach transports later;
            entering a connection that has neither raises ``ValueError``.)
        capabilities: the remote's capabilities.
        local_id: this orchestrator's id: the sender of heartbeats and of
            acceptances. Without it, no heartbeat messages are sent.
        heartbeat_timeout: seconds without a liveness signal (pong, heartbeat
            message, :meth:`handle_heartbeat`) before the status is
            ``degraded``; pings go out every half of it.
        max_queue_size: messages that may wait to be written.
        disconnect_timeout: bound, in seconds, on :meth:`disconnect`.
        idle_timeout: seconds without data messages before ``active`` turns
            ``idle``.
        receive_buffer_size: incoming data messages buffered for ``async for``
            and for each subscription; when full, the reader waits (back-pressure
            reaches the peer through TCP). In a resumable session it is also
            the window: the peer never has more unacknowledged messages out,
            so the reader never waits.
        max_message_size: longest frame decoded, in characters.
        local_status: the load status announced in heartbeat messages.
        active_connections: called for the ``active_connections`` figure of
            heartbeat messages (default: 1).
        rate_limit: incoming messages a second the peer may send on average
            (a token bucket; None for no limit). In a resumable session it is
            flow control: the reader waits for a token, so the peer's window
            closes and its sender is slowed, never refused. From a v1 peer
            (no session, so no credit to slow it with) a frame beyond it is
            refused unread: reported as :exc:`~trio_federation.PolicyViolation`.
        rate_burst: how many messages the peer may send at once above the rate.
        max_violations: refused messages (over the rate from a v1 peer, or breaking identity
            binding: a ``from`` other than ``id``, a ``to`` other than
            ``local_id`` or a broadcast address, a delegation from someone
            else) after which the peer is disconnected with 1008.
        max_subscriptions: subscriptions open at once.
        dead_timeout: seconds without a liveness signal after which the peer
            is presumed dead and the transport aborted (a half-open TCP link
            is found this way). A resumable connection then resumes over a
            new transport; any other ends with ``ConnectionLost(1006)``. By
            default twice ``heartbeat_timeout`` when a new transport can
            follow (a resumable session, or a reconnecting dialer), and never
            otherwise, where a slow consumer on the peer's side could look
            dead (see :ref:`backpressure-liveness`).
    """

    # Slots: an instance dict of some sixty attributes is twice their size.
    __slots__ = (
        "__weakref__",
        "_ack_due_at",
        "_active_connections",
        "_attaching",
        "_bucket",
        "_capabilities",
        "_clock_origin",
        "_close_scope",
        "_closed_locally",
        "_closing",
        "_dead_timeout",
        "_defer_handover",
        "_disconnect_timeout",
        "_drained",
        "_entered",
        "_epoch",
        "_error_watchers",
        "_extensions",
        "_finished",
        "_first",
        "_first_offer",
        "_frame_subscriptions",
        "_frames_dropped",
        "_handed_over",
        "_heartbeat_timeout",
        "_id",
        "_inbound_recv",
        "_inbound_send",
        "_last_status",
        "_local_id",
        "_local_status",
        "_lost",
        "_max_message_size",
        "_max_queue_size",
        "_max_subscriptions",
        "_max_violations",
        "_next",
        "_next_closed",
        "_nursery_manager",
        "_peer_closed",
        "_ping_in_flight",
        "_ping_sent_at",
        "_queue",
        "_reattach",
        "_receive_buffer_size",
        "_recv_window",
        "_refusals",
        "_run_scope",
        "_running",
        "_self_addressed",
        "_send_window",
        "_session_id",
        "_socket",
        "_state",
        "_status_watchers",
        "_subscriptions",
        "_transport",
        "_transport_end",
        "_transport_nursery",
        "_up",
        "_violations",
        "_wall_origin",
        "_watchdog_scope",
        "_writer_lot",
    )

    def __init__(
        self,
        *,
        id: str,
        socket: WebSocketConnection | None,
        capabilities: Iterable[str] = (),
        local_id: str | None = None,
        heartbeat_timeout: float = DEFAULT_HEARTBEAT_TIMEOUT,
        max_queue_size: int = DEFAULT_MAX_QUEUE_SIZE,
        disconnect_timeout: float = DEFAULT_DISCONNECT_TIMEOUT,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
        receive_buffer_size: int = DEFAULT_RECEIVE_BUFFER,
        max_message_size: int = MAX_FRAME_SIZE,
        local_status: HeartbeatStatus | str = HeartbeatStatus.HEALTHY,
        active_connections: Callable[[], int] | None = None,
        rate_limit: float | None = DEFAULT_RATE_LIMIT,
        rate_burst: int = DEFAULT_RATE_BURST,
        max_violations: int = DEFAULT_MAX_VIOLATIONS,
        max_subscriptions: int = DEFAULT_MAX_SUBSCRIPTIONS,
        dead_timeout: float | None = None,
    ) -> None:
        if not isinstance(id, str):
            raise TypeError(f"id must be a string, got {type(id).__name__}")
        if local_id is not None and not isinstance(local_id, str):
            raise TypeError(f"local_id must be a string, got {type(local_id).__name__}")
        self._id = id
        self._capabilities = normalize_capabilities(capabilities, strict=False)
        self._local_id = local_id
        self._heartbeat_timeout = check_seconds("heartbeat_timeout", heartbeat_timeout)
        self._disconnect_timeout = check_seconds("disconnect_timeout", disconnect_timeout)
        self._max_queue_size = _check_size("max_queue_size", max_queue_size)
        self._max_message_size = _check_size("max_message_size", max_message_size)
        self._local_status = HeartbeatStatus(local_status)
        self._active_connections = active_connections or (lambda: 1)
        self._bucket = (
            None
            if rate_limit is None
            else TokenBucket(
                check_seconds("rate_limit", rate_limit), _check_size("rate_burst", rate_burst)
            )
        )
        self._max_violations = _check_size("max_violations", max_violations)
        self._max_subscriptions = _check_size("max_subscriptions", max_subscriptions)
        self._violations = 0
        self._state = ConnectionState(
            heartbeat_timeout=self._heartbeat_timeout,
            idle_timeout=check_seconds("idle_timeout", idle_timeout),
        )
        self._dead_timeout = (
            None if dead_timeout is None else check_seconds("dead_timeout", dead_timeout)
        )
        self._queue: OutboundQueue[_QueueItem] = OutboundQueue(self._max_queue_size, self._queued)
        self._receive_buffer_size = _check_size("receive_buffer_size", receive_buffer_size)
        self._inbound_send, self._inbound_recv = trio.open_memory_channel[_Delivery](
            self._receive_buffer_size
        )
        self._subscriptions: list[_Subscription] = []
        self._status_watchers: list[EventStream[ConnectionStatus]] = []
        self._error_watchers: list[EventStream[FederationError]] = []
        self._last_status = self._state.status
        # Clock origin: datetimes are derived from trio's clock, so that they
        # follow a MockClock in tests.
        self._wall_origin = datetime.now(UTC)
        self._clock_origin = trio.current_time()
        self._entered = False
        self._running = False  # the runner has started
        self._run_scope: trio.CancelScope | None = None
        # The watchdog's sleep: moving its deadline earlier wakes it up.
        self._watchdog_scope: trio.CancelScope | None = None
        self._ping_in_flight: bytes | None = None  # its payload
        self._ping_sent_at = 0.0
        self._writer_lot = trio.lowlevel.ParkingLot()
        self._ack_due_at: float | None = None  # when a pending ack must go out
        self._closing = False
        self._closed_locally = False
        self._lost: ConnectionLost | None = None  # abnormal end: raised by async for
        self._peer_closed: ConnectionLost | None = None  # normal end by the peer
        self._drained = Flag()
        self._close_scope: trio.CancelScope | None = None
        self._handed_over = Flag()
        self._finished = Flag()
        self._nursery_manager: contextlib.AbstractAsyncContextManager[trio.Nursery] | None = None
        # Transports: the current one, and a rendezvous for the next.
        self._socket: _Socket | None = socket
        self._transport: _Transport | None = None
        self._first: _Transport | None = None if socket is None else _Transport(socket, None)
        # The rendezvous, made on first use (only a connection that can resume
        # needs one): see _next_channel().
        self._next: (
            tuple[trio.MemorySendChannel[_Transport], trio.MemoryReceiveChannel[_Transport]] | None
        ) = None
        self._next_closed = False
        self._transport_nursery: trio.Nursery | None = None
        self._transport_end: ConnectionLost | None = None
        # Who brings the next transport after a loss: a reconnecting dialer
        # (inf: its policy decides when to give up), or the listener within
        # resume_timeout. None: a lost transport ends the connection.
        self._reattach: float | None = None
        self._up = Flag()  # the first transport is running
        self._defer_handover = False
        # The resumable session, once negotiated.
        self._session_id: str | None = None
        self._send_window: SendWindow[_QueueItem] | None = None
        self._recv_window: ReceiveWindow | None = None
        self._first_offer: ResumeOffer | None = None
        self._attaching = False  # a listener is resuming this session
        self._epoch = 0
        # Refused numbered messages not yet told to the peer: (seq, reason).
        # At most a window's worth: each is a message the peer had in flight.
        self._refusals: list[tuple[int, str]] = []
        self._extensions: frozenset[str] = frozenset()  # negotiated at the upgrade
        # The daemon coordinator's dialect: subscribers, and what nobody took.
        self._frame_subscriptions: list[trio.MemorySendChannel[_FrameDelivery]] = []
        self._frames_dropped = 0
        self._self_addressed = 0  # frames whose 'from' was our own id (the daemon's way)

    # -- identity and state ---------------------------------------------------

    @property
    def id(self) -> str:
        """The remote orchestrator's id."""
        return self._id

    @property
    def capabilities(self) -> tuple[str, ...]:
        """The remote orchestrator's capabilities."""
        return self._capabilities

    @property
    def local_id(self) -> str | None:
        """This orchestrator's id, if given."""
        return self._local_id

    @property
    def socket(self) -> _Socket | None:
        """The current WebSocket connection, None between transports (do not use it)."""
        return self._socket

    @property
    def status(self) -> ConnectionStatus:
        """The current :class:`~trio_federation.ConnectionStatus`."""
        return self._state.status

    @property
    def last_heartbeat(self) -> datetime:
        """Time (UTC) of the last liveness signal; the opening time at first."""
        return self._wall(self._state.last_liveness)

    @property
    def message_queue(self) -> tuple[FederationMessage, ...]:
        """Snapshot of the messages accepted but not yet written, oldest first.

        Coordinator frames queued with :meth:`send` are not listed (they
        are not messages).
        """
        return tuple(m for m, _ in self._queue.snapshot() if isinstance(m, FederationMessage))

    @property
    def unacknowledged(self) -> tuple[FederationMessage, ...]:
        """Snapshot of the messages written but not yet acknowledged by the peer.

        Empty unless a resumable session is in use: these are the messages that
        would be sent again after a reconnect (coordinator frames not listed).
        """
        if self._send_window is None:
            return ()
        items = self._send_window.items()
        return tuple(m for m, _ in items if isinstance(m, FederationMessage))

    @property
    def extensions(self) -> frozenset[str]:
        """The protocol extensions both sides agreed on at the upgrade.

        ``"cancel"``: the peer understands a delegator's cancel (see
        :doc:`/protocol`). Empty for a v1 peer, such as the TypeScript daemon,
        and for a connection wrapped around a socket opened elsewhere.
        """
        return self._extensions

    @property
    def latency(self) -> float | None:
        """The last measured ping round trip, in seconds (None before the first pong).

        The same figure as ``get_status().latency``, without building the snapshot.
        """
        return self._state.latency

    @property
    def self_addressed(self) -> int:
        """How many messages from this peer had our own id in ``from``.

        The TypeScript daemon's ``OrchestratorConnection`` writes the id of
        the orchestrator *at the other end* in ``from`` (its ``acceptDelegation``
        does), so its messages to us carry our own id there. Such a message is
        the peer's: it is delivered with ``sender`` set to the peer's id
        (:attr:`id`) and counted here; the first one is logged at debug level.
        A ``from`` naming any third orchestrator is refused (identity binding).
        """
        return self._self_addressed

    @property
    def coordinator_frames_dropped(self) -> int:
        """Frames of the daemon coordinator's dialect that no subscription took.

        See :meth:`subscribe_coordinator`.
        """
        return self._frames_dropped

    @property
    def resumable(self) -> bool:
        """Whether a resumable session with the peer is in use."""
        return self._send_window is not None

    @property
    def local_status(self) -> HeartbeatStatus:
        """The load status announced in heartbeat messages (settable)."""
        return self._local_status

    @local_status.setter
    def local_status(self, value: HeartbeatStatus | str) -> None:
        self._local_status = HeartbeatStatus(value)

    def _wall(self, clock_time: float | None) -> datetime:
        if clock_time is None:
            return self._wall_origin
        return self._wall_origin + timedelta(seconds=clock_time - self._clock_origin)

    def check_capability(self, required: Iterable[str] | OrchestratorCapabilities) -> bool:
        """True if the remote meets ``required`` (True for none).

        ``required`` is a list of capability names (each must be the
        remote's), or the daemon's :class:`~trio_federation.OrchestratorCapabilities`,
        checked as the daemon coordinator checks it against the remote's
        capabilities (``maxSessions`` is not known here and not checked; see
        :ref:`the capability mapping <capability-mapping>`).

        Raises:
            TypeError: ``required`` is a single string.
        """
        return unmet_requirement(self._capabilities, required) is None

    def get_status(self) -> ConnectionHealth:
        """A snapshot of the connection's health figures."""
        now = trio.current_time()
        state = self._state
        return ConnectionHealth(
            status=state.status,
            uptime=state.uptime(now),
            last_heartbeat=self.last_heartbeat,
            messages_sent=state.messages_sent,
            messages_received=state.messages_received,
            errors=state.errors,
            latency=state.latency,
        )

    def handle_heartbeat(self) -> None:
        """Record a liveness signal now."""
        self._state.liveness(trio.current_time())
        self._publish_status()

    def is_healthy(self) -> bool:
        """Whether the link looks alive.

        False if the socket is not open, if no liveness signal came within
        ``heartbeat_timeout``, or if the status is disconnected or error.
        """
        if self._socket is None or self._socket.closed is not None:
            return False
        return self._state.is_healthy(trio.current_time())

    # -- sending ----------------------------------------------------------------

    def _check_sendable(self) -> None:
        ended = self._lost or self._peer_closed
        if ended is not None:
            raise ConnectionLost(ended.code, ended.reason)
        if self._closed_locally or self._queue.closed:
            raise trio.ClosedResourceError(f"the connection to {self._id!r} was closed locally")

    def _encode(self, message: FederationMessage | CoordinatorFrame) -> _QueueItem:
        if isinstance(message, FederationMessage):
            return (message, encode_message(message))
        if isinstance(message, CoordinatorFrame):
            return (message, encode_coordinator_frame(message))
        raise TypeError(
            f"expected a FederationMessage or a CoordinatorFrame, got {type(message).__name__}"
        )

    async def send_message(self, message: FederationMessage | CoordinatorFrame) -> None:
        """Queue ``message`` to be written, in FIFO order.

        While the connection is not open yet, the message waits in the queue and
        is written when it opens. A :class:`~trio_federation.CoordinatorFrame`
        is written in the daemon coordinator's dialect (see
        :ref:`coordinator-dialect`), a :class:`~trio_federation.FederationMessage`
        as a v1 envelope.

        Raises:
            QueueFull: ``max_queue_size`` messages are already waiting; nothing
                was queued (use :meth:`send` to wait for room instead).
            ConnectionLost: the peer closed the connection (or it died).
            trio.ClosedResourceError: you closed it (:meth:`disconnect`).
            TypeError: ``message`` is neither a FederationMessage nor a
                CoordinatorFrame, or holds a value JSON cannot represent.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        self._check_sendable()
        item = self._encode(message)
        try:
            self._queue.put_nowait(item)
        except trio.WouldBlock:
            raise QueueFull(self._max_queue_size) from None
        # Queued, so not cancellable any more; yielding now lets the writer run.
        await trio.lowlevel.cancel_shielded_checkpoint()

    def send_nowait(self, message: FederationMessage | CoordinatorFrame) -> None:
        """Queue ``message`` without waiting, as trio's channels do (no checkpoint).

        For producers that queue several messages before yielding: the writer
        then sends what waits in one batch. Pair it with :meth:`send` (or a
        checkpoint of your own) so the writer gets to run.

        Raises:
            trio.WouldBlock: ``max_queue_size`` messages are already waiting;
                nothing was queued.
            ConnectionLost: the peer closed the connection (or it died).
            trio.ClosedResourceError: you closed it (:meth:`disconnect`).
            TypeError: ``message`` cannot be encoded.
        """
        self._check_sendable()
        self._queue.put_nowait(self._encode(message))

    async def send(self, message: FederationMessage | CoordinatorFrame) -> None:
        """Like :meth:`send_message`, but wait for room when the queue is full.

        This is the back-pressure path: a sender that outruns the peer is slowed
        down to its pace. Cancellation while waiting leaves nothing queued.

        Raises:
            ConnectionLost: the peer closed the connection (or it died).
            trio.ClosedResourceError: you closed it, possibly while waiting.
        """
        self._check_sendable()
        item = self._encode(message)
        try:
            await self._queue.put(item)
        except trio.ClosedResourceError:
            self._check_sendable()
            raise

    async def accept_delegation(self, request: DelegationRequest) -> DelegationResponse:
        """Accept a delegation if this connection is healthy.

        Healthy: sends a ``callback`` carrying ``DelegationResponse(accepted=True)``
        from the local id (``request.to_orchestrator_id`` when none is known) to
        ``request.from_orchestrator_id``, correlated by the task id, and returns
        it. Unhealthy: returns ``accepted=False, reason="Connection unhealthy"``
        and sends nothing.

        Raises:
            QueueFull, ConnectionLost, trio.ClosedResourceError: as
                :meth:`send_message`.
        """
        if not isinstance(request, DelegationRequest):
            raise TypeError(f"expected a DelegationRequest, got {type(request).__name__}")
        if not self.is_healthy():
            await trio.lowlevel.checkpoint()
            return DelegationResponse(
                task_id=request.task.id, accepted=False, reason="Connection unhealthy"
            )
        response = DelegationResponse(task_id=request.task.id, accepted=True)
        await self.send_message(
            FederationMessage(
                type=MessageType.CALLBACK,
                payload=response,
                sender=self._local_id or request.to_orchestrator_id,
                recipient=request.from_orchestrator_id,
                correlation_id=request.task.id,
            )
        )
        return response

    # -- receiving ----------------------------------------------------------------

    def _raise_if_lost(self) -> None:
        if self._lost is not None:
            raise ConnectionLost(self._lost.code, self._lost.reason) from self._lost.__cause__

    def _consumed(self, delivery: tuple[int, int, _T]) -> _T:
        """A delivery left our buffers: acknowledge it (sessions) and unwrap it."""
        epoch, seq, message = delivery
        window = self._recv_window
        if seq and window is not None and epoch == self._epoch:
            self._acknowledge(window, seq)
        return message

    def _acknowledge(self, window: ReceiveWindow, seq: int) -> None:
        """``seq`` is consumed; wake the writer only when an ack is due at once.

        Once per quarter window at most, never once per message; an ack that
        merely becomes pending moves the parked writer's deadline instead.
        """
        idle = window.consumed == window.announced
        window.consume(seq)
        if window.ack_due:
            self._kick_writer()
        elif idle and window.consumed > window.announced:
            # Pending now, due within ACK_DELAY: no task is woken for it (a
            # reply soon carries it anyway); the watchdog's timer is moved.
            self._schedule_ack(trio.current_time())

    def _schedule_ack(self, now: float) -> None:
        """An ack is pending from ``now``: have the watchdog kick the writer when it is due."""
        self._ack_due_at = due = now + ACK_DELAY
        sleep = self._watchdog_scope
        if sleep is not None and due < sleep.deadline:
            sleep.deadline = due  # moves its timer; wakes no one

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> FederationMessage:
        """The next data message; see :meth:`receive`."""
        try:
            return self._consumed(await self._inbound_recv.receive())
        except trio.EndOfChannel:
            self._raise_if_lost()
            raise StopAsyncIteration from None

    async def receive(self) -> FederationMessage:
        """Wait for the next data message not taken by a subscription.

        Raises:
            trio.EndOfChannel: the connection closed normally (or you closed it)
                and every buffered message was read.
            ConnectionLost: the connection was lost abnormally, after the
                buffered messages were read.
        """
        try:
            return self._consumed(await self._inbound_recv.receive())
        except trio.EndOfChannel:
            self._raise_if_lost()
            raise

    def receive_nowait(self) -> FederationMessage:
        """The next buffered data message, without waiting (no checkpoint), as trio's channels.

        For consumers that drain what arrived in one go: each :meth:`receive`
        (and each step of ``async for``) is a scheduler pass, this is not::

            async for msg in conn:
                handle(msg)
                with contextlib.suppress(trio.WouldBlock, trio.EndOfChannel):
                    while True:
                        handle(conn.receive_nowait())

        Raises:
            trio.WouldBlock: nothing is buffered now.
            trio.EndOfChannel: as :meth:`receive`.
            ConnectionLost: as :meth:`receive`.
        """
        try:
            return self._consumed(self._inbound_recv.receive_nowait())
        except trio.EndOfChannel:
            self._raise_if_lost()
            raise

    @contextlib.contextmanager
    def subscribe(
        self,
        *types: MessageType | str,
        predicate: Callable[[FederationMessage], bool] | None = None,
        max_buffer: int = DEFAULT_RECEIVE_BUFFER,
    ) -> Iterator[MessageStream[FederationMessage]]:
        """Receive the messages of some ``types`` (and matching ``predicate``).

        Each incoming message goes to the first subscription that matches it (in
        the order they were made), else to ``async for msg in conn``. With no
        types, the data types (``delegation``, ``callback``, ``broadcast``)
        match; control messages (``heartbeat``, ``status``) reach only
        subscriptions that name them. A full subscription buffer makes the
        reader wait, like a slow ``async for``. Leaving the block unsubscribes;
        messages still buffered in it are discarded (their number is logged).

        If ``predicate`` raises, that subscription ends: the exception is logged
        and raised by the stream's next ``receive()`` (after what it buffered),
        and the message goes on to the next route. The connection goes on.

        Yields:
            A :class:`~trio_federation.MessageStream`.

        Raises:
            RuntimeError: ``max_subscriptions`` subscriptions are open already.
        """
        if len(self._subscriptions) >= self._max_subscriptions:
            raise RuntimeError(
                f"too many subscriptions on the connection to {self._id!r} "
                f"(max_subscriptions={self._max_subscriptions})"
            )
        wanted = frozenset(MessageType(t) for t in types) or DATA_TYPES
        capacity = _check_size("max_buffer", max_buffer)
        if self._session_id is not None:
            # The window bounds what is in flight: a buffer that large never
            # makes the reader wait.
            capacity = max(capacity, self._receive_buffer_size)
        send_channel, receive_channel = trio.open_memory_channel[_Delivery](capacity)
        subscription = _Subscription(wanted, predicate, send_channel)
        if self._finished.is_set():
            send_channel.close()
        else:
            self._subscriptions.append(subscription)

        def check_end() -> None:
            if subscription.failure is not None:
                raise subscription.failure
            self._raise_if_lost()

        try:
            yield MessageStream(receive_channel, check_end, self._consumed, self._discard_unread)
        finally:
            # The send side first: a message the reader is still offering goes
            # on to the next route instead of into a buffer about to be dropped.
            with contextlib.suppress(ValueError):
                self._subscriptions.remove(subscription)
            send_channel.close()
            self._discard_unread(receive_channel)
            receive_channel.close()

    def _discard_unread(self, channel: trio.MemoryReceiveChannel[Any]) -> None:
        """Count (and acknowledge) what a closing stream leaves unread."""
        unread = 0
        while True:
            try:
                self._consumed(channel.receive_nowait())
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                break
            unread += 1
        if unread:
            logger.warning(
                "connection to %r: a subscription was left with %d unread message(s)",
                self._id,
                unread,
            )

    @contextlib.contextmanager
    def subscribe_coordinator(
        self, max_buffer: int = DEFAULT_RECEIVE_BUFFER
    ) -> Iterator[MessageStream[CoordinatorFrame]]:
        """Receive the frames of the daemon coordinator's dialect.

        The TypeScript daemon's ``OrchestratorFederation`` speaks a second
        dialect of single-encoded frames with no ``from`` or ``to`` (see
        :ref:`coordinator-dialect`); the connection decodes them into
        :class:`~trio_federation.CoordinatorFrame` objects whose ``sender`` is
        this peer's id. They never reach ``async for msg in conn`` or
        :meth:`subscribe`: each goes to the first open coordinator
        subscription, or, when there is none, is dropped (counted in
        :attr:`coordinator_frames_dropped`, the first logged). A full buffer
        makes the reader wait, as for :meth:`subscribe`. Leaving the block
        unsubscribes; frames still buffered are discarded (their number is
        logged). Subscribe before the first checkpoint after getting the
        connection to miss none. Answer with :meth:`send` of a
        :class:`~trio_federation.CoordinatorFrame`.

        Yields:
            A :class:`~trio_federation.MessageStream` of
            :class:`~trio_federation.CoordinatorFrame`; it ends as the
            connection's streams do.
        """
        capacity = _check_size("max_buffer", max_buffer)
        send_channel, receive_channel = trio.open_memory_channel[_FrameDelivery](capacity)
        if self._finished.is_set():
            send_channel.close()
        else:
            self._frame_subscriptions.append(send_channel)
        try:
            yield MessageStream(
                receive_channel, self._raise_if_lost, self._consumed, self._discard_unread
            )
        finally:
            with contextlib.suppress(ValueError):
                self._frame_subscriptions.remove(send_channel)
            send_channel.close()
            self._discard_unread(receive_channel)
            receive_channel.close()

    async def _route_frame(self, delivery: _FrameDelivery) -> None:
        for channel in tuple(self._frame_subscriptions):
            try:
                await self._deliver(channel, delivery)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                continue  # unsubscribed meanwhile: offer it to the next one
            return
        self._drop(delivery[1])
        self._frames_dropped += 1
        if self._frames_dropped == 1:
            logger.info(
                "connection to %r: a %r frame of the coordinator dialect was dropped "
                "(no coordinator subscription)",
                self._id,
                delivery[2].type.value,
            )

    def _from_self(self, message: FederationMessage) -> FederationMessage:
        """A message from the peer with our id in ``from`` (the daemon's way): it is the peer's."""
        self._self_addressed += 1
        if self._self_addressed == 1:
            logger.debug(
                "connection to %r: its messages name us (%r) in 'from', as the TypeScript "
                "daemon does; taken as %r's",
                self._id,
                self._local_id,
                self._id,
            )
        return attrs.evolve(message, sender=self._id)

    @contextlib.contextmanager
    def watch_status(self) -> Iterator[EventStream[ConnectionStatus]]:
        """Stream every status change (replaces the seed's ``status`` event).

        The stream ends after the final ``disconnected`` or ``error``.
        """
        with self._watch(self._status_watchers) as stream:
            yield stream

    @contextlib.contextmanager
    def watch_errors(self) -> Iterator[EventStream[FederationError]]:
        """Stream every reported error (replaces the seed's ``error`` event).

        Items are :exc:`~trio_federation.MalformedMessage`,
        :exc:`~trio_federation.PolicyViolation`,
        :exc:`~trio_federation.HeartbeatTimeout`,
        :exc:`~trio_federation.ConnectionLost` (also for a lost transport that
        a resumable connection then replaces),
        :exc:`~trio_federation.SessionLost` and
        :exc:`~trio_federation.UnsentMessages`; each is also counted in
        ``errors`` and logged.
        """
        with self._watch(self._error_watchers) as stream:
            yield stream

    @contextlib.contextmanager
    def _watch(self, watchers: list[EventStream[Any]]) -> Iterator[EventStream[Any]]:
        stream: EventStream[Any] = EventStream(EVENT_BUFFER)
        if self._finished.is_set():
            stream._end()
        watchers.append(stream)
        try:
            yield stream
        finally:
            watchers.remove(stream)

    # -- events -------------------------------------------------------------------

    def _publish_status(self) -> None:
        status = self._state.status
        if status is self._last_status:
            return
        logger.info("connection to %r: %s -> %s", self._id, self._last_status, status)
        self._last_status = status
        for watcher in self._status_watchers:
            watcher._push(status)
        scope = self._watchdog_scope
        if scope is not None:
            deadline = self._state.next_deadline()
            if deadline < scope.deadline:
                scope.deadline = deadline  # wake the watchdog sooner

    def _report(self, error: FederationError, level: int = logging.WARNING) -> None:
        _detach(error)
        self._state.error()
        logger.log(level, "connection to %r: %s", self._id, error)
        for watcher in self._error_watchers:
            watcher._push(error)

    # -- lifecycle ------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        if self._entered:
            raise RuntimeError("an OrchestratorConnection can be entered only once")
        if self._first is None and self._reattach is None:
            raise ValueError("this connection has no socket and no way to get one")
        self._entered = True
        # The nursery's manager is kept and exited by __aexit__ (an AsyncExitStack
        # would hold a 760-byte deque for the life of the connection).
        manager = trio.open_nursery()
        nursery = await manager.__aenter__()
        try:
            # Not nursery.start: the runner is shielded from birth, and start()
            # could not cancel it if our caller were cancelled meanwhile.
            ready = Flag()
            nursery.start_soon(self._run, ready)
            await ready.wait()
        except BaseException:
            self._closing = True  # the runner, if it has not run yet, ends at once
            if self._run_scope is not None:
                self._run_scope.cancel()
            await manager.__aexit__(None, None, None)
            raise
        self._nursery_manager = manager
        # The reader routes nothing until the caller has the connection: code
        # that subscribes before its first checkpoint misses no message.
        if not self._defer_handover:
            self._handed_over.set()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        assert self._nursery_manager is not None
        try:
            if exc is None:
                await self.disconnect()
            elif isinstance(exc, Exception):
                await self._close(1011, "internal error")
            else:  # cancelled, interrupted, exiting: this side is going away
                await self._close(
                    1001, "going away", trio.current_time() + CANCEL_CLOSE_GRACE, drain=False
                )
        finally:
            try:
                await self._nursery_manager.__aexit__(exc_type, exc, tb)
            except BaseExceptionGroup as group:
                raise_single(group)
        return False

    def _start_session(self, session: str, peer: ResumeOffer | None) -> None:
        """Use a resumable session (before the first transport runs).

        ``peer`` is the other side's offer; None for a dialer that is still to
        learn whether the listener grants it.
        """
        self._session_id = session
        self._first_offer = peer
        if peer is not None:
            self._send_window = SendWindow(peer.window)
            self._recv_window = ReceiveWindow(self._receive_buffer_size)
            if self._first is not None:
                self._first.offer = peer

    def _adopt(self, socket: _Socket) -> None:
        """The first transport, for a connection made before its socket."""
        assert self._first is None
        assert self._socket is None
        self._socket = socket
        self._first = _Transport(socket, self._first_offer)

    def _resume_offer_for(self, session: str) -> ResumeOffer:
        """What this side would offer for a brand-new ``session``."""
        return ResumeOffer(session, 0, self._receive_buffer_size)

    def _resume_offer(self, *, resumed: bool = False) -> ResumeOffer:
        """This side's session parameters for the next upgrade."""
        assert self._session_id is not None
        received = 0 if self._recv_window is None else self._recv_window.received
        return ResumeOffer(self._session_id, received, self._receive_buffer_size, resumed)

    async def _attach(self, socket: _Socket, offer: ResumeOffer | None) -> bool:
        """Carry on over ``socket``; return once the connection is done with it.

        ``offer`` is the peer's session answer (or request) for this transport.
        If the connection has ended meanwhile, return at once: the caller
        closes the socket. Returns whether the connection waits for another
        transport.
        """
        transport = _Transport(socket, offer)
        try:
            await self._next_channel()[0].send(transport)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return False
        # Shielded: the transport's end is bounded by the connection's own
        # timers, and its host must outlive the close handshake.
        with trio.CancelScope(shield=True):
            await transport.done.wait()
        return transport.resume

    async def _wait_up(self) -> None:
        """Wait until the first transport runs (or the connection ended)."""
        await self._up.wait()

    def _dialing(self) -> None:
        """A reconnecting dialer is dialling: the status is ``connecting``."""
        if self._transport is None and not self._finished.is_set():
            self._state.transport_down(dialing=True)
            self._publish_status()

    def _give_up(self, lost: ConnectionLost) -> None:
        """No transport will come any more: end the connection as ``lost``."""
        if self._lost is None and not self._closed_locally:
            self._lost = lost
        self._close_next()

    def _next_channel(
        self,
    ) -> tuple[trio.MemorySendChannel[_Transport], trio.MemoryReceiveChannel[_Transport]]:
        """The rendezvous where the next transport is handed over (made on first use)."""
        if self._next is None:
            self._next = trio.open_memory_channel[_Transport](0)
            if self._next_closed:
                self._next[0].close()
        return self._next

    def _close_next(self) -> None:
        """No transport will come any more."""
        self._next_closed = True
        if self._next is not None:
            self._next[0].close()

    async def _detach(self) -> None:
        """End the current transport now (its peer is back on another one)."""
        transport = self._transport
        if transport is None:
            return
        self._abort_transport(ConnectionLost(1006, "replaced by the peer's new transport"))
        with trio.CancelScope(shield=True):
            await transport.done.wait()

    async def _run(self, ready: Flag) -> None:
        """The runner: one transport after another, until none comes or may come."""
        # Shielded: cancelling the caller's scope ends the connection through
        # __aexit__ (a bounded close with 1001), which then cancels this scope.
        try:
            with trio.CancelScope(shield=True) as self._run_scope:
                if self._closing:  # the caller gave up before we ran
                    self._run_scope.cancel()
                self._running = True
                ready.set()
                del ready  # not kept for the life of the connection
                transport, self._first = self._first, None
                while True:
                    if transport is None:
                        transport = await self._wait_for_transport()
                        if transport is None:
                            break
                    ended = await self._run_transport(transport)
                    transport = None
                    if not self._may_resume(ended):
                        self._settle(ended)
                        break
                    why = ended.reason or f"code {ended.code}"
                    self._report(
                        ConnectionLost(ended.code, f"link lost ({why}); waiting to resume"),
                        level=logging.INFO,  # not an end: the next transport carries on
                    )
        finally:
            self._finish()

    async def _wait_for_transport(self) -> _Transport | None:
        """The next transport, or None if none will come (in time)."""
        if self._closing:
            return None
        limit = math.inf if self._reattach is None else self._reattach
        with trio.move_on_after(limit):
            try:
                return await self._next_channel()[1].receive()
            except trio.EndOfChannel:
                return None
        if self._lost is None and not self._closed_locally:
            self._lost = ConnectionLost(
                1006, f"the peer did not come back within the resume timeout ({limit:g}s)"
            )
        return None

    def _may_resume(self, ended: ConnectionLost) -> bool:
        return (
            not self._closing
            and self._lost is None
            and self._reattach is not None
            and ended.code in RESUMABLE_CODES
        )

    def _settle(self, ended: ConnectionLost) -> None:
        """Record how the connection ended from how its last transport ended."""
        if self._lost is not None or self._closed_locally:
            return
        if self._closing:
            self._closed_locally = True
        elif ended.code in NORMAL_CLOSE_CODES:
            self._peer_closed = ended
        else:
            self._lost = ended

    async def _run_transport(self, transport: _Transport) -> ConnectionLost:
        """Run reader, writer and watchdog over one transport; return how it ended."""
        self._transport = transport
        self._socket = transport.socket
        self._transport_end = None
        try:
            if self._closing:
                self._transport_end = ConnectionLost(1000, "closing")
                return self._transport_end
            self._resume(transport.offer)
            self._state.dead_timeout = self._effective_dead_timeout()
            self._state.transport_up(trio.current_time())
            self._publish_status()
            self._up.set()
            self._ping_in_flight = None  # one sent over an earlier transport is lost
            # Its cancel scope is the transport's: _abort_transport cancels it.
            async with trio.open_nursery() as nursery:
                self._transport_nursery = nursery
                nursery.start_soon(self._guarded, self._writer)
                nursery.start_soon(self._guarded, self._watchdog)
                await self._guarded(self._reader)
                nursery.cancel_scope.cancel()
            ended = self._transport_end or self._socket_end(transport.socket)
            transport.resume = self._may_resume(ended)
            if self._transport_end is not None or transport.socket.closed is None:
                await self._abort_socket(transport.socket, ended)
            if not self._closing:
                self._state.transport_down(dialing=False)
                self._publish_status()
            return ended
        finally:
            self._transport_nursery = None
            self._transport = None
            await release_stream(transport.socket)
            transport.done.set()

    @staticmethod
    def _socket_end(socket: _Socket) -> ConnectionLost:
        closed = socket.closed
        if closed is None:
            return ConnectionLost(1006, "the WebSocket transport stopped")
        return ConnectionLost(closed.code, closed.reason or "")

    async def _abort_socket(self, socket: _Socket, ended: ConnectionLost) -> None:
        """Close ``socket`` at once, with no handshake."""
        with trio.CancelScope(shield=True), trio.CancelScope() as abort:
            abort.cancel()
            await socket.aclose(ended.code if ended.code != 1006 else 1001, "aborted")

    def _abort_transport(self, ended: ConnectionLost) -> None:
        """End the current transport now (the connection may resume over another)."""
        if self._transport_end is None:
            self._transport_end = ended
        if self._transport_nursery is not None:
            self._transport_nursery.cancel_scope.cancel()

    def _resume(self, offer: ResumeOffer | None) -> None:
        """Set the session up for a new transport from the peer's ``offer``."""
        if self._session_id is None:
            return
        if offer is None or (offer.session != self._session_id):
            # The peer speaks no sessions (a v1 peer, or a listener that does
            # not offer them): at-most-once from here on.
            self._end_session("the peer does not resume sessions", disable=True)
            return
        if self._send_window is None or self._recv_window is None:  # granted now
            self._send_window = SendWindow(offer.window)
            self._recv_window = ReceiveWindow(self._receive_buffer_size)
            return
        known = offer.resumed or (offer.received == 0 and self._send_window.last_seq == 0)
        if not known and (self._send_window.last_seq or self._recv_window.received):
            self._end_session("the peer no longer knows the session (it restarted?)")
            self._send_window.window = offer.window
            return
        try:
            self._send_window.resume(offer.received, offer.window)
        except SessionError as exc:
            self._end_session(str(exc))

    def _effective_dead_timeout(self) -> float:
        """``dead_timeout``, or its default.

        Twice ``heartbeat_timeout`` when a new transport can follow (a session,
        or a reconnecting dialer); never otherwise: a plain connection is only
        ``degraded`` by silence.
        """
        if self._dead_timeout is not None:
            return self._dead_timeout
        if self._send_window is not None or self._reattach is not None:
            return 2 * self._heartbeat_timeout
        return math.inf

    def _end_session(self, reason: str, *, disable: bool = False) -> None:
        """The session cannot go on: report what may be lost, start afresh."""
        lost: list[_QueueItem] = []
        if self._send_window is not None:
            lost = self._send_window.restart()
        if self._recv_window is not None:
            self._recv_window.restart()
        self._refusals.clear()  # numbers of the session that ended
        self._epoch += 1
        if lost or (self._send_window is not None and not disable):
            self._report(SessionLost(self._id, tuple(m for m, _ in lost), reason))
        if disable:
            self._send_window = self._recv_window = None

    async def _guarded(self, task: Callable[[], Any]) -> None:
        """Run a child task; an unexpected exception becomes the terminal reason."""
        try:
            await task()
        except (trio.Cancelled, KeyboardInterrupt):
            raise
        except BaseException as exc:
            logger.exception("connection to %r: internal error in %s", self._id, task.__name__)
            lost = ConnectionLost(1011, f"internal error in {task.__name__}: {exc!r}")
            lost.__cause__ = exc
            await self._abort(lost, "internal error")

    async def _abort(self, lost: ConnectionLost, reason: str) -> None:
        """End the connection now as ``lost``: no draining, a bounded close."""
        if self._lost is None and not self._closed_locally:
            self._lost = lost
        self._closing = True
        self._queue.close()
        self._close_next()
        socket = self._socket
        if socket is not None and self._transport is not None:
            # The close frame first, so that the peer learns why.
            with trio.CancelScope(shield=True), trio.move_on_after(CANCEL_CLOSE_GRACE):
                await socket.aclose(lost.code, reason)
        self._abort_transport(lost)
        if self._run_scope is not None:
            self._run_scope.cancel()

    def _finish(self) -> None:
        """Record why the connection ended, then end every stream (in that order)."""
        if self._finished.is_set():
            return
        if self._lost is None and not self._closed_locally and self._peer_closed is None:
            # Cancelled from outside, or never given a transport: a local end.
            self._closed_locally = True
        ended = self._lost or self._peer_closed
        code = 1000 if ended is None else ended.code
        self._state.close(code, trio.current_time())
        unsent = len(self._queue)
        unacknowledged = self.unacknowledged
        self._queue.close()
        self._close_next()
        if self._next is not None:
            self._next[1].close()
        self._inbound_send.close()
        for subscription in self._subscriptions:
            subscription.send_channel.close()
        for frames in self._frame_subscriptions:
            frames.close()
        if self._lost is not None and self._lost.code not in NORMAL_CLOSE_CODES:
            self._report(self._lost)
        if unacknowledged and self._lost is not None:
            self._report(SessionLost(self._id, unacknowledged, "the connection was lost"))
        elif unacknowledged:
            logger.info(
                "connection to %r: %d message(s) unacknowledged when it closed normally",
                self._id,
                len(unacknowledged),
            )
        if unsent:
            self._report(UnsentMessages(self._id, unsent))
        self._publish_status()
        for status_watcher in self._status_watchers:
            status_watcher._end()
        for error_watcher in self._error_watchers:
            error_watcher._end()
        self._drained.set()
        self._up.set()
        self._finished.set()
        logger.info("connection to %r closed with code %d", self._id, code)

    # -- the transport's tasks --------------------------------------------------------

    async def _reader(self) -> None:
        socket = self._socket
        assert socket is not None
        await self._handed_over.wait()
        batching = BATCH_EXTENSION in self._extensions
        while True:
            try:
                data = await socket.get_message()
            except ConnectionClosed:
                return
            recv = self._recv_window
            bucket = self._bucket
            if batching and isinstance(data, str) and data.startswith(BATCH_PREFIX):
                if await self._on_batch(data):
                    return
                continue
            seq = 0
            ack_only = False
            if recv is not None and bucket is not None:
                await self._pace(bucket, 1)
            if recv is not None and isinstance(data, str):
                # The session's numbers first: even a frame refused below must
                # be counted, or the next one would look like a gap.
                number, ack = split_frame(data)
                try:
                    if ack is not None:
                        self._acknowledged(ack)
                    if number is not None:
                        if not recv.accept(number):
                            continue  # a duplicate sent again after a reconnect
                        seq = number
                    elif ack is None and (refusal := parse_refusal(data)) is not None:
                        self._refused_by_peer(*refusal)
                        continue
                except SessionError as exc:
                    await self._abort(ConnectionLost(1002, f"session protocol: {exc}"), "protocol")
                    return
                ack_only = number is None and ack is not None
            if recv is None and bucket is not None and not bucket.take(trio.current_time()):
                if await self._over_the_limit(bucket):
                    return
                continue
            if ack_only:
                continue  # an acknowledgement alone, already applied
            if await self._on_envelope(data, seq):
                return

    @staticmethod
    async def _pace(bucket: TokenBucket, count: int) -> None:
        """In a session the limit is flow control: wait for ``count`` tokens.

        What the peer sent waits unconsumed meanwhile, so its window closes
        and its sender is slowed; nothing is refused.
        """
        delay = bucket.reserve(trio.current_time(), count)
        if delay:
            await trio.sleep(delay)

    async def _over_the_limit(self, bucket: TokenBucket) -> bool:
        """A message past the limit without a session: refused, True when cut off.

        v1 has no credit to slow the peer with: the message is refused unread
        (a flood costs no decoding), and the peer cut off after max_violations.
        """
        return await self._violation(f"more than {bucket.rate:g} messages/s (burst {bucket.burst})")

    def _acknowledged(self, ack: int) -> None:
        """The peer consumed our messages up to ``ack``.

        Raises:
            SessionError: ``ack`` is beyond what was sent.
        """
        assert self._send_window is not None
        queue = self._queue
        if self._send_window.acknowledge(ack) and (len(queue) or queue.closed):
            # The writer may wait for this (a full window, or a drain);
            # otherwise it has nothing to do.
            self._kick_writer()

    async def _on_batch(self, data: str) -> bool:
        """Handle a batch frame, envelope by envelope; True when the connection is ending."""
        recv = self._recv_window
        bucket = self._bucket
        try:
            first, ack, envelopes = split_batch(data, session=recv is not None)
            if recv is not None:
                self._acknowledged(ack)
        except SessionError as exc:
            if recv is None:
                # Nothing is numbered without a session: a malformed frame like
                # any other, reported, and the connection goes on.
                self._report(MalformedMessage(f"malformed batch frame: {exc}"))
                return False
            # In a session its envelopes had numbers: the sequence is lost.
            await self._abort(ConnectionLost(1002, f"batch protocol: {exc}"), "protocol")
            return True
        if recv is not None and bucket is not None:
            await self._pace(bucket, len(envelopes))  # a token per envelope
        for number, envelope in enumerate(envelopes, first):
            seq = 0
            if recv is not None:
                try:
                    if not recv.accept(number):
                        continue  # a duplicate sent again after a reconnect
                except SessionError as exc:
                    await self._abort(ConnectionLost(1002, f"session protocol: {exc}"), "protocol")
                    return True
                seq = number
            elif bucket is not None and not bucket.take(trio.current_time()):
                if await self._over_the_limit(bucket):
                    return True
                continue
            if await self._on_envelope(envelope, seq):
                return True
        return False

    async def _on_envelope(self, data: str | bytes, seq: int) -> bool:
        """Decode, check and route one envelope; True when the connection is ending.

        ``seq`` is its number in the session (0 outside one), already accepted.
        """
        state = self._state
        now = trio.current_time()
        try:
            message = decode_frame(data, max_size=self._max_message_size)
        except MalformedMessage as exc:
            self._refuse(seq, str(exc))
            self._report(exc)
            return False
        if isinstance(message, CoordinatorFrame):
            # No envelope, so nothing to bind: it is the peer's by the link.
            state.received(now, data=False)
            state.liveness(now)
            self._publish_status()
            frame = attrs.evolve(message, sender=self._id)
            await self._route_frame((self._epoch, seq, frame))
            return False
        local = self._local_id
        if message.sender == local and local is not None and self._id and self._id != local:
            message = self._from_self(message)
        elif not self._id and message.sender != local:
            self._id = message.sender
        broken = self._check_binding(message)
        if broken is not None:
            self._refuse(seq, broken)
            return await self._violation(broken)
        is_data = message.type in DATA_TYPES
        changed = state.received(now, data=is_data)
        if message.type is MessageType.HEARTBEAT:
            assert isinstance(message.payload, HeartbeatPayload)
            state.remote_heartbeat(now, message.payload.status)
            changed = True
        if changed:
            self._publish_status()
        await self._route((self._epoch, seq, message), is_data)
        return False

    def _drop(self, seq: int) -> None:
        """A numbered message is not delivered: it is consumed all the same."""
        if seq and self._recv_window is not None:
            self._acknowledge(self._recv_window, seq)

    def _refuse(self, seq: int, reason: str) -> None:
        """A numbered message is refused: tell the sender, then consume it.

        The writer sends the refusal before any acknowledgement that covers
        it, so the sender never counts a refused message as delivered.
        """
        if seq and self._recv_window is not None:
            self._refusals.append((seq, reason))
            self._acknowledge(self._recv_window, seq)
            self._kick_writer()

    def _refused_by_peer(self, seq: int, reason: str) -> None:
        """The peer refused our message ``seq``: report it (it is about to be acknowledged)."""
        item = None if self._send_window is None else self._send_window.get(seq)
        self._report(MessageRefused(self._id, None if item is None else item[0], reason))

    def _check_binding(self, message: FederationMessage) -> str | None:
        """Why ``message`` breaks identity binding, or None if it does not."""
        if message.sender != self._id:
            return f"'from' is {message.sender!r}, but this peer is {self._id!r}"
        local = self._local_id
        if (
            local is not None
            and message.recipient != local
            and message.recipient not in BROADCAST_ADDRESSES
        ):
            return f"'to' is {message.recipient!r}: neither {local!r} nor a broadcast address"
        payload = message.payload
        if isinstance(payload, DelegationRequest) and payload.from_orchestrator_id != self._id:
            return (
                f"a delegation from {payload.from_orchestrator_id!r} "
                f"arrived from {self._id!r} (fromOrchestratorId must be the sender)"
            )
        return None

    async def _violation(self, reason: str) -> bool:
        """Report a refused message; cut the peer off after ``max_violations``.

        Returns True when the connection is ending.
        """
        self._violations += 1
        self._report(PolicyViolation(self._id, reason))
        if self._violations < self._max_violations:
            return False
        await self._abort(
            ConnectionLost(
                CLOSE_POLICY_VIOLATION,
                f"{self._violations} messages refused by policy; last: {reason}",
            ),
            "policy violation",
        )
        return True

    async def _route(self, delivery: _Delivery, is_data: bool) -> None:
        message = delivery[2]
        for subscription in tuple(self._subscriptions) if self._subscriptions else ():
            try:
                matched = subscription.matches(message)
            except Exception as exc:
                logger.exception("connection to %r: a subscription's predicate raised", self._id)
                subscription.failure = exc
                self._subscriptions.remove(subscription)
                subscription.send_channel.close()
                continue
            if matched:
                try:
                    await self._deliver(subscription.send_channel, delivery)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    continue  # unsubscribed meanwhile: offer it to the next one
                return
        if is_data:
            try:
                await self._deliver(self._inbound_send, delivery)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self._drop(delivery[1])
        else:
            self._drop(delivery[1])  # a control message nobody asked for

    async def _deliver(self, channel: trio.MemorySendChannel[_T], delivery: _T) -> None:
        try:
            channel.send_nowait(delivery)
            return
        except trio.WouldBlock:
            pass
        # The application is not keeping up: wait for it (back-pressure), and
        # tell the watchdog that the peer's silence meanwhile is ours.
        self._state.stall(trio.current_time(), stalled=True)
        try:
            await channel.send(delivery)
        finally:
            self._state.stall(trio.current_time(), stalled=False)
            self._publish_status()

    def _kick_writer(self) -> None:
        if self._writer_lot:  # parked (an empty lot's unpark_all still costs)
            self._writer_lot.unpark_all()

    def _queued(self) -> None:
        """The queue changed: wake the writer if it can act on it.

        With the window full it waits for an ack anyway, unless the queue's
        head is our heartbeat, which is unnumbered and always written.
        """
        if not self._writer_lot:
            return
        send, queue = self._send_window, self._queue
        head = None if send is None or send.open else queue.peek_nowait()
        if head is None or head[1] or queue.closed:
            self._writer_lot.unpark_all()

    async def _writer(self) -> None:
        socket = self._socket
        assert socket is not None
        queue = self._queue
        state = self._state
        # Our transport writes several frames at once; trio-websocket one per
        # call. With batches (negotiated), what waits goes out in one frame.
        wire = socket if isinstance(socket, WireConnection) else None
        batching = BATCH_EXTENSION in self._extensions
        limit = BATCH_CHARS if batching else MAX_WRITE_BATCH if wire is not None else 1
        frames: list[str] = []
        texts: list[str] = []  # the envelopes written this round, in order
        while True:
            send, recv = self._send_window, self._recv_window
            frames.clear()
            texts.clear()
            if self._refusals:
                # Before anything that carries an ack past them.
                frames.extend(refusal_frame(seq, why) for seq, why in self._refusals)
                self._refusals.clear()
            written = 0  # queued messages among the frames (not resends, not acks)
            data = False  # one of them is a data message
            unnumbered = 0  # items to pop from the queue once written
            size = 0
            if send is not None and recv is not None:
                first = 0  # the sequence number of texts[0]: the rest follow it
                while size < limit and (again := send.next_resend()) is not None:
                    seq, (_, text) = again
                    first = first or seq
                    texts.append(text)
                    size += len(text)
                while size < limit and (head := queue.peek_nowait()) is not None:
                    (message, text), extra = head
                    if extra:  # our heartbeat: unnumbered, alone
                        if not texts and not frames:
                            frames.append(text)
                            written = unnumbered = 1
                        break
                    if not send.open:
                        break  # the window is full: wait for an ack
                    seq = send.number(queue.pop())
                    first = first or seq
                    texts.append(text)
                    size += len(text)
                    written += 1
                    data = data or message.type in DATA_TYPES
                if texts:
                    ack = recv.announce()
                    if batching:
                        frames.extend(batch_frames(texts, first, ack))
                    else:
                        frames.extend(
                            sequenced_frame(seq, ack, text) for seq, text in enumerate(texts, first)
                        )
            else:
                # v1: popped once written, so "accepted but not yet written" is exact.
                for message, text in queue.items():
                    if size >= limit:
                        break
                    texts.append(text)
                    size += len(text)
                    data = data or message.type in DATA_TYPES
                written = unnumbered = len(texts)
                frames.extend(batch_frames(texts, None, 0) if batching else texts)
            if not frames and recv is not None and recv.ack_due:
                frames.append(ack_frame(recv.announce()))
            if not frames and recv is not None and recv.consumed != recv.announced:
                # A pending ack goes out within ACK_DELAY of when it became
                # pending, coalescing what follows (a data frame carries it
                # sooner). The watchdog wakes us when it is due.
                now = trio.current_time()
                if self._ack_due_at is None:
                    self._schedule_ack(now)
                elif now >= self._ack_due_at:
                    frames.append(ack_frame(recv.announce()))
            if not frames and (wire is None or not wire.output_pending):
                # (Pending output: the watchdog's ping, written below with no frame.)
                if queue.closed and not len(queue) and (send is None or not len(send)):
                    self._drained.set()
                await self._writer_lot.park()
                continue
            if recv is not None and recv.consumed == recv.announced:
                self._ack_due_at = None
            # When nothing else waits, the writer parks next: that is its
            # scheduler pass, so the write itself need not make one.
            schedule = (
                len(queue) > unnumbered
                or bool(self._refusals)
                or (send is not None and send.resending)
            )
            try:
                if wire is not None:
                    await wire.send_messages(frames, schedule=schedule)
                else:
                    for frame in frames:
                        await socket.send_message(frame)
            except ConnectionClosed:
                return  # the reader sees the close and ends the transport
            for _ in range(unnumbered):
                queue.pop()  # written: no longer waiting
            if written and state.sent(trio.current_time(), data=data, count=written):
                self._publish_status()

    async def _watchdog(self) -> None:
        state = self._state
        kicked = -math.inf  # the ack deadline the writer was last woken for
        while True:
            # _publish_status moves this deadline earlier when the next one is,
            # and _schedule_ack when an acknowledgement falls due sooner.
            deadline = state.next_deadline()
            ack_due = self._ack_due_at
            if ack_due is not None and kicked < ack_due < deadline:
                deadline = ack_due  # (one the writer was told of is its own now)
            try:
                with trio.CancelScope(deadline=deadline) as self._watchdog_scope:
                    # trio.sleep_forever(), without its coroutine and closure.
                    await trio.lowlevel.wait_task_rescheduled(_abort_sleep)
            finally:
                self._watchdog_scope = None
            now = trio.current_time()
            if self._ack_due_at is not None and kicked < self._ack_due_at <= now:
                kicked = self._ack_due_at
                self._kick_writer()  # it writes the pending ack
            actions = state.handle_timer(now)
            if actions.ping:
                self._ping(now)
                self._queue_heartbeat()
            if actions.liveness_lost:
                self._report(HeartbeatTimeout(self._id, self._heartbeat_timeout))
            if actions.dead:
                self._abort_transport(
                    ConnectionLost(
                        1006,
                        f"no liveness signal for {state.dead_timeout:g}s: "
                        "the peer is presumed dead",
                    )
                )
            self._publish_status()

    def _queue_heartbeat(self) -> None:
        if self._local_id is None or self._closing:
            return
        message = FederationMessage(
            type=MessageType.HEARTBEAT,
            payload=HeartbeatPayload(
                orchestrator_id=self._local_id,
                timestamp=self._wall(trio.current_time()),
                status=self._local_status,
                active_connections=self._active_connections(),
            ),
            sender=self._local_id,
            recipient=self._id,
        )
        try:
            # Beyond max_queue_size, so it never takes room from the user.
            self._queue.put_extra_nowait(self._encode(message))
        except (trio.WouldBlock, trio.ClosedResourceError):
            # The previous heartbeat is still waiting (the peer is not reading):
            # one pending heartbeat says as much as two.
            logger.debug("connection to %r: heartbeat still queued, next one skipped", self._id)

    def _ping(self, now: float) -> None:
        """Send a ping, unless one is still in flight (its pong measures ``latency``).

        Over our own transport the ping goes in the socket's outbox: the writer
        sends it with the next write (the heartbeat message queued next, or
        alone: it is kicked), and the reader calls :meth:`_pong`. Over a
        trio-websocket socket a short-lived task waits for the pong.
        """
        if self._ping_in_flight is not None:
            return
        socket = self._socket
        nursery = self._transport_nursery
        if socket is None or nursery is None:
            return
        payload = os.urandom(4)
        self._ping_in_flight = payload
        self._ping_sent_at = now
        if isinstance(socket, WireConnection):
            try:
                socket.ping_nowait(payload, functools.partial(self._pong, payload))
            except ConnectionClosed:
                return  # the reader sees the close and ends the transport
            self._kick_writer()
        else:
            nursery.start_soon(self._guarded, self._ping_and_wait)

    def _pong(self, payload: bytes) -> None:
        """The pong of our ping ``payload`` came: a liveness signal, and the latency."""
        if payload is not self._ping_in_flight:
            return  # a ping of an earlier transport
        self._ping_in_flight = None
        now = trio.current_time()
        self._state.liveness(now, latency=now - self._ping_sent_at)
        self._publish_status()

    async def _ping_and_wait(self) -> None:
        socket = self._socket
        payload = self._ping_in_flight
        assert socket is not None
        assert payload is not None
        try:
            await socket.ping(payload)
        except ConnectionClosed:
            return
        self._pong(payload)

    # -- closing --------------------------------------------------------------------

    async def disconnect(self) -> None:
        """Close gracefully: write everything queued, then close with code 1000.

        Idempotent: a second call waits for the first to finish. Bounded by
        ``disconnect_timeout`` even when the peer has stopped reading; then the
        socket is aborted and the messages left unsent are reported (logged, and
        as :exc:`~trio_federation.UnsentMessages` on the errors stream). New
        sends raise :exc:`trio.ClosedResourceError` from the moment it is
        called. Messages already buffered for ``async for`` stay readable.
        In a resumable session it also waits (within the same bound) until the
        peer has acknowledged what was written, and the peer does not resume.
        Shielded from cancellation for at most ``disconnect_timeout``.
        """
        await self._close(1000, "Graceful disconnect")

    def _transport_failed(self, error: BaseException, socket: _Socket | None = None) -> None:
        """trio-websocket's own reader task died: the socket is unusable now.

        Called by the task hosting that reader (see ``_compat.SocketHost``).
        Ends the transport as lost (1006): a resumable connection then waits
        for the next one. A late report about an earlier ``socket`` is ignored.
        """
        if socket is not None and socket is not self._socket:
            return
        lost = ConnectionLost(1006, f"transport failed: {error!r}")
        lost.__cause__ = error
        if self._close_scope is not None:
            self._close_scope.cancel()  # no close handshake can complete now
        self._abort_transport(lost)

    async def _close(
        self, code: int, reason: str, deadline: float | None = None, *, drain: bool = True
    ) -> None:
        """Close with ``code``; with ``drain``, write the queue (and wait for acks) first.

        Cancelled callers do not drain: they are going away, and a reconnecting
        dialer would otherwise wait for its next link. Bounded by ``deadline``.
        """
        if deadline is None:
            deadline = trio.current_time() + self._disconnect_timeout
        if self._closing:
            with _shielded_deadline(deadline):
                await self._finished.wait()
            return
        self._closing = True
        if not self._finished.is_set() and self._lost is None:
            self._closed_locally = True
        self._queue.close()
        with _shielded_deadline(deadline) as scope:
            self._close_scope = scope
            # Drain over the live transport, or over the next one a reconnecting
            # dialer brings; a listener's peer that is gone is not waited for.
            may_drain = self._transport is not None or self._reattach == math.inf
            if drain and may_drain and self._running and (len(self._queue) or self.unacknowledged):
                await self._drained.wait()  # written (and acknowledged, in a session)
            self._close_next()  # no transport will come any more
            socket = self._socket
            if socket is not None and self._transport is not None:
                recv = self._recv_window
                if recv is not None and recv.consumed > recv.announced:
                    # Settle the books first: what we consumed is acknowledged,
                    # so the peer's ``unacknowledged`` lists only what was not.
                    with contextlib.suppress(ConnectionClosed):
                        await socket.send_message(ack_frame(recv.announce()))
                await socket.aclose(code, reason)
        if scope.cancel_called:
            logger.warning(
                "connection to %r: close not completed (time bound or transport failure); aborting",
                self._id,
            )
        self._close_next()
        # Shielded, and quick: the caller may be cancelled already, and a
        # Cancelled escaping here would leave the runner waiting for good.
        with trio.CancelScope(shield=True):
            try:
                socket = self._socket
                if socket is not None:
                    with trio.CancelScope() as abort:
                        abort.cancel()
                        await socket.aclose(code, reason)  # cancelled: closes the stream
                    await release_stream(socket)
            finally:
                if self._run_scope is None:
                    self._finish()  # never entered: nothing else will
                else:
                    self._abort_transport(ConnectionLost(code, reason))
                    self._run_scope.cancel()
                    await self._finished.wait()


def _detach(error: BaseException) -> None:
    """Drop the tracebacks of a reported error and of its causes.

    Reported errors are kept (in watchers' buffers, by the application): a
    traceback would keep the reader's frames alive, and with them the frame
    that was refused, up to ``max_message_size`` each.
    """
    seen: BaseException | None = error
    while seen is not None:
        seen.__traceback__ = None
        seen = seen.__cause__ or seen.__context__


def _abort_sleep(_: object) -> trio.lowlevel.Abort:
    return trio.lowlevel.Abort.SUCCEEDED


def raise_single(group: BaseExceptionGroup[BaseException]) -> None:
    """Re-raise the one meaningful exception of ``group`` as itself.

    Our background tasks never raise, so a group leaving a connection's nursery
    holds the user's own exception, possibly with ``Cancelled`` siblings. Raise
    it plain (keeping its traceback and context); raise the group itself only if
    it truly holds several errors.
    """
    errors = [e for e in group.exceptions if not isinstance(e, trio.Cancelled)]
    if len(errors) == 1:
        error = errors[0]
        context = error.__context__
        try:
            raise error
        finally:
            error.__context__ = context
            del error, context
    if not errors:
        raise group.exceptions[0]
    raise group
