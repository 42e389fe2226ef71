"""The per-test wall-clock guard, as a pytest plugin (loaded by ``tests/conftest.py``).

Every test may take at most ``TEST_TIME_GUARD`` seconds of real time (default
15; a test is meant to need 5 at most on a busy 2-core machine).

* **Trio tests** run their body inside a cancel scope that a timer thread
  cancels through the run's ``TrioToken`` when the guard expires, so the
  overrun reaches the test as trio's own cancellation and the test fails with
  :class:`GuardExpired`, naming it and the guard. Nothing is raised out of a
  signal handler into trio's core. The guard counts real time, so it works the
  same under ``MockClock``. A Hypothesis test has one guard for all its
  examples.
* **Sync tests** get ``SIGALRM``, whose handler raises only when no trio run
  is in progress on the main thread; while a sync test is inside
  ``trio.run`` it re-arms itself every 0.1 s until the run returns.
* **A backstop** for a test that cannot be stopped (a shielded hang, a
  C call that never returns): ``faulthandler`` dumps every thread's stack,
  names the test, and exits the process ``GUARD_BACKSTOP`` seconds after the
  guard.
"""

from __future__ import annotations

import contextlib
import faulthandler
import functools
import os
import signal
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Generator
from typing import Any, Final

import pytest
import trio

TEST_TIME_GUARD: Final = float(os.environ.get("TEST_TIME_GUARD", "15"))
"""Seconds of real time any single test may take."""

GUARD_BACKSTOP: Final = 20.0
"""Seconds after the guard at which a test that ignored it ends the whole run."""


class GuardExpired(AssertionError):
    """A test ran past its wall-clock guard."""


def _message(nodeid: str) -> str:
    return f"{nodeid} ran past its {TEST_TIME_GUARD:g} s wall-clock guard (TEST_TIME_GUARD)"


def guard_trio(
    test: Callable[..., Awaitable[Any]], nodeid: str, deadline: float
) -> Callable[..., Awaitable[Any]]:
    """``test`` run inside a cancel scope cancelled at ``deadline`` (``time.monotonic``)."""

    @functools.wraps(test)
    async def guarded(*args: Any, **kwargs: Any) -> Any:
        token = trio.lowlevel.current_trio_token()
        expired = False

        def expire() -> None:
            nonlocal expired
            expired = True
            scope.cancel()

        def from_timer() -> None:
            with contextlib.suppress(trio.RunFinishedError):  # it ended as the timer fired
                token.run_sync_soon(expire)

        timer = threading.Timer(max(0.0, deadline - time.monotonic()), from_timer)
        timer.daemon = True
        with trio.CancelScope() as scope:
            timer.start()
            try:
                return await test(*args, **kwargs)
            except BaseException as exc:
                if expired:
                    raise GuardExpired(_message(nodeid)) from exc
                raise
            finally:
                timer.cancel()
        if expired:  # the scope swallowed the cancellation it caused
            raise GuardExpired(_message(nodeid))

    return guarded


def _alarm(nodeid: str) -> Callable[[int, object], None]:
    def on_alarm(signum: int, frame: object) -> None:
        if trio.lowlevel.in_trio_run():
            # Raising here would land inside trio's run loop: wait for it to return.
            signal.setitimer(signal.ITIMER_REAL, 0.1)
            return
        raise GuardExpired(_message(nodeid))

    return on_alarm


@pytest.hookimpl(tryfirst=True, hookwrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, None, None]:
    """Put the guard around the test's call (before pytest-trio wraps it)."""
    assert isinstance(item, pytest.Function)
    deadline = time.monotonic() + TEST_TIME_GUARD
    hypothesis = getattr(item.obj, "hypothesis", None)
    if hypothesis is not None:
        # Parametrized Hypothesis tests share ``inner_test``, which pytest-trio
        # replaces by its runner: always guard the test itself, once.
        if not hasattr(hypothesis, "guard_original"):
            hypothesis.guard_original = hypothesis.inner_test
        inner = hypothesis.guard_original
    else:
        inner = item.obj
    is_trio = item.get_closest_marker("trio") is not None
    if is_trio:
        if hypothesis is not None:
            hypothesis.inner_test = guard_trio(inner, item.nodeid, deadline)
        else:
            item.obj = guard_trio(inner, item.nodeid, deadline)
    else:
        previous = signal.signal(signal.SIGALRM, _alarm(item.nodeid))
        signal.setitimer(signal.ITIMER_REAL, TEST_TIME_GUARD)
    sys.stderr.flush()
    faulthandler.dump_traceback_later(TEST_TIME_GUARD + GUARD_BACKSTOP, exit=True)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()
        if not is_trio:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
