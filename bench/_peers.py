"""Starting, reading and stopping the peer processes of a run (``bench.worker``).

Every wait is bounded: a run that does not finish within its timeout raises
:exc:`PeerError`, and a child still alive when its block is left is killed.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import IO, Any, Final

import attrs
import trio

ROOT: Final = Path(__file__).resolve().parent.parent
"""The directory holding the ``bench`` package: the children's working directory."""
EXIT_GRACE: Final = 5.0
"""Seconds a child may take to exit by itself after its last report."""
FAILURE_EXIT_WAIT: Final = 2.0
"""Seconds to wait for a failed child's exit before describing the failure."""
STDERR_TAIL: Final = 2000
"""Characters of a failed child's stderr quoted in the error."""


class PeerError(Exception):
    """A peer process failed, hung or reported an error."""


class Peer:
    """A running ``python -m bench.worker`` child that reports JSON lines on stdout."""

    def __init__(self, name: str, process: trio.Process, stderr: IO[bytes]) -> None:
        self.name = name
        self.process = process
        self._stderr = stderr
        self._buffer = b""

    def stderr_tail(self) -> str:
        """The end of what the child wrote to stderr (its logs)."""
        self._stderr.flush()
        self._stderr.seek(0)
        text = self._stderr.read().decode("utf-8", "replace").strip()
        return text[-STDERR_TAIL:]

    async def _failure(self, what: str) -> PeerError:
        with trio.move_on_after(FAILURE_EXIT_WAIT):
            await self.process.wait()  # for its exit status and its last logs
        tail = self.stderr_tail()
        code = self.process.returncode
        status = "still running" if code is None else f"exit status {code}"
        return PeerError(f"{self.name}: {what} ({status})" + (f"\n{tail}" if tail else ""))

    async def _line(self) -> bytes:
        stdout = self.process.stdout
        assert stdout is not None
        while b"\n" not in self._buffer:
            chunk = await stdout.receive_some(65536)
            if not chunk:
                raise await self._failure("exited without reporting")
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line

    async def expect(self, event: str) -> dict[str, Any]:
        """The next report, which must be ``event`` (an ``error`` report raises)."""
        line = await self._line()
        try:
            report: dict[str, Any] = json.loads(line)
        except ValueError:
            raise await self._failure(
                f"wrote something else than a report: {line[:200]!r}"
            ) from None
        if report.get("event") == "error":
            raise await self._failure(str(report.get("error")))
        if report.get("event") != event:
            raise await self._failure(f"expected a {event!r} report, got {line[:200]!r}")
        return report


WORKER: Final = (sys.executable, "-m", "bench.worker")
"""The command of a Python peer, before its arguments."""


@attrs.frozen
class PeerCommand:
    """How to start a peer: the command before its arguments, and its environment.

    A command other than :data:`WORKER` takes no ``--cpu``: it is pinned from
    here, as soon as it is started (before it reports ready).
    """

    argv: tuple[str, ...] = WORKER
    env: Mapping[str, str] | None = None


@contextlib.asynccontextmanager
async def spawn_peer(
    name: str,
    arguments: list[str],
    command: PeerCommand | None = None,
    cpu: int | None = None,
) -> AsyncIterator[Peer]:
    """Run ``command`` with ``arguments``; kill it if it is alive at the end.

    Its stdin stays open (and empty) while the block runs: the child stops by
    itself when it closes, should this process die without killing it.
    """
    command = command or PeerCommand()
    with tempfile.TemporaryFile() as stderr:
        process = await trio.lowlevel.open_process(
            [*command.argv, *arguments],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
            cwd=ROOT,
            env=command.env,
        )
        if cpu is not None:  # from here: no preexec_fn in a process that has threads
            os.sched_setaffinity(process.pid, {cpu})
        peer = Peer(name, process, stderr)
        try:
            yield peer
            with trio.move_on_after(EXIT_GRACE):
                await process.wait()
        finally:
            if process.returncode is None:
                process.kill()
            with trio.CancelScope(shield=True), trio.move_on_after(EXIT_GRACE):
                await process.wait()
            for stream in (process.stdin, process.stdout):
                if stream is not None:
                    with trio.CancelScope(shield=True):
                        await stream.aclose()


def pick_cpus() -> tuple[int, int] | None:
    """Two CPUs for the listener and the dialer, or None where pinning is not possible."""
    if not hasattr(os, "sched_getaffinity"):
        return None
    available = sorted(os.sched_getaffinity(0))
    if len(available) < 2:
        return None
    return available[0], available[1]


async def run_pair(
    impl: str,
    mode: str,
    *,
    count: int,
    warmup: int,
    time_limit: float,
    cpus: tuple[int, int] | None = None,
    command: PeerCommand | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """One measurement: a listener child and a dialer child; their two results.

    With ``cpus``, the listener is pinned to the first and the dialer to the
    second (otherwise the kernel may put both on one CPU in one run and on two
    in the next, which halves or doubles the figures).

    Raises:
        PeerError: a child failed, or the whole run took longer than ``time_limit`` seconds.
    """
    command = command or PeerCommand()
    common = ["--mode", mode, "--count", str(count), "--warmup", str(warmup)]
    common += ["--timeout", f"{time_limit:g}"]
    if command.argv == WORKER:
        common += ["--impl", impl]
    listener_args, dialer_args = ["serve", *common], ["dial", *common]
    listener_cpu = dialer_cpu = None
    if cpus is not None and command.argv == WORKER:
        listener_args += ["--cpu", str(cpus[0])]
        dialer_args += ["--cpu", str(cpus[1])]
    elif cpus is not None:
        listener_cpu, dialer_cpu = cpus
    phase = "starting the listener"
    try:
        with trio.fail_after(time_limit + EXIT_GRACE):
            async with spawn_peer(
                f"{impl} {mode} listener", listener_args, command, listener_cpu
            ) as listener:
                ready = await listener.expect("ready")
                phase = "running the dialer"
                dialer_args += ["--port", str(ready["port"])]
                async with spawn_peer(
                    f"{impl} {mode} dialer", dialer_args, command, dialer_cpu
                ) as dialer:
                    dialed = await dialer.expect("result")
                phase = "waiting for the listener's result"
                served = await listener.expect("result")
    except trio.TooSlowError:
        raise PeerError(f"{impl} {mode}: timed out while {phase}") from None
    return served, dialed
