"""Workarounds for trio-websocket 0.12 that reach into its private attributes.

Each one says why; all of them degrade to doing nothing if the attribute moves.
"""

from __future__ import annotations

import trio
from trio_websocket import WebSocketConnection, WebSocketRequest

__all__ = ["release_stream"]


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
