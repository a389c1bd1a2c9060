"""The conformance suite every registry backend must pass (DESIGN section 3).

Each test gets ``make_registry``: an async factory that opens a new, independent client (its own
connection) onto one store shared by the whole test, so a test can play several nodes or
processes.  To add a backend, add its name to ``BACKENDS`` and a branch in ``make_registry`` that
names (and at teardown empties) a fresh store.  The Redis branch uses the session's
``redis_server`` (tests/redis_server.py) and flushes its database before and after each test.
The Kubernetes branch gives each test a namespace of its own on the session's API-server
stand-in (tests/kube_apiserver.py), reached through a KUBECONFIG written for the test.

Backends use their own clock, so tests that need time to pass sleep for real (``trio.sleep``),
and compare backend timestamps with each other rather than with Python's clock.

The Kubernetes backend has no clock of its own to judge leases by: a node presumes an owner dead
once the owner's lease heartbeat (or a lock's resourceVersion) has stood unchanged for the lease
as measured by the node's own monotonic clock, from the first time that node read it.  The
takeover tests below hold for it as they are because the taking client always reads the record
(or lock) after the owner's last write and before sleeping: ``new.try_claim`` before the sleep in
the takeover test, ``b.unlock`` after ``a``'s renewal in the lock test.  Keep that order when
changing them: a client that first looks after the sleep must wait one more lease.  Peer holders
expire the same way there (a holder's value unchanged for its ttl), so the expiry test reads
them on the other client before sleeping too.
"""

from __future__ import annotations

import contextlib
import sqlite3
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import trio

from mxfs.names import EntryName
from mxfs.registry import (
    PROVIDER,
    AlreadyExists,
    Claimed,
    Holder,
    Record,
    Registry,
    Status,
    StatusCounts,
    open_registry,
)
from mxfs.registry import sqlite as sqlite_backend
from tests.kube_apiserver import KubeTarget, kube_apiserver_fixture, kube_target_fixture  # noqa: F401
from tests.redis_server import RedisServer

BACKENDS = ["sqlite", "redis", "kubernetes"]

# Long enough that a lease never expires by accident during a test.
LONG_LEASE = 30.0
# Short enough to wait out; comfortably above scheduling noise.
SHORT_LEASE = 0.3
# Sleep between writes whose timestamps must differ: backends store at least milliseconds.
TICK = 0.01

OpenClient = Callable[[], Awaitable[Registry]]


@pytest.fixture(params=BACKENDS)
async def make_registry(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[OpenClient]:
    redis_admin = None
    if request.param == "sqlite":
        url = "sqlite://" + quote(str(tmp_path / "registry.db"))
    elif request.param == "redis":
        # Asked for here rather than as an argument, so that SQLite runs need no redis-server.
        server: RedisServer = request.getfixturevalue("redis_server")
        url = server.url()
        redis_admin = server.client()
        redis_admin.flushdb()
    elif request.param == "kubernetes":
        # Asked for here too, so that the other backends' runs start no stand-in; the namespace
        # is dropped at teardown.
        target: KubeTarget = request.getfixturevalue("kube_target")
        url = target.url
    else:  # pragma: no cover - a backend listed without a branch here
        raise AssertionError(f"no store for backend {request.param}")

    clients: list[Registry] = []

    async def open_client() -> Registry:
        client = await open_registry(url)
        clients.append(client)
        return client

    try:
        yield open_client
    finally:
        for client in clients:
            await client.aclose()
        if redis_admin is not None:
            redis_admin.flushdb()
            redis_admin.close()


def _name(i: int = 0) -> str:
    return EntryName(f"org/model-{i}", f"{i:040x}").key


def _claim_id() -> str:
    return uuid.uuid4().hex


async def _race(calls: list[Callable[[], Awaitable[Any]]]) -> list[Any]:
    """Run ``calls`` concurrently (each backend client does its blocking work in its own thread)."""
    results: list[Any] = [None] * len(calls)

    async def run(i: int) -> None:
        results[i] = await calls[i]()

    async with trio.open_nursery() as nursery:
        for i in range(len(calls)):
            nursery.start_soon(run, i)
    return results


async def _record(registry: Registry, name: str) -> Record:
    record = await registry.get_record(name)
    assert record is not None, f"{name} has no record"
    return record


async def _make_entry(registry: Registry, name: str, status: Status) -> None:
    """Bring ``name`` into ``status`` the way mxfs does: claim, then finish."""
    claim_id = _claim_id()
    assert await registry.try_claim(name, claim_id, LONG_LEASE) == Claimed()
    if status is not Status.DOWNLOADING:
        assert await registry.finish_claim(name, claim_id, status, message=f"made {status}")


# -- claiming ------------------------------------------------------------------------------------


async def test_claim_fresh_entry_then_second_claimer_sees_downloading(make_registry: OpenClient) -> None:
    node_a, node_b = await make_registry(), await make_registry()
    name = _name()
    assert await node_a.get_status(name) is None
    assert await node_a.get_record(name) is None

    assert await node_a.try_claim(name, "claim-a", LONG_LEASE) == Claimed()
    record = await _record(node_b, name)
    assert await node_b.try_claim(name, "claim-b", LONG_LEASE) == AlreadyExists(Status.DOWNLOADING)
    assert await node_a.try_claim(name, "claim-a", LONG_LEASE) == AlreadyExists(Status.DOWNLOADING)
    # The loser learns whose claim runs, in the same step (a waiter judges its claimant by it).
    lost = await node_b.try_claim(name, "claim-b", LONG_LEASE)
    assert isinstance(lost, AlreadyExists) and lost.claim_id == "claim-a"

    # The losing claims changed nothing.
    assert await _record(node_b, name) == record
    assert await node_b.get_status(name) is Status.DOWNLOADING
    assert record.model_name == name
    assert record.provider == PROVIDER
    assert record.status is Status.DOWNLOADING
    assert record.claim_id == "claim-a"
    assert record.message is None
    assert record.pinned is False
    assert record.size_bytes is None
    assert abs(record.last_used_at - record.created_at) < timedelta(seconds=1)
    assert record.lease_expires_at is not None
    lease = record.lease_expires_at - record.created_at
    assert timedelta(seconds=LONG_LEASE - 1) <= lease <= timedelta(seconds=LONG_LEASE + 1)


async def test_claim_is_atomic_under_contention(make_registry: OpenClient) -> None:
    clients = [await make_registry() for _ in range(16)]
    claim_ids = [f"node-{i}" for i in range(len(clients))]
    name = _name()

    outcomes = await _race(
        [
            lambda c=client, cid=claim_id: c.try_claim(name, cid, LONG_LEASE)
            for client, claim_id in zip(clients, claim_ids, strict=True)
        ]
    )

    winners = [cid for cid, outcome in zip(claim_ids, outcomes, strict=True) if outcome == Claimed()]
    assert len(winners) == 1, outcomes
    assert outcomes.count(AlreadyExists(Status.DOWNLOADING)) == len(clients) - 1
    assert (await _record(clients[0], name)).claim_id == winners[0]


async def test_takeover_after_lease_expiry_fences_out_old_owner(make_registry: OpenClient) -> None:
    old, new = await make_registry(), await make_registry()
    name = _name()
    assert await old.try_claim(name, "old", SHORT_LEASE) == Claimed()
    assert await new.try_claim(name, "new", LONG_LEASE) == AlreadyExists(Status.DOWNLOADING)
    created_at = (await _record(new, name)).created_at

    await trio.sleep(SHORT_LEASE + 0.1)
    assert await new.try_claim(name, "new", LONG_LEASE) == Claimed()
    taken = await _record(new, name)
    assert taken.claim_id == "new"
    assert taken.status is Status.DOWNLOADING
    assert taken.created_at == created_at

    # The old owner can no longer extend or publish anything.
    assert await old.refresh_claim(name, "old", LONG_LEASE) is False
    assert await old.finish_claim(name, "old", Status.DOWNLOADED, size_bytes=1) is False
    assert await _record(new, name) == taken

    assert await new.finish_claim(name, "new", Status.DOWNLOADED, size_bytes=7) is True
    finished = await _record(old, name)
    assert finished.status is Status.DOWNLOADED
    assert finished.size_bytes == 7
    assert finished.created_at == created_at


async def test_refresh_extends_lease_and_prevents_takeover(make_registry: OpenClient) -> None:
    owner, other = await make_registry(), await make_registry()
    name = _name()
    assert await owner.try_claim(name, "owner", SHORT_LEASE) == Claimed()
    before = await _record(owner, name)

    await trio.sleep(SHORT_LEASE * 2 / 3)
    assert await owner.refresh_claim(name, "owner", LONG_LEASE) is True
    after = await _record(owner, name)
    assert before.lease_expires_at is not None and after.lease_expires_at is not None
    assert after.lease_expires_at > before.lease_expires_at + timedelta(seconds=LONG_LEASE - SHORT_LEASE - 1)
    assert after.claim_id == "owner"

    # Past the original lease: the refreshed one still holds.
    await trio.sleep(SHORT_LEASE * 2 / 3)
    assert await other.try_claim(name, "other", LONG_LEASE) == AlreadyExists(Status.DOWNLOADING)
    assert (await _record(other, name)).claim_id == "owner"

    assert await other.refresh_claim(name, "other", LONG_LEASE) is False
    assert await other.refresh_claim(_name(1), "owner", LONG_LEASE) is False
    assert await other.get_record(_name(1)) is None
    assert await _record(owner, name) == after


@pytest.mark.parametrize("status", [Status.DOWNLOADED, Status.ERROR])
async def test_finish_claim_publishes_outcome(make_registry: OpenClient, status: Status) -> None:
    registry = await make_registry()
    name = _name()
    assert await registry.try_claim(name, "owner", LONG_LEASE) == Claimed()
    claimed = await _record(registry, name)
    await trio.sleep(TICK)

    assert await registry.finish_claim(name, "owner", status, message="outcome", size_bytes=123) is True
    finished = await _record(registry, name)
    assert finished.status is status
    assert finished.message == "outcome"
    assert finished.size_bytes == 123
    assert finished.claim_id is None
    assert finished.lease_expires_at is None
    assert finished.created_at == claimed.created_at
    assert finished.last_used_at > claimed.last_used_at
    assert finished.provider == PROVIDER

    # Finishing twice, or something that does not exist, is refused and changes nothing.
    assert await registry.finish_claim(name, "owner", Status.ERROR, message="again") is False
    assert await _record(registry, name) == finished
    assert await registry.finish_claim(_name(1), "owner", Status.DOWNLOADED) is False
    assert await registry.get_record(_name(1)) is None


# -- retaking ERROR and DOWNLOADED entries -------------------------------------------------------


@pytest.mark.parametrize("from_status", [Status.ERROR, Status.DOWNLOADED])
async def test_retake_has_exactly_one_winner(make_registry: OpenClient, from_status: Status) -> None:
    clients = [await make_registry() for _ in range(8)]
    name = _name()
    await _make_entry(clients[0], name, from_status)
    before = await _record(clients[0], name)
    claim_ids = [f"retry-{i}" for i in range(len(clients))]

    def retake(client: Registry, claim_id: str) -> Callable[[], Awaitable[bool]]:
        if from_status is Status.ERROR:
            return lambda: client.try_reset_error_for_retry(name, claim_id, LONG_LEASE)
        return lambda: client.try_retake(name, claim_id, LONG_LEASE, from_status)

    results = await _race([retake(c, cid) for c, cid in zip(clients, claim_ids, strict=True)])

    winners = [cid for cid, won in zip(claim_ids, results, strict=True) if won]
    assert len(winners) == 1, results
    after = await _record(clients[0], name)
    assert after.status is Status.DOWNLOADING
    assert after.claim_id == winners[0]
    assert after.created_at == before.created_at
    assert after.lease_expires_at is not None
    assert after.lease_expires_at - after.last_used_at > timedelta(seconds=LONG_LEASE - 1)

    # The winner owns it like a claim: others are fenced out, the winner can finish.
    assert await clients[1].try_claim(name, "late", LONG_LEASE) == AlreadyExists(Status.DOWNLOADING)
    assert await clients[1].finish_claim(name, "late", Status.DOWNLOADED) is False
    assert await clients[1].finish_claim(name, winners[0], Status.DOWNLOADED) is True


async def test_retake_refuses_other_statuses_and_unknown_entries(make_registry: OpenClient) -> None:
    registry = await make_registry()
    names = {status: _name(i) for i, status in enumerate(Status)}
    for status, name in names.items():
        await _make_entry(registry, name, status)
    before = {name: await _record(registry, name) for name in names.values()}

    for status, name in names.items():
        for from_status in Status:
            if from_status is not status:
                assert await registry.try_retake(name, "x", LONG_LEASE, from_status) is False
        if status is not Status.ERROR:
            assert await registry.try_reset_error_for_retry(name, "x", LONG_LEASE) is False
    for name, record in before.items():
        assert await _record(registry, name) == record

    unknown = _name(99)
    assert await registry.try_reset_error_for_retry(unknown, "x", LONG_LEASE) is False
    assert await registry.try_retake(unknown, "x", LONG_LEASE, Status.DOWNLOADED) is False
    assert await registry.get_record(unknown) is None


# -- set_status, touch, delete -------------------------------------------------------------------


async def test_set_status_keeps_created_at_and_pinned(make_registry: OpenClient) -> None:
    registry = await make_registry()
    name = _name()
    await registry.set_status(name, Status.DOWNLOADED)
    created = await _record(registry, name)
    assert created.status is Status.DOWNLOADED
    assert created.provider == PROVIDER
    assert created.message is None
    assert abs(created.last_used_at - created.created_at) < timedelta(seconds=1)
    assert await registry.set_pinned(name, True) is True
    await trio.sleep(TICK)

    await registry.set_status(name, Status.ERROR, "disk on fire")
    updated = await _record(registry, name)
    assert updated.status is Status.ERROR
    assert updated.message == "disk on fire"
    assert updated.created_at == created.created_at
    assert updated.pinned is True
    assert updated.last_used_at > created.last_used_at
    assert await registry.get_status(name) is Status.ERROR


async def test_set_status_to_final_status_ends_the_claim(make_registry: OpenClient) -> None:
    owner, admin = await make_registry(), await make_registry()
    name = _name()
    assert await owner.try_claim(name, "owner", LONG_LEASE) == Claimed()

    # A progress write keeps the owner...
    await admin.set_status(name, Status.DOWNLOADING, "50%")
    progress = await _record(admin, name)
    assert progress.claim_id == "owner"
    assert progress.message == "50%"
    assert await owner.refresh_claim(name, "owner", LONG_LEASE) is True

    # ...a final status has no owner, so the old one can no longer publish over it.
    await admin.set_status(name, Status.ERROR, "cancelled by operator")
    ended = await _record(admin, name)
    assert ended.claim_id is None
    assert ended.lease_expires_at is None
    assert await owner.refresh_claim(name, "owner", LONG_LEASE) is False
    assert await owner.finish_claim(name, "owner", Status.DOWNLOADED) is False
    assert await _record(admin, name) == ended


async def test_touch_updates_last_used_at_only(make_registry: OpenClient) -> None:
    registry = await make_registry()
    name = _name()
    await _make_entry(registry, name, Status.DOWNLOADED)
    assert await registry.set_pinned(name, True)
    before = await _record(registry, name)
    await trio.sleep(TICK)

    await registry.touch(name)
    after = await _record(registry, name)
    assert after.last_used_at > before.last_used_at
    assert after == replace(before, last_used_at=after.last_used_at)


async def test_touch_and_delete_of_unknown_entries_are_noops(make_registry: OpenClient) -> None:
    registry = await make_registry()
    name = _name()
    await registry.touch(name)
    await registry.delete(name)
    assert await registry.get_record(name) is None
    assert await registry.list_by_last_used() == []

    await _make_entry(registry, name, Status.DOWNLOADED)
    await registry.delete(name)
    assert await registry.get_record(name) is None
    await registry.delete(name)


async def test_delete_if_unchanged(make_registry: OpenClient) -> None:
    registry, other = await make_registry(), await make_registry()
    unchanged, touched, restatused, listed = (_name(i) for i in range(4))
    for name in (unchanged, touched, restatused, listed):
        await _make_entry(registry, name, Status.DOWNLOADED)
    seen = {name: await _record(registry, name) for name in (unchanged, touched, restatused)}
    await trio.sleep(TICK)

    assert await other.delete_if_unchanged(unchanged, Status.DOWNLOADED, seen[unchanged].last_used_at)
    assert await registry.get_record(unchanged) is None

    await other.touch(touched)
    assert not await registry.delete_if_unchanged(touched, Status.DOWNLOADED, seen[touched].last_used_at)
    assert await registry.get_record(touched) is not None

    assert await other.try_retake(restatused, "re", LONG_LEASE, Status.DOWNLOADED)
    record = seen[restatused]
    assert not await registry.delete_if_unchanged(restatused, record.status, record.last_used_at)
    assert await registry.get_record(restatused) is not None

    # A status different from the stored one never matches, nor does an unknown entry.
    current = await _record(registry, touched)
    assert not await registry.delete_if_unchanged(touched, Status.ERROR, current.last_used_at)
    assert not await registry.delete_if_unchanged(_name(99), Status.DOWNLOADED, current.last_used_at)

    # Records from a listing can be passed back as they are.
    [from_listing] = [r for r in await registry.list_by_last_used() if r.model_name == listed]
    assert await registry.delete_if_unchanged(listed, from_listing.status, from_listing.last_used_at)
    assert await registry.get_record(listed) is None


# -- listing and counting ------------------------------------------------------------------------


async def test_list_by_last_used_is_oldest_first(make_registry: OpenClient) -> None:
    registry = await make_registry()
    names = [_name(i) for i in range(4)]
    for name, status in zip(names, [*Status, Status.DOWNLOADED], strict=True):
        await _make_entry(registry, name, status)
    order = [names[2], names[0], names[3], names[1]]
    for name in order:
        await trio.sleep(TICK)
        await registry.touch(name)

    listed = await registry.list_by_last_used()
    assert [r.model_name for r in listed] == order
    assert [r.last_used_at for r in listed] == sorted(r.last_used_at for r in listed)
    assert listed[0] == await _record(registry, order[0])
    assert [r.model_name for r in await registry.list_by_last_used(limit=2)] == order[:2]
    assert [r.model_name for r in await registry.list_by_last_used(limit=10)] == order
    assert await registry.list_by_last_used(limit=0) == []


async def test_status_counts(make_registry: OpenClient) -> None:
    registry = await make_registry()
    assert await registry.status_counts() == StatusCounts()
    statuses = [Status.DOWNLOADING] * 2 + [Status.DOWNLOADED] + [Status.ERROR] * 3
    for i, status in enumerate(statuses):
        await _make_entry(registry, _name(i), status)
    assert await registry.status_counts() == StatusCounts(downloading=2, downloaded=1, error=3)
    await registry.delete(_name(0))
    assert await registry.status_counts() == StatusCounts(downloading=1, downloaded=1, error=3)


# -- pinning -------------------------------------------------------------------------------------


async def test_pinning(make_registry: OpenClient) -> None:
    registry = await make_registry()
    name = _name()
    assert await registry.set_pinned(name, True) is False
    assert await registry.get_record(name) is None

    assert await registry.try_claim(name, "owner", LONG_LEASE) == Claimed()
    assert (await _record(registry, name)).pinned is False
    assert await registry.set_pinned(name, True) is True
    assert await registry.finish_claim(name, "owner", Status.DOWNLOADED) is True
    assert (await _record(registry, name)).pinned is True
    await registry.set_status(name, Status.ERROR, "broken")
    assert (await _record(registry, name)).pinned is True
    assert await registry.try_reset_error_for_retry(name, "retry", LONG_LEASE) is True
    assert (await _record(registry, name)).pinned is True

    assert await registry.set_pinned(name, False) is True
    assert (await _record(registry, name)).pinned is False
    assert await registry.set_pinned(name, False) is True


# -- time ----------------------------------------------------------------------------------------


async def test_timestamps_are_timezone_aware_utc(make_registry: OpenClient) -> None:
    registry = await make_registry()
    await _make_entry(registry, _name(0), Status.DOWNLOADING)
    await _make_entry(registry, _name(1), Status.DOWNLOADED)
    records = await registry.list_by_last_used()
    stamps = [r.created_at for r in records] + [r.last_used_at for r in records]
    stamps += [r.lease_expires_at for r in records if r.lease_expires_at is not None]
    assert len(stamps) == 5
    now = datetime.now(UTC)
    for stamp in stamps:
        assert stamp.tzinfo is not None
        assert stamp.utcoffset() == timedelta(0)
        # Loose: the backend's clock is its own, but it is a clock of this century and this unit.
        assert abs(stamp - now) < timedelta(minutes=5) + timedelta(seconds=LONG_LEASE)


# -- SQLite across processes ---------------------------------------------------------------------

# Each racer opens the registry, reports ready through it, waits for "go", then tries to claim
# every name, in its own order so that all racers stay busy until the end; it prints the names it
# won.
_RACER = """
import random, sys, trio
from mxfs.registry import Claimed, Status, open_registry

async def main(url, me, names):
    registry = await open_registry(url)
    await registry.set_status("ready:" + me, Status.DOWNLOADED)
    while await registry.get_status("go") is None:
        await trio.sleep(0.0005)
    random.Random(me).shuffle(names)
    won = [name for name in names if await registry.try_claim(name, me, 30) == Claimed()]
    await registry.aclose()
    print("\\n".join(won))

trio.run(main, sys.argv[1], sys.argv[2], sys.argv[3:])
"""


async def test_sqlite_claim_is_atomic_across_processes(tmp_path: Path) -> None:
    url = "sqlite://" + quote(str(tmp_path / "registry.db"))
    racers = [f"proc-{i}" for i in range(4)]
    names = [_name(i) for i in range(100)]
    won: dict[str, list[str]] = {}

    async def race(me: str) -> None:
        result = await trio.run_process(
            [sys.executable, "-c", _RACER, url, me, *names], capture_stdout=True, check=True
        )
        won[me] = result.stdout.decode().split()

    registry = await open_registry(url)
    try:
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                for me in racers:
                    nursery.start_soon(race, me)
                # Polling, not a trio.Event: the signal comes from other processes.
                while any([await registry.get_status("ready:" + me) is None for me in racers]):  # noqa: ASYNC110
                    await trio.sleep(0.005)
                await registry.set_status("go", Status.DOWNLOADED)
        all_won = [name for me in racers for name in won[me]]
        assert sorted(all_won) == sorted(names)
        for me in racers:
            for name in won[me]:
                assert (await _record(registry, name)).claim_id == me
    finally:
        await registry.aclose()


async def test_lock_is_exclusive_expires_and_is_released_only_by_its_owner(make_registry: OpenClient) -> None:
    a, b = await make_registry(), await make_registry()
    assert await a.try_lock("evict", "owner-a", 0.3)
    assert not await b.try_lock("evict", "owner-b", 0.3)
    assert await a.try_lock("evict", "owner-a", 0.3)  # the holder may renew
    assert not await b.unlock("evict", "owner-b")  # not b's to release
    await trio.sleep(0.45)
    assert await b.try_lock("evict", "owner-b", 5)  # a's expired: b takes it
    assert not await a.unlock("evict", "owner-a")  # a's late release changes nothing
    assert not await a.try_lock("evict", "owner-a", 5)
    assert await b.unlock("evict", "owner-b")
    assert await a.try_lock("evict", "owner-a", 5)


async def test_lock_has_one_winner_among_concurrent_callers(make_registry: OpenClient) -> None:
    clients = [await make_registry() for _ in range(8)]
    wins: list[int] = []

    async def attempt(i: int) -> None:
        if await clients[i].try_lock("evict", f"owner-{i}", 30):
            wins.append(i)

    async with trio.open_nursery() as nursery:
        for i in range(len(clients)):
            nursery.start_soon(attempt, i)
    assert len(wins) == 1


async def test_locks_do_not_appear_as_entries(make_registry: OpenClient) -> None:
    registry = await make_registry()
    assert await registry.try_lock("evict", "me", 30)
    assert await registry.list_by_last_used() == []


# -- ref records (cluster-wide refresh) ----------------------------------------------------------

COMMIT_A, COMMIT_B, COMMIT_C = "a" * 40, "b" * 40, "c" * 40


async def test_ref_records_are_versioned_and_seen_by_every_client(make_registry: OpenClient) -> None:
    writer, follower = await make_registry(), await make_registry()
    assert await follower.refs_version() == 0
    assert await follower.refs_since(0) == []

    first = await writer.record_ref("org/model", "main", COMMIT_A)
    assert (first.repo_id, first.revision, first.commit) == ("org/model", "main", COMMIT_A)
    assert first.version > 0
    assert first.recorded_at.tzinfo is not None
    assert await follower.refs_version() == first.version
    assert await follower.refs_since(0) == [first]
    assert await follower.refs_since(first.version) == []

    # The same commit again is no news: no follower is woken for it.
    assert await writer.record_ref("org/model", "main", COMMIT_A) == first
    assert await follower.refs_version() == first.version

    other = await writer.record_ref("org/other", "v1.0", COMMIT_B)
    moved = await writer.record_ref("org/model", "main", COMMIT_C)
    assert first.version < other.version < moved.version
    assert await follower.refs_version() == moved.version
    # One record per ref, the latest; oldest version first.
    assert await follower.refs_since(0) == [other, moved]
    assert await follower.refs_since(other.version) == [moved]
    assert await follower.refs_since(moved.version) == []


async def test_concurrent_ref_records_get_distinct_versions(make_registry: OpenClient) -> None:
    clients = [await make_registry() for _ in range(6)]
    commits = [f"{i:040x}" for i in range(len(clients))]
    records = await _race(
        [lambda c=c, i=i: c.record_ref("org/model", f"branch-{i % 3}", commits[i]) for i, c in enumerate(clients)]
    )
    assert len({r.version for r in records}) == len(records)
    stored = await clients[0].refs_since(0)
    assert sorted(r.revision for r in stored) == ["branch-0", "branch-1", "branch-2"]
    for record in stored:
        # Of two writers of one ref, the stored record is the later (higher) version.
        rivals = [r for r in records if r.revision == record.revision]
        assert record == max(rivals, key=lambda r: r.version)
    assert await clients[0].refs_version() == max(r.version for r in records)


# -- peer holders (issue 16: peers) --------------------------------------------------------------

ADDRESS_A, ADDRESS_B = "http://10.0.0.5:7170", "http://10.0.0.6:7170"


def _nodes(holders: list[Holder]) -> list[str]:
    return [h.node for h in holders]


async def test_holder_put_refresh_and_drop(make_registry: OpenClient) -> None:
    registry = await make_registry()
    name = _name()
    assert await registry.holders(name) == []

    await registry.put_holder(name, "node-a", ADDRESS_A, False, LONG_LEASE)
    [first] = await registry.holders(name)
    assert (first.node, first.address, first.complete) == ("node-a", ADDRESS_A, False)
    assert first.expires_at.tzinfo is not None and first.expires_at.utcoffset() == timedelta(0)

    # Re-putting refreshes the expiry, and may flip complete and move the address.
    await trio.sleep(TICK)
    await registry.put_holder(name, "node-a", ADDRESS_B, True, LONG_LEASE)
    [again] = await registry.holders(name)
    assert (again.node, again.address, again.complete) == ("node-a", ADDRESS_B, True)
    assert again.expires_at > first.expires_at
    await registry.put_holder(name, "node-a", ADDRESS_B, False, LONG_LEASE)
    assert [h.complete for h in await registry.holders(name)] == [False]

    await registry.drop_holder(name, "node-a")
    assert await registry.holders(name) == []
    # Dropping what is not there changes nothing and raises nothing.
    await registry.drop_holder(name, "node-a")
    await registry.drop_holder(_name(1), "node-a")
    assert await registry.holders(_name(1)) == []


async def test_holder_ttl_must_be_a_positive_number_of_seconds(make_registry: OpenClient) -> None:
    registry = await make_registry()
    for ttl in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="ttl"):
            await registry.put_holder(_name(), "node-a", ADDRESS_A, True, ttl)
    assert await registry.holders(_name()) == []


async def test_expired_holders_are_never_listed(make_registry: OpenClient) -> None:
    writer, reader = await make_registry(), await make_registry()
    name = _name()
    await writer.put_holder(name, "short", ADDRESS_A, True, SHORT_LEASE)
    await writer.put_holder(name, "long", ADDRESS_B, True, LONG_LEASE)
    await writer.put_holder(name, "refreshed", ADDRESS_B, False, SHORT_LEASE)
    # Whenever it lands, this put leaves "refreshed" a long ttl: it must outlive the short one.
    await writer.put_holder(name, "refreshed", ADDRESS_B, False, LONG_LEASE)
    assert _nodes(await reader.holders(name)) == ["long", "short", "refreshed"]

    await trio.sleep(SHORT_LEASE + 0.1)
    # Bounded: expiry is judged at the read, so the first read after the ttl must not list it.
    for client in (reader, writer):
        assert _nodes(await client.holders(name)) == ["long", "refreshed"]
    # Expired holders may come back by being put again.
    await writer.put_holder(name, "short", ADDRESS_A, False, LONG_LEASE)
    assert _nodes(await reader.holders(name)) == ["long", "refreshed", "short"]


async def test_holders_are_ordered_complete_first_then_by_node(make_registry: OpenClient) -> None:
    registry = await make_registry()
    name = _name()
    for node, complete in [("n-c", False), ("n-d", True), ("n-a", False), ("n-b", True), ("n-e", False)]:
        await registry.put_holder(name, node, f"http://{node}:7170", complete, LONG_LEASE)
    holders = await registry.holders(name)
    assert [(h.node, h.complete) for h in holders] == [
        ("n-b", True),
        ("n-d", True),
        ("n-a", False),
        ("n-c", False),
        ("n-e", False),
    ]
    assert [h.address for h in holders] == [f"http://{h.node}:7170" for h in holders]


async def test_every_client_sees_every_nodes_holders(make_registry: OpenClient) -> None:
    a, b = await make_registry(), await make_registry()
    one, two = _name(1), _name(2)
    await a.put_holder(one, "node-a", ADDRESS_A, True, LONG_LEASE)
    await b.put_holder(one, "node-b", ADDRESS_B, False, LONG_LEASE)
    await b.put_holder(two, "node-b", ADDRESS_B, True, LONG_LEASE)
    for client in (a, b):
        assert [(h.node, h.address, h.complete) for h in await client.holders(one)] == [
            ("node-a", ADDRESS_A, True),
            ("node-b", ADDRESS_B, False),
        ]
        assert [(h.node, h.complete) for h in await client.holders(two)] == [("node-b", True)]

    # One node's drop leaves the other node's holder, and the same node's holder of another entry.
    await b.drop_holder(one, "node-b")
    assert _nodes(await a.holders(one)) == ["node-a"]
    assert _nodes(await a.holders(two)) == ["node-b"]
    await b.put_holder(one, "node-b", ADDRESS_B, True, LONG_LEASE)
    assert _nodes(await a.holders(one)) == ["node-a", "node-b"]


async def test_holders_are_independent_of_records(make_registry: OpenClient) -> None:
    registry, other = await make_registry(), await make_registry()
    held, unrecorded = _name(1), _name(2)
    await _make_entry(registry, held, Status.DOWNLOADED)
    await registry.put_holder(held, "node-a", ADDRESS_A, True, LONG_LEASE)
    await registry.put_holder(unrecorded, "node-b", ADDRESS_B, False, LONG_LEASE)

    # Holders do not appear as entries, or change the ones there are.
    [record] = await registry.list_by_last_used()
    assert record.model_name == held
    assert await registry.status_counts() == StatusCounts(downloaded=1)
    assert await registry.get_record(unrecorded) is None
    assert await registry.get_status(unrecorded) is None
    assert await _record(registry, held) == record
    assert await registry.try_claim(unrecorded, _claim_id(), LONG_LEASE) == Claimed()

    # Deleting the records (either way) leaves the holders.
    assert await registry.delete_if_unchanged(held, record.status, record.last_used_at)
    await registry.delete(unrecorded)
    assert await registry.list_by_last_used() == []
    assert _nodes(await other.holders(held)) == ["node-a"]
    assert _nodes(await other.holders(unrecorded)) == ["node-b"]

    # Locks and refs neither.
    assert await registry.try_lock(held, "node-a", LONG_LEASE)
    assert await registry.unlock(held, "node-a")
    await registry.record_ref("org/model-1", "main", COMMIT_A)
    assert _nodes(await other.holders(held)) == ["node-a"]

    # And dropping the holders leaves a record alone.
    await _make_entry(registry, held, Status.DOWNLOADED)
    await registry.drop_holder(held, "node-a")
    assert (await _record(other, held)).status is Status.DOWNLOADED
    assert await other.holders(held) == []


async def test_concurrent_holder_puts_all_land(make_registry: OpenClient) -> None:
    clients = [await make_registry() for _ in range(4)]
    name = _name()
    nodes = [f"node-{i:02d}" for i in range(16)]
    await _race(
        [
            lambda i=i, node=node: clients[i % len(clients)].put_holder(
                name, node, f"http://{node}:7170", i % 2 == 0, LONG_LEASE
            )
            for i, node in enumerate(nodes)
        ]
    )
    holders = await clients[0].holders(name)
    assert sorted(_nodes(holders)) == nodes
    assert _nodes(holders) == nodes[0::2] + nodes[1::2]  # complete (even) ones first

    # Drops race too, and with puts of other nodes.
    await _race(
        [lambda i=i, node=node: clients[i % len(clients)].drop_holder(name, node) for i, node in enumerate(nodes[:8])]
        + [lambda: clients[1].put_holder(name, "node-late", ADDRESS_A, True, LONG_LEASE)]
    )
    assert sorted(_nodes(await clients[2].holders(name))) == sorted([*nodes[8:], "node-late"])


async def test_sqlite_registry_of_an_older_schema_gains_the_holders_table(tmp_path: Path) -> None:
    path = tmp_path / "registry.db"
    url = "sqlite://" + quote(str(path))
    registry = await open_registry(url)
    await _make_entry(registry, _name(), Status.DOWNLOADED)
    await registry.aclose()
    # Make it what mxfs wrote before holders: schema version 3, no holders table.
    conn = sqlite3.connect(path)
    conn.execute("DROP TABLE holders")
    conn.execute("PRAGMA user_version = 3")
    conn.commit()
    conn.close()

    registry = await open_registry(url)
    try:
        await registry.put_holder(_name(), "node-a", ADDRESS_A, True, LONG_LEASE)
        assert _nodes(await registry.holders(_name())) == ["node-a"]
        assert (await _record(registry, _name())).status is Status.DOWNLOADED
    finally:
        await registry.aclose()
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA user_version").fetchone() == (sqlite_backend.SCHEMA_VERSION,)
    finally:
        conn.close()


async def test_sqlite_puts_sweep_expired_holders_of_any_entry_a_few_at_a_time(tmp_path: Path) -> None:
    path = tmp_path / "registry.db"
    registry = await open_registry("sqlite://" + quote(str(path)))
    stack = contextlib.ExitStack()
    try:
        await registry.put_holder(_name(1), "node-a", ADDRESS_A, True, LONG_LEASE)  # creates the schema
        # Holders of entries nobody asks about again, long expired.
        conn = stack.enter_context(contextlib.closing(sqlite3.connect(path)))
        with conn:
            conn.executemany(
                "INSERT INTO holders (name, node, address, complete, expires_at_ms) VALUES (?, ?, ?, 1, ?)",
                [(_name(100 + i), "gone", ADDRESS_B, i) for i in range(sqlite_backend.HOLDER_SWEEP_LIMIT + 4)],
            )
        expired = "SELECT COUNT(*) FROM holders WHERE node = 'gone'"
        await registry.put_holder(_name(2), "node-a", ADDRESS_A, True, LONG_LEASE)
        assert conn.execute(expired).fetchone() == (4,)  # bounded work per put
        await registry.put_holder(_name(2), "node-a", ADDRESS_A, True, LONG_LEASE)
        assert conn.execute(expired).fetchone() == (0,)
        # The live ones stay.
        assert _nodes(await registry.holders(_name(1))) == ["node-a"]
        assert _nodes(await registry.holders(_name(2))) == ["node-a"]
    finally:
        stack.close()
        await registry.aclose()
