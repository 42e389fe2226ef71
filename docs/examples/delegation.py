"""Tutorial, part 1: a listener and a dialer exchange a delegation.

Run it with ``python docs/examples/delegation.py``; docs/tutorial.rst walks
through it.
"""

from functools import partial

import trio

from trio_federation import (
    DelegationRequest,
    DelegationResponse,
    FederationMessage,
    OrchestratorConnection,
    Task,
    TaskCallback,
    open_orchestrator_connection,
    serve_federation,
)


async def executor(conn: OrchestratorConnection) -> None:
    """orch-b: run every task delegated to it, reporting progress."""
    print(f"[orch-b] {conn.id} connected, capabilities: {', '.join(conn.capabilities)}")
    async for msg in conn:  # every data message; ends when the peer disconnects
        if msg.type != "delegation":
            continue
        request = msg.payload
        assert isinstance(request, DelegationRequest)
        response = await conn.accept_delegation(request)  # sends the acceptance
        if not response.accepted:
            continue
        task = request.task
        for percent in (25, 50, 75, 100):
            await trio.sleep(0.1)  # ... the actual work ...
            if percent < 100:
                update = TaskCallback(task_id=task.id, status="progress", progress=percent)
            else:
                update = TaskCallback(task_id=task.id, status="completed", result={"files": 3})
            await conn.send(
                FederationMessage(
                    type="callback",
                    payload=update,
                    sender="orch-b",
                    recipient=request.from_orchestrator_id,
                    correlation_id=task.id,
                )
            )
    print(f"[orch-b] {conn.id} disconnected")


async def delegator(url: str) -> None:
    """orch-a: dial orch-b, delegate one task and follow it to the end."""
    async with open_orchestrator_connection(
        url, local_id="orch-a", capabilities=["research"]
    ) as conn:
        print(f"[orch-a] connected to {conn.id} ({conn.status})")
        needed = ["code-generation", "testing"]
        if not conn.check_capability(needed):
            print(f"[orch-a] {conn.id} lacks one of {needed}")
            return
        task = Task(id="task-123", description="Implement the login feature", type="code")
        request = DelegationRequest(
            from_orchestrator_id="orch-a",
            to_orchestrator_id=conn.id,
            task=task,
            priority="high",
            required_capabilities=needed,
            timeout=300.0,  # seconds (300000 ms on the wire)
        )
        # Subscribe *before* sending, so that no answer can slip past.
        about_task = conn.subscribe("callback", predicate=lambda m: m.correlation_id == task.id)
        with about_task as updates:
            await conn.send_message(
                FederationMessage(
                    type="delegation",
                    payload=request,
                    sender="orch-a",
                    recipient=conn.id,
                    correlation_id=task.id,
                )
            )
            async for msg in updates:
                match msg.payload:
                    case DelegationResponse(accepted=True):
                        print(f"[orch-a] {msg.sender} accepted {task.id}")
                    case DelegationResponse(accepted=False, reason=reason):
                        print(f"[orch-a] {msg.sender} refused {task.id}: {reason}")
                        break
                    case TaskCallback(status="progress", progress=progress):
                        print(f"[orch-a] {task.id} at {progress:g}%")
                    case TaskCallback(status="completed", result=result):
                        print(f"[orch-a] {task.id} completed: {result}")
                        break
                    case TaskCallback(status="failed", error=error):
                        print(f"[orch-a] {task.id} failed: {error}")
                        break
        health = conn.get_status()
        print(f"[orch-a] sent {health.messages_sent}, received {health.messages_received}")
    # Leaving the block wrote what was still queued, then closed with code 1000.


async def main() -> None:
    async with trio.open_nursery() as nursery:
        serve = partial(
            serve_federation, local_id="orch-b", capabilities=["code-generation", "testing"]
        )
        listener = await nursery.start(serve, executor, "127.0.0.1", 0)  # 0: any free port
        await delegator(f"ws://127.0.0.1:{listener.port}/federation")
        nursery.cancel_scope.cancel()  # stop the listener


if __name__ == "__main__":
    trio.run(main)
