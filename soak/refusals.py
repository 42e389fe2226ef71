"""(d) Every refusal, against a listener serving 10 honest peers that send throughout.

A listener on 127.0.0.1 with secrets, ``max_connections`` of
:data:`MAX_CONNECTIONS`, ``max_message_size`` of :data:`MAX_MESSAGE`, a rate
limit of :data:`RATE` messages/s (burst :data:`BURST`), ``max_violations`` of
:data:`MAX_VIOLATIONS` and ``handshake_timeout`` of :data:`HANDSHAKE` s. Ten
honest dialers (our :func:`~trio_federation.open_orchestrator_connection`,
each with its secret, no reconnect policy: any disturbance would show) send
:data:`HONEST_RATE` numbered messages/s each from before the first attack to
after the last. One after the other, the attacks: no secret, a wrong secret,
a replayed proof, a spoofed ``from``, an oversized frame, a flood of frames
past the rate limit from a raw WebSocket client (no session), a slowloris
upgrade, more connections than ``max_connections``, garbage bytes before the
upgrade and garbage bytes after it.

Figures: the outcome of each attack (bound: the refusal documented in
``docs/security.rst``: the HTTP status or the close code), the honest peers'
messages lost (bound: 0), errors they saw (bound: 0) and their worst delivery
delay (bound: :data:`WORST_DELAY` s).
"""

from __future__ import annotations

import contextlib
import functools
import random
from collections.abc import Awaitable, Callable
from typing import Final

import trio
import trio_websocket
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, CloseConnection, RejectConnection, Request

from tests.conftest import delegation, progress, wait_for
from tests.integration.rawclient import open_raw_client
from tests.integration.test_security import close_code, proof_headers, url_of
from trio_federation import (
    FederationError,
    FederationListener,
    HandshakeError,
    OrchestratorConnection,
    encode_message,
    open_orchestrator_connection,
    serve_federation,
)

from ._common import Tracker, collect
from ._report import Figure, at_most, outcome, percentile, seconds_at_most

HONEST_PEERS: Final = 10
HONEST_RATE: Final = 200.0
"""Messages per second each honest peer sends."""
MAX_CONNECTIONS: Final = 14
MAX_MESSAGE: Final = 64 * 1024
RATE: Final = 500.0
BURST: Final = 100
MAX_VIOLATIONS: Final = 10
HANDSHAKE: Final = 1.0
WORST_DELAY: Final = 0.25
"""Seconds: bound on an honest message's worst delay, send to delivery."""
STEADY: Final = 1.0
"""Seconds of honest traffic before the first attack and after the last."""
ATTACK_LIMIT: Final = 15.0
"""Seconds one attack may take before it counts as not refused."""
SEED: Final = 12

SECRETS: Final = {
    **{f"honest-{i}": f"honest orchestrator number {i}'s secret" for i in range(HONEST_PEERS)},
    "mallory": "mallory's own, registered secret",
    **{f"extra-{i}": f"an extra registered peer {i}, 16+" for i in range(MAX_CONNECTIONS)},
}


def _secret(peer: str) -> bytes:
    return SECRETS[peer].encode()


class _Attacks:
    """The attacks on ``listener``; each returns its outcome as printed."""

    def __init__(self, listener: FederationListener, delivered: dict[str, int]) -> None:
        self.listener = listener
        self.delivered = delivered
        """Messages the handler got from each peer other than the honest ones."""
        self.flooded = (0, 0, 0.0)
        """The flood's frames delivered, frames sent, and what the token bucket allows."""
        self.url = url_of(listener)
        self.rng = random.Random(SEED)

    async def _here(self, peer: str) -> None:
        await wait_for(lambda: peer in self.listener.connections)

    async def _gone(self, peer: str) -> None:
        await wait_for(lambda: peer not in self.listener.connections)

    async def _dial_refused(self, peer: str, secret: bytes | None) -> str:
        try:
            async with open_orchestrator_connection(
                self.url, local_id=peer, capabilities=[], secret=secret
            ):
                return "accepted"
        except HandshakeError as exc:  # AuthenticationError too
            return f"HTTP {exc.status_code}"

    async def no_secret(self) -> str:
        return await self._dial_refused("mallory", None)

    async def wrong_secret(self) -> str:
        return await self._dial_refused("mallory", b"a guessed secret, 16 bytes or more")

    async def replayed_proof(self) -> str:
        captured = proof_headers("mallory", _secret("mallory"))
        async with open_raw_client(self.url, headers=captured):
            await self._here("mallory")
        await self._gone("mallory")
        try:
            async with open_raw_client(self.url, headers=captured):
                return "accepted"
        except trio_websocket.ConnectionRejected as exc:
            said = "replayed proof" if b"replayed proof" in (exc.body or b"") else "?"
            return f"HTTP {exc.status_code} {said}"

    async def _closed_after(
        self, frames: Callable[[int], str], count: int
    ) -> tuple[int | None, int]:
        """Send ``count`` frames as mallory (a raw client); the close code and frames sent."""
        sent = 0
        async with open_raw_client(
            self.url, headers=proof_headers("mallory", _secret("mallory"))
        ) as ws:
            try:
                for n in range(count):
                    await ws.send_message(frames(n))
                    sent += 1
                while True:
                    await ws.get_message()
            except trio_websocket.ConnectionClosed as exc:
                code = close_code(exc)
        await self._gone("mallory")
        return code, sent

    async def spoofed_from(self) -> str:
        before = self.delivered.get("mallory", 0)
        code, _ = await self._closed_after(
            lambda n: encode_message(delegation(f"s{n}", sender="honest-0", recipient="orch-b")),
            MAX_VIOLATIONS * 10,
        )
        return f"close {code}, {self.delivered.get('mallory', 0) - before} delivered"

    async def oversized_frame(self) -> str:
        code, _ = await self._closed_after(lambda n: "x" * (MAX_MESSAGE + 1), 1)
        return f"close {code}"

    async def flood(self) -> str:
        frame = encode_message(delegation("flood", sender="mallory", recipient="orch-b"))
        before, started = self.delivered.get("mallory", 0), trio.current_time()
        code, sent = await self._closed_after(lambda n: frame, 20 * BURST)
        took = trio.current_time() - started
        self.flooded = (self.delivered.get("mallory", 0) - before, sent, BURST + RATE * took)
        return f"close {code}"

    async def slowloris(self) -> str:
        request = b"GET /federation HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 1000
        started = trio.current_time()
        async with await trio.open_tcp_stream("127.0.0.1", self.listener.port) as stream:
            with contextlib.suppress(trio.BrokenResourceError):
                for byte in request:
                    await stream.send_all(bytes([byte]))
                    await trio.sleep(0.05)
                while await stream.receive_some():
                    pass  # pragma: no cover - the listener sends nothing
            took = trio.current_time() - started
        timed_out = self.listener.statistics().refused.get("timeout", 0) == 1
        if timed_out and HANDSHAKE * 0.9 <= took <= HANDSHAKE + 0.5:
            return "cut at the handshake timeout"
        return f"cut at {took:.2f} s" + ("" if timed_out else ", not counted")

    async def too_many_connections(self) -> str:
        async with contextlib.AsyncExitStack() as held:
            extra = 0
            while self.listener.statistics().connections < MAX_CONNECTIONS:
                peer = f"extra-{extra}"
                await held.enter_async_context(
                    open_raw_client(self.url, headers=proof_headers(peer, _secret(peer)))
                )
                await self._here(peer)
                extra += 1
            answer = await self._dial_refused("mallory", _secret("mallory"))
        await wait_for(lambda: not any(p.startswith("extra-") for p in self.listener.connections))
        return answer

    async def garbage_before_upgrade(self) -> str:
        garbage = self.rng.randbytes(512) + b"\r\n\r\n"
        async with await trio.open_tcp_stream("127.0.0.1", self.listener.port) as stream:
            await stream.send_all(garbage)
            answer = b""
            with contextlib.suppress(trio.BrokenResourceError):
                while data := await stream.receive_some():
                    answer += data
        status = answer.split(b"\r\n", 1)[0].decode("latin-1").split()
        return f"HTTP {status[1]}, closed" if len(status) > 1 else "closed, no answer"

    async def garbage_after_upgrade(self) -> str:
        client = WSConnection(ConnectionType.CLIENT)
        headers = proof_headers("mallory", _secret("mallory"))
        async with await trio.open_tcp_stream("127.0.0.1", self.listener.port) as stream:
            await stream.send_all(
                client.send(Request(host="127.0.0.1", target="/federation", extra_headers=headers))
            )
            upgraded = False
            while not upgraded:
                client.receive_data(await stream.receive_some())
                for event in client.events():
                    if isinstance(event, RejectConnection):
                        return f"upgrade refused ({event.status_code})"
                    upgraded = upgraded or isinstance(event, AcceptConnection)
            await stream.send_all(self.rng.randbytes(512))
            code: int | None = None
            with contextlib.suppress(trio.BrokenResourceError):
                while code is None:
                    data = await stream.receive_some()
                    client.receive_data(data or None)
                    for event in client.events():
                        if isinstance(event, CloseConnection):
                            code = event.code
                    if not data:
                        break
        await self._gone("mallory")
        return f"close {code}"


ATTACKS: Final[list[tuple[str, Callable[[_Attacks], Awaitable[str]], str]]] = [
    ("no secret", _Attacks.no_secret, "HTTP 401"),
    ("wrong secret", _Attacks.wrong_secret, "HTTP 403"),
    ("replayed proof", _Attacks.replayed_proof, "HTTP 403 replayed proof"),
    (f"spoofed from (x{MAX_VIOLATIONS * 10})", _Attacks.spoofed_from, "close 1008, 0 delivered"),
    ("oversized frame", _Attacks.oversized_frame, "close 1009"),
    (f"flood past {RATE:g}/s, raw client", _Attacks.flood, "close 1008"),
    ("slowloris upgrade", _Attacks.slowloris, "cut at the handshake timeout"),
    (
        f"connection {MAX_CONNECTIONS + 1} of max {MAX_CONNECTIONS}",
        _Attacks.too_many_connections,
        "HTTP 503",
    ),
    ("garbage before the upgrade", _Attacks.garbage_before_upgrade, "HTTP 400, closed"),
    ("garbage after the upgrade", _Attacks.garbage_after_upgrade, "close 1002"),
]


async def _honest(
    peer: str, url: str, tracker: Tracker, stop: trio.Event, errors: list[FederationError]
) -> None:
    try:
        async with open_orchestrator_connection(
            url, local_id=peer, capabilities=[], secret=_secret(peer)
        ) as conn:
            with conn.watch_errors() as stream:
                async with trio.open_nursery() as watching:
                    watching.start_soon(collect, stream, errors)
                    started = trio.current_time()
                    n = 0
                    while not stop.is_set():
                        tracker.send(n)
                        await conn.send(progress(str(n), 0.5, sender=peer, recipient="orch-b"))
                        n += 1
                        await trio.sleep_until(started + n / HONEST_RATE)
                    watching.cancel_scope.cancel()
        # Leaving the block waited for every message to be acknowledged.
    except FederationError as exc:  # counted: the figures say what it cost
        errors.append(exc)


async def run() -> list[Figure]:
    """Run (d); return its figures."""
    trackers = {f"honest-{i}": Tracker() for i in range(HONEST_PEERS)}
    errors: list[FederationError] = []
    outcomes: list[Figure] = []
    delivered_from: dict[str, int] = {}

    async def handler(conn: OrchestratorConnection) -> None:
        tracker = trackers.get(conn.id)
        async for message in conn:
            if tracker is not None and message.correlation_id is not None:
                tracker.deliver(int(message.correlation_id))
            else:
                delivered_from[conn.id] = delivered_from.get(conn.id, 0) + 1

    async with trio.open_nursery() as nursery:
        listener: FederationListener = await nursery.start(
            functools.partial(
                serve_federation,
                handler,
                "127.0.0.1",
                0,
                local_id="orch-b",
                capabilities=["testing"],
                secrets=SECRETS,
                max_connections=MAX_CONNECTIONS,
                max_message_size=MAX_MESSAGE,
                rate_limit=RATE,
                rate_burst=BURST,
                max_violations=MAX_VIOLATIONS,
                handshake_timeout=HANDSHAKE,
            )
        )
        stop = trio.Event()
        async with trio.open_nursery() as honest:
            for peer, tracker in trackers.items():
                honest.start_soon(_honest, peer, url_of(listener), tracker, stop, errors)
            await wait_for(lambda: len(listener.connections) == HONEST_PEERS)
            await trio.sleep(STEADY)
            attacks = _Attacks(listener, delivered_from)
            for name, attack, expected in ATTACKS:
                started = trio.current_time()
                with trio.move_on_after(ATTACK_LIMIT):
                    try:
                        found = await attack(attacks)
                    except Exception as exc:
                        found = f"{type(exc).__name__}: {exc}"[:50]
                    else:
                        found = f"{found}"
                    took = trio.current_time() - started
                    outcomes.append(outcome("d", f"{name} ({took * 1000:.0f} ms)", found, expected))
                    continue
                outcomes.append(outcome("d", name, f"none in {ATTACK_LIMIT:g} s", expected))
            await trio.sleep(STEADY)
            stop.set()
        flooded, flood_sent, allowed = attacks.flooded
        refused = dict(listener.statistics().refused)
        nursery.cancel_scope.cancel()
    sent = sum(t.sent for t in trackers.values())
    delays = [d for t in trackers.values() for d in t.delays]
    return [
        *outcomes,
        outcome(
            "d",
            "upgrades refused, by reason",
            ", ".join(f"{k} {v}" for k, v in sorted(refused.items())),
            "auth 3, capacity 1, timeout 1",
        ),
        at_most(
            "d",
            f"flood: frames delivered (of {flood_sent:,} sent)",
            flooded,
            int(allowed),
        ),
        at_most(
            "d",
            f"honest peers: lost (of {sent:,})",
            sum(t.lost for t in trackers.values()),
            0,
        ),
        at_most(
            "d",
            "honest peers: duplicated, reordered",
            sum(t.duplicated + t.reordered for t in trackers.values()),
            0,
        ),
        at_most("d", "honest peers: errors reported", len(errors), 0),
        seconds_at_most(
            "d",
            "honest peers: worst delay",
            percentile(delays, 1.0) if delays else 1e9,
            WORST_DELAY,
        ),
    ]
