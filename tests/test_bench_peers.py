"""The idle-connection bench and the daemon's peer run (smoke tests; the figures
are for ``nox -s bench``)."""

from __future__ import annotations

import shutil

import orjson
import pytest
import trio

from bench import _daemon, idle
from bench._peers import PeerCommand, run_pair
from bench._workload import equivalent_dict, make_delegation
from trio_federation import encode_message

from .conftest import under_ci


def test_the_idle_bench_measures_both_implementations(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(idle, "SETTLE", 0.1)
    assert idle.main(["--connections", "8", "--seconds", "0.3", "--repeat", "1"]) == 0
    printed = capsys.readouterr().out
    assert "memory per connection (KiB)" in printed
    assert "heartbeat CPU" in printed


@pytest.mark.parametrize("mode", ["throughput", "roundtrip"])
def test_the_daemon_peer_sends_our_frame_and_answers(mode: str) -> None:
    daemon = "node is not installed" if shutil.which("node") is None else _daemon.find_daemon()
    if isinstance(daemon, str):
        if under_ci():
            pytest.fail(f"CI requires the daemon's connection for the bench: {daemon}")
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
