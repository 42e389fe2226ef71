"""Identity binding, the inbound rate limit and the other per-connection limits.

The peer here is a raw trio-websocket connection, so it can send what an
OrchestratorConnection never would.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import trio
import trio.testing

from trio_federation import (
    BroadcastPayload,
    ConnectionLost,
    FederationError,
    FederationMessage,
    MessageRefused,
    OrchestratorConnection,
    PolicyViolation,
    encode_message,
)
from trio_federation.testing import WebSocketPair, open_websocket_pair

from .conftest import delegation, progress, wait_for


@pytest.fixture
async def pair() -> AsyncIterator[WebSocketPair]:
    async with open_websocket_pair() as pair:
        yield pair


def guarded(pair: WebSocketPair, **options: object) -> OrchestratorConnection:
    """Our side ("orch-b"), listening to the raw client side ("orch-a")."""
    return OrchestratorConnection(id="orch-a", socket=pair.server, local_id="orch-b", **options)  # type: ignore[arg-type]


def broadcast(recipient: str) -> FederationMessage:
    return FederationMessage(
        type="broadcast",
        payload=BroadcastPayload(topic="news", data=None),
        sender="orch-a",
        recipient=recipient,
    )


async def collect_errors(conn: OrchestratorConnection, count: int) -> list[FederationError]:
    errors: list[FederationError] = []
    with conn.watch_errors() as stream:
        async for error in stream:
            errors.append(error)
            if len(errors) == count:
                break
    return errors


@pytest.mark.parametrize(
    ("message", "words"),
    [
        (delegation("spoof", sender="orch-z"), "'from' is 'orch-z', but this peer is 'orch-a'"),
        (delegation("misaddressed", recipient="orch-c"), "'to' is 'orch-c'"),
        (
            FederationMessage(
                type="delegation",
                payload=delegation("t", sender="orch-z").payload,
                sender="orch-a",
                recipient="orch-b",
            ),
            "a delegation from 'orch-z' arrived from 'orch-a'",
        ),
    ],
)
async def test_messages_breaking_identity_binding_are_refused(
    pair: WebSocketPair, message: FederationMessage, words: str
) -> None:
    async with guarded(pair) as conn:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pair.client.send_message, encode_message(message))
            nursery.start_soon(pair.client.send_message, encode_message(delegation("honest")))
            errors = await collect_errors(conn, 1)
        assert isinstance(errors[0], PolicyViolation)
        assert words in str(errors[0])
        assert errors[0].peer == "orch-a"
        honest = await conn.receive()  # the refused one was never delivered
        assert honest.correlation_id == "honest"
        assert conn.get_status().errors == 1
        assert conn.get_status().messages_received == 1


@pytest.mark.parametrize("recipient", ["orch-b", "*", "broadcast"])
async def test_broadcast_addresses_are_accepted(pair: WebSocketPair, recipient: str) -> None:
    async with guarded(pair) as conn:
        await pair.client.send_message(encode_message(broadcast(recipient)))
        assert (await conn.receive()).recipient == recipient


async def test_without_local_id_any_recipient_is_accepted(pair: WebSocketPair) -> None:
    async with OrchestratorConnection(id="orch-a", socket=pair.server) as conn:
        await pair.client.send_message(encode_message(delegation("t", recipient="anyone")))
        assert (await conn.receive()).recipient == "anyone"


async def test_the_first_sender_fixes_an_unknown_id(pair: WebSocketPair) -> None:
    async with OrchestratorConnection(id="", socket=pair.server, local_id="orch-b") as conn:
        await pair.client.send_message(encode_message(delegation("first")))
        await pair.client.send_message(encode_message(delegation("spoof", sender="orch-z")))
        await pair.client.send_message(encode_message(delegation("second")))
        assert (await conn.receive()).correlation_id == "first"
        assert (await conn.receive()).correlation_id == "second"
        assert conn.id == "orch-a"
        assert conn.get_status().errors == 1


async def test_a_peer_that_keeps_violating_is_cut_off_with_1008(pair: WebSocketPair) -> None:
    async with guarded(pair, max_violations=3) as conn:
        for n in range(3):
            await pair.client.send_message(encode_message(delegation(f"s{n}", sender="orch-z")))
        with pytest.raises(ConnectionLost) as info:
            await conn.receive()
        assert info.value.code == 1008
        assert "3 messages refused by policy" in info.value.reason
        await wait_for(lambda: pair.client.closed is not None)
        assert pair.client.closed is not None and pair.client.closed.code == 1008


async def test_rate_limit_refuses_excess_then_cuts_a_flood_off(
    autojump_clock: trio.testing.MockClock, pair: WebSocketPair
) -> None:
    async with guarded(pair, rate_limit=10.0, rate_burst=5, max_violations=4) as conn:
        # A burst of 5 passes; then 1 message every 0.1 s is the sustainable pace.
        for n in range(5):
            await pair.client.send_message(
                encode_message(progress(f"b{n}", 0.1, sender="orch-a", recipient="orch-b"))
            )
        for n in range(5):
            await trio.sleep(0.1)
            await pair.client.send_message(
                encode_message(progress(f"p{n}", 0.2, sender="orch-a", recipient="orch-b"))
            )
        received = [(await conn.receive()).correlation_id for _ in range(10)]
        assert received == [f"b{n}" for n in range(5)] + [f"p{n}" for n in range(5)]
        assert conn.get_status().errors == 0
        # A flood: the bucket is empty, each excess frame is refused unread.
        async with trio.open_nursery() as nursery:
            errors_task: list[list[FederationError]] = []

            async def watch() -> None:
                errors_task.append(await collect_errors(conn, 4))

            nursery.start_soon(watch)
            await trio.sleep(0)
            for n in range(20):
                try:
                    await pair.client.send_message(
                        encode_message(progress(f"f{n}", 0.3, sender="orch-a", recipient="orch-b"))
                    )
                except Exception:
                    break  # cut off
        violations = errors_task[0]
        assert all(isinstance(e, PolicyViolation) for e in violations)
        assert "more than 10 messages/s (burst 5)" in str(violations[0])
        with pytest.raises(ConnectionLost) as info:
            await conn.receive()
        assert info.value.code == 1008


async def test_rate_limit_can_be_disabled(pair: WebSocketPair) -> None:
    async with guarded(pair, rate_limit=None, rate_burst=1) as conn:
        for n in range(50):
            await pair.client.send_message(
                encode_message(progress(f"p{n}", 0.5, sender="orch-a", recipient="orch-b"))
            )
        for _ in range(50):
            await conn.receive()
        assert conn.get_status().errors == 0


async def test_subscriptions_are_limited(pair: WebSocketPair) -> None:
    async with guarded(pair, max_subscriptions=2) as conn:
        with conn.subscribe("broadcast"), conn.subscribe("callback"):
            with pytest.raises(RuntimeError, match="max_subscriptions=2"):
                with conn.subscribe("delegation"):
                    pass  # pragma: no cover
        with conn.subscribe("delegation"):  # room again once they are left
            pass


@pytest.mark.parametrize(
    ("option", "value", "error"),
    [
        ("rate_limit", 0.0, ValueError),
        ("rate_limit", "fast", TypeError),
        ("rate_burst", 0, ValueError),
        ("max_violations", 0, ValueError),
        ("max_subscriptions", 0, ValueError),
    ],
)
async def test_limits_are_checked(
    pair: WebSocketPair, option: str, value: object, error: type[Exception]
) -> None:
    with pytest.raises(error, match=option):
        guarded(pair, **{option: value})


async def test_an_oversized_frame_closes_with_1009(pair: WebSocketPair) -> None:
    # The limit is trio-websocket's: it closes with 1009 before anything is decoded.
    async with open_websocket_pair(max_message_size=1000) as small:
        async with OrchestratorConnection(
            id="orch-a", socket=small.server, local_id="orch-b"
        ) as conn:
            await small.client.send_message("x" * 2000)
            with pytest.raises(ConnectionLost) as info:
                await conn.receive()
            assert info.value.code == 1009
            await wait_for(lambda: small.client.closed is not None)
            assert small.client.closed is not None and small.client.closed.code == 1009


async def test_in_a_session_the_rate_limit_paces_instead_of_refusing(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # The limit as flow control: the reader waits for tokens, the sender's
    # window closes, and every message arrives; nothing is refused.
    from trio_federation.testing import open_connection_pair

    async with open_connection_pair(
        resumable=True, rate_limit=10.0, rate_burst=2, max_violations=1
    ) as (a, b):
        with a.watch_errors() as a_errors, b.watch_errors() as b_errors:
            started = trio.current_time()
            for n in range(12):
                await a.send(progress(f"f{n}", 0.1, sender="orch-a", recipient="orch-b"))
            received = [(await b.receive()).correlation_id for _ in range(12)]
            took = trio.current_time() - started
            await trio.sleep(1)
            assert drain_errors(a_errors) == [] and drain_errors(b_errors) == []
        assert received == [f"f{n}" for n in range(12)]
        assert took >= (12 - 2) / 10.0 - 0.01  # held to the rate after the burst
        assert a.unacknowledged == ()
        assert a.status != "disconnected" and b.status != "disconnected"


async def test_in_a_session_a_refused_message_is_reported_to_its_sender(
    autojump_clock: trio.testing.MockClock,
) -> None:
    from trio_federation.testing import open_connection_pair

    async with open_connection_pair(resumable=True) as (a, b):
        with a.watch_errors() as a_errors:
            await a.send(progress("ok-1", 0.1, sender="orch-a", recipient="orch-b"))
            spoofed = progress("spoofed", 0.1, sender="mallory", recipient="orch-b")
            await a.send(spoofed)
            await a.send(progress("ok-2", 0.1, sender="orch-a", recipient="orch-b"))
            received = [(await b.receive()).correlation_id for _ in range(2)]
            await trio.sleep(1)  # the acknowledgements come back
            reported = drain_errors(a_errors)
        assert received == ["ok-1", "ok-2"]
        refused = [e for e in reported if isinstance(e, MessageRefused)]
        assert len(refused) == 1
        assert refused[0].message == spoofed
        assert refused[0].peer == "orch-b"
        assert "'from' is 'mallory'" in refused[0].reason
        assert a.unacknowledged == ()  # acknowledged, but only after it was reported


def drain_errors(stream: object) -> list[FederationError]:
    items: list[FederationError] = []
    while True:
        try:
            items.append(stream.receive_nowait())  # type: ignore[attr-defined]
        except (trio.WouldBlock, trio.EndOfChannel):
            return items
