"""Wire format v1: round trips, byte compatibility with the daemon, garbage in."""

from __future__ import annotations

import contextlib
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trio_federation import (
    MAX_FRAME_SIZE,
    BroadcastPayload,
    DelegationRequest,
    DelegationResponse,
    FederationMessage,
    MalformedMessage,
    MessageType,
    OrchestratorCapabilities,
    Task,
    TaskCallback,
    decode_message,
    encode_message,
    make_converter,
)

from . import strategies
from .strategies import FUZZ_SCALE

WHEN = datetime(2026, 11, 26, 12, 0, 0, 123000, tzinfo=UTC)


@given(strategies.messages())
@settings(max_examples=100 * FUZZ_SCALE, suppress_health_check=[HealthCheck.too_slow])
def test_every_message_round_trips(message: FederationMessage) -> None:
    assert decode_message(encode_message(message)) == message


@pytest.mark.parametrize("kind", list(MessageType))
@given(data=st.data())
@settings(max_examples=60)
def test_each_message_type_round_trips(kind: MessageType, data: st.DataObject) -> None:
    message = data.draw(strategies.messages(st.just(kind)))
    wire = encode_message(message)
    envelope = orjson.loads(wire)
    assert envelope["type"] == kind.value
    assert isinstance(envelope["payload"], str)  # the payload travels as a JSON string
    assert decode_message(wire) == message
    # Decoders also accept the payload as an object.
    envelope["payload"] = orjson.loads(envelope["payload"])
    assert decode_message(orjson.dumps(envelope).decode()) == message


@given(strategies.delegation_requests)
def test_payload_classes_round_trip_through_a_fresh_converter(request: DelegationRequest) -> None:
    converter = make_converter()
    assert converter.structure(converter.unstructure(request), DelegationRequest) == request


def test_encoding_is_byte_compatible_with_the_daemon() -> None:
    # What the daemon's JSON.stringify writes for its acceptance callback.
    message = FederationMessage(
        type="callback",
        payload=DelegationResponse(task_id="task-123", accepted=True),
        sender="orch-b",
        recipient="orch-a",
        timestamp=WHEN,
        correlation_id="task-123",
    )
    assert encode_message(message) == (
        '{"type":"callback","payload":"{\\"taskId\\":\\"task-123\\",\\"accepted\\":true}",'
        '"from":"orch-b","to":"orch-a","timestamp":"2026-11-26T12:00:00.123Z",'
        '"correlationId":"task-123"}'
    )
    progress = FederationMessage(
        type="callback",
        payload=TaskCallback(task_id="task-123", status="progress", progress=50.0),
        sender="orch-b",
        recipient="orch-a",
        timestamp=WHEN,
    )
    assert encode_message(progress) == (
        '{"type":"callback","payload":"{\\"taskId\\":\\"task-123\\",\\"status\\":\\"progress\\",'
        '\\"progress\\":50}","from":"orch-b","to":"orch-a",'
        '"timestamp":"2026-11-26T12:00:00.123Z"}'
    )


def test_daemon_frames_decode() -> None:
    # A delegation as the daemon's README example writes it (payload as a string).
    frame = orjson.dumps(
        {
            "type": "delegation",
            "payload": orjson.dumps(
                {
                    "fromOrchestratorId": "local",
                    "toOrchestratorId": "remote-orch-1",
                    "task": {
                        "id": "task-456",
                        "type": "code",
                        "description": "Implement login feature",
                        "priority": "high",
                        "status": "pending",
                        "createdAt": "2026-11-26T12:00:00.000Z",
                        "updatedAt": "2026-11-26T12:00:00.000Z",
                    },
                    "priority": "high",
                    "requiredCapabilities": {
                        "maxSessions": 2,
                        "specializations": ["testing"],
                        "resourceLimits": {"maxHeapMB": 512},
                    },
                    "timeout": 30000,
                    "someFutureField": {"ignored": True},
                }
            ).decode(),
            "from": "local",
            "to": "remote-orch-1",
            "timestamp": "2026-11-26T13:00:00+01:00",
            "correlationId": None,
            "anotherFutureField": 1,
        }
    ).decode()
    message = decode_message(frame)
    assert message.type == "delegation"
    assert message.sender == "local" and message.recipient == "remote-orch-1"
    assert message.timestamp == datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
    assert message.correlation_id is None
    request = message.payload
    assert isinstance(request, DelegationRequest)
    assert request.task == Task(
        id="task-456",
        type="code",
        description="Implement login feature",
        priority="high",
        status="pending",
        created_at=datetime(2026, 11, 26, 12, 0, tzinfo=UTC),
        updated_at=datetime(2026, 11, 26, 12, 0, tzinfo=UTC),
    )
    assert request.timeout == 30.0  # milliseconds on the wire, seconds in Python
    assert request.required_capabilities == OrchestratorCapabilities(
        max_sessions=2, specializations=("testing",), resource_limits={"maxHeapMB": 512}
    )


def test_callback_payloads_are_told_apart_by_shape() -> None:
    base = {"type": "callback", "from": "a", "to": "b", "timestamp": "2026-11-26T12:00:00Z"}
    accepted = decode_message(
        orjson.dumps(
            {**base, "payload": {"taskId": "t", "accepted": False, "reason": "busy"}}
        ).decode()
    )
    assert accepted.payload == DelegationResponse(task_id="t", accepted=False, reason="busy")
    done = decode_message(
        orjson.dumps(
            {**base, "payload": {"taskId": "t", "status": "completed", "result": [1, 2]}}
        ).decode()
    )
    assert done.payload == TaskCallback(task_id="t", status="completed", result=[1, 2])


def test_naive_wire_times_are_utc() -> None:
    frame = orjson.dumps(
        {
            "type": "broadcast",
            "payload": {"topic": "x"},
            "from": "a",
            "to": "b",
            "timestamp": "2026-11-26T12:00:00",
        }
    ).decode()
    assert decode_message(frame).timestamp == datetime(2026, 11, 26, 12, 0, tzinfo=UTC)


def envelope(payload: Any, **changes: Any) -> str:
    frame = {
        "type": "callback",
        "payload": payload,
        "from": "a",
        "to": "b",
        "timestamp": "2026-11-26T12:00:00.000Z",
        **changes,
    }
    return orjson.dumps({k: v for k, v in frame.items() if v is not ...}).decode()


CALLBACK = {"taskId": "t", "status": "progress"}
TASK = {
    "id": "t",
    "type": "code",
    "description": "d",
    "priority": "low",
    "status": "pending",
    "createdAt": "2026-11-26T12:00:00Z",
    "updatedAt": "2026-11-26T12:00:00Z",
}


@pytest.mark.parametrize(
    ("frame", "reason"),
    [
        (b'{"type":"callback"}', "binary frame (19 bytes) where a text frame was expected"),
        ("{", "invalid JSON"),
        ("[1, 2]", "a message must be a JSON object, got an array"),
        ('"text"', "a message must be a JSON object, got a string"),
        (envelope(CALLBACK, type="gossip"), "unknown message type 'gossip'"),
        (envelope(CALLBACK, type=7), "'type' must be a string, got a number"),
        (envelope(CALLBACK, type=...), "missing required key 'type'"),
        (envelope(CALLBACK, **{"from": ...}), "missing required key 'from'"),
        (envelope(CALLBACK, to=None), "'to' must be a string, got null"),
        (envelope(CALLBACK, timestamp="yesterday"), "not an ISO 8601 timestamp: 'yesterday'"),
        (envelope(CALLBACK, timestamp=...), "missing required key 'timestamp'"),
        (envelope(CALLBACK, correlationId=5), "'correlationId' must be a string"),
        (envelope(...), "missing required key 'payload'"),
        (envelope("{oops"), "'payload' holds invalid JSON"),
        (envelope([1]), "'payload' must be an object or a JSON string of one, got an array"),
        (envelope({"taskId": "t"}), "callback payload is neither a DelegationResponse"),
        (
            envelope({"taskId": 5, "status": "progress"}),
            "expected a string, got a number @ payload.taskId",
        ),
        (
            envelope({"taskId": "t", "status": "done"}),
            "'done' is not a valid CallbackStatus (one of: completed, failed, progress, cancel)"
            " @ payload.status",
        ),
        (
            envelope({"taskId": "t", "accepted": "yes"}),
            "expected a boolean, got a string @ payload.accepted",
        ),
        (
            envelope({"taskId": "t", "status": "progress", "progress": "50%"}),
            "expected a number, got a string @ payload.progress",
        ),
        (
            envelope({"taskId": "t", "accepted": True, "estimatedCompletion": "soon"}),
            "not an ISO 8601 timestamp: 'soon' @ payload.estimatedCompletion",
        ),
        (
            envelope({"taskId": "t", "accepted": True, "assignedResources": {"sessions": 1}}),
            "required field missing @ payload.assignedResources.tokens",
        ),
        (
            envelope({"topic": "x", "ttl": -5}, type="broadcast"),
            "expected a duration >= 0 milliseconds, got -5 @ payload.ttl",
        ),
        (
            envelope(
                {
                    "orchestratorId": "a",
                    "timestamp": "2026-11-26T12:00:00Z",
                    "status": "sleepy",
                    "activeConnections": 1,
                },
                type="heartbeat",
            ),
            "'sleepy' is not a valid HeartbeatStatus",
        ),
        (
            envelope(
                {"fromOrchestratorId": "a", "toOrchestratorId": "b", "priority": "low", "task": 5},
                type="delegation",
            ),
            "expected an object (Task), got a number @ payload.task",
        ),
        (
            envelope(
                {
                    "fromOrchestratorId": "a",
                    "toOrchestratorId": "b",
                    "priority": "low",
                    "task": TASK,
                    "requiredCapabilities": "testing",
                },
                type="delegation",
            ),
            "expected an array of capability names or an object, got a string"
            " @ payload.requiredCapabilities",
        ),
        (
            envelope(
                {
                    "fromOrchestratorId": "a",
                    "toOrchestratorId": "b",
                    "priority": "low",
                    "task": TASK,
                    "requiredCapabilities": [1],
                },
                type="delegation",
            ),
            "expected an array of strings, found a number @ payload.requiredCapabilities",
        ),
        ("x" * (MAX_FRAME_SIZE + 1), f"frame of {MAX_FRAME_SIZE + 1} characters exceeds the limit"),
        ("[" * 2000 + "]" * 2000, "invalid JSON"),
    ],
)
def test_malformed_frames_say_what_was_wrong(frame: str | bytes, reason: str) -> None:
    with pytest.raises(MalformedMessage) as info:
        decode_message(frame)
    assert reason in str(info.value)
    assert info.value.reason == str(info.value)


def test_decode_refuses_non_text() -> None:
    with pytest.raises(MalformedMessage, match="expected a text frame, got int"):
        decode_message(5)  # type: ignore[arg-type]


@given(st.text() | st.binary())
@settings(max_examples=150 * FUZZ_SCALE)
def test_garbage_in_only_malformed_out(frame: str | bytes) -> None:
    with contextlib.suppress(MalformedMessage):
        decode_message(frame)


@given(
    kind=st.sampled_from([*MessageType, "other"]),
    payload=strategies.json_values,
    fields=st.dictionaries(
        st.sampled_from(["from", "to", "timestamp", "correlationId"]), strategies.json_values
    ),
    as_string=st.booleans(),
)
@settings(max_examples=150 * FUZZ_SCALE)
def test_hostile_envelopes_only_malformed_or_a_message(
    kind: str, payload: Any, fields: dict[str, Any], as_string: bool
) -> None:
    frame = {
        "type": kind,
        "payload": orjson.dumps(payload).decode() if as_string else payload,
        **fields,
    }
    try:
        message = decode_message(orjson.dumps(frame).decode())
    except MalformedMessage:
        return
    assert isinstance(message, FederationMessage)


@pytest.mark.parametrize("kind", list(MessageType))
@given(data=st.data())
@settings(max_examples=100)
def test_hostile_payload_fields_only_malformed_or_a_message(
    kind: MessageType, data: st.DataObject
) -> None:
    valid = data.draw(strategies.messages(st.just(kind)))
    payload = orjson.loads(orjson.loads(encode_message(valid))["payload"])
    for key in list(payload):
        if data.draw(st.booleans()):
            payload[key] = data.draw(strategies.json_values)
    frame = envelope(orjson.dumps(payload).decode(), type=kind.value)
    with contextlib.suppress(MalformedMessage):
        decode_message(frame)


def test_encode_refuses_unencodable_values() -> None:
    message = FederationMessage(
        type="callback",
        payload=TaskCallback(task_id="t", status="completed", result=object()),
        sender="a",
        recipient="b",
    )
    with pytest.raises(TypeError, match="cannot encode callback payload"):
        encode_message(message)


def test_mappings_and_attrs_values_in_free_form_fields_are_encoded() -> None:
    from types import MappingProxyType

    message = FederationMessage(
        type="callback",
        payload=TaskCallback(
            task_id="t",
            status="completed",
            result={"task": Task(id="x", description="y", created_at=WHEN, updated_at=WHEN)},
            metadata=MappingProxyType({"k": 1}),
        ),
        sender="a",
        recipient="b",
        timestamp=WHEN,
    )
    payload = orjson.loads(orjson.loads(encode_message(message))["payload"])
    assert payload["metadata"] == {"k": 1}
    assert payload["result"]["task"]["createdAt"] == "2026-11-26T12:00:00.123Z"


def test_free_form_datetimes_are_iso_strings() -> None:
    from datetime import timedelta, timezone

    paris = timezone(timedelta(hours=1))
    message = FederationMessage(
        type="callback",
        payload=TaskCallback(
            task_id="t",
            status="completed",
            result={
                "at": datetime(2026, 11, 26, 13, 0, tzinfo=paris),
                "naive": datetime(2026, 11, 26, 12, 0),
            },
        ),
        sender="a",
        recipient="b",
    )
    payload = orjson.loads(orjson.loads(encode_message(message))["payload"])
    assert payload["result"] == {"at": "2026-11-26T12:00:00.000Z", "naive": "2026-11-26T12:00:00"}


def test_string_arrays_must_be_arrays() -> None:
    frame = envelope(
        {
            "fromOrchestratorId": "a",
            "toOrchestratorId": "b",
            "priority": "low",
            "task": TASK,
            "requiredCapabilities": {"supportedTaskTypes": "code"},
        },
        type="delegation",
    )
    with pytest.raises(MalformedMessage, match="expected an array, got a string"):
        decode_message(frame)


def test_converters_from_the_factory_are_independent() -> None:
    first, second = make_converter(), make_converter()
    assert first is not second
    first.register_structure_hook(Task, lambda value, _: "replaced")
    assert first.structure(TASK, Task) == "replaced"
    assert isinstance(second.structure(TASK, Task), Task)
    frame = envelope(
        {"fromOrchestratorId": "a", "toOrchestratorId": "b", "priority": "low", "task": TASK},
        type="delegation",
    )
    assert isinstance(decode_message(frame).payload, DelegationRequest)


def test_out_of_range_times_are_malformed() -> None:
    for when in ("0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00"):
        with pytest.raises(MalformedMessage, match="timestamp out of range"):
            decode_message(envelope(CALLBACK, timestamp=when))


def test_missing_wire_keys_with_python_defaults_are_malformed() -> None:
    with pytest.raises(
        MalformedMessage, match=r"required field missing @ payload\.activeConnections"
    ):
        decode_message(
            envelope(
                {"orchestratorId": "x", "timestamp": "2026-11-26T12:00:00Z", "status": "healthy"},
                type="heartbeat",
            )
        )
    with pytest.raises(
        MalformedMessage, match=r"expected an array, got an object @ payload\.context\.episodic"
    ):
        decode_message(
            envelope(
                {
                    "fromOrchestratorId": "a",
                    "toOrchestratorId": "b",
                    "priority": "low",
                    "task": TASK,
                    "context": {"episodic": {}},
                },
                type="delegation",
            )
        )


def test_free_form_floats_are_written_as_javascript_writes_them() -> None:
    message = FederationMessage(
        type="broadcast",
        payload=BroadcastPayload(topic="t", data={"score": 50.0, "list": [1.0, -0.0, 1.5]}),
        sender="a",
        recipient="b",
        timestamp=WHEN,
    )
    payload = orjson.loads(encode_message(message))["payload"]
    assert payload == '{"topic":"t","data":{"score":50,"list":[1,0,1.5]}}'


def test_task_keys_follow_the_daemons_order() -> None:
    task = Task(
        id="t",
        type="code",
        description="d",
        priority="high",
        status="pending",
        created_at=WHEN,
        updated_at=WHEN,
    )
    message = FederationMessage(
        type="delegation",
        sender="a",
        recipient="b",
        timestamp=WHEN,
        payload=DelegationRequest(
            from_orchestrator_id="a", to_orchestrator_id="b", task=task, priority="high"
        ),
    )
    payload = orjson.loads(orjson.loads(encode_message(message))["payload"])
    assert list(payload["task"]) == [
        "id",
        "type",
        "description",
        "priority",
        "status",
        "createdAt",
        "updatedAt",
    ]
