"""The owner's download of one entry into the cache, run inside its claim (:mod:`.claim`).

Only the node whose claim won runs this; the claim keeps the lease and cancels this the moment
it cannot (two writers must never share an entry).  It

* downloads every file of the entry, several at once, large files in parallel ranges, small
  files first and files that readers are waiting for ahead of everything else;
* lets readers on this node read bytes as they land (``FileState.present``), and fetches the
  bytes a reader waits for on demand, in a range request of their own, when no stream is about
  to bring them (a safetensors header read of a 10 GB file costs one small request);
* verifies each finished file (LFS sha256, git blob sha1) before it becomes a blob, discarding
  and re-downloading a copy that fails, and tells readers that were served its bytes;
* records which bytes of each partial file are on disk (:mod:`mxfs.fetch.partials`), so an
  attempt that stops (daemon restart, Hub outage) is resumed where it stopped, not redone.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import trio

from mxfs.cache import HubCache, make_dirs
from mxfs.errors import (
    DiskFull,
    IntegrityError,
    domain_errors_ungrouped,
)
from mxfs.fetch.entry import Entry
from mxfs.fetch.files import FileState, ReaderWaits
from mxfs.fetch.lease import LeaseKeeper
from mxfs.fetch.partials import PartialMap, PartialMaps
from mxfs.fetch.plan import Chunk
from mxfs.fetch.planner import EntryPlan, Stream
from mxfs.fetch.transfer import Transfer, disk_error
from mxfs.hub import HubClient
from mxfs.ranges import RangeSet
from mxfs.retry import RetryPolicy
from mxfs.tree import HubFile

log = logging.getLogger(__name__)

# How many times a file that fails its checksum is downloaded again before the entry fails.
VERIFY_ATTEMPTS = 3
HASH_BLOCK = 8 << 20
# At most this much is hashed per thread call, so the hashing task stays responsive.
HASH_FEED = 64 << 20
# How often the range maps of partial files are made durable: what a crash can cost to redo.
MAP_SAVE_INTERVAL = 5.0


class PrefixHasher:
    """The Hub's hash of a file (LFS sha256, else git's blob sha1), fed with its bytes in order.

    The download hashes each file's prefix as it becomes contiguous, while the rest still
    arrives, so verifying a finished file costs only its last bytes instead of a second pass
    over all of it (seconds for a multi-GB file, during which its last reader would wait).
    Not thread-safe: one feeder at a time (the caller holds ``lock``).
    """

    def __init__(self, file: HubFile) -> None:
        self.file = file
        self.pos = 0
        self.lock = trio.Lock()
        if file.lfs_sha256:
            self._digest, self._expected = hashlib.sha256(), file.lfs_sha256
        else:
            self._digest, self._expected = hashlib.sha1(usedforsecurity=False), file.blob_id
            self._digest.update(b"blob %d\0" % file.size)

    def feed(self, fd: int, upto: int) -> None:
        """Hash the bytes from ``pos`` to ``upto`` (blocking: run it in a thread)."""
        while self.pos < upto:
            block = os.pread(fd, min(HASH_BLOCK, upto - self.pos), self.pos)
            if not block:
                raise OSError(errno.EIO, "file shorter than its size")
            self._digest.update(block)
            self.pos += len(block)

    def matches(self) -> bool:
        return self.pos == self.file.size and self._digest.hexdigest() == self._expected


class EntryDownload:
    """One owner's download of one entry."""

    def __init__(
        self,
        entry: Entry,
        states: dict[str, FileState],
        claim_id: str,
        *,
        cache: HubCache,
        partial_maps: PartialMaps,
        client: HubClient,
        lease: float,
        connections: int,
        chunk_size: int,
        net_limiter: trio.CapacityLimiter,
        io_limiter: trio.CapacityLimiter,
        retry: RetryPolicy,
    ) -> None:
        self.entry = entry
        self.states = states
        self.claim_id = claim_id
        self.cache = cache
        self.partial_maps = partial_maps
        self.client = client
        self.lease = lease
        self.connections = connections
        self.chunk_size = chunk_size
        self.net_limiter = net_limiter
        self.io_limiter = io_limiter
        self.retry = retry
        self.plan: EntryPlan[FileState] = EntryPlan(connections, chunk_size)
        # Files readers wait on (shared with their FileStates): their ranges go first, and their
        # waits may get on-demand ranges.
        self._waits = ReaderWaits()
        for state in states.values():
            if state.reader_waits is not None:
                self._waits = state.reader_waits
                break
        # Partial files are opened when a worker first takes one of their ranges, so descriptors
        # are bounded by the work in flight, not by the number of files in the repo.
        self._resumed: dict[str, tuple[Path, PartialMap]] = {}
        self._starting: dict[FileState, trio.Event] = {}
        # Per etag, the files with that content: the first is downloaded, the others linked.
        self._twins: dict[str, list[FileState]] = {}
        self._fds: dict[FileState, int] = {}
        self.transfer = Transfer(entry, client, self.plan, self._fds, net_limiter=net_limiter, retry=retry)
        self._verify_failures: dict[FileState, int] = {}
        self._hashers: dict[FileState, PrefixHasher] = {}
        # The nursery on-demand fetches run in; None until the transfers start and after they end.
        self._transfers: trio.Nursery | None = None
        # Held while a range map is saved: the partial file's descriptor must not close under it.
        self._map_lock = trio.Lock()

    @property
    def bytes_downloaded(self) -> int:
        return self.transfer.bytes_downloaded

    async def run(self, lease: LeaseKeeper) -> None:
        """Download everything, while ``lease`` is kept; raises an MxfsError, or is cancelled
        when the lease is lost. Files stay published either way.

        Partial files of an attempt that stops are kept, with their range maps, for the next
        attempt of this node to resume, unless keeping them is pointless or harmful: the lease
        went to another node, the disk is full, or the bytes failed their checksum.
        """
        keep = True
        try:
            with domain_errors_ungrouped():
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._save_maps_periodically)
                    await self._download_all()
                    nursery.cancel_scope.cancel()
        except (DiskFull, IntegrityError):
            keep = False
            raise
        finally:
            await self._close_partials(keep=keep and not lease.lost)
        await trio.to_thread.run_sync(self.remove_dead_partials, limiter=self.io_limiter)

    def withdraw_copies(self) -> None:
        """The lease is lost: from now on nobody is served a byte of this attempt's copies.

        Its writers are being cancelled, but a renewal stuck in a frozen registry can keep the
        attempt from ending for a long time; meanwhile the partial files must not be offered
        to readers (another node now owns the download), and readers that already had bytes of
        them hold bytes nobody will verify.
        """
        self.transfer.closed = True  # late writes of abandoned streams land nowhere
        for state in list(self._fds):
            if not state.verified:
                state.discard_copy()

    # -- planning ---------------------------------------------------------------------------

    async def _download_all(self) -> None:
        self._resumed = await trio.to_thread.run_sync(self._prepare, limiter=self.io_limiter)
        await self._adopt_existing_blobs()
        for state in self.states.values():
            if state.complete:
                continue
            # Files with the same content (one etag) are one blob: the first downloads it, the
            # others are linked to it when it is published (two partial files of one name
            # would truncate each other).
            twins = self._twins.setdefault(state.file.etag, [])
            twins.append(state)
            if len(twins) == 1:
                self._add(state)
        try:
            with domain_errors_ungrouped():
                async with trio.open_nursery() as nursery:
                    self._transfers = nursery
                    nursery.start_soon(self._serve_waits)
                    async with trio.open_nursery() as workers:
                        # All connections at once: on a CDN each connection is paced on its own,
                        # so the download is as fast as the ranges in flight (issue 14: a rule
                        # that grew connections only while loopback throughput rose left CDN
                        # downloads on one or two).
                        for _ in range(min(self.connections, len(self.plan))):
                            workers.start_soon(self._worker)
                        for state in self.states.values():
                            state.notify()  # readers that waited for the download to start ask again
                    # Every file is published: what runs now are on-demand requests and hashing
                    # of files that are done, and the planner's wait loop.
                    nursery.cancel_scope.cancel()
        finally:
            self._transfers = None

    def _prepare(self) -> dict[str, tuple[Path, PartialMap]]:
        """Take over this node's earlier partial files, and drop dead ones.

        Returns, by etag, the partial files to resume (renamed to this claim's name) and their maps.
        """
        repo = self.entry.repo_id
        # The snapshots folder (scan_cache_dir wants one beside blobs/) but not this revision's:
        # link_snapshot makes that with the first file, and a download that fails before must
        # not leave an empty revision behind.
        make_dirs(self.cache.repo_dir(repo) / "snapshots")
        resumed: dict[str, tuple[Path, PartialMap]] = {}
        for state in self.states.values():
            file = state.file
            if state.complete or file.etag in resumed:
                continue
            partial_map = self.partial_maps.load(repo, file.etag)
            if partial_map is None:
                continue
            path = None
            if partial_map.size == file.size:
                path = self.cache.adopt_incomplete(repo, partial_map.filename, file.etag, self.claim_id)
            if path is not None and path.stat().st_size == file.size:
                # The file has this claim's name now: say so in its map, or an attempt that ends
                # before it starts this file would leave a map naming a file that is gone.
                partial_map = PartialMap(path.name, partial_map.size, partial_map.ranges)
                self.partial_maps.record_name(repo, file.etag, partial_map)
                resumed[file.etag] = (path, partial_map)
            else:
                self.partial_maps.remove(repo, file.etag)
        self.remove_dead_partials()
        return resumed

    def remove_dead_partials(self) -> None:
        # Untouched for a whole lease: its writer is dead or has stopped (a lapsed lease stops a
        # writer at once), so nobody will ever finish it.
        removed = self.cache.remove_stale_incomplete(
            self.entry.repo_id, self.lease, etags=(s.file.etag for s in self.states.values()), keep=self.claim_id
        )
        for path in removed:
            log.info("%s: removed %s, left by a writer that stopped", self.entry, path.name)

    async def _adopt_existing_blobs(self) -> None:
        """Blobs already in the cache (another commit shares the file, or a crash after publish)."""
        todo = [state for state in self.states.values() if not state.complete]

        def check() -> list[FileState]:
            found = []
            for state in todo:
                file = state.file
                if self.cache.has_blob(self.entry.repo_id, file):
                    self.cache.link_snapshot(self.entry.repo_id, self.entry.commit, file.path, file.etag)
                    found.append(state)
            return found

        for state in await trio.to_thread.run_sync(check, limiter=self.io_limiter):
            state.set_blob(self.cache.blob_path(self.entry.repo_id, state.file.etag))

    async def _ensure_started(self, state: FileState) -> None:
        """Open the file's partial file (resumed or new) unless it is open already."""
        if state in self._fds:
            return
        if (starting := self._starting.get(state)) is not None:
            await starting.wait()
            return
        starting = self._starting[state] = trio.Event()
        try:
            await self._start_partial(state, self._resumed.pop(state.file.etag, None))
            self._start_hashing(state)
        finally:
            del self._starting[state]
            starting.set()
        state.notify()  # readers waiting for this file ask for their bytes now

    async def _start_partial(self, state: FileState, resume: tuple[Path, PartialMap] | None) -> None:
        file = state.file

        def create() -> tuple[Path, int, int]:
            if resume is not None:
                path = resume[0]
                fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
            else:
                path, fd = self.cache.create_incomplete(self.entry.repo_id, file.etag, self.claim_id)
            try:
                if resume is None:
                    _reserve(fd, file.size)
                read_fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except BaseException:
                os.close(fd)
                os.unlink(path)
                raise
            return path, fd, read_fd

        try:
            path, fd, read_fd = await trio.to_thread.run_sync(create, limiter=self.io_limiter)
        except FileNotFoundError:
            if resume is None:
                raise
            resume = None  # swept away meanwhile: start afresh
            path, fd, read_fd = await trio.to_thread.run_sync(create, limiter=self.io_limiter)
        except OSError as exc:
            raise disk_error(exc, f"{self.entry}/{file.path}") from exc
        if resume is None and state.exposed:
            state.discard_copy()  # readers had bytes of a copy that is not resumed
        state.adopt_fd(read_fd)
        state.partial = path
        state.verified = False
        state.present = resume[1].present() if resume is not None else RangeSet()
        if resume is not None:
            log.info(
                "%s/%s: resuming a partial download, %d of %d bytes present",
                self.entry,
                file.path,
                state.present.total,
                file.size,
            )
        if file.size == 0:
            state.notify()
        self._fds[state] = fd

    def _add(self, state: FileState) -> None:
        # One request per file from a server that ignores Range: a range request would bring
        # the whole body anyway.
        self.plan.add_file(state, state.file.size, state.file.path, one_request=self.client.ignores_ranges)

    def _next_chunk(self) -> Chunk[FileState] | None:
        # A reader of a file whose twin (same content) is downloaded waits on the twin's ranges.
        waited = {self._twins.get(s.file.etag, [s])[0]: s.wanted_offsets for s in self._waits.files}
        return self.plan.next_chunk(waited)

    async def _worker(self) -> None:
        """Fetch ranges until none is left (one worker per connection)."""
        while (chunk := self._next_chunk()) is not None:
            state = chunk.file
            await self._ensure_started(state)
            await self.transfer.fetch_chunk(state, chunk)
            if self.plan.chunk_done(state):
                await self._finish_file(state)

    # -- on-demand ranges ---------------------------------------------------------------------

    async def _serve_waits(self) -> None:
        """Give readers' waits their on-demand ranges: looked at again after every change of a
        waited file (a stream a reader counted on may have stopped, or its file just started)."""
        while True:
            for state in list(self._waits.files):
                for start, end in list(state.on_demand_waits):
                    self._on_demand(state, start, end)
            await self._waits.wait_changed()

    def _on_demand(self, state: FileState, start: int, end: int) -> None:
        """A reader waits for ``[start, end)``: fetch it now unless a stream is about to bring it."""
        if self._transfers is None or state not in self._fds or self.client.ignores_ranges:
            return  # (a range request would bring the whole file: readers wait for the stream)
        stream = self.plan.on_demand(state, state.present, state.streams, start, end, trio.current_time())
        if stream is None:
            return
        state.streams.add(stream)
        self._transfers.start_soon(self._fetch_on_demand, state, stream)

    async def _fetch_on_demand(self, state: FileState, stream: Stream) -> None:
        if not await self.transfer.fetch_on_demand(state, stream):
            self.plan.on_demand_failed(state, trio.current_time())

    # -- verification and publication -------------------------------------------------------

    def _start_hashing(self, state: FileState) -> None:
        hasher = self._hashers[state] = PrefixHasher(state.file)
        assert self._transfers is not None
        self._transfers.start_soon(self._hash_as_it_lands, state, hasher)

    async def _hash_as_it_lands(self, state: FileState, hasher: PrefixHasher) -> None:
        """Feed ``hasher`` the file's contiguous prefix as it grows, a block at a time."""
        fd = self._fds[state]
        size = state.file.size
        while hasher.pos < size and self._hashers.get(state) is hasher:
            upto = min(state.present.contiguous_end(hasher.pos), hasher.pos + HASH_FEED)
            if upto - hasher.pos < HASH_BLOCK and upto < size:
                await state.wait_changed()
                continue
            async with hasher.lock:
                try:
                    await trio.to_thread.run_sync(hasher.feed, fd, upto, limiter=self.io_limiter)
                except OSError as exc:
                    # The final check hashes again from where this stopped, and fails the copy.
                    log.warning("%s/%s: could not hash the partial file: %s", self.entry, state.file.path, exc)
                    return

    async def _verified(self, state: FileState) -> bool:
        """Finish the file's hash (usually only its last bytes are left) and compare."""
        hasher = self._hashers.pop(state, None) or PrefixHasher(state.file)
        fd = self._fds[state]
        async with hasher.lock:
            try:
                await trio.to_thread.run_sync(hasher.feed, fd, state.file.size, limiter=self.io_limiter)
            except OSError:
                return False
        return hasher.matches()

    async def _finish_file(self, state: FileState) -> None:
        file = state.file
        await self.transfer.stop_on_demand(state)
        fd = self._fds[state]
        ok = await self._verified(state)
        if not ok:
            failures = self._verify_failures[state] = self._verify_failures.get(state, 0) + 1
            # Logged as it happens, before any reader it fails can say so.
            log.warning(
                "%s/%s: downloaded bytes do not match the Hub's checksum (attempt %d of %d); discarded",
                self.entry,
                file.path,
                failures,
                VERIFY_ATTEMPTS,
            )
            state.discard_copy()
            await trio.to_thread.run_sync(self.partial_maps.remove, self.entry.repo_id, file.etag)
            if failures >= VERIFY_ATTEMPTS:
                raise IntegrityError(f"{self.entry}/{file.path}: checksum mismatch after {failures} downloads")
            # Rewrite the same partial file in place: readers' descriptors stay valid.
            self._add(state)
            self._start_hashing(state)
            state.notify()
            return
        partial = state.partial
        assert partial is not None
        # Verified: readers waiting for verified bytes read the partial file (the blob's inode
        # to be) while it is made durable and renamed.
        state.mark_verified()

        twins = [twin for twin in self._twins.get(file.etag, ()) if twin is not state]

        def publish() -> Path:
            blob = self.cache.publish_blob(self.entry.repo_id, file.etag, partial, fd)
            for published in (state, *twins):
                self.cache.link_snapshot(self.entry.repo_id, self.entry.commit, published.file.path, file.etag)
            self.partial_maps.remove(self.entry.repo_id, file.etag)
            return blob

        async with self._map_lock:
            try:
                blob = await trio.to_thread.run_sync(publish, limiter=self.io_limiter)
            except OSError as exc:
                raise disk_error(exc, f"{self.entry}/{file.path}") from exc
            os.close(self._fds.pop(state))
        state.set_blob(blob, same_inode=True)
        for twin in twins:
            twin.set_blob(blob)
        # Keep nothing per file once it is published: a repo of thousands of files must not
        # hold a descriptor or bookkeeping for each until the whole entry is done.
        self.plan.forget(state)
        self._verify_failures.pop(state, None)
        if not state.waiting:
            state.retire_fd()  # a later read opens the blob by its path
        log.debug("%s/%s: verified and cached (%d bytes)", self.entry, file.path, file.size)

    # -- partial files --------------------------------------------------------------------------

    def _snapshot_map(self, state: FileState) -> PartialMap | None:
        if state.partial is None:
            return None
        return PartialMap(state.partial.name, state.file.size, state.present.as_list())

    async def _save_maps_periodically(self) -> None:
        while True:
            await trio.sleep(MAP_SAVE_INTERVAL)
            async with self._map_lock:
                for state, fd in list(self._fds.items()):
                    partial_map = self._snapshot_map(state)
                    if partial_map is not None and partial_map.ranges:
                        await trio.to_thread.run_sync(
                            self.partial_maps.save, self.entry.repo_id, state.file.etag, fd, partial_map
                        )

    async def _close_partials(self, *, keep: bool) -> None:
        """Close the partial files this attempt did not finish; keep them (``keep``) for the next.

        Otherwise they are deleted: private to this claim, they are worthless to other writers.
        """
        self.transfer.closed = True
        with trio.CancelScope(shield=True):
            async with self._map_lock:
                fds, self._fds = self._fds, {}
                for state, fd in fds.items():
                    await self._close_partial(state, fd, keep=keep)

    async def _close_partial(self, state: FileState, fd: int, *, keep: bool) -> None:
        repo, etag = self.entry.repo_id, state.file.etag
        partial_map = self._snapshot_map(state) if keep else None

        def close() -> None:
            try:
                if partial_map is not None and partial_map.ranges:
                    self.partial_maps.save(repo, etag, fd, partial_map)
                elif state.partial is not None:
                    self.partial_maps.remove(repo, etag)
                    state.partial.unlink(missing_ok=True)
            finally:
                os.close(fd)

        kept = partial_map is not None and bool(partial_map.ranges)
        try:
            await trio.to_thread.run_sync(close, limiter=self.io_limiter)
        except OSError as exc:
            kept = False
            log.warning("%s/%s: could not put the partial file away: %s", self.entry, state.file.path, exc)
        state.partial = None
        state.retire_fd()
        if kept:
            # The next attempt of this node resumes this very copy (its map records every byte
            # present now, so every byte any reader got): same generation.
            state.present.clear()
            state.notify()
        else:
            state.discard_copy()


def _reserve(fd: int, size: int) -> None:
    """Reserve the file's space up front, so a full disk fails now and not halfway through."""
    if size == 0:
        return
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise
        os.ftruncate(fd, size)


__all__: Sequence[str] = ("EntryDownload",)
