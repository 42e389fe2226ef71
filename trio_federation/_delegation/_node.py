"""The federation node: the trio shell around the sans-IO delegation cores.

One node = one listener, one registration, and at most one *pump* per
connection: the only reader of that connection, which routes delegations to
the executing side, callbacks to the delegating side (by task id) and
broadcasts to subscribers. Everything here uses only the public API of the
connection and registry layers.
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import functools
import logging
import math
import random
import ssl
import types
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import attrs
import trio

from .._connection._connection import OrchestratorConnection
from .._connection._settings import Limits, Timeouts
from .._connection._transport import (
    FederationListener,
    ReconnectPolicy,
    open_orchestrator_connection,
    serve_federation,
)
from .._exceptions import ConnectionLost, FederationError
from .._registry._registry import (
    FederationRegistry,
    MemoryRegistry,
    OrchestratorRecord,
    OrchestratorStatus,
    Registration,
    RegistryUnavailable,
    open_registration,
    open_registry,
)
from .._wire._auth import SecretLookup
from .._wire._messages import (
    BroadcastPayload,
    CallbackStatus,
    ConnectionStatus,
    DelegationRequest,
    DelegationResponse,
    FederationMessage,
    MessageType,
    SharedContext,
    Task,
    TaskCallback,
)
from ._coordinator import CoordinatorDialect
from ._executor import (
    DEFAULT_DEDUPE_SIZE,
    DEFAULT_DEDUPE_WINDOW,
    Admission,
    Refuse,
    Replay,
    Running,
)
from ._handle import CANCEL_EXTENSION, HOPS_KEY, Delegation
from ._state import (
    Backoff,
    DelegationAttempt,
    DelegationFailed,
)
from ._strategies import (
    STRATEGIES,
    Candidate,
    PowerOfTwoChoices,
    Strategy,
    choose,
    make_strategy,
)

__all__ = [
    "FederationNode",
    "NodeStatistics",
    "PeerInfo",
    "TaskContext",
    "open_federation_node",
]

logger = logging.getLogger("trio_federation.delegation")

DEFAULT_MAX_DEPTH: Final = 4
"""Hops a task may travel (A→B is one) before a node refuses to delegate it further."""
DEFAULT_CANCEL_GRACE: Final = 2.0
"""Seconds a cancelled delegation waits for the executor's last callback."""
DEFAULT_DRAIN_GRACE: Final = 10.0
"""Seconds leaving a node's block normally waits for its running tasks (then hands them back)."""
SUCCESS_SAMPLES: Final = 32
"""Recent outcomes per peer behind :attr:`Candidate.success_rate`."""
MAX_TRACKED_PEERS: Final = 4096
"""Peers whose recent outcomes are kept (beyond it the record starts afresh)."""
BROADCAST_BUFFER: Final = 256
"""Broadcasts a subscription holds; beyond it new ones are dropped (and counted)."""
LATENCY_SAMPLES: Final = 1024
"""Recent delegation latencies kept for the p50 and p95 figures."""
DEFAULT_NODE_RECONNECT: Final = ReconnectPolicy(initial_delay=0.05, max_delay=2.0, max_attempts=3)
"""How a node's dialed connections reconnect: a few quick tries, then the peer is lost."""

_HOPS: contextvars.ContextVar[int] = contextvars.ContextVar("trio_federation_hops", default=0)

Executor = Callable[["TaskContext"], Awaitable[Any]]
AdmitHook = Callable[[DelegationRequest], str | None]


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    leaves: list[BaseException] = []
    for exc in group.exceptions:
        leaves.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return leaves


def _raise_single(group: BaseExceptionGroup[BaseException]) -> None:
    """Raise a group of one real error (besides ``Cancelled``) as that error.

    A group of nothing but ``Cancelled`` is raised as its first ``Cancelled``,
    so cancellation reaches the caller's scope as trio code expects.
    """
    leaves = _leaves(group)
    errors = [e for e in leaves if not isinstance(e, trio.Cancelled)]
    if len(errors) > 1:
        raise group
    error = errors[0] if errors else leaves[0]
    context = error.__context__
    try:
        raise error
    finally:
        error.__context__ = context
        del error, context


# -- public snapshots -----------------------------------------------------------------


@attrs.frozen(kw_only=True)
class PeerInfo:
    """A known peer, as :meth:`FederationNode.peers` sees it.

    Attributes:
        id: its orchestrator id.
        capabilities: what it announced (registry record or handshake).
        endpoint: the URL it is dialed at (None: it dialed us, or unknown).
        status: the status of our connection to it (None: not connected).
        latency: the measured round-trip time, in seconds, if any.
        in_flight: tasks this node delegated to it that have not ended.
    """

    id: str
    capabilities: tuple[str, ...]
    endpoint: str | None
    status: ConnectionStatus | None
    latency: float | None
    in_flight: int


@attrs.frozen(kw_only=True)
class NodeStatistics:
    """A frozen snapshot of a node's figures (:meth:`FederationNode.statistics`).

    Delegating side: ``delegations_sent`` (dispatches to a candidate),
    ``accepted``, ``rejected`` (refusals received), ``completed``,
    ``failed`` (delegations that ended failed or were given up),
    ``cancelled`` (ended by the caller's scope), ``failed_over``,
    ``retries`` (dispatches after a delegation's first), ``illegal_callbacks``
    (refused by the state machine, or for no delegation of ours), and
    ``latency_p50`` / ``latency_p95`` (seconds from ``delegate`` to the final
    outcome over recent delegations; None before the first).

    Executing side: ``tasks_running``, ``tasks_completed``, ``tasks_failed``,
    ``tasks_refused`` (by reason), and ``broadcasts_dropped`` (expired on
    receipt, or a full subscription).
    """

    delegations_sent: int
    accepted: int
    rejected: int
    completed: int
    failed: int
    cancelled: int
    failed_over: int
    retries: int
    illegal_callbacks: int
    latency_p50: float | None
    latency_p95: float | None
    tasks_running: int
    tasks_completed: int
    tasks_failed: int
    tasks_refused: Mapping[str, int]
    broadcasts_dropped: int


def _percentile(samples: Iterable[float], fraction: float) -> float | None:
    """The nearest-rank percentile (p50 of two samples is the smaller one)."""
    ordered = sorted(samples)
    if not ordered:
        return None
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


# -- the executing side ---------------------------------------------------------------


class TaskContext:
    """What ``execute(ctx)`` gets for one accepted task.

    Attributes:
        task: the task to run.
        request: the whole :class:`~trio_federation.DelegationRequest`.
        origin: the id of the orchestrator that delegated it.
        deadline: the trio time by which it must end (``inf``: none); the
            task already runs under it.
    """

    def __init__(
        self,
        node: FederationNode,
        request: DelegationRequest,
        origin: str,
        deadline: float,
    ) -> None:
        self.task = request.task
        self.request = request
        self.origin = origin
        self.deadline = deadline
        self._node = node

    async def report_progress(self, percent: float, message: str | None = None) -> None:
        """Send a ``progress`` callback to the delegator.

        It waits while the connection's queue is full (back-pressure). A
        delegator that is gone is not an error here: the report is dropped
        and logged.
        """
        metadata = None if message is None else {"message": message}
        callback = TaskCallback(
            task_id=self.task.id,
            status=CallbackStatus.PROGRESS,
            progress=percent,
            metadata=metadata,
        )
        await self._node._send_callback(self.origin, callback)


class _PeerView:
    """A peer that may be a candidate, as the records and connections said last."""

    __slots__ = ("capabilities", "connection", "dial", "id", "latency", "record")

    def __init__(
        self,
        peer: str,
        capabilities: tuple[str, ...],
        record: OrchestratorRecord | None,
        connection: OrchestratorConnection | None,
        latency: float | None,
        *,
        dial: bool = False,
    ) -> None:
        self.id = peer
        self.capabilities = capabilities
        self.record = record
        self.connection = connection
        self.latency = latency
        self.dial = dial


@attrs.define
class _Execution:
    scope: trio.CancelScope
    reason: str | None = None  # why it was cancelled; None: its deadline passed


# -- the node -------------------------------------------------------------------------


_SHARED_REGISTRY: trio.lowlevel.RunVar[MemoryRegistry] = trio.lowlevel.RunVar(
    "trio_federation_shared_registry"
)


def _buffered(connection: OrchestratorConnection) -> Iterator[FederationMessage]:
    """The messages ``connection`` has buffered now, taken without waiting.

    Stops when none is left, or at the end of the stream (which the next
    ``async for`` step then reports, a loss included).
    """
    while True:
        try:
            yield connection.receive_nowait()
        except (trio.WouldBlock, trio.EndOfChannel, ConnectionLost):
            return


def _shared_memory_registry() -> MemoryRegistry:
    """The memory registry every node of this trio run shares by default."""
    try:
        return _SHARED_REGISTRY.get()
    except LookupError:
        registry = MemoryRegistry()
        _SHARED_REGISTRY.set(registry)
        return registry


class FederationNode:
    """One orchestrator in the federation; yielded by :func:`open_federation_node`.

    Attributes:
        local_id: this orchestrator's id.
        capabilities: what it executes.
        registry: the registry it registers in and discovers peers through.
        max_depth: hops a task may travel before this node refuses to pass it on.
        shared_context: called (no arguments) for the context a daemon
            coordinator asks for with ``context:request``; returns a
            :class:`~trio_federation.SharedContext`, or None for an empty one
            (the default when unset). Settable.
    """

    def __init__(
        self,
        *,
        local_id: str,
        capabilities: tuple[str, ...],
        executor: Executor | None,
        registry: FederationRegistry,
        peers: Mapping[str, str],
        max_concurrent_tasks: int,
        admit: AdmitHook | None,
        strategy: str | Strategy,
        max_depth: int,
        backoff: Backoff,
        timeouts: Timeouts,
        limits: Limits,
        reconnect: ReconnectPolicy,
        secret: bytes | str | None,
        ssl_context: ssl.SSLContext | None,
        cancel_grace: float,
        dedupe_window: float,
        rng: random.Random | None,
        drain_grace: float = DEFAULT_DRAIN_GRACE,
    ) -> None:
        self.local_id = local_id
        self.capabilities = capabilities
        self.registry = registry
        self.max_depth = max_depth
        self._executor = executor
        self._static_peers = dict(peers)
        self._admit = admit
        self._rng = rng or random.Random()
        self._strategy = self._make_strategy(strategy)
        # Strategies named per call, kept so that their state (a turn, a
        # ring) lasts from one delegation to the next.
        self._named_strategies: dict[str, Strategy] = {}
        if isinstance(strategy, str):
            self._named_strategies[strategy] = self._strategy
        self._drain_grace = drain_grace
        self._registration: Registration | None = None
        self._idle = trio.Event()
        self._outcomes: dict[str, collections.deque[bool]] = {}
        self._backoff = backoff
        self._timeouts = timeouts
        self._limits = limits
        self._reconnect = reconnect
        self._secret = secret
        self._ssl_context = ssl_context
        self._cancel_grace = cancel_grace
        self._admission = Admission(
            capabilities,
            max_concurrent_tasks,
            window=dedupe_window,
        )
        self._listener: FederationListener | None = None
        self._endpoint: str | None = None
        self._connections: dict[str, list[OrchestratorConnection]] = {}
        self._dialing: dict[str, trio.Event] = {}
        self._dial_errors: dict[str, BaseException] = {}
        self._records: dict[str, OrchestratorRecord] = {}
        # When the records were read (trio time), and the registry's
        # local_writes then: a later local write makes them stale at once.
        self._records_read_at = -math.inf
        self._records_writes = -1
        # The peers that may be candidates, as the records and connections
        # say (rebuilt when either changes); None: to be rebuilt.
        self._view: list[_PeerView] | None = None
        self._delegations: dict[str, Delegation] = {}
        # Peer -> delegations of ours it holds that are not over.
        self._in_flight_counts: dict[str, int] = {}
        # Task id -> (executor, when): where a task went lately, to send a
        # repeat to the same executor (whose dedupe then answers it).
        self._recent_assignees: collections.OrderedDict[str, tuple[str, float]] = (
            collections.OrderedDict()
        )
        self._dedupe_window = dedupe_window
        self._executions: dict[tuple[str, str], _Execution] = {}
        self._subscribers: list[
            tuple[frozenset[str], trio.MemorySendChannel[BroadcastPayload]]
        ] = []
        self._latencies: collections.deque[float] = collections.deque(maxlen=LATENCY_SAMPLES)
        self._stats: collections.Counter[str] = collections.Counter()
        self._connection_nursery: trio.Nursery | None = None
        self._task_nursery: trio.Nursery | None = None
        # Connections being closed because their peer does not read (bounded:
        # each is one of ours, and leaves with its pump).
        self._closing_unread: set[OrchestratorConnection] = set()
        self._closing = False
        self._dialect = CoordinatorDialect(self)
        self.shared_context: Callable[[], SharedContext | None] | None = None

    # -- identity -------------------------------------------------------------

    @property
    def port(self) -> int | None:
        """The port it listens on (None: it does not listen)."""
        return None if self._listener is None else self._listener.port

    @property
    def endpoint(self) -> str | None:
        """The URL peers dial it at, as registered (None: it does not listen)."""
        return self._endpoint

    def peers(self) -> tuple[PeerInfo, ...]:
        """A snapshot of the known peers: registry, static and connected, by id."""
        ids = set(self._records) | set(self._static_peers) | set(self._connections)
        ids.discard(self.local_id)
        result = []
        for peer in sorted(ids):
            record = self._records.get(peer)
            connection = self._live_connection(peer)
            if connection is not None and connection.capabilities:
                capabilities = tuple(connection.capabilities)
            else:
                capabilities = record.capabilities if record is not None else ()
            result.append(
                PeerInfo(
                    id=peer,
                    capabilities=capabilities,
                    endpoint=self._static_peers.get(peer)
                    or (record.endpoint if record is not None else None),
                    status=None if connection is None else connection.status,
                    latency=None if connection is None else connection.latency,
                    in_flight=self._in_flight(peer),
                )
            )
        return tuple(result)

    def statistics(self) -> NodeStatistics:
        """A frozen snapshot of the node's delegation and execution figures."""
        stats = self._stats
        admission = self._admission
        return NodeStatistics(
            delegations_sent=stats["delegations_sent"],
            accepted=stats["accepted"],
            rejected=stats["rejected"],
            completed=stats["completed"],
            failed=stats["failed"],
            cancelled=stats["cancelled"],
            failed_over=stats["failed_over"],
            retries=stats["retries"],
            illegal_callbacks=stats["illegal_callbacks"],
            latency_p50=_percentile(self._latencies, 0.5),
            latency_p95=_percentile(self._latencies, 0.95),
            tasks_running=admission.running,
            tasks_completed=admission.completed,
            tasks_failed=admission.failed,
            tasks_refused=types.MappingProxyType(dict(admission.refused)),
            broadcasts_dropped=stats["broadcasts_dropped"],
        )

    def _remember_assignee(self, task_id: str, peer: str) -> None:
        recent = self._recent_assignees
        recent.pop(task_id, None)
        recent[task_id] = (peer, trio.current_time())
        while len(recent) > DEFAULT_DEDUPE_SIZE:
            recent.popitem(last=False)

    def _recent_assignee(self, task_id: str) -> str | None:
        """The executor ``task_id`` went to within the dedupe window, if any."""
        entry = self._recent_assignees.get(task_id)
        if entry is None or trio.current_time() - entry[1] >= self._dedupe_window:
            return None
        return entry[0]

    def _illegal(self, reason: str) -> None:
        self._stats["illegal_callbacks"] += 1
        logger.warning("refused a callback: %s", reason)

    def _in_flight(self, peer: str) -> int:
        return self._in_flight_counts.get(peer, 0)

    # -- connections ----------------------------------------------------------

    def _live_connection(self, peer: str) -> OrchestratorConnection | None:
        connections = self._connections.get(peer)
        return connections[0] if connections else None

    def _endpoint_of(self, peer: str) -> str | None:
        if peer in self._static_peers:
            return self._static_peers[peer]
        record = self._records.get(peer)
        return None if record is None else record.endpoint

    async def _connection_for(self, peer: str) -> OrchestratorConnection:
        """The connection to ``peer``, dialed now if there is none yet.

        Raises:
            HandshakeError: it could not be dialed.
            FederationError: nothing says where it listens, or the node is closing.
        """
        while True:
            connection = self._live_connection(peer)
            if connection is not None:
                return connection
            dialing = self._dialing.get(peer)
            if dialing is None:
                break
            await dialing.wait()
            error = self._dial_errors.pop(peer, None)
            if error is not None and self._live_connection(peer) is None:
                raise FederationError(f"cannot reach {peer!r}: {error}")
        url = self._endpoint_of(peer)
        if url is None:
            raise FederationError(f"no endpoint known for {peer!r}")
        if self._closing or self._connection_nursery is None:
            raise FederationError(f"node {self.local_id!r} is closing")
        dialing = self._dialing[peer] = trio.Event()
        self._dial_errors.pop(peer, None)  # an older failure is not this dial's
        try:
            dialed: OrchestratorConnection = await self._connection_nursery.start(
                self._dial, peer, url
            )
        except BaseException as exc:
            self._dial_errors[peer] = exc
            raise
        finally:
            del self._dialing[peer]
            dialing.set()
        return dialed

    async def _dial(
        self,
        peer: str,
        url: str,
        *,
        task_status: trio.TaskStatus[OrchestratorConnection] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        try:
            async with open_orchestrator_connection(
                url,
                local_id=self.local_id,
                capabilities=self.capabilities,
                remote_id=peer,
                timeouts=self._timeouts,
                limits=self._limits,
                reconnect=self._reconnect,
                secret=self._secret,
                ssl_context=self._ssl_context if url.startswith("wss:") else None,
            ) as connection:
                self._attach(peer, connection)
                task_status.started(connection)
                try:
                    await self._pump(connection)
                finally:
                    self._detach(peer, connection)
        except ConnectionLost as exc:
            logger.info("connection to %r ended: %s", peer, exc)

    async def _serve_peer(self, connection: OrchestratorConnection) -> None:
        """The listener's handler: pump the connection of a peer that dialed us."""
        peer = connection.id
        self._attach(peer, connection)
        try:
            await self._pump(connection)
        finally:
            self._detach(peer, connection)

    def _attach(self, peer: str, connection: OrchestratorConnection) -> None:
        self._connections.setdefault(peer, []).append(connection)
        self._view = None

    def _detach(self, peer: str, connection: OrchestratorConnection) -> None:
        self._closing_unread.discard(connection)
        connections = self._connections.get(peer, [])
        if connection in connections:
            connections.remove(connection)
        if not connections:
            self._connections.pop(peer, None)
            self._view = None
            for delegation in list(self._delegations.values()):
                delegation._on_lost(peer, "connection lost")

    async def _pump(self, connection: OrchestratorConnection) -> None:
        """The one reader of a connection: route every message, until it ends.

        The daemon coordinator's frames are served beside it (``_coordinator``).
        """
        with connection.subscribe_coordinator() as frames:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._dialect.pump, connection, frames)
                try:
                    async for message in connection:
                        self._route(connection, message)
                        # And what else arrived, without a scheduler pass each
                        # (bounded by the receive buffer).
                        for more in _buffered(connection):
                            self._route(connection, more)
                except ConnectionLost as exc:
                    logger.info("connection to %r lost: %s", connection.id, exc)
                nursery.cancel_scope.cancel()

    def _route(self, connection: OrchestratorConnection, message: FederationMessage) -> None:
        peer = connection.id or message.sender
        payload = message.payload
        if isinstance(payload, DelegationRequest):
            self._on_delegation(connection, peer, payload)
        elif isinstance(payload, DelegationResponse):
            delegation = self._delegations.get(payload.task_id)
            if delegation is None:
                self._illegal(f"a response for {payload.task_id!r}, which we do not delegate")
            else:
                delegation._on_response(peer, payload)
        elif isinstance(payload, TaskCallback):
            if payload.status is CallbackStatus.CANCEL:
                self._on_cancel(peer, payload.task_id)
                return
            delegation = self._delegations.get(payload.task_id)
            if delegation is None:
                self._illegal(f"a callback for {payload.task_id!r}, which we do not delegate")
            else:
                delegation._on_callback(peer, payload)
        elif isinstance(payload, BroadcastPayload):
            self._on_broadcast(message, payload)

    # -- executing ------------------------------------------------------------

    def _queue_to(self, peer: str, message: FederationMessage) -> bool | None:
        """Queue ``message`` for ``peer`` without waiting (no checkpoint).

        Returns True once queued, False (logged) if it cannot be sent (no
        connection, or it ended), None if the connection's queue is full.

        Raises:
            TypeError: the message cannot be encoded (nothing was queued).
        """
        connection = self._live_connection(peer)
        if connection is None:
            logger.warning("no connection to %r: %s for %r dropped", peer, message.type, peer)
            return False
        try:
            connection.send_nowait(message)
        except trio.WouldBlock:
            return None
        except (FederationError, trio.ClosedResourceError, trio.BrokenResourceError) as exc:
            # A closing node's last words may find the connection gone: expected.
            log = logger.info if self._closing else logger.warning
            log("could not send to %r: %s", peer, exc)
            return False
        return True

    async def _send_to(self, peer: str, message: FederationMessage) -> bool:
        """Send ``message`` to ``peer``, waiting for room; False (logged) if it could not be."""
        connection = self._live_connection(peer)
        if connection is None:
            await trio.lowlevel.checkpoint()
            logger.warning("no connection to %r: %s for %r dropped", peer, message.type, peer)
            return False
        try:
            await connection.send(message)
        except (FederationError, trio.ClosedResourceError, trio.BrokenResourceError) as exc:
            log = logger.info if self._closing else logger.warning
            log("could not send to %r: %s", peer, exc)
            return False
        return True

    def _callback_message(
        self, peer: str, payload: TaskCallback | DelegationResponse
    ) -> FederationMessage:
        return FederationMessage(
            type=MessageType.CALLBACK,
            payload=payload,
            sender=self.local_id,
            recipient=peer,
            correlation_id=payload.task_id,
        )

    async def _send_callback(self, peer: str, payload: TaskCallback | DelegationResponse) -> bool:
        """Send a callback to ``peer`` (in its dialect), waiting for room."""
        if self._dialect.owns(peer, payload.task_id):
            return await self._dialect.send_callback(peer, payload)
        return await self._send_to(peer, self._callback_message(peer, payload))

    def _queue_callback(self, peer: str, payload: TaskCallback | DelegationResponse) -> bool | None:
        """Queue a callback for ``peer`` (in its dialect) without waiting: see :meth:`_queue_to`."""
        if self._dialect.owns(peer, payload.task_id):
            return self._dialect.queue_callback(peer, payload)
        return self._queue_to(peer, self._callback_message(peer, payload))

    def _answer(self, peer: str, payload: TaskCallback | DelegationResponse) -> bool:
        """A pump's answer: queued, never waited for.

        A pump never waits on a send (it would stop reading that peer, and
        two nodes could wait on each other). An answer that finds the queue
        full means the peer does not read what we send: its connection is
        closed (:meth:`_not_reading`).
        """
        # Looked up first: a coordinator's task is forgotten when its answer
        # finds the queue full.
        coordinator = self._dialect.connection_of(peer, payload.task_id)
        queued = self._queue_callback(peer, payload)
        if queued is None:
            connection = coordinator
            if connection is None:
                connection = self._live_connection(peer)
            if connection is not None:  # pragma: no branch (it was full a moment ago)
                self._not_reading(connection)
            return False
        return queued

    def _not_reading(self, connection: OrchestratorConnection) -> None:
        """``connection``'s queue is full when its pump must answer: close it.

        Its peer sends to us but does not read our answers. Waiting would stop
        our reading of it too; closing (a bounded, graceful disconnect, in
        the background) ends its pump, and what we delegated to it fails over.
        """
        if connection in self._closing_unread or self._connection_nursery is None:
            return
        self._closing_unread.add(connection)
        logger.warning(
            "%r does not read what we send (%d messages waiting): closing the connection",
            connection.id,
            len(connection.message_queue),
        )
        self._connection_nursery.start_soon(connection.disconnect)

    def _on_delegation(
        self, connection: OrchestratorConnection, origin: str, request: DelegationRequest
    ) -> None:
        """Admit or refuse a delegation (a pump's: it never waits).

        An admitted task answers its acceptance itself, first thing when it
        starts: a task that finishes at once queues its outcome right behind,
        and the two leave in one write.
        """
        task_id = request.task.id
        decision = self._admission.check(origin, request, trio.current_time())
        if isinstance(decision, Refuse):
            self._respond(origin, task_id, decision.reason)
            return
        if isinstance(decision, Running):
            self._respond(origin, task_id, None)
            return
        if isinstance(decision, Replay):
            self._respond(origin, task_id, None)
            self._answer(origin, decision.final)
            return
        if self._executor is None:
            self._respond(origin, task_id, self._admission.refuse("no_executor").reason)
            return
        if self._admit is not None:
            try:
                reason = self._admit(request)
            except Exception:
                logger.exception("the admit hook raised; refusing %r", task_id)
                reason = "admit_failed"
            if reason is not None:
                self._respond(origin, task_id, self._admission.refuse(reason).reason)
                return
        if self._task_nursery is None or self._closing:
            self._respond(origin, task_id, self._admission.refuse("draining").reason)
            return
        self._admission.start(origin, task_id)
        deadline = math.inf
        if request.timeout is not None:
            deadline = trio.current_time() + request.timeout
        scope = trio.CancelScope(deadline=deadline)
        self._executions[(origin, task_id)] = _Execution(scope)
        self._task_nursery.start_soon(self._execute, origin, request, scope, name=f"task {task_id}")

    def _respond(self, origin: str, task_id: str, refusal: str | None) -> None:
        """The answer to a delegation: accepted (``refusal`` None) or refused."""
        response = DelegationResponse(task_id=task_id, accepted=refusal is None, reason=refusal)
        self._answer(origin, response)

    def _on_cancel(self, origin: str, task_id: str) -> None:
        execution = self._executions.get((origin, task_id))
        if execution is not None:
            logger.info("%r cancelled %r", origin, task_id)
            execution.reason = "cancelled"
            execution.scope.cancel()

    async def _execute(
        self, origin: str, request: DelegationRequest, scope: trio.CancelScope
    ) -> None:
        assert self._executor is not None
        task = request.task
        self._respond(origin, task.id, None)  # accepted: queued before anything the task sends
        hops = (task.metadata or {}).get(HOPS_KEY, 0)
        _HOPS.set(hops if isinstance(hops, int) and not isinstance(hops, bool) else 0)
        context = TaskContext(self, request, origin, scope.deadline)
        final: TaskCallback | None = None
        try:
            with scope:
                try:
                    result = await self._executor(context)
                except Exception as exc:
                    logger.exception("task %r from %r failed", task.id, origin)
                    error = f"{type(exc).__name__}: {exc}"
                    final = TaskCallback(task_id=task.id, status=CallbackStatus.FAILED, error=error)
                else:
                    final = TaskCallback(
                        task_id=task.id, status=CallbackStatus.COMPLETED, result=result
                    )
            if final is None:  # the scope was cancelled: a cancel, the node, or the deadline
                reason = self._executions[(origin, task.id)].reason or "deadline exceeded"
                final = TaskCallback(task_id=task.id, status=CallbackStatus.FAILED, error=reason)
        except trio.Cancelled:
            # The node itself is being cancelled: tell the delegator, briefly.
            final = TaskCallback(task_id=task.id, status=CallbackStatus.FAILED, error="cancelled")
            with trio.CancelScope(shield=True), trio.move_on_after(self._cancel_grace):
                await self._conclude(origin, task.id, final)
            raise
        await self._conclude(origin, task.id, final)

    async def _conclude(self, origin: str, task_id: str, final: TaskCallback) -> None:
        """Send a task's outcome and remember it (for repeats): queued at once if there is room.

        A result JSON cannot represent (an arbitrary object, say) is the task's
        failure, reported to its delegator, not a crash of the node.
        """
        try:
            try:
                queued = self._queue_callback(origin, final)
            except (TypeError, ValueError) as exc:
                logger.error("task %r from %r: its result cannot be sent: %s", task_id, origin, exc)
                final = TaskCallback(
                    task_id=task_id,
                    status=CallbackStatus.FAILED,
                    error=f"{type(exc).__name__}: the result cannot be sent: {exc}",
                )
                queued = self._queue_callback(origin, final)
            finally:
                self._admission.finish(origin, task_id, final, trio.current_time())
            if queued is None:  # the queue is full: wait for room (the task's own back-pressure)
                await self._send_callback(origin, final)
        finally:
            del self._executions[(origin, task_id)]
            if not self._executions:
                self._idle.set()

    # -- delegating -----------------------------------------------------------

    async def _refresh_records(self) -> None:
        writes = self.registry.local_writes
        try:
            records = await self.registry.list_all()
        except FederationError as exc:
            logger.warning("registry read failed: %s", exc)
            return
        before = self._records
        self._records = {r.id: r for r in records}
        self._records_read_at = trio.current_time()
        self._records_writes = writes
        self._view = None
        self._fail_over_the_dead(before)

    def _records_stale(self) -> bool:
        """Whether the records must be read again before choosing candidates.

        They are kept for the registry's ``watch_interval`` (the watcher reads
        them that often anyway), unless something was written through the
        registry since they were read: a peer that registered, left or
        started draining in this process is seen at once.
        """
        registry = self.registry
        return (
            registry.local_writes != self._records_writes
            or trio.current_time() - self._records_read_at >= registry.watch_interval
        )

    def _fail_over_the_dead(self, before: Mapping[str, OrchestratorRecord]) -> None:
        """Fail over the tasks of executors the registry now declares dead.

        Dead: its record reports ``offline`` (no heartbeat within the
        registry's ``heartbeat_timeout``), or it was in the registry and is
        gone while no connection to it is open. A record gone while its
        connection lives is left to the connection: a node that leaves
        cleanly deregisters first, then delivers its last callbacks. An
        executor declared offline whose connection still lives is told to
        cancel the tasks (if it negotiated the cancel extension), so that a
        stalled but living node does not run on what now runs elsewhere.
        """
        for peer in sorted(self._in_flight_counts):
            record = self._records.get(peer)
            if record is not None and record.status is OrchestratorStatus.OFFLINE:
                reason = "declared offline by the registry"
            elif record is None and peer in before and self._live_connection(peer) is None:
                reason = "gone from the registry"
            else:
                continue
            logger.info("executor %r lost: %s", peer, reason)
            for delegation in list(self._delegations.values()):
                if delegation.assignee == peer:
                    delegation._on_lost(peer, reason)
                    self._tell_to_cancel(peer, delegation.task_id)

    def _tell_to_cancel(self, peer: str, task_id: str) -> None:
        """Send ``peer`` a cancel for ``task_id`` in the background, best effort."""
        connection = self._live_connection(peer)
        nursery = self._connection_nursery
        if connection is None or CANCEL_EXTENSION not in connection.extensions or nursery is None:
            return
        message = FederationMessage(
            type=MessageType.CALLBACK,
            payload=TaskCallback(task_id=task_id, status=CallbackStatus.CANCEL),
            sender=self.local_id,
            recipient=connection.id or peer,
            correlation_id=task_id,
        )

        async def tell() -> None:
            with trio.move_on_after(self._cancel_grace):
                await self._send_to(peer, message)

        nursery.start_soon(tell, name=f"cancel {task_id} on {peer}")

    def _record_outcome(self, peer: str, ok: bool) -> None:
        """Note how a task on ``peer`` ended (for :attr:`Candidate.success_rate`)."""
        outcomes = self._outcomes.get(peer)
        if outcomes is None:
            if len(self._outcomes) >= MAX_TRACKED_PEERS:
                self._outcomes.clear()
            outcomes = self._outcomes[peer] = collections.deque(maxlen=SUCCESS_SAMPLES)
        outcomes.append(ok)

    def _success_rate(self, peer: str) -> float | None:
        outcomes = self._outcomes.get(peer)
        return None if not outcomes else sum(outcomes) / len(outcomes)

    def _strategy_named(self, strategy: str | Strategy | None) -> Strategy:
        """The node's strategy, or the one named (kept across calls), or the instance."""
        if strategy is None:
            return self._strategy
        if isinstance(strategy, str) and strategy in STRATEGIES:
            named = self._named_strategies.get(strategy)
            if named is None:
                named = self._named_strategies[strategy] = self._make_strategy(strategy)
            return named
        return self._make_strategy(strategy)

    def _make_strategy(self, strategy: str | Strategy) -> Strategy:
        """:func:`make_strategy`, with the node's ``rng`` for ``"random"``."""
        if strategy == PowerOfTwoChoices.name:
            return PowerOfTwoChoices(self._rng)
        return make_strategy(strategy)

    def _peer_view(self) -> list[_PeerView]:
        """The peers that may be candidates, by id, from the records and connections.

        Kept until either changes. Offline and draining peers, this node, and
        registered peers with neither an endpoint nor a connection are left
        out; a static peer neither registered nor connected is listed with
        ``dial`` set (its capabilities are learnt by dialing it).
        """
        view = self._view
        if view is not None:
            return view
        view = []
        records = self._records
        ids = set(records) | set(self._static_peers) | set(self._connections)
        ids.discard(self.local_id)
        for peer in sorted(ids):
            record = records.get(peer)
            connection = self._live_connection(peer)
            if record is not None:
                if record.status in (OrchestratorStatus.OFFLINE, OrchestratorStatus.DRAINING):
                    continue
                if record.endpoint is None and connection is None:
                    continue
                capabilities: tuple[str, ...] = record.capabilities
            elif connection is not None:
                capabilities = tuple(connection.capabilities)
            else:
                view.append(_PeerView(peer, (), None, None, None, dial=True))
                continue
            latency = None if connection is None else connection.latency
            view.append(_PeerView(peer, capabilities, record, connection, latency))
        self._view = view
        return view

    async def _candidates(self, delegation: Delegation, *, fresh: bool = False) -> list[str]:
        """The peers that may take ``delegation``'s task, in the order to try them.

        The registry's records are read again when stale (see
        :meth:`_records_stale`), for every round after a backoff (``fresh``),
        and before a round would find no candidate at all. Unhealthy,
        offline and draining peers are left out here; :func:`choose` filters
        capabilities and ``exclude`` and orders the rest. A static peer that
        cannot be dialed comes last, so that trying it records the attempt
        (``unreachable``, and why) without dialing it again.
        """
        read = fresh or self._records_stale()
        if read:
            await self._refresh_records()
        while True:
            ordered = await self._choose(delegation)
            if ordered or read:
                return ordered
            read = True  # none at all: make sure with the registry's latest
            await self._refresh_records()

    async def _choose(self, delegation: Delegation) -> list[str]:
        exclude = delegation._exclude
        unreachable = delegation._unreachable
        unreachable.clear()
        candidates: list[Candidate] = []
        view = self._peer_view()
        for entry in view:
            peer = entry.id
            if peer in exclude:
                continue
            connection = entry.connection
            capabilities = entry.capabilities
            # Read now: the view is kept up to watch_interval, latency moves.
            latency = entry.latency if connection is None else connection.latency
            if entry.dial:  # a static peer not connected yet: learn its capabilities
                try:
                    connection = await self._connection_for(peer)
                except FederationError as exc:
                    logger.info("static peer %r unreachable: %s", peer, exc)
                    unreachable[peer] = str(exc)
                    continue
                capabilities = tuple(connection.capabilities)
                latency = connection.latency
            if connection is not None and not connection.is_healthy():
                continue
            record = entry.record
            candidates.append(
                Candidate(
                    id=peer,
                    capabilities=capabilities,
                    current_sessions=record.current_sessions if record is not None else 0,
                    max_sessions=record.max_sessions if record is not None else 0,
                    in_flight=self._in_flight_counts.get(peer, 0),
                    latency=latency,
                    tier=record.tier if record is not None else "standard",
                    success_rate=self._success_rate(peer),
                )
            )
        ordered = choose(
            delegation._task,
            candidates,
            delegation._strategy,
            required=delegation._required,
            prefer=delegation._prefer,
            exclude=exclude,
            sticky=self._recent_assignee(delegation.task_id),
        )
        # Unreachable static peers last: trying one records why it failed.
        ordered.extend(unreachable)
        return ordered

    @contextlib.asynccontextmanager
    async def open_delegation(
        self,
        task: Task,
        *,
        required_capabilities: Iterable[str] = (),
        strategy: str | Strategy | None = None,
        prefer: Iterable[str] = (),
        exclude: Iterable[str] = (),
        max_attempts: int = 5,
    ) -> AsyncIterator[Delegation]:
        """Delegate ``task`` and follow it: yields a :class:`Delegation`.

        Candidates are the other orchestrators this node knows (registry,
        static ``peers=``, connections) that have every required capability,
        are healthy and not draining, minus ``exclude``; ``prefer`` goes
        first, then the ``strategy`` (default: the node's; a name gives one
        instance per node, kept across calls) orders the rest. See
        :meth:`delegate` for attempts and deadlines.

        When the executor of an accepted task is lost — its connection ends
        and does not resume, or the registry declares it dead — or hands the
        task back (``failed`` with ``"draining"``, or ``"cancelled"`` that
        this delegation did not ask for), the task is delegated again to the
        next candidate, as one more attempt, with a
        :class:`~trio_federation.TaskFailedOver` update. Only the current
        executor's callbacks count: a lost one that comes back is refused.

        Entering returns at once (the first attempt runs in the background).
        Leaving the block before the final outcome — normally, by an
        exception or by cancellation — cancels the task: the executor is
        told (if it negotiated the cancel extension) and the block waits, at
        most ``cancel_grace`` seconds, shielded, for its last callback. There
        are no detached delegations.

        Raises:
            DelegationFailed: on entry, when the task would travel past
                ``max_depth`` hops.
            ValueError: this node is delegating a task with this id already,
                or ``max_attempts`` is below 1.
            TypeError: a string where a list of names belongs.
        """
        delegation = self._start_delegation(
            task,
            required_capabilities=required_capabilities,
            strategy=strategy,
            prefer=prefer,
            exclude=exclude,
            max_attempts=max_attempts,
        )
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(delegation._drive)
                try:
                    yield delegation
                finally:
                    await self._end_delegation(delegation)
                    nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            _raise_single(group)
        finally:
            self._forget_delegation(delegation)

    def _start_delegation(
        self,
        task: Task,
        *,
        required_capabilities: Iterable[str],
        strategy: str | Strategy | None,
        prefer: Iterable[str],
        exclude: Iterable[str],
        max_attempts: int,
        followed: bool = True,
    ) -> Delegation:
        """Check the arguments, make the :class:`Delegation` and register it by task id.

        ``followed=False`` (for :meth:`delegate`): nobody reads its updates.
        """
        for name, value in (
            ("required_capabilities", required_capabilities),
            ("prefer", prefer),
            ("exclude", exclude),
        ):
            if isinstance(value, str):
                raise TypeError(f"{name} must be a list of names, not the string {value!r}")
        hops = _HOPS.get() + 1
        if hops > self.max_depth:
            reason = f"{hops} hops exceed max_depth={self.max_depth}"
            raise DelegationFailed(
                task.id, [DelegationAttempt(peer=None, outcome="max_depth", reason=reason)]
            )
        if task.id in self._delegations:
            raise ValueError(f"task {task.id!r} is being delegated already")
        delegation = Delegation(
            self,
            task,
            required=tuple(str(c) for c in required_capabilities),
            strategy=self._strategy_named(strategy),
            prefer=tuple(prefer),
            exclude=frozenset(exclude),
            max_attempts=max_attempts,
            hops=hops,
            followed=followed,
        )
        self._delegations[task.id] = delegation
        return delegation

    async def _end_delegation(self, delegation: Delegation) -> None:
        """The caller leaves: a delegation not over yet is cancelled (shielded, bounded)."""
        if not delegation._done.is_set():
            timed_out = trio.current_time() >= delegation._deadline
            with trio.CancelScope(shield=True):
                await delegation._abandon(timed_out=timed_out)

    def _forget_delegation(self, delegation: Delegation) -> None:
        del self._delegations[delegation.task_id]
        delegation._release()

    async def delegate(
        self,
        task: Task,
        *,
        required_capabilities: Iterable[str] = (),
        strategy: str | Strategy | None = None,
        prefer: Iterable[str] = (),
        exclude: Iterable[str] = (),
        max_attempts: int = 5,
    ) -> Any:
        """Have another orchestrator run ``task`` and return its result.

        An attempt is one try on one candidate (a round without candidates
        counts as one): a refusal or an unreachable peer moves to the next
        candidate at once; when a round is exhausted the node waits
        (exponential backoff with full jitter) and tries again, until
        ``max_attempts`` are spent. A task id delegated recently goes back to
        the same executor while it is a candidate, whose dedupe then answers.

        The remaining budget of the caller's deadline travels with the
        request (``DelegationRequest.timeout``); the executor runs under it.

        Cancellation is trio's: when the caller's scope is cancelled or its
        deadline passes, ``trio.Cancelled`` propagates, the executor is told
        to cancel (see :meth:`open_delegation`), and the status becomes
        ``cancelled`` (``timeout`` when the deadline ended it).

        Raises:
            DelegationFailed: the task failed where it ran, every attempt was
                refused, unreachable or found no candidate, or the task would
                travel past ``max_depth`` hops; ``attempts`` lists every try.
        """
        # As open_delegation, without its background task: this task drives.
        await trio.lowlevel.checkpoint_if_cancelled()
        delegation = self._start_delegation(
            task,
            required_capabilities=required_capabilities,
            strategy=strategy,
            prefer=prefer,
            exclude=exclude,
            max_attempts=max_attempts,
            followed=False,
        )
        try:
            try:
                await delegation._drive()
            finally:
                await self._end_delegation(delegation)
            return delegation._lifecycle.result
        finally:
            self._forget_delegation(delegation)

    # -- broadcasts -----------------------------------------------------------

    async def broadcast(self, topic: str, data: Any = None, ttl: float | None = None) -> int:
        """Send a broadcast to every healthy peer this node knows, once each.

        Peers not connected yet are dialed; one that cannot be reached, or
        whose connection is not healthy (no liveness signal within the
        heartbeat timeout), is skipped (and logged). Returns how many peers it
        was sent to.
        """
        await self._refresh_records()
        payload = BroadcastPayload(topic=topic, data=data, ttl=ttl)
        ids = set(self._connections) | set(self._static_peers)
        ids |= {
            r.id
            for r in self._records.values()
            if r.endpoint is not None and r.status is not OrchestratorStatus.OFFLINE
        }
        ids.discard(self.local_id)
        sent = 0
        for peer in sorted(ids):
            try:
                connection = await self._connection_for(peer)
                if not connection.is_healthy():
                    logger.info("broadcast %r not sent to %r: not healthy", topic, peer)
                    continue
                await connection.send(
                    FederationMessage(
                        type=MessageType.BROADCAST,
                        payload=payload,
                        sender=self.local_id,
                        recipient=connection.id or peer,
                    )
                )
            except (FederationError, trio.ClosedResourceError, trio.BrokenResourceError) as exc:
                logger.info("broadcast %r not sent to %r: %s", topic, peer, exc)
                continue
            sent += 1
        return sent

    @contextlib.contextmanager
    def subscribe_broadcasts(
        self, *topics: str
    ) -> Iterator[trio.MemoryReceiveChannel[BroadcastPayload]]:
        """Receive the broadcasts on ``topics`` (none: every topic) while the block runs.

        Yields a trio receive channel of :class:`~trio_federation.BroadcastPayload`.
        It holds ``BROADCAST_BUFFER`` payloads; a broadcast arriving when it
        is full is dropped for it (and counted), so a slow subscriber never
        stalls a connection. Leaving the block unsubscribes.
        """
        send, receive = trio.open_memory_channel[BroadcastPayload](BROADCAST_BUFFER)
        entry = (frozenset(topics), send)
        self._subscribers.append(entry)
        try:
            with receive:
                yield receive
        finally:
            self._subscribers.remove(entry)
            send.close()

    def _on_broadcast(self, message: FederationMessage, payload: BroadcastPayload) -> None:
        if payload.ttl is not None:
            expires = message.timestamp + timedelta(seconds=payload.ttl)
            if expires < datetime.now(UTC):
                self._stats["broadcasts_dropped"] += 1
                logger.info(
                    "dropped an expired broadcast on %r from %r", payload.topic, message.sender
                )
                return
        for topics, channel in tuple(self._subscribers):
            if topics and payload.topic not in topics:
                continue
            try:
                channel.send_nowait(payload)
            except trio.WouldBlock:
                self._stats["broadcasts_dropped"] += 1
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass

    # -- life -----------------------------------------------------------------

    async def _watch_registry(self) -> None:
        while True:
            await self._refresh_records()
            await trio.sleep(self.registry.watch_interval)

    def _cancel_executions(self, reason: str) -> None:
        """Cancel the running tasks; each reports ``failed`` with error ``reason``."""
        for execution in list(self._executions.values()):
            execution.reason = reason
            execution.scope.cancel()

    async def _wait_idle(self) -> None:
        while self._executions:
            self._idle = trio.Event()
            await self._idle.wait()

    @property
    def draining(self) -> bool:
        """True once :meth:`drain` was called: the node takes no new tasks."""
        return self._admission.draining

    async def drain(self) -> None:
        """Stop taking tasks, hand on the rest, and wait for the running ones.

        The node marks itself ``draining`` in the registry (delegators stop
        choosing it), refuses new delegations with ``draining`` (a repeat of
        a task it runs or ran is still answered, as ever), and waits until
        its running tasks have ended and their outcomes are sent. It goes on
        delegating, and stays registered and connected, until its block ends.
        Calling it again waits again.

        Bound the wait with the caller's scope: when the scope ends it
        (``with trio.move_on_after(30): await node.drain()``), the tasks still
        running are cancelled and reported ``failed`` with error
        ``"draining"`` — a hand-back, so their delegators fail them over —
        and the call waits for those reports, shielded, at most
        ``cancel_grace`` seconds, before ``trio.Cancelled`` propagates.

        A registry that cannot be reached is logged: the node still refuses
        new work, and delegators skip it on the refusals.
        """
        self._admission.draining = True
        try:
            await trio.lowlevel.checkpoint()
            if self._registration is not None:
                try:
                    await self._registration.drain()
                except RegistryUnavailable as exc:
                    logger.warning("could not mark %r draining: %s", self.local_id, exc)
            logger.info("%r draining: %d task(s) running", self.local_id, len(self._executions))
            await self._wait_idle()
        except trio.Cancelled:
            self._cancel_executions("draining")
            with trio.CancelScope(shield=True), trio.move_on_after(self._cancel_grace):
                await self._wait_idle()
            raise

    async def _disconnect_all(self) -> None:
        async with trio.open_nursery() as nursery:
            for connections_of_peer in list(self._connections.values()):
                for connection in connections_of_peer:
                    nursery.start_soon(connection.disconnect)

    async def _listen(
        self,
        stack: contextlib.AsyncExitStack,
        host: str | None,
        port: int,
        endpoint: str | None,
        *,
        secrets: Mapping[str, bytes | str] | SecretLookup | None,
        server_ssl_context: ssl.SSLContext | None,
    ) -> None:
        """Start the listener in the connection nursery and register with its endpoint."""
        assert self._connection_nursery is not None
        listener: FederationListener = await self._connection_nursery.start(
            functools.partial(
                serve_federation,
                local_id=self.local_id,
                capabilities=self.capabilities,
                timeouts=self._timeouts,
                limits=self._limits,
                secrets=secrets,
                ssl_context=server_ssl_context,
            ),
            self._serve_peer,
            host,
            port,
        )
        self._listener = listener
        scheme = "ws" if server_ssl_context is None else "wss"
        advertised = host if host not in (None, "", "0.0.0.0", "::") else "127.0.0.1"
        self._endpoint = endpoint or f"{scheme}://{advertised}:{listener.port}/federation"
        record = OrchestratorRecord(
            id=self.local_id,
            capabilities=self.capabilities,
            max_sessions=self._admission.max_concurrent,
            endpoint=self._endpoint,
        )
        self._registration = await stack.enter_async_context(
            open_registration(self.registry, record, sessions=lambda: self._admission.running)
        )


@contextlib.asynccontextmanager
async def open_federation_node(
    *,
    local_id: str,
    capabilities: Iterable[str] = (),
    executor: Executor | None = None,
    registry: FederationRegistry | str | None = None,
    host: str | None = "127.0.0.1",
    port: int | None = 0,
    endpoint: str | None = None,
    peers: Mapping[str, str] | None = None,
    max_concurrent_tasks: int = 16,
    admit: AdmitHook | None = None,
    strategy: str | Strategy = "round-robin",
    max_depth: int = DEFAULT_MAX_DEPTH,
    backoff: Backoff | None = None,
    timeouts: Timeouts | None = None,
    limits: Limits | None = None,
    reconnect: ReconnectPolicy | None = None,
    secret: bytes | str | None = None,
    secrets: Mapping[str, bytes | str] | SecretLookup | None = None,
    ssl_context: ssl.SSLContext | None = None,
    server_ssl_context: ssl.SSLContext | None = None,
    cancel_grace: float = DEFAULT_CANCEL_GRACE,
    dedupe_window: float = DEFAULT_DEDUPE_WINDOW,
    rng: random.Random | None = None,
    drain_grace: float = DEFAULT_DRAIN_GRACE,
) -> AsyncIterator[FederationNode]:
    """Run one orchestrator of the federation: listen, register, delegate, execute.

    The node listens on ``host``:``port`` (``port=None``: it does not
    listen, a pure client) and registers itself in ``registry`` — a
    :class:`~trio_federation.FederationRegistry`, a Redis URL for
    :func:`~trio_federation.open_registry` (opened and closed with the node),
    or by default (or ``"memory://"``) the one memory registry shared by every
    node of this trio run — with its ``endpoint`` (default
    ``ws://{host}:{port}/federation``; a node listening on every interface,
    ``0.0.0.0`` or ``::``, registers ``127.0.0.1``, which only peers on the
    same machine can dial: give ``endpoint=`` the address they can reach),
    its capabilities and its live load
    (``current_sessions`` = tasks running, ``max_sessions`` =
    ``max_concurrent_tasks``). Peers are found through the registry and the
    static ``peers=`` mapping of id to URL; connections are dialed when
    first needed (with ``reconnect``, resumable) and shared by both
    directions: a peer that dialed us is delegated to over its connection.

    ``executor`` (``async def execute(ctx: TaskContext) -> result``) runs
    every accepted task in its own cancel scope (None: the node executes
    nothing and refuses delegations with ``no_executor``). ``admit(request)``
    may refuse one by returning a reason (None: accept). ``strategy`` orders
    candidates: ``"round-robin"`` (the default), ``"least-loaded"``,
    ``"capability-score"``, ``"random"`` (power of two choices),
    ``"consistent-hash"``, or any :class:`~trio_federation.Strategy`;
    ``max_depth`` bounds the hops a task travels; ``backoff`` paces retry
    rounds. ``timeouts``, ``limits``,
    ``secret`` / ``secrets`` and ``ssl_context`` / ``server_ssl_context``
    configure the connections as for
    :func:`~trio_federation.open_orchestrator_connection` (dialing) and
    :func:`~trio_federation.serve_federation` (listening).

    ``dedupe_window`` is how long, in seconds, a finished task is remembered
    (by delegator and task id) so that a repeat is not run again, and how
    long a task id this node delegated goes back to the same executor.
    ``cancel_grace`` bounds the wait for an executor's answer to a cancel;
    ``drain_grace`` bounds the drain when the block is left normally (see
    below); ``rng`` is the source of the backoff's jitter and of the
    ``"random"`` strategy's draws (for reproducible tests).

    Leaving the block *normally* drains (:meth:`FederationNode.drain`): the
    node is marked ``draining``, takes no new tasks, and waits at most
    ``drain_grace`` seconds for the running ones; those still running then
    are cancelled and reported ``failed`` with error ``"draining"``, so their
    delegators fail them over. Leaving it by an exception or a cancellation
    cancels the running tasks at once (each reported ``failed`` with error
    ``"cancelled"``, which their delegators fail over too). Either way it
    then deregisters and closes every connection gracefully, shielded and
    bounded: the tasks' last words within ``cancel_grace``, the connections
    within ``timeouts.disconnect`` (within ``cancel_grace`` too when the
    block was left by an exception or a cancellation).

    Raises:
        OSError: the address could not be bound.
        RegistryUnavailable: the registry could not be reached.
        ValueError: an argument is out of range.
    """
    timeouts = timeouts or Timeouts()
    limits = limits or Limits()
    if isinstance(max_depth, bool) or not isinstance(max_depth, int) or max_depth < 1:
        raise ValueError(f"max_depth must be a positive int, got {max_depth!r}")
    if not cancel_grace > 0:
        raise ValueError(f"cancel_grace must be positive, got {cancel_grace!r}")
    if not drain_grace >= 0:
        raise ValueError(f"drain_grace must not be negative, got {drain_grace!r}")
    try:
        async with contextlib.AsyncExitStack() as stack:
            if registry is None or (
                isinstance(registry, str) and registry.lower().rstrip("/") == "memory:"
            ):
                the_registry: FederationRegistry = _shared_memory_registry()
            elif isinstance(registry, str):
                the_registry = await stack.enter_async_context(open_registry(registry))
            else:
                the_registry = registry
            node = FederationNode(
                local_id=local_id,
                capabilities=tuple(capabilities),
                executor=executor,
                registry=the_registry,
                peers=peers or {},
                max_concurrent_tasks=max_concurrent_tasks,
                admit=admit,
                strategy=strategy,
                max_depth=max_depth,
                backoff=backoff or Backoff(),
                timeouts=timeouts,
                limits=limits,
                reconnect=reconnect or DEFAULT_NODE_RECONNECT,
                secret=secret,
                ssl_context=ssl_context,
                cancel_grace=cancel_grace,
                dedupe_window=dedupe_window,
                rng=rng,
                drain_grace=drain_grace,
            )
            async with trio.open_nursery() as connections:
                node._connection_nursery = connections
                clean = False
                try:
                    async with contextlib.AsyncExitStack() as registration:
                        if port is not None:
                            await node._listen(
                                registration,
                                host,
                                port,
                                endpoint,
                                secrets=secrets,
                                server_ssl_context=server_ssl_context,
                            )
                        await node._refresh_records()
                        connections.start_soon(node._watch_registry)
                        async with trio.open_nursery() as tasks:
                            node._task_nursery = tasks
                            try:
                                yield node
                            except BaseException:
                                # Cancelled or failed: the tasks still running are
                                # cancelled at once and report "cancelled"; the
                                # nursery waits for them.
                                node._closing = True
                                node._cancel_executions("cancelled")
                                raise
                            else:
                                # Left normally: drain, within drain_grace; what
                                # still runs then is handed back ("draining").
                                with trio.move_on_after(node._drain_grace):
                                    await node.drain()
                                node._closing = True
                                node._cancel_executions("draining")
                    clean = True
                finally:
                    # Close every connection gracefully (what is queued is
                    # written); after an error or a cancellation within the
                    # short grace only.
                    node._closing = True
                    bound = timeouts.disconnect if clean else min(cancel_grace, timeouts.disconnect)
                    with trio.CancelScope(shield=True), trio.move_on_after(bound):
                        await node._disconnect_all()
                    connections.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        _raise_single(group)
