"""One peer process of a benchmark run: ``python -m bench.worker ROLE ...``.

``serve`` listens on 127.0.0.1 (an ephemeral port), takes one connection and
prints ``{"event": "ready", "port": N}`` then ``{"event": "result", ...}``;
``dial`` connects to that port, does the work and prints its result. Each
report is one JSON line on stdout; a failure is reported as ``{"event":
"error", ...}`` and a non-zero exit status. Logs go to stderr.

The process ends by itself after ``--timeout`` seconds (hard, a little later, if
cancellation cannot reach a hung task), and as soon as its stdin reaches end of
file (the parent closes it, or died), so that it never outlives the benchmark.

Throughput (``--mode throughput``): the dialer sends ``--warmup`` + ``--count``
messages; the listener counts them and times from the last warm-up message to
the last message, so its ``elapsed`` spans exactly ``count`` arrivals. Round
trips (``--mode roundtrip``): the dialer sends one delegation at a time and
waits for the answer; it reports the ``count`` latencies after the warm-up ones,
in nanoseconds.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final, Literal

import trio
import trio_websocket

from trio_federation import (
    DelegationRequest,
    DelegationResponse,
    FederationListener,
    FederationMessage,
    MessageType,
    OrchestratorConnection,
    decode_message,
    encode_message,
    open_orchestrator_connection,
    serve_federation,
)

from ._workload import (
    CAPABILITIES,
    DIALER_ID,
    FEDERATION_PATH,
    HEARTBEAT_TIMEOUT,
    HOST,
    LISTENER_ID,
    make_delegations,
)

Impl = Literal["lib", "lib-drain", "lib-v1", "raw", "codec"]
"""``lib``: trio-federation with its defaults (a resumable session: numbered
messages, acknowledgements, window); ``lib-drain``: the same, but the
receiving application drains what arrived with ``receive_nowait()`` after each
``async for`` step (throughput only); ``lib-v1``: trio-federation without
sessions (``resumable=False``, ``resume_timeout=0``: the plain v1 protocol);
``raw``: trio-websocket with pre-encoded frames; ``codec``: trio-websocket,
encoding and decoding every message with our codec (the floor for any
connection that hands out typed messages)."""
IMPLS: Final[tuple[Impl, ...]] = ("lib", "lib-drain", "lib-v1", "raw", "codec")
Mode = Literal["throughput", "roundtrip"]
Report = dict[str, Any]

RAW_PATH: Final = "/raw"
LIBRARY_OPTIONS: Final[dict[str, Any]] = {
    "capabilities": CAPABILITIES,
    "heartbeat_timeout": HEARTBEAT_TIMEOUT,
    "rate_limit": None,
}
"""Options of both library peers. No inbound rate limit: the default (2,000
messages/s, burst 4,000) is far below what a throughput run sends."""
NO_SESSIONS: Final[dict[str, Any]] = {"resume_timeout": 0}
"""The listener's extra options for ``lib-v1``: it grants no session."""
HARD_STOP_GRACE: Final = 10.0
"""Seconds after ``--timeout`` at which the process exits whatever it is doing."""


def emit(event: str, **fields: Any) -> None:
    """Report one event to the parent: a JSON line on stdout."""
    sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
    sys.stdout.flush()


class Stopwatch:
    """Wall-clock and CPU time (this process) since :meth:`restart`."""

    def __init__(self) -> None:
        self.restart()

    def restart(self) -> None:
        """Start counting now."""
        self._wall = time.perf_counter()
        self._cpu = time.process_time()

    def read(self) -> Report:
        """``elapsed`` (wall) and ``cpu`` seconds since the start."""
        return {
            "elapsed": time.perf_counter() - self._wall,
            "cpu": time.process_time() - self._cpu,
        }


# -- the listener side ------------------------------------------------------------------


async def _count_lib(
    conn: OrchestratorConnection, warmup: int, count: int, *, drain: bool = False
) -> Report:
    total = warmup + count
    received = 0
    clock = Stopwatch()
    async for _message in conn:
        received += 1
        if received == warmup:
            clock.restart()
        if received == total:
            break
        while drain:  # what else arrived, without a scheduler pass each
            try:
                conn.receive_nowait()
            except trio.WouldBlock:
                break
            received += 1
            if received == warmup:
                clock.restart()
            if received == total:
                return {"received": received, **clock.read()}
    return {"received": received, **clock.read()}


async def _answer_lib(conn: OrchestratorConnection) -> Report:
    answered = 0
    clock = Stopwatch()
    async for message in conn:
        if isinstance(message.payload, DelegationRequest):
            await conn.accept_delegation(message.payload)
            answered += 1
    return {"answered": answered, **clock.read()}


async def _count_raw(
    ws: trio_websocket.WebSocketConnection, warmup: int, count: int, *, decode: bool = False
) -> Report:
    total = warmup + count
    received = 0
    clock = Stopwatch()
    while received < total:
        frame = await ws.get_message()
        if decode:
            decode_message(frame)
        received += 1
        if received == warmup:
            clock.restart()
    return {"received": received, **clock.read()}


async def _echo_raw(ws: trio_websocket.WebSocketConnection, *, accept: bool = False) -> Report:
    answered = 0
    clock = Stopwatch()
    while True:
        try:
            frame = await ws.get_message()
        except trio_websocket.ConnectionClosed:
            return {"answered": answered, **clock.read()}
        if accept:  # what accept_delegation does, without a connection around it
            request = decode_message(frame)
            assert isinstance(request.payload, DelegationRequest)
            task_id = request.payload.task.id
            frame = encode_message(
                FederationMessage(
                    type=MessageType.CALLBACK,
                    payload=DelegationResponse(task_id=task_id, accepted=True),
                    sender=LISTENER_ID,
                    recipient=request.sender,
                    correlation_id=task_id,
                )
            )
        await ws.send_message(frame)
        answered += 1


async def serve(impl: Impl, mode: Mode, warmup: int, count: int) -> Report:
    """Listen, take one connection, measure it, and return the listener's figures."""
    done = trio.Event()
    report: Report = {}

    async def run(work: Callable[[], Awaitable[Report]]) -> None:
        try:
            report.update(await work())
        except Exception as exc:
            report["error"] = f"listener handler failed: {exc!r}"
        finally:
            done.set()

    async def lib_handler(conn: OrchestratorConnection) -> None:
        if mode == "throughput":
            drain = impl == "lib-drain"
            await run(functools.partial(_count_lib, conn, warmup, count, drain=drain))
        else:
            await run(functools.partial(_answer_lib, conn))

    async def raw_handler(request: trio_websocket.WebSocketRequest) -> None:
        ws = await request.accept()
        codec = impl == "codec"
        if mode == "throughput":
            await run(functools.partial(_count_raw, ws, warmup, count, decode=codec))
        else:
            await run(functools.partial(_echo_raw, ws, accept=codec))

    async with trio.open_nursery() as nursery:
        if impl in ("lib", "lib-drain", "lib-v1"):
            listener: FederationListener = await nursery.start(
                functools.partial(
                    serve_federation,
                    lib_handler,
                    HOST,
                    0,
                    local_id=LISTENER_ID,
                    **LIBRARY_OPTIONS,
                    **(NO_SESSIONS if impl == "lib-v1" else {}),
                )
            )
            port = listener.port
        else:
            server: trio_websocket.WebSocketServer = await nursery.start(
                functools.partial(trio_websocket.serve_websocket, raw_handler, HOST, 0, None)
            )
            port = server.port
        emit("ready", port=port)
        await done.wait()
        nursery.cancel_scope.cancel()
    if "error" in report:
        raise RuntimeError(report["error"])
    return report


# -- the dialer side --------------------------------------------------------------------


async def dial(impl: Impl, mode: Mode, port: int, warmup: int, count: int) -> Report:
    """Connect to the listener on ``port``, do the work, and return the dialer's figures."""
    messages = make_delegations(warmup + count)
    if impl in ("lib", "lib-drain", "lib-v1"):
        url = f"ws://{HOST}:{port}{FEDERATION_PATH}"
        clock = Stopwatch()
        async with open_orchestrator_connection(
            url, local_id=DIALER_ID, resumable=impl != "lib-v1", **LIBRARY_OPTIONS
        ) as conn:
            if conn.resumable != (impl != "lib-v1"):
                raise RuntimeError(f"{impl}: the session was not negotiated as expected")
            if mode == "roundtrip":
                return await _round_trips_lib(conn, messages, warmup)
            clock.restart()
            for message in messages:
                await conn.send(message)  # the back-pressure path
        # Leaving the block drained the queue and closed the connection.
        return {"sent": len(messages), **clock.read()}

    async with trio_websocket.open_websocket_url(f"ws://{HOST}:{port}{RAW_PATH}") as ws:
        if impl == "codec":
            if mode == "roundtrip":
                return await _round_trips_codec(ws, messages, warmup)
            clock = Stopwatch()
            for message in messages:
                await ws.send_message(encode_message(message))
            return {"sent": len(messages), **clock.read()}
        frames = [encode_message(message) for message in messages]  # pre-encoded, once each
        if mode == "roundtrip":
            return await _round_trips_raw(ws, frames, warmup)
        clock = Stopwatch()
        for frame in frames:
            await ws.send_message(frame)
    # Leaving the block closed the connection.
    return {"sent": len(frames), **clock.read()}


async def _round_trips_codec(
    ws: trio_websocket.WebSocketConnection, messages: list[FederationMessage], warmup: int
) -> Report:
    latencies: list[int] = []
    clock = Stopwatch()
    for index, message in enumerate(messages):
        if index == warmup:
            clock.restart()
        started = time.perf_counter_ns()
        await ws.send_message(encode_message(message))
        reply = decode_message(await ws.get_message())
        elapsed = time.perf_counter_ns() - started
        if not (isinstance(reply.payload, DelegationResponse) and reply.payload.accepted):
            raise RuntimeError(f"unexpected answer to {message.correlation_id}: {reply!r}")
        if index >= warmup:
            latencies.append(elapsed)
    return {"latencies_ns": latencies, **clock.read()}


async def _round_trips_lib(
    conn: OrchestratorConnection, messages: list[FederationMessage], warmup: int
) -> Report:
    latencies: list[int] = []
    clock = Stopwatch()
    replies = aiter(conn)
    for index, message in enumerate(messages):
        if index == warmup:
            clock.restart()
        started = time.perf_counter_ns()
        await conn.send(message)
        reply = await anext(replies)
        elapsed = time.perf_counter_ns() - started
        if not (
            isinstance(reply.payload, DelegationResponse)
            and reply.payload.accepted
            and reply.correlation_id == message.correlation_id
        ):
            raise RuntimeError(f"unexpected answer to {message.correlation_id}: {reply!r}")
        if index >= warmup:
            latencies.append(elapsed)
    return {"latencies_ns": latencies, **clock.read()}


async def _round_trips_raw(
    ws: trio_websocket.WebSocketConnection, frames: list[str], warmup: int
) -> Report:
    latencies: list[int] = []
    clock = Stopwatch()
    for index, frame in enumerate(frames):
        if index == warmup:
            clock.restart()
        started = time.perf_counter_ns()
        await ws.send_message(frame)
        echo = await ws.get_message()
        elapsed = time.perf_counter_ns() - started
        if echo != frame:
            raise RuntimeError(f"the echo of frame {index} differs")
        if index >= warmup:
            latencies.append(elapsed)
    return {"latencies_ns": latencies, **clock.read()}


# -- process plumbing -------------------------------------------------------------------


async def _end_on_stdin_eof(scope: trio.CancelScope) -> None:
    """Cancel ``scope`` when stdin reaches end of file (the parent is gone)."""
    if sys.platform == "win32":  # pragma: no cover - no FdStream there
        await trio.sleep_forever()
    else:
        async with trio.lowlevel.FdStream(os.dup(sys.stdin.fileno())) as stdin:
            while await stdin.receive_some(4096):
                pass
        logging.getLogger("bench.worker").warning("stdin closed: stopping")
        scope.cancel()


async def _main(args: argparse.Namespace) -> Report | None:
    report: Report | None = None
    with trio.fail_after(args.timeout):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_end_on_stdin_eof, nursery.cancel_scope)
            if args.role == "serve":
                report = await serve(args.impl, args.mode, args.warmup, args.count)
            else:
                report = await dial(args.impl, args.mode, args.port, args.warmup, args.count)
            nursery.cancel_scope.cancel()
    return report


def _hard_stop(role: str) -> None:
    try:
        emit("error", error=f"{role} hung past its timeout; exiting hard")
    finally:  # even when the parent is gone and stdout is a broken pipe
        os._exit(3)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.worker", description=__doc__)
    parser.add_argument("role", choices=["serve", "dial"])
    parser.add_argument("--impl", choices=IMPLS, required=True)
    parser.add_argument("--mode", choices=["throughput", "roundtrip"], required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--port", type=int, default=0, help="the listener's port (dial)")
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument("--cpu", type=int, help="pin this process to that CPU (Linux)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one role; report on stdout; exit status 0 on success."""
    args = _parser().parse_args(argv)
    if args.warmup < 1 or args.count < 1:
        emit("error", error="--warmup and --count must be at least 1")
        return 2
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})
    logging.basicConfig(
        level=logging.WARNING,
        stream=sys.stderr,
        format=f"[{args.role}/{args.impl}] %(levelname)s %(name)s: %(message)s",
    )
    # Last resort against a hang that cancellation cannot reach (a shielded task).
    hard_stop = threading.Timer(args.timeout + HARD_STOP_GRACE, _hard_stop, (args.role,))
    hard_stop.daemon = True
    hard_stop.start()
    try:
        report = trio.run(_main, args)
    except trio.TooSlowError:
        emit("error", error=f"{args.role} did not finish within {args.timeout:g}s")
        return 1
    except BaseException as exc:
        logging.getLogger("bench.worker").exception("%s failed", args.role)
        emit("error", error=f"{args.role} failed: {exc!r}")
        return 1
    if report is None:
        emit("error", error=f"{args.role} stopped before finishing (stdin closed)")
        return 1
    emit("result", **report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
