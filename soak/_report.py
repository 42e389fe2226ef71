"""Figures, their bounds and the printed table."""

from __future__ import annotations

import math
from collections.abc import Iterable

import attrs

from bench._report import percentile

__all__ = [
    "Figure",
    "at_least",
    "at_most",
    "check",
    "format_table",
    "outcome",
    "percentile",
    "seconds_at_most",
]


@attrs.frozen(kw_only=True)
class Figure:
    """One measured figure beside its bound."""

    part: str
    """The soak part, ``a`` to ``e``."""
    name: str
    measured: str
    """The figure as measured, formatted."""
    bound: str
    """The bound it must meet, formatted (``= 0``, ``<= 1.0 s``, ``HTTP 401``)."""
    ok: bool


def at_most(part: str, name: str, value: float, limit: float, unit: str = "") -> Figure:
    """A figure that must not exceed ``limit`` (``= 0`` when the limit is 0)."""
    bound = "= 0" if limit == 0 else f"<= {_number(limit)}{unit}"
    return Figure(
        part=part, name=name, measured=f"{_number(value)}{unit}", bound=bound, ok=value <= limit
    )


def at_least(part: str, name: str, value: float, limit: float, unit: str = "") -> Figure:
    """A figure that must reach ``limit``."""
    return Figure(
        part=part,
        name=name,
        measured=f"{_number(value)}{unit}",
        bound=f">= {_number(limit)}{unit}",
        ok=value >= limit,
    )


def seconds_at_most(part: str, name: str, value: float, limit: float) -> Figure:
    """A duration (seconds) shown in milliseconds, that must not exceed ``limit``."""
    return Figure(
        part=part,
        name=name,
        measured=f"{value * 1000:.1f} ms",
        bound=f"<= {limit * 1000:g} ms",
        ok=value <= limit,
    )


def outcome(part: str, name: str, measured: str, expected: str) -> Figure:
    """A figure that must be exactly the ``expected`` outcome."""
    return Figure(part=part, name=name, measured=measured, bound=expected, ok=measured == expected)


def check(part: str, name: str, measured: str, bound: str, ok: bool) -> Figure:
    """A figure whose bound is checked by the caller."""
    return Figure(part=part, name=name, measured=measured, bound=bound, ok=ok)


def _number(value: float) -> str:
    if isinstance(value, int) or (math.isfinite(value) and value == int(value)):
        return f"{int(value):,}"
    return f"{value:,.3g}" if abs(value) < 100 else f"{value:,.0f}"


def format_table(figures: Iterable[Figure]) -> str:
    """The table: part | figure | measured | bound | ok."""
    headers = ("part", "figure", "measured", "bound", "ok")
    rows = [(f.part, f.name, f.measured, f.bound, "ok" if f.ok else "MISSED") for f in figures]
    widths = [max(len(cells[i]) for cells in (headers, *rows)) for i in range(len(headers))]

    def line(cells: tuple[str, ...]) -> str:
        return " | ".join(
            f"{cell:{'>' if i == 2 else '<'}{width}}"
            for i, (cell, width) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    rule = "-+-".join("-" * width for width in widths)
    return "\n".join([line(headers), rule, *(line(row) for row in rows)])
