"""What the soak parts share: a numbered stream's bookkeeping and event collectors."""

from __future__ import annotations

from collections.abc import AsyncIterable
from typing import TypeVar

import trio

T = TypeVar("T")


async def collect(stream: AsyncIterable[T], into: list[T]) -> None:
    """Append every item of ``stream`` to ``into`` (run it as a task: nothing is missed)."""
    async for item in stream:
        into.append(item)


class Tracker:
    """The receiving side of a numbered stream: what arrived, once, in order.

    The sender counts ``sent``; the receiver calls :meth:`deliver` with each
    index. :meth:`mark` notes a cut: :attr:`recovered` is set when a message
    sent after it (an index at or above the boundary) is delivered.
    """

    def __init__(self) -> None:
        self.sent = 0
        self.delivered = 0
        self.seen: set[int] = set()
        self.highest = -1
        self.duplicated = 0
        self.reordered = 0
        self.delays: list[float] = []
        self.sent_at: dict[int, float] = {}
        self._boundary: int | None = None
        self.recovered = trio.Event()
        self.recovered_at = 0.0

    @property
    def lost(self) -> int:
        """Messages sent and never delivered."""
        return self.sent - len(self.seen)

    def send(self, index: int) -> None:
        """The sender is about to send message ``index``."""
        self.sent = max(self.sent, index + 1)
        self.sent_at[index] = trio.current_time()

    def mark(self) -> None:
        """A cut now: wait for the first message sent from here on."""
        self._boundary = self.sent
        self.recovered = trio.Event()

    def deliver(self, index: int) -> None:
        """The receiving application got message ``index``."""
        now = trio.current_time()
        self.delivered += 1
        sent_at = self.sent_at.pop(index, None)
        if sent_at is not None:
            self.delays.append(now - sent_at)
        if index in self.seen:
            self.duplicated += 1
            return
        self.seen.add(index)
        if index < self.highest:
            self.reordered += 1
        self.highest = max(self.highest, index)
        if self._boundary is not None and index >= self._boundary:
            self._boundary = None
            self.recovered_at = now
            self.recovered.set()
