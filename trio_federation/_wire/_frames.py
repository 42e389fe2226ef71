"""A WebSocket connection that owns its stream: wsproto driven inline, no reader task.

trio-websocket runs a reader task per connection that parses frames and hands
complete messages to ours through a memory channel, and its ``send_message``
takes a lock before it writes: two extra scheduler passes per message each way.
:class:`WireConnection` has the same duck-typed interface as the parts of
``trio_websocket.WebSocketConnection`` that the connection uses, but the task
that calls :meth:`~WireConnection.get_message` does the reading itself: it
receives from the stream, parses it (with wsproto's help, see below), and
handles what comes out inline.

Who reads: whoever calls :meth:`~WireConnection.get_message` (the connection's
reader, alone), or :meth:`~WireConnection.aclose` while it waits for the peer's
close frame and nobody else is reading. At most one task reads at a time; the
others wait for its read to finish. Pongs to the peer's pings, the answer to
its close frame and the pongs that :meth:`~WireConnection.ping` waits for are
therefore only handled while someone reads: a pong waits for the reader, as
with trio-websocket once its message queue is full. The connection's reader is
always in ``get_message()`` unless the application stops consuming, in which
case liveness is reported as stalled anyway.

Who writes: any task, one at a time under a lock. Frames are produced
synchronously into an outbox (so their order is the order of the calls, and a
task cancelled while waiting for the lock loses nothing) and the holder of the
lock sends the whole outbox.

Data frames are ours, the rest is wsproto's. wsproto is slow per message in
pure Python (a 500-byte message: 4.6 µs to send from a client, 7.8 µs to
receive on a server), so :meth:`~WireConnection._frame` writes each message as
one complete frame itself (RFC 6455 section 5.2: FIN, text or binary, a client
masks with a fresh ``os.urandom`` key), and the reader parses the frames at
the start of what it received: a complete frame that is FIN, text or binary,
without RSV bits, masked as our side expects, with a minimal length of at
most ``max_message_size`` bytes, outside a fragmented message, and (text)
valid UTF-8, is delivered here; so is a ping (answered with its pong) or
a pong that is complete, masked as our side expects and outside a fragmented
message (the bytes wsproto would have seen, with the same result: the
heartbeat's frames cost no pass through it). Every other frame (close,
fragments from the first to the last with whatever comes between them, bad
frames) is handed to wsproto as exactly its own bytes, as they arrive, so
wsproto stays at a frame boundary and behaves as it always did: pongs, the
close handshake, 1002 and 1007. Frames are handled in the order they came.
Once we send a close frame everything goes to wsproto, and what follows the
peer's close frame is dropped, as wsproto does. The
handshake feeds wsproto only the HTTP head (cut where h11 ends it), so frames
that come with it reach our parser. wsproto still does the handshake and sends
pings, pongs and closes.

Buffers: the outbox holds at most what the tasks waiting for the lock put in
it (one frame each, or one batch of :meth:`~WireConnection.send_messages`, which
its caller bounds); the messages parsed from one receive wait in a list, so
at most what :data:`RECEIVE_BYTES` can hold. The parser keeps at most one
partial frame, which may only be one it will deliver (at most
``max_message_size`` + 14 bytes with its header), plus one receive: a valid
header announcing more than ``max_message_size`` bytes (binary) or than the
4 bytes a character UTF-8 may take (text) closes with 1009 at once, before
the payload. A longer text frame that may still fit in ``max_message_size``
characters streams through wsproto; a message there (or fragmented) grows up
to ``max_message_size`` characters or bytes, beyond which the connection is
closed with 1009 while it is still arriving, as trio-websocket does.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import re
import struct
from collections.abc import Callable, Iterable
from typing import Final

import trio
from trio_websocket import CloseReason, ConnectionClosed, ConnectionRejected
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Event,
    Ping,
    Pong,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)
from wsproto.utilities import LocalProtocolError, RemoteProtocolError

from ._flag import Flag
from ._sockio import DirectSocketStream

__all__ = [
    "RECEIVE_BYTES",
    "UpgradeFailed",
    "WireConnection",
    "WireRequest",
    "open_client",
    "read_request",
]

logger = logging.getLogger("trio_federation.transport")

RECEIVE_BYTES: Final = 64 * 1024
"""Bytes asked of the stream at once."""
MAX_REJECTION_BODY: Final = 64 * 1024
"""Bytes of a refusal's body a dialer keeps (the rest is dropped)."""

Headers = list[tuple[bytes, bytes]]

_HEAD_END: Final = re.compile(b"\n\r?\n")
"""Where an HTTP head ends: h11's own rule (``h11._receivebuffer.blank_line_regex``)."""
_OPCODES: Final = frozenset({0x0, 0x1, 0x2, 0x8, 0x9, 0xA})
"""The opcodes of RFC 6455: continuation, text, binary, close, ping, pong."""
_INT_MASK_BELOW: Final = 2048
"""Payloads shorter than this are masked as one big integer, longer ones by tables."""
_XOR_TABLES: Final = [bytes(a ^ b for a in range(256)) for b in range(256)]


def _mask(key: bytes, payload: bytes) -> bytes:
    """``payload`` XOR the repeated 4-byte ``key`` (RFC 6455 section 5.3), both ways."""
    size = len(payload)
    if size < _INT_MASK_BELOW:
        # One XOR of two big integers: the fastest in CPython for short payloads.
        mask = int.from_bytes((key * (size // 4 + 1))[:size], "little")
        return (int.from_bytes(payload, "little") ^ mask).to_bytes(size, "little")
    data = bytearray(payload)  # every 4th byte through a translation table, as wsproto
    for offset in range(4):
        data[offset::4] = data[offset::4].translate(_XOR_TABLES[key[offset]])
    return bytes(data)


_NO_EVENTS: Final[collections.deque[Event]] = collections.deque(maxlen=0)


def _release_handshake(ws: WSConnection) -> None:
    """Drop what wsproto keeps of the upgrade once the WebSocket is open.

    Its ``H11Handshake`` holds an h11 connection, the request and an empty
    event deque (about 3 KiB) for the life of the connection, but once
    ``ws.connection`` exists only its (empty) event queue is still read.
    Degrades to doing nothing if wsproto's private attributes move.
    """
    handshake = getattr(ws, "handshake", None)
    if ws.connection is None or handshake is None:
        return
    events = getattr(handshake, "_events", None)
    if isinstance(events, collections.deque) and not events:
        handshake._events = _NO_EVENTS
    for name in ("_h11_connection", "_initiating_request"):
        if hasattr(handshake, name):
            setattr(handshake, name, None)


class UpgradeFailed(Exception):
    """The peer closed the stream, or broke the protocol, during the upgrade."""


class WireConnection:
    """One open WebSocket over a trio stream that it owns.

    Made by :func:`open_client` or :meth:`WireRequest.accept`. The interface is
    the subset of ``trio_websocket.WebSocketConnection`` that the federation
    connection uses, with the same errors: ``ConnectionClosed`` (carrying a
    ``CloseReason``) once the WebSocket is closed.

    Attributes:
        handshake_headers: the headers of the peer's upgrade answer (client
            side); empty on the server side, where the request's headers
            were read from :attr:`WireRequest.headers` and are not kept for
            the life of the connection.
    """

    def __init__(
        self,
        stream: trio.abc.Stream,
        ws: WSConnection,
        *,
        max_message_size: int,
        server: bool,
        handshake_headers: Iterable[tuple[bytes, bytes]] = (),
        received: bytes = b"",
    ) -> None:
        self._stream = stream
        self._ws = ws
        _release_handshake(ws)
        self._server = server
        self._max_message_size = max_message_size
        # UTF-8 takes at most 4 bytes a character, and a fragment may end with 3
        # bytes of a character that the next one completes.
        self._max_text_frame = 4 * max_message_size + 3
        self.handshake_headers: Headers = list(handshake_headers)
        # Messages parsed and not read yet: a list read from ``_head`` on, and
        # replaced by a new empty one once read (an idle connection holds no
        # buffer: a deque would keep 760 bytes).
        self._messages: list[str | bytes] = []
        self._head = 0
        self._parts: list[str | bytes] = []
        self._size = 0
        self._outbox = bytearray()
        self._write_lock = trio.StrictFIFOLock()
        self._reading: Flag | None = None  # set when the current read ends
        self._closed: CloseReason | None = None
        self._local_close = False  # we sent a close frame first (aclose, 1009)
        self._close_done = Flag()  # the peer's close frame came, or the stream ended
        # payload -> [event or callback, answered]: ping() waits for the event;
        # ping_nowait() has the reader call the callback when the pong comes.
        self._pings: dict[bytes, list[object]] = {}
        self._broken = False  # a send failed: the stream is unusable
        # The fast frame parser (see the module's documentation): received bytes
        # not parsed yet, starting at a frame boundary; how many it needs before
        # parsing can go on; how many bytes of the frame being streamed to wsproto
        # are still to come; whether wsproto is inside a fragmented message.
        self._pending = bytearray(received)
        self._wanted = 0
        self._passthrough = 0
        self._fragmented = False

    def __repr__(self) -> str:
        side = "server" if self._server else "client"
        return f"<WireConnection {side} closed={self._closed!r}>"

    @property
    def closed(self) -> CloseReason | None:
        """Why the WebSocket closed: None while open.

        Set when a close frame is sent or received (the peer's answer then
        replaces ours), or to 1006 when the stream ended without one.
        """
        return self._closed

    # -- receiving ----------------------------------------------------------------------

    async def get_message(self) -> str | bytes:
        """The next complete message, reading from the stream if none is buffered.

        A checkpoint; cancelling it loses nothing. Messages received before the
        peer's close frame stay readable; once we started closing (``aclose``,
        or a message over ``max_message_size``), none are.

        Raises:
            ConnectionClosed: the WebSocket is closed (``.reason`` says how).
        """
        while True:
            if self._local_close:
                self._messages, self._head = [], 0
                raise ConnectionClosed(self._closed)
            messages = self._messages
            if messages:
                # Cancellable without a scheduler pass: the read that filled the
                # buffer was one, and a batch costs one pass instead of one each.
                await trio.lowlevel.checkpoint_if_cancelled()
                message = messages[self._head]
                self._head += 1
                if self._head == len(messages):
                    self._messages, self._head = [], 0
                return message
            if self._closed is not None:
                raise ConnectionClosed(self._closed)
            if self._reading is not None:
                await self._reading.wait()  # aclose is reading for the handshake
            else:
                await self._read()

    async def _read(self) -> None:
        """Receive once, handle every event it completes; the caller reads alone."""
        done = self._reading = Flag()
        try:
            try:
                data = await self._stream.receive_some(RECEIVE_BYTES)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                self._ended(f"the stream failed: {exc!r}")
                return
            if not data:
                self._ended("the peer closed the stream")
                return
            if self._ws.state is ConnectionState.CLOSED:
                return  # the handshake is over: what follows is of no use
            peer_closed = self._on_data(data if isinstance(data, bytes) else bytes(data))
            await self._flush_quietly()
            if peer_closed and self._server:
                # RFC 6455: the server closes TCP once the handshake is over.
                await trio.aclose_forcefully(self._stream)
        finally:
            self._reading = None
            done.set()

    def _on_data(self, data: bytes) -> bool:
        """Handle received bytes, data frames here, the rest in wsproto.

        Returns True if they held the peer's close frame.
        """
        if self._pending:
            self._pending += data
            if len(self._pending) < self._wanted and self._ws.state is ConnectionState.OPEN:
                return False  # the frame (or its header) is still incomplete
            data = bytes(self._pending)
            self._pending = bytearray()
        if self._local_close or self._ws.state is not ConnectionState.OPEN:
            return self._after_open(data)  # no message is delivered once we close
        peer_closed = False
        server = self._server
        max_size = self._max_message_size
        end = len(data)
        pos = 0
        while pos < end:
            if self._passthrough:  # the rest of a frame that wsproto handles
                stop = min(end, pos + self._passthrough)
                self._passthrough -= stop - pos
                peer_closed |= self._to_wsproto(data[pos:stop])
                pos = stop
                if self._ws.state is not ConnectionState.OPEN:
                    return self._after_open(data[pos:]) or peer_closed
                continue
            # RFC 6455 section 5.2: the header is 2 bytes, then 0, 2 or 8 of
            # extended length, then the 4-byte masking key if the mask bit is set.
            if end - pos < 2:
                self._wanted = 2
                break
            first = data[pos]
            second = data[pos + 1]
            length = second & 0x7F
            opcode = first & 0x0F
            if opcode not in _OPCODES or (opcode >= 0x08 and (first < 0x80 or length > 125)):
                # wsproto refuses this frame from its first two bytes (an unknown
                # opcode, a fragmented or long control frame): let it, at once.
                return self._to_wsproto(data[pos:]) or peer_closed
            start = pos + 2
            minimal = True  # wsproto refuses a length encoded longer than needed
            if length == 126:
                start += 2
                if start > end:
                    self._wanted = start - pos
                    break
                length = (data[pos + 2] << 8) | data[pos + 3]
                minimal = length > 125
            elif length == 127:
                start += 8
                if start > end:
                    self._wanted = start - pos
                    break
                length = int.from_bytes(data[pos + 2 : start], "big")
                minimal = 0xFFFF < length < 1 << 63
            masked = second >= 0x80
            if masked:
                start += 4  # the key: awaited below only for a frame we parse
            stop = start + length
            if (first == 0x89 or first == 0x8A) and masked is server and not self._fragmented:
                # A ping or a pong (FIN, no RSV bit, at most 125 bytes: checked
                # above), handled here as wsproto would: a heartbeat costs no
                # pass through wsproto's parser.
                if stop > end:
                    self._wanted = stop - pos
                    break
                payload = data[start:stop]
                if masked:
                    payload = _mask(data[start - 4 : start], payload)
                pos = stop
                if first == 0x89:
                    self._outbox += self._control_frame(0x8A, payload)  # the pong
                else:
                    self._on_pong(payload)
                continue
            # FIN, no RSV bit, text or binary, the mask bit our side expects.
            valid = (first == 0x81 or first == 0x82) and masked is server and minimal
            if valid and not self._fragmented and length <= max_size:
                if stop > end:
                    self._wanted = stop - pos
                    break
                payload = data[start:stop]
                if masked:
                    payload = _mask(data[start - 4 : start], payload)
                if first == 0x82:
                    self._messages.append(payload)
                    pos = stop
                    continue
                try:
                    text = payload.decode("utf-8")
                except UnicodeDecodeError:
                    pass  # wsproto fails the connection with 1007
                else:
                    self._messages.append(text)
                    pos = stop
                    continue
            elif (
                (first & 0x7F == 0x01 or first & 0x7F == 0x02)
                and masked is server
                and minimal
                and not self._fragmented
                and length > (max_size if first & 0x0F == 0x02 else self._max_text_frame)
            ):
                # Longer than any message we take, announced by an otherwise valid
                # header: close at once instead of receiving it.
                error = f"Exceeded maximum message size: {max_size} bytes"
                self._start_close(1009, error)
                return self._after_open(data[pos:]) or peer_closed
            # Anything else is wsproto's, as many bytes as the frame has: a control
            # frame, a fragment, a bad frame, a text frame it decodes as it comes.
            if opcode == 0x01 or opcode == 0x02:
                self._fragmented = first < 0x80
            elif opcode == 0x00 and first >= 0x80:
                self._fragmented = False
            self._passthrough = stop - pos
        if pos < end:
            self._pending += data[pos:]
        return peer_closed

    def _after_open(self, data: bytes) -> bool:
        """Hand ``data`` to wsproto as it comes: the WebSocket is closing."""
        if not data or self._ws.state is not ConnectionState.LOCAL_CLOSING:
            return False  # closed: what follows the peer's close frame is of no use
        return self._to_wsproto(data)

    def _to_wsproto(self, data: bytes) -> bool:
        self._ws.receive_data(data)
        return self._handle_events()

    def _handle_events(self) -> bool:
        """Handle what wsproto parsed; True if it held the peer's close frame."""
        peer_closed = False
        try:
            for event in self._ws.events():
                if isinstance(event, (TextMessage, BytesMessage)):
                    self._on_message(event)
                elif isinstance(event, Ping):
                    if self._ws.state is ConnectionState.OPEN:
                        self._outbox += self._ws.send(event.response())
                elif isinstance(event, Pong):
                    self._on_pong(bytes(event.payload))
                elif isinstance(event, CloseConnection):
                    if self._ws.state is ConnectionState.OPEN:
                        # wsproto's report of a frame it could not parse.
                        self._start_close(event.code, event.reason)
                        self._ended(f"bad frame: {event.reason}")
                        break
                    peer_closed = True
                    self._on_close(event)
                else:  # pragma: no cover - handshake events come before
                    logger.debug("%r: ignored %r", self, event)
        except RemoteProtocolError as exc:
            logger.debug("%r: protocol error from the peer: %s", self, exc)
            if exc.event_hint is not None and self._ws.state is ConnectionState.OPEN:
                with contextlib.suppress(LocalProtocolError):
                    self._outbox += self._ws.send(exc.event_hint)
            self._local_close = True
            self._ended(f"protocol error: {exc}")
        return peer_closed

    def _on_message(self, event: TextMessage | BytesMessage) -> None:
        if self._local_close:
            return  # closing: nobody will read it
        data: str | bytes = (
            event.data if isinstance(event.data, (str, bytes)) else bytes(event.data)
        )
        self._size += len(data)
        if self._size > self._max_message_size:
            error = f"Exceeded maximum message size: {self._max_message_size} bytes"
            self._parts = []
            self._size = 0
            self._start_close(1009, error)
            return
        if event.message_finished and not self._parts:
            self._size = 0
            self._messages.append(data)  # the common case: one frame, one message
            return
        self._parts.append(data)
        if event.message_finished:
            message: str | bytes
            if isinstance(event, TextMessage):
                message = "".join(part for part in self._parts if isinstance(part, str))
            else:
                message = b"".join(part for part in self._parts if isinstance(part, bytes))
            self._parts = []
            self._size = 0
            self._messages.append(message)

    def _on_pong(self, payload: bytes) -> None:
        # As trio-websocket: a pong answers its ping and every earlier one.
        if payload not in self._pings:
            return
        while self._pings:
            key, waiter = next(iter(self._pings.items()))
            del self._pings[key]
            waiter[1] = True
            notify = waiter[0]
            if isinstance(notify, trio.Event):
                notify.set()
            else:
                assert callable(notify)
                notify()
            if key == payload:
                break

    def _on_close(self, event: CloseConnection) -> None:
        if self._ws.state is ConnectionState.REMOTE_CLOSING:
            self._outbox += self._ws.send(event.response())  # the peer closes first
        self._closed = CloseReason(event.code, event.reason or None)
        self._close_done.set()
        self._wake_pings()

    def _ended(self, why: str) -> None:
        """The stream is over (EOF, broken, closed): no handshake can follow."""
        logger.debug("%r: %s", self, why)
        if self._closed is None:
            self._closed = CloseReason(1006, None)
        self._close_done.set()
        self._wake_pings()

    def _wake_pings(self) -> None:
        pings, self._pings = self._pings, {}
        for waiter in pings.values():
            event = waiter[0]
            if isinstance(event, trio.Event):
                event.set()  # the pongs that ping_nowait waits for just never come

    # -- sending ------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed is not None or self._local_close:
            raise ConnectionClosed(self._closed or CloseReason(1006, None))

    async def _flush(self, *, schedule: bool = True) -> None:
        """Send the outbox, taking the write lock.

        ``schedule=False``: no scheduler pass after a write that did not wait
        (see :meth:`DirectSocketStream.send_all`).

        Raises:
            ConnectionClosed: the stream failed (the WebSocket is closed now).
        """
        try:
            self._write_lock.acquire_nowait()  # no scheduler pass when free
        except trio.WouldBlock:
            await self._write_lock.acquire()
        try:
            if self._broken:
                raise ConnectionClosed(self._closed)  # another task's send failed
            while self._outbox:
                data, self._outbox = self._outbox, bytearray()
                if schedule or not isinstance(self._stream, DirectSocketStream):
                    await self._stream.send_all(data)
                else:
                    await self._stream.send_all(data, schedule=False)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self._outbox.clear()
            self._broken = True
            self._ended(f"sending failed: {exc!r}")
            raise ConnectionClosed(self._closed) from None
        finally:
            self._write_lock.release()

    async def _flush_quietly(self) -> None:
        if self._outbox:
            with contextlib.suppress(ConnectionClosed):  # recorded; the reader raises it
                await self._flush()

    def _frame(self, message: str | bytes) -> bytes:
        """``message`` as one complete data frame on the wire (RFC 6455 section 5.2).

        Written here rather than by wsproto, which takes twice as long; wsproto
        sends only whole messages for us, so it is never inside a fragmented one.
        """
        if self._ws.state is not ConnectionState.OPEN:  # wsproto raises LocalProtocolError
            return self._ws.send(
                TextMessage(data=message)
                if isinstance(message, str)
                else BytesMessage(data=message)
            )
        if isinstance(message, str):
            first = 0x81  # FIN, text
            payload = message.encode("utf-8")
        else:
            first = 0x82  # FIN, binary
            payload = message
        size = len(payload)
        mask_bit = 0x00 if self._server else 0x80  # a client masks every frame
        if size < 126:
            header = bytes((first, mask_bit | size))
        elif size < 0x10000:
            header = struct.pack("!BBH", first, mask_bit | 126, size)
        else:
            header = struct.pack("!BBQ", first, mask_bit | 127, size)
        if self._server:
            return header + payload
        key = os.urandom(4)  # a fresh unpredictable key per frame, as wsproto
        return header + key + _mask(key, payload)

    def _control_frame(self, first: int, payload: bytes) -> bytes:
        """A ping (0x89) or pong (0x8A) frame of ``payload`` (at most 125 bytes)."""
        if self._server:
            return bytes((first, len(payload))) + payload
        key = os.urandom(4)
        return bytes((first, 0x80 | len(payload))) + key + _mask(key, payload)

    async def send_message(self, message: str | bytes) -> None:
        """Send one message (as one frame).

        Raises:
            ConnectionClosed: the WebSocket is closed or closing.
        """
        self._check_open()
        self._outbox += self._frame(message)
        await self._flush()

    async def send_messages(
        self, messages: Iterable[str | bytes], *, schedule: bool = True
    ) -> None:
        """Send several messages (one frame each, in order) with one write to the stream.

        One system call and one scheduler pass for the batch instead of one
        each, and the peer reads them in one receive. ``schedule=False``
        leaves out even that pass when the write did not wait (it stays a
        cancellation point), for a caller about to yield anyway.

        Raises:
            ConnectionClosed: the WebSocket is closed or closing.
        """
        self._check_open()
        for message in messages:
            self._outbox += self._frame(message)
        await self._flush(schedule=schedule)

    async def ping(self, payload: bytes) -> None:
        """Send a ping and wait for its pong.

        The pong is only read while a task is in :meth:`get_message` (see the
        module's documentation).

        Raises:
            ConnectionClosed: the WebSocket is closed, or closed before the pong.
            ValueError: a ping with this payload is in flight already.
        """
        self._check_open()
        if payload in self._pings:
            raise ValueError(f"Payload value {payload!r} is already in flight.")
        event = trio.Event()
        waiter: list[object] = [event, False]
        self._pings[payload] = waiter
        try:
            self._outbox += self._ws.send(Ping(payload=payload))
            await self._flush()
            await event.wait()
        finally:
            if self._pings.get(payload) is waiter:
                del self._pings[payload]
        if not waiter[1]:
            raise ConnectionClosed(self._closed)

    @property
    def output_pending(self) -> bool:
        """Whether frames wait in the outbox for the next write (see :meth:`ping_nowait`).

        False once the WebSocket is closed or closing: the close handshake
        sends what is left.
        """
        return (
            bool(self._outbox)
            and not self._broken
            and self._closed is None
            and not self._local_close
        )

    def ping_nowait(self, payload: bytes, on_pong: Callable[[], None]) -> None:
        """Put a ping in the outbox, to go out with the next write; no waiting.

        The next :meth:`send_messages` (or any flush: a write in progress sends
        it when it is done) carries it, in the same write as its messages. When
        the pong comes, the reader calls ``on_pong`` (inline: it must not
        block); if the WebSocket closes first, it is never called.

        Raises:
            ConnectionClosed: the WebSocket is closed or closing.
            ValueError: a ping with this payload is in flight already.
        """
        self._check_open()
        if payload in self._pings:
            raise ValueError(f"Payload value {payload!r} is already in flight.")
        if len(payload) > 125:
            raise ValueError("a ping's payload is at most 125 bytes")
        self._pings[payload] = [on_pong, False]
        self._outbox += self._control_frame(0x89, payload)

    # -- closing ------------------------------------------------------------------------

    def _start_close(self, code: int, reason: str | None) -> None:
        self._local_close = True
        self._closed = CloseReason(code, reason)
        self._messages, self._head = [], 0
        self._outbox += self._ws.send(CloseConnection(code=code, reason=reason))

    async def aclose(self, code: int = 1000, reason: str | None = None) -> None:
        """Close the WebSocket with ``code``, then the stream. Idempotent.

        Sends the close frame and waits for the peer's, bounded only by the
        caller's scope: the connection's reader, if it is in
        :meth:`get_message`, reads it; otherwise this call reads (dropping any
        message that comes first). Under a cancelled scope it just closes the
        stream. The stream is closed on every exit.
        """
        try:
            if self._closed is None and self._ws.state is ConnectionState.OPEN:
                self._start_close(code, reason)
                await self._flush()
            while self._local_close and not self._close_done.is_set():
                if self._reading is not None:
                    await self._reading.wait()
                else:
                    await self._read()
        except ConnectionClosed:
            pass
        finally:
            await trio.aclose_forcefully(self._stream)
            if self._closed is None:
                self._closed = CloseReason(1006, None)
            self._close_done.set()
            self._wake_pings()


# -- handshakes ---------------------------------------------------------------------------


async def _receive(stream: trio.abc.Stream, during: str) -> bytes:
    data = await stream.receive_some(RECEIVE_BYTES)
    if not data:
        raise UpgradeFailed(f"the peer closed the connection {during}")
    return bytes(data)


class _HeadSplitter:
    """Cuts the received bytes where the first HTTP head ends, as h11 does.

    wsproto keeps what follows the upgrade answer in its own frame buffer, out
    of reach of our frame parser. Feeding it the head alone keeps that buffer
    empty: what follows the head goes to :class:`WireConnection` instead.
    """

    def __init__(self) -> None:
        self._tail = b""  # the last 2 bytes, where a blank line may have begun
        self._done = False

    def split(self, data: bytes) -> list[bytes]:
        """``data`` as [up to the end of the head, the rest], or [data].

        Never an empty chunk: wsproto (h11) takes ``b""`` for the end of the stream.
        """
        if self._done:
            return [data]
        window = self._tail + data
        match = _HEAD_END.search(window)
        if match is None:
            self._tail = window[-2:]
            return [data]
        self._done = True
        cut = match.end() - len(self._tail)  # >= 1: no blank line ended before data
        return [data[:cut], data[cut:]] if cut < len(data) else [data]


async def open_client(
    stream: trio.abc.Stream,
    host: str,
    resource: str,
    extra_headers: Headers,
    max_message_size: int,
) -> WireConnection:
    """Upgrade ``stream`` as a client: send the request, read the answer.

    Offers no extension (so no permessage-deflate). The stream stays the
    caller's to close if this raises.

    Raises:
        ConnectionRejected: the server refused the upgrade (status, headers and
            body, as trio-websocket).
        UpgradeFailed: the server closed the stream before answering, or
            answered with something that is not an upgrade.
        trio.BrokenResourceError: the stream failed.
    """
    ws = WSConnection(ConnectionType.CLIENT)
    await stream.send_all(
        ws.send(Request(host=host, target=resource, extra_headers=extra_headers, extensions=[]))
    )
    status = 0
    headers: tuple[tuple[bytes, bytes], ...] = ()
    body = bytearray()
    splitter = _HeadSplitter()
    while True:
        chunks = splitter.split(await _receive(stream, "without answering"))
        try:
            for index, chunk in enumerate(chunks):
                ws.receive_data(chunk)
                for event in ws.events():
                    if isinstance(event, AcceptConnection):
                        connection = WireConnection(
                            stream,
                            ws,
                            max_message_size=max_message_size,
                            server=False,
                            handshake_headers=event.extra_headers,
                            received=b"".join(chunks[index + 1 :]),
                        )
                        # Frames sent right after the answer came with it.
                        connection._on_data(b"")
                        await connection._flush_quietly()
                        return connection
                    if isinstance(event, RejectConnection):
                        status, headers = event.status_code, tuple(event.headers)
                        if not event.has_body:
                            raise ConnectionRejected(status, headers, None)
                    elif isinstance(event, RejectData):
                        body += event.data[: MAX_REJECTION_BODY - len(body)]
                        if event.body_finished:
                            raise ConnectionRejected(status, headers, bytes(body))
        except RemoteProtocolError as exc:
            raise UpgradeFailed(f"bad upgrade answer: {exc}") from exc


class WireRequest:
    """A client's upgrade request, read by :func:`read_request`: accept or reject it.

    Attributes:
        headers: the request's headers (names in lower case); emptied by
            :meth:`accept`.
        path: the request target (path and query).
        remote: the client's address, for the log.
    """

    def __init__(
        self,
        stream: trio.abc.Stream,
        ws: WSConnection,
        request: Request,
        *,
        max_message_size: int,
        remote: object,
        received: bytes = b"",
    ) -> None:
        self._stream = stream
        self._ws = ws
        self._max_message_size = max_message_size
        self._received = received  # what the client sent after its request
        self.headers: Headers = list(request.extra_headers)
        self.path = request.target
        self.remote = remote

    async def _send(self, data: bytes) -> None:
        try:
            await self._stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise ConnectionClosed(CloseReason(1006, "the client left")) from None

    async def accept(self, *, extra_headers: Headers | None = None) -> WireConnection:
        """Answer 101 with ``extra_headers`` and no extension; return the connection.

        Raises:
            ConnectionClosed: the client left meanwhile.
        """
        await self._send(
            self._ws.send(AcceptConnection(extra_headers=list(extra_headers or ()), extensions=[]))
        )
        connection = WireConnection(
            self._stream,
            self._ws,
            max_message_size=self._max_message_size,
            server=True,
            handshake_headers=(),
            received=self._received,
        )
        # Read by now; the listener's frames hold the request for the life of
        # the connection, the headers (about 1.5 KiB) need not stay with it.
        self.headers, self._received = [], b""
        connection._on_data(b"")  # frames that came with the request
        await connection._flush_quietly()
        return connection

    async def reject(
        self,
        status_code: int,
        *,
        extra_headers: Headers | None = None,
        body: bytes | None = None,
    ) -> None:
        """Refuse the upgrade with an HTTP answer; the caller closes the stream.

        Raises:
            ConnectionClosed: the client left meanwhile.
        """
        headers = list(extra_headers or ())
        if body:
            headers.append((b"Content-length", str(len(body)).encode("ascii")))
        data = self._ws.send(
            RejectConnection(status_code=status_code, headers=headers, has_body=bool(body))
        )
        if body:
            data += self._ws.send(RejectData(data=body))
        await self._send(data)


async def read_request(
    stream: trio.abc.Stream, max_message_size: int, *, remote: object = "a client"
) -> WireRequest:
    """Read a client's upgrade request from ``stream`` (bounded by the caller's scope).

    Raises:
        UpgradeFailed: the client closed the stream first, or sent something
            that is not an upgrade request (answered with 400 when possible).
        trio.BrokenResourceError: the stream failed.
    """
    ws = WSConnection(ConnectionType.SERVER)
    splitter = _HeadSplitter()
    while True:
        chunks = splitter.split(await _receive(stream, "before its upgrade request"))
        try:
            for index, chunk in enumerate(chunks):
                ws.receive_data(chunk)
                for event in ws.events():
                    if isinstance(event, Request):
                        return WireRequest(
                            stream,
                            ws,
                            event,
                            max_message_size=max_message_size,
                            remote=remote,
                            received=b"".join(chunks[index + 1 :]),
                        )
        except RemoteProtocolError as exc:
            hint: Event | None = exc.event_hint
            if hint is not None:
                try:
                    with trio.move_on_after(1.0):
                        await stream.send_all(ws.send(hint))
                except (trio.BrokenResourceError, trio.ClosedResourceError, LocalProtocolError):
                    pass
            raise UpgradeFailed(f"bad upgrade request: {exc}") from exc
