"""Identification at the WebSocket upgrade: pure helpers, no I/O."""

from __future__ import annotations

import urllib.parse
from collections.abc import Iterable, Sequence
from typing import Final

import attrs

__all__ = [
    "BATCH_EXTENSION",
    "CAPABILITIES_HEADER",
    "EXTENSIONS",
    "EXTENSIONS_HEADER",
    "ID_HEADER",
    "PROTOCOL_HEADER",
    "PROTOCOL_VERSION",
    "PeerIdentity",
    "extensions_header",
    "header_value",
    "identity_headers",
    "parse_request_identity",
    "parse_response_identity",
    "query_value",
]

ID_HEADER: Final = "X-Federation-Id"
"""Header carrying an orchestrator's id, in the request and in the response."""
CAPABILITIES_HEADER: Final = "X-Federation-Capabilities"
"""Header carrying an orchestrator's capabilities, comma-separated."""
PROTOCOL_HEADER: Final = "X-Federation-Protocol"
"""Header carrying the highest wire-protocol version the sender speaks."""
PROTOCOL_VERSION: Final = "1"
"""The wire-protocol version of this release."""
EXTENSIONS_HEADER: Final = "X-Federation-Extensions"
"""Header listing protocol extensions: offered by a dialer, granted by a listener."""
BATCH_EXTENSION: Final = "batch"
"""The extension for several envelopes in one WebSocket frame (see the protocol page)."""
EXTENSIONS: Final = frozenset({"cancel", BATCH_EXTENSION})
"""The extensions this release speaks (see the protocol page)."""

MAX_ID_LENGTH: Final = 256
"""Longest orchestrator id accepted at the handshake."""


@attrs.frozen
class PeerIdentity:
    """Who the other side said it is at the upgrade."""

    id: str | None
    capabilities: tuple[str, ...]
    protocol: str | None = None
    extensions: frozenset[str] = frozenset()


def identity_headers(local_id: str, capabilities: Iterable[str]) -> list[tuple[bytes, bytes]]:
    """The headers that present ``local_id`` and ``capabilities``."""
    return [
        (ID_HEADER.encode(), local_id.encode()),
        (CAPABILITIES_HEADER.encode(), ",".join(capabilities).encode()),
        (PROTOCOL_HEADER.encode(), PROTOCOL_VERSION.encode()),
    ]


def extensions_header(names: Iterable[str]) -> tuple[bytes, bytes]:
    """The header announcing ``names`` (sorted, comma-separated)."""
    return (EXTENSIONS_HEADER.encode(), ",".join(sorted(names)).encode())


def _split(value: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in value.split(",") if part.strip())


def _headers(headers: Iterable[tuple[bytes, bytes]]) -> dict[str, str]:
    result: dict[str, str] = {}
    for name, value in headers:
        result[name.decode("latin-1").lower()] = value.decode("utf-8", "replace")
    return result


def header_value(headers: Iterable[tuple[bytes, bytes]], name: str) -> str | None:
    """The value of header ``name`` (case-insensitive), or None."""
    return _headers(headers).get(name.lower())


def query_value(target: str, name: str) -> str | None:
    """The first value of the query parameter ``name`` of a request target, or None."""
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(target).query, keep_blank_values=True)
    values = query.get(name)
    return values[0] if values else None


def _check_id(value: str | None, where: str) -> str | None:
    if value is None:
        return None
    value = value.strip()
    if not value:
        raise ValueError(f"empty orchestrator id in {where}")
    if len(value) > MAX_ID_LENGTH:
        raise ValueError(f"orchestrator id in {where} is longer than {MAX_ID_LENGTH} characters")
    if not value.isprintable():
        raise ValueError(f"orchestrator id in {where} has non-printable characters")
    return value


def parse_request_identity(headers: Iterable[tuple[bytes, bytes]], target: str) -> PeerIdentity:
    """Who a dialer is: headers first, else the ``?id=`` and ``?capabilities=`` query.

    Raises:
        ValueError: an id is present but empty, too long or not printable.
    """
    values = _headers(headers)
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(target).query, keep_blank_values=True)
    peer_id = values.get(ID_HEADER.lower())
    where = f"the {ID_HEADER} header"
    if peer_id is None and "id" in query:
        peer_id, where = query["id"][0], "the ?id= query parameter"
    capabilities = values.get(CAPABILITIES_HEADER.lower())
    if capabilities is None:
        capabilities = ",".join(query.get("capabilities", ()))
    return PeerIdentity(
        id=_check_id(peer_id, where),
        capabilities=_split(capabilities),
        protocol=values.get(PROTOCOL_HEADER.lower()),
        extensions=frozenset(_split(values.get(EXTENSIONS_HEADER.lower(), ""))),
    )


def parse_response_identity(headers: Sequence[tuple[bytes, bytes]]) -> PeerIdentity:
    """Who a listener is, from its upgrade response (id None if it did not say)."""
    values = _headers(headers)
    return PeerIdentity(
        id=_check_id(values.get(ID_HEADER.lower()), f"the {ID_HEADER} response header"),
        capabilities=_split(values.get(CAPABILITIES_HEADER.lower(), "")),
        protocol=values.get(PROTOCOL_HEADER.lower()),
        extensions=frozenset(_split(values.get(EXTENSIONS_HEADER.lower(), ""))),
    )
