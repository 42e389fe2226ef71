"""Our Redis backend beside the TypeScript daemon's real ``FederationRegistry``, on one Redis.

The daemon's registry (``dist/federation/registry.js`` of the pinned
``@wundr.io/orchestrator-daemon``, see ``_daemon.py``) runs in Node under the
same key prefix: it registers, updates (plain ``SET``, which strips expiries)
and cleans up; our backend reads and writes beside it. Under ``CI=true`` a
missing Node, daemon or dependency fails these tests instead of skipping them.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from datetime import datetime

import pytest
import trio

from trio_federation import (
    OrchestratorNotFound,
    OrchestratorQuery,
    OrchestratorRecord,
    RedisRegistry,
    open_registration,
)

from ..conftest import under_ci
from ._daemon import (
    REGISTRY_DEPENDENCIES,
    DaemonRegistry,
    daemon_problems,
    open_daemon_registry,
)
from ._redis_server import RedisServer
from .conftest import open_test_registry, unique_prefix


@pytest.fixture
def node() -> str:
    """Node, with the daemon's registry and its dependencies in place."""
    found, problems = daemon_problems(REGISTRY_DEPENDENCIES)
    if problems or found is None:
        message = "the daemon's registry cannot run: " + "; ".join(problems)
        if under_ci():
            pytest.fail(message)
        pytest.skip(message)
    return found


@asynccontextmanager
async def side_by_side(
    redis: RedisServer, node: str, *, heartbeat_timeout: float, stale_timeout: float
) -> AsyncIterator[tuple[RedisRegistry, DaemonRegistry]]:
    """Our registry and the daemon's, same timeouts, one fresh key prefix."""
    prefix = unique_prefix()
    async with AsyncExitStack() as stack:
        ours = await stack.enter_async_context(
            open_test_registry(
                redis,
                prefix=prefix,
                heartbeat_timeout=heartbeat_timeout,
                stale_timeout=stale_timeout,
            )
        )
        daemon = await stack.enter_async_context(
            open_daemon_registry(
                node,
                redis.port,
                prefix,
                heartbeat_timeout=heartbeat_timeout,
                stale_timeout=stale_timeout,
            )
        )
        yield ours, daemon


def iso(value: datetime) -> str:
    return value.isoformat(timespec="milliseconds").replace("+00:00", "Z")


async def ids(daemon: DaemonRegistry, method: str, *args: object) -> list[str]:
    return sorted(record["id"] for record in await daemon.call(method, *args))


async def test_our_lease_survives_the_daemons_rewrites(redis: RedisServer, node: str) -> None:
    hb, stale = 1.0, 3.0
    async with side_by_side(redis, node, heartbeat_timeout=hb, stale_timeout=stale) as (
        ours,
        daemon,
    ):
        client, key = ours.client, ours.record_key("py")
        await ours.register(OrchestratorRecord(id="py", capabilities=["testing"], region="eu"))
        assert 0 < await client.pttl(key) <= 3000
        # Each of the daemon's updates is a plain SET: the expiry goes...
        await daemon.call("updateStatus", "py", "busy")
        assert await client.pttl(key) == -1
        # ...and our next heartbeat puts it back.
        beat = await ours.heartbeat("py")
        assert 2500 < await client.pttl(key) <= 3000
        await daemon.call("updateMetrics", "py", {"currentSessions": 2, "tokensUsed": 7})
        await daemon.call("updateHeartbeat", "py")
        assert await client.pttl(key) == -1
        assert json.loads(await client.get(key) or "")["leaseMs"] == 3000  # the daemon kept it
        # The daemon's heartbeat counts: our lease runs from its lastHeartbeat.
        async with open_registration(ours, beat, heartbeat_interval=0.1):
            await daemon.call("updateStatus", "py", "draining")
            with trio.fail_after(2):
                while json.loads(await client.get(key) or "")["status"] == "draining":
                    await trio.sleep(0.02)  # until our registration's next beat
            assert 2500 < await client.pttl(key) <= 3000
        await ours.register(OrchestratorRecord(id="py", capabilities=["testing"], region="eu"))

        # Then we fall silent. The daemon's cleanup marks it offline, a plain SET again.
        await trio.sleep(hb + 0.2)
        await daemon.call("cleanupStaleOrchestrators")
        assert [event[0] for event in daemon.events] == [
            "orchestrator:unhealthy",
            "orchestrator:status_changed",
        ]
        assert await client.pttl(key) == -1
        before = ours.now()
        got = await ours.get("py")  # any of our reads restores what is left of the lease
        assert got is not None
        assert got.status == "offline"
        left = stale * 1000 - (before - got.last_heartbeat).total_seconds() * 1000
        assert 0 < await client.pttl(key) <= left + 1
        # Nobody of ours touches it again: Redis expires it on time, for the daemon too.
        await trio.sleep(left / 1000 + 0.2)
        assert await client.exists([key]) == 0
        assert await daemon.call("getOrchestratorMetadata", "py") is None
        assert await ids(daemon, "getOrchestratorsByCapability", ["testing"]) == []


async def test_a_record_past_stale_timeout_is_gone_for_our_readers(
    redis: RedisServer, node: str
) -> None:
    hb, stale = 0.5, 1.5
    async with side_by_side(redis, node, heartbeat_timeout=hb, stale_timeout=stale) as (
        ours,
        daemon,
    ):
        client = ours.client
        await ours.register(OrchestratorRecord(id="py", capabilities=["testing"], region="eu"))
        await daemon.call("updateStatus", "py", "busy")  # no expiry any more
        await daemon.call(
            "registerOrchestrator",
            {
                "id": "ts", "name": "TS", "capabilities": ["testing"], "region": "eu",
                "tier": "standard", "maxSessions": 4, "currentSessions": 0, "tokensUsed": 0,
                "tokenLimit": 100, "status": "online",
            },
        )  # fmt: skip
        await trio.sleep(stale + 0.3)  # both silent past stale_timeout; no expiry on either
        assert await client.pttl(ours.record_key("ts")) == -1
        assert await client.pttl(ours.record_key("py")) == -1
        # Gone for every reader of ours.
        assert await ours.get("py") is None
        assert await ours.get("ts") is None
        assert await ours.list_all() == []
        assert await ours.query(OrchestratorQuery(capabilities=["testing"])) == []
        assert await ours.query(OrchestratorQuery(region="eu")) == []
        assert await ours.healthy() == []
        assert await ours.metrics("ts") is None
        for orch_id in ("py", "ts"):
            with pytest.raises(OrchestratorNotFound):
                await ours.heartbeat(orch_id)
            with pytest.raises(OrchestratorNotFound):
                await ours.set_status(orch_id, "online")
        # Ours was past its lease: our first read deleted it, with its index entries.
        assert await client.exists([ours.record_key("py")]) == 0
        assert await ids(daemon, "getOrchestratorsByCapability", ["testing"]) == ["ts"]
        assert await daemon.call("indexIds", {"capabilities": ["testing"]}) == ["ts"]
        # The daemon's record is the daemon's to clean up (its own staleTimeout).
        await daemon.call("cleanupStaleOrchestrators")
        assert [event[0] for event in daemon.events] == [
            "orchestrator:stale",
            "orchestrator:deregistered",
        ]
        assert [key async for key in client.scan_iter(match=f"{ours.key_prefix}:*")] == []


async def test_expired_index_entries_are_removed_by_our_next_write_or_read(
    redis: RedisServer, node: str
) -> None:
    prefix = unique_prefix()
    async with AsyncExitStack() as stack:
        # "dead" lives 1 s; "alive" (another process of ours) 30 s.
        short = await stack.enter_async_context(
            open_test_registry(redis, prefix=prefix, heartbeat_timeout=0.5, stale_timeout=1)
        )
        ours = await stack.enter_async_context(
            open_test_registry(redis, prefix=prefix, heartbeat_timeout=10, stale_timeout=30)
        )
        daemon = await stack.enter_async_context(
            open_daemon_registry(node, redis.port, prefix, heartbeat_timeout=10, stale_timeout=30)
        )
        client = ours.client
        await ours.register(OrchestratorRecord(id="alive", capabilities=["testing"], region="us"))
        await short.register(
            OrchestratorRecord(id="dead", capabilities=["testing", "gpu"], region="eu")
        )
        await short.register(
            OrchestratorRecord(id="rewritten", capabilities=["testing", "tpu"], region="ap")
        )
        # The daemon strips the expiry of "rewritten", and none of ours touches it in time
        # to restore it: past its lease, it is still there.
        await daemon.call("updateMetrics", "rewritten", {"currentSessions": 1})
        await trio.sleep(1.3)
        assert await client.pttl(ours.record_key("rewritten")) == -1
        assert await client.exists([ours.record_key("dead")]) == 0  # Redis expired it...
        # ...but not its index entries, which the daemon's readers start from.
        assert await daemon.call("indexIds", {"capabilities": ["testing"]}) == [
            "alive",
            "dead",
            "rewritten",
        ]
        assert await daemon.call("indexIds", {"capabilities": ["gpu"]}) == ["dead"]
        assert await daemon.call("indexIds", {"region": "eu"}) == ["dead"]

        # Our next write touching an index removes them: a heartbeat...
        await ours.heartbeat("alive")
        assert await daemon.call("indexIds", {"capabilities": ["testing"]}) == [
            "alive",
            "rewritten",  # still there: no expiry, until one of our reads meets it
        ]
        assert await daemon.call("indexIds", {"capabilities": ["gpu"]}) == ["dead"]  # untouched

        # ...a read: a query...
        assert await ours.query(OrchestratorQuery(capabilities=["gpu"])) == []
        assert await daemon.call("indexIds", {"capabilities": ["gpu"]}) == []
        assert await daemon.call("indexIds", {"region": "eu"}) == ["dead"]  # untouched

        # ...a registration touching the region.
        await ours.register(OrchestratorRecord(id="new", capabilities=["gpu"], region="eu"))
        assert await daemon.call("indexIds", {"region": "eu"}) == ["new"]
        assert await ids(daemon, "getOrchestratorsByRegion", "eu") == ["new"]

        # The record past its lease that the daemon had rewritten: the daemon still lists it
        # until one of our reads meets it, which deletes it with all its index entries.
        assert await ids(daemon, "getOrchestratorsByCapability", ["testing"]) == [
            "alive",
            "rewritten",
        ]
        assert [r.id for r in await ours.query(OrchestratorQuery(capabilities=["testing"]))] == [
            "alive"
        ]
        assert await client.exists([ours.record_key("rewritten")]) == 0
        assert await daemon.call("indexIds", {"capabilities": ["testing"]}) == ["alive"]
        assert await daemon.call("indexIds", {"capabilities": ["tpu"]}) == []
        assert await daemon.call("indexIds", {"region": "ap"}) == []
        assert await ids(daemon, "getOrchestratorsByCapability", ["testing"]) == ["alive"]
        assert await client.smembers(ours.orchestrators_key) == {"alive", "new"}


async def test_registered_at_is_kept_from_the_first_registration(
    redis: RedisServer, node: str
) -> None:
    async with side_by_side(redis, node, heartbeat_timeout=10, stale_timeout=30) as (
        ours,
        daemon,
    ):
        # Ours, registered again (new capabilities, new region): the first registeredAt stays.
        first = await ours.register(OrchestratorRecord(id="py", capabilities=["a"], region="eu"))
        await trio.sleep(0.05)
        again = await ours.register(OrchestratorRecord(id="py", capabilities=["b"], region="us"))
        assert again.registered_at == first.registered_at
        assert again.last_heartbeat > first.last_heartbeat
        got = await ours.get("py")
        assert got is not None
        assert got.registered_at == first.registered_at
        seen = await daemon.call("getOrchestratorMetadata", "py")
        assert seen["registeredAt"] == iso(first.registered_at)
        assert (seen["capabilities"], seen["region"]) == (["b"], "us")

        # The daemon's, with the registeredAt it was given: kept by whatever we do beside it.
        given = "2026-01-02T03:04:05.678Z"
        await daemon.call(
            "registerOrchestrator",
            {
                "id": "ts", "name": "TS", "capabilities": ["a"], "region": "eu",
                "tier": "standard", "maxSessions": 4, "currentSessions": 0, "tokensUsed": 0,
                "tokenLimit": 100, "status": "online", "registeredAt": given,
            },
        )  # fmt: skip
        assert (await daemon.call("getOrchestratorMetadata", "ts"))["registeredAt"] == given
        got = await ours.get("ts")
        assert got is not None
        assert iso(got.registered_at) == given
        assert iso((await ours.set_status("ts", "busy")).registered_at) == given
        # A status change leaves the daemon's record the daemon's: no lease, no expiry.
        assert "leaseMs" not in json.loads(await ours.client.get(ours.record_key("ts")) or "")
        assert await ours.client.pttl(ours.record_key("ts")) == -1
        assert iso((await ours.heartbeat("ts", current_sessions=1)).registered_at) == given
        await daemon.call("updateHeartbeat", "ts")
        took_over = await ours.register(OrchestratorRecord(id="ts", capabilities=["a"]))
        assert iso(took_over.registered_at) == given
        assert (await daemon.call("getOrchestratorMetadata", "ts"))["registeredAt"] == given
        # Its uptime still counts from the given registeredAt.
        metrics = await daemon.call("getOrchestratorMetrics", "ts")
        since = (ours.now() - datetime.fromisoformat(given)).total_seconds()
        assert abs(metrics["uptime"] / 1000 - since) < 60
