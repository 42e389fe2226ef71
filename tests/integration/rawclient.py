"""A plain trio-websocket client that leaves no socket behind.

trio-websocket 0.12's ``open_websocket_url`` leaks its TCP stream when the
listener closes first or refuses the upgrade; this one closes it itself.
"""

from __future__ import annotations

import contextlib
import urllib.parse
from collections.abc import AsyncIterator

import trio
import trio_websocket

from trio_federation._connection._connection import raise_single


@contextlib.asynccontextmanager
async def open_raw_client(
    url: str, headers: list[tuple[bytes, bytes]] | None = None
) -> AsyncIterator[trio_websocket.WebSocketConnection]:
    """Dial ``url`` (ws:// on loopback) as a plain client sending ``headers``.

    Raises:
        trio_websocket.ConnectionRejected: the listener refused the upgrade.
    """
    parts = urllib.parse.urlsplit(url)
    assert parts.hostname is not None and parts.port is not None
    resource = parts.path + (f"?{parts.query}" if parts.query else "")
    stream = await trio.open_tcp_stream(parts.hostname, parts.port)
    try:
        async with trio.open_nursery() as nursery:
            ws = await trio_websocket.wrap_client_stream(
                nursery, stream, f"{parts.hostname}:{parts.port}", resource, extra_headers=headers
            )
            try:
                yield ws
            finally:
                with trio.move_on_after(2, shield=True):
                    await ws.aclose()
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        raise_single(group)
    finally:
        await trio.aclose_forcefully(stream)
