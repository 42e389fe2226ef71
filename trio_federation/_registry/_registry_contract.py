"""The contract suite every :class:`~trio_federation.FederationRegistry` backend passes.

Re-exported by :mod:`trio_federation.testing`. Each check is a plain async
function taking the backend's factory, so it runs under any test runner; the
checks use only the public interface.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from datetime import timedelta
from typing import Final, Protocol, TypeVar

import trio

from ._registry import (
    FederationRegistry,
    OrchestratorNotFound,
    OrchestratorQuery,
    OrchestratorRecord,
    OrchestratorStatus,
    RegistryEvent,
    RegistryEventType,
    RegistryWatch,
)

__all__ = [
    "CONTRACT_HEARTBEAT_TIMEOUT",
    "CONTRACT_STALE_TIMEOUT",
    "REGISTRY_CHECKS",
    "RegistryFactory",
    "check_registry_backend",
]

CONTRACT_HEARTBEAT_TIMEOUT: Final = 0.5
"""The ``heartbeat_timeout`` (seconds) the checks ask their factory for."""
CONTRACT_STALE_TIMEOUT: Final = 1.0
"""The ``stale_timeout`` (seconds) the checks ask their factory for."""
_EVENT_TIMEOUT: Final = 5.0
_E = TypeVar("_E", bound=BaseException)

ONLINE, OFFLINE, BUSY, DRAINING = (
    OrchestratorStatus.ONLINE,
    OrchestratorStatus.OFFLINE,
    OrchestratorStatus.BUSY,
    OrchestratorStatus.DRAINING,
)


class RegistryFactory(Protocol):
    """Opens a fresh, empty registry of the backend under test.

    Called as ``open_backend(heartbeat_timeout=..., stale_timeout=...)``; it
    must pass both to the registry (and may choose the other settings), and
    return an async context manager that yields the registry and cleans up
    after it. Every call gives a registry that shares nothing with earlier ones.
    """

    def __call__(
        self, *, heartbeat_timeout: float, stale_timeout: float
    ) -> AbstractAsyncContextManager[FederationRegistry]: ...  # pragma: no cover


def _open(open_backend: RegistryFactory) -> AbstractAsyncContextManager[FederationRegistry]:
    return open_backend(
        heartbeat_timeout=CONTRACT_HEARTBEAT_TIMEOUT, stale_timeout=CONTRACT_STALE_TIMEOUT
    )


def _record(orch_id: str, **fields: object) -> OrchestratorRecord:
    base: dict[str, object] = {
        "capabilities": ["code-generation", "testing"],
        "region": "eu-west",
        "max_sessions": 10,
        "token_limit": 1000,
        "endpoint": f"ws://127.0.0.1:9/{orch_id}",
    }
    base.update(fields)
    return OrchestratorRecord(id=orch_id, **base)  # type: ignore[arg-type]


def _ids(records: list[OrchestratorRecord]) -> list[str]:
    return [record.id for record in records]


async def _raises(kind: type[_E], operation: Awaitable[object]) -> _E:
    """The ``kind`` exception that ``operation`` raises (AssertionError if it does not)."""
    try:
        await operation
    except kind as exc:
        return exc
    raise AssertionError(f"expected {kind.__name__}, nothing was raised")


async def _next(events: RegistryWatch) -> RegistryEvent:
    with trio.fail_after(_EVENT_TIMEOUT):
        return await events.__anext__()


# -- the checks --------------------------------------------------------------------------


async def check_register_and_get(open_backend: RegistryFactory) -> None:
    """A registered record reads back field for field, stamped by the registry's clock."""
    async with _open(open_backend) as registry:
        assert await registry.get("orch-a") is None
        before = registry.now()
        given = _record(
            "orch-a",
            name="Orchestrator Ä",
            tier="premium",
            current_sessions=2,
            tokens_used=10,
            metadata={"owner": "team-1", "nested": {"n": [1, 2.5, None, True]}},
        )
        stored = await registry.register(given)
        assert before <= stored.registered_at == stored.last_heartbeat <= registry.now()
        assert stored == OrchestratorRecord(
            id="orch-a",
            name="Orchestrator Ä",
            capabilities=("code-generation", "testing"),
            region="eu-west",
            tier="premium",
            max_sessions=10,
            current_sessions=2,
            tokens_used=10,
            token_limit=1000,
            status=ONLINE,
            last_heartbeat=stored.last_heartbeat,
            registered_at=stored.registered_at,
            metadata={"owner": "team-1", "nested": {"n": [1, 2.5, None, True]}},
            endpoint="ws://127.0.0.1:9/orch-a",
        )
        assert await registry.get("orch-a") == stored
        minimal = await registry.register(OrchestratorRecord(id="orch-b"))
        got = await registry.get("orch-b")
        assert got == minimal
        assert got.metadata is None
        assert got.endpoint is None
        assert got.name == "orch-b"


async def check_register_again_replaces(open_backend: RegistryFactory) -> None:
    """Registering an id again replaces its record and its index entries, not ``registered_at``."""
    async with _open(open_backend) as registry:
        await registry.register(_record("orch-a", capabilities=["research"], region="us"))
        first = await registry.get("orch-a")
        assert first is not None
        await trio.sleep(0.01)
        again = await registry.register(_record("orch-a", capabilities=["testing"], region="eu"))
        assert again.registered_at == first.registered_at
        assert again.last_heartbeat > first.last_heartbeat
        assert await registry.get("orch-a") == again
        assert await registry.query(OrchestratorQuery(capabilities=["research"])) == []
        assert await registry.query(OrchestratorQuery(region="us")) == []
        assert await registry.query(OrchestratorQuery(capabilities=["testing"])) == [again]
        assert await registry.query(OrchestratorQuery(region="eu")) == [again]
        assert await registry.list_all() == [again]


async def check_deregister(open_backend: RegistryFactory) -> None:
    """Deregistering removes the record and every index entry; twice is harmless."""
    async with _open(open_backend) as registry:
        await registry.register(_record("orch-a"))
        kept = await registry.register(_record("orch-b"))
        assert await registry.deregister("orch-a") is True
        assert await registry.get("orch-a") is None
        assert await registry.list_all() == [kept]
        assert await registry.query(OrchestratorQuery(capabilities=["testing"])) == [kept]
        assert await registry.query(OrchestratorQuery(region="eu-west")) == [kept]
        assert await registry.metrics("orch-a") is None
        assert await registry.deregister("orch-a") is False
        assert await registry.deregister("never") is False


async def check_heartbeat(open_backend: RegistryFactory) -> None:
    """A heartbeat stamps the time, takes fresh figures and follows the daemon's status rule."""
    async with _open(open_backend) as registry:
        stored = await registry.register(_record("orch-a", current_sessions=1, tokens_used=5))
        await trio.sleep(0.05)
        beat = await registry.heartbeat("orch-a", current_sessions=4)
        assert beat.last_heartbeat > stored.last_heartbeat
        assert beat.registered_at == stored.registered_at
        assert (beat.current_sessions, beat.tokens_used) == (4, 5)
        beat = await registry.heartbeat("orch-a", tokens_used=50)
        assert (beat.current_sessions, beat.tokens_used) == (4, 50)
        assert await registry.get("orch-a") == beat
        for stored_status, after in [(OFFLINE, ONLINE), (BUSY, ONLINE), (DRAINING, DRAINING)]:
            await registry.set_status("orch-a", stored_status)
            assert (await registry.heartbeat("orch-a")).status == after
        assert (await registry.heartbeat("orch-a", status="busy")).status == BUSY
        assert (await registry.get("orch-a")).status == BUSY  # type: ignore[union-attr]
        missing = await _raises(OrchestratorNotFound, registry.heartbeat("nobody"))
        assert missing.orchestrator_id == "nobody"


async def check_set_status(open_backend: RegistryFactory) -> None:
    """``set_status`` stores a status (not a heartbeat); an unknown id raises."""
    async with _open(open_backend) as registry:
        stored = await registry.register(_record("orch-a"))
        for status in (DRAINING, BUSY, OFFLINE, ONLINE):
            updated = await registry.set_status("orch-a", status)
            assert updated.status == status
            assert updated.last_heartbeat == stored.last_heartbeat
            assert (await registry.get("orch-a")) == updated
        missing = await _raises(OrchestratorNotFound, registry.set_status("nobody", "draining"))
        assert missing.orchestrator_id == "nobody"


async def check_list_all(open_backend: RegistryFactory) -> None:
    """``list_all`` returns every orchestrator, sorted by id."""
    async with _open(open_backend) as registry:
        assert await registry.list_all() == []
        for orch_id in ("orch-c", "orch-a", "orch-b"):
            await registry.register(_record(orch_id, capabilities=[], region=orch_id))
        assert _ids(await registry.list_all()) == ["orch-a", "orch-b", "orch-c"]
        assert _ids(await registry.query(OrchestratorQuery())) == ["orch-a", "orch-b", "orch-c"]


async def check_query_filters(open_backend: RegistryFactory) -> None:
    """Every query filter, alone and combined; all required capabilities must match."""
    async with _open(open_backend) as registry:
        await registry.register(
            _record("a", capabilities=["code-generation", "testing"], region="eu", max_sessions=4)
        )
        await registry.register(_record("b", capabilities=["testing"], region="us", token_limit=10))
        await registry.register(
            _record("c", capabilities=["research", "testing", "code-generation"], region="eu")
        )
        await registry.register(_record("d", capabilities=["research"], region="us"))
        await registry.heartbeat("a", current_sessions=3, tokens_used=100)
        await registry.set_status("c", BUSY)
        await registry.set_status("d", DRAINING)

        async def ids(**filters: object) -> list[str]:
            return _ids(await registry.query(OrchestratorQuery(**filters)))  # type: ignore[arg-type]

        assert await ids() == ["a", "b", "c", "d"]
        assert await ids(capabilities=["testing"]) == ["a", "b", "c"]
        assert await ids(capabilities=["testing", "code-generation"]) == ["a", "c"]
        assert await ids(capabilities=["research", "code-generation", "testing"]) == ["c"]
        assert await ids(capabilities=["testing", "testing"]) == ["a", "b", "c"]
        assert await ids(capabilities=["security"]) == []
        assert await ids(capabilities=["testing", "security"]) == []
        assert await ids(region="eu") == ["a", "c"]
        assert await ids(region="nowhere") == []
        assert await ids(capabilities=["research"], region="us") == ["d"]
        assert await ids(statuses=["online"]) == ["a", "b"]
        assert await ids(statuses=["busy", "draining"]) == ["c", "d"]
        assert await ids(statuses=[]) == []
        # a: 4 - 3 = 1 session free, 1000 - 100 = 900 tokens; b: 10 sessions, 10 tokens.
        assert await ids(min_available_sessions=1) == ["a", "b", "c", "d"]
        assert await ids(min_available_sessions=2) == ["b", "c", "d"]
        assert await ids(min_available_tokens=901) == ["c", "d"]
        assert await ids(min_available_tokens=900) == ["a", "c", "d"]
        assert await ids(min_available_tokens=11) == ["a", "c", "d"]
        assert await ids(
            capabilities=["testing"],
            region="eu",
            statuses=["online", "busy"],
            min_available_sessions=2,
        ) == ["c"]
        query = OrchestratorQuery(capabilities=["testing"], min_available_tokens=500)
        assert await registry.query(query) == [
            record for record in await registry.list_all() if query.matches(record)
        ]


async def check_healthy_and_metrics(open_backend: RegistryFactory) -> None:
    """``healthy`` leaves out ``offline`` ones; metrics compute load, utilisation and uptime."""
    async with _open(open_backend) as registry:
        await registry.register(_record("a", max_sessions=4, token_limit=1000))
        await registry.register(_record("b", max_sessions=0, token_limit=0))
        await registry.register(_record("c"))
        await registry.heartbeat("a", current_sessions=3, tokens_used=250)
        await registry.set_status("c", OFFLINE)
        await registry.set_status("b", DRAINING)
        assert _ids(await registry.healthy()) == ["a", "b"]
        await trio.sleep(0.1)
        metrics = await registry.metrics("a")
        assert metrics is not None
        assert (metrics.id, metrics.load, metrics.token_utilization) == ("a", 0.75, 0.25)
        assert (metrics.sessions, metrics.tokens_used, metrics.token_limit) == (3, 250, 1000)
        assert metrics.status == ONLINE
        record = await registry.get("a")
        assert record is not None
        assert metrics.last_heartbeat == record.last_heartbeat
        assert 0.1 <= metrics.uptime < CONTRACT_HEARTBEAT_TIMEOUT
        empty = await registry.metrics("b")
        assert empty is not None
        assert (empty.load, empty.token_utilization, empty.status) == (0.0, 0.0, DRAINING)
        assert await registry.metrics("nobody") is None


async def check_unhealthy_after_heartbeat_timeout(open_backend: RegistryFactory) -> None:
    """Without heartbeats an orchestrator reads as ``offline`` until it heartbeats again."""
    hb = CONTRACT_HEARTBEAT_TIMEOUT
    async with _open(open_backend) as registry:
        await registry.register(_record("quiet"))
        await registry.register(_record("busy-one"))
        await registry.set_status("busy-one", BUSY)
        await trio.sleep(hb * 0.4)
        assert _ids(await registry.healthy()) == ["busy-one", "quiet"]
        assert (await registry.get("quiet")).status == ONLINE  # type: ignore[union-attr]
        await trio.sleep(hb * 0.8)
        for orch_id in ("quiet", "busy-one"):
            record = await registry.get(orch_id)
            assert record is not None
            assert record.status == OFFLINE, record
        assert await registry.healthy() == []
        assert _ids(await registry.query(OrchestratorQuery(statuses=["offline"]))) == [
            "busy-one",
            "quiet",
        ]
        assert await registry.query(OrchestratorQuery(statuses=["online", "busy"])) == []
        assert (await registry.metrics("quiet")).status == OFFLINE  # type: ignore[union-attr]
        assert (await registry.heartbeat("quiet")).status == ONLINE
        assert _ids(await registry.healthy()) == ["quiet"]
        assert (await registry.get("quiet")).status == ONLINE  # type: ignore[union-attr]


async def check_stale_orchestrators_disappear(open_backend: RegistryFactory) -> None:
    """Without heartbeats an orchestrator is gone after ``stale_timeout``, from every read."""
    hb, stale = CONTRACT_HEARTBEAT_TIMEOUT, CONTRACT_STALE_TIMEOUT
    async with _open(open_backend) as registry:
        await registry.register(_record("dead", capabilities=["testing"], region="r1"))
        alive = await registry.register(_record("alive", capabilities=["testing"], region="r1"))
        waited = 0.0
        while waited < stale + 0.4:
            await trio.sleep(hb / 3)
            waited += hb / 3
            alive = await registry.heartbeat("alive")
        assert await registry.get("dead") is None
        assert await registry.list_all() == [alive]
        assert await registry.query(OrchestratorQuery(capabilities=["testing"])) == [alive]
        assert await registry.query(OrchestratorQuery(region="r1")) == [alive]
        assert await registry.healthy() == [alive]
        assert await registry.metrics("dead") is None
        assert await registry.deregister("dead") is False
        await _raises(OrchestratorNotFound, registry.heartbeat("dead"))
        # It may come back by registering again.
        back = await registry.register(_record("dead", capabilities=["testing"], region="r1"))
        assert _ids(await registry.query(OrchestratorQuery(capabilities=["testing"]))) == [
            "alive",
            "dead",
        ]
        assert back.registered_at > alive.registered_at + timedelta(seconds=stale)


async def check_watch(open_backend: RegistryFactory) -> None:
    """The watch stream: present ones, then every kind of change, in order."""
    async with _open(open_backend) as registry:
        first = await registry.register(_record("a"))
        with registry.watch() as events:
            event = await _next(events)
            assert (event.type, event.orchestrator_id, event.record) == ("registered", "a", first)
            b = await registry.register(_record("b"))
            event = await _next(events)
            assert (event.type, event.orchestrator_id, event.record) == ("registered", "b", b)
            await registry.heartbeat("b")
            await registry.set_status("b", BUSY)
            event = await _next(events)
            assert (event.type, event.orchestrator_id) == ("status_changed", "b")
            assert (event.old_status, event.new_status) == (ONLINE, BUSY)
            assert event.record.status == BUSY
            await registry.deregister("b")
            event = await _next(events)
            assert (event.type, event.orchestrator_id) == ("deregistered", "b")
            # "a" never heartbeats: unhealthy, then stale.
            event = await _next(events)
            assert (event.type, event.orchestrator_id) == ("unhealthy", "a")
            assert event.record.status == OFFLINE
            event = await _next(events)
            assert (event.type, event.orchestrator_id) == ("status_changed", "a")
            assert (event.old_status, event.new_status) == (ONLINE, OFFLINE)
            event = await _next(events)
            assert (event.type, event.orchestrator_id) == ("stale", "a")
            assert event.record.last_heartbeat == first.last_heartbeat
        # Left: the stream has ended.
        try:
            await _next(events)
        except StopAsyncIteration:
            pass
        else:
            raise AssertionError("a closed watch still produced an event")


async def check_watch_from_another_task(open_backend: RegistryFactory) -> None:
    """``async for`` over a watch in one task sees writes from another, and ends on close."""
    async with _open(open_backend) as registry:
        seen: list[tuple[str, str]] = []
        watch = registry.watch()
        send, receive = trio.open_memory_channel[None](0)

        async def consume() -> None:
            async for event in watch:
                seen.append((event.type, event.orchestrator_id))
                if len(seen) == 3:
                    watch.close()
                await send.send(None)

        with trio.fail_after(_EVENT_TIMEOUT):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(consume)
                await registry.register(_record("x"))
                await receive.receive()
                await registry.register(_record("y"))
                await receive.receive()
                await registry.deregister("x")
                await receive.receive()
        assert seen == [
            (RegistryEventType.REGISTERED, "x"),
            (RegistryEventType.REGISTERED, "y"),
            (RegistryEventType.DEREGISTERED, "x"),
        ]


async def check_concurrent_writers(open_backend: RegistryFactory) -> None:
    """Concurrent updates never leave a half-written record or a wrong index entry."""
    writers = 20
    async with _open(open_backend) as registry:
        await registry.register(_record("shared"))

        async def beat(i: int) -> None:
            # Sessions and tokens are written together: a mix would break tokens == 10 * sessions.
            await registry.heartbeat("shared", current_sessions=i, tokens_used=10 * i)
            await registry.set_status("shared", BUSY if i % 2 else DRAINING)

        async def reregister(i: int) -> None:
            caps, region = (["research"], "odd") if i % 2 else (["testing", "security"], "even")
            await registry.register(_record("moving", capabilities=caps, region=region))

        async def newcomer(i: int) -> None:
            await registry.register(_record(f"new-{i:02d}", capabilities=["analysis"]))

        async with trio.open_nursery() as nursery:
            for i in range(1, writers + 1):
                nursery.start_soon(beat, i)
                nursery.start_soon(reregister, i)
                nursery.start_soon(newcomer, i)

        shared = await registry.get("shared")
        assert shared is not None
        assert 1 <= shared.current_sessions <= writers
        assert shared.tokens_used == 10 * shared.current_sessions
        assert shared.status in (BUSY, DRAINING)
        moving = await registry.get("moving")
        assert moving is not None
        odd = moving.region == "odd"
        assert moving.capabilities == (("research",) if odd else ("testing", "security"))
        found = [
            "moving" in _ids(await registry.query(query))
            for query in (
                OrchestratorQuery(capabilities=["research"]),
                OrchestratorQuery(capabilities=["security"]),
                OrchestratorQuery(region="odd"),
                OrchestratorQuery(region="even"),
            )
        ]
        assert found == [odd, not odd, odd, not odd]
        newcomers = await registry.query(OrchestratorQuery(capabilities=["analysis"]))
        assert _ids(newcomers) == [f"new-{i:02d}" for i in range(1, writers + 1)]


async def check_settings_are_validated(open_backend: RegistryFactory) -> None:
    """A ``stale_timeout`` not longer than ``heartbeat_timeout`` is refused."""

    async def enter() -> None:
        async with open_backend(heartbeat_timeout=1.0, stale_timeout=1.0):
            pass  # pragma: no cover

    error = await _raises(ValueError, enter())
    assert "stale_timeout" in str(error)


RegistryCheck = Callable[[RegistryFactory], Awaitable[None]]

REGISTRY_CHECKS: Final[tuple[RegistryCheck, ...]] = (
    check_register_and_get,
    check_register_again_replaces,
    check_deregister,
    check_heartbeat,
    check_set_status,
    check_list_all,
    check_query_filters,
    check_healthy_and_metrics,
    check_unhealthy_after_heartbeat_timeout,
    check_stale_orchestrators_disappear,
    check_watch,
    check_watch_from_another_task,
    check_concurrent_writers,
    check_settings_are_validated,
)
"""Every check of the contract, each an ``async def check(open_backend)``.

Parametrize your tests over it to see each check's result on its own
(``@pytest.mark.parametrize("check", REGISTRY_CHECKS, ids=lambda c: c.__name__)``).
"""


async def check_registry_backend(open_backend: RegistryFactory) -> None:
    """Run the whole registry contract against a backend; raise on the first failure.

    ``open_backend(heartbeat_timeout=..., stale_timeout=...)`` must open a
    fresh, empty registry (see :class:`RegistryFactory`). The checks sleep with
    :func:`trio.sleep` through timeouts of :data:`CONTRACT_HEARTBEAT_TIMEOUT`
    and :data:`CONTRACT_STALE_TIMEOUT` seconds: run them under
    :class:`trio.testing.MockClock` (``autojump_threshold=0``) when the
    backend's clock follows trio's, in real time (a few seconds) otherwise.

    Raises:
        AssertionError: the backend broke the contract (the message says where).
    """
    for check in REGISTRY_CHECKS:
        await check(open_backend)
