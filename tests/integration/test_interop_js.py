"""Interop with a JavaScript v1 peer (tests/interop/peer.mjs, npm ``ws``).

The peer speaks the TypeScript daemon's wire format and, as a server, sends no
identification headers, like the daemon. Each test runs under an absolute time
bound, and the node process is always terminated and reaped (``open_js_peer``).
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import attrs
import pytest
import trio

from trio_federation import (
    AssignedResources,
    BroadcastPayload,
    ConnectionHealth,
    ConnectionLost,
    ConnectionStatus,
    DelegationRequest,
    DelegationResponse,
    FederationListener,
    FederationMessage,
    HeartbeatPayload,
    MemoryEntry,
    OrchestratorConnection,
    SharedContext,
    Task,
    TaskCallback,
    TaskHistoryEntry,
    decode_message,
    encode_message,
    open_orchestrator_connection,
    serve_federation,
)

from ..conftest import under_ci
from ._jspeer import JSPeer, js_peer_problems, open_js_peer

TIME_LIMIT = 20.0
"""Absolute bound on every test, in seconds."""
ISO_MS_Z = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z")
"""What JavaScript's ``Date.prototype.toISOString`` writes."""
JS_SERVER = ("--mode", "server", "--port", "0", "--id", "js-peer")
"""Arguments of a JS server peer (it sends no identification headers)."""


@pytest.fixture
def js_node() -> str:
    """Path of ``node`` when the JS peer can run; else skip (or fail under CI)."""
    node, problems = js_peer_problems()
    if problems or node is None:
        reason = "JavaScript interop peer unavailable: " + "; ".join(problems)
        if under_ci():
            pytest.fail(f"{reason} (required: the CI environment variable is set)", pytrace=False)
        pytest.skip(reason)
    return node


def delegation(sender: str, recipient: str, task_id: str) -> FederationMessage:
    """A plain delegation of one code task, correlated by its id."""
    request = DelegationRequest(
        from_orchestrator_id=sender,
        to_orchestrator_id=recipient,
        task=Task(id=task_id, type="code", description="interop task from py", priority="high"),
        priority="high",
    )
    return FederationMessage(
        type="delegation",
        payload=request,
        sender=sender,
        recipient=recipient,
        correlation_id=task_id,
    )


def payload_is(key: str, value: object) -> Callable[[dict[str, Any]], bool]:
    """Match a message the JS peer received by one payload key."""
    return lambda message: bool(message["payload"].get(key) == value)


def assert_recent_utc(moment: datetime) -> None:
    assert moment.tzinfo is UTC
    assert abs(datetime.now(UTC) - moment) < timedelta(seconds=TIME_LIMIT)


async def start_server(peer: JSPeer) -> str:
    """Wait for a server-mode peer to listen: its federation URL."""
    listening = await peer.expect("listening")
    return f"ws://127.0.0.1:{listening['port']}/federation"


# -- our listener, the JS client ----------------------------------------------------


async def test_listener_exchanges_delegations_with_js_client(js_node: str) -> None:
    with trio.fail_after(TIME_LIMIT):
        received: list[FederationMessage] = []
        seen: dict[str, Any] = {}
        failures: list[BaseException] = []
        handler_done = trio.Event()
        listener: FederationListener | None = None

        async def handler(conn: OrchestratorConnection) -> None:
            try:
                assert listener is not None
                seen["id"] = conn.id
                seen["capabilities"] = conn.capabilities
                seen["has_capabilities"] = conn.check_capability(["testing", "research"])
                seen["registered"] = listener.connections.get(conn.id) is conn
                first = await conn.receive()
                received.append(first)
                assert isinstance(first.payload, DelegationRequest), first
                seen["response"] = await conn.accept_delegation(first.payload)
                await conn.send_message(delegation("py-listener", conn.id, "py-task-1"))
                async for message in conn:  # ends when the JS peer closes (1000)
                    received.append(message)
                seen["status"] = conn.status
            except BaseException as exc:
                failures.append(exc)
                raise
            finally:
                handler_done.set()

        async with trio.open_nursery() as nursery:
            listener = await nursery.start(
                functools.partial(
                    serve_federation,
                    handler,
                    "127.0.0.1",
                    0,
                    local_id="py-listener",
                    capabilities=["code-generation", "testing"],
                )
            )
            url = f"ws://127.0.0.1:{listener.port}/federation"
            async with open_js_peer(
                js_node,
                *("--mode", "client", "--url", url, "--id", "js-peer"),
                *("--capabilities", "testing,research", "--to", "py-listener"),
                "--expect-delegation",
            ) as peer:
                opened = await peer.expect("open")
                acceptance = await peer.received("callback", payload_is("taskId", "js-task-1"))
                ours = await peer.received("delegation")
                closed = await peer.expect("closed")
                exit_code = await peer.wait_exit()
                transcript = peer.transcript()
            await handler_done.wait()
            nursery.cancel_scope.cancel()

    assert not failures, failures
    assert exit_code == 0, transcript
    assert closed["code"] == 1000, transcript

    # Identification: the query string on our side, our headers on theirs.
    assert seen["id"] == "js-peer"
    assert seen["capabilities"] == ("testing", "research")
    assert seen["has_capabilities"] is True
    assert seen["registered"] is True
    headers = opened["headers"]
    assert headers["x-federation-id"] == "py-listener"
    assert headers["x-federation-capabilities"] == "code-generation,testing"
    # ws offers permessage-deflate; we decline it (no extension in the answer).
    assert "sec-websocket-extensions" not in headers

    # Their delegation reached us typed, and our acceptance reached them.
    delegated = received[0]
    assert delegated.type == "delegation"
    assert delegated.sender == "js-peer"
    assert delegated.recipient == "py-listener"
    assert delegated.correlation_id == "js-task-1"
    assert_recent_utc(delegated.timestamp)
    assert isinstance(delegated.payload, DelegationRequest)
    assert delegated.payload.from_orchestrator_id == "js-peer"
    assert delegated.payload.task.id == "js-task-1"
    assert delegated.payload.task.type == "code"
    assert delegated.payload.priority == "high"
    assert_recent_utc(delegated.payload.task.created_at)
    assert seen["response"] == DelegationResponse(task_id="js-task-1", accepted=True)
    assert acceptance["payload"] == {"taskId": "js-task-1", "accepted": True}
    assert acceptance["correlationId"] == "js-task-1"
    assert acceptance["from"] == "py-listener"
    assert acceptance["to"] == "js-peer"
    assert ISO_MS_Z.fullmatch(acceptance["timestamp"])

    # Our delegation reached them, and their answers came back typed.
    assert ours["from"] == "py-listener"
    assert ours["to"] == "js-peer"
    assert ours["correlationId"] == "py-task-1"
    assert ours["payload"]["task"]["id"] == "py-task-1"
    assert [m.type for m in received[1:]] == ["callback", "callback"]
    accepted, completed = received[1], received[2]
    assert accepted.payload == DelegationResponse(task_id="py-task-1", accepted=True)
    assert accepted.correlation_id == "py-task-1"
    assert accepted.sender == "js-peer"
    assert accepted.recipient == "py-listener"
    assert isinstance(completed.payload, TaskCallback)
    assert completed.payload.task_id == "py-task-1"
    assert completed.payload.status == "completed"
    assert completed.payload.result == {"by": "js-peer"}
    assert seen["status"] == ConnectionStatus.DISCONNECTED


@pytest.mark.parametrize("secret", ["a secret shared with js-peer", "a secret we do not hold!"])
async def test_js_client_authenticates_from_the_protocol_page(js_node: str, secret: str) -> None:
    """A peer written from docs/protocol.rst alone proves its id, and checks ours."""
    with trio.fail_after(TIME_LIMIT):
        accepted: list[DelegationResponse] = []

        async def handler(conn: OrchestratorConnection) -> None:
            async for message in conn:
                if isinstance(message.payload, DelegationRequest):
                    accepted.append(await conn.accept_delegation(message.payload))

        async with trio.open_nursery() as nursery:
            listener: FederationListener = await nursery.start(
                functools.partial(
                    serve_federation,
                    handler,
                    "127.0.0.1",
                    0,
                    local_id="py-listener",
                    capabilities=["testing"],
                    secrets={"js-peer": "a secret shared with js-peer"},
                )
            )
            url = f"ws://127.0.0.1:{listener.port}/federation"
            async with open_js_peer(
                js_node,
                *("--mode", "client", "--url", url, "--id", "js-peer", "--to", "py-listener"),
                *("--secret", secret),
            ) as peer:
                if secret.startswith("a secret shared"):
                    proof = await peer.expect("listener-proof")
                    await peer.expect("closed")
                    assert proof["ok"] is True, peer.transcript()
                    assert await peer.wait_exit() == 0, peer.transcript()
                else:
                    error = await peer.expect("error")
                    assert "403" in error["error"], peer.transcript()
            nursery.cancel_scope.cancel()
    if secret.startswith("a secret shared"):
        assert accepted == [DelegationResponse(task_id="js-task-1", accepted=True)]
    else:
        assert accepted == []
        assert listener.statistics().refused == {"auth": 1}


# -- our dialer, the JS server ---------------------------------------------------------


async def test_dialer_delegates_to_js_server_with_remote_id(js_node: str) -> None:
    with trio.fail_after(TIME_LIMIT):
        async with open_js_peer(js_node, *JS_SERVER) as peer:
            url = await start_server(peer)
            async with open_orchestrator_connection(
                url,
                local_id="py-dialer",
                capabilities=["code-generation", "testing"],
                remote_id="js-peer",
                remote_capabilities=["testing", "research"],
            ) as conn:
                assert conn.id == "js-peer"
                assert conn.capabilities == ("testing", "research")
                assert conn.check_capability(["research"])
                assert conn.socket is not None and conn.socket.handshake_headers is not None
                response_headers = {k.lower() for k, _ in conn.socket.handshake_headers}
                await conn.send_message(delegation("py-dialer", "js-peer", "py-task-1"))
                accepted = await conn.receive()
                completed = await conn.receive()
                assert conn.id == "js-peer"
                # The peer accepts as the daemon does: 'from' is our own id.
                assert conn.self_addressed == 1
            connection = await peer.expect("connection")
            delegated = await peer.received("delegation")
            closed = await peer.expect("closed")
            assert await peer.terminate() == 0, peer.transcript()

    # The JS server sent no identification headers, and no extension.
    assert b"x-federation-id" not in response_headers
    assert b"sec-websocket-extensions" not in response_headers
    # It saw who we are from our request headers; we offered no extension.
    assert connection["id"] == "py-dialer"
    assert connection["headers"]["x-federation-id"] == "py-dialer"
    assert connection["headers"]["x-federation-capabilities"] == "code-generation,testing"
    assert "sec-websocket-extensions" not in connection["headers"]
    assert connection["url"] == "/federation"

    assert delegated["payload"]["task"]["id"] == "py-task-1"
    assert delegated["correlationId"] == "py-task-1"

    assert accepted.type == "callback"
    assert accepted.payload == DelegationResponse(task_id="py-task-1", accepted=True)
    assert accepted.sender == "js-peer"
    assert accepted.recipient == "py-dialer"
    assert accepted.correlation_id == "py-task-1"
    assert_recent_utc(accepted.timestamp)
    assert completed.type == "callback"
    assert completed.payload == TaskCallback(
        task_id="py-task-1", status="completed", result={"by": "js-peer"}
    )
    assert completed.correlation_id == "py-task-1"

    # Leaving the block closed gracefully.
    assert closed["code"] == 1000


class UpgradeHoldingProxy:
    """A TCP proxy that holds the server's bytes after its upgrade response.

    The JS server sends its delegation right after the upgrade, so without this
    the dialer may have read it before the test looks at ``conn.id``. Bytes from
    the client pass freely; the server's pass up to the end of the HTTP response,
    then wait for :meth:`release`.
    """

    def __init__(self, target_port: int) -> None:
        self._target_port = target_port
        self._released = trio.Event()

    def release(self) -> None:
        self._released.set()

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port: int = listeners[0].socket.getsockname()[1]
        task_status.started(port)
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, client: trio.SocketStream) -> None:
        async with client:
            server = await trio.open_tcp_stream("127.0.0.1", self._target_port)
            async with server, trio.open_nursery() as nursery:
                nursery.start_soon(self._forward, client, server, False, nursery.cancel_scope)
                nursery.start_soon(self._forward, server, client, True, nursery.cancel_scope)

    async def _forward(
        self,
        source: trio.SocketStream,
        sink: trio.SocketStream,
        hold: bool,
        scope: trio.CancelScope,
    ) -> None:
        try:
            if hold:
                head = b""
                while b"\r\n\r\n" not in head:
                    chunk = await source.receive_some()
                    if not chunk:
                        return
                    head += chunk
                end = head.index(b"\r\n\r\n") + 4
                await sink.send_all(head[:end])
                await self._released.wait()
                if head[end:]:
                    await sink.send_all(head[end:])
            while chunk := await source.receive_some():
                await sink.send_all(chunk)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            scope.cancel()  # one direction ended: close both


async def test_dialer_learns_js_server_id_from_first_message(js_node: str) -> None:
    with trio.fail_after(TIME_LIMIT):
        async with open_js_peer(js_node, *JS_SERVER, "--delegate-on-connect") as peer:
            listening = await peer.expect("listening")
            proxy = UpgradeHoldingProxy(listening["port"])
            async with trio.open_nursery() as nursery:
                proxy_port: int = await nursery.start(proxy.run)
                async with open_orchestrator_connection(
                    f"ws://127.0.0.1:{proxy_port}/federation",
                    local_id="py-dialer",
                    capabilities=["code-generation"],
                ) as conn:
                    # The server has sent its delegation; the proxy holds it back.
                    await peer.expect("connection")
                    assert conn.get_status().messages_received == 0
                    assert conn.id == ""
                    assert conn.capabilities == ()
                    proxy.release()
                    message = await conn.receive()
                    assert conn.id == "js-peer"
                    assert isinstance(message.payload, DelegationRequest)
                    response = await conn.accept_delegation(message.payload)
                    acceptance = await peer.received("callback", payload_is("taskId", "js-task-1"))
                closed = await peer.expect("closed")
                nursery.cancel_scope.cancel()
            assert await peer.terminate() == 0, peer.transcript()

    assert message.type == "delegation"
    assert message.sender == "js-peer"
    assert message.recipient == "py-dialer"
    assert message.correlation_id == "js-task-1"
    assert message.payload.task.id == "js-task-1"
    assert message.payload.to_orchestrator_id == "py-dialer"
    assert response == DelegationResponse(task_id="js-task-1", accepted=True)
    assert acceptance["payload"] == {"taskId": "js-task-1", "accepted": True}
    assert acceptance["from"] == "py-dialer"
    assert acceptance["to"] == "js-peer"
    assert acceptance["correlationId"] == "js-task-1"
    assert closed["code"] == 1000


async def test_dialer_sees_js_server_going_away_as_normal_end(js_node: str) -> None:
    with trio.fail_after(TIME_LIMIT):
        async with open_js_peer(js_node, *JS_SERVER) as peer:
            url = await start_server(peer)
            async with open_orchestrator_connection(
                url, local_id="py-dialer", capabilities=[], remote_id="js-peer"
            ) as conn:
                await peer.expect("connection")
                assert await peer.terminate() == 0, peer.transcript()
                async for message in conn:  # 1001 is a normal end: no ConnectionLost
                    raise AssertionError(f"unexpected message {message!r}")
                assert conn.status == ConnectionStatus.DISCONNECTED
                with pytest.raises(ConnectionLost) as lost:
                    await conn.send_message(delegation("py-dialer", "js-peer", "late"))
    assert lost.value.code == 1001
    assert lost.value.reason == "Server shutting down"


async def test_liveness_pings_and_heartbeats_with_js_server(js_node: str) -> None:
    with trio.fail_after(TIME_LIMIT):
        async with open_js_peer(js_node, *JS_SERVER, "--ping-interval", "100") as peer:
            url = await start_server(peer)
            async with open_orchestrator_connection(
                url, local_id="py-dialer", capabilities=["testing"], heartbeat_timeout=1.0
            ) as conn:
                await peer.expect("pong")  # we answered the JS server's ping
                heartbeat = await peer.received("heartbeat")  # our load report
                await trio.sleep(1.6)  # past heartbeat_timeout: our pings keep it alive
                health = conn.get_status()
                healthy = conn.is_healthy()
            await peer.expect("closed")

    assert healthy, health
    assert health.status != ConnectionStatus.DEGRADED
    assert health.latency is not None
    assert 0 <= health.latency < 1.0
    assert_recent_utc(health.last_heartbeat)
    assert heartbeat["from"] == "py-dialer"
    assert "correlationId" not in heartbeat
    assert heartbeat["payload"]["orchestratorId"] == "py-dialer"
    assert heartbeat["payload"]["status"] == "healthy"
    assert heartbeat["payload"]["activeConnections"] == 1
    assert ISO_MS_Z.fullmatch(heartbeat["payload"]["timestamp"])


# -- byte compatibility ----------------------------------------------------------------

_AT = datetime(2026, 11, 26, 12, 0, 0, 250000, tzinfo=UTC)
_TEXT = 'unicode é ✓ 🚀, quotes "q", backslash \\, control \x01, separator \u2028'


def sample_messages() -> list[FederationMessage]:
    """One message of each type, with every optional field the codec converts."""
    task = Task(
        id="py-task-2",
        type="analysis",
        description=_TEXT,
        priority="critical",
        status="in_progress",
        created_at=_AT,
        updated_at=_AT + timedelta(seconds=1.5),
        assigned_to="js-peer",
        metadata={"nested": {"list": [1, 2.5, "x", None, True]}, "text": _TEXT},
    )
    context = SharedContext(
        scratchpad={"key": "value"},
        episodic=(MemoryEntry(id="m-1", content="remembered", timestamp=_AT, type="episodic"),),
        task_history=(
            TaskHistoryEntry(
                task_id="t-0", orchestrator_id="py-dialer", timestamp=_AT, outcome="completed"
            ),
        ),
    )
    request = DelegationRequest(
        from_orchestrator_id="py-dialer",
        to_orchestrator_id="js-peer",
        task=task,
        priority="critical",
        required_capabilities=("testing", "research"),
        context=context,
        timeout=30.25,
        callback_id="cb-1",
    )
    offset = timezone(timedelta(hours=2))
    return [
        FederationMessage(
            type="delegation",
            payload=request,
            sender="py-dialer",
            recipient="js-peer",
            # Microseconds and an offset: written as UTC milliseconds with Z.
            timestamp=datetime(2026, 11, 26, 14, 0, 0, 123456, tzinfo=offset),
            correlation_id="py-task-2",
        ),
        FederationMessage(
            type="broadcast",
            payload=BroadcastPayload(topic="news", data={"text": _TEXT, "n": [0.5, -3]}, ttl=1.5),
            sender="py-dialer",
            recipient="*",
            timestamp=_AT,
        ),
        FederationMessage(
            type="callback",
            payload=TaskCallback(
                task_id="py-task-2",
                status="progress",
                progress=0.75,
                result=None,
                metadata={"step": 3},
            ),
            sender="py-dialer",
            recipient="js-peer",
            timestamp=_AT,
            correlation_id="py-task-2",
        ),
        FederationMessage(
            type="callback",
            payload=DelegationResponse(
                task_id="js-task-9",
                accepted=False,
                reason="busy",
                estimated_completion=_AT,
                assigned_resources=AssignedResources(sessions=2, tokens=4096),
            ),
            sender="py-dialer",
            recipient="js-peer",
            timestamp=_AT,
            correlation_id="js-task-9",
        ),
        FederationMessage(
            type="heartbeat",
            payload=HeartbeatPayload(
                orchestrator_id="py-dialer",
                timestamp=_AT,
                status="overloaded",
                active_connections=3,
            ),
            sender="py-dialer",
            recipient="js-peer",
            timestamp=_AT,
        ),
        FederationMessage(
            type="status",
            payload=ConnectionHealth(
                status="active",
                uptime=12.5,
                last_heartbeat=_AT,
                messages_sent=4,
                messages_received=5,
                errors=1,
                latency=0.0125,
            ),
            sender="py-dialer",
            recipient="js-peer",
            timestamp=_AT,
        ),
    ]


def js_payload_text(raw_line: str) -> str:
    """The JS peer's own ``JSON.stringify`` of the payload it printed in ``raw_line``.

    That is exactly what the daemon would put in the envelope for this payload.
    """
    message_at = raw_line.index('"message":')
    start = raw_line.index('"payload":', message_at) + len('"payload":')
    _, end = json.JSONDecoder().raw_decode(raw_line, start)
    return raw_line[start:end]


def daemon_frame(js_message: dict[str, Any], payload_text: str) -> str:
    """What the daemon's serializer writes for this message: ``JSON.stringify({type,
    payload: JSON.stringify(payload), from, to, timestamp, correlationId})``.

    The envelope holds only strings, whose escaping ``json.dumps`` without
    ``ensure_ascii`` shares with ``JSON.stringify``.
    """
    envelope = {
        "type": js_message["type"],
        "payload": payload_text,
        "from": js_message["from"],
        "to": js_message["to"],
        "timestamp": js_message["timestamp"],
    }
    if "correlationId" in js_message:
        envelope["correlationId"] = js_message["correlationId"]
    return json.dumps(envelope, separators=(",", ":"), ensure_ascii=False)


async def test_frames_we_encode_are_what_js_decodes(js_node: str) -> None:
    messages = sample_messages()
    frames = [encode_message(message) for message in messages]
    with trio.fail_after(TIME_LIMIT):
        async with open_js_peer(js_node, *JS_SERVER) as peer:
            url = await start_server(peer)
            async with open_orchestrator_connection(
                url, local_id="py-dialer", capabilities=[], remote_id="js-peer"
            ) as conn:
                for message in messages:
                    await conn.send_message(message)
                seen: list[tuple[dict[str, Any], str]] = []
                for message in messages:
                    line = await peer.received(message.type.value)
                    seen.append((line, peer.last_raw))
            await peer.expect("closed")
            assert not [e for e in peer.events if e["event"] == "malformed"], peer.transcript()

    for message, frame, (js_message, raw_line) in zip(messages, frames, seen, strict=True):
        envelope = json.loads(frame)
        expected = {**envelope, "payload": json.loads(envelope["payload"])}
        # What JS decoded is what we sent.
        assert js_message == expected
        # Byte for byte what the daemon writes for what JS decoded, payload and
        # envelope (keys in the daemon's order).
        assert envelope["payload"] == js_payload_text(raw_line)
        assert frame == daemon_frame(js_message, js_payload_text(raw_line))
        assert ISO_MS_Z.fullmatch(js_message["timestamp"])
        if message.correlation_id is None:
            assert "correlationId" not in js_message
        else:
            assert js_message["correlationId"] == message.correlation_id
        # JS's view of the frame, with the payload as an object, decodes the same.
        assert decode_message(json.dumps(js_message)) == decode_message(frame)

    delegated, broadcast, progress, refusal, heartbeat, status = (m for m, _ in seen)
    assert delegated["timestamp"] == "2026-11-26T12:00:00.123Z"
    assert delegated["payload"]["timeout"] == 30250
    assert delegated["payload"]["requiredCapabilities"] == ["testing", "research"]
    assert delegated["payload"]["callbackId"] == "cb-1"
    task = delegated["payload"]["task"]
    assert task["createdAt"] == "2026-11-26T12:00:00.250Z"
    assert task["updatedAt"] == "2026-11-26T12:00:01.750Z"
    assert task["assignedTo"] == "js-peer"
    assert task["description"] == _TEXT
    assert delegated["payload"]["context"]["taskHistory"][0]["orchestratorId"] == "py-dialer"
    assert broadcast["payload"] == {
        "topic": "news",
        "data": {"text": _TEXT, "n": [0.5, -3]},
        "ttl": 1500,
    }
    assert progress["payload"] == {
        "taskId": "py-task-2",
        "status": "progress",
        "progress": 0.75,
        "metadata": {"step": 3},
    }
    assert refusal["payload"]["estimatedCompletion"] == "2026-11-26T12:00:00.250Z"
    assert refusal["payload"]["assignedResources"] == {"sessions": 2, "tokens": 4096}
    assert heartbeat["payload"]["activeConnections"] == 3
    assert status["payload"]["uptime"] == 12500
    assert status["payload"]["latency"] == 12.5
    assert status["payload"]["lastHeartbeat"] == "2026-11-26T12:00:00.250Z"


async def test_messages_of_every_frame_size_both_ways_with_js(js_node: str) -> None:
    # Our frames (7-, 16- and 64-bit lengths, both ways of masking) read by ws,
    # and ws's frames read by us: whole, and in fragments cut inside UTF-8
    # characters with a ping between them.
    sizes = (10, 1_000, 3_000, 70_000, 300_000)
    sent = [
        FederationMessage(
            type="broadcast",
            payload=BroadcastPayload(topic=f"size-{size}", data={"text": ("é€😀x" * size)[:size]}),
            sender="py-dialer",
            recipient="js-peer",
        )
        for size in sizes
    ]
    with trio.fail_after(TIME_LIMIT):
        async with open_js_peer(js_node, *JS_SERVER, "--echo") as peer:
            url = await start_server(peer)
            async with open_orchestrator_connection(
                url, local_id="py-dialer", capabilities=[], remote_id="js-peer"
            ) as conn:
                for message in sent:
                    await conn.send_message(message)
                echoes = [await conn.receive() for _ in range(2 * len(sent))]
                assert conn.get_status().errors == 0
                echoed = [(await peer.expect("echoed"))["bytes"] for _ in sent]

    assert echoed == [len(encode_message(m).encode()) for m in sent]
    for index, message in enumerate(sent):
        expected = attrs.evolve(message, sender="js-peer", recipient="py-dialer")
        assert echoes[2 * index] == expected  # one frame
        assert echoes[2 * index + 1] == expected  # three fragments and a ping
