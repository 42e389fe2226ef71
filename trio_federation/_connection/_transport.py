"""Dialing and listening: open_orchestrator_connection and serve_federation."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import ssl
import time
import types
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any, Final, NoReturn

import attrs
import trio
import trio_websocket

from .._exceptions import AuthenticationError, ConnectionLost, HandshakeError
from .._wire._auth import (
    AUTH_HEADER,
    DEFAULT_PROOF_LIFETIME,
    AuthRefusal,
    SecretLookup,
    TokenVerifier,
    certificate_id,
    check_listener_proof,
    listener_proof,
    make_proof,
    normalize_secret,
    secret_lookup,
)
from .._wire._codec import MAX_FRAME_SIZE
from .._wire._compat import flush_tls_alert, release_stream
from .._wire._frames import UpgradeFailed, WireConnection, WireRequest, open_client, read_request
from .._wire._handshake import (
    BATCH_EXTENSION,
    EXTENSIONS,
    PeerIdentity,
    extensions_header,
    header_value,
    identity_headers,
    parse_request_identity,
    parse_response_identity,
    query_value,
)
from .._wire._messages import HeartbeatStatus
from .._wire._sockio import direct
from ._connection import (
    CANCEL_CLOSE_GRACE,
    CLOSE_RESTARTING,
    DEFAULT_DISCONNECT_TIMEOUT,
    DEFAULT_HEARTBEAT_TIMEOUT,
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_MAX_QUEUE_SIZE,
    DEFAULT_MAX_SUBSCRIPTIONS,
    DEFAULT_MAX_VIOLATIONS,
    DEFAULT_RATE_BURST,
    DEFAULT_RATE_LIMIT,
    DEFAULT_RECEIVE_BUFFER,
    OrchestratorConnection,
    check_seconds,
    normalize_capabilities,
    raise_single,
)
from ._session import BATCH_MIN_FRAME, RESUME_HEADER, ResumeOffer, parse_resume
from ._settings import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_HANDSHAKE_TIMEOUT,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_RESUME_TIMEOUT,
    Limits,
    Timeouts,
    resolve_settings,
)

__all__ = [
    "CLOSE_REPLACED",
    "FederationListener",
    "ListenerStatistics",
    "ReconnectPolicy",
    "open_orchestrator_connection",
    "serve_federation",
]

logger = logging.getLogger("trio_federation.transport")

CLOSE_REPLACED: Final = 4000
"""Close code of a connection replaced by a newer one from the same orchestrator."""
_FULL_RESPONSE: Final = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\n"
    b"Content-Length: 35\r\nConnection: close\r\n\r\n"
    b"listener is at its connection limit"
)


def _check_local_id(local_id: object) -> str:
    if not isinstance(local_id, str):
        raise TypeError(f"local_id must be a string, got {type(local_id).__name__}")
    if not local_id.strip():
        raise ValueError("local_id must not be empty")
    return local_id


def _tls_refusal(exc: BaseException) -> ssl.SSLError | None:
    """The TLS error behind ``exc`` if it is about a certificate."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLCertVerificationError):
            return seen
        if isinstance(seen, ssl.SSLError) and "CERTIFICATE" in str(seen).upper():
            return seen
        if isinstance(seen, ssl.SSLError) and "UNKNOWN_CA" in str(seen).upper():
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _handshake_error(url: str, exc: BaseException) -> HandshakeError:
    if isinstance(exc, trio_websocket.ConnectionRejected):
        body = (exc.body or b"").decode("utf-8", "replace").strip()
        detail = f": {body}" if body else ""
        kind = AuthenticationError if exc.status_code in (401, 403) else HandshakeError
        return kind(f"{url} refused the upgrade{detail}", exc.status_code)
    tls = _tls_refusal(exc)
    if tls is not None:
        return AuthenticationError(f"TLS refused a certificate connecting to {url}: {tls}")
    return HandshakeError(f"cannot connect to {url}: {exc!r}")


@attrs.frozen(kw_only=True)
class ReconnectPolicy:
    """How a dialer reconnects after its link fails: exponential backoff with jitter.

    The n-th consecutive failed attempt (from 0) waits ``initial_delay *
    multiplier**n``, at most ``max_delay``, each spread by a random factor
    within ``1 ± jitter`` so that many dialers do not come back in step. A
    link that came up resets the count.

    Attributes:
        initial_delay: seconds before the first new attempt.
        multiplier: growth of the delay from one failed attempt to the next.
        max_delay: the longest delay, in seconds.
        max_attempts: failed attempts in a row before giving up (the
            connection then ends with ``ConnectionLost``); None: forever.
        jitter: the relative spread of each delay, from 0 to 1.
    """

    initial_delay: float = attrs.field(default=0.1, validator=attrs.validators.ge(0))
    multiplier: float = attrs.field(default=2.0, validator=attrs.validators.ge(1))
    max_delay: float = attrs.field(default=30.0, validator=attrs.validators.ge(0))
    max_attempts: int | None = attrs.field(
        default=None, validator=attrs.validators.optional(attrs.validators.ge(1))
    )
    jitter: float = attrs.field(
        default=0.2, validator=[attrs.validators.ge(0), attrs.validators.le(1)]
    )

    def delay(self, attempt: int, *, rng: random.Random | None = None) -> float:
        """Seconds to wait before attempt number ``attempt`` (0 for the first retry)."""
        base = min(self.max_delay, self.initial_delay * self.multiplier ** min(attempt, 64))
        spread = (rng or _RANDOM).uniform(-self.jitter, self.jitter)
        return max(0.0, base * (1 + spread))


_RANDOM = random.Random()
_NON_RETRYABLE_STATUS: Final = frozenset({400, 401, 403, 404, 405, 426})
"""Refusals that retrying with the same request cannot fix."""


@attrs.define
class _Dialer:
    """Everything needed to dial the same listener again and again."""

    url: str
    local_id: str
    capabilities: tuple[str, ...]
    remote_id: str | None
    key: bytes | None
    ssl_context: ssl.SSLContext | None
    max_message_size: int
    connect_timeout: float

    async def dial(
        self, offer: ResumeOffer | None
    ) -> tuple[WireConnection, PeerIdentity, ResumeOffer | None]:
        """One dial: the upgrade with our identity, a fresh proof and ``offer``.

        Raises:
            AuthenticationError, HandshakeError: as open_orchestrator_connection.
        """
        headers = identity_headers(self.local_id, self.capabilities)
        headers.append(extensions_header(speaks(self.max_message_size)))
        proof = None
        if self.key is not None:
            proof = make_proof(
                self.key, peer_id=self.local_id, audience=self.remote_id or "", now=time.time()
            )
            headers.append((AUTH_HEADER.encode(), proof.encode()))
        if offer is not None:
            headers.append((RESUME_HEADER.encode(), offer.header().encode()))
        socket = await _dial(
            self.url,
            ssl_context=self.ssl_context,
            headers=headers,
            max_message_size=self.max_message_size,
            connect_timeout=self.connect_timeout,
        )
        answer = socket.handshake_headers
        try:
            identity = parse_response_identity(answer)
            if self.key is not None and proof is not None:
                check_listener_proof(
                    header_value(answer, AUTH_HEADER),
                    self.key,
                    listener_id=identity.id or self.remote_id or "",
                    peer_id=self.local_id,
                    proof=proof,
                )
            granted = None if offer is None else parse_resume(header_value(answer, RESUME_HEADER))
            if granted is not None and offer is not None and granted.session != offer.session:
                raise ValueError(f"the listener answered for another session ({granted.session})")
        except (ValueError, AuthRefusal) as exc:
            bad = "bad identity" if isinstance(exc, ValueError) else "unauthenticated"
            with trio.CancelScope(shield=True), trio.move_on_after(CANCEL_CLOSE_GRACE):
                await socket.aclose(1008 if bad == "unauthenticated" else 1002, bad)
            await release_stream(socket)
            if isinstance(exc, AuthRefusal):
                raise AuthenticationError(f"{self.url}: {exc.reason}") from None
            raise HandshakeError(f"{self.url} answered with a bad identity: {exc}") from None
        return socket, identity, granted


def speaks(max_message_size: int) -> frozenset[str]:
    """The extensions a side offers (or grants) with ``max_message_size``.

    Batches only where a batch frame fits the frames this side accepts.
    """
    if max_message_size >= BATCH_MIN_FRAME:
        return EXTENSIONS
    return EXTENSIONS - {BATCH_EXTENSION}


async def _keep_connected(
    connection: OrchestratorConnection,
    dialer: _Dialer,
    policy: ReconnectPolicy,
    wait_first: bool,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Dial, hand the link to ``connection``, and dial again when it fails.

    Reports ``started`` after the first link is up (or at once if not
    ``wait_first``). Before that, failures are raised to the caller; after,
    they end the connection as ``ConnectionLost``. Non-retryable refusals stop
    at once; others are retried per ``policy``.
    """
    started = False
    if not wait_first:
        task_status.started()
        started = True
    attempt = 0
    while not connection._closing:
        connection._dialing()
        socket: WireConnection | None = None
        resume = False
        try:
            try:
                offer = connection._resume_offer() if connection._session_id else None
                socket, identity, granted = await dialer.dial(offer)
                if identity.id is not None:
                    if connection.id and identity.id != connection.id:
                        raise AuthenticationError(
                            f"{dialer.url} is now {identity.id!r}, not {connection.id!r}"
                        )
                    connection._id = identity.id
                    connection._capabilities = identity.capabilities
                connection._extensions = identity.extensions & speaks(dialer.max_message_size)
                attempt = 0
                if not started:
                    task_status.started()
                    started = True
                resume = await connection._attach(socket, granted)
            finally:
                if socket is not None:
                    await release_stream(socket)
        except HandshakeError as exc:
            retryable = not isinstance(exc, AuthenticationError) and (
                exc.status_code not in _NON_RETRYABLE_STATUS
            )
            attempt += 1
            if not retryable or (
                policy.max_attempts is not None and attempt >= policy.max_attempts
            ):
                if not started:
                    raise
                why = "refused" if not retryable else f"gave up after {attempt} attempts"
                code = 1008 if isinstance(exc, AuthenticationError) else 1006
                connection._give_up(ConnectionLost(code, f"reconnecting {why}: {exc}"))
                return
            logger.info("dialing %s failed (%s); attempt %d", dialer.url, exc, attempt)
            resume = True
        if not resume:
            return  # the connection is over: closed, or ended by the peer
        await trio.sleep(policy.delay(attempt))


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
    secret: bytes | str | None = None,
    local_status: HeartbeatStatus | str = HeartbeatStatus.HEALTHY,
    rate_limit: float | None = DEFAULT_RATE_LIMIT,
    rate_burst: int = DEFAULT_RATE_BURST,
    max_violations: int = DEFAULT_MAX_VIOLATIONS,
    max_subscriptions: int = DEFAULT_MAX_SUBSCRIPTIONS,
    dead_timeout: float | None = None,
    reconnect: ReconnectPolicy | None = None,
    wait_for_connection: bool = True,
    resumable: bool = True,
    timeouts: Timeouts | None = None,
    limits: Limits | None = None,
) -> AsyncIterator[OrchestratorConnection]:
    """Dial a federation listener and yield the open connection.

    The dialer presents ``local_id`` and ``capabilities`` in the upgrade request
    headers; the listener's answer headers give the connection's ``id`` and
    ``capabilities``. Against a listener that does not identify itself (the
    TypeScript daemon), ``id`` is ``remote_id`` if given, else the ``from`` of
    the first message received, and ``capabilities`` is ``remote_capabilities``.

    With ``secret`` (shared with the listener, which knows it under
    ``local_id``), the dialer proves its identity without sending the secret
    (see :doc:`/security`), and requires the listener to prove it holds the
    same secret; give ``remote_id`` too to make the proof good for that
    listener only. With a ``wss://`` URL, ``ssl_context`` verifies the
    listener's certificate and may carry our client certificate (mutual TLS).

    Entering blocks until the upgrade is done (at most ``connect_timeout``).
    Leaving disconnects gracefully (see
    :meth:`~trio_federation.OrchestratorConnection.disconnect`); on cancellation
    it sends a 1001 close and waits at most ``CANCEL_CLOSE_GRACE`` for the
    handshake. Exceptions leave the block as themselves, never as an exception
    group. Other arguments are those of
    :class:`~trio_federation.OrchestratorConnection`. ``timeouts`` and
    ``limits`` (:class:`~trio_federation.Timeouts`,
    :class:`~trio_federation.Limits`) give the timers and bounds as one
    object each, instead of the individual keywords.

    Raises:
        AuthenticationError: the listener refused our credentials (401 or
            403), TLS refused a certificate, or the listener failed to prove
            it holds ``secret``. Retrying cannot help.
        HandshakeError: the TCP connection, TLS or the upgrade failed, timed out,
            or the listener refused it (``status_code`` says how).
        ValueError: ``url`` is not a ``ws://`` or ``wss://`` URL, or an argument
            is out of range.
    """
    timeouts, limits = resolve_settings(
        timeouts,
        limits,
        heartbeat_timeout=heartbeat_timeout,
        max_queue_size=max_queue_size,
        disconnect_timeout=disconnect_timeout,
        idle_timeout=idle_timeout,
        receive_buffer_size=receive_buffer_size,
        max_message_size=max_message_size,
        connect_timeout=connect_timeout,
        rate_limit=rate_limit,
        rate_burst=rate_burst,
        max_violations=max_violations,
        max_subscriptions=max_subscriptions,
        dead_timeout=dead_timeout,
    )
    heartbeat_timeout, disconnect_timeout, idle_timeout = (
        timeouts.heartbeat,
        timeouts.disconnect,
        timeouts.idle,
    )
    connect_timeout, dead_timeout = timeouts.connect, timeouts.dead
    max_queue_size, receive_buffer_size = limits.max_queue_size, limits.receive_buffer_size
    max_message_size, rate_limit, rate_burst = (
        limits.max_message_size,
        limits.rate_limit,
        limits.rate_burst,
    )
    max_violations, max_subscriptions = limits.max_violations, limits.max_subscriptions
    local_id = _check_local_id(local_id)
    local_capabilities = normalize_capabilities(capabilities, strict=True)
    if remote_id is not None:
        _check_local_id(remote_id)
    if reconnect is None and not wait_for_connection:
        raise ValueError("wait_for_connection=False needs a reconnect= policy")
    if reconnect is not None and not isinstance(reconnect, ReconnectPolicy):
        raise TypeError(f"reconnect must be a ReconnectPolicy, got {type(reconnect).__name__}")
    _parse_url(url, ssl_context)  # refuse a bad URL now, not in a retry loop
    dialer = _Dialer(
        url=url,
        local_id=local_id,
        capabilities=local_capabilities,
        remote_id=remote_id,
        key=None if secret is None else normalize_secret(secret, repr(local_id)),
        ssl_context=ssl_context,
        max_message_size=max_message_size,
        connect_timeout=connect_timeout,
    )
    options: dict[str, Any] = {
        "local_id": local_id,
        "heartbeat_timeout": heartbeat_timeout,
        "max_queue_size": max_queue_size,
        "disconnect_timeout": disconnect_timeout,
        "idle_timeout": idle_timeout,
        "receive_buffer_size": receive_buffer_size,
        "max_message_size": max_message_size,
        "local_status": local_status,
        "rate_limit": rate_limit,
        "rate_burst": rate_burst,
        "max_violations": max_violations,
        "max_subscriptions": max_subscriptions,
        "dead_timeout": dead_timeout,
    }
    session = os.urandom(16).hex() if resumable else None
    try:
        async with trio.open_nursery() as nursery:
            if reconnect is None:
                # No reconnect policy, no way back: the listener need keep nothing.
                offer = (
                    None
                    if session is None
                    else ResumeOffer(session, 0, receive_buffer_size, returns=False)
                )
                socket, identity, granted = await dialer.dial(offer)
                connection = OrchestratorConnection(
                    id=identity.id or remote_id or "",
                    socket=None,
                    capabilities=(
                        identity.capabilities
                        if identity.id is not None
                        else tuple(remote_capabilities or ())
                    ),
                    **options,
                )
                connection._extensions = identity.extensions & speaks(dialer.max_message_size)
                connection._adopt(socket)
                if session is not None and granted is not None:
                    connection._start_session(session, granted)
                async with connection:
                    yield connection
            else:
                connection = OrchestratorConnection(
                    id=remote_id or "",
                    socket=None,
                    capabilities=tuple(remote_capabilities or ()),
                    **options,
                )
                connection._reattach = math.inf
                connection._defer_handover = True
                if session is not None:
                    connection._start_session(session, None)
                try:
                    await nursery.start(
                        _keep_connected, connection, dialer, reconnect, wait_for_connection
                    )
                    async with connection:
                        if wait_for_connection:
                            await connection._wait_up()
                        connection._handed_over.set()
                        yield connection
                finally:
                    nursery.cancel_scope.cancel()
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
    url: str,
    *,
    ssl_context: ssl.SSLContext | None,
    headers: list[tuple[bytes, bytes]],
    max_message_size: int,
    connect_timeout: float,
) -> WireConnection:
    hostname, port, resource, tls = _parse_url(url, ssl_context)
    socket: WireConnection | None = None
    stream: trio.SocketStream | trio.SSLStream[trio.SocketStream] | None = None
    with trio.move_on_after(connect_timeout):
        try:
            if tls is None:
                stream = await trio.open_tcp_stream(hostname, port)
            else:
                stream = await trio.open_ssl_over_tcp_stream(
                    hostname, port, ssl_context=tls, https_compatible=True
                )
                await stream.do_handshake()  # a TLS refusal is told apart below
            # The upgrade is read inline: a refusal, an EOF, a reset or a TLS
            # alert (TLS 1.3 sends a refused client certificate's only after
            # the client's handshake) ends the dial at once.
            socket = await open_client(
                direct(stream),
                hostname if port in (80, 443) else f"{hostname}:{port}",
                resource,
                headers,
                max_message_size,
            )
        except (
            OSError,
            trio.BrokenResourceError,
            trio_websocket.ConnectionRejected,
            UpgradeFailed,
        ) as exc:
            raise _handshake_error(url, exc) from exc
        finally:
            if socket is None and stream is not None:
                with trio.CancelScope(shield=True):
                    await trio.aclose_forcefully(stream)
    if socket is None:
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


@attrs.frozen
class ListenerStatistics:
    """A snapshot of a listener's figures (from :meth:`FederationListener.statistics`).

    Attributes:
        connections: connections open now.
        pending: accepted TCP streams still in their TLS or upgrade handshake.
        accepted: connections accepted since the listener started.
        refused: upgrades refused since it started, by reason: ``"auth"``
            (401/403), ``"tls"`` (TLS handshake failed), ``"identity"`` (400),
            ``"duplicate"`` (409), ``"capacity"`` (503), ``"timeout"`` (no
            upgrade within ``handshake_timeout``).
    """

    connections: int
    pending: int
    accepted: int
    refused: Mapping[str, int]


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
        verifier: TokenVerifier | None = None,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
        resume_timeout: float = DEFAULT_RESUME_TIMEOUT,
    ) -> None:
        self._handler = handler
        self.local_id = local_id
        self.capabilities = capabilities
        self._options = connection_options
        self._verifier = verifier
        self._max_connections = max_connections
        self._handshake_timeout = handshake_timeout
        self._resume_timeout = resume_timeout
        self.restarting = False
        """Set before stopping the listener to close its connections with 1012
        ("restarting: reconnect and resume") instead of 1001 ("going away")."""
        self._connections: dict[str, OrchestratorConnection] = {}
        # Who holds each peer id (a pending upgrade or an open connection).
        self._claims: dict[str, object] = {}
        self._streams = 0
        self._pending = 0  # streams still in their TLS or upgrade handshake
        self._accepted = 0
        self._refused: dict[str, int] = {}
        self._sockets: Sequence[trio.SocketListener | trio.SSLListener[trio.SocketStream]] = ()
        self._client_certificates = False

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

    def statistics(self) -> ListenerStatistics:
        """A frozen snapshot of the listener's connection and refusal counts."""
        return ListenerStatistics(
            connections=len(self._connections),
            pending=self._pending,
            accepted=self._accepted,
            refused=types.MappingProxyType(dict(self._refused)),
        )

    def _count_refusal(self, kind: str, remote: object, reason: str) -> None:
        self._refused[kind] = self._refused.get(kind, 0) + 1
        logger.warning("refused federation upgrade from %s (%s): %s", remote, kind, reason)

    async def _refuse(self, request: WireRequest, status: int, kind: str, reason: str) -> None:
        self._count_refusal(kind, request.remote, reason)
        headers = [(b"WWW-Authenticate", b"Federation-HMAC-SHA256")] if status == 401 else None
        with contextlib.suppress(trio_websocket.ConnectionClosed):  # the dialer left first
            await request.reject(status, extra_headers=headers, body=reason.encode())
        await release_stream(request)

    async def _handle_stream(self, stream: trio.abc.Stream) -> None:
        """One accepted TCP (or TLS) stream: the upgrade, then the connection."""
        if self._streams >= self._max_connections:
            await self._refuse_full(stream)
            return
        self._streams += 1
        handshake = _Handshake(self)
        try:
            request: WireRequest | None = None
            cert_id: str | None = None
            failed: str | None = None
            with trio.move_on_after(self._handshake_timeout):
                if isinstance(stream, trio.SSLStream):
                    cert_id = await self._tls_handshake(stream)
                    if cert_id == "":
                        return
                try:
                    request = await read_request(
                        direct(stream), self._options["max_message_size"], remote=_remote(stream)
                    )
                except (UpgradeFailed, trio.BrokenResourceError) as exc:
                    failed = str(exc) or repr(exc)
            if request is not None:
                await self._handle_request(request, cert_id, handshake)
            elif failed is not None:
                logger.info("no upgrade from %s: %s", _remote(stream), failed)
            else:
                self._count_refusal(
                    "timeout",
                    _remote(stream),
                    f"no upgrade within {self._handshake_timeout:g}s",
                )
        finally:
            self._streams -= 1
            handshake.over()
            await trio.aclose_forcefully(stream)

    async def _refuse_full(self, stream: trio.abc.Stream) -> None:
        # Answered before reading the request, so a flood costs one write each.
        self._count_refusal(
            "capacity", _remote(stream), f"{self._max_connections} connections already"
        )
        with trio.move_on_after(self._handshake_timeout):
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await stream.send_all(_FULL_RESPONSE)
        await trio.aclose_forcefully(stream)

    async def _tls_handshake(self, stream: trio.SSLStream[Any]) -> str | None:
        """Complete TLS; return the id the client certificate names.

        None when this listener takes no client certificates; "" when the
        handshake failed (it has been counted and logged).
        """
        try:
            await stream.do_handshake()
        except trio.BrokenResourceError as exc:
            cause = exc.__cause__ or exc
            self._count_refusal("tls", _remote(stream), f"TLS handshake failed: {cause}")
            await flush_tls_alert(stream)  # so the dialer learns why
            return ""
        if not self._client_certificates:
            return None
        cert_id = certificate_id(stream.getpeercert())
        if cert_id is None:  # pragma: no cover - CERT_REQUIRED makes TLS refuse it
            self._count_refusal("tls", _remote(stream), "the client certificate names no id")
            return ""
        return cert_id

    async def _handle_request(
        self,
        request: WireRequest,
        cert_id: str | None,
        handshake: _Handshake,
    ) -> None:
        try:
            identity = parse_request_identity(request.headers, request.path)
        except ValueError as exc:
            await self._refuse(request, 400, "identity", str(exc))
            return
        peer_id = identity.id or cert_id
        if peer_id is None:
            await self._refuse(
                request,
                400,
                "identity",
                "missing orchestrator id: send the X-Federation-Id header or the ?id= query",
            )
            return
        if cert_id is not None and peer_id != cert_id:
            await self._refuse(
                request,
                403,
                "auth",
                f"the client certificate is for {cert_id!r}, not {peer_id!r}",
            )
            return
        answer: list[tuple[bytes, bytes]] = []
        extensions = identity.extensions & speaks(self._options["max_message_size"])
        if extensions:
            answer.append(extensions_header(extensions))
        if self._verifier is not None:
            proof = header_value(request.headers, AUTH_HEADER)
            if proof is None:
                proof = query_value(request.path, "auth")
            try:
                secret, nonce = self._verifier.verify(peer_id, proof, time.time())
            except AuthRefusal as refusal:
                await self._refuse(request, refusal.status, "auth", refusal.reason)
                return
            answer.append(
                (
                    AUTH_HEADER.encode(),
                    listener_proof(
                        secret, listener_id=self.local_id, peer_id=peer_id, nonce=nonce
                    ).encode(),
                )
            )
        try:
            offer = parse_resume(header_value(request.headers, RESUME_HEADER))
        except ValueError as exc:
            await self._refuse(request, 400, "identity", str(exc))
            return
        if self._resume_timeout <= 0:
            offer = None  # sessions are off here: a v1 answer
        authenticated = self._verifier is not None or cert_id is not None
        old = self._connections.get(peer_id)
        if offer is not None and old is not None and old._session_id == offer.session:
            await self._resume(request, old, offer, answer, handshake, extensions)
            return
        claim = object()
        previous = self._claims.get(peer_id)
        if previous is not None and not authenticated and (old is None or old.is_healthy()):
            await self._refuse(
                request, 409, "duplicate", f"an orchestrator named {peer_id!r} is already connected"
            )
            return
        self._claims[peer_id] = claim
        if previous is not None:
            logger.info("a new connection from %r replaces the old one", peer_id)
            if old is not None:
                await old._close(CLOSE_REPLACED, "replaced by a newer connection")
            if self._claims.get(peer_id) is not claim:  # pragma: no cover - replaced meanwhile
                await self._refuse(request, 409, "duplicate", f"{peer_id!r} reconnected meanwhile")
                return
        try:
            connection = OrchestratorConnection(
                id=peer_id,
                socket=None,
                capabilities=identity.capabilities,
                local_id=self.local_id,
                active_connections=self._count_connections,
                **self._options,
            )
            connection._extensions = extensions
            if offer is not None:
                connection._start_session(offer.session, offer)
                # A dialer that will not come back: a cut ends the connection now.
                connection._reattach = self._resume_timeout if offer.returns else None
            socket = await self._accept(request, answer, connection if offer else None)
            if socket is None:
                return
            connection._adopt(socket)
            handshake.over()
            self._connections[peer_id] = connection
            self._accepted += 1
            logger.info("accepted federation connection from %r (%s)", peer_id, request.remote)
            # What the upgrade needed is not kept for the life of the connection.
            del identity, answer
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
            if self._claims.get(peer_id) is claim:
                del self._claims[peer_id]
                self._connections.pop(peer_id, None)

    async def _resume(
        self,
        request: WireRequest,
        connection: OrchestratorConnection,
        offer: ResumeOffer,
        answer: list[tuple[bytes, bytes]],
        handshake: _Handshake,
        extensions: frozenset[str],
    ) -> None:
        """The peer of a live session is back: carry it on over this stream.

        The extensions are the ones this upgrade agreed on (what the new link's
        reader and writer speak), as a dialer's reconnect takes them.
        """
        if connection._attaching:
            await self._refuse(request, 409, "duplicate", "this session is resuming already")
            return
        connection._attaching = True
        try:
            await connection._detach()  # a half-open old link, if still there
            socket = await self._accept(request, answer, connection, resumed=True)
            if socket is None:
                return
            handshake.over()
            self._accepted += 1
            logger.info("%r resumed its session (%s)", connection.id, request.remote)
            connection._extensions = extensions
            await connection._attach(socket, attrs.evolve(offer, resumed=True))
        finally:
            connection._attaching = False

    async def _accept(
        self,
        request: WireRequest,
        answer: list[tuple[bytes, bytes]],
        session: OrchestratorConnection | None,
        *,
        resumed: bool = False,
    ) -> WireConnection | None:
        """Accept the upgrade, granting ``session``'s; None if the dialer left meanwhile."""
        headers = identity_headers(self.local_id, self.capabilities) + answer
        if session is not None:
            granted = session._resume_offer(resumed=resumed).header(response=True)
            headers.append((RESUME_HEADER.encode(), granted.encode()))
        try:
            return await request.accept(extra_headers=headers)
        except trio_websocket.ConnectionClosed:
            logger.info("the dialer at %s left during the upgrade", request.remote)
            await release_stream(request)
            return None

    def _count_connections(self) -> int:
        """The ``active_connections`` figure of our heartbeat messages."""
        return len(self._connections)

    async def _close_all(self, code: int, reason: str) -> None:
        async with trio.open_nursery() as nursery:
            for connection in list(self._connections.values()):
                nursery.start_soon(connection._close, code, reason)


class _Handshake:
    """Counts one accepted stream as pending until its upgrade is over."""

    def __init__(self, listener: FederationListener) -> None:
        self._listener = listener
        self._open = True
        listener._pending += 1

    def over(self) -> None:
        """It carries a connection now, or never will (idempotent)."""
        if self._open:
            self._open = False
            self._listener._pending -= 1


def _remote(stream: trio.abc.Stream) -> str:
    """The peer address of a TCP or TLS stream, for the log."""
    tcp = stream.transport_stream if isinstance(stream, trio.SSLStream) else stream
    if not isinstance(tcp, trio.SocketStream):  # pragma: no cover - listeners give sockets
        return "an unknown address"
    try:
        host, port, *_ = tcp.socket.getpeername()
    except (OSError, ValueError):  # pragma: no cover - already disconnected
        return "an unknown address"
    return f"{host}:{port}"


async def _serve_shielded(scope: trio.CancelScope, listener: FederationListener) -> None:
    # Started with start_soon, not start: a task shielded before started() cannot
    # be reached by its caller's cancellation, and start would wait for it forever.
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
    secrets: Mapping[str, bytes | str] | SecretLookup | None = None,
    proof_lifetime: float = DEFAULT_PROOF_LIFETIME,
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
    rate_limit: float | None = DEFAULT_RATE_LIMIT,
    rate_burst: int = DEFAULT_RATE_BURST,
    max_violations: int = DEFAULT_MAX_VIOLATIONS,
    max_subscriptions: int = DEFAULT_MAX_SUBSCRIPTIONS,
    dead_timeout: float | None = None,
    resume_timeout: float = DEFAULT_RESUME_TIMEOUT,
    timeouts: Timeouts | None = None,
    limits: Limits | None = None,
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
    daemon). An upgrade without an id is refused with 400. The answer carries
    this listener's id and capabilities in the same headers.

    Who may connect (see :doc:`/security`):

    - ``secrets``: a mapping of orchestrator id to the secret shared with it,
      or a callable looking one up (returning None for an unknown id). Every
      dialer must then prove its id with that secret (401 without a proof,
      403 for a wrong, expired or replayed one) and the answer proves the
      listener holds it too.
    - ``ssl_context`` with ``verify_mode = ssl.CERT_REQUIRED`` and a CA
      loaded (mutual TLS): the dialer's id is the one its client certificate
      names, and an id claimed in the headers must match it (403 otherwise).
    - Neither: anyone who can reach the port may join under any unused id;
      the listener says so once in the log.

    An authenticated orchestrator that connects again replaces its older
    connection, which is closed with ``CLOSE_REPLACED`` (4000): a restarted
    process gets back in at once. Without authentication a second connection
    for a connected id is refused with 409, as anyone could claim it.

    Limits: ``handshake_timeout`` bounds TLS plus the upgrade; beyond
    ``max_connections`` open or pending connections, a dialer gets 503 at
    once; ``max_message_size``, ``rate_limit``, ``rate_burst``,
    ``max_violations`` and ``max_subscriptions`` apply per connection (see
    :class:`~trio_federation.OrchestratorConnection`). Refusals are logged and
    counted in :meth:`FederationListener.statistics`; a refused dialer never
    reaches the handler.

    The connection closes gracefully (1000) when the handler returns. An
    exception from a handler is logged and closes that connection with 1011;
    the listener goes on. Cancelling the listener closes every connection with
    1001 ("going away"), each within its ``disconnect_timeout``, then stops.
    Other arguments are those of :class:`~trio_federation.OrchestratorConnection`;
    ``timeouts`` and ``limits`` (:class:`~trio_federation.Timeouts`,
    :class:`~trio_federation.Limits`) give the timers and bounds as one object
    each, instead of the individual keywords.

    Raises:
        OSError: the address could not be bound.
    """
    timeouts, limits = resolve_settings(
        timeouts,
        limits,
        heartbeat_timeout=heartbeat_timeout,
        max_queue_size=max_queue_size,
        disconnect_timeout=disconnect_timeout,
        idle_timeout=idle_timeout,
        receive_buffer_size=receive_buffer_size,
        max_message_size=max_message_size,
        handshake_timeout=handshake_timeout,
        max_connections=max_connections,
        rate_limit=rate_limit,
        rate_burst=rate_burst,
        max_violations=max_violations,
        max_subscriptions=max_subscriptions,
        dead_timeout=dead_timeout,
        resume_timeout=resume_timeout,
    )
    heartbeat_timeout, disconnect_timeout, idle_timeout = (
        timeouts.heartbeat,
        timeouts.disconnect,
        timeouts.idle,
    )
    handshake_timeout, dead_timeout, resume_timeout = (
        timeouts.handshake,
        timeouts.dead,
        timeouts.resume,
    )
    max_queue_size, receive_buffer_size = limits.max_queue_size, limits.receive_buffer_size
    max_message_size, rate_limit, rate_burst = (
        limits.max_message_size,
        limits.rate_limit,
        limits.rate_burst,
    )
    max_violations, max_subscriptions = limits.max_violations, limits.max_subscriptions
    max_connections = limits.max_connections
    local_id = _check_local_id(local_id)
    verifier = None
    if secrets is not None:
        verifier = TokenVerifier(
            secret_lookup(secrets),
            local_id,
            lifetime=check_seconds("proof_lifetime", proof_lifetime),
        )
    if not isinstance(max_connections, int) or max_connections < 1:
        raise ValueError(f"max_connections must be a positive int, got {max_connections!r}")
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
            "rate_limit": rate_limit,
            "rate_burst": rate_burst,
            "max_violations": max_violations,
            "max_subscriptions": max_subscriptions,
            "dead_timeout": dead_timeout,
        },
        verifier=verifier,
        resume_timeout=0.0
        if resume_timeout == 0
        else check_seconds("resume_timeout", resume_timeout),
        max_connections=max_connections,
        handshake_timeout=check_seconds("handshake_timeout", handshake_timeout),
    )
    listener._client_certificates = (
        ssl_context is not None and ssl_context.verify_mode == ssl.CERT_REQUIRED
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
    # Shielded: stopping the listener first closes every connection with 1001
    # (which needs their readers alive), then cancels this scope.
    scope = trio.CancelScope(shield=True)
    try:
        async with trio.open_nursery() as nursery:
            try:
                nursery.start_soon(_serve_shielded, scope, listener)
                logger.info("federation listener %r on port %d", local_id, listener.port)
                if verifier is None and not listener._client_certificates:
                    logger.warning(
                        "federation listener %r on port %d authenticates no one: anyone who "
                        "can reach it may join under any id (development mode; give it "
                        "secrets= or a client-certificate ssl_context)",
                        local_id,
                        listener.port,
                    )
                task_status.started(listener)
                await trio.sleep_forever()
            finally:
                with trio.CancelScope(shield=True):
                    if listener.restarting:
                        await listener._close_all(CLOSE_RESTARTING, "restarting: resume")
                    else:
                        await listener._close_all(1001, "listener stopping")
                scope.cancel()
                for socket_listener in listener._sockets:
                    await trio.aclose_forcefully(socket_listener)
    except BaseExceptionGroup as group:
        raise_single(group)
    raise AssertionError("unreachable")  # pragma: no cover
