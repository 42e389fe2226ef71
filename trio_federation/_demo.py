"""The live demo: a federation of orchestrator nodes in one process, on loopback.

``trio-federation demo`` (or ``python -m trio_federation demo``) runs it. Read it
as a guided tour of :func:`~trio_federation.open_federation_node`:

* Four executing nodes, ``orch-1`` to ``orch-4``, listen on 127.0.0.1 (ports
  the OS picks) and register in the run's shared memory registry (the
  default: no server needed). Each runs a simulated task with a
  :class:`~trio_federation.TaskContext`, reporting its progress in steps of
  20 %.
* A coordinator, ``orch-hub``, that does not listen (``port=None``) delegates
  the tasks with the ``least-loaded`` strategy and follows each through
  :meth:`~trio_federation.FederationNode.open_delegation`: accepted, progress,
  failed over, completed.
* Partway through, one executor is killed: its node's scope is cancelled with
  tasks running. Those tasks are handed back and the coordinator fails them
  over: they start again, and complete, on the other nodes.
* The run ends with a table of what each node did (completed, failed over,
  latency) and checks that every task has exactly one final outcome and that
  every progress report of the run that completed it arrived exactly once, in
  order.

On a terminal the progress is drawn live with `rich <https://rich.readthedocs.io>`_;
otherwise one plain line per event is printed.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import statistics
from collections.abc import Sequence
from typing import Final, Literal, TextIO

import trio
from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, Progress, TextColumn
from rich.progress_bar import ProgressBar
from rich.table import Table

from . import (
    DelegationFailed,
    FederationNode,
    Task,
    TaskAccepted,
    TaskCompleted,
    TaskContext,
    TaskFailed,
    TaskFailedOver,
    TaskProgress,
    open_federation_node,
)

__all__ = [
    "COORDINATOR_ID",
    "DEFAULT_NODES",
    "DEFAULT_TASKS",
    "DemoReport",
    "NodeReport",
    "TaskRecord",
    "run_demo",
]

logger = logging.getLogger("trio_federation.demo")

COORDINATOR_ID: Final = "orch-hub"
"""The node that delegates (it does not listen)."""
CAPABILITIES: Final = ("code-generation", "testing")
"""What every executing node offers and every task requires."""
DEFAULT_TASKS: Final = 24
"""Tasks delegated when the caller does not say."""
DEFAULT_NODES: Final = 4
"""Executing nodes when the caller does not say."""
MAX_CONCURRENT: Final = 8
"""Tasks one node runs at once: enough that the demo's tasks are never refused."""
PROGRESS_STEP: Final = 20
"""Percent of a task done between two progress reports."""
TASK_SECONDS: Final = (0.5, 0.7, 0.6, 0.8)
"""Simulated work per task at speed 1, in turn."""
DELEGATION_INTERVAL: Final = 0.04
"""Seconds between two delegations at speed 1."""
KILL_AFTER: Final = 0.75
"""The victim is killed once this fraction of the tasks has been delegated..."""
KILL_WHEN_RUNNING: Final = 3
"""... and it runs this many tasks (or after a bounded wait)."""
SECRET: Final = "the demo federation's shared secret"
"""Every link is authenticated, the recommended configuration: one secret shared by all."""
REFRESH_PER_SECOND: Final = 12
"""Redraws of the live view a second."""

State = Literal["pending", "accepted", "running", "completed", "failed"]


@dataclasses.dataclass
class TaskRecord:
    """What the coordinator saw of one task.

    Attributes:
        task: the task.
        state: where it is now.
        executor: the node running it, or the one that completed it.
        percent: its last progress figure.
        failed_over_from: the nodes it was taken from, in order.
        reports: the progress figures of the current run, in order.
        finals: how many final outcomes it had (exactly one is right).
        latency: seconds from delegation to the final outcome.
        detail: the error, when it failed.
    """

    task: Task
    state: State = "pending"
    executor: str | None = None
    percent: float = 0.0
    failed_over_from: list[str] = dataclasses.field(default_factory=list)
    reports: list[float] = dataclasses.field(default_factory=list)
    finals: int = 0
    latency: float | None = None
    detail: str = ""


@dataclasses.dataclass(frozen=True)
class NodeReport:
    """One executing node's part in the run.

    Attributes:
        id: the node's id.
        killed: whether it was the one killed.
        completed: tasks it completed (as the coordinator saw them).
        failed_over: tasks taken away from it and run elsewhere.
        latency_p50: median seconds from delegation to completion of its tasks.
        latency_max: the slowest of them.
    """

    id: str
    killed: bool
    completed: int
    failed_over: int
    latency_p50: float | None
    latency_max: float | None


@dataclasses.dataclass(frozen=True)
class DemoReport:
    """What :func:`run_demo` returns.

    Attributes:
        tasks: every task, in delegation order.
        nodes: the executing nodes, by id order.
        victim: the id of the node killed (None: none was).
        elapsed: seconds the whole run took.
    """

    tasks: tuple[TaskRecord, ...]
    nodes: tuple[NodeReport, ...]
    victim: str | None
    elapsed: float

    @property
    def failed(self) -> tuple[TaskRecord, ...]:
        """The tasks that did not complete."""
        return tuple(row for row in self.tasks if row.state != "completed")

    @property
    def failed_over(self) -> tuple[TaskRecord, ...]:
        """The tasks that were failed over at least once."""
        return tuple(row for row in self.tasks if row.failed_over_from)

    @property
    def exactly_once(self) -> bool:
        """Every task had exactly one final outcome."""
        return all(row.finals == 1 for row in self.tasks)

    @property
    def lossless(self) -> bool:
        """Every completed task got each progress report of its last run once, in order."""
        expected = [float(p) for p in range(PROGRESS_STEP, 100, PROGRESS_STEP)]
        return all(row.reports == expected for row in self.tasks if row.state == "completed")


# -- the executing side -----------------------------------------------------------------


async def _work(node_id: str, speed: float, ctx: TaskContext) -> dict[str, str]:
    """The simulated task: report progress in steps, then return who did it."""
    seconds = float((ctx.task.metadata or {}).get("seconds", 0.5)) / speed
    steps = 100 // PROGRESS_STEP
    for percent in range(PROGRESS_STEP, 100, PROGRESS_STEP):
        await trio.sleep(seconds / steps)
        await ctx.report_progress(percent)
    await trio.sleep(seconds / steps)
    return {"node": node_id, "task": ctx.task.id}


async def _run_node(
    node_id: str,
    speed: float,
    scope: trio.CancelScope,
    stop: trio.Event,
    *,
    task_status: trio.TaskStatus[FederationNode] = trio.TASK_STATUS_IGNORED,
) -> None:
    """One executing node, until ``stop`` is set (a clean exit) or ``scope`` is cancelled."""
    with scope:
        async with open_federation_node(
            local_id=node_id,
            capabilities=CAPABILITIES,
            executor=functools.partial(_work, node_id, speed),
            max_concurrent_tasks=MAX_CONCURRENT,
            secret=SECRET,
            secrets=lambda _peer: SECRET,
        ) as node:
            task_status.started(node)
            await stop.wait()


# -- the display ------------------------------------------------------------------------


class _View:
    """Shows the run: a live view on a terminal, plain lines otherwise."""

    def __init__(self, out: TextIO | None, live: bool | None, node_ids: Sequence[str]) -> None:
        self.console = Console(file=out, highlight=False, force_terminal=live or None)
        self.live = self.console.is_terminal if live is None else live
        if not self.live:
            self.console = Console(
                file=out, highlight=False, force_terminal=False, no_color=True, width=200
            )
        self.node_ids = node_ids
        self.rows: list[TaskRecord] = []
        self.killed: str | None = None
        self.events: list[str] = []
        self._started = trio.current_time()
        self._live: Live | None = None
        self._drawn = -math.inf
        self.changed = trio.lowlevel.ParkingLot()
        """Unparked on every update."""

    def say(self, text: str) -> None:
        """An event: a line of its own, or the live view's latest events."""
        stamp = f"{trio.current_time() - self._started:6.2f}s  "
        if self.live:
            self.events = [*self.events[-5:], stamp + text]
            self.refresh()
        else:
            self.console.print(stamp + text, soft_wrap=True)

    def _render(self) -> Group:
        done = sum(1 for r in self.rows if r.state == "completed")
        overall = Progress(
            TextColumn("[bold]tasks"),
            BarColumn(bar_width=40),
            TextColumn("{task.completed:.0f}/{task.total:.0f} completed"),
            console=self.console,
        )
        overall.add_task("tasks", total=max(1, len(self.rows)), completed=done)
        nodes = Table(title=None, box=None, pad_edge=False)
        for column in ("node", "state", "running", "", "completed", "", "failed over"):
            nodes.add_column(column)
        for node_id in self.node_ids:
            running = [r for r in self.rows if r.executor == node_id and r.state == "running"]
            completed = sum(
                1 for r in self.rows if r.executor == node_id and r.state == "completed"
            )
            away = sum(r.failed_over_from.count(node_id) for r in self.rows)
            state = "[red]killed" if node_id == self.killed else "[green]up"
            # The node's load: its running tasks over its slots; the share of
            # the work it completed so far.
            load = ProgressBar(total=MAX_CONCURRENT, completed=len(running), width=16)
            share = ProgressBar(total=max(1, len(self.rows)), completed=completed, width=16)
            nodes.add_row(node_id, state, str(len(running)), load, str(completed), share, str(away))
        return Group(overall, nodes, *self.events)

    def refresh(self) -> None:
        """Redraw the live view, at most ``REFRESH_PER_SECOND`` times (no-op on plain output)."""
        self.changed.unpark_all()
        now = trio.current_time()
        if self._live is not None and now - self._drawn >= 1 / REFRESH_PER_SECOND:
            self._drawn = now
            self._live.update(self._render(), refresh=True)

    def __enter__(self) -> _View:
        if self.live:
            self._live = Live(
                self._render(),
                console=self.console,
                refresh_per_second=REFRESH_PER_SECOND,
                auto_refresh=False,
                transient=False,
            )
            self._live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.update(self._render(), refresh=True)
            self._live.__exit__(None, None, None)
            self._live = None


def _summary_table(report: DemoReport) -> Table:
    table = Table(title="What each node did", title_justify="left")
    for column in ("node", "state", "completed", "failed over", "p50 latency", "max latency"):
        table.add_column(column, justify="left" if column in ("node", "state") else "right")
    for node in report.nodes:
        table.add_row(
            node.id,
            "killed" if node.killed else "up",
            str(node.completed),
            str(node.failed_over),
            "-" if node.latency_p50 is None else f"{node.latency_p50 * 1000:.0f} ms",
            "-" if node.latency_max is None else f"{node.latency_max * 1000:.0f} ms",
        )
    return table


# -- the coordinator ----------------------------------------------------------------------


async def _follow(hub: FederationNode, row: TaskRecord, view: _View) -> None:
    """Delegate one task and record every update the coordinator sees."""
    started = trio.current_time()
    task = row.task
    try:
        async with hub.open_delegation(
            task, required_capabilities=CAPABILITIES, max_attempts=8
        ) as delegation:
            async for update in delegation:
                match update:
                    case TaskAccepted(peer=peer):
                        row.state, row.executor, row.percent, row.reports = "accepted", peer, 0, []
                        view.say(f"{task.id}  accepted by {peer}")
                    case TaskProgress(peer=peer, percent=percent):
                        row.state, row.percent = "running", percent or 0.0
                        row.reports.append(float(percent or 0.0))
                    case TaskFailedOver(peer=peer, reason=reason):
                        row.failed_over_from.append(peer)
                        row.state, row.executor = "pending", None
                        view.say(f"{task.id}  FAILED OVER from {peer} ({reason})")
                    case TaskCompleted(peer=peer):
                        row.finals += 1
                        row.state, row.executor, row.percent = "completed", peer, 100.0
                        row.latency = trio.current_time() - started
                        view.say(f"{task.id}  completed by {peer}")
                    case TaskFailed(error=error):
                        row.finals += 1
                        row.state, row.detail = "failed", str(error)
                        view.say(f"{task.id}  FAILED: {error}")
                view.refresh()
            await delegation.result()
    except DelegationFailed:
        pass  # recorded from its TaskFailed update


async def run_demo(
    *,
    tasks: int = DEFAULT_TASKS,
    nodes: int = DEFAULT_NODES,
    speed: float = 1.0,
    kill: bool = True,
    out: TextIO | None = None,
    live: bool | None = None,
) -> DemoReport:
    """Run the demo federation and show it on ``out``; return what happened.

    Args:
        tasks: how many tasks the coordinator delegates.
        nodes: how many executing nodes (at least 2 when ``kill``).
        speed: how much faster than normal the simulated work goes.
        kill: kill one node partway through (its tasks fail over).
        out: where to write (default: standard output).
        live: draw a live view (True), print plain lines (False), or decide
            by whether ``out`` is a terminal (None).

    Raises:
        ValueError: an argument is out of range.
        OSError: a node could not listen on 127.0.0.1.
    """
    if tasks < 1:
        raise ValueError(f"tasks must be at least 1, got {tasks}")
    if nodes < (2 if kill else 1):
        raise ValueError(f"nodes must be at least {2 if kill else 1}, got {nodes}")
    if not speed > 0:
        raise ValueError(f"speed must be positive, got {speed}")
    node_ids = [f"orch-{n}" for n in range(1, nodes + 1)]
    victim = node_ids[-1] if kill else None
    view = _View(out, live, node_ids)
    started = trio.current_time()
    rows = [
        TaskRecord(
            Task(
                id=f"task-{n:02d}",
                description=f"simulated task {n}",
                metadata={"seconds": TASK_SECONDS[n % len(TASK_SECONDS)]},
            )
        )
        for n in range(1, tasks + 1)
    ]
    view.rows = rows
    scopes = {node_id: trio.CancelScope() for node_id in node_ids}
    stop = trio.Event()
    with view:
        async with trio.open_nursery() as nursery:
            for node_id in node_ids:
                await nursery.start(_run_node, node_id, speed, scopes[node_id], stop)
            view.say(f"{nodes} nodes listening on 127.0.0.1: {', '.join(node_ids)}")
            async with (
                open_federation_node(
                    local_id=COORDINATOR_ID, port=None, strategy="least-loaded", secret=SECRET
                ) as hub,
                trio.open_nursery() as delegations,
            ):
                kill_at = max(1, int(tasks * KILL_AFTER))
                for index, row in enumerate(rows):
                    delegations.start_soon(_follow, hub, row, view)
                    await trio.sleep(DELEGATION_INTERVAL / speed)
                    if victim is not None and index + 1 == kill_at:
                        await _kill_when_busy(victim, rows, scopes[victim], view, speed)
            stop.set()
    elapsed = trio.current_time() - started
    report = DemoReport(
        tasks=tuple(rows),
        nodes=tuple(_node_report(node_id, node_id == victim, rows) for node_id in node_ids),
        victim=victim,
        elapsed=elapsed,
    )
    _print_summary(view.console, report)
    return report


async def _kill_when_busy(
    victim: str, rows: Sequence[TaskRecord], scope: trio.CancelScope, view: _View, speed: float
) -> None:
    """Kill ``victim`` once it is running tasks (mid-task), within a bounded wait."""
    with trio.move_on_after(2.0 / speed):
        while (
            sum(1 for r in rows if r.executor == victim and r.state == "running")
            < KILL_WHEN_RUNNING
        ):
            await view.changed.park()
    running = sum(1 for r in rows if r.executor == victim and r.state in ("accepted", "running"))
    view.killed = victim
    view.say(f"{victim}  KILLED with {running} task(s) running")
    scope.cancel()


def _node_report(node_id: str, killed: bool, rows: Sequence[TaskRecord]) -> NodeReport:
    latencies = [
        r.latency
        for r in rows
        if r.executor == node_id and r.state == "completed" and r.latency is not None
    ]
    return NodeReport(
        id=node_id,
        killed=killed,
        completed=len(latencies),
        failed_over=sum(r.failed_over_from.count(node_id) for r in rows),
        latency_p50=statistics.median(latencies) if latencies else None,
        latency_max=max(latencies) if latencies else None,
    )


def _print_summary(console: Console, report: DemoReport) -> None:
    console.print()
    console.print(_summary_table(report))
    total = len(report.tasks)
    completed = total - len(report.failed)
    console.print(f"{completed} of {total} task(s) completed in {report.elapsed:.1f} s")
    if report.victim is not None:
        moved = [r for r in report.failed_over if report.victim in r.failed_over_from]
        elsewhere = sum(1 for r in moved if r.state == "completed")
        console.print(
            f"{len(moved)} task(s) failed over from {report.victim}, "
            f"{elsewhere} of them completed elsewhere"
        )
    for row in report.failed:
        console.print(f"FAILED {row.task.id}: {row.detail or row.state}")
    if report.exactly_once:
        console.print("every task had exactly one final outcome")
    if report.lossless:
        console.print("every progress report arrived exactly once, in order")
