"""The live demo: a small federation of three orchestrators in one process.

``trio-federation demo`` (or ``python -m trio_federation demo``) runs it. Read it
as a guided tour of the public API:

* Two *executors*, ``orch-beta`` and ``orch-gamma``, each run
  :func:`~trio_federation.serve_federation` on 127.0.0.1 (on a port the OS
  picks) and announce their capabilities.
* Every link is authenticated, the recommended configuration: each executor
  holds a secret shared with the coordinator (``secrets=``), the coordinator
  proves its id with it (``secret=``) and the executor proves it back; the
  secret never crosses the wire.
* The link to ``orch-beta`` runs through a
  :class:`~trio_federation.testing.FaultyProxy`, which cuts it (a TCP reset)
  in the middle of the run. The coordinator dials with a
  :class:`~trio_federation.ReconnectPolicy`: it reconnects, the resumable
  session sends again what was in flight, and no progress report is lost or
  repeated — the end of the run checks it.
* A *coordinator*, ``orch-alpha``, dials both with
  :func:`~trio_federation.open_orchestrator_connection`, picks the executor for
  each task with :meth:`~trio_federation.OrchestratorConnection.check_capability`
  and sends it a ``delegation`` message carrying a
  :class:`~trio_federation.DelegationRequest`.
* Each executor accepts with
  :meth:`~trio_federation.OrchestratorConnection.accept_delegation`, then
  streams :class:`~trio_federation.TaskCallback` messages: ``progress`` while it
  works, ``completed`` with a result at the end.
* The coordinator reads them with ``async for msg in conn`` and shows the
  progress as it happens, broadcasts an announcement once every task is
  delegated, and finally prints each connection's health
  (:meth:`~trio_federation.OrchestratorConnection.get_status`).

The work itself is simulated: each task says in its metadata how long it takes
and what it produces. Everything is written to a text stream passed in
(standard output by default): a table redrawn in place on a terminal, one line
per event otherwise.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import logging
import os
import secrets
import shutil
import sys
from collections.abc import Mapping, Sequence
from typing import Final, Literal, Protocol, TextIO

import trio

from . import (
    BroadcastPayload,
    Capability,
    ConnectionHealth,
    ConnectionLost,
    DelegationRequest,
    DelegationResponse,
    FederationListener,
    FederationMessage,
    OrchestratorConnection,
    Payload,
    ReconnectPolicy,
    Task,
    TaskCallback,
    TaskType,
    open_orchestrator_connection,
    serve_federation,
)
from .testing import FaultyProxy

__all__ = [
    "COORDINATOR_ID",
    "EXECUTORS",
    "DemoReport",
    "Display",
    "EventLog",
    "ExecutorSpec",
    "LiveTable",
    "TaskProgress",
    "format_health",
    "run_demo",
    "run_executor",
]

logger = logging.getLogger("trio_federation.demo")

HOST: Final = "127.0.0.1"
"""The demo listens on loopback only."""
COORDINATOR_ID: Final = "orch-alpha"
"""The orchestrator that delegates."""
HEARTBEAT_TIMEOUT: Final = 2.0
"""Seconds; connections ping every half of it, so even a short run measures latency."""
PROGRESS_STEP: Final = 20
"""Percent of a task done between two ``progress`` callbacks."""
DELEGATION_INTERVAL: Final = 0.15
"""Seconds between two delegations (divided by the speed factor)."""
BROADCAST_TOPIC: Final = "all-tasks-delegated"
"""The topic of the coordinator's announcement."""
DEFAULT_TASKS: Final = 6
"""Tasks delegated when the caller does not say."""
RECONNECT: Final = ReconnectPolicy(initial_delay=0.02, max_delay=0.5)
"""How the coordinator reconnects after the demo cuts a link."""


@dataclasses.dataclass(frozen=True)
class ExecutorSpec:
    """An orchestrator that runs delegated tasks."""

    id: str
    capabilities: tuple[Capability, ...]


EXECUTORS: Final = (
    ExecutorSpec("orch-beta", (Capability.CODE_GENERATION, Capability.TESTING)),
    ExecutorSpec("orch-gamma", (Capability.RESEARCH, Capability.ANALYSIS)),
)
"""The executors of the demo federation."""


@dataclasses.dataclass(frozen=True)
class _TaskTemplate:
    description: str
    type: TaskType
    needs: tuple[Capability, ...]
    seconds: float  # of simulated work
    outcome: str  # the simulated result


_TEMPLATES: Final = (
    _TaskTemplate(
        "Generate a REST client for the billing API",
        TaskType.CODE,
        (Capability.CODE_GENERATION,),
        2.6,
        "3 modules, 412 lines",
    ),
    _TaskTemplate(
        "Survey heartbeat designs of WebSocket federations",
        TaskType.RESEARCH,
        (Capability.RESEARCH,),
        3.0,
        "7 sources summarised",
    ),
    _TaskTemplate(
        "Write integration tests for task delegation",
        TaskType.CODE,
        (Capability.TESTING,),
        2.2,
        "18 tests, all passing",
    ),
    _TaskTemplate(
        "Analyse last week's latency report",
        TaskType.ANALYSIS,
        (Capability.ANALYSIS,),
        2.4,
        "p99 latency down 12 %",
    ),
    _TaskTemplate(
        "Refactor the scheduler and cover it with tests",
        TaskType.CODE,
        (Capability.CODE_GENERATION, Capability.TESTING),
        3.2,
        "140 lines removed, coverage 97 %",
    ),
    _TaskTemplate(
        "Compare three load-balancing strategies",
        TaskType.RESEARCH,
        (Capability.RESEARCH, Capability.ANALYSIS),
        2.8,
        "least-loaded wins",
    ),
)

TaskState = Literal["pending", "delegated", "accepted", "progress", "completed", "failed"]
"""Where a task is, as the coordinator sees it (in that order; the last two are final)."""


@dataclasses.dataclass
class TaskProgress:
    """What the coordinator knows about one task.

    Attributes:
        task: the task.
        needs: the capabilities it requires.
        executor: the id of the orchestrator it was delegated to.
        state: how far it got.
        percent: the last progress reported, 0-100.
        detail: the result once completed; why, once failed.
    """

    task: Task
    needs: tuple[str, ...]
    executor: str
    state: TaskState = "pending"
    percent: float = 0.0
    detail: str = ""
    reports: list[float] = dataclasses.field(default_factory=list)
    """Every progress figure received, in order (to check that none was lost)."""

    @property
    def settled(self) -> bool:
        """True once the task completed or failed."""
        return self.state in ("completed", "failed")


@dataclasses.dataclass(frozen=True)
class DemoReport:
    """What :func:`run_demo` returns.

    Attributes:
        tasks: every task, in delegation order.
        health: the coordinator's view of each connection, by executor id,
            taken just before it disconnected.
        elapsed: seconds the whole run took.
    """

    tasks: tuple[TaskProgress, ...]
    health: Mapping[str, ConnectionHealth]
    elapsed: float
    cuts: int = 0
    recoveries: tuple[float, ...] = ()

    @property
    def failed(self) -> tuple[TaskProgress, ...]:
        """The tasks that did not complete."""
        return tuple(row for row in self.tasks if row.state != "completed")

    @property
    def lossless(self) -> bool:
        """Every completed task got every progress report exactly once, in order."""
        expected = [float(p) for p in range(PROGRESS_STEP, 101, PROGRESS_STEP)]
        return all(row.reports == expected for row in self.tasks if row.state == "completed")


# -- the executors ---------------------------------------------------------------------


def _reply(request: DelegationRequest, payload: Payload) -> FederationMessage:
    """A ``callback`` message about ``request``, from its executor to its delegator."""
    return FederationMessage(
        type="callback",
        payload=payload,
        sender=request.to_orchestrator_id,
        recipient=request.from_orchestrator_id,
        correlation_id=request.task.id,
    )


async def _work_on(conn: OrchestratorConnection, request: DelegationRequest, speed: float) -> None:
    """Accept one delegated task, then report progress until it is done."""
    response = await conn.accept_delegation(request)
    if not response.accepted:
        # An unhealthy connection refuses without sending anything: try to say so.
        await conn.send(_reply(request, response))
        return
    task = request.task
    simulated = task.metadata or {}  # the demo's stand-in for real work
    steps = 100 // PROGRESS_STEP  # the last step ends with `completed`
    pause = float(simulated.get("seconds", 1.0)) / speed / steps
    for percent in range(PROGRESS_STEP, 100, PROGRESS_STEP):
        await trio.sleep(pause)
        # `send` waits for room in the queue (backpressure) rather than failing.
        await conn.send(
            _reply(request, TaskCallback(task_id=task.id, status="progress", progress=percent))
        )
    await trio.sleep(pause)
    result = simulated.get("outcome", "done")
    await conn.send(
        _reply(
            request, TaskCallback(task_id=task.id, status="completed", progress=100, result=result)
        )
    )


async def run_executor(conn: OrchestratorConnection, *, speed: float, display: Display) -> None:
    """Serve one coordinator: the ``handler`` of :func:`~trio_federation.serve_federation`.

    Runs each delegated task in the background and reports broadcasts. Returns
    once the coordinator has disconnected and every task has finished; the
    listener then closes the connection. If the coordinator goes away first,
    the unfinished tasks are abandoned: nobody is left to report to.

    Args:
        conn: the connection to the coordinator.
        speed: how much faster than normal the simulated work goes.
        display: where broadcasts are reported.
    """
    try:
        async with trio.open_nursery() as nursery:
            async for msg in conn:
                match msg.payload:
                    case DelegationRequest() as request:
                        nursery.start_soon(_work_on, conn, request, speed)
                    case BroadcastPayload(topic=topic, data=data):
                        display.note(
                            f"{conn.local_id} received broadcast {topic!r} "
                            f"from {msg.sender}: {data}"
                        )
                    case _:
                        pass  # an executor has no use for other messages
    except* ConnectionLost as group:
        # Raised by `async for` (lost abnormally) or by a task's `send` (closed
        # early); either way the nursery has cancelled the other tasks.
        logger.info("%s: %s went away (%s)", conn.local_id, conn.id, group.exceptions[0])


# -- the coordinator -------------------------------------------------------------------


def _plan(count: int, executors: Sequence[OrchestratorConnection]) -> list[TaskProgress]:
    """Make ``count`` tasks and choose, by capability, the executor of each."""
    plan = []
    for number in range(1, count + 1):
        template = _TEMPLATES[(number - 1) % len(_TEMPLATES)]
        task = Task(
            id=f"task-{number}",
            description=template.description,
            type=template.type,
            metadata={"seconds": template.seconds, "outcome": template.outcome},
        )
        capable = [conn for conn in executors if conn.check_capability(template.needs)]
        if not capable:
            raise RuntimeError(f"no executor offers {', '.join(template.needs)}")
        plan.append(TaskProgress(task=task, needs=template.needs, executor=capable[0].id))
    return plan


async def _delegate(conn: OrchestratorConnection, row: TaskProgress, display: Display) -> None:
    """Send one task to its executor."""
    request = DelegationRequest(
        from_orchestrator_id=COORDINATOR_ID,
        to_orchestrator_id=conn.id,
        task=row.task,
        priority=row.task.priority,
        required_capabilities=row.needs,
    )
    row.state = "delegated"
    display.update(row)
    try:
        await conn.send_message(
            FederationMessage(
                type="delegation",
                payload=request,
                sender=COORDINATOR_ID,
                recipient=conn.id,
                correlation_id=row.task.id,
            )
        )
    except ConnectionLost as exc:
        row.state, row.detail = "failed", f"{conn.id} has gone: {exc}"
        display.update(row)


async def _announce(
    executors: Sequence[OrchestratorConnection], tasks: int, display: Display
) -> None:
    """Broadcast to every executor still there that all ``tasks`` tasks are out."""
    reached = []
    for conn in executors:
        message = FederationMessage(
            type="broadcast",
            payload=BroadcastPayload(topic=BROADCAST_TOPIC, data={"tasks": tasks}),
            sender=COORDINATOR_ID,
            recipient=conn.id,
        )
        with contextlib.suppress(ConnectionLost):  # gone: `_follow` reports its tasks
            await conn.send_message(message)
            reached.append(conn.id)
    display.note(f"{COORDINATOR_ID} broadcast {BROADCAST_TOPIC!r} to {', '.join(reached)}")


def _apply(row: TaskProgress, payload: object) -> None:
    """Update ``row`` with a callback payload about its task."""
    match payload:
        case DelegationResponse(accepted=True):
            row.state = "accepted"
        case DelegationResponse(reason=reason):
            row.state, row.detail = "failed", f"refused: {reason or 'no reason given'}"
        case TaskCallback(status="progress", progress=percent):
            row.state, row.percent = "progress", percent or 0.0
            row.reports.append(row.percent)
        case TaskCallback(status="completed", result=result):
            row.state, row.percent, row.detail = "completed", 100.0, str(result)
            row.reports.append(100.0)
        case TaskCallback(status="failed", error=error):
            row.state, row.detail = "failed", error or "no error given"


async def _follow(
    conn: OrchestratorConnection,
    rows: Sequence[TaskProgress],
    display: Display,
    progressed: trio.Event | None = None,
) -> None:
    """Read callbacks from one executor until each of its tasks has settled.

    A connection that ends first fails the tasks still open; it does not raise.
    """
    if not rows:
        return  # nothing was delegated to this executor
    by_id = {row.task.id: row for row in rows}
    try:
        async for msg in conn:
            payload = msg.payload
            if isinstance(payload, (TaskCallback, DelegationResponse)):
                row = by_id.get(payload.task_id)
                if row is not None and not row.settled:
                    _apply(row, payload)
                    display.update(row)
                    if row.reports and progressed is not None:
                        progressed.set()
            if all(row.settled for row in rows):
                return
        reason = f"{conn.id} closed the connection"
    except ConnectionLost as exc:
        reason = f"lost the connection to {conn.id}: {exc}"
    for row in rows:
        if not row.settled:
            row.state, row.detail = "failed", reason
            display.update(row)


async def _cut_once(
    proxy: FaultyProxy,
    conn: OrchestratorConnection,
    progressed: trio.Event,
    display: Display,
    recoveries: list[float],
) -> None:
    """Cut the link once progress came through it; time until it is back."""
    await progressed.wait()
    with conn.watch_status() as statuses:
        proxy.cut()
        cut_at = trio.current_time()
        display.note(f"link to {conn.id} cut (TCP reset, no close): reconnecting...")
        down = False
        async for status in statuses:
            if status in ("disconnected", "connecting"):
                down = True
            elif down and status in ("connected", "active", "idle"):
                break
    recoveries.append(trio.current_time() - cut_at)
    display.note(
        f"link to {conn.id} back after {recoveries[-1] * 1000:.0f} ms; "
        "session resumed, in-flight messages sent again"
    )


async def _follow_and_cut(
    conn: OrchestratorConnection,
    rows: Sequence[TaskProgress],
    display: Display,
    proxy: FaultyProxy,
    recoveries: list[float],
) -> None:
    """:func:`_follow`, cutting the link once on the way (not after the end)."""
    progressed = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_cut_once, proxy, conn, progressed, display, recoveries)
        await _follow(conn, rows, display, progressed)
        nursery.cancel_scope.cancel()


async def _coordinate(
    executors_at: Sequence[tuple[str, str, bytes]],
    *,
    tasks: int,
    speed: float,
    display: Display,
    proxy: FaultyProxy | None = None,
    recoveries: list[float] | None = None,
) -> tuple[list[TaskProgress], dict[str, ConnectionHealth]]:
    """Dial the executors, delegate ``tasks`` tasks and follow them to the end.

    ``executors_at`` holds each executor's id, URL and the secret shared with
    it. With ``proxy`` (in front of the first executor), cut that link once
    mid-run and note the recovery times in ``recoveries``.
    """
    recoveries = [] if recoveries is None else recoveries
    async with contextlib.AsyncExitStack() as stack:
        executors = [
            await stack.enter_async_context(
                open_orchestrator_connection(
                    url,
                    local_id=COORDINATOR_ID,
                    capabilities=[],
                    remote_id=executor_id,
                    secret=secret,
                    heartbeat_timeout=HEARTBEAT_TIMEOUT,
                    reconnect=RECONNECT,
                )
            )
            for executor_id, url, secret in executors_at
        ]
        plan = _plan(tasks, executors)
        display.start(plan)
        async with trio.open_nursery() as nursery:
            for conn in executors:
                mine = [row for row in plan if row.executor == conn.id]
                if proxy is not None and conn is executors[0] and mine:
                    nursery.start_soon(_follow_and_cut, conn, mine, display, proxy, recoveries)
                else:
                    nursery.start_soon(_follow, conn, mine, display)
            by_id = {conn.id: conn for conn in executors}
            for row in plan:
                if not row.settled:  # else its executor has already gone
                    await _delegate(by_id[row.executor], row, display)
                    await trio.sleep(DELEGATION_INTERVAL / speed)
            await _announce(executors, tasks, display)
        # Every task has settled: take the health figures while still connected.
        health = {conn.id: conn.get_status() for conn in executors}
    return plan, health


# -- showing it ---------------------------------------------------------------------


class Display(Protocol):
    """Where the demo shows what happens."""

    def start(self, rows: Sequence[TaskProgress]) -> None:
        """The tasks are planned; ``rows`` will be updated in place."""

    def update(self, row: TaskProgress) -> None:
        """``row`` changed."""

    def note(self, text: str) -> None:
        """Something worth mentioning happened."""

    def close(self) -> None:
        """The run is over (or failed): leave the output tidy."""


class EventLog:
    """Shows one plain line per event: for logs, pipes and files."""

    def __init__(self, out: TextIO) -> None:
        self._out = out
        self._started = trio.current_time()

    def _line(self, text: str) -> None:
        self._out.write(f"{trio.current_time() - self._started:6.2f}s  {text}\n")
        self._out.flush()

    def start(self, rows: Sequence[TaskProgress]) -> None:
        pass

    def update(self, row: TaskProgress) -> None:
        task = f"{row.task.id:<8}"
        match row.state:
            case "delegated":
                needs = ", ".join(row.needs)
                self._line(f"{task}delegated to {row.executor} [{needs}]: {row.task.description}")
            case "accepted":
                self._line(f"{task}accepted by {row.executor}")
            case "progress":
                self._line(f"{task}progress {row.percent:3.0f}%")
            case "completed":
                self._line(f"{task}completed by {row.executor}: {row.detail}")
            case "failed":
                self._line(f"{task}FAILED on {row.executor}: {row.detail}")
            case "pending":
                pass

    def note(self, text: str) -> None:
        self._line(text)

    def close(self) -> None:
        self._out.flush()


class LiveTable:
    """Redraws a table of progress bars in place: for a terminal.

    Uses plain ANSI escape sequences: move the cursor back up over the previous
    frame, then rewrite each line.
    """

    BAR_WIDTH: Final = 20
    MAX_NOTES: Final = 4
    MIN_WIDTH: Final = 72  # columns: the fixed part of a row takes 62
    _STATE_COLORS: Final[Mapping[str, str]] = {
        "pending": "2",  # dim
        "delegated": "2",
        "accepted": "36",  # cyan
        "progress": "33",  # yellow
        "completed": "32",  # green
        "failed": "31",  # red
    }

    def __init__(self, out: TextIO, *, width: int, color: bool, unicode: bool) -> None:
        self._out = out
        self._width = width
        self._color = color
        self._full, self._empty, self._dot = ("█", "░", "·") if unicode else ("#", "-", "-")
        self._rows: Sequence[TaskProgress] = ()
        self._notes: collections.deque[str] = collections.deque(maxlen=self.MAX_NOTES)
        self._height = 0  # lines drawn by the previous frame
        self._started = trio.current_time()

    def _paint(self, text: str, code: str) -> str:
        return f"\x1b[{code}m{text}\x1b[0m" if self._color else text

    def _clip(self, text: str, width: int) -> str:
        return text if len(text) <= width else text[: max(width - 3, 0)] + "..."

    def _percent(self, value: float) -> str:
        return f" {value:4.0f}%  "

    def _render_row(self, row: TaskProgress) -> str:
        filled = round(self.BAR_WIDTH * row.percent / 100)
        color = self._STATE_COLORS[row.state]
        bar = self._paint(self._full * filled, color) + self._empty * (self.BAR_WIDTH - filled)
        executor = row.executor if row.state != "pending" else ""
        prefix = f"  {row.task.id:<8} {executor:<11} "
        middle = self._percent(row.percent)
        state = f"{row.state:<11}"
        used = len(prefix) + self.BAR_WIDTH + len(middle) + len(state)
        detail = self._clip(row.detail or row.task.description, self._width - used - 1)
        return f"{prefix}{bar}{middle}{self._paint(state, color)}{detail}"

    def _frame(self) -> list[str]:
        done = sum(row.state == "completed" for row in self._rows)
        elapsed = trio.current_time() - self._started
        progress = "progress".ljust(self.BAR_WIDTH + len(self._percent(100)))
        header = f"  {'task':<8} {'executor':<11} {progress}{'state':<11}details"
        lines = [self._paint(header, "1")]
        lines += [self._render_row(row) for row in self._rows]
        lines.append(f"  {done} of {len(self._rows)} completed {self._dot} {elapsed:.1f} s")
        lines += [f"  {self._dot} {self._clip(note, self._width - 5)}" for note in self._notes]
        return lines

    def _draw(self) -> None:
        up = f"\x1b[{self._height}F" if self._height else ""  # back to the frame's first line
        lines = self._frame()
        body = "".join(f"\x1b[2K{line}\n" for line in lines)
        self._out.write(f"{up}{body}\x1b[J")  # and clear what a longer frame left below
        self._out.flush()
        self._height = len(lines)

    def start(self, rows: Sequence[TaskProgress]) -> None:
        self._rows = rows
        self._out.write("\x1b[?25l")  # hide the cursor while redrawing
        self._draw()

    def update(self, row: TaskProgress) -> None:
        self._draw()

    def note(self, text: str) -> None:
        self._notes.append(text)
        if self._rows:
            self._draw()

    def close(self) -> None:
        # No last redraw: after an interruption, log lines may sit below the table.
        self._out.write("\x1b[?25h")  # show the cursor again
        self._out.flush()


def format_health(health: Mapping[str, ConnectionHealth]) -> str:
    """Format connection health figures as a table, one row per peer.

    Args:
        health: figures by peer id, as from
            :meth:`~trio_federation.OrchestratorConnection.get_status`.

    Returns:
        The table, with a title line and a trailing newline.
    """
    header = ("peer", "status", "latency", "sent", "received", "errors", "uptime")
    rows = [
        (
            peer,
            str(figures.status),
            "n/a" if figures.latency is None else f"{figures.latency * 1000:.2f} ms",
            str(figures.messages_sent),
            str(figures.messages_received),
            str(figures.errors),
            f"{figures.uptime:.2f} s",
        )
        for peer, figures in health.items()
    ]
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    left_aligned = 2  # the peer and status columns; numbers align right

    def line(cells: Sequence[str]) -> str:
        return "  " + "  ".join(
            cell.ljust(width) if i < left_aligned else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(cells, widths, strict=True))
        )

    lines = [f"Connection health, as seen by {COORDINATOR_ID}:", line(header)]
    lines += [line(row) for row in rows]
    if any(figures.latency is None for figures in health.values()):
        lines.append(
            f"  (latency n/a: no ping answered yet; pings go out every {HEARTBEAT_TIMEOUT / 2:g} s)"
        )
    return "\n".join(lines) + "\n"


def _use_live_table(out: TextIO, tasks: int) -> bool:
    """Redraw in place only on a terminal big enough for the whole table."""
    if not out.isatty():
        return False
    columns, lines = shutil.get_terminal_size()
    return columns >= LiveTable.MIN_WIDTH and tasks + LiveTable.MAX_NOTES + 4 < lines


async def run_demo(
    *,
    tasks: int = DEFAULT_TASKS,
    speed: float = 1.0,
    out: TextIO | None = None,
    live: bool | None = None,
    cut: bool = True,
) -> DemoReport:
    """Run the demo federation on loopback until every task has settled.

    Starts the executors' listeners on 127.0.0.1 (ports chosen by the OS), lets
    the coordinator delegate ``tasks`` tasks and follow them, prints the health
    of its connections, then stops everything. Nothing outlives the call.

    Args:
        tasks: how many tasks to delegate.
        speed: a factor on the pace of the simulated work: 1 takes a few
            seconds, 10 is ten times faster.
        out: where to write (default: standard output).
        live: redraw a table in place (True) or print one line per event
            (False); by default, live when ``out`` is a terminal big enough.
        cut: run the first executor's link through a proxy that cuts it once
            mid-run, to show the coordinator reconnecting without loss.

    Returns:
        The state of every task and the health of every connection. Failed
        tasks are reported there, not raised.

    Raises:
        ValueError: ``tasks`` or ``speed`` is out of range.
        trio_federation.FederationError: a connection could not be made or
            failed while delegating (inside an exception group, as trio's
            nurseries raise them; catch it with ``except*``).
        OSError: a listener could not bind.
    """
    if tasks < 1:
        raise ValueError(f"tasks must be at least 1, got {tasks}")
    if not speed > 0:
        raise ValueError(f"speed must be positive, got {speed}")
    out = sys.stdout if out is None else out
    if live is None:
        live = _use_live_table(out, tasks)
    display: Display
    if live:
        encoding = getattr(out, "encoding", None)
        display = LiveTable(
            out,
            width=shutil.get_terminal_size().columns,
            color="NO_COLOR" not in os.environ,
            unicode=encoding is None or "utf" in encoding.lower(),
        )
    else:
        display = EventLog(out)

    started = trio.current_time()
    recoveries: list[float] = []
    proxy: FaultyProxy | None = None
    out.write(f"trio-federation demo: {len(EXECUTORS) + 1} orchestrators on {HOST}\n")
    try:
        async with trio.open_nursery() as nursery:
            executors_at = []
            for spec in EXECUTORS:
                secret = secrets.token_bytes(32)  # shared by this executor and the coordinator
                handler = functools.partial(run_executor, speed=speed, display=display)
                listener: FederationListener = await nursery.start(
                    functools.partial(
                        serve_federation,
                        handler,
                        HOST,
                        0,
                        local_id=spec.id,
                        capabilities=spec.capabilities,
                        heartbeat_timeout=HEARTBEAT_TIMEOUT,
                        secrets={COORDINATOR_ID: secret},
                    )
                )
                url = f"ws://{HOST}:{listener.port}/federation"
                capabilities = ", ".join(spec.capabilities)
                out.write(f"  {spec.id:<11} listens on {url}  [{capabilities}]\n")
                if cut and proxy is None:  # the first executor's link will be cut
                    proxy = await nursery.start(FaultyProxy(listener.port, target_host=HOST).run)
                    url = f"ws://{HOST}:{proxy.port}/federation"
                    out.write(f"{'':<14}reached through a proxy that will cut the link once\n")
                executors_at.append((spec.id, url, secret))
            out.write(
                f"  {COORDINATOR_ID:<11} dials both, each link authenticated both ways with "
                f"a shared secret,\n{'':<14}and delegates {tasks} task(s)\n\n"
            )
            plan, health = await _coordinate(
                executors_at,
                tasks=tasks,
                speed=speed,
                display=display,
                proxy=proxy,
                recoveries=recoveries,
            )
            nursery.cancel_scope.cancel()  # stop the listeners
    finally:
        display.close()

    report = DemoReport(
        tasks=tuple(plan),
        health=health,
        elapsed=trio.current_time() - started,
        cuts=0 if proxy is None else proxy.statistics().cuts,
        recoveries=tuple(recoveries),
    )
    out.write("\n" + format_health(report.health) + "\n")
    done = len(report.tasks) - len(report.failed)
    out.write(f"{done} of {len(report.tasks)} task(s) completed in {report.elapsed:.1f} s.\n")
    if report.cuts:
        back = ", ".join(f"{r * 1000:.0f} ms" for r in report.recoveries) or "not measured"
        verdict = (
            "every progress report arrived exactly once, in order"
            if report.lossless
            else "SOME PROGRESS REPORTS WERE LOST OR REPEATED"
        )
        out.write(f"The link was cut {report.cuts} time(s), back after {back}; {verdict}.\n")
    out.flush()
    return report
