"""The delegation benchmark runs (a smoke test; the figures are for ``nox -s bench``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import delegation


def test_the_delegation_bench_measures_both_kinds(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(delegation, "BLOCK", 5)
    out = tmp_path / "figures.json"
    assert delegation.main(["--count", "12", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "delegation p50 / bare p50" in printed
    assert '"p50_ratio"' in out.read_text()
