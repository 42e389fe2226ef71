"""A TCP proxy on 127.0.0.1 whose links the tests can cut abruptly."""

from __future__ import annotations

import socket
import struct

import trio


class TcpProxy:
    """Forward connections from an ephemeral loopback port to ``target_port``.

    :meth:`cut` aborts every open link at once (TCP RST, no WebSocket close),
    as a dying network or a killed peer would.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self._links: list[tuple[trio.SocketStream, trio.SocketStream]] = []
        self.connections = 0

    async def run(
        self, *, task_status: trio.TaskStatus[TcpProxy] = trio.TASK_STATUS_IGNORED
    ) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, self._handle, listeners)
            task_status.started(self)

    async def _handle(self, client: trio.SocketStream) -> None:
        upstream = await trio.open_tcp_stream("127.0.0.1", self.target_port)
        self._links.append((client, upstream))
        self.connections += 1
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._pipe, client, upstream)
            nursery.start_soon(self._pipe, upstream, client)

    @staticmethod
    async def _pipe(source: trio.SocketStream, sink: trio.SocketStream) -> None:
        try:
            while data := await source.receive_some(65536):
                await sink.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await sink.aclose()

    def cut(self) -> None:
        """Abort every link with a TCP reset, in both directions."""
        for client, upstream in self._links:
            for stream in (client, upstream):
                stream.socket.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                )
                stream.socket.close()
        self._links.clear()
