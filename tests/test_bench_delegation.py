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
    assert "balancing spread" in printed and "consistent-hash: a 4th node joins" in printed
    assert '"p50_ratio"' in out.read_text()


def test_the_balancing_figures_are_even_and_the_hash_moves_about_a_quarter(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from bench import balancing

    figures = balancing.figures()
    assert figures["spread"]["round-robin"]["max_over_min"] <= 1.01
    assert figures["spread"]["least-loaded"]["max_over_min"] < 1.25
    assert 0.15 < figures["key_movement"] < 0.35 and figures["moved_only_to_new_node"]
    assert balancing.main() == 0
    assert "max/min" in capsys.readouterr().out
