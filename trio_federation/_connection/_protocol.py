"""The sans-IO core of a connection: status, liveness and timers.

No trio, no sockets: time enters as an argument (``now``, seconds on any
monotonic clock). The trio shell in ``_connection`` feeds it events and sleeps
until :meth:`ConnectionState.next_deadline`, then calls
:meth:`ConnectionState.handle_timer`.

The status is *derived*, never stored, from a handful of facts, in one place
(:meth:`ConnectionState.status`)::

    closed by a protocol error         -> error
    closed otherwise                   -> disconnected
    not opened yet, or dialling again  -> connecting
    link lost, waiting to resume       -> disconnected
    no liveness within the timeout,
      or the peer says it is degraded  -> degraded
    data flowed within idle_timeout    -> active
    data flowed once, not since        -> idle
    no data yet                        -> connected
"""

from __future__ import annotations

import math
from typing import Final

import attrs

from .._wire._messages import ConnectionStatus, HeartbeatStatus

__all__ = ["PROTOCOL_ERROR_CODES", "ConnectionState", "TimerActions", "TokenBucket"]

PROTOCOL_ERROR_CODES: Final = frozenset({1002, 1003, 1007, 1009, 1010})
"""Close codes that mean a protocol error: the status becomes ``error``."""


@attrs.frozen
class TimerActions:
    """What the shell must do after :meth:`ConnectionState.handle_timer`."""

    ping: bool = False
    """Send a ping (and a heartbeat message): the ping interval elapsed."""
    liveness_lost: bool = False
    """No liveness signal within the heartbeat timeout: report it."""
    dead: bool = False
    """No liveness signal within the dead timeout: abort the transport."""


@attrs.define
class ConnectionState:
    """Status, liveness and counters of one connection, driven by events.

    Args:
        heartbeat_timeout: seconds without a liveness signal before the
            connection is degraded; pings go out every half of it.
        idle_timeout: seconds without a data message before ``active`` turns
            ``idle``.
        dead_timeout: seconds without a liveness signal before the peer is
            presumed dead and the transport aborted (``inf``: never).
    """

    heartbeat_timeout: float
    idle_timeout: float
    dead_timeout: float = math.inf
    link: str = "up"
    dead_reported: bool = False
    opened_at: float | None = None
    last_liveness: float | None = None
    last_activity: float | None = None
    next_ping_at: float = math.inf
    latency: float | None = None
    close_code: int | None = None
    closed_at: float | None = None
    liveness_ok: bool = True
    stalled: bool = False
    stall_ended_at: float = -math.inf
    remote_status: HeartbeatStatus = HeartbeatStatus.HEALTHY
    active: bool = False
    messages_sent: int = 0
    messages_received: int = 0
    errors: int = 0

    @property
    def ping_interval(self) -> float:
        """Seconds between pings: half the heartbeat timeout."""
        return self.heartbeat_timeout / 2

    @property
    def is_open(self) -> bool:
        """Opened and not closed."""
        return self.opened_at is not None and self.close_code is None

    @property
    def status(self) -> ConnectionStatus:
        """The status, derived from the facts above (see the module docstring)."""
        if self.close_code is not None:
            if self.close_code in PROTOCOL_ERROR_CODES:
                return ConnectionStatus.ERROR
            return ConnectionStatus.DISCONNECTED
        if self.opened_at is None or self.link == "dialing":
            return ConnectionStatus.CONNECTING
        if self.link == "down":
            return ConnectionStatus.DISCONNECTED
        if not self.liveness_ok or self.remote_status is not HeartbeatStatus.HEALTHY:
            return ConnectionStatus.DEGRADED
        if self.last_activity is None:
            return ConnectionStatus.CONNECTED
        return ConnectionStatus.ACTIVE if self.active else ConnectionStatus.IDLE

    # -- events ---------------------------------------------------------------

    def open(self, now: float) -> None:
        """The transport is open: liveness and the ping cadence start now."""
        if self.opened_at is not None:
            raise RuntimeError("connection state opened twice")
        self.transport_up(now)

    def transport_up(self, now: float) -> None:
        """A transport is attached.

        It opens the connection the first time, and restarts liveness and the
        ping cadence on every one.
        """
        if self.opened_at is None:
            self.opened_at = now
        self.link = "up"
        self.last_liveness = now
        self.liveness_ok = True
        self.dead_reported = False
        self.stalled = False
        self.stall_ended_at = -math.inf
        self.remote_status = HeartbeatStatus.HEALTHY
        self.next_ping_at = now + self.ping_interval

    def transport_down(self, *, dialing: bool = False) -> None:
        """The transport ended and another may come (``dialing``: we are dialling)."""
        self.link = "dialing" if dialing else "down"
        self.next_ping_at = math.inf

    def liveness(self, now: float, *, latency: float | None = None) -> None:
        """A liveness signal arrived (a pong, a heartbeat, ``handle_heartbeat``)."""
        self.last_liveness = now
        self.liveness_ok = True
        if latency is not None:
            self.latency = latency

    def stall(self, now: float, *, stalled: bool) -> None:
        """The local consumer stopped (or resumed) taking messages.

        While the reader waits for the application, the socket is not read, so
        pongs cannot arrive: the peer's silence is then our own doing and no
        liveness verdict is passed. When the stall ends, the peer gets a full
        ``heartbeat_timeout`` again, counted from then.
        """
        self.stalled = stalled
        if not stalled:
            self.stall_ended_at = now

    def _liveness_reference(self) -> float:
        assert self.last_liveness is not None
        return max(self.last_liveness, self.stall_ended_at)

    def remote_heartbeat(self, now: float, status: HeartbeatStatus) -> None:
        """The peer sent a ``heartbeat`` message announcing ``status``."""
        self.remote_status = status
        self.liveness(now)

    def sent(self, now: float, *, data: bool, count: int = 1) -> bool:
        """``count`` messages were written; ``data`` if one was not a control message.

        Returns whether the status may have changed (the shell then publishes it).
        """
        self.messages_sent += count
        return data and self._activity(now)

    def received(self, now: float, *, data: bool) -> bool:
        """A well-formed message was read; ``data`` for non-control messages.

        Returns whether the status may have changed (the shell then publishes it).
        """
        self.messages_received += 1
        return data and self._activity(now)

    def error(self) -> None:
        """Count one error (a malformed frame, unsent messages...)."""
        self.errors += 1

    def close(self, code: int, now: float) -> None:
        """The connection closed with ``code``; later closes do not override it."""
        if self.close_code is None:
            self.close_code = code
            self.closed_at = now
            self.next_ping_at = math.inf

    def _activity(self, now: float) -> bool:
        self.last_activity = now
        if self.active:
            return False
        self.active = True
        return True

    # -- time -----------------------------------------------------------------

    def next_deadline(self) -> float:
        """When :meth:`handle_timer` next has something to do (``inf``: never)."""
        if not self.is_open or self.link != "up":
            return math.inf
        assert self.last_liveness is not None
        deadline = self.next_ping_at
        if self.liveness_ok and not self.stalled:
            deadline = min(deadline, self._liveness_reference() + self.heartbeat_timeout)
        if not self.dead_reported and not self.stalled:
            deadline = min(deadline, self._liveness_reference() + self.dead_timeout)
        if self.active and self.last_activity is not None:
            deadline = min(deadline, self.last_activity + self.idle_timeout)
        return deadline

    def handle_timer(self, now: float) -> TimerActions:
        """Act on every deadline that has passed by ``now``."""
        if not self.is_open or self.link != "up":
            return TimerActions()
        assert self.last_liveness is not None
        ping = now >= self.next_ping_at
        if ping:
            self.next_ping_at += self.ping_interval
            if self.next_ping_at <= now:  # woke late: do not fire a burst
                self.next_ping_at = now + self.ping_interval
        lost = (
            self.liveness_ok
            and not self.stalled
            and now - self._liveness_reference() >= self.heartbeat_timeout
        )
        if lost:
            self.liveness_ok = False
        dead = (
            not self.dead_reported
            and not self.stalled
            and now - self._liveness_reference() >= self.dead_timeout
        )
        if dead:
            self.dead_reported = True
        idle_since = self.last_activity
        if self.active and idle_since is not None and now - idle_since >= self.idle_timeout:
            self.active = False
        return TimerActions(ping=ping, liveness_lost=lost, dead=dead)

    def is_healthy(self, now: float) -> bool:
        """Open, with a liveness signal within the heartbeat timeout (or stalled locally)."""
        if not self.is_open or self.last_liveness is None or self.link != "up":
            return False
        return self.stalled or now - self._liveness_reference() < self.heartbeat_timeout

    def uptime(self, now: float) -> float:
        """Seconds the connection has been open: 0 before, frozen once closed."""
        if self.opened_at is None:
            return 0.0
        end = now if self.closed_at is None else self.closed_at
        return max(0.0, end - self.opened_at)


@attrs.define
class TokenBucket:
    """An inbound rate limit: ``rate`` tokens a second, at most ``burst`` saved.

    Starts full. :meth:`take` spends one token if there is one.
    """

    rate: float
    burst: int
    _tokens: float = attrs.field(init=False)
    _updated: float | None = attrs.field(default=None, init=False)

    def __attrs_post_init__(self) -> None:
        self._tokens = float(self.burst)

    def _refill(self, now: float) -> None:
        if self._updated is not None:
            self._tokens = min(self.burst, self._tokens + (now - self._updated) * self.rate)
        self._updated = now

    def take(self, now: float) -> bool:
        """Spend a token at time ``now``; False if the bucket is empty."""
        self._refill(now)
        if self._tokens >= 1:
            self._tokens -= 1
            return True
        return False

    def reserve(self, now: float, count: int = 1) -> float:
        """Spend ``count`` tokens at time ``now``, in debt if need be: the seconds to wait.

        0 when the tokens were there. The limit as flow control: a reader that
        waits this long before going on holds the sender to ``rate``.
        """
        self._refill(now)
        self._tokens -= count
        return 0.0 if self._tokens >= 0 else -self._tokens / self.rate
