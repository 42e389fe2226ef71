"""Three orchestrator processes find each other through one Redis; a killed one vanishes."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import trio

from trio_federation import OrchestratorQuery

from ._redis_server import RedisServer
from .conftest import open_test_registry, unique_prefix

NODE = Path(__file__).parent / "_registry_node.py"
HEARTBEAT_TIMEOUT = 0.5
STALE_TIMEOUT = 1.5


class Node:
    def __init__(self, process: trio.Process) -> None:
        self.process = process
        self.lines: list[str] = []
        self._buffer = b""

    async def read_line(self) -> str:
        assert self.process.stdout is not None
        while b"\n" not in self._buffer:
            chunk = await self.process.stdout.receive_some()
            if not chunk:
                raise EOFError(f"process exited with {self.process.returncode}: {self.lines}")
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        self.lines.append(line.decode())
        return self.lines[-1]


async def test_three_processes_find_each_other_and_a_killed_one_vanishes(
    redis: RedisServer,
) -> None:
    prefix = unique_prefix()
    roles = [("orch-1", "code-generation", "delegator"), ("orch-2", "testing", "worker"),
             ("orch-3", "testing", "worker")]  # fmt: skip
    nodes: dict[str, Node] = {}
    try:
        for me, caps, role in roles:
            process = await trio.lowlevel.open_process(
                [sys.executable, str(NODE), redis.url, prefix, me, caps, role,
                 str(HEARTBEAT_TIMEOUT), str(STALE_TIMEOUT)],
                stdout=subprocess.PIPE,
            )  # fmt: skip
            nodes[me] = Node(process)
        with trio.fail_after(20):
            for node in nodes.values():
                assert await node.read_line() == "ready"
            verdict = await nodes["orch-1"].read_line()
        assert verdict in ("accepted orch-2 True", "accepted orch-3 True")

        async with open_test_registry(
            redis, prefix=prefix, heartbeat_timeout=HEARTBEAT_TIMEOUT, stale_timeout=STALE_TIMEOUT
        ) as registry:
            records = await registry.list_all()
            assert [r.id for r in records] == ["orch-1", "orch-2", "orch-3"]
            endpoints = {r.endpoint for r in records}
            assert len(endpoints) == 3
            assert all(e is not None and e.startswith("ws://127.0.0.1:") for e in endpoints)

            nodes["orch-3"].process.send_signal(signal.SIGKILL)
            killed_at = trio.current_time()
            testing = OrchestratorQuery(capabilities=["testing"])
            # No one deregistered it: it is still there until its lease runs out.
            assert [r.id for r in await registry.query(testing)] == ["orch-2", "orch-3"]
            with trio.fail_after(STALE_TIMEOUT + 1.0):
                while [r.id for r in await registry.query(testing)] != ["orch-2"]:
                    await trio.sleep(0.05)
            vanished_after = trio.current_time() - killed_at
            assert vanished_after <= STALE_TIMEOUT + 0.2
            assert vanished_after >= HEARTBEAT_TIMEOUT  # expiry, not a deregistration
            assert [r.id for r in await registry.healthy()] == ["orch-1", "orch-2"]
    finally:
        for node in nodes.values():
            if node.process.returncode is None:
                node.process.kill()
            await node.process.wait()
