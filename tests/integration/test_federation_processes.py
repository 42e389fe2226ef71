"""Four ``trio-federation node`` processes and one Redis: 200 tasks, one node SIGKILLed.

The test process delegates (a node with ``port=None`` on the same Redis) and
follows every task; one executor process is killed mid-task. Every task must
reach exactly one final outcome, completed, and the tasks the killed node
held must have completed elsewhere (failover on a lost connection).
"""

from __future__ import annotations

import signal
from collections import Counter, defaultdict
from pathlib import Path

import trio

from trio_federation import (
    Task,
    TaskAccepted,
    TaskCompleted,
    TaskFailed,
    TaskFailedOver,
    open_federation_node,
)

from ._cli_processes import open_nodes
from ._redis_server import RedisServer
from .conftest import open_test_registry, unique_prefix

TASKS = 200
TASK_SECONDS = 0.05
"""Each task's simulated work: short, so that 200 fit in a second or two."""
VICTIM = "exec-4"
LONG_EVERY = 7
"""Every 7th task (7 is prime to the 4 nodes, so each node gets some) runs longer..."""
LONG_SECONDS = 0.4
"""... long enough to be surely still running when the victim is killed holding it
(what the delegator reads may lag the processes by tens of ms on a busy machine)."""
KILL_WHEN_HOLDING = 2
"""The victim is killed once it holds this many accepted, unfinished long tasks."""


async def test_four_node_processes_fail_over_a_killed_ones_tasks(
    redis: RedisServer, tmp_path: Path
) -> None:
    prefix = unique_prefix()
    specs = [(f"exec-{n}", ["testing"]) for n in range(1, 5)]
    finals: Counter[str] = Counter()
    completed_by: dict[str, str] = {}
    results: dict[str, object] = {}
    accepted_by: defaultdict[str, list[str]] = defaultdict(list)
    failed_over_from: defaultdict[str, list[str]] = defaultdict(list)
    holding = {"victim": 0}
    victim_busy = trio.Event()

    with trio.fail_after(15):
        async with (
            open_nodes(
                specs,
                registry=redis.url,
                key_prefix=prefix,
                log_dir=tmp_path,
                extra=["--max-concurrent", "64"],
            ) as nodes,
            open_test_registry(redis, prefix=prefix) as registry,
            open_federation_node(
                local_id="delegator", port=None, registry=registry, strategy="round-robin"
            ) as delegator,
        ):
            assert sorted(r.id for r in await registry.list_all()) == [s[0] for s in specs]

            async def follow(number: int) -> None:
                long = number % LONG_EVERY == 0
                seconds = LONG_SECONDS if long else TASK_SECONDS
                task = Task(
                    id=f"t-{number:03d}", description="short", metadata={"seconds": seconds}
                )
                async with delegator.open_delegation(
                    task, required_capabilities=["testing"], max_attempts=8
                ) as delegation:
                    async for update in delegation:
                        match update:
                            case TaskAccepted(peer=peer):
                                accepted_by[task.id].append(peer)
                                if peer == VICTIM and long:
                                    holding["victim"] += 1
                                    if holding["victim"] >= KILL_WHEN_HOLDING:
                                        victim_busy.set()
                            case TaskFailedOver(peer=peer):
                                failed_over_from[task.id].append(peer)
                                if peer == VICTIM and long:
                                    holding["victim"] -= 1
                            case TaskCompleted(peer=peer, result=result):
                                if peer == VICTIM and long:
                                    holding["victim"] -= 1
                                finals[task.id] += 1
                                completed_by[task.id] = peer
                                results[task.id] = result
                            case TaskFailed(error=error):
                                finals[task.id] += 1
                                raise AssertionError(f"{task.id} failed: {error}")

            async def kill_when_busy() -> None:
                await victim_busy.wait()
                nodes[VICTIM].kill()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(kill_when_busy)
                for number in range(TASKS):
                    nursery.start_soon(follow, number)
                    if number % 10 == 9:
                        await trio.sleep(0.005)  # a steady stream, not one burst

            # Every task: exactly one final outcome, completed, its result from its executor.
            assert len(finals) == TASKS and set(finals.values()) == {1}
            for task_id, peer in completed_by.items():
                assert results[task_id] == {"node": peer, "task": task_id}
            # The killed node held tasks mid-run; each was failed over and completed elsewhere.
            moved = [t for t, peers in failed_over_from.items() if VICTIM in peers]
            assert moved, "the victim held no task when it was killed"
            for task_id in moved:
                # (It may have been lost on its way to the victim, before any acceptance.)
                assert completed_by[task_id] != VICTIM
                assert accepted_by[task_id][-1] == completed_by[task_id]
            held = [t for t in moved if VICTIM in accepted_by[t]]
            assert held, "the victim was killed holding no accepted task"
            survivors = [s[0] for s in specs if s[0] != VICTIM]
            assert set(completed_by.values()) >= set(survivors)
            stats = delegator.statistics()
            assert stats.completed == TASKS and stats.failed_over >= len(moved)

            # What the processes ran: each survivor ran a task at most once, and
            # ran every task it completed.
            for node_id in survivors:
                log = (tmp_path / f"{node_id}.log").read_text().split("\n")
                done = [line.split()[1] for line in log if line.startswith("done ")]
                assert len(done) == len(set(done)), node_id
                assert set(done) == {t for t, p in completed_by.items() if p == node_id}
            victim_log = (tmp_path / f"{VICTIM}.log").read_text()
            for task_id in held:
                assert f"start {task_id}" in victim_log

            # Ctrl-C on a survivor: it leaves the federation and exits 0.
            assert await nodes["exec-1"].interrupt(signal.SIGINT) == 0
            assert nodes["exec-1"].lines[-1].startswith("node exec-1 stopped: ")
            assert await nodes["exec-2"].interrupt(signal.SIGTERM) == 0
            with trio.fail_after(2):
                while "exec-1" in {r.id for r in await registry.list_all()}:
                    await trio.sleep(0.02)
