"""Tutorial, part 2: subscriptions, the status and error streams, health.

Run it with ``python docs/examples/health.py``; docs/tutorial.rst walks
through it.
"""

from functools import partial

import trio

from trio_federation import (
    BroadcastPayload,
    FederationMessage,
    OrchestratorConnection,
    open_orchestrator_connection,
    serve_federation,
)


async def announcer(conn: OrchestratorConnection) -> None:
    """orch-b: announce its free capacity three times, then wait for the peer to leave."""
    for free in (4, 3, 2):
        await conn.send(
            FederationMessage(
                type="broadcast",
                payload=BroadcastPayload(topic="capacity", data={"free": free}, ttl=30.0),
                sender="orch-b",
                recipient=conn.id,
            )
        )
        await trio.sleep(0.2)
    async for _ in conn:  # until orch-a disconnects
        pass


async def print_status_changes(conn: OrchestratorConnection) -> None:
    with conn.watch_status() as changes:
        async for status in changes:  # ends after the final disconnected/error
            print(f"[orch-a] status: {status}")


async def print_errors(conn: OrchestratorConnection) -> None:
    with conn.watch_errors() as errors:
        async for error in errors:  # ends when the connection has closed
            print(f"[orch-a] error: {error}")


async def observer(url: str) -> None:
    """orch-a: follow orch-b's announcements, heartbeats and health."""
    # The nursery outlives the connection: leaving the block disconnects first,
    # then the two watchers see their streams end and return.
    async with (
        trio.open_nursery() as watchers,
        open_orchestrator_connection(
            url, local_id="orch-a", capabilities=["monitoring"], heartbeat_timeout=1.0
        ) as conn,
    ):
        watchers.start_soon(print_status_changes, conn)
        watchers.start_soon(print_errors, conn)

        capacity = conn.subscribe("broadcast", predicate=lambda m: m.payload.topic == "capacity")
        with capacity as announcements, conn.subscribe("heartbeat") as heartbeats:
            for _ in range(3):
                msg = await announcements.receive()
                print(f"[orch-a] {msg.sender} has {msg.payload.data['free']} free slots")
            for _ in range(2):
                beat = await heartbeats.receive()
                print(f"[orch-a] {beat.sender} says it is {beat.payload.status}")

        health = conn.get_status()
        latency = "n/a" if health.latency is None else f"{health.latency * 1000:.1f} ms"
        print(
            f"[orch-a] healthy: {conn.is_healthy()}, uptime {health.uptime:.1f} s, "
            f"latency {latency}, {health.messages_received} received, "
            f"{health.errors} errors"
        )


async def main() -> None:
    async with trio.open_nursery() as nursery:
        serve = partial(
            serve_federation, local_id="orch-b", capabilities=["testing"], heartbeat_timeout=1.0
        )
        listener = await nursery.start(serve, announcer, "127.0.0.1", 0)
        await observer(f"ws://127.0.0.1:{listener.port}/federation")
        nursery.cancel_scope.cancel()


if __name__ == "__main__":
    trio.run(main)
