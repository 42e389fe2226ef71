"""Reconnect, resumption and dead-peer detection on real sockets, through a faulty proxy.

Real time here (a proxy on real TCP cannot run under MockClock), so timers are
short: reconnect delays of milliseconds, heartbeats of a few hundred ms.
"""

from __future__ import annotations

import functools
import random
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from trio_federation import (
    AuthenticationError,
    ConnectionLost,
    FederationError,
    FederationListener,
    FederationMessage,
    OrchestratorConnection,
    ReconnectPolicy,
    SessionLost,
    open_orchestrator_connection,
    serve_federation,
)
from trio_federation.testing import FaultyProxy

from ..conftest import progress, wait_for

FAST = ReconnectPolicy(initial_delay=0.005, max_delay=0.05, jitter=0.5)


def to_listener(n: int | str) -> FederationMessage:
    return progress(f"a{n}", 0.5, sender="orch-a", recipient="orch-b")


def to_dialer(n: int | str) -> FederationMessage:
    return progress(f"b{n}", 0.5, sender="orch-b", recipient="orch-a")


async def start_listener(
    nursery: trio.Nursery,
    handler: Callable[[OrchestratorConnection], Awaitable[object]],
    port: int = 0,
    **options: Any,
) -> FederationListener:
    listener: FederationListener = await nursery.start(
        functools.partial(
            serve_federation,
            handler,
            "127.0.0.1",
            port,
            local_id="orch-b",
            capabilities=["testing"],
            **options,
        )
    )
    return listener


def dial(port: int, **options: Any) -> Any:
    settings: dict[str, Any] = {"reconnect": FAST, **options}
    return open_orchestrator_connection(
        f"ws://127.0.0.1:{port}/federation", local_id="orch-a", capabilities=[], **settings
    )


def drain(stream: Any) -> list[Any]:
    items = []
    while True:
        try:
            items.append(stream.receive_nowait())
        except (trio.WouldBlock, trio.EndOfChannel):
            return items


async def test_every_message_arrives_once_and_in_order_across_8_random_cuts(
    nursery: trio.Nursery,
) -> None:
    count = 3_000  # 10,000 over 20+ cuts: the soak's (a), ``nox -s soak``
    rng = random.Random(2026)
    at_listener: list[str] = []
    handler_done = trio.Event()

    async def handler(conn: OrchestratorConnection) -> None:
        async def send_all() -> None:
            # Bursts of send_nowait, so that large batches are cut and resent;
            # the dialer sends the other way one awaited send at a time.
            for n in range(count):
                try:
                    conn.send_nowait(to_dialer(n))
                except trio.WouldBlock:
                    await conn.send(to_dialer(n))
                if n % 50 == 49:
                    await trio.sleep(0)

        async with trio.open_nursery() as inner:
            inner.start_soon(send_all)
            async for message in conn:
                assert message.correlation_id is not None
                at_listener.append(message.correlation_id)
                if len(at_listener) == count:
                    break
        handler_done.set()
        await trio.sleep_forever()  # keep the connection until the dialer leaves

    listener = await start_listener(nursery, handler, rate_limit=None)
    proxy: FaultyProxy = await nursery.start(FaultyProxy(listener.port).run)
    at_dialer: list[str] = []
    statuses: list[str] = []
    async with dial(proxy.port, rate_limit=None) as conn:
        with conn.watch_status() as status_stream, conn.watch_errors() as errors:

            async def send_all() -> None:
                for n in range(count):
                    await conn.send(to_listener(n))

            async def cut_at_random() -> None:
                for _ in range(8):
                    await trio.sleep(rng.uniform(0.005, 0.08))
                    await wait_for(lambda: proxy.links > 0)
                    proxy.cut()

            async with trio.open_nursery() as inner:
                inner.start_soon(send_all)
                inner.start_soon(cut_at_random)
                with trio.fail_after(10):
                    async for message in conn:
                        assert message.correlation_id is not None
                        at_dialer.append(message.correlation_id)
                        if len(at_dialer) == count:
                            break
                    await handler_done.wait()
            statuses = [str(s) for s in drain(status_stream)]
            reported = drain(errors)
    assert proxy.statistics().cuts == 8
    assert at_dialer == [f"b{n}" for n in range(count)]
    assert at_listener == [f"a{n}" for n in range(count)]
    # The gaps were visible: disconnected, then connecting again.
    assert "disconnected" in statuses and "connecting" in statuses
    assert not [e for e in reported if isinstance(e, SessionLost)]


async def test_a_stalled_link_is_found_dead_and_the_session_resumes(nursery: trio.Nursery) -> None:
    received: list[str] = []

    async def handler(conn: OrchestratorConnection) -> None:
        async for message in conn:
            assert message.correlation_id is not None
            received.append(message.correlation_id)

    listener = await start_listener(nursery, handler, heartbeat_timeout=0.2)
    proxy: FaultyProxy = await nursery.start(FaultyProxy(listener.port).run)
    async with dial(proxy.port, heartbeat_timeout=0.2, dead_timeout=0.5) as conn:
        await conn.send_message(to_listener(0))
        await wait_for(lambda: received == ["a0"])
        stalled = proxy.stall_links()  # a black hole: no FIN, no RST, no bytes
        with conn.watch_errors() as errors:
            for n in range(1, 4):
                await conn.send_message(to_listener(n))
            started = trio.current_time()
            with trio.fail_after(5):
                await wait_for(lambda: received == ["a0", "a1", "a2", "a3"])
            took = trio.current_time() - started
            lost = [e for e in drain(errors) if isinstance(e, ConnectionLost)]
        assert 0.4 <= took < 3.0  # found dead after dead_timeout, then resumed
        assert lost and "presumed dead" in lost[0].reason
        assert proxy.connections == 2
        stats = listener.statistics()
        assert (stats.connections, stats.pending, stats.accepted) == (1, 0, 2)  # one resumed
        for link in stalled:
            link.release()  # the old link's bytes arrive late, on a closed socket
        await conn.send_message(to_listener(4))
        await wait_for(lambda: received[-1] == "a4")
    assert received == [f"a{n}" for n in range(5)]  # exactly once, in order


async def serve_until(
    scope: trio.CancelScope,
    handler: Callable[[OrchestratorConnection], Awaitable[object]],
    port: int,
    *,
    task_status: trio.TaskStatus[FederationListener] = trio.TASK_STATUS_IGNORED,
    **options: Any,
) -> None:
    """A listener that stops when ``scope`` is cancelled (a process to kill)."""
    with scope:
        async with trio.open_nursery() as nursery:
            task_status.started(await start_listener(nursery, handler, port, **options))


async def test_a_peer_restarting_is_reported_as_a_gap(nursery: trio.Nursery) -> None:
    first_seen: list[str] = []

    async def slow(conn: OrchestratorConnection) -> None:
        first_seen.append((await conn.receive()).correlation_id or "")
        await trio.sleep_forever()  # reads nothing more: the rest stays unacknowledged

    again: list[str] = []

    async def fresh(conn: OrchestratorConnection) -> None:
        async for message in conn:
            again.append(message.correlation_id or "")

    first_process = trio.CancelScope()
    listener = await nursery.start(serve_until, first_process, slow, 0)
    port = listener.port
    proxy: FaultyProxy = await nursery.start(FaultyProxy(port).run)
    async with dial(proxy.port) as conn:
        with conn.watch_errors() as errors:
            for n in range(4):
                await conn.send_message(to_listener(n))
            # a0 was read and acknowledged; a1..a3 arrived but were never read.
            await wait_for(
                lambda: [m.correlation_id for m in conn.unacknowledged] == ["a1", "a2", "a3"]
            )
            assert first_seen == ["a0"]
            # The listener's process dies: its links are cut and it is gone...
            proxy.refusing = True
            proxy.cut()
            first_process.cancel()
            await trio.sleep(0.05)
            # ... and a new process starts on the same port, knowing nothing.
            await nursery.start(serve_until, trio.CancelScope(), fresh, port)
            proxy.refusing = False
            with trio.fail_after(5):
                gaps: list[SessionLost] = []
                while not gaps:
                    gaps = [e for e in drain(errors) if isinstance(e, SessionLost)]
                    await trio.sleep(0.01)
            await conn.send_message(to_listener("after"))
            await wait_for(lambda: again == ["aafter"])
    # The gap names what may be lost: the three the old process never acknowledged.
    assert [m.correlation_id for m in gaps[0].unacknowledged] == ["a1", "a2", "a3"]
    assert "no longer knows the session" in str(gaps[0])


async def test_a_listener_that_restarts_asks_dialers_to_resume(nursery: trio.Nursery) -> None:
    async def echo(conn: OrchestratorConnection) -> None:
        async for message in conn:
            await conn.send_message(to_dialer(message.correlation_id or ""))

    first_process = trio.CancelScope()
    listener = await nursery.start(serve_until, first_process, echo, 0)
    port = listener.port
    async with dial(port) as conn:
        await conn.send_message(to_listener(1))
        assert (await conn.receive()).correlation_id == "ba1"
        listener.restarting = True  # close with 1012: reconnect and resume
        first_process.cancel()
        await wait_for(lambda: conn.status in ("disconnected", "connecting"))
        await conn.send_message(to_listener(2))  # queued through the gap
        await nursery.start(serve_until, trio.CancelScope(), echo, port)
        with trio.fail_after(5):
            assert (await conn.receive()).correlation_id == "ba2"


async def test_a_listener_going_away_ends_the_dialer(nursery: trio.Nursery) -> None:
    async def hold(conn: OrchestratorConnection) -> None:
        await trio.sleep_forever()

    async with trio.open_nursery() as serving:
        listener = await start_listener(serving, hold)
        async with dial(listener.port) as conn:
            serving.cancel_scope.cancel()  # 1001: going away, do not resume
            with trio.fail_after(5):
                assert [m async for m in conn] == []
            assert conn.status == "disconnected"


async def test_the_dialer_may_enter_before_the_listener_exists(nursery: trio.Nursery) -> None:
    received: list[str] = []

    async def handler(conn: OrchestratorConnection) -> None:
        async for message in conn:
            received.append(message.correlation_id or "")

    proxy: FaultyProxy | None = None
    listener = await start_listener(nursery, handler)
    proxy = await nursery.start(FaultyProxy(listener.port).run)
    proxy.refusing = True  # the listener looks down
    async with dial(proxy.port, wait_for_connection=False) as conn:
        assert conn.status == "connecting"
        await conn.send_message(to_listener(1))  # queued
        await trio.sleep(0.05)
        assert [m.correlation_id for m in conn.message_queue] == ["a1"]
        proxy.refusing = False
        with trio.fail_after(5):
            await wait_for(lambda: received == ["a1"])
    with pytest.raises(ValueError, match="needs a reconnect"):
        async with open_orchestrator_connection(
            "ws://127.0.0.1:9/", local_id="orch-a", capabilities=[], wait_for_connection=False
        ):
            pass  # pragma: no cover


async def test_refusals_that_retrying_cannot_fix_stop_at_once(nursery: trio.Nursery) -> None:
    listener = await start_listener(
        nursery, lambda conn: trio.sleep(0), secrets={"orch-a": "the right secret, 16+"}
    )
    with trio.fail_after(5), pytest.raises(AuthenticationError):
        async with dial(listener.port, secret="a wrong secret, also 16+"):
            pass  # pragma: no cover
    assert listener.statistics().refused == {"auth": 1}  # tried once, not again


async def test_giving_up_after_max_attempts_ends_the_connection(nursery: trio.Nursery) -> None:
    async def hold(conn: OrchestratorConnection) -> None:
        await trio.sleep_forever()

    listener = await start_listener(nursery, hold)
    proxy: FaultyProxy = await nursery.start(FaultyProxy(listener.port).run)
    policy = ReconnectPolicy(initial_delay=0.001, max_delay=0.01, max_attempts=3)
    async with dial(proxy.port, reconnect=policy) as conn:
        proxy.refusing = True
        proxy.cut()
        with trio.fail_after(5), pytest.raises(ConnectionLost) as info:
            await conn.receive()
    assert "gave up after 3 attempts" in info.value.reason
    assert proxy.statistics().refused == 3


async def test_the_listener_keeps_a_session_for_resume_timeout_then_reports_it(
    nursery: trio.Nursery,
) -> None:
    outcome: list[BaseException] = []
    reported: list[FederationError] = []

    async def handler(conn: OrchestratorConnection) -> None:
        with conn.watch_errors() as errors:
            await conn.send_message(to_dialer(1))
            try:
                async for _ in conn:
                    pass
            except ConnectionLost as exc:
                outcome.append(exc)
            reported.extend(drain(errors))

    listener = await start_listener(nursery, handler, resume_timeout=0.3)
    proxy: FaultyProxy = await nursery.start(FaultyProxy(listener.port).run)
    async with dial(proxy.port) as conn:  # would come back, but cannot
        assert (await conn.receive()).correlation_id == "b1"
        proxy.refusing = True
        proxy.cut()
        started = trio.current_time()
        await wait_for(lambda: bool(outcome))
        waited = trio.current_time() - started
    assert 0.25 <= waited < 2
    assert "did not come back within the resume timeout (0.3s)" in str(outcome[0])
    assert any(isinstance(e, ConnectionLost) and "waiting to resume" in e.reason for e in reported)


async def test_graceful_disconnect_waits_for_acknowledgements(nursery: trio.Nursery) -> None:
    received: list[str] = []

    async def handler(conn: OrchestratorConnection) -> None:
        async for message in conn:
            # Consumed (so acknowledged, within the ack delay) when async for
            # hands it out: recorded then, before the slow reader's pause.
            received.append(message.correlation_id or "")
            await trio.sleep(0.01)  # a slow reader

    listener = await start_listener(nursery, handler)
    async with dial(listener.port, reconnect=None) as conn:
        for n in range(20):
            await conn.send_message(to_listener(n))
    # Leaving the block returned only once everything was acknowledged.
    assert conn.unacknowledged == ()
    assert received == [f"a{n}" for n in range(20)]


DEV_PYTHON = (sys.executable, "-X", "dev", "-W", "error")


def test_cancelling_a_reconnecting_dialer_at_random_moments_ends_promptly() -> None:
    # Under -X dev -W error, in a process of its own (see _cancel_moments.py):
    # 150 cancels at random moments of the dial, handshake, session set-up,
    # reconnect and resume; each must end within a second, none may hang.
    done = subprocess.run(
        [*DEV_PYTHON, "-m", "tests.integration._cancel_moments", "4", "150"],
        cwd=Path(__file__).parent.parent.parent,
        capture_output=True,
        text=True,
        timeout=40,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.startswith("max "), done.stdout


async def test_a_cut_dialer_without_reconnect_ends_the_handler_within_a_second(
    nursery: trio.Nursery,
) -> None:
    # Without a reconnect policy the dialer says it will not come back, so the
    # listener keeps nothing for resume_timeout (60 s by default).
    outcome: list[BaseException] = []
    ended = trio.Event()

    async def handler(conn: OrchestratorConnection) -> None:
        await conn.send_message(to_dialer(1))
        try:
            async for _ in conn:
                pass
        except ConnectionLost as exc:
            outcome.append(exc)
        ended.set()

    listener = await start_listener(nursery, handler)
    proxy: FaultyProxy = await nursery.start(FaultyProxy(listener.port).run)
    async with dial(proxy.port, reconnect=None) as conn:
        assert conn.resumable  # the one link is still numbered and flow-controlled
        assert (await conn.receive()).correlation_id == "b1"
        proxy.cut()
        started = trio.current_time()
        with pytest.raises(ConnectionLost):
            await conn.receive()
        with trio.fail_after(1):
            await ended.wait()
        waited = trio.current_time() - started
    assert waited < 1
    assert len(outcome) == 1 and isinstance(outcome[0], ConnectionLost)
    assert listener.connections == {}


async def test_a_clean_close_acknowledges_everything_consumed(nursery: trio.Nursery) -> None:
    count = 10
    consumed: list[str] = []

    async def handler(conn: OrchestratorConnection) -> None:
        async for message in conn:
            consumed.append(message.correlation_id or "")
            if len(consumed) == count:
                return  # close 1000 at once, no other frame to carry the ack

    listener = await start_listener(nursery, handler)
    async with dial(listener.port, reconnect=None) as conn:
        assert conn.resumable
        for n in range(count):
            await conn.send(to_listener(n))
        with trio.fail_after(2):
            async for _ in conn:
                pass  # ends at the peer's normal close
        assert len(consumed) == count
        assert conn.unacknowledged == ()


async def test_a_fast_sender_at_default_settings_is_slowed_never_cut_off(
    nursery: trio.Nursery,
) -> None:
    # Every setting at its default on both sides: send() in a tight loop, far
    # past the rate limit's burst. The limit paces (the session's window
    # closes); nothing is refused, lost or cut off.
    count = 15_000
    received: list[str] = []
    errors_at_listener: list[FederationError] = []

    async def handler(conn: OrchestratorConnection) -> None:
        with conn.watch_errors() as errors:
            async for message in conn:
                received.append(message.correlation_id or "")
            errors_at_listener.extend(drain(errors))

    listener: FederationListener = await nursery.start(
        functools.partial(
            serve_federation, handler, "127.0.0.1", 0, local_id="orch-b", capabilities=[]
        )
    )
    async with open_orchestrator_connection(
        f"ws://127.0.0.1:{listener.port}/federation", local_id="orch-a", capabilities=[]
    ) as conn:
        with conn.watch_errors() as errors, conn.watch_status() as statuses:
            started = trio.current_time()
            for n in range(count):
                await conn.send(to_listener(n))
            with trio.fail_after(10):
                await wait_for(lambda: len(received) == count)
            took = trio.current_time() - started
            seen = [str(s) for s in drain(statuses)]
            assert drain(errors) == []
    # Held to the limit past the burst: (15,000 - 10,000) / 10,000 per second.
    assert took >= 0.475
    assert received == [f"a{n}" for n in range(count)]
    assert "disconnected" not in seen
    assert errors_at_listener == []
