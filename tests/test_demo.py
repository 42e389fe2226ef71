"""The live demo (``trio-federation demo``) and the command line around it."""

from __future__ import annotations

import functools
import io
import logging
import os
import re
import shutil
import subprocess
import sys
from datetime import UTC, datetime

import pytest
import trio

from trio_federation import (
    ConnectionHealth,
    ConnectionLost,
    DelegationRequest,
    DelegationResponse,
    FederationListener,
    FederationMessage,
    HandshakeError,
    OrchestratorConnection,
    Task,
    TaskCallback,
    _cli,
    _demo,
    open_orchestrator_connection,
    serve_federation,
)
from trio_federation._cli import main
from trio_federation._demo import (
    COORDINATOR_ID,
    EXECUTORS,
    DemoReport,
    EventLog,
    TaskProgress,
    format_health,
    run_demo,
    run_executor,
)

from .conftest import wait_for

FAST = 20.0
"""Speed factor for tests: the demo's ~4 s become ~0.2 s."""


def health_rows(text: str) -> dict[str, list[str]]:
    """The rows of the printed health table, by peer id."""
    _, table = text.split(f"Connection health, as seen by {COORDINATOR_ID}:\n", 1)
    lines = table.splitlines()
    assert lines[0].split() == [
        "peer", "status", "latency", "sent", "received", "errors", "uptime",
    ]  # fmt: skip
    rows: dict[str, list[str]] = {}
    for line in lines[1:]:
        if not line.startswith("  orch-"):
            break
        cells = re.split(r"\s{2,}", line.strip())
        rows[cells[0]] = cells
    return rows


async def test_demo_completes_every_task_and_reports_health() -> None:
    out = io.StringIO()
    with trio.fail_after(30):
        report = await run_demo(tasks=6, speed=FAST, out=out)
    text = out.getvalue()

    assert "\x1b[" not in text, "no ANSI escapes when the output is not a terminal"
    for number in range(1, 7):
        task = f"task-{number}"
        assert re.search(rf"^ *[\d.]+s  {task} +delegated to orch-", text, re.MULTILINE)
        assert re.search(rf"^ *[\d.]+s  {task} +accepted by orch-", text, re.MULTILINE)
        assert re.search(rf"^ *[\d.]+s  {task} +progress +\d+%$", text, re.MULTILINE)
        assert re.search(rf"^ *[\d.]+s  {task} +completed by orch-\w+: ", text, re.MULTILINE)
    assert "FAILED" not in text
    assert "6 of 6 task(s) completed" in text
    # The first executor's link was cut once, and nothing was lost or repeated.
    assert report.cuts == 1 and len(report.recoveries) == 1
    assert report.lossless
    assert "link to orch-beta cut" in text and "link to orch-beta back after" in text
    assert "every progress report arrived exactly once, in order" in text

    for spec in EXECUTORS:
        assert f"{spec.id} received broadcast 'all-tasks-delegated' from orch-alpha" in text

    rows = health_rows(text)
    assert set(rows) == {"orch-beta", "orch-gamma"}
    for peer, (_, status, latency, sent, received, errors, uptime) in rows.items():
        assert status in {"connected", "active", "idle"}, peer
        assert latency == "n/a" or latency.endswith(" ms")
        # Three tasks each: 3 delegations and a broadcast out; for each task an
        # acceptance, 4 progress reports and a completion back.
        assert int(sent) >= 4
        assert int(received) >= 18
        # The cut link is reported once (as a lost transport, then resumed).
        assert errors == ("1" if peer == "orch-beta" else "0")
        assert uptime.endswith(" s")

    assert isinstance(report, DemoReport)
    assert report.failed == ()
    assert set(report.health) == {"orch-beta", "orch-gamma"}


async def test_a_lost_progress_report_would_be_seen() -> None:
    report = await run_demo(tasks=1, speed=FAST, out=io.StringIO(), cut=False)
    assert report.cuts == 0 and report.lossless
    report.tasks[0].reports.remove(40.0)  # as if it had been lost
    assert not report.lossless


async def test_demo_routes_each_task_by_capability() -> None:
    with trio.fail_after(30):
        report = await run_demo(tasks=6, speed=FAST, out=io.StringIO())
    capabilities = {spec.id: set(spec.capabilities) for spec in EXECUTORS}
    for row in report.tasks:
        assert set(row.needs) <= capabilities[row.executor], row
    assert {row.executor for row in report.tasks} == {"orch-beta", "orch-gamma"}


async def test_demo_live_table_redraws_in_place() -> None:
    out = io.StringIO()
    with trio.fail_after(30):
        report = await run_demo(tasks=3, speed=FAST, out=out, live=True)
    text = out.getvalue()
    assert report.failed == ()
    assert "\x1b[?25l" in text and text.rstrip().count("\x1b[?25h") == 1  # cursor restored
    assert re.search(r"\x1b\[\d+F", text), "moves back up to redraw"
    final_frame = text.rsplit("\x1b[?25h", 1)[0].rsplit("details", 1)[1]
    assert final_frame.count("100%") == 3
    assert "3 of 3 completed" in final_frame
    assert set(health_rows(text)) == {"orch-beta", "orch-gamma"}


async def test_demo_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="tasks"):
        await run_demo(tasks=0, out=io.StringIO())
    with pytest.raises(ValueError, match="speed"):
        await run_demo(speed=0, out=io.StringIO())


async def test_demo_reports_tasks_of_an_executor_that_leaves_early(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def accept_then_leave(conn: OrchestratorConnection, **kwargs: object) -> None:
        async for msg in conn:
            assert isinstance(msg.payload, DelegationRequest)
            await conn.accept_delegation(msg.payload)
            if conn.local_id == "orch-beta":
                return  # a normal close, with tasks unfinished
            raise RuntimeError("orch-gamma breaks down")  # closes with 1011

    monkeypatch.setattr(_demo, "run_executor", accept_then_leave)
    out = io.StringIO()
    with trio.fail_after(30):
        report = await run_demo(tasks=2, speed=FAST, out=out)
    text = out.getvalue()
    assert [(row.task.id, row.state) for row in report.failed] == [
        ("task-1", "failed"),
        ("task-2", "failed"),
    ]
    assert re.search(r"task-1 +FAILED on orch-beta: orch-beta closed the connection", text)
    assert re.search(r"task-2 +FAILED on orch-gamma: lost the connection to orch-gamma: ", text)
    assert "0 of 2 task(s) completed" in text


SECRET = b"a secret of the demo tests"


async def test_executor_abandons_its_tasks_quietly_when_the_coordinator_leaves(
    caplog: pytest.LogCaptureFixture,
) -> None:
    display = EventLog(io.StringIO())
    handler = functools.partial(run_executor, speed=1.0, display=display)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            listener: FederationListener = await nursery.start(
                functools.partial(
                    serve_federation,
                    handler,
                    "127.0.0.1",
                    0,
                    local_id="orch-beta",
                    capabilities=[],
                    secrets={COORDINATOR_ID: SECRET},
                )
            )
            url = f"ws://127.0.0.1:{listener.port}/federation"
            async with open_orchestrator_connection(
                url, local_id=COORDINATOR_ID, capabilities=[], secret=SECRET
            ) as conn:
                task = Task(id="t1", description="slow", metadata={"seconds": 0.3})
                request = DelegationRequest(
                    from_orchestrator_id=COORDINATOR_ID, to_orchestrator_id=conn.id, task=task
                )
                await conn.send_message(
                    FederationMessage(
                        type="delegation", payload=request, sender=COORDINATOR_ID, recipient=conn.id
                    )
                )
                accepted = await conn.receive()
                assert accepted.payload == DelegationResponse(task_id="t1", accepted=True)
            # Gone: the executor's next progress report finds nobody to send it to.
            await wait_for(lambda: not listener.connections)
            nursery.cancel_scope.cancel()
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


async def test_executor_reports_a_refusal_when_unhealthy() -> None:
    sent: list[FederationMessage] = []

    class UnhealthyConnection:
        async def accept_delegation(self, request: DelegationRequest) -> DelegationResponse:
            return DelegationResponse(
                task_id=request.task.id, accepted=False, reason="Connection unhealthy"
            )

        async def send(self, message: FederationMessage) -> None:
            sent.append(message)

    request = DelegationRequest(
        from_orchestrator_id="a", to_orchestrator_id="b", task=Task(id="t1", description="d")
    )
    await _demo._work_on(UnhealthyConnection(), request, speed=1.0)  # type: ignore[arg-type]
    [message] = sent
    assert message.type == "callback"
    assert (message.sender, message.recipient, message.correlation_id) == ("b", "a", "t1")
    assert message.payload == DelegationResponse(
        task_id="t1", accepted=False, reason="Connection unhealthy"
    )


def test_callbacks_move_a_task_along() -> None:
    def row() -> TaskProgress:
        return TaskProgress(task=Task(id="t1", description="d"), needs=(), executor="x")

    refused = row()
    _demo._apply(refused, DelegationResponse(task_id="t1", accepted=False))
    assert (refused.state, refused.detail) == ("failed", "refused: no reason given")

    failed = row()
    _demo._apply(failed, TaskCallback(task_id="t1", status="failed", error="disk full"))
    assert (failed.state, failed.detail) == ("failed", "disk full")

    progressing = row()
    _demo._apply(progressing, TaskCallback(task_id="t1", status="progress", progress=40))
    assert (progressing.state, progressing.percent, progressing.settled) == ("progress", 40, False)


def test_planning_needs_a_capable_executor() -> None:
    with pytest.raises(RuntimeError, match="no executor offers code-generation"):
        _demo._plan(1, [])


def test_health_table_shows_latency_in_milliseconds() -> None:
    health = ConnectionHealth(
        status="idle",
        uptime=12.5,
        last_heartbeat=datetime.now(UTC),
        messages_sent=3,
        messages_received=4,
        errors=1,
        latency=0.00125,
    )
    text = format_health({"orch-beta": health})
    assert health_rows(text)["orch-beta"] == [
        "orch-beta", "idle", "1.25 ms", "3", "4", "1", "12.50 s",
    ]  # fmt: skip
    assert "n/a" not in text


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize(
    ("size", "live"),
    [((100, 40), True), ((60, 40), False), ((100, 12), False)],
)
async def test_demo_redraws_only_on_a_terminal_big_enough(
    monkeypatch: pytest.MonkeyPatch, size: tuple[int, int], live: bool
) -> None:
    monkeypatch.setattr(shutil, "get_terminal_size", lambda: os.terminal_size(size))
    out = FakeTerminal()
    with trio.fail_after(30):
        await run_demo(tasks=6, speed=FAST, out=out)
    assert ("\x1b[?25l" in out.getvalue()) is live


# -- the command line ----------------------------------------------------------------


def test_cli_demo_in_a_subprocess() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "trio_federation", "demo", "--tasks", "2", "--speed", "10"],
        capture_output=True,
        text=True,
        timeout=25,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "2 of 2 task(s) completed" in result.stdout
    assert "\x1b[" not in result.stdout  # a pipe is not a terminal
    assert result.stderr == ""  # quiet logging by default


def test_cli_demo_in_process(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--tasks", "1", "--speed", str(FAST), "--plain"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"task-1 +completed by orch-beta", out)
    assert "1 of 1 task(s) completed" in out


def test_cli_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc_info:
        main(["--help"])
    assert exc_info.value.code == 0
    out = capsys.readouterr().out
    assert "usage: trio-federation" in out
    assert "demo" in out

    with pytest.raises(SystemExit) as exc_info:
        main(["demo", "--help"])
    assert exc_info.value.code == 0
    out = capsys.readouterr().out
    for option in ("--tasks", "--speed", "--plain", "--verbose"):
        assert option in out


def test_cli_without_a_command_prints_help_and_exits_2(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main([]) == 2
    captured = capsys.readouterr()
    assert "usage: trio-federation" in captured.err
    assert "demo" in captured.err


def test_cli_module_without_a_command_exits_2() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "trio_federation"],
        capture_output=True,
        text=True,
        timeout=25,
        check=False,
    )
    assert result.returncode == 2
    assert "usage: trio-federation" in result.stderr


@pytest.mark.parametrize("argv", [["demo", "--tasks", "0"], ["demo", "--speed", "-1"], ["nope"]])
def test_cli_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc_info:
        main(argv)
    assert exc_info.value.code == 2
    assert "usage:" in capsys.readouterr().err


def test_cli_reports_a_failure_with_exit_1(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    async def broken_demo(**kwargs: object) -> DemoReport:
        async with trio.open_nursery():  # failures arrive inside exception groups
            raise HandshakeError("cannot connect to ws://127.0.0.1:1/federation")

    monkeypatch.setattr(_cli, "run_demo", broken_demo)
    assert main(["demo"]) == 1
    err = capsys.readouterr().err
    assert "trio-federation demo failed: cannot connect to ws://127.0.0.1:1/federation" in err


def test_cli_reports_failed_tasks_with_exit_1(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    async def demo_with_a_lost_executor(**kwargs: object) -> DemoReport:
        report = await run_demo(tasks=1, speed=FAST, out=io.StringIO())
        row = report.tasks[0]
        row.state, row.detail = (
            "failed",
            f"lost the connection to orch-beta: {ConnectionLost(1006)}",
        )
        return report

    monkeypatch.setattr(_cli, "run_demo", demo_with_a_lost_executor)
    assert main(["demo"]) == 1
    err = capsys.readouterr().err
    assert "trio-federation demo failed: task-1 on orch-beta: lost the connection" in err


def test_cli_verbose_logs_the_library_at_info(capsys: pytest.CaptureFixture[str]) -> None:
    logger = logging.getLogger("trio_federation")
    level = logger.level
    try:
        assert main(["demo", "--tasks", "1", "--speed", str(FAST), "--verbose"]) == 0
        assert logger.getEffectiveLevel() == logging.INFO
    finally:
        logger.setLevel(level)
    assert "\x1b[" not in capsys.readouterr().out


@pytest.mark.parametrize(
    ("error", "status", "message"),
    [
        (KeyboardInterrupt(), 130, "trio-federation demo: interrupted"),
        (trio.TooSlowError(), 1, "trio-federation demo failed: the demo did not finish in time"),
    ],
)
def test_cli_interrupted_or_too_slow(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    error: BaseException,
    status: int,
    message: str,
) -> None:
    async def stopped_demo(**kwargs: object) -> DemoReport:
        await trio.lowlevel.checkpoint()
        raise error

    monkeypatch.setattr(_cli, "run_demo", stopped_demo)
    assert main(["demo"]) == status
    assert message in capsys.readouterr().err
