"""The codec's fast paths, pinned to the reference path they stand in for.

``encode_message`` and ``decode_message`` take hand-written fast paths for the
payload classes (see the comment above ``_NotFast`` in ``_codec``). The reference
is a converter from ``make_converter()`` for encoding and ``_decode_envelope`` for
decoding. Results are compared with ``repr`` as well as ``==``: ``50 == 50.0``
and ``"code" == TaskType.CODE``, but the reprs differ.
"""

from __future__ import annotations

import contextlib
import json
import pickle
import weakref
from datetime import UTC, datetime, timedelta, timezone
from types import MappingProxyType
from typing import Any

import attrs
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trio_federation import (
    AssignedResources,
    BroadcastPayload,
    Capability,
    ConnectionHealth,
    DelegationRequest,
    DelegationResponse,
    FederationMessage,
    HeartbeatPayload,
    MalformedMessage,
    OrchestratorCapabilities,
    SharedContext,
    Task,
    TaskCallback,
    decode_message,
    encode_message,
    make_converter,
)
from trio_federation._wire import _codec
from trio_federation._wire._codec import (
    _camel,
    _decode_envelope,
    _decode_fast,
    _encode,
    _fast_ms,
    _format_time,
    _setter_builder,
    _to_ms,
    format_timestamp,
)
from trio_federation._wire._messages import PAYLOAD_PARTS

from . import strategies
from .strategies import FUZZ_SCALE

WHEN = datetime(2026, 11, 26, 12, 0, 0, 123000, tzinfo=UTC)
REFERENCE = make_converter()


def reference_encode(message: FederationMessage) -> str:
    return _encode(message, REFERENCE.unstructure)


def outcome(decode: Any, frame: str) -> tuple[str, str]:
    """What decoding ``frame`` gives: the message's repr, or the error's text."""
    try:
        return ("message", repr(decode(frame)))
    except MalformedMessage as exc:
        return ("error", str(exc))


def reference_decode(frame: str) -> FederationMessage:
    return _decode_envelope(orjson.loads(frame))


def wire_dict(message: FederationMessage) -> dict[str, Any]:
    envelope: dict[str, Any] = orjson.loads(encode_message(message))
    envelope["payload"] = orjson.loads(envelope["payload"])
    return envelope


# -- encoding -------------------------------------------------------------------------


@given(strategies.messages())
@settings(max_examples=150 * FUZZ_SCALE, suppress_health_check=[HealthCheck.too_slow])
def test_fast_encoding_writes_the_reference_bytes(message: FederationMessage) -> None:
    assert encode_message(message) == reference_encode(message)


def _message(payload: Any, kind: str) -> FederationMessage:
    return FederationMessage(
        type=kind, payload=payload, sender="a", recipient="b", timestamp=WHEN, correlation_id="c"
    )


TASK = Task(id="t", description="d", created_at=WHEN, updated_at=WHEN)
ODD_BUT_VALID = [
    # Capability names as plain strings, and as members.
    DelegationRequest(
        from_orchestrator_id="a", to_orchestrator_id="b", task=TASK, required_capabilities=["x"]
    ),
    DelegationRequest(
        from_orchestrator_id="a",
        to_orchestrator_id="b",
        task=TASK,
        required_capabilities=(Capability.TESTING, "custom"),
        timeout=0.0001,
        callback_id="cb",
    ),
    DelegationRequest(
        from_orchestrator_id="a",
        to_orchestrator_id="b",
        task=Task(
            id="t",
            description="d",
            assigned_to="x",
            metadata=MappingProxyType({"score": 50.0}),
            created_at=datetime(2026, 1, 1, 13, tzinfo=timezone(timedelta(hours=1))),
            updated_at=datetime(2026, 1, 1, 12, 0, 0, 999999, tzinfo=UTC),
        ),
        required_capabilities=OrchestratorCapabilities(max_sessions=2, specializations=("a",)),
        context=SharedContext(scratchpad={"k": [1.0, -0.0]}),
        timeout=12.5,
    ),
    DelegationResponse(
        task_id="t",
        accepted=False,
        reason="",
        estimated_completion=WHEN,
        assigned_resources=AssignedResources(sessions=1, tokens=2),
    ),
    TaskCallback(task_id="t", status="progress", progress=50),
    TaskCallback(task_id="t", status="progress", progress=-0.0, error="", metadata={}),
    TaskCallback(
        task_id="t",
        status="completed",
        result={"at": WHEN, "naive": datetime(2026, 1, 1), "task": TASK, "n": 1e300},
    ),
    TaskCallback(task_id="t", status="completed", result=[], metadata={"x": 2.0**60}),
    TaskCallback(task_id="t", status="completed", result=[0.0, 50.0, {"x": -0.0}]),
    BroadcastPayload(topic="t", data=False, ttl=0),
    BroadcastPayload(topic="t", data=0.0),
    HeartbeatPayload(orchestrator_id="o", timestamp=WHEN, active_connections=2**53),
    ConnectionHealth(status="active", uptime=1e-7, last_heartbeat=WHEN, latency=0.0012345),
]
KINDS = {
    DelegationRequest: "delegation",
    DelegationResponse: "callback",
    TaskCallback: "callback",
    BroadcastPayload: "broadcast",
    HeartbeatPayload: "heartbeat",
    ConnectionHealth: "status",
}


@pytest.mark.parametrize("payload", ODD_BUT_VALID, ids=lambda p: type(p).__name__)
def test_fast_encoding_of_odd_values_writes_the_reference_bytes(payload: Any) -> None:
    message = _message(payload, KINDS[type(payload)])
    assert encode_message(message) == reference_encode(message)
    assert outcome(decode_message, encode_message(message)) == outcome(
        reference_decode, encode_message(message)
    )


@pytest.mark.parametrize(
    "payload",
    [
        TaskCallback(task_id="t", status="completed", result=object()),
        BroadcastPayload(topic="t", data={"big": 2**64}),
        HeartbeatPayload(orchestrator_id="o", timestamp=WHEN, active_connections=2**64),
    ],
    ids=lambda p: type(p).__name__,
)
def test_fast_encoding_refuses_what_the_reference_refuses(payload: Any) -> None:
    message = _message(payload, KINDS[type(payload)])
    with pytest.raises(TypeError) as fast:
        encode_message(message)
    with pytest.raises(TypeError) as reference:
        reference_encode(message)
    assert str(fast.value) == str(reference.value)


# -- decoding -------------------------------------------------------------------------


@given(strategies.messages(), st.booleans())
@settings(max_examples=150 * FUZZ_SCALE, suppress_health_check=[HealthCheck.too_slow])
def test_valid_frames_take_the_fast_path_to_the_reference_result(
    message: FederationMessage, payload_as_object: bool
) -> None:
    frame = encode_message(message)
    if payload_as_object:
        frame = orjson.dumps(wire_dict(message)).decode()
    fast = _decode_fast(orjson.loads(frame))
    assert fast is not None  # a valid frame never needs the reference path
    reference = reference_decode(frame)
    assert (fast, repr(fast)) == (reference, repr(reference))
    assert repr(decode_message(frame)) == repr(reference)


def attrs_instances(value: Any) -> list[Any]:
    """``value`` and every attrs instance inside it, depth first."""
    if attrs.has(type(value)):
        found = [value]
        for field in attrs.fields(type(value)):
            found += attrs_instances(getattr(value, field.name))
        return found
    if isinstance(value, (tuple, list)):
        return [inner for item in value for inner in attrs_instances(item)]
    return []


@given(strategies.messages(), st.booleans())
@settings(max_examples=100 * FUZZ_SCALE, suppress_health_check=[HealthCheck.too_slow])
def test_fast_decoded_instances_are_what_their_own_init_makes(
    message: FederationMessage, payload_as_object: bool
) -> None:
    # The fast path fills the slots without running __init__: every instance it
    # builds must be one that __init__ (converters, validators) leaves unchanged.
    frame = encode_message(message)
    if payload_as_object:
        frame = orjson.dumps(wire_dict(message)).decode()
    fast = _decode_fast(orjson.loads(frame))
    assert fast is not None
    for instance in attrs_instances(fast):
        assert type(instance) in (*PAYLOAD_PARTS, FederationMessage)  # never a builder's twin
        rebuilt = attrs.evolve(instance)
        assert (rebuilt, repr(rebuilt)) == (instance, repr(instance))
        assert [type(getattr(rebuilt, f.name)) for f in attrs.fields(type(instance))] == [
            type(getattr(instance, f.name)) for f in attrs.fields(type(instance))
        ]


BUILDERS: dict[type[Any], Any] = {
    Task: _codec._new_task,
    DelegationRequest: _codec._new_delegation,
    DelegationResponse: _codec._new_response,
    AssignedResources: _codec._new_resources,
    TaskCallback: _codec._new_callback,
    BroadcastPayload: _codec._new_broadcast,
    HeartbeatPayload: _codec._new_heartbeat,
    ConnectionHealth: _codec._new_health,
    FederationMessage: _codec._new_message,
}


def test_every_builder_is_tested() -> None:
    builders = {name for name in vars(_codec) if name.startswith("_new_")}
    assert len(builders) == len(BUILDERS)


@pytest.mark.parametrize("cls", list(BUILDERS), ids=lambda cls: cls.__name__)
def test_builders_make_frozen_instances_of_the_class_itself(cls: type[Any]) -> None:
    # The fast builder fills a mutable twin and then assigns __class__; the
    # fallback fills the slots through their setters. Both must make what an
    # __init__ makes: an instance of the class itself, frozen, weak-referenceable
    # and picklable, holding the values given, in field order.
    values = [f"value {index}" for index in range(len(attrs.fields(cls)))]
    for build in (BUILDERS[cls], _setter_builder(cls)):
        instance = build(*values)
        assert type(instance) is cls
        assert [getattr(instance, field.name) for field in attrs.fields(cls)] == values
        with pytest.raises(attrs.exceptions.FrozenInstanceError):
            setattr(instance, attrs.fields(cls)[0].name, None)
        assert weakref.ref(instance)() is instance
        copy = pickle.loads(pickle.dumps(instance))
        assert type(copy) is cls
        assert [getattr(copy, field.name) for field in attrs.fields(cls)] == values


@given(
    st.datetimes(
        min_value=datetime(1, 1, 2),
        max_value=datetime(9999, 12, 30),
        timezones=st.none() | st.just(UTC) | st.timezones(),  # type: ignore[arg-type]
    )
)
def test_time_formatting_is_javascripts(value: datetime) -> None:
    # toISOString: UTC, exactly three fraction digits, "Z".
    expected = value.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    assert format_timestamp(value) == expected
    # Twice: the second call may be answered by the time formatted last.
    assert _format_time(value) == expected
    assert _format_time(value) == expected


@given(
    st.floats(allow_nan=False)
    | st.integers(min_value=0, max_value=10**12).map(lambda ms: ms / 1000)
    | st.integers(min_value=0, max_value=2**60)
)
def test_fast_milliseconds_are_the_reference_milliseconds(seconds: float) -> None:
    fast, reference = _fast_ms(seconds), _to_ms(seconds)
    assert (fast, type(fast), repr(fast)) == (reference, type(reference), repr(reference))


def test_the_times_of_a_new_message_are_formatted_once(monkeypatch: pytest.MonkeyPatch) -> None:
    # A new task's two times and its message's are one datetime: one formatting.
    calls: list[datetime] = []

    def counting(value: datetime) -> str:
        calls.append(value)
        return format_timestamp(value)

    monkeypatch.setattr(_codec, "format_timestamp", counting)
    times = [datetime(2031, 1, 1, 0, 0, seconds, 5000, tzinfo=UTC) for seconds in range(3)]
    for when in times:
        task = Task(id="t", description="d", created_at=when, updated_at=when)
        request = DelegationRequest(from_orchestrator_id="a", to_orchestrator_id="b", task=task)
        message = FederationMessage(
            type="delegation", payload=request, sender="a", recipient="b", timestamp=when
        )
        frame = encode_message(message)
        assert frame.count(format_timestamp(when)) == 1 + 2  # the envelope's, the payload's
        assert frame == reference_encode(message)
    assert calls == times


# Equal numbers that the wire writes differently (2**50 s stays an integer, its
# float is written as a float), and one number object reused, as a default is.
TIMEOUT = 300.0
TIMEOUTS = [TIMEOUT, TIMEOUT, 300, 2**50, 2.0**50, 0.0001, 1e-7, 0.0, -0.0, float("inf")]


@given(
    st.lists(
        st.sampled_from(TIMEOUTS) | st.floats(min_value=0) | st.integers(0, 2**53),
        min_size=1,
        max_size=6,
    )
)
def test_timeouts_in_a_row_encode_as_the_reference(timeouts: list[float]) -> None:
    # The encoder keeps the last timeout's milliseconds, found again by identity.
    for timeout in timeouts:
        request = DelegationRequest(
            from_orchestrator_id="a", to_orchestrator_id="b", task=TASK, timeout=timeout
        )
        message = _message(request, "delegation")
        assert encode_message(message) == reference_encode(message)


def _delegation_frame(timestamp: Any, created: Any, updated: Any) -> str:
    """A delegation frame with these three times (the envelope's, the task's two)."""
    task = {
        "id": "t-1",
        "type": "code",
        "description": "d",
        "priority": "high",
        "status": "pending",
        "createdAt": created,
        "updatedAt": updated,
    }
    payload = {"fromOrchestratorId": "a", "toOrchestratorId": "b", "task": task, "priority": "high"}
    envelope = {
        "type": "delegation",
        "payload": json.dumps(payload),
        "from": "a",
        "to": "b",
        "timestamp": timestamp,
    }
    return json.dumps(envelope)


def test_repeated_times_decode_as_the_reference_decodes_them() -> None:
    # The second decoding and the equal times inside one frame come from the
    # parse cache; equal instants written differently must not share an entry.
    for stamp in ("2026-11-26T12:00:00.123Z", "2026-11-26T12:00:00.123+00:00"):
        frame = _delegation_frame(stamp, stamp, "2026-11-26T12:00:00.123Z")
        for _ in range(2):
            fast = _decode_fast(orjson.loads(frame))
            reference = reference_decode(frame)
            assert fast is not None
            assert (fast, repr(fast)) == (reference, repr(reference))


# One instant written several ways, a near miss, a non-UTC offset, and non-strings.
STAMPS = [
    "2026-11-26T12:00:00.123Z",
    "2026-11-26T12:00:00.123+00:00",
    "2026-11-26T12:00:00.123000Z",
    "2026-11-26T12:00:00.124Z",
    "2026-11-26T13:00:00.123+01:00",
    "2026-11-26T12:00:00.123",
    "",
    None,
    5,
    ["2026-11-26T12:00:00.123Z"],
]


@given(st.lists(st.tuples(*[st.sampled_from(STAMPS)] * 3), min_size=1, max_size=6))
def test_times_in_a_row_decode_as_the_reference_decodes_them(
    stamps: list[tuple[Any, Any, Any]],
) -> None:
    # The decoder compares each time with the text it parsed last (then looks
    # in the cache): frames in a row, each with its envelope's and its task's
    # two times drawn from the same few texts.
    for timestamp, created, updated in stamps:
        frame = _delegation_frame(timestamp, created, updated)
        assert outcome(decode_message, frame) == outcome(reference_decode, frame)


TASK_KEYS = ["id", "type", "description", "priority", "status", "createdAt", "updatedAt"]


@pytest.mark.parametrize("missing", [None, *TASK_KEYS])
@pytest.mark.parametrize(
    "extra", [{}, {"assignedTo": 5}, {"metadata": []}, {"assignedTo": "x"}, {"other": 1}]
)
def test_a_task_of_seven_keys_decodes_as_the_reference(
    missing: str | None, extra: dict[str, Any]
) -> None:
    # The decoder reads no optional key from a task of exactly seven keys once
    # it has found the seven it requires: a required key given up for another
    # one keeps the count and must still be refused, or decoded, as the
    # reference does.
    task = {
        "id": "t-1",
        "type": "code",
        "description": "d",
        "priority": "high",
        "status": "pending",
        "createdAt": "2026-11-26T12:00:00.123Z",
        "updatedAt": "2026-11-26T12:00:00.123Z",
    }
    if missing is not None:
        del task[missing]
    task |= extra
    payload = {"fromOrchestratorId": "a", "toOrchestratorId": "b", "task": task, "priority": "low"}
    envelope = {
        "type": "delegation",
        "payload": payload,
        "from": "a",
        "to": "b",
        "timestamp": "2026-11-26T12:00:00Z",
    }
    frame = json.dumps(envelope)
    assert outcome(decode_message, frame) == outcome(reference_decode, frame)
    if missing is None and extra in ({}, {"assignedTo": "x"}, {"other": 1}):
        assert _decode_fast(orjson.loads(frame)) is not None


# Values that sit on the edges the fast path checks: JSON types the reference
# converts (integral floats, ints for floats), other offsets, naive times,
# out-of-range and negative numbers, near-miss enumeration values.
TRICKY_VALUES: list[Any] = [
    None,
    True,
    False,
    0,
    -1,
    5,
    5.0,
    -0.0,
    2.5,
    -2.5,
    2**64,
    10**300,
    1e308,
    "",
    "code",
    "CODE",
    "high",
    "pending",
    "progress",
    "healthy",
    "active",
    "testing",
    "2026-11-26T12:00:00Z",
    "2026-11-26T12:00:00.123+00:00",
    "2026-11-26T13:00:00+01:00",
    "2026-11-26T12:00:00",
    "2026-11-26",
    "0001-01-01T00:00:00+01:00",
    "yesterday",
    [],
    ["testing"],
    ["testing", 1],
    {},
    {"sessions": 1, "tokens": 2},
    {"sessions": 1.0, "tokens": 2},
    {"maxSessions": 2},
    {"episodic": []},
]
VALUES = st.sampled_from(TRICKY_VALUES) | strategies.json_values


# Every wire key of every payload class, to add where a valid message left it out.
PAYLOAD_KEYS = sorted(
    {
        key
        for payload in ODD_BUT_VALID
        for key in wire_dict(_message(payload, KINDS[type(payload)]))["payload"]
    }
    | {"assignedTo", "metadata", "context", "callbackId", "result", "data", "latency", "ttl"}
)


@st.composite
def mutated(draw: st.DrawFn, value: Any, rate: int) -> Any:
    """``value`` with some keys of its objects (at any depth) deleted, replaced or added.

    Each key is deleted with probability 1/(4 rate), replaced with 2/(4 rate),
    and each object gains a key with probability 1/rate.
    """
    if not isinstance(value, dict):
        return value
    result = {}
    for key, item in value.items():
        action = draw(st.integers(0, 4 * rate - 1))
        if action == 0:
            continue  # delete
        if action in (1, 2):
            result[key] = draw(VALUES)
        else:
            result[key] = draw(mutated(item, rate))
    if draw(st.integers(0, rate - 1)) == 0:
        result[draw(st.sampled_from(PAYLOAD_KEYS))] = draw(VALUES)
    return result


@given(data=st.data())
@settings(max_examples=250 * FUZZ_SCALE, suppress_health_check=[HealthCheck.too_slow])
def test_mutated_frames_decode_as_the_reference_decodes_them(data: st.DataObject) -> None:
    envelope = wire_dict(data.draw(strategies.messages()))
    payload = data.draw(mutated(envelope.pop("payload"), rate=2))
    envelope = data.draw(mutated(envelope, rate=8))
    envelope["payload"] = json.dumps(payload) if data.draw(st.booleans()) else payload
    frame = json.dumps(envelope)  # orjson cannot write integers past 64 bits
    assert outcome(decode_message, frame) == outcome(reference_decode, frame)


def _paths(value: Any, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """The path of every key in ``value``'s objects, at any depth."""
    if not isinstance(value, dict):
        return []
    paths = []
    for key, item in value.items():
        paths.append((*prefix, key))
        paths.extend(_paths(item, (*prefix, key)))
    return paths


def _replaced(value: dict[str, Any], path: tuple[str, ...], new: Any) -> dict[str, Any]:
    copy = dict(value)
    if len(path) == 1:
        if new is ...:
            del copy[path[0]]
        else:
            copy[path[0]] = new
    else:
        copy[path[0]] = _replaced(copy[path[0]], path[1:], new)
    return copy


@pytest.mark.parametrize("payload", ODD_BUT_VALID, ids=lambda p: type(p).__name__)
def test_every_field_with_every_edge_value_decodes_as_the_reference(payload: Any) -> None:
    # Exhaustive over the edge values (and removal) for every key at any depth.
    envelope = wire_dict(_message(payload, KINDS[type(payload)]))
    for field in attrs.fields(type(payload)):  # every key, so that each is replaced
        envelope["payload"].setdefault(_camel(field.name), None)
    for path in _paths(envelope):
        for new in [..., *TRICKY_VALUES]:
            frame = json.dumps(_replaced(envelope, path, new))
            assert outcome(decode_message, frame) == outcome(reference_decode, frame), (path, new)


@given(st.text() | strategies.json_values.map(lambda v: orjson.dumps(v).decode()))
@settings(max_examples=300)
def test_garbage_gets_the_reference_error(frame: str) -> None:
    with contextlib.suppress(orjson.JSONDecodeError):
        orjson.loads(frame)
        assert outcome(decode_message, frame) == outcome(reference_decode, frame)
