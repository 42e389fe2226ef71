"""Settings shared by the dialer, the listener and the node: frozen, keyword-only.

In the spirit of httpx's ``Limits`` and ``Timeout``: a handful of named
values travel as one object instead of a dozen keywords forwarded by hand.
:func:`~trio_federation.open_orchestrator_connection`,
:func:`~trio_federation.serve_federation` and
:func:`~trio_federation.open_federation_node` accept ``timeouts=`` and
``limits=``; the individual keywords of the first two keep working.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Final

import attrs

from .._wire._codec import MAX_FRAME_SIZE
from ._connection import (
    DEFAULT_DISCONNECT_TIMEOUT,
    DEFAULT_HEARTBEAT_TIMEOUT,
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_MAX_QUEUE_SIZE,
    DEFAULT_MAX_SUBSCRIPTIONS,
    DEFAULT_MAX_VIOLATIONS,
    DEFAULT_RATE_BURST,
    DEFAULT_RATE_LIMIT,
    DEFAULT_RECEIVE_BUFFER,
)

__all__ = [
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_HANDSHAKE_TIMEOUT",
    "DEFAULT_MAX_CONNECTIONS",
    "DEFAULT_RESUME_TIMEOUT",
    "Limits",
    "Timeouts",
    "resolve_settings",
]

# A connection's defaults live in _connection; a dialer's and a listener's here
# (re-exported by _transport): each value once.
DEFAULT_CONNECT_TIMEOUT: Final = 10.0
"""Seconds a dial may take (TCP, TLS and the upgrade)."""
DEFAULT_HANDSHAKE_TIMEOUT: Final = 10.0
"""Seconds a listener waits for a dialer's TLS handshake and upgrade request."""
DEFAULT_RESUME_TIMEOUT: Final = 60.0
"""Seconds a listener keeps a resumable session whose peer is gone."""
DEFAULT_MAX_CONNECTIONS: Final = 1024
"""Connections (open or pending) one listener holds at once."""


def _seconds(_instance: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{attribute.name} must be a number of seconds, got {value!r}")
    if not value > 0 or not math.isfinite(value):
        raise ValueError(f"{attribute.name} must be a positive number of seconds, got {value!r}")


def _optional_seconds(instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if value is not None:
        _seconds(instance, attribute, value)  # type: ignore[arg-type]


def _resume_seconds(instance: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if value != 0:  # 0 turns resumable sessions off on a listener
        _seconds(instance, attribute, value)


def _count(_instance: object, attribute: attrs.Attribute[Any], value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{attribute.name} must be an int, got {value!r}")
    if value < 1:
        raise ValueError(f"{attribute.name} must be at least 1, got {value!r}")


def _optional_rate(_instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if value is not None and (
        isinstance(value, bool) or not isinstance(value, int | float) or not value > 0
    ):
        raise ValueError(f"{attribute.name} must be a positive number or None, got {value!r}")


@attrs.frozen(kw_only=True)
class Timeouts:
    """The protocol timers of a connection, a listener and a node, in seconds.

    Attributes:
        heartbeat: without a liveness signal for this long a connection is
            ``degraded``; pings go out every half of it.
        disconnect: bound on a graceful disconnect.
        idle: without data messages for this long ``active`` turns ``idle``.
        connect: bound on a dial (TCP, TLS and the upgrade).
        handshake: how long a listener waits for a dialer's upgrade.
        dead: without a liveness signal for this long the peer is presumed
            dead (None: the connection's default, see
            :class:`~trio_federation.OrchestratorConnection`).
        resume: how long a listener keeps a resumable session whose peer is
            gone (0 turns sessions off).
    """

    heartbeat: float = attrs.field(default=DEFAULT_HEARTBEAT_TIMEOUT, validator=_seconds)
    disconnect: float = attrs.field(default=DEFAULT_DISCONNECT_TIMEOUT, validator=_seconds)
    idle: float = attrs.field(default=DEFAULT_IDLE_TIMEOUT, validator=_seconds)
    connect: float = attrs.field(default=DEFAULT_CONNECT_TIMEOUT, validator=_seconds)
    handshake: float = attrs.field(default=DEFAULT_HANDSHAKE_TIMEOUT, validator=_seconds)
    dead: float | None = attrs.field(default=None, validator=_optional_seconds)
    resume: float = attrs.field(default=DEFAULT_RESUME_TIMEOUT, validator=_resume_seconds)


@attrs.frozen(kw_only=True)
class Limits:
    """The bounds of a connection and a listener.

    Attributes:
        max_queue_size: outgoing messages that may wait to be written.
        receive_buffer_size: incoming data messages buffered per stream.
        max_message_size: longest frame decoded, in characters.
        rate_limit: incoming messages a second a peer may send on average
            (None: no limit).
        rate_burst: messages a peer may send at once above the rate.
        max_violations: refused messages before the peer is cut off (1008).
        max_subscriptions: subscriptions open at once on one connection.
        max_connections: connections one listener holds at once.
    """

    max_queue_size: int = attrs.field(default=DEFAULT_MAX_QUEUE_SIZE, validator=_count)
    receive_buffer_size: int = attrs.field(default=DEFAULT_RECEIVE_BUFFER, validator=_count)
    max_message_size: int = attrs.field(default=MAX_FRAME_SIZE, validator=_count)
    rate_limit: float | None = attrs.field(default=DEFAULT_RATE_LIMIT, validator=_optional_rate)
    rate_burst: int = attrs.field(default=DEFAULT_RATE_BURST, validator=_count)
    max_violations: int = attrs.field(default=DEFAULT_MAX_VIOLATIONS, validator=_count)
    max_subscriptions: int = attrs.field(default=DEFAULT_MAX_SUBSCRIPTIONS, validator=_count)
    max_connections: int = attrs.field(default=DEFAULT_MAX_CONNECTIONS, validator=_count)


# keyword of the connection layer -> (settings class, field)
_KEYWORDS: Final[Mapping[str, tuple[type[Timeouts] | type[Limits], str]]] = {
    "heartbeat_timeout": (Timeouts, "heartbeat"),
    "disconnect_timeout": (Timeouts, "disconnect"),
    "idle_timeout": (Timeouts, "idle"),
    "connect_timeout": (Timeouts, "connect"),
    "handshake_timeout": (Timeouts, "handshake"),
    "dead_timeout": (Timeouts, "dead"),
    "resume_timeout": (Timeouts, "resume"),
    "max_queue_size": (Limits, "max_queue_size"),
    "receive_buffer_size": (Limits, "receive_buffer_size"),
    "max_message_size": (Limits, "max_message_size"),
    "rate_limit": (Limits, "rate_limit"),
    "rate_burst": (Limits, "rate_burst"),
    "max_violations": (Limits, "max_violations"),
    "max_subscriptions": (Limits, "max_subscriptions"),
    "max_connections": (Limits, "max_connections"),
}
_DEFAULTS: Final = {Timeouts: Timeouts(), Limits: Limits()}


def resolve_settings(
    timeouts: Timeouts | None, limits: Limits | None, **keywords: Any
) -> tuple[Timeouts, Limits]:
    """Merge settings objects with the individual keywords of the connection layer.

    A keyword left at its default takes the settings object's value; one
    given with another value overrides the default of a missing settings
    object. Giving both a settings object and a non-default keyword for the
    same value is ambiguous and refused.

    Raises:
        TypeError: a settings argument has the wrong type, a keyword is
            unknown, or a value is given both ways.
    """
    if timeouts is not None and not isinstance(timeouts, Timeouts):
        raise TypeError(f"timeouts must be a Timeouts, got {type(timeouts).__name__}")
    if limits is not None and not isinstance(limits, Limits):
        raise TypeError(f"limits must be a Limits, got {type(limits).__name__}")
    given: dict[type[Any], Any] = {Timeouts: timeouts, Limits: limits}
    changes: dict[type[Any], dict[str, Any]] = {Timeouts: {}, Limits: {}}
    for keyword, value in keywords.items():
        try:
            kind, field = _KEYWORDS[keyword]
        except KeyError:
            raise TypeError(f"unknown setting {keyword!r}") from None
        if value == getattr(_DEFAULTS[kind], field):
            continue
        if given[kind] is not None:
            raise TypeError(
                f"{keyword}= and {kind.__name__.lower()}= both set {field!r}: give one of them"
            )
        changes[kind][field] = value
    # Keywords are checked where they are used, with their own names in the
    # errors, as before settings objects existed.
    with attrs.validators.disabled():
        return (
            timeouts if timeouts is not None else Timeouts(**changes[Timeouts]),
            limits if limits is not None else Limits(**changes[Limits]),
        )
