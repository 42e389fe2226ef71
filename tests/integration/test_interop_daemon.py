"""Against the TypeScript daemon's *real* federation code (``@wundr.io/orchestrator-daemon``).

tests/interop/daemon-peer.cjs ``require``\\ s the daemon's own
``dist/federation/connection.js`` (``OrchestratorConnection``) and
``dist/federation/coordinator.js`` (``OrchestratorFederation``), fetched at the
version pinned in tests/interop/package.json (see ``fetch-daemon.mjs``):

* its OrchestratorConnection both as the server our node dials and as the
  client that dials our node, delegating both ways; its acceptances carry our
  own id in ``from`` (the daemon's convention), and well past
  ``max_violations`` of them the link stays up;
* its coordinator delegating to our node in its own dialect: accepted then
  completed, refused as overloaded and for a capability, a broadcast, the
  shared context.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest
import trio

from trio_federation import (
    BroadcastPayload,
    MemoryRegistry,
    SharedContext,
    Task,
    TaskContext,
    open_federation_node,
)

from ._daemon import daemon_node, open_daemon_peer

__all__ = ["daemon_node"]  # the fixture

TIME_LIMIT = 10.0
"""Absolute bound on every test, in seconds."""
COUNT = 105
"""Delegations each way: their acceptances are far more than max_violations (20)."""
SELF_ADDRESSED = "as the TypeScript daemon does"


def node_execute(by: str) -> Any:
    async def execute(ctx: TaskContext) -> dict[str, str]:
        await ctx.report_progress(50)
        return {"by": by, "task": ctx.task.id}

    return execute


def check_daemon_side(done: dict[str, Any]) -> None:
    """The daemon's connection saw every task of its own accepted, progress, completed."""
    counts = done["counts"]
    assert counts["accepted"] == counts["progress"] == counts["completed"] == COUNT
    assert (counts["failed"], counts["errors"]) == (0, 0)
    assert counts["delegations"] == COUNT
    assert done["status"]["errors"] == 0


def check_self_addressed(node: Any, peer: str, caplog: pytest.LogCaptureFixture) -> None:
    connection = node._live_connection(peer)
    assert connection is not None
    # Its acceptances and callbacks (from = this.id = our id), and every other
    # of its delegations: all taken as the peer's, none refused.
    assert connection.self_addressed == 3 * COUNT + COUNT // 2
    assert connection.get_status().errors == 0
    assert connection.is_healthy()
    said = [r for r in caplog.records if SELF_ADDRESSED in r.getMessage()]
    assert len(said) == 1 and said[0].levelno == logging.DEBUG


async def delegate_all(node: Any, prefix: str) -> list[Any]:
    results: list[Any] = [None] * COUNT

    async def one(i: int) -> None:
        results[i] = await node.delegate(Task(id=f"{prefix}-{i}", description="for the daemon"))

    async with trio.open_nursery() as nursery:
        for i in range(COUNT):
            nursery.start_soon(one, i)
    return results


async def test_node_dials_the_daemons_connection_and_both_delegate(
    daemon_node: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="trio_federation.connection")
    with trio.fail_after(TIME_LIMIT):
        async with open_daemon_peer(
            daemon_node, "connection-server", "--id", "ts-orch", "--count", str(COUNT)
        ) as peer:
            port = (await peer.expect("listening"))["port"]
            async with open_federation_node(
                local_id="py-node",
                registry=MemoryRegistry(),
                peers={"ts-orch": f"ws://127.0.0.1:{port}/federation"},
                port=None,
                executor=node_execute("py-node"),
                max_concurrent_tasks=COUNT,
            ) as node:
                results = await delegate_all(node, "py-task")
                assert results == [{"by": "ts-orch"}] * COUNT
                check_daemon_side(await peer.expect("done"))
                check_self_addressed(node, "ts-orch", caplog)
                stats = node.statistics()
                assert (stats.completed, stats.illegal_callbacks, stats.rejected) == (COUNT, 0, 0)
                assert stats.tasks_completed == COUNT
            closed = await peer.expect("closed")
            assert closed["code"] == 1000  # our graceful end, never 1008
            assert await peer.terminate() == 0


async def test_the_daemons_connection_dials_our_node_and_both_delegate(
    daemon_node: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="trio_federation.connection")
    with trio.fail_after(TIME_LIMIT):
        async with open_federation_node(
            local_id="py-node",
            registry=MemoryRegistry(),
            executor=node_execute("py-node"),
            max_concurrent_tasks=COUNT,
        ) as node:
            async with open_daemon_peer(
                daemon_node,
                *("connection-client", "--url", str(node.endpoint), "--id", "ts-orch"),
                *("--remote", "py-node", "--count", str(COUNT)),
            ) as peer:
                await peer.expect("open")
                while not any(p.id == "ts-orch" and p.status for p in node.peers()):
                    await trio.sleep(0.01)
                results = await delegate_all(node, "py-task")
                assert results == [{"by": "ts-orch"}] * COUNT
                check_daemon_side(await peer.expect("done"))
                check_self_addressed(node, "ts-orch", caplog)
                assert node.statistics().illegal_callbacks == 0
                assert await peer.terminate() == 0  # the daemon's disconnect()
            closed = await peer.expect("closed")
            assert closed["code"] == 1000


async def test_the_daemons_coordinator_delegates_to_a_node(daemon_node: str) -> None:
    release = trio.Event()
    origins: list[str] = []

    async def execute(ctx: TaskContext) -> dict[str, str]:
        origins.append(ctx.origin)
        if ctx.task.description == "block":
            await release.wait()
        return {"done": ctx.task.id}

    def received(event: str, task_id: str) -> Any:
        def matches(line: dict[str, Any]) -> bool:
            return bool(line.get("taskId", line.get("sessionId")) == task_id)

        return peer.expect(event, matches)

    with trio.fail_after(TIME_LIMIT):
        async with open_federation_node(
            local_id="py-node",
            capabilities=["code-generation", "testing"],
            registry=MemoryRegistry(),
            executor=execute,
            max_concurrent_tasks=1,
        ) as node:
            node.shared_context = lambda: SharedContext(scratchpad={"notes": "from py"})
            with node.subscribe_broadcasts() as broadcasts:
                async with open_daemon_peer(
                    daemon_node,
                    *("coordinator", "--url", str(node.endpoint)),
                    *("--id", "ts-coord", "--remote", "py-node"),
                ) as peer:
                    # Accepted (requiredCapabilities in the object form), then completed.
                    first = (await received("delegated", "coord-1"))["result"]
                    assert (first["success"], first["sessionId"]) == (True, "coord-1")
                    # The node's one slot is taken: the next is refused as overloaded.
                    assert (await received("delegated", "coord-2"))["result"]["success"]
                    refused = (await received("delegated", "coord-3"))["result"]
                    assert (refused["success"], refused["reason"]) == (False, "overloaded")
                    assert refused["error"] == "py-node refused the task: overloaded"
                    release.set()  # the coordinator waits for coord-2's task:completed
                    # A specialization the node lacks: its own check refuses.
                    mismatch = (await received("delegated", "coord-4"))["result"]
                    assert (mismatch["success"], mismatch["reason"]) == (
                        False,
                        "capability_mismatch",
                    )
                    context = await peer.expect("context")
                    assert context["context"] == {"scratchpad": {"notes": "from py"}}
                    done = await peer.expect("done")
                    assert await peer.wait_exit() == 0
                custom = await broadcasts.receive()
                assert custom == BroadcastPayload(topic="custom", data={"hello": "py"})
                shutdown = await broadcasts.receive()  # the coordinator's shutdown()
                assert shutdown.topic == "shutdown_notice"
            stats = node.statistics()
    metrics = done["metrics"]
    assert (metrics["totalDelegations"], metrics["successfulDelegations"]) == (4, 2)
    assert (metrics["failedDelegations"], metrics["totalContextTransfers"]) == (2, 1)
    # Our status_update kept it "connected" (the coordinator refuses any other
    # status itself); our heartbeat frames reached it.
    assert done["status"] == "connected"
    assert any(e.get("event") == "heartbeat" for e in peer.events)
    # (task:completed may come before the line of its delegation: both are read at once.)
    ended = [(e["event"], e["sessionId"]) for e in peer.events if e["event"].startswith("task:")]
    assert ended == [("task:completed", "coord-1"), ("task:completed", "coord-2")]
    assert dict(stats.tasks_refused) == {"overloaded": 1, "capability_mismatch": 1}
    assert stats.tasks_completed == 2
    assert origins == ["ts-coord", "ts-coord"]
