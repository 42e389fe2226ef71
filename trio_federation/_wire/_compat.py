"""Workarounds for trio-websocket 0.12 that reach into its private attributes.

Each one says why; all of them degrade to doing nothing if the attribute moves.
"""

from __future__ import annotations

import contextlib
import logging
import ssl
from collections.abc import Callable
from typing import Any

import trio
from trio_websocket import WebSocketConnection, WebSocketRequest

__all__ = ["SocketHost", "flush_tls_alert", "release_stream"]

logger = logging.getLogger("trio_federation.transport")

TLS_ALERT_GRACE = 1.0
"""Seconds spent sending a TLS alert to a client whose handshake failed."""


async def release_stream(socket: WebSocketConnection | WebSocketRequest | object) -> None:
    """Close the TCP (or TLS) stream under a WebSocket connection or request.

    Also takes our own ``_wire`` connections and requests (their ``_stream``).

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


async def flush_tls_alert(stream: trio.SSLStream[Any]) -> None:
    """Send the TLS alert of a failed server handshake to the client.

    When the handshake fails (a client certificate refused), OpenSSL writes an
    alert saying why, but trio's SSLStream marks itself broken before sending
    it: the client then sees a bare EOF and cannot tell that its certificate
    was refused. Send what is left in the outgoing buffer, bounded in time.
    """
    outgoing = getattr(stream, "_outgoing", None)
    if not isinstance(outgoing, ssl.MemoryBIO):  # pragma: no cover - trio changed
        return
    data = outgoing.read()
    if data:
        with (
            trio.move_on_after(TLS_ALERT_GRACE),
            contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError),
        ):
            await stream.transport_stream.send_all(data)


class SocketHost:
    """Runs trio-websocket's own reader task under a shield, and catches it.

    Shielded, so that a cancelled block can still finish the close handshake
    (bounded by the connection's timers). Caught, because that task can crash:
    a refused upgrade raises there, and trio-websocket 0.12 raises wsproto's
    LocalProtocolError from it when a ping arrives after we sent our close
    frame. A crash is handed to :attr:`on_failure` (the connection, which then
    ends with 1006) instead of tearing down the test pair or the wrapping code.
    """

    def __init__(self) -> None:
        self.scope = trio.CancelScope(shield=True)
        self.on_failure: Callable[[BaseException], None] = lambda exc: None
        self._nursery: trio.Nursery | None = None
        self._ready = trio.Event()

    @property
    def nursery(self) -> trio.Nursery:
        """The nursery that trio-websocket's reader tasks are started in."""
        assert self._nursery is not None
        return self._nursery

    async def start(self, nursery: trio.Nursery) -> None:
        """Run the host in ``nursery``; return once it is ready.

        Not ``nursery.start``: a task shielded before ``started()`` cannot be
        reached by its caller's cancellation, and ``start`` would wait for it
        forever. Callers cancel :attr:`scope` in a ``finally`` of their own,
        entered before this call.
        """
        nursery.start_soon(self._run)
        await self._ready.wait()

    async def _run(self) -> None:
        try:
            with self.scope:
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    self._ready.set()
                    await trio.sleep_forever()
        except Exception as exc:
            while isinstance(exc, ExceptionGroup) and len(exc.exceptions) == 1:
                exc = exc.exceptions[0]  # the nursery's wrapping
            logger.debug("trio-websocket's reader failed: %r", exc)
            self.on_failure(exc)
