"""The owner's side of the claim protocol: download one entry into the cache, under a lease.

Only the node whose ``try_claim`` returned ``Claimed`` runs this.  It

* keeps its lease alive every ``lease/3`` and stops writing at once if it cannot (another node
  may take over after expiry; two writers must never share an entry);
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
import functools
import hashlib
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import trio

from mxfs import metrics
from mxfs.cache import HubCache, make_dirs
from mxfs.errors import (
    DiskFull,
    HubUnavailable,
    IntegrityError,
    MxfsError,
    domain_errors_ungrouped,
)
from mxfs.fetch.entry import Entry, tree_record
from mxfs.fetch.files import FileState, Stream
from mxfs.fetch.lease import LeaseKeeper
from mxfs.fetch.partials import PartialMap, PartialMaps
from mxfs.hub import HubClient, HubFile, RetryPolicy, Transient
from mxfs.ranges import RangeSet
from mxfs.registry import Registry

log = logging.getLogger(__name__)

# How many times a file that fails its checksum is downloaded again before the entry fails.
VERIFY_ATTEMPTS = 3
HASH_BLOCK = 8 << 20
# At most this much is hashed per thread call, so the hashing task stays responsive.
HASH_FEED = 64 << 20
# Connections of one download: how many to start with, and how they grow (see
# _add_connections_while_it_pays).
FIRST_CONNECTIONS = 1
TUNE_INTERVAL = 1.0
TUNE_GAIN = 1.2
# Range sizes of the background download (see chunk_size_for).
CHUNKS_PER_CONNECTION = 4
MIN_CHUNK = 8 << 20
# A reader whose bytes are this close ahead of a stream's position waits for that stream; further
# away, they are fetched on demand.
NEAR = 4 << 20
# On-demand windows are aligned, and grow (up to the maximum) for a reader that keeps asking
# right where the previous window ended: a sequential reader then needs fewer requests.
ON_DEMAND_ALIGN = 1 << 20
ON_DEMAND_MIN = 2 << 20
ON_DEMAND_MAX = 32 << 20
# After an on-demand request fails, leave the bytes to the background download for a while.
ON_DEMAND_BACKOFF = 1.0
# How often the range maps of partial files are made durable: what a crash can cost to redo.
MAP_SAVE_INTERVAL = 5.0


class LeaseLost(Exception):
    """The lease could not be renewed (taken over, or the registry unreachable for too long)."""


@dataclass(eq=False)
class Chunk:
    state: FileState
    start: int
    end: int

    def priority(self) -> tuple[int, int, int, str, int]:
        s = self.state
        wanted_here = any(self.start <= off < self.end for off in s.wanted_offsets)
        return (0 if s.waiting else 1, 0 if wanted_here else 1, s.file.size, s.file.path, self.start)


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


def hash_matches(fd: int, file: HubFile) -> bool:
    """Check a complete copy against the Hub's hash: LFS sha256, else git's blob sha1."""
    hasher = PrefixHasher(file)
    try:
        hasher.feed(fd, file.size)
    except OSError:
        return False
    return hasher.matches()


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
        registry: Registry,
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
        self.registry = registry
        self.lease = lease
        self.connections = connections
        self.chunk_size = chunk_size
        self.net_limiter = net_limiter
        self.io_limiter = io_limiter
        self.retry = retry
        self._queue: list[Chunk] = []
        self._pending: dict[FileState, int] = {}
        self._fds: dict[FileState, int] = {}
        self._verify_failures: dict[FileState, int] = {}
        self._hashers: dict[FileState, PrefixHasher] = {}
        self.lease_keeper = LeaseKeeper(registry, entry.name, claim_id, lease, str(entry))
        self.bytes_downloaded = 0
        self._workers = 0
        self._worker_limit = 1
        self._closed = False  # set when the attempt ends: late callbacks of abandoned streams are ignored
        self._tuning = trio.CancelScope()
        # The nursery on-demand fetches run in; None until the transfers start and after they end.
        self._transfers: trio.Nursery | None = None
        self._on_demand: dict[FileState, set[trio.CancelScope]] = {}
        # Per file: (end, size) of the last on-demand window, and when on-demand may be tried again.
        self._last_window: dict[FileState, tuple[int, int]] = {}
        self._on_demand_paused_until: dict[FileState, float] = {}
        # Held while a range map is saved: the partial file's descriptor must not close under it.
        self._map_lock = trio.Lock()

    async def run(self) -> None:
        """Download everything; raises LeaseLost or an MxfsError. Files stay published either way.

        Partial files of an attempt that stops are kept, with their range maps, for the next
        attempt of this node to resume, unless keeping them is pointless or harmful: the lease
        went to another node, the disk is full, or the bytes failed their checksum.
        """
        keep = True
        try:
            with domain_errors_ungrouped():
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self.lease_keeper.run, nursery.cancel_scope)
                    nursery.start_soon(self._save_maps_periodically)
                    await self._download_all()
                    nursery.cancel_scope.cancel()
        except (DiskFull, IntegrityError):
            keep = False
            raise
        finally:
            await self._close_partials(keep=keep and not self.lease_keeper.lost)
        if self.lease_keeper.lost:
            raise LeaseLost(f"{self.entry}: lease lost, stopped writing")
        await trio.to_thread.run_sync(self.remove_dead_partials, limiter=self.io_limiter)

    # -- planning ---------------------------------------------------------------------------

    async def _download_all(self) -> None:
        resumed = await trio.to_thread.run_sync(self._prepare, limiter=self.io_limiter)
        for state in self.states.values():
            if state.complete:
                continue
            if await self._adopt_existing_blob(state):
                continue
            await self._start_partial(state, resumed.get(state.file.etag))
            self._plan(state)
        try:
            with domain_errors_ungrouped():
                async with trio.open_nursery() as nursery:
                    self._transfers = nursery
                    for state in self._fds:
                        self._start_hashing(state)
                    nursery.start_soon(self._add_connections_while_it_pays, nursery, self._tuning)
                    for state in self.states.values():
                        state.notify()  # readers that waited for the download to start ask again
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

    async def _adopt_existing_blob(self, state: FileState) -> bool:
        """A blob already in the cache (another commit shares the file, or a crash after publish)."""
        file = state.file

        def check() -> bool:
            if not self.cache.file_is_cached(self.entry.repo_id, self.entry.commit, tree_record(file)):
                return False
            self.cache.link_snapshot(self.entry.repo_id, self.entry.commit, file.path, file.etag)
            return True

        if await trio.to_thread.run_sync(check, limiter=self.io_limiter):
            state.set_blob(self.cache.blob_path(self.entry.repo_id, file.etag))
            return True
        return False

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
            raise _disk_error(exc, f"{self.entry}/{file.path}") from exc
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
        state.on_wait = functools.partial(self.want, state)
        if file.size == 0:
            state.notify()
        self._fds[state] = fd

    def _plan(self, state: FileState) -> None:
        size = state.file.size
        step = chunk_size_for(size, self.connections, self.chunk_size)
        chunks = [Chunk(state, start, min(start + step, size)) for start in range(0, size, step)]
        if not chunks:
            chunks = [Chunk(state, 0, 0)]
        self._queue.extend(chunks)
        self._pending[state] = len(chunks)

    def _next_chunk(self) -> Chunk | None:
        if not self._queue:
            return None
        best = min(self._queue, key=Chunk.priority)
        self._queue.remove(best)
        return best

    # -- transfer ---------------------------------------------------------------------------

    async def _add_connections_while_it_pays(self, nursery: trio.Nursery, scope: trio.CancelScope) -> None:
        """Start with one connection and add more only while each step raises the throughput.

        Parallel range requests are what makes a download from a CDN fast (each connection is
        limited on its own), but where one connection already fills the link or the CPU (a local
        mirror, a small machine), more of them only compete and slow everything down: measured
        on a 2-core machine against a loopback server, 8 connections took twice as long as 1.
        So every ``TUNE_INTERVAL`` the number of connections doubles while the rate of the last
        step beat the one before by ``TUNE_GAIN``; at the first step that does not, it goes back
        to the count before it (extra workers stop after their current range) and stays there.
        """
        with scope:  # cancelled by the last worker: the download must not wait for a tuning step
            await self._tune_connections(nursery)

    async def _tune_connections(self, nursery: trio.Nursery) -> None:
        self._worker_limit = min(FIRST_CONNECTIONS, self.connections)
        self._start_workers(nursery)
        before: tuple[int, float] | None = None  # (connections, rate) of the previous step
        last_bytes, last_time = self.bytes_downloaded, trio.current_time()
        while self._queue:
            await trio.sleep(TUNE_INTERVAL)
            now = trio.current_time()
            rate = (self.bytes_downloaded - last_bytes) / max(now - last_time, 1e-9)
            last_bytes, last_time = self.bytes_downloaded, now
            if before is not None and rate < before[1] * TUNE_GAIN:
                self._worker_limit = before[0]
                log.debug("%s: %d connection(s) are as fast as more (%.0f MB/s)", self.entry, before[0], rate / 1e6)
                return
            if self._worker_limit >= self.connections:
                return
            before = (self._worker_limit, rate)
            self._worker_limit = min(self._worker_limit * 2, self.connections)
            self._start_workers(nursery)

    def _start_workers(self, nursery: trio.Nursery) -> None:
        for _ in range(min(self._worker_limit - self._workers, len(self._queue))):
            self._workers += 1
            nursery.start_soon(self._worker)

    async def _worker(self) -> None:
        """Fetch chunks until none is left, or until the tuning wants fewer connections."""
        try:
            while self._workers <= self._worker_limit and (chunk := self._next_chunk()) is not None:
                await self._fetch_chunk(chunk)
                self._pending[chunk.state] -= 1
                if self._pending[chunk.state] == 0:
                    await self._finish_file(chunk.state)
        finally:
            self._workers -= 1
            if self._workers == 0:
                self._tuning.cancel()

    async def _fetch_chunk(self, chunk: Chunk) -> None:
        """Fetch whatever of the chunk is missing, resuming from where a broken transfer stopped.

        Bytes that an on-demand request is bringing are left to it: the chunk waits for that
        request and then fetches only what is still missing, so no byte is downloaded twice.
        """
        state = chunk.state
        failures = 0
        while gaps := state.present.missing(chunk.start, chunk.end):
            todo = _minus_on_demand(gaps, state.streams)
            if not todo:
                await state.wait_changed()
                continue
            try:
                for start, end in todo:
                    stream = Stream(start, end)
                    state.streams.add(stream)
                    try:
                        # Abandoned when cancelled (the daemon stopping, the lease lost): a body
                        # read cannot be interrupted, and waiting for a stalled one would hold the
                        # exit for a whole read timeout. See _stream for why that is safe.
                        await trio.to_thread.run_sync(
                            self._stream, state, stream, limiter=self.net_limiter, abandon_on_cancel=True
                        )
                    finally:
                        state.streams.discard(stream)
                        # Readers that counted on this stream (or on its worker going on with the
                        # next range) look again: they may need a request of their own now.
                        state.notify()
            except Transient as exc:
                failures += 1
                if failures >= self.retry.attempts:
                    raise HubUnavailable(f"{exc} (gave up after {failures} attempts)") from exc
                delay = self.retry.delay(failures - 1)
                log.warning("%s/%s: %s; resuming in %.1fs", self.entry, state.file.path, exc, delay)
                await trio.sleep(delay)

    def _stream(self, state: FileState, stream: Stream) -> None:
        """Runs in a worker thread: copy one HTTP range into the partial file.

        Stops early where the bytes ahead are already present or being brought by an on-demand
        request (see :meth:`_landed`); the caller fetches whatever is then still missing.
        """
        # A descriptor of its own: an abandoned stream (see _fetch_chunk) may write one more
        # block after the download closed its descriptors, and must never write through a
        # number the process has reused for another file. That block lands in the partial file
        # beyond what its map records, or in an unlinked one: nobody reads it unverified.
        fd = os.dup(self._fds[state])
        path = state.file.path
        try:
            limit = trio.from_thread.run_sync(self._write_limit, state, stream)
            if limit <= stream.pos:
                return
            with self.client.open_range(self.entry.repo_id, self.entry.commit, path, stream.pos, stream.end) as body:
                for data in body.chunks():
                    # Never write over bytes that are present (a reader may have been served
                    # them) or that another stream is bringing: the bytes readers got and the
                    # bytes that are hashed must be the same bytes.
                    length = min(len(data), limit - stream.pos)
                    if length <= 0:
                        return
                    try:
                        os.pwrite(fd, data[:length] if length < len(data) else data, stream.pos)
                    except OSError as exc:
                        raise _disk_error(exc, f"{self.entry}/{path}") from exc
                    limit = trio.from_thread.run_sync(self._landed, state, stream, length)
                    if length < len(data):
                        return
                    # Stop promptly when the download is cancelled (lease lost, daemon stopping).
                    trio.from_thread.check_cancelled()
        finally:
            os.close(fd)

    def _landed(self, state: FileState, stream: Stream, length: int) -> int:
        """Record bytes written by ``stream``; returns how far it may write next (see _write_limit)."""
        if self._closed:
            return 0  # an abandoned stream: its bytes belong to no present map any more
        start = stream.pos
        stream.pos += length
        state.present.add(start, stream.pos)
        self.bytes_downloaded += length
        metrics.DOWNLOADED_BYTES.inc(length)
        state.notify()
        return self._write_limit(state, stream)

    def _write_limit(self, state: FileState, stream: Stream) -> int:
        """Where ``stream`` must stop writing: its end, the next present byte, or the next byte
        another stream writes. 0 or less than its position: stop now."""
        if self._closed:
            return 0
        pos = stream.pos
        if pos >= stream.end:
            return pos
        gap = state.present.missing(pos, stream.end)
        if not gap or gap[0][0] != pos:
            return pos  # the byte at pos is present already
        limit = gap[0][1]
        for other in state.streams:
            if other is stream:
                continue
            if other.pos > pos:
                limit = min(limit, other.pos)
            elif other.on_demand and not stream.on_demand and other.pos <= pos < other.end:
                # A background stream yields to an on-demand one that has the bytes ahead in hand.
                return pos
        return limit

    # -- on-demand ranges ---------------------------------------------------------------------

    def want(self, state: FileState, start: int, end: int) -> None:
        """A reader waits for ``[start, end)``: fetch it now unless a stream is about to bring it."""
        if self._transfers is None or state not in self._fds:
            return
        if trio.current_time() < self._on_demand_paused_until.get(state, -math.inf):
            return
        gaps = state.present.missing(start, end)
        if not gaps:
            return
        first = gaps[0][0]
        if any(stream.will_reach(first, NEAR) or stream.hands_over_at(first, NEAR) for stream in state.streams):
            return
        # Start at the aligned offset below, unless bytes there are present already.
        lo = state.present.missing(first - first % ON_DEMAND_ALIGN, first + 1)[-1][0]
        size = ON_DEMAND_MIN
        last = self._last_window.get(state)
        if last is not None and last[0] == lo:
            size = min(last[1] * 2, ON_DEMAND_MAX)
        hi = min(max(lo + size, -(-end // ON_DEMAND_ALIGN) * ON_DEMAND_ALIGN), state.file.size)
        hi = state.present.missing(lo, hi)[0][1]  # up to the next present byte
        for stream in state.streams:
            if lo < stream.pos < hi:
                hi = stream.pos  # that stream writes from there on
        stream = Stream(lo, hi, on_demand=True)
        state.streams.add(stream)
        self._last_window[state] = (hi, size)
        self._transfers.start_soon(self._fetch_on_demand, state, stream)

    async def _fetch_on_demand(self, state: FileState, stream: Stream) -> None:
        scopes = self._on_demand.setdefault(state, set())
        scope = trio.CancelScope()
        scopes.add(scope)
        try:
            with scope:
                await trio.to_thread.run_sync(self._stream, state, stream, limiter=self.net_limiter)
        except MxfsError as exc:
            # Not fatal: the background download brings these bytes too, with its own retries.
            log.debug("%s/%s: on-demand range failed: %s", self.entry, state.file.path, exc)
            self._on_demand_paused_until[state] = trio.current_time() + ON_DEMAND_BACKOFF
        finally:
            state.streams.discard(stream)
            scopes.discard(scope)
            state.notify()

    async def _stop_on_demand(self, state: FileState) -> None:
        """Cancel and wait out the file's on-demand requests (before it is hashed and published)."""
        for scope in self._on_demand.get(state, ()):
            scope.cancel()
        while self._on_demand.get(state):
            await state.wait_changed()

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
                await trio.to_thread.run_sync(hasher.feed, fd, upto, limiter=self.io_limiter)

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
        await self._stop_on_demand(state)
        fd = self._fds[state]
        ok = await self._verified(state)
        if not ok:
            failures = self._verify_failures[state] = self._verify_failures.get(state, 0) + 1
            state.discard_copy()
            await trio.to_thread.run_sync(self.partial_maps.remove, self.entry.repo_id, file.etag)
            log.warning(
                "%s/%s: downloaded bytes do not match the Hub's checksum (attempt %d of %d); discarded",
                self.entry,
                file.path,
                failures,
                VERIFY_ATTEMPTS,
            )
            if failures >= VERIFY_ATTEMPTS:
                raise IntegrityError(f"{self.entry}/{file.path}: checksum mismatch after {failures} downloads")
            # Rewrite the same partial file in place: readers' descriptors stay valid.
            self._plan(state)
            self._start_hashing(state)
            state.notify()
            return
        partial = state.partial
        assert partial is not None
        # Verified: readers waiting for verified bytes read the partial file (the blob's inode
        # to be) while it is made durable and renamed.
        state.verified = True
        state.notify()

        def publish() -> Path:
            blob = self.cache.publish_blob(self.entry.repo_id, file.etag, partial, fd)
            self.cache.link_snapshot(self.entry.repo_id, self.entry.commit, file.path, file.etag)
            self.partial_maps.remove(self.entry.repo_id, file.etag)
            return blob

        async with self._map_lock:
            try:
                blob = await trio.to_thread.run_sync(publish, limiter=self.io_limiter)
            except OSError as exc:
                raise _disk_error(exc, f"{self.entry}/{file.path}") from exc
            os.close(self._fds.pop(state))
        state.on_wait = None
        state.set_blob(blob, same_inode=True)
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
        self._closed = True
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
        state.on_wait = None
        state.partial = None
        state.retire_fd()
        if kept:
            # The next attempt of this node resumes this very copy (its map records every byte
            # present now, so every byte any reader got): same generation.
            state.present.clear()
            state.notify()
        else:
            state.discard_copy()


def chunk_size_for(size: int, connections: int, largest: int) -> int:
    """The range size for one file: at most ``largest``, small enough for ``CHUNKS_PER_CONNECTION``.

    The connections stream the lowest chunks at once, so a sequential reader lags one window
    (connections x chunk) behind the download: a window as big as the file would make a reader of a
    512 MiB file wait for all of it.  Several chunks per connection keep the window a fraction of
    the file, and the floor keeps the per-request overhead (a redirect, a TLS handshake) small.
    """
    wanted = -(-size // (connections * CHUNKS_PER_CONNECTION))
    wanted = -(-wanted // ON_DEMAND_ALIGN) * ON_DEMAND_ALIGN
    return max(min(largest, wanted), min(largest, MIN_CHUNK))


def _minus_on_demand(gaps: list[tuple[int, int]], streams: set[Stream]) -> list[tuple[int, int]]:
    """``gaps`` without the bytes that on-demand requests still have to write."""
    if not any(stream.on_demand for stream in streams):
        return gaps
    claimed = RangeSet([(stream.pos, stream.end) for stream in streams if stream.on_demand])
    return [piece for start, end in gaps for piece in claimed.missing(start, end)]


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


def _disk_error(exc: OSError, what: str) -> MxfsError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return DiskFull(f"{what}: no space left in the cache")
    return MxfsError(f"{what}: {exc}")


__all__: Sequence[str] = ("EntryDownload", "LeaseLost", "hash_matches")
