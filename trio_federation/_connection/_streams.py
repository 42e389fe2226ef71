"""Bounded buffers between a connection's tasks and its users."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

import trio

T = TypeVar("T")

__all__ = ["EventStream", "MessageStream", "OutboundQueue"]


_NO_ITEMS: deque[Any] = deque(maxlen=0)
"""The empty queue of every :class:`OutboundQueue` that holds nothing (never appended to)."""


class OutboundQueue(Generic[T]):
    """A bounded FIFO with a readable snapshot, drained by one writer task.

    Like a memory channel of ``capacity``, except that what it holds can be
    listed (``message_queue``) and the writer *peeks* at the head and removes it
    only once it is written, so "accepted but not yet written" is exact. One
    item beyond the capacity may be added with :meth:`put_extra_nowait` (the
    connection's own heartbeat), so it never takes room from the user.
    """

    def __init__(self, capacity: int, on_change: Callable[[], None] = lambda: None) -> None:
        self.capacity = capacity
        self._on_change = on_change
        # (item, is the extra one); the deque (760 bytes) is made on the first
        # put and dropped once empty, so an idle connection holds none.
        self._items: deque[tuple[T, bool]] = _NO_ITEMS
        self._extra = False
        self._closed = False
        self._not_full: trio.lowlevel.ParkingLot | None = None  # made when a put() waits

    def __len__(self) -> int:
        return len(self._items)

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called."""
        return self._closed

    def _full(self) -> bool:
        return len(self._items) - self._extra >= self.capacity

    def snapshot(self) -> tuple[T, ...]:
        """The waiting items, oldest first."""
        return tuple(item for item, _ in self._items)

    def put_nowait(self, item: T) -> None:
        """Append ``item``; :exc:`trio.WouldBlock` when full."""
        if self._closed:
            raise trio.ClosedResourceError("queue closed")
        if self._full():
            raise trio.WouldBlock
        if self._items is _NO_ITEMS:
            self._items = deque()
        self._items.append((item, False))
        self._on_change()

    def put_extra_nowait(self, item: T) -> None:
        """Append ``item`` beyond the capacity; :exc:`trio.WouldBlock` if one already waits."""
        if self._closed:
            raise trio.ClosedResourceError("queue closed")
        if self._extra:
            raise trio.WouldBlock
        self._extra = True
        if self._items is _NO_ITEMS:
            self._items = deque()
        self._items.append((item, True))
        self._on_change()

    async def put(self, item: T) -> None:
        """Append ``item``, waiting for room while the queue is full."""
        await trio.lowlevel.checkpoint_if_cancelled()
        if not self._full() or self._closed:
            self.put_nowait(item)
            await trio.lowlevel.cancel_shielded_checkpoint()
            return
        while self._full() and not self._closed:
            if self._not_full is None:
                self._not_full = trio.lowlevel.ParkingLot()
            await self._not_full.park()
        self.put_nowait(item)

    def items(self) -> Iterator[T]:
        """The waiting items, oldest first, without removing them.

        Only valid until the queue changes: consume it before any checkpoint.
        """
        return (item for item, _ in self._items)

    def peek_nowait(self) -> tuple[T, bool] | None:
        """The oldest item and whether it is the extra one, or None if empty."""
        return self._items[0] if self._items else None

    def pop(self) -> T:
        """Remove the oldest item (after it was written)."""
        item, extra = self._items.popleft()
        if not self._items:
            self._items = _NO_ITEMS
        if extra:
            self._extra = False
        if self._not_full:  # made, and someone waits for room
            self._not_full.unpark()
        return item

    def close(self) -> None:
        """Refuse new items; the writer drains what is left, then gets EndOfChannel."""
        self._closed = True
        if self._not_full is not None:
            self._not_full.unpark_all()
        self._on_change()


class EventStream(Generic[T]):
    """A stream of connection events (status changes or errors).

    Returned by :meth:`OrchestratorConnection.watch_status` and
    :meth:`OrchestratorConnection.watch_errors`. It buffers at most
    ``max_buffer`` events; an event that arrives when the buffer is full pushes
    out the oldest one and is counted in :attr:`missed`, so a watcher that does
    not keep up never slows the connection down. ``async for`` ends when the
    connection has closed and every buffered event was read.
    """

    def __init__(self, max_buffer: int) -> None:
        self._buffer: deque[T] = deque(maxlen=max_buffer)
        self._lot = trio.lowlevel.ParkingLot()
        self._ended = False
        self.missed = 0
        """Events dropped because the buffer was full."""

    def _push(self, event: T) -> None:
        if len(self._buffer) == self._buffer.maxlen:
            self.missed += 1
        self._buffer.append(event)
        self._lot.unpark_all()

    def _end(self) -> None:
        self._ended = True
        self._lot.unpark_all()

    def receive_nowait(self) -> T:
        """The next buffered event; :exc:`trio.WouldBlock` if none, EndOfChannel at the end."""
        if self._buffer:
            return self._buffer.popleft()
        if self._ended:
            raise trio.EndOfChannel
        raise trio.WouldBlock

    async def receive(self) -> T:
        """Wait for the next event; :exc:`trio.EndOfChannel` once the connection closed."""
        await trio.lowlevel.checkpoint_if_cancelled()
        while True:
            try:
                event = self.receive_nowait()
            except trio.WouldBlock:
                await self._lot.park()
            else:
                await trio.lowlevel.cancel_shielded_checkpoint()
                return event

    def __aiter__(self) -> EventStream[T]:
        return self

    async def __anext__(self) -> T:
        try:
            return await self.receive()
        except trio.EndOfChannel:
            raise StopAsyncIteration from None


class MessageStream(trio.abc.ReceiveChannel[T]):
    """A receive channel of messages that raises on abnormal connection loss.

    What :meth:`OrchestratorConnection.subscribe` yields: ``await
    stream.receive()`` or ``async for m in stream``. When the connection closes
    normally the stream ends (:exc:`trio.EndOfChannel`, or the end of ``async
    for``) after the buffered messages; when it is lost it raises
    :exc:`~trio_federation.ConnectionLost` instead.
    """

    def __init__(
        self,
        channel: trio.MemoryReceiveChannel[Any],
        check_lost: Callable[[], None],
        unwrap: Callable[[Any], T],
        discard: Callable[[trio.MemoryReceiveChannel[Any]], None],
    ) -> None:
        self._channel = channel
        self._check_lost = check_lost
        self._unwrap = unwrap
        self._discard = discard

    async def receive(self) -> T:
        """The next message; see the class docstring for the end of the stream."""
        try:
            return self._unwrap(await self._channel.receive())
        except trio.EndOfChannel:
            self._check_lost()
            raise

    def receive_nowait(self) -> T:
        """The next buffered message, or :exc:`trio.WouldBlock`."""
        try:
            return self._unwrap(self._channel.receive_nowait())
        except trio.EndOfChannel:
            self._check_lost()
            raise

    async def aclose(self) -> None:
        """Stop receiving; the connection stops routing messages here.

        Messages still buffered are discarded (and their number logged).
        """
        self.close()
        await trio.lowlevel.checkpoint()

    def close(self) -> None:
        """Synchronous :meth:`aclose`."""
        self._discard(self._channel)
        self._channel.close()
