"""The TypeScript daemon's own ``OrchestratorConnection``, for the benchmark.

:func:`find_daemon` makes it runnable once and caches it: ``npm pack`` fetches
the pinned ``@wundr.io/orchestrator-daemon`` tarball (checked against its
published sha512 integrity) into a cache directory, and only
``dist/federation/connection.js`` (about 12 KB; it requires nothing but
``events`` and ``ws``) is extracted from it; the tarball is deleted. ``ws`` is
the one the interop tests pin in ``tests/interop/package-lock.json`` (installed
with ``npm ci`` there when missing). ``bench/js/daemon_peer.mjs`` drives it.
Without ``node`` or ``npm``, or offline on the first run, the daemon's rows are
left out and the reason is printed.
"""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path
from typing import Final

import attrs

from ._peers import ROOT

PACKAGE: Final = "@wundr.io/orchestrator-daemon"
VERSION: Final = "1.0.39"
INTEGRITY: Final = (
    "sha512-gdT3v6MHHQC6uZ27ZoluIx2QnKcechem4OklNHVCcsw3ETtIn/"
    "YfNJEUsImiaO/ZLSiUnB1Ypa6WxlbnxBNNMQ=="
)
"""The registry's ``dist.integrity`` of that version's tarball."""
MEMBER: Final = "package/dist/federation/connection.js"
INTEROP: Final = ROOT / "tests" / "interop"
PEER_SCRIPT: Final = ROOT / "bench" / "js" / "daemon_peer.mjs"
NPM_TIMEOUT: Final = 300.0


def cache_dir() -> Path:
    """Where the extracted file is kept (``$XDG_CACHE_HOME`` or ``~/.cache``)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "trio-federation-bench" / f"orchestrator-daemon-{VERSION}"


@attrs.frozen
class Daemon:
    """How to start a daemon peer: ``node``, the script, the module, and NODE_PATH."""

    node: str
    connection: Path
    node_path: Path

    def command(self, *node_options: str) -> list[str]:
        """The peer's command line, before its role and options (``node_options``: node's)."""
        return [self.node, *node_options, str(PEER_SCRIPT)]

    def env(self) -> dict[str, str]:
        """The peer's environment: ``ws`` found through NODE_PATH."""
        return {**os.environ, "NODE_PATH": str(self.node_path)}


def _integrity(path: Path) -> str:
    digest = hashlib.sha512(path.read_bytes()).digest()
    return "sha512-" + base64.b64encode(digest).decode()


def _fetch_connection(npm: str, target: Path) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        subprocess.run(
            [npm, "pack", f"{PACKAGE}@{VERSION}", "--pack-destination", scratch, "--silent"],
            check=True,
            capture_output=True,
            timeout=NPM_TIMEOUT,
        )
        (tarball,) = Path(scratch).glob("*.tgz")
        if _integrity(tarball) != INTEGRITY:
            raise RuntimeError(f"{tarball.name}: integrity differs from the pinned {INTEGRITY}")
        with tarfile.open(tarball) as archive:
            member = archive.extractfile(MEMBER)
            if member is None:
                raise RuntimeError(f"{tarball.name} holds no {MEMBER}")
            data = member.read()
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".partial")
    partial.write_bytes(data)
    partial.replace(target)


def find_daemon() -> Daemon | str:
    """The daemon peer, installing what it needs on first use; or why it cannot run."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        return "node or npm not found"
    connection = cache_dir() / "connection.js"
    try:
        if not connection.exists():
            _fetch_connection(npm, connection)
        if not (INTEROP / "node_modules" / "ws").exists():
            subprocess.run(
                [npm, "ci", "--no-audit", "--no-fund", "--silent"],
                cwd=INTEROP,
                check=True,
                capture_output=True,
                timeout=NPM_TIMEOUT,
            )
    except (OSError, subprocess.SubprocessError, RuntimeError, tarfile.TarError) as exc:
        return f"could not install {PACKAGE}@{VERSION}: {exc}"
    return Daemon(node=node, connection=connection, node_path=INTEROP / "node_modules")
