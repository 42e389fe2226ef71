"""DirectSocketStream: trio.SocketStream's semantics over direct system calls (real sockets)."""

from __future__ import annotations

import os
import socket
import struct

import pytest
import trio
import trio.testing

from trio_federation._wire._sockio import DirectSocketStream, direct


async def _pair() -> tuple[DirectSocketStream, trio.SocketStream]:
    left, right = trio.socket.socketpair()
    return DirectSocketStream(trio.SocketStream(left)), trio.SocketStream(right)


async def test_bytes_flow_both_ways_and_eof_reads_empty() -> None:
    ours, theirs = await _pair()
    await ours.send_all(b"hello")
    assert await theirs.receive_some(100) == b"hello"
    await theirs.send_all(b"back")
    assert await ours.receive_some() == b"back"
    await theirs.send_eof()
    assert await ours.receive_some(10) == b""
    await ours.send_eof()
    assert await theirs.receive_some(10) == b""
    await ours.aclose()
    await theirs.aclose()


async def test_a_read_waits_for_data_and_is_cancellable() -> None:
    ours, theirs = await _pair()
    with trio.move_on_after(0.05) as scope:
        await ours.receive_some(10)
    assert scope.cancelled_caught
    async with trio.open_nursery() as nursery:
        got: list[bytes] = []

        async def read() -> None:
            got.append(await ours.receive_some(10))

        nursery.start_soon(read)
        await trio.testing.wait_all_tasks_blocked()
        await theirs.send_all(b"late")
    assert got == [b"late"]
    await ours.aclose()
    await theirs.aclose()


async def test_a_write_larger_than_the_buffers_waits_for_the_reader() -> None:
    ours, theirs = await _pair()
    ours.stream.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    payload = bytes(range(256)) * 4096  # 1 MiB: far beyond the kernel buffers
    received = bytearray()

    async def read() -> None:
        while len(received) < len(payload):
            received.extend(await theirs.receive_some(65536))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read)
        await ours.send_all(payload)
        await ours.wait_send_all_might_not_block()
    assert bytes(received) == payload
    await ours.aclose()
    await theirs.aclose()


async def test_a_reset_connection_is_broken() -> None:
    ours, theirs = await _pair()
    # SO_LINGER 0: the close sends a reset instead of a FIN.
    theirs.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    await ours.send_all(b"unread")  # unread data makes the close a reset too
    await theirs.aclose()
    with pytest.raises(trio.BrokenResourceError):
        for _ in range(100):  # the first writes may still be accepted
            await ours.send_all(b"x" * 65536)
    with pytest.raises(trio.BrokenResourceError):
        await ours.receive_some(10)
    await ours.aclose()


async def test_a_closed_stream_raises_closed_resource_error() -> None:
    ours, theirs = await _pair()
    await ours.aclose()
    with pytest.raises(trio.ClosedResourceError):
        await ours.receive_some(10)
    with pytest.raises(trio.ClosedResourceError):
        await ours.send_all(b"x")
    with pytest.raises(ValueError, match="max_bytes"):
        await ours.receive_some(0)
    await theirs.aclose()


async def test_closing_wakes_a_waiting_reader_with_closed_resource_error() -> None:
    ours, theirs = await _pair()
    failures: list[BaseException] = []

    async def read() -> None:
        try:
            await ours.receive_some(10)
        except trio.ClosedResourceError as exc:
            failures.append(exc)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read)
        await trio.testing.wait_all_tasks_blocked()
        await ours.aclose()
    assert len(failures) == 1
    await theirs.aclose()


async def test_only_plain_socket_streams_are_wrapped() -> None:
    left, right = trio.socket.socketpair()
    plain = trio.SocketStream(left)
    assert isinstance(direct(plain), DirectSocketStream)
    memory, _ = trio.testing.memory_stream_pair()
    assert direct(memory) is memory
    await plain.aclose()
    right.close()


async def test_failures_are_checkpoints_and_say_closed_or_broken() -> None:
    ours, theirs = await _pair()
    await ours.send_eof()
    with trio.testing.assert_checkpoints(), pytest.raises(trio.ClosedResourceError, match="EOF"):
        await ours.send_all(b"after eof")
    await ours.aclose()
    with trio.testing.assert_checkpoints(), pytest.raises(trio.ClosedResourceError):
        await ours.receive_some(10)
    with trio.testing.assert_checkpoints(), pytest.raises(trio.ClosedResourceError):
        await ours.send_all(b"")  # even with nothing to send
    await theirs.aclose()

    ours, theirs = await _pair()
    theirs.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    await ours.send_all(b"unread")
    await theirs.aclose()  # a reset
    with trio.testing.assert_checkpoints(), pytest.raises(trio.BrokenResourceError):
        await ours.receive_some(10)
    await ours.aclose()


async def test_a_descriptor_closed_underneath_is_a_closed_stream() -> None:
    ours, theirs = await _pair()
    os.close(ours.stream.socket.fileno())  # as if closed behind trio's back
    try:
        with pytest.raises(trio.ClosedResourceError):
            await ours.receive_some(10)
    finally:
        ours.stream.socket.detach()  # it is closed already
        await theirs.aclose()


async def test_a_socket_without_a_descriptor_is_left_as_it_is(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    left, right = trio.socket.socketpair()
    plain = trio.SocketStream(left)

    def no_descriptor() -> int:
        raise NotImplementedError("a custom socket factory's socket")

    monkeypatch.setattr(left, "fileno", no_descriptor)
    assert direct(plain) is plain
    monkeypatch.undo()
    await plain.aclose()
    right.close()


class _Steps(trio.abc.Instrument):
    """Counts the steps the current task ends (each scheduler pass it makes ends one)."""

    def __init__(self) -> None:
        self.task = trio.lowlevel.current_task()
        self.steps = 0

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        if task is self.task:
            self.steps += 1


async def test_a_write_without_scheduling_yields_not_but_stays_cancellable() -> None:
    ours, theirs = await _pair()
    steps = _Steps()
    trio.lowlevel.add_instrument(steps)
    try:
        await ours.send_all(b"quiet", schedule=False)
        assert steps.steps == 0  # no scheduler pass
        await ours.send_all(b"loud")
        assert steps.steps == 1  # the default yields once, as trio's sockets
    finally:
        trio.lowlevel.remove_instrument(steps)
    assert await theirs.receive_some(100) == b"quietloud"
    with trio.CancelScope() as scope:
        scope.cancel()
        with pytest.raises(trio.Cancelled):
            await ours.send_all(b"never", schedule=False)
    await ours.aclose()
    await theirs.aclose()
