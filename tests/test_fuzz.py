"""A decoder no input can break: hostile frames through the codec and a live connection.

The only outcomes allowed: a delivered message, or a counted and reported
error (``MalformedMessage``, ``PolicyViolation``). The connection and the
process stay up; memory stays bounded.

``nox -s fuzz`` runs the same tests with ``FUZZ_SCALE`` times more examples;
the default keeps ``nox -s tests`` fast.
"""

from __future__ import annotations

import gc
import json
import logging
import tracemalloc
from collections.abc import Callable
from typing import Any

import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trio_federation import (
    MAX_FRAME_SIZE,
    BroadcastPayload,
    FederationError,
    FederationMessage,
    MalformedMessage,
    MessageType,
    OrchestratorConnection,
    PolicyViolation,
    decode_message,
    encode_message,
)
from trio_federation.testing import open_websocket_pair

from . import strategies

FUZZ_SCALE = strategies.FUZZ_SCALE

# -- hostile frames ---------------------------------------------------------------------

WIRE_FIELDS = ("type", "payload", "from", "to", "timestamp", "correlationId")

wrong_types: st.SearchStrategy[Any] = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=50),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=3),
)


def nested(depth: int, leaf: str = "0") -> str:
    """JSON nested ``depth`` levels deep, arrays and objects alternating."""
    opening = "".join('{"a":' if n % 2 else "[" for n in range(depth))
    closing = "".join("}" if n % 2 else "]" for n in reversed(range(depth)))
    return opening + leaf + closing


huge_numbers = st.sampled_from(
    [
        "1" * 400,
        "-" + "9" * 30,
        "1e400",
        "-1e400",
        "1e-400",
        "18446744073709551616",
        "-0",
        "0.0000000000000000000000000001",
        "123456789012345678901234567890.5",
    ]
)
odd_strings = st.sampled_from(
    ['"\\ud800"', '"\\udfff\\ud800"', '"\\u0000"', '"\ufeff"', '"' + "\\n" * 500 + '"', '""']
)


MARK = "\x00hostile value here\x00"


@st.composite
def mutated_frames(draw: st.DrawFn) -> str:
    """A valid frame with one field (envelope or payload) made hostile."""
    message = draw(strategies.messages())
    # The stdlib's json: integral floats are written as (possibly huge) ints.
    envelope = json.loads(encode_message(message))
    payload = json.loads(envelope["payload"])
    target = draw(st.sampled_from(["envelope", "payload"]))
    fields = envelope if target == "envelope" or not isinstance(payload, dict) else payload
    key = draw(st.sampled_from(sorted(fields) or ["type"]))
    raw = draw(
        st.one_of(
            wrong_types.map(json.dumps),
            huge_numbers,
            odd_strings,
            st.integers(min_value=1, max_value=3000).map(nested),
            st.integers(min_value=1, max_value=200_000).map(lambda n: '"' + "x" * n + '"'),
        )
    )
    fields[key] = MARK
    if fields is payload:
        envelope["payload"] = json.dumps(payload).replace(json.dumps(MARK), raw)
        return json.dumps(envelope)
    return json.dumps(envelope).replace(json.dumps(MARK), raw)


hostile_frames: st.SearchStrategy[str | bytes] = st.one_of(
    st.binary(max_size=200),
    st.text(max_size=200),
    mutated_frames(),
    st.integers(min_value=1, max_value=5000).map(nested),
    st.sampled_from(
        [
            "{}",
            "[]",
            "null",
            '{"type":"delegation","type":"callback"}',
            '{"type":"delegation","payload":"' + "[" * 5000 + '"}',
            "\ufeff{}",
            " " * 10_000,
            "x" * (MAX_FRAME_SIZE + 1),
        ]
    ),
)


def check_outcome(frame: str | bytes) -> FederationMessage | None:
    try:
        return decode_message(frame)
    except MalformedMessage as exc:
        reason = exc.reason
    assert reason  # a refusal always says what was wrong
    return None


@given(hostile_frames)
@settings(
    max_examples=400 * FUZZ_SCALE, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
def test_the_codec_only_decodes_or_refuses(frame: str | bytes) -> None:
    message = check_outcome(frame)
    assert message is None or isinstance(message, FederationMessage)


# -- through a live connection -------------------------------------------------------------


def sentinel() -> str:
    return encode_message(
        FederationMessage(
            type="broadcast",
            payload=BroadcastPayload(topic="end", data=None),
            sender="orch-a",
            recipient="orch-b",
        )
    )


async def feed(frames: list[str | bytes]) -> tuple[int, list[FederationError], int]:
    """Send ``frames`` then a sentinel; return what was delivered and reported."""
    delivered = 0
    errors: list[FederationError] = []
    async with open_websocket_pair(max_message_size=MAX_FRAME_SIZE + 64) as pair:
        conn = OrchestratorConnection(
            id="orch-a",
            socket=pair.server,
            local_id="orch-b",
            rate_limit=None,
            max_violations=len(frames) + 1,
        )
        async with conn, trio.open_nursery() as nursery:
            with conn.watch_errors() as error_stream, conn.subscribe(*MessageType) as stream:

                async def collect_errors() -> None:
                    async for error in error_stream:
                        errors.append(error)

                nursery.start_soon(collect_errors)
                for frame in [*frames, sentinel()]:
                    await pair.client.send_message(frame)
                async for message in stream:
                    if message.type == "broadcast" and message.payload.topic == "end":  # type: ignore[union-attr]
                        break
                    delivered += 1
                await trio.testing.wait_all_tasks_blocked()
                assert conn.status not in ("disconnected", "error")
                assert conn.is_healthy()
                counted = conn.get_status().errors
                nursery.cancel_scope.cancel()
    return delivered, errors, counted


@given(st.lists(hostile_frames, min_size=1, max_size=12))
@settings(max_examples=60 * FUZZ_SCALE, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_a_live_connection_survives_hostile_frames(frames: list[str | bytes]) -> None:
    delivered, errors, counted = trio.run(feed, frames)
    # Every frame is accounted for exactly once: delivered, or counted and reported.
    assert delivered + len(errors) == len(frames)
    assert all(isinstance(e, (MalformedMessage, PolicyViolation)) for e in errors)
    assert counted == len(errors)


def test_memory_stays_bounded_under_a_stream_of_hostile_frames() -> None:
    import random

    rng = random.Random(7)
    shapes: list[Callable[[], str | bytes]] = [
        lambda: nested(rng.randrange(100, 3000)),
        lambda: '{"type":"delegation","payload":"' + "x" * rng.randrange(1000, 60_000) + '"}',
        lambda: bytes(rng.randrange(256) for _ in range(100)),
        lambda: '{"type":"broadcast","payload":{"topic":' + "1" * 500 + "}}",
    ]

    def batch(n: int) -> list[str | bytes]:
        return [rng.choice(shapes)() for _ in range(n)]

    trio.run(feed, batch(200))  # warm-up: caches, lazily built converters
    # pytest keeps every log record for its report: measure the library alone.
    library = logging.getLogger("trio_federation")
    library.propagate = False
    gc.collect()
    tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        for _ in range(5):
            trio.run(feed, batch(200))
        gc.collect()
        after, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        library.propagate = True
    # 1,000 hostile frames (about 15 MB) went through; what stays is noise.
    assert after - before < 64 * 1024, f"retained {after - before} bytes"
    assert peak - before < 16 * 1024 * 1024, f"peak {peak - before} bytes"
