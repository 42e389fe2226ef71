"""The demo: a federation of nodes in one process, balancing, one killed mid-task."""

from __future__ import annotations

import io
import re
import subprocess
import sys

import pytest
import trio

from trio_federation import Task, TaskContext, _cli, _demo
from trio_federation._cli import main
from trio_federation._demo import COORDINATOR_ID, DemoReport, run_demo

SPEED = 4.0
"""The demo's ~2 s become ~0.5 s (slow enough that the victim holds tasks when killed)."""


async def test_demo_balances_kills_one_node_and_fails_its_tasks_over() -> None:
    out = io.StringIO()
    with trio.fail_after(20):
        report = await run_demo(tasks=24, speed=SPEED, out=out)
    text = out.getvalue()
    assert "\x1b[" not in text, "no ANSI escapes when the output is not a terminal"

    assert report.failed == ()
    assert report.exactly_once and report.lossless
    assert report.victim == "orch-4"
    # Balancing: every node took work; the survivors completed all of it.
    by_node = {node.id: node for node in report.nodes}
    assert set(by_node) == {"orch-1", "orch-2", "orch-3", "orch-4"}
    assert by_node["orch-4"].killed and by_node["orch-4"].failed_over >= 1
    survivors = [by_node[n] for n in ("orch-1", "orch-2", "orch-3")]
    assert all(node.completed >= 4 for node in survivors), report.nodes
    assert sum(node.completed for node in report.nodes) == 24
    assert all(node.latency_p50 is not None for node in survivors)
    # Each task taken from the victim completed elsewhere.
    moved = [row for row in report.tasks if "orch-4" in row.failed_over_from]
    assert moved and all(row.executor != "orch-4" for row in moved)

    for number in range(1, 25):
        assert re.search(rf"^ *[\d.]+s  task-{number:02d}  accepted by orch-\d", text, re.M)
        assert re.search(rf"^ *[\d.]+s  task-{number:02d}  completed by orch-\d", text, re.M)
    assert re.search(r"orch-4  KILLED with \d+ task\(s\) running", text)
    for row in moved:
        assert re.search(rf"{row.task.id}  FAILED OVER from orch-4", text)
    assert "What each node did" in text
    assert re.search(r"orch-4 .* killed .* \d+ .* [1-9]\d* ", text)
    assert "24 of 24 task(s) completed" in text
    assert f"{len(moved)} task(s) failed over from orch-4, {len(moved)} of them" in text
    assert "every task had exactly one final outcome" in text
    assert "every progress report arrived exactly once, in order" in text


async def test_demo_without_a_kill_fails_nothing_over() -> None:
    with trio.fail_after(20):
        report = await run_demo(tasks=6, nodes=2, speed=SPEED, kill=False, out=io.StringIO())
    assert report.victim is None and report.failed == () and report.failed_over == ()
    assert {node.id for node in report.nodes if node.completed} == {"orch-1", "orch-2"}


async def test_demo_live_view_draws_with_rich() -> None:
    out = io.StringIO()
    with trio.fail_after(20):
        report = await run_demo(tasks=8, speed=SPEED, out=out, live=True)
    text = out.getvalue()
    assert report.failed == ()
    assert "\x1b[?25l" in text and "\x1b[?25h" in text  # cursor hidden, then restored
    assert "completed" in text and "orch-4" in text and "killed" in text
    assert "What each node did" in text


async def test_demo_reports_a_task_that_failed(monkeypatch: pytest.MonkeyPatch) -> None:
    work = _demo._work

    async def fails_once(node_id: str, speed: float, ctx: TaskContext) -> dict[str, str]:
        if ctx.task.id == "task-02":
            raise RuntimeError("disk full")
        return await work(node_id, speed, ctx)

    monkeypatch.setattr(_demo, "_work", fails_once)
    out = io.StringIO()
    with trio.fail_after(20):
        report = await run_demo(tasks=3, nodes=2, kill=False, speed=8, out=out)
    assert [(row.task.id, row.state) for row in report.failed] == [("task-02", "failed")]
    assert report.exactly_once
    text = out.getvalue()
    assert re.search(r"task-02  FAILED: delegating 'task-02' failed after 1 attempt\(s\)", text)
    assert "RuntimeError: disk full" in text
    assert "2 of 3 task(s) completed" in text
    assert "FAILED task-02: " in text


def test_a_lost_or_repeated_progress_report_would_be_seen() -> None:
    row = _demo.TaskRecord(Task(id="t", description="d"), state="completed", finals=1)
    row.reports = [20.0, 40.0, 60.0, 80.0]
    report = DemoReport(tasks=(row,), nodes=(), victim=None, elapsed=0.0)
    assert report.lossless and report.exactly_once
    row.reports.remove(40.0)
    assert not report.lossless
    row.finals = 2
    assert not report.exactly_once


async def test_demo_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="tasks"):
        await run_demo(tasks=0, out=io.StringIO())
    with pytest.raises(ValueError, match="nodes"):
        await run_demo(nodes=1, out=io.StringIO())
    with pytest.raises(ValueError, match="speed"):
        await run_demo(speed=0, out=io.StringIO())


# -- through the command line ---------------------------------------------------------


def test_cli_demo_in_a_subprocess() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "trio_federation", "demo", "--speed", str(SPEED)],
        capture_output=True,
        text=True,
        timeout=25,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "24 of 24 task(s) completed" in result.stdout
    assert "FAILED OVER from orch-4" in result.stdout
    assert "\x1b[" not in result.stdout  # a pipe is not a terminal
    assert result.stderr == ""  # quiet: authenticated links, no warnings


def test_cli_demo_in_process(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--tasks", "4", "--nodes", "2", "--no-kill", "--speed", "8"]) == 0
    out = capsys.readouterr().out
    assert "4 of 4 task(s) completed" in out
    assert COORDINATOR_ID not in out.split("What each node did")[1]  # executors only


def test_cli_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc_info:
        main(["--help"])
    assert exc_info.value.code == 0
    out = capsys.readouterr().out
    assert "usage: trio-federation" in out
    for command in ("node", "delegate", "peers", "demo"):
        assert command in out
    with pytest.raises(SystemExit) as exc_info:
        main(["demo", "--help"])
    assert exc_info.value.code == 0
    out = capsys.readouterr().out
    for option in ("--tasks", "--nodes", "--speed", "--no-kill", "--plain", "--verbose"):
        assert option in out


def test_cli_without_a_command_prints_help_and_exits_2(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main([]) == 2
    captured = capsys.readouterr()
    assert "usage: trio-federation" in captured.err


@pytest.mark.parametrize(
    "argv",
    [
        ["demo", "--tasks", "0"],
        ["demo", "--tasks", "many"],
        ["demo", "--nodes", "1"],
        ["demo", "--speed", "-1"],
        ["demo", "--speed", "nan"],
        ["nope"],
    ],
)
def test_cli_demo_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc_info:
        main(argv)
    assert exc_info.value.code == 2
    err = capsys.readouterr().err
    assert "usage:" in err
    assert "_positive" not in err and "Traceback" not in err


def test_cli_reports_failed_tasks_with_exit_1(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    async def demo_with_a_failure(**kwargs: object) -> DemoReport:
        report = await run_demo(tasks=1, nodes=2, kill=False, speed=8, out=io.StringIO())
        row = report.tasks[0]
        row.state, row.detail = "failed", "every attempt refused"
        return report

    monkeypatch.setattr(_cli, "run_demo", demo_with_a_failure)
    assert main(["demo"]) == 1
    err = capsys.readouterr().err
    assert "trio-federation demo failed: task-01: every attempt refused" in err


def test_cli_verbose_logs_the_library_at_info(capsys: pytest.CaptureFixture[str]) -> None:
    import logging

    logger = logging.getLogger("trio_federation")
    level = logger.level
    try:
        assert main(["demo", "--tasks", "2", "--nodes", "2", "--no-kill", "--verbose"]) == 0
        assert logger.getEffectiveLevel() == logging.INFO
    finally:
        logger.setLevel(level)
    assert "\x1b[" not in capsys.readouterr().out


@pytest.mark.parametrize(
    ("error", "status", "message"),
    [
        (KeyboardInterrupt(), 130, "trio-federation demo: interrupted"),
        (trio.TooSlowError(), 1, "trio-federation demo failed: the demo did not finish in time"),
        (OSError("address in use"), 1, "trio-federation demo failed: address in use"),
    ],
)
def test_cli_interrupted_too_slow_or_failing(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    error: BaseException,
    status: int,
    message: str,
) -> None:
    async def stopped_demo(**kwargs: object) -> DemoReport:
        async with trio.open_nursery():  # failures arrive inside exception groups
            await trio.lowlevel.checkpoint()
            raise error

    monkeypatch.setattr(_cli, "run_demo", stopped_demo)
    assert main(["demo"]) == status
    assert message in capsys.readouterr().err
