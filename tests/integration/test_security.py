"""Every refusal of the trust layer, on real sockets on 127.0.0.1.

Each test shows the refusal and that an honest peer on the same listener is
unaffected; each fails if its check is removed.
"""

from __future__ import annotations

import ssl
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import trio
import trio_websocket
import trustme

from trio_federation import (
    AuthenticationError,
    ConnectionLost,
    FederationListener,
    HandshakeError,
    OrchestratorConnection,
    encode_message,
    open_orchestrator_connection,
    serve_federation,
)
from trio_federation._wire._auth import AUTH_HEADER, make_proof

from ..conftest import delegation, wait_for
from .rawclient import open_raw_client

HONEST = b"the honest orchestrator's secret"
MALLORY = b"mallory's own, registered secret"
SECRETS = {"honest": HONEST, "mallory": MALLORY}


class Served:
    """A listener's handler that accepts every delegation and records who came."""

    def __init__(self) -> None:
        self.peers: list[str] = []
        self.received: dict[str, int] = {}

    async def __call__(self, conn: OrchestratorConnection) -> None:
        self.peers.append(conn.id)
        async for msg in conn:
            self.received[conn.id] = self.received.get(conn.id, 0) + 1
            if msg.type == "delegation":
                await conn.accept_delegation(msg.payload)  # type: ignore[arg-type]


async def start(
    nursery: trio.Nursery,
    handler: Callable[[OrchestratorConnection], Awaitable[object]],
    **options: Any,
) -> FederationListener:
    settings: dict[str, Any] = {"secrets": SECRETS, **options}
    listener: FederationListener = await nursery.start(
        lambda task_status: serve_federation(
            handler,
            "127.0.0.1",
            0,
            local_id="orch-b",
            capabilities=["testing"],
            task_status=task_status,
            **settings,
        )
    )
    return listener


@pytest.fixture
async def served() -> Served:
    return Served()


@pytest.fixture
async def listener(nursery: trio.Nursery, served: Served) -> FederationListener:
    return await start(nursery, served)


def url_of(listener: FederationListener, scheme: str = "ws") -> str:
    return f"{scheme}://127.0.0.1:{listener.port}/federation"


async def honest_round_trip(listener: FederationListener, **options: Any) -> None:
    """The honest peer dials, delegates and gets the acceptance."""
    async with open_orchestrator_connection(
        url_of(listener, options.pop("scheme", "ws")),
        local_id=options.pop("local_id", "honest"),
        capabilities=[],
        **({"secret": HONEST} | options),
    ) as conn:
        sender = conn.local_id
        assert sender is not None
        await conn.send_message(delegation("honest-task", sender=sender, recipient=conn.id))
        reply = await conn.receive()
        assert reply.payload.accepted  # type: ignore[union-attr]


def proof_headers(
    peer_id: str, secret: bytes, *, now: float | None = None
) -> list[tuple[bytes, bytes]]:
    proof = make_proof(
        secret, peer_id=peer_id, audience="", now=time.time() if now is None else now
    )
    return [(b"X-Federation-Id", peer_id.encode()), (AUTH_HEADER.encode(), proof.encode())]


async def refused_raw(
    url: str, headers: list[tuple[bytes, bytes]]
) -> trio_websocket.ConnectionRejected:
    with pytest.raises(trio_websocket.ConnectionRejected) as info:
        async with open_raw_client(url, headers=headers):
            pass  # pragma: no cover
    return info.value


def close_code(closed: trio_websocket.ConnectionClosed) -> int | None:
    return None if closed.reason is None else closed.reason.code


# -- authentication at the upgrade ---------------------------------------------------


async def test_wrong_secret_is_refused_with_403(
    listener: FederationListener, served: Served
) -> None:
    with pytest.raises(AuthenticationError) as info:
        async with open_orchestrator_connection(
            url_of(listener),
            local_id="mallory",
            capabilities=[],
            secret=b"guessed, 16 bytes or more",
        ):
            pass  # pragma: no cover
    assert info.value.status_code == 403
    assert "the secret does not match" in str(info.value)
    assert listener.statistics().refused == {"auth": 1}
    await honest_round_trip(listener)
    assert served.peers == ["honest"]  # the refused peer never reached the handler


async def test_no_secret_is_refused_with_401(listener: FederationListener, served: Served) -> None:
    with pytest.raises(AuthenticationError) as info:
        async with open_orchestrator_connection(
            url_of(listener), local_id="honest", capabilities=[]
        ):
            pass  # pragma: no cover
    assert info.value.status_code == 401
    assert "authentication required" in str(info.value)
    await honest_round_trip(listener)
    assert served.peers == ["honest"]


async def test_an_unknown_orchestrator_is_refused(
    listener: FederationListener, served: Served
) -> None:
    with pytest.raises(AuthenticationError, match="unknown orchestrator 'eve'"):
        async with open_orchestrator_connection(
            url_of(listener), local_id="eve", capabilities=[], secret=HONEST
        ):
            pass  # pragma: no cover
    await honest_round_trip(listener)
    assert served.peers == ["honest"]


async def test_an_expired_proof_is_refused(listener: FederationListener, served: Served) -> None:
    refused = await refused_raw(
        url_of(listener), proof_headers("honest", HONEST, now=time.time() - 120)
    )
    assert refused.status_code == 403
    assert b"expired proof" in (refused.body or b"")
    await honest_round_trip(listener)
    assert served.peers == ["honest"]


async def test_a_replayed_proof_is_refused(listener: FederationListener, served: Served) -> None:
    captured = proof_headers("honest", HONEST)
    async with open_raw_client(url_of(listener), headers=captured):
        await wait_for(lambda: "honest" in listener.connections)
    await wait_for(lambda: not listener.connections)
    refused = await refused_raw(url_of(listener), captured)
    assert refused.status_code == 403
    assert b"replayed proof" in (refused.body or b"")
    await honest_round_trip(listener)
    assert served.peers == ["honest", "honest"]


async def test_a_plain_client_may_send_its_proof_in_the_query(listener: FederationListener) -> None:
    proof = make_proof(HONEST, peer_id="honest", audience="orch-b", now=time.time())
    url = f"{url_of(listener)}?id=honest&auth={trio_websocket._impl.urllib.parse.quote(proof)}"  # type: ignore[attr-defined]
    async with open_raw_client(url) as ws:
        answer = dict(ws.handshake_headers).get(AUTH_HEADER.lower().encode())
        assert answer is not None and answer.startswith(b"v1;mac=")
        await ws.send_message(encode_message(delegation("q", sender="honest", recipient="orch-b")))
        reply = await ws.get_message()
        assert '"accepted":true' in str(reply).replace("\\", "")


async def test_a_dialer_with_a_secret_refuses_a_listener_that_cannot_prove_it(
    nursery: trio.Nursery, served: Served
) -> None:
    open_listener = await start(nursery, served, secrets=None)
    with pytest.raises(AuthenticationError, match="did not prove it holds our secret"):
        async with open_orchestrator_connection(
            url_of(open_listener), local_id="honest", capabilities=[], secret=HONEST
        ):
            pass  # pragma: no cover

    async def impostor(request: trio_websocket.WebSocketRequest) -> None:
        forged = (AUTH_HEADER.encode(), b"v1;mac=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA")
        ws = await request.accept(extra_headers=[(b"X-Federation-Id", b"orch-b"), forged])
        with pytest.raises(trio_websocket.ConnectionClosed):
            await ws.get_message()  # the dialer closes with 1008

    server = await nursery.start(trio_websocket.serve_websocket, impostor, "127.0.0.1", 0, None)
    with pytest.raises(AuthenticationError, match="answered with a wrong proof"):
        async with open_orchestrator_connection(
            f"ws://127.0.0.1:{server.port}/", local_id="honest", capabilities=[], secret=HONEST
        ):
            pass  # pragma: no cover


async def test_a_proof_bound_to_another_listener_is_refused(listener: FederationListener) -> None:
    with pytest.raises(AuthenticationError, match="for the listener 'orch-x'"):
        async with open_orchestrator_connection(
            url_of(listener), local_id="honest", capabilities=[], secret=HONEST, remote_id="orch-x"
        ):
            pass  # pragma: no cover
    await honest_round_trip(listener, remote_id="orch-b")


async def test_an_open_listener_says_so_once(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    open_listener = await start(nursery, Served(), secrets=None)
    await honest_round_trip(open_listener, secret=None)
    await honest_round_trip(open_listener, secret=None)
    warnings = [r for r in caplog.records if "authenticates no one" in r.message]
    assert len(warnings) == 1


async def test_an_authenticated_reconnection_replaces_the_old_connection(
    listener: FederationListener, served: Served
) -> None:
    async with open_orchestrator_connection(
        url_of(listener), local_id="honest", capabilities=[], secret=HONEST
    ) as first:
        await wait_for(lambda: "honest" in listener.connections)
        old = listener.connections["honest"]
        await honest_round_trip(listener)
        with pytest.raises(ConnectionLost) as info:
            await first.receive()
        assert info.value.code == 4000
        assert old.status == "disconnected"
    assert served.peers == ["honest", "honest"]


# -- mutual TLS -------------------------------------------------------------------------


@pytest.fixture
def authority() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
async def mtls_listener(
    nursery: trio.Nursery, served: Served, authority: trustme.CA
) -> FederationListener:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    authority.issue_cert("127.0.0.1").configure_cert(context)
    authority.configure_trust(context)
    context.verify_mode = ssl.CERT_REQUIRED
    return await start(nursery, served, secrets=None, ssl_context=context)


def client_context(
    authority: trustme.CA, identity: str | None, issuer: trustme.CA | None = None
) -> ssl.SSLContext:
    context = ssl.create_default_context()
    authority.configure_trust(context)
    if identity is not None:
        (issuer or authority).issue_cert(identity).configure_cert(context)
    return context


async def test_mtls_takes_the_id_from_the_client_certificate(
    mtls_listener: FederationListener, authority: trustme.CA, served: Served
) -> None:
    await honest_round_trip(
        mtls_listener, scheme="wss", secret=None, ssl_context=client_context(authority, "honest")
    )
    assert served.peers == ["honest"]


async def test_mtls_refuses_a_certificate_for_another_id(
    mtls_listener: FederationListener, authority: trustme.CA, served: Served
) -> None:
    with pytest.raises(AuthenticationError) as info:
        async with open_orchestrator_connection(
            url_of(mtls_listener, "wss"),
            local_id="mallory",
            capabilities=[],
            ssl_context=client_context(authority, "honest"),
        ):
            pass  # pragma: no cover
    assert info.value.status_code == 403
    assert "the client certificate is for 'honest', not 'mallory'" in str(info.value)
    await honest_round_trip(
        mtls_listener, scheme="wss", secret=None, ssl_context=client_context(authority, "honest")
    )
    assert served.peers == ["honest"]


@pytest.mark.parametrize("certificate", ["untrusted", "none"])
async def test_mtls_refuses_an_untrusted_or_missing_certificate(
    mtls_listener: FederationListener, authority: trustme.CA, served: Served, certificate: str
) -> None:
    context = (
        client_context(authority, "honest", issuer=trustme.CA())
        if certificate == "untrusted"
        else client_context(authority, None)
    )
    with pytest.raises(AuthenticationError, match="TLS refused a certificate"):
        async with open_orchestrator_connection(
            url_of(mtls_listener, "wss"), local_id="honest", capabilities=[], ssl_context=context
        ):
            pass  # pragma: no cover
    await wait_for(lambda: mtls_listener.statistics().refused.get("tls") == 1)
    await honest_round_trip(
        mtls_listener, scheme="wss", secret=None, ssl_context=client_context(authority, "honest")
    )
    assert served.peers == ["honest"]


# -- what a connected peer cannot do -------------------------------------------------------


async def test_a_spoofed_from_is_never_delivered_and_a_spoofer_is_cut_off(
    nursery: trio.Nursery, served: Served
) -> None:
    listener = await start(nursery, served, max_violations=3)
    async with open_raw_client(url_of(listener), headers=proof_headers("mallory", MALLORY)) as ws:
        await wait_for(lambda: "mallory" in listener.connections)
        mallory = listener.connections["mallory"]
        for n in range(3):
            await ws.send_message(
                encode_message(delegation(f"s{n}", sender="honest", recipient="orch-b"))
            )
        with pytest.raises(trio_websocket.ConnectionClosed) as info:
            while True:
                await ws.get_message()
        assert close_code(info.value) == 1008
    assert mallory.get_status().errors >= 3
    assert "mallory" not in served.received  # nothing was delivered
    await honest_round_trip(listener)


async def test_an_oversized_frame_closes_with_1009(nursery: trio.Nursery, served: Served) -> None:
    listener = await start(nursery, served, max_message_size=4096)
    async with open_raw_client(url_of(listener), headers=proof_headers("mallory", MALLORY)) as ws:
        await ws.send_message("x" * 10_000)
        with pytest.raises(trio_websocket.ConnectionClosed) as info:
            await ws.get_message()
        assert close_code(info.value) == 1009
    await honest_round_trip(listener)


async def test_a_flood_beyond_the_rate_limit_is_refused_and_cut_off(
    nursery: trio.Nursery, served: Served
) -> None:
    listener = await start(nursery, served, rate_limit=20.0, rate_burst=10, max_violations=5)
    frame = encode_message(delegation("flood", sender="mallory", recipient="orch-b"))
    async with open_raw_client(url_of(listener), headers=proof_headers("mallory", MALLORY)) as ws:
        with pytest.raises(trio_websocket.ConnectionClosed) as info:
            for _ in range(1000):
                await ws.send_message(frame)
            while True:
                await ws.get_message()
        assert close_code(info.value) == 1008
    # At most the burst, and what the rate refilled meanwhile, got through.
    assert served.received.get("mallory", 0) <= 15
    await honest_round_trip(listener)


async def test_a_slow_loris_handshake_is_cut_at_the_handshake_timeout(
    nursery: trio.Nursery, served: Served
) -> None:
    listener = await start(nursery, served, handshake_timeout=0.5)
    stream = await trio.open_tcp_stream("127.0.0.1", listener.port)
    await wait_for(lambda: listener.statistics().pending == 1)  # held, but not for long
    started = trio.current_time()
    request = b"GET /federation HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: "
    closed_after: float | None = None
    with trio.fail_after(5):
        try:
            for byte in request + b"a" * 100:
                await stream.send_all(bytes([byte]))
                await honest_round_trip(listener) if byte == ord("X") else await trio.sleep(0.05)
        except trio.BrokenResourceError:
            closed_after = trio.current_time() - started
        if closed_after is None:  # pragma: no cover - the writes may outlive the close
            assert await stream.receive_some(100) == b""
            closed_after = trio.current_time() - started
    assert 0.4 < closed_after < 2.5
    await stream.aclose()
    assert listener.statistics().refused == {"timeout": 1}
    assert listener.statistics().pending == 0
    await honest_round_trip(listener)


async def test_too_many_connections_are_refused_with_503(
    nursery: trio.Nursery, served: Served
) -> None:
    listener = await start(nursery, served, max_connections=2)
    async with open_raw_client(url_of(listener), headers=proof_headers("mallory", MALLORY)):
        await wait_for(lambda: "mallory" in listener.connections)
        async with open_orchestrator_connection(
            url_of(listener), local_id="honest", capabilities=[], secret=HONEST
        ):
            with pytest.raises(HandshakeError) as info:
                async with open_orchestrator_connection(
                    url_of(listener), local_id="honest-2", capabilities=[], secret=HONEST
                ):
                    pass  # pragma: no cover
            assert info.value.status_code == 503
            assert "connection limit" in str(info.value)
            assert listener.statistics().connections == 2
            assert listener.statistics().pending == 0
    await wait_for(lambda: not listener.connections)
    await honest_round_trip(listener)  # room again
    assert listener.statistics().refused == {"capacity": 1}
