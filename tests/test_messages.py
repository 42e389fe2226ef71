"""Message construction: validation happens at the constructor, with clear errors."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from trio_federation import (
    BroadcastPayload,
    ConnectionHealth,
    DelegationRequest,
    DelegationResponse,
    FederationMessage,
    MessageType,
    Task,
    TaskCallback,
    TaskPriority,
)


def test_plain_strings_are_accepted_and_compare_equal() -> None:
    task = Task(id="t", description="d", type="code", priority="high", status="in_progress")
    assert task.type == "code" and task.priority is TaskPriority.HIGH
    message = FederationMessage(
        type="callback",
        payload=TaskCallback(task_id="t", status="completed"),
        sender="a",
        recipient="b",
    )
    assert message.type is MessageType.CALLBACK
    match message.payload:
        case TaskCallback(status="completed"):
            pass
        case _:  # pragma: no cover
            pytest.fail("a StrEnum field must match a plain string pattern")


def test_bad_enum_values_say_what_is_allowed() -> None:
    with pytest.raises(ValueError, match="'urgent' is not a valid TaskPriority"):
        Task(id="t", description="d", priority="urgent")


def test_times_are_aware_and_utc() -> None:
    paris = timezone(timedelta(hours=1))
    task = Task(id="t", description="d", created_at=datetime(2026, 1, 1, 13, tzinfo=paris))
    assert task.created_at == datetime(2026, 1, 1, 12, tzinfo=UTC)
    assert task.created_at.tzinfo is UTC
    with pytest.raises(ValueError, match="timezone-aware"):
        Task(id="t", description="d", created_at=datetime(2026, 1, 1))
    with pytest.raises(TypeError, match="expected a datetime, got str"):
        Task(id="t", description="d", created_at="2026-01-01")  # type: ignore[arg-type]
    response = DelegationResponse(task_id="t", accepted=True, estimated_completion=None)
    assert response.estimated_completion is None


def test_fresh_timestamps_have_millisecond_precision() -> None:
    assert Task(id="t", description="d").created_at.microsecond % 1000 == 0


def test_durations_must_not_be_negative() -> None:
    with pytest.raises(ValueError, match="ttl must be >= 0"):
        BroadcastPayload(topic="t", ttl=-1)
    with pytest.raises(ValueError, match="uptime must be >= 0"):
        ConnectionHealth(status="active", uptime=-1, last_heartbeat=datetime.now(UTC))


def test_required_capabilities_are_a_list_of_names() -> None:
    task = Task(id="t", description="d")
    request = DelegationRequest(
        from_orchestrator_id="a",
        to_orchestrator_id="b",
        task=task,
        required_capabilities=["testing"],
    )
    assert request.required_capabilities == ("testing",)
    with pytest.raises(TypeError, match="got the string"):
        DelegationRequest(
            from_orchestrator_id="a",
            to_orchestrator_id="b",
            task=task,
            required_capabilities="testing",
        )
    with pytest.raises(TypeError, match="expected strings, got int"):
        DelegationRequest(
            from_orchestrator_id="a",
            to_orchestrator_id="b",
            task=task,
            required_capabilities=[1],
        )


def test_payload_must_fit_the_type() -> None:
    with pytest.raises(TypeError, match="a 'delegation' message carries a DelegationRequest"):
        FederationMessage(
            type="delegation",
            payload=TaskCallback(task_id="t", status="progress"),
            sender="a",
            recipient="b",
        )
    with pytest.raises(ValueError, match="is not a valid MessageType"):
        FederationMessage(
            type="gossip",
            payload=BroadcastPayload(topic="t"),
            sender="a",
            recipient="b",
        )


def test_messages_are_frozen() -> None:
    task = Task(id="t", description="d")
    with pytest.raises(AttributeError):
        task.id = "other"  # type: ignore[misc]
