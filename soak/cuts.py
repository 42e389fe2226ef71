"""(a) Exactly once, in order, across random link cuts.

A listener and a dialer (resumable session, a fast
:class:`~trio_federation.ReconnectPolicy`) on 127.0.0.1 with a
:class:`~trio_federation.testing.FaultyProxy` between them. Each side sends
:data:`COUNT` numbered messages to the other at once; meanwhile the proxy
resets the link (a TCP RST to both ends) :data:`CUTS` times, at random moments
(seeded). The senders are paced so that every cut falls in the middle of the
stream.

Figures: messages lost, duplicated and reordered, both ways (bound: 0 each);
the cuts made (bound: at least 20); sessions lost (bound: 0); and the
*recovery time* of each cut — from the RST to the moment both directions have
delivered a message sent after it — p50 and p99 (bounds:
:data:`RECOVERY_P50` and :data:`RECOVERY_P99`). Recovery includes the dialer's
first reconnect delay (5 ms).
"""

from __future__ import annotations

import math
import random
from typing import Final

import trio

from tests.conftest import wait_for
from tests.integration.test_resilience import dial, start_listener, to_dialer, to_listener
from trio_federation import FederationError, OrchestratorConnection, SessionLost
from trio_federation.testing import FaultyProxy

from ._common import Tracker, collect
from ._report import Figure, at_least, at_most, percentile, seconds_at_most

COUNT: Final = 10_000
"""Messages each way."""
CUTS: Final = 25
"""Link cuts during the stream (the bound is :data:`MIN_CUTS`)."""
MIN_CUTS: Final = 20
RECOVERY_P50: Final = 0.1
"""Seconds: bound on the median recovery."""
RECOVERY_P99: Final = 0.5
"""Seconds: bound on the 99th-percentile recovery."""
GAP: Final = (0.02, 0.15)
"""Seconds of steady stream between a recovery and the next cut (uniform, seeded)."""
LIMIT: Final = 60.0
"""Seconds the whole part may take before it is abandoned (and fails)."""
SEED: Final = 2026


class _Pace:
    """Spreads a stream over the cuts: before cut ``k``, at most ``(k + 1) / (cuts + 1)`` of it."""

    def __init__(self, cuts: int) -> None:
        self.cuts = cuts
        self.done = 0
        self.changed = trio.Event()

    def cut(self) -> None:
        self.done += 1
        self.changed.set()
        self.changed = trio.Event()

    async def wait_turn(self, index: int) -> None:
        while self.done < self.cuts and index >= (self.done + 1) * COUNT // (self.cuts + 1):
            await self.changed.wait()


async def _send(conn: OrchestratorConnection, tracker: Tracker, pace: _Pace, up: bool) -> None:
    for n in range(COUNT):
        await pace.wait_turn(n)
        tracker.send(n)
        await conn.send(to_listener(n) if up else to_dialer(n))
        if n % 10 == 9:
            await trio.sleep(0.002)


async def _receive(conn: OrchestratorConnection, tracker: Tracker, done: trio.Event) -> None:
    async for message in conn:
        assert message.correlation_id is not None
        tracker.deliver(int(message.correlation_id[1:]))
        if len(tracker.seen) == COUNT:
            done.set()


async def run() -> list[Figure]:
    """Run (a); return its figures."""
    rng = random.Random(SEED)
    up, down = Tracker(), Tracker()  # dialer -> listener, listener -> dialer
    pace = _Pace(CUTS)
    up_done, down_done = trio.Event(), trio.Event()
    errors: list[FederationError] = []
    handlers = 0
    recoveries: list[float] = []

    async def handler(conn: OrchestratorConnection) -> None:
        nonlocal handlers
        handlers += 1
        with conn.watch_errors() as stream:
            async with trio.open_nursery() as inner:
                inner.start_soon(collect, stream, errors)
                inner.start_soon(_send, conn, down, pace, False)
                inner.start_soon(_receive, conn, up, up_done)
                await trio.sleep_forever()  # until the dialer leaves

    with trio.move_on_after(LIMIT):
        async with trio.open_nursery() as nursery:
            listener = await start_listener(nursery, handler, rate_limit=None)
            proxy: FaultyProxy = await nursery.start(FaultyProxy(listener.port).run)
            async with dial(proxy.port, rate_limit=None) as conn:
                with conn.watch_errors() as stream:
                    async with trio.open_nursery() as work:
                        work.start_soon(collect, stream, errors)
                        work.start_soon(_send, conn, up, pace, True)
                        work.start_soon(_receive, conn, down, down_done)
                        for _ in range(CUTS):
                            await trio.sleep(rng.uniform(*GAP))
                            await wait_for(lambda: proxy.links > 0)
                            up.mark()
                            down.mark()
                            cut_at = trio.current_time()
                            proxy.cut()
                            pace.cut()
                            await up.recovered.wait()
                            await down.recovered.wait()
                            recoveries.append(max(up.recovered_at, down.recovered_at) - cut_at)
                        await up_done.wait()
                        await down_done.wait()
                        work.cancel_scope.cancel()
            nursery.cancel_scope.cancel()
    sessions_lost = sum(isinstance(e, SessionLost) for e in errors)
    p50, p99 = (percentile(recoveries, f) if recoveries else math.inf for f in (0.5, 0.99))
    return [
        at_most("a", f"lost (of {COUNT:,} each way)", up.lost + down.lost, 0),
        at_most("a", "duplicated", up.duplicated + down.duplicated, 0),
        at_most("a", "reordered", up.reordered + down.reordered, 0),
        at_least("a", "link cuts (TCP RST), each recovered", len(recoveries), MIN_CUTS),
        at_most("a", "sessions lost, handler restarts", sessions_lost + max(handlers - 1, 0), 0),
        seconds_at_most("a", "recovery p50", p50, RECOVERY_P50),
        seconds_at_most("a", "recovery p99", p99, RECOVERY_P99),
    ]
