"""Wire format v1: the TypeScript daemon's JSON envelope, via cattrs and orjson.

One text frame per message::

    {"type": "delegation", "payload": "<payload JSON as a string>", "from": "a",
     "to": "b", "timestamp": "2026-11-26T12:00:00.000Z", "correlationId": "t-1"}

Pure: no I/O. :func:`make_converter` builds a fresh cattrs converter (there is no
mutable global one); the module keeps private instances for its own use. The
payload classes also have hand-written fast paths, pinned to those converters
(see "Fast paths" below).
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any, Final, TypeVar

import attrs
import cattrs
import orjson
from cattrs.errors import AttributeValidationNote, ClassValidationError
from cattrs.gen import make_dict_structure_fn, make_dict_unstructure_fn, override

from .._exceptions import MalformedMessage
from ._messages import (
    PAYLOAD_PARTS,
    AssignedResources,
    BroadcastPayload,
    CallbackStatus,
    Capability,
    ConnectionHealth,
    ConnectionStatus,
    CoordinatorFrame,
    CoordinatorFrameType,
    DelegationRequest,
    DelegationResponse,
    DelegationResult,
    FederationBroadcast,
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

__all__ = [
    "MAX_FRAME_SIZE",
    "decode_frame",
    "decode_message",
    "encode_coordinator_frame",
    "encode_message",
    "make_converter",
]

_T = TypeVar("_T")

MAX_FRAME_SIZE: Final = 1024 * 1024
"""Largest frame, in characters, that is decoded (larger ones are refused first)."""

# Fields with a default in Python (for convenience) that the wire requires.
_WIRE_REQUIRED: Final[dict[type[Any], frozenset[str]]] = {
    Task: frozenset({"type", "priority", "status", "created_at", "updated_at"}),
    DelegationRequest: frozenset({"priority"}),
    HeartbeatPayload: frozenset({"timestamp", "status", "active_connections"}),
    ConnectionHealth: frozenset({"messages_sent", "messages_received", "errors"}),
}

# Fields whose Python value is seconds and whose wire value is milliseconds.
_MILLISECOND_FIELDS: Final[dict[type[Any], tuple[str, ...]]] = {
    DelegationRequest: ("timeout",),
    BroadcastPayload: ("ttl",),
    ConnectionHealth: ("uptime", "latency"),
}


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.capitalize() for part in rest)


def format_timestamp(value: datetime) -> str:
    """ISO 8601 UTC with milliseconds and ``Z``, as JavaScript's ``toISOString``."""
    if value.tzinfo is not UTC:
        value = value.astimezone(UTC)
    # orjson formats four times faster than isoformat(); it writes microseconds
    # (or none when they are zero), JavaScript writes exactly three digits:
    # b'"2026-11-26T12:00:00.123456Z"' or b'"2026-11-26T12:00:00Z"'.
    text = orjson.dumps(value, option=_UTC_Z)
    return text[1:24].decode() + "Z" if len(text) > 22 else text[1:20].decode() + ".000Z"


_UTC_Z: Final = orjson.OPT_UTC_Z


def _structure_timestamp(value: object, _type: object) -> datetime:
    return parse_timestamp(value)


def parse_timestamp(value: object) -> datetime:
    """Parse any ISO 8601 form; a time without an offset is taken as UTC."""
    if not isinstance(value, str):
        raise TypeError(f"expected an ISO 8601 string, got {_json_type(value)}")
    try:
        parsed = datetime.fromisoformat(value)
        if parsed.tzinfo is None:
            return parsed.replace(tzinfo=UTC)
        return parsed.astimezone(UTC)
    except ValueError:
        raise ValueError(f"not an ISO 8601 timestamp: {value[:64]!r}") from None
    except OverflowError:  # a valid form whose UTC time is outside years 1-9999
        raise ValueError(f"timestamp out of range: {value[:64]!r}") from None


def _js_number(value: float) -> float | int:
    """A float as JavaScript writes it: ``50.0`` becomes ``50``."""
    if type(value) is float and value.is_integer() and abs(value) < 2**53:
        return int(value)  # also turns -0.0 into 0, as JSON.stringify does
    return value  # an int passed for a float field, or a fractional float


def _to_ms(seconds: float) -> float | int:
    # Only called for values that are set: None fields are left out.
    return _js_number(round(seconds * 1000, 6))


def _from_ms(value: object, _type: object) -> float | None:
    if value is None:
        return None
    ms = _strict_float(value, float)
    if not ms >= 0:
        raise ValueError(f"expected a duration >= 0 milliseconds, got {value!r}")
    return ms / 1000


def _strict_str(value: object, _type: object) -> str:
    if type(value) is not str:
        raise TypeError(f"expected a string, got {_json_type(value)}")
    return value


def _strict_int(value: object, _type: object) -> int:
    if type(value) is int:
        return value
    if type(value) is float and value.is_integer():
        return int(value)
    raise TypeError(f"expected an integer, got {_json_type(value)}")


def _strict_float(value: object, _type: object) -> float:
    if type(value) is float or type(value) is int:
        return float(value)
    raise TypeError(f"expected a number, got {_json_type(value)}")


def _strict_bool(value: object, _type: object) -> bool:
    if type(value) is not bool:
        raise TypeError(f"expected a boolean, got {_json_type(value)}")
    return value


def _json_object(value: object, _type: object) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise TypeError(f"expected an object, got {_json_type(value)}")
    return value


def _string_tuple(value: object, _type: object) -> tuple[str, ...]:
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"expected an array, got {_json_type(value)}")
    for item in value:
        if not isinstance(item, str):
            raise TypeError(f"expected an array of strings, found {_json_type(item)}")
    return tuple(value)


def _structure_enum(value: object, cls: type[enum.Enum]) -> enum.Enum:
    member = cls._value2member_map_.get(value) if type(value) is str else None
    if member is not None:
        return member
    try:
        return cls(value)
    except ValueError:
        allowed = ", ".join(str(member.value) for member in cls)
        raise ValueError(f"{value!r} is not a valid {cls.__name__} (one of: {allowed})") from None


_ENUMS: Final = (
    Capability,
    CallbackStatus,
    ConnectionStatus,
    HeartbeatStatus,
    MessageType,
    TaskPriority,
    TaskStatus,
    TaskType,
)


def make_converter(*, detailed_validation: bool = True) -> cattrs.Converter:
    """Build a new converter between the message classes and wire dictionaries.

    The dictionaries use the wire's camelCase keys, ISO 8601 strings for times
    and milliseconds for the durations the daemon keeps in milliseconds.
    Structuring is strict (a string is never coerced to a number or back) and
    ignores unknown keys; optional fields that are ``None`` are left out when
    unstructuring, like ``JSON.stringify`` does with ``undefined``.

    Args:
        detailed_validation: collect every failure with its path (cattrs'
            ``ClassValidationError``). Without it, structuring is about twice
            as fast and stops at the first failure; both accept exactly the
            same input.
    """
    conv = cattrs.Converter(detailed_validation=detailed_validation, forbid_extra_keys=False)
    conv.register_structure_hook(str, _strict_str)
    conv.register_structure_hook(int, _strict_int)
    conv.register_structure_hook(float, _strict_float)
    conv.register_structure_hook(bool, _strict_bool)
    conv.register_structure_hook(datetime, _structure_timestamp)
    conv.register_unstructure_hook(datetime, format_timestamp)
    conv.register_unstructure_hook(float, _js_number)
    for enum_class in _ENUMS:
        # By class, not by predicate: a StrEnum would otherwise match the str hook.
        conv.register_structure_hook(enum_class, _structure_enum)
    conv.register_structure_hook_func(lambda t: t == Mapping[str, Any], _json_object)
    conv.register_structure_hook_func(lambda t: t == tuple[str, ...], _string_tuple)
    conv.register_unstructure_hook_func(lambda t: t == Mapping[str, Any], _js_values)

    def required_capabilities(value: object, _type: object) -> object:
        if value is None:
            return None
        if isinstance(value, list):
            return _string_tuple(value, None)
        if isinstance(value, dict):
            return conv.structure(value, OrchestratorCapabilities)
        raise TypeError(
            f"expected an array of capability names or an object, got {_json_type(value)}"
        )

    for cls in PAYLOAD_PARTS:
        ms_fields = _MILLISECOND_FIELDS.get(cls, ())
        struct_overrides: dict[str, Any] = {}
        unstruct_overrides: dict[str, Any] = {}
        for field in attrs.fields(cls):
            kwargs: dict[str, Any] = {"rename": _camel(field.name)}
            unstruct_kwargs: dict[str, Any] = dict(kwargs)
            if field.default is None:
                unstruct_kwargs["omit_if_default"] = True
            if field.name in ms_fields:
                kwargs["struct_hook"] = _from_ms
                unstruct_kwargs["unstruct_hook"] = _to_ms
            elif cls is DelegationRequest and field.name == "required_capabilities":
                kwargs["struct_hook"] = required_capabilities
            elif isinstance(field.type, type) and issubclass(field.type, enum.Enum):
                kwargs["struct_hook"] = _structure_enum
            elif field.type is datetime:
                kwargs["struct_hook"] = _structure_timestamp
            elif field.converter is not None:
                # cattrs would structure such a field by the converter's input
                # type (often Any); structure it strictly by its declared type.
                kwargs["struct_hook"] = _by_declared_type(conv, field.type)
            if field.type is Any or field.type == Mapping[str, Any] | None:
                unstruct_kwargs["unstruct_hook"] = _js_values
            struct_overrides[field.name] = override(**kwargs)
            unstruct_overrides[field.name] = override(**unstruct_kwargs)
        conv.register_structure_hook(
            cls,
            _objects_only(
                make_dict_structure_fn(cls, conv, **struct_overrides),
                tuple(f for f in attrs.fields(cls) if f.name in _WIRE_REQUIRED.get(cls, ())),
            ),
        )
        conv.register_unstructure_hook(
            cls, make_dict_unstructure_fn(cls, conv, **unstruct_overrides)
        )
    for element in (MemoryEntry, TaskHistoryEntry):
        # cattrs makes a tuple of any iterable (a string, an object's keys):
        # the wire has arrays only.
        sequence = tuple[element, ...]  # type: ignore[valid-type]
        conv.register_structure_hook_func(
            _is(sequence), _arrays_only(conv.get_structure_hook(sequence))
        )
    return conv


def _is(expected: Any) -> Callable[[Any], bool]:
    def predicate(candidate: Any) -> bool:
        return bool(candidate == expected)

    return predicate


def _arrays_only(structure: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
    def hook(value: Any, cls: Any) -> Any:
        if not isinstance(value, list):
            raise TypeError(f"expected an array, got {_json_type(value)}")
        return structure(value, cls)

    return hook


def _objects_only(
    structure: Callable[[Any, Any], Any], required: tuple[attrs.Attribute[Any], ...]
) -> Callable[[Any, Any], Any]:
    """Refuse non-objects, and objects without the keys the wire requires."""
    wire_keys = tuple((_camel(field.name), field) for field in required)

    def hook(value: Any, cls: Any) -> Any:
        if not isinstance(value, dict):
            raise TypeError(f"expected an object ({cls.__name__}), got {_json_type(value)}")
        missing = [field for key, field in wire_keys if key not in value]
        if missing:
            raise ClassValidationError(
                f"While structuring {cls.__name__}",
                [_missing_key(cls, field) for field in missing],
                cls,
            )
        return structure(value, cls)

    return hook


def _missing_key(cls: type[Any], field: attrs.Attribute[Any]) -> KeyError:
    # Shaped as cattrs reports a missing key, so transform_error names its path.
    error = KeyError(field.name)
    error.__notes__ = [
        AttributeValidationNote(
            f"Structuring class {cls.__name__} @ attribute {field.name}", field.name, field.type
        )
    ]
    return error


def _by_declared_type(conv: cattrs.Converter, declared: Any) -> Callable[[Any, Any], Any]:
    hook: Callable[[Any, Any], Any] | None = None

    def structure(value: Any, _type: Any) -> Any:
        nonlocal hook
        if hook is None:  # looked up once, on first use: every class is registered by then
            hook = conv.get_structure_hook(declared)
        return hook(value, declared)

    return structure


def _js_values(value: Any) -> Any:
    """Free-form JSON as JavaScript writes it: integral floats without ``.0``.

    ``JSON.stringify`` writes ``50.0`` as ``50`` and ``-0.0`` as ``0``; orjson
    keeps the ``.0``. Walks only containers that hold floats, and returns the
    value itself when nothing needs changing.
    """
    kind = type(value)
    if kind is float:
        return _js_number(value)
    if kind is dict:
        new = {k: _js_values(v) for k, v in value.items()}
        return value if all(new[k] is v for k, v in value.items()) else new
    if kind is list or kind is tuple:
        items = [_js_values(v) for v in value]
        return value if all(a is b for a, b in zip(items, value, strict=True)) else items
    return value


def _orjson_default(value: object) -> object:
    if isinstance(value, datetime):
        return format_timestamp(value) if value.tzinfo is not None else value.isoformat()
    if isinstance(value, Mapping):
        return dict(value)
    if attrs.has(type(value)):
        return _CONVERTER.unstructure(value)
    raise TypeError(f"{type(value).__name__} is not JSON-serializable")


_CONVERTER: Final = make_converter()
# Decoding tries the fast converter first; only a frame it refuses goes through
# the detailed one, which says everything that is wrong with it.
_FAST_CONVERTER: Final = make_converter(detailed_validation=False)
_FAST_STRUCTURE: Final = _FAST_CONVERTER.structure
_UNSTRUCTURE: Final[Callable[[Any], Any]] = _CONVERTER.unstructure
_DUMPS_OPTIONS: Final = orjson.OPT_PASSTHROUGH_DATETIME


def _dumps(value: object) -> bytes:
    return orjson.dumps(value, default=_orjson_default, option=_DUMPS_OPTIONS)


def encode_message(message: FederationMessage) -> str:
    """Encode a message as one v1 text frame.

    The payload is JSON-encoded as a string inside the envelope, keys are
    camelCase, times are ISO 8601 UTC with milliseconds and ``Z``, and
    ``correlationId`` is left out when it is ``None`` — byte for byte what the
    TypeScript daemon writes for the same message.

    Raises:
        TypeError: a free-form field (``result``, ``data``, ``metadata``...)
            holds a value JSON cannot represent.
    """
    payload = message.payload
    unstructure = _FAST_UNSTRUCTURE.get(type(payload))
    if unstructure is None:
        return _encode(message, _UNSTRUCTURE)
    # _encode with the fast unstructuring and time formatting, inline: the
    # calls it saves are a tenth of an encoding.
    try:
        text = orjson.dumps(
            unstructure(payload), default=_orjson_default, option=_DUMPS_OPTIONS
        ).decode()
    except orjson.JSONEncodeError as exc:
        raise TypeError(f"cannot encode {message.type.value} payload: {exc}") from None
    timestamp = message.timestamp
    last = _last_formatted
    envelope: dict[str, str] = {
        "type": message.type,
        "payload": text,
        "from": message.sender,
        "to": message.recipient,
        "timestamp": last[1] if timestamp is last[0] else _format_time(timestamp),
    }
    if message.correlation_id is not None:
        envelope["correlationId"] = message.correlation_id
    return orjson.dumps(envelope).decode()


def _encode(
    message: FederationMessage,
    unstructure: Callable[[Any], Any],
    format_time: Callable[[datetime], str] = format_timestamp,
) -> str:
    """Encode ``message``, turning its payload into a dictionary with ``unstructure``.

    ``format_time`` formats the envelope's timestamp: the fast path passes its
    cached formatter, the reference the plain one.
    """
    try:
        payload = _dumps(unstructure(message.payload)).decode()
    except orjson.JSONEncodeError as exc:
        raise TypeError(f"cannot encode {message.type.value} payload: {exc}") from None
    # The enumeration member itself: orjson writes a StrEnum as its string.
    envelope: dict[str, str] = {
        "type": message.type,
        "payload": payload,
        "from": message.sender,
        "to": message.recipient,
        "timestamp": format_time(message.timestamp),
    }
    if message.correlation_id is not None:
        envelope["correlationId"] = message.correlation_id
    return orjson.dumps(envelope).decode()


_PATH_SEGMENT: Final = re.compile(r"\.([a-z][a-z0-9_]*)")
_PAYLOAD_CLASS: Final[dict[MessageType, type[Any]]] = {
    MessageType.DELEGATION: DelegationRequest,
    MessageType.BROADCAST: BroadcastPayload,
    MessageType.HEARTBEAT: HeartbeatPayload,
    MessageType.STATUS: ConnectionHealth,
}
_MESSAGE_TYPES: Final = {member.value: member for member in MessageType}


def _structure_payload(raw: dict[str, Any], cls: type[Any]) -> Any:
    try:
        return _FAST_STRUCTURE(raw, cls)
    except Exception:  # the detailed pass below reports what was wrong
        # Same hooks, same verdict: this raises a ClassValidationError.
        return _CONVERTER.structure(raw, cls)


def _describe(exc: cattrs.BaseValidationError, where: str) -> str:
    """Every failure in ``exc``, with its path in wire (camelCase) names."""
    text = "; ".join(cattrs.transform_error(exc, path=where, format_exception=_format_error))
    return _PATH_SEGMENT.sub(lambda m: "." + _camel(m.group(1)), text)


def _format_error(exc: BaseException, _type: object) -> str:
    if isinstance(exc, KeyError):
        return "required field missing"
    return str(exc) or type(exc).__name__


def _envelope_str(envelope: Mapping[str, Any], key: str, *, optional: bool = False) -> Any:
    if key not in envelope or (optional and envelope[key] is None):
        if optional:
            return None
        raise MalformedMessage(f"missing required key {key!r}")
    value = envelope[key]
    if type(value) is not str:
        raise MalformedMessage(f"{key!r} must be a string, got {_json_type(value)}")
    return value


def _json_type(value: object) -> str:
    return {
        dict: "an object",
        list: "an array",
        str: "a string",
        int: "a number",
        float: "a number",
        bool: "a boolean",
        type(None): "null",
    }.get(type(value), type(value).__name__)


def decode_message(data: str | bytes, *, max_size: int = MAX_FRAME_SIZE) -> FederationMessage:
    """Decode one v1 text frame into a typed message.

    Accepts the payload as a JSON string (what the daemon writes) or as an
    object, any ISO 8601 timestamp form, and ``correlationId`` missing or null;
    ignores unknown keys. A ``callback`` payload becomes a
    :class:`~trio_federation.DelegationResponse` when it has ``accepted``, else a
    :class:`~trio_federation.TaskCallback`.

    Raises:
        MalformedMessage: for anything else — a binary frame, a frame longer than
            ``max_size`` characters, invalid JSON, an unknown ``type``, missing or
            mistyped fields, bad timestamps — naming what was wrong. No other
            exception escapes.
    """
    if type(data) is str and len(data) <= max_size:  # _load's checks, inline
        try:
            envelope = orjson.loads(data)
        except orjson.JSONDecodeError:
            envelope = _load(data, max_size)  # raises the error naming the fault
    else:
        envelope = _load(data, max_size)
    if type(envelope) is dict:
        message = _decode_fast(envelope)
        if message is not None:
            return message
    return _decode_envelope(envelope)


def _load(data: str | bytes, max_size: int) -> Any:
    """Parse a text frame's JSON (after the checks that need no parsing)."""
    if not isinstance(data, str):
        raise MalformedMessage(
            f"binary frame ({len(data)} bytes) where a text frame was expected"
            if isinstance(data, (bytes, bytearray, memoryview))
            else f"expected a text frame, got {type(data).__name__}"
        )
    if len(data) > max_size:
        raise MalformedMessage(f"frame of {len(data)} characters exceeds the limit of {max_size}")
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise MalformedMessage(f"invalid JSON: {exc}") from None


def _decode_envelope(envelope: object) -> FederationMessage:
    """Decode a parsed frame step by step: the reference the fast path is pinned to.

    Raises:
        MalformedMessage: naming the first thing that is wrong, in the order of
            the checks below.
    """
    if not isinstance(envelope, dict):
        raise MalformedMessage(f"a message must be a JSON object, got {_json_type(envelope)}")
    type_name = _envelope_str(envelope, "type")
    message_type = _MESSAGE_TYPES.get(type_name)
    if message_type is None:
        raise MalformedMessage(
            f"unknown message type {type_name[:64]!r} (one of: {', '.join(_MESSAGE_TYPES)})"
        )
    sender = _envelope_str(envelope, "from")
    recipient = _envelope_str(envelope, "to")
    try:
        timestamp = parse_timestamp(_envelope_str(envelope, "timestamp"))
    except ValueError as exc:
        raise MalformedMessage(f"'timestamp': {exc}") from None
    correlation_id = _envelope_str(envelope, "correlationId", optional=True)
    if "payload" not in envelope:
        raise MalformedMessage("missing required key 'payload'")
    raw_payload = envelope["payload"]
    if type(raw_payload) is str:
        try:
            raw_payload = orjson.loads(raw_payload)
        except orjson.JSONDecodeError as exc:
            raise MalformedMessage(f"'payload' holds invalid JSON: {exc}") from None
    if not isinstance(raw_payload, dict):
        raise MalformedMessage(
            f"'payload' must be an object or a JSON string of one, got {_json_type(raw_payload)}"
        )
    payload_class = _PAYLOAD_CLASS.get(message_type)
    if payload_class is None:  # a callback: tell the two payloads apart by shape
        if "accepted" in raw_payload:
            payload_class = DelegationResponse
        elif "status" in raw_payload:
            payload_class = TaskCallback
        else:
            raise MalformedMessage(
                "callback payload is neither a DelegationResponse (no 'accepted') "
                "nor a TaskCallback (no 'status')"
            )
    try:
        # Detailed validation wraps every failure (of a field or of the class's
        # own converters and validators) in a cattrs validation error.
        payload = _structure_payload(raw_payload, payload_class)
    except cattrs.BaseValidationError as exc:
        raise MalformedMessage(
            f"invalid {message_type.value} payload ({payload_class.__name__}): "
            + _describe(exc, "payload")
        ) from None
    return FederationMessage(
        type=message_type,
        payload=payload,
        sender=sender,
        recipient=recipient,
        timestamp=timestamp,
        correlation_id=correlation_id,
    )


# -- Fast paths -------------------------------------------------------------------------
#
# cattrs' generated functions spend most of an encode or decode in dispatch and
# per-field hook calls. The functions below do the same work by hand for the
# payload classes that travel on every connection. They are not a second
# definition of the format: the converter from make_converter() stays the
# reference, and the fast paths only take the common, valid case.
#
# * Encoding builds, for each payload class, the dictionary the reference
#   converter builds (same keys, same order, same omissions, the same value
#   hooks: format_timestamp, _to_ms, _js_number, _js_values) and hands it to the
#   same orjson.dumps. Enumeration members go to orjson as they are, as cattrs
#   passes them; orjson writes a StrEnum as its string. Shortcuts: the UTC time
#   formatted last is kept with its text and found by identity (_format_time: a
#   delegation's createdAt, updatedAt and often its envelope's timestamp are one
#   datetime, formatted once), whole milliseconds skip _to_ms's round()
#   (_fast_ms), and the last delegation timeout is kept with its milliseconds.
# * Decoding accepts only what is unambiguously valid: exact JSON types, UTC
#   timestamps, known enumeration values. Anything else — including inputs the
#   reference accepts after a conversion (an integral float for an int, a
#   non-UTC offset) — makes _decode_fast return None, and the frame is decoded
#   by _decode_envelope, which also builds every error message. So a refused
#   frame gets exactly the reference's MalformedMessage. Having checked every
#   value itself, it fills the instances' slots without running the attrs
#   __init__ (_builder), and a timestamp equal to the text parsed last shares
#   its datetime (_fast_time).
#
# tests/test_codec_fast.py pins both directions to the reference with
# Hypothesis: identical bytes out, equal messages in, identical errors; every
# fast-decoded instance is one its own __init__ leaves unchanged (and of the
# class itself), the builders' instances are frozen, weak-referenceable and
# picklable, and the kept times and milliseconds give what format_timestamp
# and _to_ms give, for messages and frames in a row. Each shortcut was kept
# only where bench.codec measured a gain (see the Performance section of
# docs/design.rst).


class _NotFast(Exception):
    """The fast path does not take this input; the reference path decides."""


def _builder(cls: type[_T]) -> Callable[..., _T]:
    """A function making a ``cls`` from all its field values, in field order.

    It fills the slots without running the attrs ``__init__``: no converters, no
    validators. Only for the fast path, whose values are already exactly what
    those would produce (tests/test_codec_fast.py rebuilds every fast-decoded
    instance through ``__init__`` and compares). A new field changes the
    function's arity, so a call that misses it fails loudly. The fast path
    calls it positionally: keywords would cost almost as much as the building
    (0.40 against 0.22 µs for a :class:`Task`).

    The instance is born a ``cls`` twin whose attributes are plain slots (a
    subclass adding no slot, with ``object``'s ``__setattr__`` and
    ``__init__``), filled by ordinary assignment, then made a ``cls`` by
    assigning ``__class__`` (which Python allows between types of one layout).
    A frozen class's slots can otherwise be filled only through calls to their
    descriptors' setters, which took more than half of a decode: the twin
    builds a :class:`Task` in 0.2 µs instead of 0.5 µs. Where an interpreter
    refused the assignment, :func:`_setter_builder` stands in.
    """
    names = _slot_names(cls)
    twin = type(
        f"_Mutable{cls.__name__}",
        (cls,),
        {
            "__slots__": (),
            "__setattr__": object.__setattr__,
            "__delattr__": object.__delattr__,
            "__init__": object.__init__,  # twin() costs less than object.__new__(twin)
        },
    )
    namespace: dict[str, Any] = {"cls": cls, "twin": twin}
    lines = [f"def build_{cls.__name__}({', '.join(names)}):", "    self = twin()"]
    lines += [f"    self.{name} = {name}" for name in names]
    lines += ["    self.__class__ = cls", "    return self"]
    exec("\n".join(lines), namespace)  # as attrs itself generates __init__
    build: Callable[..., _T] = namespace[f"build_{cls.__name__}"]
    try:
        if type(build(*names)) is cls:
            return build
    except TypeError:  # pragma: no cover  # "object layout differs": not on 3.11-3.13
        pass
    return _setter_builder(cls)  # pragma: no cover


def _setter_builder(cls: type[_T]) -> Callable[..., _T]:
    """:func:`_builder`'s function, filling each slot through its descriptor."""
    names = _slot_names(cls)
    namespace: dict[str, Any] = {"new": object.__new__, "cls": cls}
    lines = [f"def build_{cls.__name__}({', '.join(names)}):", "    self = new(cls)"]
    for name in names:
        namespace[f"set_{name}"] = cls.__dict__[name].__set__  # the slot's own setter
        lines.append(f"    set_{name}(self, {name})")
    lines.append("    return self")
    exec("\n".join(lines), namespace)
    build: Callable[..., _T] = namespace[f"build_{cls.__name__}"]
    return build


def _slot_names(cls: type[Any]) -> list[str]:
    if "__slots__" not in cls.__dict__ or hasattr(cls, "__attrs_post_init__"):
        raise TypeError(f"{cls.__name__} must be a slotted attrs class without post-init")
    return [field.name for field in attrs.fields(cls)]


_new_task: Final = _builder(Task)
_new_delegation: Final = _builder(DelegationRequest)
_new_response: Final = _builder(DelegationResponse)
_new_resources: Final = _builder(AssignedResources)
_new_callback: Final = _builder(TaskCallback)
_new_broadcast: Final = _builder(BroadcastPayload)
_new_heartbeat: Final = _builder(HeartbeatPayload)
_new_health: Final = _builder(ConnectionHealth)
_new_message: Final = _builder(FederationMessage)


def _fast_time(value: object) -> datetime:
    """A UTC timestamp, kept in :data:`_last_parsed`; anything else is not fast.

    There is no cache by text: live traffic brings new times every message,
    and a cache's upkeep (hashing, inserting, emptying) cost twice the parse.
    """
    global _last_parsed
    if type(value) is str:
        parsed = datetime.fromisoformat(value)
        if parsed.tzinfo is UTC:
            _last_parsed = (value, parsed)
            return parsed
    raise _NotFast


_last_parsed: tuple[object, datetime] = (object(), datetime.min)
"""The UTC timestamp :func:`_fast_time` parsed last, with its text (at first a
key no JSON value equals). A frame's times are usually one text (a new task's
two times, and often its envelope's): the decoders compare with it before
calling. One tuple, replaced whole."""


def _fast_optional_str(value: object) -> str | None:
    if value is None or type(value) is str:
        return value
    raise _NotFast


def _fast_optional_object(value: object) -> dict[str, Any] | None:
    if value is None or type(value) is dict:
        return value
    raise _NotFast


def _fast_seconds(value: object) -> float | None:
    """A wire duration in milliseconds, as seconds (as ``_from_ms`` computes it)."""
    if value is None:
        return None
    if (type(value) is int or type(value) is float) and value >= 0:
        return float(value) / 1000
    raise _NotFast


def _fast_int(value: object) -> int:
    if type(value) is int:
        return value
    raise _NotFast


def _format_time(value: datetime) -> str:
    """:func:`format_timestamp`, keeping the UTC time formatted last with its text.

    A message's times are usually one datetime (a new task's two times, and
    often its envelope's): the encoders check it by identity before calling.
    There is no cache by value: hashing a new aware datetime costs almost as
    much as formatting it, and live traffic brings a new one every message.
    """
    global _last_formatted
    last = _last_formatted
    if value is last[0]:
        return last[1]
    text = format_timestamp(value)
    if value.tzinfo is UTC:  # naive times depend on the local zone: never kept
        _last_formatted = (value, text)
    return text


_last_formatted: tuple[datetime | None, str] = (None, "")
"""The UTC time :func:`_format_time` formatted last, with its text. One tuple,
replaced whole."""


def _members(cls: type[enum.Enum]) -> dict[str, Any]:
    # Indexed with the decoded JSON value: only a string can be found (orjson
    # makes no str subclasses); anything else raises KeyError or TypeError.
    return {member.value: member for member in cls}


_TASK_REQUIRED_KEYS: Final = len(
    {field.name for field in attrs.fields(Task) if field.default is attrs.NOTHING}
    | _WIRE_REQUIRED[Task]
)
"""How many keys a wire task must have (seven: id, type, description,
priority, status, createdAt, updatedAt)."""
_TASK_TYPES: Final = _members(TaskType)
_PRIORITIES: Final = _members(TaskPriority)
_TASK_STATUSES: Final = _members(TaskStatus)
_CALLBACK_STATUSES: Final = _members(CallbackStatus)
_HEARTBEAT_STATUSES: Final = _members(HeartbeatStatus)
_CONNECTION_STATUSES: Final = _members(ConnectionStatus)


def _structure_delegation(raw: dict[str, Any]) -> DelegationRequest:
    # The hottest decode: every check of the helpers above inline, the task's
    # too (a call costs as much as a check).
    task = raw["task"]
    sender = raw["fromOrchestratorId"]
    recipient = raw["toOrchestratorId"]
    timeout = raw.get("timeout")
    callback_id = raw.get("callbackId")
    capabilities = raw.get("requiredCapabilities")
    context = raw.get("context")
    if (
        type(sender) is not str
        or type(recipient) is not str
        or (callback_id is not None and type(callback_id) is not str)
    ):
        raise _NotFast
    if type(capabilities) is list:
        capabilities = tuple(capabilities)
        for name in capabilities:
            if type(name) is not str:
                raise _NotFast
    elif type(capabilities) is dict:  # the daemon's structured form: rare, generic
        capabilities = _FAST_STRUCTURE(capabilities, OrchestratorCapabilities)
    elif capabilities is not None:
        raise _NotFast
    if context is not None:  # rare: the generic (non-detailed) hook
        context = _FAST_STRUCTURE(context, SharedContext)
    if timeout is not None:  # _fast_seconds
        if (type(timeout) is not int and type(timeout) is not float) or not timeout >= 0:
            raise _NotFast
        timeout = float(timeout) / 1000
    last = _last_parsed
    # A task that is not an object fails here: JSON's other values have no keys.
    task_id = task["id"]
    description = task["description"]
    created = task["createdAt"]
    updated = task["updatedAt"]
    if type(task_id) is not str or type(description) is not str:
        raise _NotFast
    if len(task) == _TASK_REQUIRED_KEYS:
        # The seven keys read here and below, and no other: no optional one.
        assigned_to = metadata = None
    else:
        assigned_to = task.get("assignedTo")
        metadata = task.get("metadata")
        if (assigned_to is not None and type(assigned_to) is not str) or (
            metadata is not None and type(metadata) is not dict
        ):
            raise _NotFast
    return _new_delegation(
        sender,
        recipient,
        _new_task(
            task_id,
            _TASK_TYPES[task["type"]],
            description,
            _PRIORITIES[task["priority"]],
            _TASK_STATUSES[task["status"]],
            last[1] if created == last[0] else _fast_time(created),
            last[1] if updated == last[0] else _fast_time(updated),
            assigned_to,
            metadata,
        ),
        _PRIORITIES[raw["priority"]],
        capabilities,
        context,
        timeout,
        callback_id,
    )


def _structure_response(raw: dict[str, Any]) -> DelegationResponse:
    task_id = raw["taskId"]
    accepted = raw["accepted"]
    if type(task_id) is not str or type(accepted) is not bool:
        raise _NotFast
    estimated = raw.get("estimatedCompletion")
    resources = raw.get("assignedResources")
    if resources is not None:
        if type(resources) is not dict:
            raise _NotFast
        resources = _new_resources(_fast_int(resources["sessions"]), _fast_int(resources["tokens"]))
    return _new_response(
        task_id,
        accepted,
        _fast_optional_str(raw.get("reason")),
        None if estimated is None else _fast_time(estimated),
        resources,
    )


def _structure_callback(raw: dict[str, Any]) -> TaskCallback:
    task_id = raw["taskId"]
    if type(task_id) is not str:
        raise _NotFast
    progress = raw.get("progress")
    if type(progress) is int:
        progress = float(progress)
    elif progress is not None and type(progress) is not float:
        raise _NotFast
    return _new_callback(
        task_id,
        _CALLBACK_STATUSES[raw["status"]],
        raw.get("result"),
        _fast_optional_str(raw.get("error")),
        progress,
        _fast_optional_object(raw.get("metadata")),
    )


def _structure_broadcast(raw: dict[str, Any]) -> BroadcastPayload:
    topic = raw["topic"]
    if type(topic) is not str:
        raise _NotFast
    return _new_broadcast(topic, raw.get("data"), _fast_seconds(raw.get("ttl")))


def _structure_heartbeat(raw: dict[str, Any]) -> HeartbeatPayload:
    orchestrator_id = raw["orchestratorId"]
    if type(orchestrator_id) is not str:
        raise _NotFast
    return _new_heartbeat(
        orchestrator_id,
        _fast_time(raw["timestamp"]),
        _HEARTBEAT_STATUSES[raw["status"]],
        _fast_int(raw["activeConnections"]),
    )


def _structure_health(raw: dict[str, Any]) -> ConnectionHealth:
    uptime = _fast_seconds(raw["uptime"])
    if uptime is None:
        raise _NotFast
    return _new_health(
        _CONNECTION_STATUSES[raw["status"]],
        uptime,
        _fast_time(raw["lastHeartbeat"]),
        _fast_int(raw["messagesSent"]),
        _fast_int(raw["messagesReceived"]),
        _fast_int(raw["errors"]),
        _fast_seconds(raw.get("latency")),
    )


_FAST_PAYLOAD: Final[dict[MessageType, Callable[[dict[str, Any]], Any]]] = {
    MessageType.DELEGATION: _structure_delegation,
    MessageType.BROADCAST: _structure_broadcast,
    MessageType.HEARTBEAT: _structure_heartbeat,
    MessageType.STATUS: _structure_health,
}


def _decode_fast(envelope: dict[str, Any]) -> FederationMessage | None:
    """Decode a common, valid frame quickly; ``None`` for anything else.

    ``None`` is no verdict: the caller hands the frame to :func:`_decode_envelope`.
    """
    try:
        message_type = _MESSAGE_TYPES[envelope["type"]]
        sender = envelope["from"]
        recipient = envelope["to"]
        correlation_id = envelope.get("correlationId")
        raw = envelope["payload"]
        if (
            type(sender) is not str
            or type(recipient) is not str
            or (correlation_id is not None and type(correlation_id) is not str)
        ):
            return None
        timestamp = envelope["timestamp"]
        last = _last_parsed
        timestamp = last[1] if timestamp == last[0] else _fast_time(timestamp)
        if type(raw) is str:
            raw = orjson.loads(raw)
        if type(raw) is not dict:
            return None
        structure = _FAST_PAYLOAD.get(message_type)
        if structure is None:  # a callback: told apart by shape, as _decode_envelope does
            if "accepted" in raw:
                structure = _structure_response
            elif "status" in raw:
                structure = _structure_callback
            else:
                return None
        return _new_message(
            message_type, structure(raw), sender, recipient, timestamp, correlation_id
        )
    except Exception:  # _NotFast, a missing key, an unhashable value, invalid JSON...
        return None


def _fast_ms(seconds: float) -> float | int:
    """:func:`_to_ms` without its slow ``round`` when the milliseconds are whole.

    A whole number of milliseconds is what ``round(..., 6)`` leaves unchanged,
    and what ``_js_number`` writes as an integer; anything else takes ``_to_ms``.
    """
    ms = seconds * 1000
    # The bounds are floats: comparing a float with an int takes longer.
    if type(ms) is float and ms.is_integer() and -_EXACT_FLOAT < ms < _EXACT_FLOAT:
        return int(ms)
    return _to_ms(seconds)


_EXACT_FLOAT: Final = float(2**53)
"""Integers up to this are exactly floats, and what ``_js_number`` makes ints."""


_UNSTRUCTURE_CONTEXT: Final = _CONVERTER.get_unstructure_hook(SharedContext)
_last_timeout: tuple[float | None, float | int] = (None, 0)
"""The delegation timeout converted last, with its milliseconds: a delegator's
requests usually share one timeout object (its default). Checked by identity,
so only that very (immutable) number gets them; one tuple, replaced whole."""


def _unstructure_delegation(request: DelegationRequest) -> dict[str, Any]:
    # The hottest encode: the task's dictionary inline.
    global _last_timeout
    task = request.task
    created = task.created_at
    updated = task.updated_at
    last = _last_formatted
    created_text = last[1] if created is last[0] else _format_time(created)
    task_raw: dict[str, Any] = {
        "id": task.id,
        "type": task.type,
        "description": task.description,
        "priority": task.priority,
        "status": task.status,
        "createdAt": created_text,
        # A new task's times are one datetime: formatted once.
        "updatedAt": created_text if updated is created else _format_time(updated),
    }
    if task.assigned_to is not None:
        task_raw["assignedTo"] = task.assigned_to
    # Free-form fields are compared as cattrs' omit_if_default does, with !=.
    if task.metadata != None:  # noqa: E711
        task_raw["metadata"] = _js_values(task.metadata)
    raw: dict[str, Any] = {
        "fromOrchestratorId": request.from_orchestrator_id,
        "toOrchestratorId": request.to_orchestrator_id,
        "task": task_raw,
        "priority": request.priority,
    }
    capabilities = request.required_capabilities
    if capabilities is not None:
        # A tuple of strings (the attrs converter checked them) is written as an
        # array as it is; the structured form goes through the converter.
        raw["requiredCapabilities"] = (
            capabilities if type(capabilities) is tuple else _UNSTRUCTURE(capabilities)
        )
    if request.context is not None:
        raw["context"] = _UNSTRUCTURE_CONTEXT(request.context)
    timeout = request.timeout
    if timeout is not None:
        known = _last_timeout
        if timeout is not known[0]:
            known = _last_timeout = (timeout, _fast_ms(timeout))
        raw["timeout"] = known[1]
    if request.callback_id is not None:
        raw["callbackId"] = request.callback_id
    return raw


def _unstructure_response(response: DelegationResponse) -> dict[str, Any]:
    raw: dict[str, Any] = {"taskId": response.task_id, "accepted": response.accepted}
    if response.reason is not None:
        raw["reason"] = response.reason
    if response.estimated_completion is not None:
        raw["estimatedCompletion"] = _format_time(response.estimated_completion)
    resources = response.assigned_resources
    if resources is not None:
        raw["assignedResources"] = {"sessions": resources.sessions, "tokens": resources.tokens}
    return raw


def _unstructure_callback(callback: TaskCallback) -> dict[str, Any]:
    raw: dict[str, Any] = {"taskId": callback.task_id, "status": callback.status}
    if callback.result != None:  # noqa: E711
        raw["result"] = _js_values(callback.result)
    if callback.error is not None:
        raw["error"] = callback.error
    if callback.progress is not None:
        raw["progress"] = _js_number(callback.progress)
    if callback.metadata != None:  # noqa: E711
        raw["metadata"] = _js_values(callback.metadata)
    return raw


def _unstructure_broadcast(broadcast: BroadcastPayload) -> dict[str, Any]:
    raw: dict[str, Any] = {"topic": broadcast.topic}
    if broadcast.data != None:  # noqa: E711
        raw["data"] = _js_values(broadcast.data)
    if broadcast.ttl is not None:
        raw["ttl"] = _fast_ms(broadcast.ttl)
    return raw


def _unstructure_heartbeat(heartbeat: HeartbeatPayload) -> dict[str, Any]:
    return {
        "orchestratorId": heartbeat.orchestrator_id,
        "timestamp": _format_time(heartbeat.timestamp),
        "status": heartbeat.status,
        "activeConnections": heartbeat.active_connections,
    }


def _unstructure_health(health: ConnectionHealth) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "status": health.status,
        "uptime": _fast_ms(health.uptime),
        "lastHeartbeat": _format_time(health.last_heartbeat),
        "messagesSent": health.messages_sent,
        "messagesReceived": health.messages_received,
        "errors": health.errors,
    }
    if health.latency is not None:
        raw["latency"] = _fast_ms(health.latency)
    return raw


_FAST_UNSTRUCTURE: Final[dict[type[Any], Callable[[Any], dict[str, Any]]]] = {
    DelegationRequest: _unstructure_delegation,
    DelegationResponse: _unstructure_response,
    TaskCallback: _unstructure_callback,
    BroadcastPayload: _unstructure_broadcast,
    HeartbeatPayload: _unstructure_heartbeat,
    ConnectionHealth: _unstructure_health,
}


# -- The daemon coordinator's dialect ------------------------------------------------------
#
# Single-encoded frames (the object itself, not a JSON string inside an
# envelope), told apart from the envelope by their ``type``. "heartbeat" is in
# both: the coordinator's is a bare {"type": "heartbeat"}, so a frame with
# that type is the coordinator's only when it has neither "from" nor
# "payload" (an envelope always has both). decode_message() never returns
# these: the envelope path, its fast path and their differential tests are
# untouched; decode_frame() dispatches before them.

_COORDINATOR_TYPES: Final = {member.value: member for member in CoordinatorFrameType}


def decode_frame(
    data: str | bytes, *, max_size: int = MAX_FRAME_SIZE
) -> FederationMessage | CoordinatorFrame:
    """Decode one text frame of either dialect.

    A frame whose ``type`` is one of the daemon coordinator's
    (:class:`~trio_federation.CoordinatorFrameType`) becomes a
    :class:`~trio_federation.CoordinatorFrame` (its ``sender`` is left empty:
    the connection knows the peer); anything else is decoded exactly as
    :func:`decode_message` does.

    Raises:
        MalformedMessage: as :func:`decode_message`, or a coordinator frame
            without the keys its type requires, naming what was wrong.
    """
    envelope = _load(data, max_size)
    if type(envelope) is dict:
        kind = envelope.get("type")
        if (
            type(kind) is str
            and kind in _COORDINATOR_TYPES
            and (kind != "heartbeat" or ("from" not in envelope and "payload" not in envelope))
        ):
            return _decode_coordinator(_COORDINATOR_TYPES[kind], envelope)
        message = _decode_fast(envelope)
        if message is not None:
            return message
    return _decode_envelope(envelope)


def _part(frame: dict[str, Any], key: str, cls: type[Any], kind: str) -> Any:
    """Structure the object under ``key`` as ``cls``; MalformedMessage when it is not one."""
    if key not in frame or frame[key] is None:
        raise MalformedMessage(f"{kind!r} frame: missing required key {key!r}")
    try:
        return _structure_payload(dict(_json_object(frame[key], None)), cls)
    except TypeError as exc:
        raise MalformedMessage(f"{kind!r} frame: {key!r} {exc}") from None
    except cattrs.BaseValidationError as exc:
        raise MalformedMessage(f"invalid {kind!r} frame: " + _describe(exc, key)) from None


def _optional_str(raw: Mapping[str, Any], key: str, where: str) -> str | None:
    value = raw.get(key)
    if value is not None and type(value) is not str:
        raise MalformedMessage(f"{where}.{key} must be a string, got {_json_type(value)}")
    return value


def _decode_coordinator(kind: CoordinatorFrameType, frame: dict[str, Any]) -> CoordinatorFrame:
    name = kind.value
    if kind is CoordinatorFrameType.DELEGATION_REQUEST:
        request = _part(frame, "request", DelegationRequest, name)
        return CoordinatorFrame(type=kind, request=request)
    if kind is CoordinatorFrameType.CONTEXT_RESPONSE:
        return CoordinatorFrame(type=kind, context=_part(frame, "context", SharedContext, name))
    if kind in (CoordinatorFrameType.CONTEXT_REQUEST, CoordinatorFrameType.HEARTBEAT):
        return CoordinatorFrame(type=kind)
    if kind is CoordinatorFrameType.DELEGATION_RESULT:
        request_id = _optional_str(frame, "requestId", name)
        if request_id is None:
            raise MalformedMessage(f"{name!r} frame: missing required key 'requestId'")
        raw = frame.get("result")
        if type(raw) is not dict:
            raise MalformedMessage(f"{name!r} frame: 'result' must be an object")
        success = raw.get("success")
        if type(success) is not bool:
            raise MalformedMessage(f"{name!r} frame: 'result.success' must be a boolean")
        metadata = raw.get("metadata")
        try:
            timestamp = parse_timestamp(raw["timestamp"]) if "timestamp" in raw else None
        except (TypeError, ValueError) as exc:
            raise MalformedMessage(f"{name!r} frame: 'result.timestamp': {exc}") from None
        result = DelegationResult(
            success=success,
            session_id=_optional_str(raw, "sessionId", "result"),
            error=_optional_str(raw, "error", "result"),
            reason=_optional_str(raw, "reason", "result"),
            metadata=metadata if type(metadata) is dict else None,
            **({} if timestamp is None else {"timestamp": timestamp}),
        )
        return CoordinatorFrame(type=kind, request_id=request_id, result=result)
    if kind is CoordinatorFrameType.BROADCAST:
        raw = frame.get("broadcast")
        if type(raw) is not dict:
            raise MalformedMessage(f"{name!r} frame: 'broadcast' must be an object")
        source = _optional_str(raw, "sourceId", "broadcast")
        message_type = _optional_str(raw, "messageType", "broadcast")
        if source is None or message_type is None:
            raise MalformedMessage(f"{name!r} frame: 'broadcast' needs sourceId and messageType")
        payload = raw.get("payload")
        try:
            broadcast = FederationBroadcast(
                source_id=source,
                message_type=message_type,
                payload=payload if type(payload) is dict else {},
                priority=raw.get("priority") or TaskPriority.MEDIUM,
                **(
                    {"timestamp": parse_timestamp(raw["timestamp"])}
                    if raw.get("timestamp") is not None
                    else {}
                ),
            )
        except (TypeError, ValueError) as exc:
            raise MalformedMessage(f"invalid {name!r} frame: {exc}") from None
        return CoordinatorFrame(type=kind, broadcast=broadcast)
    # task:completed, task:failed, status_update: a "payload" object.
    raw = frame.get("payload")
    if type(raw) is not dict:
        raise MalformedMessage(f"{name!r} frame: 'payload' must be an object")
    data = {k: v for k, v in raw.items() if k not in ("sessionId", "error", "status")}
    if kind is CoordinatorFrameType.STATUS_UPDATE:
        status = _optional_str(raw, "status", "payload")
        if status is None:
            raise MalformedMessage(f"{name!r} frame: missing required key 'payload.status'")
        return CoordinatorFrame(type=kind, status=status, data=data or None)
    session_id = _optional_str(raw, "sessionId", "payload")
    if session_id is None:
        raise MalformedMessage(f"{name!r} frame: missing required key 'payload.sessionId'")
    return CoordinatorFrame(
        type=kind,
        session_id=session_id,
        error=_optional_str(raw, "error", "payload"),
        data=data or None,
    )


def encode_coordinator_frame(frame: CoordinatorFrame) -> str:
    """Encode a frame of the daemon coordinator's dialect, single-encoded.

    Keys in the order the daemon writes them; optional ones left out when
    ``None``, as ``JSON.stringify`` leaves out ``undefined``.

    Raises:
        TypeError: a free-form field holds a value JSON cannot represent.
    """
    kind = frame.type
    out: dict[str, Any] = {"type": kind}
    if kind is CoordinatorFrameType.DELEGATION_REQUEST:
        assert frame.request is not None
        out["request"] = _unstructure_delegation(frame.request)
    elif kind is CoordinatorFrameType.DELEGATION_RESULT:
        result = frame.result
        assert result is not None
        raw: dict[str, Any] = {"success": result.success}
        for key, value in (
            ("sessionId", result.session_id),
            ("error", result.error),
            ("reason", result.reason),
        ):
            if value is not None:
                raw[key] = value
        raw["timestamp"] = format_timestamp(result.timestamp)
        if result.metadata is not None:
            raw["metadata"] = _js_values(dict(result.metadata))
        out["requestId"] = frame.request_id
        out["result"] = raw
    elif kind is CoordinatorFrameType.BROADCAST:
        broadcast = frame.broadcast
        assert broadcast is not None
        out["broadcast"] = {
            "sourceId": broadcast.source_id,
            "messageType": broadcast.message_type,
            "payload": _js_values(dict(broadcast.payload)),
            "priority": broadcast.priority,
            "timestamp": format_timestamp(broadcast.timestamp),
        }
    elif kind is CoordinatorFrameType.CONTEXT_RESPONSE:
        assert frame.context is not None
        out["context"] = _UNSTRUCTURE_CONTEXT(frame.context)
    elif kind in (
        CoordinatorFrameType.TASK_COMPLETED,
        CoordinatorFrameType.TASK_FAILED,
        CoordinatorFrameType.STATUS_UPDATE,
    ):
        payload: dict[str, Any] = {}
        if kind is CoordinatorFrameType.STATUS_UPDATE:
            payload["status"] = frame.status
        else:
            payload["sessionId"] = frame.session_id
            if frame.error is not None:
                payload["error"] = frame.error
        if frame.data is not None:
            payload.update((k, _js_values(v)) for k, v in frame.data.items() if k not in payload)
        out["payload"] = payload
    try:
        return _dumps(out).decode()
    except orjson.JSONEncodeError as exc:
        raise TypeError(f"cannot encode a {kind.value!r} frame: {exc}") from None
