"""Batched frames between trio-federation peers, on real sockets.

The raw clients here speak the documented encoding (the protocol page's
"Batches") by hand, so the listener is checked against the format and not
only against our own dialer.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio_websocket

from trio_federation import (
    ConnectionLost,
    FederationListener,
    FederationMessage,
    OrchestratorConnection,
    decode_message,
    encode_message,
    open_orchestrator_connection,
    serve_federation,
)
from trio_federation._connection._session import (
    BATCH_PREFIX,
    parse_refusal,
    sequenced_frame,
    split_batch,
    split_frame,
)

from ..conftest import delegation
from .rawclient import open_raw_client

LISTENER = "orch-b"
CLIENT = "orch-a"
COUNT = 200


def identity(extensions: str | None, *, session: bool) -> list[tuple[bytes, bytes]]:
    headers = [
        (b"X-Federation-Id", CLIENT.encode()),
        (b"X-Federation-Capabilities", b""),
        (b"X-Federation-Protocol", b"1"),
    ]
    if extensions is not None:
        headers.append((b"X-Federation-Extensions", extensions.encode()))
    if session:
        headers.append((b"X-Federation-Resume", b"v1;session=abc123;received=0;window=1000"))
    return headers


class Recorder:
    """A listener handler: queues ``COUNT`` messages at once, then records what arrives."""

    def __init__(self, burst: int = COUNT) -> None:
        self.burst = burst
        self.received: list[FederationMessage] = []
        self.connection: OrchestratorConnection | None = None
        self.ended: BaseException | None = None
        self.done = trio.Event()

    async def __call__(self, conn: OrchestratorConnection) -> None:
        self.connection = conn
        for index in range(self.burst):
            conn.send_nowait(delegation(f"out-{index}", sender=LISTENER, recipient=CLIENT))
        try:
            async for message in conn:
                self.received.append(message)
        except Exception as exc:
            self.ended = exc
        finally:
            self.done.set()


@asynccontextmanager
async def listening(
    handler: Callable[[OrchestratorConnection], Awaitable[object]], **options: Any
) -> AsyncIterator[str]:
    async with trio.open_nursery() as nursery:
        listener: FederationListener = await nursery.start(
            functools.partial(serve_federation, local_id=LISTENER, capabilities=(), **options),
            handler,
            "127.0.0.1",
            0,
        )
        yield f"ws://127.0.0.1:{listener.port}/federation"
        nursery.cancel_scope.cancel()


async def receive_envelopes(
    ws: trio_websocket.WebSocketConnection, count: int, *, session: bool
) -> tuple[list[str], int]:
    """The first ``count`` envelopes the listener sent, and how many frames carried them."""
    envelopes: list[str] = []
    frames = 0
    next_seq = 1
    with trio.fail_after(3):
        while len(envelopes) < count:
            frame = await ws.get_message()
            assert isinstance(frame, str)
            frames += 1
            if frame.startswith(BATCH_PREFIX):
                first, _, batch = split_batch(frame, session=session)
                if session:
                    assert first == next_seq
                    next_seq += len(batch)
                envelopes.extend(batch)
            elif session:
                seq, _ = split_frame(frame)
                if seq is None:
                    continue  # an acknowledgement alone
                assert seq == next_seq
                next_seq += 1
                envelopes.append("{" + frame.split(",", 2)[2])
            else:
                envelopes.append(frame)
    return envelopes, frames


@pytest.mark.parametrize("session", [True, False], ids=["session", "sessionless"])
async def test_a_burst_goes_out_in_batches_that_decode_in_order(session: bool) -> None:
    recorder = Recorder()
    async with (
        listening(recorder) as url,
        open_raw_client(url, headers=identity("batch,cancel", session=session)) as ws,
    ):
        envelopes, frames = await receive_envelopes(ws, COUNT, session=session)
    ids = [decode_message(text).correlation_id for text in envelopes]
    assert ids == [f"out-{index}" for index in range(COUNT)]
    assert frames < COUNT // 10, f"{COUNT} messages queued at once took {frames} frames"


async def test_a_peer_that_did_not_ask_never_sees_a_batch() -> None:
    recorder = Recorder()
    async with (
        listening(recorder) as url,
        open_raw_client(url, headers=identity(None, session=True)) as ws,
    ):
        envelopes, frames = await receive_envelopes(ws, COUNT, session=True)
        assert recorder.connection is not None
        assert "batch" not in recorder.connection.extensions
    assert frames >= COUNT
    assert [decode_message(text).correlation_id for text in envelopes][-1] == f"out-{COUNT - 1}"


async def test_a_listener_with_small_frames_does_not_grant_batches() -> None:
    recorder = Recorder(burst=0)
    async with (
        listening(recorder, max_message_size=16 * 1024) as url,
        open_orchestrator_connection(url, local_id=CLIENT, capabilities=()) as conn,
    ):
        assert "batch" not in conn.extensions
        assert "cancel" in conn.extensions


@pytest.mark.parametrize("resumable", [True, False], ids=["session", "sessionless"])
async def test_our_peers_agree_on_batches_and_lose_nothing(resumable: bool) -> None:
    recorder = Recorder(burst=0)
    async with listening(recorder) as url:
        async with open_orchestrator_connection(
            url, local_id=CLIENT, capabilities=(), resumable=resumable
        ) as conn:
            assert "batch" in conn.extensions
            for index in range(COUNT):
                conn.send_nowait(delegation(f"in-{index}"))
            for index in range(COUNT, 2 * COUNT):
                await conn.send(delegation(f"in-{index}"))
        with trio.fail_after(3):
            await recorder.done.wait()
    assert [m.correlation_id for m in recorder.received] == [f"in-{i}" for i in range(2 * COUNT)]
    assert recorder.connection is not None and "batch" in recorder.connection.extensions


def batch_of(texts: list[str], header: str) -> str:
    return "\n".join([header, *texts])


async def test_a_hand_written_batch_is_delivered_and_numbered() -> None:
    recorder = Recorder(burst=0)
    texts = [encode_message(delegation(f"in-{index}")) for index in range(5)]
    async with listening(recorder) as url:
        async with open_raw_client(url, headers=identity("batch", session=True)) as ws:
            await ws.send_message(sequenced_frame(1, 0, texts[0]))
            await ws.send_message(batch_of(texts[1:4], '{"batch":3,"seq":2,"ack":0}'))
            # After a reconnect a sender may write again what was received: dropped.
            await ws.send_message(batch_of(texts[2:5], '{"batch":3,"seq":3,"ack":0}'))
            with trio.fail_after(3):
                while len(recorder.received) < 5:
                    await trio.sleep(0.01)
    assert [m.correlation_id for m in recorder.received] == [f"in-{i}" for i in range(5)]


@pytest.mark.parametrize(
    ("frame", "why"),
    [
        ('{"batch":3,"seq":1,"ack":0}\n{}\n{}', "announced 3 envelopes and holds 2"),
        ('{"batch":2}\n{}\n{}', "malformed batch header for a session's batch"),
        (
            '{"batch":1,"seq":1,"ack":0}\n{}',
            "a batch must hold 2 to 30720 envelopes; this one announced 1",
        ),
        ('{"batch":2,"seq":5,"ack":0}\nA\nB', "message 5 arrived after 0"),
        ('{"batch":2,"seq":1,"ack":9}\n{}\n{}', "acknowledgement 9 beyond"),
    ],
)
async def test_a_broken_batch_closes_with_1002_naming_what_was_wrong(frame: str, why: str) -> None:
    recorder = Recorder(burst=0)
    async with listening(recorder) as url:
        async with open_raw_client(url, headers=identity("batch", session=True)) as ws:
            await ws.send_message(frame)
            with trio.fail_after(3), pytest.raises(trio_websocket.ConnectionClosed) as info:
                while True:
                    await ws.get_message()
        with trio.fail_after(3):
            await recorder.done.wait()
    reason = info.value.reason
    assert reason is not None and reason.code == 1002
    assert isinstance(recorder.ended, ConnectionLost)
    assert recorder.ended.code == 1002
    assert why in recorder.ended.reason


async def test_a_batch_without_the_extension_is_an_ordinary_malformed_message() -> None:
    recorder = Recorder(burst=0)
    texts = [encode_message(delegation(f"in-{index}")) for index in range(2)]
    async with listening(recorder) as url:
        async with open_raw_client(url, headers=identity(None, session=False)) as ws:
            await ws.send_message(batch_of(texts, '{"batch":2}'))
            await ws.send_message(texts[0])
            with trio.fail_after(3):
                while not recorder.received:
                    await trio.sleep(0.01)
    assert [m.correlation_id for m in recorder.received] == ["in-0"]


async def test_a_malformed_envelope_in_a_batch_is_refused_by_its_own_number() -> None:
    recorder = Recorder(burst=0)
    texts = [encode_message(delegation(f"in-{index}")) for index in range(3)]
    texts[1] = '{"type":"delegation"}'  # no payload, no from, no to
    async with listening(recorder) as url:
        async with open_raw_client(url, headers=identity("batch", session=True)) as ws:
            await ws.send_message(batch_of(texts, '{"batch":3,"seq":1,"ack":0}'))
            with trio.fail_after(3):
                while True:
                    frame = await ws.get_message()
                    assert isinstance(frame, str)
                    if frame.startswith('{"ctl":"refused"'):
                        break
            while len(recorder.received) < 2:
                await trio.sleep(0.01)
    refusal = parse_refusal(frame)
    assert refusal is not None and refusal[0] == 2
    assert [m.correlation_id for m in recorder.received] == ["in-0", "in-2"]


async def test_rate_limits_count_each_envelope_of_a_batch() -> None:
    texts = [encode_message(delegation(f"in-{index}")) for index in range(10)]
    # Without a session the limit refuses what is over it, envelope by envelope.
    refused = Recorder(burst=0)
    async with listening(refused, rate_limit=0.001, rate_burst=3, max_violations=100) as url:
        async with open_raw_client(url, headers=identity("batch", session=False)) as ws:
            await ws.send_message(batch_of(texts, '{"batch":10}'))
            await ws.send_message(texts[0])  # also over the limit: refused
            with trio.fail_after(3):
                while refused.connection is None or refused.connection.get_status().errors < 8:
                    await trio.sleep(0.01)
    assert [m.correlation_id for m in refused.received] == ["in-0", "in-1", "in-2"]
    # In a session it is flow control: every envelope arrives, at the limit's pace.
    paced = Recorder(burst=0)
    async with listening(paced, rate_limit=50, rate_burst=2) as url:
        async with open_raw_client(url, headers=identity("batch", session=True)) as ws:
            started = trio.current_time()
            await ws.send_message(batch_of(texts, '{"batch":10,"seq":1,"ack":0}'))
            with trio.fail_after(3):
                while len(paced.received) < 10:
                    await trio.sleep(0.005)
            elapsed = trio.current_time() - started
    assert [m.correlation_id for m in paced.received] == [f"in-{i}" for i in range(10)]
    assert elapsed >= 8 / 50 * 0.9  # 8 envelopes past the burst, at 50/s


async def test_a_malformed_batch_without_a_session_is_reported_and_the_connection_goes_on() -> None:
    recorder = Recorder(burst=0)
    texts = [encode_message(delegation(f"in-{index}")) for index in range(3)]
    async with listening(recorder) as url:
        async with open_raw_client(url, headers=identity("batch", session=False)) as ws:
            await ws.send_message(batch_of(texts, '{"batch":2}'))  # three lines for two
            await ws.send_message(texts[2])
            with trio.fail_after(3):
                while not recorder.received:
                    await trio.sleep(0.01)
            assert recorder.connection is not None
            assert recorder.connection.get_status().errors == 1
            assert recorder.connection.status != "disconnected"
    assert [m.correlation_id for m in recorder.received] == ["in-2"]
