"""(e) The fuzz suites at a larger scale: every example run, none crashing.

Runs, as a pytest subprocess with ``FUZZ_SCALE`` (:data:`SCALE` by default:
``nox -s fuzz`` runs the same tests), the hostile-frame fuzzers of
``tests/test_fuzz.py`` (the codec alone, and a live connection fed hostile
frames; plus memory under a stream of them) and the differential fuzz of the
wire parser against wsproto (``tests/test_wire_frames.py``).

Figures: the examples each Hypothesis test ran, from its statistics (bound:
its ``max_examples`` at this scale: the run was not cut short), and crashes —
failing examples and failed tests (bound: 0).
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import Final

import trio

from ._report import Figure, at_most, check

SCALE: Final = 50
"""The default ``FUZZ_SCALE``, as ``nox -s fuzz``: 50 times the examples of ``nox -s tests``."""
TESTS: Final = (
    "tests/test_fuzz.py",
    "tests/test_wire_frames.py::test_hostile_bytes_end_as_with_wsproto_alone",
)
ROOT: Final = Path(__file__).resolve().parent.parent

_PHASE = re.compile(r"- (\d+) passing, (\d+) failing, and (\d+) invalid test cases")
_STOPPED = re.compile(r"Stopped because settings\.max_examples=(\d+)")


def parse_statistics(output: str) -> dict[str, tuple[int, int, int | None]]:
    """Per test id: examples passing, failing, and ``max_examples`` if that stopped it.

    From the report of ``pytest --hypothesis-show-statistics``; passing and
    failing add up over the phases (reuse, generate, shrink).
    """
    found: dict[str, tuple[int, int, int | None]] = {}
    report = output.split("Hypothesis Statistics", 1)[-1]
    for block in re.split(r"\n(?=\S+::\S+:\n)", report):
        head, _, body = block.strip().partition(":\n")
        if "::" not in head:
            continue
        phases = [tuple(map(int, m)) for m in _PHASE.findall(body)]
        stopped = _STOPPED.search(body)
        found[head.strip()] = (
            sum(p[0] for p in phases),
            sum(p[1] for p in phases),
            int(stopped.group(1)) if stopped else None,
        )
    return found


async def run(scale: int = SCALE) -> list[Figure]:
    """Run (e) at ``scale``; return its figures."""
    with tempfile.TemporaryDirectory() as scratch:
        junit = Path(scratch) / "fuzz.xml"
        result = await trio.run_process(
            [
                sys.executable,
                "-m",
                "pytest",
                *TESTS,
                "-p",
                "no:cacheprovider",
                "-q",
                "--hypothesis-show-statistics",
                f"--junitxml={junit}",
            ],
            cwd=ROOT,
            env={**os.environ, "FUZZ_SCALE": str(scale), "TEST_TIME_GUARD": "3600"},
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
        output = result.stdout.decode(errors="replace")
        cases = ElementTree.parse(junit).getroot().iter("testcase") if junit.exists() else iter(())
        outcomes = {
            f"{case.get('classname', '')}.{case.get('name', '')}": not any(
                child.tag in ("failure", "error") for child in case
            )
            for case in cases
        }
    if result.returncode not in (0, 1) or not outcomes:
        sys.stderr.write(output + result.stderr.decode(errors="replace"))
    statistics = parse_statistics(output)
    figures = [
        check(
            "e",
            f"{test.rsplit('::', 1)[-1]}: examples",
            f"{passing + failing:,}",
            f">= {planned:,}" if planned is not None else "max_examples",
            planned is not None and passing + failing >= planned,
        )
        for test, (passing, failing, planned) in statistics.items()
    ]
    if not statistics:  # the report's format changed, or pytest did not get that far
        figures.append(check("e", "example counts", "none found", "Hypothesis statistics", False))
    failing = sum(f for _, f, _ in statistics.values())
    passed = sum(outcomes.values())
    failed_tests = len(outcomes) - passed
    return [
        *figures,
        check(
            "e",
            f"fuzz tests passed (FUZZ_SCALE={scale})",
            f"{passed} of {len(outcomes)}",
            "all",
            passed == len(outcomes) > 0,
        ),
        at_most("e", "crashes: failing examples, failed tests", failing + failed_tests, 0),
    ]
