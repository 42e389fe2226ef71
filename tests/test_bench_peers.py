"""The idle-connection bench and the daemon's peer run (smoke tests; the figures
are for ``nox -s bench``)."""

from __future__ import annotations

import re

import orjson
import pytest
import trio

from bench import _daemon, idle
from bench._peers import PeerCommand, run_pair
from bench._workload import equivalent_dict, make_delegation
from trio_federation import encode_message

from .conftest import under_ci


def _daemon_or_reason() -> _daemon.Daemon | str:
    """The daemon's peer, or why not (a failure under CI, where it must run)."""
    daemon = _daemon.find_daemon()
    if isinstance(daemon, str) and under_ci():
        pytest.fail(f"CI requires the daemon's connection for the bench: {daemon}")
    return daemon


def test_the_idle_bench_measures_every_implementation(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    daemon = _daemon_or_reason()
    monkeypatch.setattr(idle, "SETTLE", 0.1)
    assert idle.main(["--connections", "8", "--seconds", "0.3", "--repeat", "1"]) == 0
    printed, progress = capsys.readouterr()
    table = printed.splitlines()[-3:]
    assert table[1].startswith("memory per connection (KiB)")
    assert table[2].startswith("heartbeat CPU")
    if isinstance(daemon, str):  # lib and raw alone, and why
        assert f"the daemon's row is left out: {daemon}" in progress
        assert "daemon" not in table[0]
    else:  # its figure and lib/daemon beside raw's
        assert table[0].endswith("daemon  lib/daemon")
        assert all(re.search(r" \d+\.\d +\d+\.\d\dx$", line) for line in table[1:])
        assert "run 1/1: daemon" in progress


@pytest.mark.parametrize("mode", ["throughput", "roundtrip"])
def test_the_daemon_peer_sends_our_frame_and_answers(mode: str) -> None:
    daemon = _daemon_or_reason()
    if isinstance(daemon, str):
        pytest.skip(daemon)
    template = encode_message(make_delegation(0))
    wire = equivalent_dict(make_delegation(0))
    command = PeerCommand(
        argv=(
            *daemon.command(),
            "--connection",
            str(daemon.connection),
            "--template",
            orjson.dumps(wire).decode(),
        ),
        env=daemon.env(),
    )
    served, dialed = trio.run(
        lambda: run_pair("daemon", mode, count=20, warmup=2, time_limit=10, command=command)
    )
    assert dialed["frame"] == template  # the daemon writes our bytes for the same message
    if mode == "throughput":
        assert served["received"] == 22
    else:
        assert len(dialed["latencies_ns"]) == 20
        assert served["answered"] == 22
