"""A plain TCP stream for the owned transport: the socket's system calls, called directly.

``trio.SocketStream`` wraps every ``send`` and ``recv`` in several layers
(a conflict detector, error translation, ``_nonblocking_helper`` and its
context managers) that together cost about as much as the system call itself
on loopback: a 500-byte ``send_all`` plus ``receive_some`` takes 12 µs through
them and 7 µs without. :class:`DirectSocketStream` keeps the same semantics —
both calls are checkpoints (yielding once: after a wait, as trio's sockets,
no second time), a read that finds nothing waits for readability, a
write that finds the buffer full waits for writability, a failed socket
raises :exc:`trio.BrokenResourceError` and a closed one
:exc:`trio.ClosedResourceError` — with ``os.read``/``os.write`` on the
socket's descriptor. Closing, half-closing and the socket itself stay the
wrapped ``SocketStream``'s.

It is used under :class:`~trio_federation._wire.WireConnection`, which reads
from one task and writes under a lock, so it detects no concurrent use of its
own. TLS streams keep ``trio.SSLStream`` over a ``trio.SocketStream``, and
on Windows (where a socket is no file descriptor) ``trio.SocketStream`` is used
as it is.
"""

from __future__ import annotations

import errno
import os
from typing import Final

import trio

__all__ = ["DEFAULT_RECEIVE_BYTES", "DirectSocketStream", "direct"]

DEFAULT_RECEIVE_BYTES: Final = 64 * 1024
"""Bytes a :meth:`DirectSocketStream.receive_some` without a size asks for."""
_CLOSED_ERRNOS: Final = frozenset({errno.EBADF, errno.ENOTSOCK})
"""Errors that mean the socket was closed (trio's ``_closed_stream_errnos``)."""


class DirectSocketStream(trio.abc.HalfCloseableStream):
    """A ``trio.SocketStream`` read and written with direct system calls.

    Attributes:
        stream: the wrapped stream, which owns the socket.
    """

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self._socket = stream.socket
        self._drained = False  # the last read returned less than it asked for

    def _fd(self) -> int:
        fd = self._socket.fileno()
        if fd == -1:
            raise trio.ClosedResourceError("the stream was closed")
        return fd

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        """Up to ``max_bytes`` (64 KiB if None); ``b""`` at end of stream.

        Raises:
            trio.BrokenResourceError: the connection failed.
            trio.ClosedResourceError: the stream was closed.
        """
        if max_bytes is None:
            max_bytes = DEFAULT_RECEIVE_BYTES
        if max_bytes < 1:
            raise ValueError("max_bytes must be >= 1")
        waited = False
        try:
            if self._drained:
                # The last read emptied the socket: most likely it still is, so
                # wait before reading instead of failing a read first.
                await trio.lowlevel.wait_readable(self._fd())
                waited = True
            else:
                await trio.lowlevel.checkpoint_if_cancelled()
            while True:
                fd = self._fd()
                try:
                    data = os.read(fd, max_bytes)
                    break
                except BlockingIOError:
                    pass  # waited for below, not here: an idle connection would keep
                    # the exception, its traceback and this frame alive meanwhile
                except OSError as exc:
                    raise _stream_error(exc) from exc
                await trio.lowlevel.wait_readable(fd)
                waited = True
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            if not waited:  # a failure is a checkpoint too
                await trio.lowlevel.cancel_shielded_checkpoint()
            raise
        self._drained = len(data) < max_bytes
        if not waited:  # a checkpoint yields once: the wait did already
            await trio.lowlevel.cancel_shielded_checkpoint()
        return data

    async def send_all(
        self, data: bytes | bytearray | memoryview, *, schedule: bool = True
    ) -> None:
        """Write all of ``data``, waiting while the socket's buffer is full.

        ``schedule=False`` leaves out the scheduler pass after a write that did
        not wait (it stays a cancellation point): for a caller that is about to
        yield anyway, such as a writer task that parks once its queue is empty.

        Raises:
            trio.BrokenResourceError: the connection failed (part of ``data``
                may have been sent).
            trio.ClosedResourceError: the stream was closed, or its sending
                side shut down (:meth:`send_eof`).
        """
        waited = False
        try:
            await trio.lowlevel.checkpoint_if_cancelled()
            if self._socket.did_shutdown_SHUT_WR:
                raise trio.ClosedResourceError("can't send data after sending EOF")
            fd = self._fd()
            with memoryview(data) as view:
                sent = 0
                while sent < len(view):
                    try:
                        sent += os.write(fd, view[sent:])
                    except BlockingIOError:
                        await trio.lowlevel.wait_writable(fd)
                        waited = True
                        fd = self._fd()  # closed meanwhile?
                    except OSError as exc:
                        raise _stream_error(exc) from exc
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            if not waited:
                await trio.lowlevel.cancel_shielded_checkpoint()
            raise
        if not waited and schedule:
            await trio.lowlevel.cancel_shielded_checkpoint()

    async def wait_send_all_might_not_block(self) -> None:
        """As ``trio.SocketStream``."""
        await self.stream.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        """Shut down the sending side (as ``trio.SocketStream``)."""
        await self.stream.send_eof()

    async def aclose(self) -> None:
        """Close the socket (as ``trio.SocketStream``)."""
        await self.stream.aclose()


def _stream_error(exc: OSError) -> trio.BrokenResourceError | trio.ClosedResourceError:
    """The stream error for a failed system call, as ``trio.SocketStream`` maps it."""
    if exc.errno in _CLOSED_ERRNOS:
        return trio.ClosedResourceError("the stream was closed")
    return trio.BrokenResourceError(f"socket connection broken: {exc}")


def direct(stream: trio.abc.Stream) -> trio.abc.Stream:
    """``stream`` with direct system calls if it is a plain ``trio.SocketStream``.

    Only on POSIX systems, where a socket is a file descriptor that ``os.read``
    and ``os.write`` take (not on Windows).
    """
    if type(stream) is not trio.SocketStream or os.name != "posix":
        return stream
    try:
        fd = stream.socket.fileno()
    except Exception:  # a custom socket factory's socket, without a descriptor
        return stream
    return DirectSocketStream(stream) if fd >= 0 else stream
