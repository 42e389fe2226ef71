"""Run the JavaScript interop peer (tests/interop/peer.mjs) from trio tests.

The peer prints one JSON object per stdout line. :class:`JSPeer` reads those
lines on demand (no background task, so no nursery wraps the test body), keeps
them all in ``events`` for the failure transcript, and always ends the process:
:func:`open_js_peer` terminates it (SIGTERM, then SIGKILL) on the way out, even
when the test failed or was cancelled.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, Final

import trio

__all__ = [
    "INTEROP_DIR",
    "PEER_SCRIPT",
    "JSEvent",
    "JSPeer",
    "js_peer_problems",
    "open_js_peer",
]

INTEROP_DIR: Final = Path(__file__).resolve().parent.parent / "interop"
PEER_SCRIPT: Final = INTEROP_DIR / "peer.mjs"
TERMINATE_GRACE: Final = 3.0
"""Seconds the peer gets to exit after SIGTERM before it is killed."""

JSEvent = dict[str, Any]
"""One stdout line of the peer, decoded."""


def js_peer_problems() -> tuple[str | None, list[str]]:
    """Find node and check the peer's dependencies: ``(node, problems)``.

    ``problems`` is empty when the peer can run.
    """
    problems: list[str] = []
    node = shutil.which("node")
    if node is None:
        problems.append("`node` is not on PATH")
    if not PEER_SCRIPT.is_file():
        problems.append(f"{PEER_SCRIPT} is missing")
    installed = INTEROP_DIR / "node_modules" / "ws" / "package.json"
    if not installed.is_file():
        problems.append(f"`ws` is not installed: run `npm ci` in {INTEROP_DIR}")
    else:
        lock = json.loads((INTEROP_DIR / "package-lock.json").read_text())
        pinned = lock["packages"]["node_modules/ws"]["version"]
        version = json.loads(installed.read_text())["version"]
        if version != pinned:
            problems.append(
                f"installed ws {version} is not the pinned {pinned}: run `npm ci` in {INTEROP_DIR}"
            )
    return node, problems


class JSPeer:
    """A running ``peer.mjs`` and the lines it printed so far."""

    def __init__(self, process: trio.Process, stderr: Any, args: tuple[str, ...]) -> None:
        assert process.stdout is not None
        self.process = process
        self.args = args
        self.events: list[JSEvent] = []
        self.raw_lines: list[str] = []
        self.last_raw = ""
        """The raw stdout line of the last match of :meth:`expect`."""
        self._stdout = process.stdout
        self._stderr = stderr
        self._buffer = bytearray()
        self._eof = False
        self._cursor = 0

    # -- reading ----------------------------------------------------------------

    async def _read_line(self) -> bool:
        """Read one more stdout line into ``events``; False at end of output."""
        while b"\n" not in self._buffer:
            if self._eof:
                if not self._buffer:
                    return False
                self._buffer.extend(b"\n")  # a last line without its newline
                break
            chunk = await self._stdout.receive_some(65536)
            if not chunk:
                self._eof = True
            self._buffer.extend(chunk)
        index = self._buffer.index(b"\n")
        raw = bytes(self._buffer[:index]).decode("utf-8", "replace")
        del self._buffer[: index + 1]
        try:
            event = json.loads(raw)
        except ValueError:
            event = None
        if not isinstance(event, dict):
            event = {"event": "unparsable", "line": raw}
        self.events.append(event)
        self.raw_lines.append(raw)
        return True

    async def expect(self, event: str, where: Callable[[JSEvent], bool] | None = None) -> JSEvent:
        """Wait for the next line of kind ``event`` (and matching ``where``).

        Lines are consumed in order: the search starts after the previous match,
        so two calls find two different lines. Skipped lines stay in ``events``.

        Raises:
            AssertionError: the peer reported an error, or its output ended first.
        """
        while True:
            while self._cursor < len(self.events):
                line = self.events[self._cursor]
                self._cursor += 1
                if line.get("event") == event and (where is None or where(line)):
                    self.last_raw = self.raw_lines[self._cursor - 1]
                    return line
                if line.get("event") in ("error", "malformed", "unparsable") and event not in (
                    "error",
                    "malformed",
                ):
                    raise AssertionError(
                        f"JS peer reported {line!r} while waiting for {event!r}\n"
                        + self.transcript()
                    )
            if not await self._read_line():
                raise AssertionError(
                    f"JS peer output ended while waiting for {event!r}\n{self.transcript()}"
                )

    async def received(
        self, type: str, where: Callable[[dict[str, Any]], bool] | None = None
    ) -> dict[str, Any]:
        """Wait for the next message of ``type`` the peer received; return it."""

        def matches(line: JSEvent) -> bool:
            message = line["message"]
            return bool(message.get("type") == type and (where is None or where(message)))

        line = await self.expect("received", matches)
        message: dict[str, Any] = line["message"]
        return message

    async def wait_exit(self) -> int:
        """Read the rest of the output, wait for the process to end: its exit code."""
        while await self._read_line():
            pass
        return await self.process.wait()

    async def terminate(self) -> int:
        """Send SIGTERM (a server's normal end), then as :meth:`wait_exit`."""
        if self.process.returncode is None:
            self.process.terminate()
        return await self.wait_exit()

    def stderr_text(self) -> str:
        """What the peer wrote to stderr so far."""
        self._stderr.flush()
        self._stderr.seek(0)
        text: str = self._stderr.read().decode("utf-8", "replace")
        self._stderr.seek(0, os.SEEK_END)
        return text

    def transcript(self) -> str:
        """The command, every line read so far and stderr: for failure messages."""
        lines = "\n".join(f"  {json.dumps(e)}" for e in self.events) or "  (none)"
        stderr = self.stderr_text().strip() or "(empty)"
        return (
            f"JS peer {' '.join(self.args)} (exit code {self.process.returncode}):\n"
            f"stdout lines:\n{lines}\nstderr: {stderr}"
        )

    async def _stop(self) -> None:
        """End the process whatever its state: SIGTERM, then SIGKILL."""
        process = self.process
        if process.returncode is None:
            process.terminate()
            with trio.move_on_after(TERMINATE_GRACE):
                await process.wait()
        if process.returncode is None:
            process.kill()
        await process.wait()  # reaps it (at once after SIGKILL)
        await self._stdout.aclose()


@contextlib.asynccontextmanager
async def open_js_peer(node: str, *args: str, script: Path = PEER_SCRIPT) -> AsyncIterator[JSPeer]:
    """Start ``node peer.mjs *args`` in tests/interop; always end it on exit.

    On the way out the process is terminated (if still running) and reaped, in a
    shielded scope so that a timed-out or failed test still cleans up.
    """
    with tempfile.TemporaryFile() as stderr:
        process = await trio.lowlevel.open_process(
            [node, str(script), *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=stderr,
            cwd=INTEROP_DIR,
        )
        peer = JSPeer(process, stderr, args)
        try:
            yield peer
        finally:
            with trio.CancelScope(shield=True):
                await peer._stop()
