"""Tutorial: subscriptions, status and error streams, health (docs/tutorial.rst)."""

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
    """orch-b: announce its capacity three times, then wait for the peer to leave."""
    for free_slots in (4, 3, 2):
        await conn.send(
            FederationMessage(
                type="broadcast",
                payload=BroadcastPayload(topic="capacity", data={"free": free_slots}, ttl=30.0),
                sender=conn.local_id or "orch-b",
                recipient=conn.id,
            )
        )
        await trio.sleep(0.2)
    async for _ in conn:  # until orch-a disconnects
        pass


async def print_status_changes(conn: OrchestratorConnection) -> None:
    with conn.watch_status() as changes:
        async for status in changes:  # ends after the final disconnected/error
            print(f"[orch-a] status -> {status}")


async def print_errors(conn: OrchestratorConnection) -> None:
    with conn.watch_errors() as errors:
        async for error in errors:
            print(f"[orch-a] error: {error!r}")


async def observer(url: str) -> None:
    async with trio.open_nursery() as watchers, open_orchestrator_connection(
        url, local_id="orch-a", capabilities=["monitoring"], heartbeat_timeout=1.0
    ) as conn:
        watchers.start_soon(print_status_changes, conn)
        watchers.start_soon(print_errors, conn)

        # Subscribe first: a message that arrives while no subscription wants
        # it goes to `async for msg in conn` (or, for control messages, nowhere).
        capacity = conn.subscribe("broadcast", predicate=lambda m: m.payload.topic == "capacity")
        with capacity as announcements, conn.subscribe("heartbeat") as heartbeats:
            for _ in range(3):
                msg = await announcements.receive()
                print(f"[orch-a] {msg.sender} announces {msg.payload.data}")
            # Control messages reach only subscriptions that ask for them.
            beat = await heartbeats.receive()
            print(f"[orch-a] {beat.sender} says it is {beat.payload.status}")

        health = conn.get_status()
        print(
            f"[orch-a] healthy={conn.is_healthy()} status={health.status} "
            f"uptime={health.uptime:.1f}s latency={health.latency is not None} "
            f"received={health.messages_received} errors={health.errors}"
        )
    # Leaving the `async with` disconnected (code 1000); both watchers saw the
    # final status and ended, so the nursery closes.


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
