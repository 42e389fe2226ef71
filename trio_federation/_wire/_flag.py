"""A lighter ``trio.Event`` for the events a connection holds for its whole life."""

from __future__ import annotations

import trio

__all__ = ["Flag"]


class Flag:
    """``trio.Event``'s ``is_set``/``set``/``wait``, at a fifth of its size.

    A connection holds several events for its whole life, and most are never
    waited for; ``trio.Event`` allocates a set of waiters (216 bytes) up front,
    this one a parking lot only when a task waits.
    """

    __slots__ = ("_flag", "_lot")

    def __init__(self) -> None:
        self._flag = False
        self._lot: trio.lowlevel.ParkingLot | None = None

    def is_set(self) -> bool:
        """Whether :meth:`set` was called."""
        return self._flag

    def set(self) -> None:
        """Set the flag and wake every waiter (idempotent)."""
        self._flag = True
        lot, self._lot = self._lot, None
        if lot is not None:
            lot.unpark_all()

    async def wait(self) -> None:
        """Wait until the flag is set (a checkpoint either way)."""
        if self._flag:
            await trio.lowlevel.checkpoint()
            return
        if self._lot is None:
            self._lot = trio.lowlevel.ParkingLot()
        await self._lot.park()
