"""Executors for ``trio-federation node --executor tests.integration._executors:NAME``.

Each records what it runs in ``$FEDERATION_TEST_LOG/<node id>.log`` (when set),
one line per event, written at once (so a SIGKILLed process's lines survive),
and returns the id of the node that ran the task with the task's id.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import trio

from trio_federation import TaskContext


def _record(ctx: TaskContext, event: str) -> None:
    directory = os.environ.get("FEDERATION_TEST_LOG")
    if directory:
        path = Path(directory) / f"{ctx.request.to_orchestrator_id}.log"
        with path.open("a") as log:
            log.write(f"{event} {ctx.task.id}\n")


async def short(ctx: TaskContext) -> dict[str, Any]:
    """Sleep ``metadata["seconds"]`` (default 5 ms), reporting progress once halfway."""
    _record(ctx, "start")
    seconds = float((ctx.task.metadata or {}).get("seconds", 0.005))
    await trio.sleep(seconds / 2)
    await ctx.report_progress(50)
    await trio.sleep(seconds / 2)
    _record(ctx, "done")
    return {"node": ctx.request.to_orchestrator_id, "task": ctx.task.id}


def plain(ctx: TaskContext) -> str:
    """A plain (not async) function: the node calls it directly."""
    return f"{ctx.task.description} done by {ctx.request.to_orchestrator_id}"


async def broken(ctx: TaskContext) -> None:
    """Always fails."""
    raise RuntimeError("this executor always fails")


NOT_CALLABLE = 42
"""For the test of ``--executor`` naming something that is not a function."""


def by_description(ctx: TaskContext) -> Any:
    """By the task's description: ``fail`` raises, ``plain`` returns a string at once,
    anything else returns the awaitable of :func:`short` (the node awaits it)."""
    if ctx.task.description == "fail":
        raise RuntimeError("this task always fails")
    if ctx.task.description == "plain":
        return plain(ctx)
    return short(ctx)
