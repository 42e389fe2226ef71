"""Running ``trio-federation node`` processes in the tests: start, read, stop, always reap."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import IO

import trio

ROOT = Path(__file__).resolve().parents[2]
"""The repository: the children's working directory, so ``tests`` is importable."""
EXECUTOR = "tests.integration._executors:short"


class NodeProcess:
    """A ``python -m trio_federation node`` child; its stdout read line by line."""

    def __init__(self, node_id: str, process: trio.Process, stderr: IO[bytes]) -> None:
        self.id = node_id
        self.process = process
        self.lines: list[str] = []
        self.endpoint: str | None = None
        self._stderr = stderr
        self._buffer = b""

    def stderr(self) -> str:
        self._stderr.flush()
        self._stderr.seek(0)
        return self._stderr.read().decode("utf-8", "replace")

    async def read_line(self) -> str:
        stdout = self.process.stdout
        assert stdout is not None
        while b"\n" not in self._buffer:
            chunk = await stdout.receive_some()
            if not chunk:
                raise EOFError(
                    f"{self.id} exited ({self.process.returncode}): {self.lines}\n{self.stderr()}"
                )
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        self.lines.append(line.decode())
        return self.lines[-1]

    async def wait_ready(self) -> str:
        line = await self.read_line()
        prefix = f"node {self.id} listening on "
        assert line.startswith(prefix), (line, self.stderr())
        self.endpoint = line.removeprefix(prefix)
        return self.endpoint

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)

    async def finish(self) -> int:
        """Read the rest of stdout, wait for the exit, and return the exit status."""
        with contextlib.suppress(EOFError):
            while True:
                await self.read_line()
        return await self.process.wait()

    async def interrupt(self, signum: int = signal.SIGINT) -> int:
        """Send ``signum``, read the rest of stdout, and return the exit status."""
        self.process.send_signal(signum)
        return await self.finish()


@contextlib.asynccontextmanager
async def open_nodes(
    specs: Sequence[tuple[str, Sequence[str]]],
    *,
    registry: str,
    key_prefix: str,
    executor: str = EXECUTOR,
    log_dir: Path | None = None,
    extra: Sequence[str] = (),
) -> AsyncIterator[dict[str, NodeProcess]]:
    """Start one node process per ``(id, capabilities)``, wait until each listens.

    Every child still alive when the block is left is killed and reaped.
    """
    env = dict(os.environ)
    if log_dir is not None:
        env["FEDERATION_TEST_LOG"] = str(log_dir)
    nodes: dict[str, NodeProcess] = {}
    with contextlib.ExitStack() as files:
        try:
            for node_id, capabilities in specs:
                stderr = files.enter_context(tempfile.TemporaryFile())
                process = await trio.lowlevel.open_process(
                    [sys.executable, "-m", "trio_federation", "node", "--id", node_id,
                     "--listen", "127.0.0.1:0", "--capability", *capabilities,
                     "--registry", registry, "--key-prefix", key_prefix,
                     "--executor", executor, *extra],
                    stdout=subprocess.PIPE,
                    stderr=stderr,
                    cwd=ROOT,
                    env=env,
                )  # fmt: skip
                nodes[node_id] = NodeProcess(node_id, process, stderr)
            for node in nodes.values():
                await node.wait_ready()
            yield nodes
        finally:
            with trio.CancelScope(shield=True):
                for node in nodes.values():
                    if node.process.returncode is None:
                        node.process.kill()
                    await node.process.wait()
                    assert node.process.stdout is not None
                    await node.process.stdout.aclose()
