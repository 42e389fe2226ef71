"""(b) A stalled consumer over 100,000 messages: the sender slows, nobody looks dead.

A dialer sends :data:`TOTAL` numbered messages as fast as ``send`` lets it to a
listener on 127.0.0.1 (resumable session, ``heartbeat_timeout`` of
:data:`HEARTBEAT` s, so a peer is presumed dead after twice that). The
listener's application reads them, and every :data:`STALL_EVERY` messages it
stops reading for :data:`STALL` seconds: three heartbeat timeouts, longer than
the dead timeout. Flow control must slow the sender instead of letting either
side buffer, and the readers must keep answering pings.

Figures: resident memory growth of the process (both sides) after warm-up —
the largest of the samples taken every 10,000 messages from the third on, less
the second (bound: :data:`GROWTH` bytes: flat); the sender's largest
unacknowledged window and queue (bounds: its ``receive_buffer_size`` and
``max_queue_size``, plus a heartbeat); ``degraded``, ``connecting``,
``disconnected`` or ``error`` seen on either side during the run, and heartbeat
timeouts or lost links reported (bound: none, 0); the messages delivered
exactly once in order (bound: all).
"""

from __future__ import annotations

import gc
from typing import Any, Final

import trio

from tests.integration.test_resilience import dial, start_listener, to_listener
from tests.test_flow_control import resident_bytes
from trio_federation import ConnectionStatus, FederationError, OrchestratorConnection

from ._common import collect
from ._report import Figure, at_least, at_most, check

TOTAL: Final = 100_000
HEARTBEAT: Final = 0.5
"""Seconds: ``heartbeat_timeout`` of both sides."""
STALL: Final = 3 * HEARTBEAT
"""Seconds the consumer stops reading, each time."""
STALL_EVERY: Final = 20_000
SAMPLE_EVERY: Final = 10_000
WINDOW: Final = 64
QUEUE: Final = 256
GROWTH: Final = 4 * 1024 * 1024
"""Bytes of resident memory the process may gain after warm-up."""
UNHEALTHY: Final = frozenset({"connecting", "degraded", "disconnected", "error"})
"""Statuses that must not be seen while the consumer stalls."""
LIMIT: Final = 120.0
"""Seconds the whole part may take before it is abandoned (and fails)."""


async def run() -> list[Figure]:
    """Run (b); return its figures."""
    # Counters only: a record per message would itself grow with the count.
    in_order = 0
    samples: list[int] = []
    statuses: list[ConnectionStatus] = []
    errors: list[FederationError] = []
    stalls = 0
    largest_window = largest_queue = 0
    done = trio.Event()
    seen: list[ConnectionStatus] = []
    options: dict[str, Any] = {
        "heartbeat_timeout": HEARTBEAT,
        "receive_buffer_size": WINDOW,
        "rate_limit": None,
    }

    async def consume(conn: OrchestratorConnection) -> None:
        nonlocal stalls, in_order
        with conn.watch_status() as status_stream, conn.watch_errors() as error_stream:
            async with trio.open_nursery() as inner:
                inner.start_soon(collect, status_stream, statuses)
                inner.start_soon(collect, error_stream, errors)
                for n in range(TOTAL):
                    message = await conn.receive()
                    assert message.correlation_id is not None
                    if message.correlation_id == f"a{in_order}":
                        in_order += 1
                    if n % STALL_EVERY == STALL_EVERY // 2:
                        stalls += 1
                        await trio.sleep(STALL)  # the application stops reading
                    if n % SAMPLE_EVERY == SAMPLE_EVERY - 1:
                        gc.collect()
                        samples.append(resident_bytes())
                done.set()
                await trio.sleep_forever()

    with trio.move_on_after(LIMIT):
        async with trio.open_nursery() as nursery:
            listener = await start_listener(nursery, consume, **options)
            async with dial(listener.port, max_queue_size=QUEUE, **options) as conn:
                with conn.watch_status() as status_stream, conn.watch_errors() as error_stream:
                    async with trio.open_nursery() as work:
                        work.start_soon(collect, status_stream, statuses)
                        work.start_soon(collect, error_stream, errors)

                        async def produce() -> None:
                            for n in range(TOTAL):
                                await conn.send(to_listener(n))  # waits while the window is shut

                        async def watch() -> None:
                            nonlocal largest_window, largest_queue
                            while True:
                                largest_window = max(largest_window, len(conn.unacknowledged))
                                largest_queue = max(largest_queue, len(conn.message_queue))
                                await trio.sleep(0.05)

                        work.start_soon(produce)
                        work.start_soon(watch)
                        await done.wait()
                        await trio.sleep(0.1)  # statuses and errors of the last moments
                        work.cancel_scope.cancel()
                    seen = list(statuses)
            nursery.cancel_scope.cancel()
    growth = max(samples[2:]) - samples[1] if len(samples) > 2 else float("inf")
    unhealthy = [str(s) for s in seen if s in UNHEALTHY]
    return [
        check(
            "b",
            "RSS growth after warm-up",
            f"{growth / 1024:,.0f} KiB (of {samples[1] / 2**20:.0f} MiB)"
            if len(samples) > 2
            else "not measured",
            f"<= {GROWTH // 1024:,} KiB",
            growth <= GROWTH,
        ),
        at_least("b", f"delivered once, in order (of {TOTAL:,})", in_order, TOTAL),
        at_least(
            "b", f"consumer stalls of {STALL:g} s (dead after {2 * HEARTBEAT:g} s)", stalls, 5
        ),
        at_most("b", "largest unacknowledged window", largest_window, WINDOW),
        at_most("b", f"largest send queue ({QUEUE} + a heartbeat)", largest_queue, QUEUE + 1),
        check(
            "b",
            "degraded/lost statuses (either side)",
            ", ".join(unhealthy) or "none",
            "none",
            not unhealthy,
        ),
        at_most("b", "heartbeat timeouts, lost links reported", len(errors), 0),
    ]
