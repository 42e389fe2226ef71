"""Cancel a reconnecting dialer at random moments; every cancellation must end within a bound.

Run as a script (``python -X dev -W error -m tests.integration._cancel_moments SEED RUNS``)
by ``test_resilience.py``. Each run: a listener behind a ``FaultyProxy`` on
127.0.0.1, a dialer with a ``ReconnectPolicy``, and a cancel at a random moment
of the dial, the handshake, the session set-up, or (after a cut) the reconnect
and the resume. Prints ``max <seconds>`` (the slowest cancel-to-exit time)
and exits 1 if a run took longer than ``BOUND``. A run that hangs for good is
caught by ``faulthandler``, which prints every stack and exits 2.
"""

from __future__ import annotations

import faulthandler
import functools
import random
import sys

import trio

from trio_federation import (
    FederationError,
    OrchestratorConnection,
    ReconnectPolicy,
    open_orchestrator_connection,
    serve_federation,
)
from trio_federation.testing import FaultyProxy

from ..conftest import progress

BOUND = 1.0
"""Seconds from the cancel to the end of the dialer's block."""

FAST = ReconnectPolicy(initial_delay=0.001, max_delay=0.01, jitter=0.5)


async def handler(conn: OrchestratorConnection) -> None:
    async for _ in conn:
        pass


async def one_run(rng: random.Random, proxy: FaultyProxy) -> float:
    cut_first = rng.random() < 0.5
    delay = rng.uniform(0, 0.015)
    with trio.CancelScope() as scope:
        if not cut_first:
            scope.deadline = trio.current_time() + delay
        async with open_orchestrator_connection(
            f"ws://127.0.0.1:{proxy.port}/federation",
            local_id="orch-a",
            capabilities=[],
            reconnect=FAST,
        ) as conn:
            await conn.send(progress("t", 0.5, sender="orch-a", recipient="orch-b"))
            if cut_first:
                proxy.cut()
                scope.deadline = trio.current_time() + delay
            await trio.sleep_forever()
    return trio.current_time() - scope.deadline


async def main(seed: int, runs: int) -> int:
    rng = random.Random(seed)
    worst = 0.0
    async with trio.open_nursery() as nursery:
        listener = await nursery.start(
            functools.partial(
                serve_federation,
                handler,
                "127.0.0.1",
                0,
                local_id="orch-b",
                capabilities=[],
                resume_timeout=5,
            )
        )
        proxy = FaultyProxy(listener.port)
        await nursery.start(proxy.run)
        for _ in range(runs):
            try:
                took = await one_run(rng, proxy)
            except FederationError:
                continue  # lost before the cancel: an answer, not a hang
            worst = max(worst, took)
        nursery.cancel_scope.cancel()
    print(f"max {worst:.4f}")
    return 0 if worst <= BOUND else 1


if __name__ == "__main__":
    faulthandler.dump_traceback_later(30, exit=True)
    sys.exit(trio.run(main, int(sys.argv[1]), int(sys.argv[2])))
