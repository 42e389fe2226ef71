"""Run the TypeScript daemon's real federation classes (tests/interop/daemon-peer.cjs).

The daemon's code is fetched by ``tests/interop/fetch-daemon.mjs`` (``npm
pack`` of the version pinned in tests/interop/package.json, only
``dist/federation`` and ``dist/utils``) beside the ``ws`` and
``eventemitter3`` packages ``npm ci`` installs there. The process is driven
and read like the JavaScript peer (:class:`~tests.integration._jspeer.JSPeer`).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator
from typing import Final

import pytest
import trio

from ..conftest import under_ci
from ._jspeer import INTEROP_DIR, JSPeer

__all__ = ["DAEMON_SCRIPT", "daemon_node", "daemon_problems", "open_daemon_peer"]

DAEMON_SCRIPT: Final = INTEROP_DIR / "daemon-peer.cjs"
DAEMON_DIR: Final = INTEROP_DIR / "daemon"


def daemon_problems() -> tuple[str | None, list[str]]:
    """Find node and check the daemon and its two packages: ``(node, problems)``."""
    problems: list[str] = []
    node = shutil.which("node")
    if node is None:
        problems.append("`node` is not on PATH")
    manifest = json.loads((INTEROP_DIR / "package.json").read_text())
    lock = json.loads((INTEROP_DIR / "package-lock.json").read_text())
    for name in ("ws", "eventemitter3"):
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


@contextlib.asynccontextmanager
async def open_daemon_peer(node: str, *args: str) -> AsyncIterator[JSPeer]:
    """Start ``node daemon-peer.cjs *args``; always end it on exit (as ``open_js_peer``)."""
    with tempfile.TemporaryFile() as stderr:
        process = await trio.lowlevel.open_process(
            [node, str(DAEMON_SCRIPT), *args],
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
