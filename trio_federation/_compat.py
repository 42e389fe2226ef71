"""Workarounds for trio-websocket 0.12 that reach into its private attributes.

Each one says why; all of them degrade to doing nothing if the attribute moves.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import trio
from trio_websocket import WebSocketConnection, WebSocketRequest

__all__ = ["SocketHost", "release_stream"]

logger = logging.getLogger("trio_federation.transport")


async def release_stream(socket: WebSocketConnection | WebSocketRequest) -> None:
    """Close the TCP (or TLS) stream under a WebSocket connection or request.

    trio-websocket's ``aclose()`` returns early when the connection is already
    closed — after the peer closed first, or after a refused upgrade — and then
    never closes the stream of a client connection or of a rejected server one:
    the socket leaks, and a refused dialer's TCP connection stays open until
    the dialer gives up. Once the close handshake is over (or the upgrade was
    refused) the stream has no further use, so release it here.
    """
    connection = getattr(socket, "_connection", socket)
    stream = getattr(connection, "_stream", None)
    if isinstance(stream, trio.abc.AsyncResource):
        with trio.CancelScope(shield=True):
            await trio.aclose_forcefully(stream)


class SocketHost:
    """Runs trio-websocket's own reader task under a shield, and catches it.

    Shielded, so that a cancelled block can still finish the close handshake
    (bounded by the connection's timers). Caught, because that task can crash:
    a refused upgrade raises there, and trio-websocket 0.12 raises wsproto's
    LocalProtocolError from it when a ping arrives after we sent our close
    frame. A crash is stored in :attr:`failure` and handed to
    :attr:`on_failure` (the dial, or the connection, which then ends with
    1006) instead of tearing down the dialer or the whole listener.
    """

    def __init__(self) -> None:
        # Shielded only once started (callers set ``scope.shield``): a task
        # shielded before ``started()`` could never be cancelled by a caller
        # that was cancelled meanwhile.
        self.scope = trio.CancelScope()
        self.failure: BaseException | None = None
        self.on_failure: Callable[[BaseException], None] = lambda exc: None
        self._nursery: trio.Nursery | None = None

    @property
    def nursery(self) -> trio.Nursery:
        assert self._nursery is not None
        return self._nursery

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            with self.scope:
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    task_status.started()
                    await trio.sleep_forever()
        except Exception as exc:
            while isinstance(exc, ExceptionGroup) and len(exc.exceptions) == 1:
                exc = exc.exceptions[0]  # the nursery's wrapping
            logger.debug("trio-websocket's reader failed: %r", exc)
            self.failure = exc
            self.on_failure(exc)
