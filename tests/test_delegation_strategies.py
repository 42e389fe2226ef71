"""The strategies and the delegator's choice, sans-IO (SPEC 6.3): plain synchronous tests.

Load is simulated: each of 1,000 tasks arrives one step after the other and
runs for a few steps on the node chosen for it; the registry load a strategy
sees is what runs there (plus any background load), as a node would report it.
"""

from __future__ import annotations

import collections
import random
from collections.abc import Mapping, Sequence

import pytest

from trio_federation import (
    Candidate,
    CapabilityScore,
    ConsistentHash,
    LeastLoaded,
    PowerOfTwoChoices,
    RoundRobin,
    Strategy,
    Task,
)
from trio_federation._delegation._strategies import (
    STRATEGIES,
    TIER_LEVELS,
    choose,
    make_strategy,
)

NODES = ("orch-a", "orch-b", "orch-c")
TASKS = 1000


def simulate(
    strategy: Strategy,
    *,
    nodes: Sequence[str] = NODES,
    background: Mapping[str, int] | None = None,
    tasks: int = TASKS,
    max_sessions: int = 16,
    seed: int = 7,
) -> collections.Counter[str]:
    """Delegate ``tasks`` tasks one step apart; each runs 1-12 steps. Counts per node."""
    rng = random.Random(seed)
    background = background or {}
    running: dict[str, list[int]] = {n: [] for n in nodes}
    counts: collections.Counter[str] = collections.Counter()
    for step in range(tasks):
        for node in nodes:
            running[node] = [end for end in running[node] if end > step]
        candidates = [
            Candidate(
                id=node,
                capabilities=("testing",),
                current_sessions=background.get(node, 0) + len(running[node]),
                max_sessions=max_sessions,
            )
            for node in nodes
        ]
        task = Task(id=f"t-{step}", description="")
        chosen = choose(task, candidates, strategy, required=["testing"])[0]
        counts[chosen] += 1
        running[chosen].append(step + rng.randint(1, 12))
    return counts


def shares(counts: Mapping[str, int]) -> dict[str, float]:
    total = sum(counts.values())
    return {node: count / total for node, count in counts.items()}


# -- balancing across equal nodes ---------------------------------------------------------


@pytest.mark.parametrize("name", ["round-robin", "least-loaded", "random", "capability-score"])
def test_equal_nodes_share_within_ten_percent(name: str) -> None:
    strategy = PowerOfTwoChoices(random.Random(1)) if name == "random" else make_strategy(name)
    counts = simulate(strategy)
    assert sum(counts.values()) == TASKS
    assert set(counts) == set(NODES)
    for node, count in counts.items():
        assert abs(count - TASKS / 3) <= 0.1 * TASKS / 3, (node, counts)


def test_round_robin_is_exact_and_least_loaded_breaks_ties_in_turn() -> None:
    assert set(simulate(RoundRobin(), tasks=999).values()) == {333}
    idle = [Candidate(id=n) for n in NODES]
    task = Task(id="x", description="")
    strategy = LeastLoaded()
    firsts = [strategy.order(task, idle)[0].id for _ in range(6)]
    assert firsts == [*NODES, *NODES]


@pytest.mark.parametrize("name", ["least-loaded", "random"])
def test_a_busy_node_gets_less_work(name: str) -> None:
    strategy = PowerOfTwoChoices(random.Random(2)) if name == "random" else make_strategy(name)
    busy = shares(simulate(strategy, background={"orch-a": 12}))
    assert busy.get("orch-a", 0.0) < 0.1, busy
    even = shares(simulate(RoundRobin(), background={"orch-a": 12}))
    assert even["orch-a"] == pytest.approx(1 / 3, abs=0.01)  # round-robin does not look


def test_power_of_two_puts_the_less_loaded_of_two_first_and_keeps_every_candidate() -> None:
    strategy = PowerOfTwoChoices(random.Random(3))
    task = Task(id="x", description="")
    peers = [Candidate(id="a", current_sessions=5), Candidate(id="b"), Candidate(id="c")]
    for _ in range(50):
        ordered = strategy.order(task, peers)
        assert sorted(c.id for c in ordered) == ["a", "b", "c"]
        assert ordered[0].load <= ordered[1].load
    assert [c.id for c in strategy.order(task, peers[:1])] == ["a"]
    assert PowerOfTwoChoices().name == "random"


# -- consistent hashing -------------------------------------------------------------------


def owners(strategy: ConsistentHash, nodes: Sequence[str], keys: int = TASKS) -> dict[str, str]:
    candidates = [Candidate(id=n) for n in nodes]
    return {
        f"k-{i}": choose(Task(id=f"k-{i}", description=""), candidates, strategy)[0]
        for i in range(keys)
    }


def test_consistent_hash_keeps_affinity() -> None:
    strategy = ConsistentHash()
    candidates = [Candidate(id=n) for n in NODES]
    first = {
        choose(
            Task(id=f"t-{i}", description="", metadata={"affinity": "user-42"}),
            candidates,
            strategy,
        )[0]
        for i in range(50)
    }
    assert len(first) == 1
    # By the task id when there is no affinity; the same on every call and in any order.
    task = Task(id="t-7", description="")
    again = [choose(task, candidates[::-1], strategy) for _ in range(3)]
    assert again[0] == again[1] == again[2]
    assert sorted(again[0]) == sorted(NODES)
    assert ConsistentHash.key(task) == "t-7"
    assert ConsistentHash.key(Task(id="x", description="", metadata={"affinity": 9})) == "9"


def test_when_a_node_joins_about_one_in_n_keys_move_and_only_to_it() -> None:
    strategy = ConsistentHash()
    before = owners(strategy, NODES)
    after = owners(strategy, [*NODES, "orch-d"])
    moved = [key for key in before if before[key] != after[key]]
    assert {after[key] for key in moved} == {"orch-d"}
    assert 0.15 <= len(moved) / TASKS <= 0.35  # about 1/4


def test_when_a_node_leaves_only_its_keys_move_to_its_successors() -> None:
    strategy = ConsistentHash()
    four = [*NODES, "orch-d"]
    before = owners(strategy, four)
    after = owners(strategy, [n for n in four if n != "orch-b"])
    moved = [key for key in before if before[key] != after[key]]
    assert {before[key] for key in moved} == {"orch-b"}
    assert 0.15 <= len(moved) / TASKS <= 0.35
    # The next owner along the ring is the one the order named second.
    candidates = [Candidate(id=n) for n in four]
    for key in moved[:20]:
        order = choose(Task(id=key, description=""), candidates, strategy)
        assert order[1] == after[key]


def test_consistent_hash_spreads_and_checks_its_arguments(monkeypatch: pytest.MonkeyPatch) -> None:
    spread = shares(collections.Counter(owners(ConsistentHash(), NODES).values()))
    assert all(0.2 < share < 0.47 for share in spread.values()), spread
    with pytest.raises(ValueError, match="at least 1"):
        ConsistentHash(0)
    with pytest.raises(TypeError):
        ConsistentHash(True)
    monkeypatch.setattr(ConsistentHash, "MAX_CACHED_PEERS", 2)
    strategy = ConsistentHash(virtual_nodes=8)
    assert len(owners(strategy, NODES, keys=5)) == 5  # the point cache was reset once
    assert len(strategy._points) <= 2


# -- capability-score ---------------------------------------------------------------------


def test_capability_score_never_picks_a_node_without_a_required_capability() -> None:
    rng = random.Random(4)
    strategy = CapabilityScore()
    for index in range(300):
        peers = [
            Candidate(
                id=f"n-{i}",
                capabilities=tuple(
                    rng.sample(["testing", "review", "code", "research"], rng.randint(0, 4))
                ),
                current_sessions=rng.randint(0, 8),
                max_sessions=rng.choice([0, 8]),
                latency=rng.choice([None, 0.001, 0.2]),
                tier=rng.choice(["free", "standard", "enterprise", "7"]),
                success_rate=rng.choice([None, 0.0, 1.0]),
            )
            for i in range(5)
        ]
        required = rng.sample(["testing", "review"], rng.randint(1, 2))
        task = Task(id=f"t-{index}", description="", type="code")
        chosen = choose(task, peers, strategy, required=required)
        capable = {p.id for p in peers if set(required) <= set(p.capabilities)}
        assert set(chosen) == capable


def test_capability_score_formula() -> None:
    strategy = CapabilityScore()
    task = Task(id="t", description="", type="code", priority="high")
    base = Candidate(id="a", capabilities=("code", "review"), max_sessions=10, current_sessions=5)
    # match 20 + 2*2, tier standard 2*2, load 30*0.5, availability 10, high 7,
    # latency unmeasured 5, success unknown 5
    assert strategy.score(task, base) == pytest.approx(24 + 4 + 15 + 10 + 7 + 5 + 5)
    fast = Candidate(
        id="b", capabilities=base.capabilities, max_sessions=10, current_sessions=5, latency=0.0
    )
    reliable = Candidate(
        id="c",
        capabilities=base.capabilities,
        max_sessions=10,
        current_sessions=5,
        success_rate=1.0,
    )
    premium = Candidate(
        id="d",
        capabilities=base.capabilities,
        max_sessions=10,
        current_sessions=5,
        tier="enterprise",
    )
    idle_unknown = Candidate(id="e", capabilities=base.capabilities, current_sessions=1)
    assert strategy.score(task, fast) == pytest.approx(strategy.score(task, base) + 5)
    assert strategy.score(task, reliable) == pytest.approx(strategy.score(task, base) + 5)
    assert strategy.score(task, premium) == pytest.approx(strategy.score(task, base) + 4)
    assert strategy.score(task, idle_unknown) == pytest.approx(strategy.score(task, base) - 15 + 15)
    order = [c.id for c in strategy.order(task, [base, fast, reliable, premium])]
    assert order[-1] == "a" and set(order[:2]) == {"b", "c"}
    assert TIER_LEVELS["premium"] == 3
    numeric = Candidate(id="f", tier="5")
    unknown = Candidate(id="g", tier="gold")
    assert strategy.score(task, numeric) - strategy.score(task, unknown) == pytest.approx(10)


# -- the delegator's choice ---------------------------------------------------------------


def test_choose_filters_then_orders_then_prefers() -> None:
    peers = [
        Candidate(id="a", capabilities=("testing",)),
        Candidate(id="b", capabilities=("testing", "review")),
        Candidate(id="c", capabilities=("review",)),
        Candidate(id="d", capabilities=("testing",)),
    ]
    task = Task(id="t", description="")
    rr = RoundRobin()
    assert choose(task, peers, rr, required=["testing"]) == ["a", "b", "d"]
    assert choose(task, peers, rr, required=["testing"], exclude=["b"]) == ["d", "a"]
    assert choose(task, peers, rr, prefer=["c", "zz", "b"]) == ["c", "b", "d", "a"]
    assert choose(task, peers, rr, prefer=["c"], sticky="d") == ["d", "c", "a", "b"]
    assert choose(task, peers, rr, sticky="gone", exclude=["a", "b", "c", "d"]) == []
    assert choose(task, peers, rr, required=["deploy"]) == []


def test_every_strategy_by_name() -> None:
    assert set(STRATEGIES) == {
        "round-robin",
        "least-loaded",
        "capability-score",
        "random",
        "consistent-hash",
    }
    for name in STRATEGIES:
        strategy = make_strategy(name)
        assert strategy.name == name
        assert isinstance(strategy, Strategy)
