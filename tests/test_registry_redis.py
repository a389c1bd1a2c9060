"""What is particular to the Redis registry: its schema on the wire, ModelExpress compatibility,
passwords, outages, pub/sub and races between nodes.

The behaviour every backend shares is in test_registry_conformance.py.  These tests run against
real ``redis-server`` processes (tests/redis_server.py) and read what the registry wrote with a
plain redis-py client.
"""

from __future__ import annotations

import json
import logging
import random
import re
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta

import pytest
import redis
import trio

from mxfs.names import EntryName
from mxfs.registry import (
    AlreadyExists,
    Claimed,
    Registry,
    RegistryError,
    Status,
    StatusCounts,
    open_registry,
)
from mxfs.registry import redis as redis_backend
from mxfs.registry.redis import FINISHED_CHANNEL, HOLDERS_PREFIX, KEY_PREFIX, LRU_KEY, RedisRegistry
from tests.redis_server import RedisServer

LONG_LEASE = 30.0
# What the registry writes: RFC 3339, milliseconds, explicit UTC offset.
RFC3339_MS = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

OpenRegistry = Callable[..., Awaitable[RedisRegistry]]


def _name(i: int = 0) -> str:
    return EntryName(f"org/model-{i}", f"{i:040x}").key


def _ms(when: datetime) -> int:
    return (when - _EPOCH) // timedelta(milliseconds=1)


def _redis_time_ms(client: redis.Redis) -> int:
    seconds, micros = client.time()
    return seconds * 1000 + micros // 1000


@pytest.fixture
def db(redis_server: RedisServer) -> Iterator[redis.Redis]:
    """A plain client on the session server's database 0, emptied before and after the test."""
    with redis_server.client() as client:
        client.flushdb()
        yield client
        client.flushdb()


@pytest.fixture
async def open_redis(redis_server: RedisServer) -> AsyncIterator[OpenRegistry]:
    """Open registries (by default on the session server's database 0); all closed at teardown."""
    registries: list[Registry] = []

    async def open_(url: str | None = None) -> RedisRegistry:
        registry = await open_registry(url or redis_server.url())
        assert isinstance(registry, RedisRegistry)
        registries.append(registry)
        return registry

    yield open_
    for registry in registries:
        await registry.aclose()


def _keys(db: redis.Redis) -> list[str]:
    return sorted(db.scan_iter(count=1000))


def _assert_schema(db: redis.Redis) -> None:
    """Only entry hashes under mx:model:*; everything else of ours under mxfs:*."""
    for key in _keys(db):
        if key.startswith("mx:model:"):
            assert key.startswith(KEY_PREFIX + "mx1:"), key
            assert db.type(key) == "hash", key
        else:
            assert key.startswith("mxfs:"), key
    for name, score in db.zrange(LRU_KEY, 0, -1, withscores=True):
        stamp = db.hget(KEY_PREFIX + name, "last_used_at")
        assert stamp is not None, f"index member {name} has no entry"
        assert score == _ms(datetime.fromisoformat(stamp)), name


# -- peer holders --------------------------------------------------------------------------------


async def test_holders_are_a_hash_per_entry_under_mxfs_that_expires_with_its_last_holder(
    db: redis.Redis, open_redis: OpenRegistry
) -> None:
    registry = await open_redis()
    name = _name()
    key = f"mxfs:holders:{name}"  # the documented key, outside ModelExpress's mx:model:*
    assert key == HOLDERS_PREFIX + name
    before = _redis_time_ms(db)
    await registry.put_holder(name, "http://10.0.0.5:7170", "http://10.0.0.5:7170", True, LONG_LEASE)
    await registry.put_holder(name, "node-b", "http://10.0.0.6:7170", False, 0.5)
    after = _redis_time_ms(db)
    assert _keys(db) == [key]
    _assert_schema(db)
    fields = {node: json.loads(value) for node, value in db.hgetall(key).items()}
    assert set(fields) == {"http://10.0.0.5:7170", "node-b"}
    long_ms = fields["http://10.0.0.5:7170"].pop("expires_ms")
    assert before + LONG_LEASE * 1000 <= long_ms <= after + LONG_LEASE * 1000
    assert fields["http://10.0.0.5:7170"] == {"address": "http://10.0.0.5:7170", "complete": True}
    assert fields["node-b"]["complete"] is False
    # The key lives as long as its latest holder, by Redis's clock.
    assert db.pexpiretime(key) == long_ms
    [first, second] = await registry.holders(name)
    assert _ms(first.expires_at) == long_ms
    assert _ms(second.expires_at) == fields["node-b"]["expires_ms"]

    # Dropping the latest holder shortens the key's life to the next one's...
    await registry.drop_holder(name, "http://10.0.0.5:7170")
    assert db.pexpiretime(key) == fields["node-b"]["expires_ms"]
    # ...and once that expires the key is gone without anybody reading it.
    await trio.sleep(0.6)
    assert _keys(db) == []
    assert await registry.holders(name) == []
    _assert_schema(db)


async def test_expired_and_unreadable_holder_fields_are_pruned(db: redis.Redis, open_redis: OpenRegistry) -> None:
    registry = await open_redis()
    name = _name()
    key = HOLDERS_PREFIX + name
    await registry.put_holder(name, "live", "http://10.0.0.5:7170", True, LONG_LEASE)
    stale = json.dumps({"address": "http://10.0.0.6:7170", "complete": True, "expires_ms": _redis_time_ms(db) - 1})
    db.hset(key, mapping={"stale": stale, "garbage": "not json"})
    assert [h.node for h in await registry.holders(name)] == ["live"]
    assert set(db.hkeys(key)) == {"live"}


# -- the schema ----------------------------------------------------------------------------------


async def test_claim_and_finish_write_modelexpress_fields(db: redis.Redis, open_redis: OpenRegistry) -> None:
    registry = await open_redis()
    name = _name()
    key = f"mx:model:HuggingFace:{name}"

    before = _redis_time_ms(db)
    assert await registry.try_claim(name, "owner", LONG_LEASE) == Claimed()
    after = _redis_time_ms(db)
    fields = db.hgetall(key)
    assert set(fields) == {"provider", "status", "created_at", "last_used_at", "claim_id", "lease_expires_at", "pinned"}
    assert fields["provider"] == "HuggingFace"
    assert fields["status"] == "DOWNLOADING"
    assert fields["claim_id"] == "owner"
    assert fields["pinned"] == "0"
    assert RFC3339_MS.fullmatch(fields["created_at"]), fields["created_at"]
    assert fields["last_used_at"] == fields["created_at"]
    # Milliseconds since the epoch from Redis TIME, plus the lease.
    assert fields["lease_expires_at"].isdigit()
    lease_ms = int(fields["lease_expires_at"])
    assert before + LONG_LEASE * 1000 <= lease_ms <= after + LONG_LEASE * 1000
    created_ms = _ms(datetime.fromisoformat(fields["created_at"]))
    assert before <= created_ms <= after
    assert db.zscore(LRU_KEY, name) == created_ms

    assert await registry.set_pinned(name, True)
    assert db.hget(key, "pinned") == "1"
    await registry.set_status(name, Status.DOWNLOADING, "50%")
    assert db.hget(key, "message") == "50%"
    assert await registry.finish_claim(name, "owner", Status.DOWNLOADED, size_bytes=123)
    fields = db.hgetall(key)
    # No empty strings for absent values: the fields are gone.
    assert set(fields) == {"provider", "status", "created_at", "last_used_at", "pinned", "size_bytes"}
    assert fields["status"] == "DOWNLOADED"
    assert fields["size_bytes"] == "123"
    assert RFC3339_MS.fullmatch(fields["last_used_at"])
    assert fields["last_used_at"] > fields["created_at"]
    assert db.zscore(LRU_KEY, name) == _ms(datetime.fromisoformat(fields["last_used_at"]))

    await registry.set_status(name, Status.ERROR, "")
    assert db.hget(key, "message") == ""
    assert (await registry.get_record(name)).message == ""  # type: ignore[union-attr]
    _assert_schema(db)


async def test_only_entry_hashes_live_under_mx_model(db: redis.Redis, open_redis: OpenRegistry) -> None:
    registry = await open_redis()
    names = [_name(i) for i in range(6)]
    assert await registry.try_claim(names[0], "a", LONG_LEASE) == Claimed()
    assert await registry.try_claim(names[1], "b", LONG_LEASE) == Claimed()
    assert await registry.finish_claim(names[1], "b", Status.ERROR, "boom")
    assert await registry.try_reset_error_for_retry(names[1], "c", LONG_LEASE)
    await registry.set_status(names[2], Status.DOWNLOADED)
    await registry.touch(names[2])
    await registry.touch(names[3])  # unknown: creates nothing
    assert not await registry.set_pinned(names[4], True)  # unknown: creates nothing
    await registry.set_status(names[5], Status.DOWNLOADED)
    assert await registry.set_pinned(names[5], True)
    await registry.delete(names[5])
    record = await registry.get_record(names[2])
    assert record is not None
    assert await registry.delete_if_unchanged(names[2], record.status, record.last_used_at)
    await registry.list_by_last_used()
    await registry.status_counts()

    assert _keys(db) == sorted([LRU_KEY, KEY_PREFIX + names[0], KEY_PREFIX + names[1]])
    assert set(db.zrange(LRU_KEY, 0, -1)) == set(names[:2])
    _assert_schema(db)


async def test_lua_time_helpers_agree_with_python(db: redis.Redis) -> None:
    rng = random.Random(1)
    # Edges (the epoch, leap days, century years) and a spread up to the year 9999.
    stamps = [datetime(1970, 1, 1, tzinfo=UTC), datetime(2000, 2, 29, 23, 59, 59, 999000, tzinfo=UTC)]
    stamps += [datetime(2100, 3, 1, tzinfo=UTC), datetime(2024, 12, 31, 12, tzinfo=UTC)]
    stamps += [datetime(9999, 12, 31, 23, 59, 59, 999000, tzinfo=UTC)]
    stamps += [_EPOCH + timedelta(milliseconds=rng.randrange(253402300800000)) for _ in range(500)]
    ms_values = [_ms(s) for s in stamps]
    script = (
        redis_backend._HELPERS
        + """
local out = {}
for i = 1, #ARGV do out[i] = format_ms(tonumber(ARGV[i])) end
return out
"""
    )
    formatted = db.eval(script, 0, *ms_values)
    assert formatted == [s.isoformat(timespec="milliseconds") for s in stamps]

    texts = [
        "2026-04-22T10:00:00+00:00",
        "2026-04-22T10:00:00Z",
        "2026-04-22T10:00:00.5+00:00",
        "2026-04-22T10:00:00.123456789+00:00",  # chrono's to_rfc3339, as ModelExpress writes
        "2026-04-22T12:30:00.25+02:30",
        "2026-04-22T01:00:00.000001-09:00",
        "2024-02-29T23:59:59.999999+00:00",
        # Microseconds since the epoch are exact in Lua's doubles until 2255.
        *(s.isoformat(timespec="milliseconds") for s in stamps if s.year < 2255),
    ]
    script = (
        redis_backend._HELPERS
        + """
local out = {}
for i = 1, #ARGV do out[i] = string.format('%d', parse_us(ARGV[i])) end
return out
"""
    )
    parsed = [int(v) for v in db.eval(script, 0, *texts)]
    expected = [(datetime.fromisoformat(t) - _EPOCH) // timedelta(microseconds=1) for t in texts]
    assert parsed == expected

    script = redis_backend._HELPERS + "return {parse_us(ARGV[1]) == nil, parse_us(ARGV[2]) == nil}"
    assert db.eval(script, 0, "yesterday", "2026-04-22T10:00:00") == [1, 1]


async def test_stamps_move_past_a_stored_time_in_the_future(db: redis.Redis, open_redis: OpenRegistry) -> None:
    # Another writer's clock ran ahead: every stamp still moves last_used_at forward.
    registry = await open_redis()
    name = _name()
    await registry.set_status(name, Status.DOWNLOADED)
    db.hset(KEY_PREFIX + name, "last_used_at", "2100-01-01T00:00:00.123456789+00:00")
    await registry.touch(name)
    assert db.hget(KEY_PREFIX + name, "last_used_at") == "2100-01-01T00:00:00.124+00:00"
    await registry.touch(name)
    assert db.hget(KEY_PREFIX + name, "last_used_at") == "2100-01-01T00:00:00.125+00:00"
    assert db.zscore(LRU_KEY, name) == _ms(datetime(2100, 1, 1, 0, 0, 0, 125000, tzinfo=UTC))


# -- sharing the database with ModelExpress ------------------------------------------------------


def _write_like_modelexpress(db: redis.Redis, name: str, status: str, last_used_at: str, **extra: str) -> None:
    """A record as ModelExpress's server writes it: chrono RFC 3339 stamps, no mxfs fields, no index."""
    db.hset(
        KEY_PREFIX + name,
        mapping={
            "provider": "HuggingFace",
            "status": status,
            "created_at": "2026-04-22T10:00:00.123456789+00:00",
            "last_used_at": last_used_at,
            "message": "Starting download...",
            **extra,
        },
    )


async def test_modelexpress_records_are_readable_listable_and_claimable(
    db: redis.Redis, open_redis: OpenRegistry
) -> None:
    registry = await open_redis()
    downloaded, downloading, ours = _name(0), _name(1), _name(2)
    _write_like_modelexpress(db, downloaded, "DOWNLOADED", "2026-04-22T11:00:00.000000001+00:00")
    # A ModelExpress claim from before leases: DOWNLOADING with no lease_expires_at.
    _write_like_modelexpress(db, downloading, "DOWNLOADING", "2026-04-22T11:00:01.5+00:00")
    await registry.set_status(ours, Status.DOWNLOADED)

    record = await registry.get_record(downloaded)
    assert record is not None
    assert record.provider == "HuggingFace"
    assert record.status is Status.DOWNLOADED
    assert record.created_at == datetime(2026, 4, 22, 10, 0, 0, 123456, tzinfo=UTC)
    assert record.last_used_at == datetime(2026, 4, 22, 11, 0, tzinfo=UTC)
    assert record.message == "Starting download..."
    assert (record.claim_id, record.lease_expires_at, record.pinned, record.size_bytes) == (None, None, False, None)

    # Listed (though not in mxfs's index), oldest first, and the listing indexes them.
    assert db.zscore(LRU_KEY, downloaded) is None
    listed = await registry.list_by_last_used()
    assert [r.model_name for r in listed] == [downloaded, downloading, ours]
    assert listed[0] == record
    assert db.zscore(LRU_KEY, downloaded) == _ms(record.last_used_at)
    assert db.zscore(LRU_KEY, downloading) == _ms(datetime(2026, 4, 22, 11, 0, 1, 500000, tzinfo=UTC))
    assert await registry.status_counts() == StatusCounts(downloading=1, downloaded=2)

    # A lease-less DOWNLOADING record is never taken over...
    assert await registry.try_claim(downloading, "mxfs", LONG_LEASE) == AlreadyExists(Status.DOWNLOADING)
    # ...and a DOWNLOADED one is not claimed; once set to ERROR it can be retried.
    assert await registry.try_claim(downloaded, "mxfs", LONG_LEASE) == AlreadyExists(Status.DOWNLOADED)
    await registry.set_status(downloaded, Status.ERROR, "files vanished")
    assert await registry.try_claim(downloaded, "mxfs", LONG_LEASE) == AlreadyExists(Status.ERROR)
    assert await registry.try_reset_error_for_retry(downloaded, "mxfs", LONG_LEASE)
    claimed = await registry.get_record(downloaded)
    assert claimed is not None
    assert claimed.status is Status.DOWNLOADING
    assert claimed.claim_id == "mxfs"
    assert claimed.created_at == record.created_at
    assert claimed.message is None
    assert await registry.finish_claim(downloaded, "mxfs", Status.DOWNLOADED, size_bytes=5)
    # The hash keeps ModelExpress's created_at text untouched.
    assert db.hget(KEY_PREFIX + downloaded, "created_at") == "2026-04-22T10:00:00.123456789+00:00"

    # Eviction's compare-and-delete works on ModelExpress's nanosecond stamps too.
    [listed_downloading] = [r for r in await registry.list_by_last_used() if r.model_name == downloading]
    assert await registry.delete_if_unchanged(downloading, Status.DOWNLOADING, listed_downloading.last_used_at)
    assert await registry.get_record(downloading) is None
    _assert_schema(db)


async def test_modelexpress_touch_after_mxfs_is_seen_and_repaired(db: redis.Redis, open_redis: OpenRegistry) -> None:
    registry = await open_redis()
    old, new = _name(0), _name(1)
    await registry.set_status(old, Status.DOWNLOADED)
    await trio.sleep(0.01)
    await registry.set_status(new, Status.DOWNLOADED)
    # A ModelExpress server touches `old` (it writes the hash, not mxfs's index).
    db.hset(KEY_PREFIX + old, "last_used_at", "2100-01-01T00:00:00.5+00:00")
    # A dangling index member (its entry deleted by ModelExpress) is dropped.
    db.zadd(LRU_KEY, {_name(9): 1})

    assert [r.model_name for r in await registry.list_by_last_used()] == [new, old]
    assert db.zrange(LRU_KEY, 0, -1) == [new, old]
    _assert_schema(db)

    # Malformed hashes are skipped with one warning, not fatal to eviction.
    db.hset(KEY_PREFIX + _name(7), mapping={"provider": "HuggingFace", "status": "DOWNLOADED"})
    assert [r.model_name for r in await registry.list_by_last_used()] == [new, old]
    with pytest.raises(RegistryError, match="malformed"):
        await registry.get_record(_name(7))
    db.hset(KEY_PREFIX + _name(8), mapping={"status": "PAUSED"})
    with pytest.raises(RegistryError, match="PAUSED"):
        await registry.get_status(_name(8))


# -- connections, passwords, outages -------------------------------------------------------------


async def test_password_works_and_never_shows(
    make_redis_server: Callable[..., RedisServer], caplog: pytest.LogCaptureFixture
) -> None:
    secret = "s3cr3t-Pa55"
    server = make_redis_server(password=secret)
    caplog.set_level(logging.DEBUG)

    registry = await open_registry(server.url())
    try:
        assert secret in server.url()
        for shown in (registry.url_for_logs, repr(registry), str(registry)):
            assert secret not in shown
            assert f"127.0.0.1:{server.port}" in shown
        assert registry.url_for_logs == f"redis://:***@127.0.0.1:{server.port}/0"
        assert await registry.try_claim(_name(), "owner", LONG_LEASE) == Claimed()
        assert await registry.get_status(_name()) is Status.DOWNLOADING
    finally:
        await registry.aclose()

    # Wrong or missing passwords: a RegistryError that shows neither password.
    for url in (server.url(password="wrong-pw"), f"redis://127.0.0.1:{server.port}/0"):
        with pytest.raises(RegistryError) as raised:
            await open_registry(url)
        assert "wrong-pw" not in str(raised.value)
        assert secret not in str(raised.value)

    # ACL-style user:password URLs are redacted the same way.
    with pytest.raises(RegistryError) as raised:
        await open_registry(f"redis://default:{secret}x@127.0.0.1:{server.port}/0")
    assert secret not in str(raised.value)

    assert any(f"redis://:***@127.0.0.1:{server.port}/0" in r.getMessage() for r in caplog.records)
    for record in caplog.records:
        assert secret not in record.getMessage()
        assert "wrong-pw" not in record.getMessage()
    assert secret not in caplog.text


async def test_rediss_speaks_tls(make_redis_server: Callable[..., RedisServer]) -> None:
    secret = "tls-s3cret"
    server = make_redis_server(password=secret, tls=True)
    assert server.url().startswith("rediss://")
    registry = await open_registry(server.url())
    try:
        assert secret not in registry.url_for_logs
        assert registry.url_for_logs.startswith(f"rediss://:***@127.0.0.1:{server.port}/0?ssl_ca_certs=")
        assert await registry.try_claim(_name(), "owner", LONG_LEASE) == Claimed()
        assert await registry.finish_claim(_name(), "owner", Status.DOWNLOADED)
        with server.client() as client:
            assert client.hget(KEY_PREFIX + _name(), "status") == "DOWNLOADED"
    finally:
        await registry.aclose()
    # Plain text to a TLS port does not get through.
    with trio.fail_after(5), pytest.raises(RegistryError):
        await open_registry(f"redis://:{secret}@127.0.0.1:{server.port}/0?socket_timeout=0.5")


async def test_outage_fails_fast_and_reconnects(make_redis_server: Callable[..., RedisServer]) -> None:
    server = make_redis_server()
    registry = await open_registry(server.url())
    try:
        await registry.set_status(_name(0), Status.DOWNLOADED)

        await trio.to_thread.run_sync(server.stop)
        with trio.fail_after(5):
            with pytest.raises(RegistryError, match=re.escape(f"127.0.0.1:{server.port}")):
                await registry.get_status(_name(0))
            with pytest.raises(RegistryError):
                await registry.try_claim(_name(1), "owner", LONG_LEASE)
            with pytest.raises(RegistryError):
                await registry.list_by_last_used()

        # Back on the same port (empty: persistence is off): the same registry works again,
        # scripts included (redis-py reloads them when the new server answers NOSCRIPT).
        await trio.to_thread.run_sync(server.start)
        assert await registry.get_status(_name(0)) is None
        assert await registry.try_claim(_name(1), "owner", LONG_LEASE) == Claimed()
        assert await registry.finish_claim(_name(1), "owner", Status.DOWNLOADED)
        assert [r.model_name for r in await registry.list_by_last_used()] == [_name(1)]
    finally:
        await registry.aclose()


async def test_unreachable_redis_fails_fast() -> None:
    # Nobody listens: refused at once.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with trio.fail_after(5), pytest.raises(RegistryError, match="Connection refused"):
        await open_registry(f"redis://127.0.0.1:{port}/0")

    # Something accepts connections but never answers: the read timeout ends the wait.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        port = silent.getsockname()[1]
        started = time.monotonic()
        with trio.fail_after(5), pytest.raises(RegistryError, match=r"[Tt]ime(d )?out"):
            await open_registry(f"redis://127.0.0.1:{port}/0?socket_timeout=0.3")
        assert time.monotonic() - started < 3


async def test_timeouts_and_pool_size_are_set(open_redis: OpenRegistry) -> None:
    registry = await open_redis()
    kwargs = registry._pool.connection_kwargs
    assert kwargs["socket_connect_timeout"] == redis_backend.CONNECT_TIMEOUT
    assert kwargs["socket_timeout"] == redis_backend.READ_TIMEOUT
    assert registry._pool.max_connections == redis_backend.POOL_SIZE == registry._limiter.total_tokens


async def test_closed_registry_raises_registry_error(db: redis.Redis, open_redis: OpenRegistry) -> None:
    registry = await open_redis()
    await registry.aclose()
    await registry.aclose()
    with pytest.raises(RegistryError, match="closed"):
        await registry.get_status(_name())


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("redis:///0", "no host"),
        ("redis://:pw-in-url@h/zero", "database number"),
        ("redis://:pw-in-url@h/0/1", "database number"),
        ("redis://:pw-in-url@h:99999999/0", "invalid"),
        ("rediss://h/0#frag", "fragment"),
        ("redis://:pw-in-url@h/0?no_such_option=1", "no_such_option"),
    ],
)
async def test_bad_redis_urls_are_rejected(url: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason) as raised:
        await open_registry(url)
    assert "pw-in-url" not in str(raised.value)


# -- pub/sub -------------------------------------------------------------------------------------


async def test_finishing_publishes_the_entry_name(
    redis_server: RedisServer, db: redis.Redis, open_redis: OpenRegistry
) -> None:
    registry = await open_redis()
    subscriber = db.pubsub(ignore_subscribe_messages=True)
    subscriber.subscribe(FINISHED_CHANNEL)
    # Wait for the subscription to be in place before anything is published.
    confirmation = await trio.to_thread.run_sync(lambda: subscriber.get_message(timeout=5))
    assert confirmation is None or confirmation["type"] == "subscribe"

    def published() -> list[str]:
        """What arrived within a short while."""
        messages = []
        while (message := subscriber.get_message(timeout=0.2)) is not None:
            messages.append(message["data"])
        return messages

    try:
        name, other = _name(0), _name(1)
        assert await registry.try_claim(name, "owner", LONG_LEASE) == Claimed()
        await registry.set_status(name, Status.DOWNLOADING, "50%")
        assert not await registry.finish_claim(name, "intruder", Status.DOWNLOADED)
        assert await trio.to_thread.run_sync(published) == []

        assert await registry.finish_claim(name, "owner", Status.DOWNLOADED)
        await registry.set_status(other, Status.ERROR, "broken")
        await registry.set_status(other, Status.DOWNLOADED)
        assert await trio.to_thread.run_sync(published) == [name, other, other]
    finally:
        subscriber.close()


async def test_listen_finished_hears_every_node_and_survives_a_restart(
    make_redis_server: Callable[..., RedisServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(redis_backend, "MAX_RESUBSCRIBE_DELAY", 0.5)
    server = make_redis_server()
    listener, writer = await open_registry(server.url()), await open_registry(server.url())
    assert isinstance(listener, RedisRegistry) and isinstance(writer, RedisRegistry)
    heard: list[str] = []
    arrived = trio.Event()

    def on_finished(name: str) -> None:
        heard.append(name)
        arrived.set()

    async def finish(name: str) -> None:
        """Finish ``name`` from the other client until the listener hears it (its subscription
        may still be on its way: a message published before it is in place is not delivered)."""
        nonlocal arrived
        arrived = trio.Event()
        with trio.fail_after(15):
            while name not in heard:
                await writer.set_status(name, Status.DOWNLOADED)
                with trio.move_on_after(0.5):
                    await arrived.wait()

    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(listener.listen_finished, on_finished)
            assert await writer.try_claim(_name(0), "owner", LONG_LEASE) == Claimed()
            assert await writer.finish_claim(_name(0), "owner", Status.DOWNLOADED)
            await finish(_name(0))
            # Redis restarts: the listener subscribes again by itself.
            await trio.to_thread.run_sync(server.stop)
            await trio.sleep(0.5)
            await trio.to_thread.run_sync(server.start)
            await finish(_name(1))
            assert set(heard) == {_name(0), _name(1)}
            nursery.cancel_scope.cancel()
    finally:
        await listener.aclose()
        await writer.aclose()


# -- races between nodes -------------------------------------------------------------------------


async def test_claims_race_across_16_registries(db: redis.Redis, open_redis: OpenRegistry) -> None:
    registries = [await open_redis() for _ in range(16)]
    names = [_name(i) for i in range(24)]
    won: dict[int, list[str]] = {i: [] for i in range(len(registries))}

    async def racer(i: int) -> None:
        order = names[:]
        random.Random(i).shuffle(order)
        for name in order:
            if await registries[i].try_claim(name, f"node-{i}", LONG_LEASE) == Claimed():
                won[i].append(name)

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            for i in range(len(registries)):
                nursery.start_soon(racer, i)

    all_won = [name for names_won in won.values() for name in names_won]
    assert sorted(all_won) == sorted(names)
    for i, names_won in won.items():
        for name in names_won:
            assert db.hget(KEY_PREFIX + name, "claim_id") == f"node-{i}"
    # Then a takeover race on expired leases: again exactly one winner per entry.
    name = _name(99)
    assert await registries[0].try_claim(name, "short", 0.05) == Claimed()
    await trio.sleep(0.1)
    outcomes: list[object] = [None] * len(registries)

    async def take(i: int) -> None:
        outcomes[i] = await registries[i].try_claim(name, f"taker-{i}", LONG_LEASE)

    async with trio.open_nursery() as nursery:
        for i in range(len(registries)):
            nursery.start_soon(take, i)
    assert outcomes.count(Claimed()) == 1
    assert outcomes.count(AlreadyExists(Status.DOWNLOADING)) == len(registries) - 1
    assert db.hget(KEY_PREFIX + name, "claim_id") == f"taker-{outcomes.index(Claimed())}"
    _assert_schema(db)
