"""The example of docs/index.rst: dial an orchestrator, delegate a task, await its result."""

import trio

from trio_federation import DelegationRequest, FederationMessage, Task, TaskCallback
from trio_federation import open_orchestrator_connection


async def main(url: str = "ws://127.0.0.1:8788/federation") -> None:
    async with open_orchestrator_connection(
        url, local_id="orch-a", capabilities=["research"]
    ) as conn:
        if not conn.check_capability(["testing"]):
            return
        task = Task(id="task-1", description="Write the integration tests")
        request = DelegationRequest(
            from_orchestrator_id="orch-a", to_orchestrator_id=conn.id, task=task
        )
        await conn.send_message(
            FederationMessage(
                type="delegation",
                payload=request,
                sender="orch-a",
                recipient=conn.id,
                correlation_id=task.id,
            )
        )
        async for msg in conn:  # every incoming message, typed
            match msg.payload:
                case TaskCallback(status="completed" | "failed" as status):
                    print(f"{task.id} {status} on {msg.sender}")
                    break


if __name__ == "__main__":
    trio.run(main)
