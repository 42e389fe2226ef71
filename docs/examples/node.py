"""Delegation, part 1: two nodes, one task, its progress and its result.

Run it with ``python docs/examples/node.py``; docs/delegation.rst walks
through it.
"""

import trio

from trio_federation import Task, TaskContext, open_federation_node


async def run_tests(ctx: TaskContext) -> dict[str, object]:
    """orch-b's executor: called once per accepted task."""
    for percent in (25, 50, 75):
        await trio.sleep(0.01)  # the real work goes here
        await ctx.report_progress(percent, f"{percent}% of the suite")
    return {"passed": 42, "task": ctx.task.description, "from": ctx.origin}


async def main() -> None:
    # Both nodes share the default in-process memory registry: orch-a finds
    # orch-b there, with its endpoint, capabilities and load.
    async with (
        open_federation_node(local_id="orch-b", capabilities=["testing"], executor=run_tests),
        open_federation_node(local_id="orch-a", capabilities=["research"]) as node,
    ):
        # The simple form: the result, or DelegationFailed.
        result = await node.delegate(
            Task(id="task-1", description="run the unit tests"),
            required_capabilities=["testing"],
        )
        print("result:", result)

        # The streaming form: every update, then the result.
        task = Task(id="task-2", description="run the integration tests")
        async with node.open_delegation(task, required_capabilities=["testing"]) as delegation:
            async for update in delegation:
                print(update)
            print("result:", await delegation.result())
        print(node.statistics().completed, "delegations completed")


if __name__ == "__main__":
    trio.run(main)
