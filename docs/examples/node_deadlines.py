"""Delegation, part 2: deadlines travel, cancellation reaches the executor.

Run it with ``python docs/examples/node_deadlines.py``; docs/delegation.rst
walks through it.
"""

import trio

from trio_federation import (
    DelegationFailed,
    DelegationStatus,
    Task,
    TaskContext,
    open_federation_node,
)


async def slow(ctx: TaskContext) -> str:
    """orch-b: a task that takes longer than its delegator will wait."""
    budget = ctx.deadline - trio.current_time()
    assert 0 < budget <= 0.5
    print(f"orch-b got {ctx.task.id!r} with at most 0.5 s left")
    try:
        await trio.sleep(10)
    except trio.Cancelled:
        print(f"orch-b: {ctx.task.id!r} cancelled")
        raise
    return "too late"


async def failing(ctx: TaskContext) -> str:
    """orch-c: a task that raises."""
    raise FileNotFoundError("no tests found")


async def main() -> None:
    async with (
        open_federation_node(local_id="orch-b", capabilities=["testing"], executor=slow),
        open_federation_node(local_id="orch-c", capabilities=["security"], executor=failing),
        open_federation_node(local_id="orch-a") as node,
    ):
        # A deadline is trio's: the remaining budget goes out with the request.
        task = Task(id="task-1", description="the whole suite")
        with trio.move_on_after(0.5):
            async with node.open_delegation(task, required_capabilities=["testing"]) as delegation:
                await delegation.result()
        print("orch-a:", delegation.status)  # timeout
        assert delegation.status is DelegationStatus.TIMEOUT

        # An exception in the executor is the task's outcome.
        try:
            await node.delegate(
                Task(id="task-2", description="audit"), required_capabilities=["security"]
            )
        except DelegationFailed as error:
            for attempt in error.attempts:
                print("orch-a: attempt on", attempt.peer, attempt.outcome, "-", attempt.reason)


if __name__ == "__main__":
    trio.run(main)
