"""The balancing spread of each strategy, and the consistent-hash key movement (sans-IO).

Run by :mod:`bench.delegation` (``nox -s bench``), or alone as
``python -m bench.balancing``. No sockets: the strategies are sans-IO, so the
figures are the strategies' own, free of network noise.

- **spread**: 1,000 tasks delegated one step apart to 3 equal nodes (16 slots
  each), each task running 1-12 steps; the load each strategy sees is what runs
  on each node, as the registry would report it. The figure is the largest
  share over the smallest (1.00 is perfectly even), with the shares.
- **key movement**: 1,000 keys placed by ``consistent-hash`` on 3 nodes, then
  on 4: the share of keys whose owner changed (ideal: 1/4, every one of them to
  the new node).
"""

from __future__ import annotations

import collections
import random
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from trio_federation import Candidate, ConsistentHash, PowerOfTwoChoices, Strategy, Task
from trio_federation._delegation._strategies import STRATEGIES, choose, make_strategy

NODES = ("orch-a", "orch-b", "orch-c")
TASKS = 1000


def simulate(
    strategy: Strategy,
    *,
    nodes: Sequence[str] = NODES,
    tasks: int = TASKS,
    background: Mapping[str, int] | None = None,
    seed: int = 7,
) -> collections.Counter[str]:
    """Tasks per node for ``tasks`` delegations under simulated load."""
    rng = random.Random(seed)
    background = background or {}
    running: dict[str, list[int]] = {n: [] for n in nodes}
    counts: collections.Counter[str] = collections.Counter({n: 0 for n in nodes})
    for step in range(tasks):
        for node in nodes:
            running[node] = [end for end in running[node] if end > step]
        candidates = [
            Candidate(
                id=node,
                current_sessions=background.get(node, 0) + len(running[node]),
                max_sessions=16,
            )
            for node in nodes
        ]
        chosen = choose(Task(id=f"t-{step}", description=""), candidates, strategy)[0]
        counts[chosen] += 1
        running[chosen].append(step + rng.randint(1, 12))
    return counts


def key_movement(keys: int = TASKS) -> tuple[float, bool]:
    """Share of keys that move when a 4th node joins, and whether all moved to it."""
    strategy = ConsistentHash()

    def owners(nodes: Sequence[str]) -> dict[str, str]:
        candidates = [Candidate(id=n) for n in nodes]
        return {
            f"k-{i}": choose(Task(id=f"k-{i}", description=""), candidates, strategy)[0]
            for i in range(keys)
        }

    before = owners(NODES)
    after = owners([*NODES, "orch-d"])
    moved = [k for k in before if before[k] != after[k]]
    return len(moved) / keys, all(after[k] == "orch-d" for k in moved)


def figures() -> dict[str, Any]:
    """The spread of every strategy and the key movement, as a dict."""
    spread: dict[str, Any] = {}
    for name in STRATEGIES:
        strategy = PowerOfTwoChoices(random.Random(1)) if name == "random" else make_strategy(name)
        counts = simulate(strategy)
        spread[name] = {
            "max_over_min": max(counts.values()) / max(1, min(counts.values())),
            "shares": {n: counts[n] / TASKS for n in NODES},
        }
    moved, only_to_new = key_movement()
    return {"spread": spread, "key_movement": moved, "moved_only_to_new_node": only_to_new}


def report(result: Mapping[str, Any]) -> None:
    """Print :func:`figures` as a table."""
    print(f"balancing spread: {TASKS} tasks over 3 equal nodes (simulated load, sans-IO)")
    print(f"{'strategy':<20}{'max/min':>9}   shares")
    for name, entry in result["spread"].items():
        shares = "  ".join(f"{share:.3f}" for share in entry["shares"].values())
        print(f"{name:<20}{entry['max_over_min']:>9.3f}   {shares}")
    where = "all to the new node" if result["moved_only_to_new_node"] else "not only to the new"
    print(
        f"consistent-hash: a 4th node joins, {result['key_movement']:.1%} of {TASKS} keys move"
        f" (ideal 25.0%), {where}"
    )


def main() -> int:
    report(figures())
    return 0


if __name__ == "__main__":
    sys.exit(main())
