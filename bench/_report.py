"""Figures, targets and the printed table."""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from typing import Any, Final, Literal

import attrs

THROUGHPUT_TARGET: Final = 0.6
"""Library throughput must be at least this fraction of raw trio-websocket's."""
P50_TARGET: Final = 1.3
"""Library p50 round trip must be at most this multiple of raw trio-websocket's."""
DAEMON_TARGET: Final = 1.5
"""Library stream (sessions on) must be at least this multiple of the daemon's (issue #16)."""
DAEMON_FIGURES: Final = (
    ("throughput", "(a) one-way throughput", "msg/s", "median"),
    ("throughput_listener_cpu", "    receiver CPU", "us/msg", "median"),
    ("throughput_dialer_cpu", "    sender CPU", "us/msg", "median"),
    ("round_trip_p50_pooled", "(b) round trip p50", "us", "pooled"),
    ("round_trip_p99_pooled", "(b) round trip p99", "us", "pooled"),
    ("round_trip_dialer_cpu", "    dialer CPU", "us/trip", "median"),
    ("round_trip_listener_cpu", "    listener CPU", "us/trip", "median"),
)
"""The figures compared with the daemon: (key, label, unit, how the repeats combine)."""


def percentile(samples: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile (``fraction`` in (0, 1]) of unsorted ``samples``."""
    if not samples:
        raise ValueError("no samples")
    ordered = sorted(samples)
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[rank - 1]


@attrs.frozen(kw_only=True)
class Row:
    """One line of the table: the library against the baseline."""

    key: str
    label: str
    unit: str
    library: float
    raw: float
    better: Literal["higher", "lower"]
    target: float | None = None
    """A bound on the ratio library/raw (``>=`` if higher is better, else ``<=``)."""
    runs_library: tuple[float, ...] = ()
    runs_raw: tuple[float, ...] = ()

    @property
    def ratio(self) -> float:
        """library / raw."""
        return self.library / self.raw if self.raw else math.inf

    @property
    def met(self) -> bool | None:
        """Whether the target is met (None when there is none)."""
        if self.target is None:
            return None
        if self.better == "higher":
            return self.ratio >= self.target
        return self.ratio <= self.target

    def target_text(self) -> str:
        """The target as printed (``>= 0.60x``), or empty."""
        if self.target is None:
            return ""
        return f"{'>=' if self.better == 'higher' else '<='} {self.target:.2f}x"

    def as_json(self) -> dict[str, Any]:
        """The row for ``--json``."""
        return {
            "label": self.label,
            "unit": self.unit,
            "library": self.library,
            "raw": self.raw,
            "ratio": self.ratio,
            "better": self.better,
            "target": self.target,
            "met": self.met,
            "runs": {"library": list(self.runs_library), "raw": list(self.runs_raw)},
        }


def median(values: Sequence[float]) -> float:
    """The median of the repeats."""
    return statistics.median(values)


def _number(value: float) -> str:
    if value >= 1000:
        return f"{value:,.0f}"
    if value >= 100:
        return f"{value:.0f}"
    return f"{value:.2f}"


def format_table(rows: Sequence[Row]) -> str:
    """The table: absolute figures, ratio library/raw, target and verdict."""
    headers = ("measurement", "unit", "library", "raw", "lib/raw", "target", "met")
    lines = [
        (
            row.label,
            row.unit,
            _number(row.library),
            _number(row.raw),
            f"{row.ratio:.2f}x",
            row.target_text(),
            {True: "yes", False: "NO", None: ""}[row.met],
        )
        for row in rows
    ]
    widths = [max(len(cells[i]) for cells in (headers, *lines)) for i in range(len(headers))]
    aligns = ("<", "<", ">", ">", ">", "<", "<")

    def fmt(cells: Sequence[str]) -> str:
        return "  ".join(
            f"{cell:{align}{width}}"
            for cell, align, width in zip(cells, aligns, widths, strict=True)
        ).rstrip()

    rule = "  ".join("-" * width for width in widths)
    return "\n".join([fmt(headers), rule, *(fmt(cells) for cells in lines)])


def format_verdicts(rows: Sequence[Row]) -> str:
    """One line per target: met or missed, with the figures."""
    out = []
    for row in rows:
        if row.met is None:
            continue
        verdict = "met" if row.met else "MISSED"
        out.append(
            f"target {row.label}: library/raw = {row.ratio:.2f}x, wanted "
            f"{row.target_text()}: {verdict}"
        )
    return "\n".join(out)


@attrs.frozen(kw_only=True)
class Comparison:
    """One figure of the library with resumable sessions on and off, next to raw's."""

    key: str
    label: str
    unit: str
    on: float
    off: float
    raw: float
    runs_on: tuple[float, ...] = ()
    runs_off: tuple[float, ...] = ()

    @classmethod
    def of(cls, on: Row, off: Row, label: str) -> Comparison:
        """From the table's row with sessions on and the matching row with them off."""
        return cls(
            key=on.key,
            label=label,
            unit=on.unit,
            on=on.library,
            off=off.library,
            raw=on.raw,
            runs_on=on.runs_library,
            runs_off=off.runs_library,
        )

    @property
    def overhead(self) -> float:
        """on / off: the cost of sessions (above 1 for a time, below 1 for a rate)."""
        return self.on / self.off if self.off else math.inf

    def as_json(self) -> dict[str, Any]:
        """The comparison for ``--json``."""
        return {
            "label": self.label,
            "unit": self.unit,
            "on": self.on,
            "off": self.off,
            "raw": self.raw,
            "on_off": self.overhead,
            "on_raw": self.on / self.raw if self.raw else math.inf,
            "off_raw": self.off / self.raw if self.raw else math.inf,
            "runs": {"on": list(self.runs_on), "off": list(self.runs_off)},
        }


def _aligned(headers: Sequence[str], lines: Sequence[Sequence[str]], left: int) -> str:
    """A plain table: the first ``left`` columns aligned left, the others right."""
    widths = [max(len(cells[i]) for cells in (headers, *lines)) for i in range(len(headers))]

    def fmt(cells: Sequence[str]) -> str:
        return "  ".join(
            f"{cell:{'<' if i < left else '>'}{width}}"
            for i, (cell, width) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    rule = "  ".join("-" * width for width in widths)
    return "\n".join([fmt(headers), rule, *(fmt(cells) for cells in lines)])


def format_comparisons(comparisons: Sequence[Comparison]) -> str:
    """Resumption overhead: sessions on against off, each against raw."""
    headers = ("resumption overhead", "unit", "on", "off", "on/off", "on/raw", "off/raw")
    lines = [
        (
            c.label,
            c.unit,
            _number(c.on),
            _number(c.off),
            f"{c.overhead:.2f}x",
            f"{c.on / c.raw:.2f}x" if c.raw else "",
            f"{c.off / c.raw:.2f}x" if c.raw else "",
        )
        for c in comparisons
    ]
    return _aligned(headers, lines, 2)


def format_daemon(runs: Mapping[str, Mapping[str, Sequence[float]]]) -> str:
    """Ours against the TypeScript daemon's, beside ours against raw trio-websocket's.

    ``runs`` maps a figure to an implementation to its values (one per repeat;
    pooled percentiles have a single value).
    """
    headers = (
        "against the daemon",
        "unit",
        "daemon",
        "raw",
        "lib",
        "v1",
        "lib/daemon",
        "v1/daemon",
        "lib/raw",
        "v1/raw",
    )
    lines = []
    for key, label, unit, _how in DAEMON_FIGURES:
        values = {impl: median(runs[key][impl]) for impl in ("daemon", "raw", "lib", "lib-v1")}
        daemon, raw = values["daemon"], values["raw"]
        lines.append(
            (
                label,
                unit,
                _number(daemon),
                _number(raw),
                _number(values["lib"]),
                _number(values["lib-v1"]),
                f"{values['lib'] / daemon:.2f}x",
                f"{values['lib-v1'] / daemon:.2f}x",
                f"{values['lib'] / raw:.2f}x",
                f"{values['lib-v1'] / raw:.2f}x",
            )
        )
    throughput = {impl: median(runs["throughput"][impl]) for impl in ("lib", "daemon")}
    ratio = throughput["lib"] / throughput["daemon"]
    verdict = "met" if ratio >= DAEMON_TARGET else "MISSED"
    drained = runs["throughput"].get("lib-drain")
    drain_line = (
        f"\n(a) lib with a consumer that drains (receive_nowait): {median(drained):,.0f} msg/s"
        f" = {median(drained) / throughput['daemon']:.2f}x the daemon"
        if drained
        else ""
    )
    return (
        _aligned(headers, lines, 2)
        + f"\ntarget (a) lib/daemon = {ratio:.2f}x, wanted >= {DAEMON_TARGET:.2f}x: {verdict}"
        + drain_line
    )
