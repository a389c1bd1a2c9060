"""LRU eviction (DESIGN section 6): the policy as pure functions, and the service that applies it.

The policy (:func:`select_victims`) looks only at registry records, sizes and free space, so it
is tested without a clock, a disk or a registry.  The service (:class:`Evictor`) runs it every
``check_interval`` (and on demand: ``mxfs gc``, a full disk), under a registry lock so that one
node sweeps at a time, and removes a victim only if its record is unchanged since it was chosen:
a model touched in between survives.

What is never evicted: pinned entries, entries with a file open on this node, and entries
touched within ``in_use_grace`` (every node touches the entries it has open every minute, so an
entry open on another node is safe too).  ``force`` (``mxfs evict --force``) lifts the grace rule
only, never the open-file rule.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import logging
import os
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Protocol

import trio

from mxfs import metrics
from mxfs.cache import HubCache, repo_folder_name
from mxfs.config import Rules, format_size
from mxfs.names import EntryName, entry_label
from mxfs.openfiles import FileKey, file_key, in_use
from mxfs.registry import Record, Registry, RegistryError, Status

log = logging.getLogger(__name__)

EVICTION_LOCK = "evict"


class Reason(enum.StrEnum):
    """Why an entry was evicted: the rule that chose it, or ``mxfs evict``. A metric label too."""

    TIME = "time"
    COUNT = "count"
    SIZE = "size"
    DISK = "disk"
    MANUAL = "manual"


metrics.start_series(metrics.EVICTIONS, "reason", Reason)
metrics.start_series(metrics.EVICTED_BYTES, "reason", Reason)


@dataclass(frozen=True)
class Victim:
    record: Record
    reason: Reason
    size: int

    @property
    def name(self) -> str:
        return self.record.model_name


class HandOffRelease(Protocol):
    """What eviction asks of the hand-off (mxfs.handoff): take a model off the kernel before its
    files go, and hand it back if it stays."""

    async def detach_entry(self, name: EntryName) -> None: ...

    async def restore_entry(self, name: EntryName) -> None: ...


class PeerRelease(Protocol):
    """What eviction asks of the fleet (mxfs.peers): stop listing this node as a holder of an
    entry before its files go, so peers stop asking for them."""

    async def withdraw(self, name: str) -> None: ...


@dataclass(frozen=True)
class CacheUsage:
    """What the disk rules look at: bytes the cache holds and bytes free on its filesystem."""

    cache_bytes: int
    free_bytes: int


def protected(
    record: Record, *, now: datetime, rules: Rules, open_entries: set[str], force: bool = False
) -> str | None:
    """Why ``record`` must not be evicted now, or None if it may be."""
    if record.status != Status.DOWNLOADED:
        return f"status {record.status.value}"
    if record.pinned:
        return "pinned"
    if record.model_name in open_entries:
        return "open on this node"
    if not force and record.last_used_at > now - timedelta(seconds=rules.in_use_grace):
        return f"used within the last {rules.in_use_grace:.0f}s"
    return None


def select_victims(
    records: Iterable[Record],
    *,
    now: datetime,
    rules: Rules,
    usage: CacheUsage,
    sizes: dict[str, int],
    open_entries: set[str],
) -> list[Victim]:
    """Entries to evict, oldest ``last_used_at`` first, each with the first rule that chose it.

    ``sizes`` maps entry names to the bytes their eviction frees (from the cache; the record's
    ``size_bytes`` is the fallback).  Rules are applied in order: time, count, size, disk; each
    later rule counts what the earlier ones already freed.
    """
    downloaded = sorted(
        (r for r in records if r.status == Status.DOWNLOADED), key=lambda r: (r.last_used_at, r.model_name)
    )
    eligible = [r for r in downloaded if protected(r, now=now, rules=rules, open_entries=open_entries) is None]
    chosen: dict[str, Victim] = {}

    def size_of(record: Record) -> int:
        return sizes.get(record.model_name, record.size_bytes or 0)

    def choose(record: Record, reason: Reason) -> None:
        if record.model_name not in chosen:
            chosen[record.model_name] = Victim(record, reason, size_of(record))

    def freed() -> int:
        return sum(v.size for v in chosen.values())

    if rules.unused_threshold is not None:
        cutoff = now - timedelta(seconds=rules.unused_threshold)
        for record in eligible:
            if record.last_used_at < cutoff:
                choose(record, Reason.TIME)
    if rules.max_models is not None:
        for record in eligible:
            if len(downloaded) - len(chosen) <= rules.max_models:
                break
            choose(record, Reason.COUNT)
    if rules.max_cache_size is not None:
        for record in eligible:
            if usage.cache_bytes - freed() <= rules.max_cache_size:
                break
            choose(record, Reason.SIZE)
    if rules.min_free_space is not None:
        for record in eligible:
            if usage.free_bytes + freed() >= rules.min_free_space:
                break
            choose(record, Reason.DISK)
    order = {r.model_name: i for i, r in enumerate(downloaded)}
    return sorted(chosen.values(), key=lambda v: order[v.name])


@dataclass
class EvictionReport:
    """What one eviction (a cycle, or ``mxfs evict``) did, or would do with ``dry_run``."""

    evicted: list[Victim] = field(default_factory=list)
    bytes_freed: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (entry key, why)
    dry_run: bool = False

    @property
    def reasons(self) -> set[Reason]:
        return {v.reason for v in self.evicted}


def record_evictions(report: EvictionReport, *, cycle: bool) -> None:
    """Count what one eviction did (``cycle``: a sweep, not ``mxfs evict``); a dry run did nothing."""
    if report.dry_run:
        return
    if cycle:
        metrics.EVICTION_CYCLES.inc()
    for victim in report.evicted:
        metrics.EVICTIONS.labels(reason=victim.reason.value).inc()
        metrics.EVICTED_BYTES.labels(reason=victim.reason.value).inc(victim.size)


def mxfs_records(records: Iterable[Record]) -> list[Record]:
    """Only mxfs entries: a shared Redis also holds ModelExpress's own records (``org/name``),
    which describe another cache and must never be evicted from this one."""
    return [record for record in records if EntryName.parse(record.model_name) is not None]


def open_blob_etags(cache_root: Path) -> set[tuple[str, str]]:
    """(repo folder, etag) of every blob or partial download some process opened under the cache.

    By path: a partial file (``<etag>.<writer>.incomplete``) has no inode a record could name
    yet, but its name says which blob it becomes.
    """
    root = str(cache_root.resolve()) + os.sep
    found: set[tuple[str, str]] = set()
    with contextlib.suppress(FileNotFoundError):
        pids = [p for p in os.listdir("/proc") if p.isdigit()]
        for pid in pids:
            fd_dir = f"/proc/{pid}/fd"
            try:
                fds = os.listdir(fd_dir)
            except OSError:
                continue
            for fd in fds:
                try:
                    target = os.readlink(f"{fd_dir}/{fd}")
                except OSError:
                    continue
                if not target.startswith(root):
                    continue
                parts = target[len(root) :].split(os.sep)
                if len(parts) == 3 and parts[1] == "blobs":
                    found.add((parts[0], parts[2].split(".", 1)[0]))
    return found


def _entries_with_open_partials(cache: HubCache, records: Sequence[Record]) -> set[str]:
    open_blobs = open_blob_etags(cache.root)
    if not open_blobs:
        return set()
    result = set()
    for record in records:
        name = EntryName.parse(record.model_name)
        if name is None:
            continue
        folder = repo_folder_name(name.repo_id)
        for link in cache.snapshot_links(name.repo_id, name.commit):
            with contextlib.suppress(OSError):
                if (folder, os.path.basename(os.readlink(link))) in open_blobs:
                    result.add(record.model_name)
                    break
    return result


def blob_keys(cache: HubCache, records: Sequence[Record]) -> dict[FileKey, set[str]]:
    """(st_dev, st_ino) of every blob of ``records``, with the names of the entries that use it."""
    keys: dict[FileKey, set[str]] = {}
    for record in records:
        name = EntryName.parse(record.model_name)
        if name is None:
            continue
        for link in cache.snapshot_links(name.repo_id, name.commit):
            with contextlib.suppress(OSError):
                keys.setdefault(file_key(os.stat(link)), set()).add(record.model_name)
    return keys


def entries_with_open_blobs(cache: HubCache, records: Sequence[Record]) -> set[str]:
    """Names of the entries (among ``records``) with a blob open or mapped by a process on this node.

    Matched by inode, not path: the daemon's own descriptors, programs reading the HF cache
    directly, and readers of a model handed to the kernel (which open it through the mount, in
    a pod under yet another path) all hold the blob's inode; so do mappings (``safe_open``) whose
    descriptor is closed.  A separate ``mxfs evict`` process sees them all without the daemon.
    """
    keys = blob_keys(cache, records)
    found = _entries_with_open_partials(cache, records)
    for key in in_use(keys):
        found |= keys[key]
    return found


def measure_cache_usage(cache: HubCache) -> CacheUsage:
    """Bytes held by the cache's blobs (partial downloads included) and free bytes (statvfs)."""
    total = 0
    for repo in cache.root.glob("models--*"):
        with contextlib.suppress(FileNotFoundError), os.scandir(repo / "blobs") as it:
            for item in it:
                with contextlib.suppress(FileNotFoundError):
                    total += item.stat(follow_symlinks=False).st_blocks * 512
    st = os.statvfs(cache.root)
    return CacheUsage(cache_bytes=total, free_bytes=st.f_bavail * st.f_frsize)


class Evictor:
    """Applies :class:`Rules` to one cache and registry; runs cycles on a timer and on demand."""

    def __init__(
        self,
        registry: Registry,
        cache: HubCache,
        rules: Rules,
        *,
        check_interval: float = 300.0,
        open_entries: Callable[[], set[str]] = set,
        usage: Callable[[HubCache], CacheUsage] = measure_cache_usage,
        handoff: HandOffRelease | None = None,
        peers: PeerRelease | None = None,
    ) -> None:
        self.registry = registry
        self.peers = peers
        self.cache = cache
        self.rules = rules
        self.check_interval = check_interval
        self._open_entries = open_entries
        self._usage = usage
        self.handoff = handoff
        self._owner = uuid.uuid4().hex
        self._wakeup = trio.Event()
        self._lock = trio.Lock()
        self.limiter = trio.CapacityLimiter(2)
        self.last_report: EvictionReport | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run a cycle every ``check_interval`` and whenever :meth:`request_cycle` is called."""
        task_status.started()
        while True:
            with trio.move_on_after(self.check_interval):
                await self._wakeup.wait()
            self._wakeup = trio.Event()
            try:
                await self.cycle()
            except RegistryError as exc:
                log.warning("eviction cycle skipped: registry unavailable: %s", exc)
            except Exception:
                # A failing cycle (a cache file system error, say) must not take the mount down.
                log.exception("eviction cycle failed; trying again at the next interval")

    async def usage(self) -> CacheUsage:
        """Bytes the cache holds and bytes free on its disk now (measured in a worker thread)."""
        return await trio.to_thread.run_sync(self._usage, self.cache, limiter=self.limiter)

    def request_cycle(self) -> None:
        """Ask for a cycle now (a download hit ENOSPC)."""
        self._wakeup.set()

    async def _protected_names(self, records: Sequence[Record]) -> set[str]:
        on_disk = await trio.to_thread.run_sync(entries_with_open_blobs, self.cache, records, limiter=self.limiter)
        return set(self._open_entries()) | on_disk

    async def make_room(self, needed: int) -> EvictionReport:
        """A download found the disk full: a cycle that also frees ``needed`` bytes if it can.

        Without a ``min_free_space`` rule a full disk would otherwise evict nothing; with one, the
        larger of the two wins.  Protected entries (pinned, open, recently used) stay.
        """
        return await self.cycle(need_free=needed)

    async def cycle(self, *, dry_run: bool = False, need_free: int = 0) -> EvictionReport:
        """One sweep under the registry's eviction lock; returns what it evicted (or would)."""
        async with self._lock:
            ttl = max(self.check_interval, 600.0)
            if not await self.registry.try_lock(EVICTION_LOCK, self._owner, ttl):
                log.debug("eviction: another node is sweeping")
                return EvictionReport(dry_run=dry_run)
            try:
                report = await self._sweep(dry_run, need_free)
            finally:
                with trio.CancelScope(shield=True):
                    await self.registry.unlock(EVICTION_LOCK, self._owner)
        self.last_report = report
        record_evictions(report, cycle=True)
        return report

    async def _sweep(self, dry_run: bool, need_free: int = 0) -> EvictionReport:
        records = mxfs_records(await self.registry.list_by_last_used())
        usage = await self.usage()
        sizes = await trio.to_thread.run_sync(self._sizes, records, limiter=self.limiter)
        open_names = await self._protected_names(records)
        rules = self.rules
        if need_free > (rules.min_free_space or 0):
            rules = dataclasses.replace(rules, min_free_space=need_free)
        victims = select_victims(
            records, now=datetime.now(UTC), rules=rules, usage=usage, sizes=sizes, open_entries=open_names
        )
        report = EvictionReport(dry_run=dry_run)
        for victim in victims:
            if dry_run:
                report.evicted.append(victim)
                report.bytes_freed += victim.size
                continue
            freed = await self._evict(victim.record)
            if isinstance(freed, str):
                report.skipped.append((victim.name, freed))
                continue
            report.evicted.append(Victim(victim.record, victim.reason, freed))
            report.bytes_freed += freed
        self._log(report, usage)
        return report

    def _sizes(self, records: Sequence[Record]) -> dict[str, int]:
        sizes = {}
        for record in records:
            name = EntryName.parse(record.model_name)
            if name is not None:
                with contextlib.suppress(OSError):
                    sizes[record.model_name] = self.cache.snapshot_size(name.repo_id, name.commit)
        return sizes

    async def _evict(self, record: Record) -> int | str:
        """Remove the record (if unchanged), then the revision; the bytes freed, or why it stays.

        A model handed to the kernel is detached first (lazily: open and mapped files keep
        reading), then looked at again: a reader that opened it between the choice and the
        detach keeps it, and it is handed back.
        """
        name = EntryName.parse(record.model_name)
        assert name is not None, "only mxfs_records() are ever evicted"
        if self.handoff is not None:
            await self.handoff.detach_entry(name)
            if await trio.to_thread.run_sync(entries_with_open_blobs, self.cache, [record], limiter=self.limiter):
                await self.handoff.restore_entry(name)
                return "open on this node"
        if not await self.registry.delete_if_unchanged(record.model_name, record.status, record.last_used_at):
            if self.handoff is not None:
                await self.handoff.restore_entry(name)
            return "changed since it was chosen"
        try:
            if self.peers is not None:
                await self.peers.withdraw(record.model_name)
            return await trio.to_thread.run_sync(
                self.cache.delete_revision, name.repo_id, name.commit, limiter=self.limiter
            )
        finally:
            if self.handoff is not None:
                await self.handoff.restore_entry(name)

    async def evict(self, names: Iterable[str], *, force: bool = False) -> EvictionReport:
        """``mxfs evict``: remove these entries now (reason ``manual``), within the safety rules."""
        wanted = set(names)
        records = [r for r in mxfs_records(await self.registry.list_by_last_used()) if r.model_name in wanted]
        open_names = await self._protected_names(records)
        now = datetime.now(UTC)
        report = EvictionReport()
        for record in records:
            why = protected(record, now=now, rules=self.rules, open_entries=open_names, force=force)
            if why is not None:
                report.skipped.append((record.model_name, why))
                continue
            freed = await self._evict(record)
            if isinstance(freed, str):
                report.skipped.append((record.model_name, freed))
                continue
            report.evicted.append(Victim(record, Reason.MANUAL, freed))
            report.bytes_freed += freed
        self._log(report, None)
        record_evictions(report, cycle=False)
        return report

    def _log(self, report: EvictionReport, usage: CacheUsage | None) -> None:
        verb = "would evict" if report.dry_run else "evicted"
        for victim in report.evicted:
            log.info("%s %s (%s, reason %s)", verb, entry_label(victim.name), format_size(victim.size), victim.reason)
        for name, why in report.skipped:
            log.info("kept %s: %s", entry_label(name), why)
        if report.evicted or usage is None:
            log.info("eviction: %s %d entries, %s freed", verb, len(report.evicted), format_size(report.bytes_freed))
