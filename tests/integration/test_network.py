"""Real sockets on 127.0.0.1: dialer, listener, handshake, refusals, cut links."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import trio
import trio_websocket

from trio_federation import (
    AuthenticationError,
    ConnectionLost,
    ConnectionStatus,
    DelegationRequest,
    FederationListener,
    FederationMessage,
    HandshakeError,
    OrchestratorConnection,
    open_orchestrator_connection,
    serve_federation,
)
from trio_federation.testing import FaultyProxy

from ..conftest import delegation, progress, wait_for

Handler = Callable[[OrchestratorConnection], Awaitable[object]]


async def start_listener(
    nursery: trio.Nursery, handler: Handler, local_id: str = "orch-b", **options: Any
) -> FederationListener:
    listener: FederationListener = await nursery.start(
        lambda task_status: serve_federation(
            handler,
            "127.0.0.1",
            0,
            local_id=local_id,
            capabilities=["code-generation", "testing"],
            task_status=task_status,
            **options,
        )
    )
    return listener


async def echo_acceptances(conn: OrchestratorConnection) -> None:
    """A listener handler: accept every delegation and report completion."""
    async for msg in conn:
        if isinstance(msg.payload, DelegationRequest):
            await conn.accept_delegation(msg.payload)
            await conn.send_message(
                progress(msg.payload.task.id, 100, sender="orch-b", recipient=conn.id)
            )


@pytest.fixture
async def listener(nursery: trio.Nursery) -> FederationListener:
    return await start_listener(nursery, echo_acceptances)


async def test_dial_handshake_delegate_and_close(listener: FederationListener) -> None:
    url = f"ws://127.0.0.1:{listener.port}/federation"
    async with open_orchestrator_connection(
        url, local_id="orch-a", capabilities=["research"]
    ) as conn:
        assert conn.id == "orch-b"
        assert conn.capabilities == ("code-generation", "testing")
        assert conn.check_capability(["testing"])
        assert conn.status == ConnectionStatus.CONNECTED
        assert conn.is_healthy()
        await wait_for(lambda: "orch-a" in listener.connections)
        remote_view = listener.connections["orch-a"]
        assert remote_view.capabilities == ("research",)
        assert remote_view.local_id == "orch-b"
        await conn.send_message(delegation("net-1", recipient=conn.id))
        accepted = await conn.receive()
        assert accepted.payload.accepted  # type: ignore[union-attr]
        assert accepted.sender == "orch-b"
        done = await conn.receive()
        assert done.payload.progress == 100  # type: ignore[union-attr]
    assert conn.status == "disconnected"
    await wait_for(lambda: not listener.connections)


async def test_plain_client_identifies_with_the_query(listener: FederationListener) -> None:
    url = f"ws://127.0.0.1:{listener.port}/federation?id=plain&capabilities=testing,research"
    async with trio_websocket.open_websocket_url(url) as ws:
        headers = dict(ws.handshake_headers)
        assert headers[b"x-federation-id"] == b"orch-b"
        assert headers[b"x-federation-capabilities"] == b"code-generation,testing"
        assert headers[b"x-federation-protocol"] == b"1"
        await wait_for(lambda: "plain" in listener.connections)
        assert listener.connections["plain"].capabilities == ("testing", "research")


@pytest.mark.parametrize(
    ("query", "status", "reason"),
    [
        ("", 400, "missing orchestrator id"),
        ("?id=", 400, "empty orchestrator id"),
        ("?id=" + "x" * 300, 400, "longer than 256"),
    ],
)
async def test_listener_refuses_unidentified_dialers(
    listener: FederationListener, query: str, status: int, reason: str
) -> None:
    # A hand-written upgrade request: the plainest client there is.
    async with await trio.open_tcp_stream("127.0.0.1", listener.port) as stream:
        await stream.send_all(
            f"GET /federation{query} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        response = b""
        while chunk := await stream.receive_some():
            response += chunk
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(f"HTTP/1.1 {status} ".encode())
    assert reason in body.decode()
    assert not listener.connections


async def test_duplicate_id_is_refused_with_409(listener: FederationListener) -> None:
    url = f"ws://127.0.0.1:{listener.port}/"
    async with open_orchestrator_connection(url, local_id="twin", capabilities=[]):
        with pytest.raises(HandshakeError) as info:
            async with open_orchestrator_connection(url, local_id="twin", capabilities=[]):
                pass  # pragma: no cover
        assert info.value.status_code == 409
        assert "'twin' is already connected" in str(info.value)
        assert set(listener.connections) == {"twin"}


async def test_dial_errors_are_handshake_errors() -> None:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    await listeners[0].aclose()  # nothing listens there now
    with pytest.raises(HandshakeError, match="cannot connect to"):
        async with open_orchestrator_connection(
            f"ws://127.0.0.1:{port}/", local_id="orch-a", capabilities=[]
        ):
            pass  # pragma: no cover
    with pytest.raises(ValueError, match="ws:"):
        async with open_orchestrator_connection(
            "http://127.0.0.1/", local_id="orch-a", capabilities=[]
        ):
            pass  # pragma: no cover
    with pytest.raises(ValueError, match="unknown capability 'flying'"):
        async with open_orchestrator_connection(
            f"ws://127.0.0.1:{port}/", local_id="orch-a", capabilities=["flying"]
        ):
            pass  # pragma: no cover
    with pytest.raises(ValueError, match="local_id"):
        async with open_orchestrator_connection(
            f"ws://127.0.0.1:{port}/", local_id=" ", capabilities=[]
        ):
            pass  # pragma: no cover


async def test_dial_times_out_against_a_silent_server(nursery: trio.Nursery) -> None:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]

    async def never_answer(stream: trio.SocketStream) -> None:
        async with stream:
            await trio.sleep_forever()

    nursery.start_soon(trio.serve_listeners, never_answer, listeners)
    with pytest.raises(HandshakeError, match=r"no answer .* within 0\.2s"):
        async with open_orchestrator_connection(
            f"ws://127.0.0.1:{port}/", local_id="orch-a", capabilities=[], connect_timeout=0.2
        ):
            pass  # pragma: no cover


async def test_handler_exception_closes_1011_and_listener_goes_on(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    async def failing(conn: OrchestratorConnection) -> None:
        msg = await conn.receive()
        if msg.correlation_id == "boom":
            raise RuntimeError("handler failed")
        await echo_acceptances(conn)

    listener = await start_listener(nursery, failing)
    url = f"ws://127.0.0.1:{listener.port}/"
    async with open_orchestrator_connection(url, local_id="orch-a", capabilities=[]) as conn:
        await conn.send_message(delegation("boom"))
        with pytest.raises(ConnectionLost) as info:
            await conn.receive()
        assert info.value.code == 1011
    assert any("handler for 'orch-a' raised" in r.message for r in caplog.records)
    async with open_orchestrator_connection(url, local_id="orch-a", capabilities=[]) as conn:
        await conn.send_message(delegation("fine"))
        await conn.send_message(delegation("again"))
        assert (await conn.receive()).payload.accepted  # type: ignore[union-attr]


async def test_handler_return_closes_normally(nursery: trio.Nursery) -> None:
    async def one_reply(conn: OrchestratorConnection) -> None:
        await conn.send_message(progress("t", 1, recipient=conn.id))

    listener = await start_listener(nursery, one_reply)
    async with open_orchestrator_connection(
        f"ws://127.0.0.1:{listener.port}/", local_id="orch-a", capabilities=[]
    ) as conn:
        assert [m.correlation_id async for m in conn] == ["t"]  # then ends normally
        with pytest.raises(ConnectionLost) as info:
            await conn.send_message(delegation("late"))
        assert info.value.code == 1000


async def test_stopping_the_listener_closes_connections_with_1001() -> None:
    async with trio.open_nursery() as outer:
        async with trio.open_nursery() as serving:
            listener = await start_listener(serving, echo_acceptances)
            conn_ready = trio.Event()
            codes: list[int] = []

            async def client() -> None:
                async with open_orchestrator_connection(
                    f"ws://127.0.0.1:{listener.port}/", local_id="orch-a", capabilities=[]
                ) as conn:
                    conn_ready.set()
                    await wait_for(lambda: conn.status == "disconnected")
                    with pytest.raises(trio.EndOfChannel):
                        await conn.receive()
                    with pytest.raises(ConnectionLost) as info:
                        await conn.send_message(delegation("late"))
                    codes.append(info.value.code)

            outer.start_soon(client)
            await conn_ready.wait()
            await wait_for(lambda: "orch-a" in listener.connections)
            with trio.fail_after(5):
                serving.cancel_scope.cancel()
    assert codes == [1001]


async def test_cut_link_raises_connection_lost_on_both_sides(nursery: trio.Nursery) -> None:
    served: list[OrchestratorConnection] = []
    outcome: list[BaseException] = []
    handler_done = trio.Event()

    async def hold(conn: OrchestratorConnection) -> None:
        served.append(conn)
        try:
            async for _ in conn:
                pass
        except ConnectionLost as exc:
            outcome.append(exc)
            raise
        finally:
            handler_done.set()

    listener = await start_listener(nursery, hold)
    proxy: FaultyProxy = await nursery.start(FaultyProxy(listener.port).run)
    async with open_orchestrator_connection(
        f"ws://127.0.0.1:{proxy.port}/", local_id="orch-a", capabilities=[], resumable=False
    ) as conn:
        await conn.send_message(delegation("before-cut"))
        await wait_for(lambda: bool(served) and served[0].get_status().messages_received > 0)
        proxy.cut()
        with pytest.raises(ConnectionLost) as info:
            await conn.receive()
        assert info.value.code == 1006
        assert conn.status == "disconnected"
        assert not conn.is_healthy()
        with pytest.raises(ConnectionLost):
            await conn.send_message(delegation("after-cut"))
    # Leaving the block after the link died raised nothing: the loss was seen above.
    with trio.fail_after(5):
        await handler_done.wait()
    assert isinstance(outcome[0], ConnectionLost) and outcome[0].code == 1006


async def test_cancelled_dialer_closes_with_going_away(
    listener: FederationListener, nursery: trio.Nursery
) -> None:
    with trio.move_on_after(0.2):
        async with open_orchestrator_connection(
            f"ws://127.0.0.1:{listener.port}/", local_id="orch-a", capabilities=[]
        ):
            await trio.sleep_forever()
    with trio.fail_after(2):
        await wait_for(lambda: not listener.connections)


async def test_exceptions_leave_the_dialer_plain(listener: FederationListener) -> None:
    with pytest.raises(ZeroDivisionError):
        async with open_orchestrator_connection(
            f"ws://127.0.0.1:{listener.port}/", local_id="orch-a", capabilities=[]
        ):
            1 / 0  # noqa: B018


async def test_remote_id_against_a_silent_listener(nursery: trio.Nursery) -> None:
    async def plain_server(request: trio_websocket.WebSocketRequest) -> None:
        ws = await request.accept()  # no identification headers, like the daemon
        message = await ws.get_message()
        await ws.send_message(message)

    server = await nursery.start(trio_websocket.serve_websocket, plain_server, "127.0.0.1", 0, None)
    url = f"ws://127.0.0.1:{server.port}/"
    async with open_orchestrator_connection(
        url,
        local_id="orch-a",
        capabilities=[],
        remote_id="daemon",
        remote_capabilities=["research"],
    ) as conn:
        assert conn.id == "daemon"
        assert conn.capabilities == ("research",)
        await conn.send_message(delegation("echo", sender="daemon", recipient="orch-a"))
        echoed = await conn.receive()
        assert isinstance(echoed, FederationMessage) and echoed.correlation_id == "echo"


async def test_lost_peer_inside_a_handler_nursery_is_not_a_crash(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="trio_federation")
    done = trio.Event()

    async def grouped(conn: OrchestratorConnection) -> None:
        try:
            async with trio.open_nursery() as inner:
                inner.start_soon(trio.sleep_forever)
                async for _ in conn:
                    pass
        finally:
            done.set()

    listener = await start_listener(nursery, grouped)
    proxy: FaultyProxy = await nursery.start(FaultyProxy(listener.port).run)
    async with open_orchestrator_connection(
        f"ws://127.0.0.1:{proxy.port}/", local_id="orch-a", capabilities=[], resumable=False
    ):
        await wait_for(lambda: "orch-a" in listener.connections)
        proxy.cut()
    with trio.fail_after(5):
        await done.wait()
    await wait_for(lambda: not listener.connections)
    assert "handler for 'orch-a' ended: connection closed with code 1006" in caplog.text
    assert "raised" not in caplog.text


async def test_keyboard_interrupt_closes_with_going_away(listener: FederationListener) -> None:
    with pytest.raises(KeyboardInterrupt):
        async with open_orchestrator_connection(
            f"ws://127.0.0.1:{listener.port}/", local_id="orch-a", capabilities=[]
        ) as conn:
            raise KeyboardInterrupt
    assert conn.status == "disconnected"
    await wait_for(lambda: not listener.connections)


@pytest.mark.parametrize("delay", [0, 0.0001, 0.001])
async def test_listener_cancelled_while_starting_stops(delay: float) -> None:
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:

            async def cancel_soon() -> None:
                await trio.sleep(delay)
                nursery.cancel_scope.cancel()

            nursery.start_soon(cancel_soon)
            await start_listener(nursery, echo_acceptances)
            await trio.sleep_forever()


async def test_dialer_entered_cancelled_returns_at_once() -> None:
    with trio.fail_after(5):
        with trio.CancelScope() as scope:
            scope.cancel()
            async with open_orchestrator_connection(
                "ws://127.0.0.1:9/x", local_id="orch-a", capabilities=[]
            ):
                pytest.fail("entered under a cancelled scope")  # pragma: no cover


async def test_tls_dial_and_listen(nursery: trio.Nursery) -> None:
    import ssl

    import trustme

    authority = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    authority.issue_cert("127.0.0.1").configure_cert(server_context)
    client_context = ssl.create_default_context()
    authority.configure_trust(client_context)

    listener = await start_listener(nursery, echo_acceptances, ssl_context=server_context)
    url = f"wss://127.0.0.1:{listener.port}/federation"
    async with open_orchestrator_connection(
        url, local_id="orch-a", capabilities=[], ssl_context=client_context
    ) as conn:
        assert conn.id == "orch-b"
        await conn.send_message(delegation("tls-1", recipient=conn.id))
        assert (await conn.receive()).payload.accepted  # type: ignore[union-attr]
    with pytest.raises(AuthenticationError, match="TLS refused a certificate"):
        async with open_orchestrator_connection(url, local_id="orch-c", capabilities=[]):
            pass  # pragma: no cover  # the default context does not trust our CA
    await wait_for(lambda: listener.statistics().refused.get("tls") == 1)
    with pytest.raises(ValueError, match="ssl_context is only for wss"):
        async with open_orchestrator_connection(
            f"ws://127.0.0.1:{listener.port}/",
            local_id="x",
            capabilities=[],
            ssl_context=client_context,
        ):
            pass  # pragma: no cover


async def test_a_listener_answering_with_a_bad_identity_is_a_handshake_error(
    nursery: trio.Nursery,
) -> None:
    async def bad_identity(request: trio_websocket.WebSocketRequest) -> None:
        await request.accept(extra_headers=[(b"X-Federation-Id", b"x" * 300)])
        await trio.sleep_forever()

    server = await nursery.start(trio_websocket.serve_websocket, bad_identity, "127.0.0.1", 0, None)
    with pytest.raises(HandshakeError, match=r"answered with a bad identity: .* longer than 256"):
        async with open_orchestrator_connection(
            f"ws://127.0.0.1:{server.port}/", local_id="orch-a", capabilities=[]
        ):
            pass  # pragma: no cover


async def test_a_dialer_that_never_upgrades_is_dropped(nursery: trio.Nursery) -> None:
    listener = await start_listener(nursery, echo_acceptances, handshake_timeout=0.2)
    async with await trio.open_tcp_stream("127.0.0.1", listener.port) as stream:
        with trio.fail_after(5):
            assert await stream.receive_some() == b""  # closed by the listener
    assert not listener.connections


async def test_local_id_must_be_a_string() -> None:
    with pytest.raises(TypeError, match="local_id must be a string"):
        async with open_orchestrator_connection(
            "ws://127.0.0.1:9/",
            local_id=5,  # type: ignore[arg-type]
            capabilities=[],
        ):
            pass  # pragma: no cover


def _descendants(task: trio.lowlevel.Task) -> list[trio.lowlevel.Task]:
    found = []
    for nursery in task.child_nurseries:
        for child in nursery.child_tasks:
            found += [child, *_descendants(child)]
    return found


async def test_an_idle_connection_is_three_tasks_that_ping_and_measure_latency(
    nursery: trio.Nursery,
) -> None:
    """The runner (the reader), the writer and the watchdog: no pinger task.

    The ping leaves with the heartbeat message in one write, and the reader
    hands the pong back, so the latency is measured on both ends.
    """
    accepted: list[OrchestratorConnection] = []
    beats: list[FederationMessage] = []

    async def handler(conn: OrchestratorConnection) -> None:
        accepted.append(conn)
        with conn.subscribe("heartbeat") as heartbeats:
            async for beat in heartbeats:
                beats.append(beat)

    listener = await start_listener(nursery, handler, heartbeat_timeout=0.2)
    with trio.fail_after(10):
        async with open_orchestrator_connection(
            f"ws://127.0.0.1:{listener.port}/federation",
            local_id="orch-a",
            capabilities=[],
            heartbeat_timeout=0.2,
        ) as conn:
            await wait_for(lambda: bool(accepted) and len(beats) >= 2)
            await wait_for(lambda: conn.get_status().latency is not None)
            await wait_for(lambda: accepted[0].get_status().latency is not None)
            assert conn.latency == conn.get_status().latency
            assert accepted[0].latency == accepted[0].get_status().latency
            assert conn.is_healthy() and accepted[0].is_healthy()
            root = trio.lowlevel.current_root_task()
            assert root is not None
            for end in (conn, accepted[0]):
                tasks = [
                    task
                    for task in _descendants(root)
                    if task.coro.cr_frame is not None
                    and task.coro.cr_frame.f_locals.get("self") is end
                ]
                names = sorted(task.name.rsplit(".", 1)[-1] for task in tasks)
                assert names == ["_guarded", "_guarded", "_run"], names
