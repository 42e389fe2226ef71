"""Ctrl-C drains a ``trio-federation node``: its running task completes there.

NEEDS THE ``deleg2`` BRANCH (``node.drain()``, issue #14 item 3): until it is
merged, leaving a node's block cancels its running tasks (they are handed back
and fail over), so these tests fail on ``cli`` alone. The command line already
does what they need: on SIGINT/SIGTERM it leaves the node's block normally.
"""

from __future__ import annotations

import signal

import pytest
import trio

from trio_federation import (
    DelegationFailed,
    Task,
    TaskAccepted,
    TaskCompleted,
    TaskProgress,
    open_federation_node,
)

from ._cli_processes import open_nodes
from ._redis_server import RedisServer
from .conftest import open_test_registry, unique_prefix


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
async def test_an_interrupted_node_drains_its_running_task_then_exits_0(
    redis: RedisServer, signum: int
) -> None:
    prefix = unique_prefix()
    with trio.fail_after(10):
        async with (
            open_nodes([("slow", ["testing"])], registry=redis.url, key_prefix=prefix) as nodes,
            open_test_registry(redis, prefix=prefix) as registry,
            open_federation_node(local_id="delegator", port=None, registry=registry) as delegator,
        ):
            task = Task(id="t-drained", description="slow", metadata={"seconds": 0.6})
            updates = []
            async with delegator.open_delegation(task, max_attempts=1) as delegation:
                async for update in delegation:
                    updates.append(update)
                    if isinstance(update, TaskAccepted):
                        nodes["slow"].process.send_signal(signum)
                        # Once it says so (not before: a request could overtake the
                        # signal), it drains: new work is refused, or the node is no
                        # candidate (the delegator may not have read its record yet).
                        assert (await nodes["slow"].read_line()).startswith(
                            "node slow: " + signal.Signals(signum).name + ", leaving"
                        )
                        with pytest.raises(DelegationFailed) as refused:
                            await delegator.delegate(
                                Task(id="t-late", description="late"), max_attempts=1
                            )
                        [attempt] = refused.value.attempts
                        assert (attempt.outcome, attempt.reason) in {
                            ("refused", "draining"),
                            ("no_candidate", None),
                        }
                assert await delegation.result() == {"node": "slow", "task": "t-drained"}
            assert [type(u) for u in updates] == [TaskAccepted, TaskProgress, TaskCompleted]
            assert await nodes["slow"].finish() == 0
            assert nodes["slow"].lines[-1] == "node slow stopped: 1 task(s) completed, 0 failed"
            assert [r.id for r in await registry.list_all()] == []  # deregistered


async def test_a_second_interrupt_stops_a_draining_node_at_once(redis: RedisServer) -> None:
    prefix = unique_prefix()
    with trio.fail_after(10):
        async with (
            open_nodes([("slow", ["testing"])], registry=redis.url, key_prefix=prefix) as nodes,
            open_test_registry(redis, prefix=prefix) as registry,
            open_federation_node(local_id="delegator", port=None, registry=registry) as delegator,
        ):
            task = Task(id="t-long", description="long", metadata={"seconds": 30})
            async with delegator.open_delegation(task, max_attempts=1) as delegation:
                async for update in delegation:
                    if isinstance(update, TaskAccepted):
                        break
                slow = nodes["slow"]
                slow.process.send_signal(signal.SIGINT)
                assert (await slow.read_line()).startswith("node slow: SIGINT, leaving")
                await trio.sleep(0.3)  # draining: the 30 s task goes on
                assert slow.process.returncode is None
                slow.process.send_signal(signal.SIGINT)
                assert await slow.finish() == 130
                assert "node slow: SIGINT again, stopping at once" in slow.lines
                # Cancelled, it handed the task back: with no one else, it fails.
                with pytest.raises(DelegationFailed, match="handed_back"):
                    await delegation.result()
