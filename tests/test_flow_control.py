"""Flow control in a resumable session: a slow consumer slows the sender, never
stalls the reader, never looks dead, never grows memory."""

from __future__ import annotations

import gc
import os

import trio
import trio.testing

from trio_federation import FederationError, FederationMessage, HeartbeatTimeout
from trio_federation._connection._connection import ACK_DELAY
from trio_federation.testing import open_connection_pair

from .conftest import progress


def numbered(n: int) -> FederationMessage:
    return progress(f"m{n}", 0.5, sender="orch-a", recipient="orch-b")


async def test_a_stalled_consumer_slows_the_sender_and_nobody_looks_dead(
    autojump_clock: trio.testing.MockClock,
) -> None:
    errors: list[FederationError] = []
    async with open_connection_pair(
        resumable=True, heartbeat_timeout=10.0, receive_buffer_size=8, max_queue_size=16
    ) as (a, b):
        with a.watch_errors() as a_errors, b.watch_errors() as b_errors:

            async def produce() -> None:
                for n in range(200):
                    await a.send(numbered(n))  # waits when queue and window are full

            async with trio.open_nursery() as nursery:
                nursery.start_soon(produce)
                # The consumer does not read for ten minutes: 60 heartbeat timeouts.
                await trio.sleep(600)
                assert len(a.unacknowledged) <= 8  # the window
                assert len(a.message_queue) <= 16 + 1  # and our own heartbeat
                assert a.is_healthy() and b.is_healthy()  # pings kept being answered
                assert a.status != "degraded" and b.status != "degraded"
                received = [(await b.receive()).correlation_id for _ in range(200)]
            assert received == [f"m{n}" for n in range(200)]
            for stream in (a_errors, b_errors):
                while True:
                    try:
                        errors.append(stream.receive_nowait())
                    except trio.WouldBlock:
                        break
    assert not [e for e in errors if isinstance(e, HeartbeatTimeout)], errors
    assert errors == []


async def test_acknowledgements_free_the_replay_buffer(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_connection_pair(resumable=True, receive_buffer_size=4) as (a, b):
        for n in range(3):
            await a.send_message(numbered(n))
        await trio.testing.wait_all_tasks_blocked()
        assert [m.correlation_id for m in a.unacknowledged] == ["m0", "m1", "m2"]
        for _ in range(3):
            await b.receive()
        await trio.sleep(1)  # the lazy acknowledgement goes out
        assert a.unacknowledged == ()
        assert a.resumable and b.resumable


async def test_a_lone_acknowledgement_goes_out_after_the_ack_delay_and_not_before(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_connection_pair(resumable=True, receive_buffer_size=64) as (a, b):
        for round_ in range(3):  # the watchdog's timer is moved each time, never stuck
            await a.send_message(numbered(round_))
            await b.receive()  # one consumed: pending, far from a quarter window
            consumed_at = trio.current_time()
            await trio.sleep(ACK_DELAY / 2)
            assert len(a.unacknowledged) == 1, "acknowledged before the delay"
            await trio.sleep_until(consumed_at + ACK_DELAY * 1.5)
            assert a.unacknowledged == (), f"round {round_}: not acknowledged after the delay"


async def test_a_subscription_left_unread_still_acknowledges(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_connection_pair(resumable=True, receive_buffer_size=4) as (a, b):
        with b.subscribe("callback") as stream:
            for n in range(3):
                await a.send_message(numbered(n))
            await trio.sleep(1)
            assert (await stream.receive()).correlation_id == "m0"
        # Left with two unread: they count as consumed, so the window reopens.
        await trio.sleep(1)
        assert a.unacknowledged == ()
        for n in range(3, 10):
            await a.send(numbered(n))
        assert [(await b.receive()).correlation_id for _ in range(7)] == [
            f"m{n}" for n in range(3, 10)
        ]


def resident_bytes() -> int:
    """This process's resident memory (Linux), cheap enough to sample often."""
    with open("/proc/self/statm", encoding="ascii") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


async def test_a_slow_consumer_keeps_memory_flat_over_6k_messages() -> None:
    # The 100k version is the soak's (b): ``nox -s soak``.
    total = 6_000
    samples: list[int] = []
    async with open_connection_pair(
        resumable=True, receive_buffer_size=64, max_queue_size=256, rate_limit=None
    ) as (a, b):

        async def produce() -> None:
            for n in range(total):
                await a.send(numbered(n))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(produce)
            for n in range(total):
                message = await b.receive()
                assert message.correlation_id == f"m{n}"
                if n % 600 == 599:
                    await trio.sleep(0.001)  # the consumer is the slow side
                    assert len(a.unacknowledged) <= 64
                    assert len(a.message_queue) <= 256 + 1
                if n % 600 == 599:
                    gc.collect()
                    samples.append(resident_bytes())
    # After warm-up, memory does not grow with the count of messages.
    growth = max(samples[2:]) - samples[1]
    assert growth < 4 * 1024 * 1024, [s // 1024 for s in samples]


async def test_heartbeats_go_out_while_the_window_is_full(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # The peer reads nothing: our window fills. Heartbeats are unnumbered and
    # must still go out (the peer learns our load and that we are alive).
    async with open_connection_pair(
        resumable=True, receive_buffer_size=4, heartbeat_timeout=2.0
    ) as (a, b):
        with b.subscribe("heartbeat") as beats:
            for n in range(4):
                await a.send(numbered(n))  # the whole window, never read
            await trio.sleep(20)
            assert len(a.unacknowledged) == 4
            seen = 0
            while True:
                try:
                    beats.receive_nowait()
                except trio.WouldBlock:
                    break
                seen += 1
    assert seen >= 10, f"{seen} heartbeats in 20 s at one a second"
