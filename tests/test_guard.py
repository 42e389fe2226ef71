"""The time guard fails the slow test by name, through trio's cancellation, and nothing else."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).parent.parent

SAMPLE = """
import time

import trio
from hypothesis import given, settings, strategies as st


async def test_fast():
    await trio.sleep(0)


async def test_slow_trio():
    await trio.sleep_forever()


async def test_slow_under_mock_clock(autojump_clock):
    while True:  # virtual time races ahead; real time is what the guard counts
        await trio.sleep(1)
        time.sleep(0.01)


def test_slow_sync():
    time.sleep(30)


def test_slow_sync_inside_trio_run():
    async def main():
        await trio.sleep(0.5)  # longer than the guard: the guard waits for the run to return
        await trio.sleep(0)

    trio.run(main)
    time.sleep(30)


@settings(max_examples=1000, deadline=None)
@given(st.integers())
async def test_slow_hypothesis(n):
    await trio.sleep(0.01)


async def test_swallowing_trio():
    with trio.move_on_after(100):
        await trio.sleep_forever()
"""


def test_an_overrun_fails_that_test_by_name_with_the_guard_value(tmp_path: Path) -> None:
    (tmp_path / "test_sample.py").write_text(SAMPLE)
    (tmp_path / "conftest.py").write_text(
        "from tests._guard import pytest_runtest_call  # noqa: F401\n"
    )
    (tmp_path / "pytest.ini").write_text("[pytest]\ntrio_mode = true\n")
    env = {**os.environ, "TEST_TIME_GUARD": "0.3", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rA", str(tmp_path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    out = done.stdout + done.stderr
    assert "TrioInternalError" not in out, out
    assert "PASSED test_sample.py::test_fast" in out, out
    for name in (
        "test_slow_trio",
        "test_slow_under_mock_clock",
        "test_slow_sync",
        "test_slow_sync_inside_trio_run",
        "test_slow_hypothesis",
        "test_swallowing_trio",
    ):
        assert f"FAILED test_sample.py::{name}" in out, out
        assert f"test_sample.py::{name} ran past its 0.3 s wall-clock guard" in out, out
    assert "6 failed, 1 passed" in out, textwrap.shorten(out, 2000)
