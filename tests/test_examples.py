"""The examples in the README and the docs run as written."""

from __future__ import annotations

import re
import runpy
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
EXAMPLES = sorted((ROOT / "docs" / "examples").glob("*.py"))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_docs_example_runs(path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    runpy.run_path(str(path), run_name="__main__")
    assert capsys.readouterr().out.strip(), f"{path.name} printed nothing"


def test_delegation_page_shows_what_its_examples_print(capsys: pytest.CaptureFixture[str]) -> None:
    """Each "Run it with ``python docs/examples/X.py``::" block is X's exact output."""
    page = (ROOT / "docs" / "delegation.rst").read_text()
    shown = re.findall(r"Run it with ``python docs/examples/(\w+\.py)``::\n\n((?:    .*\n)+)", page)
    assert len(shown) == 3
    for name, block in shown:
        runpy.run_path(str(ROOT / "docs" / "examples" / name), run_name="__main__")
        expected = [line[4:] for line in block.splitlines()]
        assert capsys.readouterr().out.splitlines() == expected, name


def test_readme_example_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, re.S)
    assert blocks, "the README has no Python example"
    script = tmp_path / "readme_example.py"
    script.write_text(blocks[0])
    runpy.run_path(str(script), run_name="__main__")
    out = capsys.readouterr().out
    assert "TaskAccepted(peer='orch-b')" in out
    assert "TaskProgress(peer='orch-b', percent=50.0, message='halfway')" in out
    assert "TaskCompleted(peer='orch-b', result={'ok': True, 'task': 'run the tests'})" in out
    assert "{'ok': True, 'task': 'lint'}" in out


def test_every_readme_program_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Every block that is a whole program (it calls trio.run) runs as shown;
    # the others are fragments (a function to call from your own program).
    readme = (ROOT / "README.md").read_text()
    programs = [b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if "trio.run(" in b]
    assert len(programs) >= 2
    for n, block in enumerate(programs):
        script = tmp_path / f"readme_{n}.py"
        script.write_text(block)
        runpy.run_path(str(script), run_name="__main__")
        assert capsys.readouterr().out.strip(), f"README program {n} printed nothing"


def test_examples_exist() -> None:
    assert EXAMPLES, "docs/examples is empty"
    assert sys.version_info >= (3, 11)
