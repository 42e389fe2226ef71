"""Developer tasks: ``nox -s tests``, ``lint``, ``typecheck``, ``docs``, ``bench``, ``fuzz``."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import nox

nox.options.sessions = ["tests", "lint", "typecheck", "docs"]
nox.options.reuse_existing_virtualenvs = True

ROOT = Path(__file__).parent
INTEROP = ROOT / "tests" / "interop"
COVERAGE_FLOOR = "95"


@nox.session
def tests(session: nox.Session) -> None:
    """Run the test suite with branch coverage (fails under the floor)."""
    session.install("-e", ".[test]")
    if shutil.which("npm") is None:
        if os.environ.get("CI"):
            session.error("npm is required for the interop tests under CI")
        session.warn("npm not found: the JavaScript interop tests will be skipped")
    elif not (INTEROP / "node_modules" / "ws").exists():
        with session.chdir(INTEROP):
            session.run("npm", "ci", "--no-audit", "--no-fund", external=True)
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
        "tests/test_wire_frames.py::test_hostile_bytes_end_as_with_wsproto_alone",
        "-p",
        "no:cacheprovider",
        "--durations=5",
        env={"FUZZ_SCALE": scale, "TEST_TIME_GUARD": "3600"},
    )


@nox.session
def bench(session: nox.Session) -> None:
    """Benchmarks against raw trio-websocket, the delegation round trip, the registry's.

    Not part of the tests. ``nox -s bench -- registry [ARGS]`` runs only the
    registry benchmark, ``nox -s bench -- delegation [ARGS]`` only the
    delegation round trip against a bare request/reply.
    """
    session.install("-e", ".[redis]")
    if session.posargs[:1] == ["registry"]:
        session.run("python", "-m", "bench.registry", *session.posargs[1:])
        return
    if session.posargs[:1] == ["delegation"]:
        session.run("python", "-m", "bench.delegation", *session.posargs[1:])
        return
    session.run("python", "-m", "bench", *session.posargs)
    session.run("python", "-m", "bench.delegation")
    session.run("python", "-m", "bench.registry")
