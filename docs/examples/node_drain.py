"""Delegation, part 3: a draining node hands its running task to another node.

Run it with ``python docs/examples/node_drain.py``; docs/delegation.rst
walks through it.
"""

import trio

from trio_federation import Task, TaskAccepted, TaskContext, open_federation_node


async def never_done(ctx: TaskContext) -> None:
    await trio.sleep_forever()


async def done(ctx: TaskContext) -> str:
    return f"{ctx.task.id} done"


async def main() -> None:
    async with (
        open_federation_node(local_id="orch-b", capabilities=["testing"], executor=never_done) as b,
        open_federation_node(local_id="orch-c", capabilities=["testing"], executor=done),
        open_federation_node(local_id="orch-a", strategy="least-loaded") as a,
    ):
        task = Task(id="task-1", description="lint")
        async with a.open_delegation(task, prefer=["orch-b"]) as delegation:
            async for update in delegation:
                print(update)
                if update == TaskAccepted(peer="orch-b"):
                    # Take orch-b out of service; give its task 0.1 s to finish.
                    with trio.move_on_after(0.1):
                        await b.drain()
        print("attempts:", [(x.peer, x.outcome, x.reason) for x in delegation.attempts])
        # orch-b is draining: even preferred, it is not chosen any more.
        async with a.open_delegation(Task(id="task-2", description="lint"), prefer=["orch-b"]) as d:
            print("task-2:", await d.result(), "on", d.assignee)


if __name__ == "__main__":
    trio.run(main)
