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
* records which bytes of each partial file are on disk (:mod:`.partfiles`), so an
  attempt that stops (daemon restart, Hub outage) is resumed where it stopped, not redone.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import trio

from mxfs.cache import HubCache
from mxfs.errors import (
    DiskFull,
    IntegrityError,
    domain_errors_ungrouped,
)
from mxfs.fetch.entry import Entry
from mxfs.fetch.files import FileState, ReaderWaits
from mxfs.fetch.lease import LeaseKeeper
from mxfs.fetch.partfiles import PartialFiles
from mxfs.fetch.partials import PartialMaps
from mxfs.fetch.plan import Chunk
from mxfs.fetch.planner import EntryPlan, Stream
from mxfs.fetch.shared import SharedPartials
from mxfs.fetch.sources import RangeClient
from mxfs.fetch.transfer import Transfer
from mxfs.fetch.verify import Hashes
from mxfs.retry import RetryPolicy

log = logging.getLogger(__name__)

# How many times a file that fails its checksum is downloaded again before the entry fails.
VERIFY_ATTEMPTS = 3


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
        client: RangeClient,
        lease: float,
        connections: int,
        chunk_size: int,
        net_limiter: trio.CapacityLimiter,
        io_limiter: trio.CapacityLimiter,
        retry: RetryPolicy,
        shared: SharedPartials | None = None,
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
        self._starting: dict[FileState, trio.Event] = {}
        # Per etag, the files with that content: the first is downloaded, the others linked.
        self._twins: dict[str, list[FileState]] = {}
        self.partials = PartialFiles(
            entry, states, claim_id, cache, partial_maps, lease=lease, io_limiter=io_limiter, shared=shared
        )
        self._fds = self.partials.fds
        self.transfer = Transfer(entry, client, self.plan, self._fds, net_limiter=net_limiter, retry=retry)
        self._verify_failures: dict[FileState, int] = {}
        self.hashes = Hashes(self._fds, io_limiter, str(entry))
        # The nursery on-demand fetches run in; None until the transfers start and after they end.
        self._transfers: trio.Nursery | None = None

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
                    nursery.start_soon(self.partials.save_maps_periodically)
                    await self._download_all()
                    nursery.cancel_scope.cancel()
        except (DiskFull, IntegrityError):
            keep = False
            raise
        finally:
            self.transfer.closed = True
            await self.partials.close_all(keep=keep and not lease.lost)
        await trio.to_thread.run_sync(self.partials.remove_dead, limiter=self.io_limiter)

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
        await trio.to_thread.run_sync(self.partials.prepare, limiter=self.io_limiter)
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
            await self.partials.open(state)
            self.hashes.start(state, self._transfers)
        finally:
            del self._starting[state]
            starting.set()
        state.notify()  # readers waiting for this file ask for their bytes now

    def _add(self, state: FileState) -> None:
        # One request per file from a server that ignores Range: a range request would bring
        # the whole body anyway.
        self.plan.add_file(state, state.file.size, state.file.path, one_request=self.client.ignores_ranges)

    def _next_chunk(self) -> Chunk[FileState] | None:
        # A reader of a file whose twin (same content) is downloaded waits on the twin's ranges.
        waited = {self._twins.get(s.file.etag, [s])[0]: s.wanted_offsets for s in self._waits.files}
        # Readers on other nodes sharing the cache (their want files: mxfs.fetch.shared).
        for state in self._fds:
            if state.remote_waits:
                waited[state] = set(waited.get(state, ())) | {start for start, _ in state.remote_waits}
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
            for state in list(self._fds):
                for start, end in list(state.remote_waits):
                    if not state.present.covers(start, end):
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

    async def _finish_file(self, state: FileState) -> None:
        file = state.file
        await self.transfer.stop_on_demand(state)
        ok = await self.hashes.verified(state)
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
            if failures >= VERIFY_ATTEMPTS:
                state.discard_copy()
                raise IntegrityError(f"{self.entry}/{file.path}: checksum mismatch after {failures} downloads")
            # A new partial file, never the same one rewritten (see PartialFiles.replace); from
            # here no request starts on the old one, and those running count nothing (the copy's
            # generation moved on).
            # Whoever sent these bytes (a peer) is not asked for the next copy.
            self.client.bad_copy(file.path)
            old_fd = self.partials.detach(state)
            state.discard_copy()
            await trio.to_thread.run_sync(self.partial_maps.remove, self.entry.repo_id, file.etag)
            await self.partials.replace(state, old_fd)
            self._add(state)
            self.hashes.start(state, self._transfers)
            state.notify()
            return
        partial = state.partial
        assert partial is not None
        # Verified: readers waiting for verified bytes read the partial file (the blob's inode
        # to be) while it is made durable and renamed.
        state.mark_verified()

        twins = [twin for twin in self._twins.get(file.etag, ()) if twin is not state]

        blob = await self.partials.publish(state, [twin.file.path for twin in twins])
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


__all__: Sequence[str] = ("EntryDownload",)
