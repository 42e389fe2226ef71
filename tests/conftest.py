"""Shared fixtures; every test runs under an absolute time guard (``tests/_guard.py``)."""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator

import pytest
import trio
from hypothesis import HealthCheck, settings

from trio_federation import (
    DelegationRequest,
    FederationMessage,
    MessageType,
    Task,
    TaskCallback,
)

from ._guard import pytest_runtest_call  # noqa: F401  (the time guard, as a hook)

# No per-example deadline: on a busy machine a slow example is not a failure
# (the time guard bounds the whole test).
settings.register_profile("suite", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("suite")


def under_ci() -> bool:
    """Whether CI runs us (``CI=true``): a missing tool then fails, not skips."""
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.fixture(autouse=True)
def collect_garbage() -> Iterator[None]:
    """Collect after each test, so a leaked socket's warning fails the test that leaked it."""
    yield
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
