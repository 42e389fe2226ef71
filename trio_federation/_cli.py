"""The ``trio-federation`` command line (also ``python -m trio_federation``).

``node`` runs one orchestrator that executes tasks with a user's function,
``delegate`` delegates one task and follows it, ``peers`` lists the
registered orchestrators, ``demo`` runs a small federation in one process.
Argument errors exit with status 2 and a usage message that names only what
the user typed; failures exit with status 1; an interrupt with 130 (but an
interrupted ``node`` leaves its block normally and exits 0).
"""

from __future__ import annotations

import argparse
import functools
import importlib
import inspect
import json
import logging
import re
import signal
import sys
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Final

import trio
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn
from rich.table import Table

from ._delegation._strategies import STRATEGIES
from ._demo import DEFAULT_NODES, DEFAULT_TASKS, DemoReport, run_demo
from ._exceptions import FederationError
from ._registry._registry import OrchestratorRecord, open_registry
from ._version import __version__
from ._wire._messages import Capability, Task

__all__ = ["build_parser", "main"]

logger = logging.getLogger("trio_federation.cli")

EXIT_FAILURE: Final = 1
EXIT_USAGE: Final = 2
EXIT_INTERRUPTED: Final = 130
REGISTRY_SCHEMES: Final = ("memory", "redis", "rediss", "unix")
"""The registry URL schemes :func:`~trio_federation.open_registry` opens."""


# -- argument types (each raises ArgumentTypeError: argparse shows only its message) ------


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
    return value


def _host_port(text: str) -> tuple[str, int]:
    host, colon, port_text = text.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")  # [::1]:8000
    if not colon or not host or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise argparse.ArgumentTypeError(
            f"expected HOST:PORT (e.g. 127.0.0.1:8765; port 0: any free port), got {text!r}"
        )
    return host, int(port_text)


def _registry_url(text: str) -> str:
    scheme, sep, _ = text.partition("://")
    if not sep or scheme.lower() not in REGISTRY_SCHEMES:
        schemes = ", ".join(f"{s}://" for s in REGISTRY_SCHEMES)
        raise argparse.ArgumentTypeError(f"expected a URL starting with {schemes}; got {text!r}")
    return text


def _strategy(text: str) -> str:
    if text not in STRATEGIES:
        names = ", ".join(sorted(STRATEGIES))
        raise argparse.ArgumentTypeError(f"unknown strategy {text!r} (one of: {names})")
    return text


def _secret_file(text: str) -> bytes:
    try:
        secret = Path(text).read_bytes().strip()
    except OSError as exc:
        raise argparse.ArgumentTypeError(
            f"cannot read the secret file {text!r}: {exc.strerror or exc}"
        ) from None
    if not secret:
        raise argparse.ArgumentTypeError(f"the secret file {text!r} is empty")
    return secret


def _executor(text: str) -> Callable[..., Any]:
    module_name, colon, attribute = text.partition(":")
    if not colon or not module_name or not attribute:
        raise argparse.ArgumentTypeError(f"expected MODULE:FUNCTION (e.g. tasks:run), got {text!r}")
    if "" not in sys.path:
        sys.path.insert(0, "")  # as `python -m` does: modules in the current directory
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise argparse.ArgumentTypeError(f"no module named {exc.name or module_name!r}") from None
    except Exception as exc:  # its own code failed: say how, without a traceback
        raise argparse.ArgumentTypeError(
            f"importing {module_name!r} failed: {type(exc).__name__}: {exc}"
        ) from None
    function: Any = module
    for part in attribute.split("."):
        if not hasattr(function, part):
            raise argparse.ArgumentTypeError(f"module {module_name!r} has no {attribute!r}")
        function = getattr(function, part)
    if not callable(function):
        raise argparse.ArgumentTypeError(f"{text!r} is a {type(function).__name__}, not a function")
    return function  # type: ignore[no-any-return]


_CAPABILITY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}")


def _ws_url(text: str) -> str:
    if not text.startswith(("ws://", "wss://")) or text[-3:] == "://":
        raise argparse.ArgumentTypeError(f"expected a ws:// or wss:// URL, got {text!r}")
    return text


def _capability_names(text: str) -> tuple[str, ...]:
    # Any name, as the library takes (the standard ones are Capability's):
    # only what a registry index and a header can hold is refused.
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    for name in names:
        if not _CAPABILITY_NAME.fullmatch(name):
            standard = ", ".join(c.value for c in Capability)
            raise argparse.ArgumentTypeError(
                f"bad capability name {name!r}: letters, digits and _ . : - only, "
                f"at most 64 (the standard ones: {standard})"
            )
    return names


def _capabilities(values: list[list[tuple[str, ...]]] | None) -> tuple[str, ...]:
    """``--capability a b --capability c`` and ``--capability a,b`` alike."""
    return tuple(dict.fromkeys(name for group in values or [] for item in group for name in item))


# -- the parser ------------------------------------------------------------------------


def _add_registry(parser: argparse.ArgumentParser, *, required: bool = True) -> None:
    parser.add_argument(
        "--registry",
        type=_registry_url,
        required=required,
        metavar="URL",
        help="the registry: redis://HOST:PORT[/DB] (or rediss://, unix://), memory:// "
        "(this process only)",
    )
    parser.add_argument(
        "--key-prefix",
        metavar="PREFIX",
        help="the Redis keys' prefix (default: the library's), to run several federations on "
        "one Redis",
    )


def _add_capabilities(parser: argparse.ArgumentParser, help: str) -> None:
    parser.add_argument(
        "--capability",
        action="append",
        nargs="+",
        type=_capability_names,
        default=None,
        metavar="CAP",
        help=help + " (repeat it, or separate names by commas)",
    )


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--secret-file",
        type=_secret_file,
        metavar="FILE",
        help="a file holding the secret shared by the federation: links are authenticated",
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="log what the library does (INFO, on stderr)"
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``trio-federation`` command.

    Returns:
        A parser with the subcommands ``node``, ``delegate``, ``peers`` and ``demo``.
    """
    parser = argparse.ArgumentParser(
        prog="trio-federation",
        description="Federation of task orchestrators over WebSockets, on trio.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    node = commands.add_parser(
        "node",
        help="run an orchestrator that executes tasks, until interrupted",
        description="Run one orchestrator: listen, register in the registry, and execute the "
        "tasks delegated to it with FUNCTION (async def FUNCTION(ctx: TaskContext) -> result). "
        "Ctrl-C or SIGTERM stops it: it leaves the federation and exits 0.",
    )
    node.add_argument("--id", required=True, metavar="ID", help="this orchestrator's id")
    node.add_argument(
        "--listen",
        type=_host_port,
        default=("127.0.0.1", 0),
        metavar="HOST:PORT",
        help="where to listen (default: 127.0.0.1:0, a free port)",
    )
    node.add_argument(
        "--endpoint",
        type=_ws_url,
        metavar="URL",
        help="the URL peers dial, as registered (default: ws://HOST:PORT/federation from "
        "--listen; give it when listening on 0.0.0.0 or behind a proxy)",
    )
    _add_capabilities(node, "what it executes")
    _add_registry(node)
    node.add_argument(
        "--executor",
        type=_executor,
        required=True,
        metavar="MODULE:FUNCTION",
        help="the function that runs a task (a plain function is called directly, so it must "
        "not block)",
    )
    node.add_argument(
        "--max-concurrent",
        type=_positive_int,
        default=16,
        metavar="N",
        help="tasks it runs at once (default: 16)",
    )
    _add_common(node)

    delegate = commands.add_parser(
        "delegate",
        help="delegate one task and follow it",
        description="Delegate one task to an orchestrator of the registry that has every "
        "capability asked for; show its progress, then print its result as JSON on standard "
        "output. Exits 1 when it fails, listing every attempt.",
    )
    _add_registry(delegate)
    _add_capabilities(delegate, "what the executor must offer")
    delegate.add_argument("--description", required=True, metavar="TEXT", help="what the task is")
    delegate.add_argument(
        "--strategy",
        type=_strategy,
        default="round-robin",
        metavar="S",
        help=f"how to pick the executor: {', '.join(sorted(STRATEGIES))} (default: round-robin)",
    )
    delegate.add_argument(
        "--id", metavar="ID", help="the delegating node's id (default: cli-<random>)"
    )
    delegate.add_argument("--task-id", metavar="ID", help="the task's id (default: random)")
    delegate.add_argument(
        "--metadata", type=_json_object, metavar="JSON", help="the task's metadata, a JSON object"
    )
    delegate.add_argument(
        "--timeout",
        type=_positive_float,
        metavar="SECONDS",
        help="give up after this long (the executor runs under the remaining budget)",
    )
    delegate.add_argument(
        "--max-attempts", type=_positive_int, default=5, metavar="N", help="default: 5"
    )
    delegate.add_argument(
        "--plain", action="store_true", help="plain progress lines even on a terminal"
    )
    _add_common(delegate)

    peers = commands.add_parser(
        "peers",
        help="list the registered orchestrators",
        description="Print the orchestrators of the registry with their status, load and "
        "capabilities.",
    )
    _add_registry(peers)
    peers.add_argument(
        "-v", "--verbose", action="store_true", help="log what the library does (INFO, on stderr)"
    )

    demo = commands.add_parser(
        "demo",
        help="run a small federation on loopback and watch it work",
        description=f"Start {DEFAULT_NODES} orchestrators in this process on 127.0.0.1 and a "
        "coordinator that delegates tasks to them, balancing the load; one node is killed "
        "mid-task and its tasks fail over to the others. Ends with what each node did.",
    )
    demo.add_argument(
        "--tasks",
        type=_positive_int,
        default=DEFAULT_TASKS,
        metavar="N",
        help=f"how many tasks to delegate (default: {DEFAULT_TASKS})",
    )
    demo.add_argument(
        "--nodes",
        type=_demo_nodes,
        default=DEFAULT_NODES,
        metavar="N",
        help=f"executing nodes, at least 2 (default: {DEFAULT_NODES})",
    )
    demo.add_argument(
        "--speed",
        type=_positive_float,
        default=1.0,
        metavar="FACTOR",
        help="pace of the simulated work: 2 runs twice as fast (default: 1, about 2 s)",
    )
    demo.add_argument("--no-kill", action="store_true", help="kill no node")
    demo.add_argument(
        "--plain",
        action="store_true",
        help="print one line per event even on a terminal, instead of a live view",
    )
    demo.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="log what the library does (INFO level, on stderr; implies --plain)",
    )
    return parser


def _demo_nodes(text: str) -> int:
    value = _positive_int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"must be at least 2, got {value}")
    return value


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


# -- running ---------------------------------------------------------------------------


def _leaves(error: BaseException) -> Iterator[BaseException]:
    """The exceptions inside ``error``, through any nesting of exception groups."""
    if isinstance(error, BaseExceptionGroup):
        for inner in error.exceptions:
            yield from _leaves(inner)
    else:
        yield error


def _console(*, stderr: bool = False, plain: bool = False) -> Console:
    """A rich console on stdout (or stderr); plain text when not a terminal."""
    file = sys.stderr if stderr else sys.stdout
    if plain or not file.isatty():
        return Console(file=file, force_terminal=False, no_color=True, highlight=False, width=200)
    return Console(file=file, highlight=False)


def _registry_options(args: argparse.Namespace) -> dict[str, Any]:
    return {} if args.key_prefix is None else {"key_prefix": args.key_prefix}


async def _run_node(args: argparse.Namespace) -> int:
    # Late import: the node module is heavier than what --help needs.
    from ._delegation._node import open_federation_node

    out = _console(plain=True)
    secret: bytes | None = args.secret_file
    function: Callable[..., Any] = args.executor
    completed = failed = 0

    async def execute(ctx: Any) -> Any:
        nonlocal completed, failed
        try:
            result = function(ctx)
            if inspect.isawaitable(result):
                result = await result
        except Exception:
            failed += 1
            raise
        completed += 1
        return result

    host, port = args.listen
    leave = trio.Event()
    force = trio.CancelScope()

    def say(text: str) -> None:
        out.print(text)
        sys.stdout.flush()

    async def watch_signals(signals: AsyncIterator[int]) -> None:
        # The first signal leaves the node's block normally (an orderly exit:
        # the node drains); a second one while it leaves cancels it at once.
        async for signum in signals:
            name = signal.Signals(signum).name
            if not leave.is_set():
                say(f"node {args.id}: {name}, leaving (again to stop at once)")
                leave.set()
            else:
                say(f"node {args.id}: {name} again, stopping at once")
                force.cancel()
                return

    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch_signals, signals)
            with force:
                async with (
                    open_registry(args.registry, **_registry_options(args)) as registry,
                    open_federation_node(
                        local_id=args.id,
                        capabilities=_capabilities(args.capability),
                        executor=execute,
                        registry=registry,
                        host=host,
                        port=port,
                        endpoint=args.endpoint,
                        max_concurrent_tasks=args.max_concurrent,
                        secret=secret,
                        secrets=None if secret is None else (lambda _peer: secret),
                    ) as node,
                ):
                    say(f"node {node.local_id} listening on {node.endpoint}")
                    await leave.wait()
                    # Leaving the block normally: the node drains and deregisters.
            nursery.cancel_scope.cancel()
    say(f"node {args.id} stopped: {completed} task(s) completed, {failed} failed")
    return EXIT_INTERRUPTED if force.cancelled_caught else 0


async def _run_delegate(args: argparse.Namespace) -> int:
    from ._delegation._node import open_federation_node
    from ._delegation._state import (
        DelegationFailed,
        TaskAccepted,
        TaskCompleted,
        TaskFailed,
        TaskFailedOver,
        TaskProgress,
    )

    err = _console(stderr=True, plain=args.plain or args.verbose)
    task = Task(
        id=args.task_id or f"task-{uuid.uuid4().hex[:12]}",
        description=args.description,
        metadata=args.metadata,
    )
    local_id = args.id or f"cli-{uuid.uuid4().hex[:8]}"
    live = err.is_terminal
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        console=err,
        transient=True,
        disable=not live,
    )
    bar = progress.add_task(f"{task.id}: waiting", total=100)

    def say(text: str) -> None:
        if live:
            progress.update(bar, description=f"{task.id}: {text}")
            progress.console.print(text)
        else:
            err.print(f"{task.id}: {text}")

    with trio.fail_after(args.timeout) if args.timeout else _no_deadline():
        async with (
            open_registry(args.registry, **_registry_options(args)) as registry,
            open_federation_node(
                local_id=local_id,
                registry=registry,
                port=None,
                strategy=args.strategy,
                secret=args.secret_file,
            ) as node,
        ):
            with progress:
                try:
                    async with node.open_delegation(
                        task,
                        required_capabilities=_capabilities(args.capability),
                        max_attempts=args.max_attempts,
                    ) as delegation:
                        async for update in delegation:
                            match update:
                                case TaskAccepted(peer=peer):
                                    progress.reset(bar, total=100)
                                    say(f"accepted by {peer}")
                                case TaskProgress(peer=peer, percent=percent, message=message):
                                    if percent is not None:
                                        progress.update(bar, completed=percent)
                                    if not live:
                                        detail = f" {message}" if message else ""
                                        say(f"progress {percent or 0:g}% on {peer}{detail}")
                                case TaskFailedOver(peer=peer, reason=reason):
                                    say(f"failed over from {peer}: {reason}")
                                case TaskCompleted(peer=peer):
                                    progress.update(bar, completed=100)
                                    say(f"completed by {peer}")
                                case TaskFailed():
                                    pass  # reported below, with every attempt
                        result = await delegation.result()
                except DelegationFailed as exc:
                    err.print(
                        f"delegating {exc.task_id} failed after {len(exc.attempts)} attempt(s):"
                    )
                    for number, attempt in enumerate(exc.attempts, 1):
                        reason = f": {attempt.reason}" if attempt.reason else ""
                        err.print(
                            f"  {number}. {attempt.peer or '(no candidate)'}: "
                            f"{attempt.outcome}{reason}"
                        )
                    return EXIT_FAILURE
    sys.stdout.write(json.dumps(result, default=str) + "\n")
    sys.stdout.flush()
    return 0


class _no_deadline:
    """A context manager that does nothing, for ``with fail_after(t) if t else ...``."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def _peers_table(records: Sequence[OrchestratorRecord]) -> Table:
    table = Table(box=None, pad_edge=False, header_style="bold")
    for column in ("id", "status", "load", "capabilities", "endpoint", "last heartbeat"):
        table.add_column(column, no_wrap=column in ("id", "endpoint"))
    for record in records:
        load = f"{record.current_sessions}/{record.max_sessions or '?'}"
        table.add_row(
            record.id,
            record.status.value,
            load,
            ", ".join(record.capabilities) or "-",
            record.endpoint or "-",
            record.last_heartbeat.strftime("%H:%M:%S"),
        )
    return table


async def _run_peers(args: argparse.Namespace) -> int:
    out = _console()
    async with open_registry(args.registry, **_registry_options(args)) as registry:
        records = sorted(await registry.list_all(), key=lambda r: r.id)
    if not records:
        out.print("no orchestrator registered")
        return 0
    out.print(_peers_table(records))
    return 0


async def _run_demo(args: argparse.Namespace) -> int:
    # Generous: the demo takes about 2 s at speed 1.
    with trio.fail_after(15 + 30 / args.speed):
        report: DemoReport = await run_demo(
            tasks=args.tasks,
            nodes=args.nodes,
            speed=args.speed,
            kill=not args.no_kill,
            live=False if args.plain or args.verbose else None,
        )
    if report.failed or not report.exactly_once:
        for row in report.failed:
            print(
                f"trio-federation demo failed: {row.task.id}: {row.detail or row.state}",
                file=sys.stderr,
            )
        return EXIT_FAILURE
    return 0


COMMANDS: Final = {
    "node": _run_node,
    "delegate": _run_delegate,
    "peers": _run_peers,
    "demo": _run_demo,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``trio-federation`` command.

    Args:
        argv: the arguments, without the program name (default: ``sys.argv[1:]``).

    Returns:
        The exit status: 0 on success, 1 on a failure (a failed delegation,
        an unreachable registry, a demo task that did not complete), 2 for a
        usage error, 130 when interrupted (``node`` exits 0 on Ctrl-C).
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

    name = f"trio-federation {args.command}"
    errors: list[BaseException] = []
    interrupted = False
    status = EXIT_FAILURE
    try:
        status = trio.run(functools.partial(COMMANDS[args.command], args))
    except* KeyboardInterrupt:
        interrupted = True
    except* trio.TooSlowError:
        what = "the demo did not finish" if args.command == "demo" else "it did not finish"
        errors.append(TimeoutError(f"{what} in time"))
    except* (FederationError, OSError, ValueError) as group:
        errors.extend(_leaves(group))
    if interrupted:
        print(f"{name}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    for error in errors:
        print(f"{name} failed: {error}", file=sys.stderr)
    return EXIT_FAILURE if errors else status
