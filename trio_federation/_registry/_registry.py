"""Discovery: the :class:`FederationRegistry` interface and its in-memory backend.

Layers: the record types and the pure helpers (query matching, metrics, the
derived ``offline`` status, the JSON record codec, the watch diff) know nothing
of I/O; :class:`FederationRegistry` adds the clock and the async operations;
:class:`MemoryRegistry` keeps the records in a dict; ``_redis_registry`` keeps
them in Redis with the TypeScript daemon's key layout. Both backends pass the
contract suite in :mod:`trio_federation.testing`.

Liveness needs no janitor. Every read derives the status ``offline`` for a
record whose last heartbeat is older than ``heartbeat_timeout``, and a record
whose last heartbeat is older than ``stale_timeout`` no longer exists (Redis:
the key's expiry, and readers that skip such records where the daemon's plain
``SET`` removed the expiry; memory: it is dropped when next looked at).
"""

from __future__ import annotations

import abc
import collections
import contextlib
import enum
import logging
import math
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final

import attrs
import orjson
import trio

from .._exceptions import FederationError

if TYPE_CHECKING:
    from typing import Self

    from .._connection._transport import FederationListener

__all__ = [
    "DEFAULT_HEARTBEAT_TIMEOUT",
    "DEFAULT_STALE_TIMEOUT",
    "MAX_MEMORY_ORCHESTRATORS",
    "FederationRegistry",
    "MemoryRegistry",
    "OrchestratorMetrics",
    "OrchestratorNotFound",
    "OrchestratorQuery",
    "OrchestratorRecord",
    "OrchestratorStatus",
    "Registration",
    "RegistryEvent",
    "RegistryEventType",
    "RegistryFull",
    "RegistryUnavailable",
    "RegistryWatch",
    "open_registration",
    "open_registry",
]

logger = logging.getLogger("trio_federation.registry")

DEFAULT_HEARTBEAT_TIMEOUT: Final = 30.0
"""Seconds without a heartbeat after which an orchestrator is unhealthy (the daemon's 30 s)."""
DEFAULT_STALE_TIMEOUT: Final = 300.0
"""Seconds without a heartbeat after which an orchestrator disappears (the daemon's 5 min)."""
MAX_MEMORY_ORCHESTRATORS: Final = 100_000
"""The most orchestrators one :class:`MemoryRegistry` holds."""
DEFAULT_CLEANUP_TIMEOUT: Final = 5.0
"""Seconds :func:`open_registration` may spend marking itself draining and deregistering."""


# -- errors ------------------------------------------------------------------------------


class OrchestratorNotFound(FederationError):
    """No orchestrator with this id is registered (or its record expired).

    Attributes:
        orchestrator_id: the id that was looked for.
    """

    def __init__(self, orchestrator_id: str) -> None:
        super().__init__(orchestrator_id)
        self.orchestrator_id = orchestrator_id

    def __str__(self) -> str:
        return f"orchestrator not found: {self.orchestrator_id!r}"


class RegistryUnavailable(FederationError):
    """The registry's store cannot be reached (Redis down, a time-out).

    Attributes:
        reason: what failed.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason

    def __str__(self) -> str:
        return f"registry unavailable: {self.reason}"


class RegistryFull(FederationError):
    """A :class:`MemoryRegistry` already holds its maximum of orchestrators.

    Attributes:
        limit: the bound.
    """

    def __init__(self, limit: int) -> None:
        super().__init__(limit)
        self.limit = limit

    def __str__(self) -> str:
        return f"registry full ({self.limit} orchestrators registered)"


# -- records -----------------------------------------------------------------------------


class OrchestratorStatus(enum.StrEnum):
    """An orchestrator's status in the registry (the daemon's ``RegistryOrchestratorStatus``).

    ``offline`` is also what every read reports for an orchestrator whose last
    heartbeat is older than ``heartbeat_timeout``, whatever was stored.
    """

    ONLINE = "online"
    OFFLINE = "offline"
    BUSY = "busy"
    DRAINING = "draining"


def _status(value: str) -> OrchestratorStatus:
    return OrchestratorStatus(value)


def _utc_ms(value: datetime) -> datetime:
    """UTC, truncated to the millisecond (what the JSON record keeps)."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    value = value.astimezone(UTC)
    return value.replace(microsecond=value.microsecond // 1000 * 1000)


def _now() -> datetime:
    return _utc_ms(datetime.now(UTC))


def _string_tuple(value: Iterable[str]) -> tuple[str, ...]:
    if isinstance(value, str):
        raise TypeError("capabilities must be a list of names, not one string")
    return tuple(value)


def _non_negative(_instance: object, attribute: attrs.Attribute[Any], value: int) -> None:
    if value < 0:
        raise ValueError(f"{attribute.name} must be >= 0, got {value!r}")


@attrs.frozen(kw_only=True)
class OrchestratorRecord:
    """What the registry knows of one orchestrator (the daemon's ``RegistryOrchestratorMetadata``).

    :meth:`FederationRegistry.register` sets :attr:`last_heartbeat` from the
    registry's clock and keeps :attr:`registered_at` from the first
    registration (see there); the values given here are ignored there.
    """

    id: str
    """Unique orchestrator id (the ``local_id`` it federates with)."""
    name: str = attrs.field(default=attrs.Factory(lambda self: self.id, takes_self=True))
    """Human-readable name (defaults to the id)."""
    capabilities: tuple[str, ...] = attrs.field(default=(), converter=_string_tuple)
    """Capability names (see :class:`~trio_federation.Capability`)."""
    region: str = "default"
    """Where it runs, for region queries."""
    tier: str = "standard"
    """Free-form service tier."""
    max_sessions: int = attrs.field(default=0, validator=_non_negative)
    """Concurrent sessions it accepts (0: unknown)."""
    current_sessions: int = attrs.field(default=0, validator=_non_negative)
    """Sessions running now."""
    tokens_used: int = attrs.field(default=0, validator=_non_negative)
    """Tokens used so far."""
    token_limit: int = attrs.field(default=0, validator=_non_negative)
    """Token budget (0: unknown)."""
    status: OrchestratorStatus = attrs.field(default=OrchestratorStatus.ONLINE, converter=_status)
    """Its status (as stored, or ``offline`` when derived, see :class:`OrchestratorStatus`)."""
    last_heartbeat: datetime = attrs.field(factory=_now, converter=_utc_ms)
    """When it last heartbeat (UTC, milliseconds)."""
    registered_at: datetime = attrs.field(factory=_now, converter=_utc_ms)
    """When it registered (UTC, milliseconds)."""
    metadata: Mapping[str, Any] | None = None
    """Free-form JSON-compatible data."""
    endpoint: str | None = None
    """The ``ws://`` or ``wss://`` URL to dial it (our addition to the daemon's record)."""

    @property
    def available_sessions(self) -> int:
        """``max_sessions - current_sessions`` (may be negative when overloaded)."""
        return self.max_sessions - self.current_sessions

    @property
    def available_tokens(self) -> int:
        """``token_limit - tokens_used`` (may be negative)."""
        return self.token_limit - self.tokens_used


def _optional_statuses(
    value: Iterable[str] | None,
) -> tuple[OrchestratorStatus, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        raise TypeError("statuses must be a list of statuses, not one string")
    return tuple(OrchestratorStatus(item) for item in value)


@attrs.frozen(kw_only=True)
class OrchestratorQuery:
    """Filters for :meth:`FederationRegistry.query` (the daemon's ``OrchestratorQuery``).

    Every filter that is set must match; an empty query matches everything.
    """

    capabilities: tuple[str, ...] = attrs.field(default=(), converter=_string_tuple)
    """Capabilities the orchestrator must *all* have."""
    region: str | None = None
    """The region it must be in."""
    statuses: tuple[OrchestratorStatus, ...] | None = attrs.field(
        default=None, converter=_optional_statuses
    )
    """Statuses it may have (after the derived ``offline``)."""
    min_available_sessions: int | None = None
    """At least this many free sessions (``max_sessions - current_sessions``)."""
    min_available_tokens: int | None = None
    """At least this many free tokens (``token_limit - tokens_used``)."""

    def matches(self, record: OrchestratorRecord) -> bool:
        """Whether ``record`` passes every filter of this query."""
        if not set(self.capabilities).issubset(record.capabilities):
            return False
        if self.region is not None and record.region != self.region:
            return False
        if self.statuses is not None and record.status not in self.statuses:
            return False
        if (
            self.min_available_sessions is not None
            and record.available_sessions < self.min_available_sessions
        ):
            return False
        return not (
            self.min_available_tokens is not None
            and record.available_tokens < self.min_available_tokens
        )


@attrs.frozen(kw_only=True)
class OrchestratorMetrics:
    """Load figures of one orchestrator (the daemon's ``RegistryOrchestratorMetrics``)."""

    id: str
    """The orchestrator's id."""
    load: float
    """``current_sessions / max_sessions`` (0 when ``max_sessions`` is 0); usually 0-1."""
    sessions: int
    """Sessions running now."""
    tokens_used: int
    """Tokens used so far."""
    token_limit: int
    """Token budget."""
    token_utilization: float
    """``tokens_used / token_limit`` (0 when ``token_limit`` is 0); usually 0-1."""
    status: OrchestratorStatus
    """Its status (derived ``offline`` included)."""
    last_heartbeat: datetime
    """When it last heartbeat."""
    uptime: float
    """Seconds since it registered."""


def _metrics(record: OrchestratorRecord, now: datetime) -> OrchestratorMetrics:
    return OrchestratorMetrics(
        id=record.id,
        load=record.current_sessions / record.max_sessions if record.max_sessions > 0 else 0.0,
        sessions=record.current_sessions,
        tokens_used=record.tokens_used,
        token_limit=record.token_limit,
        token_utilization=(
            record.tokens_used / record.token_limit if record.token_limit > 0 else 0.0
        ),
        status=record.status,
        last_heartbeat=record.last_heartbeat,
        uptime=max(0.0, (now - record.registered_at).total_seconds()),
    )


# -- the JSON record, as the daemon writes it ------------------------------------------------

# The daemon's field order (JSON.stringify keeps insertion order), then ours.
_FIELDS: Final = (
    ("id", "id"),
    ("name", "name"),
    ("capabilities", "capabilities"),
    ("region", "region"),
    ("tier", "tier"),
    ("max_sessions", "maxSessions"),
    ("current_sessions", "currentSessions"),
    ("tokens_used", "tokensUsed"),
    ("token_limit", "tokenLimit"),
    ("status", "status"),
    ("last_heartbeat", "lastHeartbeat"),
    ("registered_at", "registeredAt"),
    ("metadata", "metadata"),
    ("endpoint", "endpoint"),
)


def _iso(value: datetime) -> str:
    """``Date.prototype.toISOString``: UTC, exactly three fraction digits, ``Z``."""
    return (
        value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{value.microsecond // 1000:03d}Z"
    )


def encode_record(record: OrchestratorRecord, lease_ms: int | None = None) -> str:
    """The JSON text of ``record``: the daemon's camelCase fields, ISO dates.

    Optional fields that are ``None`` are left out, as ``JSON.stringify`` does
    with ``undefined``. ``lease_ms``, if given, is written last as
    ``leaseMs``: the Redis backend's mark of a record under its lease (see
    :ref:`sharing-redis`).
    """
    out: dict[str, Any] = {}
    for name, key in _FIELDS:
        value = getattr(record, name)
        if value is None:
            continue
        if isinstance(value, datetime):
            value = _iso(value)
        elif isinstance(value, tuple):
            value = list(value)
        elif isinstance(value, enum.Enum):
            value = value.value
        out[key] = value
    if lease_ms is not None:
        out["leaseMs"] = lease_ms
    return orjson.dumps(out).decode()


def _expect(raw: Mapping[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    value = raw.get(key)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ValueError(
            f"field {key!r}: expected {getattr(kind, '__name__', kind)}, got {value!r}"
        )
    return value


def _count(raw: Mapping[str, Any], key: str) -> int:
    value: int | float = _expect(raw, key, (int, float))
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError(f"field {key!r}: expected an integer, got {value!r}")
        value = int(value)
    return max(0, value)


def decode_record(data: str | bytes) -> OrchestratorRecord:
    """Parse a JSON record written by us or by the daemon.

    Unknown keys are ignored. Raises:
        ValueError: the text is not JSON or a field is missing or of the wrong type.
    """
    try:
        raw = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"not JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise ValueError("expected a JSON object")
    capabilities = _expect(raw, "capabilities", list)
    if not all(isinstance(item, str) for item in capabilities):
        raise ValueError("field 'capabilities': expected an array of strings")
    metadata = raw.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        raise ValueError(f"field 'metadata': expected an object, got {metadata!r}")
    endpoint = raw.get("endpoint")
    if endpoint is not None and not isinstance(endpoint, str):
        raise ValueError(f"field 'endpoint': expected a string, got {endpoint!r}")
    try:
        status = OrchestratorStatus(_expect(raw, "status", str))
        last_heartbeat = datetime.fromisoformat(_expect(raw, "lastHeartbeat", str))
        registered_at = datetime.fromisoformat(_expect(raw, "registeredAt", str))
    except ValueError as exc:
        raise ValueError(f"bad status or date: {exc}") from None
    return OrchestratorRecord(
        id=_expect(raw, "id", str),
        name=_expect(raw, "name", str),
        capabilities=capabilities,
        region=_expect(raw, "region", str),
        tier=_expect(raw, "tier", str),
        max_sessions=_count(raw, "maxSessions"),
        current_sessions=_count(raw, "currentSessions"),
        tokens_used=_count(raw, "tokensUsed"),
        token_limit=_count(raw, "tokenLimit"),
        status=status,
        last_heartbeat=last_heartbeat,
        registered_at=registered_at,
        metadata=metadata,
        endpoint=endpoint,
    )


# -- events ------------------------------------------------------------------------------


class RegistryEventType(enum.StrEnum):
    """What a :class:`RegistryEvent` reports (the daemon's ``orchestrator:*`` events)."""

    REGISTERED = "registered"
    DEREGISTERED = "deregistered"
    STATUS_CHANGED = "status_changed"
    UNHEALTHY = "unhealthy"
    STALE = "stale"


@attrs.frozen(kw_only=True)
class RegistryEvent:
    """One change seen by :meth:`FederationRegistry.watch`."""

    type: RegistryEventType
    """What happened."""
    orchestrator_id: str
    """Whose record changed."""
    record: OrchestratorRecord
    """The record as now seen (the last one seen, for ``deregistered`` and ``stale``)."""
    old_status: OrchestratorStatus | None = None
    """The status before (``status_changed`` only)."""
    new_status: OrchestratorStatus | None = None
    """The status after (``status_changed`` only)."""


def _unhealthy(record: OrchestratorRecord, now: datetime, heartbeat_timeout: float) -> bool:
    return (now - record.last_heartbeat).total_seconds() > heartbeat_timeout


def _diff(
    before: Mapping[str, OrchestratorRecord],
    after: Mapping[str, OrchestratorRecord],
    now: datetime,
    heartbeat_timeout: float,
) -> list[RegistryEvent]:
    """The events that turn snapshot ``before`` into snapshot ``after`` (pure)."""
    events: list[RegistryEvent] = []
    for orch_id, old in before.items():
        if orch_id not in after:
            kind = (
                RegistryEventType.STALE
                if _unhealthy(old, now, heartbeat_timeout)
                else RegistryEventType.DEREGISTERED
            )
            events.append(RegistryEvent(type=kind, orchestrator_id=orch_id, record=old))
    for orch_id, new in after.items():
        old_record = before.get(orch_id)
        if old_record is None or old_record.registered_at != new.registered_at:
            events.append(
                RegistryEvent(
                    type=RegistryEventType.REGISTERED, orchestrator_id=orch_id, record=new
                )
            )
            continue
        if old_record.status == new.status:
            continue
        if new.status is OrchestratorStatus.OFFLINE and _unhealthy(new, now, heartbeat_timeout):
            events.append(
                RegistryEvent(type=RegistryEventType.UNHEALTHY, orchestrator_id=orch_id, record=new)
            )
        events.append(
            RegistryEvent(
                type=RegistryEventType.STATUS_CHANGED,
                orchestrator_id=orch_id,
                record=new,
                old_status=old_record.status,
                new_status=new.status,
            )
        )
    return events


class RegistryWatch:
    """The stream of changes returned by :meth:`FederationRegistry.watch`.

    An async iterator of :class:`RegistryEvent`; also a (synchronous) context
    manager that ends the iteration when left. It holds no task and no
    queue: each time it runs out of events it waits for a local write to the
    registry or for ``watch_interval``, takes a snapshot and reports the
    difference from the previous one. The first snapshot reports every
    orchestrator already present as ``registered``.

    Changes that undo each other between two snapshots (register then
    deregister) may not be reported; the snapshot after them always is. Memory
    held is at most three events per orchestrator in the registry.
    """

    def __init__(self, registry: FederationRegistry) -> None:
        self._registry = registry
        self._known: dict[str, OrchestratorRecord] | None = None
        self._pending: collections.deque[RegistryEvent] = collections.deque()
        self._closed = False

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> RegistryEvent:
        """The next change: waits until there is one.

        Raises:
            StopAsyncIteration: after :meth:`close`.
            RegistryUnavailable: the store could not be read (the watch stays usable).
        """
        while not self._pending:
            if self._closed:
                raise StopAsyncIteration
            changed = self._registry._changed
            if self._known is not None:
                with trio.move_on_after(self._registry.watch_interval):
                    await changed.wait()
            else:
                await trio.lowlevel.checkpoint()
            if self._closed:
                raise StopAsyncIteration
            snapshot = {record.id: record for record in await self._registry.list_all()}
            now = self._registry.now()
            self._pending.extend(
                _diff(self._known or {}, snapshot, now, self._registry.heartbeat_timeout)
            )
            self._known = snapshot
        return self._pending.popleft()

    def close(self) -> None:
        """End the iteration: ``async for`` stops once pending events are consumed."""
        self._closed = True
        self._pending.clear()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


# -- the interface -----------------------------------------------------------------------


class FederationRegistry(abc.ABC):
    """Where orchestrators register and find each other: one interface, several backends.

    :class:`MemoryRegistry` is the in-process default; :class:`RedisRegistry`
    shares its records through Redis with other processes and with the
    TypeScript daemon. Both behave the same (they pass the same contract
    suite, :func:`trio_federation.testing.check_registry_backend`).

    Every read derives the status ``offline`` for an orchestrator that has not
    heartbeat within ``heartbeat_timeout`` (a later heartbeat brings it back);
    an orchestrator that has not heartbeat within ``stale_timeout`` is gone.
    Every operation is a checkpoint; a store that cannot be reached raises
    :exc:`RegistryUnavailable`. Results are sorted by id.

    Args:
        heartbeat_timeout: seconds without a heartbeat after which an
            orchestrator is unhealthy.
        stale_timeout: seconds without a heartbeat after which it disappears;
            must be longer than ``heartbeat_timeout``.
        watch_interval: seconds between the snapshots of :meth:`watch` when
            nothing was written locally (default: a quarter of
            ``heartbeat_timeout``, at most 1 s).

    Raises:
        ValueError: a timeout is not positive or ``stale_timeout`` is not
            longer than ``heartbeat_timeout``.
    """

    def __init__(
        self,
        *,
        heartbeat_timeout: float = DEFAULT_HEARTBEAT_TIMEOUT,
        stale_timeout: float = DEFAULT_STALE_TIMEOUT,
        watch_interval: float | None = None,
    ) -> None:
        if not heartbeat_timeout > 0 or not math.isfinite(heartbeat_timeout):
            raise ValueError(f"heartbeat_timeout must be > 0, got {heartbeat_timeout!r}")
        if not stale_timeout > heartbeat_timeout or not math.isfinite(stale_timeout):
            raise ValueError(
                f"stale_timeout ({stale_timeout!r}) must be longer than"
                f" heartbeat_timeout ({heartbeat_timeout!r})"
            )
        if watch_interval is None:
            watch_interval = min(1.0, heartbeat_timeout / 4)
        if not watch_interval > 0:
            raise ValueError(f"watch_interval must be > 0, got {watch_interval!r}")
        self.heartbeat_timeout = heartbeat_timeout
        """Seconds without a heartbeat after which an orchestrator is unhealthy."""
        self.stale_timeout = stale_timeout
        """Seconds without a heartbeat after which an orchestrator disappears."""
        self.watch_interval = watch_interval
        """Seconds between two snapshots of :meth:`watch` when nothing was written here."""
        self._changed = trio.Event()
        self._writes = 0

    @property
    def local_writes(self) -> int:
        """How many writes were made through this object so far.

        Registrations, deregistrations, status changes and heartbeats that
        change a status: what wakes :meth:`watch` at once. A reader that
        keeps what it read compares it to learn that its copy is stale
        without reading the store. Writes by other processes (or other
        registry objects on the same store) are not counted: re-read every
        ``watch_interval`` for those.
        """
        return self._writes

    # -- what a backend provides --

    @abc.abstractmethod
    def now(self) -> datetime:
        """The registry's clock (UTC, milliseconds), which heartbeats are stamped with."""

    @abc.abstractmethod
    async def register(self, record: OrchestratorRecord) -> OrchestratorRecord:
        """Register ``record`` (replacing any record with its id) and return it as stored.

        ``last_heartbeat`` is set to :meth:`now`; ``registered_at`` is kept
        from the record this one replaces (whoever wrote it, as the daemon
        keeps a given ``registeredAt``), else set to :meth:`now` — so it is
        the time of the first registration while the record lives, and a
        registration after the record expired or was deregistered is a new
        one. The record is indexed by its capabilities and region and lives
        for ``stale_timeout`` unless heartbeats keep it alive. Atomic: a
        concurrent reader sees the old record or the new one, never a mix.
        """

    @abc.abstractmethod
    async def deregister(self, orchestrator_id: str) -> bool:
        """Remove an orchestrator and its index entries.

        Returns:
            True if it was registered, False if there was nothing to remove.
        """

    @abc.abstractmethod
    async def heartbeat(
        self,
        orchestrator_id: str,
        *,
        current_sessions: int | None = None,
        tokens_used: int | None = None,
        status: OrchestratorStatus | str | None = None,
    ) -> OrchestratorRecord:
        """Record a heartbeat now, with fresh load figures, and return the record.

        Renews the record's lifetime. Without ``status``, a stored ``offline``
        or ``busy`` becomes ``online`` (as the daemon does); ``draining`` stays.
        Atomic against concurrent updates of the same record.

        Raises:
            OrchestratorNotFound: it is not registered (or already expired).
        """

    @abc.abstractmethod
    async def set_status(
        self, orchestrator_id: str, status: OrchestratorStatus | str
    ) -> OrchestratorRecord:
        """Store a new status (without renewing the record's lifetime) and return the record.

        Raises:
            OrchestratorNotFound: it is not registered (or already expired).
        """

    @abc.abstractmethod
    async def get(self, orchestrator_id: str) -> OrchestratorRecord | None:
        """One orchestrator's record, or None if it is not registered."""

    @abc.abstractmethod
    async def list_all(self) -> list[OrchestratorRecord]:
        """Every registered orchestrator."""

    async def aclose(self) -> None:
        """Release the backend's resources (the memory backend has none)."""
        await trio.lowlevel.checkpoint()

    # -- built on the above --

    async def query(self, query: OrchestratorQuery) -> list[OrchestratorRecord]:
        """The orchestrators that match every filter of ``query``.

        Backends may use their indexes; the result is the same as filtering
        :meth:`list_all` with :meth:`OrchestratorQuery.matches`.
        """
        return [record for record in await self.list_all() if query.matches(record)]

    async def healthy(self) -> list[OrchestratorRecord]:
        """The orchestrators that heartbeat within ``heartbeat_timeout`` and are not ``offline``."""
        return [r for r in await self.list_all() if r.status is not OrchestratorStatus.OFFLINE]

    async def metrics(self, orchestrator_id: str) -> OrchestratorMetrics | None:
        """Load and token utilisation and uptime of one orchestrator (None if unknown)."""
        record = await self.get(orchestrator_id)
        return None if record is None else _metrics(record, self.now())

    def watch(self) -> RegistryWatch:
        """A stream of changes: ``async for event in registry.watch():``.

        It starts with a ``registered`` event for every orchestrator present,
        then reports registrations, deregistrations, status changes and the
        orchestrators that turn unhealthy (``unhealthy``, then
        ``status_changed`` to ``offline``) or disappear without deregistering
        (``stale``), whoever wrote them (this process, another one, the
        TypeScript daemon). See :class:`RegistryWatch` for its guarantees. Use
        it as ``with registry.watch() as events:`` to stop it from another task.
        """
        return RegistryWatch(self)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    # -- helpers for backends --

    def _present(self, record: OrchestratorRecord, now: datetime) -> OrchestratorRecord:
        """``record`` as reads report it: ``offline`` once its heartbeat is too old."""
        if record.status is not OrchestratorStatus.OFFLINE and _unhealthy(
            record, now, self.heartbeat_timeout
        ):
            return attrs.evolve(record, status=OrchestratorStatus.OFFLINE)
        return record

    def _notify(self) -> None:
        """Wake the watches: something was written here."""
        self._writes += 1
        self._changed.set()
        self._changed = trio.Event()


def _heartbeat_status(
    stored: OrchestratorStatus, status: OrchestratorStatus | str | None
) -> OrchestratorStatus:
    if status is not None:
        return OrchestratorStatus(status)
    if stored in (OrchestratorStatus.OFFLINE, OrchestratorStatus.BUSY):
        return OrchestratorStatus.ONLINE
    return stored


def _beat(
    record: OrchestratorRecord,
    now: datetime,
    current_sessions: int | None,
    tokens_used: int | None,
    status: OrchestratorStatus | str | None,
) -> OrchestratorRecord:
    return attrs.evolve(
        record,
        last_heartbeat=now,
        current_sessions=record.current_sessions if current_sessions is None else current_sessions,
        tokens_used=record.tokens_used if tokens_used is None else tokens_used,
        status=_heartbeat_status(record.status, status),
    )


# -- the in-memory backend ---------------------------------------------------------------


class MemoryRegistry(FederationRegistry):
    """The embedded default: records in a dict of this process, no server.

    Its clock follows trio's (:func:`trio.current_time`) from the moment it is
    first used, so a :class:`trio.testing.MockClock` drives heartbeat and stale
    timeouts. An expired record is dropped when next looked at. Use it from
    one trio run. Arguments as :class:`FederationRegistry`, and:

    Args:
        max_orchestrators: the most records it holds (:exc:`RegistryFull` past it).
    """

    def __init__(
        self,
        *,
        heartbeat_timeout: float = DEFAULT_HEARTBEAT_TIMEOUT,
        stale_timeout: float = DEFAULT_STALE_TIMEOUT,
        watch_interval: float | None = None,
        max_orchestrators: int = MAX_MEMORY_ORCHESTRATORS,
    ) -> None:
        super().__init__(
            heartbeat_timeout=heartbeat_timeout,
            stale_timeout=stale_timeout,
            watch_interval=watch_interval,
        )
        self.max_orchestrators = max_orchestrators
        """The most records it holds."""
        self._records: dict[str, OrchestratorRecord] = {}
        self._anchor: tuple[datetime, float] | None = None

    def now(self) -> datetime:
        clock = trio.current_time()
        if self._anchor is None:
            self._anchor = (datetime.now(UTC), clock)
        wall, start = self._anchor
        return _utc_ms(wall + timedelta(seconds=clock - start))

    def _live(self, orchestrator_id: str, now: datetime) -> OrchestratorRecord | None:
        record = self._records.get(orchestrator_id)
        if record is None:
            return None
        if (now - record.last_heartbeat).total_seconds() >= self.stale_timeout:
            del self._records[orchestrator_id]
            logger.info(
                "orchestrator %r expired (no heartbeat for %gs)", record.id, self.stale_timeout
            )
            return None
        return record

    async def register(self, record: OrchestratorRecord) -> OrchestratorRecord:
        await trio.lowlevel.checkpoint()
        now = self.now()
        if self._live(record.id, now) is None and len(self._records) >= self.max_orchestrators:
            for orch_id in list(self._records):
                self._live(orch_id, now)
            if len(self._records) >= self.max_orchestrators:
                raise RegistryFull(self.max_orchestrators)
        previous = self._live(record.id, now)
        registered_at = now if previous is None else previous.registered_at
        stored = attrs.evolve(record, last_heartbeat=now, registered_at=registered_at)
        self._records[record.id] = stored
        self._notify()
        logger.debug("registered %r", record.id)
        return stored

    async def deregister(self, orchestrator_id: str) -> bool:
        await trio.lowlevel.checkpoint()
        found = self._live(orchestrator_id, self.now()) is not None
        if found:
            del self._records[orchestrator_id]
            self._notify()
            logger.debug("deregistered %r", orchestrator_id)
        return found

    def _existing(self, orchestrator_id: str, now: datetime) -> OrchestratorRecord:
        record = self._live(orchestrator_id, now)
        if record is None:
            raise OrchestratorNotFound(orchestrator_id)
        return record

    async def heartbeat(
        self,
        orchestrator_id: str,
        *,
        current_sessions: int | None = None,
        tokens_used: int | None = None,
        status: OrchestratorStatus | str | None = None,
    ) -> OrchestratorRecord:
        await trio.lowlevel.checkpoint()
        now = self.now()
        record = self._existing(orchestrator_id, now)
        stored = _beat(record, now, current_sessions, tokens_used, status)
        self._records[orchestrator_id] = stored
        if stored.status != self._present(record, now).status:
            self._notify()
        return stored

    async def set_status(
        self, orchestrator_id: str, status: OrchestratorStatus | str
    ) -> OrchestratorRecord:
        await trio.lowlevel.checkpoint()
        now = self.now()
        record = self._existing(orchestrator_id, now)
        stored = attrs.evolve(record, status=status)
        self._records[orchestrator_id] = stored
        self._notify()
        return self._present(stored, now)

    async def get(self, orchestrator_id: str) -> OrchestratorRecord | None:
        await trio.lowlevel.checkpoint()
        now = self.now()
        record = self._live(orchestrator_id, now)
        return None if record is None else self._present(record, now)

    async def list_all(self) -> list[OrchestratorRecord]:
        await trio.lowlevel.checkpoint()
        now = self.now()
        live = (self._live(orch_id, now) for orch_id in sorted(self._records))
        return [self._present(record, now) for record in live if record is not None]


# -- choosing a backend by URL -----------------------------------------------------------


@contextlib.asynccontextmanager
async def open_registry(
    url: str = "memory://",
    *,
    heartbeat_timeout: float = DEFAULT_HEARTBEAT_TIMEOUT,
    stale_timeout: float = DEFAULT_STALE_TIMEOUT,
    watch_interval: float | None = None,
    key_prefix: str | None = None,
    connect_timeout: float | None = None,
    stream_timeout: float | None = None,
) -> AsyncIterator[FederationRegistry]:
    """Open the registry a URL names: moving to Redis is a change of configuration.

    ``memory://`` gives a :class:`MemoryRegistry`; ``redis://``, ``rediss://``
    (TLS) and ``unix://`` give a :class:`RedisRegistry` through
    :func:`open_redis_registry` (the ``redis`` extra), which takes
    ``key_prefix`` and the two Redis time-outs; the memory backend ignores
    them. Entering connects (Redis) and raises :exc:`RegistryUnavailable` if
    the server cannot be reached; leaving closes the connections. Records
    written stay in Redis until they expire.

    Raises:
        ValueError: the URL's scheme is none of these.
    """
    scheme = url.partition("://")[0].lower()
    timeouts: dict[str, Any] = {
        "heartbeat_timeout": heartbeat_timeout,
        "stale_timeout": stale_timeout,
        "watch_interval": watch_interval,
    }
    if scheme == "memory":
        async with MemoryRegistry(**timeouts) as registry:
            yield registry
    elif scheme in ("redis", "rediss", "unix"):
        from ._redis_registry import DEFAULT_KEY_PREFIX, open_redis_registry

        redis_options: dict[str, Any] = {
            "key_prefix": DEFAULT_KEY_PREFIX if key_prefix is None else key_prefix
        }
        if connect_timeout is not None:
            redis_options["connect_timeout"] = connect_timeout
        if stream_timeout is not None:
            redis_options["stream_timeout"] = stream_timeout
        async with open_redis_registry(url, **timeouts, **redis_options) as redis_registry:
            yield redis_registry
    else:
        raise ValueError(
            f"unknown registry URL scheme {scheme!r} in {url!r}"
            " (use memory://, redis://, rediss:// or unix://)"
        )


# -- self-registration -------------------------------------------------------------------


class Registration:
    """A live self-registration, yielded by :func:`open_registration`."""

    def __init__(
        self,
        registry: FederationRegistry,
        record: OrchestratorRecord,
        sessions: Callable[[], int] | None,
        tokens: Callable[[], int] | None,
    ) -> None:
        self.registry = registry
        """The registry it is registered in."""
        self._record = record
        self._sessions = sessions
        self._tokens = tokens
        self._draining = False

    @property
    def record(self) -> OrchestratorRecord:
        """The record as last written by this registration."""
        return self._record

    def _figures(self) -> tuple[int | None, int | None, OrchestratorStatus]:
        sessions = None if self._sessions is None else self._sessions()
        tokens = None if self._tokens is None else self._tokens()
        if self._draining:
            status = OrchestratorStatus.DRAINING
        elif (
            sessions is not None
            and self._record.max_sessions > 0
            and sessions >= self._record.max_sessions
        ):
            status = OrchestratorStatus.BUSY
        else:
            status = OrchestratorStatus.ONLINE
        return sessions, tokens, status

    async def heartbeat(self) -> OrchestratorRecord:
        """Heartbeat now with live figures (registering again if the record expired).

        Raises:
            RegistryUnavailable: the store cannot be reached.
        """
        sessions, tokens, status = self._figures()
        try:
            self._record = await self.registry.heartbeat(
                self._record.id, current_sessions=sessions, tokens_used=tokens, status=status
            )
        except OrchestratorNotFound:
            logger.warning("record of %r had expired; registering again", self._record.id)
            self._record = await self.registry.register(
                attrs.evolve(
                    self._record,
                    current_sessions=self._record.current_sessions
                    if sessions is None
                    else sessions,
                    tokens_used=self._record.tokens_used if tokens is None else tokens,
                    status=status,
                )
            )
        return self._record

    async def drain(self) -> None:
        """Mark this orchestrator ``draining`` (peers stop choosing it); it stays registered.

        Raises:
            RegistryUnavailable: the store cannot be reached.
        """
        self._draining = True
        await self.heartbeat()


def _raise_single(group: BaseExceptionGroup[BaseException]) -> None:
    """Re-raise the one exception of ``group`` that is not ``Cancelled``, as itself."""
    errors = [e for e in group.exceptions if not isinstance(e, trio.Cancelled)]
    if len(errors) != 1:
        raise group
    error = errors[0]
    context = error.__context__
    try:
        raise error
    finally:
        error.__context__ = context
        del error, context


@contextlib.asynccontextmanager
async def open_registration(
    registry: FederationRegistry,
    record: OrchestratorRecord,
    *,
    listener: FederationListener | None = None,
    host: str | None = None,
    heartbeat_interval: float | None = None,
    tokens_used: Callable[[], int] | None = None,
    cleanup_timeout: float = DEFAULT_CLEANUP_TIMEOUT,
    sessions: Callable[[], int] | None = None,
) -> AsyncIterator[Registration]:
    """Register this orchestrator, keep its record fresh, and leave cleanly.

    On entry it registers ``record`` (failures raise here). With a
    ``listener`` (from :func:`~trio_federation.serve_federation`), the record
    takes the listener's capabilities when it names none, its
    ``current_sessions`` is the number of the listener's live connections, and
    when ``record.endpoint`` is None and ``host`` is given the endpoint becomes
    ``ws://{host}:{listener.port}/federation``. While the block runs, a
    background task heartbeats every ``heartbeat_interval`` seconds (default:
    a third of the registry's ``heartbeat_timeout``) with the live figures
    (``tokens_used()`` if given); the status is ``busy`` while the sessions
    reach ``max_sessions``, else ``online``, or ``draining`` after
    :meth:`Registration.drain`. An unreachable store is logged and retried at
    the next beat; an expired record is registered again. ``sessions()``, if
    given, is the live ``current_sessions`` figure instead of the listener's
    connection count (a federation node reports the tasks it runs).

    On leaving the block — normally, by an exception or by cancellation — it
    marks the record ``draining`` and deregisters it, shielded and within
    ``cleanup_timeout`` seconds (failures are logged, not raised: the record
    then expires after ``stale_timeout``). A process that crashes leaves its
    record to expire the same way.

    Raises:
        ValueError: ``host`` is given without a ``listener``.
        RegistryUnavailable: the first registration failed.
    """
    if host is not None and listener is None:
        raise ValueError("host= needs a listener= to take the port from")
    if listener is not None:
        bound = listener
        if sessions is None:
            sessions = lambda: len(bound.connections)  # noqa: E731
        if not record.capabilities:
            record = attrs.evolve(record, capabilities=listener.capabilities)
        if record.endpoint is None and host is not None:
            record = attrs.evolve(record, endpoint=f"ws://{host}:{listener.port}/federation")
    if sessions is not None:
        record = attrs.evolve(record, current_sessions=sessions())
    if heartbeat_interval is None:
        heartbeat_interval = registry.heartbeat_timeout / 3
    registration = Registration(registry, record, sessions, tokens_used)
    registration._record = await registry.register(record)
    logger.info("registered %r at %s", record.id, record.endpoint)

    async def beat() -> None:
        while True:
            await trio.sleep(heartbeat_interval)
            try:
                await registration.heartbeat()
            except RegistryUnavailable as exc:
                logger.warning("heartbeat of %r failed: %s", record.id, exc)

    try:
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(beat)
                try:
                    yield registration
                finally:
                    nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            _raise_single(group)
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(cleanup_timeout) as cleanup:
            try:
                with contextlib.suppress(OrchestratorNotFound):
                    await registry.set_status(record.id, OrchestratorStatus.DRAINING)
                await registry.deregister(record.id)
                logger.info("deregistered %r", record.id)
            except RegistryUnavailable as exc:
                logger.warning("could not deregister %r (it will expire): %s", record.id, exc)
        if cleanup.cancelled_caught:
            logger.warning(
                "deregistering %r took over %gs; its record will expire", record.id, cleanup_timeout
            )
