"""The sans-IO cores of delegation: lifecycle, backoff, strategies, admission.

Plain synchronous tests with an explicit ``now``: no trio, no sockets.
"""

from __future__ import annotations

import pickle
import random

import pytest

from trio_federation import (
    Backoff,
    Candidate,
    DelegationAttempt,
    DelegationFailed,
    DelegationRequest,
    DelegationResponse,
    DelegationStatus,
    LeastLoaded,
    OrchestratorCapabilities,
    RefusalReason,
    RoundRobin,
    Task,
    TaskAccepted,
    TaskCallback,
    TaskCompleted,
    TaskFailed,
    TaskFailedOver,
    TaskProgress,
)
from trio_federation._delegation._executor import (
    Admission,
    Admit,
    Refuse,
    Replay,
    Running,
    required_capabilities,
)
from trio_federation._delegation._state import (
    TRANSITIONS,
    DelegationLifecycle,
    Dispatch,
    GiveUp,
    Illegal,
    Wait,
)
from trio_federation._delegation._strategies import Strategy, make_strategy

TASK = "t-1"


def accepted(task_id: str = TASK) -> DelegationResponse:
    return DelegationResponse(task_id=task_id, accepted=True)


def refused(reason: str = "overloaded") -> DelegationResponse:
    return DelegationResponse(task_id=TASK, accepted=False, reason=reason)


def callback(status: str, **fields: object) -> TaskCallback:
    return TaskCallback(task_id=TASK, status=status, **fields)  # type: ignore[arg-type]


def lifecycle(max_attempts: int = 5, seed: int = 1) -> DelegationLifecycle:
    return DelegationLifecycle(
        TASK, max_attempts=max_attempts, backoff=Backoff(), rng=random.Random(seed)
    )


def dispatched(peer: str = "b", **options: int) -> DelegationLifecycle:
    machine = lifecycle(**options)
    assert machine.next_step([peer], now=0.0) == Dispatch(peer)
    return machine


# -- the lifecycle ----------------------------------------------------------------------


def test_happy_path_accepted_progress_completed() -> None:
    machine = dispatched()
    assert machine.status is DelegationStatus.PENDING and machine.assignee == "b"
    assert machine.receive_response("b", accepted()) == TaskAccepted(peer="b")
    assert machine.status is DelegationStatus.ACCEPTED
    progress = machine.receive_callback(
        "b", callback("progress", progress=40.0, metadata={"message": "half"})
    )
    assert progress == TaskProgress(peer="b", percent=40.0, message="half")
    assert machine.status is DelegationStatus.IN_PROGRESS
    done = machine.receive_callback("b", callback("completed", result={"x": 1}))
    assert done == TaskCompleted(peer="b", result={"x": 1})
    assert machine.status is DelegationStatus.COMPLETED and machine.done
    assert machine.result == {"x": 1}
    assert machine.attempts == [DelegationAttempt(peer="b", outcome="completed")]


def test_progress_message_that_is_not_text_is_left_out() -> None:
    machine = dispatched()
    update = machine.receive_callback("b", callback("progress", metadata={"message": 5}))
    assert update == TaskProgress(peer="b", percent=None, message=None)


def test_a_v1_peer_may_skip_the_acceptance() -> None:
    machine = dispatched()
    assert isinstance(machine.receive_callback("b", callback("completed", result=1)), TaskCompleted)


def test_executor_failure_is_final_with_its_error() -> None:
    machine = dispatched()
    machine.receive_response("b", accepted())
    answer = machine.receive_callback("b", callback("failed", error="ValueError: boom"))
    assert isinstance(answer, TaskFailed)
    assert machine.status is DelegationStatus.FAILED
    assert answer.error.attempts[-1] == DelegationAttempt(
        peer="b", outcome="failed", reason="ValueError: boom"
    )
    with pytest.raises(DelegationFailed, match="boom"):
        _ = machine.result
    # a failed without error text still ends it
    other = dispatched()
    failed = other.receive_callback("b", callback("failed"))
    assert isinstance(failed, TaskFailed)
    assert failed.error.attempts[-1].reason == "failed"


@pytest.mark.parametrize(
    ("status", "fields"),
    [("progress", {}), ("completed", {"result": 2}), ("failed", {"error": "x"})],
)
def test_callbacks_after_the_end_are_illegal_and_change_nothing(
    status: str, fields: dict[str, object]
) -> None:
    machine = dispatched()
    machine.receive_response("b", accepted())
    machine.receive_callback("b", callback("completed", result=1))
    answer = machine.receive_callback("b", callback(status, **fields))
    assert isinstance(answer, Illegal)
    assert machine.status is DelegationStatus.COMPLETED and machine.result == 1
    assert machine.illegal == 1
    assert isinstance(machine.receive_response("b", accepted()), Illegal)


def test_callbacks_from_others_or_for_other_tasks_are_illegal() -> None:
    machine = dispatched()
    assert isinstance(machine.receive_response("c", accepted()), Illegal)
    assert isinstance(machine.receive_callback("c", callback("completed")), Illegal)
    assert isinstance(machine.receive_response("b", accepted("other")), Illegal)
    other = TaskCallback(task_id="other", status="completed")
    assert isinstance(machine.receive_callback("b", other), Illegal)
    assert machine.status is DelegationStatus.PENDING and machine.illegal == 4
    illegal = machine.receive_response("c", accepted())
    assert isinstance(illegal, Illegal) and "t-1" in illegal.reason


def test_a_cancel_request_sent_to_us_is_illegal() -> None:
    machine = dispatched()
    assert isinstance(machine.receive_callback("b", callback("cancel")), Illegal)


def test_a_second_acceptance_is_illegal() -> None:
    machine = dispatched()
    machine.receive_response("b", accepted())
    assert isinstance(machine.receive_response("b", accepted()), Illegal)
    assert isinstance(machine.receive_response("b", refused()), Illegal)
    assert machine.status is DelegationStatus.ACCEPTED


def test_refusal_moves_to_the_next_candidate_at_once_then_backs_off() -> None:
    machine = lifecycle(seed=3)
    assert machine.next_step(["b", "c"], now=0.0) == Dispatch("b")
    attempt = machine.receive_response("b", refused("capability_mismatch"))
    assert attempt == DelegationAttempt(peer="b", outcome="refused", reason="capability_mismatch")
    assert machine.status is DelegationStatus.REJECTED and machine.assignee is None
    assert machine.next_step(["b", "c"], now=0.0) == Dispatch("c")
    machine.receive_response("c", refused())
    step = machine.next_step(["b", "c"], now=0.0)
    assert isinstance(step, Wait)
    assert 0.0 <= step.until <= Backoff().ceiling(1)
    # asking early gives the same wait; after it, a new round starts
    assert machine.next_step(["b", "c"], now=step.until / 2) == Wait(step.until)
    assert machine.next_step(["b", "c"], now=step.until) == Dispatch("b")


def test_unreachable_counts_as_an_attempt() -> None:
    machine = dispatched()
    machine.unreachable("b", "connection refused")
    assert machine.attempts == [
        DelegationAttempt(peer="b", outcome="unreachable", reason="connection refused")
    ]
    assert machine.status is DelegationStatus.REJECTED
    with pytest.raises(RuntimeError):
        machine.unreachable("b", "again")


def test_no_candidate_rounds_count_and_give_up_with_every_attempt() -> None:
    machine = lifecycle(max_attempts=3)
    now = 0.0
    waits = 0
    while True:
        step = machine.next_step([], now=now)
        if isinstance(step, GiveUp):
            break
        assert isinstance(step, Wait)
        waits += 1
        now = step.until
    assert waits == 2
    assert [a.outcome for a in step.error.attempts] == ["no_candidate"] * 3
    assert machine.status is DelegationStatus.REJECTED and machine.done
    with pytest.raises(DelegationFailed) as info:
        _ = machine.result
    assert "(no candidate): no_candidate" in str(info.value)
    with pytest.raises(RuntimeError):
        machine.next_step(["b"], now=now)


def test_attempts_spent_by_refusals_give_up_before_another_round() -> None:
    machine = lifecycle(max_attempts=2)
    machine.next_step(["b", "c"], now=0.0)
    machine.receive_response("b", refused())
    machine.next_step(["b", "c"], now=0.0)
    machine.receive_response("c", refused())
    step = machine.next_step(["b", "c"], now=0.0)
    assert isinstance(step, GiveUp)
    assert [a.peer for a in step.error.attempts] == ["b", "c"]


def test_attempts_already_spent_give_up_at_once() -> None:
    machine = lifecycle(max_attempts=1)
    machine.next_step(["b"], now=0.0)
    machine.unreachable("b", "down")
    assert isinstance(machine.next_step(["b"], now=0.0), GiveUp)


def test_hand_back_fails_over_and_the_old_executor_cannot_come_back() -> None:
    machine = dispatched()
    machine.receive_response("b", accepted())
    answer = machine.receive_callback("b", callback("failed", error="draining"))
    assert answer == TaskFailedOver(peer="b", reason="draining")
    assert machine.status is DelegationStatus.PENDING and machine.assignee is None
    assert machine.attempts[-1].outcome == "handed_back"
    # b is not tried again in this round
    assert machine.next_step(["b", "c"], now=0.0) == Dispatch("c")
    assert isinstance(machine.receive_callback("b", callback("completed")), Illegal)
    with pytest.raises(RuntimeError):
        machine.next_step(["b", "c"], now=0.0)


def test_lost_executor_fails_over_and_lost_twice_is_illegal() -> None:
    machine = dispatched()
    machine.receive_response("b", accepted())
    assert machine.lost("b", "connection lost") == TaskFailedOver(
        peer="b", reason="connection lost"
    )
    assert isinstance(machine.lost("b", "again"), Illegal)


def test_cancel_tells_the_holder_and_accepts_its_last_word_once() -> None:
    machine = dispatched()
    machine.receive_response("b", accepted())
    assert machine.cancel() == "b"
    assert machine.status is DelegationStatus.CANCELLED and machine.cancel_requested
    assert machine.cancel() is None  # over already
    assert machine.receive_response("b", accepted()) is None  # a late echo, ignored
    # the executor's answer to our cancel is expected, not shown
    assert machine.receive_callback("b", callback("failed", error="cancelled")) is None
    assert isinstance(machine.receive_callback("b", callback("failed", error="x")), Illegal)
    assert isinstance(machine.receive_callback("b", callback("progress")), Illegal)
    with pytest.raises(DelegationFailed) as info:
        _ = machine.result
    assert info.value.attempts[-1] == DelegationAttempt(peer="b", outcome="cancelled")


def test_timeout_and_cancel_between_rounds() -> None:
    machine = dispatched()
    machine.receive_response("b", refused())
    assert machine.cancel(timeout=True) is None
    assert machine.status is DelegationStatus.TIMEOUT
    assert machine.attempts[-1] == DelegationAttempt(peer=None, outcome="timeout")


def test_result_of_a_running_delegation_is_an_error() -> None:
    with pytest.raises(RuntimeError, match="still pending"):
        _ = lifecycle().result


def test_max_attempts_is_checked() -> None:
    with pytest.raises(ValueError, match="max_attempts"):
        DelegationLifecycle(TASK, max_attempts=0)
    with pytest.raises(TypeError):
        DelegationLifecycle(TASK, max_attempts=True)
    assert DelegationLifecycle(TASK).max_attempts == 5


def test_every_transition_lands_in_a_known_state() -> None:
    for (state, event), target in TRANSITIONS.items():
        assert isinstance(state, DelegationStatus) and isinstance(target, DelegationStatus)
        assert event
    finals = {DelegationStatus.COMPLETED, DelegationStatus.FAILED}
    assert not any(state in finals for state, _ in TRANSITIONS)


def test_delegation_failed_survives_pickle_and_says_every_attempt() -> None:
    error = DelegationFailed(
        "t", [DelegationAttempt(peer="b", outcome="refused", reason="overloaded")]
    )
    clone = pickle.loads(pickle.dumps(error))
    assert clone.attempts == error.attempts and str(clone) == str(error)
    assert "b: refused (overloaded)" in str(error)


# -- backoff ------------------------------------------------------------------------------


def test_backoff_is_exponential_capped_and_fully_jittered() -> None:
    backoff = Backoff(initial_delay=0.1, multiplier=2.0, max_delay=1.0)
    assert [backoff.ceiling(n) for n in (1, 2, 3, 4, 5)] == [0.1, 0.2, 0.4, 0.8, 1.0]
    assert backoff.ceiling(10_000) == 1.0
    rng = random.Random(7)
    draws = [backoff.delay(3, rng) for _ in range(200)]
    assert all(0.0 <= d <= 0.4 for d in draws)
    assert min(draws) < 0.05 and max(draws) > 0.35  # the whole range: full jitter
    with pytest.raises(ValueError, match="initial_delay"):
        Backoff(initial_delay=0)


# -- strategies ---------------------------------------------------------------------------


def candidates(*loads: tuple[str, int, int, int]) -> list[Candidate]:
    return [
        Candidate(id=i, current_sessions=s, max_sessions=m, in_flight=f) for i, s, m, f in loads
    ]


def test_round_robin_rotates() -> None:
    strategy = RoundRobin()
    peers = candidates(("a", 0, 0, 0), ("b", 0, 0, 0), ("c", 0, 0, 0))
    task = Task(id="x", description="")
    firsts = [strategy.order(task, peers)[0].id for _ in range(4)]
    assert firsts == ["a", "b", "c", "a"]
    assert [c.id for c in strategy.order(task, peers)] == ["b", "c", "a"]


def test_least_loaded_adds_our_in_flight_to_the_registry_load() -> None:
    strategy = LeastLoaded()
    task = Task(id="x", description="")
    peers = candidates(("a", 2, 4, 0), ("b", 1, 4, 2), ("c", 1, 2, 0), ("d", 0, 0, 1))
    # loads: a 0.5, b 0.75, c 0.5, d 1.0 (no maximum: the count)
    assert [c.id for c in strategy.order(task, peers)] == ["a", "c", "b", "d"]
    assert Candidate(id="z").load == 0.0


def test_strategies_by_name_or_instance() -> None:
    assert isinstance(make_strategy("round-robin"), RoundRobin)
    assert isinstance(make_strategy("least-loaded"), LeastLoaded)
    custom = LeastLoaded()
    assert make_strategy(custom) is custom
    assert isinstance(custom, Strategy)
    with pytest.raises(ValueError, match="round-robin"):
        make_strategy("fastest")
    with pytest.raises(TypeError):
        make_strategy(42)  # type: ignore[arg-type]


# -- admission and the dedupe window ------------------------------------------------------


def request(
    task_id: str = TASK, *, required: object = None, timeout: float | None = None
) -> DelegationRequest:
    return DelegationRequest(
        from_orchestrator_id="a",
        to_orchestrator_id="b",
        task=Task(id=task_id, description="d"),
        required_capabilities=required,
        timeout=timeout,
    )


def test_refusal_reasons_in_order() -> None:
    admission = Admission(["testing"], 1)
    assert admission.check("a", request(timeout=0.0), 0.0) == Refuse("deadline_exceeded")
    assert admission.check("a", request(required=["security"]), 0.0) == Refuse(
        "capability_mismatch"
    )
    structured = OrchestratorCapabilities(specializations=["security"])
    assert admission.check("a", request(required=structured), 0.0) == Refuse("capability_mismatch")
    admission.draining = True
    assert admission.check("a", request(), 0.0) == Refuse("draining")
    admission.draining = False
    assert admission.check("a", request(required=["testing"]), 0.0) == Admit()
    admission.start("a", TASK)
    assert admission.check("a", request("t-2"), 0.0) == Refuse("overloaded")
    assert admission.refuse("busy-hook") == Refuse("busy-hook")
    assert admission.refused == {
        "deadline_exceeded": 1,
        "capability_mismatch": 2,
        "draining": 1,
        "overloaded": 1,
        "busy-hook": 1,
    }
    assert set(RefusalReason) == {
        "capability_mismatch",
        "overloaded",
        "draining",
        "deadline_exceeded",
    }


def test_required_capabilities_forms() -> None:
    assert required_capabilities(request()) == ()
    assert required_capabilities(request(required=["testing"])) == ("testing",)
    empty = OrchestratorCapabilities()
    assert required_capabilities(request(required=empty)) == ()


def test_a_task_runs_once_per_origin() -> None:
    admission = Admission(["testing"], 4)
    assert admission.check("a", request(), 0.0) == Admit()
    admission.start("a", TASK)
    assert admission.check("a", request(), 1.0) == Running()
    assert admission.check("c", request(), 1.0) == Admit()  # another origin: another task
    final = callback("completed", result=3)
    admission.finish("a", TASK, final, 2.0)
    assert admission.check("a", request(), 3.0) == Replay(final)
    assert (admission.running, admission.completed) == (0, 1)
    with pytest.raises(RuntimeError):
        admission.start("a", TASK)
    with pytest.raises(RuntimeError, match="not running"):
        admission.finish("a", "unknown", final, 3.0)
    with pytest.raises(RuntimeError, match="finished already"):
        admission.finish("a", TASK, final, 3.0)
    assert isinstance(admission.check("a", request(), 3.0), Replay)


def test_the_dedupe_window_is_bounded_in_time_and_size() -> None:
    admission = Admission(["testing"], 8, window=10.0, size=2)
    for index, now in enumerate([0.0, 1.0, 2.0]):
        task_id = f"t{index}"
        admission.start("a", task_id)
        admission.finish("a", task_id, TaskCallback(task_id=task_id, status="failed"), now)
    assert admission.failed == 3
    assert admission.check("a", request("t0"), 3.0) == Admit()  # beyond the size
    assert isinstance(admission.check("a", request("t1"), 3.0), Replay)
    admission.start("a", "running")  # a running task is never forgotten
    assert isinstance(admission.check("a", request("t2"), 11.5), Replay)
    assert admission.check("a", request("t1"), 11.5) == Admit()  # past the window
    assert admission.check("a", request("running"), 100.0) == Running()
    assert admission.check("a", request("t2"), 100.0) == Admit()


def test_admission_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="max_concurrent_tasks"):
        Admission([], 0)
    with pytest.raises(TypeError):
        Admission([], 1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="window"):
        Admission([], 1, window=0)
    with pytest.raises(ValueError, match="size"):
        Admission([], 1, size=0)


# -- the trio shell's retries, on a virtual clock ---------------------------------------


async def test_retry_rounds_back_off_on_trio_time(autojump_clock: object) -> None:
    """A pure client with no peers: every round finds no candidate, and waits."""
    import trio

    from trio_federation import MemoryRegistry, open_federation_node

    backoff = Backoff(initial_delay=10.0, multiplier=2.0, max_delay=15.0)
    async with open_federation_node(
        local_id="orch-a",
        port=None,
        registry=MemoryRegistry(),
        backoff=backoff,
        rng=random.Random(1),
    ) as node:
        start = trio.current_time()
        with pytest.raises(DelegationFailed) as info:
            await node.delegate(Task(id="t", description=""), max_attempts=4)
        waited = trio.current_time() - start
    # three waits between four rounds, each within its full-jitter ceiling
    assert 0 < waited <= 10 + 15 + 15
    assert [a.outcome for a in info.value.attempts] == ["no_candidate"] * 4
    assert node.statistics().failed == 1


async def test_a_delegation_runs_under_the_callers_deadline(autojump_clock: object) -> None:
    import trio

    from trio_federation import DelegationStatus, MemoryRegistry, open_federation_node

    async with open_federation_node(
        local_id="orch-a",
        port=None,
        registry=MemoryRegistry(),
        backoff=Backoff(initial_delay=60, max_delay=60),
    ) as node:
        with trio.move_on_after(30) as scope:
            async with node.open_delegation(Task(id="t", description="")) as delegation:
                await delegation.result()
        assert scope.cancelled_caught
        assert delegation.status is DelegationStatus.TIMEOUT
        assert [u async for u in delegation] == []  # no final update: it was cancelled
        assert node.statistics().cancelled == 1


@pytest.mark.parametrize("module", ["_state", "_executor", "_strategies"])
def test_the_cores_import_no_trio(module: str) -> None:
    """The sans-IO cores do no I/O: neither trio nor the connection layer."""
    import ast
    from pathlib import Path

    import trio_federation

    source = Path(trio_federation.__file__).parent / "_delegation" / f"{module}.py"
    imported: set[str] = set()
    for node in ast.walk(ast.parse(source.read_text())):
        if isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            imported.add(("." * node.level) + (node.module or ""))
    assert not {"trio", "trio_websocket"} & imported
    assert not any(name.endswith(("_connection", "_transport", "_node")) for name in imported)


def test_latency_percentiles_are_nearest_rank() -> None:
    from trio_federation._delegation._node import _percentile

    assert _percentile([], 0.5) is None
    assert _percentile([2.0, 1.0], 0.5) == 1.0
    assert _percentile([1.0, 2.0, 3.0, 4.0], 0.95) == 4.0
    assert _percentile([float(n) for n in range(1, 101)], 0.5) == 50.0
