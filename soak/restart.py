"""(c) A listener down within its resume window, past it, and restarted.

A dialer (resumable session, a fast :class:`~trio_federation.ReconnectPolicy`)
streams numbered messages to a listener on 127.0.0.1, about one a
millisecond, before, during and after the listener's outage. Three outages:

* *within*: a :class:`~trio_federation.testing.FaultyProxy` in front of the
  listener resets its links and refuses new ones for :data:`SHORT` s, less
  than the listener's ``resume_timeout`` (:data:`RESUME` s): the session must
  resume — nothing lost, duplicated or reordered, no gap reported (bound: 0
  each);
* *past*: the same for :data:`LONG` s, more than ``resume_timeout``: the
  listener must give the session up and say so (``ConnectionLost``), and the
  dialer, back, must report :exc:`~trio_federation.SessionLost`;
* *restart*: the listener process stops (``restarting = True``: close code
  1012) and a new one, which knows no session, starts on the same port
  :data:`SHORT` s later: the dialer must report ``SessionLost``.

In the last two a gap is allowed, silence is not: every message sent must be
delivered or named in a ``SessionLost`` report's ``unacknowledged`` (bound:
0 lost without a report, 0 duplicated).
"""

from __future__ import annotations

import functools
from typing import Final, Literal

import trio

from tests.conftest import wait_for
from tests.integration.test_resilience import dial, serve_until, to_listener
from trio_federation import (
    ConnectionLost,
    FederationError,
    FederationListener,
    OrchestratorConnection,
    SessionLost,
)
from trio_federation.testing import FaultyProxy

from ._common import Tracker, collect
from ._report import Figure, at_most, check, outcome

RESUME: Final = 2.0
"""Seconds: the listener's ``resume_timeout``."""
SHORT: Final = 1.0
"""Seconds of outage within the resume window (and of a restart)."""
LONG: Final = 3.0
"""Seconds of outage past the resume window."""
STEADY: Final = 0.5
"""Seconds of stream before and after the outage."""
LIMIT: Final = 30.0
"""Seconds one outage may take in all before it is abandoned (and fails)."""

Outage = Literal["within", "past", "restart"]


class _Result:
    def __init__(self) -> None:
        self.tracker = Tracker()
        self.dialer_errors: list[FederationError] = []
        self.listener_errors: list[FederationError] = []
        self.handlers = 0

    @property
    def named(self) -> set[int]:
        """Indices of the messages a ``SessionLost`` report named."""
        return {
            int(message.correlation_id[1:])
            for error in self.dialer_errors
            if isinstance(error, SessionLost)
            for message in error.unacknowledged
            if message.correlation_id is not None
        }

    @property
    def unaccounted(self) -> int:
        """Messages sent, never delivered, never named in a report."""
        tracker = self.tracker
        return sum(1 for n in range(tracker.sent) if n not in tracker.seen and n not in self.named)

    def gaps(self) -> int:
        return sum(isinstance(e, SessionLost) for e in self.dialer_errors)

    def listener_gave_up(self) -> bool:
        return any(
            isinstance(e, ConnectionLost) and "resume timeout" in str(e)
            for e in self.listener_errors
        )


async def _outage(kind: Outage) -> _Result:
    result = _Result()
    tracker = result.tracker

    async def handler(conn: OrchestratorConnection) -> None:
        result.handlers += 1
        with conn.watch_errors() as stream:
            async with trio.open_nursery() as inner:
                inner.start_soon(collect, stream, result.listener_errors)
                try:
                    async for message in conn:
                        assert message.correlation_id is not None
                        tracker.deliver(int(message.correlation_id[1:]))
                except ConnectionLost as exc:
                    result.listener_errors.append(exc)
                inner.cancel_scope.cancel()

    with trio.move_on_after(LIMIT):
        async with trio.open_nursery() as nursery:
            first = trio.CancelScope()
            listener: FederationListener = await nursery.start(
                functools.partial(serve_until, first, handler, 0, resume_timeout=RESUME)
            )
            port = listener.port
            proxy: FaultyProxy = await nursery.start(FaultyProxy(port).run)
            async with dial(proxy.port) as conn:
                with conn.watch_errors() as stream:
                    async with trio.open_nursery() as work:
                        work.start_soon(collect, stream, result.dialer_errors)
                        stop = trio.Event()

                        async def produce() -> None:
                            n = 0
                            while not stop.is_set():
                                tracker.send(n)
                                await conn.send(to_listener(n))
                                n += 1
                                await trio.sleep(0.001)

                        work.start_soon(produce)
                        await trio.sleep(STEADY)
                        if kind == "restart":
                            listener.restarting = True  # close with 1012: come back and resume
                            first.cancel()
                            await trio.sleep(SHORT)
                            await nursery.start(
                                functools.partial(
                                    serve_until,
                                    trio.CancelScope(),
                                    handler,
                                    port,
                                    resume_timeout=RESUME,
                                )
                            )
                        else:
                            proxy.refusing = True
                            proxy.cut()
                            await trio.sleep(SHORT if kind == "within" else LONG)
                            proxy.refusing = False
                        await trio.sleep(STEADY)
                        stop.set()
                        await wait_for(lambda: not result.unaccounted)
                        await trio.sleep(0.1)  # a late report
                        work.cancel_scope.cancel()
            nursery.cancel_scope.cancel()
    return result


async def run() -> list[Figure]:
    """Run (c); return its figures."""
    within = await _outage("within")
    past = await _outage("past")
    restart = await _outage("restart")
    t = within.tracker
    figures = [
        at_most(
            "c",
            f"down {SHORT:g} s < resume {RESUME:g} s: lost (of {t.sent:,})",
            t.lost,
            0,
        ),
        at_most("c", "  duplicated, reordered", t.duplicated + t.reordered, 0),
        at_most("c", "  gaps reported, handler restarts", within.gaps() + within.handlers - 1, 0),
    ]
    for label, result in (
        (f"down {LONG:g} s > resume {RESUME:g} s", past),
        (f"listener restarted ({SHORT:g} s, 1012)", restart),
    ):
        t = result.tracker
        reported = "dialer " + ("SessionLost" if result.gaps() else "nothing")
        expected = "dialer SessionLost"
        if result is past:  # the listener's process lives on: it says so too
            reported += ", listener " + (
                "ConnectionLost" if result.listener_gave_up() else "nothing"
            )
            expected += ", listener ConnectionLost"
        figures += [
            outcome("c", f"{label}: gap reported by", reported, expected),
            check(
                "c",
                f"  lost (of {t.sent:,}), not named in the report",
                f"{t.lost} lost, {result.unaccounted} not named",
                "0 not named",
                result.unaccounted == 0 and t.sent > 0,
            ),
            at_most("c", "  duplicated", t.duplicated, 0),
        ]
    return figures
