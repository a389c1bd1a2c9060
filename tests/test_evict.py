"""Eviction (DESIGN section 6): the policy as pure functions, then the Evictor on a real cache.

The policy tests build :class:`Record` values by hand and call :func:`select_victims` /
:func:`protected` with a fixed ``now``.  The Evictor tests lay out a real hub cache in a temporary
directory with :class:`HubCache`'s own writing methods, record the entries in a real SQLite
registry, and check the outcome both in the registry and with ``huggingface_hub.scan_cache_dir``.
The service loop runs under trio's ``autojump_clock``.

The registry stamps ``last_used_at`` with the database's (wall) clock and the Evictor compares it
with ``datetime.now(UTC)``, so the Evictor tests switch the grace rule off (``in_use_grace=0``)
or rely on entries being fresh, and never depend on the virtual trio clock for time rules.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.lowlevel
from huggingface_hub import scan_cache_dir
from hypothesis import given, settings
from hypothesis import strategies as st

from mxfs.cache import HubCache, repo_folder_name
from mxfs.config import Rules
from mxfs.evict import (
    EVICTION_LOCK,
    CacheUsage,
    EvictionReport,
    Evictor,
    Reason,
    entries_with_open_blobs,
    measure_cache_usage,
    open_blob_etags,
    protected,
    select_victims,
)
from mxfs.names import EntryName
from mxfs.registry import Claimed, Record, RegistryError, Status, open_registry
from mxfs.tree import HubFile, RepoTree

# -- the policy: pure functions over records -----------------------------------------------------

NOW = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
DAY = 86400.0
NO_USAGE = CacheUsage(cache_bytes=0, free_bytes=1 << 60)
# Every rule off, grace 10 minutes: tests switch on the rules they look at.
OFF = Rules(unused_threshold=None, max_models=None, max_cache_size=None, min_free_space=None, in_use_grace=600.0)


def rec(
    name: str,
    *,
    age: float,
    status: Status = Status.DOWNLOADED,
    pinned: bool = False,
    size: int | None = 100,
) -> Record:
    """A record last used ``age`` seconds before NOW."""
    last_used = NOW - timedelta(seconds=age)
    return Record(
        model_name=name,
        provider="HuggingFace",
        status=status,
        created_at=last_used - timedelta(days=30),
        last_used_at=last_used,
        pinned=pinned,
        size_bytes=size,
    )


def select(
    records: list[Record],
    rules: Rules,
    *,
    usage: CacheUsage = NO_USAGE,
    sizes: dict[str, int] | None = None,
    open_entries: set[str] | None = None,
) -> list[tuple[str, Reason]]:
    victims = select_victims(
        records, now=NOW, rules=rules, usage=usage, sizes=sizes or {}, open_entries=open_entries or set()
    )
    return [(v.name, v.reason) for v in victims]


def with_rules(**changes: Any) -> Rules:
    return Rules(**{**OFF.__dict__, **changes})


def test_all_rules_off_selects_nothing() -> None:
    records = [rec(f"m{i}", age=i * 100 * DAY, size=10**12) for i in range(5)]
    usage = CacheUsage(cache_bytes=10**13, free_bytes=0)
    assert select(records, OFF, usage=usage) == []
    assert select([], with_rules(max_models=0, max_cache_size=0, min_free_space=1, unused_threshold=0)) == []


def test_time_rule_selects_entries_unused_longer_than_the_threshold() -> None:
    records = [rec("fresh", age=DAY), rec("old", age=8 * DAY), rec("older", age=30 * DAY), rec("edge", age=7 * DAY)]
    # Oldest first; "edge" was used exactly at the cutoff, which is not *longer* than the threshold.
    assert select(records, with_rules(unused_threshold=7 * DAY)) == [("older", Reason.TIME), ("old", Reason.TIME)]


def test_default_rules_have_a_seven_day_threshold() -> None:
    assert Rules().unused_threshold == 7 * DAY
    assert Rules().max_models is Rules().max_cache_size is Rules().min_free_space is None
    records = [rec("a", age=6 * DAY), rec("b", age=7 * DAY + 1)]
    assert select(records, Rules()) == [("b", Reason.TIME)]


def test_count_rule_evicts_oldest_first_down_to_max_models() -> None:
    records = [rec(f"m{i}", age=(10 - i) * 3600) for i in range(6)]  # m0 oldest
    assert select(records, with_rules(max_models=4)) == [("m0", Reason.COUNT), ("m1", Reason.COUNT)]
    assert select(records, with_rules(max_models=6)) == []
    assert select(records, with_rules(max_models=10)) == []
    assert [n for n, _ in select(records, with_rules(max_models=0))] == [f"m{i}" for i in range(6)]


def test_count_rule_counts_protected_entries_toward_the_total() -> None:
    records = [
        rec("old-pinned", age=10 * DAY, pinned=True),
        rec("old-open", age=9 * DAY),
        rec("a", age=8 * DAY),
        rec("b", age=7 * DAY),
        rec("recent", age=60),  # within the 10-minute grace
    ]
    # 5 downloaded, 3 protected: getting to 3 takes two victims, both among the eligible ones.
    assert select(records, with_rules(max_models=3), open_entries={"old-open"}) == [
        ("a", Reason.COUNT),
        ("b", Reason.COUNT),
    ]
    # Protected entries alone exceed the limit: every eligible one goes, and nothing protected.
    assert select(records, with_rules(max_models=1), open_entries={"old-open"}) == [
        ("a", Reason.COUNT),
        ("b", Reason.COUNT),
    ]


def test_count_rule_counts_only_downloaded_entries() -> None:
    records = [
        rec("done-old", age=5 * DAY),
        rec("done-new", age=4 * DAY),
        rec("loading", age=9 * DAY, status=Status.DOWNLOADING),
        rec("failed", age=9 * DAY, status=Status.ERROR),
    ]
    assert select(records, with_rules(max_models=2)) == []
    assert select(records, with_rules(max_models=1)) == [("done-old", Reason.COUNT)]


def test_size_rule_uses_cache_sizes_and_falls_back_to_size_bytes() -> None:
    records = [
        rec("a", age=4 * DAY, size=999),  # measured below: 300
        rec("b", age=3 * DAY, size=400),  # not measured: its record's 400
        rec("c", age=2 * DAY, size=None),  # neither: 0
        rec("d", age=1 * DAY, size=1),
    ]
    sizes = {"a": 300, "d": 500}
    usage = CacheUsage(cache_bytes=1200, free_bytes=1 << 40)
    # 1200 - 300 = 900 > 800, 900 - 400 = 500 <= 800: two victims.
    victims = select_victims(
        records, now=NOW, rules=with_rules(max_cache_size=800), usage=usage, sizes=sizes, open_entries=set()
    )
    assert [(v.name, v.reason, v.size) for v in victims] == [("a", Reason.SIZE, 300), ("b", Reason.SIZE, 400)]
    # Already under the limit: nothing.
    assert select(records, with_rules(max_cache_size=1200), usage=usage, sizes=sizes) == []
    # A size of 0 does not help: c is chosen on the way to d.
    assert select(records, with_rules(max_cache_size=100), usage=usage, sizes=sizes) == [
        ("a", Reason.SIZE),
        ("b", Reason.SIZE),
        ("c", Reason.SIZE),
        ("d", Reason.SIZE),
    ]


def test_disk_rule_stops_once_enough_space_would_be_free() -> None:
    records = [rec("a", age=3 * DAY, size=100), rec("b", age=2 * DAY, size=200), rec("c", age=1 * DAY, size=400)]
    usage = CacheUsage(cache_bytes=700, free_bytes=50)
    assert select(records, with_rules(min_free_space=50), usage=usage) == []
    assert select(records, with_rules(min_free_space=150), usage=usage) == [("a", Reason.DISK)]
    assert select(records, with_rules(min_free_space=151), usage=usage) == [("a", Reason.DISK), ("b", Reason.DISK)]
    assert len(select(records, with_rules(min_free_space=10**9), usage=usage)) == 3


def test_rules_combine_and_the_reason_is_the_first_rule_that_chose_an_entry() -> None:
    records = [
        rec("t1", age=20 * DAY, size=10),
        rec("t2", age=10 * DAY, size=10),
        rec("c1", age=5 * DAY, size=10),
        rec("s1", age=4 * DAY, size=100),
        rec("d1", age=3 * DAY, size=1000),
        rec("keep1", age=2 * DAY, size=1000),
        rec("keep2", age=1 * DAY, size=1000),
    ]
    rules = with_rules(
        unused_threshold=7 * DAY,  # t1, t2
        max_models=4,  # 7 - 2 = 5 left > 4: c1
        max_cache_size=3100,  # 3130 - 30 = 3100: nothing more
        min_free_space=1000,  # 30 freed, free 0: s1, d1
    )
    usage = CacheUsage(cache_bytes=3130, free_bytes=0)
    assert select(records, rules, usage=usage) == [
        ("t1", Reason.TIME),
        ("t2", Reason.TIME),
        ("c1", Reason.COUNT),
        ("s1", Reason.DISK),  # 30 + 100 = 130 < 1000 ...
        ("d1", Reason.DISK),  # ... 1130 >= 1000: stop
    ]
    rules = with_rules(unused_threshold=7 * DAY, max_models=4, max_cache_size=3050, min_free_space=1000)
    assert select(records, rules, usage=usage) == [
        ("t1", Reason.TIME),
        ("t2", Reason.TIME),
        ("c1", Reason.COUNT),
        ("s1", Reason.SIZE),  # 3130 - 30 = 3100 > 3050; 3000 after s1
        ("d1", Reason.DISK),
    ]
    # A later rule counts what the earlier ones freed: the time rule already freed enough.
    rules = with_rules(unused_threshold=7 * DAY, max_cache_size=3110, min_free_space=20)
    assert select(records, rules, usage=usage) == [("t1", Reason.TIME), ("t2", Reason.TIME)]


@pytest.mark.parametrize(
    "rules",
    [
        with_rules(unused_threshold=0),
        with_rules(max_models=0),
        with_rules(max_cache_size=0),
        with_rules(min_free_space=1 << 62),
    ],
    ids=["time", "count", "size", "disk"],
)
def test_protected_entries_are_never_chosen(rules: Rules) -> None:
    records = [
        rec("pinned", age=100 * DAY, pinned=True),
        rec("open", age=90 * DAY),
        rec("graced", age=599),
        rec("loading", age=80 * DAY, status=Status.DOWNLOADING),
        rec("failed", age=80 * DAY, status=Status.ERROR),
        rec("free", age=70 * DAY),
    ]
    usage = CacheUsage(cache_bytes=1 << 50, free_bytes=0)
    assert [n for n, _ in select(records, rules, usage=usage, open_entries={"open"})] == ["free"]


def test_grace_boundary() -> None:
    rules = with_rules(max_models=0, in_use_grace=600)
    records = [rec("inside", age=599.999), rec("boundary", age=600), rec("outside", age=601)]
    assert select(records, rules) == [("outside", Reason.COUNT), ("boundary", Reason.COUNT)]


def test_ties_on_last_used_are_broken_by_name() -> None:
    records = [rec(name, age=DAY) for name in ("m-c", "m-a", "m-d", "m-b")]
    for order in (records, records[::-1], sorted(records, key=lambda r: r.model_name)):
        assert [n for n, _ in select(order, with_rules(max_models=2))] == ["m-a", "m-b"]
        assert [n for n, _ in select(order, with_rules(max_models=0))] == ["m-a", "m-b", "m-c", "m-d"]


def test_result_is_oldest_first_whatever_the_input_order() -> None:
    ages = [5, 1, 9, 3, 7, 2]
    records = [rec(f"age{a}", age=a * DAY) for a in ages]
    # Reasons differ (time for the oldest ones, count for the others), the order is still by age.
    picked = select(records, with_rules(unused_threshold=6 * DAY, max_models=2))
    assert picked == [
        ("age9", Reason.TIME),
        ("age7", Reason.TIME),
        ("age5", Reason.COUNT),
        ("age3", Reason.COUNT),
    ]


def test_protected_reasons_and_force() -> None:
    rules = with_rules(in_use_grace=600)

    def why(r: Record, *, open_entries: frozenset[str] = frozenset(), force: bool = False) -> str | None:
        return protected(r, now=NOW, rules=rules, open_entries=set(open_entries), force=force)

    assert why(rec("x", age=DAY)) is None
    assert why(rec("x", age=DAY, status=Status.DOWNLOADING)) == "status DOWNLOADING"
    assert why(rec("x", age=DAY, status=Status.ERROR)) == "status ERROR"
    assert why(rec("x", age=DAY, pinned=True)) == "pinned"
    assert why(rec("x", age=DAY), open_entries=frozenset({"x"})) == "open on this node"
    assert why(rec("x", age=60)) is not None and "600" in why(rec("x", age=60))
    # force lifts the grace rule only.
    assert why(rec("x", age=60), force=True) is None
    assert why(rec("x", age=60, pinned=True), force=True) == "pinned"
    assert why(rec("x", age=60), open_entries=frozenset({"x"}), force=True) == "open on this node"
    assert why(rec("x", age=60, status=Status.DOWNLOADING), force=True) == "status DOWNLOADING"


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[list[Record], set[str]]:
    n = draw(st.integers(0, 12))
    records = []
    for i in range(n):
        records.append(
            rec(
                f"m{i:02d}",
                # Few distinct ages, so ties on last_used_at are common; some within the grace.
                age=draw(st.sampled_from([0, 60, 599, 600, 3600, DAY, 8 * DAY])),
                status=draw(st.sampled_from([Status.DOWNLOADED] * 4 + [Status.DOWNLOADING, Status.ERROR])),
                pinned=draw(st.integers(0, 3)) == 0,
                size=draw(st.one_of(st.none(), st.integers(0, 1000))),
            )
        )
    open_entries = {r.model_name for r in records if draw(st.integers(0, 4)) == 0}
    return records, open_entries


optional_int = st.one_of(st.none(), st.integers(0, 5000))


@settings(max_examples=300, deadline=None)
@given(
    scenarios(),
    st.one_of(st.none(), st.sampled_from([0.0, 600.0, 7 * DAY])),
    st.one_of(st.none(), st.integers(0, 12)),
    optional_int,
    optional_int,
    st.integers(0, 5000),
    st.integers(0, 5000),
)
def test_property_victims_are_never_protected(
    scenario: tuple[list[Record], set[str]],
    unused_threshold: float | None,
    max_models: int | None,
    max_cache_size: int | None,
    min_free_space: int | None,
    cache_bytes: int,
    free_bytes: int,
) -> None:
    records, open_entries = scenario
    rules = Rules(
        unused_threshold=unused_threshold,
        max_models=max_models,
        max_cache_size=max_cache_size,
        min_free_space=min_free_space,
        in_use_grace=600.0,
    )
    victims = select_victims(
        records,
        now=NOW,
        rules=rules,
        usage=CacheUsage(cache_bytes=cache_bytes, free_bytes=free_bytes),
        sizes={},
        open_entries=open_entries,
    )
    names = [v.name for v in victims]
    assert len(names) == len(set(names))
    by_name = {r.model_name: r for r in records}
    for v in victims:
        assert protected(by_name[v.name], now=NOW, rules=rules, open_entries=open_entries) is None
    keys = [(v.record.last_used_at, v.name) for v in victims]
    assert keys == sorted(keys)


@settings(max_examples=300, deadline=None)
@given(scenarios(), st.integers(0, 12))
def test_property_count_rule_leaves_max_models_or_the_protected_ones(
    scenario: tuple[list[Record], set[str]], max_models: int
) -> None:
    records, open_entries = scenario
    rules = with_rules(max_models=max_models)
    victims = select(records, rules, open_entries=open_entries)
    downloaded = [r for r in records if r.status == Status.DOWNLOADED]
    n_protected = sum(protected(r, now=NOW, rules=rules, open_entries=open_entries) is not None for r in downloaded)
    left = len(downloaded) - len(victims)
    if len(downloaded) <= max_models:
        assert left == len(downloaded)
    else:
        assert left == max(max_models, n_protected)
    assert all(reason == Reason.COUNT for _, reason in victims)
    # The victims are the oldest eligible entries.
    eligible = sorted(
        (r for r in downloaded if protected(r, now=NOW, rules=rules, open_entries=open_entries) is None),
        key=lambda r: (r.last_used_at, r.model_name),
    )
    assert [n for n, _ in victims] == [r.model_name for r in eligible[: len(victims)]]


# -- the Evictor on a real cache and a real SQLite registry -----------------------------------


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data, usedforsecurity=False).hexdigest()


def commit_of(n: int) -> str:
    return f"{n:040x}"


def populate(cache: HubCache, repo_id: str, commit: str, files: dict[str, bytes], ref: str | None = "main") -> None:
    """Lay a complete revision out the way the fetcher does."""
    records = []
    for path, data in files.items():
        etag = git_blob_sha1(data)
        records.append(HubFile(path=path, size=len(data), blob_id=etag))
        partial, fd = cache.create_incomplete(repo_id, etag, "writer")
        try:
            os.write(fd, data)
            cache.publish_blob(repo_id, etag, partial, fd)
        finally:
            os.close(fd)
        cache.link_snapshot(repo_id, commit, path, etag)
    if ref is not None:
        cache.write_ref(repo_id, ref, commit)
    cache.write_tree(RepoTree(repo_id, commit, datetime.now(UTC), tuple(records)))


def distinct_bytes(*file_sets: dict[str, bytes]) -> int:
    """Bytes of the distinct blobs (same content, same blob) of one or more file sets."""
    blobs = {git_blob_sha1(d): d for files in file_sets for d in files.values()}
    return sum(len(d) for d in blobs.values())


async def record_downloaded(registry: Any, repo_id: str, commit: str, size: int) -> str:
    name = EntryName(repo_id, commit).key
    assert await registry.try_claim(name, "claim", 60) == Claimed()
    assert await registry.finish_claim(name, "claim", Status.DOWNLOADED, size_bytes=size)
    return name


async def touch_in_order(registry: Any, *names: str) -> None:
    """Touch ``names`` so that their ``last_used_at`` strictly increases in this order."""
    for name in names:
        await registry.touch(name)
        # The registry clock has millisecond resolution; make sure the next touch is later.
        await trio.to_thread.run_sync(time.sleep, 0.003)


def files_for(n: int) -> dict[str, bytes]:
    return {
        "config.json": b'{"model": %d}\n' % n,
        "model.safetensors": bytes([n]) * (1000 + 100 * n),
        "sub/dir/tokenizer.json": b'{"tok": %d}' % n,
    }


SHARED = b"shared tokenizer bytes " * 20
EVICT_NOW = dict(unused_threshold=None, in_use_grace=0.0)


def no_scan_warnings(cache: HubCache) -> Any:
    info = scan_cache_dir(cache.root)
    assert info.warnings == []
    return info


def cached_revisions(cache: HubCache) -> set[tuple[str, str]]:
    return {(repo.repo_id, rev.commit_hash) for repo in scan_cache_dir(cache.root).repos for rev in repo.revisions}


@pytest.fixture
def cache(tmp_path: Path) -> HubCache:
    c = HubCache(tmp_path / "hub")
    c.ensure_root()
    return c


@pytest.fixture
async def registry(tmp_path: Path) -> Any:
    reg = await open_registry(f"sqlite://{tmp_path}/r.db")
    try:
        yield reg
    finally:
        await reg.aclose()


async def add_entry(
    cache: HubCache, registry: Any, repo_id: str, n: int, files: dict[str, bytes], ref: str | None = "main"
) -> str:
    """A DOWNLOADED entry ``repo_id`` at ``commit_of(n)``: files in the cache, record in the registry."""
    commit = commit_of(n)
    await trio.to_thread.run_sync(populate, cache, repo_id, commit, files, ref)
    return await record_downloaded(registry, repo_id, commit, distinct_bytes(files))


async def names(registry: Any) -> list[str]:
    return [r.model_name for r in await registry.list_by_last_used()]


async def test_cycle_with_max_models_evicts_the_least_recently_used(cache: HubCache, registry: Any) -> None:
    files_a1 = files_for(1)
    files_a2 = {**files_for(2), "shared.json": SHARED}
    files_a3 = {**files_for(3), "shared.json": SHARED, "copy.json": SHARED}
    files_b = files_for(4)
    a1 = EntryName("org/a", commit_of(1)).key
    a2 = EntryName("org/a", commit_of(2)).key
    a3 = EntryName("org/a", commit_of(3)).key
    b = EntryName("org/b", commit_of(4)).key
    for repo_id, n, files, ref in (
        ("org/a", 1, files_a1, "v1"),
        ("org/a", 2, files_a2, "v2"),
        ("org/a", 3, files_a3, "main"),
        ("org/b", 4, files_b, "main"),
    ):
        await trio.to_thread.run_sync(populate, cache, repo_id, commit_of(n), files, ref)
        await record_downloaded(registry, repo_id, commit_of(n), distinct_bytes(files))
    # A second ref on a2's commit: both must go with it.
    await trio.to_thread.run_sync(cache.write_ref, "org/a", "refs/pr/1", commit_of(2))
    no_scan_warnings(cache)
    # LRU order after touching: a2 (oldest), b, a1, a3.
    await touch_in_order(registry, a2, b, a1, a3)
    assert await names(registry) == [a2, b, a1, a3]

    evictor = Evictor(registry, cache, Rules(max_models=2, **EVICT_NOW))
    report = await evictor.cycle()

    assert [(v.name, v.reason) for v in report.evicted] == [(a2, Reason.COUNT), (b, Reason.COUNT)]
    assert report.skipped == []
    assert not report.dry_run
    assert report.reasons == {Reason.COUNT}
    assert evictor.last_report is report
    assert await names(registry) == [a1, a3]
    # Bytes freed are the real sizes of the blobs removed: a2's own blobs (its shared blob
    # survives with a3), and all of b's.
    a2_own = distinct_bytes(files_for(2))
    assert [v.size for v in report.evicted] == [a2_own, distinct_bytes(files_b)]
    assert report.bytes_freed == a2_own + distinct_bytes(files_b)

    info = no_scan_warnings(cache)
    assert cached_revisions(cache) == {("org/a", commit_of(1)), ("org/a", commit_of(3))}
    assert not cache.snapshot_dir("org/a", commit_of(2)).exists()
    assert cache.read_ref("org/a", "v2") is None and cache.read_ref("org/a", "refs/pr/1") is None
    assert cache.read_ref("org/a", "v1") == commit_of(1) and cache.read_ref("org/a", "main") == commit_of(3)
    assert not cache.tree_path("org/a", commit_of(2)).exists()
    assert cache.blob_path("org/a", git_blob_sha1(SHARED)).exists()
    for data in files_for(2).values():
        assert not cache.blob_path("org/a", git_blob_sha1(data)).exists()
    assert not cache.repo_dir("org/b").exists()
    # The surviving snapshots are intact: every link resolves and has the right bytes.
    for n, files in ((1, files_a1), (3, files_a3)):
        for path, data in files.items():
            assert cache.snapshot_file("org/a", commit_of(n), path).read_bytes() == data
    (repo,) = info.repos
    assert repo.size_on_disk == distinct_bytes(files_a1, files_a3)


async def test_evicting_the_last_revision_removes_the_repo_and_shared_blobs(cache: HubCache, registry: Any) -> None:
    x1 = await add_entry(cache, registry, "org/x", 1, {**files_for(1), "s": SHARED}, ref="v1")
    x2 = await add_entry(cache, registry, "org/x", 2, {**files_for(2), "s": SHARED}, ref="main")
    await touch_in_order(registry, x1, x2)
    report = await Evictor(registry, cache, Rules(max_models=0, **EVICT_NOW)).cycle()
    assert [v.name for v in report.evicted] == [x1, x2]
    # The shared blob is freed once, with the last snapshot that used it.
    assert [v.size for v in report.evicted] == [
        distinct_bytes(files_for(1)),
        distinct_bytes(files_for(2)) + len(SHARED),
    ]
    assert report.bytes_freed == distinct_bytes(files_for(1), files_for(2), {"s": SHARED})
    assert await names(registry) == []
    assert not cache.repo_dir("org/x").exists()
    info = no_scan_warnings(cache)
    assert info.repos == frozenset()


async def test_dry_run_changes_nothing_and_reports_what_it_would_do(cache: HubCache, registry: Any) -> None:
    a = await add_entry(cache, registry, "org/a", 1, files_for(1), ref="main")
    b = await add_entry(cache, registry, "org/b", 2, files_for(2), ref="main")
    c = await add_entry(cache, registry, "org/c", 3, files_for(3), ref="main")
    await touch_in_order(registry, b, a, c)
    before_records = await registry.list_by_last_used()
    before_files = sorted(str(p) for p in cache.root.rglob("*"))

    evictor = Evictor(registry, cache, Rules(max_models=1, **EVICT_NOW))
    report = await evictor.cycle(dry_run=True)

    assert report.dry_run
    assert [(v.name, v.reason) for v in report.evicted] == [(b, Reason.COUNT), (a, Reason.COUNT)]
    assert report.bytes_freed == distinct_bytes(files_for(2)) + distinct_bytes(files_for(1))
    assert await registry.list_by_last_used() == before_records
    assert sorted(str(p) for p in cache.root.rglob("*")) == before_files
    # The lock was released: the real cycle does what the dry run said.
    real = await evictor.cycle()
    assert [(v.name, v.reason, v.size) for v in real.evicted] == [(v.name, v.reason, v.size) for v in report.evicted]
    assert real.bytes_freed == report.bytes_freed
    assert await names(registry) == [c]
    no_scan_warnings(cache)


async def test_time_rule_on_the_registry_clock(cache: HubCache, registry: Any, tmp_path: Path) -> None:
    old = await add_entry(cache, registry, "org/old", 1, files_for(1), ref="main")
    new = await add_entry(cache, registry, "org/new", 2, files_for(2), ref="main")
    # Age one record by 8 days, behind the registry's back.
    conn = sqlite3.connect(tmp_path / "r.db")
    with conn:
        conn.execute(
            "UPDATE entries SET last_used_at_ms = last_used_at_ms - :ms WHERE model_name = :name",
            {"ms": 8 * 86400 * 1000, "name": old},
        )
    conn.close()
    # The default rules: 7 days unused, 10 minutes grace.
    report = await Evictor(registry, cache, Rules()).cycle()
    assert [(v.name, v.reason) for v in report.evicted] == [(old, Reason.TIME)]
    assert report.bytes_freed == distinct_bytes(files_for(1))
    assert await names(registry) == [new]
    no_scan_warnings(cache)


class TouchingRegistry:
    """A registry through which the victim is touched right before its conditional delete."""

    def __init__(self, inner: Any, touch: set[str]) -> None:
        self._inner = inner
        self._touch = touch

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def delete_if_unchanged(self, name: str, status: Status, last_used_at: datetime) -> bool:
        if name in self._touch:
            await self._inner.touch(name)
        return await self._inner.delete_if_unchanged(name, status, last_used_at)


async def test_an_entry_touched_after_selection_survives(cache: HubCache, registry: Any) -> None:
    a = await add_entry(cache, registry, "org/a", 1, files_for(1), ref="main")
    b = await add_entry(cache, registry, "org/b", 2, files_for(2), ref="main")
    c = await add_entry(cache, registry, "org/c", 3, files_for(3), ref="main")
    await touch_in_order(registry, a, b, c)
    evictor = Evictor(TouchingRegistry(registry, {a}), cache, Rules(max_models=1, **EVICT_NOW))  # type: ignore[arg-type]

    report = await evictor.cycle()

    assert [v.name for v in report.evicted] == [b]
    assert report.skipped == [(a, "changed since it was chosen")]
    assert report.bytes_freed == distinct_bytes(files_for(2))
    record = await registry.get_record(a)
    assert record is not None and record.status == Status.DOWNLOADED
    assert cached_revisions(cache) == {("org/a", commit_of(1)), ("org/c", commit_of(3))}
    no_scan_warnings(cache)


async def test_an_entry_reclaimed_after_selection_survives(cache: HubCache, registry: Any) -> None:
    """A re-download (DOWNLOADED -> DOWNLOADING) between listing and delete keeps the record."""
    a = await add_entry(cache, registry, "org/a", 1, files_for(1), ref="main")

    class Retaking(TouchingRegistry):
        async def delete_if_unchanged(self, name: str, status: Status, last_used_at: datetime) -> bool:
            assert await self._inner.try_retake(name, "other", 60, Status.DOWNLOADED)
            return await self._inner.delete_if_unchanged(name, status, last_used_at)

    report = await Evictor(Retaking(registry, set()), cache, Rules(max_models=0, **EVICT_NOW)).cycle()  # type: ignore[arg-type]
    assert report.evicted == [] and report.bytes_freed == 0
    assert report.skipped == [(a, "changed since it was chosen")]
    assert await registry.get_status(a) == Status.DOWNLOADING
    assert cache.snapshot_dir("org/a", commit_of(1)).is_dir()


async def test_no_sweep_while_another_node_holds_the_lock(cache: HubCache, registry: Any) -> None:
    a = await add_entry(cache, registry, "org/a", 1, files_for(1), ref="main")
    b = await add_entry(cache, registry, "org/b", 2, files_for(2), ref="main")
    assert await registry.try_lock(EVICTION_LOCK, "other", 60)
    evictor = Evictor(registry, cache, Rules(max_models=0, **EVICT_NOW))

    report = await evictor.cycle()

    assert report == EvictionReport()
    assert sorted(await names(registry)) == sorted([a, b])
    assert cached_revisions(cache) == {("org/a", commit_of(1)), ("org/b", commit_of(2))}
    # Our failed attempt did not steal or release the other node's lock.
    assert not await registry.try_lock(EVICTION_LOCK, "third", 60)
    assert await registry.unlock(EVICTION_LOCK, "other")

    report = await evictor.cycle()
    assert {v.name for v in report.evicted} == {a, b}
    # And the evictor released the lock after its sweep.
    assert await registry.try_lock(EVICTION_LOCK, "other", 60)


async def test_two_evictors_one_lock(cache: HubCache, registry: Any) -> None:
    """While one Evictor is inside its sweep, another one's cycle does nothing."""
    a = await add_entry(cache, registry, "org/a", 1, files_for(1), ref="main")
    rules = Rules(max_models=0, **EVICT_NOW)
    second = Evictor(registry, cache, rules)
    inner_reports: list[EvictionReport] = []

    def usage_running_the_other(c: HubCache) -> CacheUsage:
        # Runs in a worker thread during the first Evictor's sweep, with its lock held.
        inner_reports.append(trio.from_thread.run(second.cycle))
        return measure_cache_usage(c)

    first = Evictor(registry, cache, rules, usage=usage_running_the_other)
    report = await first.cycle()
    assert inner_reports == [EvictionReport()]
    assert [v.name for v in report.evicted] == [a]


async def test_manual_evict_within_the_safety_rules(cache: HubCache, registry: Any) -> None:
    old = await add_entry(cache, registry, "org/old", 1, files_for(1), ref="main")
    pinned = await add_entry(cache, registry, "org/pinned", 2, files_for(2), ref="main")
    opened = await add_entry(cache, registry, "org/opened", 3, files_for(3), ref="main")
    recent = await add_entry(cache, registry, "org/recent", 4, files_for(4), ref="main")
    other = await add_entry(cache, registry, "org/other", 5, files_for(5), ref="main")
    assert await registry.set_pinned(pinned, True)
    conn = sqlite3.connect(Path(registry.url_for_logs.removeprefix("sqlite://")))
    with conn:  # everything but "recent" was last used an hour ago
        conn.execute("UPDATE entries SET last_used_at_ms = last_used_at_ms - 3600000 WHERE model_name != ?", (recent,))
    conn.close()
    # Huge limits elsewhere: manual eviction ignores the automatic rules.
    rules = Rules(unused_threshold=None, max_models=100, in_use_grace=600.0)
    evictor = Evictor(registry, cache, rules, open_entries=lambda: {opened})

    report = await evictor.evict([old, pinned, opened, recent, EntryName("org/unknown", commit_of(9)).key])

    assert [(v.name, v.reason) for v in report.evicted] == [(old, Reason.MANUAL)]
    assert report.bytes_freed == distinct_bytes(files_for(1))
    skipped = dict(report.skipped)
    assert set(skipped) == {pinned, opened, recent}
    assert skipped[pinned] == "pinned"
    assert skipped[opened] == "open on this node"
    assert "600" in skipped[recent]
    assert sorted(await names(registry)) == sorted([pinned, opened, recent, other])

    # --force lifts the grace only.
    report = await evictor.evict([pinned, opened, recent], force=True)
    assert [(v.name, v.reason) for v in report.evicted] == [(recent, Reason.MANUAL)]
    assert dict(report.skipped) == {pinned: "pinned", opened: "open on this node"}
    assert report.bytes_freed == distinct_bytes(files_for(4))
    assert cached_revisions(cache) == {
        ("org/pinned", commit_of(2)),
        ("org/opened", commit_of(3)),
        ("org/other", commit_of(5)),
    }
    no_scan_warnings(cache)


async def test_manual_evict_skips_entries_not_downloaded(cache: HubCache, registry: Any) -> None:
    name = EntryName("org/loading", commit_of(1)).key
    assert await registry.try_claim(name, "c", 60) == Claimed()
    report = await Evictor(registry, cache, Rules(**EVICT_NOW)).evict([name], force=True)
    assert report.evicted == []
    assert report.skipped == [(name, "status DOWNLOADING")]
    assert await registry.get_status(name) == Status.DOWNLOADING


async def test_manual_evict_accepts_any_iterable_of_names(cache: HubCache, registry: Any) -> None:
    """``evict(names: Iterable[str])``: a generator must work like a list."""
    a = await add_entry(cache, registry, "org/a", 1, files_for(1), ref="main")
    b = await add_entry(cache, registry, "org/b", 2, files_for(2), ref="main")
    evictor = Evictor(registry, cache, Rules(**EVICT_NOW))
    report = await evictor.evict(n for n in [a, b])
    assert sorted(v.name for v in report.evicted) == sorted([a, b])
    assert await names(registry) == []


async def test_records_that_are_not_mxfs_entries_are_left_alone(cache: HubCache, registry: Any) -> None:
    """A shared registry also holds ModelExpress's own records (DESIGN section 3: one Redis, one
    ``mx:model:HuggingFace:*`` namespace), named ``org/name`` rather than ``mx1:<commit>:-:org/name``.
    They have no revision in this cache: eviction must neither delete them nor stumble over them."""
    foreign = "google-t5/t5-small"
    await registry.set_status(foreign, Status.DOWNLOADED)  # the oldest record
    a = await add_entry(cache, registry, "org/a", 1, files_for(1), ref="main")
    await touch_in_order(registry, a)
    evictor = Evictor(registry, cache, Rules(max_models=0, **EVICT_NOW))

    report = await evictor.cycle()

    assert [v.name for v in report.evicted] == [a]
    assert await registry.get_status(foreign) == Status.DOWNLOADED
    assert await names(registry) == [foreign]


async def test_run_survives_a_cache_error(cache: HubCache, registry: Any, autojump_clock: Any) -> None:
    """An OSError while deleting files (say EACCES on one blob) fails that cycle, not the daemon:
    the background task goes on, like the FUSE handlers that turn unexpected errors into EIO."""
    a = await add_entry(cache, registry, "org/a", 1, files_for(1), ref="main")
    b = await add_entry(cache, registry, "org/b", 2, files_for(2), ref="main")
    await touch_in_order(registry, a, b)
    real_delete = cache.delete_revision
    failures = [PermissionError(13, "Permission denied")]

    def delete_revision(repo_id: str, commit: str) -> int:
        if failures:
            raise failures.pop()
        return real_delete(repo_id, commit)

    cache.delete_revision = delete_revision  # type: ignore[method-assign]
    interval = 60.0
    evictor = Evictor(registry, cache, Rules(max_models=1, **EVICT_NOW), check_interval=interval)
    log = CycleLog(evictor, fake=False)
    async with trio.open_nursery() as nursery:
        await nursery.start(evictor.run)
        await log.wait_for(2)
        nursery.cancel_scope.cancel()
    assert [type(e) for e in log.errors] == [PermissionError]


@pytest.fixture
def open_blob() -> Iterator[list[int]]:
    fds: list[int] = []
    yield fds
    for fd in fds:
        os.close(fd)


async def test_an_open_blob_protects_its_entry(cache: HubCache, registry: Any, open_blob: list[int]) -> None:
    a = await add_entry(cache, registry, "org/a", 1, files_for(1), ref="main")
    b = await add_entry(cache, registry, "org/b", 2, {**files_for(2), "nested/w.bin": b"w" * 50}, ref="main")
    c = await add_entry(cache, registry, "org/c", 3, files_for(3), ref="main")
    await touch_in_order(registry, a, b, c)
    records = await registry.list_by_last_used()
    assert entries_with_open_blobs(cache, records) == set()

    # Open b's nested file through its snapshot symlink, as a reader of the HF cache would.
    open_blob.append(os.open(cache.snapshot_file("org/b", commit_of(2), "nested/w.bin"), os.O_RDONLY))
    assert (repo_folder_name("org/b"), git_blob_sha1(b"w" * 50)) in open_blob_etags(cache.root)
    assert entries_with_open_blobs(cache, records) == {b}
    # Only the records asked about are reported.
    assert entries_with_open_blobs(cache, [r for r in records if r.model_name != b]) == set()

    report = await Evictor(registry, cache, Rules(max_models=0, **EVICT_NOW)).cycle()
    assert [v.name for v in report.evicted] == [a, c]
    assert await names(registry) == [b]
    assert cached_revisions(cache) == {("org/b", commit_of(2))}

    # Not even a forced manual eviction removes it.
    report = await Evictor(registry, cache, Rules(**EVICT_NOW)).evict([b], force=True)
    assert report.evicted == [] and report.skipped == [(b, "open on this node")]

    os.close(open_blob.pop())
    report = await Evictor(registry, cache, Rules(max_models=0, **EVICT_NOW)).cycle()
    assert [v.name for v in report.evicted] == [b]
    no_scan_warnings(cache)


async def test_an_open_partial_file_counts_as_open(cache: HubCache, registry: Any, open_blob: list[int]) -> None:
    """A ``<etag>.<writer>.incomplete`` file held open maps back to the blob's etag."""
    a = await add_entry(cache, registry, "org/a", 1, files_for(1), ref="main")
    etag = git_blob_sha1(files_for(1)["config.json"])
    path, fd = cache.create_incomplete("org/a", etag, "someone")
    open_blob.append(fd)
    assert (repo_folder_name("org/a"), etag) in open_blob_etags(cache.root)
    assert entries_with_open_blobs(cache, await registry.list_by_last_used()) == {a}
    os.close(open_blob.pop())
    path.unlink()


async def test_measure_cache_usage_reports_plausible_numbers(cache: HubCache, registry: Any) -> None:
    empty = measure_cache_usage(cache)
    assert empty.cache_bytes == 0
    assert empty.free_bytes > 0
    await add_entry(cache, registry, "org/a", 1, files_for(1), ref="main")
    await add_entry(cache, registry, "org/b", 2, {**files_for(2), "big": b"x" * 100_000}, ref="main")
    usage = measure_cache_usage(cache)
    written = distinct_bytes(files_for(1)) + distinct_bytes({**files_for(2), "big": b"x" * 100_000})
    assert usage.cache_bytes >= written
    # Disk blocks, not more than a few blocks of slack per blob.
    n_blobs = sum(1 for _ in cache.root.glob("models--*/blobs/*"))
    assert usage.cache_bytes <= written + n_blobs * 64 * 1024
    assert usage.free_bytes > 0
    st_ = os.statvfs(cache.root)
    assert abs(usage.free_bytes - st_.f_bavail * st_.f_frsize) < 64 * 1024 * 1024


async def test_disk_rule_driven_by_an_injected_usage(cache: HubCache, registry: Any) -> None:
    a = await add_entry(cache, registry, "org/a", 1, files_for(1), ref="main")
    b = await add_entry(cache, registry, "org/b", 2, files_for(2), ref="main")
    c = await add_entry(cache, registry, "org/c", 3, files_for(3), ref="main")
    await touch_in_order(registry, a, b, c)
    free = {"bytes": 10**12}
    seen: list[Path] = []

    def usage(c_: HubCache) -> CacheUsage:
        seen.append(c_.root)
        return CacheUsage(cache_bytes=0, free_bytes=free["bytes"])

    need = 10**9
    evictor = Evictor(registry, cache, Rules(min_free_space=need, **EVICT_NOW), usage=usage)
    report = await evictor.cycle()
    assert report.evicted == [] and seen == [cache.root]

    # The disk fills up: just enough is missing that evicting the oldest entry (by its real size
    # in the cache) brings the free space back over the limit.
    free["bytes"] = need - distinct_bytes(files_for(1))
    report = await evictor.cycle()
    assert [(v.name, v.reason) for v in report.evicted] == [(a, Reason.DISK)]
    assert report.bytes_freed == distinct_bytes(files_for(1))

    # One byte more missing than the oldest frees: two go.
    free["bytes"] = need - distinct_bytes(files_for(2)) - 1
    report = await evictor.cycle()
    assert [(v.name, v.reason) for v in report.evicted] == [(b, Reason.DISK), (c, Reason.DISK)]
    assert await names(registry) == []
    no_scan_warnings(cache)


async def test_size_rule_uses_the_measured_cache(cache: HubCache, registry: Any) -> None:
    a = await add_entry(cache, registry, "org/a", 1, files_for(1), ref="main")
    b = await add_entry(cache, registry, "org/b", 2, files_for(2), ref="main")
    await touch_in_order(registry, a, b)
    total = measure_cache_usage(cache).cache_bytes
    # Just under the cache's size: the oldest entry goes (whatever it frees is enough).
    report = await Evictor(registry, cache, Rules(max_cache_size=total - 1, **EVICT_NOW)).cycle()
    assert [(v.name, v.reason) for v in report.evicted] == [(a, Reason.SIZE)]
    report = await Evictor(registry, cache, Rules(max_cache_size=10**12, **EVICT_NOW)).cycle()
    assert report.evicted == []


async def test_cycle_logs_what_it_evicted(cache: HubCache, registry: Any, caplog: pytest.LogCaptureFixture) -> None:
    a = await add_entry(cache, registry, "org/a", 1, files_for(1), ref="main")
    caplog.set_level("INFO", logger="mxfs.evict")
    await Evictor(registry, cache, Rules(max_models=0, **EVICT_NOW)).cycle()
    text = caplog.text
    assert f"org/a@{commit_of(1)[:12]}" in text
    assert "reason count" in text
    assert "evicted 1 entries" in text
    assert await registry.get_record(a) is None


# -- the service loop, on trio's virtual clock ---------------------------------------------------


class RunawayLoop(BaseException):
    """Not an Exception, so that no ``except Exception`` in the service loop can swallow it."""


class CycleLog:
    """Replaces ``evictor.cycle`` by a wrapper that records the (start, end) virtual time of each
    cycle (failed ones too) and wakes waiters when one ends."""

    def __init__(self, evictor: Evictor, *, fake: bool, on_call: Any = None) -> None:
        self.calls: list[tuple[float, float]] = []
        self.errors: list[BaseException] = []
        self._ended = trio.Event()
        real = evictor.cycle

        async def cycle(*, dry_run: bool = False) -> EvictionReport:
            start = trio.current_time()
            if len(self.calls) >= 1000:  # a loop that never waits: fail instead of hanging
                raise RunawayLoop(f"{len(self.calls)} cycles at t={start}")
            if on_call is not None:
                on_call(len(self.calls))
            try:
                return EvictionReport(dry_run=dry_run) if fake else await real(dry_run=dry_run)
            except BaseException as exc:
                self.errors.append(exc)
                raise
            finally:
                self.calls.append((start, trio.current_time()))
                self._ended.set()
                self._ended = trio.Event()

        evictor.cycle = cycle  # type: ignore[method-assign]

    @property
    def starts(self) -> list[float]:
        return [s for s, _ in self.calls]

    async def wait_for(self, n: int) -> None:
        """Wait until ``n`` cycles have ended.  No timeout of our own: under the autojump clock a
        deadline would be jumped to while a cycle waits on a worker thread."""
        while len(self.calls) < n:
            await self._ended.wait()


async def test_run_cycles_every_check_interval_and_on_request(tmp_path: Path, autojump_clock: Any) -> None:
    interval = 300.0
    evictor = Evictor(None, HubCache(tmp_path), Rules(), check_interval=interval)  # type: ignore[arg-type]
    log = CycleLog(evictor, fake=True)
    async with trio.open_nursery() as nursery:
        await nursery.start(evictor.run)
        t0 = trio.current_time()
        await trio.sleep(3.5 * interval)
        assert [s - t0 for s in log.starts] == [interval, 2 * interval, 3 * interval]

        # On demand: at once, and the timer restarts from there.
        evictor.request_cycle()
        await trio.sleep(0.001)
        assert [s - t0 for s in log.starts[3:]] == [3.5 * interval]
        await trio.sleep(interval)
        assert [s - t0 for s in log.starts[3:]] == [3.5 * interval, 4.5 * interval]

        # Several requests before the loop wakes up make one cycle.
        evictor.request_cycle()
        evictor.request_cycle()
        await trio.sleep(interval / 2)
        assert len(log.calls) == 6
        nursery.cancel_scope.cancel()
    assert log.errors == []


async def test_a_request_during_a_cycle_is_not_lost(tmp_path: Path, autojump_clock: Any) -> None:
    interval = 60.0
    evictor = Evictor(None, HubCache(tmp_path), Rules(), check_interval=interval)  # type: ignore[arg-type]

    def on_call(n: int) -> None:
        if n == 0:
            evictor.request_cycle()  # e.g. a download hit ENOSPC while the first cycle ran

    log = CycleLog(evictor, fake=True, on_call=on_call)
    async with trio.open_nursery() as nursery:
        await nursery.start(evictor.run)
        t0 = trio.current_time()
        await trio.sleep(interval * 1.5)
        assert [s - t0 for s in log.starts] == [interval, interval]
        await trio.sleep(interval)
        assert [s - t0 for s in log.starts] == [interval, interval, 2 * interval]
        nursery.cancel_scope.cancel()


async def test_run_survives_a_registry_outage(tmp_path: Path, autojump_clock: Any) -> None:
    interval = 10.0
    evictor = Evictor(None, HubCache(tmp_path), Rules(), check_interval=interval)  # type: ignore[arg-type]
    calls: list[float] = []

    async def cycle(*, dry_run: bool = False) -> EvictionReport:
        calls.append(trio.current_time())
        if len(calls) <= 2:
            raise RegistryError("registry down")
        return EvictionReport()

    evictor.cycle = cycle  # type: ignore[method-assign]
    async with trio.open_nursery() as nursery:
        await nursery.start(evictor.run)
        t0 = trio.current_time()
        await trio.sleep(interval * 4.5)
        assert [c - t0 for c in calls] == [interval, 2 * interval, 3 * interval, 4 * interval]
        nursery.cancel_scope.cancel()


async def test_run_evicts_on_the_timer_and_on_request(cache: HubCache, registry: Any, autojump_clock: Any) -> None:
    a = await add_entry(cache, registry, "org/a", 1, files_for(1), ref="main")
    b = await add_entry(cache, registry, "org/b", 2, files_for(2), ref="main")
    c = await add_entry(cache, registry, "org/c", 3, files_for(3), ref="main")
    await touch_in_order(registry, a, b, c)
    interval = 60.0
    evictor = Evictor(registry, cache, Rules(max_models=2, **EVICT_NOW), check_interval=interval)
    log = CycleLog(evictor, fake=False)

    async with trio.open_nursery() as nursery:
        await nursery.start(evictor.run)
        t0 = trio.current_time()
        await log.wait_for(1)
        assert log.errors == []
        assert log.starts == [t0 + interval]
        report = evictor.last_report
        assert report is not None
        assert [(v.name, v.reason) for v in report.evicted] == [(a, Reason.COUNT)]
        assert report.bytes_freed == distinct_bytes(files_for(1))

        # Tighten the limit and ask for a cycle: it runs now, not at the next tick.
        evictor.rules = Rules(max_models=1, **EVICT_NOW)
        requested_at = trio.current_time()
        assert requested_at < log.calls[0][1] + interval
        evictor.request_cycle()
        await log.wait_for(2)
        assert log.errors == []
        assert log.starts[1] == requested_at
        report = evictor.last_report
        assert report is not None
        assert [(v.name, v.reason) for v in report.evicted] == [(b, Reason.COUNT)]

        # Nothing left to do: the next timer cycle, a full interval after that one, evicts nothing.
        await log.wait_for(3)
        assert log.starts[2] == log.calls[1][1] + interval
        assert evictor.last_report is not None and evictor.last_report.evicted == []
        nursery.cancel_scope.cancel()

    assert await names(registry) == [c]
    assert cached_revisions(cache) == {("org/c", commit_of(3))}
    no_scan_warnings(cache)
