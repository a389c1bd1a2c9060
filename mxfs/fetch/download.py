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

import contextlib
import errno
import functools
import hashlib
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path

import trio

from mxfs import metrics
from mxfs.cache import HubCache, make_dirs, open_for_reading
from mxfs.errors import (
    DiskFull,
    HubUnavailable,
    IntegrityError,
    MxfsError,
    domain_errors_ungrouped,
)
from mxfs.fetch.entry import Entry
from mxfs.fetch.files import FileState, Stream
from mxfs.fetch.lease import LeaseKeeper
from mxfs.fetch.partials import PartialMap, PartialMaps
from mxfs.fetch.plan import ALIGN, Chunk, ChunkQueue, chunk_size_for
from mxfs.hub import HubClient, RangeBody, Transient
from mxfs.ranges import RangeSet
from mxfs.registry import Registry
from mxfs.retry import RetryPolicy
from mxfs.tree import HubFile

log = logging.getLogger(__name__)

# How many times a file that fails its checksum is downloaded again before the entry fails.
VERIFY_ATTEMPTS = 3
HASH_BLOCK = 8 << 20
# At most this much is hashed per thread call, so the hashing task stays responsive.
HASH_FEED = 64 << 20
# A reader whose bytes are this close ahead of a stream's position waits for that stream; further
# away, they are fetched on demand.
NEAR = 4 << 20
# On-demand windows are aligned, and grow (up to the maximum) for a reader that keeps asking
# right where the previous window ended: a sequential reader then needs fewer requests.
ON_DEMAND_ALIGN = ALIGN
ON_DEMAND_MIN = 2 << 20
ON_DEMAND_MAX = 32 << 20
# After an on-demand request fails, leave the bytes to the background download for a while.
ON_DEMAND_BACKOFF = 1.0
# How often the range maps of partial files are made durable: what a crash can cost to redo.
MAP_SAVE_INTERVAL = 5.0


class LeaseLost(Exception):
    """The lease could not be renewed (taken over, or the registry unreachable for too long)."""


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
        # Background ranges not yet taken, and per file how many are not finished.
        self._queue: ChunkQueue[FileState] = ChunkQueue()
        self._pending: dict[FileState, int] = {}
        # Files readers wait on (shared with their FileStates): their ranges go first.
        self._waiting_files: set[FileState] = set()
        for state in states.values():
            if state.waiting_files is not None:
                self._waiting_files = state.waiting_files
                break
        # Partial files are opened when a worker first takes one of their ranges, so descriptors
        # are bounded by the work in flight, not by the number of files in the repo.
        self._resumed: dict[str, tuple[Path, PartialMap]] = {}
        self._starting: dict[FileState, trio.Event] = {}
        # Per etag, the files with that content: the first is downloaded, the others linked.
        self._twins: dict[str, list[FileState]] = {}
        # Per file, the one stream that fetches it whole because the server ignored Range.
        self._whole: dict[FileState, Stream] = {}
        self._fds: dict[FileState, int] = {}
        self._verify_failures: dict[FileState, int] = {}
        self._hashers: dict[FileState, PrefixHasher] = {}
        self.lease_keeper = LeaseKeeper(registry, entry.registry_key, claim_id, lease, str(entry))
        self.lease_keeper.on_lost = self._withdraw_copies
        self.bytes_downloaded = 0
        self._closed = False  # set when the attempt ends: late callbacks of abandoned streams are ignored
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

    def _withdraw_copies(self) -> None:
        """The lease is lost: from now on nobody is served a byte of this attempt's copies.

        Its writers are being cancelled, but a renewal stuck in a frozen registry can keep the
        attempt from ending for a long time; meanwhile the partial files must not be offered
        to readers (another node now owns the download), and readers that already had bytes of
        them hold bytes nobody will verify.
        """
        self._closed = True  # late writes of abandoned streams land nowhere
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
                self._plan(state)
        try:
            with domain_errors_ungrouped():
                async with trio.open_nursery() as nursery:
                    self._transfers = nursery
                    # All connections at once: on a CDN each connection is paced on its own, so
                    # the download is as fast as the ranges in flight (issue 14: a rule that
                    # grew connections only while loopback throughput rose left CDN downloads
                    # on one or two).
                    for _ in range(min(self.connections, len(self._queue))):
                        nursery.start_soon(self._worker)
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
                read_fd = open_for_reading(path)
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
        state.on_wait = functools.partial(self.on_reader_wait, state)
        if file.size == 0:
            state.notify()
        self._fds[state] = fd

    def _plan(self, state: FileState) -> None:
        size = state.file.size
        if self.client.ignores_ranges:
            step = max(size, 1)  # one request per file: a range request would bring the whole body anyway
        else:
            step = chunk_size_for(size, self.connections, self.chunk_size)
        self._pending[state] = self._queue.push_file(state, size, state.file.path, step)

    def _next_chunk(self) -> Chunk[FileState] | None:
        # A reader of a file whose twin (same content) is downloaded waits on the twin's ranges.
        waited = {self._twins.get(s.file.etag, [s])[0]: s.wanted_offsets for s in self._waiting_files}
        return self._queue.pop(waited)

    # -- transfer ---------------------------------------------------------------------------

    async def _worker(self) -> None:
        """Fetch ranges until none is left (one worker per connection)."""
        while (chunk := self._next_chunk()) is not None:
            state = chunk.file
            await self._ensure_started(state)
            await self._fetch_chunk(chunk)
            self._pending[state] -= 1
            if self._pending[state] == 0:
                await self._finish_file(state)

    async def _fetch_chunk(self, chunk: Chunk[FileState]) -> None:
        """Fetch whatever of the chunk is missing, resuming from where a broken transfer stopped.

        Bytes that an on-demand request is bringing are left to it: the chunk waits for that
        request and then fetches only what is still missing, so no byte is downloaded twice.
        """
        state = chunk.file
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
                if self.retry.gives_up_after(failures):
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
                if body.whole_file and (stream.pos > 0 or stream.end < state.file.size):
                    plan = trio.from_thread.run_sync(self._become_whole, state, stream)
                    if plan == "whole":
                        self._stream_whole(fd, state, stream, body)
                        return
                    if plan == "leave":
                        return  # the file's whole stream brings these bytes: drop this body
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

    def _become_whole(self, state: FileState, stream: Stream) -> str:
        """The server answered a range request with the whole file: make ``stream`` the one that
        fetches the file whole, so its body is sent once, not once per range ("whole").

        If another stream of this file does that already: "leave" this body if that stream
        will still pass this range, else "skip" to the range in this body (as a last resort).
        """
        if self._closed:
            return "leave"
        if (whole := self._whole.get(state)) is not None:
            return "leave" if whole.pos <= stream.pos else "skip"
        if not self.client.ignores_ranges:
            log.info(
                "%s/%s: the server ignores Range requests; fetching each file in one request from now on",
                self.entry,
                state.file.path,
            )
            self.client.ignores_ranges = True
            # Files no worker has started yet: one request each, like every file from now on.
            for other, pending in list(self._pending.items()):
                if other is not state and pending > 1 and len(self._queue.queued(other)) == pending:
                    self._queue.drop_file(other)
                    self._plan(other)
        stream.whole = True
        stream.pos, stream.end = 0, state.file.size
        self._whole[state] = stream
        # The file's other ranges are this stream's now; readers are served as it lands.
        self._pending[state] -= len(self._queue.drop_file(state))
        return "whole"

    def _stream_whole(self, fd: int, state: FileState, stream: Stream, body: RangeBody) -> None:
        """Runs in a worker thread: write a whole-file body, skipping bytes that are present or
        that another stream brings (they must never be written twice: see _write_limit)."""
        try:
            for data in body.whole_chunks(state.file.size):
                pieces = trio.from_thread.run_sync(self._whole_pieces, state, stream, len(data))
                view = memoryview(data)
                for start, end in pieces:
                    try:
                        os.pwrite(fd, view[start - stream.pos : end - stream.pos], start)
                    except OSError as exc:
                        raise _disk_error(exc, f"{self.entry}/{state.file.path}") from exc
                if not trio.from_thread.run_sync(self._whole_landed, state, stream, pieces, len(data)):
                    return
                trio.from_thread.check_cancelled()
        finally:
            with contextlib.suppress(trio.RunFinishedError):
                trio.from_thread.run_sync(self._whole.pop, state, None)

    def _whole_pieces(self, state: FileState, stream: Stream, length: int) -> list[tuple[int, int]]:
        """The parts of the next ``length`` bytes of a whole-file stream it may write."""
        if self._closed:
            return []
        claimed = RangeSet([(o.pos, o.end) for o in state.streams if o is not stream and o.pos < o.end])
        end = stream.pos + length
        return [piece for gap in state.present.missing(stream.pos, end) for piece in claimed.missing(*gap)]

    def _whole_landed(self, state: FileState, stream: Stream, pieces: list[tuple[int, int]], length: int) -> bool:
        if self._closed:
            return False
        for start, end in pieces:
            state.present.add(start, end)
            self.bytes_downloaded += end - start
            metrics.DOWNLOADED_BYTES.inc(end - start)
        stream.pos += length
        state.notify()
        return stream.pos < stream.end

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
            elif other.claims_ahead and not stream.claims_ahead and other.pos <= pos < other.end:
                # A background stream yields to an on-demand one that has the bytes ahead in hand.
                return pos
        return limit

    # -- on-demand ranges ---------------------------------------------------------------------

    def on_reader_wait(self, state: FileState, start: int, end: int) -> None:
        """A reader waits for ``[start, end)``: fetch it now unless a stream is about to bring it."""
        if self._transfers is None or state not in self._fds or self.client.ignores_ranges:
            return  # (a range request would bring the whole file: readers wait for the stream)
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
        try:
            self._transfers.start_soon(self._fetch_on_demand, state, stream)
        except RuntimeError:
            return  # the transfers are ending (the attempt failed): the reader hears it next
        state.streams.add(stream)
        self._last_window[state] = (hi, size)

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
        await self._stop_on_demand(state)
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
            self._plan(state)
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
                raise _disk_error(exc, f"{self.entry}/{file.path}") from exc
            os.close(self._fds.pop(state))
        state.on_wait = None
        state.set_blob(blob, same_inode=True)
        for twin in twins:
            twin.set_blob(blob)
        # Keep nothing per file once it is published: a repo of thousands of files must not
        # hold a descriptor or bookkeeping for each until the whole entry is done.
        for per_file in (self._pending, self._verify_failures, self._last_window, self._on_demand_paused_until):
            per_file.pop(state, None)  # type: ignore[attr-defined]
        self._on_demand.pop(state, None)
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


def _minus_on_demand(gaps: list[tuple[int, int]], streams: set[Stream]) -> list[tuple[int, int]]:
    """``gaps`` without the bytes that on-demand requests still have to write."""
    if not any(stream.claims_ahead for stream in streams):
        return gaps
    claimed = RangeSet([(stream.pos, stream.end) for stream in streams if stream.claims_ahead])
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


__all__: Sequence[str] = ("EntryDownload", "LeaseLost")
