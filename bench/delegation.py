"""``python -m bench.delegation``: a delegation's round trip against a bare request/reply.

In one process and one trio run on 127.0.0.1, alternating in blocks so both
see the same machine:

- **delegation**: ``await node.delegate(task)`` from one
  :func:`~trio_federation.open_federation_node` to another whose executor
  returns at once: delegate → accepted → completed, through candidate
  selection, the state machine and the executor's admission;
- **bare request/reply**: a ``delegation`` message sent over an
  :class:`~trio_federation.OrchestratorConnection` to a
  :func:`~trio_federation.serve_federation` handler that answers each with one
  ``callback``, awaited by the sender: the floor the connection layer sets.

Prints p50 and p95 of each and the ratio of the p50s, then the balancing
spread of every strategy and the consistent-hash key movement
(:mod:`bench.balancing`). ``--count`` round trips
of each kind (default 2,000), ``--quick`` for a smoke test, ``--json PATH``
writes the figures. Exit status 0.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import trio

from trio_federation import (
    DelegationRequest,
    FederationMessage,
    FederationNode,
    OrchestratorConnection,
    Task,
    TaskCallback,
    TaskContext,
    open_federation_node,
    open_orchestrator_connection,
    serve_federation,
)

from . import balancing
from ._report import percentile

BLOCK = 100
"""Round trips of one kind before switching to the other."""


async def nothing(ctx: TaskContext) -> None:
    """The empty task."""


async def answer_each(conn: OrchestratorConnection) -> None:
    """The bare listener: one callback per delegation message."""
    async for message in conn:
        request = message.payload
        assert isinstance(request, DelegationRequest)
        await conn.send(
            FederationMessage(
                type="callback",
                payload=TaskCallback(task_id=request.task.id, status="completed"),
                sender=conn.local_id or "",
                recipient=conn.id,
                correlation_id=request.task.id,
            )
        )


async def interleaved(
    node: FederationNode, conn: OrchestratorConnection, count: int, prefer: Sequence[str] = ()
) -> dict[str, list[float]]:
    """``count`` delegations by ``node`` and bare request/replies over ``conn``.

    In alternating blocks of ``BLOCK``, in seconds; ``conn``'s peer answers
    each delegation message with one callback.
    """
    samples: dict[str, list[float]] = {"delegation": [], "bare": []}
    done = 0
    while done < count:
        block = min(BLOCK, count - done)
        for index in range(done, done + block):
            task = Task(id=f"d-{index}", description="")
            start = time.perf_counter()
            await node.delegate(task, prefer=prefer)
            samples["delegation"].append(time.perf_counter() - start)
        for index in range(done, done + block):
            request = DelegationRequest(
                from_orchestrator_id=conn.local_id or "",
                to_orchestrator_id=conn.id,
                task=Task(id=f"b-{index}", description=""),
            )
            start = time.perf_counter()
            await conn.send(
                FederationMessage(
                    type="delegation",
                    payload=request,
                    sender=conn.local_id or "",
                    recipient=conn.id,
                    correlation_id=request.task.id,
                )
            )
            await conn.receive()
            samples["bare"].append(time.perf_counter() - start)
        done += block
    return samples


async def measure(count: int) -> dict[str, list[float]]:
    """``count`` round trips of each kind, in alternating blocks, in seconds."""
    samples: dict[str, list[float]] = {}
    async with trio.open_nursery() as nursery:
        listener = await nursery.start(
            functools.partial(serve_federation, local_id="bare-b", capabilities=[]),
            answer_each,
            "127.0.0.1",
            0,
        )
        async with (
            open_federation_node(local_id="node-b", executor=nothing),
            open_federation_node(local_id="node-a", port=None) as node,
            open_orchestrator_connection(
                f"ws://127.0.0.1:{listener.port}/federation", local_id="bare-a", capabilities=[]
            ) as conn,
        ):
            await node.delegate(Task(id="warm-up", description=""))  # dial once
            samples = await interleaved(node, conn, count)
        nursery.cancel_scope.cancel()
    return samples


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.delegation", description=__doc__)
    parser.add_argument("--count", type=int, default=2000, help="round trips of each kind")
    parser.add_argument("--quick", action="store_true", help="a small run for smoke tests")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    options = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    count = 200 if options.quick else options.count
    samples = trio.run(measure, count)
    figures: dict[str, Any] = {"count": count}
    print(f"delegation round trip vs bare request/reply, {count} each, 127.0.0.1, one process")
    print(f"{'':<28}{'p50 µs':>10}{'p95 µs':>10}")
    for kind, label in (("delegation", "delegate → completed"), ("bare", "bare request/reply")):
        p50 = percentile(samples[kind], 0.5)
        p95 = percentile(samples[kind], 0.95)
        figures[kind] = {"p50": p50, "p95": p95}
        print(f"{label:<28}{p50 * 1e6:>10.0f}{p95 * 1e6:>10.0f}")
    ratio = figures["delegation"]["p50"] / figures["bare"]["p50"]
    figures["p50_ratio"] = ratio
    print(f"delegation p50 / bare p50: {ratio:.2f}x")
    print()
    figures["balancing"] = balancing.figures()
    balancing.report(figures["balancing"])
    if options.json:
        options.json.write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
