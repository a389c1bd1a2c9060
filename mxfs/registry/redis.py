"""The shared registry: one Redis database used by the mxfs nodes (and ModelExpress servers) of a cache.

Schema (DESIGN section 3), compatible with ModelExpress's Redis registry:

- one hash per entry at ``mx:model:HuggingFace:<entry>``, fields ``provider``, ``status``,
  ``created_at`` and ``last_used_at`` (RFC 3339, milliseconds, explicit ``+00:00``), ``message``,
  and while a claim is held ``claim_id`` and ``lease_expires_at`` (integer milliseconds since the
  epoch); mxfs adds ``pinned`` (``1``/``0``) and ``size_bytes``.  An absent value is an absent
  field, never an empty string.  Nothing else lives under ``mx:model:*``: a ModelExpress server
  ``HGETALL``\\ s every key there.
- ``mxfs:lru``: a sorted set of entry names scored by ``last_used_at`` in milliseconds, kept in
  step by every script that stamps ``last_used_at`` or deletes.
- ``mxfs:finished``: a pub/sub channel; finishing an entry as DOWNLOADED or ERROR (by
  ``finish_claim`` or ``set_status``) publishes its name there, so waiters need not poll.
- ``mxfs:refs``: a hash of where each branch or tag points as ``mxfs refresh`` recorded it, field
  ``<repo id>\n<revision>``, value JSON ``{"commit", "version", "recorded_at_ms"}``; and
  ``mxfs:refs:version``, the counter that numbers them, which followers poll (one ``GET``).
- ``mxfs:holders:<entry>``: a hash of the nodes that serve the entry to their peers, field the
  node's id, value JSON ``{"address", "complete", "expires_ms"}`` (milliseconds since the epoch,
  by Redis ``TIME``).  The key's own expiry (``PEXPIREAT``) is its latest holder's, so the hash
  of an entry whose holders all went away vanishes by itself; expired fields are pruned by the
  scripts that read and write it.

Every mutation is one Lua script (registered once with ``register_script``; redis-py reloads it
after a server restart answers NOSCRIPT), so each read-modify-write is atomic, and every script
takes the time from Redis ``TIME``: nodes with skewed clocks agree on lease expiry.  Reads are
plain ``HGET``/``HGETALL``.

Listing: ``SCAN`` of ``mx:model:HuggingFace:*`` is the source of truth, and each record's own
``last_used_at`` gives the order.  The index cannot be trusted on its own, because ModelExpress
servers create records and stamp ``last_used_at`` without knowing about it; so a listing reads
every hash (pipelined, as ModelExpress does), sorts, and repairs the index where it disagrees
(a missing or stale member is rescored, a member without a hash removed, each by a script that
recomputes from the hash).  The index thus stays a faithful oldest-first view
(``ZRANGE mxfs:lru 0 N``) for operators and future fast paths, at the cost of nothing but a
``ZADD`` per stamp.

The scripts use two keys (an entry and the index), so they need one Redis instance, not a
cluster; DESIGN asks for one database per shared cache directory anyway.

redis-py's asyncio client cannot run under trio, so the synchronous client runs in
``trio.to_thread.run_sync`` behind a ``CapacityLimiter`` as large as its connection pool.  Socket
timeouts bound every call, and commands are never retried by the client: a script whose reply was
lost may have run, and running a claim twice would make it lose to itself.  The pool replaces
connections the server closed when they are next taken, so the registry recovers by itself once
Redis is back; until then calls raise :class:`RegistryError`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

import redis
import trio
from redis.backoff import NoBackoff
from redis.retry import Retry

from mxfs import metrics
from mxfs.registry.base import (
    PROVIDER,
    AlreadyExists,
    Claimed,
    ClaimOutcome,
    Holder,
    Record,
    RefRecord,
    RegistryBackend,
    RegistryError,
    Status,
    StatusCounts,
    check_final,
    check_seconds,
    holder_order,
    lease_ms,
    redact_url,
)

T = TypeVar("T")

log = logging.getLogger(__name__)

KEY_PREFIX = f"mx:model:{PROVIDER}:"
LRU_KEY = "mxfs:lru"
FINISHED_CHANNEL = "mxfs:finished"
# How long one wait for a finish message lasts before the listener looks up (and can be cancelled).
LISTEN_WAIT = 1.0
MAX_RESUBSCRIBE_DELAY = 30.0
LOCK_PREFIX = "mxfs:lock:"
REFS_KEY = "mxfs:refs"
REFS_VERSION_KEY = "mxfs:refs:version"
HOLDERS_PREFIX = "mxfs:holders:"

# Worker threads and pooled connections per registry: one connection per thread, so no call ever
# waits for a connection while holding a thread.
POOL_SIZE = 8
CONNECT_TIMEOUT = 5.0
# Every command is a single key lookup or a short script; ten seconds means Redis is gone.
READ_TIMEOUT = 10.0
# Keys per SCAN step and commands per pipeline when listing.
_BATCH = 500

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MS = timedelta(milliseconds=1)
_US = timedelta(microseconds=1)

# -- Lua -----------------------------------------------------------------------------------------

# Helpers shared by the scripts.  Redis runs Lua 5.1, whose numbers are doubles: they hold integer
# milliseconds since the epoch exactly, and microseconds until the year 2255 (2^53 us).
_HELPERS = """
local function now_ms()
    local t = redis.call('TIME')
    return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function int(n)
    return string.format('%d', n)
end

-- Days since 1970-01-01 of a proleptic Gregorian date, and back (Howard Hinnant's algorithms).
local function days_from_civil(y, m, d)
    if m <= 2 then y = y - 1 end
    local era = math.floor(y / 400)
    local yoe = y - era * 400
    local doy = math.floor((153 * ((m + 9) % 12) + 2) / 5) + d - 1
    return era * 146097 + yoe * 365 + math.floor(yoe / 4) - math.floor(yoe / 100) + doy - 719468
end

local function civil_from_days(days)
    local z = days + 719468
    local era = math.floor(z / 146097)
    local doe = z - era * 146097
    local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524) - math.floor(doe / 146096)) / 365)
    local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
    local mp = math.floor((5 * doy + 2) / 153)
    local d = doy - math.floor((153 * mp + 2) / 5) + 1
    local m = mp < 10 and mp + 3 or mp - 9
    local y = yoe + era * 400
    if m <= 2 then y = y + 1 end
    return y, m, d
end

-- RFC 3339 in UTC with milliseconds, as ModelExpress reads it: 2026-04-22T10:00:00.123+00:00
local function format_ms(ms)
    local days = math.floor(ms / 86400000)
    local rest = ms - days * 86400000
    local y, m, d = civil_from_days(days)
    return string.format('%04d-%02d-%02dT%02d:%02d:%02d.%03d+00:00', y, m, d, math.floor(rest / 3600000),
        math.floor(rest / 60000) % 60, math.floor(rest / 1000) % 60, rest % 1000)
end

-- Microseconds since the epoch of an RFC 3339 timestamp ('Z' or a +HH:MM offset; a fraction of
-- any length, cut to 6 digits as Python's datetime.fromisoformat does, so both sides agree on
-- what ModelExpress's nanosecond stamps mean); nil for anything else.
local function parse_us(s)
    if not s then return nil end
    local y, mo, d, h, mi, sec, rest = string.match(s,
        '^(%d%d%d%d)-(%d%d)-(%d%d)[Tt ](%d%d):(%d%d):(%d%d)(.*)$')
    if not y then return nil end
    local us = 0
    local frac = string.match(rest, '^%.(%d+)')
    if frac then
        us = tonumber(string.sub(frac .. '00000', 1, 6))
        rest = string.sub(rest, #frac + 2)
    end
    local offset = 0
    if rest ~= 'Z' and rest ~= 'z' then
        local sign, oh, om = string.match(rest, '^([+-])(%d%d):(%d%d)$')
        if not sign then return nil end
        offset = tonumber(oh) * 60 + tonumber(om)
        if sign == '-' then offset = -offset end
    end
    local minutes = (days_from_civil(tonumber(y), tonumber(mo), tonumber(d)) * 24 + tonumber(h)) * 60
        + tonumber(mi) - offset
    return (minutes * 60 + tonumber(sec)) * 1000000 + us
end

-- Stamp last_used_at with now, or 1 ms past the stored value when the clock has not passed it
-- (eviction's delete_if_unchanged must see every touch after its listing, even within one
-- millisecond or across a clock step), and mirror it in the LRU index.
local function stamp(key, index, name, now)
    local ms = now
    local prev = parse_us(redis.call('HGET', key, 'last_used_at'))
    if prev and math.floor(prev / 1000) + 1 > ms then
        ms = math.floor(prev / 1000) + 1
    end
    redis.call('HSET', key, 'last_used_at', format_ms(ms))
    redis.call('ZADD', index, int(ms), name)
end

-- The message is optional: flag '1' sets it (possibly to ''), '0' removes the field.
local function set_message(key, flag, message)
    if flag == '1' then
        redis.call('HSET', key, 'message', message)
    else
        redis.call('HDEL', key, 'message')
    end
end
"""


def _lua(header: str, body: str) -> str:
    """A script: its ``KEYS``/``ARGV`` header comment, the shared helpers, then its body."""
    return header.strip() + "\n" + _HELPERS + body


# Create the record, or take over a DOWNLOADING one whose lease has expired (keeping created_at
# and pinned).  A DOWNLOADING record without a lease (written by set_status, or by a ModelExpress
# server that predates leases) has no lease that could expire and is never taken over.  A hash
# without a status is unreadable by anybody and is replaced.
_CLAIM = _lua(
    """
-- KEYS[1] - the entry's hash, KEYS[2] - the LRU index
-- ARGV[1] - the entry name, ARGV[2] - claim_id, ARGV[3] - lease in milliseconds, ARGV[4] - provider
-- Returns {1} if the caller now owns the entry, else {0, the status that made it lose, the
-- running claim's id (nil if none)}.
""",
    """
local now = now_ms()
local lease_expires_at = int(now + tonumber(ARGV[3]))
local status = redis.call('HGET', KEYS[1], 'status')
if not status then
    redis.call('DEL', KEYS[1])
    redis.call('HSET', KEYS[1], 'provider', ARGV[4], 'status', 'DOWNLOADING', 'created_at', format_ms(now),
        'claim_id', ARGV[2], 'lease_expires_at', lease_expires_at, 'pinned', '0')
    stamp(KEYS[1], KEYS[2], ARGV[1], now)
    return {1}
end
if status ~= 'DOWNLOADING' then return {0, status} end
local lease = tonumber(redis.call('HGET', KEYS[1], 'lease_expires_at'))
if not lease or lease > now then return {0, status, redis.call('HGET', KEYS[1], 'claim_id')} end
redis.call('HSET', KEYS[1], 'claim_id', ARGV[2], 'lease_expires_at', lease_expires_at)
redis.call('HDEL', KEYS[1], 'message', 'size_bytes')
stamp(KEYS[1], KEYS[2], ARGV[1], now)
return {1}
""",
)

# Fenced by claim_id: only the current owner of a DOWNLOADING record matches.  Refreshing a lease
# that expired but was not yet taken over is allowed: nobody else owns the record.
_REFRESH = _lua(
    """
-- KEYS[1] - the entry's hash
-- ARGV[1] - claim_id, ARGV[2] - lease in milliseconds
-- Returns 1 if the lease was extended, 0 if the caller does not own the entry.
""",
    """
local current = redis.call('HMGET', KEYS[1], 'status', 'claim_id')
if current[1] ~= 'DOWNLOADING' or current[2] ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'lease_expires_at', int(now_ms() + tonumber(ARGV[2])))
return 1
""",
)

# Fenced like _REFRESH, so an owner that was taken over cannot publish.  A missing size_bytes
# keeps whatever is stored.
_FINISH = _lua(
    """
-- KEYS[1] - the entry's hash, KEYS[2] - the LRU index
-- ARGV[1] - the entry name, ARGV[2] - claim_id, ARGV[3] - the final status (DOWNLOADED or ERROR),
-- ARGV[4] - '1' if a message is given, ARGV[5] - the message, ARGV[6] - size_bytes or '' to keep it,
-- ARGV[7] - the channel that announces finished entries
-- Returns 1 if published, 0 if the caller does not own the entry.
""",
    """
local current = redis.call('HMGET', KEYS[1], 'status', 'claim_id')
if current[1] ~= 'DOWNLOADING' or current[2] ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[1], 'status', ARGV[3])
set_message(KEYS[1], ARGV[4], ARGV[5])
if ARGV[6] ~= '' then redis.call('HSET', KEYS[1], 'size_bytes', ARGV[6]) end
redis.call('HDEL', KEYS[1], 'claim_id', 'lease_expires_at')
stamp(KEYS[1], KEYS[2], ARGV[1], now_ms())
redis.call('PUBLISH', ARGV[7], ARGV[1])
return 1
""",
)

# Compare-and-set on status: of N concurrent callers exactly one still sees from_status.
_RETAKE = _lua(
    """
-- KEYS[1] - the entry's hash, KEYS[2] - the LRU index
-- ARGV[1] - the entry name, ARGV[2] - claim_id, ARGV[3] - lease in milliseconds, ARGV[4] - the
-- status the entry must have
-- Returns 1 if the caller now owns the entry, else 0.
""",
    """
if redis.call('HGET', KEYS[1], 'status') ~= ARGV[4] then return 0 end
local now = now_ms()
redis.call('HSET', KEYS[1], 'status', 'DOWNLOADING', 'claim_id', ARGV[2],
    'lease_expires_at', int(now + tonumber(ARGV[3])))
redis.call('HDEL', KEYS[1], 'message', 'size_bytes')
stamp(KEYS[1], KEYS[2], ARGV[1], now)
return 1
""",
)

# Upsert.  A status other than DOWNLOADING has no owner, so it ends any claim (the old owner's
# refresh and finish then fail) and announces the entry as finished; a DOWNLOADING write (say, a
# progress message) keeps the owner.
_SET_STATUS = _lua(
    """
-- KEYS[1] - the entry's hash, KEYS[2] - the LRU index
-- ARGV[1] - the entry name, ARGV[2] - the status, ARGV[3] - '1' if a message is given,
-- ARGV[4] - the message, ARGV[5] - provider, ARGV[6] - the channel that announces finished entries
""",
    """
local now = now_ms()
if redis.call('EXISTS', KEYS[1]) == 0 then
    redis.call('HSET', KEYS[1], 'pinned', '0')
end
redis.call('HSETNX', KEYS[1], 'created_at', format_ms(now))
redis.call('HSET', KEYS[1], 'provider', ARGV[5], 'status', ARGV[2])
set_message(KEYS[1], ARGV[3], ARGV[4])
stamp(KEYS[1], KEYS[2], ARGV[1], now)
if ARGV[2] ~= 'DOWNLOADING' then
    redis.call('HDEL', KEYS[1], 'claim_id', 'lease_expires_at')
    redis.call('PUBLISH', ARGV[6], ARGV[1])
end
return 1
""",
)

_TOUCH = _lua(
    """
-- KEYS[1] - the entry's hash, KEYS[2] - the LRU index
-- ARGV[1] - the entry name
-- Returns 1 if the entry exists (and was stamped), else 0.
""",
    """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
stamp(KEYS[1], KEYS[2], ARGV[1], now_ms())
return 1
""",
)

_DELETE = _lua(
    """
-- KEYS[1] - the entry's hash, KEYS[2] - the LRU index
-- ARGV[1] - the entry name
-- Returns 1 if the entry existed, else 0.
""",
    """
redis.call('ZREM', KEYS[2], ARGV[1])
return redis.call('DEL', KEYS[1])
""",
)

# The compare and the delete are one script: an entry touched or re-claimed since the caller's
# listing no longer matches and survives.  Timestamps compare at microsecond precision, which is
# what the caller's datetime holds, whichever writer's format the stored value has.
_DELETE_IF_UNCHANGED = _lua(
    """
-- KEYS[1] - the entry's hash, KEYS[2] - the LRU index
-- ARGV[1] - the entry name, ARGV[2] - the expected status, ARGV[3] - the expected last_used_at in
-- microseconds since the epoch
-- Returns 1 if the entry was deleted, else 0.
""",
    """
local current = redis.call('HMGET', KEYS[1], 'status', 'last_used_at')
if current[1] ~= ARGV[2] or parse_us(current[2]) ~= tonumber(ARGV[3]) then return 0 end
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
return 1
""",
)

_SET_PINNED = _lua(
    """
-- KEYS[1] - the entry's hash
-- ARGV[1] - '1' to pin, '0' to unpin
-- Returns 1 if the entry exists, else 0.
""",
    """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'pinned', ARGV[1])
return 1
""",
)

# Make the index agree with the hash, whoever wrote it: the repair a listing runs for entries
# that ModelExpress created or stamped, and for members whose entry is gone.
# Named locks between nodes (the eviction sweep) live under mxfs:lock:*, never under mx:model:*.
# Taken if free (SET NX PX) or renewed if already the caller's, so a holder can extend it.
_TRY_LOCK = """
-- KEYS[1] - the lock's key
-- ARGV[1] - owner token, ARGV[2] - ttl in milliseconds
-- Returns 1 if the caller holds the lock now, else 0.
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
if redis.call('GET', KEYS[1]) == ARGV[1] then
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
    return 1
end
return 0
"""

# Delete only our own lock (like redis-py's Lock.release): a lock that expired and was taken by
# another node must survive our late release.
_UNLOCK = """
-- KEYS[1] - the lock's key
-- ARGV[1] - owner token
-- Returns 1 if the lock was ours and is released, else 0.
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# A ref record gets the next number of the counter, in the same script, so versions order the
# records exactly as they were written; the same commit again changes nothing.
_RECORD_REF = _lua(
    """
-- KEYS[1] - the refs hash, KEYS[2] - the refs version counter
-- ARGV[1] - the field (repo id, newline, revision), ARGV[2] - the commit
-- Returns the stored record as JSON: {commit, version, recorded_at_ms}.
""",
    """
local stored = redis.call('HGET', KEYS[1], ARGV[1])
if stored then
    local ok, record = pcall(cjson.decode, stored)
    if ok and type(record) == 'table' and record['commit'] == ARGV[2] then return stored end
end
local version = redis.call('INCR', KEYS[2])
local record = cjson.encode({commit = ARGV[2], version = version, recorded_at_ms = now_ms()})
redis.call('HSET', KEYS[1], ARGV[1], record)
return record
""",
)

# Shared by the holder scripts: drop the expired fields of a holders hash, and set the key's
# expiry to its latest holder's (an empty hash is no key at all in Redis).  The work is one pass
# over the entry's holders, a handful of nodes.
_PRUNE_HOLDERS = """
local function prune_holders(key, now)
    local fields = redis.call('HGETALL', key)
    local latest = nil
    local live = {}
    for i = 1, #fields, 2 do
        local ok, holder = pcall(cjson.decode, fields[i + 1])
        local expires = ok and type(holder) == 'table' and tonumber(holder['expires_ms'])
        if expires and expires > now then
            live[#live + 1] = fields[i]
            live[#live + 1] = fields[i + 1]
            if not latest or expires > latest then latest = expires end
        else
            redis.call('HDEL', key, fields[i])
        end
    end
    if latest then redis.call('PEXPIREAT', key, int(latest)) end
    return live
end
"""

_PUT_HOLDER = _lua(
    """
-- KEYS[1] - the entry's holders hash
-- ARGV[1] - the node id, ARGV[2] - its address, ARGV[3] - '1' if complete, ARGV[4] - ttl in milliseconds
""",
    _PRUNE_HOLDERS
    + """
local now = now_ms()
local holder = {address = ARGV[2], complete = ARGV[3] == '1', expires_ms = now + tonumber(ARGV[4])}
redis.call('HSET', KEYS[1], ARGV[1], cjson.encode(holder))
prune_holders(KEYS[1], now)
return 1
""",
)

_DROP_HOLDER = _lua(
    """
-- KEYS[1] - the entry's holders hash
-- ARGV[1] - the node id
""",
    _PRUNE_HOLDERS
    + """
redis.call('HDEL', KEYS[1], ARGV[1])
prune_holders(KEYS[1], now_ms())  -- the key's expiry follows the holders that are left
return 1
""",
)

# A read that writes: expired holders are removed as they are met, by Redis's clock.
_HOLDERS = _lua(
    """
-- KEYS[1] - the entry's holders hash
-- Returns the unexpired holders as a flat list: node id, JSON, node id, JSON, ...
""",
    _PRUNE_HOLDERS
    + """
return prune_holders(KEYS[1], now_ms())
""",
)

_REINDEX = _lua(
    """
-- KEYS[1] - the entry's hash, KEYS[2] - the LRU index
-- ARGV[1] - the entry name
-- Returns 1 if the entry is indexed now, 0 if it was removed from the index.
""",
    """
local us = parse_us(redis.call('HGET', KEYS[1], 'last_used_at'))
if not us then
    redis.call('ZREM', KEYS[2], ARGV[1])
    return 0
end
redis.call('ZADD', KEYS[2], int(math.floor(us / 1000)), ARGV[1])
return 1
""",
)


# -- Python side ---------------------------------------------------------------------------------


def _key(name: str) -> str:
    return KEY_PREFIX + name


def _holders_key(name: str) -> str:
    return HOLDERS_PREFIX + name


def _holder(node: str, value: str) -> Holder:
    """The holder stored for ``node``; ValueError if it is malformed."""
    data = json.loads(value)
    if not isinstance(data, dict) or not isinstance(data.get("address"), str):
        raise ValueError(f"malformed holder {node!r}: {value!r}")
    return Holder(node, data["address"], data.get("complete") is True, _EPOCH + int(data["expires_ms"]) * _MS)


def _ref_field(repo_id: str, revision: str) -> str:
    # Neither a repo id nor a revision can hold a newline (mxfs.names validates both).
    return f"{repo_id}\n{revision}"


def _ref_record(field: str, value: str) -> RefRecord:
    """The record stored at ``field``; ValueError if it is malformed."""
    repo_id, sep, revision = field.partition("\n")
    data = json.loads(value)
    if not sep or not isinstance(data, dict) or not isinstance(data.get("commit"), str):
        raise ValueError(f"malformed ref record {field!r}: {value!r}")
    return RefRecord(
        repo_id, revision, data["commit"], int(data["version"]), _EPOCH + int(data["recorded_at_ms"]) * _MS
    )


def _us(when: datetime) -> int:
    """``when`` in whole microseconds since the epoch (a datetime holds nothing finer)."""
    if when.tzinfo is None:
        raise ValueError("a naive datetime cannot be compared with registry timestamps")
    return (when - _EPOCH) // _US


def _parse_time(value: str) -> datetime:
    when = datetime.fromisoformat(value)
    if when.tzinfo is None:
        raise ValueError(f"timestamp {value!r} has no offset")
    return when.astimezone(UTC)


def _record(name: str, fields: dict[str, str]) -> Record:
    """The record stored in ``fields``; ValueError if it is malformed."""
    try:
        lease = fields.get("lease_expires_at")
        size = fields.get("size_bytes")
        return Record(
            model_name=name,
            provider=fields.get("provider", PROVIDER),
            status=Status(fields["status"]),
            created_at=_parse_time(fields["created_at"]),
            last_used_at=_parse_time(fields["last_used_at"]),
            message=fields.get("message"),
            claim_id=fields.get("claim_id"),
            lease_expires_at=None if lease is None else _EPOCH + int(lease) * _MS,
            pinned=fields.get("pinned") == "1",
            size_bytes=None if size is None else int(size),
        )
    except KeyError as exc:
        raise ValueError(f"field {exc.args[0]!r} is missing") from None


def _close_pubsub(pubsub: Any, pool: redis.ConnectionPool) -> None:
    with contextlib.suppress(redis.RedisError, OSError):
        pubsub.close()
    pool.disconnect()


def _check_url(url: str) -> None:
    """ValueError unless ``url`` is ``redis[s]://[[user]:password@]host[:port][/db]``."""
    shown = redact_url(url)
    try:
        parts = urlsplit(url)
        host, _ = parts.hostname, parts.port
    except ValueError:
        raise ValueError(f"invalid registry URL {shown!r}") from None
    if parts.scheme not in ("redis", "rediss"):
        raise ValueError(f"not a redis URL: {shown!r}")
    if not host:
        raise ValueError(f"redis URL {shown!r} names no host; write redis://host:port/db")
    if parts.fragment:
        raise ValueError(f"redis URL {shown!r}: a fragment is not supported")
    # redis-py silently falls back to database 0 for a path it cannot read: refuse it instead of
    # sharing the wrong database.
    if not re.fullmatch(r"/?|/\d+", unquote(parts.path)):
        raise ValueError(f"redis URL {shown!r}: the path must be a database number, as in redis://host:6379/0")


class RedisRegistry(RegistryBackend):
    """The :class:`~mxfs.registry.base.Registry` on a Redis database; create it with :meth:`open`."""

    def __init__(self, pool: redis.ConnectionPool, url_for_logs: str) -> None:
        self.url_for_logs = url_for_logs
        self._pool = pool
        self._client = redis.Redis(connection_pool=pool)
        self._limiter = trio.CapacityLimiter(POOL_SIZE)
        self._closed = False
        # Keys of malformed records already warned about, so a periodic listing warns once.
        self._warned: set[str] = set()
        register = self._client.register_script
        self._claim = register(_CLAIM)
        self._refresh = register(_REFRESH)
        self._finish = register(_FINISH)
        self._retake = register(_RETAKE)
        self._set_status = register(_SET_STATUS)
        self._touch = register(_TOUCH)
        self._delete = register(_DELETE)
        self._delete_if_unchanged = register(_DELETE_IF_UNCHANGED)
        self._set_pinned = register(_SET_PINNED)
        self._reindex = register(_REINDEX)
        self._try_lock = register(_TRY_LOCK)
        self._unlock = register(_UNLOCK)
        self._record_ref = register(_RECORD_REF)
        self._put_holder = register(_PUT_HOLDER)
        self._drop_holder = register(_DROP_HOLDER)
        self._holders = register(_HOLDERS)

    def __repr__(self) -> str:
        return f"<RedisRegistry {self.url_for_logs}>"

    @classmethod
    async def open(cls, url: str) -> RedisRegistry:
        """Connect to the Redis database named by ``url`` and check that it answers."""
        _check_url(url)
        url_for_logs = redact_url(url)
        try:
            # Options in the URL's query (ssl_ca_certs=..., socket_timeout=...) override these.
            pool = redis.BlockingConnectionPool.from_url(
                url,
                max_connections=POOL_SIZE,
                timeout=CONNECT_TIMEOUT + READ_TIMEOUT,
                socket_connect_timeout=CONNECT_TIMEOUT,
                socket_timeout=READ_TIMEOUT,
                socket_keepalive=True,
                decode_responses=True,
                retry=Retry(NoBackoff(), 0),
            )
            # The pool passes unknown query options on to each connection: try them now (no
            # socket is opened) rather than fail with a TypeError at the first call.
            pool.connection_class(**pool.connection_kwargs)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"redis URL {url_for_logs!r}: {exc}") from None
        registry = cls(pool, url_for_logs)
        try:
            await registry._run(registry._client.ping)
        except BaseException:
            await registry.aclose()
            raise
        log.debug("registry %s: connected", url_for_logs)
        return registry

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` in a worker thread, turning Redis and socket failures into RegistryError."""
        if self._closed:
            raise RegistryError(f"registry {self.url_for_logs} is closed")
        try:
            return await trio.to_thread.run_sync(fn, *args, limiter=self._limiter)
        except (redis.RedisError, OSError) as exc:
            metrics.REGISTRY_ERRORS.inc()
            raise RegistryError(f"registry {self.url_for_logs}: {exc}") from exc

    async def _script(self, script: Any, keys: list[str], args: list[Any]) -> Any:
        return await self._run(lambda: script(keys=keys, args=args))

    def _status(self, name: str, value: str) -> Status:
        try:
            return Status(value)
        except ValueError:
            raise RegistryError(f"registry {self.url_for_logs}: {name} has unknown status {value!r}") from None

    async def get_status(self, name: str) -> Status | None:
        value = await self._run(self._client.hget, _key(name), "status")
        return None if value is None else self._status(name, value)

    async def get_record(self, name: str) -> Record | None:
        fields = await self._run(self._client.hgetall, _key(name))
        if not fields:
            return None
        try:
            return _record(name, fields)
        except ValueError as exc:
            raise RegistryError(f"registry {self.url_for_logs}: malformed record {_key(name)}: {exc}") from None

    async def set_status(self, name: str, status: Status, message: str | None = None) -> None:
        status = Status(status)
        args = [name, status.value, "0" if message is None else "1", message or "", PROVIDER, FINISHED_CHANNEL]
        await self._script(self._set_status, [_key(name), LRU_KEY], args)

    async def touch(self, name: str) -> None:
        await self._script(self._touch, [_key(name), LRU_KEY], [name])

    async def delete(self, name: str) -> None:
        await self._script(self._delete, [_key(name), LRU_KEY], [name])

    async def delete_if_unchanged(self, name: str, status: Status, last_used_at: datetime) -> bool:
        args = [name, Status(status).value, _us(last_used_at)]
        return await self._script(self._delete_if_unchanged, [_key(name), LRU_KEY], args) == 1

    def _scan_keys(self) -> list[str]:
        # SCAN may return a key twice (when the table is resized midway): keep the first.
        return list(dict.fromkeys(self._client.scan_iter(match=KEY_PREFIX + "*", count=_BATCH)))

    def _list(self) -> list[Record]:
        """Every readable record, unsorted; repairs the LRU index where it disagrees (in a thread)."""
        keys = self._scan_keys()
        records: list[Record] = []
        for start in range(0, len(keys), _BATCH):
            chunk = keys[start : start + _BATCH]
            pipe = self._client.pipeline(transaction=False)
            for key in chunk:
                pipe.hgetall(key)
            for key, fields in zip(chunk, pipe.execute(), strict=True):
                if not fields:
                    continue  # deleted since the scan
                try:
                    records.append(_record(key.removeprefix(KEY_PREFIX), fields))
                except ValueError as exc:
                    if key not in self._warned:
                        self._warned.add(key)
                        log.warning("registry %s: skipping malformed record %s: %s", self.url_for_logs, key, exc)

        indexed = dict(self._client.zrange(LRU_KEY, 0, -1, withscores=True))
        names = {key.removeprefix(KEY_PREFIX) for key in keys}
        stale = [r.model_name for r in records if indexed.get(r.model_name) != (r.last_used_at - _EPOCH) // _MS]
        stale += [name for name in indexed if name not in names]
        for name in stale:
            self._reindex(keys=[_key(name), LRU_KEY], args=[name])
        return records

    async def list_by_last_used(self, limit: int | None = None) -> list[Record]:
        if limit is not None and limit < 0:
            raise ValueError(f"limit must not be negative, got {limit}")
        records = await self._run(self._list)
        records.sort(key=lambda r: (r.last_used_at, r.model_name))
        return records if limit is None else records[:limit]

    async def status_counts(self) -> StatusCounts:
        def statuses() -> list[str | None]:
            keys = self._scan_keys()
            values: list[str | None] = []
            for start in range(0, len(keys), _BATCH):
                pipe = self._client.pipeline(transaction=False)
                for key in keys[start : start + _BATCH]:
                    pipe.hget(key, "status")
                values += pipe.execute()
            return values

        values = await self._run(statuses)
        return StatusCounts(
            downloading=values.count(Status.DOWNLOADING.value),
            downloaded=values.count(Status.DOWNLOADED.value),
            error=values.count(Status.ERROR.value),
        )

    async def try_claim(self, name: str, claim_id: str, lease: float) -> ClaimOutcome:
        args = [name, claim_id, lease_ms(lease), PROVIDER]
        result = await self._script(self._claim, [_key(name), LRU_KEY], args)
        if result[0] == 1:
            return Claimed()
        return AlreadyExists(self._status(name, result[1]), result[2] if len(result) > 2 else None)

    async def refresh_claim(self, name: str, claim_id: str, lease: float) -> bool:
        return await self._script(self._refresh, [_key(name)], [claim_id, lease_ms(lease)]) == 1

    async def finish_claim(
        self,
        name: str,
        claim_id: str,
        status: Status,
        message: str | None = None,
        size_bytes: int | None = None,
    ) -> bool:
        check_final(status)
        args = [
            name,
            claim_id,
            Status(status).value,
            "0" if message is None else "1",
            message or "",
            "" if size_bytes is None else int(size_bytes),
            FINISHED_CHANNEL,
        ]
        return await self._script(self._finish, [_key(name), LRU_KEY], args) == 1

    async def try_retake(self, name: str, claim_id: str, lease: float, from_status: Status) -> bool:
        args = [name, claim_id, lease_ms(lease), Status(from_status).value]
        return await self._script(self._retake, [_key(name), LRU_KEY], args) == 1

    async def set_pinned(self, name: str, pinned: bool) -> bool:
        return await self._script(self._set_pinned, [_key(name)], ["1" if pinned else "0"]) == 1

    async def try_lock(self, name: str, owner: str, ttl: float) -> bool:
        ttl_ms = max(1, int(ttl * 1000))
        return await self._script(self._try_lock, [f"{LOCK_PREFIX}{name}"], [owner, ttl_ms]) == 1

    async def unlock(self, name: str, owner: str) -> bool:
        return await self._script(self._unlock, [f"{LOCK_PREFIX}{name}"], [owner]) == 1

    async def record_ref(self, repo_id: str, revision: str, commit: str) -> RefRecord:
        field = _ref_field(repo_id, revision)
        stored = await self._script(self._record_ref, [REFS_KEY, REFS_VERSION_KEY], [field, commit])
        return self._parse_ref(field, stored)

    async def refs_version(self) -> int:
        value = await self._run(self._client.get, REFS_VERSION_KEY)
        try:
            return int(value or 0)
        except ValueError:
            what = f"{REFS_VERSION_KEY} is not a number: {value!r}"
            raise RegistryError(f"registry {self.url_for_logs}: {what}") from None

    async def refs_since(self, version: int) -> list[RefRecord]:
        fields: dict[str, str] = await self._run(self._client.hgetall, REFS_KEY)
        records = []
        for field, value in fields.items():
            try:
                records.append(_ref_record(field, value))
            except (ValueError, KeyError, TypeError) as exc:
                # One bad field (another tool's) must not stop every other ref from moving.
                log.warning("registry %s: %s: skipping %s", self.url_for_logs, REFS_KEY, exc)
        return sorted((r for r in records if r.version > version), key=lambda r: r.version)

    async def put_holder(self, name: str, node: str, address: str, complete: bool, ttl: float) -> None:
        args = [node, address, "1" if complete else "0", lease_ms(check_seconds("ttl", ttl))]
        await self._script(self._put_holder, [_holders_key(name)], args)

    async def drop_holder(self, name: str, node: str) -> None:
        await self._script(self._drop_holder, [_holders_key(name)], [node])

    async def holders(self, name: str) -> list[Holder]:
        flat = await self._script(self._holders, [_holders_key(name)], [])
        holders = []
        for node, value in zip(flat[::2], flat[1::2], strict=True):
            try:
                holders.append(_holder(node, value))
            except (ValueError, KeyError, TypeError) as exc:
                # Another tool's field: the other holders still serve.
                log.warning("registry %s: %s: skipping %s", self.url_for_logs, _holders_key(name), exc)
        return sorted(holders, key=holder_order)

    def _parse_ref(self, field: str, value: str) -> RefRecord:
        try:
            return _ref_record(field, value)
        except (ValueError, KeyError, TypeError) as exc:
            raise RegistryError(f"registry {self.url_for_logs}: {REFS_KEY}: {exc}") from None

    async def listen_finished(
        self, on_finished: Callable[[str], None], *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Call ``on_finished(name)`` for every entry any node finishes, until cancelled.

        A subscribed connection can do nothing else, so it is one of its own, outside the pool
        the registry calls share.  A lost subscription is made again with backoff; meanwhile
        waiters poll, so a finish is noticed later, never missed.
        """
        task_status.started()
        failures = 0
        while not self._closed:
            pool = redis.ConnectionPool(
                connection_class=self._pool.connection_class, max_connections=1, **self._pool.connection_kwargs
            )
            pubsub = redis.Redis(connection_pool=pool).pubsub(ignore_subscribe_messages=True)
            try:
                await trio.to_thread.run_sync(pubsub.subscribe, FINISHED_CHANNEL)
                if failures:
                    log.info("registry %s: subscribed to %s again", self.url_for_logs, FINISHED_CHANNEL)
                failures = 0
                while not self._closed:
                    # Returns within LISTEN_WAIT without a message, so cancelling this waits that long at most.
                    message = await trio.to_thread.run_sync(pubsub.get_message, True, LISTEN_WAIT)
                    if message is not None and message.get("type") == "message":
                        on_finished(str(message["data"]))
            except (redis.RedisError, OSError) as exc:
                failures += 1
                delay = min(2.0**failures, MAX_RESUBSCRIBE_DELAY)
                log.debug("registry %s: %s lost (%s); again in %.0fs", self.url_for_logs, FINISHED_CHANNEL, exc, delay)
                await trio.sleep(delay)
            finally:
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(_close_pubsub, pubsub, pool)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        # Taking every token of the limiter waits for the calls still running in worker threads
        # (bounded by the socket timeouts); the shield makes sure the sockets go even when the
        # caller is cancelled.
        with trio.CancelScope(shield=True):
            borrowers = [object() for _ in range(POOL_SIZE)]
            for borrower in borrowers:
                await self._limiter.acquire_on_behalf_of(borrower)
            try:
                await trio.to_thread.run_sync(self._pool.disconnect)
            finally:
                for borrower in borrowers:
                    self._limiter.release_on_behalf_of(borrower)


async def open_url(url: str) -> RedisRegistry:
    """Open the registry named by a ``redis:`` or ``rediss:`` URL (the entry point ``open_registry`` uses)."""
    return await RedisRegistry.open(url)
