"""The file source: what one open file handle reads through.

The filesystem talks to one :class:`FileSource` per open file.  A read waits only for the bytes
it asks for (its wait is data the download's planner reads: ``FileState.on_demand_waits``), and
every byte it returns belongs to a copy of the file that is verified or still current: the
source checks its copy's generation before and after each wait and each pread
(``FileState.check_copy``, issue "never silent wrong bytes").  It calls nothing above it: a read
that must wait asks for the download through the entry's record (``EntryFetch.request_start``).
"""

from __future__ import annotations

import trio

from mxfs.errors import IntegrityError
from mxfs.fetch.entrystate import EntryFetch
from mxfs.fetch.files import CopyDiscarded, FileState, SharedFd, read_at
from mxfs.ranges import RangeSet
from mxfs.tree import HubFile


class ReadCount:
    """Bytes returned by reads through the mount since start-up (for the metrics)."""

    __slots__ = ("bytes",)

    def __init__(self) -> None:
        self.bytes = 0


class FileSource:
    """One open file handle: reads wait for their bytes, concurrent reads never serialize."""

    def __init__(
        self,
        ef: EntryFetch,
        state: FileState,
        *,
        strict: bool,
        io_limiter: trio.CapacityLimiter,
        reads: ReadCount,
        held_fd: SharedFd | None = None,
    ) -> None:
        self.ef = ef
        self.state = state
        self.strict = strict
        self.io_limiter = io_limiter
        self.reads = reads
        # The file's copy generation when the handle was opened: copies discarded from then on may
        # have reached it (see FileState.discard_copy).
        self.first_generation = state.generation
        self.closed = False
        # Held from open() to close() once the file is complete: the blob's inode stays readable
        # even if eviction (here or on another node) unlinks it while the file is open.
        self.held_fd = held_fd

    @property
    def file(self) -> HubFile:
        return self.state.file

    @property
    def complete(self) -> bool:
        """The file's verified blob is in the cache (its bytes never change)."""
        return self.state.complete

    @property
    def present(self) -> RangeSet:
        """The bytes of the file on this node now."""
        return self.state.present

    @property
    def generation(self) -> int:
        """The generation of the copy reads are served from now."""
        return self.state.generation

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
            self.ef.request_start()
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
            data = await read_at(shared.fd, offset, end - offset, self.io_limiter)
        finally:
            if shared is not self.held_fd:
                shared.release()
        # The copy may have been discarded while the pread ran (it then taints this handle,
        # since the copy was marked exposed before): these bytes may be of either copy.
        self._check_copy()
        if state.generation != generation and shared is not self.held_fd:
            raise IntegrityError(f"{self.ef.entry}/{self.file.path}: the copy changed under a read")
        self.reads.bytes += len(data)
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
            self.ef.release_handle()


__all__ = ["FileSource", "ReadCount"]
