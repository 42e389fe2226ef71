"""``python -m bench``: trio-federation against raw trio-websocket, printed as a table.

Runs (a) one-way throughput and (b) round trips with the two peers in two child
processes on 127.0.0.1 (a fresh pair per run; library and raw runs alternate;
the library runs once with resumable sessions, its default, and once without,
the two swapping places from one repeat to the next; with ``node`` and ``npm``
present, the TypeScript daemon's own ``OrchestratorConnection`` runs too, on
both sides, first or last in each repeat: see :mod:`bench._daemon`), (c) the
codec cost in this process against plain orjson writing and reading the same
frame (see :func:`_codec`), and (d) the recovery time after ``--cuts`` link
cuts through a ``FaultyProxy``, in this process, for each sending side
(:mod:`bench.recovery`).
(a) and (b) are repeated ``--repeat`` times: throughput is the median of the repeats; latency
percentiles pool the samples of every repeat. ``--quick`` runs a small version
for smoke tests; ``--json PATH`` also writes every figure to ``PATH``. Exit
status: 0 when every run completed (whether or not the targets are met), 1 when
a run failed or (d) saw a message lost, repeated or reordered, 130 when
interrupted.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any, Final, Literal

import orjson
import trio

from trio_federation import FederationMessage, decode_message, encode_message

from ._daemon import PACKAGE, VERSION, Daemon, find_daemon
from ._peers import PeerCommand, PeerError, pick_cpus, run_pair
from ._report import (
    DAEMON_TARGET,
    P50_TARGET,
    THROUGHPUT_TARGET,
    Comparison,
    Row,
    format_comparisons,
    format_daemon,
    format_table,
    format_verdicts,
    median,
    percentile,
)
from ._workload import (
    HEARTBEAT_TIMEOUT,
    HOST,
    equivalent_dict,
    frame_size,
    make_delegation,
    make_delegations,
)
from .recovery import (
    PACE,
    SETTLE,
    Direction,
    RecoveryError,
    RecoveryResult,
    format_recovery,
    measure_recovery,
    policy_json,
)
from .recovery import POLICY as RECOVERY_POLICY

IMPLS: Final = ("raw", "codec", "lib", "lib-v1", "lib-drain")
"""What runs (a) and (b): see :data:`bench.worker.Impl`; and ``daemon`` when Node
is present: the TypeScript daemon's own ``OrchestratorConnection`` on both
sides (``bench/js/daemon_peer.mjs``)."""
SUFFIX: Final = {
    "lib": "",
    "lib-v1": "_v1",
    "lib-drain": "_drain",
    "codec": "_floor",
    "raw": "_raw",
}
"""The JSON key suffix of a row whose subject is that implementation."""
OVERHEADS: Final = {
    "throughput": "(a) one-way throughput",
    "throughput_listener_cpu": "    receiver CPU",
    "throughput_dialer_cpu": "    sender CPU",
    "round_trip_p50": "(b) round trip p50",
    "round_trip_p99": "(b) round trip p99",
    "round_trip_dialer_cpu": "    dialer CPU",
    "round_trip_listener_cpu": "    listener CPU",
}
"""The rows compared between sessions on and off, and their labels there."""

FULL = {
    "messages": 50_000,
    "round_trips": 5_000,
    "repeat": 3,
    "codec_messages": 10_000,
    "cuts": 100,
}
QUICK = {"messages": 2_000, "round_trips": 300, "repeat": 1, "codec_messages": 1_000, "cuts": 10}
CODEC_REPEAT = 5
CODEC_TARGET: Final = 2.0
"""Codec encode + decode must take at most this multiple of plain orjson's (issue #16)."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark trio-federation against raw trio-websocket on loopback.",
    )
    parser.add_argument("--quick", action="store_true", help="a small run, for smoke testing")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the results here")
    parser.add_argument("--messages", type=int, help="messages for (a) (default 50,000)")
    parser.add_argument("--round-trips", type=int, help="round trips for (b) (default 5,000)")
    parser.add_argument("--repeat", type=int, help="runs of (a) and (b) each (default 3)")
    parser.add_argument(
        "--cuts", type=int, help="link cuts for (d), for each sending side (default 100)"
    )
    parser.add_argument(
        "--no-pin",
        action="store_true",
        help="let the kernel place the two processes (default: one CPU each, on Linux)",
    )
    parser.add_argument(
        "--timeout", type=float, default=180.0, help="seconds one run may take (default 180)"
    )
    parser.add_argument(
        "--no-daemon",
        action="store_true",
        help="leave out the TypeScript daemon's rows (default: run them when node is present)",
    )
    return parser


def _progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# -- (a) and (b): two processes ---------------------------------------------------------


async def _networked(
    messages: int,
    round_trips: int,
    repeat: int,
    time_limit: float,
    cpus: tuple[int, int] | None,
    daemon: Daemon | None,
) -> tuple[list[Row], dict[str, Any], dict[str, dict[str, list[float]]]]:
    impls = (*IMPLS, "daemon") if daemon is not None else IMPLS
    commands: dict[str, PeerCommand] = {}
    if daemon is not None:
        template = orjson.dumps(equivalent_dict(make_delegation(0))).decode()
        options = ("--connection", str(daemon.connection), "--template", template)
        commands["daemon"] = PeerCommand(
            argv=(*daemon.command(), *options),
            env=daemon.env(),
        )
    expected_frame = encode_message(make_delegation(0))
    # figure name -> impl -> one value per repeat
    runs: dict[str, dict[str, list[float]]] = {}
    # lib-drain differs from lib only in how the receiver consumes: (a) only.
    latencies: dict[str, list[float]] = {impl: [] for impl in impls if impl != "lib-drain"}

    def record(name: str, impl: str, value: float) -> None:
        runs.setdefault(name, {impl: [] for impl in impls})[impl].append(value)

    def check_frame(impl: str, dialed: dict[str, Any]) -> None:
        if impl == "daemon" and dialed.get("frame") != expected_frame:
            raise PeerError(f"the daemon's delegation frame differs: {dialed.get('frame')!r}")

    tp_warmup = max(1, min(1000, messages // 10))
    rt_warmup = max(1, min(200, round_trips // 10))
    for run in range(1, repeat + 1):
        # The two library modes swap places from one repeat to the next.
        order: tuple[str, ...] = (
            ("raw", "codec", "lib", "lib-v1") if run % 2 else ("raw", "codec", "lib-v1", "lib")
        )
        if daemon is not None:  # first or last, so that it sits beside raw every other repeat
            order = (*order, "daemon") if run % 2 else ("daemon", *order)
        for impl in (*order, "lib-drain"):
            served, dialed = await run_pair(
                impl,
                "throughput",
                count=messages,
                warmup=tp_warmup,
                time_limit=time_limit,
                cpus=cpus,
                command=commands.get(impl),
            )
            check_frame(impl, dialed)
            rate = messages / served["elapsed"]
            record("throughput", impl, rate)
            record("throughput_listener_cpu", impl, served["cpu"] / messages * 1e6)
            record("throughput_dialer_cpu", impl, dialed["cpu"] / dialed["sent"] * 1e6)
            record("throughput_sender_side", impl, dialed["sent"] / dialed["elapsed"])
            _progress(f"run {run}/{repeat}: {impl} throughput {rate:,.0f} msg/s")
        for impl in order:
            served, dialed = await run_pair(
                impl,
                "roundtrip",
                count=round_trips,
                warmup=rt_warmup,
                time_limit=time_limit,
                cpus=cpus,
                command=commands.get(impl),
            )
            check_frame(impl, dialed)
            samples = [ns / 1000 for ns in dialed["latencies_ns"]]
            latencies[impl].extend(samples)
            record("round_trip_p50", impl, percentile(samples, 0.5))
            record("round_trip_p99", impl, percentile(samples, 0.99))
            record("round_trip_dialer_cpu", impl, dialed["cpu"] / round_trips * 1e6)
            record("round_trip_listener_cpu", impl, served["cpu"] / served["answered"] * 1e6)
            _progress(
                f"run {run}/{repeat}: {impl} round trip p50 {runs['round_trip_p50'][impl][-1]:.0f}"
                f" us, p99 {runs['round_trip_p99'][impl][-1]:.0f} us"
            )

    def row(
        name: str,
        label: str,
        unit: str,
        better: Literal["higher", "lower"],
        *,
        target: float | None = None,
        pooled: dict[str, list[float]] | None = None,
        fraction: float = 0.5,
        subject: str = "lib",
    ) -> Row:
        """A table row: the median of the repeats, or a percentile of ``pooled`` samples.

        ``subject`` is what is compared with raw: the library (sessions on), the
        library without sessions (``lib-v1``, key suffix ``_v1``) or ``codec``
        (key suffix ``_floor``), so that every row reaches the JSON.
        """
        values = runs[name]
        if pooled is None:
            library, raw = median(values[subject]), median(values["raw"])
        else:
            library = percentile(pooled[subject], fraction)
            raw = percentile(pooled["raw"], fraction)
        return Row(
            key=name + SUFFIX[subject],
            label=label,
            unit=unit,
            library=library,
            raw=raw,
            better=better,
            target=target,
            runs_library=tuple(values[subject]),
            runs_raw=tuple(values["raw"]),
        )

    v1 = "lib-v1"
    rows = [
        row(
            "throughput",
            "(a) one-way throughput, sessions on",
            "msg/s",
            "higher",
            target=THROUGHPUT_TARGET,
        ),
        row("throughput_listener_cpu", "    receiver CPU", "us/msg", "lower"),
        row("throughput_dialer_cpu", "    sender CPU", "us/msg", "lower"),
        row(
            "throughput",
            "    consumer drains (receive_nowait)",
            "msg/s",
            "higher",
            subject="lib-drain",
        ),
        row(
            "throughput_listener_cpu",
            "      drain receiver CPU",
            "us/msg",
            "lower",
            subject="lib-drain",
        ),
        row("throughput", "    sessions off (v1)", "msg/s", "higher", subject=v1),
        row("throughput_listener_cpu", "      v1 receiver CPU", "us/msg", "lower", subject=v1),
        row("throughput_dialer_cpu", "      v1 sender CPU", "us/msg", "lower", subject=v1),
        row("throughput", "    floor: raw + our codec", "msg/s", "higher", subject="codec"),
        row(
            "throughput_listener_cpu",
            "      floor receiver CPU",
            "us/msg",
            "lower",
            subject="codec",
        ),
        row("throughput_dialer_cpu", "      floor sender CPU", "us/msg", "lower", subject="codec"),
        row(
            "round_trip_p50",
            "(b) round trip p50, sessions on",
            "us",
            "lower",
            target=P50_TARGET,
            pooled=latencies,
        ),
        row("round_trip_p50", "    sessions off (v1)", "us", "lower", pooled=latencies, subject=v1),
        row(
            "round_trip_p50",
            "    floor: raw + our codec",
            "us",
            "lower",
            pooled=latencies,
            subject="codec",
        ),
        row(
            "round_trip_p99",
            "(b) round trip p99, sessions on",
            "us",
            "lower",
            pooled=latencies,
            fraction=0.99,
        ),
        row(
            "round_trip_p99",
            "    sessions off (v1)",
            "us",
            "lower",
            pooled=latencies,
            fraction=0.99,
            subject=v1,
        ),
        row("round_trip_dialer_cpu", "    dialer CPU", "us/trip", "lower"),
        row("round_trip_listener_cpu", "    listener CPU", "us/trip", "lower"),
        row("round_trip_dialer_cpu", "      v1 dialer CPU", "us/trip", "lower", subject=v1),
        row("round_trip_listener_cpu", "      v1 listener CPU", "us/trip", "lower", subject=v1),
    ]
    extra = {
        "sender_side_throughput": runs["throughput_sender_side"],
        "throughput_warmup": tp_warmup,
        "round_trip_warmup": rt_warmup,
    }
    pooled = {
        f"round_trip_{name}": {
            impl: [percentile(samples, fraction)] for impl, samples in latencies.items()
        }
        for name, fraction in (("p50_pooled", 0.5), ("p99_pooled", 0.99))
    }
    return rows, extra, {**runs, **pooled}


def _overheads(rows: Sequence[Row]) -> list[Comparison]:
    """Sessions on against off, for every figure measured both ways."""
    by_key = {row.key: row for row in rows}
    return [
        Comparison.of(by_key[key], by_key[key + "_v1"], label) for key, label in OVERHEADS.items()
    ]


# -- (d): recovery after a cut, in process ----------------------------------------------


def _recovery(cuts: int) -> list[RecoveryResult]:
    """(d) for each sending side, with the library's per-cut warnings silenced."""
    library_log = logging.getLogger("trio_federation")
    level = library_log.level
    library_log.setLevel(logging.ERROR)  # "link lost, waiting to resume", once per cut
    try:
        results = []
        senders: tuple[Direction, ...] = ("dialer", "listener")
        for sender in senders:
            result = trio.run(measure_recovery, sender, cuts)
            results.append(result)
            _progress(
                f"{sender} sends: {cuts} cuts, recovery p50 {result.percentile_ms(0.5):.1f} ms, "
                f"max {result.percentile_ms(1.0):.1f} ms"
            )
        return results
    finally:
        library_log.setLevel(level)


# -- (c): the codec, in process -----------------------------------------------------------


def _interleaved_us(
    first: Callable[[], object], second: Callable[[], object], count: int
) -> tuple[float, float]:
    """Medians over CODEC_REPEAT timings of each, timed in alternation (µs per message)."""
    timings: tuple[list[float], list[float]] = ([], [])
    for _ in range(CODEC_REPEAT):
        for loop, into in ((first, timings[0]), (second, timings[1])):
            started = time.perf_counter()
            loop()
            into.append((time.perf_counter() - started) / count * 1e6)
    return median(timings[0]), median(timings[1])


def _codec(count: int) -> tuple[Row, Row, Row]:
    """(c): our codec against plain orjson doing the same wire work.

    The baseline (see also ``python -m bench.codec``): encoding is
    ``orjson.dumps`` of the payload dict, decoded to ``str`` and set as the
    envelope dict's ``payload``, then ``orjson.dumps`` of the envelope decoded to
    ``str`` (a text frame); decoding is ``orjson.loads`` of the frame, then of
    its ``payload`` string. Same bytes both ways, no typed objects.
    """
    messages: list[FederationMessage] = make_delegations(count)
    frames = [encode_message(message) for message in messages]
    dicts = [equivalent_dict(message) for message in messages]

    def json_frame(wire: dict[str, Any]) -> str:
        envelope = dict(wire)  # the keys in the wire's order
        envelope["payload"] = orjson.dumps(wire["payload"]).decode()
        return orjson.dumps(envelope).decode()

    def lib_round() -> None:
        for message in messages:
            decode_message(encode_message(message))

    def json_round() -> None:
        for wire in dicts:
            orjson.loads(orjson.loads(json_frame(wire))["payload"])

    def lib_encode() -> None:
        for message in messages:
            encode_message(message)

    def json_encode() -> None:
        for wire in dicts:
            json_frame(wire)

    def lib_decode() -> None:
        for frame in frames:
            decode_message(frame)

    def json_decode() -> None:
        for frame in frames:
            orjson.loads(orjson.loads(frame)["payload"])

    if decode_message(frames[0]) != messages[0]:
        raise AssertionError("the codec does not round-trip the benchmark message")
    if json_frame(dicts[0]) != frames[0]:
        raise AssertionError("the orjson baseline does not write the codec's frame")
    pairs = {
        "codec": (lib_round, json_round, "(c) codec encode+decode"),
        "codec_encode": (lib_encode, json_encode, "    encode only"),
        "codec_decode": (lib_decode, json_decode, "    decode only"),
    }
    rows = []
    for key, (library, plain, label) in pairs.items():
        library_us, plain_us = _interleaved_us(library, plain, count)
        rows.append(
            Row(
                key=key,
                label=label,
                unit="us/msg",
                library=library_us,
                raw=plain_us,
                better="lower",
                target=CODEC_TARGET if key == "codec" else None,
            )
        )
    return rows[0], rows[1], rows[2]


# -- the command ------------------------------------------------------------------------


def _environment() -> dict[str, Any]:
    versions = {}
    for name in ("trio-federation", "trio", "trio-websocket", "wsproto", "orjson", "cattrs"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "?"
    return {
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "versions": versions,
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmarks, print the table; see the module docstring."""
    args = _parser().parse_args(argv)
    config = dict(QUICK if args.quick else FULL)
    for key in ("messages", "round_trips", "repeat", "cuts"):
        value = getattr(args, key)
        if value is not None:
            if value < 1:
                _parser().error(f"--{key.replace('_', '-')} must be at least 1")
            config[key] = value
    env = _environment()
    cpus = None if args.no_pin else pick_cpus()
    size = frame_size()
    daemon = None if args.no_daemon else find_daemon()
    if isinstance(daemon, str):
        _progress(f"the daemon's rows are left out: {daemon}")
        daemon = None
    _progress(
        f"benchmarking on {HOST}: {config['messages']:,} messages, "
        f"{config['round_trips']:,} round trips, {config['repeat']} repeat(s)"
    )
    try:
        network_rows, extra, runs = trio.run(
            _networked,
            config["messages"],
            config["round_trips"],
            config["repeat"],
            args.timeout,
            cpus,
            daemon,
        )
    except PeerError as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted (peer processes stopped)", file=sys.stderr)
        return 130
    try:
        recoveries = _recovery(config["cuts"])
    except RecoveryError as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    codec_rows = _codec(config["codec_messages"])
    rows = (*network_rows, *codec_rows)
    overheads = _overheads(rows)

    versions = env["versions"]
    print()
    print(
        f"trio-federation {versions['trio-federation']} vs raw trio-websocket "
        f"{versions['trio-websocket']} (trio {versions['trio']}, orjson {versions['orjson']}, "
        f"cattrs {versions['cattrs']})"
    )
    print(
        f"{env['implementation']} {env['python']} on {env['platform']}, {env['cpus']} CPUs; "
        f"two processes on {HOST}, "
        + ("not pinned" if cpus is None else f"listener on CPU {cpus[0]}, dialer on CPU {cpus[1]}")
    )
    print(
        f"delegation frame: {size} bytes; (a) {config['messages']:,} messages, "
        f"median of {config['repeat']}; (b) {config['round_trips']:,} sequential round trips "
        f"x {config['repeat']}, pooled; (c) {config['codec_messages']:,} messages x {CODEC_REPEAT}"
    )
    print(
        "(c) baseline: plain orjson writing and reading the same frame from dicts: dumps of "
        "the payload, as the envelope's payload string, dumps of the envelope; loads of the "
        "frame, loads of its payload string"
    )
    print(
        "library peers: rate_limit=None; 'sessions on' is the default (resumable=True), "
        "'sessions off (v1)' is resumable=False with resume_timeout=0"
    )
    print()
    print(format_table(rows))
    print()
    print(format_comparisons(overheads))
    print()
    if daemon is not None:
        print(
            f"against the daemon: {PACKAGE}@{VERSION}'s OrchestratorConnection on both sides "
            "(Node, ws), each sendMessage awaited; round trip: delegation -> acceptDelegation "
            "-> 'callback'. Ratios are ours / daemon's, beside ours / raw trio-websocket's."
        )
        daemon_rows = format_daemon(runs)
        print(daemon_rows)
        print()
    policy = RECOVERY_POLICY
    print(
        f"(d) in this process: listener, FaultyProxy, dialer with ReconnectPolicy("
        f"initial_delay={policy.initial_delay:g}, multiplier={policy.multiplier:g}, "
        f"jitter={policy.jitter:g}); one message every {PACE * 1000:g} ms, a cut (RST) "
        f"every {SETTLE * 1000:g} ms of steady stream; recovery: cut -> the first message "
        "sent after it delivered"
    )
    print(format_recovery(recoveries))
    print()
    print(format_verdicts(rows))
    if args.quick:
        print("(--quick: small counts, figures are indicative only)")

    if args.json is not None:
        recovery: dict[str, Any] = {"policy": policy_json()}
        for result in recoveries:
            recovery[f"{result.sender}_sends"] = result.as_json()
        document = {
            "config": {
                **config,
                "quick": args.quick,
                "frame_bytes": size,
                "heartbeat_timeout": HEARTBEAT_TIMEOUT,
                "cpus": cpus,
                **extra,
            },
            "environment": env,
            "results": {row.key: row.as_json() for row in rows},
            "daemon": (
                None
                if daemon is None
                else {"package": f"{PACKAGE}@{VERSION}", "target": DAEMON_TARGET, "runs": runs}
            ),
            "resumption_overhead": {c.key: c.as_json() for c in overheads},
            "recovery": recovery,
            "targets_met": all(row.met for row in rows if row.met is not None),
        }
        args.json.write_text(json.dumps(document, indent=2) + "\n")
        print(f"results written to {args.json}")
    broken = [result.sender for result in recoveries if not result.exactly_once]
    if broken:
        print(f"benchmark failed: messages lost, repeated or reordered ({broken})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
