"""The ``trio-federation`` command line (also ``python -m trio_federation``)."""

from __future__ import annotations

import argparse
import functools
import logging
import sys
from collections.abc import Iterator, Sequence

import trio

from ._demo import DEFAULT_TASKS, DemoReport, run_demo
from ._exceptions import FederationError
from ._version import __version__

__all__ = ["build_parser", "main"]

EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``trio-federation`` command.

    Returns:
        A parser with one subcommand, ``demo``.
    """
    parser = argparse.ArgumentParser(
        prog="trio-federation",
        description="Federation of task orchestrators over WebSockets, on trio.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = commands.add_parser(
        "demo",
        help="run a small federation on loopback and watch it work",
        description=(
            "Start three orchestrators in this process, on 127.0.0.1: orch-alpha delegates "
            "tasks to orch-beta (code-generation, testing) and orch-gamma (research, "
            "analysis), which stream their progress back. Ends with each connection's health."
        ),
    )
    demo.add_argument(
        "--tasks",
        type=_positive_int,
        default=DEFAULT_TASKS,
        metavar="N",
        help=f"how many tasks to delegate (default: {DEFAULT_TASKS})",
    )
    demo.add_argument(
        "--speed",
        type=_positive_float,
        default=1.0,
        metavar="FACTOR",
        help="pace of the simulated work: 2 runs twice as fast (default: 1, about 4 s)",
    )
    demo.add_argument(
        "--plain",
        action="store_true",
        help="print one line per event even on a terminal, instead of a live table",
    )
    demo.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="log what the library does (INFO level, on stderr; implies --plain)",
    )
    return parser


def _leaves(error: BaseException) -> Iterator[BaseException]:
    """The exceptions inside ``error``, through any nesting of exception groups."""
    if isinstance(error, BaseExceptionGroup):
        for inner in error.exceptions:
            yield from _leaves(inner)
    else:
        yield error


async def _run_demo_in_time(args: argparse.Namespace) -> DemoReport:
    # Generous: the demo takes about 4 s at speed 1.
    with trio.fail_after(10 + 30 / args.speed):
        return await run_demo(
            tasks=args.tasks,
            speed=args.speed,
            live=False if args.plain or args.verbose else None,
        )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``trio-federation`` command.

    Args:
        argv: the arguments, without the program name (default: ``sys.argv[1:]``).

    Returns:
        The exit status: 0 on success, 1 if the demo failed, 2 for a usage
        error (no command given), 130 when interrupted.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE

    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s"
    )
    if args.verbose:
        logging.getLogger("trio_federation").setLevel(logging.INFO)

    report: DemoReport | None = None
    errors: list[BaseException] = []
    interrupted = False
    try:
        report = trio.run(functools.partial(_run_demo_in_time, args))
    except* KeyboardInterrupt:
        interrupted = True
    except* trio.TooSlowError:
        errors.append(TimeoutError("the demo did not finish in time"))
    except* (FederationError, OSError) as group:
        errors.extend(_leaves(group))

    if interrupted:
        print("trio-federation demo: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    if report is None or errors:
        for error in errors:
            print(f"trio-federation demo failed: {error}", file=sys.stderr)
        return EXIT_FAILURE
    if report.failed:
        for row in report.failed:
            print(
                f"trio-federation demo failed: {row.task.id} on {row.executor}: "
                f"{row.detail or row.state}",
                file=sys.stderr,
            )
        return EXIT_FAILURE
    return 0
