"""The sans-IO authentication core: proofs, their checks, the replay cache."""

from __future__ import annotations

from pathlib import Path

import pytest

from trio_federation._wire._auth import (
    AuthRefusal,
    ReplayCache,
    TokenVerifier,
    certificate_id,
    check_listener_proof,
    listener_proof,
    make_proof,
    normalize_secret,
    secret_lookup,
)

SECRET = b"0123456789abcdef-secret"
NOW = 1_800_000_000.0


def verifier(**options: object) -> TokenVerifier:
    return TokenVerifier(secret_lookup({"orch-a": SECRET}), "orch-b", **options)  # type: ignore[arg-type]


def refusal(function: object, *args: object, **kwargs: object) -> AuthRefusal:
    with pytest.raises(AuthRefusal) as info:
        function(*args, **kwargs)  # type: ignore[operator]
    return info.value


def test_a_proof_is_accepted_once_and_answered() -> None:
    check = verifier()
    proof = make_proof(SECRET, peer_id="orch-a", audience="orch-b", now=NOW)
    assert SECRET.decode() not in proof  # the secret never crosses the wire
    secret, nonce = check.verify("orch-a", proof, NOW + 1)
    assert secret == SECRET
    answer = listener_proof(secret, listener_id="orch-b", peer_id="orch-a", nonce=nonce)
    check_listener_proof(answer, SECRET, listener_id="orch-b", peer_id="orch-a", proof=proof)
    replayed = refusal(check.verify, "orch-a", proof, NOW + 2)
    assert (replayed.status, "replayed") == (403, replayed.reason[:8])


def test_a_proof_without_audience_is_good_for_any_listener() -> None:
    proof = make_proof(SECRET, peer_id="orch-a", audience="", now=NOW)
    verifier().verify("orch-a", proof, NOW)


@pytest.mark.parametrize(
    ("proof", "status", "words"),
    [
        (None, 401, "authentication required"),
        ("v2;ts=1", 401, "version 'v2'"),
        ("v1;ts", 401, "malformed"),
        ("v1;ts=1;nonce=AAAAAAAAAAAAAAAAAAAAAA;aud=", 401, "no 'mac'"),
        ("v1;ts=x;nonce=AAAAAAAAAAAAAAAAAAAAAA;aud=;mac=AA", 401, "malformed"),
        ("v1;ts=1;nonce=AAAA;aud=;mac=AA", 401, "malformed"),
        ("v1;" + "x" * 2000, 401, "longer than"),
    ],
)
def test_malformed_proofs_are_401(proof: str | None, status: int, words: str) -> None:
    refused = refusal(verifier().verify, "orch-a", proof, NOW)
    assert refused.status == status
    assert words in refused.reason


def test_wrong_secret_is_403() -> None:
    proof = make_proof(b"another secret, 16+ bytes", peer_id="orch-a", audience="", now=NOW)
    refused = refusal(verifier().verify, "orch-a", proof, NOW)
    assert (refused.status, "secret does not match" in refused.reason) == (403, True)


def test_a_proof_for_another_id_or_listener_is_403() -> None:
    proof = make_proof(SECRET, peer_id="orch-z", audience="", now=NOW)
    assert refusal(verifier().verify, "orch-a", proof, NOW).status == 403
    elsewhere = make_proof(SECRET, peer_id="orch-a", audience="orch-c", now=NOW)
    refused = refusal(verifier().verify, "orch-a", elsewhere, NOW)
    assert "for the listener 'orch-c'" in refused.reason


def test_unknown_orchestrator_is_403() -> None:
    proof = make_proof(SECRET, peer_id="orch-x", audience="", now=NOW)
    refused = refusal(verifier().verify, "orch-x", proof, NOW)
    assert (refused.status, refused.reason) == (403, "unknown orchestrator 'orch-x'")


@pytest.mark.parametrize("skew", [-31.0, 31.0])
def test_expired_or_future_proofs_are_403(skew: float) -> None:
    proof = make_proof(SECRET, peer_id="orch-a", audience="", now=NOW + skew)
    refused = refusal(verifier(lifetime=30.0).verify, "orch-a", proof, NOW)
    assert refused.status == 403
    assert "expired proof" in refused.reason


def test_the_replay_cache_is_bounded_and_forgets_expired_nonces() -> None:
    cache = ReplayCache(max_size=3)
    for n in range(3):
        cache.add(f"n{n}", expiry=10.0 + n, now=0.0)
    refused = refusal(cache.add, "n3", 20.0, 0.0)
    assert refused.status == 503
    assert len(cache) == 3
    cache.add("n3", 20.0, now=10.5)  # n0 expired: room again
    assert len(cache) == 3
    cache.add("n4", 12.0, now=11.5)  # n1 expired at the head
    cache.add("n5", 30.0, now=12.5)  # n2 expired at the head; n4 expired behind n3
    assert len(cache) == 3
    cache.add("n6", 30.0, now=12.5)  # full: the sweep finds n4
    assert len(cache) == 3
    assert refusal(cache.add, "n6", 30.0, 12.5).reason.startswith("replayed")


def test_the_listener_must_prove_itself() -> None:
    proof = make_proof(SECRET, peer_id="orch-a", audience="", now=NOW)
    missing = refusal(
        check_listener_proof, None, SECRET, listener_id="orch-b", peer_id="orch-a", proof=proof
    )
    assert "did not prove" in missing.reason
    forged = listener_proof(
        b"not the right secret!", listener_id="orch-b", peer_id="orch-a", nonce="x"
    )
    wrong = refusal(
        check_listener_proof, forged, SECRET, listener_id="orch-b", peer_id="orch-a", proof=proof
    )
    assert "wrong proof" in wrong.reason


def test_secrets_are_checked() -> None:
    assert normalize_secret("a" * 16, "x") == b"a" * 16
    with pytest.raises(ValueError, match="at least 16"):
        secret_lookup({"orch-a": "short"})
    with pytest.raises(TypeError, match="bytes or str"):
        normalize_secret(12, "x")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="mapping of id to secret or a callable"):
        secret_lookup(42)  # type: ignore[arg-type]
    lookup = secret_lookup(lambda peer: {"orch-a": "b" * 20, "weak": "w"}.get(peer))
    assert lookup("orch-a") == b"b" * 20
    assert refusal(lookup, "nobody").status == 403
    with pytest.raises(ValueError, match="at least 16"):
        lookup("weak")


def test_certificate_ids() -> None:
    assert certificate_id(None) is None
    assert certificate_id({"subject": ((("commonName", "orch-a"),),)}) == "orch-a"
    assert certificate_id({"subject": (), "subjectAltName": (("DNS", "orch-b"),)}) == "orch-b"
    assert certificate_id({"subjectAltName": (("IP Address", "127.0.0.1"),)}) is None


def test_the_documented_example_holds() -> None:
    # docs/protocol.rst, "Authentication": a peer can be written from it.
    secret = b"correct horse battery staple"
    proof = make_proof(
        secret, peer_id="orch-a", audience="orch-b", now=1795780800.0, nonce=bytes(range(16))
    )
    assert proof == (
        "v1;ts=1795780800000;nonce=AAECAwQFBgcICQoLDA0ODw;aud=orch-b;"
        "mac=nGwa2iQX_mGvBIytlED6TNQ6m64BZrYA_SBkHnZEBQQ"
    )
    answer = listener_proof(
        secret, listener_id="orch-b", peer_id="orch-a", nonce="AAECAwQFBgcICQoLDA0ODw"
    )
    assert answer == "v1;mac=WDZ5M0Lxcs8-5F7Tei2EdsBp-X4c4oFNiwELqLZMyYk"
    text = (Path(__file__).parent.parent / "docs" / "protocol.rst").read_text(encoding="utf-8")
    assert proof in text and answer in text
