"""Authentication at the WebSocket upgrade: pure functions and state, no I/O.

The proof a dialer sends (``X-Federation-Auth`` request header, or ``?auth=``
in the URL for clients that cannot set headers)::

    v1;ts=<Unix time, ms>;nonce=<16 random bytes, base64url>;aud=<listener id,
    %-quoted>;mac=<base64url>

(one line, no spaces)

where ``mac`` is HMAC-SHA256, keyed by the secret shared between the dialer's
id and the listener, over::

    "trio-federation-auth-v1" LF <dialer id> LF <aud> LF <ts> LF <nonce>

The listener recomputes it, compares in constant time, refuses a ``ts`` more
than the proof lifetime away from its clock, and remembers every nonce for
that long so that a captured proof cannot be replayed. It answers with its own
proof (``X-Federation-Auth: v1;mac=...``, HMAC over
``"trio-federation-auth-v1-listener" LF <listener id> LF <dialer id> LF <nonce>``),
so the dialer knows the listener holds the secret too. The secret itself never
crosses the wire.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import urllib.parse
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any, Final

import attrs

__all__ = [
    "AUTH_HEADER",
    "DEFAULT_PROOF_LIFETIME",
    "DEFAULT_REPLAY_CACHE_SIZE",
    "MIN_SECRET_BYTES",
    "AuthRefusal",
    "ReplayCache",
    "SecretLookup",
    "TokenVerifier",
    "certificate_id",
    "check_listener_proof",
    "listener_proof",
    "make_proof",
    "normalize_secret",
    "secret_lookup",
]

AUTH_HEADER: Final = "X-Federation-Auth"
"""Header carrying the proofs, in the request (dialer) and the response (listener)."""
DEFAULT_PROOF_LIFETIME: Final = 30.0
"""Seconds a dialer's proof stays valid either side of the listener's clock."""
DEFAULT_REPLAY_CACHE_SIZE: Final = 65_536
"""Nonces a listener remembers; beyond it, new handshakes wait for old ones to expire."""
MIN_SECRET_BYTES: Final = 16
"""Shortest shared secret accepted."""

_VERSION: Final = "v1"
_DIALER_CONTEXT: Final = b"trio-federation-auth-v1"
_LISTENER_CONTEXT: Final = b"trio-federation-auth-v1-listener"
_NONCE_BYTES: Final = 16
_MAX_PROOF_LENGTH: Final = 1024

SecretLookup = Callable[[str], "bytes | str | None"]
"""A callable giving the secret shared with an orchestrator id, or None if unknown."""


class AuthRefusal(Exception):
    """Why a dialer's credentials were refused: the HTTP status and the reason."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(status, reason)
        self.status = status
        self.reason = reason


def normalize_secret(secret: bytes | str, whose: str) -> bytes:
    """The secret as bytes, refusing what is too short to be one.

    Raises:
        TypeError: not bytes or str.
        ValueError: shorter than ``MIN_SECRET_BYTES``.
    """
    if isinstance(secret, str):
        secret = secret.encode()
    if not isinstance(secret, bytes):
        raise TypeError(f"the secret for {whose} must be bytes or str, got {type(secret).__name__}")
    if len(secret) < MIN_SECRET_BYTES:
        raise ValueError(
            f"the secret for {whose} is {len(secret)} bytes; at least {MIN_SECRET_BYTES} are needed"
        )
    return secret


def secret_lookup(secrets: Mapping[str, bytes | str] | SecretLookup) -> Callable[[str], bytes]:
    """One lookup from a mapping (checked now) or a callable (checked per call).

    The returned function raises :exc:`AuthRefusal` (403) for an unknown id.
    """
    if isinstance(secrets, Mapping):
        table = {peer: normalize_secret(s, repr(peer)) for peer, s in secrets.items()}

        def from_table(peer_id: str) -> bytes:
            try:
                return table[peer_id]
            except KeyError:
                raise AuthRefusal(403, f"unknown orchestrator {peer_id!r}") from None

        return from_table
    if not callable(secrets):
        raise TypeError(
            f"secrets must be a mapping of id to secret or a callable, got {type(secrets).__name__}"
        )
    lookup = secrets

    def from_callable(peer_id: str) -> bytes:
        found = lookup(peer_id)
        if found is None:
            raise AuthRefusal(403, f"unknown orchestrator {peer_id!r}")
        return normalize_secret(found, repr(peer_id))

    return from_callable


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _dialer_mac(secret: bytes, peer_id: str, audience: str, ts: str, nonce: str) -> bytes:
    message = b"\n".join(
        (_DIALER_CONTEXT, peer_id.encode(), audience.encode(), ts.encode(), nonce.encode())
    )
    return hmac.digest(secret, message, hashlib.sha256)


def make_proof(
    secret: bytes, *, peer_id: str, audience: str, now: float, nonce: bytes | None = None
) -> str:
    """The proof a dialer named ``peer_id`` sends to the listener ``audience``.

    Args:
        secret: the shared secret.
        peer_id: the dialer's orchestrator id.
        audience: the listener's id, or "" when the dialer does not know it
            (the proof is then valid at any listener holding this secret).
        now: Unix time, in seconds.
        nonce: 16 random bytes (fresh ones by default).
    """
    ts = str(int(now * 1000))
    nonce_text = _b64(os.urandom(_NONCE_BYTES) if nonce is None else nonce)
    mac = _dialer_mac(secret, peer_id, audience, ts, nonce_text)
    aud = urllib.parse.quote(audience, safe="")
    return f"{_VERSION};ts={ts};nonce={nonce_text};aud={aud};mac={_b64(mac)}"


def _parse(proof: str) -> dict[str, str]:
    if len(proof) > _MAX_PROOF_LENGTH:
        raise AuthRefusal(401, f"the {AUTH_HEADER} proof is longer than {_MAX_PROOF_LENGTH}")
    version, _, rest = proof.strip().partition(";")
    if version != _VERSION:
        raise AuthRefusal(
            401, f"the {AUTH_HEADER} proof has version {version[:16]!r}; expected {_VERSION!r}"
        )
    fields: dict[str, str] = {}
    for part in rest.split(";"):
        key, sep, value = part.strip().partition("=")
        if not sep:
            raise AuthRefusal(401, f"malformed {AUTH_HEADER} proof field {part[:32]!r}")
        fields[key] = value
    return fields


@attrs.define
class ReplayCache:
    """The nonces seen within their proof's lifetime, bounded in number.

    Each entry lives until its proof would expire anyway. When ``max_size``
    unexpired nonces are held, new proofs are refused (503) until some expire:
    a flood of handshakes cannot grow it.
    """

    max_size: int = DEFAULT_REPLAY_CACHE_SIZE
    _expiry: OrderedDict[str, float] = attrs.field(factory=OrderedDict, init=False)

    def __len__(self) -> int:
        return len(self._expiry)

    def _prune(self, now: float) -> None:
        # Entries go in roughly by expiry: drop the expired head in O(1) each,
        # and sweep the whole table only when it is full.
        while self._expiry:
            nonce = next(iter(self._expiry))
            if self._expiry[nonce] >= now:
                break
            del self._expiry[nonce]
        if len(self._expiry) >= self.max_size:
            for nonce in [n for n, expiry in self._expiry.items() if expiry < now]:
                del self._expiry[nonce]

    def add(self, nonce: str, expiry: float, now: float) -> None:
        """Remember ``nonce`` until ``expiry``.

        Raises:
            AuthRefusal: the nonce was seen before (403), or the cache is full
                of unexpired nonces (503).
        """
        self._prune(now)
        if nonce in self._expiry:
            raise AuthRefusal(403, "replayed proof: this nonce was already used")
        if len(self._expiry) >= self.max_size:
            raise AuthRefusal(503, "too many recent handshakes; retry shortly")
        self._expiry[nonce] = expiry


@attrs.define
class TokenVerifier:
    """Checks dialers' proofs for one listener."""

    lookup: Callable[[str], bytes]
    listener_id: str
    lifetime: float = DEFAULT_PROOF_LIFETIME
    replay: ReplayCache = attrs.field(factory=ReplayCache)

    def verify(self, peer_id: str, proof: str | None, now: float) -> tuple[bytes, str]:
        """Check ``proof`` from ``peer_id`` at Unix time ``now``.

        Returns:
            The shared secret and the proof's nonce (for the listener's answer).

        Raises:
            AuthRefusal: 401 when there is no well-formed proof, 403 when it is
                wrong, expired, replayed, for another listener or from an
                unknown orchestrator, 503 when the replay cache is full.
        """
        if proof is None:
            raise AuthRefusal(
                401, f"authentication required: send a proof in the {AUTH_HEADER} header"
            )
        fields = _parse(proof)
        try:
            ts, nonce, aud, mac_text = (fields[k] for k in ("ts", "nonce", "aud", "mac"))
        except KeyError as exc:
            raise AuthRefusal(401, f"the {AUTH_HEADER} proof has no {exc.args[0]!r}") from None
        try:
            issued = int(ts) / 1000
            mac = _unb64(mac_text)
            if len(_unb64(nonce)) != _NONCE_BYTES:
                raise ValueError("bad nonce length")
        except (ValueError, binascii.Error):
            raise AuthRefusal(401, f"malformed {AUTH_HEADER} proof") from None
        audience = urllib.parse.unquote(aud)
        secret = self.lookup(peer_id)
        expected = _dialer_mac(secret, peer_id, audience, ts, nonce)
        if not hmac.compare_digest(mac, expected):
            raise AuthRefusal(403, f"wrong proof for {peer_id!r}: the secret does not match")
        if audience not in ("", self.listener_id):
            raise AuthRefusal(403, f"the proof is for the listener {audience!r}, not this one")
        if abs(now - issued) > self.lifetime:
            raise AuthRefusal(
                403,
                f"expired proof: issued {now - issued:+.0f}s from now, "
                f"valid for {self.lifetime:g}s (check the clocks)",
            )
        self.replay.add(nonce, issued + self.lifetime, now)
        return secret, nonce


def listener_proof(secret: bytes, *, listener_id: str, peer_id: str, nonce: str) -> str:
    """The listener's answer proving it holds the secret too."""
    message = b"\n".join(
        (_LISTENER_CONTEXT, listener_id.encode(), peer_id.encode(), nonce.encode())
    )
    return f"{_VERSION};mac={_b64(hmac.digest(secret, message, hashlib.sha256))}"


def check_listener_proof(
    answer: str | None, secret: bytes, *, listener_id: str, peer_id: str, proof: str
) -> None:
    """Check the listener's answer to our ``proof``.

    Raises:
        AuthRefusal: the listener sent no answer, or a wrong one.
    """
    if answer is None:
        raise AuthRefusal(
            0, f"the listener did not prove it holds our secret (no {AUTH_HEADER} answer)"
        )
    nonce = _parse(proof)["nonce"]
    expected = listener_proof(secret, listener_id=listener_id, peer_id=peer_id, nonce=nonce)
    if not hmac.compare_digest(answer.strip().encode(), expected.encode()):
        raise AuthRefusal(0, f"the listener {listener_id!r} answered with a wrong proof")


def certificate_id(certificate: Mapping[str, Any] | None) -> str | None:
    """The orchestrator id a TLS client certificate names.

    The subject's commonName if it has one, else its first DNS or URI
    subjectAltName. ``certificate`` is :meth:`ssl.SSLSocket.getpeercert`'s dict.
    """
    if not certificate:
        return None
    for rdn in certificate.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    for kind, value in certificate.get("subjectAltName", ()):
        if kind in ("DNS", "URI"):
            return str(value)
    return None
