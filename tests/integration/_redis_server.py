"""A throwaway ``redis-server`` on a free loopback port, for the tests and the benchmark."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import attrs

STARTUP_TIMEOUT = 10.0
"""Seconds a server may take to answer its first PING."""


class RedisServerMissing(RuntimeError):
    """There is no ``redis-server`` binary on PATH."""


@attrs.frozen
class RedisServer:
    """A running server."""

    port: int
    process: subprocess.Popen[bytes]
    directory: Path

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


@contextlib.contextmanager
def redis_server() -> Iterator[RedisServer]:
    """Run ``redis-server`` on 127.0.0.1 (no persistence); stop it and remove its data after.

    Raises:
        RedisServerMissing: the binary is not installed.
        RuntimeError: it did not start.
    """
    binary = shutil.which("redis-server")
    if binary is None:
        raise RedisServerMissing("redis-server is not installed (apt-get install redis-server)")
    directory = Path(tempfile.mkdtemp(prefix="trio-federation-redis-"))
    try:
        for _attempt in range(5):  # another process may take the port between probe and bind
            port = _free_port()
            log = (directory / "redis.log").open("wb")
            process = subprocess.Popen(
                [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                 "--appendonly", "no", "--dir", str(directory), "--loglevel", "warning"],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )  # fmt: skip
            log.close()
            deadline = time.monotonic() + STARTUP_TIMEOUT
            while process.poll() is None and time.monotonic() < deadline:
                if _ping(port):
                    break
                time.sleep(0.02)
            if process.poll() is None and _ping(port):
                break
            process.kill()
            process.wait()
        else:
            raise RuntimeError(
                "redis-server did not start: " + (directory / "redis.log").read_text()[-2000:]
            )
        try:
            yield RedisServer(port, process, directory)
        finally:
            process.terminate()
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:  # pragma: no cover
                process.kill()
                process.wait()
    finally:
        shutil.rmtree(directory, ignore_errors=True)
