"""The typed messages of the federation: frozen, keyword-only attrs classes.

Pure data: no I/O and no serialization logic (that lives in ``_codec``).
Enumerations are :class:`enum.StrEnum`, so plain strings can be passed to every
constructor and compared with every field (``msg.type == "delegation"``).
Times are timezone-aware UTC :class:`~datetime.datetime`; durations are seconds.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, TypeAlias

import attrs

__all__ = [
    "AssignedResources",
    "BroadcastPayload",
    "CallbackStatus",
    "Capability",
    "ConnectionHealth",
    "ConnectionStatus",
    "CoordinatorFrame",
    "CoordinatorFrameType",
    "DelegationRequest",
    "DelegationResponse",
    "DelegationResult",
    "FederationBroadcast",
    "FederationMessage",
    "HeartbeatPayload",
    "HeartbeatStatus",
    "MemoryEntry",
    "MessageType",
    "OrchestratorCapabilities",
    "Payload",
    "SharedContext",
    "Task",
    "TaskCallback",
    "TaskHistoryEntry",
    "TaskPriority",
    "TaskStatus",
    "TaskType",
]


class Capability(enum.StrEnum):
    """What an orchestrator can do; advertised at the handshake."""

    CODE_GENERATION = "code-generation"
    RESEARCH = "research"
    ANALYSIS = "analysis"
    TESTING = "testing"
    DEPLOYMENT = "deployment"
    MONITORING = "monitoring"
    SECURITY = "security"
    DATA_PROCESSING = "data-processing"
    ML_TRAINING = "ml-training"
    CUSTOM = "custom"


class ConnectionStatus(enum.StrEnum):
    """The state of an :class:`~trio_federation.OrchestratorConnection`."""

    CONNECTING = "connecting"
    CONNECTED = "connected"
    ACTIVE = "active"
    IDLE = "idle"
    DEGRADED = "degraded"
    DISCONNECTED = "disconnected"
    ERROR = "error"


class MessageType(enum.StrEnum):
    """The ``type`` of a :class:`FederationMessage`.

    ``delegation``, ``callback`` and ``broadcast`` are *data* messages, delivered
    to ``async for msg in conn``; ``heartbeat`` and ``status`` are *control*
    messages, which update the connection's state and reach only subscriptions
    that ask for them.
    """

    DELEGATION = "delegation"
    CALLBACK = "callback"
    BROADCAST = "broadcast"
    HEARTBEAT = "heartbeat"
    STATUS = "status"


class TaskType(enum.StrEnum):
    """The kind of work a :class:`Task` is."""

    CODE = "code"
    RESEARCH = "research"
    ANALYSIS = "analysis"
    CUSTOM = "custom"
    GENERAL = "general"


class TaskPriority(enum.StrEnum):
    """Priority of a task or of a delegation."""

    LOW = "low"
    MEDIUM = "medium"
    HIGH = "high"
    CRITICAL = "critical"


class TaskStatus(enum.StrEnum):
    """Lifecycle state of a :class:`Task`."""

    PENDING = "pending"
    IN_PROGRESS = "in_progress"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


class CallbackStatus(enum.StrEnum):
    """What a :class:`TaskCallback` reports."""

    COMPLETED = "completed"
    FAILED = "failed"
    PROGRESS = "progress"
    CANCEL = "cancel"
    """Not an outcome: a delegator asks the executor to cancel the task (the
    ``cancel`` extension, sent only to peers that negotiated it)."""


class HeartbeatStatus(enum.StrEnum):
    """The load status an orchestrator announces in its heartbeats."""

    HEALTHY = "healthy"
    DEGRADED = "degraded"
    OVERLOADED = "overloaded"


# Converters for the enum fields: members pass straight through (the codec hands
# over members it already checked); plain strings are looked up.
def _message_type(value: MessageType | str) -> MessageType:
    return value if type(value) is MessageType else MessageType(value)


def _task_type(value: TaskType | str) -> TaskType:
    return value if type(value) is TaskType else TaskType(value)


def _task_priority(value: TaskPriority | str) -> TaskPriority:
    return value if type(value) is TaskPriority else TaskPriority(value)


def _task_status(value: TaskStatus | str) -> TaskStatus:
    return value if type(value) is TaskStatus else TaskStatus(value)


def _callback_status(value: CallbackStatus | str) -> CallbackStatus:
    return value if type(value) is CallbackStatus else CallbackStatus(value)


def _heartbeat_status(value: HeartbeatStatus | str) -> HeartbeatStatus:
    return value if type(value) is HeartbeatStatus else HeartbeatStatus(value)


def _connection_status(value: ConnectionStatus | str) -> ConnectionStatus:
    return value if type(value) is ConnectionStatus else ConnectionStatus(value)


def _utc(value: datetime) -> datetime:
    """Normalise an aware datetime to UTC; reject naive ones with a clear error."""
    if type(value) is datetime and value.tzinfo is UTC:
        return value
    if not isinstance(value, datetime):
        raise TypeError(f"expected a datetime, got {type(value).__name__}: {value!r}")
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"datetime must be timezone-aware (UTC), got naive {value.isoformat()}")
    return value if value.tzinfo is UTC else value.astimezone(UTC)


def _utc_or_none(value: datetime | None) -> datetime | None:
    return None if value is None else _utc(value)


def _now() -> datetime:
    # The wire carries milliseconds: a fresh timestamp round-trips exactly.
    now = datetime.now(UTC)
    return now.replace(microsecond=now.microsecond // 1000 * 1000)


def _non_negative(_inst: object, attribute: attrs.Attribute[Any], value: float | None) -> None:
    if value is not None and not value >= 0:
        raise ValueError(f"{attribute.name} must be >= 0, got {value!r}")


def _freeze_str_tuple(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        raise TypeError(f"expected a sequence of strings, got the string {value!r}")
    items = tuple(value)
    for item in items:
        if not isinstance(item, str):
            raise TypeError(f"expected strings, got {type(item).__name__}: {item!r}")
    return items


def _freeze_optional_tuple(value: Any) -> Any:
    return None if value is None else tuple(value)


@attrs.frozen(kw_only=True)
class Task:
    """A unit of work that one orchestrator can delegate to another."""

    # Fields in the daemon's order, so encodings match it key for key.
    id: str
    """Unique task id; also used as the ``correlation_id`` of its callbacks."""
    type: TaskType = attrs.field(default=TaskType.GENERAL, converter=_task_type)
    """The kind of task."""
    description: str
    """What to do, for humans and agents."""
    priority: TaskPriority = attrs.field(default=TaskPriority.MEDIUM, converter=_task_priority)
    """How urgent it is."""
    status: TaskStatus = attrs.field(default=TaskStatus.PENDING, converter=_task_status)
    """Where it is in its lifecycle."""
    created_at: datetime = attrs.field(factory=_now, converter=_utc)
    """When it was created (UTC)."""
    updated_at: datetime = attrs.field(factory=_now, converter=_utc)
    """When it last changed (UTC)."""
    assigned_to: str | None = None
    """The orchestrator (or agent) it is assigned to, if any."""
    metadata: Mapping[str, Any] | None = None
    """Free-form JSON-compatible data."""


@attrs.frozen(kw_only=True)
class OrchestratorCapabilities:
    """The daemon's structured form of required capabilities (all fields optional).

    A :class:`DelegationRequest` may carry its ``required_capabilities`` either as
    a list of :class:`Capability` names or as this object. Routing reads the list
    form; from this form it reads :attr:`specializations` as capability names.
    """

    max_sessions: int | None = None
    """Concurrent sessions required."""
    supported_task_types: tuple[str, ...] | None = attrs.field(
        default=None, converter=_freeze_optional_tuple
    )
    """Task types the executor must support."""
    memory_tiers: tuple[str, ...] | None = attrs.field(
        default=None, converter=_freeze_optional_tuple
    )
    """Memory tiers required (``scratchpad``, ``episodic``, ``semantic``)."""
    token_budget: Mapping[str, Any] | None = None
    """The daemon's ``tokenBudget`` object, with its wire keys."""
    resource_limits: Mapping[str, Any] | None = None
    """The daemon's ``resourceLimits`` object, with its wire keys."""
    specializations: tuple[str, ...] | None = attrs.field(
        default=None, converter=_freeze_optional_tuple
    )
    """Specialised capability names."""


@attrs.frozen(kw_only=True)
class MemoryEntry:
    """One episodic or semantic memory shared with a delegated task."""

    id: str
    """Memory id."""
    content: str
    """The remembered text."""
    timestamp: datetime = attrs.field(converter=_utc)
    """When it was recorded (UTC)."""
    type: str
    """``interaction``, ``observation``, ``decision`` or ``knowledge``."""


@attrs.frozen(kw_only=True)
class TaskHistoryEntry:
    """One step of a task's lineage."""

    task_id: str
    """The task."""
    orchestrator_id: str
    """The orchestrator that handled it."""
    timestamp: datetime = attrs.field(converter=_utc)
    """When (UTC)."""
    outcome: str
    """``completed``, ``failed`` or ``delegated``."""


@attrs.frozen(kw_only=True)
class SharedContext:
    """Memory handed over with a delegated task (all fields optional)."""

    scratchpad: Mapping[str, Any] | None = None
    """Immediate working memory."""
    episodic: tuple[MemoryEntry, ...] | None = attrs.field(
        default=None, converter=_freeze_optional_tuple
    )
    """Relevant episodic memories."""
    semantic: tuple[MemoryEntry, ...] | None = attrs.field(
        default=None, converter=_freeze_optional_tuple
    )
    """Relevant semantic knowledge."""
    task_history: tuple[TaskHistoryEntry, ...] | None = attrs.field(
        default=None, converter=_freeze_optional_tuple
    )
    """The task's lineage."""


def _required_capabilities(value: Any) -> tuple[str, ...] | OrchestratorCapabilities | None:
    if value is None or isinstance(value, OrchestratorCapabilities):
        return value
    return _freeze_str_tuple(value)


@attrs.frozen(kw_only=True)
class DelegationRequest:
    """A request to run :attr:`task` on another orchestrator (``delegation`` payload)."""

    from_orchestrator_id: str
    """Who delegates."""
    to_orchestrator_id: str
    """Who is asked to run the task."""
    task: Task
    """The task."""
    priority: TaskPriority = attrs.field(default=TaskPriority.MEDIUM, converter=_task_priority)
    """Priority of the delegation."""
    required_capabilities: tuple[str, ...] | OrchestratorCapabilities | None = attrs.field(
        default=None,
        converter=_required_capabilities,
    )
    """Capability names, or the daemon's structured form."""
    context: SharedContext | None = None
    """Memory handed over with the task."""
    timeout: float | None = attrs.field(default=None, validator=_non_negative)
    """Seconds the delegator will wait (milliseconds on the wire)."""
    callback_id: str | None = None
    """Where results should be reported, if not to the sender."""


@attrs.frozen(kw_only=True)
class AssignedResources:
    """Resources an orchestrator set aside for an accepted delegation."""

    sessions: int
    """Sessions reserved."""
    tokens: int
    """Token budget reserved."""


@attrs.frozen(kw_only=True)
class DelegationResponse:
    """Acceptance or refusal of a delegation (a ``callback`` payload)."""

    task_id: str
    """The delegated task."""
    accepted: bool
    """Whether the task was accepted."""
    reason: str | None = None
    """Why it was refused (or any note)."""
    estimated_completion: datetime | None = attrs.field(default=None, converter=_utc_or_none)
    """When the executor expects to finish (UTC)."""
    assigned_resources: AssignedResources | None = None
    """What the executor set aside for it."""


@attrs.frozen(kw_only=True)
class TaskCallback:
    """Progress or outcome of a delegated task (a ``callback`` payload)."""

    task_id: str
    """The delegated task."""
    status: CallbackStatus = attrs.field(converter=_callback_status)
    """``progress``, ``completed`` or ``failed``."""
    result: Any = None
    """The result (any JSON value), usually with ``completed``."""
    error: str | None = None
    """What went wrong, usually with ``failed``."""
    progress: float | None = None
    """Progress so far, usually 0-100."""
    metadata: Mapping[str, Any] | None = None
    """Free-form JSON-compatible data."""


@attrs.frozen(kw_only=True)
class BroadcastPayload:
    """A federation-wide announcement on a topic (``broadcast`` payload)."""

    topic: str
    """What it is about."""
    data: Any = None
    """Any JSON value."""
    ttl: float | None = attrs.field(default=None, validator=_non_negative)
    """Seconds the announcement stays relevant (milliseconds on the wire)."""


@attrs.frozen(kw_only=True)
class HeartbeatPayload:
    """An orchestrator's load status (``heartbeat`` payload)."""

    orchestrator_id: str
    """Who is beating."""
    timestamp: datetime = attrs.field(factory=_now, converter=_utc)
    """When (UTC)."""
    status: HeartbeatStatus = attrs.field(
        default=HeartbeatStatus.HEALTHY, converter=_heartbeat_status
    )
    """The sender's load status."""
    active_connections: int = 0
    """How many federation connections the sender has open."""


@attrs.frozen(kw_only=True)
class ConnectionHealth:
    """Health figures of a connection (``status`` payload; ``get_status()``)."""

    status: ConnectionStatus = attrs.field(converter=_connection_status)
    """The connection's status."""
    uptime: float = attrs.field(validator=_non_negative)
    """Seconds since the connection opened (milliseconds on the wire)."""
    last_heartbeat: datetime = attrs.field(converter=_utc)
    """Time of the last liveness signal (UTC)."""
    messages_sent: int = 0
    """Messages written to the socket."""
    messages_received: int = 0
    """Well-formed messages read from the socket."""
    errors: int = 0
    """Malformed messages and other reported errors."""
    latency: float | None = attrs.field(default=None, validator=_non_negative)
    """Last measured ping round-trip time in seconds (milliseconds on the wire)."""


Payload: TypeAlias = (
    DelegationRequest
    | DelegationResponse
    | TaskCallback
    | BroadcastPayload
    | HeartbeatPayload
    | ConnectionHealth
)
"""Any payload a :class:`FederationMessage` can carry."""

_PAYLOAD_TYPES: dict[MessageType, tuple[type[Any], ...]] = {
    MessageType.DELEGATION: (DelegationRequest,),
    MessageType.CALLBACK: (TaskCallback, DelegationResponse),
    MessageType.BROADCAST: (BroadcastPayload,),
    MessageType.HEARTBEAT: (HeartbeatPayload,),
    MessageType.STATUS: (ConnectionHealth,),
}


def _check_payload(inst: FederationMessage, _attribute: object, value: Any) -> None:
    allowed = _PAYLOAD_TYPES[inst.type]
    if not isinstance(value, allowed):
        names = " or ".join(t.__name__ for t in allowed)
        raise TypeError(
            f"a {inst.type.value!r} message carries a {names}, got {type(value).__name__}"
        )


@attrs.frozen(kw_only=True)
class FederationMessage:
    """One message on the wire: an envelope around a typed payload.

    The payload class must fit the type: ``delegation`` carries a
    :class:`DelegationRequest`; ``callback`` a :class:`TaskCallback` or a
    :class:`DelegationResponse`; ``broadcast`` a :class:`BroadcastPayload`;
    ``heartbeat`` a :class:`HeartbeatPayload`; ``status`` a
    :class:`ConnectionHealth`. A mismatch raises :exc:`TypeError`.
    """

    type: MessageType = attrs.field(converter=_message_type)
    """What kind of message it is."""
    payload: Payload = attrs.field(validator=_check_payload)
    """The typed payload."""
    sender: str
    """The sending orchestrator's id (``from`` on the wire)."""
    recipient: str
    """The receiving orchestrator's id (``to`` on the wire)."""
    timestamp: datetime = attrs.field(factory=_now, converter=_utc)
    """When it was sent (UTC)."""
    correlation_id: str | None = None
    """Ties related messages together (usually a task id)."""


PAYLOAD_PARTS: tuple[type[Any], ...] = (
    Task,
    OrchestratorCapabilities,
    MemoryEntry,
    TaskHistoryEntry,
    SharedContext,
    DelegationRequest,
    AssignedResources,
    DelegationResponse,
    TaskCallback,
    BroadcastPayload,
    HeartbeatPayload,
    ConnectionHealth,
)
"""Every attrs class that travels inside a payload (the codec's list)."""

for _cls in (*PAYLOAD_PARTS, FederationMessage):
    attrs.resolve_types(_cls)


# -- the daemon coordinator's dialect -----------------------------------------------------


class CoordinatorFrameType(enum.StrEnum):
    """The ``type`` of a :class:`CoordinatorFrame`: the daemon coordinator's dialect.

    The TypeScript daemon's ``OrchestratorFederation`` sends single-encoded
    JSON frames with these types instead of the v1 envelope (see
    :ref:`coordinator-dialect`).
    """

    DELEGATION_REQUEST = "delegation:request"
    """The coordinator asks us to run a task (:attr:`CoordinatorFrame.request`)."""
    DELEGATION_RESULT = "delegation:result"
    """The answer: accepted or refused (:attr:`CoordinatorFrame.result`)."""
    TASK_COMPLETED = "task:completed"
    """A delegated task completed (:attr:`CoordinatorFrame.session_id`)."""
    TASK_FAILED = "task:failed"
    """A delegated task failed (``session_id`` and ``error``)."""
    BROADCAST = "federation:broadcast"
    """A federation-wide broadcast (:attr:`CoordinatorFrame.broadcast`)."""
    CONTEXT_REQUEST = "context:request"
    """The coordinator asks for our shared context."""
    CONTEXT_RESPONSE = "context:response"
    """The shared context (:attr:`CoordinatorFrame.context`)."""
    HEARTBEAT = "heartbeat"
    """Liveness toward the coordinator (``{"type": "heartbeat"}``, nothing else)."""
    STATUS_UPDATE = "status_update"
    """Status toward the coordinator (:attr:`CoordinatorFrame.status`)."""


def _frame_type(value: CoordinatorFrameType | str) -> CoordinatorFrameType:
    return value if type(value) is CoordinatorFrameType else CoordinatorFrameType(value)


@attrs.frozen(kw_only=True)
class DelegationResult:
    """The daemon coordinator's answer to a delegation (``delegation:result``)."""

    success: bool
    """Whether the task was accepted."""
    session_id: str | None = None
    """The session running it, if accepted (a trio-federation node: the task id)."""
    error: str | None = None
    """Why not, in words, if refused."""
    reason: str | None = None
    """Why not, in the daemon's vocabulary: ``capability_mismatch``, ``overloaded``,
    ``unreachable``, ``rejected`` or ``timeout``."""
    timestamp: datetime = attrs.field(factory=_now, converter=_utc)
    """When it was decided (UTC)."""
    metadata: Mapping[str, Any] | None = None
    """Free-form."""


@attrs.frozen(kw_only=True)
class FederationBroadcast:
    """A broadcast of the daemon coordinator (``federation:broadcast``)."""

    source_id: str
    """The orchestrator it is from."""
    message_type: str
    """``status_update``, ``capability_change``, ``load_alert``, ``shutdown_notice``
    or ``custom`` (a node delivers it as a broadcast on this topic)."""
    payload: Mapping[str, Any] = attrs.field(factory=dict)
    """Free-form."""
    priority: TaskPriority = attrs.field(default=TaskPriority.MEDIUM, converter=_task_priority)
    """Its priority."""
    timestamp: datetime = attrs.field(factory=_now, converter=_utc)
    """When it was sent (UTC)."""


_FRAME_FIELDS: dict[CoordinatorFrameType, tuple[str, ...]] = {
    CoordinatorFrameType.DELEGATION_REQUEST: ("request",),
    CoordinatorFrameType.DELEGATION_RESULT: ("request_id", "result"),
    CoordinatorFrameType.TASK_COMPLETED: ("session_id",),
    CoordinatorFrameType.TASK_FAILED: ("session_id",),
    CoordinatorFrameType.BROADCAST: ("broadcast",),
    CoordinatorFrameType.CONTEXT_REQUEST: (),
    CoordinatorFrameType.CONTEXT_RESPONSE: ("context",),
    CoordinatorFrameType.HEARTBEAT: (),
    CoordinatorFrameType.STATUS_UPDATE: ("status",),
}


@attrs.frozen(kw_only=True)
class CoordinatorFrame:
    """One frame of the daemon coordinator's dialect (see :ref:`coordinator-dialect`).

    Unlike a :class:`FederationMessage` it has no envelope: no ``from``, no
    ``to``, no timestamp. A connection delivers the frames it receives through
    :meth:`~trio_federation.OrchestratorConnection.subscribe_coordinator`, with
    :attr:`sender` set to the peer's id, and sends one given to
    :meth:`~trio_federation.OrchestratorConnection.send`.

    Which fields a type uses (those named are required; a missing one raises
    :exc:`ValueError`): ``delegation:request`` :attr:`request`;
    ``delegation:result`` :attr:`request_id` and :attr:`result`;
    ``task:completed`` :attr:`session_id`; ``task:failed`` :attr:`session_id`
    (and :attr:`error`); ``federation:broadcast`` :attr:`broadcast`;
    ``context:response`` :attr:`context`; ``status_update`` :attr:`status`;
    ``context:request`` and ``heartbeat`` none. :attr:`data` adds keys to the
    ``payload`` object of ``task:*`` and ``status_update`` frames.
    """

    type: CoordinatorFrameType = attrs.field(converter=_frame_type)
    """What kind of frame it is."""
    request: DelegationRequest | None = None
    """The delegation asked for (``delegation:request``)."""
    request_id: str | None = None
    """The task id the result answers (``requestId``, ``delegation:result``)."""
    result: DelegationResult | None = None
    """The answer (``delegation:result``)."""
    session_id: str | None = None
    """The session that ended (``payload.sessionId`` of ``task:*``)."""
    error: str | None = None
    """Why it failed (``payload.error`` of ``task:failed``)."""
    broadcast: FederationBroadcast | None = None
    """The broadcast (``federation:broadcast``)."""
    context: SharedContext | None = None
    """The shared context (``context:response``)."""
    status: str | None = None
    """The orchestrator's status (``payload.status`` of ``status_update``): the
    coordinator's ``connected``, ``disconnected``, ``degraded``, ``overloaded``
    or ``maintenance``."""
    data: Mapping[str, Any] | None = None
    """The other keys of the ``payload`` object (``task:*``, ``status_update``)."""
    sender: str = ""
    """Not on the wire: the id of the peer it came from, set on receipt."""

    def __attrs_post_init__(self) -> None:
        for name in _FRAME_FIELDS[self.type]:
            if getattr(self, name) is None:
                raise ValueError(f"a {self.type.value!r} frame requires {name}")


for _cls in (DelegationResult, FederationBroadcast, CoordinatorFrame):
    attrs.resolve_types(_cls)
