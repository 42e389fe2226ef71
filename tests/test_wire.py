"""The owned transport (_wire) over in-memory streams: framing, pings, closes, handshakes."""

from __future__ import annotations

import functools
import struct
from collections.abc import AsyncIterator

import pytest
import trio
import trio.testing
import trio_websocket
from trio_websocket import ConnectionClosed, ConnectionRejected
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    Pong,
    Request,
    TextMessage,
)

from trio_federation._wire._frames import (
    UpgradeFailed,
    WireConnection,
    open_client,
    read_request,
)

MAX = 1000


async def _pair() -> tuple[WireConnection, WireConnection]:
    client_stream, server_stream = trio.testing.memory_stream_pair()
    result: dict[str, WireConnection] = {}

    async def serve() -> None:
        request = await read_request(server_stream, MAX, remote="memory")
        assert request.path == "/fed?id=x"
        assert (b"x-test", b"1") in request.headers
        result["server"] = await request.accept(extra_headers=[(b"X-Answer", b"yes")])

    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve)
        result["client"] = await open_client(
            client_stream, "example", "/fed?id=x", [(b"X-Test", b"1")], MAX
        )
    assert (b"x-answer", b"yes") in result["client"].handshake_headers
    return result["client"], result["server"]


@pytest.fixture
async def pair() -> AsyncIterator[tuple[WireConnection, WireConnection]]:
    client, server = await _pair()
    try:
        yield client, server
    finally:
        with trio.CancelScope() as scope:
            scope.cancel()
            await client.aclose()
            await server.aclose()


async def _raw_server() -> tuple[WireConnection, trio.abc.Stream, WSConnection]:
    """Our client against a hand-driven wsproto server (to send odd frames)."""
    client_stream, server_stream = trio.testing.memory_stream_pair()
    ws = WSConnection(ConnectionType.SERVER)

    async def serve() -> None:
        while True:
            ws.receive_data(bytes(await server_stream.receive_some()))
            for event in ws.events():
                if isinstance(event, Request):
                    await server_stream.send_all(ws.send(AcceptConnection()))
                    return

    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve)
        client = await open_client(client_stream, "example", "/", [], MAX)
    return client, server_stream, ws


def _code(exc: ConnectionClosed) -> int:
    assert exc.reason is not None
    return exc.reason.code


async def _abort(client: WireConnection, stream: trio.abc.Stream) -> None:
    """Close without waiting for an answer the hand-driven server never sends."""
    with trio.CancelScope() as scope:
        scope.cancel()
        await client.aclose()
    await stream.aclose()


async def _events(stream: trio.abc.Stream, ws: WSConnection) -> list[object]:
    ws.receive_data(bytes(await stream.receive_some()))
    return list(ws.events())


async def test_messages_both_ways(pair: tuple[WireConnection, WireConnection]) -> None:
    client, server = pair
    await client.send_message("hello")
    await client.send_message(b"bytes")
    assert await server.get_message() == "hello"
    assert await server.get_message() == b"bytes"
    await server.send_message("back")
    assert await client.get_message() == "back"
    assert client.closed is None and server.closed is None


async def test_fragmented_messages_are_joined() -> None:
    client, stream, ws = await _raw_server()
    data = ws.send(TextMessage(data="frag", message_finished=False))
    data += ws.send(Ping(payload=b"mid"))  # a control frame between fragments
    data += ws.send(TextMessage(data="ment", message_finished=True))
    await stream.send_all(data)
    assert await client.get_message() == "fragment"
    events = await _events(stream, ws)
    assert any(isinstance(e, Pong) and e.payload == b"mid" for e in events)
    await _abort(client, stream)


async def test_several_messages_from_one_read_come_one_at_a_time() -> None:
    client, stream, ws = await _raw_server()
    await stream.send_all(b"".join(ws.send(TextMessage(data=str(i))) for i in range(5)))
    assert [await client.get_message() for _ in range(5)] == [str(i) for i in range(5)]
    await _abort(client, stream)


async def test_ping_waits_for_its_pong(pair: tuple[WireConnection, WireConnection]) -> None:
    client, server = pair
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.get_message)  # the reader answers pings
        nursery.start_soon(client.get_message)  # and reads the pongs
        with trio.fail_after(5):
            await client.ping(b"1234")
            await client.ping(b"5678")
        nursery.cancel_scope.cancel()


async def test_ping_nowait_rides_with_the_next_write_and_calls_back_on_its_pong(
    pair: tuple[WireConnection, WireConnection],
) -> None:
    client, server = pair
    for ours, theirs in ((client, server), (server, client)):  # masked and not
        ponged: list[bytes] = []
        ours.ping_nowait(b"beat", functools.partial(ponged.append, b"beat"))
        assert ours.output_pending
        with pytest.raises(ValueError, match="already in flight"):
            ours.ping_nowait(b"beat", lambda: None)
        await ours.send_messages(["hello"])  # one write: the ping, then the message
        assert not ours.output_pending
        with trio.fail_after(5):
            assert await theirs.get_message() == "hello"  # and its reader pongs
            async with trio.open_nursery() as nursery:
                nursery.start_soon(ours.get_message)  # the pong is read here
                while not ponged:
                    await trio.sleep(0.01)
                nursery.cancel_scope.cancel()
        assert ponged == [b"beat"]
        assert not ours._pings


async def test_ping_nowait_refuses_a_closed_socket_or_a_long_payload(
    pair: tuple[WireConnection, WireConnection],
) -> None:
    client, _ = pair
    with pytest.raises(ValueError, match="125"):
        client.ping_nowait(bytes(126), lambda: None)
    with trio.CancelScope() as scope:
        scope.cancel()
        await client.aclose()
    with pytest.raises(ConnectionClosed):
        client.ping_nowait(b"late", lambda: None)


async def test_pings_cut_anywhere_are_answered_and_pongs_seen() -> None:
    client, stream, ws = await _raw_server()
    ponged: list[int] = []
    client.ping_nowait(b"ours", lambda: ponged.append(1))
    await client.send_messages([])  # an empty batch flushes the ping alone
    events = await _events(stream, ws)
    assert [e.payload for e in events if isinstance(e, Ping)] == [b"ours"]
    data = ws.send(Ping(payload=b"p1")) + ws.send(Pong(payload=b"ours"))
    data += ws.send(TextMessage(data="after"))
    for byte in data:  # one byte at a time: every frame arrives cut
        await stream.send_all(bytes([byte]))
    with trio.fail_after(5):
        assert await client.get_message() == "after"
    assert ponged == [1]
    events = await _events(stream, ws)
    assert [e.payload for e in events if isinstance(e, Pong)] == [b"p1"]
    await _abort(client, stream)


async def test_an_unmasked_ping_to_a_server_is_still_1002() -> None:
    server, stream, ws = await _raw_client()
    await stream.send_all(b"\x89\x02hi")
    await _closed_with(server, stream, ws, 1002)


async def test_a_pong_comes_only_to_a_reader(
    pair: tuple[WireConnection, WireConnection],
) -> None:
    client, server = pair
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.get_message)
        with trio.move_on_after(0.2) as waited:
            nursery.start_soon(client.ping, b"none")  # nobody reads on the client side
            await trio.testing.wait_all_tasks_blocked()
            with pytest.raises(ValueError, match="in flight"):
                await client.ping(b"none")
            await trio.sleep_forever()
        assert waited.cancelled_caught
        nursery.cancel_scope.cancel()


async def test_close_started_locally_while_the_reader_reads(
    pair: tuple[WireConnection, WireConnection],
) -> None:
    client, server = pair
    seen: list[BaseException] = []

    async def read(socket: WireConnection) -> None:
        try:
            while True:
                await socket.get_message()
        except ConnectionClosed as exc:
            seen.append(exc)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read, client)
        nursery.start_soon(read, server)
        await trio.testing.wait_all_tasks_blocked()
        with trio.fail_after(5):
            await client.aclose(4000, "replaced")
    assert client.closed is not None and client.closed.code == 4000
    assert server.closed is not None
    assert (server.closed.code, server.closed.reason) == (4000, "replaced")
    assert len(seen) == 2
    with pytest.raises(ConnectionClosed):
        await client.send_message("late")


async def test_close_with_no_reader_reads_the_answer_itself(
    pair: tuple[WireConnection, WireConnection],
) -> None:
    client, server = pair
    await server.send_message("unread")  # dropped: we are closing
    async with trio.open_nursery() as nursery:

        async def server_reads() -> None:
            with pytest.raises(ConnectionClosed):
                while True:
                    await server.get_message()

        nursery.start_soon(server_reads)
        with trio.fail_after(5):
            await client.aclose(1001, "going away")
    assert client.closed is not None and client.closed.code == 1001
    with pytest.raises(ConnectionClosed):
        await client.get_message()


async def test_close_by_the_peer_keeps_earlier_messages_readable(
    pair: tuple[WireConnection, WireConnection],
) -> None:
    client, server = pair
    await server.send_message("before")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.aclose, 1000, "bye")
        assert await client.get_message() == "before"
        with pytest.raises(ConnectionClosed) as info:
            await client.get_message()
    assert _code(info.value) == 1000
    assert server.closed is not None and server.closed.code == 1000


async def test_close_under_a_cancelled_scope_just_closes_the_stream(
    pair: tuple[WireConnection, WireConnection],
) -> None:
    client, server = pair
    with trio.CancelScope() as scope:
        scope.cancel()
        await client.aclose()
    assert client.closed is not None
    with pytest.raises(ConnectionClosed) as info:
        await server.get_message()
    assert _code(info.value) in (1000, 1006)


async def test_an_oversized_message_closes_with_1009() -> None:
    client, stream, ws = await _raw_server()
    await stream.send_all(ws.send(TextMessage(data="x" * (MAX + 1))))
    with pytest.raises(ConnectionClosed) as info:
        await client.get_message()
    assert _code(info.value) == 1009
    events = await _events(stream, ws)
    assert any(isinstance(e, CloseConnection) and e.code == 1009 for e in events)
    await _abort(client, stream)


async def test_a_message_grown_too_large_over_fragments_closes_with_1009() -> None:
    client, stream, ws = await _raw_server()
    for _ in range(3):
        await stream.send_all(ws.send(TextMessage(data="y" * 400, message_finished=False)))
    with pytest.raises(ConnectionClosed) as info:
        await client.get_message()
    assert _code(info.value) == 1009
    await _abort(client, stream)


async def test_eof_is_1006(pair: tuple[WireConnection, WireConnection]) -> None:
    client, server = pair
    await trio.aclose_forcefully(server._stream)
    with pytest.raises(ConnectionClosed) as info:
        await client.get_message()
    assert _code(info.value) == 1006
    with pytest.raises(ConnectionClosed):
        await client.ping(b"dead")


async def test_sending_over_a_broken_stream_raises_connection_closed(
    pair: tuple[WireConnection, WireConnection],
) -> None:
    client, _ = pair
    await trio.aclose_forcefully(client._stream)
    with pytest.raises(ConnectionClosed):
        await client.send_message("nowhere")
    assert client.closed is not None and client.closed.code == 1006


async def test_a_garbled_frame_closes_the_connection() -> None:
    client, stream, _ = await _raw_server()
    await stream.send_all(b"\x8f\x00")  # an unknown opcode
    with pytest.raises(ConnectionClosed) as info:
        await client.get_message()
    assert _code(info.value) == 1002
    await _abort(client, stream)


async def test_rejection_reaches_the_client() -> None:
    client_stream, server_stream = trio.testing.memory_stream_pair()

    async def serve() -> None:
        request = await read_request(server_stream, MAX)
        await request.reject(403, extra_headers=[(b"X-Why", b"no")], body=b"go away")
        await server_stream.aclose()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve)
        with pytest.raises(ConnectionRejected) as info:
            await open_client(client_stream, "example", "/", [], MAX)
    assert info.value.status_code == 403
    assert info.value.body == b"go away"
    assert (b"x-why", b"no") in info.value.headers
    await client_stream.aclose()


async def test_a_rejection_body_that_comes_after_the_head() -> None:
    client_stream, server_stream = trio.testing.memory_stream_pair()

    async def serve() -> None:
        await server_stream.receive_some()
        await server_stream.send_all(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 7\r\n\r\ngo")
        await trio.testing.wait_all_tasks_blocked()  # the client reads the head alone
        await server_stream.send_all(b" away")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve)
        with pytest.raises(ConnectionRejected) as info:
            await open_client(client_stream, "example", "/", [], MAX)
    assert (info.value.status_code, info.value.body) == (403, b"go away")
    await client_stream.aclose()
    await server_stream.aclose()


async def test_rejection_without_a_body() -> None:
    client_stream, server_stream = trio.testing.memory_stream_pair()

    async def serve() -> None:
        request = await read_request(server_stream, MAX)
        await request.reject(503)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve)
        with pytest.raises(ConnectionRejected) as info:
            await open_client(client_stream, "example", "/", [], MAX)
    assert info.value.status_code == 503
    assert not info.value.body
    await client_stream.aclose()
    await server_stream.aclose()


async def test_a_server_that_closes_during_the_handshake() -> None:
    client_stream, server_stream = trio.testing.memory_stream_pair()

    async def serve() -> None:
        await server_stream.receive_some()
        await server_stream.aclose()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve)
        with pytest.raises(UpgradeFailed, match="without answering"):
            await open_client(client_stream, "example", "/", [], MAX)
    await client_stream.aclose()


async def test_a_client_that_closes_during_the_handshake() -> None:
    client_stream, server_stream = trio.testing.memory_stream_pair()
    await client_stream.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n")
    await client_stream.aclose()
    with pytest.raises(UpgradeFailed, match="before its upgrade request"):
        await read_request(server_stream, MAX)
    await server_stream.aclose()


async def test_a_client_that_leaves_before_the_answer() -> None:
    client_stream, server_stream = trio.testing.memory_stream_pair()
    ws = WSConnection(ConnectionType.CLIENT)
    await client_stream.send_all(ws.send(Request(host="x", target="/")))
    request = await read_request(server_stream, MAX)
    await client_stream.aclose()
    with pytest.raises(ConnectionClosed):
        await request.accept()
    await server_stream.aclose()


async def test_a_request_that_is_not_an_upgrade_is_answered_400() -> None:
    client_stream, server_stream = trio.testing.memory_stream_pair()
    await client_stream.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    with pytest.raises(UpgradeFailed, match="bad upgrade request"):
        await read_request(server_stream, MAX)
    answer = await client_stream.receive_some()
    assert answer.startswith(b"HTTP/1.1 400")
    await client_stream.aclose()
    await server_stream.aclose()


async def test_permessage_deflate_is_refused() -> None:
    client_stream, server_stream = trio.testing.memory_stream_pair()
    ws = WSConnection(ConnectionType.CLIENT)
    from wsproto.extensions import PerMessageDeflate

    await client_stream.send_all(
        ws.send(Request(host="x", target="/", extensions=[PerMessageDeflate()]))
    )
    request = await read_request(server_stream, MAX)
    server = await request.accept()
    answer = await client_stream.receive_some()
    assert b"permessage-deflate" not in answer.lower()
    ws.receive_data(bytes(answer))
    (accepted,) = list(ws.events())
    assert isinstance(accepted, AcceptConnection) and not accepted.extensions
    await _abort(server, client_stream)


async def test_interoperates_with_trio_websocket() -> None:
    client_stream, server_stream = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:

        async def serve() -> None:
            request = await read_request(server_stream, MAX)
            server = await request.accept()
            message = await server.get_message()
            await server.send_message(f"echo {message!s}")
            with pytest.raises(ConnectionClosed):
                await server.get_message()
            await server.aclose()

        nursery.start_soon(serve)
        client = await trio_websocket.wrap_client_stream(
            nursery,
            client_stream,  # type: ignore[arg-type]
            "example",
            "/",
        )
        await client.send_message("hi")
        assert await client.get_message() == "echo hi"
        await client.aclose()
        await client_stream.aclose()


async def test_send_messages_writes_a_batch_at_once() -> None:
    client, stream, ws = await _raw_server()
    await client.send_messages(["one", b"two", "three"])
    events = await _events(stream, ws)  # one receive holds the whole batch
    assert [e.data for e in events if isinstance(e, TextMessage | BytesMessage)] == [
        "one",
        b"two",
        "three",
    ]
    await _abort(client, stream)


# -- the fast data-frame path and its wsproto fallback ----------------------------------


async def _raw_client() -> tuple[WireConnection, trio.abc.Stream, WSConnection]:
    """Our server against a hand-driven wsproto client (to send odd frames)."""
    client_stream, server_stream = trio.testing.memory_stream_pair()
    ws = WSConnection(ConnectionType.CLIENT)
    await client_stream.send_all(ws.send(Request(host="x", target="/")))
    server = await (await read_request(server_stream, MAX)).accept()
    events = await _events(client_stream, ws)
    assert isinstance(events[0], AcceptConnection)
    return server, client_stream, ws


async def _closed_with(
    ours: WireConnection, stream: trio.abc.Stream, peer: WSConnection, code: int
) -> None:
    """``ours`` fails with ``code`` and sends the peer a close frame with it."""
    with pytest.raises(ConnectionClosed) as info:
        await ours.get_message()
    assert _code(info.value) == code
    events = await _events(stream, peer)
    assert any(isinstance(e, CloseConnection) and e.code == code for e in events), events
    await _abort(ours, stream)


async def test_data_ping_data_in_one_receive_keep_their_order() -> None:
    client, stream, ws = await _raw_server()
    data = ws.send(TextMessage(data="one"))
    data += ws.send(Ping(payload=b"between"))
    data += ws.send(BytesMessage(data=b"two"))
    await stream.send_all(data)
    assert await client.get_message() == "one"
    assert await client.get_message() == b"two"
    events = await _events(stream, ws)
    assert [e.payload for e in events if isinstance(e, Pong)] == [b"between"]
    await _abort(client, stream)


async def test_invalid_utf8_in_a_text_frame_is_1007_as_wsproto() -> None:
    client, stream, ws = await _raw_server()
    await stream.send_all(b"\x81\x02\xff\xfe")
    await _closed_with(client, stream, ws, 1007)


async def test_an_unmasked_frame_to_a_server_is_1002() -> None:
    server, stream, ws = await _raw_client()
    await stream.send_all(b"\x81\x02hi")
    await _closed_with(server, stream, ws, 1002)


async def test_a_masked_frame_to_a_client_is_1002() -> None:
    client, stream, ws = await _raw_server()
    await stream.send_all(b"\x81\x82abcd" + bytes([ord("h") ^ ord("a"), ord("i") ^ ord("b")]))
    await _closed_with(client, stream, ws, 1002)


async def test_a_reserved_bit_is_1002() -> None:
    client, stream, ws = await _raw_server()
    await stream.send_all(b"\xc1\x01a")  # RSV1: no extension was agreed
    await _closed_with(client, stream, ws, 1002)


async def test_a_length_encoded_too_long_is_1002() -> None:
    client, stream, ws = await _raw_server()
    await stream.send_all(b"\x82\x7e\x00\x05hello")  # 5 in the 16-bit form
    await _closed_with(client, stream, ws, 1002)


async def test_an_oversized_header_is_1009_before_its_payload() -> None:
    client, stream, ws = await _raw_server()
    await stream.send_all(b"\x82\x7e" + struct.pack("!H", MAX + 1))  # the header only
    await _closed_with(client, stream, ws, 1009)


async def test_a_64_bit_length_beyond_the_limit_is_1009() -> None:
    client, stream, ws = await _raw_server()
    await stream.send_all(b"\x82\x7f" + struct.pack("!Q", 1 << 40))
    await _closed_with(client, stream, ws, 1009)


async def test_an_oversized_text_header_is_1009_before_its_payload() -> None:
    server, stream, ws = await _raw_client()
    # More bytes than MAX characters can take in UTF-8, masked.
    await stream.send_all(b"\x81\xfe" + struct.pack("!H", 4 * MAX + 4) + b"mask")
    await _closed_with(server, stream, ws, 1009)


async def test_frames_that_come_with_the_upgrade_answer() -> None:
    client_stream, server_stream = trio.testing.memory_stream_pair()
    ws = WSConnection(ConnectionType.SERVER)
    frames = ws  # the frames are written once the handshake is done

    async def serve() -> None:
        while True:
            ws.receive_data(bytes(await server_stream.receive_some()))
            for event in ws.events():
                if isinstance(event, Request):
                    data = ws.send(AcceptConnection())
                    data += frames.send(TextMessage(data="first"))
                    data += frames.send(Ping(payload=b"early"))
                    partial = frames.send(BytesMessage(data=b"second"))
                    await server_stream.send_all(data + partial[:3])  # half a frame
                    await server_stream.send_all(partial[3:])
                    return

    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve)
        client = await open_client(client_stream, "example", "/", [], MAX)
    assert await client.get_message() == "first"
    assert await client.get_message() == b"second"
    events = await _events(server_stream, ws)
    assert [e.payload for e in events if isinstance(e, Pong)] == [b"early"]
    await _abort(client, server_stream)


async def test_frames_that_come_with_the_upgrade_request() -> None:
    client_stream, server_stream = trio.testing.memory_stream_pair()
    ws = WSConnection(ConnectionType.CLIENT)
    request = ws.send(Request(host="x", target="/"))
    # A client that does not wait for the answer: frames made by a twin client.
    twin = WSConnection(ConnectionType.CLIENT)
    host = WSConnection(ConnectionType.SERVER)
    host.receive_data(twin.send(Request(host="x", target="/")))
    list(host.events())
    twin.receive_data(host.send(AcceptConnection()))
    list(twin.events())
    await client_stream.send_all(request + twin.send(TextMessage(data="eager")))
    server = await (await read_request(server_stream, MAX)).accept()
    assert await server.get_message() == "eager"
    await _abort(server, client_stream)
