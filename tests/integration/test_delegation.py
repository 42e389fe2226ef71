"""Delegation between nodes on real loopback sockets (SPEC 6.1-6.4, 6.6)."""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import trio

from trio_federation import (
    Backoff,
    BroadcastPayload,
    ConnectionLost,
    DelegationFailed,
    DelegationRequest,
    DelegationResponse,
    DelegationStatus,
    FederationListener,
    FederationMessage,
    FederationNode,
    Limits,
    MemoryRegistry,
    OrchestratorConnection,
    OrchestratorStatus,
    RedisRegistry,
    Task,
    TaskAccepted,
    TaskCallback,
    TaskCompleted,
    TaskContext,
    TaskFailed,
    TaskFailedOver,
    TaskProgress,
    Timeouts,
    open_federation_node,
    open_orchestrator_connection,
    open_registry,
    serve_federation,
)

from ._redis_server import RedisServer

FAST = Backoff(initial_delay=0.01, max_delay=0.02)


def task(task_id: str = "t-1", description: str = "lint") -> Task:
    return Task(id=task_id, description=description)


async def echo(ctx: TaskContext) -> Any:
    return {"echo": ctx.task.description}


def node(local_id: str, **options: Any) -> Any:
    options.setdefault("backoff", FAST)
    return open_federation_node(local_id=local_id, **options)


# -- a raw peer speaking the v1 messages by hand ----------------------------------------


def envelope(
    payload: Any, sender: str, recipient: str, kind: str = "callback"
) -> FederationMessage:
    task_id = getattr(payload, "task_id", None)
    if isinstance(payload, DelegationRequest):
        task_id = payload.task.id
    return FederationMessage(
        type=kind,
        payload=payload,
        sender=sender,
        recipient=recipient,
        correlation_id=task_id,
    )


def delegation_to(
    target: FederationNode, task_id: str = "t-1", sender: str = "raw", **fields: Any
) -> FederationMessage:
    request = DelegationRequest(
        from_orchestrator_id=sender,
        to_orchestrator_id=target.local_id,
        task=task(task_id),
        **fields,
    )
    return envelope(request, sender, target.local_id, "delegation")


@asynccontextmanager
async def raw_client(
    target: FederationNode, local_id: str = "raw"
) -> AsyncIterator[OrchestratorConnection]:
    assert target.endpoint is not None
    async with open_orchestrator_connection(
        target.endpoint, local_id=local_id, capabilities=[]
    ) as conn:
        yield conn


async def next_payload(conn: OrchestratorConnection) -> Any:
    with trio.fail_after(2):
        return (await conn.receive()).payload


@asynccontextmanager
async def raw_executor(
    handler: Callable[[OrchestratorConnection], Awaitable[object]],
    local_id: str = "raw",
    capabilities: tuple[str, ...] = ("testing",),
) -> AsyncIterator[FederationListener]:
    async with trio.open_nursery() as nursery:
        listener: FederationListener = await nursery.start(
            functools.partial(serve_federation, local_id=local_id, capabilities=capabilities),
            handler,
            "127.0.0.1",
            0,
        )
        yield listener
        nursery.cancel_scope.cancel()


# -- the round trip ---------------------------------------------------------------------


async def test_delegate_returns_the_result_and_registers_both_nodes() -> None:
    async with node("orch-b", capabilities=["testing"], executor=echo) as b:
        async with node("orch-a", capabilities=["research"]) as a:
            assert b.endpoint == f"ws://127.0.0.1:{b.port}/federation"
            assert a.registry is b.registry  # one memory registry per trio run
            record = await a.registry.get("orch-b")
            assert record is not None and record.endpoint == b.endpoint
            assert record.max_sessions == 16
            result = await a.delegate(task(), required_capabilities=["testing"])
            assert result == {"echo": "lint"}
            (peer,) = a.peers()
            assert (peer.id, peer.capabilities, peer.in_flight) == ("orch-b", ("testing",), 0)
            assert peer.status is not None
            stats = a.statistics()
            assert (stats.delegations_sent, stats.accepted, stats.completed) == (1, 1, 1)
            assert stats.latency_p50 is not None and stats.latency_p95 is not None
            assert b.statistics().tasks_completed == 1
            # B delegates back over the same connection (A dialed it)
            assert a.peers()[0].id == "orch-b"
        assert await b.registry.get("orch-a") is None  # deregistered on exit


async def test_progress_comes_before_the_result_in_order() -> None:
    async def execute(ctx: TaskContext) -> str:
        for percent in (10, 50, 90):
            await ctx.report_progress(percent, f"at {percent}")
        return "done"

    async with node("orch-b", capabilities=["testing"], executor=execute):
        async with node("orch-a") as a:
            async with a.open_delegation(task()) as delegation:
                assert delegation.task_id == "t-1"
                updates = [update async for update in delegation]
                assert await delegation.result() == "done"
                assert delegation.status is DelegationStatus.COMPLETED
                assert delegation.assignee == "orch-b"
                assert [a.outcome for a in delegation.attempts] == ["completed"]
    assert updates == [
        TaskAccepted(peer="orch-b"),
        TaskProgress(peer="orch-b", percent=10, message="at 10"),
        TaskProgress(peer="orch-b", percent=50, message="at 50"),
        TaskProgress(peer="orch-b", percent=90, message="at 90"),
        TaskCompleted(peer="orch-b", result="done"),
    ]


async def test_an_executor_exception_is_failed_with_its_message() -> None:
    async def execute(ctx: TaskContext) -> None:
        raise ValueError("no such file")

    async with node("orch-b", executor=execute) as b:
        async with node("orch-a") as a:
            async with a.open_delegation(task()) as delegation:
                with pytest.raises(DelegationFailed) as info:
                    await delegation.result()
                updates = [u async for u in delegation]
                assert delegation.status is DelegationStatus.FAILED
    assert info.value.attempts[-1].reason == "ValueError: no such file"
    assert info.value.attempts[-1].peer == "orch-b"
    assert isinstance(updates[-1], TaskFailed)
    assert b.statistics().tasks_failed == 1 and a.statistics().failed == 1


async def test_a_result_json_cannot_carry_fails_the_task_not_the_node() -> None:
    async def execute(ctx: TaskContext) -> object:
        return object() if ctx.task.id == "t-1" else {"fine": True}

    async with node("orch-b", executor=execute) as b:
        async with node("orch-a") as a:
            with pytest.raises(DelegationFailed) as info:
                await a.delegate(task())
            # The node is still up, and a repeat gets the same (stored) failure.
            assert await a.delegate(task("t-2")) == {"fine": True}
            with pytest.raises(DelegationFailed):
                await a.delegate(task())
    reason = info.value.attempts[-1].reason or ""
    assert reason.startswith("TypeError: the result cannot be sent")
    assert b.statistics().tasks_failed == 1 and b.statistics().tasks_completed == 1


async def test_a_task_nobody_can_run_fails_and_runs_nowhere() -> None:
    ran: list[str] = []

    async def execute(ctx: TaskContext) -> None:
        ran.append(ctx.task.id)

    async with node("orch-b", capabilities=["testing"], executor=execute):
        async with node("orch-a", capabilities=["security"], executor=execute) as a:
            with pytest.raises(DelegationFailed) as info:
                await a.delegate(task(), required_capabilities=["security"], max_attempts=3)
    assert [attempt.outcome for attempt in info.value.attempts] == ["no_candidate"] * 3
    assert ran == []  # not on B (no capability), and never on A itself


async def test_the_registry_is_not_read_for_every_delegation() -> None:
    registry = MemoryRegistry(watch_interval=60.0)
    reads = 0
    list_all = registry.list_all

    async def counted() -> list[Any]:
        nonlocal reads
        reads += 1
        return await list_all()

    registry.list_all = counted  # type: ignore[method-assign]
    async with (
        node("orch-b", executor=echo, registry=registry),
        node("orch-a", registry=registry) as a,
    ):
        await a.delegate(task("warm-up"))
        reads = 0
        for index in range(20):
            assert await a.delegate(task(f"t-{index}")) == {"echo": "lint"}
        assert reads <= 1  # the records are kept for watch_interval
        # A write through the registry is seen at once: a draining peer is no candidate.
        before = reads
        await registry.set_status("orch-b", OrchestratorStatus.DRAINING)
        with pytest.raises(DelegationFailed) as info:
            await a.delegate(task("t-late"), max_attempts=1)
        assert [x.outcome for x in info.value.attempts] == ["no_candidate"]
        assert reads > before
        assert a.peers()[0].in_flight == 0


async def test_a_node_never_delegates_to_itself() -> None:
    async with node("orch-a", executor=echo) as a:
        with pytest.raises(DelegationFailed):
            await a.delegate(task(), max_attempts=1)
        assert a.statistics().tasks_completed == 0


async def test_round_robin_spreads_and_least_loaded_is_available() -> None:
    async with node("orch-b", executor=echo), node("orch-c", executor=echo):
        async with node("orch-a") as a:
            seen = set()
            for index in range(4):
                async with a.open_delegation(task(f"t-{index}")) as delegation:
                    await delegation.result()
                    seen.add(delegation.assignee)
            assert seen == {"orch-b", "orch-c"}
            assert await a.delegate(task("t-9"), strategy="least-loaded") == {"echo": "lint"}
            assert await a.delegate(task("t-10"), prefer=["orch-c"]) is not None
            with pytest.raises(DelegationFailed):
                await a.delegate(task("t-11"), exclude=["orch-b", "orch-c"], max_attempts=1)


# -- refusals -----------------------------------------------------------------------------


async def test_refusal_reasons_on_the_wire() -> None:
    started = trio.Event()
    release = trio.Event()

    async def execute(ctx: TaskContext) -> str:
        started.set()
        await release.wait()
        return "ok"

    def admit(request: DelegationRequest) -> str | None:
        return "quota" if request.task.description == "over quota" else None

    async with node(
        "orch-b", capabilities=["testing"], executor=execute, max_concurrent_tasks=1, admit=admit
    ) as b:
        async with raw_client(b) as conn:

            async def answer(message: FederationMessage) -> DelegationResponse:
                await conn.send(message)
                response = await next_payload(conn)
                assert isinstance(response, DelegationResponse)
                return response

            wrong = delegation_to(b, "t-cap", required_capabilities=["security"])
            assert (await answer(wrong)).reason == "capability_mismatch"
            late = delegation_to(b, "t-late", timeout=0.0)
            assert (await answer(late)).reason == "deadline_exceeded"
            quota = attrs_evolve_task(delegation_to(b, "t-quota"), "over quota")
            assert (await answer(quota)).reason == "quota"
            first = await answer(delegation_to(b, "t-1", required_capabilities=["testing"]))
            assert first.accepted and first.reason is None
            await started.wait()
            assert (await answer(delegation_to(b, "t-2"))).reason == "overloaded"
            release.set()
            final = await next_payload(conn)
            assert final == TaskCallback(task_id="t-1", status="completed", result="ok")
        refused = b.statistics().tasks_refused
        assert refused == {
            "capability_mismatch": 1,
            "deadline_exceeded": 1,
            "quota": 1,
            "overloaded": 1,
        }


def attrs_evolve_task(message: FederationMessage, description: str) -> FederationMessage:
    import attrs

    request = message.payload
    assert isinstance(request, DelegationRequest)
    new = attrs.evolve(request, task=attrs.evolve(request.task, description=description))
    return attrs.evolve(message, payload=new)


async def test_a_node_without_executor_refuses_and_a_failing_admit_hook_refuses() -> None:
    def admit(request: DelegationRequest) -> str | None:
        raise RuntimeError("hook bug")

    async with node("orch-b") as b, node("orch-c", executor=echo, admit=admit) as c:
        for target, reason in ((b, "no_executor"), (c, "admit_failed")):
            async with raw_client(target) as conn:
                await conn.send(delegation_to(target))
                response = await next_payload(conn)
                assert response.reason == reason


async def test_refusals_move_on_to_the_next_candidate() -> None:
    async with node("orch-b", executor=echo, admit=lambda r: "busy"):
        async with node("orch-c", executor=echo):
            async with node("orch-a") as a:
                async with a.open_delegation(task(), prefer=["orch-b"]) as delegation:
                    assert await delegation.result() == {"echo": "lint"}
                assert [(x.peer, x.outcome, x.reason) for x in delegation.attempts] == [
                    ("orch-b", "refused", "busy"),
                    ("orch-c", "completed", None),
                ]
                assert a.statistics().rejected == 1 and a.statistics().retries == 1


async def test_every_attempt_refused_raises_with_every_attempt() -> None:
    async with node("orch-b", executor=echo, admit=lambda r: "busy"):
        async with node("orch-a") as a:
            with pytest.raises(DelegationFailed) as info:
                await a.delegate(task(), max_attempts=3)
    assert [(x.peer, x.outcome, x.reason) for x in info.value.attempts] == [
        ("orch-b", "refused", "busy")
    ] * 3


async def test_an_unreachable_static_peer_is_an_attempt() -> None:
    with trio.socket.socket() as sock:
        await sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, not listening: refused
        peers = {"ghost": f"ws://127.0.0.1:{port}/federation"}
        async with node("orch-a", peers=peers) as a:
            with pytest.raises(DelegationFailed) as info:
                await a.delegate(task(), max_attempts=2, required_capabilities=["testing"])
            # Listed with why, in every round; a reachable peer goes first.
            assert [(x.peer, x.outcome) for x in info.value.attempts] == [
                ("ghost", "unreachable")
            ] * 2
            why = f"cannot connect to ws://127.0.0.1:{port}/federation"
            for attempt in info.value.attempts:
                assert attempt.reason is not None and attempt.reason.startswith(why)
            assert f"ghost: unreachable ({why}" in str(info.value)
            async with node("orch-b", executor=echo, registry=a.registry):
                assert await a.delegate(task("t-2"), max_attempts=1) == {"echo": "lint"}
                with pytest.raises(DelegationFailed) as info:
                    await a.delegate(task("t-3"), max_attempts=1, exclude=["orch-b"])
            assert [(x.peer, x.outcome) for x in info.value.attempts] == [("ghost", "unreachable")]


# -- deadlines and cancellation -----------------------------------------------------------


async def test_cancelling_the_caller_cancels_the_executor_within_a_round_trip() -> None:
    started = trio.Event()
    cancelled_at: list[float] = []

    async def execute(ctx: TaskContext) -> None:
        started.set()
        try:
            await trio.sleep_forever()
        finally:
            cancelled_at.append(trio.current_time())

    async with node("orch-b", executor=execute) as b:
        async with node("orch-a") as a:
            with trio.CancelScope() as scope:
                async with trio.open_nursery() as nursery:

                    async def cancel_when_started() -> None:
                        await started.wait()
                        scope.cancel()

                    nursery.start_soon(cancel_when_started)
                    await a.delegate(task())
            assert scope.cancelled_caught  # trio.Cancelled propagated to the caller's scope
            cancel_time = trio.current_time()
            assert cancelled_at and cancelled_at[0] - cancel_time < 0.5
            # The executor's "cancelled" answer was expected, not illegal.
            stats = a.statistics()
            assert (stats.cancelled, stats.illegal_callbacks) == (1, 0)
        assert b.statistics().tasks_failed == 1


async def test_leaving_open_delegation_cancels_and_the_status_says_so() -> None:
    started = trio.Event()
    finished = trio.Event()

    async def execute(ctx: TaskContext) -> None:
        started.set()
        try:
            await trio.sleep_forever()
        finally:
            finished.set()

    async with node("orch-b", executor=execute):
        async with node("orch-a") as a:
            async with a.open_delegation(task()) as delegation:
                await started.wait()
            assert delegation.status is DelegationStatus.CANCELLED
            assert finished.is_set()  # by the time the block is left
            with pytest.raises(DelegationFailed):
                await delegation.result()


async def test_a_refusal_after_a_cancel_ends_the_wait_at_once() -> None:
    # The executor refuses (overloaded) a delegation its delegator has
    # already left: the refusal is its last word, no grace period is waited.
    started = trio.Event()

    async def execute(ctx: TaskContext) -> None:
        started.set()
        await trio.sleep_forever()

    async with node("orch-b", executor=execute, max_concurrent_tasks=1):
        async with node("orch-a", cancel_grace=5.0) as a, trio.open_nursery() as nursery:
            nursery.start_soon(a.delegate, task("busy"))
            await started.wait()
            began = trio.current_time()
            async with a.open_delegation(task("t-2"), max_attempts=1) as delegation:
                while delegation.assignee is None:  # sent: the refusal is a round trip away
                    await trio.sleep(0)
            assert trio.current_time() - began < 1.0
            nursery.cancel_scope.cancel()


async def test_the_deadline_travels_and_expires_on_the_executor() -> None:
    seen: list[TaskContext] = []

    async def execute(ctx: TaskContext) -> None:
        seen.append(ctx)
        await trio.sleep_forever()

    async with node("orch-b", executor=execute) as b:
        async with raw_client(b) as conn:
            await conn.send(delegation_to(b, timeout=0.2))
            assert (await next_payload(conn)).accepted
            final = await next_payload(conn)
            assert final == TaskCallback(task_id="t-1", status="failed", error="deadline exceeded")
        (ctx,) = seen
        assert ctx.origin == "raw" and ctx.request.timeout == 0.2
        assert math.isfinite(ctx.deadline)


async def test_a_caller_deadline_ends_the_delegation_as_timeout() -> None:
    budgets: list[float | None] = []

    async def execute(ctx: TaskContext) -> None:
        budgets.append(ctx.request.timeout)
        await trio.sleep_forever()

    async with node("orch-b", executor=execute):
        async with node("orch-a") as a:
            with trio.move_on_after(0.3) as scope:
                async with a.open_delegation(task()) as delegation:
                    await delegation.result()
            assert scope.cancelled_caught
            assert delegation.status is DelegationStatus.TIMEOUT
    assert budgets and budgets[0] is not None and 0.1 < budgets[0] <= 0.3


async def test_a_chain_passes_a_shrinking_deadline() -> None:
    budgets: dict[str, float | None] = {}

    async def on_b(ctx: TaskContext) -> Any:
        budgets["orch-b"] = ctx.request.timeout
        await trio.sleep(0.05)
        return await b.delegate(task("t-c"), required_capabilities=["security"])

    async def on_c(ctx: TaskContext) -> str:
        budgets["orch-c"] = ctx.request.timeout
        return "from c"

    async with node("orch-c", capabilities=["security"], executor=on_c):
        async with node("orch-b", capabilities=["testing"], executor=on_b) as b:
            async with node("orch-a") as a:
                with trio.fail_after(2):
                    result = await a.delegate(task(), required_capabilities=["testing"])
    assert result == "from c"
    b_budget, c_budget = budgets["orch-b"], budgets["orch-c"]
    assert b_budget is not None and c_budget is not None
    assert 1.5 < b_budget <= 2 and c_budget < b_budget - 0.04


async def test_max_depth_stops_a_loop() -> None:
    async def on_a(ctx: TaskContext) -> str:
        return "a ran it"

    async def on_b(ctx: TaskContext) -> Any:
        return await b.delegate(task("t-back"), required_capabilities=["research"])

    async with node("orch-a", capabilities=["research"], executor=on_a, max_depth=1) as a:
        async with node("orch-b", capabilities=["testing"], executor=on_b, max_depth=1) as b:
            with pytest.raises(DelegationFailed) as info:
                await a.delegate(task(), required_capabilities=["testing"])
    reason = info.value.attempts[-1].reason
    assert reason is not None and "DelegationFailed" in reason and "max_depth" in reason
    assert a.statistics().tasks_completed == 0


# -- once per executor ------------------------------------------------------------------


async def test_the_same_task_id_runs_once() -> None:
    runs: list[str] = []
    release = trio.Event()

    async def execute(ctx: TaskContext) -> int:
        runs.append(ctx.task.id)
        await release.wait()
        return len(runs)

    async with node("orch-b", executor=execute) as b:
        async with raw_client(b) as conn:
            await conn.send(delegation_to(b))
            assert (await next_payload(conn)).accepted
            await conn.send(delegation_to(b))  # while it runs: accepted, not run again
            assert (await next_payload(conn)).accepted
            release.set()
            assert (await next_payload(conn)).result == 1
            await conn.send(delegation_to(b))  # finished: the stored outcome again
            assert (await next_payload(conn)).accepted
            again = await next_payload(conn)
            assert (again.status, again.result) == ("completed", 1)
    assert runs == ["t-1"]


async def test_after_the_dedupe_window_a_task_id_is_new_again() -> None:
    runs: list[str] = []

    def executor(name: str) -> Callable[[TaskContext], Awaitable[str]]:
        async def execute(ctx: TaskContext) -> str:
            runs.append(name)
            return name

        return execute

    async with (
        node("orch-b", executor=executor("b"), dedupe_window=0.05),
        node("orch-c", executor=executor("c")),
        node("orch-a", dedupe_window=0.05) as a,
    ):
        assert await a.delegate(task(), prefer=["orch-b"]) == "b"
        # within the window: back to B, whose dedupe answers (no second run)
        assert await a.delegate(task(), prefer=["orch-c"]) == "b"
        await trio.sleep(0.1)
        # past it: a new task, free to go where preferred
        assert await a.delegate(task(), prefer=["orch-c"]) == "c"
    assert runs == ["b", "c"]


async def test_delegating_the_same_task_again_goes_to_the_same_executor() -> None:
    runs: list[str] = []

    async def execute(ctx: TaskContext) -> str:
        runs.append(ctx.task.id)
        return "once"

    async with node("orch-b", executor=execute), node("orch-c", executor=execute):
        async with node("orch-a") as a:
            assert await a.delegate(task()) == "once"
            assert await a.delegate(task()) == "once"
            async with a.open_delegation(task("t-2")) as first:
                with pytest.raises(ValueError, match="already"):
                    async with a.open_delegation(task("t-2")):
                        pass  # pragma: no cover
                await first.result()
    assert runs == ["t-1", "t-2"]


# -- the checked state machine against a misbehaving executor ---------------------------


async def test_illegal_callbacks_are_refused_without_changing_the_outcome() -> None:
    async def misbehave(conn: OrchestratorConnection) -> None:
        async for message in conn:
            request = message.payload
            assert isinstance(request, DelegationRequest)
            task_id = request.task.id
            for payload in (
                TaskCallback(task_id="nobody", status="progress"),  # unknown task
                DelegationResponse(task_id=task_id, accepted=True),
                DelegationResponse(task_id=task_id, accepted=True),  # a second acceptance
                TaskCallback(task_id=task_id, status="completed", result=1),
                TaskCallback(task_id=task_id, status="completed", result=2),  # second outcome
                TaskCallback(task_id=task_id, status="progress", progress=99),  # after the end
            ):
                await conn.send(envelope(payload, "raw", conn.id))

    async with raw_executor(misbehave) as listener:
        peers = {"raw": f"ws://127.0.0.1:{listener.port}/federation"}
        async with node("orch-a", peers=peers) as a:
            async with a.open_delegation(task()) as delegation:
                assert await delegation.result() == 1
                updates = [u async for u in delegation]
                with trio.fail_after(2):
                    while a.statistics().illegal_callbacks < 3:
                        await trio.sleep(0.01)
            assert delegation.status is DelegationStatus.COMPLETED
            assert await delegation.result() == 1
            assert updates == [TaskAccepted(peer="raw"), TaskCompleted(peer="raw", result=1)]
            with trio.fail_after(2):
                while a.statistics().illegal_callbacks < 4:
                    await trio.sleep(0.01)


# -- losing an executor -------------------------------------------------------------------


async def test_a_cancelled_node_hands_its_tasks_back_and_they_fail_over() -> None:
    started = trio.Event()

    async def stuck(ctx: TaskContext) -> None:
        started.set()
        await trio.sleep_forever()

    async with node("orch-c", executor=echo):
        async with node("orch-a") as a:
            async with trio.open_nursery() as nursery:
                b_scope = trio.CancelScope()

                async def run_b() -> None:
                    with b_scope:
                        async with node("orch-b", executor=stuck):
                            await trio.sleep_forever()

                nursery.start_soon(run_b)
                with trio.fail_after(2):
                    while await a.registry.get("orch-b") is None:
                        await trio.sleep(0.01)
                async with a.open_delegation(task(), prefer=["orch-b"]) as delegation:
                    await started.wait()
                    b_scope.cancel()
                    assert await delegation.result() == {"echo": "lint"}
                    updates = [u async for u in delegation]
    assert isinstance(updates[1], TaskFailedOver) and updates[1].peer == "orch-b"
    assert [x.outcome for x in delegation.attempts] == ["handed_back", "completed"]
    assert a.statistics().failed_over == 1


# -- broadcasts ---------------------------------------------------------------------------


async def test_broadcasts_reach_every_peer_once_and_expired_ones_are_dropped() -> None:
    async with node("orch-b") as b, node("orch-c") as c, node("orch-a") as a:
        with b.subscribe_broadcasts("news") as b_news, c.subscribe_broadcasts() as c_all:
            assert await a.broadcast("news", {"v": 1}, ttl=30) == 2
            with trio.fail_after(2):
                assert await b_news.receive() == BroadcastPayload(
                    topic="news", data={"v": 1}, ttl=30
                )
                assert (await c_all.receive()).topic == "news"
            await a.broadcast("other", 2)
            with trio.fail_after(2):
                assert (await c_all.receive()).topic == "other"
            async with raw_client(b, "old") as conn:
                stale = FederationMessage(
                    type="broadcast",
                    payload=BroadcastPayload(topic="news", data=0, ttl=1.0),
                    sender="old",
                    recipient="orch-b",
                    timestamp=datetime.now(UTC) - timedelta(seconds=5),
                )
                await conn.send(stale)
                with trio.fail_after(2):
                    while b.statistics().broadcasts_dropped < 1:
                        await trio.sleep(0.01)
            with pytest.raises(trio.WouldBlock):
                b_news.receive_nowait()


# -- configuration ------------------------------------------------------------------------


async def test_a_registry_url_a_given_registry_and_a_pure_client() -> None:
    registry = MemoryRegistry()
    async with node("orch-b", executor=echo, registry=registry) as b:
        assert b.registry is registry
        async with node("orch-a", registry=registry, port=None) as a:
            assert a.port is None and a.endpoint is None
            assert await a.delegate(task()) == {"echo": "lint"}
            assert [r.id for r in await registry.list_all()] == ["orch-b"]
    async with node("orch-x", registry="memory://") as x, node("orch-y") as y:
        assert x.registry is y.registry is not registry  # the shared one
        assert [r.id for r in await x.registry.list_all()] == ["orch-x", "orch-y"]


async def test_a_redis_url_federates_through_a_real_redis(redis: RedisServer) -> None:
    url = redis.url.rsplit("/", 1)[0] + "/7"  # a database of its own
    async with node("orch-b", executor=echo, registry=url) as b:
        assert isinstance(b.registry, RedisRegistry)
        async with node("orch-a", registry=url, port=None) as a:
            assert await a.delegate(task()) == {"echo": "lint"}
            (record,) = await a.registry.list_all()
            assert record.id == "orch-b" and record.endpoint == b.endpoint
    async with open_registry(url) as registry:
        assert await registry.list_all() == []  # deregistered on the way out


async def test_static_peers_without_a_registry_entry() -> None:
    async with node("orch-b", executor=echo, registry=MemoryRegistry()) as b:
        async with node("orch-a", peers={"orch-b": str(b.endpoint)}) as a:
            assert await a.delegate(task()) == {"echo": "lint"}
            (peer,) = a.peers()
            assert peer.endpoint == b.endpoint


async def test_a_peer_that_dialed_us_is_delegated_to_over_its_connection() -> None:
    async with node("orch-b", executor=echo, registry=MemoryRegistry()) as b:
        async with node(
            "orch-a",
            executor=echo,
            registry=MemoryRegistry(),
            port=None,
            peers={"orch-b": str(b.endpoint)},
        ) as a:
            assert await a.delegate(task()) == {"echo": "lint"}
            # B knows A only through A's connection, and delegates back over it
            assert await b.delegate(task("t-back")) == {"echo": "lint"}
            assert a.statistics().tasks_completed == 1


async def test_node_arguments_are_checked() -> None:
    async with node("orch-a", port=None) as a:
        with pytest.raises(TypeError, match="required_capabilities"):
            await a.delegate(task(), required_capabilities="testing")
        with pytest.raises(ValueError, match="max_attempts"):
            await a.delegate(task(), max_attempts=0)
    with pytest.raises(ValueError, match="max_depth"):
        async with node("orch-a", max_depth=0):
            pass  # pragma: no cover
    with pytest.raises(ValueError, match="cancel_grace"):
        async with node("orch-a", cancel_grace=0):
            pass  # pragma: no cover


# -- edges: lost executors, v1 peers, slow readers --------------------------------------


async def test_an_executor_whose_connection_ends_is_lost_and_the_task_fails_over() -> None:
    async def crash(conn: OrchestratorConnection) -> None:
        async for message in conn:
            request = message.payload
            assert isinstance(request, DelegationRequest)
            await conn.send(
                envelope(DelegationResponse(task_id=request.task.id, accepted=True), "raw", conn.id)
            )
            raise RuntimeError("executor crashed")  # closes the connection with 1011

    async with raw_executor(crash) as listener, node("orch-c", executor=echo) as c:
        peers = {"raw": f"ws://127.0.0.1:{listener.port}/federation"}
        async with node("orch-a", peers=peers, registry=c.registry) as a:
            async with a.open_delegation(task(), prefer=["raw"]) as delegation:
                assert await delegation.result() == {"echo": "lint"}
            outcomes = [(x.peer, x.outcome) for x in delegation.attempts]
            assert outcomes == [("raw", "lost"), ("orch-c", "completed")]


async def test_against_a_v1_peer_nothing_is_sent_and_late_callbacks_are_dropped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from trio_federation._connection import _transport

    monkeypatch.setattr(_transport, "EXTENSIONS", frozenset())  # a peer without extensions
    received: list[Any] = []
    accepted = trio.Event()
    later = trio.Event()

    async def v1(conn: OrchestratorConnection) -> None:
        assert conn.extensions == frozenset()
        async for message in conn:
            received.append(message.payload)
            if isinstance(message.payload, DelegationRequest):
                await conn.send(
                    envelope(DelegationResponse(task_id="t-1", accepted=True), "raw", conn.id)
                )
                accepted.set()
                await later.wait()
                await conn.send(
                    envelope(TaskCallback(task_id="t-1", status="completed"), "raw", conn.id)
                )

    async with raw_executor(v1) as listener:
        peers = {"raw": f"ws://127.0.0.1:{listener.port}/federation"}
        async with node("orch-a", peers=peers) as a:
            with trio.fail_after(1):  # no grace is waited for: the block is left at once
                async with a.open_delegation(task()) as delegation:
                    await accepted.wait()
            assert delegation.status is DelegationStatus.CANCELLED
            later.set()
            with trio.fail_after(2):
                while a.statistics().illegal_callbacks < 1:  # the late outcome, dropped
                    await trio.sleep(0.01)
    assert [type(p).__name__ for p in received] == ["DelegationRequest"]


async def test_a_slow_reader_loses_the_oldest_progress_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from trio_federation._delegation import _handle

    monkeypatch.setattr(_handle, "UPDATE_BUFFER", 3)

    async def execute(ctx: TaskContext) -> str:
        for percent in range(1, 6):
            await ctx.report_progress(percent)
        return "ok"

    async with node("orch-b", executor=execute), node("orch-a") as a:
        async with a.open_delegation(task()) as delegation:
            assert await delegation.result() == "ok"
            updates = [u async for u in delegation]
    assert updates == [
        TaskAccepted(peer="orch-b"),
        TaskProgress(peer="orch-b", percent=5),
        TaskCompleted(peer="orch-b", result="ok"),
    ]


async def test_a_full_subscription_drops_and_counts(monkeypatch: pytest.MonkeyPatch) -> None:
    from trio_federation._delegation import _node

    monkeypatch.setattr(_node, "BROADCAST_BUFFER", 1)
    async with node("orch-b", executor=echo) as b, node("orch-a") as a:
        with b.subscribe_broadcasts() as stream:
            for index in range(3):
                await a.broadcast("t", index)
            with trio.fail_after(2):
                while b.statistics().broadcasts_dropped < 2:
                    await trio.sleep(0.01)
            assert (await stream.receive()).data == 0


async def test_outcomes_for_a_delegator_that_left_are_dropped() -> None:
    release = trio.Event()
    done = trio.Event()

    async def execute(ctx: TaskContext) -> str:
        await release.wait()
        done.set()
        return "nobody listens"

    async with node("orch-b", executor=execute) as b:
        async with raw_client(b) as conn:
            await conn.send(delegation_to(b))
            assert (await next_payload(conn)).accepted
            await conn.send(
                envelope(DelegationResponse(task_id="zzz", accepted=True), "raw", "orch-b")
            )
        release.set()
        with trio.fail_after(2):
            await done.wait()
            while b.statistics().tasks_completed < 1:
                await trio.sleep(0.01)
        assert b.statistics().illegal_callbacks == 1


async def test_broadcast_skips_an_unreachable_peer_and_a_failing_registry_is_survived() -> None:
    class Flaky(MemoryRegistry):
        fail = False

        async def list_all(self) -> list[Any]:
            if self.fail:
                from trio_federation import RegistryUnavailable

                raise RegistryUnavailable("down")
            return await super().list_all()

    registry = Flaky()
    with trio.socket.socket() as sock:
        await sock.bind(("127.0.0.1", 0))
        dead = f"ws://127.0.0.1:{sock.getsockname()[1]}/federation"
        async with (
            node("orch-b", registry=registry),
            node("orch-a", registry=registry, peers={"ghost": dead}) as a,
        ):
            assert await a.broadcast("t") == 1
            registry.fail = True
            assert await a.broadcast("t") == 1  # the cached records and the live connection


async def test_unreachable_registered_peers_and_concurrent_dials(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from trio_federation import OrchestratorRecord
    from trio_federation._delegation import _node

    monkeypatch.setattr(_node, "DEFAULT_DEDUPE_SIZE", 1)  # the sticky-executor memory too
    registry = MemoryRegistry()
    with trio.socket.socket() as sock:
        await sock.bind(("127.0.0.1", 0))
        dead = f"ws://127.0.0.1:{sock.getsockname()[1]}/federation"
        await registry.register(OrchestratorRecord(id="ghost", endpoint=dead))
        await registry.register(OrchestratorRecord(id="no-endpoint"))  # never a candidate
        async with (
            node("orch-b", executor=echo, registry=registry),
            node("orch-a", registry=registry, port=None) as a,
        ):
            results: list[Any] = []
            failures: list[DelegationFailed] = []

            async def one(task_id: str, **options: Any) -> None:
                try:
                    results.append(await a.delegate(task(task_id), **options))
                except DelegationFailed as error:
                    failures.append(error)

            async with trio.open_nursery() as nursery:  # two dial the same peers at once
                nursery.start_soon(functools.partial(one, "t-1", prefer=["ghost"]))
                nursery.start_soon(functools.partial(one, "t-2", prefer=["ghost"]))
            assert results == [{"echo": "lint"}] * 2 and not failures
            async with trio.open_nursery() as nursery:
                for task_id in ("t-3", "t-4"):
                    nursery.start_soon(
                        functools.partial(one, task_id, exclude=["orch-b"], max_attempts=1)
                    )
            assert len(failures) == 2
            for error in failures:
                assert [(x.peer, x.outcome) for x in error.attempts] == [("ghost", "unreachable")]
            assert {p.id for p in a.peers()} == {"ghost", "no-endpoint", "orch-b"}


async def test_a_closed_subscription_and_a_closing_node_refuse_politely() -> None:
    async with node("orch-b", executor=echo) as b, node("orch-a") as a:
        with b.subscribe_broadcasts() as stream:
            stream.close()
            assert await a.broadcast("t") == 1
            await trio.sleep(0.05)  # it arrives for a closed subscription: skipped
        async with raw_client(b) as conn:
            b._closing = True  # what leaving the block does first: take no new tasks
            await conn.send(delegation_to(b))
            assert (await next_payload(conn)).reason == "draining"
        assert b.statistics().tasks_refused == {"draining": 1}


async def test_nodes_over_tls_with_shared_secrets() -> None:
    import ssl

    import trustme

    authority = trustme.CA()
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    authority.issue_cert("127.0.0.1").configure_cert(server)
    client = ssl.create_default_context()
    authority.configure_trust(client)
    key = b"k" * 32
    async with node(
        "orch-b", executor=echo, server_ssl_context=server, secrets={"orch-a": key}
    ) as b:
        assert b.endpoint is not None and b.endpoint.startswith("wss://127.0.0.1:")
        async with node("orch-a", port=None, ssl_context=client, secret=key) as a:
            assert await a.delegate(task()) == {"echo": "lint"}
        async with node("orch-z", port=None, ssl_context=client, secret=b"x" * 32) as z:
            with pytest.raises(DelegationFailed) as info:
                await z.delegate(task("t-2"), max_attempts=1)
            assert info.value.attempts[0].outcome == "unreachable"


async def test_a_peer_that_does_not_read_its_answers_is_closed_not_waited_for() -> None:
    # It delegates on and on but reads nothing: the node's answers fill the
    # window, then the queue. The node's reader never waits on a send (two
    # such nodes could wait on each other): it closes that connection.
    async with node(
        "orch-b",
        executor=None,
        limits=Limits(max_queue_size=8),
        timeouts=Timeouts(disconnect=0.3),
    ) as b:
        async with raw_client(b) as raw:
            with trio.fail_after(4):
                n = 0
                while raw.status != "disconnected":
                    with contextlib.suppress(trio.WouldBlock):
                        raw.send_nowait(delegation_to(b, f"t-{n}"))
                        n += 1
                    await trio.sleep(0)
            assert n > 64 + 8  # more answers than the window and the queue hold
            with pytest.raises(ConnectionLost):
                while True:
                    await raw.receive()  # the answers it got, then the end
        # The node itself is fine.
        async with node("orch-a") as a:
            with pytest.raises(DelegationFailed):
                await a.delegate(task("after"), max_attempts=1)
