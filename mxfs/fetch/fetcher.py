"""The claim protocol (DESIGN section 5) and the read path, as one service the filesystem uses.

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
    IntegrityError,
    MxfsError,
    NotFound,
    OfflineMiss,
    RegistryUnavailable,
)
from mxfs.fetch.catalog import Catalog
from mxfs.fetch.download import EntryDownload, LeaseLost
from mxfs.fetch.entry import Entry
from mxfs.fetch.files import CopyDiscarded, FileState, SharedFd, read_at
from mxfs.fetch.partials import PartialMaps
from mxfs.hub import Hub
from mxfs.names import EntryName, ModelRef
from mxfs.registry import (
    AlreadyExists,
    Claimed,
    FinishNotifier,
    Record,
    Registry,
    RegistryError,
    Status,
)
from mxfs.retry import RetryPolicy
from mxfs.tree import HubFile

log = logging.getLogger(__name__)

# Attempts of one coordination task, 2 and 4 s apart, before it gives up and leaves the entry in
# ERROR; an open after a further backoff (growing with each failure, up to a minute) starts anew.
ENTRY_RETRY = RetryPolicy(attempts=3, initial_delay=2.0, max_delay=60.0)
REGISTRY_WARNING_INTERVAL = 30.0
# Every node touches the entries it has open this often, so eviction elsewhere sees them in use.
TOUCH_INTERVAL = 60.0
# How long a stopping daemon tries to hand its running claims back.
RELEASE_TIMEOUT = 2.0


@dataclass(frozen=True)
class Activity:
    """Reads and downloads on this node now, for the metrics exporter."""

    bytes_read: int  # returned by reads through the mount since start-up
    open_handles: int
    downloads_running: int  # entries this node downloads as the claim owner


class EntryFetch:
    """This node's view of one entry: per-file state, who downloads it, and what went wrong."""

    def __init__(self, entry: Entry, discards: trio.MemorySendChannel[tuple[str, str]] | None = None) -> None:
        self.entry = entry
        self.states = {path: FileState(f) for path, f in entry.files.items()}
        waiting_files: set[FileState] = set()
        for state in self.states.values():
            state.entry_key = entry.registry_key
            state.discards = discards
            state.waiting_files = waiting_files
        self.running = False
        self.error: MxfsError | None = None
        self.retry_at = 0.0
        self.failures = 0
        self.handles = 0
        self.download: EntryDownload | None = None
        self._done = trio.Event()

    @property
    def complete(self) -> bool:
        return all(s.complete for s in self.states.values())

    def progress(self) -> tuple[int, int]:
        """(bytes present on this node, partial files included, total bytes)."""
        return self.entry.tree.progress(lambda f: self.states[f.path].bytes_present)

    def set_error(self, error: MxfsError) -> None:
        self.error = error
        for state in self.states.values():
            if not state.complete:
                state.set_error(error)
        self._done.set()

    def clear_error(self) -> None:
        self.error = None
        for state in self.states.values():
            state.error = None

    def mark_done(self) -> None:
        self._done.set()
        if self.handles == 0:
            # Nobody reads: do not keep blobs open (an open blob counts as "in use" for eviction).
            for state in self.states.values():
                state.retire_fd()

    async def wait_done(self) -> None:
        await self._done.wait()

    def reset_done(self) -> None:
        if self._done.is_set():
            self._done = trio.Event()


@dataclass
class OpenFile:
    """One open file handle: reads wait for their bytes, concurrent reads never serialize.

    Every byte it returns belongs to a copy of the file that is verified or still current:
    the handle checks its copy before and after each wait and each pread (``FileState.check_copy``).
    """

    fetcher: Fetcher
    ef: EntryFetch
    state: FileState
    strict: bool
    # The file's copy generation when the handle was opened: copies discarded from then on may
    # have reached it (see FileState.discard_copy).
    first_generation: int = 0
    closed: bool = False
    # Held from open() to close() once the file is complete: the blob's inode stays readable even
    # if eviction (here or on another node) unlinks it while the file is open.
    held_fd: SharedFd | None = None

    @property
    def file(self) -> HubFile:
        return self.state.file

    async def read(self, offset: int, size: int) -> bytes:
        state = self.state
        self._check_copy()
        end = min(offset + size, self.file.size)
        if offset >= end:
            return b""
        # The read that reaches the end of a file waits for verified bytes even in fast mode:
        # after it the kernel answers end-of-file by itself, so a checksum failure found later
        # could never reach a reader that read the whole file.
        strict = self.strict or end == self.file.size
        if not state.readable(offset, end, strict):
            self.fetcher.ensure_started(self.ef)
            try:
                await state.wait_readable(offset, end, strict, self.first_generation)
            except CopyDiscarded as exc:
                raise CopyDiscarded(f"{self.ef.entry}/{exc}") from None
            self._check_copy()
        generation = state.expose()
        if self.held_fd is None and state.complete:
            self.held_fd = state.acquire_fd()
        shared = self.held_fd or state.acquire_fd()
        try:
            data = await read_at(shared.fd, offset, end - offset, self.fetcher.io_limiter)
        finally:
            if shared is not self.held_fd:
                shared.release()
        # The copy may have been discarded while the pread ran (it then taints this handle,
        # since the copy was marked exposed before): these bytes may be of either copy.
        self._check_copy()
        if state.generation != generation and shared is not self.held_fd:
            raise IntegrityError(f"{self.ef.entry}/{self.file.path}: the copy changed under a read")
        self.fetcher.bytes_read += len(data)
        return data

    def copy_discarded_since(self, generation: int) -> bool:
        """True if a copy of the file of ``generation`` or later was discarded after readers got
        some of its bytes (the filesystem then retires the inode those readers share)."""
        return self.state.tainted(generation)

    def _check_copy(self) -> None:
        try:
            self.state.check_copy(self.first_generation)
        except CopyDiscarded as exc:
            raise CopyDiscarded(f"{self.ef.entry}/{exc}") from None

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.held_fd is not None:
                self.held_fd.release()
                self.held_fd = None
            self.fetcher._release(self)


class Fetcher:
    """Entries, their downloads and their readers on this node."""

    def __init__(self, catalog: Catalog, registry: Registry, cache: HubCache, settings: Settings) -> None:
        self.catalog = catalog
        self.registry = registry
        self.cache = cache
        self.settings = settings
        self.hub: Hub = catalog.hub
        self.partial_maps = PartialMaps(settings.state_dir)
        self.io_limiter = trio.CapacityLimiter(64)
        self.net_limiter = trio.CapacityLimiter(max(settings.connections * 4, 16))
        self._entries: dict[str, EntryFetch] = {}
        self._nursery: trio.Nursery | None = None
        # Waiters of entries another node downloads, woken when the registry says it finished
        # (where it can: Redis pub/sub).
        self._finish_notifier = registry if isinstance(registry, FinishNotifier) else None
        self._finished: dict[str, trio.Event] = {}
        # (entry key, path) of every copy discarded after some of its bytes were read: the
        # filesystem drops the kernel's cached pages of those files.  Rare, so unbounded.
        self._discards_send, self._discards_receive = trio.open_memory_channel[tuple[str, str]](math.inf)
        # Entries that became complete and verified on this node, for the hand-off (mxfs.handoff);
        # made when first asked for, so a daemon without one queues nothing.
        self._completed_send: trio.MemorySendChannel[Entry] | None = None
        self.bytes_read = 0
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
            if self._finish_notifier is not None:
                await nursery.start(self._finish_notifier.listen_finished, self._finished_elsewhere)
            task_status.started()
            await trio.sleep_forever()

    def _finished_elsewhere(self, name: str) -> None:
        """The registry says ``name`` finished (on any node): wake its waiters now."""
        if (event := self._finished.pop(name, None)) is not None:
            event.set()

    async def _wait_for_news(self, name: str) -> None:
        """Wait until the entry finishes somewhere (where the registry can tell) or a poll interval passes.

        The poll interval still paces a waiter: files the owner completes one by one appear in
        the shared cache without any message.
        """
        if self._finish_notifier is None:
            # Nothing would ever set an event: keep none (they would pile up per entry).
            await trio.sleep(self.settings.poll_interval)
            return
        event = self._finished.setdefault(name, trio.Event())
        with trio.move_on_after(self.settings.poll_interval):
            await event.wait()

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
            ef = self._entries[entry.registry_key] = EntryFetch(entry, self._discards_send)
        return ef

    async def open(self, entry: Entry, path: str) -> OpenFile:
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
            log.warning("%s: %s vanished from the cache; fetching it again", entry, path)
            for s in ef.states.values():
                s.blob = None
                s.retire_fd()
            ef.reset_done()
        handle = OpenFile(self, ef, state, strict=self.settings.verify == "strict", first_generation=state.generation)
        handle.held_fd = held_fd
        ef.handles += 1
        self._spawn(self._touch, entry)
        if not state.complete:
            self.ensure_started(ef)
        return handle

    def _release(self, handle: OpenFile) -> None:
        ef = handle.ef
        ef.handles -= 1
        if ef.handles == 0:
            for state in ef.states.values():
                if state.complete:  # a partial file's descriptor belongs to its download
                    state.retire_fd()

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
        if ef.running or ef.complete:
            return
        if ef.error is not None:
            if trio.current_time() < ef.retry_at:
                return
            ef.clear_error()
        ef.running = True
        ef.reset_done()
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
                    claim_id = uuid.uuid4().hex
                    if await self._try_acquire(ef, claim_id):
                        await self._download(ef, claim_id)
                        return
                    await self._wait_for_news(entry.registry_key)
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

        def scan() -> list[str]:
            found = []
            for path, state in ef.states.items():
                if state.complete:
                    continue
                if self.cache.has_blob(entry.repo_id, state.file):
                    self.cache.link_snapshot(entry.repo_id, entry.commit, path, state.file.etag)
                    found.append(path)
            return found

        for path in await trio.to_thread.run_sync(scan, limiter=self.io_limiter):
            state = ef.states[path]
            state.set_blob(self.cache.blob_path(entry.repo_id, state.file.etag))
        return ef.complete

    async def _try_acquire(self, ef: EntryFetch, claim_id: str) -> bool:
        """One round of the claim protocol; True if this node now owns the download."""
        name, lease = ef.entry.registry_key, self.settings.lease
        try:
            outcome = await self.registry.try_claim(name, claim_id, lease)
            if isinstance(outcome, Claimed):
                return True
            assert isinstance(outcome, AlreadyExists)
            if outcome.status == Status.DOWNLOADED:
                # The registry says done but our cache lacks files: they vanished. Re-download.
                return await self.registry.try_retake(name, claim_id, lease, Status.DOWNLOADED)
            if outcome.status == Status.ERROR:
                return await self.registry.try_reset_error_for_retry(name, claim_id, lease)
            return False
        except RegistryError as exc:
            raise RegistryUnavailable(f"{ef.entry}: registry unavailable: {exc}") from exc

    async def _download(self, ef: EntryFetch, claim_id: str) -> None:
        entry = ef.entry
        log.info("%s: downloading %d files, %d bytes", entry, len(entry.files), entry.size)
        metrics.DOWNLOADS_STARTED.inc()
        started = trio.current_time()
        download = ef.download = EntryDownload(
            entry,
            ef.states,
            claim_id,
            cache=self.cache,
            partial_maps=self.partial_maps,
            client=self.hub.client,
            registry=self.registry,
            lease=self.settings.lease,
            connections=self.settings.connections,
            chunk_size=self.settings.chunk_size,
            net_limiter=self.net_limiter,
            io_limiter=self.io_limiter,
            retry=self.hub.retry,
        )
        settled = False
        try:
            await download.run()
            settled = True
        except LeaseLost:
            settled = True
            raise
        except MxfsError as exc:
            settled = True
            metrics.DOWNLOADS_FAILED.inc()
            await self._finish(ef, claim_id, Status.ERROR, str(exc))
            raise
        finally:
            ef.download = None
            if not settled:
                # Cancelled: the daemon is stopping. Hand the claim back now rather than leave
                # others (and our own restart, which resumes the partial files) waiting for the
                # lease to run out.
                with trio.move_on_after(RELEASE_TIMEOUT, shield=True):
                    await self._finish(ef, claim_id, Status.ERROR, "interrupted: the downloading daemon stopped")
        metrics.DOWNLOADS_FINISHED.inc()
        await self._write_refs(ef)
        elapsed = max(trio.current_time() - started, 1e-6)
        log.info(
            "%s: downloaded %d bytes in %.1fs (%.1f MB/s)",
            entry,
            download.bytes_downloaded,
            elapsed,
            download.bytes_downloaded / elapsed / 1e6,
        )
        if await self._finish(ef, claim_id, Status.DOWNLOADED, None) is False:
            log.warning("%s: finished, but another node had taken the claim over", entry)
        ef.failures = 0
        self._completed(ef)

    async def _finish(self, ef: EntryFetch, claim_id: str, status: Status, message: str | None) -> bool | None:
        """Publish the outcome: True, False if another node owns the claim now, None if the
        registry could not be reached (logged here)."""
        try:
            return await self.registry.finish_claim(ef.entry.registry_key, claim_id, status, message, ef.entry.size)
        except RegistryError as exc:
            log.error("%s: could not record %s in the registry: %s", ef.entry, status, exc)
            return None

    async def _publish_complete(self, ef: EntryFetch) -> None:
        """Everything is on disk: refs, HF tree listing, and a DOWNLOADED record if there is none."""
        await self._write_refs(ef)
        name = ef.entry.registry_key
        try:
            record = await self.registry.get_record(name)
            if record is None or record.status != Status.DOWNLOADED:
                claim_id = uuid.uuid4().hex
                if await self._try_acquire(ef, claim_id):
                    await self._finish(ef, claim_id, Status.DOWNLOADED, None)
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


__all__ = ["Activity", "EntryFetch", "Fetcher", "OpenFile"]
