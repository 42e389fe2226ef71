"""The transport's own data-frame encoder and parser, pinned to wsproto with Hypothesis.

Our side is a :class:`WireConnection`, the other a plain wsproto connection, both
past the handshake. The parser is driven through ``_on_data``, the call that
``get_message`` makes for each receive, so any split of the bytes into receives
can be tried; one test goes through a real memory stream.
"""

from __future__ import annotations

import itertools
import struct

import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Message,
    Ping,
    Pong,
    Request,
    TextMessage,
)
from wsproto.utilities import LocalProtocolError

from trio_federation._wire._frames import WireConnection, _mask

from .strategies import FUZZ_SCALE

BIG = 1 << 20
SIZES = [0, 1, 125, 126, 127, 65535, 65536, 70000]

slow = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow], max_examples=60)


def _open(*, server: bool, max_size: int = BIG) -> tuple[WireConnection, WSConnection]:
    """Our ``server`` (or client) side and a wsproto peer of the other side, both open."""
    client = WSConnection(ConnectionType.CLIENT)
    host = WSConnection(ConnectionType.SERVER)
    host.receive_data(client.send(Request(host="x", target="/")))
    assert isinstance(next(host.events()), Request)
    client.receive_data(host.send(AcceptConnection()))
    assert isinstance(next(client.events()), AcceptConnection)
    ours, peer = (host, client) if server else (client, host)
    stream, _ = trio.testing.memory_stream_pair()
    return WireConnection(stream, ours, max_message_size=max_size, server=server), peer


def _peer_reads(peer: WSConnection, data: bytes) -> list[str | bytes]:
    """The messages wsproto parses from ``data``."""
    peer.receive_data(data)
    messages: list[str | bytes] = []
    parts: list[str | bytes] = []
    for event in peer.events():
        assert isinstance(event, Message), event
        parts.append(event.data)
        if event.message_finished:
            joined = "".join(parts) if isinstance(event, TextMessage) else b"".join(parts)  # type: ignore[arg-type]
            messages.append(joined)
            parts = []
    assert not parts
    return messages


def _peer_frame(peer: WSConnection, message: str | bytes) -> bytes:
    event = TextMessage(data=message) if isinstance(message, str) else BytesMessage(data=message)
    return peer.send(event)


def _fast_only(ours: WireConnection) -> WireConnection:
    """``ours``, failing the test if it hands wsproto anything."""

    def refuse(data: bytes) -> bool:
        raise AssertionError(f"wsproto was given {data!r}")

    ours._to_wsproto = refuse  # type: ignore[method-assign]
    return ours


def _feed(ours: WireConnection, data: bytes, cuts: list[int]) -> list[str | bytes]:
    """Feed ``data`` split at ``cuts``; the messages our side parsed, in order."""
    bounds = [0, *sorted(cut for cut in cuts if 0 < cut < len(data)), len(data)]
    for start, stop in itertools.pairwise(bounds):
        ours._on_data(data[start:stop])
    messages = list(ours._messages)
    ours._messages.clear()
    return messages


def _sized_bytes(size: int, pattern: bytes) -> bytes:
    return (pattern * (size // len(pattern) + 1))[:size]


sized_bytes = st.builds(_sized_bytes, st.sampled_from(SIZES), st.binary(min_size=1, max_size=8))
sized_text = st.builds(
    lambda size, text: ("a" * size + text)[: size + len(text)],
    st.sampled_from(SIZES),
    st.text(max_size=8),
)  # around the length boundaries, in bytes, with any character after
messages = st.one_of(st.text(), st.binary(), sized_bytes, sized_text)


# -- the encoder ------------------------------------------------------------------------


@slow
@given(message=messages, server=st.booleans())
def test_our_frames_read_by_wsproto_as_the_same_message(message: str | bytes, server: bool) -> None:
    ours, peer = _open(server=server)
    frame = ours._frame(message)
    assert _peer_reads(peer, frame) == [message]
    # And byte for byte what wsproto writes (a client's key is random: compare unmasked).
    expected = bytes(_peer_frame(_open(server=not server)[1], message))
    assert len(frame) == len(expected)
    if server:
        assert frame == expected
        return
    payload = message.encode() if isinstance(message, str) else message
    head = len(frame) - len(payload) - 4
    assert frame[:head] == expected[:head]
    assert _mask(frame[head : head + 4], frame[head + 4 :]) == payload


def test_the_client_masks_each_frame_with_a_fresh_key() -> None:
    ours, _ = _open(server=False)
    keys = {ours._frame(b"x" * 10)[2:6] for _ in range(20)}
    assert len(keys) > 1


@given(payload=st.binary(max_size=5000), key=st.binary(min_size=4, max_size=4))
def test_masking_twice_gives_the_payload_back(payload: bytes, key: bytes) -> None:
    masked = _mask(key, payload)
    assert len(masked) == len(payload)
    assert all(masked[i] == payload[i] ^ key[i % 4] for i in range(len(payload)))
    assert _mask(key, masked) == payload


def test_the_length_encodings_at_their_edges() -> None:
    ours, _ = _open(server=True)
    assert ours._frame(b"a" * 125)[:2] == b"\x82\x7d"
    assert ours._frame(b"a" * 126)[:4] == b"\x82\x7e" + struct.pack("!H", 126)
    assert ours._frame(b"a" * 65535)[:4] == b"\x82\x7e\xff\xff"
    assert ours._frame(b"a" * 65536)[:10] == b"\x82\x7f" + struct.pack("!Q", 65536)
    assert ours._frame("")[:2] == b"\x81\x00"


# -- the parser -------------------------------------------------------------------------


@slow
@given(
    batch=st.lists(messages, min_size=1, max_size=6),
    server=st.booleans(),
    data=st.data(),
)
def test_we_read_wsproto_frames_however_they_are_split(
    batch: list[str | bytes], server: bool, data: st.DataObject
) -> None:
    ours, peer = _open(server=server)
    wire = b"".join(_peer_frame(peer, message) for message in batch)
    cuts = data.draw(st.lists(st.integers(0, len(wire)), max_size=8))
    assert _feed(_fast_only(ours), wire, cuts) == batch
    assert not ours._pending and not ours._outbox and ours.closed is None


@settings(deadline=None, max_examples=25)
@given(
    batch=st.lists(st.one_of(st.text(max_size=40), st.binary(max_size=40)), min_size=1, max_size=4)
)
def test_every_split_point_and_byte_by_byte(batch: list[str | bytes]) -> None:
    for server in (False, True):
        _, peer = _open(server=server)
        wire = b"".join(_peer_frame(peer, message) for message in batch)
        for cut in range(len(wire) + 1):
            ours, _ = _open(server=server)
            assert _feed(_fast_only(ours), wire, [cut]) == batch
        ours, _ = _open(server=server)
        assert _feed(_fast_only(ours), wire, list(range(len(wire)))) == batch


def _mixed(peer: WSConnection) -> tuple[bytes, list[str | bytes], list[bytes]]:
    """Data frames, pings and a fragmented message (with a ping inside) in one stream."""
    wire = _peer_frame(peer, "one")
    wire += peer.send(Ping(payload=b"p1"))
    wire += _peer_frame(peer, b"two")
    wire += peer.send(TextMessage(data="fr", message_finished=False))
    wire += peer.send(Ping(payload=b"p2"))
    wire += peer.send(TextMessage(data="ag", message_finished=False))
    wire += peer.send(TextMessage(data="é", message_finished=True))
    wire += _peer_frame(peer, "three")
    wire += peer.send(BytesMessage(data=b"by", message_finished=False))
    wire += peer.send(BytesMessage(data=b"tes", message_finished=True))
    wire += _peer_frame(peer, b"")
    return bytes(wire), ["one", b"two", "fragé", "three", b"bytes", b""], [b"p1", b"p2"]


def test_control_frames_and_fragments_in_order_at_every_split_point() -> None:
    for server in (False, True):
        _, peer = _open(server=server)
        wire, expected, pings = _mixed(peer)
        splits = [[cut] for cut in range(len(wire) + 1)]
        splits += [[i, j] for i in range(0, len(wire), 7) for j in range(i, len(wire), 5)]
        for cuts in splits:
            ours, answer = _open(server=server)
            assert _feed(ours, wire, cuts) == expected
            answer.receive_data(bytes(ours._outbox))
            assert [e.payload for e in answer.events() if isinstance(e, Pong)] == pings
            assert not ours._fragmented and not ours._passthrough and not ours._pending


def test_a_whole_frame_inside_a_fragmented_message_is_1002_as_wsproto() -> None:
    for server in (False, True):
        ours, peer = _open(server=server)
        wire = peer.send(TextMessage(data="frag", message_finished=False))
        wire += b"\x81\x02hi" if not server else b"\x81\x82\x00\x00\x00\x00hi"
        assert _feed(ours, bytes(wire), []) == []
        assert ours.closed is not None and ours.closed.code == 1002


def test_the_frame_after_a_fragmented_message_takes_the_fast_path() -> None:
    for server in (False, True):
        ours, peer = _open(server=server)
        wire = peer.send(BytesMessage(data=b"fr", message_finished=False))
        wire += peer.send(BytesMessage(data=b"ag", message_finished=True))
        assert _feed(ours, bytes(wire), []) == [b"frag"]
        assert _feed(_fast_only(ours), bytes(_peer_frame(peer, "fast")), []) == ["fast"]


def test_frames_after_the_peer_close_frame_are_dropped() -> None:
    ours, peer = _open(server=False)
    wire = _peer_frame(peer, "before") + peer.send(CloseConnection(code=1000))
    wire += b"\x81\x05after"  # a server may not send after its close frame
    assert ours._on_data(bytes(wire)) is True
    assert list(ours._messages) == ["before"]
    assert ours.closed is not None and ours.closed.code == 1000


def test_messages_after_a_local_close_are_dropped() -> None:
    ours, peer = _open(server=True)
    ours._start_close(1000, None)  # as aclose does
    assert not ours._on_data(bytes(_peer_frame(peer, "late") + _peer_frame(peer, b"late")))
    assert not ours._messages


def test_a_text_frame_is_limited_in_characters_not_bytes() -> None:
    # max_message_size counts characters, as trio-websocket: 10 "é" are 20 bytes.
    ours, peer = _open(server=False, max_size=10)
    assert _feed(ours, bytes(_peer_frame(peer, "é" * 10)), [7]) == ["é" * 10]
    assert ours.closed is None
    ours, peer = _open(server=False, max_size=10)
    assert _feed(ours, bytes(_peer_frame(peer, "é" * 11)), []) == []
    assert ours.closed is not None and ours.closed.code == 1009


def test_the_buffer_holds_at_most_one_partial_frame() -> None:
    ours, peer = _open(server=True, max_size=1000)
    wire = bytes(_peer_frame(peer, b"z" * 1000) * 3)
    for start in range(0, len(wire), 300):
        ours._on_data(wire[start : start + 300])
        assert len(ours._pending) <= 1000 + 14 + 300
    assert list(ours._messages) == [b"z" * 1000] * 3


@settings(deadline=None, max_examples=20, suppress_health_check=[HealthCheck.too_slow])
@given(batch=st.lists(messages, min_size=1, max_size=5), data=st.data())
def test_through_a_memory_stream_in_chunks(batch: list[str | bytes], data: st.DataObject) -> None:
    """The same through get_message, each chunk its own receive."""
    _, peer = _open(server=True)
    wire = b"".join(_peer_frame(peer, message) for message in batch)
    cuts = sorted(set(data.draw(st.lists(st.integers(1, max(1, len(wire) - 1)), max_size=6))))
    bounds = [0, *[c for c in cuts if c < len(wire)], len(wire)]

    async def main() -> list[str | bytes]:
        ours, _ = _open(server=True)
        near, far = trio.testing.memory_stream_pair()
        ours._stream = near
        received: list[str | bytes] = []
        async with trio.open_nursery() as nursery:

            async def read() -> None:
                while len(received) < len(batch):
                    received.append(await ours.get_message())

            nursery.start_soon(read)
            for start, stop in itertools.pairwise(bounds):
                await far.send_all(wire[start:stop])
                await trio.testing.wait_all_tasks_blocked()  # one receive per chunk
        return received

    assert trio.run(main) == batch


def test_headers_split_inside_their_extended_length_and_key() -> None:
    for server in (False, True):
        for size in (126, 70000):
            _, peer = _open(server=server)
            wire = bytes(_peer_frame(peer, b"q" * size) + _peer_frame(peer, "after"))
            for cut in range(1, 16):
                ours, _ = _open(server=server)
                assert _feed(_fast_only(ours), wire, [cut, cut + 1]) == [b"q" * size, "after"]


def test_a_data_frame_once_closed_is_refused_as_wsproto_does() -> None:
    ours, _ = _open(server=True)
    ours._start_close(1000, None)
    with pytest.raises(LocalProtocolError):
        ours._frame("late")


# -- hostile bytes: the fast path changes nothing wsproto alone would do ------------------


def _frame_like(
    first: int, mask: bool, form: int, length: int | None, payload: bytes, key: bytes
) -> bytes:
    """A frame header as written (any flags, any length form), and some payload.

    ``length`` None: the payload's own length (a whole frame, but the payload
    as it is, masked or not).
    """
    if length is None:
        length = len(payload)
    if form == 0:
        header = bytes((first, (0x80 if mask else 0) | min(length, 125)))
    elif form == 1:
        header = struct.pack("!BBH", first, (0x80 if mask else 0) | 126, length & 0xFFFF)
    else:
        header = struct.pack("!BBQ", first, (0x80 if mask else 0) | 127, length)
    return header + (key if mask else b"") + payload


frame_like = st.builds(
    _frame_like,
    first=st.one_of(
        st.sampled_from([0x81, 0x82, 0x01, 0x02, 0x80, 0x00, 0x89, 0x8A, 0x88]), st.integers(0, 255)
    ),
    mask=st.booleans(),
    form=st.sampled_from([0, 0, 1, 2]),
    length=st.one_of(st.none(), st.integers(0, 130), st.integers(0, 70_000)),
    payload=st.one_of(st.binary(max_size=140), st.text(max_size=40).map(str.encode)),
    key=st.binary(min_size=4, max_size=4),
)


@settings(
    max_examples=200 * FUZZ_SCALE, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
@given(
    server=st.booleans(),
    chunks=st.lists(st.one_of(frame_like, st.binary(max_size=20)), max_size=8),
    data=st.data(),
)
def test_hostile_bytes_end_as_with_wsproto_alone(
    server: bool, chunks: list[bytes], data: st.DataObject
) -> None:
    wire = b"".join(chunks)
    cuts = data.draw(st.lists(st.integers(0, len(wire)), max_size=4))
    ours, _ = _open(server=server)
    reference, _ = _open(server=server)
    got = _feed(ours, wire, cuts)  # never raises: every failure is a close
    reference._to_wsproto(wire)
    if ours.closed is not None and ours.closed.code == 1009:
        return  # we refuse an oversized header at once; wsproto waits for the payload
    if ours.closed is None and ours._pending and reference.closed is not None:
        # We parse a frame once it is whole; wsproto may refuse a part of one
        # sooner (invalid UTF-8 in the first bytes of a text payload), and its
        # close drops what was received before it.
        return
    assert got == list(reference._messages)
    assert (ours.closed and ours.closed.code) == (reference.closed and reference.closed.code)
