"""The failover guarantees on the sans-IO lifecycle, under random event sequences (SPEC 6.5).

Whatever the executors do — accept, report, complete, fail, hand back, vanish,
come back late with stale outcomes — the caller sees exactly one final
outcome, and only the current executor's callbacks ever count.
"""

from __future__ import annotations

import collections
import random

from trio_federation import (
    DelegationResponse,
    TaskCallback,
    TaskCompleted,
    TaskFailed,
    TaskFailedOver,
)
from trio_federation._delegation._state import (
    DelegationLifecycle,
    Dispatch,
    GiveUp,
    Illegal,
    Wait,
)

TASK = "t-1"
PEERS = ("b", "c", "d", "e")


def event(rng: random.Random, machine: DelegationLifecycle, peer: str) -> object:
    """One random thing from ``peer`` (the current executor or a stale one)."""
    kind = rng.choice(
        ["accept", "progress", "complete", "fail", "hand_back", "drain", "lost", "refuse"]
    )
    if kind == "accept":
        return machine.receive_response(peer, DelegationResponse(task_id=TASK, accepted=True))
    if kind == "refuse":
        refusal = DelegationResponse(task_id=TASK, accepted=False, reason="overloaded")
        return machine.receive_response(peer, refusal)
    if kind == "lost":
        return machine.lost(peer, "connection lost")
    status, error = {
        "progress": ("progress", None),
        "complete": ("completed", None),
        "fail": ("failed", "ValueError: no"),
        "hand_back": ("failed", "cancelled"),
        "drain": ("failed", "draining"),
    }[kind]
    return machine.receive_callback(
        peer, TaskCallback(task_id=TASK, status=status, error=error, result=peer)
    )


def run(seed: int) -> str:
    """One random run; returns how it ended."""
    rng = random.Random(seed)
    machine = DelegationLifecycle(TASK, max_attempts=rng.randint(1, 6), rng=rng)
    finals: list[object] = []
    lost: set[str] = set()
    now = 0.0
    for _ in range(60):
        if machine.done:
            # After the end, anything from anyone changes nothing.
            before = (machine.status, len(machine.attempts))
            answer = event(rng, machine, rng.choice(PEERS))
            assert isinstance(answer, Illegal) or answer is None
            assert (machine.status, len(machine.attempts)) == before
            continue
        if machine.assignee is None:
            step = machine.next_step(list(PEERS), now)
            if isinstance(step, Wait):
                now = step.until
            elif isinstance(step, GiveUp):
                finals.append(step)
            else:
                assert isinstance(step, Dispatch)
            continue
        holder = machine.assignee
        stale = rng.random() < 0.3 and lost
        peer = rng.choice(sorted(lost)) if stale else holder
        answer = event(rng, machine, peer)
        if peer != holder:
            assert isinstance(answer, Illegal)  # a lost executor cannot come back
            assert machine.assignee == holder
            continue
        if isinstance(answer, TaskFailedOver):
            lost.add(holder)
        if isinstance(answer, TaskCompleted):
            assert answer.result == holder
        if isinstance(answer, TaskCompleted | TaskFailed):
            finals.append(answer)
    assert len(finals) <= 1
    if machine.done:
        assert len(finals) == 1
    return type(finals[0]).__name__ if finals else "running"


def test_exactly_one_final_outcome_and_only_the_assignee_counts() -> None:
    endings = collections.Counter(run(seed) for seed in range(500))
    # Every kind of ending was exercised.
    assert set(endings) == {"TaskCompleted", "TaskFailed", "GiveUp"}, endings
