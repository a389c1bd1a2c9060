"""A corrupt embedded registry is moved aside and rebuilt from the cache (mxfs.rebuild).

Real files throughout: a real ``registry.db`` written by mxfs and then garbled, truncated or
with pages overwritten; a real HF-layout cache with blobs, snapshot links and the state dir's
tree listings; and one real mount that is stopped, has its registry corrupted, and comes back.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import random
import re
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest

from mxfs.cache import HubCache
from mxfs.names import EntryName
from mxfs.rebuild import REBUILT_MESSAGE, open_registry_recovering
from mxfs.registry import Record, Registry, RegistryError, Status
from mxfs.registry import sqlite as sqlite_backend
from mxfs.registry.sqlite import RegistryCorrupt, SqliteRegistry, quarantine
from mxfs.statedir import StateDir
from mxfs.tree import HubFile, RepoTree
from tests.hubserver import FakeHub
from tests.mounting import MountedFs, requires_fuse, run_cli, wait_until

COMMIT_A = "a" * 40
COMMIT_B = "b" * 40
ASIDE = re.compile(r"^registry\.db\.corrupt-\d{8}T\d{6}Z(\.\d+)?$")
# 2024-01-02 and 2024-03-04, in whole seconds: what the test's blobs say about their use.
WRITTEN = 1_704_153_600.0
READ = 1_709_510_400.0


def git_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class Setup:
    """A cache, a state dir and a registry path, all under one tmp dir."""

    def __init__(self, root: Path) -> None:
        self.cache = HubCache(root / "cache")
        self.state = StateDir(root / "state")
        self.db = root / "state" / "registry.db"
        self.url = f"sqlite://{self.db}"
        self.cache.ensure_root()
        self.db.parent.mkdir(parents=True, exist_ok=True)

    def add_entry(self, repo_id: str, commit: str, files: dict[str, bytes], *, listed: bool = True) -> int:
        """Lay out a complete snapshot the way mxfs does (blobs, links, the state dir's listing)."""
        listing = []
        for path, data in files.items():
            lfs = len(data) > 1000
            hub_file = HubFile(path, len(data), git_sha1(data), hashlib.sha256(data).hexdigest() if lfs else None)
            listing.append(hub_file)
            blob = self.cache.blob_path(repo_id, hub_file.etag)
            blob.parent.mkdir(parents=True, exist_ok=True)
            blob.write_bytes(data)
            os.utime(blob, (READ, WRITTEN))
            self.cache.link_snapshot(repo_id, commit, path, hub_file.etag)
        if listed:
            self.state.write_tree(RepoTree(repo_id, commit, datetime(2024, 1, 1, tzinfo=UTC), tuple(listing)))
        return sum(len(d) for d in files.values())

    def snapshot_file(self, repo_id: str, commit: str, path: str) -> Path:
        return self.cache.snapshot_file(repo_id, commit, path)

    def asides(self) -> list[str]:
        """The moved-aside databases (not their -wal and -shm)."""
        return sorted(p.name for p in self.db.parent.iterdir() if ASIDE.match(p.name))

    def write(self, suffix: str, data: bytes) -> None:
        Path(f"{self.db}{suffix}").write_bytes(data)

    async def recover(self) -> Registry:
        return await open_registry_recovering(self.url, self.cache, self.state.read_tree)


@pytest.fixture
def setup(tmp_path: Path) -> Setup:
    return Setup(tmp_path)


async def write_registry(db: Path, names: list[str]) -> None:
    """A real registry.db with records, closed (so its WAL is checkpointed into the file)."""
    registry = await SqliteRegistry.open(db)
    try:
        for name in names:
            await registry.set_status(name, Status.DOWNLOADED, "x" * 200)
    finally:
        await registry.aclose()
    assert not companions(db)  # all in the file


def companions(db: Path) -> list[str]:
    return sorted(p.name for p in db.parent.iterdir() if p.name.startswith(db.name) and p.name != db.name)


def garbage(db: Path) -> None:
    db.write_bytes(random.Random(1).randbytes(db.stat().st_size))


def text(db: Path) -> None:
    db.write_bytes(b"this is not a database\n")


def truncated_half(db: Path) -> None:
    os.truncate(db, db.stat().st_size // 2)


def truncated_header(db: Path) -> None:
    os.truncate(db, 60)


def junk_pages(db: Path) -> None:
    """Overwrite pages 3 and 4 with junk: the header and the schema on page 1 still read fine, so
    the file opens; ``quick_check`` stops with "database disk image is malformed"."""
    with open(db, "r+b") as f:
        f.seek(4096 * 2)
        f.write(b"\xab" * 4096 * 2)


def garbled_index_page(db: Path) -> None:
    """Make the root page of the last-used index claim to be a table page: the file opens and its
    records read fine; ``quick_check`` reports the faults it finds (rows, not an error)."""
    with sqlite3.connect(db) as conn:
        (root,) = conn.execute("SELECT rootpage FROM sqlite_master WHERE name = 'entries_by_last_used'").fetchone()
        (page_size,) = conn.execute("PRAGMA page_size").fetchone()
    conn.close()
    with open(db, "r+b") as f:
        f.seek((root - 1) * page_size)
        kind = f.read(1)[0]
        f.seek((root - 1) * page_size)
        f.write(bytes([{0x02: 0x05, 0x0A: 0x0D}[kind]]))  # index b-tree page -> table b-tree page


CORRUPTIONS = [garbage, text, truncated_half, truncated_header, junk_pages, garbled_index_page]


def bulk_names(n: int) -> list[str]:
    return [EntryName(f"bulk/m{i}", f"{i:040x}").key for i in range(n)]


async def records(registry: Registry) -> dict[str, Record]:
    return {r.model_name: r for r in await registry.list_by_last_used()}


@pytest.mark.parametrize("corrupt", CORRUPTIONS, ids=lambda f: f.__name__)
async def test_corrupt_registry_is_moved_aside_and_rebuilt_from_the_cache(
    setup: Setup, corrupt: Callable[[Path], None], caplog: pytest.LogCaptureFixture
) -> None:
    size_a = setup.add_entry("org/complete", COMMIT_A, {"config.json": b"{}", "model.bin": b"w" * 5000})
    setup.add_entry("org/incomplete", COMMIT_A, {"config.json": b"{1}", "model.bin": b"v" * 5000})
    setup.snapshot_file("org/incomplete", COMMIT_A, "model.bin").unlink()
    setup.add_entry("org/unlisted", COMMIT_A, {"config.json": b"{2}"}, listed=False)
    await write_registry(setup.db, bulk_names(300))
    corrupt(setup.db)
    damaged = setup.db.read_bytes()
    if corrupt in (junk_pages, garbled_index_page):
        # The cases only quick_check finds at open: the file opens and its schema reads.
        conn = sqlite3.connect(setup.db)
        assert conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] > 0
        if corrupt is garbled_index_page:
            assert len(conn.execute("SELECT * FROM entries NOT INDEXED").fetchall()) == 300
            assert conn.execute("PRAGMA quick_check").fetchall() != [("ok",)]
        else:
            with pytest.raises(sqlite3.DatabaseError, match="malformed"):
                conn.execute("PRAGMA quick_check").fetchall()
        conn.close()
    with pytest.raises(RegistryCorrupt):
        await SqliteRegistry.open(setup.db)

    caplog.set_level(logging.INFO, logger="mxfs")
    registry = await setup.recover()
    try:
        found = await records(registry)
    finally:
        await registry.aclose()

    (aside,) = setup.asides()
    assert ASIDE.match(aside), aside
    assert (setup.db.parent / aside).read_bytes() == damaged  # kept as it was, for a post-mortem
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert f"registry {setup.db} is corrupt" in warnings[0]
    assert f"aside to {setup.db.parent / aside};" in warnings[0]
    assert "recorded again as DOWNLOADED" in warnings[0]

    name = EntryName("org/complete", COMMIT_A).key
    assert list(found) == [name]  # not the incomplete one, not the unlisted one, none of the old
    record = found[name]
    assert record.status == Status.DOWNLOADED
    assert record.size_bytes == size_a
    assert record.created_at == datetime.fromtimestamp(WRITTEN, UTC)
    assert record.last_used_at == datetime.fromtimestamp(READ, UTC)  # the newest access time
    assert record.message == REBUILT_MESSAGE
    assert record.claim_id is None and not record.pinned
    # The fresh file is a sound registry that the next start opens as it is.
    registry = await setup.recover()
    try:
        assert list(await records(registry)) == [name]
    finally:
        await registry.aclose()
    assert len(setup.asides()) == 1


async def test_wal_and_shm_go_aside_with_the_database(setup: Setup) -> None:
    """The old log must not meet the fresh database: SQLite would apply it to the fresh file."""
    await write_registry(setup.db, bulk_names(3))
    garbage(setup.db)
    wal, shm = b"old write-ahead log" * 100, b"old shared memory" * 100
    setup.write("-wal", wal)
    setup.write("-shm", shm)
    registry = await setup.recover()
    await registry.aclose()
    (main,) = setup.asides()
    assert (setup.db.parent / f"{main}-wal").read_bytes() == wal  # the log, kept as it was
    assert (setup.db.parent / f"{main}-shm").exists()  # an index SQLite rebuilds on open anyway
    with sqlite3.connect(setup.db) as conn:
        assert conn.execute("PRAGMA quick_check").fetchall() == [("ok",)]


async def test_times_never_lie_in_the_future(setup: Setup) -> None:
    setup.add_entry("org/future", COMMIT_A, {"a.txt": b"a"})
    future = time.time() + 10 * 86400
    blob = setup.snapshot_file("org/future", COMMIT_A, "a.txt").resolve()
    os.utime(blob, (future, future))
    text(setup.db)
    registry = await setup.recover()
    try:
        (record,) = (await records(registry)).values()
    finally:
        await registry.aclose()
    now = datetime.now(UTC)
    assert record.last_used_at <= now and record.created_at <= now
    assert (now - record.last_used_at).total_seconds() < 60


@pytest.mark.parametrize(
    "damage",
    ["link missing", "link dangling", "blob of another size", "a file, not a link", "link to another blob"],
)
def test_only_complete_snapshots_are_recorded(setup: Setup, damage: str) -> None:
    from mxfs.rebuild import scan

    files = {"config.json": b"{}", "model.bin": b"w" * 5000, "other.bin": b"v" * 5000}
    setup.add_entry("org/m", COMMIT_A, files)
    link = setup.snapshot_file("org/m", COMMIT_A, "model.bin")
    blob = link.resolve()
    if damage == "link missing":
        link.unlink()
    elif damage == "link dangling":
        blob.unlink()
    elif damage == "blob of another size":
        blob.write_bytes(b"w" * 10)
    elif damage == "a file, not a link":
        link.unlink()
        link.write_bytes(files["model.bin"])
    else:  # a blob of the same size, but not this file's
        link.unlink()
        os.symlink(os.path.relpath(setup.snapshot_file("org/m", COMMIT_A, "other.bin").resolve(), link.parent), link)
    found, done = scan(setup.cache, setup.state.read_tree)
    assert found == [] and done.incomplete == 1


async def test_an_empty_registry_is_filled_from_the_cache(setup: Setup, caplog: pytest.LogCaptureFixture) -> None:
    """A file deleted by hand, or truncated to nothing (SQLite takes that for a new database)."""
    size = setup.add_entry("org/m", COMMIT_A, {"a.txt": b"a", "b.bin": b"b" * 3000})
    await write_registry(setup.db, [])
    os.truncate(setup.db, 0)
    caplog.set_level(logging.INFO, logger="mxfs")
    registry = await setup.recover()
    try:
        (record,) = (await records(registry)).values()
    finally:
        await registry.aclose()
    assert record.size_bytes == size and record.status == Status.DOWNLOADED
    assert setup.asides() == []
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("rebuilt from the cache: 1 model recorded" in r.getMessage() for r in caplog.records)


async def test_a_registry_with_records_is_left_as_it_is(setup: Setup) -> None:
    setup.add_entry("org/m", COMMIT_A, {"a.txt": b"a"})
    other = EntryName("org/other", COMMIT_B).key
    await write_registry(setup.db, [other])
    registry = await setup.recover()
    try:
        assert list(await records(registry)) == [other]
    finally:
        await registry.aclose()


@pytest.mark.parametrize("problem", ["locked", "a directory", "a newer schema"])
async def test_what_is_not_corruption_is_never_moved_aside(
    setup: Setup, problem: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Busy, unopenable or newer is an error for the operator (or time) to fix, not a reason to
    throw the registry away."""
    if problem == "a directory":
        setup.db.mkdir()
    else:
        await write_registry(setup.db, bulk_names(3))
    holder = None
    if problem == "locked":
        monkeypatch.setattr(sqlite_backend, "BUSY_TIMEOUT_MS", 200)
        holder = sqlite3.connect(setup.db, isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")
    elif problem == "a newer schema":
        with sqlite3.connect(setup.db) as conn:
            conn.execute(f"PRAGMA user_version = {sqlite_backend.SCHEMA_VERSION + 1}")
    before = setup.db.stat()
    try:
        with pytest.raises(RegistryError) as info:
            await setup.recover()
    finally:
        if holder is not None:
            holder.close()
    assert not isinstance(info.value, RegistryCorrupt)
    assert setup.asides() == []
    after = setup.db.stat()
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (before.st_ino, before.st_size, before.st_mtime_ns)


_CRASHED_WRITER = """
import os, sqlite3, sys
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("PRAGMA cache_size = 1")  # so the change spills into the file, behind the journal
conn.execute("BEGIN")
conn.execute("UPDATE entries SET message = 'half written'")
os._exit(0)  # dies mid-transaction: a hot journal
"""


def leave_hot_journal(db: Path) -> None:
    with sqlite3.connect(db, isolation_level=None) as conn:
        conn.execute("PRAGMA journal_mode = DELETE")
    conn.close()
    subprocess.run([sys.executable, "-c", _CRASHED_WRITER, str(db)], check=True)
    assert Path(f"{db}-journal").stat().st_size > 0


async def test_a_hot_journal_is_rolled_back_not_taken_for_corruption(setup: Setup) -> None:
    """Someone switched the registry out of WAL mode and a writer died mid-transaction: only a
    writer can roll the journal back (the read-only check cannot), and the file is sound."""
    names = bulk_names(300)
    await write_registry(setup.db, names)
    leave_hot_journal(setup.db)
    registry = await setup.recover()
    try:
        found = await records(registry)
    finally:
        await registry.aclose()
    assert sorted(found) == sorted(names)
    assert {r.message for r in found.values()} == {"x" * 200}  # the dead writer's change rolled back
    assert setup.asides() == []


_HOLDER = """
import sqlite3, sys, time
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("SELECT count(*) FROM entries").fetchone()  # in WAL mode: the connection is open
print("ready", flush=True)
sys.stdin.read()
"""


def start_holder(db: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", _HOLDER, str(db)], stdin=subprocess.PIPE, stdout=subprocess.PIPE)


async def test_a_registry_another_process_has_open_is_not_moved(setup: Setup) -> None:
    """Moving it would leave that process writing to the moved file: two registries on one node."""
    await write_registry(setup.db, bulk_names(300))
    holder = start_holder(setup.db)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"ready\n"
        junk_pages(setup.db)
        with pytest.raises(RegistryError, match="another process has it open") as info:
            await setup.recover()
        assert not isinstance(info.value, RegistryCorrupt)
        assert setup.asides() == []
    finally:
        holder.communicate(b"", timeout=10)
    # Once that process is gone, the next start recovers.
    registry = await setup.recover()
    await registry.aclose()
    assert len(setup.asides()) == 1


def test_quarantine_moves_only_the_file_it_found_corrupt(setup: Setup) -> None:
    """Two processes find the same file corrupt: the second must not move what the first put in
    its place (here another corrupt file, so that only the file's identity tells them apart)."""
    text(setup.db)
    fd = os.open(setup.db, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)  # the first process, busy moving it
    result: list[Path | None] = []
    second = threading.Thread(target=lambda: result.append(quarantine(setup.db)))
    second.start()
    time.sleep(0.2)
    os.rename(setup.db, setup.db.with_name("moved-by-the-first"))
    text(setup.db)  # what the first put in its place
    os.close(fd)
    second.join(10)
    assert result == [None]
    assert setup.asides() == []
    # On its own, a corrupt file is moved, and a sound one is not.
    assert quarantine(setup.db) is not None
    with sqlite3.connect(setup.db) as conn:
        conn.execute("CREATE TABLE t (x)")
    assert quarantine(setup.db) is None
    assert len(setup.asides()) == 1


@pytest.mark.parametrize("command", [["status", "--json"], ["gc"], ["pin", "org/m"]])
def test_cli_commands_report_a_corrupt_registry_in_one_line(setup: Setup, tmp_path: Path, command: list[str]) -> None:
    """status/gc/evict/pin/unpin leave the file to the daemon (see mxfs.rebuild): one clear
    error, exit 1, no traceback, nothing moved."""
    text(setup.db)
    done = run_cli(*command, "--cache-dir", str(setup.cache.root), "--state-dir", str(setup.db.parent))
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert f"registry sqlite://{setup.db} is corrupt: file is not a database" in done.stderr
    assert "rebuild it from the cache" in done.stderr
    assert setup.asides() == []


# -- a real mount --------------------------------------------------------------------------------


def file_requests(hub: FakeHub, repo_id: str) -> int:
    """Requests that move file bytes (resolve and CDN GETs)."""
    return len([r for r in hub.requests(method="GET", repo_id=repo_id) if r.kind in ("resolve", "cdn")])


def registry_status(path: Path) -> bytes:
    try:
        return os.getxattr(path, "user.mxfs.status")
    except OSError:
        return b"?"


@requires_fuse
def test_mount_comes_back_over_a_corrupt_registry_without_downloading_again(
    hub: FakeHub, new_repo_id: Callable[[], str], mxfs_mount: Callable[..., MountedFs]
) -> None:
    repo = new_repo_id()
    files = {"config.json": b'{"model_type": "test"}', "model.safetensors": random.Random(7).randbytes(2_000_000)}
    commit = hub.add_repo(repo, files)
    first = mxfs_mount()
    for rel, data in files.items():
        with open(first / repo / rel, "rb") as f:
            assert f.read() == data
    wait_until(lambda: registry_status(first / repo) == b"downloaded", 30, "the download recorded")
    downloaded_at = datetime.now(UTC)
    assert first.stop() == 0

    db = first.state_dir / "registry.db"
    db.write_bytes(random.Random(8).randbytes(db.stat().st_size))
    hub.reset_log()
    again = mxfs_mount(state_dir=first.state_dir)
    moved = f"is corrupt (file is not a database): moved it (and its -wal and -shm, where present) aside to {db}."
    again.allowed_log.append(re.escape(moved))
    warnings = [line for line in again.log().splitlines() if " WARNING " in line]
    assert len(warnings) == 1 and f"registry {db} is corrupt (file is not a database)" in warnings[0], warnings

    # Before anything is opened (an open would record the entry again by itself): rebuilt.
    dirs = ["--state-dir", str(first.state_dir), "--cache-dir", str(first.cache_dir)]
    status = run_cli("status", "--json", *dirs)
    assert status.returncode == 0, status.stderr
    (row,) = [json.loads(line) for line in status.stdout.splitlines()]
    assert (row["model"], row["commit"], row["status"]) == (repo, commit, "DOWNLOADED")
    assert row["size_bytes"] == sum(len(d) for d in files.values())
    last_used = datetime.fromisoformat(row["last_used_at"])
    assert last_used <= datetime.now(UTC)
    assert (downloaded_at - last_used).total_seconds() < 60  # the blobs' times, not 1970 or now + x

    for rel, data in files.items():
        with open(again / repo / rel, "rb") as f:
            assert f.read() == data
    assert registry_status(again / repo) == b"downloaded"
    assert file_requests(hub, repo) == 0
