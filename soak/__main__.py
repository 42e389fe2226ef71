"""The command line: ``python -m soak [--only a,b]``."""

from __future__ import annotations

import argparse
import functools
import logging
import sys
import time
import traceback
from collections.abc import Awaitable, Callable
from typing import Final

import trio

from . import cuts, fuzz, refusals, restart, stall
from ._report import Figure, check, format_table

PARTS: Final[dict[str, tuple[str, Callable[[], Awaitable[list[Figure]]]]]] = {
    "a": ("exactly once across random link cuts", cuts.run),
    "b": ("a stalled consumer over 100,000 messages", stall.run),
    "c": ("a listener down within its resume window, past it, restarted", restart.run),
    "d": ("every refusal, beside 10 honest peers sending", refusals.run),
    "e": ("the fuzz suites, scaled", fuzz.run),  # with --fuzz-scale
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m soak", description=__doc__)
    parser.add_argument(
        "--only",
        default=",".join(PARTS),
        help="comma-separated parts to run (default: all of %(default)s)",
    )
    parser.add_argument(
        "--fuzz-scale",
        type=int,
        default=fuzz.SCALE,
        help="FUZZ_SCALE of part (e): times the examples of the test suite (%(default)s)",
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="show the library's warnings (refusals...)"
    )
    args = parser.parse_args(argv)
    # The refusals are the point here: the library's warning for each is noise.
    logging.basicConfig(level=logging.WARNING if args.verbose else logging.ERROR)
    chosen = [part.strip() for part in args.only.split(",") if part.strip()]
    unknown = [part for part in chosen if part not in PARTS]
    if unknown or not chosen:
        parser.error(f"unknown parts {unknown}: choose among {','.join(PARTS)}")
    figures: list[Figure] = []
    timings: list[str] = []
    began = time.monotonic()
    for part in chosen:
        title, run = PARTS[part]
        if part == "e":
            run = functools.partial(fuzz.run, args.fuzz_scale)
        print(f"({part}) {title} ...", end=" ", flush=True)
        started = time.monotonic()
        try:
            found = trio.run(run)
        except Exception as exc:  # a part that crashed is a missed bound
            traceback.print_exc()
            found = [check(part, "completed", f"{type(exc).__name__}: {exc}"[:60], "yes", False)]
        took = time.monotonic() - started
        print(f"{took:.1f} s", flush=True)
        figures.extend(found)
        timings.append(f"({part}) {took:.1f} s")
    print()
    print(format_table(figures))
    print()
    print(f"wall time: {', '.join(timings)}; total {time.monotonic() - began:.1f} s")
    missed = [f for f in figures if not f.ok]
    if missed:
        print(
            f"MISSED {len(missed)} of {len(figures)} bounds: "
            + "; ".join(f"({f.part}) {f.name}" for f in missed)
        )
        return 1
    print(f"all {len(figures)} figures within their bounds")
    return 0


if __name__ == "__main__":
    sys.exit(main())
