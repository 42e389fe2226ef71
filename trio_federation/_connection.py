"""OrchestratorConnection: the trio shell around the sans-IO connection state.

Task tree of an open connection (all inside ``async with conn``)::

    runner                      one task in the caller's nursery
    └── nursery
        ├── reader              the only caller of socket.get_message()
        ├── writer              the only caller of socket.send_message()
        ├── watchdog            sleeps until ConnectionState.next_deadline()
        └── pinger              socket.ping(), one in flight at most

The children never raise: a failure is recorded as the connection's terminal
reason and surfaces where the user looks (``async for``, ``send_message``, the
errors stream), so the boundary raises one plain exception.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import Any, Final, Self

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection

from ._codec import MAX_FRAME_SIZE, decode_message, encode_message
from ._compat import release_stream
from ._exceptions import (
    ConnectionLost,
    FederationError,
    HeartbeatTimeout,
    MalformedMessage,
    PolicyViolation,
    QueueFull,
    UnsentMessages,
)
from ._messages import (
    Capability,
    ConnectionHealth,
    ConnectionStatus,
    DelegationRequest,
    DelegationResponse,
    FederationMessage,
    HeartbeatPayload,
    HeartbeatStatus,
    MessageType,
)
from ._protocol import ConnectionState, TokenBucket
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
DEFAULT_RATE_LIMIT: Final = 2000.0
"""Incoming messages a second a peer may send, on average (None: no limit)."""
DEFAULT_RATE_BURST: Final = 4000
"""Incoming messages a peer may send at once above the rate."""
DEFAULT_MAX_VIOLATIONS: Final = 20
"""Refused messages (spoofed, misaddressed, over the rate) before a peer is cut off."""
DEFAULT_MAX_SUBSCRIPTIONS: Final = 64
"""Subscriptions open at once on one connection."""
CLOSE_POLICY_VIOLATION: Final = 1008
"""Close code for a peer cut off after ``max_violations`` refused messages."""
BROADCAST_ADDRESSES: Final = frozenset({"*", "broadcast"})
"""Recipients (``to``) that address every orchestrator."""

DATA_TYPES: Final = frozenset({MessageType.DELEGATION, MessageType.CALLBACK, MessageType.BROADCAST})
NORMAL_CLOSE_CODES: Final = frozenset({1000, 1001})

_QueueItem = tuple[FederationMessage, str]


def _check_positive(name: str, value: float) -> float:
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
        send_channel: trio.MemorySendChannel[FederationMessage],
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

    Args:
        id: the remote orchestrator's id ("" if not known yet: it is then taken
            from the ``from`` of the first message received).
        socket: an open :class:`trio_websocket.WebSocketConnection`. The
            connection becomes its only reader and writer.
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
            reaches the peer through TCP).
        max_message_size: longest frame decoded, in characters.
        local_status: the load status announced in heartbeat messages.
        active_connections: called for the ``active_connections`` figure of
            heartbeat messages (default: 1).
        rate_limit: incoming messages a second the peer may send on average
            (a token bucket; None for no limit). A frame beyond it is refused
            unread: reported as :exc:`~trio_federation.PolicyViolation`.
        rate_burst: how many messages the peer may send at once above the rate.
        max_violations: refused messages (over the rate, or breaking identity
            binding: a ``from`` other than ``id``, a ``to`` other than
            ``local_id`` or a broadcast address, a delegation from someone
            else) after which the peer is disconnected with 1008.
        max_subscriptions: subscriptions open at once.
    """

    def __init__(
        self,
        *,
        id: str,
        socket: WebSocketConnection,
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
    ) -> None:
        if not isinstance(id, str):
            raise TypeError(f"id must be a string, got {type(id).__name__}")
        if local_id is not None and not isinstance(local_id, str):
            raise TypeError(f"local_id must be a string, got {type(local_id).__name__}")
        self._id = id
        self._socket = socket
        self._capabilities = normalize_capabilities(capabilities, strict=False)
        self._local_id = local_id
        self._heartbeat_timeout = _check_positive("heartbeat_timeout", heartbeat_timeout)
        self._disconnect_timeout = _check_positive("disconnect_timeout", disconnect_timeout)
        self._max_queue_size = _check_size("max_queue_size", max_queue_size)
        self._max_message_size = _check_size("max_message_size", max_message_size)
        self._local_status = HeartbeatStatus(local_status)
        self._active_connections = active_connections or (lambda: 1)
        self._bucket = (
            None
            if rate_limit is None
            else TokenBucket(
                _check_positive("rate_limit", rate_limit), _check_size("rate_burst", rate_burst)
            )
        )
        self._max_violations = _check_size("max_violations", max_violations)
        self._max_subscriptions = _check_size("max_subscriptions", max_subscriptions)
        self._violations = 0
        self._state = ConnectionState(
            heartbeat_timeout=self._heartbeat_timeout,
            idle_timeout=_check_positive("idle_timeout", idle_timeout),
        )
        self._queue: OutboundQueue[_QueueItem] = OutboundQueue(self._max_queue_size)
        self._receive_buffer_size = _check_size("receive_buffer_size", receive_buffer_size)
        self._inbound_send, self._inbound_recv = trio.open_memory_channel[FederationMessage](
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
        self._nursery: trio.Nursery | None = None
        self._wakeup = trio.Event()
        self._sleeping_until = math.inf
        self._ping_requests, self._ping_pending = trio.open_memory_channel[None](1)
        self._closing = False
        self._closed_locally = False
        self._lost: ConnectionLost | None = None  # abnormal end: raised by async for
        self._peer_closed: ConnectionLost | None = None  # normal end by the peer
        self._writer_done = trio.Event()
        self._close_scope: trio.CancelScope | None = None
        self._transport_broken = False
        self._handed_over = trio.Event()
        self._finished = trio.Event()
        self._exit_stack: contextlib.AsyncExitStack | None = None

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
    def socket(self) -> WebSocketConnection:
        """The underlying trio-websocket connection (do not read or write it)."""
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
        """Snapshot of the messages accepted but not yet written, oldest first."""
        return tuple(message for message, _ in self._queue.snapshot())

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

    def check_capability(self, required: Iterable[str]) -> bool:
        """True if the remote has every capability in ``required`` (True for none)."""
        if isinstance(required, str):
            raise TypeError(f"required must be a list of names, not the string {required!r}")
        return all(cap in self._capabilities for cap in required)

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
        if self._socket.closed is not None:
            return False
        return self._state.is_healthy(trio.current_time())

    # -- sending ----------------------------------------------------------------

    def _check_sendable(self) -> None:
        ended = self._lost or self._peer_closed
        if ended is not None:
            raise ConnectionLost(ended.code, ended.reason)
        if self._closed_locally or self._queue.closed:
            raise trio.ClosedResourceError(f"the connection to {self._id!r} was closed locally")

    def _encode(self, message: FederationMessage) -> _QueueItem:
        if not isinstance(message, FederationMessage):
            raise TypeError(f"expected a FederationMessage, got {type(message).__name__}")
        return (message, encode_message(message))

    async def send_message(self, message: FederationMessage) -> None:
        """Queue ``message`` to be written, in FIFO order.

        While the connection is not open yet, the message waits in the queue and
        is written when it opens.

        Raises:
            QueueFull: ``max_queue_size`` messages are already waiting; nothing
                was queued (use :meth:`send` to wait for room instead).
            ConnectionLost: the peer closed the connection (or it died).
            trio.ClosedResourceError: you closed it (:meth:`disconnect`).
            TypeError: ``message`` is not a FederationMessage or holds a value
                JSON cannot represent.
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

    async def send(self, message: FederationMessage) -> None:
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

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> FederationMessage:
        """The next data message; see :meth:`receive`."""
        try:
            return await self._inbound_recv.receive()
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
            return await self._inbound_recv.receive()
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
        send_channel, receive_channel = trio.open_memory_channel[FederationMessage](
            _check_size("max_buffer", max_buffer)
        )
        subscription = _Subscription(wanted, predicate, send_channel)
        if self._finished.is_set():
            send_channel.close()
        else:
            self._subscriptions.append(subscription)
        try:

            def check_end() -> None:
                if subscription.failure is not None:
                    raise subscription.failure
                self._raise_if_lost()

            with receive_channel:
                yield MessageStream(receive_channel, check_end)
                _discard_unread(receive_channel, self._id)
        finally:
            with contextlib.suppress(ValueError):
                self._subscriptions.remove(subscription)
            send_channel.close()

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
        :exc:`~trio_federation.HeartbeatTimeout`,
        :exc:`~trio_federation.UnsentMessages` and
        :exc:`~trio_federation.ConnectionLost`; each is also counted in
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
        deadline = self._state.next_deadline()
        if deadline < self._sleeping_until:
            self._wakeup.set()

    def _report(self, error: FederationError) -> None:
        _detach(error)
        self._state.error()
        logger.warning("connection to %r: %s", self._id, error)
        for watcher in self._error_watchers:
            watcher._push(error)

    # -- lifecycle ------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        if self._entered:
            raise RuntimeError("an OrchestratorConnection can be entered only once")
        self._entered = True
        stack = contextlib.AsyncExitStack()
        nursery = await stack.enter_async_context(trio.open_nursery())
        try:
            await nursery.start(self._run)
        except BaseException:
            await stack.aclose()
            raise
        self._exit_stack = stack
        # The reader routes nothing until the caller has the connection: code
        # that subscribes before its first checkpoint misses no message.
        self._handed_over.set()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        assert self._exit_stack is not None
        try:
            if exc is None:
                await self.disconnect()
            elif isinstance(exc, Exception):
                await self._close(1011, "internal error")
            else:  # cancelled, interrupted, exiting: this side is going away
                await self._close(1001, "going away", trio.current_time() + CANCEL_CLOSE_GRACE)
        finally:
            try:
                await self._exit_stack.__aexit__(exc_type, exc, tb)
            except BaseExceptionGroup as group:
                raise_single(group)
        return False

    async def _run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                self._state.open(trio.current_time())
                self._publish_status()
                nursery.start_soon(self._guarded, self._writer)
                nursery.start_soon(self._guarded, self._watchdog)
                nursery.start_soon(self._guarded, self._pinger)
                task_status.started()
                await self._guarded(self._reader)
                nursery.cancel_scope.cancel()
        finally:
            self._finish()

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
        self._queue.close()
        assert self._nursery is not None
        self._nursery.cancel_scope.cancel()
        with trio.CancelScope(shield=True), trio.move_on_after(CANCEL_CLOSE_GRACE):
            await self._socket.aclose(lost.code, reason)

    def _finish(self) -> None:
        """Record why the connection ended, then end every stream (in that order)."""
        if self._finished.is_set():
            return
        closed = self._socket.closed
        if self._lost is None and not self._closed_locally:
            if closed is None:
                # Cancelled from outside before the socket closed: a local end.
                self._closed_locally = True
            elif closed.code not in NORMAL_CLOSE_CODES:
                self._lost = ConnectionLost(closed.code, closed.reason or "")
            else:
                # The peer closed normally: async for ends, sends raise ConnectionLost.
                self._peer_closed = ConnectionLost(closed.code, closed.reason or "")
        ended = self._lost or self._peer_closed
        code = 1000 if ended is None else ended.code
        self._state.close(code, trio.current_time())
        unsent = len(self._queue)
        self._queue.close()
        self._inbound_send.close()
        for subscription in self._subscriptions:
            subscription.send_channel.close()
        if self._lost is not None and self._lost.code not in NORMAL_CLOSE_CODES:
            self._report(self._lost)
        if unsent:
            self._report(UnsentMessages(self._id, unsent))
        self._publish_status()
        for status_watcher in self._status_watchers:
            status_watcher._end()
        for error_watcher in self._error_watchers:
            error_watcher._end()
        self._finished.set()
        logger.info("connection to %r closed with code %d", self._id, code)

    async def _reader(self) -> None:
        socket = self._socket
        state = self._state
        await self._handed_over.wait()
        while True:
            try:
                data = await socket.get_message()
            except ConnectionClosed:
                if socket.closed is None and not self._closing and self._lost is None:
                    # trio-websocket's reader stopped without any close: it died.
                    self._lost = ConnectionLost(1006, "the WebSocket transport stopped")
                return
            if self._bucket is not None and not self._bucket.take(trio.current_time()):
                # Refused unread: a flood costs no decoding.
                if await self._violation(
                    f"more than {self._bucket.rate:g} messages/s (burst {self._bucket.burst})"
                ):
                    return
                continue
            try:
                message = decode_message(data, max_size=self._max_message_size)
            except MalformedMessage as exc:
                self._report(exc)
                continue
            if not self._id:
                self._id = message.sender
            broken = self._check_binding(message)
            if broken is not None:
                if await self._violation(broken):
                    return
                continue
            now = trio.current_time()
            is_data = message.type in DATA_TYPES
            changed = state.received(now, data=is_data)
            if message.type is MessageType.HEARTBEAT:
                assert isinstance(message.payload, HeartbeatPayload)
                state.remote_heartbeat(now, message.payload.status)
                changed = True
            if changed:
                self._publish_status()
            await self._route(message, is_data)

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

    async def _route(self, message: FederationMessage, is_data: bool) -> None:
        for subscription in tuple(self._subscriptions):
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
                    await self._deliver(subscription.send_channel, message)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    continue  # unsubscribed meanwhile: offer it to the next one
                return
        if is_data:
            await self._deliver(self._inbound_send, message)

    async def _deliver(
        self, channel: trio.MemorySendChannel[FederationMessage], message: FederationMessage
    ) -> None:
        try:
            channel.send_nowait(message)
            return
        except trio.WouldBlock:
            pass
        # The application is not keeping up: wait for it (back-pressure), and
        # tell the watchdog that the peer's silence meanwhile is ours.
        self._state.stall(trio.current_time(), stalled=True)
        try:
            await channel.send(message)
        finally:
            self._state.stall(trio.current_time(), stalled=False)
            self._publish_status()

    async def _writer(self) -> None:
        queue = self._queue
        socket = self._socket
        try:
            while True:
                try:
                    message, text = await queue.peek()
                except trio.EndOfChannel:
                    return  # closed and drained: disconnect() goes on
                try:
                    await socket.send_message(text)
                except ConnectionClosed:
                    return  # the reader sees the close and ends the connection
                queue.pop()
                if self._state.sent(trio.current_time(), data=message.type in DATA_TYPES):
                    self._publish_status()
        finally:
            self._writer_done.set()

    async def _watchdog(self) -> None:
        state = self._state
        while True:
            self._sleeping_until = state.next_deadline()
            with trio.move_on_at(self._sleeping_until):
                await self._wakeup.wait()
            self._wakeup = trio.Event()
            actions = state.handle_timer(trio.current_time())
            if actions.ping:
                with contextlib.suppress(trio.WouldBlock):
                    self._ping_requests.send_nowait(None)
                self._queue_heartbeat()
            if actions.liveness_lost:
                self._report(HeartbeatTimeout(self._id, self._heartbeat_timeout))
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

    async def _pinger(self) -> None:
        async for _ in self._ping_pending:
            sent_at = trio.current_time()
            try:
                await self._socket.ping(os.urandom(4))
            except ConnectionClosed:
                return
            now = trio.current_time()
            self._state.liveness(now, latency=now - sent_at)
            self._publish_status()

    async def disconnect(self) -> None:
        """Close gracefully: write everything queued, then close with code 1000.

        Idempotent: a second call waits for the first to finish. Bounded by
        ``disconnect_timeout`` even when the peer has stopped reading; then the
        socket is aborted and the messages left unsent are reported (logged, and
        as :exc:`~trio_federation.UnsentMessages` on the errors stream). New
        sends raise :exc:`trio.ClosedResourceError` from the moment it is
        called. Messages already buffered for ``async for`` stay readable.
        Shielded from cancellation for at most ``disconnect_timeout``.
        """
        await self._close(1000, "Graceful disconnect")

    def _transport_failed(self, error: BaseException) -> None:
        """trio-websocket's own reader task died: the socket is unusable now.

        Called by the task hosting that reader (see ``_compat.SocketHost``).
        Ends the connection as lost (1006) unless it was closing anyway.
        """
        if not self._closed_locally and (self._lost is None or self._lost.code == 1006):
            lost = ConnectionLost(1006, f"transport failed: {error!r}")
            lost.__cause__ = error
            self._lost = lost
        self._transport_broken = True
        if self._close_scope is not None:
            self._close_scope.cancel()  # no close handshake can complete now
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    async def _close(self, code: int, reason: str, deadline: float | None = None) -> None:
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
            if self._transport_broken:
                scope.cancel()
            if self._nursery is not None:
                await self._writer_done.wait()
            if not scope.cancel_called:
                await self._socket.aclose(code, reason)
        if scope.cancel_called:
            logger.warning(
                "connection to %r: close not completed (time bound or transport failure); aborting",
                self._id,
            )
            with trio.CancelScope() as abort:
                abort.cancel()
                await self._socket.aclose(code, reason)  # cancelled: closes the stream
        await release_stream(self._socket)
        if self._nursery is None:
            self._finish()  # never entered: nothing else will
        else:
            self._nursery.cancel_scope.cancel()
            with trio.CancelScope(shield=True):
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


def _discard_unread(channel: trio.MemoryReceiveChannel[FederationMessage], peer: str) -> None:
    """Say how many messages an unsubscribing stream leaves unread.

    Counted, not drained: draining would admit a message the reader is still
    offering, which then goes to the next route instead.
    """
    unread = channel.statistics().current_buffer_used
    if unread:
        logger.warning(
            "connection to %r: a subscription was left with %d unread message(s)", peer, unread
        )


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
