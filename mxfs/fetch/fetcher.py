"""The claim protocol (DESIGN section 5) as one service the filesystem uses; reads go through
the :class:`~mxfs.fetch.source.FileSource` that :meth:`Fetcher.open` returns.

For every entry this node touches there is one :class:`EntryFetch`.  The first ``open()`` of
any of its files starts one coordination task, which loops until the entry is in the cache:

* every file already in the cache → make sure the registry says DOWNLOADED, done;
* otherwise ask the registry: ``try_claim`` (no record, or a DOWNLOADING record whose lease
  expired), ``try_retake`` from DOWNLOADED (the files vanished) or ``try_reset_error_for_retry``
  (an ERROR entry);
* the winner downloads (:class:`EntryDownload`); everybody else waits, watching the blobs
  appear in the shared cache and the record's status, and tries again after each poll, which is
  how an expired lease is taken over.

Reads wait only for the bytes they ask for.  Failures end up in ``EntryFetch.error`` and reach
readers as domain errors (EIO, EACCES, ENOSPC), with a backoff before the next attempt.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

from mxfs import metrics
from mxfs.cache import HubCache
from mxfs.config import Settings
from mxfs.errors import (
    AccessDenied,
    DiskFull,
    MxfsError,
    NotFound,
    OfflineMiss,
    RegistryUnavailable,
)
from mxfs.fetch.catalog import Catalog
from mxfs.fetch.claim import Claim, LeaseLost
from mxfs.fetch.download import EntryDownload
from mxfs.fetch.entry import Entry
from mxfs.fetch.entrystate import EntryFetch
from mxfs.fetch.files import FileState
from mxfs.fetch.follow import Follower, identity
from mxfs.fetch.partials import PartialMaps
from mxfs.fetch.shared import SharedPartials
from mxfs.fetch.source import FileSource, ReadCount
from mxfs.fetch.sources import DownloadSources, HubOnly
from mxfs.hub import Hub
from mxfs.names import EntryName, ModelRef
from mxfs.registry import (
    FinishNotifier,
    Record,
    Registry,
    RegistryError,
    Status,
)
from mxfs.retry import RetryPolicy

log = logging.getLogger(__name__)

# Attempts of one coordination task, 2 and 4 s apart, before it gives up and leaves the entry in
# ERROR; an open after a further backoff (growing with each failure, up to a minute) starts anew.
ENTRY_RETRY = RetryPolicy(attempts=3, initial_delay=2.0, max_delay=60.0)
REGISTRY_WARNING_INTERVAL = 30.0
# Every node touches the entries it has open this often, so eviction elsewhere sees them in use.
TOUCH_INTERVAL = 60.0
# How often a node whose readers wait on another node's download looks at what it published.
FOLLOW_INTERVAL = 0.25
# How long a peer's request for an entry this node is starting to download waits for it to start.
DOWNLOAD_APPEARS_WITHIN = 2.0


@dataclass(frozen=True)
class Activity:
    """Reads and downloads on this node now, for the metrics exporter."""

    bytes_read: int  # returned by reads through the mount since start-up
    open_handles: int
    downloads_running: int  # entries this node downloads as the claim owner


class Fetcher:
    """Entries, their downloads and their readers on this node."""

    def __init__(
        self,
        catalog: Catalog,
        registry: Registry,
        cache: HubCache,
        settings: Settings,
        sources: DownloadSources | None = None,
    ) -> None:
        self.catalog = catalog
        self.registry = registry
        self.cache = cache
        self.settings = settings
        self.hub: Hub = catalog.hub
        # Where each download's bytes come from: the Hub, or peers first (mxfs.peers.fleet).
        self.sources: DownloadSources = sources or HubOnly(self.hub.client)
        self.partial_maps = PartialMaps(settings.state_dir)
        self.io_limiter = trio.CapacityLimiter(64)
        # Partial files shared with the other nodes of a shared cache: the owner publishes their
        # durable ranges; readers here follow them, unless they must get verified blobs only.
        self.shared = SharedPartials(cache)
        self.follower: Follower | None = None
        if settings.verify != "strict":
            self.follower = Follower(cache, self.shared, uuid.uuid4().hex[:12], self.io_limiter)
        self.net_limiter = trio.CapacityLimiter(max(settings.connections * 4, 16))
        self._entries: dict[str, EntryFetch] = {}
        self._nursery: trio.Nursery | None = None
        # Waiters of entries another node downloads, woken when the registry says it finished
        # (where it can: Redis pub/sub, the Kubernetes watch).
        self._finish_notifier = registry if isinstance(registry, FinishNotifier) else None
        self._finished: dict[str, trio.Event] = {}
        # (entry key, path) of every copy discarded after some of its bytes were read: the
        # filesystem drops the kernel's cached pages of those files.  Rare, so unbounded.
        self._discards_send, self._discards_receive = trio.open_memory_channel[tuple[str, str]](math.inf)
        self._starts_send, self._starts_receive = trio.open_memory_channel[EntryFetch](math.inf)
        # Entries that became complete and verified on this node, for the hand-off (mxfs.handoff);
        # made when first asked for, so a daemon without one queues nothing.
        self._completed_send: trio.MemorySendChannel[Entry] | None = None
        self._reads = ReadCount()
        self._registry_warned_at = -math.inf
        # Set by the daemon: frees space (an eviction cycle) when a download finds the disk full;
        # called with the bytes the entry still needs.
        self.on_disk_full: Callable[[int], Awaitable[object]] | None = None

    # -- lifecycle ----------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Own every background task of this node (downloads, waiting, touching) until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._touch_open_entries)
            nursery.start_soon(self._serve_start_requests)
            if self._finish_notifier is not None:
                await nursery.start(self._finish_notifier.listen_finished, self._finished_elsewhere)
            task_status.started()
            await trio.sleep_forever()

    @property
    def bytes_read(self) -> int:
        """Bytes returned by reads through the mount since start-up."""
        return self._reads.bytes

    def _finished_elsewhere(self, name: str) -> None:
        """The registry says ``name`` finished (on any node): wake its waiters now."""
        if (event := self._finished.pop(name, None)) is not None:
            event.set()

    async def _wait_for_news(self, ef: EntryFetch) -> None:
        """Wait until the entry finishes somewhere (where the registry can tell) or a poll interval
        passes; meanwhile serve readers from the owner's partial files (:mod:`.follow`).

        The poll interval still paces a waiter: files the owner completes one by one appear in
        the shared cache without any message.
        """
        name = ef.entry.registry_key
        deadline = trio.current_time() + self.settings.poll_interval
        # Nothing would ever set an event without a notifier: keep none (they would pile up).
        event = self._finished.setdefault(name, trio.Event()) if self._finish_notifier is not None else None
        while (now := trio.current_time()) < deadline:
            following = False
            if self.follower is not None:
                try:
                    following = await self.follower.follow(ef)
                except OSError as exc:
                    log.debug("%s: could not follow the owner's partial files: %s", ef.entry, exc)
            # Open handles may start waiting any moment: look again soon (a round with nothing
            # to follow does no I/O).
            soon = following or (self.follower is not None and ef.handles > 0)
            with trio.move_on_after(min(FOLLOW_INTERVAL, deadline - now) if soon else deadline - now):
                if event is not None:
                    await event.wait()
                    return
                await trio.sleep_forever()

    def discarded_copies(self) -> trio.MemoryReceiveChannel[tuple[str, str]]:
        """(entry key, path) of each copy discarded after readers were served some of its bytes."""
        return self._discards_receive

    def completed_entries(self) -> trio.MemoryReceiveChannel[Entry]:
        """Each entry once all its files are in the cache and verified (as ``mark_done`` says)."""
        self._completed_send, receive = trio.open_memory_channel[Entry](math.inf)
        return receive

    def _completed(self, ef: EntryFetch) -> None:
        ef.mark_done()
        if self._completed_send is not None:
            self._completed_send.send_nowait(ef.entry)

    # -- names --------------------------------------------------------------------------------

    async def lookup(self, ref: ModelRef) -> Entry:
        return await self.catalog.lookup(ref)

    def resolved_refs(self) -> list[ModelRef]:
        """The names resolved so far (for listing: a model directory shows once it is used)."""
        return list(self.catalog.resolved_refs())

    async def known_repos(self) -> list[str]:
        """Repos with something in the cache, the state dir or the registry (for listing)."""

        def local() -> set[str]:
            return set(self.cache.cached_repos()) | set(self.catalog.state.known_repos())

        repos = await trio.to_thread.run_sync(local, limiter=self.io_limiter)
        repos |= {ref.repo_id for ref in self.catalog.resolved_refs()}
        try:
            for record in await self.registry.list_by_last_used():
                repos.add(record_repo(record))
        except RegistryError as exc:
            self._warn_registry("listing shows the local cache only: registry unavailable: %s", exc)
        return sorted(r for r in repos if r)

    # -- opening and reading -------------------------------------------------------------------

    def entry_fetch(self, entry: Entry) -> EntryFetch:
        ef = self._entries.get(entry.registry_key)
        if ef is None:
            ef = self._entries[entry.registry_key] = EntryFetch(entry, self._discards_send, self._starts_send)
        return ef

    async def open(self, entry: Entry, path: str) -> FileSource:
        """Open a file for reading: returns at once, the download (if any) starts in the background."""
        ef = self.entry_fetch(entry)
        state = ef.states[path]
        held_fd = None
        if state.complete and await self._blob_still_there(ef, state):
            # An open() of a local file: cheap, and it must not race the state from a thread.
            # It is also the check that counts: eviction (here or on another node) may have
            # taken the blob since it was seen above.
            with contextlib.suppress(FileNotFoundError):
                held_fd = state.acquire_fd()
        if state.complete and held_fd is None:
            if await self._evicted(ef):
                # Eviction (this node's, `mxfs evict`, or another node's on a shared cache) took
                # the model: the everyday way a cached model goes, not a fault.
                log.info("%s: %s was evicted from the cache; fetching it again", entry, path)
            else:
                log.warning("%s: %s vanished from the cache; fetching it again", entry, path)
            for s in ef.states.values():
                s.blob = None
                s.retire_fd()
            ef.reset_done()
        handle = FileSource(
            ef,
            state,
            strict=self.settings.verify == "strict",
            io_limiter=self.io_limiter,
            reads=self._reads,
            held_fd=held_fd,
        )
        ef.handles += 1
        self._spawn(self._touch, entry)
        if not state.complete:
            self.ensure_started(ef)
        return handle

    async def _evicted(self, ef: EntryFetch) -> bool:
        """The entry's record is gone from the registry: eviction deletes it before the files."""
        try:
            return await self.registry.get_record(ef.entry.registry_key) is None
        except (RegistryError, RegistryUnavailable):
            return False

    async def open_downloading(self, repo_id: str, commit: str, path: str) -> FileSource | None:
        """A handle on a file of an entry this node is downloading now, for a peer to read the
        bytes it has as they land (the peer server); None when this node downloads no such file.

        The handle's reads are reader waits like any other: a peer waiting for a range makes
        this node's download fetch it next.  Close it like any handle.
        """
        ef = self._entries.get(EntryName(repo_id, commit).key)
        if ef is None or path not in ef.states:
            return None
        # The fleet lists this node as a holder just before its download object exists; the
        # download wakes its files' waiters when it starts.
        state = ef.states[path]
        with trio.move_on_after(DOWNLOAD_APPEARS_WITHIN):
            while ef.download is None and ef.running and not state.complete:
                await state.wait_changed()
        if ef.download is None and not state.complete:
            return None
        return await self.open(ef.entry, path)

    async def _blob_still_there(self, ef: EntryFetch, state: FileState) -> bool:
        blob = state.blob
        return blob is not None and await trio.to_thread.run_sync(os.path.exists, blob, limiter=self.io_limiter)

    async def cache_statvfs(self) -> os.statvfs_result:
        """``statvfs`` of the cache's file system: what the mount reports as its size and free space.

        Not under ``io_limiter``: the readiness and watchdog probes are statfs calls, and must be
        answered while reads fill every slot.
        """
        return await trio.to_thread.run_sync(os.statvfs, self.cache.root)

    def downloads_running(self) -> bool:
        """True while this node downloads any entry."""
        return any(ef.download is not None for ef in self._entries.values())

    def activity(self) -> Activity:
        """Reads and downloads now: cheap enough for every scrape."""
        entries = self._entries.values()
        return Activity(
            bytes_read=self.bytes_read,
            open_handles=sum(ef.handles for ef in entries),
            downloads_running=sum(1 for ef in entries if ef.download is not None),
        )

    def open_entries(self) -> set[str]:
        """Registry keys of entries with an open file on this node (eviction must spare them)."""
        return {name for name, ef in self._entries.items() if ef.handles > 0}

    def copy_generation(self, entry: Entry, path: str) -> int:
        """The generation of the file's current copy on this node (0 before it is first opened)."""
        ef = self._entries.get(entry.registry_key)
        return ef.states[path].generation if ef is not None else 0

    def file_status(self, entry: Entry, path: str) -> str:
        ef = self._entries.get(entry.registry_key)
        if ef is None:
            return "cached" if self.cache.has_blob(entry.repo_id, entry.files[path]) else "remote"
        state = ef.states[path]
        if state.complete:
            return "cached"
        return "downloading" if ef.running else "remote"

    async def entry_status(self, entry: Entry) -> str:
        """The registry's status of the entry, lower-cased; ``remote`` if it has no record."""
        try:
            status = await self.registry.get_status(entry.registry_key)
        except RegistryError as exc:
            raise RegistryUnavailable(f"{entry}: registry unavailable: {exc}") from exc
        return status.lower() if status is not None else "remote"

    def progress(self, entry: Entry) -> tuple[int, int]:
        ef = self._entries.get(entry.registry_key)
        return ef.progress() if ef else (0, entry.size)

    async def prefetch(self, entry: Entry) -> None:
        """Download the whole entry (or wait for whoever does); raise if it ends in error."""
        ef = self.entry_fetch(entry)
        if not ef.complete:
            self.ensure_started(ef)
            if ef.running:
                await ef.wait_done()
        if ef.error is not None:
            raise ef.error

    # -- coordination ---------------------------------------------------------------------------

    def ensure_started(self, ef: EntryFetch) -> None:
        ef.request_start()

    async def _serve_start_requests(self) -> None:
        """One coordination task per start request (``EntryFetch.request_start`` marks the
        entry running before it sends, so an entry never has two)."""
        async for ef in self._starts_receive:
            self._spawn(self._coordinate, ef)

    def _spawn(self, fn, *args) -> None:
        if self._nursery is None:
            raise RuntimeError("Fetcher.run() is not running")
        self._nursery.start_soon(fn, *args)

    async def _coordinate(self, ef: EntryFetch) -> None:
        entry = ef.entry
        try:
            while True:
                try:
                    if await self._all_cached(ef):
                        await self._publish_complete(ef)
                        return
                    if self.hub.offline:
                        # Cache only: nothing to claim, nothing to wait for, nothing to retry.
                        raise OfflineMiss(f"{entry}: HF_HUB_OFFLINE is set and not all of its files are cached")
                    claim = Claim(self.registry, entry, self.settings.lease)
                    if await claim.acquire():
                        await self._download(ef, claim)
                        return
                    await self._wait_for_news(ef)
                except LeaseLost as exc:
                    metrics.DOWNLOADS_FAILED.inc()
                    log.warning("%s", exc)
                except (AccessDenied, NotFound, OfflineMiss) as exc:
                    # Waiting will not help: tell readers now.
                    self._fail(ef, exc, permanent=True)
                    return
                except DiskFull as exc:
                    ef.failures += 1
                    if self.on_disk_full is None or ENTRY_RETRY.gives_up_after(ef.failures):
                        self._fail(ef, exc, permanent=False)
                        return
                    log.warning("%s: %s; evicting unused models, then retrying", entry, exc)
                    await self.on_disk_full(sum(s.file.size for s in ef.states.values() if not s.complete))
                except MxfsError as exc:
                    ef.failures += 1
                    if ENTRY_RETRY.gives_up_after(ef.failures):
                        self._fail(ef, exc, permanent=False)
                        return
                    delay = ENTRY_RETRY.delay(ef.failures - 1)
                    log.warning(
                        "%s: %s; attempt %d of %d in %.0fs", entry, exc, ef.failures + 1, ENTRY_RETRY.attempts, delay
                    )
                    await trio.sleep(delay)
        except Exception:
            # A bug must cost this entry, not the mount: log it loudly and fail its readers.
            log.exception("%s: unexpected error while fetching", entry)
            self._fail(ef, MxfsError(f"{entry}: internal error (see the daemon log)"), permanent=True)
        finally:
            ef.running = False
            if self.follower is not None:
                with trio.CancelScope(shield=True), trio.move_on_after(2.0):
                    await self.follower.forget(ef)
            if ef.error is None and not ef.complete and any(s.waiting for s in ef.states.values()):
                # Files vanished while this task was finishing (see ``open``): readers wait for them.
                self.ensure_started(ef)

    def _fail(self, ef: EntryFetch, exc: MxfsError, *, permanent: bool) -> None:
        ef.failures += 1
        ef.retry_at = trio.current_time() + ENTRY_RETRY.delay(ef.failures - 1)
        if isinstance(exc, AccessDenied):
            # The error names the file and says to set HF_TOKEN; token_file is the other way.
            log.error("%s (or token_file)", exc)
        else:
            log.error("%s: download failed: %s", ef.entry, exc)
        ef.set_error(exc)

    async def _all_cached(self, ef: EntryFetch) -> bool:
        """Adopt blobs that are in the cache already; True if that makes the entry complete."""
        entry = ef.entry

        def scan() -> list[tuple[str, bool]]:
            found = []
            for path, state in ef.states.items():
                if state.complete:
                    continue
                if self.cache.has_blob(entry.repo_id, state.file):
                    self.cache.link_snapshot(entry.repo_id, entry.commit, path, state.file.etag)
                    # The blob is the other node's partial file readers here were served from?
                    remote, blob = state.remote, identity(self.cache.blob_path(entry.repo_id, state.file.etag))
                    found.append((path, remote is not None and blob is not None and blob.same_file(remote)))
            return found

        for path, same_copy in await trio.to_thread.run_sync(scan, limiter=self.io_limiter):
            state = ef.states[path]
            state.set_blob(self.cache.blob_path(entry.repo_id, state.file.etag), same_inode=same_copy)
        return ef.complete

    async def _download(self, ef: EntryFetch, claim: Claim) -> None:
        entry = ef.entry
        log.info("%s: downloading %d files, %d bytes", entry, len(entry.files), entry.size)
        metrics.DOWNLOADS_STARTED.inc()
        started = trio.current_time()
        finished = False
        try:
            async with self.sources.for_download(entry) as client:
                download = ef.download = EntryDownload(
                    entry,
                    ef.states,
                    claim.id,
                    cache=self.cache,
                    partial_maps=self.partial_maps,
                    client=client,
                    lease=self.settings.lease,
                    connections=self.settings.connections,
                    chunk_size=self.settings.chunk_size,
                    net_limiter=self.net_limiter,
                    io_limiter=self.io_limiter,
                    retry=self.hub.retry,
                    shared=self.shared,
                )
                async with claim.held(on_lost=download.withdraw_copies) as lease:
                    await download.run(lease)
                    await self._write_refs(ef)
                    elapsed = max(trio.current_time() - started, 1e-6)
                    log.info(
                        "%s: downloaded %d bytes in %.1fs (%.1f MB/s)",
                        entry,
                        download.bytes_downloaded,
                        elapsed,
                        download.bytes_downloaded / elapsed / 1e6,
                    )
            finished = True
        except MxfsError:
            metrics.DOWNLOADS_FAILED.inc()
            raise
        finally:
            ef.download = None
            # Counted with the download no longer running (and its claim finished): a scrape
            # never sees a download both finished and in progress.
            if finished:
                metrics.DOWNLOADS_FINISHED.inc()
        ef.failures = 0
        self._completed(ef)

    async def _publish_complete(self, ef: EntryFetch) -> None:
        """Everything is on disk: refs, HF tree listing, and a DOWNLOADED record if there is none."""
        await self._write_refs(ef)
        name = ef.entry.registry_key
        try:
            record = await self.registry.get_record(name)
            if record is None or record.status != Status.DOWNLOADED:
                claim = Claim(self.registry, ef.entry, self.settings.lease)
                if await claim.acquire():
                    await claim.finish(Status.DOWNLOADED, None)
        except (RegistryError, RegistryUnavailable) as exc:
            # The bytes are here and verified: serve them, the registry can catch up later.
            log.warning("%s: cached, but the registry is unavailable (%s)", ef.entry, exc)
        ef.failures = 0
        self._completed(ef)

    async def _write_refs(self, ef: EntryFetch) -> None:
        entry = ef.entry
        revisions = [ref.revision for ref, e in self.catalog.resolved_refs().items() if e is entry]

        def write() -> None:
            self.cache.write_tree(entry.tree)
            for revision in revisions:
                if revision != entry.commit:
                    self.cache.write_ref(entry.repo_id, revision, entry.commit)

        await trio.to_thread.run_sync(write, limiter=self.io_limiter)

    # -- last-used tracking ---------------------------------------------------------------------

    async def _touch(self, entry: Entry) -> None:
        try:
            await self.registry.touch(entry.registry_key)
        except RegistryError as exc:
            self._warn_registry("%s: could not update last-used time: %s", entry, exc)

    def _warn_registry(self, message: str, *args: object) -> None:
        """Log registry trouble at most every 30 s: an outage must not flood the log on every open."""
        now = trio.current_time()
        if now - self._registry_warned_at >= REGISTRY_WARNING_INTERVAL:
            self._registry_warned_at = now
            log.warning(message, *args)

    async def _touch_open_entries(self) -> None:
        while True:
            await trio.sleep(TOUCH_INTERVAL)
            for ef in list(self._entries.values()):
                if ef.handles > 0:
                    await self._touch(ef.entry)


def record_repo(record: Record) -> str:
    """The repo id of an mxfs entry record; "" for records that are not ours (ModelExpress's)."""
    name = EntryName.parse(record.model_name)
    return name.repo_id if name is not None else ""


__all__ = ["Activity", "EntryFetch", "Fetcher", "FileSource"]
