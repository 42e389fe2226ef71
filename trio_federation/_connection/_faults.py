"""A TCP proxy on loopback that breaks, stalls, delays and refuses links on demand.

The proxy forwards bytes and knows nothing of WebSocket or TLS, so it works
under any protocol. Each link (one accepted client and its connection to the
target) runs in its own nursery with one pair of tasks per direction: a reader
that moves bytes from the source socket into a bounded queue, and a writer that
moves them from the queue to the sink socket when the link is not stalled and
the chunk's delay has passed. Everything here is synchronous except
:meth:`FaultyProxy.run`, so a test can break a link at an exact point.
"""

from __future__ import annotations

import contextlib
import ipaddress
import math
import socket
import struct
from collections import deque
from typing import NoReturn, final

import attrs
import trio

__all__ = ["CHUNK_SIZE", "STALL_BUFFER", "FaultyProxy", "ProxyLink", "ProxyStatistics"]

STALL_BUFFER = 64 * 1024
"""Bytes a link holds per direction, at most: received, not yet delivered.

When a direction holds this much (it is stalled, delayed, or its receiver is
slow), the proxy stops reading from its source, so the kernel buffers fill and
the sender's writes block, as they would behind a black-holed peer.
"""

CHUNK_SIZE = 16 * 1024
"""Bytes read from a source socket at once, at most: the unit of :attr:`FaultyProxy.delay`."""

_LINGER_RESET = struct.pack("ii", 1, 0)


def _reset(stream: trio.SocketStream) -> None:
    """Close ``stream`` at once with a TCP RST (SO_LINGER 0), waking its waiters."""
    sock = stream.socket
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    sock.close()


def _loopback(host: str, role: str) -> str:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        address = None
    if address is None or not address.is_loopback:
        raise ValueError(
            f"FaultyProxy {role} must be a loopback IP address such as '127.0.0.1', got {host!r}"
        )
    return host


@attrs.frozen(kw_only=True)
class ProxyStatistics:
    """A snapshot of a :class:`FaultyProxy`, from :meth:`FaultyProxy.statistics`.

    *Upstream* is from the client (who dialed the proxy) to the target;
    *downstream* is back from the target to the client.
    """

    links: int
    """Live links now."""
    stalled_links: int
    """Live links that are stalled now."""
    connections: int
    """Links established since the proxy started (refused ones excluded)."""
    refused: int
    """Connections reset on arrival because :attr:`FaultyProxy.refusing` was true."""
    target_failures: int
    """Connections reset on arrival because the target could not be reached."""
    cuts: int
    """Links aborted by :meth:`FaultyProxy.cut` or :meth:`ProxyLink.cut`."""
    bytes_upstream: int
    """Bytes delivered to the target since the proxy started."""
    bytes_downstream: int
    """Bytes delivered to clients since the proxy started."""
    held_upstream: int
    """Bytes received from clients and not yet delivered, over the live links."""
    held_downstream: int
    """Bytes received from the target and not yet delivered, over the live links."""


class _Direction:
    """One direction of a link: the queue between its reader and its writer."""

    def __init__(self, source: trio.SocketStream, sink: trio.SocketStream) -> None:
        self.source = source
        self.sink = sink
        # (time received, bytes) in arrival order; their total is ``held``.
        self.chunks: deque[tuple[float, bytes]] = deque()
        self.held = 0
        self.eof = False
        self.done = False


@final
class ProxyLink:
    """One proxied connection: a client of the proxy and the proxy's connection to the target.

    Made by :class:`FaultyProxy`; get them from :meth:`FaultyProxy.live_links` or
    :meth:`FaultyProxy.stall_links`. A link ends when both directions have
    delivered their end of stream, when either side resets it, when it is cut,
    or when the proxy stops.
    """

    def __init__(
        self,
        proxy: FaultyProxy,
        number: int,
        client: trio.SocketStream,
        target: trio.SocketStream,
        *,
        stalled: bool,
    ) -> None:
        self._proxy = proxy
        self.number = number
        """Which link this is: 0 for the first one the proxy established, and so on."""
        self._client = client
        self._target = target
        self._up = _Direction(client, target)
        self._down = _Direction(target, client)
        self._stalled = stalled
        self._closed = False
        self._scope = trio.CancelScope()
        # Every change (bytes queued or delivered, stall, release, delay) wakes
        # every task of the link, which then re-checks its own condition.
        self._lot = trio.lowlevel.ParkingLot()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "stalled" if self._stalled else "flowing"
        return f"<ProxyLink #{self.number} {state}>"

    @property
    def stalled(self) -> bool:
        """Whether the link holds its bytes instead of forwarding them."""
        return self._stalled

    @property
    def closed(self) -> bool:
        """Whether the link has ended (cut, reset, closed, or the proxy stopped)."""
        return self._closed

    @property
    def held_upstream(self) -> int:
        """Bytes received from the client, not yet delivered to the target."""
        return self._up.held

    @property
    def held_downstream(self) -> int:
        """Bytes received from the target, not yet delivered to the client."""
        return self._down.held

    def stall(self) -> None:
        """Stop forwarding in both directions, without closing anything.

        See :meth:`FaultyProxy.stall` for what exactly is held. Does nothing on
        a closed link.
        """
        self._stalled = True
        self._lot.unpark_all()

    def release(self) -> None:
        """Resume forwarding: the held bytes are delivered first, in order."""
        self._stalled = False
        self._lot.unpark_all()

    def cut(self) -> None:
        """Abort the link with a TCP RST to both the client and the target.

        Held bytes are dropped. Does nothing on a closed link.
        """
        if not self._closed:
            self._proxy._cuts += 1
            self._abort()

    def _wake(self) -> None:
        self._lot.unpark_all()

    def _abort(self) -> None:
        """Reset both sockets and stop the link's tasks (synchronous)."""
        if self._closed:
            return
        self._closed = True
        self._proxy._forget(self)
        _reset(self._client)
        _reset(self._target)
        self._scope.cancel()

    async def _run(self) -> None:
        try:
            with self._scope:
                async with trio.open_nursery() as nursery:
                    for direction in (self._up, self._down):
                        nursery.start_soon(self._read, direction)
                        nursery.start_soon(self._write, direction)
        finally:
            self._closed = True
            self._proxy._forget(self)

    async def _read(self, direction: _Direction) -> None:
        while True:
            while direction.held >= STALL_BUFFER:
                await self._lot.park()
            try:
                data = await direction.source.receive_some(
                    min(CHUNK_SIZE, STALL_BUFFER - direction.held)
                )
            except trio.BrokenResourceError:
                # The source reset its connection: pass the reset on.
                self._abort()
                return
            except trio.ClosedResourceError:  # pragma: no cover - aborted meanwhile
                return
            if not data:
                direction.eof = True
                self._lot.unpark_all()
                return
            direction.chunks.append((trio.current_time(), data))
            direction.held += len(data)
            self._lot.unpark_all()

    async def _write(self, direction: _Direction) -> None:
        while True:
            while self._stalled or not (direction.chunks or direction.eof):
                await self._lot.park()
            if not direction.chunks:
                # Everything is delivered and the source ended: pass the FIN on.
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    await direction.sink.send_eof()
                direction.done = True
                if self._up.done and self._down.done:
                    self._scope.cancel()
                return
            received_at, chunk = direction.chunks[0]
            deadline = received_at + self._proxy.delay
            if trio.current_time() < deadline:
                # Woken early by a stall or a change of delay, then re-check.
                with trio.move_on_at(deadline):
                    await self._lot.park()
                continue
            try:
                await direction.sink.send_all(chunk)
            except trio.BrokenResourceError:
                # The sink reset its connection: pass the reset on.
                self._abort()
                return
            except trio.ClosedResourceError:  # pragma: no cover - aborted meanwhile
                return
            direction.chunks.popleft()
            direction.held -= len(chunk)
            if direction is self._up:
                self._proxy._bytes_upstream += len(chunk)
            else:
                self._proxy._bytes_downstream += len(chunk)
            self._lot.unpark_all()


@final
class FaultyProxy:
    """Forwards TCP connections from a loopback port to a target, and breaks them on demand.

    Start it in a nursery; :meth:`run` serves until cancelled::

        proxy = await nursery.start(FaultyProxy(listener.port).run)
        ...  # dial 127.0.0.1:proxy.port instead of the target
        proxy.cut()  # every live link dies with a TCP reset

    Each accepted connection becomes a :class:`ProxyLink` to
    ``target_host:target_port``. The proxy forwards bytes only, so it works as
    well under TLS or any other protocol. The faults are synchronous and take
    effect at once:

    * :meth:`cut` resets every live link (RST both ways: no FIN, no close
      handshake), as a dying network or a killed peer would.
    * :meth:`stall` freezes every link, new ones too, without closing
      anything, as a black-holed peer; :meth:`release` resumes them.
      :meth:`stall_links` freezes only the links alive now, so that a
      reconnection made afterwards flows while the old link stays frozen.
    * :attr:`delay` adds latency to every chunk.
    * :attr:`refusing` makes new connections look like a dead peer.

    Memory is bounded: a link holds at most :data:`STALL_BUFFER` bytes per
    direction; beyond that it stops reading, and the kernel's back-pressure
    reaches the sender.

    Args:
        target_port: The port to forward to.
        target_host: The address to forward to; loopback addresses only.
        host: The address to listen on; loopback addresses only.

    Raises:
        ValueError: If ``host`` or ``target_host`` is not a loopback IP address.
    """

    def __init__(
        self, target_port: int, *, target_host: str = "127.0.0.1", host: str = "127.0.0.1"
    ) -> None:
        self.target_port = target_port
        """The port connections are forwarded to."""
        self.target_host = _loopback(target_host, "target_host")
        """The address connections are forwarded to."""
        self.host = _loopback(host, "host")
        """The address the proxy listens on."""
        self.refusing = False
        """While true, new connections are accepted and reset at once (the peer
        looks down); live links are unaffected."""
        self._port: int | None = None
        self._delay = 0.0
        self._stall_new = False
        self._links: list[ProxyLink] = []
        self._connections = 0
        self._refused = 0
        self._target_failures = 0
        self._cuts = 0
        self._bytes_upstream = 0
        self._bytes_downstream = 0

    def __repr__(self) -> str:
        where = "not started" if self._port is None else f"{self.host}:{self._port}"
        return (
            f"<FaultyProxy {where} -> {self.target_host}:{self.target_port}, "
            f"{len(self._links)} link(s)>"
        )

    @property
    def port(self) -> int:
        """The port the proxy listens on.

        Raises:
            RuntimeError: If :meth:`run` has not started yet.
        """
        if self._port is None:
            raise RuntimeError("FaultyProxy has no port until run() has started")
        return self._port

    @property
    def delay(self) -> float:
        """Seconds each chunk waits in the proxy before it is forwarded (default 0).

        A chunk (at most :data:`CHUNK_SIZE` bytes, as one read from the socket
        returned it) is forwarded no earlier than ``delay`` seconds after the
        proxy received it, measured with the trio clock. It is latency, not a
        bandwidth limit: the chunks of a direction wait concurrently and keep
        their order. Settable at any time; a new value applies to the chunks
        already waiting too.

        Raises:
            ValueError: On setting a negative or non-finite value.
        """
        return self._delay

    @delay.setter
    def delay(self, seconds: float) -> None:
        if not (math.isfinite(seconds) and seconds >= 0):
            raise ValueError(f"delay must be a finite number of seconds >= 0, got {seconds!r}")
        self._delay = float(seconds)
        for link in self._links:
            link._wake()

    @property
    def links(self) -> int:
        """Live links now."""
        return len(self._links)

    @property
    def connections(self) -> int:
        """Links established since the proxy started (refused ones excluded)."""
        return self._connections

    def live_links(self) -> list[ProxyLink]:
        """Return the live links now, oldest first."""
        return list(self._links)

    def statistics(self) -> ProxyStatistics:
        """Return a snapshot of the proxy's links and counters."""
        return ProxyStatistics(
            links=len(self._links),
            stalled_links=sum(link.stalled for link in self._links),
            connections=self._connections,
            refused=self._refused,
            target_failures=self._target_failures,
            cuts=self._cuts,
            bytes_upstream=self._bytes_upstream,
            bytes_downstream=self._bytes_downstream,
            held_upstream=sum(link.held_upstream for link in self._links),
            held_downstream=sum(link.held_downstream for link in self._links),
        )

    def cut(self) -> None:
        """Abort every live link at once with a TCP RST to both ends.

        No FIN and no WebSocket close frame is sent: both the client and the
        target see their connection reset (a read raises
        :exc:`trio.BrokenResourceError`, or returns end of stream on some
        platforms once the reset has been read). Held bytes are dropped. New
        connections are still accepted. A connection that is still connecting
        to the target when this is called is not a link yet and survives.
        """
        for link in list(self._links):
            link.cut()

    def stall(self) -> None:
        """Freeze every live link, and every new one, in both directions, without closing.

        From this call on, no chunk is forwarded except one already being
        written (a write in progress completes); the end of stream is held too.
        Each direction keeps reading from its source until it holds
        :data:`STALL_BUFFER` bytes, then stops reading, so the sockets stay open
        and look alive while nothing arrives: a half-open, black-holed peer.
        New connections are still accepted and reach the target, but their
        links start stalled. :meth:`release` undoes this.
        """
        self._stall_new = True
        for link in self._links:
            link.stall()

    def stall_links(self) -> list[ProxyLink]:
        """Freeze only the links alive now, as :meth:`stall` does, and return them.

        Links established afterwards flow normally, so a reconnection goes
        through while the old link stays frozen; releasing the old link later
        (with :meth:`release` or :meth:`ProxyLink.release`) delivers its held
        bytes after whatever the new link carried meanwhile: a stale
        connection delivering late.
        """
        links = list(self._links)
        for link in links:
            link.stall()
        return links

    def release(self) -> None:
        """Resume every stalled link, and let new links flow.

        Each link delivers the bytes it held first, in the order received, then
        carries on; a held end of stream follows them.
        """
        self._stall_new = False
        for link in self._links:
            link.release()

    async def run(
        self, *, task_status: trio.TaskStatus[FaultyProxy] = trio.TASK_STATUS_IGNORED
    ) -> NoReturn:
        """Listen on :attr:`host` and forward connections until cancelled.

        ``task_status.started`` gets the proxy itself, once it is listening.
        Each accepted connection is connected to the target before any byte is
        forwarded; if the target cannot be reached, the connection is reset.

        On cancellation the listener and every link are closed (without a
        reset) before this returns; no socket is left open. A proxy runs once.

        Raises:
            RuntimeError: If the proxy has already been started.
            OSError: If the listening socket cannot be opened.
        """
        if self._port is not None:
            raise RuntimeError("FaultyProxy.run() was already started; make a new proxy")
        listeners = await trio.open_tcp_listeners(0, host=self.host)
        try:
            self._port = listeners[0].socket.getsockname()[1]
            async with trio.open_nursery() as nursery:
                await nursery.start(trio.serve_listeners, self._handle, listeners)
                task_status.started(self)
        finally:
            for listener in listeners:
                await trio.aclose_forcefully(listener)
        raise AssertionError("serve_listeners returned")  # pragma: no cover

    async def _handle(self, client: trio.SocketStream) -> None:
        # trio.serve_listeners closes ``client`` when this returns.
        if self.refusing:
            self._refused += 1
            _reset(client)
            return
        try:
            target = await trio.open_tcp_stream(self.target_host, self.target_port)
        except OSError:
            self._target_failures += 1
            _reset(client)
            return
        try:
            link = ProxyLink(self, self._connections, client, target, stalled=self._stall_new)
            self._connections += 1
            self._links.append(link)
            await link._run()
        finally:
            await trio.aclose_forcefully(target)

    def _forget(self, link: ProxyLink) -> None:
        with contextlib.suppress(ValueError):
            self._links.remove(link)
