"""``trio-federation node``, ``delegate`` and ``peers`` against a node process, on one Redis."""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import pytest
import trio
from rich.console import Console

from trio_federation import _cli
from trio_federation._cli import main

from ._cli_processes import ROOT, open_nodes
from ._redis_server import RedisServer
from .conftest import unique_prefix

EXECUTORS = "tests.integration._executors"


async def test_delegate_and_peers_against_a_node_process(
    redis: RedisServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    prefix = unique_prefix()
    secret = tmp_path / "secret"
    secret.write_text("the federation's secret\n")
    common = ["--registry", redis.url, "--key-prefix", prefix]
    authenticated = ["--secret-file", str(secret)]
    results: dict[str, tuple[int, str, str]] = {}

    def delegate(task_id: str, description: str, *extra: str) -> list[str]:
        return ["delegate", *common, "--capability", "testing", "--description", description,
                "--task-id", task_id, "--plain", *extra]  # fmt: skip

    async def as_process(name: str, argv: list[str]) -> None:
        done = await trio.run_process(
            [sys.executable, "-m", "trio_federation", *argv],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            cwd=ROOT,
        )
        results[name] = (done.returncode, done.stdout.decode(), done.stderr.decode())

    async def in_process(name: str, argv: list[str]) -> None:
        # main() in a thread of its own (it runs its own trio run); one at a time, for capsys.
        status = await trio.to_thread.run_sync(main, argv)
        captured = capsys.readouterr()
        results[name] = (status, captured.out, captured.err)

    with trio.fail_after(20):
        async with open_nodes(
            [("alpha", ["testing", "code-generation"])],
            registry=redis.url,
            key_prefix=prefix,
            executor=f"{EXECUTORS}:by_description",
            extra=[*authenticated, "--max-concurrent", "3"],
        ) as nodes:
            # One command as a process of its own, the others in this process (faster).
            async with trio.open_nursery() as nursery:
                nursery.start_soon(
                    as_process,
                    "ok",
                    delegate("t-ok", "lint", *authenticated, "--metadata", '{"seconds": 0.01}',
                             "--timeout", "10"),
                )  # fmt: skip
                await in_process("peers", ["peers", *common])
                await in_process("plain", delegate("t-plain", "plain", *authenticated))
                await in_process("broken", delegate("t-broken", "fail", *authenticated))
                await in_process("stranger", delegate("t-stranger", "lint", "--max-attempts", "1"))
            endpoint = nodes["alpha"].endpoint

    status, out, err = results["peers"]
    assert status == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["id", "status", "load", "capabilities", "endpoint", "last",
                                "heartbeat"]  # fmt: skip
    rows = {line.split()[0]: line for line in lines[1:]}
    assert set(rows) == {"alpha"}
    state, load = rows["alpha"].split()[1:3]
    assert state == "online" and load.endswith("/3")
    assert "testing, code-generation" in rows["alpha"] and str(endpoint) in rows["alpha"]

    status, out, err = results["ok"]
    assert status == 0, err
    assert json.loads(out) == {"node": "alpha", "task": "t-ok"}
    assert err.splitlines() == [
        "t-ok: accepted by alpha",
        "t-ok: progress 50% on alpha",
        "t-ok: completed by alpha",
    ]

    status, out, err = results["plain"]
    assert status == 0, err
    assert json.loads(out) == "plain done by alpha"  # a plain function's result

    status, out, err = results["broken"]
    assert (status, out) == (1, "")
    assert "delegating t-broken failed after 1 attempt(s):" in err
    assert "  1. alpha: failed: RuntimeError: this task always fails" in err

    # Without the federation's secret, alpha refuses the connection.
    status, out, err = results["stranger"]
    assert (status, out) == (1, "")
    assert "delegating t-stranger failed after 1 attempt(s):" in err
    assert "  1. alpha: unreachable" in err


async def test_node_and_delegate_commands_in_process(
    redis: RedisServer, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The commands' coroutines in this trio run: the live view, and Ctrl-C on the node."""
    prefix = unique_prefix()
    common = ["--registry", redis.url, "--key-prefix", prefix]
    parser = _cli.build_parser()
    node_args = parser.parse_args(
        ["node", "--id", "inproc", "--capability", "testing", *common,
         "--executor", f"{EXECUTORS}:by_description"]
    )  # fmt: skip
    terminal = io.StringIO()

    def fake_console(*, stderr: bool = False, plain: bool = False) -> Console:
        if stderr and not plain:  # the delegate's progress, as on a terminal
            return Console(file=terminal, force_terminal=True, width=80, highlight=False)
        return Console(file=sys.stdout, force_terminal=False, no_color=True, width=200)

    monkeypatch.setattr(_cli, "_console", fake_console)
    statuses: dict[str, int] = {}

    async def run(name: str, command: Any, args: argparse.Namespace) -> None:
        statuses[name] = await command(args)

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run, "node", _cli._run_node, node_args)
            printed = ""
            while "listening on" not in printed:
                await trio.sleep(0.01)
                printed += capsys.readouterr().out
            assert printed.startswith("node inproc listening on ws://127.0.0.1:")

            for name, description in (("ok", "lint"), ("failed", "fail")):
                args = parser.parse_args(
                    ["delegate", *common, "--capability", "testing", "--description", description,
                     "--task-id", f"t-{name}", "--max-attempts", "1",
                     "--metadata", '{"seconds": 0.01}']
                )  # fmt: skip
                await run(name, _cli._run_delegate, args)
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C: the node leaves its block
    out = capsys.readouterr().out
    assert statuses == {"ok": 0, "failed": 1, "node": 0}
    assert json.loads(out.splitlines()[0]) == {"node": "inproc", "task": "t-ok"}
    assert "node inproc: SIGINT, leaving (again to stop at once)" in out
    assert out.splitlines()[-1] == "node inproc stopped: 1 task(s) completed, 1 failed"
    drawn = terminal.getvalue()
    assert "\x1b[" in drawn and "accepted by inproc" in drawn and "completed by inproc" in drawn
    assert "delegating t-failed failed after 1 attempt(s):" in drawn
