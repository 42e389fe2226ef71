"""Hypothesis strategies for every message class, at the wire's precision."""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from typing import Any

from hypothesis import strategies as st

from trio_federation import (
    AssignedResources,
    BroadcastPayload,
    CallbackStatus,
    Capability,
    ConnectionHealth,
    ConnectionStatus,
    DelegationRequest,
    DelegationResponse,
    FederationMessage,
    HeartbeatPayload,
    HeartbeatStatus,
    MemoryEntry,
    MessageType,
    OrchestratorCapabilities,
    SharedContext,
    Task,
    TaskCallback,
    TaskHistoryEntry,
    TaskPriority,
    TaskStatus,
    TaskType,
)

FUZZ_SCALE = int(os.environ.get("FUZZ_SCALE", "1"))
"""Multiplies the example counts of the fuzz tests (``nox -s fuzz`` sets it)."""

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
text = st.text(max_size=20)
ints = st.integers(min_value=-(2**53), max_value=2**53)
counts = st.integers(min_value=0, max_value=2**53)
finite = st.floats(allow_nan=False, allow_infinity=False)
# Times and durations at the wire's millisecond precision.
times = st.integers(min_value=0, max_value=253402300799999).map(
    lambda ms: EPOCH + timedelta(milliseconds=ms)
)
durations = st.integers(min_value=0, max_value=10**12).map(lambda ms: ms / 1000)

json_values: st.SearchStrategy[Any] = st.recursive(
    st.none() | st.booleans() | ints | finite | text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(text, inner, max_size=4),
    max_leaves=12,
)
json_objects = st.dictionaries(text, json_values, max_size=4)


def optional(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.none() | strategy


tasks = st.builds(
    Task,
    id=text,
    description=text,
    type=st.sampled_from(TaskType),
    priority=st.sampled_from(TaskPriority),
    status=st.sampled_from(TaskStatus),
    created_at=times,
    updated_at=times,
    assigned_to=optional(text),
    metadata=optional(json_objects),
)
memories = st.builds(
    MemoryEntry,
    id=text,
    content=text,
    timestamp=times,
    type=st.sampled_from(["interaction", "observation", "decision", "knowledge"]),
)
history = st.builds(
    TaskHistoryEntry,
    task_id=text,
    orchestrator_id=text,
    timestamp=times,
    outcome=st.sampled_from(["completed", "failed", "delegated"]),
)
contexts = st.builds(
    SharedContext,
    scratchpad=optional(json_objects),
    episodic=optional(st.lists(memories, max_size=3).map(tuple)),
    semantic=optional(st.lists(memories, max_size=3).map(tuple)),
    task_history=optional(st.lists(history, max_size=3).map(tuple)),
)
structured_capabilities = st.builds(
    OrchestratorCapabilities,
    max_sessions=optional(counts),
    supported_task_types=optional(
        st.lists(st.sampled_from(["code", "research"]), max_size=2).map(tuple)
    ),
    memory_tiers=optional(
        st.lists(st.sampled_from(["scratchpad", "semantic"]), max_size=2).map(tuple)
    ),
    token_budget=optional(json_objects),
    resource_limits=optional(json_objects),
    specializations=optional(st.lists(text, max_size=3).map(tuple)),
)
capability_lists = st.lists(st.sampled_from(Capability), max_size=4).map(tuple)
delegation_requests = st.builds(
    DelegationRequest,
    from_orchestrator_id=text,
    to_orchestrator_id=text,
    task=tasks,
    priority=st.sampled_from(TaskPriority),
    required_capabilities=optional(capability_lists | structured_capabilities),
    context=optional(contexts),
    timeout=optional(durations),
    callback_id=optional(text),
)
delegation_responses = st.builds(
    DelegationResponse,
    task_id=text,
    accepted=st.booleans(),
    reason=optional(text),
    estimated_completion=optional(times),
    assigned_resources=optional(st.builds(AssignedResources, sessions=counts, tokens=counts)),
)
task_callbacks = st.builds(
    TaskCallback,
    task_id=text,
    status=st.sampled_from(CallbackStatus),
    result=json_values,
    error=optional(text),
    progress=optional(finite),
    metadata=optional(json_objects),
)
broadcasts = st.builds(BroadcastPayload, topic=text, data=json_values, ttl=optional(durations))
heartbeats = st.builds(
    HeartbeatPayload,
    orchestrator_id=text,
    timestamp=times,
    status=st.sampled_from(HeartbeatStatus),
    active_connections=counts,
)
healths = st.builds(
    ConnectionHealth,
    status=st.sampled_from(ConnectionStatus),
    uptime=durations,
    last_heartbeat=times,
    messages_sent=counts,
    messages_received=counts,
    errors=counts,
    latency=optional(durations),
)

PAYLOADS_BY_TYPE: dict[MessageType, st.SearchStrategy[Any]] = {
    MessageType.DELEGATION: delegation_requests,
    MessageType.CALLBACK: delegation_responses | task_callbacks,
    MessageType.BROADCAST: broadcasts,
    MessageType.HEARTBEAT: heartbeats,
    MessageType.STATUS: healths,
}


@st.composite
def messages(
    draw: st.DrawFn, message_type: st.SearchStrategy[MessageType] | None = None
) -> FederationMessage:
    kind = draw(st.sampled_from(MessageType) if message_type is None else message_type)
    return FederationMessage(
        type=kind,
        payload=draw(PAYLOADS_BY_TYPE[kind]),
        sender=draw(text),
        recipient=draw(text),
        timestamp=draw(times),
        correlation_id=draw(optional(text)),
    )
