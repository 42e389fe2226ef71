"""The Redis backend of :class:`~trio_federation.FederationRegistry`, through coredis.

coredis is imported lazily (``pip install 'trio-federation[redis]'``), so the
package works without it. The key layout and the JSON record are the
TypeScript daemon's (``registry.ts``)::

    {prefix}:federation:orchestrator:{id}   JSON record (camelCase, ISO dates), PX lease
    {prefix}:federation:capability:{cap}    set of ids
    {prefix}:federation:region:{region}     set of ids
    {prefix}:federation:orchestrators       set of every id

Additions a daemon reader does not see: the record's ``endpoint`` and
``leaseMs`` fields (its ``JSON.parse`` keeps unknown fields, and its updates
write them back) and the key's expiry (a lease renewed by every heartbeat, so
a dead orchestrator disappears without any janitor). The daemon's plain
``SET`` removes that expiry: every script that reads a record with
``leaseMs`` and no expiry gives it back (``lastHeartbeat + leaseMs``), or
deletes the record and its index entries once that time has passed; and our
readers treat any record whose last heartbeat is ``stale_timeout`` old as gone.
Writes that touch several keys run as Lua scripts (atomic); updates of one
record are compare-and-set on its JSON text, retried on conflict. Writes and
reads sweep the index sets they touch of ids whose record is gone, in the same
atomic step, so a query never returns a vanished orchestrator, never races a
re-registration, and daemon readers of the sets see a dead id only until our
next operation on that set. Registration keeps the ``registeredAt`` of the
record it replaces. The scripts compute key names from ids, so this backend
needs a single Redis server (not Redis Cluster), as the daemon's layout does.
See "Sharing Redis with the daemon" in docs/registry.rst.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import AsyncIterator, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Final

import attrs
import orjson

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
    _iso,
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


def _describe(error: BaseException) -> str:
    """``error``'s text, or its type's name when it has none (anyio's errors)."""
    return str(error) or type(error).__name__


DEFAULT_KEY_PREFIX: Final = "orchestrator"
"""The default ``{prefix}`` of every key (the daemon's ``redis.keyPrefix`` must match)."""
MAX_UPDATE_ATTEMPTS: Final = 100
"""Compare-and-set attempts of one update before it gives up under contention."""
DEFAULT_REDIS_TIMEOUT: Final = 5.0
"""Seconds to connect, and to wait for one reply."""

# Shared by the scripts below. ``base`` is "{prefix}:federation:", ``now`` the
# client's clock in Unix ms (the clock that stamps lastHeartbeat).
_LIB: Final = """
-- Date.prototype.toISOString text ("2026-11-26T12:00:00.000Z") to Unix ms, else nil.
local function iso_ms(s)
  if type(s) ~= 'string' then return nil end
  local y, mo, d, h, mi, sec, ms = string.match(
    s, '^(%d%d%d%d)%-(%d%d)%-(%d%d)T(%d%d):(%d%d):(%d%d)%.(%d%d%d)Z$')
  if not y then return nil end
  y, mo = tonumber(y), tonumber(mo)
  if mo <= 2 then y = y - 1 end
  local era = math.floor(y / 400)
  local yoe = y - era * 400
  local doy = math.floor((153 * ((mo + 9) % 12) + 2) / 5) + tonumber(d) - 1
  local days = era * 146097 + yoe * 365 + math.floor(yoe / 4) - math.floor(yoe / 100) + doy
    - 719468
  return ((days * 24 + tonumber(h)) * 60 + tonumber(mi)) * 60000
    + tonumber(sec) * 1000 + tonumber(ms)
end

local function decode(text)
  local ok, rec = pcall(cjson.decode, text)
  if ok and type(rec) == 'table' then return rec end
  return nil
end

-- Whether the decoded record's last heartbeat is at least stale ms old.
local function is_stale(rec, now, stale)
  local hb = iso_ms(rec.lastHeartbeat)
  return hb ~= nil and hb + stale <= now
end

-- Drop the capability and region entries of id, as the decoded record lists them.
local function unindex(rec, base, id)
  if type(rec.capabilities) == 'table' then
    for _, cap in ipairs(rec.capabilities) do
      if type(cap) == 'string' then redis.call('SREM', base .. 'capability:' .. cap, id) end
    end
  end
  if type(rec.region) == 'string' then redis.call('SREM', base .. 'region:' .. rec.region, id) end
end

-- The record text of id, or false if there is none. A record of ours
-- (leaseMs) whose expiry a plain SET removed gets it back: lastHeartbeat +
-- leaseMs; one already past it is deleted with all its index entries.
local function live(base, id, now)
  local key = base .. 'orchestrator:' .. id
  local ttl = redis.call('PTTL', key)
  if ttl == -2 then return false end
  local text = redis.call('GET', key)
  if ttl ~= -1 then return text end
  local rec = decode(text)
  if rec == nil or type(rec.leaseMs) ~= 'number' then return text end
  local hb = iso_ms(rec.lastHeartbeat)
  if hb == nil then return text end
  local left = math.ceil(hb + rec.leaseMs - now)
  if left > 0 then
    redis.call('PEXPIRE', key, left)
    return text
  end
  unindex(rec, base, id)
  redis.call('SREM', base .. 'orchestrators', id)
  redis.call('DEL', key)
  return false
end

-- Drop from the set (and from the set of all ids) every id whose record key is
-- gone: one EXISTS per 500 ids, then one per id only in a batch with gone ones.
local function sweep(set, base)
  local ids = redis.call('SMEMBERS', set)
  for first = 1, #ids, 500 do
    local keys = {}
    for i = first, math.min(first + 499, #ids) do
      keys[#keys + 1] = base .. 'orchestrator:' .. ids[i]
    end
    if redis.call('EXISTS', unpack(keys)) < #keys then
      for j, key in ipairs(keys) do
        if redis.call('EXISTS', key) == 0 then
          redis.call('SREM', set, ids[first + j - 1])
          redis.call('SREM', base .. 'orchestrators', ids[first + j - 1])
        end
      end
    end
  end
end

-- The index sets of a decoded record, with the set of all ids.
local function index_sets(rec, base)
  local sets = {base .. 'orchestrators'}
  if type(rec.capabilities) == 'table' then
    for _, cap in ipairs(rec.capabilities) do
      if type(cap) == 'string' then sets[#sets + 1] = base .. 'capability:' .. cap end
    end
  end
  if type(rec.region) == 'string' then sets[#sets + 1] = base .. 'region:' .. rec.region end
  return sets
end
"""

# KEYS[1] record, KEYS[2] the set of all ids.
# ARGV: json, lease ms, id, key base, region, now ms, stale ms, the json's registeredAt,
# capabilities... Returns the registeredAt stored: the replaced record's unless
# it is gone or stale.
_REGISTER: Final = (
    _LIB
    + """
local base, id, now = ARGV[4], ARGV[3], tonumber(ARGV[6])
local text, stamped = ARGV[1], ARGV[8]
local registered = stamped
local old = live(base, id, now)
if old then
  local rec = decode(old)
  if rec ~= nil then
    if iso_ms(rec.registeredAt) and not is_stale(rec, now, tonumber(ARGV[7])) then
      registered = rec.registeredAt
    end
    unindex(rec, base, id)
  end
end
if registered ~= stamped then
  local field = '"registeredAt":"'
  local i, j = string.find(text, field .. stamped .. '"', 1, true)
  text = string.sub(text, 1, i - 1) .. field .. registered .. '"' .. string.sub(text, j + 1)
end
redis.call('SET', KEYS[1], text, 'PX', ARGV[2])
local sets = {KEYS[2], base .. 'region:' .. ARGV[5]}
for i = 9, #ARGV do sets[#sets + 1] = base .. 'capability:' .. ARGV[i] end
for _, set in ipairs(sets) do redis.call('SADD', set, id) end
for _, set in ipairs(sets) do sweep(set, base) end
return registered
"""
)

# KEYS[1] record, KEYS[2] the set of all ids. ARGV: id, key base, now ms, stale ms.
# Returns 1 if a live record was removed, 0 if there was none or only a stale one.
_DEREGISTER: Final = (
    _LIB
    + """
local id, base, now = ARGV[1], ARGV[2], tonumber(ARGV[3])
redis.call('SREM', KEYS[2], id)
local old = live(base, id, now)
if not old then return 0 end
redis.call('DEL', KEYS[1])
local rec = decode(old)
if rec == nil then return 1 end
unindex(rec, base, id)
for _, set in ipairs(index_sets(rec, base)) do sweep(set, base) end
if is_stale(rec, now, tonumber(ARGV[4])) then return 0 end
return 1
"""
)

# ARGV: id, key base, now ms. The record's text, or false (see live()).
_READ: Final = (
    _LIB
    + """
return live(ARGV[2], ARGV[1], tonumber(ARGV[3]))
"""
)

# KEYS[1] record. ARGV: the JSON read, the JSON to write, lease ms ('' keeps the
# expiry: the lease a record of ours already has, or back from its leaseMs),
# id, key base, now ms. Then sweeps the record's index sets.
_COMPARE_AND_SET: Final = (
    _LIB
    + """
local current = redis.call('GET', KEYS[1])
if not current then return -1 end
if current ~= ARGV[1] then return 0 end
local id, base, now = ARGV[4], ARGV[5], tonumber(ARGV[6])
if ARGV[3] == '' then
  redis.call('SET', KEYS[1], ARGV[2], 'KEEPTTL')
  if not live(base, id, now) then return -1 end
else
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
end
local rec = decode(ARGV[2])
if rec ~= nil then
  for _, set in ipairs(index_sets(rec, base)) do
    if set ~= base .. 'orchestrators' then sweep(set, base) end
  end
end
return 1
"""
)

# KEYS: the set of all ids, then the index sets an id must also be in. ARGV: key
# base, now ms. Sweeps the index sets (the set of all ids when it is alone),
# then returns the records of the ids in all of them (see live()); an id whose
# record is gone leaves these sets.
_SELECT: Final = (
    _LIB
    + """
local base, now = ARGV[1], tonumber(ARGV[2])
local ids
if #KEYS == 1 then
  sweep(KEYS[1], base)
  ids = redis.call('SMEMBERS', KEYS[1])
else
  for i = 2, #KEYS do sweep(KEYS[i], base) end
  ids = redis.call('SINTER', unpack(KEYS))
end
local found = {}
for _, id in ipairs(ids) do
  local record = live(base, id, now)
  if record then
    found[#found + 1] = record
  else
    for i = 1, #KEYS do redis.call('SREM', KEYS[i], id) end
  end
end
return found
"""
)


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
        import anyio
        import coredis.exceptions

        self.client = client
        """The coredis client."""
        self.key_prefix = key_prefix
        """The ``{prefix}`` of every key."""
        self._base = f"{key_prefix}:federation:"
        self._all = f"{self._base}orchestrators"
        self._lease = math.ceil(stale_timeout * 1000)
        self._lease_ms = str(self._lease)
        self._stale_ms = str(stale_timeout * 1000)
        self._unavailable: tuple[type[BaseException], ...] = (
            coredis.exceptions.ConnectionError,
            TimeoutError,
            OSError,
            # A command issued on a connection coredis has just torn down (its
            # own tasks cancelled, say) fails on its anyio stream before any
            # network error can be raised.
            anyio.ClosedResourceError,
            anyio.BrokenResourceError,
            anyio.EndOfStream,
        )
        self._register_script = client.register_script(_REGISTER)
        self._deregister_script = client.register_script(_DEREGISTER)
        self._cas_script = client.register_script(_COMPARE_AND_SET)
        self._read_script = client.register_script(_READ)
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
            raise RegistryUnavailable(f"{what}: {_describe(first)}") from group
        except self._unavailable as exc:
            raise RegistryUnavailable(f"{what}: {_describe(exc)}") from exc

    def _decode(self, raw: str, where: str) -> OrchestratorRecord | None:
        try:
            return decode_record(raw)
        except ValueError as exc:
            logger.warning("ignoring the malformed record at %s: %s", where, exc)
            return None

    def _gone(self, record: OrchestratorRecord, now: datetime) -> bool:
        """Whether ``record`` counts as gone: its last heartbeat is ``stale_timeout`` old.

        Such a record is still in Redis when no expiry guards it: the daemon
        wrote it, or rewrote one of ours with a plain ``SET``.
        """
        return (now - record.last_heartbeat).total_seconds() >= self.stale_timeout

    async def _select(self, keys: Sequence[str]) -> list[OrchestratorRecord]:
        now = self.now()
        with self._guard("query"):
            raw: object = await self._select_script(keys=keys, args=[self._base, _ms(now)])
        assert isinstance(raw, list)
        records = [self._decode(str(item), "a query result") for item in raw]
        return sorted(
            (
                self._present(record, now)
                for record in records
                if record is not None and not self._gone(record, now)
            ),
            key=lambda record: record.id,
        )

    async def _read(self, orchestrator_id: str, now: datetime) -> str | None:
        """The record's text (its lease restored if a plain ``SET`` removed it), or None."""
        with self._guard("read"):
            raw: object = await self._read_script(
                keys=[self.record_key(orchestrator_id)],
                args=[orchestrator_id, self._base, _ms(now)],
            )
        return None if raw is None else str(raw)

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
            now = self.now()
            raw = await self._read(orchestrator_id, now)
            record = None if raw is None else self._decode(raw, key)
            if record is None or raw is None or self._gone(record, now):
                raise OrchestratorNotFound(orchestrator_id)
            new = change(record, now)
            # A heartbeat puts the record under our lease; a status change keeps its owner's.
            lease = self._lease if renew else _lease_of(raw)
            with self._guard("update"):
                result: object = await self._cas_script(
                    keys=[key],
                    args=[
                        raw,
                        encode_record(new, lease),
                        self._lease_ms if renew else "",
                        orchestrator_id,
                        self._base,
                        _ms(now),
                    ],
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
            registered_at: object = await self._register_script(
                keys=[self.record_key(record.id), self._all],
                args=[
                    encode_record(stored, self._lease),
                    self._lease_ms,
                    record.id,
                    self._base,
                    record.region,
                    _ms(now),
                    self._stale_ms,
                    _iso(now),
                    *record.capabilities,
                ],
            )
        if registered_at != _iso(now):
            stored = attrs.evolve(stored, registered_at=datetime.fromisoformat(str(registered_at)))
        self._notify()
        logger.debug("registered %r", record.id)
        return stored

    async def deregister(self, orchestrator_id: str) -> bool:
        with self._guard("deregister"):
            removed: object = await self._deregister_script(
                keys=[self.record_key(orchestrator_id), self._all],
                args=[orchestrator_id, self._base, _ms(self.now()), self._stale_ms],
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
        now = self.now()
        raw = await self._read(orchestrator_id, now)
        record = None if raw is None else self._decode(raw, self.record_key(orchestrator_id))
        if record is None or self._gone(record, now):
            return None
        return self._present(record, now)

    async def list_all(self) -> list[OrchestratorRecord]:
        return await self._select([self._all])

    async def query(self, query: OrchestratorQuery) -> list[OrchestratorRecord]:
        """The orchestrators that match ``query``, read through the capability and region sets."""
        keys = [self._all, *(self.capability_key(cap) for cap in dict.fromkeys(query.capabilities))]
        if query.region is not None:
            keys.append(self.region_key(query.region))
        return [record for record in await self._select(keys) if query.matches(record)]


_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)


def _ms(value: datetime) -> str:
    """Unix milliseconds, as the scripts take them."""
    return str((value - _EPOCH) // timedelta(milliseconds=1))


def _lease_of(raw: str) -> int | None:
    """The ``leaseMs`` of a record's (valid) JSON text: ours have it, the daemon's not."""
    lease = orjson.loads(raw).get("leaseMs")
    return lease if isinstance(lease, int) and not isinstance(lease, bool) else None


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
