"""Helpers for testing code that uses trio-federation, without sockets.

:func:`open_websocket_pair` gives two real trio-websocket connections joined by
a local socket pair (real framing, real ping/pong, real back-pressure, no
network), and
:func:`open_connection_pair` wraps them into two entered
:class:`~trio_federation.OrchestratorConnection` objects. Both work under
:class:`trio.testing.MockClock`, so heartbeats and timeouts can be tested
deterministically.

:func:`check_registry_backend` (and its checks one by one, :data:`REGISTRY_CHECKS`)
is the contract every :class:`~trio_federation.FederationRegistry` backend
passes; run it against your own backend.

:class:`FaultyProxy` is a TCP proxy on loopback, for tests on real sockets: put
it between two orchestrators and it cuts every link with a TCP reset, stalls
links without closing them (a black-holed peer), delays every chunk, or refuses
new connections, on demand. :meth:`FaultyProxy.statistics` returns a
:class:`ProxyStatistics`; each link is a :class:`ProxyLink`.
"""

from __future__ import annotations

import contextlib
import functools
import os
import socket
from collections.abc import AsyncIterator
from typing import Any

import attrs
import trio
from trio_websocket import WebSocketConnection, wrap_client_stream, wrap_server_stream

from ._connection._connection import OrchestratorConnection, raise_single
from ._connection._faults import CHUNK_SIZE, STALL_BUFFER, FaultyProxy, ProxyLink, ProxyStatistics
from ._registry._registry_contract import (
    CONTRACT_HEARTBEAT_TIMEOUT,
    CONTRACT_STALE_TIMEOUT,
    REGISTRY_CHECKS,
    RegistryFactory,
    check_registry_backend,
)
from ._wire._compat import SocketHost

__all__ = [
    "CHUNK_SIZE",
    "CONTRACT_HEARTBEAT_TIMEOUT",
    "CONTRACT_STALE_TIMEOUT",
    "REGISTRY_CHECKS",
    "STALL_BUFFER",
    "FaultyProxy",
    "ProxyLink",
    "ProxyStatistics",
    "RegistryFactory",
    "WebSocketPair",
    "check_registry_backend",
    "open_connection_pair",
    "open_websocket_pair",
]


@attrs.frozen
class WebSocketPair:
    """Two joined trio-websocket connections and the scopes that run them."""

    client: WebSocketConnection
    """The dialing side."""
    server: WebSocketConnection
    """The listening side."""
    client_scope: trio.CancelScope
    """Runs the client's trio-websocket reader; cancel it to freeze that side."""
    server_scope: trio.CancelScope
    """Runs the server's trio-websocket reader; cancel it to freeze that side
    (it then stops reading: no pongs, no close handshake)."""


# The hosts of the live pairs, so that open_connection_pair can wire them.
_HOSTS: dict[int, tuple[SocketHost, SocketHost]] = {}


@contextlib.asynccontextmanager
async def open_websocket_pair(
    *,
    message_queue_size: int = 4,
    max_message_size: int = 1024 * 1024,
    buffer_size: int = 64 * 1024,
) -> AsyncIterator[WebSocketPair]:
    """Yield two trio-websocket connections joined by a local socket pair.

    The upgrade runs for real (the client sends no identification headers)
    over a kernel socket pair whose buffers are ``buffer_size`` bytes, so a side
    that stops reading soon stops the other side's writes, as over TCP. Works
    under :class:`trio.testing.MockClock`. Leaving the block stops both readers
    and closes the sockets.
    """
    # A kernel socketpair: real buffers and real back-pressure, no network.
    left, right = trio.socket.socketpair()
    for sock in (left, right):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, buffer_size)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buffer_size)
    client_stream, server_stream = trio.SocketStream(left), trio.SocketStream(right)
    # Each side's trio-websocket reader runs in a host that catches its crashes
    # (see SocketHost); they are handed to the connections made on the pair.
    client_host, server_host = SocketHost(), SocketHost()
    client_scope, server_scope = client_host.scope, server_host.scope
    try:
        async with trio.open_nursery() as nursery:
            try:
                await client_host.start(nursery)
                await server_host.start(nursery)
                sockets: dict[str, WebSocketConnection] = {}

                async def serve() -> None:
                    request = await wrap_server_stream(
                        server_host.nursery,
                        server_stream,
                        message_queue_size=message_queue_size,
                        max_message_size=max_message_size,
                    )
                    sockets["server"] = await request.accept()

                async with trio.open_nursery() as handshake:
                    handshake.start_soon(serve)
                    sockets["client"] = await wrap_client_stream(
                        client_host.nursery,
                        client_stream,
                        "127.0.0.1",
                        "/federation",
                        message_queue_size=message_queue_size,
                        max_message_size=max_message_size,
                    )
                pair = WebSocketPair(
                    sockets["client"], sockets["server"], client_scope, server_scope
                )
                _HOSTS[id(pair)] = (client_host, server_host)
                try:
                    yield pair
                finally:
                    del _HOSTS[id(pair)]
            finally:
                client_scope.cancel()
                server_scope.cancel()
                await trio.aclose_forcefully(client_stream)
                await trio.aclose_forcefully(server_stream)
    except BaseExceptionGroup as group:
        raise_single(group)


@contextlib.asynccontextmanager
async def open_connection_pair(
    *, a_id: str = "orch-a", b_id: str = "orch-b", resumable: bool = False, **options: Any
) -> AsyncIterator[tuple[OrchestratorConnection, OrchestratorConnection]]:
    """Yield two entered connections talking to each other over a socket pair.

    ``a`` is the dialing side (its ``id`` is ``b_id``); ``b`` the listening
    side. ``options`` go to both :class:`~trio_federation.OrchestratorConnection`
    constructors. With ``resumable``, the two use a resumable session, as two
    trio-federation peers do by default: numbered messages, acknowledgements
    and the window (flow control), though there is no second transport to
    resume over. Leaving the block disconnects both.
    """
    async with open_websocket_pair() as pair:
        a = OrchestratorConnection(id=b_id, socket=pair.client, local_id=a_id, **options)
        b = OrchestratorConnection(id=a_id, socket=pair.server, local_id=b_id, **options)
        if resumable:
            session = os.urandom(16).hex()
            a._start_session(session, b._resume_offer_for(session))
            b._start_session(session, a._resume_offer_for(session))
        client_host, server_host = _HOSTS[id(pair)]
        client_host.on_failure = functools.partial(a._transport_failed, socket=pair.client)
        server_host.on_failure = functools.partial(b._transport_failed, socket=pair.server)
        async with a, b:
            yield a, b
