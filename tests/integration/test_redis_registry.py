"""The Redis registry on a real redis-server: the contract, the daemon's layout, failures."""

from __future__ import annotations

import gc
import json
import re
import runpy
import shutil
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import trio

from trio_federation import (
    OrchestratorNotFound,
    OrchestratorQuery,
    OrchestratorRecord,
    RedisRegistry,
    RegistryUnavailable,
    open_redis_registry,
    open_registry,
)
from trio_federation._registry._redis_registry import _LIB, _ms, _redacted
from trio_federation.testing import REGISTRY_CHECKS, RegistryFactory

from ..conftest import under_ci
from ._redis_server import RedisServer, redis_server
from .conftest import open_test_registry, unique_prefix

GOLDEN = Path(__file__).parent.parent / "golden"
ISO_MS_Z = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


@pytest.mark.parametrize("check", REGISTRY_CHECKS, ids=lambda check: check.__name__)
async def test_redis_contract(
    check: Callable[[RegistryFactory], Any], open_redis_backend: RegistryFactory
) -> None:
    await check(open_redis_backend)


def golden_record() -> OrchestratorRecord:
    raw = json.loads((GOLDEN / "registry_record.json").read_text())
    return OrchestratorRecord(
        id=raw["id"],
        name=raw["name"],
        capabilities=raw["capabilities"],
        region=raw["region"],
        tier=raw["tier"],
        max_sessions=raw["maxSessions"],
        current_sessions=raw["currentSessions"],
        tokens_used=raw["tokensUsed"],
        token_limit=raw["tokenLimit"],
        metadata=raw["metadata"],
        endpoint=raw["endpoint"],
    )


JS_TYPES = {
    "string": lambda v: isinstance(v, str),
    "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    "string[]": lambda v: isinstance(v, list) and all(isinstance(i, str) for i in v),
    "Date": lambda v: isinstance(v, str) and ISO_MS_Z.match(v) is not None,
    "Record<string, unknown>": lambda v: isinstance(v, dict),
}


async def test_golden_our_record_is_the_daemons_metadata(redis: RedisServer) -> None:
    spec = json.loads((GOLDEN / "daemon_registry_metadata.json").read_text())
    golden_text = (GOLDEN / "registry_record.json").read_text().strip()
    golden = json.loads(golden_text)
    async with open_test_registry(redis) as registry:
        stored = await registry.register(golden_record())
        text = await registry.client.get(registry.record_key("orch-py"))
    assert text is not None
    written = json.loads(text)
    # Every field of the daemon's interface, with its type; nothing but our documented additions.
    for key, kind in spec["required"].items():
        assert key in written, key
        if kind == "RegistryOrchestratorStatus":
            assert written[key] in spec["statuses"]
        else:
            assert JS_TYPES[kind](written[key]), (key, kind, written[key])
    for key, kind in spec["optional"].items():
        assert key not in written or JS_TYPES[kind](written[key]), key
    for key, kind in spec["our_additions"].items():
        assert JS_TYPES[kind](written[key]), key
    assert set(written) <= set(spec["required"]) | set(spec["optional"]) | set(
        spec["our_additions"]
    )
    # Byte for byte the golden record, but for the two times the registry stamped.
    assert written["lastHeartbeat"] == written["registeredAt"]
    assert datetime.fromisoformat(written["registeredAt"]) == stored.registered_at
    golden["lastHeartbeat"] = golden["registeredAt"] = written["registeredAt"]
    assert list(written) == list(golden)
    assert text == json.dumps(golden, separators=(",", ":"), ensure_ascii=False)


DAEMON_READER = r"""
// What registry.ts getOrchestratorMetadata does with the text, then a type check.
const metadata = JSON.parse(require('fs').readFileSync(0, 'utf8'));
metadata.lastHeartbeat = new Date(metadata.lastHeartbeat);
metadata.registeredAt = new Date(metadata.registeredAt);
const problems = [];
for (const k of ['id', 'name', 'region', 'tier', 'status'])
  if (typeof metadata[k] !== 'string') problems.push(k);
for (const k of ['maxSessions', 'currentSessions', 'tokensUsed', 'tokenLimit'])
  if (typeof metadata[k] !== 'number') problems.push(k);
if (!Array.isArray(metadata.capabilities)) problems.push('capabilities');
for (const k of ['lastHeartbeat', 'registeredAt'])
  if (isNaN(metadata[k].getTime())) problems.push(k);
const load = metadata.maxSessions > 0 ? metadata.currentSessions / metadata.maxSessions : 0;
const registeredAt = metadata.registeredAt.getTime();
process.stdout.write(JSON.stringify({problems, load, registeredAt}));
"""


async def test_golden_the_daemons_reader_parses_our_record(redis: RedisServer) -> None:
    node = shutil.which("node")
    if node is None:
        if under_ci():
            pytest.fail("CI requires node for the daemon reader check")
        pytest.skip("node is not installed")
    async with open_test_registry(redis) as registry:
        stored = await registry.register(golden_record())
        text = await registry.client.get(registry.record_key("orch-py"))
    assert text is not None
    result = await trio.run_process(
        [node, "-e", DAEMON_READER], stdin=text.encode(), capture_stdout=True
    )
    verdict = json.loads(result.stdout)
    assert verdict["problems"] == []
    assert verdict["load"] == 0.3
    assert verdict["registeredAt"] == stored.registered_at.timestamp() * 1000


async def test_key_layout_is_the_daemons(redis: RedisServer) -> None:
    prefix = unique_prefix()
    async with open_test_registry(
        redis, prefix=prefix, heartbeat_timeout=5, stale_timeout=60
    ) as registry:
        await registry.register(
            OrchestratorRecord(id="a", capabilities=["testing", "research"], region="eu")
        )
        client = registry.client
        keys = sorted([key async for key in client.scan_iter(match=f"{prefix}:*")])
        assert keys == [
            f"{prefix}:federation:capability:research",
            f"{prefix}:federation:capability:testing",
            f"{prefix}:federation:orchestrator:a",
            f"{prefix}:federation:orchestrators",
            f"{prefix}:federation:region:eu",
        ]
        assert await client.smembers(f"{prefix}:federation:capability:testing") == {"a"}
        assert await client.smembers(f"{prefix}:federation:region:eu") == {"a"}
        assert await client.smembers(f"{prefix}:federation:orchestrators") == {"a"}
        # The record is a lease: it expires after stale_timeout unless renewed.
        assert 59_000 < await client.pttl(f"{prefix}:federation:orchestrator:a") <= 60_000
        await client.pexpire(f"{prefix}:federation:orchestrator:a", 1000)
        await registry.heartbeat("a")
        assert await client.pttl(f"{prefix}:federation:orchestrator:a") > 59_000
        await client.pexpire(f"{prefix}:federation:orchestrator:a", 1000)
        await registry.set_status("a", "draining")  # a status change keeps the lease
        assert await client.pttl(f"{prefix}:federation:orchestrator:a") <= 1000
        assert registry.orchestrators_key == f"{prefix}:federation:orchestrators"
        assert registry.region_key("eu") == f"{prefix}:federation:region:eu"


async def test_a_record_the_daemon_wrote_is_read_heartbeat_and_removed(redis: RedisServer) -> None:
    prefix = unique_prefix()
    async with open_test_registry(
        redis, prefix=prefix, heartbeat_timeout=30, stale_timeout=60
    ) as registry:
        client = registry.client
        # registerOrchestrator: SET without expiry (and no endpoint), then the SADDs.
        daemon_json = json.dumps(
            {
                "id": "orch-ts", "name": "TS", "capabilities": ["analysis"], "region": "us",
                "tier": "standard", "maxSessions": 8, "currentSessions": 2, "tokensUsed": 0,
                "tokenLimit": 5000, "status": "online",
                "lastHeartbeat": registry.now().isoformat().replace("+00:00", "Z"),
                "registeredAt": "2026-11-26T12:00:00.000Z",
            }
        )  # fmt: skip
        await client.set(f"{prefix}:federation:orchestrator:orch-ts", daemon_json)
        await client.sadd(f"{prefix}:federation:capability:analysis", ["orch-ts"])
        await client.sadd(f"{prefix}:federation:region:us", ["orch-ts"])
        await client.sadd(f"{prefix}:federation:orchestrators", ["orch-ts"])
        (found,) = await registry.query(OrchestratorQuery(capabilities=["analysis"], region="us"))
        assert (found.id, found.endpoint, found.available_sessions) == ("orch-ts", None, 6)
        assert [r.id for r in await registry.healthy()] == ["orch-ts"]
        assert await client.pttl(f"{prefix}:federation:orchestrator:orch-ts") == -1
        await registry.heartbeat("orch-ts", current_sessions=3)
        assert await client.pttl(f"{prefix}:federation:orchestrator:orch-ts") > 59_000
        assert await registry.deregister("orch-ts")
        assert [key async for key in client.scan_iter(match=f"{prefix}:*")] == []


async def test_expired_index_entries_are_pruned_by_reads(redis: RedisServer) -> None:
    async with open_test_registry(redis, heartbeat_timeout=0.1, stale_timeout=0.2) as registry:
        await registry.register(OrchestratorRecord(id="gone", capabilities=["testing"], region="r"))
        await trio.sleep(0.4)
        client = registry.client
        assert await client.smembers(registry.capability_key("testing")) == {"gone"}
        assert await registry.query(OrchestratorQuery(capabilities=["testing"], region="r")) == []
        assert await client.smembers(registry.capability_key("testing")) == set()
        assert await client.smembers(registry.region_key("r")) == set()
        assert await client.smembers(registry.orchestrators_key) == set()


async def test_two_instances_share_one_registry(redis: RedisServer) -> None:
    prefix = unique_prefix()
    async with (
        open_test_registry(redis, prefix=prefix, heartbeat_timeout=1, stale_timeout=5) as first,
        open_test_registry(redis, prefix=prefix, heartbeat_timeout=1, stale_timeout=5) as second,
    ):
        assert first.client is not second.client
        with second.watch() as events:
            await first.register(OrchestratorRecord(id="orch-a", capabilities=["testing"]))
            with trio.fail_after(5):
                event = await events.__anext__()  # seen by polling: no local write woke it
            assert (event.type, event.orchestrator_id) == ("registered", "orch-a")

        async def beat(registry: RedisRegistry, i: int) -> None:
            await registry.heartbeat("orch-a", current_sessions=i, tokens_used=7 * i)

        async def move(registry: RedisRegistry, i: int) -> None:
            caps = ["research"] if i % 2 else ["security"]
            await registry.register(OrchestratorRecord(id="orch-b", capabilities=caps))

        async with trio.open_nursery() as nursery:
            for i in range(1, 31):
                nursery.start_soon(beat, first if i % 2 else second, i)
                nursery.start_soon(move, second if i % 2 else first, i)
        record = await second.get("orch-a")
        assert record is not None and record.tokens_used == 7 * record.current_sessions > 0
        moved = await first.get("orch-b")
        assert moved is not None
        (cap,) = moved.capabilities
        other = "security" if cap == "research" else "research"
        assert [r.id for r in await second.query(OrchestratorQuery(capabilities=[cap]))] == [
            "orch-b"
        ]
        assert await second.query(OrchestratorQuery(capabilities=[other])) == []


async def test_malformed_records_are_skipped(
    redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    async with open_test_registry(redis) as registry:
        good = await registry.register(OrchestratorRecord(id="good"))
        await registry.client.set(registry.record_key("bad"), '{"id": "bad"}')
        await registry.client.sadd(registry.orchestrators_key, ["bad"])
        assert await registry.list_all() == [good]
        assert await registry.get("bad") is None
        assert "ignoring the malformed record" in caplog.text


@pytest.mark.filterwarnings("ignore::ResourceWarning")
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
async def test_an_unreachable_server_raises_registry_unavailable(redis: RedisServer) -> None:
    with redis_server() as private:
        async with open_redis_registry(
            private.url, connect_timeout=1, stream_timeout=1
        ) as registry:
            await registry.register(OrchestratorRecord(id="a"))
            private.process.kill()
            private.process.wait()
            for operation in (
                registry.list_all(),
                registry.get("a"),
                registry.register(OrchestratorRecord(id="b")),
                registry.heartbeat("a"),
                registry.deregister("a"),
            ):
                with pytest.raises(RegistryUnavailable):
                    await operation
    with pytest.raises(RegistryUnavailable, match=r"cannot reach redis://\*\*\*@127.0.0.1"):
        async with open_redis_registry(
            f"redis://:secret@127.0.0.1:{private.port}/0", connect_timeout=1
        ):
            pass  # pragma: no cover
    gc.collect()  # coredis leaves an anyio stream unclosed on a failed connect


async def test_open_registry_switches_to_redis_by_url(redis: RedisServer) -> None:
    prefix = unique_prefix()
    async with open_registry(redis.url, key_prefix=prefix, heartbeat_timeout=1, stale_timeout=2,
                             connect_timeout=2, stream_timeout=2) as registry:  # fmt: skip
        assert isinstance(registry, RedisRegistry)
        assert registry.key_prefix == prefix
        await registry.register(OrchestratorRecord(id="a"))
        assert [r.id for r in await registry.list_all()] == ["a"]
        await registry.deregister("a")
    async with open_registry(redis.url) as registry:
        assert isinstance(registry, RedisRegistry) and registry.key_prefix == "orchestrator"


async def test_an_error_in_the_block_leaves_as_itself(redis: RedisServer) -> None:
    with pytest.raises(KeyError, match="mine"):
        async with open_redis_registry(redis.url):
            raise KeyError("mine")


def test_urls_are_logged_without_password() -> None:
    assert _redacted("redis://:pw@h:1/0") == "redis://***@h:1/0"
    assert _redacted("redis://h:1/0") == "redis://h:1/0"


def test_the_server_fixture_cleans_up(redis: RedisServer) -> None:
    with redis_server() as server:
        directory = server.directory
        assert directory.exists()
    assert server.process.returncode is not None
    assert not directory.exists()


def readme_registry_example() -> str:
    readme = (Path(__file__).parent.parent.parent / "README.md").read_text()
    blocks: list[str] = re.findall(r"```python\n(.*?)```", readme, re.S)
    (block,) = [b for b in blocks if "REGISTRY_URL" in b]
    return block


@pytest.mark.parametrize("backend", ["memory", "redis"])
def test_readme_registry_example_runs_on_both_backends(
    backend: str, redis: RedisServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    block = readme_registry_example()
    assert 'REGISTRY_URL = "memory://"' in block
    if backend == "redis":
        block = block.replace('"memory://"', f'"{redis.url}"')
    script = tmp_path / "readme_registry.py"
    script.write_text(block)
    runpy.run_path(str(script), run_name="__main__")
    assert capsys.readouterr().out == "found orch-b at ws://127.0.0.1:8788/federation\n"


async def test_connection_failures_inside_groups_are_translated(redis: RedisServer) -> None:
    async with open_test_registry(redis) as registry:
        with pytest.raises(RegistryUnavailable, match="op: refused"):
            with registry._guard("op"):
                raise ExceptionGroup("pool", [ConnectionRefusedError("refused")])
        with pytest.raises(ExceptionGroup):
            with registry._guard("op"):
                raise ExceptionGroup("pool", [ConnectionRefusedError("x"), ValueError("y")])


async def test_an_update_gives_up_under_endless_contention(
    redis: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    import trio_federation._registry._redis_registry as backend

    async with open_test_registry(redis) as registry:
        await registry.register(OrchestratorRecord(id="a"))
        original = registry._cas_script

        def always_conflicting(*, keys: list[str], args: list[str]) -> Any:
            # Another writer changes the record between our read and our write, every time.
            return original(keys=keys, args=["not what was read", *args[1:]])

        monkeypatch.setattr(registry, "_cas_script", always_conflicting)
        monkeypatch.setattr(backend, "MAX_UPDATE_ATTEMPTS", 5)
        with pytest.raises(RegistryUnavailable, match="gave up updating 'a': 5 concurrent"):
            await registry.heartbeat("a")


async def test_a_record_that_expires_during_an_update_is_not_found(
    redis: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with open_test_registry(redis) as registry:
        await registry.register(OrchestratorRecord(id="a"))
        original = registry._cas_script

        async def expire_first(*, keys: list[str], args: list[str]) -> Any:
            await registry.client.delete(keys)  # its lease ran out between read and write
            return await original(keys=keys, args=args)

        monkeypatch.setattr(registry, "_cas_script", expire_first)
        with pytest.raises(OrchestratorNotFound):
            await registry.set_status("a", "busy")


@pytest.mark.parametrize(
    "text",
    [
        "1970-01-01T00:00:00.000Z",
        "2000-02-29T23:59:59.999Z",
        "2024-03-01T00:00:00.001Z",
        "2026-11-26T12:00:00.000Z",
        "2100-12-31T01:02:03.456Z",
    ],
)
async def test_the_scripts_read_iso_dates_as_python_does(redis: RedisServer, text: str) -> None:
    """The lease a script restores is ``lastHeartbeat + leaseMs``: its date parsing is exact."""
    async with open_test_registry(redis) as registry:
        parsed: object = await registry.client.eval(
            _LIB + "return {tostring(iso_ms(ARGV[1])), tostring(iso_ms('2026-1-1'))}",
            keys=[],
            args=[text],
        )
    assert parsed == [_ms(datetime.fromisoformat(text)), "nil"]
