"""``python -m bench``: trio-federation against raw trio-websocket, printed as a table.

Runs (a) one-way throughput and (b) round trips with the two peers in two child
processes on 127.0.0.1 (a fresh pair per run; library and raw runs alternate),
and (c) the codec cost in this process. Each networked measurement is repeated
``--repeat`` times: throughput is the median of the repeats; latency
percentiles pool the samples of every repeat. ``--quick`` runs a small version
for smoke tests; ``--json PATH`` also writes every figure to ``PATH``. Exit
status: 0 when every run completed (whether or not the targets are met), 1 when
a run failed, 130 when interrupted.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

import orjson
import trio

from trio_federation import FederationMessage, decode_message, encode_message

from ._peers import PeerError, pick_cpus, run_pair
from ._report import (
    P50_TARGET,
    THROUGHPUT_TARGET,
    Row,
    format_table,
    format_verdicts,
    median,
    percentile,
)
from ._workload import HEARTBEAT_TIMEOUT, HOST, equivalent_dict, frame_size, make_delegations

FULL = {"messages": 50_000, "round_trips": 5_000, "repeat": 3, "codec_messages": 10_000}
QUICK = {"messages": 2_000, "round_trips": 300, "repeat": 1, "codec_messages": 1_000}
CODEC_REPEAT = 5


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
        "--no-pin",
        action="store_true",
        help="let the kernel place the two processes (default: one CPU each, on Linux)",
    )
    parser.add_argument(
        "--timeout", type=float, default=180.0, help="seconds one run may take (default 180)"
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
) -> tuple[list[Row], dict[str, Any]]:
    # figure name -> impl -> one value per repeat
    runs: dict[str, dict[str, list[float]]] = {}
    latencies: dict[str, list[float]] = {"lib": [], "raw": [], "codec": []}

    def record(name: str, impl: str, value: float) -> None:
        runs.setdefault(name, {"lib": [], "raw": [], "codec": []})[impl].append(value)

    tp_warmup = max(1, min(1000, messages // 10))
    rt_warmup = max(1, min(200, round_trips // 10))
    for run in range(1, repeat + 1):
        for impl in ("raw", "codec", "lib"):
            served, dialed = await run_pair(
                impl,
                "throughput",
                count=messages,
                warmup=tp_warmup,
                time_limit=time_limit,
                cpus=cpus,
            )
            rate = messages / served["elapsed"]
            record("throughput", impl, rate)
            record("throughput_listener_cpu", impl, served["cpu"] / messages * 1e6)
            record("throughput_dialer_cpu", impl, dialed["cpu"] / dialed["sent"] * 1e6)
            record("throughput_sender_side", impl, dialed["sent"] / dialed["elapsed"])
            _progress(f"run {run}/{repeat}: {impl} throughput {rate:,.0f} msg/s")
        for impl in ("raw", "codec", "lib"):
            served, dialed = await run_pair(
                impl,
                "roundtrip",
                count=round_trips,
                warmup=rt_warmup,
                time_limit=time_limit,
                cpus=cpus,
            )
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

        ``subject`` is what is compared with raw: the library, or ``codec`` (whose
        row's key gets a ``_floor`` suffix, so that both rows reach the JSON).
        """
        values = runs[name]
        if pooled is None:
            library, raw = median(values[subject]), median(values["raw"])
        else:
            library = percentile(pooled[subject], fraction)
            raw = percentile(pooled["raw"], fraction)
        return Row(
            key=name if subject == "lib" else f"{name}_floor",
            label=label,
            unit=unit,
            library=library,
            raw=raw,
            better=better,
            target=target,
            runs_library=tuple(values[subject]),
            runs_raw=tuple(values["raw"]),
        )

    rows = [
        row("throughput", "(a) one-way throughput", "msg/s", "higher", target=THROUGHPUT_TARGET),
        row("throughput_listener_cpu", "    receiver CPU", "us/msg", "lower"),
        row("throughput_dialer_cpu", "    sender CPU", "us/msg", "lower"),
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
            "(b) round trip p50",
            "us",
            "lower",
            target=P50_TARGET,
            pooled=latencies,
        ),
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
            "(b) round trip p99",
            "us",
            "lower",
            pooled=latencies,
            fraction=0.99,
        ),
        row("round_trip_dialer_cpu", "    dialer CPU", "us/trip", "lower"),
        row("round_trip_listener_cpu", "    listener CPU", "us/trip", "lower"),
    ]
    extra = {
        "sender_side_throughput": runs["throughput_sender_side"],
        "throughput_warmup": tp_warmup,
        "round_trip_warmup": rt_warmup,
    }
    return rows, extra


# -- (c): the codec, in process -----------------------------------------------------------


def _per_message_us(loop: Callable[[], object], count: int) -> float:
    """Median over CODEC_REPEAT timings of ``loop``, in microseconds per message."""
    timings = []
    for _ in range(CODEC_REPEAT):
        started = time.perf_counter()
        loop()
        timings.append((time.perf_counter() - started) / count * 1e6)
    return median(timings)


def _codec(count: int) -> tuple[Row, Row, Row]:
    messages: list[FederationMessage] = make_delegations(count)
    frames = [encode_message(message) for message in messages]
    dicts = [equivalent_dict(message) for message in messages]
    blobs = [orjson.dumps(value) for value in dicts]

    def lib_round() -> None:
        for message in messages:
            decode_message(encode_message(message))

    def json_round() -> None:
        for value in dicts:
            orjson.loads(orjson.dumps(value))

    def lib_encode() -> None:
        for message in messages:
            encode_message(message)

    def json_encode() -> None:
        for value in dicts:
            orjson.dumps(value)

    def lib_decode() -> None:
        for frame in frames:
            decode_message(frame)

    def json_decode() -> None:
        for blob in blobs:
            orjson.loads(blob)

    if decode_message(frames[0]) != messages[0]:
        raise AssertionError("the codec does not round-trip the benchmark message")
    pairs = {
        "codec": (lib_round, json_round, "(c) codec encode+decode"),
        "codec_encode": (lib_encode, json_encode, "    encode only"),
        "codec_decode": (lib_decode, json_decode, "    decode only"),
    }
    rows = []
    for key, (library, plain, label) in pairs.items():
        rows.append(
            Row(
                key=key,
                label=label,
                unit="us/msg",
                library=_per_message_us(library, count),
                raw=_per_message_us(plain, count),
                better="lower",
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
    for key in ("messages", "round_trips", "repeat"):
        value = getattr(args, key)
        if value is not None:
            if value < 1:
                _parser().error(f"--{key.replace('_', '-')} must be at least 1")
            config[key] = value
    env = _environment()
    cpus = None if args.no_pin else pick_cpus()
    size = frame_size()
    _progress(
        f"benchmarking on {HOST}: {config['messages']:,} messages, "
        f"{config['round_trips']:,} round trips, {config['repeat']} repeat(s)"
    )
    try:
        network_rows, extra = trio.run(
            _networked,
            config["messages"],
            config["round_trips"],
            config["repeat"],
            args.timeout,
            cpus,
        )
    except PeerError as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted (peer processes stopped)", file=sys.stderr)
        return 130
    codec_rows = _codec(config["codec_messages"])
    rows = (*network_rows, *codec_rows)

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
        "(c) baseline: orjson.dumps + orjson.loads of the same message as one dict "
        "(payload as an object)"
    )
    print()
    print(format_table(rows))
    print()
    print(format_verdicts(rows))
    if args.quick:
        print("(--quick: small counts, figures are indicative only)")

    if args.json is not None:
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
            "targets_met": all(row.met for row in rows if row.met is not None),
        }
        args.json.write_text(json.dumps(document, indent=2) + "\n")
        print(f"results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
