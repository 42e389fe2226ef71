"""(d) Recovery after a cut link, in this process: part of ``python -m bench``.

A listener, a :class:`~trio_federation.testing.FaultyProxy` in front of it and
a dialer with a :class:`~trio_federation.ReconnectPolicy` and a resumable
session, all on 127.0.0.1 in one trio run. One side sends a paced stream of
numbered delegations (one every :data:`PACE` seconds); the other side's
application checks that every message arrives exactly once and in order.
``cuts`` times, after :data:`SETTLE` seconds of steady stream, the proxy resets
the link (a TCP RST to both ends) and the sender sends one message at once. The
*recovery time* is from the cut to the delivery of that message to the
receiving application: it can only travel over the new link, after the
reconnect, the resume handshake and the replay of whatever the cut left
unacknowledged. It includes the policy's first delay (:data:`POLICY`: 10 ms,
no jitter, so that the rest is the library's own time).
"""

from __future__ import annotations

import functools
from typing import Any, Final, Literal

import attrs
import trio

from trio_federation import (
    DelegationRequest,
    FederationListener,
    FederationMessage,
    OrchestratorConnection,
    ReconnectPolicy,
    open_orchestrator_connection,
    serve_federation,
)
from trio_federation.testing import FaultyProxy

from ._report import percentile
from ._workload import (
    CAPABILITIES,
    DIALER_ID,
    FEDERATION_PATH,
    HEARTBEAT_TIMEOUT,
    HOST,
    LISTENER_ID,
    make_delegation,
)

Direction = Literal["dialer", "listener"]
"""The side that sends; the other side receives."""

POLICY: Final = ReconnectPolicy(initial_delay=0.01, multiplier=2.0, max_delay=1.0, jitter=0.0)
"""The dialer's policy: the first new attempt 10 ms after a link fails."""
PACE: Final = 0.001
"""Seconds between two messages of the stream."""
SETTLE: Final = 0.05
"""Seconds of steady stream after a recovery, before the next cut."""
RECOVERY_LIMIT: Final = 10.0
"""Seconds one recovery (or the final drain) may take before the run fails."""
INDEX_LIMIT: Final = 1_000_000
"""Task ids have six digits: at most this many messages per run."""


class RecoveryError(Exception):
    """A recovery run did not complete: no session, or a recovery took too long."""


@attrs.frozen(kw_only=True)
class RecoveryResult:
    """What one run of :func:`measure_recovery` found."""

    sender: Direction
    cuts: int
    recoveries: tuple[float, ...]
    """Seconds from each cut to the first message sent after it being delivered."""
    sent: int
    received: int
    duplicates: int
    """Messages delivered again (an index below the next one expected)."""
    out_of_order: int
    """Messages delivered early (an index above the next one expected: a gap)."""
    dials: int
    """Links the proxy carried after the first: one per cut if every reconnect worked at once."""

    def percentile_ms(self, fraction: float) -> float:
        """A nearest-rank percentile of the recovery times, in milliseconds."""
        return percentile(self.recoveries, fraction) * 1000

    @property
    def exactly_once(self) -> bool:
        """Every message sent arrived, once, in order."""
        return self.duplicates == 0 and self.out_of_order == 0 and self.received == self.sent

    def as_json(self) -> dict[str, Any]:
        """The run for ``--json`` (times in seconds)."""
        return {
            "sender": self.sender,
            "cuts": self.cuts,
            "recovery_ms": {
                "p50": self.percentile_ms(0.5),
                "p99": self.percentile_ms(0.99),
                "max": self.percentile_ms(1.0),
            },
            "recoveries": list(self.recoveries),
            "sent": self.sent,
            "received": self.received,
            "duplicates": self.duplicates,
            "out_of_order": self.out_of_order,
            "dials": self.dials,
            "exactly_once": self.exactly_once,
        }


class _Stream:
    """The numbered stream: the sender's count, the receiver's checks, the pending cut."""

    def __init__(self) -> None:
        self.sent = 0
        self.expected = 0
        self.received = 0
        self.duplicates = 0
        self.out_of_order = 0
        self.kick = trio.Event()
        self.cut_at: float | None = None
        self.boundary = 0
        self.recovered = trio.Event()
        self.recovery = 0.0
        self.stopped = False
        self.drained = trio.Event()

    def cut(self) -> None:
        """Note a cut now: the next message sent is the one to wait for."""
        self.boundary = self.sent
        self.recovered = trio.Event()
        self.cut_at = trio.current_time()
        self.kick.set()

    def deliver(self, index: int) -> None:
        """The receiving application got message ``index``."""
        now = trio.current_time()
        self.received += 1
        if index == self.expected:
            self.expected += 1
        elif index < self.expected:
            self.duplicates += 1
        else:
            self.out_of_order += 1
            self.expected = index + 1
        if self.cut_at is not None and index >= self.boundary:
            self.recovery = now - self.cut_at
            self.cut_at = None
            self.recovered.set()
        if self.stopped and self.received >= self.sent:
            self.drained.set()


def _delegation(index: int, sender: Direction) -> FederationMessage:
    """The benchmark's delegation number ``index``, from ``sender`` to the other side."""
    message = make_delegation(index)
    if sender == "dialer":
        return message
    assert isinstance(message.payload, DelegationRequest)
    request = attrs.evolve(
        message.payload, from_orchestrator_id=LISTENER_ID, to_orchestrator_id=DIALER_ID
    )
    return attrs.evolve(message, payload=request, sender=LISTENER_ID, recipient=DIALER_ID)


async def _send(conn: OrchestratorConnection, stream: _Stream, sender: Direction) -> None:
    while not stream.stopped:
        if stream.sent >= INDEX_LIMIT:
            raise RecoveryError(f"more than {INDEX_LIMIT:,} messages in one run")
        index = stream.sent
        stream.sent += 1
        await conn.send(_delegation(index, sender))
        with trio.move_on_after(PACE):
            await stream.kick.wait()
        if stream.kick.is_set():
            stream.kick = trio.Event()


async def _receive(conn: OrchestratorConnection, stream: _Stream) -> None:
    async for message in conn:
        correlation_id = message.correlation_id
        assert correlation_id is not None
        stream.deliver(int(correlation_id.removeprefix("task-")))


async def measure_recovery(
    sender: Direction, cuts: int, *, policy: ReconnectPolicy = POLICY
) -> RecoveryResult:
    """Cut the link ``cuts`` times under a stream from ``sender``; time each recovery.

    Raises:
        RecoveryError: no session was negotiated, or a recovery (or the final
            drain) took more than :data:`RECOVERY_LIMIT` seconds.
    """
    stream = _Stream()
    recoveries: list[float] = []

    async def handler(conn: OrchestratorConnection) -> None:
        # One call for the whole run: a resumed session keeps its connection.
        if sender == "listener":
            await _send(conn, stream, sender)
        else:
            await _receive(conn, stream)
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        listener: FederationListener = await nursery.start(
            functools.partial(
                serve_federation,
                handler,
                HOST,
                0,
                local_id=LISTENER_ID,
                capabilities=CAPABILITIES,
                heartbeat_timeout=HEARTBEAT_TIMEOUT,
                rate_limit=None,
            )
        )
        proxy: FaultyProxy = await nursery.start(FaultyProxy(listener.port).run)
        async with open_orchestrator_connection(
            f"ws://{HOST}:{proxy.port}{FEDERATION_PATH}",
            local_id=DIALER_ID,
            capabilities=CAPABILITIES,
            heartbeat_timeout=HEARTBEAT_TIMEOUT,
            rate_limit=None,
            reconnect=policy,
        ) as conn:
            if not conn.resumable:
                raise RecoveryError("the listener granted no resumable session")
            async with trio.open_nursery() as work:
                if sender == "dialer":
                    work.start_soon(_send, conn, stream, sender)
                else:
                    work.start_soon(_receive, conn, stream)
                for number in range(1, cuts + 1):
                    await trio.sleep(SETTLE)
                    if proxy.links != 1:
                        raise RecoveryError(f"{proxy.links} live links before cut {number}")
                    stream.cut()
                    proxy.cut()
                    with trio.move_on_after(RECOVERY_LIMIT):
                        await stream.recovered.wait()
                    if not stream.recovered.is_set():
                        raise RecoveryError(
                            f"no recovery within {RECOVERY_LIMIT:g}s of cut {number}"
                        )
                    recoveries.append(stream.recovery)
                stream.stopped = True
                stream.kick.set()
                if stream.received >= stream.sent:
                    stream.drained.set()
                with trio.move_on_after(RECOVERY_LIMIT):
                    await stream.drained.wait()
                work.cancel_scope.cancel()
        statistics = proxy.statistics()
        nursery.cancel_scope.cancel()
    return RecoveryResult(
        sender=sender,
        cuts=cuts,
        recoveries=tuple(recoveries),
        sent=stream.sent,
        received=stream.received,
        duplicates=stream.duplicates,
        out_of_order=stream.out_of_order,
        dials=statistics.connections - 1,
    )


def policy_json(policy: ReconnectPolicy = POLICY) -> dict[str, Any]:
    """The dialer's policy and the stream's pace, for ``--json``."""
    return {**attrs.asdict(policy), "pace": PACE, "settle": SETTLE}


def format_recovery(results: list[RecoveryResult], policy: ReconnectPolicy = POLICY) -> str:
    """The recovery table: one line per sending side."""
    first = policy.initial_delay * 1000
    headers = (
        "(d) recovery after a cut",
        "cuts",
        "p50",
        "p99",
        "max",
        "p50 - delay",
        "exactly once",
    )
    lines = [
        (
            f"{result.sender} sends",
            str(result.cuts),
            f"{result.percentile_ms(0.5):.1f} ms",
            f"{result.percentile_ms(0.99):.1f} ms",
            f"{result.percentile_ms(1.0):.1f} ms",
            f"{result.percentile_ms(0.5) - first:.1f} ms",
            ("yes" if result.exactly_once else "NO")
            + f" ({result.received:,}/{result.sent:,} received, {result.duplicates} dup,"
            f" {result.out_of_order} gaps; {result.dials} reconnects)",
        )
        for result in results
    ]
    widths = [max(len(cells[i]) for cells in (headers, *lines)) for i in range(len(headers))]

    def fmt(cells: tuple[str, ...]) -> str:
        return "  ".join(
            f"{cell:{'<' if i in (0, 6) else '>'}{width}}"
            for i, (cell, width) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    rule = "  ".join("-" * width for width in widths)
    return "\n".join([fmt(headers), rule, *(fmt(cells) for cells in lines)])
