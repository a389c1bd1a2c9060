"""The embedded registry: one SQLite file shared by the mxfs processes of one node.

Several processes (and several connections in one process) may open the same file, so:

- the database runs in WAL mode, so readers never block the writer;
- every write runs in a ``BEGIN IMMEDIATE`` transaction, which takes SQLite's single write lock
  before reading anything, so each read-modify-write below is atomic across connections and
  processes; waiting for that lock is bounded by ``busy_timeout``;
- time comes from SQLite's clock inside the statements (``_NOW_MS``), never from Python.

Timestamps are stored as integer milliseconds since the Unix epoch: exact, cheap to compare, and
the same unit as Redis's ``lease_expires_at``.  They come back as timezone-aware UTC datetimes
whose microseconds are whole milliseconds, so a :class:`Record` read back compares equal to the
stored value in :meth:`SqliteRegistry.delete_if_unchanged`.

``sqlite3`` blocks, so each call runs in ``trio.to_thread.run_sync`` behind a per-instance
``CapacityLimiter(1)``: one connection, used by one thread at a time.

A damaged file (SQLite says "file is not a database" or "database disk image is malformed", or
``PRAGMA quick_check``, run at every open, finds a fault) raises :class:`RegistryCorrupt`, never
a plain failure: the caller may then :func:`quarantine` it (move it aside) and open a fresh one.
A busy or locked database, a permission problem or a full disk is not corruption and never
moved aside.  What goes into the fresh file is the caller's business (``mxfs.rebuild``); this
module knows nothing of the cache.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import sqlite3
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote, unquote, urlsplit

import trio

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
)

T = TypeVar("T")

SCHEMA_VERSION = 4  # 2: the locks table; 3: the refs table; 4: the holders table
# Another process may hold the write lock (a claim, or another process creating the schema):
# wait this long for it before reporting the registry as unavailable.
BUSY_TIMEOUT_MS = 10_000

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MS = timedelta(milliseconds=1)

# Now, in integer milliseconds since the epoch, from SQLite's clock.  ``%s`` is whole seconds and
# ``%f`` is ``SS.SSS``; SQLite evaluates 'now' once per statement, so both parts agree.  (Integer
# arithmetic rather than ``julianday`` keeps the value exact.)
_NOW_MS = "(CAST(strftime('%s', 'now') AS INTEGER) * 1000 + CAST(substr(strftime('%f', 'now'), 4) AS INTEGER))"

# Every write that stamps ``last_used_at`` moves it forward by at least 1 ms, even when the clock
# has not ticked (or stepped back) since the previous write.  Eviction relies on this:
# ``delete_if_unchanged`` must see any touch that happened after its listing.
_BUMP_LAST_USED = f"MAX({_NOW_MS}, last_used_at_ms + 1)"

_CREATE_SCHEMA = (
    """
    CREATE TABLE IF NOT EXISTS entries (
        model_name          TEXT PRIMARY KEY NOT NULL,
        provider            TEXT NOT NULL,
        status              TEXT NOT NULL CHECK (status IN ('DOWNLOADING', 'DOWNLOADED', 'ERROR')),
        created_at_ms       INTEGER NOT NULL,
        last_used_at_ms     INTEGER NOT NULL,
        message             TEXT,
        claim_id            TEXT,
        lease_expires_at_ms INTEGER,
        pinned              INTEGER NOT NULL DEFAULT 0,
        size_bytes          INTEGER
    ) WITHOUT ROWID
    """,
    # Serves list_by_last_used (eviction order) without sorting the table.
    "CREATE INDEX IF NOT EXISTS entries_by_last_used ON entries (last_used_at_ms, model_name)",
    # Named leases between nodes (e.g. the eviction sweep); not entries, so not in `entries`.
    """
    CREATE TABLE IF NOT EXISTS locks (
        name           TEXT PRIMARY KEY NOT NULL,
        owner          TEXT NOT NULL,
        expires_at_ms  INTEGER NOT NULL
    ) WITHOUT ROWID
    """,
    # Where each branch or tag points, as `mxfs refresh` recorded it for every node to follow.
    # Rows are replaced, never deleted, so MAX(version) only grows.
    """
    CREATE TABLE IF NOT EXISTS refs (
        repo_id         TEXT NOT NULL,
        revision        TEXT NOT NULL,
        commit_hash     TEXT NOT NULL,
        version         INTEGER NOT NULL,
        recorded_at_ms  INTEGER NOT NULL,
        PRIMARY KEY (repo_id, revision)
    ) WITHOUT ROWID
    """,
    "CREATE INDEX IF NOT EXISTS refs_by_version ON refs (version)",
    # Which nodes serve each entry to their peers, until when.  Not entries either: no record
    # operation reads or writes this table.
    """
    CREATE TABLE IF NOT EXISTS holders (
        name           TEXT NOT NULL,
        node           TEXT NOT NULL,
        address        TEXT NOT NULL,
        complete       INTEGER NOT NULL,
        expires_at_ms  INTEGER NOT NULL,
        PRIMARY KEY (name, node)
    ) WITHOUT ROWID
    """,
    # Serves the bounded sweep of expired holders that every put_holder runs.
    "CREATE INDEX IF NOT EXISTS holders_by_expiry ON holders (expires_at_ms)",
)

_COLUMNS = (
    "model_name, provider, status, created_at_ms, last_used_at_ms, message, claim_id,"
    " lease_expires_at_ms, pinned, size_bytes"
)
_SELECT_RECORD = f"SELECT {_COLUMNS} FROM entries WHERE model_name = :name"
_SELECT_STATUS = "SELECT status FROM entries WHERE model_name = :name"
_SELECT_STATUS_AND_CLAIM = "SELECT status, claim_id FROM entries WHERE model_name = :name"
# LIMIT -1 means no limit.
_LIST_BY_LAST_USED = f"SELECT {_COLUMNS} FROM entries ORDER BY last_used_at_ms, model_name LIMIT :limit"
_STATUS_COUNTS = "SELECT status, COUNT(*) FROM entries GROUP BY status"

# Upsert.  A status other than DOWNLOADING has no owner, so it ends any claim (the old owner's
# refresh and finish then fail); a DOWNLOADING write (say, a progress message) keeps the owner.
_SET_STATUS = f"""
    INSERT INTO entries (model_name, provider, status, message, created_at_ms, last_used_at_ms)
    VALUES (:name, :provider, :status, :message, {_NOW_MS}, {_NOW_MS})
    ON CONFLICT (model_name) DO UPDATE SET
        status = excluded.status,
        message = excluded.message,
        last_used_at_ms = {_BUMP_LAST_USED},
        claim_id = CASE WHEN excluded.status = 'DOWNLOADING' THEN claim_id END,
        lease_expires_at_ms = CASE WHEN excluded.status = 'DOWNLOADING' THEN lease_expires_at_ms END
"""

# Single-row updates; atomic as statements and run inside BEGIN IMMEDIATE like every write.
_TOUCH = f"UPDATE entries SET last_used_at_ms = {_BUMP_LAST_USED} WHERE model_name = :name"
_DELETE = "DELETE FROM entries WHERE model_name = :name"
_SET_PINNED = "UPDATE entries SET pinned = :pinned WHERE model_name = :name"

# The compare and the delete are one statement, under the write lock: an entry touched or
# re-claimed since the caller's listing no longer matches and survives.
_DELETE_IF_UNCHANGED = """
    DELETE FROM entries
    WHERE model_name = :name AND status = :status AND last_used_at_ms = :last_used_at_ms
"""

# Create the record, or take over a DOWNLOADING one whose lease has expired (keeping created_at
# and pinned).  The upsert's WHERE is evaluated under the write lock, so of N concurrent callers
# exactly one inserts or takes over; the others change no row.  A DOWNLOADING record without a
# lease (written by set_status) has no lease that could expire and is not taken over.
_TRY_CLAIM = f"""
    INSERT INTO entries
        (model_name, provider, status, created_at_ms, last_used_at_ms, claim_id, lease_expires_at_ms)
    VALUES (:name, :provider, 'DOWNLOADING', {_NOW_MS}, {_NOW_MS}, :claim_id, {_NOW_MS} + :lease_ms)
    ON CONFLICT (model_name) DO UPDATE SET
        last_used_at_ms = {_BUMP_LAST_USED},
        message = NULL,
        claim_id = excluded.claim_id,
        lease_expires_at_ms = excluded.lease_expires_at_ms,
        size_bytes = NULL
    WHERE status = 'DOWNLOADING' AND lease_expires_at_ms <= {_NOW_MS}
"""

# Fenced by claim_id: only the current owner of a DOWNLOADING record matches.  Refreshing a lease
# that expired but was not yet taken over is allowed: nobody else owns the record.
_REFRESH_CLAIM = f"""
    UPDATE entries SET lease_expires_at_ms = {_NOW_MS} + :lease_ms
    WHERE model_name = :name AND claim_id = :claim_id AND status = 'DOWNLOADING'
"""

# Fenced like _REFRESH_CLAIM, so an owner that was taken over cannot publish.  A missing
# size_bytes keeps whatever is stored.
_FINISH_CLAIM = f"""
    UPDATE entries SET
        status = :status,
        message = :message,
        size_bytes = COALESCE(:size_bytes, size_bytes),
        claim_id = NULL,
        lease_expires_at_ms = NULL,
        last_used_at_ms = {_BUMP_LAST_USED}
    WHERE model_name = :name AND claim_id = :claim_id AND status = 'DOWNLOADING'
"""

# Compare-and-set on status: of N concurrent callers exactly one still sees from_status.
# Take the lock if it is free, expired, or already ours (re-entrant renewal); one statement, so
# two callers cannot both see it free.
_TRY_LOCK = f"""
    INSERT INTO locks (name, owner, expires_at_ms) VALUES (:name, :owner, {_NOW_MS} + :ttl_ms)
    ON CONFLICT (name) DO UPDATE SET owner = excluded.owner, expires_at_ms = excluded.expires_at_ms
    WHERE locks.owner = excluded.owner OR locks.expires_at_ms <= {_NOW_MS}
"""
_UNLOCK = "DELETE FROM locks WHERE name = :name AND owner = :owner"

_REF_COLUMNS = "repo_id, revision, commit_hash, version, recorded_at_ms"
_SELECT_REF = f"SELECT {_REF_COLUMNS} FROM refs WHERE repo_id = :repo_id AND revision = :revision"
# Run under the write lock after _SELECT_REF found a different commit (or none).
_RECORD_REF = f"""
    INSERT INTO refs (repo_id, revision, commit_hash, version, recorded_at_ms)
    VALUES (:repo_id, :revision, :commit, (SELECT COALESCE(MAX(version), 0) + 1 FROM refs), {_NOW_MS})
    ON CONFLICT (repo_id, revision) DO UPDATE SET
        commit_hash = excluded.commit_hash, version = excluded.version, recorded_at_ms = excluded.recorded_at_ms
"""
_REFS_VERSION = "SELECT COALESCE(MAX(version), 0) FROM refs"
_REFS_SINCE = f"SELECT {_REF_COLUMNS} FROM refs WHERE version > :version ORDER BY version"

# Upsert: a refresh moves the expiry and may change the address and completeness.
_PUT_HOLDER = f"""
    INSERT INTO holders (name, node, address, complete, expires_at_ms)
    VALUES (:name, :node, :address, :complete, {_NOW_MS} + :ttl_ms)
    ON CONFLICT (name, node) DO UPDATE SET
        address = excluded.address, complete = excluded.complete, expires_at_ms = excluded.expires_at_ms
"""
# Holders of entries that nobody asks about again would stay forever: each put removes up to
# this many expired holders of any entry, oldest first (through holders_by_expiry), so the table
# shrinks at least as fast as puts fill it, at bounded cost per put.
_SWEEP_HOLDERS = f"""
    DELETE FROM holders WHERE (name, node) IN (
        SELECT name, node FROM holders WHERE expires_at_ms <= {_NOW_MS} ORDER BY expires_at_ms LIMIT :limit
    )
"""
_DROP_HOLDER = "DELETE FROM holders WHERE name = :name AND node = :node"
# All of one entry's holders with whether each has expired, judged by the statement's own now.
_SELECT_HOLDERS = f"""
    SELECT node, address, complete, expires_at_ms, expires_at_ms <= {_NOW_MS} FROM holders WHERE name = :name
"""
_PRUNE_HOLDERS = f"DELETE FROM holders WHERE name = :name AND expires_at_ms <= {_NOW_MS}"
HOLDER_SWEEP_LIMIT = 16

_TRY_RETAKE = f"""
    UPDATE entries SET
        status = 'DOWNLOADING',
        message = NULL,
        claim_id = :claim_id,
        lease_expires_at_ms = {_NOW_MS} + :lease_ms,
        size_bytes = NULL,
        last_used_at_ms = {_BUMP_LAST_USED}
    WHERE model_name = :name AND status = :from_status
"""


# Insert a record for an entry found complete in the cache (``restore_downloaded``); an entry
# that has a record by now (another process claimed it meanwhile) keeps it.  Times are clamped to
# SQLite's now: the registry has one clock, and nothing it holds lies in its future.
_RESTORE_DOWNLOADED = f"""
    INSERT INTO entries (model_name, provider, status, message, created_at_ms, last_used_at_ms, size_bytes)
    VALUES (:name, :provider, 'DOWNLOADED', :message,
            MIN(:created_at_ms, {_NOW_MS}), MIN(:last_used_at_ms, {_NOW_MS}), :size_bytes)
    ON CONFLICT (model_name) DO NOTHING
"""

# SQLite's result codes that mean the file's content is damaged (extended codes such as
# SQLITE_CORRUPT_INDEX carry theirs in the low byte).  Nothing else is corruption: SQLITE_BUSY
# and SQLITE_LOCKED (another process holds a lock), SQLITE_PERM, SQLITE_READONLY and
# SQLITE_CANTOPEN (permissions, a missing directory), SQLITE_FULL and SQLITE_IOERR (the disk,
# now) pass or are fixed by an operator, and moving the file aside would throw away a sound
# registry.
_CORRUPTION_CODES = frozenset({sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB})
# quick_check lists at most this many faults; the first few say enough in a log line.
_QUICK_CHECK_FAULTS = 3

# The files that belong to a database, by suffix.  They are moved aside with it, and before it,
# so that a fresh database at the old name never meets the old one's write-ahead log or hot
# journal: SQLite would apply it to the fresh file.
_COMPANIONS = ("-wal", "-shm", "-journal")

# Every connection to a WAL database holds a shared lock on this byte of the -shm file for as long
# as it is open (SQLite's unix VFS: UNIX_SHM_DMS = (22 + 8) * 4 + 8); a connection that opens the
# database while another process holds it exclusively waits.
_SHM_DMS_BYTE = 128


class RegistryCorrupt(RegistryError):
    """The registry's SQLite file is damaged: SQLite says so, or ``PRAGMA quick_check`` does."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(
            f"registry sqlite://{path} is corrupt: {reason} (`mxfs mount`, `mxfs prefetch` and `mxfs refresh`"
            " move a corrupt registry aside and rebuild it from the cache when they start)"
        )
        self.path = path
        self.reason = reason


def _is_corruption(exc: sqlite3.Error) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    return code is not None and code & 0xFF in _CORRUPTION_CODES


def _quick_check(conn: sqlite3.Connection, path: Path) -> None:
    """RegistryCorrupt unless ``PRAGMA quick_check`` finds the database sound.

    It reads every page (a registry holds a few thousand rows at most, so this costs
    milliseconds), so a damaged page is found at open, not by whichever call reads it first.
    Other failures (a busy database, permissions) raise ``sqlite3.Error`` as they are.
    """
    try:
        rows = conn.execute(f"PRAGMA quick_check({_QUICK_CHECK_FAULTS})").fetchall()
    except sqlite3.Error as exc:
        if _is_corruption(exc):
            raise RegistryCorrupt(path, str(exc)) from exc
        raise
    if rows != [("ok",)]:
        # One fault per line, after a "*** in database main ***" heading.
        faults = [line for row in rows for line in str(row[0]).splitlines() if not line.startswith("***")]
        raise RegistryCorrupt(path, "quick_check: " + "; ".join(faults[:_QUICK_CHECK_FAULTS]))


def _check(path: Path) -> None:
    """:func:`_quick_check` of the existing database at ``path``, on a read-only connection; blocking.

    Read-only because the last connection to close checkpoints the -wal into the file and deletes
    it and the -shm, even on a damaged file, and those belong with it when it is moved aside.
    """
    conn = sqlite3.connect(
        f"file:{quote(str(path))}?mode=ro", uri=True, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None
    )
    try:
        _quick_check(conn, path)
    finally:
        conn.close()


def _from_ms(ms: int) -> datetime:
    return _EPOCH + ms * _MS


def _to_ms(when: datetime) -> int | None:
    """``when`` in whole milliseconds; None if it has finer precision (so no stored value equals it)."""
    if when.tzinfo is None:
        raise ValueError("a naive datetime cannot be compared with registry timestamps")
    ms, rest = divmod(when - _EPOCH, _MS)
    return None if rest else ms


def _floor_ms(when: datetime) -> int:
    if when.tzinfo is None:
        raise ValueError("a naive datetime cannot be stored as a registry timestamp")
    return (when - _EPOCH) // _MS


def _ref_record(row: tuple[Any, ...]) -> RefRecord:
    repo_id, revision, commit, version, recorded_at_ms = row
    return RefRecord(repo_id, revision, commit, int(version), _from_ms(recorded_at_ms))


def _record(row: tuple[Any, ...]) -> Record:
    name, provider, status, created, last_used, message, claim_id, lease, pinned, size = row
    return Record(
        model_name=name,
        provider=provider,
        status=Status(status),
        created_at=_from_ms(created),
        last_used_at=_from_ms(last_used),
        message=message,
        claim_id=claim_id,
        lease_expires_at=None if lease is None else _from_ms(lease),
        pinned=bool(pinned),
        size_bytes=size,
    )


@contextmanager
def _immediate(conn: sqlite3.Connection) -> Iterator[None]:
    """Run the block in a ``BEGIN IMMEDIATE`` transaction, committing unless it raises.

    IMMEDIATE takes the write lock at BEGIN, so nothing the block reads can change before it
    commits; a DEFERRED transaction could read, then fail to upgrade to a writer.
    """
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
        conn.execute("COMMIT")
    except BaseException:
        # A failed COMMIT can leave the transaction open; the next BEGIN would then fail.
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def _connect(path: Path) -> sqlite3.Connection:
    """Open ``path`` (creating it, its directory and the schema if needed); runs in a thread."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    # Create the file ourselves so it is private from the start; SQLite gives the -wal and -shm
    # files the database file's mode.
    os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
    checked = os.path.getsize(path) == 0  # an empty file is a new database (SQLite says so too)
    if not checked:
        try:
            _check(path)
            checked = True
        except sqlite3.Error as exc:
            # A hot rollback journal (left by a writer that died, if someone switched the file out
            # of WAL mode) needs a writer to roll it back: check on the writer below.
            if exc.sqlite_errorcode & 0xFF != sqlite3.SQLITE_READONLY:
                raise
    # isolation_level=None: the sqlite3 module must not open transactions behind our back; every
    # write below says BEGIN IMMEDIATE itself.  timeout= is SQLite's busy_timeout.
    conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None, check_same_thread=False)
    try:
        if not checked:
            _quick_check(conn, path)
        # WAL needs shared memory between the processes, which a network filesystem may not
        # offer; SQLite then silently keeps the old mode, so check.
        (mode,) = conn.execute("PRAGMA journal_mode = WAL").fetchone()
        if mode != "wal":
            raise RegistryError(f"{path}: cannot use WAL mode (got {mode!r}); put it on a local filesystem")
        # In WAL mode NORMAL is durable against process crashes, which is what concurrent mxfs
        # processes need; a power loss may roll back the last commits, which costs a re-download.
        conn.execute("PRAGMA synchronous = NORMAL")
        with _immediate(conn):
            (version,) = conn.execute("PRAGMA user_version").fetchone()
            if version > SCHEMA_VERSION:
                raise RegistryError(
                    f"{path}: registry schema version {version} is newer than this mxfs supports ({SCHEMA_VERSION})"
                )
            if version < SCHEMA_VERSION:
                for statement in _CREATE_SCHEMA:
                    conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
    except BaseException:
        conn.close()
        raise
    return conn


class SqliteRegistry(RegistryBackend):
    """The :class:`~mxfs.registry.base.Registry` on a SQLite file; create it with :meth:`open`."""

    def __init__(self, conn: sqlite3.Connection, path: Path) -> None:
        self._conn = conn
        self.path = path
        self._limiter = trio.CapacityLimiter(1)
        self._closed = False
        self.url_for_logs = f"sqlite://{path}"

    @classmethod
    async def open(cls, path: str | os.PathLike[str]) -> SqliteRegistry:
        """Connect to the database at the absolute ``path``, creating it and its schema if needed."""
        path = Path(path)
        if not path.is_absolute():
            raise ValueError(f"registry database path must be absolute: {str(path)!r}")
        try:
            conn = await trio.to_thread.run_sync(_connect, path)
        except sqlite3.Error as exc:
            if _is_corruption(exc):
                raise RegistryCorrupt(path, str(exc)) from exc
            raise RegistryError(f"cannot open registry sqlite://{path}: {exc}") from exc
        except OSError as exc:
            raise RegistryError(f"cannot create registry sqlite://{path}: {exc}") from exc
        return cls(conn, path)

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn(conn)`` in a worker thread, one at a time, turning SQLite failures into RegistryError."""
        if self._closed:
            raise RegistryError(f"registry {self.url_for_logs} is closed")
        try:
            return await trio.to_thread.run_sync(fn, self._conn, limiter=self._limiter)
        except sqlite3.Error as exc:
            metrics.REGISTRY_ERRORS.inc()
            if _is_corruption(exc):
                raise RegistryCorrupt(self.path, str(exc)) from exc
            raise RegistryError(f"registry {self.url_for_logs}: {exc}") from exc

    async def _write(self, sql: str, params: dict[str, Any]) -> int:
        """Run one write statement in its own IMMEDIATE transaction; the number of rows it changed."""

        def write(conn: sqlite3.Connection) -> int:
            with _immediate(conn):
                return conn.execute(sql, params).rowcount

        return await self._run(write)

    async def get_status(self, name: str) -> Status | None:
        row = await self._run(lambda conn: conn.execute(_SELECT_STATUS, {"name": name}).fetchone())
        return None if row is None else Status(row[0])

    async def get_record(self, name: str) -> Record | None:
        row = await self._run(lambda conn: conn.execute(_SELECT_RECORD, {"name": name}).fetchone())
        return None if row is None else _record(row)

    async def set_status(self, name: str, status: Status, message: str | None = None) -> None:
        params = {"name": name, "provider": PROVIDER, "status": Status(status).value, "message": message}
        await self._write(_SET_STATUS, params)

    async def touch(self, name: str) -> None:
        await self._write(_TOUCH, {"name": name})

    async def delete(self, name: str) -> None:
        await self._write(_DELETE, {"name": name})

    async def delete_if_unchanged(self, name: str, status: Status, last_used_at: datetime) -> bool:
        last_used_at_ms = _to_ms(last_used_at)
        if last_used_at_ms is None:
            return False
        params = {"name": name, "status": Status(status).value, "last_used_at_ms": last_used_at_ms}
        return await self._write(_DELETE_IF_UNCHANGED, params) == 1

    async def list_by_last_used(self, limit: int | None = None) -> list[Record]:
        if limit is not None and limit < 0:
            raise ValueError(f"limit must not be negative, got {limit}")
        params = {"limit": -1 if limit is None else limit}
        rows = await self._run(lambda conn: conn.execute(_LIST_BY_LAST_USED, params).fetchall())
        return [_record(row) for row in rows]

    async def status_counts(self) -> StatusCounts:
        rows = await self._run(lambda conn: conn.execute(_STATUS_COUNTS).fetchall())
        counts = {Status(status): count for status, count in rows}
        return StatusCounts(
            downloading=counts.get(Status.DOWNLOADING, 0),
            downloaded=counts.get(Status.DOWNLOADED, 0),
            error=counts.get(Status.ERROR, 0),
        )

    async def try_claim(self, name: str, claim_id: str, lease: float) -> ClaimOutcome:
        params = {"name": name, "provider": PROVIDER, "claim_id": claim_id, "lease_ms": lease_ms(lease)}

        def claim(conn: sqlite3.Connection) -> ClaimOutcome:
            # One transaction, so the status reported to a loser is the one that made it lose.
            with _immediate(conn):
                if conn.execute(_TRY_CLAIM, params).rowcount == 1:
                    return Claimed()
                status, owner = conn.execute(_SELECT_STATUS_AND_CLAIM, {"name": name}).fetchone()
                return AlreadyExists(Status(status), owner)

        return await self._run(claim)

    async def refresh_claim(self, name: str, claim_id: str, lease: float) -> bool:
        params = {"name": name, "claim_id": claim_id, "lease_ms": lease_ms(lease)}
        return await self._write(_REFRESH_CLAIM, params) == 1

    async def finish_claim(
        self,
        name: str,
        claim_id: str,
        status: Status,
        message: str | None = None,
        size_bytes: int | None = None,
    ) -> bool:
        check_final(status)
        params = {
            "name": name,
            "claim_id": claim_id,
            "status": Status(status).value,
            "message": message,
            "size_bytes": size_bytes,
        }
        return await self._write(_FINISH_CLAIM, params) == 1

    async def try_retake(self, name: str, claim_id: str, lease: float, from_status: Status) -> bool:
        params = {
            "name": name,
            "claim_id": claim_id,
            "lease_ms": lease_ms(lease),
            "from_status": Status(from_status).value,
        }
        return await self._write(_TRY_RETAKE, params) == 1

    async def set_pinned(self, name: str, pinned: bool) -> bool:
        return await self._write(_SET_PINNED, {"name": name, "pinned": int(pinned)}) == 1

    async def try_lock(self, name: str, owner: str, ttl: float) -> bool:
        return await self._write(_TRY_LOCK, {"name": name, "owner": owner, "ttl_ms": lease_ms(ttl)}) == 1

    async def unlock(self, name: str, owner: str) -> bool:
        return await self._write(_UNLOCK, {"name": name, "owner": owner}) == 1

    async def record_ref(self, repo_id: str, revision: str, commit: str) -> RefRecord:
        params = {"repo_id": repo_id, "revision": revision, "commit": commit}

        def record(conn: sqlite3.Connection) -> RefRecord:
            with _immediate(conn):
                row = conn.execute(_SELECT_REF, params).fetchone()
                if row is None or row[2] != commit:
                    conn.execute(_RECORD_REF, params)
                    row = conn.execute(_SELECT_REF, params).fetchone()
                return _ref_record(row)

        return await self._run(record)

    async def refs_version(self) -> int:
        (version,) = await self._run(lambda conn: conn.execute(_REFS_VERSION).fetchone())
        return int(version)

    async def refs_since(self, version: int) -> list[RefRecord]:
        rows = await self._run(lambda conn: conn.execute(_REFS_SINCE, {"version": version}).fetchall())
        return [_ref_record(row) for row in rows]

    async def put_holder(self, name: str, node: str, address: str, complete: bool, ttl: float) -> None:
        params = {"name": name, "node": node, "address": address, "complete": int(complete)}
        params["ttl_ms"] = lease_ms(check_seconds("ttl", ttl))

        def put(conn: sqlite3.Connection) -> None:
            with _immediate(conn):
                conn.execute(_SWEEP_HOLDERS, {"limit": HOLDER_SWEEP_LIMIT})
                conn.execute(_PUT_HOLDER, params)

        await self._run(put)

    async def drop_holder(self, name: str, node: str) -> None:
        await self._write(_DROP_HOLDER, {"name": name, "node": node})

    async def holders(self, name: str) -> list[Holder]:
        rows = await self._run(lambda conn: conn.execute(_SELECT_HOLDERS, {"name": name}).fetchall())
        if any(expired for *_, expired in rows):
            # Only this entry's rows: a read never pays for the whole table.
            await self._write(_PRUNE_HOLDERS, {"name": name})
        live = [
            Holder(node, address, bool(complete), _from_ms(ms))
            for node, address, complete, ms, expired in rows
            if not expired
        ]
        return sorted(live, key=holder_order)

    async def restore_downloaded(self, records: Iterable[RestoredRecord]) -> list[str]:
        """Record entries found complete in the cache as DOWNLOADED, all in one transaction.

        For rebuilding this registry from its cache (``mxfs.rebuild``), so not part of the
        :class:`~mxfs.registry.base.Registry` protocol: a shared registry is never rebuilt from
        one node's cache.  An entry that has a record keeps it; times later than SQLite's now are
        stored as now.  Returns the names recorded.
        """
        params = [
            {
                "name": r.model_name,
                "provider": PROVIDER,
                "message": r.message,
                "size_bytes": r.size_bytes,
                "created_at_ms": _floor_ms(min(r.created_at, r.last_used_at)),
                "last_used_at_ms": _floor_ms(r.last_used_at),
            }
            for r in records
        ]
        if not params:
            return []

        def restore(conn: sqlite3.Connection) -> list[str]:
            with _immediate(conn):
                return [p["name"] for p in params if conn.execute(_RESTORE_DOWNLOADED, p).rowcount == 1]

        return await self._run(restore)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        # The limiter makes close wait for a call still running in the worker thread; the shield
        # makes sure the connection (and its file descriptors) goes even when the caller is
        # cancelled.
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(self._conn.close, limiter=self._limiter)


@dataclass(frozen=True)
class RestoredRecord:
    """An entry to record as DOWNLOADED by :meth:`SqliteRegistry.restore_downloaded`."""

    model_name: str
    size_bytes: int
    created_at: datetime
    last_used_at: datetime
    message: str | None = None


def corruption(path: Path) -> str | None:
    """What is wrong with the database at ``path`` (None: nothing); blocking.

    Reads an existing file only, and raises :class:`RegistryError` for what is not corruption (a
    busy database, permissions), like :meth:`SqliteRegistry.open`.
    """
    try:
        _check(path)
    except RegistryCorrupt as exc:
        return exc.reason
    except sqlite3.Error as exc:
        raise RegistryError(f"cannot check registry sqlite://{path}: {exc}") from exc
    return None


def quarantine(path: str | os.PathLike[str]) -> Path | None:
    """Move the corrupt database at ``path`` aside, with its -wal, -shm and -journal; blocking.

    Returns its new name, ``<path>.corrupt-<UTC time>`` (the companions keep their suffixes, so
    ``sqlite3`` opens the pair as it was), or None when there is nothing to move: ``path`` is
    gone, or no longer corrupt (another process moved it aside first).  The caller then opens a
    fresh database at ``path``.

    Raises :class:`RegistryError`, moving nothing, when another process has the database open: it
    would go on using the moved file while this one uses the fresh one, two registries on one node.
    Call it with no connection of this process open on the database: closing the descriptors
    used here drops every POSIX lock the process holds on those files, SQLite's included.
    """
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        # Processes that find the same file corrupt at once move it one at a time, and only while
        # it is still the file at ``path``: never the fresh database that the first put there.
        fcntl.flock(fd, fcntl.LOCK_EX)
        with contextlib.suppress(FileNotFoundError):
            here = os.stat(path)
            mine = os.fstat(fd)
            if (here.st_dev, here.st_ino) == (mine.st_dev, mine.st_ino) and corruption(path) is not None:
                with _sole_user(path):
                    aside = _aside_name(path)
                    for suffix in _COMPANIONS:
                        with contextlib.suppress(FileNotFoundError):
                            os.rename(f"{path}{suffix}", f"{aside}{suffix}")
                    os.rename(path, aside)
                    _fsync_dir(path.parent)
                return aside
        return None
    finally:
        os.close(fd)


@contextmanager
def _sole_user(path: Path) -> Iterator[None]:
    """Hold, exclusively, the lock that each open connection to the database holds shared.

    RegistryError if another process holds it (has the database open).  Only WAL databases have
    the lock; no -shm file means no connection in WAL mode, and the registry is always in WAL mode.
    While it is held, a process that opens the database waits (SQLite's busy handler).
    """
    try:
        fd = os.open(f"{path}-shm", os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        yield
        return
    try:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, _SHM_DMS_BYTE)
        except OSError as exc:
            if exc.errno not in (errno.EACCES, errno.EAGAIN):
                raise
            raise RegistryError(
                f"registry sqlite://{path} is corrupt but another process has it open, so it is not moved aside;"
                " stop the other mxfs processes of this node (a mount, prefetch, status), then start again"
            ) from exc
        yield
    finally:
        os.close(fd)  # drops the lock


def _aside_name(path: Path) -> Path:
    """``<path>.corrupt-<UTC time>``, with ``.1``, ``.2`` ... added if that name is taken."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    n = 0
    while True:
        aside = path.with_name(f"{path.name}.corrupt-{stamp}{f'.{n}' if n else ''}")
        if not any(os.path.lexists(f"{aside}{suffix}") for suffix in ("", *_COMPANIONS)):
            return aside
        n += 1


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def path_from_url(url: str) -> Path:
    """The database path of a ``sqlite:///absolute/path.db`` URL; ValueError if it names none."""
    parts = urlsplit(url)
    if parts.scheme != "sqlite":
        raise ValueError(f"not a sqlite URL: {url!r}")
    if parts.netloc:
        # sqlite://var/x.db: "var" parsed as a host, almost certainly a missing slash.
        raise ValueError(f"sqlite URL {url!r} has a host part; write an absolute path as sqlite:///path/to/registry.db")
    if parts.query or parts.fragment:
        raise ValueError(f"sqlite URL {url!r}: query and fragment are not supported")
    path = unquote(parts.path)
    if not path:
        raise ValueError(f"sqlite URL {url!r} names no database file")
    if not path.startswith("/"):
        raise ValueError(f"sqlite URL {url!r} has a relative path; use sqlite:///absolute/path.db")
    if path.endswith("/"):
        raise ValueError(f"sqlite URL {url!r} names a directory, not a database file")
    return Path(path)


async def open_url(url: str) -> SqliteRegistry:
    """Open the registry named by a ``sqlite:`` URL (the entry point ``open_registry`` uses)."""
    return await SqliteRegistry.open(path_from_url(url))
