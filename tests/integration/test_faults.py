"""FaultyProxy on real sockets: an echo server behind it, links cut, stalled, delayed, refused."""

from __future__ import annotations

import functools
import socket
import ssl
import struct

import pytest
import trio
import trustme

from trio_federation import (
    ConnectionLost,
    FederationListener,
    OrchestratorConnection,
    open_orchestrator_connection,
    serve_federation,
)
from trio_federation.testing import STALL_BUFFER, FaultyProxy, ProxyStatistics

from ..conftest import delegation, wait_for


class EchoServer:
    """Echoes every byte back and records what arrived, on which connection, when."""

    def __init__(self) -> None:
        self.port = 0
        self.accepted = 0
        self.arrivals: list[tuple[int, bytes, float]] = []
        self.endings: list[str] = []

    async def handle(self, stream: trio.abc.Stream) -> None:
        number = self.accepted
        self.accepted += 1
        try:
            while data := await stream.receive_some(65536):
                self.arrivals.append((number, bytes(data), trio.current_time()))
                await stream.send_all(data)
        except trio.BrokenResourceError:
            self.endings.append("reset")
        else:
            self.endings.append("eof")

    def received(self, number: int) -> bytes:
        return b"".join(data for n, data, _ in self.arrivals if n == number)

    def order(self) -> list[int]:
        """The connection of each arrival, consecutive duplicates merged."""
        order: list[int] = []
        for number, _, _ in self.arrivals:
            if not order or order[-1] != number:
                order.append(number)
        return order


@pytest.fixture
async def echo(nursery: trio.Nursery) -> EchoServer:
    server = EchoServer()
    listeners = await nursery.start(
        functools.partial(trio.serve_tcp, server.handle, 0, host="127.0.0.1")
    )
    server.port = listeners[0].socket.getsockname()[1]
    return server


@pytest.fixture
async def proxy(nursery: trio.Nursery, echo: EchoServer) -> FaultyProxy:
    started: FaultyProxy = await nursery.start(FaultyProxy(echo.port).run)
    return started


async def dial(proxy: FaultyProxy) -> trio.SocketStream:
    return await trio.open_tcp_stream("127.0.0.1", proxy.port)


async def receive_exactly(stream: trio.abc.ReceiveStream, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = await stream.receive_some(size - len(data))
        if not chunk:
            raise EOFError(f"end of stream after {len(data)} of {size} bytes")
        data += chunk
    return bytes(data)


async def ends(stream: trio.abc.ReceiveStream) -> bool:
    """Read until the stream ends, by end of stream or by a reset."""
    try:
        while await stream.receive_some():
            pass
    except trio.BrokenResourceError:
        pass
    return True


async def round_trip(stream: trio.SocketStream, data: bytes) -> None:
    await stream.send_all(data)
    with trio.fail_after(5):
        assert await receive_exactly(stream, len(data)) == data


async def test_forwards_both_ways_and_counts(proxy: FaultyProxy, echo: EchoServer) -> None:
    async with await dial(proxy) as client:
        await round_trip(client, b"hello")
        await round_trip(client, b"world!")
        assert proxy.links == 1
        assert proxy.live_links()[0].number == 0
    with trio.fail_after(5):
        await wait_for(lambda: proxy.links == 0)
    assert proxy.statistics() == ProxyStatistics(
        links=0,
        stalled_links=0,
        connections=1,
        refused=0,
        target_failures=0,
        cuts=0,
        bytes_upstream=11,
        bytes_downstream=11,
        held_upstream=0,
        held_downstream=0,
    )
    # The client's FIN went through: the server saw an end of stream, not a reset.
    assert echo.endings == ["eof"]


async def test_half_close_is_forwarded(proxy: FaultyProxy, echo: EchoServer) -> None:
    async with await dial(proxy) as client:
        await client.send_all(b"last words")
        await client.send_eof()
        with trio.fail_after(5):
            assert await receive_exactly(client, 10) == b"last words"
            assert await client.receive_some() == b""
            await wait_for(lambda: proxy.links == 0)
    assert echo.endings == ["eof"]


async def test_cut_resets_both_ends_and_new_connections_work(
    proxy: FaultyProxy, echo: EchoServer
) -> None:
    async with await dial(proxy) as client:
        await round_trip(client, b"before")
        proxy.cut()
        assert proxy.links == 0
        with trio.fail_after(5), pytest.raises(trio.BrokenResourceError):
            await client.receive_some()
        with trio.fail_after(5):
            await wait_for(lambda: bool(echo.endings))
        assert echo.endings == ["reset"]
    async with await dial(proxy) as again:
        await round_trip(again, b"after")
    stats = proxy.statistics()
    assert (stats.cuts, stats.connections) == (1, 2)


async def test_a_reset_is_passed_on(proxy: FaultyProxy, echo: EchoServer) -> None:
    client = await dial(proxy)
    await round_trip(client, b"hi")
    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    await client.aclose()
    with trio.fail_after(5):
        await wait_for(lambda: bool(echo.endings))
    assert echo.endings == ["reset"]
    assert (proxy.links, proxy.statistics().cuts) == (0, 0)


async def test_cut_one_link_leaves_the_others(proxy: FaultyProxy, echo: EchoServer) -> None:
    async with await dial(proxy) as first, await dial(proxy) as second:
        await round_trip(first, b"1")
        await round_trip(second, b"2")
        link = proxy.live_links()[0]
        assert repr(link) == "<ProxyLink #0 flowing>"
        link.cut()
        link.cut()  # a closed link stays closed and is counted once
        assert repr(link) == "<ProxyLink #0 closed>"
        assert proxy.statistics().cuts == 1
        with trio.fail_after(5), pytest.raises(trio.BrokenResourceError):
            await first.receive_some()
        await round_trip(second, b"still here")
        assert proxy.links == 1


async def test_stall_holds_bytes_without_closing_and_release_delivers_in_order(
    proxy: FaultyProxy, echo: EchoServer
) -> None:
    async with await dial(proxy) as client:
        await round_trip(client, b"flowing")
        proxy.stall()
        assert proxy.statistics().stalled_links == 1
        for part in (b"one ", b"two ", b"three"):
            await client.send_all(part)
        with trio.fail_after(5):
            await wait_for(lambda: proxy.statistics().held_upstream == 13)
        await trio.sleep(0.2)
        # Nothing reached the server, nothing came back, nothing was closed.
        assert echo.received(0) == b"flowing"
        assert echo.endings == []
        with trio.move_on_after(0.1) as waited:
            await client.receive_some()
        assert waited.cancelled_caught
        await client.send_all(b" four")  # the socket still takes bytes
        # A link made while the proxy is stalled starts stalled.
        async with await dial(proxy) as late:
            await late.send_all(b"late")
            with trio.fail_after(5):
                await wait_for(lambda: proxy.statistics().held_upstream == 22)
            assert proxy.statistics().stalled_links == 2
            assert echo.accepted == 2 and echo.received(1) == b""
            proxy.release()
            assert await receive_exactly(late, 4) == b"late"
        with trio.fail_after(5):
            assert await receive_exactly(client, 18) == b"one two three four"
        assert echo.received(0) == b"flowing" + b"one two three four"
        assert proxy.statistics().held_upstream == 0


async def test_stall_holds_a_bounded_amount(proxy: FaultyProxy) -> None:
    payload = bytes(range(256)) * (8 * 1024 * 1024 // 256)
    sent = 0
    echoed = bytearray()
    async with await dial(proxy) as client, trio.open_nursery() as nursery:
        client.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
        await round_trip(client, b"x")
        proxy.stall()

        async def send() -> None:
            nonlocal sent
            for start in range(0, len(payload), 65536):
                await client.send_all(payload[start : start + 65536])
                sent = start + 65536

        async def receive() -> None:
            while len(echoed) < len(payload):
                echoed.extend(await client.receive_some(1024 * 1024))

        nursery.start_soon(send)
        nursery.start_soon(receive)
        with trio.fail_after(10):
            await wait_for(lambda: proxy.statistics().held_upstream == STALL_BUFFER)
            # The proxy stopped reading: the sender is blocked by back-pressure.
            while True:
                before = sent
                await trio.sleep(0.2)
                if sent == before:
                    break
        assert sent < len(payload)
        assert proxy.statistics().held_upstream == STALL_BUFFER
        assert echoed == b""
        proxy.release()
        with trio.fail_after(20):
            await wait_for(lambda: len(echoed) == len(payload))
    assert echoed == payload


async def test_stalled_old_link_delivers_after_the_reconnection(
    proxy: FaultyProxy, echo: EchoServer
) -> None:
    async with await dial(proxy) as old:
        await round_trip(old, b"old-1 ")
        stalled = proxy.stall_links()
        assert [link.number for link in stalled] == [0]
        assert stalled[0].stalled
        await old.send_all(b"old-2")
        with trio.fail_after(5):
            await wait_for(lambda: stalled[0].held_upstream == 5)
        # The reconnection flows while the old link stays stalled.
        async with await dial(proxy) as new:
            await round_trip(new, b"new-1")
            assert proxy.statistics().stalled_links == 1
            assert not stalled[0].closed
            proxy.release()
            with trio.fail_after(5):
                assert await receive_exactly(old, 5) == b"old-2"
    # The stale link delivered late: after the new link's bytes.
    assert echo.order() == [0, 1, 0]
    assert echo.received(0) == b"old-1 old-2"


async def test_a_single_link_can_be_released(proxy: FaultyProxy) -> None:
    async with await dial(proxy) as first, await dial(proxy) as second:
        await round_trip(first, b"a")
        await round_trip(second, b"b")
        one, two = proxy.stall_links()
        await first.send_all(b"A")
        await second.send_all(b"B")
        one.release()
        with trio.fail_after(5):
            assert await receive_exactly(first, 1) == b"A"
            await wait_for(lambda: two.held_upstream == 1)
        assert two.stalled and not one.stalled
        two.release()
        with trio.fail_after(5):
            assert await receive_exactly(second, 1) == b"B"


async def test_delay_holds_every_chunk_at_least_that_long(
    proxy: FaultyProxy, echo: EchoServer
) -> None:
    async with await dial(proxy) as client:
        await round_trip(client, b"warm")
        proxy.delay = 0.3
        sent_at = trio.current_time()
        await client.send_all(b"slow")
        with trio.fail_after(5):
            assert await receive_exactly(client, 4) == b"slow"
        received_at = trio.current_time()
        arrived_at = echo.arrivals[-1][2]
        assert arrived_at - sent_at >= 0.3  # upstream: delayed once
        assert received_at - sent_at >= 0.6  # and downstream again
        # A new delay applies to the chunks already waiting too.
        proxy.delay = 60
        await client.send_all(b"stuck")
        with trio.fail_after(5):
            await wait_for(lambda: proxy.statistics().held_upstream == 5)
        proxy.delay = 0
        with trio.fail_after(5):
            assert await receive_exactly(client, 5) == b"stuck"


async def test_delay_must_be_finite_and_not_negative(proxy: FaultyProxy) -> None:
    for wrong in (-1, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="delay must be"):
            proxy.delay = wrong
    assert proxy.delay == 0


async def test_refusing_resets_new_connections_only(proxy: FaultyProxy, echo: EchoServer) -> None:
    async with await dial(proxy) as existing:
        await round_trip(existing, b"up")
        proxy.refusing = True
        async with await dial(proxy) as refused:  # the connect itself succeeds
            with trio.fail_after(5), pytest.raises(trio.BrokenResourceError):
                await refused.receive_some()
        await round_trip(existing, b"unaffected")
        proxy.refusing = False
        async with await dial(proxy) as accepted:
            await round_trip(accepted, b"welcome back")
    stats = proxy.statistics()
    assert (stats.refused, stats.connections, echo.accepted) == (1, 2, 2)


async def test_an_unreachable_target_resets_the_client(nursery: trio.Nursery) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    proxy: FaultyProxy = await nursery.start(FaultyProxy(closed_port).run)
    async with await dial(proxy) as client:
        with trio.fail_after(5), pytest.raises(trio.BrokenResourceError):
            await client.receive_some()
    assert proxy.statistics().target_failures == 1
    assert proxy.connections == 0


async def test_cancellation_closes_everything(nursery: trio.Nursery, echo: EchoServer) -> None:
    proxy_scope = trio.CancelScope()
    proxy_done = trio.Event()

    async def run_proxy(task_status: trio.TaskStatus[FaultyProxy]) -> None:
        try:
            with proxy_scope:
                await FaultyProxy(echo.port).run(task_status=task_status)
        finally:
            proxy_done.set()

    proxy: FaultyProxy = await nursery.start(run_proxy)
    port = proxy.port
    async with await dial(proxy) as flowing, await dial(proxy) as stalled:
        await round_trip(flowing, b"a")
        await round_trip(stalled, b"b")
        proxy.live_links()[1].stall()
        await stalled.send_all(b"held")
        with trio.fail_after(5):
            await wait_for(lambda: proxy.statistics().held_upstream == 4)
        proxy_scope.cancel()
        with trio.fail_after(2):
            await proxy_done.wait()
            # The proxy closed its sockets: both clients see their link end.
            assert await ends(flowing)
            assert await ends(stalled)
    assert proxy.links == 0
    with pytest.raises(OSError, match="connect"):
        await trio.open_tcp_stream("127.0.0.1", port)
    with trio.fail_after(5):
        await wait_for(lambda: len(echo.endings) == 2)


def test_loopback_only_and_no_port_before_run() -> None:
    with pytest.raises(ValueError, match="loopback"):
        FaultyProxy(80, host="0.0.0.0")
    with pytest.raises(ValueError, match="loopback"):
        FaultyProxy(80, target_host="example.org")
    proxy = FaultyProxy(80, host="::1")
    with pytest.raises(RuntimeError, match="no port"):
        _ = proxy.port
    assert "not started" in repr(proxy)


async def test_runs_once(proxy: FaultyProxy) -> None:
    with pytest.raises(RuntimeError, match="already started"):
        await proxy.run()


async def test_forwards_tls(nursery: trio.Nursery) -> None:
    authority = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    authority.issue_cert("127.0.0.1").configure_cert(server_context)
    client_context = ssl.create_default_context()
    authority.configure_trust(client_context)
    echo = EchoServer()
    listeners = await nursery.start(
        functools.partial(trio.serve_ssl_over_tcp, echo.handle, 0, server_context, host="127.0.0.1")
    )
    proxy: FaultyProxy = await nursery.start(
        FaultyProxy(listeners[0].transport_listener.socket.getsockname()[1]).run
    )
    client = await trio.open_ssl_over_tcp_stream(
        "127.0.0.1", proxy.port, ssl_context=client_context
    )
    async with client:
        await client.send_all(b"secret")
        with trio.fail_after(5):
            assert await receive_exactly(client, 6) == b"secret"
        proxy.cut()
        with trio.fail_after(5), pytest.raises(trio.BrokenResourceError):
            await client.receive_some()


async def start_listener(nursery: trio.Nursery, handler: object) -> FederationListener:
    listener: FederationListener = await nursery.start(
        lambda task_status: serve_federation(
            handler,  # type: ignore[arg-type]
            "127.0.0.1",
            0,
            local_id="orch-b",
            capabilities=["testing"],
            task_status=task_status,
        )
    )
    return listener


async def test_a_cut_link_raises_connection_lost_and_the_dialer_reconnects(
    nursery: trio.Nursery,
) -> None:
    served: list[OrchestratorConnection] = []

    async def hold(conn: OrchestratorConnection) -> None:
        served.append(conn)
        async for _ in conn:
            pass

    listener = await start_listener(nursery, hold)
    proxy: FaultyProxy = await nursery.start(FaultyProxy(listener.port).run)
    url = f"ws://127.0.0.1:{proxy.port}/"
    async with open_orchestrator_connection(url, local_id="orch-a", capabilities=[]) as conn:
        await conn.send_message(delegation("before-cut"))
        with trio.fail_after(5):
            await wait_for(lambda: bool(served) and served[0].get_status().messages_received > 0)
        proxy.cut()
        with trio.fail_after(5), pytest.raises(ConnectionLost) as info:
            async for _ in conn:
                pass
        assert info.value.code == 1006
    async with open_orchestrator_connection(url, local_id="orch-a", capabilities=[]) as again:
        await again.send_message(delegation("after-cut"))
        with trio.fail_after(5):
            await wait_for(lambda: len(served) == 2 and served[1].get_status().messages_received)
    assert proxy.statistics().cuts == 1


async def test_a_stalled_peer_is_detected_by_the_heartbeat(nursery: trio.Nursery) -> None:
    async def hold(conn: OrchestratorConnection) -> None:
        async for _ in conn:
            pass

    listener = await start_listener(nursery, hold)
    proxy: FaultyProxy = await nursery.start(FaultyProxy(listener.port).run)
    async with open_orchestrator_connection(
        f"ws://127.0.0.1:{proxy.port}/",
        local_id="orch-a",
        capabilities=[],
        heartbeat_timeout=0.4,
    ) as conn:
        assert conn.is_healthy()
        proxy.stall()
        with trio.fail_after(5):
            await wait_for(lambda: conn.status == "degraded")
        assert not conn.is_healthy()
        proxy.release()
        with trio.fail_after(5):
            await wait_for(conn.is_healthy)
