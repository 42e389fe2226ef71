"""Dialing and listening: open_orchestrator_connection and serve_federation."""

from __future__ import annotations

import contextlib
import logging
import ssl
import types
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any, NoReturn

import trio
import trio_websocket
from trio_websocket import WebSocketRequest

from ._codec import MAX_FRAME_SIZE
from ._compat import SocketHost, release_stream
from ._connection import (
    CANCEL_CLOSE_GRACE,
    DEFAULT_DISCONNECT_TIMEOUT,
    DEFAULT_HEARTBEAT_TIMEOUT,
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_MAX_QUEUE_SIZE,
    DEFAULT_RECEIVE_BUFFER,
    OrchestratorConnection,
    normalize_capabilities,
    raise_single,
)
from ._exceptions import ConnectionLost, HandshakeError
from ._handshake import identity_headers, parse_request_identity, parse_response_identity
from ._messages import HeartbeatStatus

__all__ = ["FederationListener", "open_orchestrator_connection", "serve_federation"]

logger = logging.getLogger("trio_federation.transport")

DEFAULT_CONNECT_TIMEOUT = 10.0
"""Seconds a dial (TCP, TLS and the upgrade) may take."""
DEFAULT_HANDSHAKE_TIMEOUT = 10.0
"""Seconds a listener waits for a dialer's upgrade request."""
SOCKET_QUEUE_SIZE = 4
"""Messages trio-websocket buffers between its reader and ours."""
SOCKET_RECEIVE_BYTES = 64 * 1024
"""Bytes trio-websocket asks the socket for at once (its default is 4 KiB)."""


def _check_local_id(local_id: object) -> str:
    if not isinstance(local_id, str):
        raise TypeError(f"local_id must be a string, got {type(local_id).__name__}")
    if not local_id.strip():
        raise ValueError("local_id must not be empty")
    return local_id


def _handshake_error(url: str, exc: BaseException) -> HandshakeError:
    if isinstance(exc, trio_websocket.ConnectionRejected):
        body = (exc.body or b"").decode("utf-8", "replace").strip()
        detail = f": {body}" if body else ""
        return HandshakeError(f"{url} refused the upgrade{detail}", exc.status_code)
    return HandshakeError(f"cannot connect to {url}: {exc!r}")


@contextlib.asynccontextmanager
async def open_orchestrator_connection(
    url: str,
    *,
    local_id: str,
    capabilities: Iterable[str],
    remote_id: str | None = None,
    remote_capabilities: Iterable[str] | None = None,
    heartbeat_timeout: float = DEFAULT_HEARTBEAT_TIMEOUT,
    max_queue_size: int = DEFAULT_MAX_QUEUE_SIZE,
    disconnect_timeout: float = DEFAULT_DISCONNECT_TIMEOUT,
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
    receive_buffer_size: int = DEFAULT_RECEIVE_BUFFER,
    max_message_size: int = MAX_FRAME_SIZE,
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
    ssl_context: ssl.SSLContext | None = None,
    local_status: HeartbeatStatus | str = HeartbeatStatus.HEALTHY,
) -> AsyncIterator[OrchestratorConnection]:
    """Dial a federation listener and yield the open connection.

    The dialer presents ``local_id`` and ``capabilities`` in the upgrade request
    headers; the listener's answer headers give the connection's ``id`` and
    ``capabilities``. Against a listener that does not identify itself (the
    TypeScript daemon), ``id`` is ``remote_id`` if given, else the ``from`` of
    the first message received, and ``capabilities`` is ``remote_capabilities``.

    Entering blocks until the upgrade is done (at most ``connect_timeout``).
    Leaving disconnects gracefully (see
    :meth:`~trio_federation.OrchestratorConnection.disconnect`); on cancellation
    it sends a 1001 close and waits at most ``CANCEL_CLOSE_GRACE`` for the
    handshake. Exceptions leave the block as themselves, never as an exception
    group. Other arguments are those of
    :class:`~trio_federation.OrchestratorConnection`.

    Raises:
        HandshakeError: the TCP connection, TLS or the upgrade failed, timed out,
            or the listener refused it (``status_code`` says how).
        ValueError: ``url`` is not a ``ws://`` or ``wss://`` URL, or an argument
            is out of range.
    """
    local_id = _check_local_id(local_id)
    local_capabilities = normalize_capabilities(capabilities, strict=True)
    if remote_id is not None:
        _check_local_id(remote_id)
    try:
        async with trio.open_nursery() as nursery:
            host = SocketHost()
            try:
                await host.start(nursery)
                socket = await _dial(
                    host,
                    url,
                    ssl_context=ssl_context,
                    headers=identity_headers(local_id, local_capabilities),
                    max_message_size=max_message_size,
                    connect_timeout=connect_timeout,
                )
                try:
                    identity = parse_response_identity(socket.handshake_headers)
                except ValueError as exc:
                    with trio.CancelScope(shield=True), trio.move_on_after(CANCEL_CLOSE_GRACE):
                        await socket.aclose(1002, "bad identity")
                    await release_stream(socket)
                    raise HandshakeError(f"{url} answered with a bad identity: {exc}") from None
                connection = OrchestratorConnection(
                    id=identity.id or remote_id or "",
                    socket=socket,
                    capabilities=(
                        identity.capabilities
                        if identity.id is not None
                        else tuple(remote_capabilities or ())
                    ),
                    local_id=local_id,
                    heartbeat_timeout=heartbeat_timeout,
                    max_queue_size=max_queue_size,
                    disconnect_timeout=disconnect_timeout,
                    idle_timeout=idle_timeout,
                    receive_buffer_size=receive_buffer_size,
                    max_message_size=max_message_size,
                    local_status=local_status,
                )
                host.on_failure = connection._transport_failed
                async with connection:
                    yield connection
            finally:
                host.scope.cancel()
    except BaseExceptionGroup as group:
        raise_single(group)


def _parse_url(
    url: str, ssl_context: ssl.SSLContext | None
) -> tuple[str, int, str, ssl.SSLContext | None]:
    """Split a ``ws://`` or ``wss://`` URL into host, port, resource and TLS context."""
    parts = urllib.parse.urlsplit(str(url))
    if parts.scheme not in ("ws", "wss"):
        raise ValueError(f"a federation URL must start with ws:// or wss://, got {url!r}")
    if parts.scheme == "ws" and ssl_context is not None:
        raise ValueError("ssl_context is only for wss:// URLs")
    if parts.scheme == "wss" and ssl_context is None:
        ssl_context = ssl.create_default_context()
    if not parts.hostname:
        raise ValueError(f"the URL {url!r} names no host")
    port = parts.port or (443 if parts.scheme == "wss" else 80)
    resource = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return parts.hostname, port, resource, ssl_context


async def _dial(
    host: SocketHost,
    url: str,
    *,
    ssl_context: ssl.SSLContext | None,
    headers: list[tuple[bytes, bytes]],
    max_message_size: int,
    connect_timeout: float,
) -> trio_websocket.WebSocketConnection:
    hostname, port, resource, tls = _parse_url(url, ssl_context)
    scope = trio.CancelScope(deadline=trio.current_time() + connect_timeout)
    host.on_failure = lambda exc: scope.cancel()
    socket: trio_websocket.WebSocketConnection | None = None
    stream: trio.SocketStream | trio.SSLStream[trio.SocketStream] | None = None
    with scope:
        try:
            if tls is None:
                stream = await trio.open_tcp_stream(hostname, port)
            else:
                stream = await trio.open_ssl_over_tcp_stream(
                    hostname, port, ssl_context=tls, https_compatible=True
                )
                # Handshake now: trio-websocket would meet a TLS failure in its
                # reader, swallow it, and leave the dial waiting for its timeout.
                await stream.do_handshake()
            socket = await trio_websocket.wrap_client_stream(
                host.nursery,
                stream,
                hostname if port in (80, 443) else f"{hostname}:{port}",
                resource,
                extra_headers=headers,
                message_queue_size=SOCKET_QUEUE_SIZE,
                max_message_size=max_message_size,
                receive_buffer_size=SOCKET_RECEIVE_BYTES,
            )
        except (OSError, trio.BrokenResourceError) as exc:
            raise _handshake_error(url, exc) from exc
        finally:
            if socket is None and stream is not None:
                with trio.CancelScope(shield=True):
                    await trio.aclose_forcefully(stream)
    host.on_failure = lambda exc: None
    if socket is None:
        if host.failure is not None:
            raise _handshake_error(url, host.failure) from host.failure
        raise HandshakeError(f"no answer from {url} within {connect_timeout:g}s")
    return socket


Handler = Callable[[OrchestratorConnection], Awaitable[object]]


def _split_lost(exc: Exception) -> tuple[Exception | None, Exception | None]:
    """Separate an expected ConnectionLost from real failures, through groups.

    A handler that runs its own nursery hands a lost peer back as a group.
    """
    if isinstance(exc, ExceptionGroup):
        group, other = exc.split(ConnectionLost)
        lost: Exception | None = group
        while isinstance(lost, ExceptionGroup):  # log the loss itself, not its wrapping
            lost = lost.exceptions[0]
        return lost, other
    if isinstance(exc, ConnectionLost):
        return exc, None
    return None, exc


class FederationListener:
    """A running :func:`serve_federation`: what ``nursery.start`` returns.

    Attributes:
        local_id: this listener's orchestrator id.
        capabilities: the capabilities it announces.
    """

    def __init__(
        self,
        handler: Handler,
        *,
        local_id: str,
        capabilities: tuple[str, ...],
        connection_options: Mapping[str, Any],
    ) -> None:
        self._handler = handler
        self.local_id = local_id
        self.capabilities = capabilities
        self._options = connection_options
        self._connections: dict[str, OrchestratorConnection] = {}
        self._reserved: set[str] = set()
        self._sockets: Sequence[trio.SocketListener | trio.SSLListener[trio.SocketStream]] = ()
        self._handshake_timeout = DEFAULT_HANDSHAKE_TIMEOUT

    @property
    def port(self) -> int:
        """The bound TCP port (useful with ``port=0``; the first one if several)."""
        first = self._sockets[0]
        tcp = first.transport_listener if isinstance(first, trio.SSLListener) else first
        assert isinstance(tcp, trio.SocketListener)
        port: int = tcp.socket.getsockname()[1]
        return port

    @property
    def connections(self) -> Mapping[str, OrchestratorConnection]:
        """Live connections by remote orchestrator id (a read-only view)."""
        return types.MappingProxyType(self._connections)

    async def _refuse(self, request: WebSocketRequest, status: int, reason: str) -> None:
        logger.warning("refused federation upgrade from %s: %s", request.remote, reason)
        await request.reject(status, body=reason.encode())
        await release_stream(request)

    async def _handle_stream(self, stream: trio.abc.Stream) -> None:
        """One accepted TCP (or TLS) stream: the upgrade, then the connection."""
        host = SocketHost()
        try:
            async with trio.open_nursery() as nursery:
                try:
                    await host.start(nursery)
                    request: WebSocketRequest | None = None
                    with trio.move_on_after(self._handshake_timeout) as waiting:
                        host.on_failure = lambda exc: waiting.cancel()
                        request = await trio_websocket.wrap_server_stream(
                            host.nursery,
                            stream,
                            message_queue_size=SOCKET_QUEUE_SIZE,
                            max_message_size=self._options["max_message_size"],
                            receive_buffer_size=SOCKET_RECEIVE_BYTES,
                        )
                    if request is None:
                        logger.info("no federation upgrade from a dialer: closing its stream")
                    else:
                        await self._handle_request(request, host)
                finally:
                    host.scope.cancel()
        finally:
            await trio.aclose_forcefully(stream)

    async def _handle_request(self, request: WebSocketRequest, host: SocketHost) -> None:
        try:
            identity = parse_request_identity(request.headers, request.path)
        except ValueError as exc:
            await self._refuse(request, 400, str(exc))
            return
        if identity.id is None:
            await self._refuse(
                request,
                400,
                "missing orchestrator id: send the X-Federation-Id header or the ?id= query",
            )
            return
        peer_id = identity.id
        if peer_id in self._reserved:
            await self._refuse(
                request, 409, f"an orchestrator named {peer_id!r} is already connected"
            )
            return
        self._reserved.add(peer_id)
        try:
            socket = await request.accept(
                extra_headers=identity_headers(self.local_id, self.capabilities)
            )
            connection = OrchestratorConnection(
                id=peer_id,
                socket=socket,
                capabilities=identity.capabilities,
                local_id=self.local_id,
                active_connections=lambda: len(self._connections),
                **self._options,
            )
            host.on_failure = connection._transport_failed
            self._connections[peer_id] = connection
            logger.info("accepted federation connection from %r (%s)", peer_id, request.remote)
            try:
                async with connection:
                    await self._handler(connection)
            except Exception as exc:
                lost, other = _split_lost(exc)
                if lost is not None:
                    logger.info("handler for %r ended: %s", peer_id, lost)
                if other is not None:
                    logger.error(
                        "handler for %r raised; its connection closed with 1011",
                        peer_id,
                        exc_info=other,
                    )
        finally:
            self._connections.pop(peer_id, None)
            self._reserved.discard(peer_id)

    async def _close_all(self, code: int, reason: str) -> None:
        async with trio.open_nursery() as nursery:
            for connection in list(self._connections.values()):
                nursery.start_soon(connection._close, code, reason)


async def _serve_shielded(scope: trio.CancelScope, listener: FederationListener) -> None:
    # Started with start_soon, not start: see SocketHost.start.
    with scope:
        await trio.serve_listeners(listener._handle_stream, list(listener._sockets))


async def serve_federation(
    handler: Handler,
    host: str | None,
    port: int,
    *,
    local_id: str,
    capabilities: Iterable[str],
    ssl_context: ssl.SSLContext | None = None,
    heartbeat_timeout: float = DEFAULT_HEARTBEAT_TIMEOUT,
    max_queue_size: int = DEFAULT_MAX_QUEUE_SIZE,
    disconnect_timeout: float = DEFAULT_DISCONNECT_TIMEOUT,
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
    receive_buffer_size: int = DEFAULT_RECEIVE_BUFFER,
    max_message_size: int = MAX_FRAME_SIZE,
    handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
    task_status: trio.TaskStatus[FederationListener] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Listen for orchestrators and run ``handler(conn)`` for each one.

    Use with ``nursery.start``, binding the keyword arguments first::

        listener = await nursery.start(
            functools.partial(serve_federation, local_id="orch-b", capabilities=["testing"]),
            handler, "127.0.0.1", 0,
        )

    It returns a :class:`FederationListener` once it is accepting, with the
    bound ``port`` and the live ``connections``, and runs until cancelled. The
    handler runs as soon as a connection opens; the connection routes no
    message before the handler's first checkpoint, so subscriptions made at the
    top of the handler miss nothing.

    A dialer identifies itself with the ``X-Federation-Id`` and
    ``X-Federation-Capabilities`` headers, or with the ``?id=`` and
    ``?capabilities=a,b`` query of its URL (plain clients such as the TypeScript
    daemon). An upgrade without an id is refused with 400; one whose id is
    already connected, with 409. The answer carries this listener's id and
    capabilities in the same headers.

    The connection closes gracefully (1000) when the handler returns. An
    exception from a handler is logged and closes that connection with 1011;
    the listener goes on. Cancelling the listener closes every connection with
    1001 ("going away"), each within its ``disconnect_timeout``, then stops.
    Other arguments are those of :class:`~trio_federation.OrchestratorConnection`.

    Raises:
        OSError: the address could not be bound.
    """
    local_id = _check_local_id(local_id)
    listener = FederationListener(
        handler,
        local_id=local_id,
        capabilities=normalize_capabilities(capabilities, strict=True),
        connection_options={
            "heartbeat_timeout": heartbeat_timeout,
            "max_queue_size": max_queue_size,
            "disconnect_timeout": disconnect_timeout,
            "idle_timeout": idle_timeout,
            "receive_buffer_size": receive_buffer_size,
            "max_message_size": max_message_size,
        },
    )
    # Our own listeners and our own accept loop: trio-websocket's serve_websocket
    # leaks its listeners when cancelled before it serves, and a crash of its
    # per-connection reader task would take the whole server down.
    if ssl_context is None:
        listener._sockets = await trio.open_tcp_listeners(port, host=host)
    else:
        listener._sockets = await trio.open_ssl_over_tcp_listeners(
            port, ssl_context, host=host, https_compatible=True
        )
    listener._handshake_timeout = handshake_timeout
    # Shielded: stopping the listener first closes every connection with 1001
    # (which needs their readers alive), then cancels this scope.
    scope = trio.CancelScope(shield=True)
    try:
        async with trio.open_nursery() as nursery:
            try:
                nursery.start_soon(_serve_shielded, scope, listener)
                logger.info("federation listener %r on port %d", local_id, listener.port)
                task_status.started(listener)
                await trio.sleep_forever()
            finally:
                with trio.CancelScope(shield=True):
                    await listener._close_all(1001, "listener stopping")
                scope.cancel()
                for socket_listener in listener._sockets:
                    await trio.aclose_forcefully(socket_listener)
    except BaseExceptionGroup as group:
        raise_single(group)
    raise AssertionError("unreachable")  # pragma: no cover
