"""``python -m bench.federation``: delegations per second across 4 node processes.

Four child processes (``python -m bench.federation node ...``), each one
:func:`~trio_federation.open_federation_node` on 127.0.0.1 whose executor
returns at once (the empty task), know each other through static ``peers=``
(ports picked by this parent; no registry server in the measurement).

**Throughput** (``mesh``, the default): every node both delegates and
executes. Each runs ``--concurrency`` delegation loops (``await
node.delegate(task)``: delegate → accepted → completed, round-robin over the
three others) for ``--seconds``; the figure is the sum of completed
delegations over the common window. Why each node delegates rather than one
delegator driving all four: a trio process is one thread, and the delegating
side does more per task than the executing side (candidate selection, the
lifecycle state machine, two callbacks to decode), so one delegator saturates
one core long before four executors do; spreading the delegating over the
nodes is what a federation does, and measures the library rather than one
process's ceiling. ``--mode hub`` measures that other shape too: one process
delegates, the other three execute.

**Latency**, in the same run: node ``n1`` alternates blocks of sequential
delegations to ``n2`` (``prefer=["n2"]``) with blocks of bare request/reply
round trips over an :class:`~trio_federation.OrchestratorConnection` to an
echo handler (:func:`~trio_federation.serve_federation`) that also lives in
process ``n2``: the floor the connection layer sets, on the same path between
the same two processes. Prints p50/p99 of each and their ratios.

Rate limits: every node and the echo listener run with ``rate_limit=None``.
The default per-connection inbound limit (10,000 messages/s, a burst of
20,000) would pace the senders: at 10,000 delegations/s a connection carries
several messages per delegation each way.

Options: ``--seconds`` (default 3), ``--concurrency`` per delegating node
(default 64), ``--count`` latency round trips of each kind (default 2,000),
``--quick`` for a smoke test, ``--json PATH``, ``--profile DIR`` (each child
writes a cProfile of its run there). Exit status 0 when every run completed.
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import json
import logging
import math
import os
import socket
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

import trio

from trio_federation import (
    Limits,
    Task,
    open_federation_node,
    open_orchestrator_connection,
    serve_federation,
)

from ._peers import ROOT, PeerError
from ._report import P50_TARGET, percentile
from .delegation import answer_each, interleaved, nothing

NODES: Final = 4
THROUGHPUT_TARGET: Final = 10_000
"""Delegations a second across the 4 nodes (issue #14)."""
UNLIMITED: Final = Limits(rate_limit=None, max_queue_size=8192)
"""No inbound rate limit (see the module's docstring), and room to queue."""
HOST: Final = "127.0.0.1"


def emit(event: str, **fields: Any) -> None:
    sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
    sys.stdout.flush()


# -- a child: one node --------------------------------------------------------------------


async def _read_command(stdin: trio.abc.ReceiveStream, buffer: bytearray) -> str:
    while b"\n" not in buffer:
        chunk = await stdin.receive_some()
        if not chunk:
            return "stop"
        buffer += chunk
    line, _, rest = bytes(buffer).partition(b"\n")
    buffer[:] = rest
    return line.decode().strip()


async def _throughput(
    node: Any, node_id: str, seconds: float, concurrency: int
) -> tuple[int, float, float]:
    """Delegation loops for ``seconds``: (completed, start, end) in wall-clock time."""
    counter = {"done": 0}
    deadline = trio.current_time() + seconds

    async def loop(worker: int) -> None:
        index = 0
        while trio.current_time() < deadline:
            await node.delegate(Task(id=f"{node_id}-{worker}-{index}", description=""))
            counter["done"] += 1
            index += 1

    start = time.time()
    async with trio.open_nursery() as nursery:
        for worker in range(concurrency):
            nursery.start_soon(loop, worker)
    return counter["done"], start, time.time()


async def _latency(node: Any, echo_url: str, count: int) -> dict[str, list[float]]:
    async with open_orchestrator_connection(
        echo_url, local_id="bare-n1", capabilities=[], limits=UNLIMITED
    ) as conn:
        samples = await interleaved(node, conn, count, prefer=["n2"])
    return samples


async def run_node(options: argparse.Namespace) -> None:
    """One child: serve, then obey ``throughput``/``latency``/``stop`` lines on stdin."""
    peers = dict(item.split("=", 1) for item in options.peers.split(",") if item)
    stdin = trio.lowlevel.FdStream(sys.stdin.fileno())
    buffer = bytearray()
    async with trio.open_nursery() as nursery:
        if options.echo_port:
            await nursery.start(
                functools.partial(
                    serve_federation, local_id="echo", capabilities=[], limits=UNLIMITED
                ),
                answer_each,
                HOST,
                options.echo_port,
            )
        async with open_federation_node(
            local_id=options.id,
            executor=nothing,
            host=HOST,
            port=options.port,
            peers=peers,
            limits=UNLIMITED,
            max_concurrent_tasks=100_000,
        ) as node:
            emit("ready")
            while True:
                command = await _read_command(stdin, buffer)
                if command == "warm":
                    for peer in sorted(peers):  # dial each once
                        await node.delegate(Task(id=f"warm-{peer}", description=""), prefer=[peer])
                    emit("warm")
                elif command == "throughput":
                    profile = cProfile.Profile() if options.profile else None
                    if profile is not None:
                        profile.enable()
                    done, start, end = await _throughput(
                        node, options.id, options.seconds, options.concurrency
                    )
                    if profile is not None:
                        profile.disable()
                        profile.dump_stats(str(Path(options.profile) / f"{options.id}.prof"))
                    stats = node.statistics()
                    emit("result", done=done, start=start, end=end, retries=stats.retries)
                elif command.startswith("latency "):
                    _, echo_url, count = command.split()
                    samples = await _latency(node, echo_url, int(count))
                    emit("latency", **samples)
                else:
                    break
        nursery.cancel_scope.cancel()


# -- the parent ---------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float | None:
    """CPU time (user + system) a process has used, from /proc (None elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def free_ports(count: int) -> list[int]:
    """Ports free on 127.0.0.1 now (bound, read, released: the children bind them next)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind((HOST, 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


class Child:
    def __init__(self, name: str, process: trio.Process) -> None:
        self.name = name
        self.process = process
        self._buffer = b""

    async def send(self, line: str) -> None:
        assert self.process.stdin is not None
        await self.process.stdin.send_all(line.encode() + b"\n")

    async def expect(self, event: str) -> dict[str, Any]:
        stdout = self.process.stdout
        assert stdout is not None
        while b"\n" not in self._buffer:
            chunk = await stdout.receive_some(1 << 20)
            if not chunk:
                raise PeerError(f"{self.name} exited ({self.process.returncode})")
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        report: dict[str, Any] = json.loads(line)
        if report.get("event") != event:
            raise PeerError(f"{self.name}: expected {event!r}, got {line[:200]!r}")
        return report


async def measure(options: argparse.Namespace) -> dict[str, Any]:
    ids = [f"n{i}" for i in range(1, NODES + 1)]
    *ports, echo_port = free_ports(NODES + 1)
    urls = {
        node_id: f"ws://{HOST}:{port}/federation" for node_id, port in zip(ids, ports, strict=True)
    }
    children: list[Child] = []
    figures: dict[str, Any] = {"mode": options.mode, "nodes": NODES}
    with trio.fail_after(options.seconds + options.count / 100 + 60):
        try:
            for node_id, port in zip(ids, ports, strict=True):
                peers = ",".join(f"{p}={u}" for p, u in urls.items() if p != node_id)
                argv = [sys.executable, "-m", "bench.federation", "node", "--id", node_id,
                        "--port", str(port), "--peers", peers, "--seconds", str(options.seconds),
                        "--concurrency", str(options.concurrency)]  # fmt: skip
                if node_id == "n2":
                    argv += ["--echo-port", str(echo_port)]
                if options.profile:
                    argv += ["--profile", str(options.profile)]
                process = await trio.lowlevel.open_process(argv, stdin=-1, stdout=-1, cwd=ROOT)
                children.append(Child(node_id, process))
            for child in children:
                await child.expect("ready")
            for child in children:
                await child.send("warm")
            for child in children:
                await child.expect("warm")

            # Throughput: all delegating nodes start together.
            delegators = children if options.mode == "mesh" else children[:1]
            cpu_before = [cpu_seconds(child.process.pid) for child in children]
            for child in delegators:
                await child.send("throughput")
            results = [await child.expect("result") for child in delegators]
            cpu_after = [cpu_seconds(child.process.pid) for child in children]
            done = sum(r["done"] for r in results)
            window = max(r["end"] for r in results) - min(r["start"] for r in results)
            figures["delegations"] = done
            figures["window"] = window
            figures["per_second"] = done / window
            figures["retries"] = sum(r["retries"] for r in results)
            if None not in cpu_before and None not in cpu_after:
                cpu = sum(
                    (a or 0.0) - (b or 0.0) for a, b in zip(cpu_after, cpu_before, strict=True)
                )
                figures["cpu_seconds"] = cpu
                figures["per_cpu_second"] = done / cpu

            # Latency, n1 -> n2, against the bare round trip to n2's echo listener.
            await children[0].send(f"latency ws://{HOST}:{echo_port}/federation {options.count}")
            samples = await children[0].expect("latency")
            for kind in ("delegation", "bare"):
                figures[kind] = {
                    "p50": percentile(samples[kind], 0.5),
                    "p99": percentile(samples[kind], 0.99),
                }
            figures["p50_ratio"] = figures["delegation"]["p50"] / figures["bare"]["p50"]
            figures["p99_ratio"] = figures["delegation"]["p99"] / figures["bare"]["p99"]
            for child in children:
                await child.send("stop")
            for child in children:
                await child.process.wait()
        finally:
            for child in children:
                if child.process.returncode is None:
                    child.process.kill()
                with trio.CancelScope(shield=True):
                    await child.process.wait()
    return figures


def report(figures: dict[str, Any], options: argparse.Namespace) -> None:
    shape = (
        "every node delegates and executes"
        if figures["mode"] == "mesh"
        else "n1 delegates, n2-n4 execute"
    )
    print(
        f"federation: {NODES} node processes on {HOST}, {shape}, "
        f"{options.concurrency} concurrent delegations per delegating node, rate_limit=None"
    )
    rate = figures["per_second"]
    verdict = "meets" if rate >= THROUGHPUT_TARGET else "misses"
    print(
        f"  throughput: {figures['delegations']:,} delegations in {figures['window']:.2f} s = "
        f"{rate:,.0f}/s ({verdict} the {THROUGHPUT_TARGET:,}/s target; "
        f"retries {figures['retries']})"
    )
    if "per_cpu_second" in figures:
        print(
            f"  CPU: the 4 processes used {figures['cpu_seconds']:.2f} CPU-s in the window "
            f"(machine: {os.cpu_count()} CPUs, shared): {figures['per_cpu_second']:,.0f} "
            f"delegations per CPU-second, {1e6 / figures['per_cpu_second']:.0f} µs of CPU each"
        )
    print(f"  latency n1 -> n2, {options.count} of each, sequential:")
    print(f"    {'':<26}{'p50 µs':>10}{'p99 µs':>10}")
    for kind, label in (("delegation", "delegate → completed"), ("bare", "bare request/reply")):
        print(
            f"    {label:<26}{figures[kind]['p50'] * 1e6:>10.0f}{figures[kind]['p99'] * 1e6:>10.0f}"
        )
    verdict = "meets" if figures["p50_ratio"] <= P50_TARGET else "misses"
    print(
        f"  delegation / bare: p50 {figures['p50_ratio']:.2f}x ({verdict} the {P50_TARGET}x "
        f"target), p99 {figures['p99_ratio']:.2f}x"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.federation", description=__doc__)
    parser.add_argument("role", nargs="?", default="run", choices=["run", "node"])
    parser.add_argument("--mode", choices=["mesh", "hub"], default="mesh")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--quick", action="store_true", help="a small run for smoke tests")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--profile", type=Path, help="children write cProfile stats here")
    # A child's options:
    parser.add_argument("--id", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--echo-port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--peers", default="", help=argparse.SUPPRESS)
    options = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    if options.role == "node":
        trio.run(run_node, options)
        return 0
    if options.quick:
        options.seconds, options.count, options.concurrency = 0.5, 200, 16
    if options.profile:
        options.profile.mkdir(parents=True, exist_ok=True)
    figures = trio.run(measure, options)
    report(figures, options)
    if options.json:
        options.json.write_text(json.dumps(figures, indent=2))
    return 0 if math.isfinite(figures["per_second"]) else 1


if __name__ == "__main__":
    sys.exit(main())
