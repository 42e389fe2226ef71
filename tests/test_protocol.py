"""The sans-IO connection state: plain synchronous tests with an explicit now."""

from __future__ import annotations

import math

import pytest

from trio_federation import ConnectionStatus, HeartbeatStatus
from trio_federation._connection._protocol import ConnectionState, TimerActions


def opened(now: float = 100.0, *, timeout: float = 10.0, idle: float = 30.0) -> ConnectionState:
    state = ConnectionState(heartbeat_timeout=timeout, idle_timeout=idle)
    state.open(now)
    return state


def test_status_lifecycle() -> None:
    state = ConnectionState(heartbeat_timeout=10.0, idle_timeout=30.0)
    assert state.status is ConnectionStatus.CONNECTING
    assert state.next_deadline() == math.inf
    assert state.handle_timer(0.0) == TimerActions()
    assert not state.is_healthy(0.0)
    assert state.uptime(5.0) == 0.0
    state.open(100.0)
    assert state.status is ConnectionStatus.CONNECTED
    assert state.uptime(103.5) == 3.5
    with pytest.raises(RuntimeError, match="opened twice"):
        state.open(101.0)
    state.received(101.0, data=True)
    assert state.status is ConnectionStatus.ACTIVE
    state.close(1000, 102.0)
    state.close(1006, 103.0)  # the first close wins
    assert state.uptime(200.0) == 2.0  # frozen at the close
    assert state.status is ConnectionStatus.DISCONNECTED
    assert state.close_code == 1000
    assert not state.is_healthy(101.0)


@pytest.mark.parametrize("code", [1002, 1003, 1007, 1009, 1010])
def test_protocol_error_codes_mean_error(code: int) -> None:
    state = opened()
    state.close(code, 101.0)
    assert state.status is ConnectionStatus.ERROR


@pytest.mark.parametrize("code", [1000, 1001, 1006, 1011, 4000])
def test_other_codes_mean_disconnected(code: int) -> None:
    state = opened()
    state.close(code, 101.0)
    assert state.status is ConnectionStatus.DISCONNECTED


def test_ping_cadence_is_half_the_timeout_without_bursts() -> None:
    state = opened(100.0, timeout=10.0)
    assert state.ping_interval == 5.0
    assert state.next_deadline() == 105.0
    assert state.handle_timer(104.9) == TimerActions()
    assert state.handle_timer(105.0) == TimerActions(ping=True)
    state.liveness(105.0, latency=0.002)
    assert state.latency == 0.002
    assert state.next_deadline() == 110.0
    # Woken very late: one ping, and the cadence restarts from now.
    state.liveness(129.0)
    assert state.handle_timer(130.0).ping
    assert state.next_deadline() == 135.0


def test_liveness_lost_once_then_recovered() -> None:
    state = opened(100.0, timeout=10.0)
    state.handle_timer(105.0)
    assert state.next_deadline() == 110.0
    actions = state.handle_timer(110.0)
    assert actions == TimerActions(ping=True, liveness_lost=True)
    assert state.status is ConnectionStatus.DEGRADED
    assert not state.is_healthy(110.0)
    assert not state.handle_timer(115.0).liveness_lost  # reported once
    state.liveness(116.0)
    assert state.status is ConnectionStatus.CONNECTED
    assert state.is_healthy(116.0)
    assert state.is_healthy(125.9)
    assert not state.is_healthy(126.0)


@pytest.mark.parametrize("status", [HeartbeatStatus.DEGRADED, HeartbeatStatus.OVERLOADED])
def test_remote_heartbeat_status(status: HeartbeatStatus) -> None:
    state = opened(100.0)
    state.remote_heartbeat(101.0, status)
    assert state.status is ConnectionStatus.DEGRADED
    assert state.is_healthy(101.0)
    assert state.last_liveness == 101.0
    state.remote_heartbeat(102.0, HeartbeatStatus.HEALTHY)
    assert state.status is ConnectionStatus.CONNECTED


def test_active_idle_and_control_traffic() -> None:
    state = opened(100.0, timeout=100.0, idle=5.0)
    state.sent(101.0, data=False)
    state.received(101.0, data=False)
    assert state.status is ConnectionStatus.CONNECTED
    assert (state.messages_sent, state.messages_received) == (1, 1)
    state.sent(102.0, data=True)
    assert state.status is ConnectionStatus.ACTIVE
    assert state.next_deadline() == 107.0
    state.handle_timer(107.0)
    assert state.status is ConnectionStatus.IDLE
    state.received(108.0, data=True)
    assert state.status is ConnectionStatus.ACTIVE


def test_local_stall_suspends_the_liveness_verdict() -> None:
    state = opened(100.0, timeout=10.0)
    state.stall(102.0, stalled=True)
    assert state.next_deadline() == 105.0  # only the ping is due
    for now in (105.0, 110.0, 115.0, 150.0):
        assert not state.handle_timer(now).liveness_lost
    assert state.is_healthy(150.0)
    assert state.status is ConnectionStatus.CONNECTED
    state.stall(150.0, stalled=False)
    assert state.is_healthy(159.9)
    assert state.next_deadline() == 155.0
    state.handle_timer(155.0)
    assert state.next_deadline() == 160.0
    assert state.handle_timer(160.0).liveness_lost


def test_errors_are_counted() -> None:
    state = opened()
    state.error()
    state.error()
    assert state.errors == 2
