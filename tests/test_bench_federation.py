"""The federation benchmark runs (a smoke test; the figures are for ``nox -s bench``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import federation


def test_the_federation_bench_measures_throughput_and_latency(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "figures.json"
    argv = ["--seconds", "0.3", "--count", "20", "--concurrency", "4", "--json", str(out)]
    assert federation.main(argv) == 0
    printed = capsys.readouterr().out
    assert "delegations in" in printed and "delegation / bare: p50" in printed
    figures = json.loads(out.read_text())
    assert figures["delegations"] > 0 and figures["retries"] == 0
    assert figures["p50_ratio"] > 0
