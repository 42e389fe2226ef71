"""One orchestrator process for the multi-process registry test.

``python _registry_node.py REDIS_URL PREFIX ID CAPS ROLE HEARTBEAT STALE``: serves a
listener on 127.0.0.1, registers itself in Redis with its endpoint, and prints
``ready``. A ``delegator`` then waits until two other orchestrators with the
``testing`` capability are online, dials the first through its registered
endpoint, delegates a task and prints ``accepted <id> <True|False>``. Every
process runs until it is killed.
"""

from __future__ import annotations

import sys
from functools import partial

import trio

from trio_federation import (
    DelegationRequest,
    DelegationResponse,
    FederationMessage,
    FederationRegistry,
    OrchestratorConnection,
    OrchestratorQuery,
    OrchestratorRecord,
    Task,
    open_orchestrator_connection,
    open_redis_registry,
    open_registration,
    serve_federation,
)


async def accept_all(conn: OrchestratorConnection) -> None:
    async for msg in conn:
        if isinstance(msg.payload, DelegationRequest):
            await conn.accept_delegation(msg.payload)


async def delegate(registry: FederationRegistry, query: OrchestratorQuery, me: str) -> None:
    with trio.fail_after(20):
        while True:
            peers = [r for r in await registry.query(query) if r.id != me]
            if len(peers) >= 2:
                break
            await trio.sleep(0.05)
    target = peers[0]
    assert target.endpoint is not None
    async with open_orchestrator_connection(
        target.endpoint, local_id=me, capabilities=["code-generation"]
    ) as conn:
        request = DelegationRequest(
            from_orchestrator_id=me,
            to_orchestrator_id=target.id,
            task=Task(id="task-1", description="run the tests"),
        )
        await conn.send_message(
            FederationMessage(type="delegation", payload=request, sender=me, recipient=target.id)
        )
        async for msg in conn:
            if isinstance(msg.payload, DelegationResponse):
                print(f"accepted {target.id} {msg.payload.accepted}", flush=True)
                break


async def main(
    url: str, prefix: str, me: str, caps: str, role: str, hb: float, stale: float
) -> None:
    capabilities = caps.split(",")
    async with (
        open_redis_registry(
            url, key_prefix=prefix, heartbeat_timeout=hb, stale_timeout=stale
        ) as registry,
        trio.open_nursery() as nursery,
    ):
        listener = await nursery.start(
            partial(serve_federation, local_id=me, capabilities=capabilities),
            accept_all,
            "127.0.0.1",
            0,
        )
        record = OrchestratorRecord(id=me, max_sessions=4, region="loopback")
        async with open_registration(
            registry, record, listener=listener, host="127.0.0.1", heartbeat_interval=hb / 4
        ):
            print("ready", flush=True)
            if role == "delegator":
                query = OrchestratorQuery(capabilities=["testing"], statuses=["online"])
                await delegate(registry, query, me)
            await trio.sleep_forever()


if __name__ == "__main__":
    url, prefix, me, caps, role, hb, stale = sys.argv[1:]
    trio.run(main, url, prefix, me, caps, role, float(hb), float(stale))
