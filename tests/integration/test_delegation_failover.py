"""Balancing, failover and drain between nodes on loopback sockets (SPEC 6.3, 6.5)."""

from __future__ import annotations

import collections
from typing import Any

import pytest
import trio
import trio.testing

from trio_federation import (
    CallbackStatus,
    DelegationRequest,
    DelegationResponse,
    LeastLoaded,
    MemoryRegistry,
    OrchestratorConnection,
    OrchestratorRecord,
    OrchestratorStatus,
    ReconnectPolicy,
    Task,
    TaskCallback,
    TaskContext,
    TaskFailedOver,
    open_federation_node,
)
from trio_federation.testing import FaultyProxy

from .test_delegation import (
    FAST,
    delegation_to,
    echo,
    envelope,
    next_payload,
    node,
    raw_client,
    raw_executor,
    task,
)


class Gate:
    """An executor that holds every task until released (then echoes)."""

    def __init__(self) -> None:
        self.started = 0
        self.release = trio.Event()
        self.some_started = trio.Event()

    async def __call__(self, ctx: TaskContext) -> Any:
        self.started += 1
        self.some_started.set()
        await self.release.wait()
        return {"echo": ctx.task.description, "by": "gate"}


# -- balancing on real sockets ------------------------------------------------------------


@pytest.mark.parametrize("strategy", ["round-robin", "least-loaded"])
async def test_ninety_tasks_spread_evenly_over_three_nodes(strategy: str) -> None:
    assignees: collections.Counter[str] = collections.Counter()
    async with node("orch-b", executor=echo), node("orch-c", executor=echo):
        async with node("orch-d", executor=echo), node("orch-a", strategy=strategy) as a:
            limit = trio.Semaphore(9)

            async def one(index: int) -> None:
                async with limit, a.open_delegation(task(f"t-{index}")) as delegation:
                    await delegation.result()
                    assert delegation.assignee is not None
                    assignees[delegation.assignee] += 1

            with trio.fail_after(5):
                async with trio.open_nursery() as nursery:
                    for index in range(90):
                        nursery.start_soon(one, index)
    assert sum(assignees.values()) == 90
    assert all(27 <= count <= 33 for count in assignees.values()), assignees


async def test_affinity_and_capabilities_hold_between_real_nodes() -> None:
    async with node("orch-b", executor=echo, capabilities=["testing"]):
        async with node("orch-c", executor=echo, capabilities=["testing"]):
            async with node("orch-x", executor=echo, capabilities=["research"]) as x:
                async with node("orch-a") as a:
                    seen = set()
                    for index in range(6):
                        pinned = Task(id=f"t-{index}", description="", metadata={"affinity": "u1"})
                        async with a.open_delegation(
                            pinned, strategy="consistent-hash"
                        ) as delegation:
                            await delegation.result()
                            seen.add(delegation.assignee)
                    assert len(seen) == 1
                    for index in range(10):
                        await a.delegate(
                            task(f"s-{index}"),
                            strategy="capability-score",
                            required_capabilities=["testing"],
                        )
                    assert x.statistics().tasks_completed == 0
                    assert await a.delegate(task("r-1"), strategy="random") == {"echo": "lint"}
                    assert a.statistics().rejected == 0
                    # Both took some: the score prefers the more reliable, in turn on ties.
                    assert {p.id for p in a.peers() if p.id != "orch-x"} == {"orch-b", "orch-c"}


# -- failover -----------------------------------------------------------------------------


async def test_an_executor_the_registry_declares_dead_fails_over_and_cannot_come_back(
    autojump_clock: trio.testing.MockClock,
) -> None:
    registry = MemoryRegistry(heartbeat_timeout=3, stale_timeout=60)
    received = trio.Event()
    come_back = trio.Event()
    told: list[object] = []

    async def hang_then_answer(conn: OrchestratorConnection) -> None:
        async for message in conn:
            request = message.payload
            assert isinstance(request, DelegationRequest)
            accepted = DelegationResponse(task_id=request.task.id, accepted=True)
            await conn.send(envelope(accepted, "raw", conn.id))
            received.set()
            await come_back.wait()  # frozen: no registry heartbeat, the link still up
            stale = TaskCallback(task_id=request.task.id, status="completed", result="stale")
            await conn.send(envelope(stale, "raw", conn.id))
            told.append((await conn.receive()).payload)  # the delegator's cancel

    async with raw_executor(hang_then_answer) as listener:
        url = f"ws://127.0.0.1:{listener.port}/federation"
        await registry.register(
            OrchestratorRecord(id="raw", capabilities=("testing",), endpoint=url)
        )
        async with node("orch-c", executor=echo, registry=registry):
            async with node("orch-a", registry=registry) as a:
                async with a.open_delegation(task(), prefer=["raw"]) as delegation:
                    await received.wait()
                    start = trio.current_time()
                    assert await delegation.result() == {"echo": "lint"}
                    waited = trio.current_time() - start
                    updates = [u async for u in delegation]
                come_back.set()
                with trio.fail_after(5):
                    while a.statistics().illegal_callbacks == 0 or not told:
                        await trio.sleep(0.01)
    assert told == [TaskCallback(task_id="t-1", status=CallbackStatus.CANCEL)]
    assert 3 <= waited <= 6  # the heartbeat timeout, then one registry read
    assert isinstance(updates[1], TaskFailedOver)
    assert updates[1].reason == "declared offline by the registry"
    outcomes = [(x.peer, x.outcome) for x in delegation.attempts]
    assert outcomes == [("raw", "lost"), ("orch-c", "completed")]
    assert a.statistics().failed_over == 1


async def test_a_cut_link_that_does_not_come_back_fails_over() -> None:
    gate = Gate()
    once = ReconnectPolicy(initial_delay=0.01, max_delay=0.02, max_attempts=1)
    async with trio.open_nursery() as nursery:
        async with node("orch-b", executor=gate, drain_grace=0.05) as b:
            assert b.port is not None
            proxy: FaultyProxy = await nursery.start(FaultyProxy(b.port).run)
            peers = {"orch-b": f"ws://127.0.0.1:{proxy.port}/federation"}
            async with node("orch-c", executor=echo):
                async with node("orch-a", peers=peers, reconnect=once) as a:
                    async with a.open_delegation(task(), prefer=["orch-b"]) as delegation:
                        await gate.some_started.wait()
                        proxy.refusing = True
                        proxy.cut()
                        with trio.fail_after(3):
                            assert await delegation.result() == {"echo": "lint"}
                    outcomes = [(x.peer, x.outcome) for x in delegation.attempts]
                    assert outcomes == [("orch-b", "lost"), ("orch-c", "completed")]
                    assert a.peers()[0].id == "orch-b"
        nursery.cancel_scope.cancel()


async def test_a_cut_link_that_resumes_keeps_the_task_where_it_runs() -> None:
    gate = Gate()
    async with trio.open_nursery() as nursery:
        async with node("orch-b", executor=gate) as b:
            assert b.port is not None
            proxy: FaultyProxy = await nursery.start(FaultyProxy(b.port).run)
            peers = {"orch-b": f"ws://127.0.0.1:{proxy.port}/federation"}
            async with node("orch-c", executor=echo):
                async with node("orch-a", peers=peers) as a:
                    async with a.open_delegation(task(), prefer=["orch-b"]) as delegation:
                        await gate.some_started.wait()
                        proxy.cut()
                        await trio.sleep(0.2)
                        gate.release.set()
                        with trio.fail_after(3):
                            result = await delegation.result()
                    assert result == {"echo": "lint", "by": "gate"}
                    assert [x.outcome for x in delegation.attempts] == ["completed"]
        nursery.cancel_scope.cancel()


# -- drain --------------------------------------------------------------------------------


async def test_drain_marks_refuses_waits_and_hands_the_rest_to_other_nodes() -> None:
    gate = Gate()
    async with node("orch-b", executor=gate) as b, node("orch-c", executor=echo) as c:
        async with node("orch-a") as a:
            results = []

            async def one(index: int) -> None:
                async with a.open_delegation(task(f"t-{index}"), prefer=["orch-b"]) as d:
                    results.append((await d.result(), [x.outcome for x in d.attempts]))

            async with trio.open_nursery() as nursery:
                for index in range(2):
                    nursery.start_soon(one, index)
                with trio.fail_after(2):
                    while gate.started < 2:
                        await trio.sleep(0.01)
                with trio.move_on_after(0.2) as waited:
                    await b.drain()
                assert waited.cancelled_caught
                assert b.draining
            record = await b.registry.get("orch-b")
            assert record is not None and record.status is OrchestratorStatus.DRAINING
            assert results == [({"echo": "lint"}, ["handed_back", "completed"])] * 2
            assert b.statistics().tasks_running == 0
            assert c.statistics().tasks_completed == 2
            # A draining node is not chosen, and refuses whoever asks anyway.
            await a.delegate(task("t-9"), prefer=["orch-b"])
            assert a.statistics().rejected == 0
            async with raw_client(b) as conn:
                await conn.send(delegation_to(b, "t-10"))
                assert (await next_payload(conn)).reason == "draining"
            assert b.statistics().tasks_refused == {"draining": 1}


async def test_a_drain_that_is_not_cut_short_lets_the_tasks_finish_where_they_run() -> None:
    gate = Gate()
    async with node("orch-b", executor=gate) as b, node("orch-a") as a:
        async with trio.open_nursery() as nursery:

            async def delegate() -> None:
                assert await a.delegate(task()) == {"echo": "lint", "by": "gate"}

            nursery.start_soon(delegate)
            await gate.some_started.wait()
            with trio.fail_after(2):
                async with trio.open_nursery() as draining:
                    draining.start_soon(b.drain)
                    await trio.sleep(0.05)
                    gate.release.set()
        assert a.statistics().failed_over == 0
        await b.drain()  # again: nothing runs, it returns at once


async def test_leaving_the_block_drains_within_the_grace_then_hands_back() -> None:
    gate = Gate()
    async with node("orch-c", executor=echo), node("orch-a") as a:
        async with trio.open_nursery() as nursery:
            left = trio.Event()

            async def run_b() -> None:
                async with node("orch-b", executor=gate, drain_grace=0.2):
                    await gate.some_started.wait()
                    start = trio.current_time()
                left.set()
                assert 0.2 <= trio.current_time() - start < 1.5

            nursery.start_soon(run_b)
            with trio.fail_after(2):
                while await a.registry.get("orch-b") is None:
                    await trio.sleep(0.01)
                async with a.open_delegation(task(), prefer=["orch-b"]) as delegation:
                    assert await delegation.result() == {"echo": "lint"}
                await left.wait()
    assert [(x.peer, x.outcome, x.reason) for x in delegation.attempts] == [
        ("orch-b", "handed_back", "draining"),
        ("orch-c", "completed", None),
    ]


async def test_drain_with_an_unreachable_registry_still_refuses(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from trio_federation import RegistryUnavailable

    async with node("orch-b", executor=echo) as b:

        async def down(*args: object, **kwargs: object) -> None:
            raise RegistryUnavailable("down")

        monkeypatch.setattr(b.registry, "heartbeat", down)
        await b.drain()
        assert b.draining
    with pytest.raises(ValueError, match="drain_grace"):
        async with open_federation_node(local_id="x", drain_grace=-1):
            pass  # pragma: no cover


async def test_success_rates_are_kept_per_peer_and_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    from trio_federation._delegation import _node

    async with node("orch-b", executor=echo), node("orch-a", backoff=FAST) as a:
        await a.delegate(task(), strategy="capability-score")
        assert a._success_rate("orch-b") == 1.0
        assert a._success_rate("nobody") is None
        monkeypatch.setattr(_node, "MAX_TRACKED_PEERS", 1)
        a._record_outcome("other", False)
        assert a._success_rate("orch-b") is None
        assert a._success_rate("other") == 0.0
    assert CallbackStatus.CANCEL  # (the cancel extension is what a drain does not need)


async def test_an_executor_gone_from_the_registry_while_dialed_gets_nothing(
    autojump_clock: trio.testing.MockClock,
) -> None:
    registry = MemoryRegistry(heartbeat_timeout=3, stale_timeout=60)
    received: list[object] = []

    async def record(conn: OrchestratorConnection) -> None:
        async for message in conn:
            received.append(message.payload)

    async with trio.open_nursery() as nursery, raw_executor(record, "ghost") as ghost:
        proxy: FaultyProxy = await nursery.start(FaultyProxy(ghost.port).run)
        proxy.stall()  # the handshake waits
        url = f"ws://127.0.0.1:{proxy.port}/federation"
        await registry.register(OrchestratorRecord(id="ghost", endpoint=url))
        async with node("orch-b", executor=echo, registry=registry) as b:
            async with node("orch-a", registry=registry) as a:
                async with a.open_delegation(task(), prefer=["ghost"]) as delegation:
                    while delegation.assignee != "ghost":
                        await trio.sleep(0.01)
                    await registry.deregister("ghost")
                    while not delegation.attempts:
                        await trio.sleep(0.01)
                    proxy.release()  # the dial completes after the verdict
                    assert await delegation.result() == {"echo": "lint"}
                assert [(x.peer, x.outcome, x.reason) for x in delegation.attempts] == [
                    ("ghost", "lost", "gone from the registry"),
                    ("orch-b", "completed", None),
                ]
                assert b.statistics().tasks_completed == 1
                # A strategy instance, and a name the node does not know.
                again = a.delegate(task("t-2"), strategy=LeastLoaded(), exclude=["ghost"])
                assert await again == {"echo": "lint"}
                with pytest.raises(ValueError, match="unknown strategy"):
                    await a.delegate(task("t-3"), strategy="fastest")
        nursery.cancel_scope.cancel()
    assert received == []  # the lost executor was sent nothing
