"""``python -m bench.registry``: registry query latency and throughput, both backends.

Registers ``--orchestrators`` (default 1,000) orchestrators, each with two to
four of the ten capabilities, one of five regions and random load figures, in
a :class:`~trio_federation.MemoryRegistry` and in a
:class:`~trio_federation.RedisRegistry` on a throwaway ``redis-server`` on
127.0.0.1 (started like the tests start theirs). Then, per backend:

- latency: ``--queries`` sequential queries cycling through a mix (one
  capability; two capabilities; a region; capability + region + statuses +
  minimum free sessions and tokens), p50 and p99;
- throughput: the same mix from ``--concurrency`` tasks at once, queries/s;
- ``list_all`` and ``healthy`` latency (every record), register and heartbeat
  latency.

``--json PATH`` also writes the figures. Exit status 0, or 1 when redis-server
is missing.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import trio

from trio_federation import (
    Capability,
    FederationRegistry,
    MemoryRegistry,
    OrchestratorQuery,
    OrchestratorRecord,
    open_redis_registry,
)

from ._report import percentile

REGIONS = ("eu-west", "eu-central", "us-east", "us-west", "ap-south")
CAPABILITIES = tuple(str(c) for c in Capability)


def _records(count: int, seed: int = 1) -> list[OrchestratorRecord]:
    rng = random.Random(seed)
    records = []
    for i in range(count):
        max_sessions = rng.choice((4, 8, 16, 32))
        token_limit = rng.choice((100_000, 500_000, 1_000_000))
        records.append(
            OrchestratorRecord(
                id=f"orch-{i:05d}",
                capabilities=rng.sample(CAPABILITIES, rng.randint(2, 4)),
                region=rng.choice(REGIONS),
                max_sessions=max_sessions,
                current_sessions=rng.randint(0, max_sessions),
                token_limit=token_limit,
                tokens_used=rng.randint(0, token_limit),
                endpoint=f"ws://127.0.0.1:{20000 + i}/federation",
                metadata={"rack": i % 40},
            )
        )
    return records


def _queries() -> list[OrchestratorQuery]:
    return [
        OrchestratorQuery(capabilities=["testing"]),
        OrchestratorQuery(capabilities=["code-generation", "research"]),
        OrchestratorQuery(region="eu-west"),
        OrchestratorQuery(
            capabilities=["analysis"],
            region="us-east",
            statuses=["online", "busy"],
            min_available_sessions=2,
            min_available_tokens=50_000,
        ),
    ]


async def _timed(operation: Callable[[], Awaitable[object]], count: int) -> list[float]:
    samples = []
    for _ in range(count):
        start = time.perf_counter()
        await operation()
        samples.append(time.perf_counter() - start)
    return samples


def _summary(samples: Sequence[float]) -> dict[str, float]:
    return {
        "p50_ms": percentile(samples, 0.5) * 1000,
        "p99_ms": percentile(samples, 0.99) * 1000,
        "count": len(samples),
    }


async def _measure(
    registry: FederationRegistry, records: list[OrchestratorRecord], queries: int, concurrency: int
) -> dict[str, Any]:
    register = []
    for record in records:
        start = time.perf_counter()
        await registry.register(record)
        register.append(time.perf_counter() - start)
    mix = _queries()
    matched = [len(await registry.query(q)) for q in mix]

    counter = iter(range(10**9))

    async def one_query() -> None:
        await registry.query(mix[next(counter) % len(mix)])

    latency = await _timed(one_query, queries)
    done = 0

    async def worker(count: int) -> None:
        nonlocal done
        for _ in range(count):
            await one_query()
            done += 1

    start = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(concurrency):
            nursery.start_soon(worker, queries // concurrency)
    throughput = done / (time.perf_counter() - start)
    ids = iter(record.id for record in records * 10)

    async def beat() -> None:
        await registry.heartbeat(next(ids), current_sessions=1)

    return {
        "orchestrators": len(await registry.list_all()),
        "matched_per_query": matched,
        "query": _summary(latency),
        "query_throughput_per_s": throughput,
        "list_all": _summary(await _timed(registry.list_all, 50)),
        "healthy": _summary(await _timed(registry.healthy, 50)),
        "register": _summary(register),
        "heartbeat": _summary(await _timed(beat, 500)),
    }


async def _run(args: argparse.Namespace) -> dict[str, Any]:
    records = _records(args.orchestrators)
    results: dict[str, Any] = {}
    print(f"memory: {args.orchestrators:,} orchestrators ...", file=sys.stderr)
    results["memory"] = await _measure(
        MemoryRegistry(heartbeat_timeout=60, stale_timeout=600),
        records,
        args.queries,
        args.concurrency,
    )
    sys.path.insert(0, str(Path(__file__).parent.parent))
    from tests.integration._redis_server import redis_server

    with redis_server() as server:
        print(f"redis ({server.url}): {args.orchestrators:,} orchestrators ...", file=sys.stderr)
        async with open_redis_registry(
            server.url, key_prefix="bench", heartbeat_timeout=60, stale_timeout=600
        ) as registry:
            results["redis"] = await _measure(registry, records, args.queries, args.concurrency)
    return results


def _table(results: dict[str, Any]) -> str:
    lines = [
        f"{'backend':<8} {'query p50':>10} {'query p99':>10} {'queries/s':>10} "
        f"{'list_all p50':>13} {'register p50':>13} {'heartbeat p50':>14}"
    ]
    for name, r in results.items():
        lines.append(
            f"{name:<8} {r['query']['p50_ms']:>8.3f}ms {r['query']['p99_ms']:>8.3f}ms "
            f"{r['query_throughput_per_s']:>10,.0f} {r['list_all']['p50_ms']:>11.3f}ms "
            f"{r['register']['p50_ms']:>11.3f}ms {r['heartbeat']['p50_ms']:>12.3f}ms"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the registry benchmark and print its table."""
    parser = argparse.ArgumentParser(prog="python -m bench.registry", description=__doc__)
    parser.add_argument("--orchestrators", type=int, default=1000)
    parser.add_argument("--queries", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--json", type=Path, metavar="PATH")
    args = parser.parse_args(argv)
    try:
        results = trio.run(_run, args)
    except RuntimeError as exc:  # RedisServerMissing included
        print(f"registry benchmark failed: {exc}", file=sys.stderr)
        return 1
    print()
    print(
        f"registry: {args.orchestrators:,} orchestrators; {args.queries:,} sequential queries "
        f"(mix of 4), then the same from {args.concurrency} concurrent tasks"
    )
    print(_table(results))
    for name, r in results.items():
        print(f"{name}: results per query of the mix: {r['matched_per_query']}")
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
