"""OrchestratorConnection over in-memory WebSockets (real framing, no sockets)."""

from __future__ import annotations

import logging
import math

import pytest
import trio
import trio.testing

from trio_federation import (
    BroadcastPayload,
    ConnectionLost,
    ConnectionStatus,
    DelegationResponse,
    FederationError,
    FederationMessage,
    HeartbeatPayload,
    HeartbeatTimeout,
    MalformedMessage,
    MessageType,
    OrchestratorConnection,
    QueueFull,
    TaskCallback,
    UnsentMessages,
    encode_message,
)
from trio_federation.testing import open_connection_pair, open_websocket_pair

from .conftest import delegation, progress, wait_for


def broadcast(topic: str, sender: str = "orch-a", recipient: str = "orch-b") -> FederationMessage:
    return FederationMessage(
        type="broadcast",
        payload=BroadcastPayload(topic=topic, data={"n": 1}),
        sender=sender,
        recipient=recipient,
    )


def heartbeat(status: str, sender: str = "orch-a", recipient: str = "orch-b") -> FederationMessage:
    return FederationMessage(
        type="heartbeat",
        payload=HeartbeatPayload(orchestrator_id=sender, status=status, active_connections=1),
        sender=sender,
        recipient=recipient,
    )


async def test_messages_flow_both_ways_in_order() -> None:
    async with open_connection_pair() as (a, b):
        for i in range(20):
            await a.send_message(delegation(f"t{i}"))
        received = [await b.receive() for _ in range(20)]
        assert [m.payload.task.id for m in received] == [f"t{i}" for i in range(20)]  # type: ignore[union-attr]
        await b.send_message(progress("t0", 50))
        reply = await a.receive()
        assert isinstance(reply.payload, TaskCallback)
        assert reply.payload.progress == 50
        assert a.get_status().messages_sent >= 20
        assert b.get_status().messages_received >= 20


async def test_identity_and_capabilities() -> None:
    async with open_websocket_pair() as pair:
        conn = OrchestratorConnection(
            id="remote", socket=pair.client, capabilities=["testing", "research"]
        )
        assert conn.id == "remote"
        assert conn.check_capability(["testing"])
        assert conn.check_capability(["testing", "research"])
        assert not conn.check_capability(["testing", "security"])
        assert conn.check_capability([])
        with pytest.raises(TypeError, match="list of names"):
            conn.check_capability("testing")


async def test_sends_before_open_wait_in_queue_and_are_written_on_open() -> None:
    async with open_websocket_pair() as pair:
        a = OrchestratorConnection(id="orch-b", socket=pair.client, local_id="orch-a")
        b = OrchestratorConnection(id="orch-a", socket=pair.server, local_id="orch-b")
        assert a.status == ConnectionStatus.CONNECTING
        assert a.status == "connecting"
        assert not a.is_healthy()
        for i in range(3):
            await a.send_message(delegation(f"early-{i}"))
        assert [m.correlation_id for m in a.message_queue] == ["early-0", "early-1", "early-2"]
        async with b:
            async with a:
                got = [await b.receive() for _ in range(3)]
                assert [m.correlation_id for m in got] == ["early-0", "early-1", "early-2"]
                await wait_for(lambda: not a.message_queue)


async def test_queue_full_raises_and_send_waits_for_room() -> None:
    async with open_websocket_pair() as pair:
        a = OrchestratorConnection(
            id="orch-b", socket=pair.client, local_id="orch-a", max_queue_size=2
        )
        await a.send_message(delegation("1"))
        await a.send_message(delegation("2"))
        with pytest.raises(QueueFull) as info:
            await a.send_message(delegation("3"))
        assert info.value.max_size == 2
        assert "2 messages waiting" in str(info.value)
        assert len(a.message_queue) == 2
        b = OrchestratorConnection(id="orch-a", socket=pair.server, local_id="orch-b")
        async with trio.open_nursery() as nursery:

            async def blocked_send() -> None:
                await a.send(delegation("3"))

            nursery.start_soon(blocked_send)
            await trio.testing.wait_all_tasks_blocked()
            assert len(a.message_queue) == 2  # still waiting for room
            async with b, a:
                ids = [(await b.receive()).correlation_id for _ in range(3)]
        assert ids == ["1", "2", "3"]


async def test_send_nowait_queues_without_a_checkpoint_or_raises_would_block() -> None:
    from trio_federation.testing import open_connection_pair

    async with open_connection_pair(resumable=True, max_queue_size=3) as (a, b):
        # No checkpoint between them: the three go out in one batch.
        for n in range(3):
            a.send_nowait(delegation(f"n{n}"))
        with pytest.raises(trio.WouldBlock):
            a.send_nowait(delegation("n3"))
        assert [m.correlation_id for m in a.message_queue] == ["n0", "n1", "n2"]
        got = [(await b.receive()).correlation_id for _ in range(3)]
        assert got == ["n0", "n1", "n2"]
        await a.disconnect()
        with pytest.raises(trio.ClosedResourceError):
            a.send_nowait(delegation("late"))


async def test_receive_nowait_drains_what_arrived_acknowledges_it_and_ends_like_receive() -> None:
    from trio_federation.testing import open_connection_pair

    async with open_connection_pair(resumable=True) as (a, b):
        with pytest.raises(trio.WouldBlock):
            b.receive_nowait()
        for n in range(5):
            a.send_nowait(delegation(f"n{n}"))
        await trio.testing.wait_all_tasks_blocked()  # all five arrived
        with trio.testing.assert_no_checkpoints():
            got = [b.receive_nowait() for _ in range(5)]
        assert [m.correlation_id for m in got] == [f"n{n}" for n in range(5)]
        with pytest.raises(trio.WouldBlock):
            b.receive_nowait()
        with trio.fail_after(1):
            while a.unacknowledged:  # consumed, so acknowledged
                await trio.sleep(0.01)
        await a.disconnect()
        with trio.fail_after(1):
            while True:
                try:
                    b.receive_nowait()
                except trio.WouldBlock:
                    await trio.sleep(0.01)
                except trio.EndOfChannel:
                    break


async def test_send_cancelled_while_waiting_queues_nothing() -> None:
    async with open_websocket_pair() as pair:
        a = OrchestratorConnection(id="x", socket=pair.client, max_queue_size=1)
        await a.send(delegation("1"))
        with trio.move_on_after(0.01):
            await a.send(delegation("2"))
        assert [m.correlation_id for m in a.message_queue] == ["1"]
        await a.disconnect()


async def test_send_message_rejects_non_messages_and_unencodable_payloads() -> None:
    async with open_connection_pair() as (a, _b):
        with pytest.raises(TypeError, match="FederationMessage"):
            await a.send_message({"type": "delegation"})  # type: ignore[arg-type]
        bad = FederationMessage(
            type="broadcast",
            payload=BroadcastPayload(topic="t", data={1, 2}),
            sender="a",
            recipient="b",
        )
        with pytest.raises(TypeError, match="not JSON serializable: set"):
            await a.send_message(bad)
        assert a.message_queue == ()


async def test_subscriptions_route_each_message_exactly_once() -> None:
    async with open_connection_pair() as (a, b):
        with (
            b.subscribe("broadcast") as broadcasts,
            b.subscribe(
                MessageType.DELEGATION, predicate=lambda m: m.correlation_id == "x"
            ) as only_x,
            b.subscribe("delegation", "broadcast") as rest,
        ):
            await a.send_message(broadcast("news"))
            await a.send_message(delegation("x"))
            await a.send_message(delegation("y"))
            await a.send_message(progress("y", 10, sender="orch-a", recipient="orch-b"))
            first = await broadcasts.receive()
            assert first.type == "broadcast"
            assert (await only_x.receive()).correlation_id == "x"
            assert (await rest.receive()).correlation_id == "y"
            main = await b.receive()  # the callback went to no subscription
            assert main.type == "callback"
            with pytest.raises(trio.WouldBlock):
                broadcasts.receive_nowait()
            with pytest.raises(trio.WouldBlock):
                only_x.receive_nowait()
            with pytest.raises(trio.WouldBlock):
                rest.receive_nowait()
        # Unsubscribed: delegations reach the main stream again.
        await a.send_message(delegation("z"))
        assert (await b.receive()).correlation_id == "z"


async def test_control_messages_reach_only_subscriptions_that_ask() -> None:
    async with open_connection_pair() as (a, b):
        await a.send_message(heartbeat("healthy"))
        await a.send_message(delegation("after-heartbeat"))
        # The heartbeat was consumed by the connection; the main stream skips it.
        assert (await b.receive()).correlation_id == "after-heartbeat"
        with b.subscribe("heartbeat", "status") as control:
            await a.send_message(heartbeat("healthy"))
            await a.send_message(
                FederationMessage(
                    type="status", payload=a.get_status(), sender="orch-a", recipient="orch-b"
                )
            )
            got = [await control.receive(), await control.receive()]
            assert [m.type for m in got] == ["heartbeat", "status"]


async def test_many_unread_control_messages_never_stall_data() -> None:
    async with open_connection_pair(receive_buffer_size=2) as (a, b):
        for _ in range(50):
            await a.send_message(heartbeat("healthy"))
        await a.send_message(delegation("data"))
        with trio.fail_after(5):
            assert (await b.receive()).correlation_id == "data"


async def test_peer_heartbeat_status_degrades_and_recovers(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_connection_pair() as (a, b):
        with b.watch_status() as statuses:
            await a.send_message(heartbeat("overloaded"))
            assert await statuses.receive() == "degraded"
            assert b.status == ConnectionStatus.DEGRADED
            assert b.is_healthy()  # liveness is fine; only the load is high
            await a.send_message(heartbeat("healthy"))
            assert await statuses.receive() == "connected"


async def test_malformed_frames_are_counted_reported_and_survived() -> None:
    async with open_websocket_pair() as pair:
        b = OrchestratorConnection(id="orch-a", socket=pair.server, local_id="orch-b")
        async with b:
            with b.watch_errors() as errors:
                await pair.client.send_message("{not json")
                await pair.client.send_message(b"\x00binary")
                await pair.client.send_message('{"type": "gossip"}')
                await pair.client.send_message(encode_message(delegation("fine")))
                msg = await b.receive()
                assert msg.correlation_id == "fine"
                reported = [await errors.receive() for _ in range(3)]
            assert all(isinstance(e, MalformedMessage) for e in reported)
            assert "invalid JSON" in str(reported[0])
            assert "binary frame" in str(reported[1])
            assert "unknown message type 'gossip'" in str(reported[2])
            health = b.get_status()
            assert health.errors == 3
            assert health.messages_received == 1
            assert b.status in ("active", "connected")


async def test_watchdog_pings_measures_latency_and_sends_heartbeats(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_connection_pair(heartbeat_timeout=10.0) as (a, b):
        with b.subscribe("heartbeat") as beats:
            start = trio.current_time()
            beat = await beats.receive()
            assert trio.current_time() - start == pytest.approx(5.0)
            assert isinstance(beat.payload, HeartbeatPayload)
            assert beat.payload.orchestrator_id == "orch-a"
            assert beat.payload.status == "healthy"
            assert beat.sender == "orch-a" and beat.recipient == "orch-b"
        await wait_for(lambda: a.get_status().latency is not None)
        latency = a.get_status().latency
        assert latency is not None and 0 <= latency < 1
        assert a.is_healthy() and b.is_healthy()


async def test_silent_peer_degrades_with_an_error_naming_it_then_recovers(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_websocket_pair() as pair:
        a = OrchestratorConnection(
            id="orch-b", socket=pair.client, local_id="orch-a", heartbeat_timeout=10.0
        )
        async with a:
            with a.watch_errors() as errors, a.watch_status() as statuses:
                pair.server_scope.cancel()  # the peer stops reading: no more pongs
                opened = trio.current_time()
                error = await errors.receive()
                assert isinstance(error, HeartbeatTimeout)
                assert trio.current_time() - opened == pytest.approx(10.0)
                assert error.peer == "orch-b" and error.timeout == 10.0
                assert "orch-b" in str(error) and "10s" in str(error)
                assert await statuses.receive() == "degraded"
                assert not a.is_healthy()
                health = a.get_status()
                assert health.status == "degraded"
                assert health.errors == 1
                a.handle_heartbeat()
                assert await statuses.receive() == "connected"
                assert a.is_healthy()
            a._disconnect_timeout = 1.0  # the frozen peer never answers the close


async def test_last_heartbeat_starts_at_open_and_follows_liveness(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_connection_pair(heartbeat_timeout=4.0) as (a, _b):
        first = a.last_heartbeat
        assert a.get_status().last_heartbeat == first
        await trio.sleep(3.0)  # a ping round trip happened at 2.0
        assert (a.last_heartbeat - first).total_seconds() == pytest.approx(2.0, abs=0.01)
        a.handle_heartbeat()
        assert (a.last_heartbeat - first).total_seconds() == pytest.approx(3.0, abs=0.01)


async def test_active_then_idle(autojump_clock: trio.testing.MockClock) -> None:
    async with open_connection_pair(idle_timeout=5.0, heartbeat_timeout=100.0) as (a, b):
        assert a.status == "connected"
        with a.watch_status() as statuses:
            await a.send_message(delegation("go"))
            assert await statuses.receive() == "active"
            sent_at = trio.current_time()
            assert await statuses.receive() == "idle"
            assert trio.current_time() - sent_at == pytest.approx(5.0, abs=0.01)
        await b.receive()


async def test_accept_delegation_healthy_sends_response() -> None:
    async with open_connection_pair() as (a, b):
        await a.send_message(delegation("t-7"))
        request = (await b.receive()).payload
        response = await b.accept_delegation(request)  # type: ignore[arg-type]
        assert response == DelegationResponse(task_id="t-7", accepted=True)
        reply = await a.receive()
        assert reply.type == "callback"
        assert reply.payload == response
        assert reply.sender == "orch-b"
        assert reply.recipient == "orch-a"
        assert reply.correlation_id == "t-7"


async def test_accept_delegation_without_local_id_uses_request_target() -> None:
    async with open_websocket_pair() as pair:
        a = OrchestratorConnection(id="orch-b", socket=pair.client, local_id="orch-a")
        b = OrchestratorConnection(id="orch-a", socket=pair.server)
        async with a, b:
            await a.send_message(delegation("t-8"))
            request = (await b.receive()).payload
            await b.accept_delegation(request)  # type: ignore[arg-type]
            assert (await a.receive()).sender == "orch-b"


async def test_accept_delegation_unhealthy_refuses_and_sends_nothing() -> None:
    async with open_websocket_pair() as pair:
        b = OrchestratorConnection(id="orch-a", socket=pair.server, local_id="orch-b")
        request = delegation("t-9").payload
        response = await b.accept_delegation(request)  # type: ignore[arg-type]
        assert response == DelegationResponse(
            task_id="t-9", accepted=False, reason="Connection unhealthy"
        )
        assert b.message_queue == ()
        with pytest.raises(TypeError):
            await b.accept_delegation(progress("x", 1).payload)  # type: ignore[arg-type]


async def test_unknown_remote_id_is_learned_from_first_message() -> None:
    async with open_websocket_pair() as pair:
        a = OrchestratorConnection(id="", socket=pair.client, local_id="orch-a")
        b = OrchestratorConnection(id="orch-a", socket=pair.server, local_id="orch-b")
        async with a, b:
            assert a.id == ""
            await b.send_message(progress("t", 1))
            await a.receive()
            assert a.id == "orch-b"


async def test_disconnect_drains_queue_then_closes_normally() -> None:
    async with open_connection_pair() as (a, b):
        got: list[str | None] = []

        async def consume() -> None:
            got.extend([m.correlation_id async for m in b])  # ends normally: no exception

        for i in range(100):
            await a.send_message(delegation(f"d{i}"))
        assert len(a.message_queue) > 0
        async with trio.open_nursery() as nursery:
            nursery.start_soon(consume)
            with trio.fail_after(5):
                await a.disconnect()
            assert a.message_queue == ()
            assert a.status == "disconnected"
        assert got == [f"d{i}" for i in range(100)]
        assert b.status == "disconnected"
        with pytest.raises(trio.ClosedResourceError):
            await a.send_message(delegation("late"))
        with pytest.raises(ConnectionLost) as info:
            await b.send_message(delegation("late"))
        assert info.value.code == 1000
        assert info.value.is_normal
        await a.disconnect()  # idempotent


async def test_disconnect_is_bounded_when_the_peer_stopped_reading(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_websocket_pair() as pair:
        a = OrchestratorConnection(
            id="orch-b",
            socket=pair.client,
            local_id="orch-a",
            disconnect_timeout=3.0,
            heartbeat_timeout=1000.0,
        )
        async with a:
            pair.server_scope.cancel()  # peer frozen: nothing is read any more
            with a.watch_errors() as errors:
                for i in range(200):  # more than the in-memory stream buffers
                    await a.send_message(delegation(f"x{i}", recipient="orch-b"))
                started = trio.current_time()
                await a.disconnect()
                assert trio.current_time() - started == pytest.approx(3.0, abs=0.01)
                reports = [e async for e in errors]
            unsent = [e for e in reports if isinstance(e, UnsentMessages)]
            assert len(unsent) == 1 and unsent[0].unsent > 0
            assert unsent[0].peer == "orch-b"
            assert a.status == "disconnected"


async def test_abnormal_close_raises_connection_lost_from_async_for() -> None:
    async with open_websocket_pair() as pair:
        b = OrchestratorConnection(id="orch-a", socket=pair.server, local_id="orch-b")
        async with b:
            await pair.client.send_message(encode_message(delegation("before")))
            await pair.client.aclose(4000, "shutting down badly")
            seen = []
            with pytest.raises(ConnectionLost) as info:
                async for msg in b:
                    seen.append(msg.correlation_id)
            assert seen == ["before"]  # buffered messages stay readable first
            assert info.value.code == 4000
            assert info.value.reason == "shutting down badly"
            assert not info.value.is_normal
            with pytest.raises(ConnectionLost):
                await b.send_message(delegation("late"))
            assert b.status == "disconnected"
            assert not b.is_healthy()


async def test_protocol_error_close_sets_error_status() -> None:
    async with open_websocket_pair() as pair:
        b = OrchestratorConnection(id="orch-a", socket=pair.server)
        async with b:
            await pair.client.aclose(1002, "protocol error")
            with pytest.raises(ConnectionLost):
                await b.receive()
            assert b.status == "error"


async def test_subscription_streams_raise_on_loss_and_end_on_normal_close() -> None:
    async with open_websocket_pair() as pair:
        b = OrchestratorConnection(id="orch-a", socket=pair.server)
        async with b:
            with b.subscribe("broadcast") as stream:
                await pair.client.aclose(1011, "boom")
                with pytest.raises(ConnectionLost):
                    await stream.receive()
    async with open_connection_pair() as (a, b):
        with b.subscribe("broadcast") as stream:
            await a.disconnect()
            assert [m async for m in stream] == []


async def test_status_stream_sees_every_change_and_ends() -> None:
    async with open_websocket_pair() as pair:
        a = OrchestratorConnection(id="orch-b", socket=pair.client, local_id="orch-a")
        b = OrchestratorConnection(id="orch-a", socket=pair.server, local_id="orch-b")
        with a.watch_status() as statuses:
            async with b, a:
                await a.send_message(delegation("1"))
                await b.receive()
            seen = [s async for s in statuses]
        assert seen == ["connected", "active", "disconnected"]
        assert statuses.missed == 0


async def test_event_stream_overflow_drops_oldest_and_counts() -> None:
    async with open_connection_pair() as (a, b):
        with b.watch_errors() as errors:
            assert a.socket is not None
            for _ in range(300):
                await a.socket.send_message("garbage")
            await a.send_message(delegation("sync"))
            await b.receive()
            assert errors.missed == 300 - 256
            first = errors.receive_nowait()
            assert isinstance(first, MalformedMessage)


async def test_user_exception_leaves_the_block_plain_and_closes_1011() -> None:
    async with open_websocket_pair() as pair:
        b = OrchestratorConnection(id="orch-a", socket=pair.server)
        a = OrchestratorConnection(id="orch-b", socket=pair.client)
        async with a:
            with pytest.raises(KeyError, match="oops"):
                async with b:
                    raise KeyError("oops")
            with pytest.raises(ConnectionLost) as info:
                await a.receive()
            assert info.value.code == 1011


async def test_cancellation_tears_down_promptly_with_going_away() -> None:
    async with open_websocket_pair() as pair:
        a = OrchestratorConnection(id="orch-b", socket=pair.client)
        b = OrchestratorConnection(id="orch-a", socket=pair.server)
        async with a:
            with trio.move_on_after(0.05) as scope:
                async with b:
                    await trio.sleep_forever()
            assert scope.cancelled_caught
            with pytest.raises(trio.EndOfChannel):  # 1001 is a normal end
                await a.receive()
            assert b.status == "disconnected"
            with pytest.raises(ConnectionLost) as info:
                await a.send_message(delegation("late"))
            assert info.value.code == 1001


async def test_cannot_enter_twice_and_bad_settings_are_refused() -> None:
    async with open_websocket_pair() as pair:
        with pytest.raises(ValueError, match="heartbeat_timeout"):
            OrchestratorConnection(id="x", socket=pair.client, heartbeat_timeout=0)
        with pytest.raises(ValueError, match="heartbeat_timeout"):
            OrchestratorConnection(id="x", socket=pair.client, heartbeat_timeout=math.inf)
        with pytest.raises(TypeError, match="heartbeat_timeout"):
            OrchestratorConnection(id="x", socket=pair.client, heartbeat_timeout="1")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="max_queue_size"):
            OrchestratorConnection(id="x", socket=pair.client, max_queue_size=0)
        with pytest.raises(TypeError, match="max_queue_size"):
            OrchestratorConnection(id="x", socket=pair.client, max_queue_size=1.5)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="id must be a string"):
            OrchestratorConnection(id=None, socket=pair.client)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="local_id"):
            OrchestratorConnection(id="x", socket=pair.client, local_id=3)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="not the string"):
            OrchestratorConnection(id="x", socket=pair.client, capabilities="testing")
        conn = OrchestratorConnection(id="x", socket=pair.client)
        async with conn:
            with pytest.raises(RuntimeError, match="only once"):
                async with conn:
                    pass  # pragma: no cover


async def test_local_status_is_announced(autojump_clock: trio.testing.MockClock) -> None:
    async with open_connection_pair(heartbeat_timeout=2.0) as (a, b):
        a.local_status = "overloaded"
        assert a.local_status == "overloaded"
        with b.watch_status() as statuses:
            assert await statuses.receive() == "degraded"
        assert b.status == "degraded"


async def test_slow_consumer_applies_backpressure_and_peer_stays_healthy(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_connection_pair(
        receive_buffer_size=4, max_queue_size=8, heartbeat_timeout=10.0
    ) as (a, b):
        async with trio.open_nursery() as nursery:
            sent = 0

            async def producer() -> None:
                nonlocal sent
                for i in range(500):
                    await a.send(delegation(f"m{i}"))
                    sent += 1

            nursery.start_soon(producer)
            await trio.sleep(60)  # b reads nothing for six heartbeat timeouts
            assert sent < 500  # the producer was slowed down, nothing grew
            assert len(a.message_queue) <= 8 + 1  # plus at most one heartbeat
            assert b.is_healthy()  # b's stall is its own doing, not a's
            assert b.status != "degraded"
            got = [(await b.receive()).correlation_id for _ in range(500)]
        assert got == [f"m{i}" for i in range(500)]


async def test_errors_are_federation_errors() -> None:
    for error in (
        QueueFull(1),
        MalformedMessage("x"),
        ConnectionLost(1006),
        HeartbeatTimeout("p", 1.0),
        UnsentMessages("p", 2),
    ):
        assert isinstance(error, FederationError)


async def test_subscribing_before_the_first_checkpoint_misses_nothing() -> None:
    async with open_websocket_pair() as pair:
        b = OrchestratorConnection(id="orch-a", socket=pair.server)
        # Messages already waiting when the connection opens.
        await pair.client.send_message(encode_message(heartbeat("healthy")))
        await pair.client.send_message(encode_message(broadcast("early")))
        await trio.testing.wait_all_tasks_blocked()
        async with b:
            with b.subscribe("heartbeat", "broadcast") as early:
                got = [await early.receive(), await early.receive()]
        assert [m.type for m in got] == ["heartbeat", "broadcast"]


async def test_last_heartbeat_before_open_is_the_creation_time() -> None:
    async with open_websocket_pair() as pair:
        conn = OrchestratorConnection(id="x", socket=pair.client)
        assert conn.last_heartbeat == conn.get_status().last_heartbeat
        assert conn.get_status().uptime == 0.0
        assert conn.get_status().status == "connecting"


async def test_non_string_capabilities_are_refused() -> None:
    async with open_websocket_pair() as pair:
        with pytest.raises(TypeError, match="a capability must be a string, got int"):
            OrchestratorConnection(id="x", socket=pair.client, capabilities=[5])  # type: ignore[list-item]


async def test_send_waiting_for_room_fails_when_the_connection_is_closed() -> None:
    async with open_websocket_pair() as pair:
        a = OrchestratorConnection(id="x", socket=pair.client, max_queue_size=1)
        await a.send(delegation("1"))
        async with trio.open_nursery() as nursery:
            failures: list[BaseException] = []

            async def blocked() -> None:
                try:
                    await a.send(delegation("2"))
                except trio.ClosedResourceError as exc:
                    failures.append(exc)

            nursery.start_soon(blocked)
            await trio.testing.wait_all_tasks_blocked()
            await a.disconnect()  # never opened: closes the queue and the socket
        assert len(failures) == 1
        assert a.status == "disconnected"


async def test_streams_made_after_the_end_are_already_over() -> None:
    async with open_connection_pair() as (a, b):
        await a.disconnect()
        await wait_for(lambda: b.status == "disconnected")
        with b.subscribe("delegation") as stream:
            with pytest.raises(trio.EndOfChannel):
                await stream.receive()
        with b.watch_status() as statuses:
            assert [s async for s in statuses] == []
        with pytest.raises(trio.EndOfChannel):
            b.watch_errors().__enter__().receive_nowait()


async def test_entering_under_a_cancelled_scope_leaves_nothing_running() -> None:
    async with open_websocket_pair() as pair:
        conn = OrchestratorConnection(id="x", socket=pair.client)
        with trio.CancelScope() as scope:
            scope.cancel()
            async with conn:
                pytest.fail("entered under a cancelled scope")  # pragma: no cover
        assert conn.status == "disconnected"


async def test_a_failing_callback_ends_the_connection_with_1011_and_the_cause() -> None:
    def broken() -> int:
        raise ZeroDivisionError("load figure unavailable")

    async with open_websocket_pair() as pair:
        a = OrchestratorConnection(
            id="orch-b",
            socket=pair.client,
            local_id="orch-a",
            heartbeat_timeout=0.05,
            active_connections=broken,
        )
        b = OrchestratorConnection(id="orch-a", socket=pair.server, local_id="orch-b")
        async with b, a:
            with pytest.raises(ConnectionLost) as info:
                await a.receive()
            assert info.value.code == 1011
            assert "internal error in _watchdog" in info.value.reason
            assert isinstance(info.value.__cause__, ZeroDivisionError)
            with pytest.raises(ConnectionLost) as remote:
                await b.receive()
            assert remote.value.code == 1011


async def test_a_subscription_closed_mid_delivery_passes_the_message_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with open_connection_pair() as (a, b):
        with b.subscribe("broadcast", max_buffer=1):
            await a.send_message(broadcast("one"))
            await a.send_message(broadcast("two"))
            await trio.testing.wait_all_tasks_blocked()  # the reader waits on `first`
        # Unsubscribed with "one" unread (logged); "two", still in the reader's
        # hands, goes to the next route: async for.
        assert (await b.receive()).payload.topic == "two"  # type: ignore[union-attr]
    assert "left with 1 unread message(s)" in caplog.text


async def test_a_closed_subscription_is_skipped() -> None:
    async with open_connection_pair() as (a, b):
        with b.subscribe("broadcast") as closed, b.subscribe("broadcast") as open_:
            closed.close()
            await a.send_message(broadcast("x"))
            assert (await open_.receive()).type == "broadcast"


async def test_raise_single_keeps_real_groups() -> None:
    from trio_federation._connection._connection import raise_single

    group = ExceptionGroup("two", [ValueError("a"), KeyError("b")])
    with pytest.raises(ExceptionGroup) as info:
        raise_single(group)
    assert info.value is group
    with pytest.raises(ValueError, match="a"):
        raise_single(ExceptionGroup("one", [ValueError("a")]))


async def test_a_crash_of_trio_websockets_reader_ends_the_connection_as_lost() -> None:
    from trio_federation.testing import _HOSTS

    async with open_websocket_pair() as pair:
        a = OrchestratorConnection(id="orch-b", socket=pair.client, local_id="orch-a")
        host, _ = _HOSTS[id(pair)]
        host.on_failure = a._transport_failed
        async with a:

            async def crash() -> None:
                raise RuntimeError("wsproto refused a pong")

            host.nursery.start_soon(crash)
            with pytest.raises(ConnectionLost) as info:
                await a.receive()
            assert info.value.code == 1006
            assert "transport" in info.value.reason
        assert a.status == "disconnected"


async def test_heartbeats_never_take_room_from_the_user(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_websocket_pair() as pair:
        a = OrchestratorConnection(
            id="orch-b",
            socket=pair.client,
            local_id="orch-a",
            max_queue_size=2,
            heartbeat_timeout=2.0,
            disconnect_timeout=1.0,
        )
        async with a:
            pair.server_scope.cancel()  # nothing is read: the queue stays put
            for i in range(10_000):  # until the socket buffers are full too
                with trio.move_on_after(0.5) as waited:
                    await a.send(delegation(f"fill-{i}"))
                if waited.cancelled_caught:
                    break
            else:
                pytest.fail("the queue never filled")
            await trio.sleep(5)  # heartbeats are due meanwhile
            kinds = [str(m.type) for m in a.message_queue]
            assert kinds.count("heartbeat") == 1
            assert kinds.count("delegation") == 2
            with pytest.raises(QueueFull):
                await a.send_message(delegation("one more"))


async def test_returning_pongs_end_the_degraded_state(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="trio_federation")
    async with open_websocket_pair() as pair:
        # The peer is plain trio-websocket: it answers pings and sends nothing,
        # so only a pong can bring the connection back.
        a = OrchestratorConnection(
            id="orch-b", socket=pair.client, local_id="orch-a", heartbeat_timeout=10.0
        )
        async with a:
            with a.watch_status() as statuses:
                a._state.liveness_ok = False  # as after a missed deadline
                a._publish_status()
                assert await statuses.receive() == "degraded"
                assert await statuses.receive() == "connected"
            latency = a.get_status().latency
            assert latency is not None and latency >= 0
    assert "connection to 'orch-b': connected -> degraded" in caplog.text
    assert "connection to 'orch-b': degraded -> connected" in caplog.text


async def test_errors_are_logged(caplog: pytest.LogCaptureFixture) -> None:
    async with open_connection_pair() as (a, b):
        assert a.socket is not None
        await a.socket.send_message("not json")
        await a.send_message(delegation("sync"))
        await b.receive()
    assert "connection to 'orch-a': invalid JSON" in caplog.text


async def test_a_failing_predicate_ends_only_its_subscription(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with open_connection_pair() as (a, b):
        with b.subscribe("broadcast", predicate=lambda m: 1 / 0 > 0) as broken:
            await a.send_message(broadcast("x"))
            assert (await b.receive()).type == "broadcast"  # passed on to async for
            with pytest.raises(ZeroDivisionError):
                await broken.receive()
        await a.send_message(delegation("still-up"))
        assert (await b.receive()).correlation_id == "still-up"
    assert "a subscription's predicate raised" in caplog.text


async def test_subscribe_without_types_takes_data_messages_only() -> None:
    async with open_connection_pair() as (a, b):
        with b.subscribe() as everything:
            await a.send_message(heartbeat("healthy"))
            await a.send_message(broadcast("data"))
            got = await everything.receive()
            assert got.type == "broadcast"
            with pytest.raises(trio.WouldBlock):
                everything.receive_nowait()


async def test_a_connection_without_a_socket_cannot_be_entered() -> None:
    conn = OrchestratorConnection(id="orch-b", socket=None)
    with pytest.raises(ValueError, match="no socket"):
        async with conn:
            pass  # pragma: no cover


@pytest.mark.parametrize("resumable", [False, True])
async def test_queued_messages_go_out_in_one_write(resumable: bool) -> None:
    # Our own transport: the writer coalesces what waits into one write (one
    # system call, one scheduler pass), in order, each counted as sent.
    from trio_federation._wire._frames import open_client, read_request

    client_stream, server_stream = trio.testing.memory_stream_pair()
    writes = 0
    pump = client_stream.send_stream.send_all_hook
    assert pump is not None

    async def counting_pump() -> None:
        nonlocal writes
        writes += 1
        await pump()

    wires = {}

    async def serve() -> None:
        request = await read_request(server_stream, 1 << 20)
        wires["server"] = await request.accept()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve)
        wires["client"] = await open_client(client_stream, "memory", "/", [], 1 << 20)
    client_stream.send_stream.send_all_hook = counting_pump
    # Dialled and accepted connections get our transport; here by hand.
    a = OrchestratorConnection(id="orch-b", socket=wires["client"], local_id="orch-a")  # type: ignore[arg-type]
    b = OrchestratorConnection(id="orch-a", socket=wires["server"], local_id="orch-b")  # type: ignore[arg-type]
    if resumable:
        a._start_session("s", b._resume_offer_for("s"))
        b._start_session("s", a._resume_offer_for("s"))
    for i in range(40):
        await a.send_message(delegation(f"t{i}"))
    async with b, a:
        got = [await b.receive() for _ in range(40)]
        assert [m.correlation_id for m in got] == [f"t{i}" for i in range(40)]
        assert a.get_status().messages_sent == 40
        assert not a.message_queue
        assert writes <= 2  # the batch, and perhaps the first heartbeat
