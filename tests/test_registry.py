"""The registry: the contract suite on the memory backend, under MockClock, and the pure parts."""

from __future__ import annotations

import copy
import pickle
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any

import pytest
import trio
import trio.testing

from trio_federation import (
    FederationError,
    FederationRegistry,
    MemoryRegistry,
    OrchestratorConnection,
    OrchestratorNotFound,
    OrchestratorQuery,
    OrchestratorRecord,
    OrchestratorStatus,
    RegistryEventType,
    RegistryFull,
    RegistryUnavailable,
    open_orchestrator_connection,
    open_registration,
    open_registry,
    serve_federation,
)
from trio_federation._registry._registry import _diff, decode_record, encode_record
from trio_federation.testing import REGISTRY_CHECKS, RegistryFactory, check_registry_backend


@asynccontextmanager
async def open_memory(
    *, heartbeat_timeout: float, stale_timeout: float
) -> AsyncIterator[FederationRegistry]:
    async with MemoryRegistry(
        heartbeat_timeout=heartbeat_timeout, stale_timeout=stale_timeout
    ) as registry:
        yield registry


def test_the_factory_matches_the_protocol() -> None:
    factory: RegistryFactory = open_memory
    assert factory is open_memory


@pytest.mark.parametrize("check", REGISTRY_CHECKS, ids=lambda check: check.__name__)
async def test_memory_contract(check: object, autojump_clock: trio.testing.MockClock) -> None:
    await check(open_memory)  # type: ignore[operator]


async def test_memory_whole_contract(autojump_clock: trio.testing.MockClock) -> None:
    start = trio.current_time()
    await check_registry_backend(open_memory)
    assert trio.current_time() - start > 3  # virtual seconds: the timeouts really elapsed


# -- records and queries -----------------------------------------------------------------


def test_record_defaults_and_validation() -> None:
    record = OrchestratorRecord(id="orch-a", capabilities=["testing"], status="busy")
    assert record.name == "orch-a"
    assert record.capabilities == ("testing",)
    assert record.status is OrchestratorStatus.BUSY
    assert record.last_heartbeat.tzinfo is UTC
    assert record.last_heartbeat.microsecond % 1000 == 0
    naive = OrchestratorRecord(id="x", last_heartbeat=datetime(2026, 1, 1, 12, 0, 0, 123456))
    assert naive.last_heartbeat == datetime(2026, 1, 1, 12, 0, 0, 123000, tzinfo=UTC)
    with pytest.raises(ValueError, match="max_sessions must be >= 0"):
        OrchestratorRecord(id="x", max_sessions=-1)
    with pytest.raises(ValueError, match="'sleeping' is not a valid"):
        OrchestratorRecord(id="x", status="sleeping")
    with pytest.raises(TypeError, match="not one string"):
        OrchestratorRecord(id="x", capabilities="testing")
    assert OrchestratorRecord(id="x", max_sessions=2, current_sessions=5).available_sessions == -3
    assert OrchestratorRecord(id="x", token_limit=5, tokens_used=2).available_tokens == 3


def test_query_validation() -> None:
    assert OrchestratorQuery(statuses=["online"]).statuses == (OrchestratorStatus.ONLINE,)
    with pytest.raises(TypeError, match="not one string"):
        OrchestratorQuery(statuses="online")
    with pytest.raises(ValueError, match="not a valid"):
        OrchestratorQuery(statuses=["gone"])


WHEN = datetime(2026, 11, 26, 12, 0, 0, 5000, tzinfo=UTC)


def test_record_json_is_the_daemons() -> None:
    record = OrchestratorRecord(
        id="a",
        capabilities=["testing"],
        last_heartbeat=WHEN,
        registered_at=WHEN - timedelta(hours=1),
    )
    text = encode_record(record)
    assert text == (
        '{"id":"a","name":"a","capabilities":["testing"],"region":"default",'
        '"tier":"standard","maxSessions":0,"currentSessions":0,"tokensUsed":0,'
        '"tokenLimit":0,"status":"online","lastHeartbeat":"2026-11-26T12:00:00.005Z",'
        '"registeredAt":"2026-11-26T11:00:00.005Z"}'
    )
    assert decode_record(text) == record


def test_decode_accepts_offsets_floats_and_unknown_keys() -> None:
    text = (
        '{"id":"a","name":"A","capabilities":[],"region":"r","tier":"t","maxSessions":4.0,'
        '"currentSessions":1,"tokensUsed":0,"tokenLimit":10,"status":"draining",'
        '"lastHeartbeat":"2026-11-26T13:00:00.005+01:00","registeredAt":"2026-11-26T12:00:00Z",'
        '"metadata":{"k":1},"somethingNew":true}'
    )
    record = decode_record(text)
    assert record.max_sessions == 4 and record.status is OrchestratorStatus.DRAINING
    assert record.last_heartbeat == WHEN
    assert record.metadata == {"k": 1}


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("nope", "not JSON"),
        ("[]", "expected a JSON object"),
        ('{"capabilities":"x"}', "'capabilities': expected list"),
        ('{"capabilities":[1]}', "array of strings"),
        ('{"capabilities":[],"metadata":[]}', "'metadata': expected an object"),
        ('{"capabilities":[],"endpoint":5}', "'endpoint': expected a string"),
        ('{"capabilities":[],"status":"gone"}', "bad status or date"),
        (
            '{"capabilities":[],"status":"online","lastHeartbeat":"2026-11-26T12:00:00Z",'
            '"registeredAt":"2026-11-26T12:00:00Z","id":"a","name":"a","region":"r",'
            '"tier":"t","maxSessions":1.5}',
            "'maxSessions': expected an integer",
        ),
        (
            '{"capabilities":[],"status":"online","lastHeartbeat":"2026-11-26T12:00:00Z",'
            '"registeredAt":"2026-11-26T12:00:00Z","id":"a","name":"a","region":"r",'
            '"tier":"t","maxSessions":true}',
            "'maxSessions': expected",
        ),
    ],
)
def test_decode_rejects_what_is_not_a_record(text: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        decode_record(text)


def test_diff_is_pure() -> None:
    now = WHEN
    old = OrchestratorRecord(id="a", last_heartbeat=now, registered_at=now)
    assert _diff({"a": old}, {"a": old}, now, 30.0) == []
    again = OrchestratorRecord(id="a", last_heartbeat=now, registered_at=now + timedelta(seconds=1))
    (event,) = _diff({"a": old}, {"a": again}, now, 30.0)
    assert event.type is RegistryEventType.REGISTERED
    (event,) = _diff({"a": old}, {}, now + timedelta(seconds=31), 30.0)
    assert event.type is RegistryEventType.STALE


ERRORS = [OrchestratorNotFound("orch-a"), RegistryUnavailable("down"), RegistryFull(3)]


@pytest.mark.parametrize("error", ERRORS, ids=lambda e: type(e).__name__)
def test_registry_errors_survive_copy_and_pickle(error: FederationError) -> None:
    for clone in (copy.copy(error), pickle.loads(pickle.dumps(error))):
        assert type(clone) is type(error)
        assert clone.args == error.args
        assert str(clone) == str(error)
        assert vars(clone) == vars(error)
    assert str(ERRORS[0]) == "orchestrator not found: 'orch-a'"
    assert str(ERRORS[1]) == "registry unavailable: down"
    assert str(ERRORS[2]) == "registry full (3 orchestrators registered)"


# -- the memory backend ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"heartbeat_timeout": 0}, "heartbeat_timeout must be > 0"),
        ({"heartbeat_timeout": float("inf")}, "heartbeat_timeout must be > 0"),
        ({"heartbeat_timeout": 2, "stale_timeout": 1}, "must be longer"),
        ({"stale_timeout": float("inf")}, "must be longer"),
        ({"watch_interval": 0}, "watch_interval must be > 0"),
    ],
)
def test_settings_are_checked(options: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        MemoryRegistry(**options)


def test_watch_interval_default() -> None:
    assert MemoryRegistry().watch_interval == 1.0
    assert MemoryRegistry(heartbeat_timeout=0.4, stale_timeout=1).watch_interval == 0.1


async def test_memory_registry_is_bounded(autojump_clock: trio.testing.MockClock) -> None:
    registry = MemoryRegistry(max_orchestrators=2, heartbeat_timeout=1, stale_timeout=2)
    await registry.register(OrchestratorRecord(id="a"))
    await registry.register(OrchestratorRecord(id="b"))
    await registry.register(OrchestratorRecord(id="b", region="again"))  # a replacement fits
    with pytest.raises(RegistryFull):
        await registry.register(OrchestratorRecord(id="c"))
    await trio.sleep(2)  # both expire: room again
    await registry.register(OrchestratorRecord(id="c"))
    assert [r.id for r in await registry.list_all()] == ["c"]


async def test_memory_clock_follows_trio(autojump_clock: trio.testing.MockClock) -> None:
    registry = MemoryRegistry()
    start = registry.now()
    await trio.sleep(3600)
    assert registry.now() - start == timedelta(hours=1)


async def test_local_writes_count_what_wakes_a_watch() -> None:
    registry = MemoryRegistry()
    assert registry.local_writes == 0
    await registry.register(OrchestratorRecord(id="a"))
    assert registry.local_writes == 1
    await registry.heartbeat("a", current_sessions=3)  # the same status: not a change
    await registry.list_all()
    assert registry.local_writes == 1
    await registry.set_status("a", OrchestratorStatus.DRAINING)
    assert await registry.deregister("a")
    assert not await registry.deregister("a")  # nothing to remove: nothing written
    assert registry.local_writes == 3


async def test_open_registry_memory_and_bad_scheme() -> None:
    async with open_registry("memory://", heartbeat_timeout=1, stale_timeout=2) as registry:
        assert isinstance(registry, MemoryRegistry)
        assert registry.heartbeat_timeout == 1
    with pytest.raises(ValueError, match="unknown registry URL scheme 'http'"):
        async with open_registry("http://example.invalid"):
            pass  # pragma: no cover


# -- self-registration -------------------------------------------------------------------


async def test_registration_heartbeats_drains_and_leaves(
    autojump_clock: trio.testing.MockClock,
) -> None:
    registry = MemoryRegistry(heartbeat_timeout=3, stale_timeout=10)
    tokens = [0]
    record = OrchestratorRecord(id="self", capabilities=["testing"], max_sessions=2)
    async with open_registration(registry, record, tokens_used=lambda: tokens[0]) as registration:
        assert registration.registry is registry
        first = await registry.get("self")
        assert first is not None and first.status == "online"
        tokens[0] = 42
        await trio.sleep(30)  # ten times the heartbeat timeout: the loop keeps it alive
        now = await registry.get("self")
        assert now is not None and now.status == "online" and now.tokens_used == 42
        assert now.registered_at == first.registered_at
        assert now.last_heartbeat > first.last_heartbeat
        assert registration.record.last_heartbeat == now.last_heartbeat
        await registration.drain()
        assert (await registry.get("self")).status == "draining"  # type: ignore[union-attr]
        await trio.sleep(5)
        assert (await registry.get("self")).status == "draining"  # type: ignore[union-attr]
        with registry.watch() as events:
            assert (await events.__anext__()).type == "registered"
            tasks_done = True
    assert tasks_done
    assert await registry.get("self") is None


async def test_registration_registers_again_after_expiry(
    autojump_clock: trio.testing.MockClock,
) -> None:
    registry = MemoryRegistry(heartbeat_timeout=1, stale_timeout=2)
    async with open_registration(
        registry, OrchestratorRecord(id="self"), heartbeat_interval=5
    ) as registration:
        await trio.sleep(3)  # expired before the first beat
        assert await registry.get("self") is None
        await trio.sleep(2.5)
        back = await registry.get("self")
        assert back is not None and back == registration.record


async def test_registration_reports_an_unreachable_store_and_goes_on(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    class Flaky(MemoryRegistry):
        down = False

        async def heartbeat(self, orchestrator_id: str, **figures: object) -> OrchestratorRecord:
            if self.down:
                raise RegistryUnavailable("store is down")
            return await super().heartbeat(orchestrator_id, **figures)  # type: ignore[arg-type]

        async def deregister(self, orchestrator_id: str) -> bool:
            if self.down:
                raise RegistryUnavailable("store is down")
            return await super().deregister(orchestrator_id)

    registry = Flaky(heartbeat_timeout=3, stale_timeout=10)
    async with open_registration(registry, OrchestratorRecord(id="self")):
        registry.down = True
        await trio.sleep(2.5)
        assert "heartbeat of 'self' failed: registry unavailable: store is down" in caplog.text
        registry.down = False
        await trio.sleep(1.5)
        assert (await registry.get("self")).status == "online"  # type: ignore[union-attr]
        registry.down = True
    assert "could not deregister 'self' (it will expire)" in caplog.text
    registry.down = False
    assert (await registry.get("self")).status == "draining"  # type: ignore[union-attr]


async def test_registration_cleanup_is_bounded(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    class Stuck(MemoryRegistry):
        async def deregister(self, orchestrator_id: str) -> bool:
            await trio.sleep_forever()
            raise AssertionError  # pragma: no cover

    registry = Stuck(heartbeat_timeout=3, stale_timeout=10)
    start = trio.current_time()
    async with open_registration(registry, OrchestratorRecord(id="self"), cleanup_timeout=2):
        pass
    assert trio.current_time() - start == pytest.approx(2)
    assert "took over 2s; its record will expire" in caplog.text


async def test_registration_raises_the_blocks_error_plainly() -> None:
    registry = MemoryRegistry()
    with pytest.raises(KeyError, match="boom"):
        async with open_registration(registry, OrchestratorRecord(id="self")):
            raise KeyError("boom")
    assert await registry.get("self") is None


async def test_registration_needs_a_listener_for_host() -> None:
    with pytest.raises(ValueError, match="host= needs a listener="):
        async with open_registration(MemoryRegistry(), OrchestratorRecord(id="x"), host="h"):
            pass  # pragma: no cover


async def drain(conn: OrchestratorConnection) -> None:
    async for _msg in conn:
        pass  # pragma: no cover


async def test_registration_of_a_listener_reports_its_endpoint_and_load() -> None:
    registry = MemoryRegistry(heartbeat_timeout=0.3, stale_timeout=2)
    async with trio.open_nursery() as nursery:
        listener = await nursery.start(
            partial(serve_federation, local_id="orch-b", capabilities=["testing", "research"]),
            drain,
            "127.0.0.1",
            0,
        )
        record = OrchestratorRecord(id="orch-b", max_sessions=1)
        async with open_registration(
            registry, record, listener=listener, host="127.0.0.1"
        ) as registration:
            stored = await registry.get("orch-b")
            assert stored is not None
            assert stored.endpoint == f"ws://127.0.0.1:{listener.port}/federation"
            assert stored.capabilities == ("testing", "research")
            assert stored.current_sessions == 0
            (found,) = await registry.query(OrchestratorQuery(capabilities=["research"]))
            assert found.endpoint is not None
            async with open_orchestrator_connection(
                found.endpoint, local_id="orch-a", capabilities=[]
            ):
                with trio.fail_after(5):
                    while registration.record.current_sessions != 1:
                        await trio.sleep(0.05)
                assert registration.record.status == "busy"  # 1 of max 1 sessions
            with trio.fail_after(5):
                while registration.record.current_sessions != 0:
                    await trio.sleep(0.05)
            assert registration.record.status == "online"
        assert await registry.get("orch-b") is None
        nursery.cancel_scope.cancel()


async def test_a_watch_closed_while_waiting_ends(autojump_clock: trio.testing.MockClock) -> None:
    registry = MemoryRegistry(heartbeat_timeout=4, stale_timeout=8)
    ended = trio.Event()
    with registry.watch() as events:

        async def consume() -> None:
            async for _event in events:
                raise AssertionError("an empty registry produced an event")  # pragma: no cover
            ended.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(consume)
            await trio.sleep(2.5)  # the consumer is waiting for a change
            assert not ended.is_set()
            events.close()
            await ended.wait()
        assert trio.current_time() < 5  # within one watch_interval of the close


def test_raise_single_keeps_a_real_group() -> None:
    from trio_federation._registry._registry import _raise_single

    group = ExceptionGroup("two", [ValueError("a"), KeyError("b")])
    with pytest.raises(ExceptionGroup) as caught:
        _raise_single(group)
    assert caught.value is group


async def test_registration_keeps_the_records_own_capabilities_and_endpoint() -> None:
    registry = MemoryRegistry()
    async with trio.open_nursery() as nursery:
        listener = await nursery.start(
            partial(serve_federation, local_id="orch-b", capabilities=["testing"]),
            drain,
            "127.0.0.1",
            0,
        )
        record = OrchestratorRecord(
            id="orch-b", capabilities=["research"], endpoint="wss://orch-b.example:443/fed"
        )
        async with open_registration(registry, record, listener=listener, host="127.0.0.1"):
            stored = await registry.get("orch-b")
            assert stored is not None
            assert stored.capabilities == ("research",)
            assert stored.endpoint == "wss://orch-b.example:443/fed"
        nursery.cancel_scope.cancel()


def test_the_package_works_without_coredis() -> None:
    import subprocess
    import sys

    script = """
import sys
sys.modules["coredis"] = None  # as if the redis extra were not installed
import trio, trio_federation as tf

async def main():
    async with tf.open_registry("memory://") as registry:
        await registry.register(tf.OrchestratorRecord(id="a"))
        print([record.id for record in await registry.list_all()])
    try:
        async with tf.open_registry("redis://127.0.0.1:1/0"):
            pass
    except ImportError as exc:
        print(exc)

trio.run(main)
"""
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=20
    )
    assert result.stdout.splitlines() == [
        "['a']",
        "the Redis registry needs coredis: pip install 'trio-federation[redis]'",
    ]
