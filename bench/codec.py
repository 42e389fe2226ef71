"""``python -m bench.codec``: the codec's fast paths against its reference path.

For each message of the benchmark's traffic (the delegation, the acceptance
that answers it, a heartbeat, a progress callback) it times, in this process,
``encode_message`` and ``decode_message`` against the reference path they are
pinned to (the cattrs converter from ``make_converter()`` and the step-by-step
``_decode_envelope``), in microseconds per message. The two are timed in
alternation, so a busy machine slows both alike: compare the ratio.

Then, for each message, the fast encode + decode against plain orjson doing the
same wire work on plain dicts (issue #16's target is at most 2x). The orjson
baseline, timed in alternation with ours: ``orjson.dumps`` of the payload dict
(decoded to ``str``), put into the envelope dict as its ``payload`` string,
``orjson.dumps`` of the envelope (decoded to ``str``: a text frame), then
``orjson.loads`` of that frame and ``orjson.loads`` of its payload string. The
dicts are the message's wire form (:func:`~bench._workload.equivalent_dict`),
so both sides write and read the same bytes; orjson builds no typed objects,
checks nothing and formats no times.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime

import orjson

from trio_federation import (
    DelegationResponse,
    FederationMessage,
    HeartbeatPayload,
    MessageType,
    TaskCallback,
    decode_message,
    encode_message,
    make_converter,
)
from trio_federation._wire._codec import _decode_envelope, _encode

from ._workload import DIALER_ID, LISTENER_ID, equivalent_dict, make_delegation

_WHEN = datetime(2026, 1, 1, 0, 0, 0, 123000, tzinfo=UTC)


def messages() -> dict[str, FederationMessage]:
    """The benchmark's kinds of message, by name."""
    task_id = "task-000001"
    return {
        "delegation": make_delegation(1),
        "acceptance": FederationMessage(
            type=MessageType.CALLBACK,
            payload=DelegationResponse(task_id=task_id, accepted=True),
            sender=LISTENER_ID,
            recipient=DIALER_ID,
            timestamp=_WHEN,
            correlation_id=task_id,
        ),
        "heartbeat": FederationMessage(
            type=MessageType.HEARTBEAT,
            payload=HeartbeatPayload(orchestrator_id=DIALER_ID, timestamp=_WHEN),
            sender=DIALER_ID,
            recipient=LISTENER_ID,
            timestamp=_WHEN,
        ),
        "progress": FederationMessage(
            type=MessageType.CALLBACK,
            payload=TaskCallback(task_id=task_id, status="progress", progress=50.0),
            sender=LISTENER_ID,
            recipient=DIALER_ID,
            timestamp=_WHEN,
            correlation_id=task_id,
        ),
    }


def _time(function: Callable[[], object], count: int) -> float:
    started = time.perf_counter()
    for _ in range(count):
        function()
    return (time.perf_counter() - started) / count * 1e6


def _compare(
    fast: Callable[[], object], reference: Callable[[], object], count: int, repeat: int
) -> tuple[float, float]:
    """Median µs per call of each, timed in alternation."""
    fast_runs, reference_runs = [], []
    for _ in range(repeat):
        fast_runs.append(_time(fast, count))
        reference_runs.append(_time(reference, count))
    return statistics.median(fast_runs), statistics.median(reference_runs)


def _reference_decode(frame: str) -> FederationMessage:
    return _decode_envelope(orjson.loads(frame))


def _orjson_frame(wire: dict[str, object]) -> str:
    envelope = dict(wire)  # the keys in the wire's order
    envelope["payload"] = orjson.dumps(wire["payload"]).decode()
    return orjson.dumps(envelope).decode()


def _codec_round(message: FederationMessage) -> None:
    decode_message(encode_message(message))


def _orjson_round(wire: dict[str, object]) -> None:
    """The orjson baseline (see the module docstring)."""
    orjson.loads(orjson.loads(_orjson_frame(wire))["payload"])


def main(argv: Sequence[str] | None = None) -> int:
    """Print the table; see the module docstring."""
    parser = argparse.ArgumentParser(prog="python -m bench.codec", description=__doc__)
    parser.add_argument("--count", type=int, default=20_000, help="calls per timing")
    parser.add_argument("--repeat", type=int, default=7, help="timings of each")
    args = parser.parse_args(argv)
    converter = make_converter()
    rounds: dict[str, tuple[float, float]] = {}
    print(f"{'message':<11} {'bytes':>5}  {'':6} {'fast':>7} {'reference':>9} {'ratio':>6}")
    for name, message in messages().items():
        frame = encode_message(message)
        if frame != _encode(message, converter.unstructure):
            raise AssertionError(f"the fast encoding of the {name} differs")
        if decode_message(frame) != message:
            raise AssertionError(f"the {name} does not round-trip")
        if _orjson_frame(equivalent_dict(message)) != frame:
            raise AssertionError(f"the orjson baseline does not write the {name}'s frame")
        rows = {
            "encode": _compare(
                functools.partial(encode_message, message),
                functools.partial(_encode, message, converter.unstructure),
                args.count,
                args.repeat,
            ),
            "decode": _compare(
                functools.partial(decode_message, frame),
                functools.partial(_reference_decode, frame),
                args.count,
                args.repeat,
            ),
        }
        for index, (operation, (fast, reference)) in enumerate(rows.items()):
            label = f"{name:<11} {len(frame):>5}" if index == 0 else " " * 17
            print(f"{label}  {operation:6} {fast:6.2f}µ {reference:8.2f}µ {fast / reference:5.2f}x")
        rounds[name] = _compare(
            functools.partial(_codec_round, message),
            functools.partial(_orjson_round, equivalent_dict(message)),
            args.count,
            args.repeat,
        )
    print()
    print(f"{'message':<11} {'encode+decode':>13} {'orjson':>7} {'ratio':>6}  (target <= 2x)")
    for name, (ours, baseline) in rounds.items():
        print(f"{name:<11} {ours:12.2f}µ {baseline:6.2f}µ {ours / baseline:5.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
