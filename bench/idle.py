"""``python -m bench.idle``: many idle connections, their memory and heartbeat CPU.

Issue #16's row for lighter connections. For each implementation, in turn and
``--repeat`` times (alternating which goes first), a listener process and a
dialer process on 127.0.0.1; the dialer opens ``--connections`` connections
(default 1,000) and keeps them idle, and the listener reports:

* memory per idle connection: the growth of its resident set (``VmRSS``) from
  listening with no connection to holding them all (after a settling second
  and a ``gc.collect()``), divided by their number;
* heartbeat CPU: its CPU time (user + system) over ``--seconds`` with every
  connection beating once a second, in microseconds per connection-second.

``lib`` is trio-federation with its defaults and ``heartbeat_timeout=2``: every
connection sends a ping and a heartbeat message each second from both ends
(sessions acknowledge the messages). ``raw`` is trio-websocket: each end pings
each connection once a second (``ping()``, which waits for its pong). The
ratios lib/raw are printed beside the targets (memory <= 1.5x, CPU <= 1.2x).

``daemon``, when ``node`` and ``npm`` are present (else the row is left out and
the reason printed; ``--no-daemon`` leaves it out too), is the TypeScript
daemon's own ``OrchestratorConnection`` (:mod:`bench._daemon`) on both sides,
in Node processes (``bench/js/daemon_peer.mjs --mode idle``): like lib and raw,
each implementation talks to itself. Its only heartbeat is a monitor timer per
connection, every ``heartbeatTimeout / 2``, that ws-pings the peer (ws answers
with a pong, which is all the monitor checks; no heartbeat message is sent);
with ``heartbeatTimeout`` 2,000 ms, each end pings each connection once a
second, as raw does. Its listener measures the same way in Node: the RSS
(``process.memoryUsage().rss``, after a full ``global.gc()``) and its CPU
(``process.cpuUsage()``). The ratios lib/daemon are printed beside lib/raw (no
target). The three run in turn within each repeat, the daemon first or last.
The same module is the peer process: ``python -m bench.idle serve|dial ...``.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import logging
import os
import resource
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any, Final

import trio
import trio_websocket

from trio_federation import OrchestratorConnection, open_orchestrator_connection, serve_federation

from ._daemon import PACKAGE, VERSION, Daemon, find_daemon
from ._peers import PeerCommand, PeerError, pick_cpus, spawn_peer
from ._workload import CAPABILITIES, FEDERATION_PATH, HOST, LISTENER_ID

IMPLS: Final = ("lib", "raw")
"""The Python peers; ``daemon`` (Node) joins them when present."""
BEAT: Final = 1.0
"""Seconds between two pings of one connection (from each end)."""
SETTLE: Final = 1.0
"""Seconds between the last connection and the memory reading."""
MEMORY_TARGET: Final = 1.5
CPU_TARGET: Final = 1.2
DIAL_CONCURRENCY: Final = 20
"""Connections being opened at once by the dialer."""
HANDSHAKE_TIMEOUT: Final = 60.0
"""Generous: on a busy machine, a listener beating 1,000 connections answers late."""
PEER: Final = PeerCommand(argv=(sys.executable, "-m", "bench.idle"))
PEER_TIMEOUT: Final = 300.0
"""Seconds a peer process lives at most."""


def _emit(event: str, **fields: Any) -> None:
    sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
    sys.stdout.flush()


def _rss() -> int:
    """This process's resident set, in bytes."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# -- the peers ----------------------------------------------------------------------------


async def _serve(impl: str, connections: int, seconds: float, settle: float) -> None:
    connected = 0
    all_in = trio.Event()

    def arrived() -> None:
        nonlocal connected
        connected += 1
        if connected == connections:
            all_in.set()

    async def lib_handler(conn: OrchestratorConnection) -> None:
        arrived()
        async for _message in conn:
            pass

    async def raw_handler(request: trio_websocket.WebSocketRequest) -> None:
        ws = await request.accept()
        arrived()
        while True:
            await trio.sleep(BEAT)
            await ws.ping()

    async with trio.open_nursery() as nursery:
        if impl == "lib":
            listener = await nursery.start(
                functools.partial(
                    serve_federation,
                    lib_handler,
                    HOST,
                    0,
                    local_id=LISTENER_ID,
                    capabilities=CAPABILITIES,
                    heartbeat_timeout=2 * BEAT,
                    rate_limit=None,
                    max_connections=connections + 16,
                    handshake_timeout=HANDSHAKE_TIMEOUT,
                )
            )
        else:
            listener = await nursery.start(
                functools.partial(trio_websocket.serve_websocket, raw_handler, HOST, 0, None)
            )
        gc.collect()
        before = _rss()
        _emit("ready", port=listener.port)
        await all_in.wait()
        await trio.sleep(settle)
        gc.collect()
        after = _rss()
        cpu, wall = _cpu(), time.perf_counter()
        await trio.sleep(seconds)
        cpu, wall = _cpu() - cpu, time.perf_counter() - wall
        _emit(
            "result",
            rss_before=before,
            rss_after=after,
            cpu=cpu,
            elapsed=wall,
            connections=connected,
        )
        nursery.cancel_scope.cancel()


async def _dial(impl: str, port: int, connections: int) -> None:
    limiter = trio.CapacityLimiter(DIAL_CONCURRENCY)
    opened = 0
    all_open = trio.Event()

    async def one(index: int) -> None:
        nonlocal opened
        if impl == "lib":
            context: Any = open_orchestrator_connection(
                f"ws://{HOST}:{port}{FEDERATION_PATH}",
                local_id=f"idle-{index:05d}",
                capabilities=CAPABILITIES,
                heartbeat_timeout=2 * BEAT,
                rate_limit=None,
                connect_timeout=HANDSHAKE_TIMEOUT,
            )
        else:
            context = trio_websocket.open_websocket_url(
                f"ws://{HOST}:{port}/raw", connect_timeout=HANDSHAKE_TIMEOUT
            )
        await limiter.acquire()  # released once open: only the handshakes are limited
        opening = True
        try:
            async with context as conn:
                limiter.release()
                opening = False
                opened += 1
                if opened == connections:
                    all_open.set()
                if impl == "lib":
                    async for _message in conn:
                        pass
                else:
                    while True:
                        await trio.sleep(BEAT)
                        await conn.ping()
        finally:
            if opening:
                limiter.release()

    async with trio.open_nursery() as nursery:
        for index in range(connections):
            nursery.start_soon(one, index)
        await all_open.wait()
        _emit("open", connections=opened)
        await trio.sleep_forever()


async def _peer_main(args: argparse.Namespace) -> None:
    with trio.fail_after(args.timeout):
        async with trio.open_nursery() as nursery:

            async def stop_on_eof() -> None:
                async with trio.lowlevel.FdStream(os.dup(sys.stdin.fileno())) as stdin:
                    while await stdin.receive_some(4096):
                        pass
                nursery.cancel_scope.cancel()

            nursery.start_soon(stop_on_eof)
            if args.role == "serve":
                await _serve(args.impl, args.connections, args.seconds, args.settle)
            else:
                await _dial(args.impl, args.port, args.connections)
            nursery.cancel_scope.cancel()


def _peer(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.idle serve|dial")
    parser.add_argument("role", choices=["serve", "dial"])
    parser.add_argument("--impl", choices=IMPLS, required=True)
    parser.add_argument("--connections", type=int, required=True)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--settle", type=float, default=SETTLE)
    parser.add_argument("--timeout", type=float, default=PEER_TIMEOUT)
    parser.add_argument("--cpu", type=int)
    args = parser.parse_args(argv)
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})
    # The development-mode warning, and one "never sent" per connection at the end.
    logging.getLogger("trio_federation").setLevel(logging.ERROR)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4 * args.connections)), hard))
    try:
        trio.run(_peer_main, args)
    except BaseException as exc:
        _emit("error", error=f"{args.role} failed: {exc!r}"[:2000])
        return 1
    return 0


# -- the parent ---------------------------------------------------------------------------


def _daemon_peer(daemon: Daemon) -> tuple[PeerCommand, list[str]]:
    """The daemon's peer command and its options (see ``bench/js/daemon_peer.mjs``)."""
    command = PeerCommand(
        argv=(*daemon.command("--expose-gc"), "--connection", str(daemon.connection)),
        env=daemon.env(),
    )
    options = ["--mode", "idle", "--heartbeat-timeout", f"{2 * BEAT * 1000:g}"]
    options += ["--concurrency", str(DIAL_CONCURRENCY)]
    options += ["--handshake-timeout", f"{HANDSHAKE_TIMEOUT:g}"]
    return command, options


async def _run(
    impl: str,
    connections: int,
    seconds: float,
    cpus: tuple[int, int] | None,
    daemon: Daemon | None = None,
) -> dict[str, Any]:
    common = ["--connections", str(connections), "--seconds", f"{seconds:g}"]
    common += ["--settle", f"{SETTLE:g}", "--timeout", f"{PEER_TIMEOUT:g}"]
    listener_cpu = dialer_cpu = None
    if impl == "daemon":
        assert daemon is not None
        command, options = _daemon_peer(daemon)
        serve_args, dial_args = ["serve", *common, *options], ["dial", *common, *options]
        if cpus is not None:  # pinned from here: node takes no --cpu
            listener_cpu, dialer_cpu = cpus
    else:
        command = PEER
        serve_args, dial_args = (
            ["serve", *common, "--impl", impl],
            ["dial", *common, "--impl", impl],
        )
        if cpus is not None:
            serve_args += ["--cpu", str(cpus[0])]
            dial_args += ["--cpu", str(cpus[1])]
    with trio.fail_after(120 + seconds):
        async with spawn_peer(
            f"{impl} idle listener", serve_args, command, listener_cpu
        ) as listener:
            ready = await listener.expect("ready")
            dial_args += ["--port", str(ready["port"])]
            async with spawn_peer(f"{impl} idle dialer", dial_args, command, dialer_cpu) as dialer:
                await dialer.expect("open")
                result = await listener.expect("result")
                assert dialer.process.stdin is not None
                await dialer.process.stdin.aclose()  # the dialer stops
    if result["connections"] != connections:
        raise PeerError(f"{impl}: {result['connections']} of {connections} connections")
    if result.get("closed"):  # the daemon's: a closed connection is no longer measured
        raise PeerError(f"{impl}: {result['closed']} connections closed during the run")
    return result


def measure(
    connections: int,
    seconds: float,
    repeat: int,
    cpus: tuple[int, int] | None,
    daemon: Daemon | None = None,
) -> dict[str, dict[str, list[float]]]:
    """Per implementation: ``memory`` (bytes per connection) and ``cpu`` (µs per
    connection-second), one value per repeat; ``daemon`` too when given."""
    impls = (*IMPLS, "daemon") if daemon is not None else IMPLS
    figures: dict[str, dict[str, list[float]]] = {impl: {"memory": [], "cpu": []} for impl in impls}
    for run in range(repeat):
        for impl in impls if run % 2 == 0 else impls[::-1]:
            result = trio.run(_run, impl, connections, seconds, cpus, daemon)
            per_connection = (result["rss_after"] - result["rss_before"]) / connections
            cpu = result["cpu"] / result["elapsed"] / connections * 1e6
            figures[impl]["memory"].append(per_connection)
            figures[impl]["cpu"].append(cpu)
            print(
                f"run {run + 1}/{repeat}: {impl} {per_connection / 1024:.1f} KiB/connection, "
                f"heartbeat CPU {cpu:.1f} us per connection-second"
                + (f" ({result['errors']} missed heartbeats)" if result.get("errors") else ""),
                file=sys.stderr,
                flush=True,
            )
    return figures


def format_idle(figures: dict[str, dict[str, list[float]]], connections: int) -> str:
    """The row: lib against raw, with the targets; and lib against the daemon, if it ran."""
    daemon = "daemon" in figures
    lines = [
        f"{connections:,} idle connections, listener process   lib      raw   lib/raw  target"
        + ("           daemon  lib/daemon" if daemon else "")
    ]
    for label, key, scale, target in (
        ("memory per connection (KiB)         ", "memory", 1024, MEMORY_TARGET),
        ("heartbeat CPU (us/connection-second)", "cpu", 1, CPU_TARGET),
    ):
        lib, raw = (statistics.median(figures[impl][key]) / scale for impl in ("lib", "raw"))
        line = f"{label} {lib:9.1f} {raw:8.1f}   {lib / raw:5.2f}x  <= {target:.1f}x " + (
            "met   " if lib / raw <= target else "MISSED"
        )
        if daemon:
            theirs = statistics.median(figures["daemon"][key]) / scale
            line += f" {theirs:8.1f}  {lib / theirs:9.2f}x"
        lines.append(line)
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the peers, print the row; see the module docstring."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["serve"], ["dial"]):
        return _peer(argv)
    parser = argparse.ArgumentParser(prog="python -m bench.idle", description=__doc__)
    parser.add_argument("--connections", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=10.0, help="CPU window (default 10)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--no-pin", action="store_true")
    parser.add_argument("--no-daemon", action="store_true", help="leave out the daemon's row")
    args = parser.parse_args(argv)
    cpus = None if args.no_pin else pick_cpus()
    daemon = None if args.no_daemon else find_daemon()
    if isinstance(daemon, str):
        print(f"the daemon's row is left out: {daemon}", file=sys.stderr, flush=True)
        daemon = None
    try:
        figures = measure(args.connections, args.seconds, args.repeat, cpus, daemon)
    except PeerError as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        return 1
    if daemon is not None:
        print(
            f"daemon: {PACKAGE}@{VERSION}'s OrchestratorConnection in Node on both sides, "
            f"heartbeatTimeout {2 * BEAT * 1000:g} ms: its monitor ws-pings from each end every "
            f"{BEAT:g} s, no heartbeat message"
        )
    print(format_idle(figures, args.connections))
    return 0


if __name__ == "__main__":
    sys.exit(main())
