"""Shared fixtures: every test runs under an absolute time guard."""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator

import pytest
import trio

from trio_federation import (
    DelegationRequest,
    FederationMessage,
    MessageType,
    Task,
    TaskCallback,
)


def under_ci() -> bool:
    """Whether CI runs us (``CI=true``): a missing tool then fails, not skips."""
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


TEST_TIME_GUARD = float(os.environ.get("TEST_TIME_GUARD", "30"))
"""Seconds of real time any single test may take."""


@pytest.fixture(autouse=True)
def time_guard() -> Iterator[None]:
    """Fail a test that runs longer than TEST_TIME_GUARD (wall-clock) seconds."""
    import signal

    def on_alarm(signum: int, frame: object) -> None:
        raise TimeoutError(f"test exceeded its {TEST_TIME_GUARD}s guard")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, TEST_TIME_GUARD)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        # A leaked socket warns when it is collected: collect now, so the
        # warning fails the test that leaked it, not a later one.
        gc.collect()


def delegation(
    task_id: str = "task-1", sender: str = "orch-a", recipient: str = "orch-b"
) -> FederationMessage:
    """A delegation message from ``sender`` to ``recipient``."""
    return FederationMessage(
        type=MessageType.DELEGATION,
        payload=DelegationRequest(
            from_orchestrator_id=sender,
            to_orchestrator_id=recipient,
            task=Task(id=task_id, description=f"do {task_id}", type="code", priority="high"),
            priority="high",
        ),
        sender=sender,
        recipient=recipient,
        correlation_id=task_id,
    )


def progress(
    task_id: str, value: float, sender: str = "orch-b", recipient: str = "orch-a"
) -> FederationMessage:
    """A progress callback for ``task_id``."""
    return FederationMessage(
        type=MessageType.CALLBACK,
        payload=TaskCallback(task_id=task_id, status="progress", progress=value),
        sender=sender,
        recipient=recipient,
        correlation_id=task_id,
    )


async def wait_for(predicate: object, *, interval: float = 0.01) -> None:
    """Poll ``predicate()`` until true (the caller bounds the time)."""
    assert callable(predicate)
    while not predicate():
        await trio.sleep(interval)
