"""The transfer: carries out range requests for one entry's files, writes their bytes into the
partial files, and records what landed (``FileState.present``, then ``notify``).

It knows nothing of readers: which ranges to request comes from the planner, and where each
request must stop writing too (:func:`.planner.write_limit`), so no byte is written twice and
no present byte (which a reader may have been served) is written over.  A server that answers a
range request with the whole body is recognised at once: that body becomes the one stream that
brings the file (the planner drops the file's other ranges), never a second whole-body request.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os

import trio

from mxfs import metrics
from mxfs.errors import DiskFull, HubUnavailable, MxfsError
from mxfs.fetch.entry import Entry
from mxfs.fetch.files import FileState
from mxfs.fetch.plan import Chunk
from mxfs.fetch.planner import EntryPlan, Stream, minus_on_demand, unclaimed, write_limit
from mxfs.fetch.sources import RangeClient, SourceFailed
from mxfs.hub import RangeBody, Transient
from mxfs.retry import RetryPolicy

log = logging.getLogger(__name__)


class Transfer:
    """The range requests of one entry's download.

    ``fds``: the writers' descriptors on the partial files, by file, owned by the download (a
    request dups the descriptor when it starts, so it never writes through a closed number).
    """

    def __init__(
        self,
        entry: Entry,
        client: RangeClient,
        plan: EntryPlan[FileState],
        fds: dict[FileState, int],
        *,
        net_limiter: trio.CapacityLimiter,
        retry: RetryPolicy,
    ) -> None:
        self.entry = entry
        self.client = client
        self.plan = plan
        self.fds = fds
        self.net_limiter = net_limiter
        self.retry = retry
        self.bytes_downloaded = 0
        # Set when the attempt ends or its lease is lost: late writes of abandoned requests land nowhere.
        self.closed = False
        # Per file, the one stream that fetches it whole because the server ignored Range.
        self._whole: dict[FileState, Stream] = {}
        self._on_demand: dict[FileState, set[trio.CancelScope]] = {}

    async def fetch_chunk(self, state: FileState, chunk: Chunk[FileState]) -> None:
        """Fetch whatever of the chunk is missing, resuming from where a broken transfer stopped.

        Bytes that an on-demand request is bringing are left to it: the chunk waits for that
        request and then fetches only what is still missing, so no byte is downloaded twice.
        """
        failures = 0
        while gaps := state.present.missing(chunk.start, chunk.end):
            todo = minus_on_demand(gaps, state.streams)
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
                level = logging.INFO if isinstance(exc, SourceFailed) else logging.WARNING
                log.log(level, "%s/%s: %s; resuming in %.1fs", self.entry, state.file.path, exc, delay)
                await trio.sleep(delay)

    async def fetch_on_demand(self, state: FileState, stream: Stream) -> bool:
        """Fetch one on-demand range (``stream``, already among the file's streams); False if
        it failed, which is not fatal: the background download brings these bytes too."""
        scopes = self._on_demand.setdefault(state, set())
        scope = trio.CancelScope()
        scopes.add(scope)
        try:
            with scope:
                await trio.to_thread.run_sync(self._stream, state, stream, limiter=self.net_limiter)
        except MxfsError as exc:
            log.debug("%s/%s: on-demand range failed: %s", self.entry, state.file.path, exc)
            return False
        finally:
            state.streams.discard(stream)
            scopes.discard(scope)
            state.notify()
        return True

    async def stop_on_demand(self, state: FileState) -> None:
        """Cancel and wait out the file's on-demand requests (before it is hashed and published)."""
        for scope in self._on_demand.get(state, ()):
            scope.cancel()
        while self._on_demand.get(state):
            await state.wait_changed()
        self._on_demand.pop(state, None)

    # -- in a worker thread ---------------------------------------------------------------------

    def _stream(self, state: FileState, stream: Stream) -> None:
        """Runs in a worker thread: copy one HTTP range into the partial file.

        Stops early where the bytes ahead are already present or being brought by an on-demand
        request (see :meth:`_landed`); the caller fetches whatever is then still missing.
        """
        # A descriptor of its own: an abandoned stream (see fetch_chunk) may write one more
        # block after the download closed its descriptors, and must never write through a
        # number the process has reused for another file. That block lands in the partial file
        # beyond what its map records, or in an unlinked one: nobody reads it unverified.
        # And the copy it writes for: a file started over (a failed checksum gives the copy a new
        # partial file) must not count bytes landed in the old one as its own.
        fd, generation = trio.from_thread.run_sync(self._descriptor, state)
        path = state.file.path
        try:
            limit = trio.from_thread.run_sync(self.write_limit, state, stream)
            if limit <= stream.pos:
                return
            with self.client.open_range(self.entry.repo_id, self.entry.commit, path, stream.pos, stream.end) as body:
                if body.whole_file and (stream.pos > 0 or stream.end < state.file.size):
                    plan = trio.from_thread.run_sync(self._become_whole, state, stream)
                    if plan == "whole":
                        self._stream_whole(fd, state, stream, body, generation)
                        return
                    if plan == "leave":
                        return  # the file's whole stream brings these bytes: drop this body
                for batch in body.batches():
                    # Never write over bytes that are present (a reader may have been served
                    # them) or that another stream is bringing: the bytes readers got and the
                    # bytes that are hashed must be the same bytes.
                    received = sum(map(len, batch))
                    length = min(received, limit - stream.pos)
                    if length <= 0:
                        return
                    try:
                        write_all(fd, first_bytes(batch, length) if length < received else batch, stream.pos)
                    except OSError as exc:
                        raise disk_error(exc, f"{self.entry}/{path}") from exc
                    limit = trio.from_thread.run_sync(self._landed, state, stream, length, generation)
                    if length < received:
                        return
                    # Stop promptly when the download is cancelled (lease lost, daemon stopping).
                    trio.from_thread.check_cancelled()
        finally:
            os.close(fd)

    def _stream_whole(self, fd: int, state: FileState, stream: Stream, body: RangeBody, generation: int) -> None:
        """Runs in a worker thread: write a whole-file body, skipping bytes that are present or
        that another stream brings (they must never be written twice: see write_limit)."""
        try:
            for data in body.whole_chunks(state.file.size):
                pieces = trio.from_thread.run_sync(self._whole_pieces, state, stream, len(data))
                view = memoryview(data)
                for start, end in pieces:
                    try:
                        os.pwrite(fd, view[start - stream.pos : end - stream.pos], start)
                    except OSError as exc:
                        raise disk_error(exc, f"{self.entry}/{state.file.path}") from exc
                if not trio.from_thread.run_sync(self._whole_landed, state, stream, pieces, len(data), generation):
                    return
                trio.from_thread.check_cancelled()
        finally:
            with contextlib.suppress(trio.RunFinishedError):
                trio.from_thread.run_sync(self._whole.pop, state, None)

    # -- in the trio thread ---------------------------------------------------------------------

    def write_limit(self, state: FileState, stream: Stream) -> int:
        """Where ``stream`` must stop writing (0 once the attempt is closed): see planner.write_limit."""
        if self.closed:
            return 0
        return write_limit(state.present, state.streams, stream)

    def _become_whole(self, state: FileState, stream: Stream) -> str:
        """The server answered a range request with the whole file: make ``stream`` the one that
        fetches the file whole, so its body is sent once, not once per range ("whole").

        If another stream of this file does that already: "leave" this body if that stream
        will still pass this range, else "skip" to the range in this body (as a last resort).
        """
        if self.closed:
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
        stream.whole = True
        stream.pos, stream.end = 0, state.file.size
        self._whole[state] = stream
        # The file's other ranges are this stream's now; readers are served as it lands.
        self.plan.fetched_whole(state)
        return "whole"

    def _whole_pieces(self, state: FileState, stream: Stream, length: int) -> list[tuple[int, int]]:
        """The parts of the next ``length`` bytes of a whole-file stream it may write."""
        if self.closed:
            return []
        return unclaimed(state.present, state.streams, stream, length)

    def _descriptor(self, state: FileState) -> tuple[int, int]:
        return os.dup(self.fds[state]), state.generation

    def _whole_landed(
        self, state: FileState, stream: Stream, pieces: list[tuple[int, int]], length: int, generation: int
    ) -> bool:
        if self.closed or state.generation != generation:
            return False
        for start, end in pieces:
            self._record(state, start, end)
        stream.pos += length
        state.notify()
        return stream.pos < stream.end

    def _landed(self, state: FileState, stream: Stream, length: int, generation: int) -> int:
        """Record bytes written by ``stream``; returns how far it may write next (see write_limit)."""
        if self.closed or state.generation != generation:
            return 0  # an abandoned stream: its bytes belong to no present map any more
        start = stream.pos
        stream.pos += length
        self._record(state, start, stream.pos)
        state.notify()
        return self.write_limit(state, stream)

    def _record(self, state: FileState, start: int, end: int) -> None:
        state.present.add(start, end)
        self.bytes_downloaded += end - start
        metrics.DOWNLOADED_BYTES.inc(end - start)


def first_bytes(pieces: list[bytes], length: int) -> list[bytes]:
    """The first ``length`` bytes of ``pieces`` (which hold more), as pieces."""
    kept: list[bytes] = []
    for piece in pieces:
        if len(piece) >= length:
            kept.append(piece[:length])
            return kept
        kept.append(piece)
        length -= len(piece)
    return kept


def write_all(fd: int, pieces: list[bytes], offset: int) -> None:
    """Write ``pieces`` at ``offset`` in one ``pwritev``, finishing a short write piece by piece."""
    written = os.pwritev(fd, pieces, offset)
    for piece in pieces:
        if written >= len(piece):
            written -= len(piece)
            offset += len(piece)
            continue
        view = memoryview(piece)[written:]
        offset += written
        written = 0
        while view:
            n = os.pwrite(fd, view, offset)
            view, offset = view[n:], offset + n


def disk_error(exc: OSError, what: str) -> MxfsError:
    """The domain error for a failed write or publish: DiskFull for a full disk or quota."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return DiskFull(f"{what}: no space left in the cache")
    return MxfsError(f"{what}: {exc}")


__all__ = ["Transfer", "disk_error"]
