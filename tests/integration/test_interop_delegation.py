"""Delegation with the JavaScript peer: it delegates to a node and executes a node's tasks.

The peer (tests/interop/peer.mjs) speaks wire format v1 as the TypeScript
daemon does, answers a delegation the way ``acceptDelegation`` does and then
reports it completed, and negotiates no extension: a v1 peer.
"""

from __future__ import annotations

from typing import Any

import trio

from trio_federation import (
    DelegationStatus,
    MemoryRegistry,
    Task,
    TaskAccepted,
    TaskCompleted,
    TaskContext,
    open_federation_node,
)

from ._jspeer import open_js_peer
from .test_interop_js import JS_SERVER, TIME_LIMIT, js_node, start_server

__all__ = ["js_node"]  # the fixture, re-used


async def test_js_peer_delegates_to_a_node_and_executes_its_delegation(js_node: str) -> None:
    ran: list[TaskContext] = []

    async def execute(ctx: TaskContext) -> dict[str, Any]:
        ran.append(ctx)
        await ctx.report_progress(50, "halfway")
        return {"by": "orch-b", "task": ctx.task.id}

    with trio.fail_after(TIME_LIMIT):
        async with open_federation_node(
            local_id="orch-b", capabilities=["code-generation"], executor=execute
        ) as node:
            async with open_js_peer(
                js_node,
                "--mode", "client",
                "--url", str(node.endpoint),
                "--id", "js-peer",
                "--capabilities", "testing",
                "--to", "orch-b",
                "--expect-delegation",
                "--expect-result",
            ) as peer:  # fmt: skip
                opened = await peer.expect("open")
                # We granted no extension to a peer that asked for none.
                assert "x-federation-extensions" not in opened["headers"]
                # The JS peer's delegation to us: accepted, progress, completed.
                accepted = await peer.received("callback", lambda m: "accepted" in m["payload"])
                assert accepted["payload"] == {"taskId": "js-task-1", "accepted": True}
                assert accepted["correlationId"] == "js-task-1"
                progress = await peer.received(
                    "callback", lambda m: m["payload"].get("status") == "progress"
                )
                assert progress["payload"]["progress"] == 50
                done = await peer.received(
                    "callback", lambda m: m["payload"].get("status") == "completed"
                )
                assert done["payload"]["result"] == {"by": "orch-b", "task": "js-task-1"}
                assert (done["from"], done["to"]) == ("orch-b", "js-peer")
                # Our delegation to the JS peer, over the connection it dialed.
                async with node.open_delegation(
                    Task(id="py-task-1", description="for js"), required_capabilities=["testing"]
                ) as delegation:
                    updates = [update async for update in delegation]
                    assert await delegation.result() == {"by": "js-peer"}
                assert delegation.status is DelegationStatus.COMPLETED
                assert updates == [
                    TaskAccepted(peer="js-peer"),
                    TaskCompleted(peer="js-peer", result={"by": "js-peer"}),
                ]
                request = await peer.received("delegation")
                assert request["payload"]["task"]["id"] == "py-task-1"
                assert request["payload"]["task"]["metadata"] == {"federationHops": 1}
                assert request["correlationId"] == "py-task-1"
                assert await peer.wait_exit() == 0
    assert [ctx.origin for ctx in ran] == ["js-peer"]
    assert node.statistics().illegal_callbacks == 0


async def test_a_node_delegates_to_a_js_server_and_never_sends_it_a_cancel(js_node: str) -> None:
    with trio.fail_after(TIME_LIMIT):
        async with open_js_peer(js_node, *JS_SERVER) as peer:
            url = await start_server(peer)
            async with open_federation_node(
                local_id="orch-a", registry=MemoryRegistry(), peers={"js-peer": url}, port=None
            ) as node:
                # The daemon's server sends no identification: its capabilities
                # are unknown, so only a task requiring none can go to it.
                result = await node.delegate(Task(id="py-task-1", description="for js"))
                assert result == {"by": "js-peer"}
                (info,) = node.peers()
                assert (info.id, info.capabilities) == ("js-peer", ())
                # Leaving a delegation once accepted: no cancel goes to a v1 peer.
                async with node.open_delegation(Task(id="py-task-2", description="x")) as d:
                    assert isinstance(await d.__anext__(), TaskAccepted)
                assert d.status in (DelegationStatus.CANCELLED, DelegationStatus.COMPLETED)
                await trio.sleep(0.1)  # time for anything the node might (wrongly) send
            await peer.terminate()
    received = [e["message"] for e in peer.events if e.get("event") == "received"]
    assert [m["type"] for m in received] == ["delegation"] * len(received)
    assert all(m["payload"].get("status") != "cancel" for m in received)
