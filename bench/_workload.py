"""The benchmark's messages: delegations of about 500 bytes on the wire."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Final

import orjson

from trio_federation import (
    Capability,
    DelegationRequest,
    FederationMessage,
    MessageType,
    Task,
    TaskPriority,
    TaskType,
    encode_message,
)

HOST: Final = "127.0.0.1"
"""Every socket of the benchmark is on loopback."""
DIALER_ID: Final = "orch-a"
LISTENER_ID: Final = "orch-b"
CAPABILITIES: Final = (Capability.CODE_GENERATION, Capability.TESTING)
HEARTBEAT_TIMEOUT: Final = 3600.0
"""Large, so that pings and heartbeat messages never run during a measurement."""
FEDERATION_PATH: Final = "/federation"

_CREATED: Final = datetime(2026, 1, 1, tzinfo=UTC)
# Fixed times and fixed-width task ids: every frame has the same length.
_DESCRIPTION: Final = "Test the backoff"


def make_delegation(index: int) -> FederationMessage:
    """The ``index``-th delegation message (task id ``task-<index>``)."""
    task_id = f"task-{index:06d}"
    request = DelegationRequest(
        from_orchestrator_id=DIALER_ID,
        to_orchestrator_id=LISTENER_ID,
        task=Task(
            id=task_id,
            description=_DESCRIPTION,
            type=TaskType.CODE,
            priority=TaskPriority.HIGH,
            created_at=_CREATED,
            updated_at=_CREATED,
        ),
        priority=TaskPriority.HIGH,
        required_capabilities=(Capability.TESTING,),
        timeout=300.0,
    )
    return FederationMessage(
        type=MessageType.DELEGATION,
        payload=request,
        sender=DIALER_ID,
        recipient=LISTENER_ID,
        timestamp=_CREATED,
        correlation_id=task_id,
    )


def make_delegations(count: int) -> list[FederationMessage]:
    """``count`` distinct delegation messages."""
    return [make_delegation(index) for index in range(count)]


def frame_size() -> int:
    """Bytes of one delegation frame's text (UTF-8), without WebSocket framing."""
    return len(encode_message(make_delegation(0)).encode())


def equivalent_dict(message: FederationMessage) -> dict[str, Any]:
    """The same message as one plain dict: the envelope with its payload as an object."""
    envelope: dict[str, Any] = orjson.loads(encode_message(message))
    envelope["payload"] = orjson.loads(envelope["payload"])
    return envelope
