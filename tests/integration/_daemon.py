"""The TypeScript daemon's real ``FederationRegistry``, driven from trio tests.

The npm package ``@wundr.io/orchestrator-daemon`` cannot be installed as a
whole (1.0.39 depends on ``@wundr.io/ai-integration@^1.0.39``, which the npm
registry does not have), and its registry needs only ``redis`` and
``eventemitter3``. So ``python -m tests.integration._daemon`` fetches the
pinned tarball with ``npm pack``, checks it against the pinned integrity and
extracts ``dist/federation/registry.js`` (and ``package.json``) under
``tests/interop/daemon/{version}/``; ``tests/interop/package.json`` pins the
two dependencies at the versions the daemon's ranges resolve to (``npm ci``).
``nox -s tests`` runs both steps.

:func:`open_daemon_registry` starts ``tests/interop/daemon_registry.mjs``
(which constructs that registry against a Redis URL and key prefix) and sends
it one command at a time.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Final

import trio

from ._jspeer import INTEROP_DIR

__all__ = [
    "DAEMON_INTEGRITY",
    "DAEMON_PACKAGE",
    "DAEMON_VERSION",
    "DaemonRegistry",
    "daemon_problems",
    "fetch_daemon",
    "open_daemon_registry",
]

DAEMON_PACKAGE: Final = "@wundr.io/orchestrator-daemon"
DAEMON_VERSION: Final = "1.0.39"
DAEMON_INTEGRITY: Final = (
    "sha512-gdT3v6MHHQC6uZ27ZoluIx2QnKcechem4OklNHVCc"
    "sw3ETtIn/YfNJEUsImiaO/ZLSiUnB1Ypa6WxlbnxBNNMQ=="
)
"""The npm registry's ``dist.integrity`` of the pinned tarball."""
DAEMON_DIR: Final = INTEROP_DIR / "daemon" / DAEMON_VERSION
REGISTRY_JS: Final = DAEMON_DIR / "dist" / "federation" / "registry.js"
DRIVER: Final = INTEROP_DIR / "daemon_registry.mjs"
MEMBERS: Final = ("package/package.json", "package/dist/federation/registry.js")
"""What we extract: registry.js requires only ``redis`` and ``eventemitter3``."""
DEPENDENCIES: Final = ("redis", "eventemitter3")
REPLY_TIMEOUT: Final = 20.0


def _integrity(path: Path) -> str:
    digest = hashlib.sha512(path.read_bytes()).digest()
    return "sha512-" + base64.b64encode(digest).decode()


def fetch_daemon() -> Path:
    """Fetch and extract the pinned daemon's registry, unless already there: its registry.js.

    Raises:
        RuntimeError: npm failed or the tarball is not the pinned one.
    """
    if REGISTRY_JS.is_file():
        return REGISTRY_JS
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError("`npm` is not on PATH")
    with tempfile.TemporaryDirectory(prefix="daemon-pack-") as scratch:
        packed = subprocess.run(
            [npm, "pack", "--json", "--pack-destination", scratch,
             f"{DAEMON_PACKAGE}@{DAEMON_VERSION}"],
            capture_output=True, text=True, check=False, cwd=scratch, timeout=300,
        )  # fmt: skip
        if packed.returncode != 0:
            raise RuntimeError(f"npm pack failed: {packed.stderr.strip()[-2000:]}")
        tarball = Path(scratch) / json.loads(packed.stdout)[0]["filename"]
        found = _integrity(tarball)
        if found != DAEMON_INTEGRITY:
            raise RuntimeError(f"{tarball.name} is {found}, not the pinned {DAEMON_INTEGRITY}")
        staging = Path(scratch) / "extracted"
        with tarfile.open(tarball) as archive:
            for name in MEMBERS:
                source = archive.extractfile(name)
                assert source is not None, name
                target = staging / name.removeprefix("package/")
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(source.read())
        DAEMON_DIR.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(DAEMON_DIR, ignore_errors=True)
        staging.rename(DAEMON_DIR)
    return REGISTRY_JS


def daemon_problems() -> tuple[str | None, list[str]]:
    """Find node and check the daemon's registry and its dependencies: ``(node, problems)``."""
    problems: list[str] = []
    node = shutil.which("node")
    if node is None:
        problems.append("`node` is not on PATH")
    if not REGISTRY_JS.is_file():
        problems.append(f"{REGISTRY_JS} is missing: run `python -m tests.integration._daemon`")
    else:
        version = json.loads((DAEMON_DIR / "package.json").read_text())["version"]
        if version != DAEMON_VERSION:
            problems.append(f"{DAEMON_DIR} holds {version}, not {DAEMON_VERSION}")
    lock = json.loads((INTEROP_DIR / "package-lock.json").read_text())["packages"]
    for name in DEPENDENCIES:
        installed = INTEROP_DIR / "node_modules" / name / "package.json"
        pinned = lock[f"node_modules/{name}"]["version"]
        if not installed.is_file():
            problems.append(f"`{name}` is not installed: run `npm ci` in {INTEROP_DIR}")
        elif (version := json.loads(installed.read_text())["version"]) != pinned:
            problems.append(f"installed {name} {version} is not the pinned {pinned}: `npm ci`")
    return node, problems


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


def main() -> int:
    """Fetch the pinned daemon's registry (if missing) and say where it is."""
    try:
        path = fetch_daemon()
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        print(f"could not fetch {DAEMON_PACKAGE}@{DAEMON_VERSION}: {exc}")
        return 1
    print(f"{DAEMON_PACKAGE}@{DAEMON_VERSION} registry: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
