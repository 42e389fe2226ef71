"""The TypeScript daemon's real federation classes, driven from trio tests.

The npm package ``@wundr.io/orchestrator-daemon`` cannot be installed as a
whole (1.0.39 depends on ``@wundr.io/ai-integration@^1.0.39``, which the npm
registry does not have), and the classes under test need little:
``OrchestratorConnection`` and ``OrchestratorFederation`` need ``ws`` and
``eventemitter3``, ``FederationRegistry`` needs ``redis`` and
``eventemitter3``. So ``tests/interop/fetch-daemon.mjs`` fetches the version
pinned in ``tests/interop/package.json`` with ``npm pack``, checks its
integrity and extracts only ``package.json``, ``dist/federation`` and
``dist/utils`` into ``tests/interop/daemon/``, beside the packages ``npm ci``
installs there. ``nox -s tests`` runs both steps.

* :func:`open_daemon_peer` starts ``tests/interop/daemon-peer.cjs`` (the
  daemon's connection or coordinator), read like the JavaScript peer
  (:class:`~tests.integration._jspeer.JSPeer`).
* :func:`open_daemon_registry` starts ``tests/interop/daemon_registry.mjs``
  (which constructs the daemon's registry against a Redis URL and key prefix)
  and sends it one command at a time.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator
from typing import Any, Final

import pytest
import trio

from ..conftest import under_ci
from ._jspeer import INTEROP_DIR, JSPeer, open_js_peer

__all__ = [
    "DAEMON_SCRIPT",
    "DaemonRegistry",
    "daemon_node",
    "daemon_problems",
    "open_daemon_peer",
    "open_daemon_registry",
]

DAEMON_SCRIPT: Final = INTEROP_DIR / "daemon-peer.cjs"
DAEMON_DIR: Final = INTEROP_DIR / "daemon"
REGISTRY_JS: Final = DAEMON_DIR / "dist" / "federation" / "registry.js"
DRIVER: Final = INTEROP_DIR / "daemon_registry.mjs"
PEER_DEPENDENCIES: Final = ("ws", "eventemitter3")
"""What the daemon's connection and coordinator require."""
REGISTRY_DEPENDENCIES: Final = ("redis", "eventemitter3")
"""What the daemon's registry requires."""
REPLY_TIMEOUT: Final = 20.0


def daemon_problems(
    dependencies: tuple[str, ...] = PEER_DEPENDENCIES,
) -> tuple[str | None, list[str]]:
    """Find node and check the fetched daemon and ``dependencies``: ``(node, problems)``."""
    problems: list[str] = []
    node = shutil.which("node")
    if node is None:
        problems.append("`node` is not on PATH")
    manifest = json.loads((INTEROP_DIR / "package.json").read_text())
    lock = json.loads((INTEROP_DIR / "package-lock.json").read_text())
    for name in dependencies:
        installed = INTEROP_DIR / "node_modules" / name / "package.json"
        pinned = lock["packages"][f"node_modules/{name}"]["version"]
        if not installed.is_file():
            problems.append(f"`{name}` is not installed: run `npm ci` in {INTEROP_DIR}")
        elif json.loads(installed.read_text())["version"] != pinned:
            problems.append(f"`{name}` is not the pinned {pinned}: run `npm ci` in {INTEROP_DIR}")
    version = manifest["daemon"]["version"]
    fetched = DAEMON_DIR / "package.json"
    if not fetched.is_file() or json.loads(fetched.read_text())["version"] != version:
        problems.append(
            f"the daemon {version} is not fetched: run `node fetch-daemon.mjs` in {INTEROP_DIR}"
        )
    return node, problems


@pytest.fixture
def daemon_node() -> str:
    """Path of ``node`` when the daemon's classes can run; else skip (or fail under CI)."""
    node, problems = daemon_problems()
    if problems or node is None:
        reason = "the TypeScript daemon is unavailable: " + "; ".join(problems)
        if under_ci():
            pytest.fail(f"{reason} (required: the CI environment variable is set)", pytrace=False)
        pytest.skip(reason)
    return node


def open_daemon_peer(node: str, *args: str) -> contextlib.AbstractAsyncContextManager[JSPeer]:
    """Start ``node daemon-peer.cjs *args``; always end it on exit (as ``open_js_peer``)."""
    return open_js_peer(node, *args, script=DAEMON_SCRIPT)


class DaemonRegistry:
    """A running driver of the daemon's registry."""

    def __init__(self, process: trio.Process, stderr: Any) -> None:
        assert process.stdin is not None and process.stdout is not None
        self.process = process
        self._stdin = process.stdin
        self._stdout = process.stdout
        self._stderr = stderr
        self._buffer = bytearray()
        self.events: list[list[Any]] = []
        """The registry's events emitted during the last command."""

    async def _line(self) -> dict[str, Any]:
        with trio.fail_after(REPLY_TIMEOUT):
            while b"\n" not in self._buffer:
                chunk = await self._stdout.receive_some(65536)
                if not chunk:
                    raise AssertionError(f"the daemon driver ended:\n{self.stderr_text()}")
                self._buffer.extend(chunk)
        index = self._buffer.index(b"\n")
        line = bytes(self._buffer[:index])
        del self._buffer[: index + 1]
        reply: dict[str, Any] = json.loads(line)
        return reply

    async def call(self, op: str, *args: Any) -> Any:
        """Run ``registry[op](*args)`` in the daemon; its result as JSON (dates as ISO text).

        Raises:
            AssertionError: the call threw (its message), or the driver died.
        """
        await self._stdin.send_all(json.dumps({"op": op, "args": list(args)}).encode() + b"\n")
        reply = await self._line()
        if not reply["ok"]:
            raise AssertionError(f"daemon {op}{args!r} threw: {reply['error']}")
        self.events = reply["events"]
        return reply["result"]

    def stderr_text(self) -> str:
        self._stderr.flush()
        self._stderr.seek(0)
        text: str = self._stderr.read().decode("utf-8", "replace")
        return text


@contextlib.asynccontextmanager
async def open_daemon_registry(
    node: str,
    port: int,
    key_prefix: str,
    *,
    heartbeat_timeout: float,
    stale_timeout: float,
) -> AsyncIterator[DaemonRegistry]:
    """The daemon's ``FederationRegistry`` on ``127.0.0.1:port`` db 0 under ``key_prefix``.

    Timeouts in seconds, as ours. The driver is ended (stdin closed, then
    killed if need be) on the way out.
    """
    config = {
        "redis": {"host": "127.0.0.1", "port": port, "db": 0, "keyPrefix": key_prefix},
        "heartbeatTimeout": round(heartbeat_timeout * 1000),
        "staleTimeout": round(stale_timeout * 1000),
    }
    with tempfile.TemporaryFile() as stderr:
        process = await trio.lowlevel.open_process(
            [node, str(DRIVER), str(REGISTRY_JS), json.dumps(config)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
            cwd=INTEROP_DIR,
        )
        daemon = DaemonRegistry(process, stderr)
        try:
            ready = await daemon._line()
            assert ready.get("ready"), f"{ready}\n{daemon.stderr_text()}"
            yield daemon
        finally:
            with trio.CancelScope(shield=True):
                await daemon._stdin.aclose()
                with trio.move_on_after(5):
                    await process.wait()
                if process.returncode is None:
                    process.kill()
                await process.wait()
                await daemon._stdout.aclose()
