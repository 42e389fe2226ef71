"""The Redis backend of :class:`~trio_federation.FederationRegistry`, through coredis.

coredis is imported lazily (``pip install 'trio-federation[redis]'``), so the
package works without it. The key layout and the JSON record are the
TypeScript daemon's (``registry.ts``)::

    {prefix}:federation:orchestrator:{id}   JSON record (camelCase, ISO dates), PX lease
    {prefix}:federation:capability:{cap}    set of ids
    {prefix}:federation:region:{region}     set of ids
    {prefix}:federation:orchestrators       set of every id

Additions a daemon reader does not see: the record's ``endpoint`` field (its
``JSON.parse`` keeps unknown fields) and the key's expiry (a lease renewed by
every heartbeat, so a dead orchestrator disappears without any janitor).
Writes that touch several keys run as Lua scripts (atomic); updates of one
record are compare-and-set on its JSON text, retried on conflict. Reads run a
script that drops index entries whose record has expired, in the same atomic
step, so a query never returns a vanished orchestrator and never races a
re-registration. The scripts compute key names from ids, so this backend
needs a single Redis server (not Redis Cluster), as the daemon's layout does.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import AsyncIterator, Iterator, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final

import attrs

from ._registry import (
    DEFAULT_HEARTBEAT_TIMEOUT,
    DEFAULT_STALE_TIMEOUT,
    FederationRegistry,
    OrchestratorNotFound,
    OrchestratorQuery,
    OrchestratorRecord,
    OrchestratorStatus,
    RegistryUnavailable,
    _beat,
    _raise_single,
    _utc_ms,
    decode_record,
    encode_record,
)

if TYPE_CHECKING:
    import coredis
    import coredis.commands

__all__ = ["DEFAULT_KEY_PREFIX", "MAX_UPDATE_ATTEMPTS", "RedisRegistry", "open_redis_registry"]

logger = logging.getLogger("trio_federation.registry")

DEFAULT_KEY_PREFIX: Final = "orchestrator"
"""The default ``{prefix}`` of every key (the daemon's ``redis.keyPrefix`` must match)."""
MAX_UPDATE_ATTEMPTS: Final = 100
"""Compare-and-set attempts of one update before it gives up under contention."""
DEFAULT_REDIS_TIMEOUT: Final = 5.0
"""Seconds to connect, and to wait for one reply."""

# Shared by the scripts below: drop the index entries (capability and region
# sets) of the record at ``key``, if any; returns the record's text or false.
_UNINDEX: Final = """
local function unindex(key, base, id)
  local old = redis.call('GET', key)
  if not old then return false end
  local ok, rec = pcall(cjson.decode, old)
  if ok and type(rec) == 'table' then
    if type(rec.capabilities) == 'table' then
      for _, cap in ipairs(rec.capabilities) do
        if type(cap) == 'string' then redis.call('SREM', base .. 'capability:' .. cap, id) end
      end
    end
    if type(rec.region) == 'string' then redis.call('SREM', base .. 'region:' .. rec.region, id) end
  end
  return old
end
"""

# KEYS[1] record, KEYS[2] the set of all ids.
# ARGV: json, lease ms, id, key base ("{prefix}:federation:"), region, capabilities...
_REGISTER: Final = (
    _UNINDEX
    + """
local base, id = ARGV[4], ARGV[3]
unindex(KEYS[1], base, id)
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
for i = 6, #ARGV do redis.call('SADD', base .. 'capability:' .. ARGV[i], id) end
redis.call('SADD', base .. 'region:' .. ARGV[5], id)
redis.call('SADD', KEYS[2], id)
return 1
"""
)

# KEYS[1] record, KEYS[2] the set of all ids. ARGV: id, key base.
_DEREGISTER: Final = (
    _UNINDEX
    + """
local id, base = ARGV[1], ARGV[2]
redis.call('SREM', KEYS[2], id)
if not unindex(KEYS[1], base, id) then return 0 end
redis.call('DEL', KEYS[1])
return 1
"""
)

# KEYS[1] record. ARGV: the JSON read, the JSON to write, lease ms ('' keeps the TTL).
_COMPARE_AND_SET: Final = """
local current = redis.call('GET', KEYS[1])
if not current then return -1 end
if current ~= ARGV[1] then return 0 end
if ARGV[3] == '' then
  redis.call('SET', KEYS[1], ARGV[2], 'KEEPTTL')
else
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
end
return 1
"""

# KEYS: index sets, all of which an id must be in. ARGV[1]: record key prefix.
# Returns the records; drops from these sets every id whose record is gone.
_SELECT: Final = """
local ids
if #KEYS == 1 then
  ids = redis.call('SMEMBERS', KEYS[1])
else
  ids = redis.call('SINTER', unpack(KEYS))
end
local found = {}
for _, id in ipairs(ids) do
  local record = redis.call('GET', ARGV[1] .. id)
  if record then
    found[#found + 1] = record
  else
    for i = 1, #KEYS do redis.call('SREM', KEYS[i], id) end
  end
end
return found
"""


class RedisRegistry(FederationRegistry):
    """A registry in Redis, shared with other processes and with the TypeScript daemon.

    Usually made by :func:`open_redis_registry` (or :func:`open_registry` with a
    ``redis://`` URL). Constructed directly, it wraps an entered
    ``coredis.Redis`` client made with ``decode_responses=True``, which the
    caller keeps and closes. Its clock is this machine's UTC wall clock, so
    the machines of a federation should keep theirs in sync (NTP); record
    expiry runs on the Redis server's clock. Other arguments as
    :class:`~trio_federation.FederationRegistry`, and:

    Args:
        client: the coredis client.
        key_prefix: the ``{prefix}`` of every key.
    """

    def __init__(
        self,
        client: coredis.Redis[str],
        *,
        key_prefix: str = DEFAULT_KEY_PREFIX,
        heartbeat_timeout: float = DEFAULT_HEARTBEAT_TIMEOUT,
        stale_timeout: float = DEFAULT_STALE_TIMEOUT,
        watch_interval: float | None = None,
    ) -> None:
        super().__init__(
            heartbeat_timeout=heartbeat_timeout,
            stale_timeout=stale_timeout,
            watch_interval=watch_interval,
        )
        import coredis.exceptions

        self.client = client
        """The coredis client."""
        self.key_prefix = key_prefix
        """The ``{prefix}`` of every key."""
        self._base = f"{key_prefix}:federation:"
        self._all = f"{self._base}orchestrators"
        self._lease_ms = str(math.ceil(stale_timeout * 1000))
        self._unavailable: tuple[type[BaseException], ...] = (
            coredis.exceptions.ConnectionError,
            TimeoutError,
            OSError,
        )
        self._register_script = client.register_script(_REGISTER)
        self._deregister_script = client.register_script(_DEREGISTER)
        self._cas_script = client.register_script(_COMPARE_AND_SET)
        self._select_script = client.register_script(_SELECT)

    # -- keys --

    def record_key(self, orchestrator_id: str) -> str:
        """``{prefix}:federation:orchestrator:{id}``."""
        return f"{self._base}orchestrator:{orchestrator_id}"

    def capability_key(self, capability: str) -> str:
        """``{prefix}:federation:capability:{capability}``."""
        return f"{self._base}capability:{capability}"

    def region_key(self, region: str) -> str:
        """``{prefix}:federation:region:{region}``."""
        return f"{self._base}region:{region}"

    @property
    def orchestrators_key(self) -> str:
        """``{prefix}:federation:orchestrators``, the set of every id."""
        return self._all

    # -- plumbing --

    @contextlib.contextmanager
    def _guard(self, what: str) -> Iterator[None]:
        """Turn the client's connection failures into :exc:`RegistryUnavailable`."""
        try:
            yield
        except BaseExceptionGroup as group:
            matched, rest = group.split(self._unavailable)
            if matched is None or rest is not None:
                raise
            first: BaseException = matched
            while isinstance(first, BaseExceptionGroup):
                first = first.exceptions[0]
            raise RegistryUnavailable(f"{what}: {first}") from group
        except self._unavailable as exc:
            raise RegistryUnavailable(f"{what}: {exc}") from exc

    def _decode(self, raw: str, where: str) -> OrchestratorRecord | None:
        try:
            return decode_record(raw)
        except ValueError as exc:
            logger.warning("ignoring the malformed record at %s: %s", where, exc)
            return None

    async def _select(self, keys: Sequence[str]) -> list[OrchestratorRecord]:
        with self._guard("query"):
            raw: object = await self._select_script(keys=keys, args=[self.record_key("")])
        assert isinstance(raw, list)
        now = self.now()
        records = [self._decode(str(item), "a query result") for item in raw]
        return sorted(
            (self._present(record, now) for record in records if record is not None),
            key=lambda record: record.id,
        )

    async def _update(
        self,
        orchestrator_id: str,
        change: Any,
        *,
        renew: bool,
    ) -> tuple[OrchestratorRecord, OrchestratorRecord]:
        """Compare-and-set loop: ``change(record, now)`` gives the new record."""
        key = self.record_key(orchestrator_id)
        for _attempt in range(MAX_UPDATE_ATTEMPTS):
            with self._guard("update"):
                raw = await self.client.get(key)
            record = None if raw is None else self._decode(raw, key)
            if record is None or raw is None:
                raise OrchestratorNotFound(orchestrator_id)
            now = self.now()
            new = change(record, now)
            with self._guard("update"):
                result: object = await self._cas_script(
                    keys=[key], args=[raw, encode_record(new), self._lease_ms if renew else ""]
                )
            if result == 1:
                return record, new
            if result == -1:
                raise OrchestratorNotFound(orchestrator_id)
        raise RegistryUnavailable(
            f"gave up updating {orchestrator_id!r}: {MAX_UPDATE_ATTEMPTS} concurrent"
            " changes in a row"
        )

    # -- the interface --

    def now(self) -> datetime:
        return _utc_ms(datetime.now(UTC))

    async def register(self, record: OrchestratorRecord) -> OrchestratorRecord:
        now = self.now()
        stored = attrs.evolve(record, last_heartbeat=now, registered_at=now)
        with self._guard("register"):
            await self._register_script(
                keys=[self.record_key(record.id), self._all],
                args=[
                    encode_record(stored),
                    self._lease_ms,
                    record.id,
                    self._base,
                    record.region,
                    *record.capabilities,
                ],
            )
        self._notify()
        logger.debug("registered %r", record.id)
        return stored

    async def deregister(self, orchestrator_id: str) -> bool:
        with self._guard("deregister"):
            removed: object = await self._deregister_script(
                keys=[self.record_key(orchestrator_id), self._all],
                args=[orchestrator_id, self._base],
            )
        if removed == 1:
            self._notify()
            logger.debug("deregistered %r", orchestrator_id)
        return removed == 1

    async def heartbeat(
        self,
        orchestrator_id: str,
        *,
        current_sessions: int | None = None,
        tokens_used: int | None = None,
        status: OrchestratorStatus | str | None = None,
    ) -> OrchestratorRecord:
        old, new = await self._update(
            orchestrator_id,
            lambda record, now: _beat(record, now, current_sessions, tokens_used, status),
            renew=True,
        )
        if new.status != self._present(old, self.now()).status:
            self._notify()
        return new

    async def set_status(
        self, orchestrator_id: str, status: OrchestratorStatus | str
    ) -> OrchestratorRecord:
        _old, new = await self._update(
            orchestrator_id,
            lambda record, now: attrs.evolve(record, status=status),
            renew=False,
        )
        self._notify()
        return self._present(new, self.now())

    async def get(self, orchestrator_id: str) -> OrchestratorRecord | None:
        key = self.record_key(orchestrator_id)
        with self._guard("get"):
            raw = await self.client.get(key)
        record = None if raw is None else self._decode(raw, key)
        return None if record is None else self._present(record, self.now())

    async def list_all(self) -> list[OrchestratorRecord]:
        return await self._select([self._all])

    async def query(self, query: OrchestratorQuery) -> list[OrchestratorRecord]:
        """The orchestrators that match ``query``, read through the capability and region sets."""
        keys = [self._all, *(self.capability_key(cap) for cap in dict.fromkeys(query.capabilities))]
        if query.region is not None:
            keys.append(self.region_key(query.region))
        return [record for record in await self._select(keys) if query.matches(record)]


@contextlib.asynccontextmanager
async def open_redis_registry(
    url: str = "redis://127.0.0.1:6379/0",
    *,
    key_prefix: str = DEFAULT_KEY_PREFIX,
    heartbeat_timeout: float = DEFAULT_HEARTBEAT_TIMEOUT,
    stale_timeout: float = DEFAULT_STALE_TIMEOUT,
    watch_interval: float | None = None,
    connect_timeout: float = DEFAULT_REDIS_TIMEOUT,
    stream_timeout: float = DEFAULT_REDIS_TIMEOUT,
) -> AsyncIterator[RedisRegistry]:
    """Connect to Redis and yield a :class:`RedisRegistry` on it.

    ``url`` names the server: ``redis://[[user]:password@]host[:port][/db]``,
    ``rediss://`` for TLS, ``unix:///path/to/socket?db=0``. ``connect_timeout``
    bounds connecting and ``stream_timeout`` each reply (seconds). Entering
    connects and checks the server with a ``PING``; leaving closes the
    connections (records stay until they expire). An exception from the block
    leaves as itself. Other arguments as :class:`RedisRegistry`.

    Raises:
        ImportError: coredis is not installed (the ``redis`` extra).
        RegistryUnavailable: the server cannot be reached.
    """
    try:
        import coredis
    except ImportError as exc:  # pragma: no cover - the tests run with the extra
        raise ImportError(
            "the Redis registry needs coredis: pip install 'trio-federation[redis]'"
        ) from exc
    client: coredis.Redis[str] = coredis.Redis.from_url(
        url,
        decode_responses=True,
        connect_timeout=connect_timeout,
        stream_timeout=stream_timeout,
    )
    registry = RedisRegistry(
        client,
        key_prefix=key_prefix,
        heartbeat_timeout=heartbeat_timeout,
        stale_timeout=stale_timeout,
        watch_interval=watch_interval,
    )
    where = f"cannot reach {_redacted(url)}"
    try:
        async with contextlib.AsyncExitStack() as stack:
            with registry._guard(where):
                await stack.enter_async_context(client)
                await client.ping()
            yield registry
    except BaseExceptionGroup as group:
        with registry._guard(where):
            _raise_single(group)


def _redacted(url: str) -> str:
    """``url`` without its password."""
    scheme, sep, rest = url.partition("://")
    credentials, at, location = rest.rpartition("@")
    return f"{scheme}{sep}***@{location}" if at and credentials else url
