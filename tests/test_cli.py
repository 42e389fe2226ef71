"""The command line's argument errors: exit 2, a usage line, the user's words only."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from trio_federation._cli import main

ROOT = Path(__file__).resolve().parent.parent
NODE = ["node", "--id", "n1", "--registry", "memory://"]
EXECUTOR = "tests.integration._executors:short"
INTERNAL = re.compile(
    r"\b_(positive_int|positive_float|host_port|executor|registry_url|secret_file|strategy|"
    r"json_object|demo_nodes)\b|invalid \w+ value|Traceback|ArgumentTypeError"
)
"""What a usage message must never show: our function names, argparse's default wording."""


def usage_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exc_info:
        main(argv)
    assert exc_info.value.code == 2
    err = capsys.readouterr().err
    assert "usage: trio-federation" in err
    assert not INTERNAL.search(err), err
    return err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([*NODE, "--executor", EXECUTOR, "--listen", "localhost"], "expected HOST:PORT"),
        ([*NODE, "--executor", EXECUTOR, "--listen", "127.0.0.1:http"], "expected HOST:PORT"),
        ([*NODE, "--executor", EXECUTOR, "--listen", "127.0.0.1:70000"], "expected HOST:PORT"),
        ([*NODE, "--executor", "no-colon"], "expected MODULE:FUNCTION"),
        ([*NODE, "--executor", EXECUTOR, "--endpoint", "http://x:1"], "expected a ws:// or wss://"),
        (
            [*NODE, "--executor", EXECUTOR, "--capability", "testing,two words"],
            "bad capability name 'two words'",
        ),
        ([*NODE, "--executor", "tests:"], "expected MODULE:FUNCTION"),
        ([*NODE, "--executor", "no_such_module_here:run"], "no module named 'no_such_module_here'"),
        ([*NODE, "--executor", "tests.integration._executors:missing"], "has no 'missing'"),
        (
            [*NODE, "--executor", "tests.integration._executors:NOT_CALLABLE"],
            "is a int, not a function",
        ),
        ([*NODE, "--executor", EXECUTOR, "--max-concurrent", "0"], "must be at least 1"),
        ([*NODE, "--executor", EXECUTOR, "--max-concurrent", "lots"], "expected a whole number"),
        (
            [*NODE, "--executor", EXECUTOR, "--secret-file", "/nonexistent/secret"],
            "cannot read the secret file '/nonexistent/secret': No such file or directory",
        ),
        (["node", "--id", "n1", "--executor", EXECUTOR], "the following arguments are required"),
        (
            ["node", "--id", "n1", "--registry", "http://127.0.0.1:6379", "--executor", EXECUTOR],
            "expected a URL starting with memory://, redis://, rediss://, unix://",
        ),
        (["peers", "--registry", "127.0.0.1:6379"], "expected a URL starting with"),
        (
            ["delegate", "--registry", "memory://", "--description", "d", "--strategy", "best"],
            "unknown strategy 'best' (one of: capability-score, consistent-hash, least-loaded,",
        ),
        (
            ["delegate", "--registry", "memory://", "--description", "d", "--timeout", "0"],
            "must be a positive number",
        ),
        (
            ["delegate", "--registry", "memory://", "--description", "d", "--metadata", "[1]"],
            "expected a JSON object",
        ),
        (["delegate", "--registry", "memory://"], "the following arguments are required"),
        (
            ["delegate", "--registry", "memory://", "--description", "d", "--metadata", "{x"],
            "not JSON: ",
        ),
        (
            ["delegate", "--registry", "memory://", "--description", "d", "--timeout", "soon"],
            "expected a number, got 'soon'",
        ),
    ],
)
def test_argument_errors_exit_2_naming_only_the_users_words(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert message in usage_error(argv, capsys)


def test_an_empty_secret_file_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    empty = tmp_path / "secret"
    empty.write_text("\n")
    err = usage_error([*NODE, "--executor", EXECUTOR, "--secret-file", str(empty)], capsys)
    assert "is empty" in err


def test_an_executor_module_that_fails_to_import_is_a_usage_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "broken_tasks.py").write_text("raise RuntimeError('half written')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    err = usage_error([*NODE, "--executor", "broken_tasks:run"], capsys)
    assert "importing 'broken_tasks' failed: RuntimeError: half written" in err


def test_a_usage_error_in_a_subprocess_has_no_traceback() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "trio_federation", *NODE, "--executor", "nowhere:run"],
        capture_output=True,
        text=True,
        timeout=25,
        check=False,
        cwd=ROOT,
    )
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.splitlines()[-1] == (
        "trio-federation node: error: argument --executor: no module named 'nowhere'"
    )


def test_an_unreachable_registry_fails_with_exit_1() -> None:
    # In a subprocess: coredis leaves its streams to the garbage collector when
    # a connection is refused, which this suite's warnings-as-errors would flag.
    # Port 1 on loopback: nothing listens there.
    result = subprocess.run(
        [sys.executable, "-m", "trio_federation", "peers", "--registry", "redis://127.0.0.1:1"],
        capture_output=True,
        text=True,
        timeout=25,
        check=False,
        cwd=ROOT,
    )
    assert result.returncode == 1
    assert result.stderr.startswith(
        "trio-federation peers failed: registry unavailable: cannot reach redis://127.0.0.1:1"
    )
    assert "Traceback" not in result.stderr


def test_peers_of_an_empty_registry(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["peers", "--registry", "memory://"]) == 0
    assert capsys.readouterr().out == "no orchestrator registered\n"


def test_delegate_without_any_executor_lists_its_attempts(
    capsys: pytest.CaptureFixture[str],
) -> None:
    status = main(
        ["delegate", "--registry", "memory://", "--description", "lint", "--task-id", "t-1",
         "--max-attempts", "1"]
    )  # fmt: skip
    assert status == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "delegating t-1 failed after 1 attempt(s):" in captured.err
    assert "  1. (no candidate): no_candidate" in captured.err


def test_custom_capabilities_are_accepted_as_the_library_accepts_them() -> None:
    from trio_federation._cli import _capability_names

    assert _capability_names("testing, my-cap,gpu:a100") == ("testing", "my-cap", "gpu:a100")
