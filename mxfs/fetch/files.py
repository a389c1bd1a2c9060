"""Per-file state on this node: which bytes are present, where readers wait, how bytes are read."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

import trio

from mxfs.cache import open_for_reading
from mxfs.errors import IntegrityError, MxfsError
from mxfs.fetch.planner import Stream
from mxfs.ranges import RangeSet
from mxfs.tree import HubFile


async def read_at(fd: int, offset: int, size: int, limiter: trio.CapacityLimiter) -> bytes:
    """``size`` bytes at ``offset`` (fewer only at end of file), in a worker thread.

    Even page-cache hits go through the thread: an inline ``preadv(RWF_NOWAIT)`` does not drive the
    kernel's readahead, so a sequential reader would keep finding the next pages cold.
    """
    return await trio.to_thread.run_sync(os.pread, fd, size, offset, limiter=limiter)


class ReaderWaits:
    """The files of one entry that readers wait on now: data the download reads.

    Readers never call into the download: they record what they wait for on their FileState
    (``wanted_offsets``, ``on_demand_waits``), and every change of a waited file wakes
    :meth:`wait_changed`, where the download's planner looks at the waits again.
    """

    def __init__(self) -> None:
        self.files: set[FileState] = set()
        self._changed = trio.Event()

    def changed(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def wait_changed(self) -> None:
        await self._changed.wait()


class FileState:
    """What this node knows of one file of an entry, and the place its readers wait.

    Readers never use the downloader's descriptor: they share one read-only descriptor on the
    partial file (or the blob), which stays valid when the partial file is renamed to its blob
    name, because a rename keeps the inode.  When the copy changes (a new partial file, or a blob
    published by another node) the descriptor is retired and a new one opened.
    """

    def __init__(self, file: HubFile) -> None:
        self.file = file
        self.blob: Path | None = None  # set once the verified blob is in the cache
        self.partial: Path | None = None  # the partial file while this node (or, see remote, another) downloads it
        # Set while reads are served from another node's partial file in the shared cache
        # (mxfs.fetch.follow): its name and its (st_dev, st_ino), the copy's identity.  A partial
        # file holds one copy only (a copy that fails its checksum gets a new file), so the blob
        # that appears with this very inode is the copy readers were served, verified.
        self.remote: RemoteCopy | None = None
        # On the owner: the ranges readers on other nodes wait for (their want files), fetched
        # on demand like this node's own readers' waits.
        self.remote_waits: list[tuple[int, int]] = []
        # The partial file passed its checksum and is about to become the blob.  Reads that must
        # see verified bytes (strict mode, and every read that reaches the end of the file) go
        # ahead now: waiting for the blob would make them wait for its fsync too, seconds for a
        # large file on a slow disk, for durability that only matters after a crash.
        self.verified = False
        self.present = RangeSet()
        self.error: MxfsError | None = None
        # Each copy of the file's bytes this node serves from is a generation.  ``exposed``: bytes
        # of the current generation were handed to a reader before the copy was verified.  When
        # such a copy is discarded without being verified (it failed its checksum, or it was
        # replaced or deleted unchecked), every handle that was open meanwhile may hold its bytes,
        # directly or through the kernel's page cache that all handles of an inode share, so each
        # of them fails from then on (see :meth:`check_copy`).
        self.generation = 0
        self.exposed = False
        self.last_tainted_generation = -1
        # Told (entry key, path) of each discarded copy, so the filesystem drops the kernel's
        # cached pages of it; set by the fetcher.
        self.discards: trio.MemorySendChannel[tuple[str, str]] | None = None
        self.entry_key = ""  # the registry key of the file's entry
        self.waiting = 0
        self.wanted_offsets: set[int] = set()
        # The ranges readers wait for that may be fetched on demand (not strict waits, which
        # want verified bytes): the download's planner reads them (DESIGN section 5).
        self.on_demand_waits: list[tuple[int, int]] = []
        # The entry's files that readers wait on now, shared by its FileStates: the download
        # puts their ranges first without looking at every file.
        self.reader_waits: ReaderWaits | None = None
        # Range requests writing this file now (background chunks and on-demand reads).
        self.streams: set[Stream] = set()
        self._changed = trio.Event()
        self._fd: SharedFd | None = None

    @property
    def complete(self) -> bool:
        return self.blob is not None

    @property
    def bytes_present(self) -> int:
        """How much of the file this node has: all of it once complete, else its present ranges."""
        return self.file.size if self.complete else self.present.total

    def notify(self) -> None:
        """Wake every reader waiting on this file (they re-check what they wait for), and the
        download's planner if readers wait on it (a stream it counted on may have stopped)."""
        self._changed.set()
        self._changed = trio.Event()
        if self.waiting and self.reader_waits is not None:
            self.reader_waits.changed()

    async def wait_changed(self) -> None:
        """Wait for the next :meth:`notify`."""
        await self._changed.wait()

    def set_blob(self, blob: Path, *, same_inode: bool = False) -> None:
        """The verified blob is in the cache. ``same_inode``: it is the partial file readers read
        from (ours, or the one another node wrote that readers here followed), renamed."""
        if not same_inode:
            if self.exposed:
                # Another copy (published by another node, or found in the cache) replaces ours
                # before ours was checked: what readers got from ours is unverified for ever.
                self.discard_copy()
            self.retire_fd()
        elif self.remote is not None:
            self.retire_fd()  # pages of another node's file may predate its writes: reopen
        self.exposed = False
        self.blob = blob
        self.partial = None
        self.remote = None
        self.error = None
        self.present = RangeSet([(0, self.file.size)])
        self.notify()

    def set_error(self, error: MxfsError) -> None:
        self.error = error
        self.notify()

    # -- generations of the copy ------------------------------------------------------------

    def discard_copy(self) -> None:
        """The current copy's bytes will never be verified: start a new generation.

        If any of them reached a reader, every handle open now is tainted (its reads fail from
        here on) and the filesystem is told to drop the inode's cached pages, so neither a
        read() nor an mmap can go on with them.  Handles opened later are not affected: the
        filesystem gives the name a new inode (see MxfsOperations.open), whose page cache the
        tainted handles do not share.
        """
        if self.exposed:
            self.last_tainted_generation = self.generation
            if self.discards is not None:
                self.discards.send_nowait((self.entry_key, self.file.path))
        self.generation += 1
        self.exposed = False
        self.verified = False
        self.present.clear()
        self.notify()

    def mark_verified(self) -> None:
        """The current copy passed its checksum: every byte readers got of it was right."""
        self.verified = True
        self.exposed = False
        self.notify()

    def tainted(self, first_generation: int) -> bool:
        """True if a handle opened at ``first_generation`` was open while an exposed copy was discarded."""
        return self.last_tainted_generation >= first_generation

    def check_copy(self, first_generation: int) -> None:
        """Raise for a handle (opened at ``first_generation``) that may hold bytes of a bad copy."""
        if self.tainted(first_generation):
            raise CopyDiscarded(
                f"{self.file.path}: bytes served through this handle came from a copy that was discarded "
                "unverified (it failed its checksum, or its download was abandoned); reopen the file"
            )

    def expose(self) -> int:
        """About to hand out bytes of the current copy; returns its generation.

        Marked before the bytes are read, not after: a copy discarded while the read is in
        flight then taints the reader, which checks again once the read returns.
        """
        if self.blob is None and not self.verified:
            self.exposed = True
        return self.generation

    def readable(self, start: int, end: int, strict: bool) -> bool:
        if self.blob is not None:
            return True
        if self.partial is None:
            return False
        return self.verified or (not strict and self.present.covers(start, end))

    async def wait_readable(self, start: int, end: int, strict: bool, first_generation: int | None = None) -> None:
        """Return once ``[start, end)`` can be read; raise the file's error if it fails first, or
        the handle's (opened at ``first_generation``) if a copy it may have seen is discarded."""
        if self.readable(start, end, strict):
            return
        self.waiting += 1
        self.wanted_offsets.add(start)
        wait = (start, end)
        if not strict:
            self.on_demand_waits.append(wait)
        if self.reader_waits is not None:
            self.reader_waits.files.add(self)
            self.reader_waits.changed()
        try:
            while not self.readable(start, end, strict):
                if first_generation is not None:
                    self.check_copy(first_generation)
                if self.error is not None:
                    raise self.error
                await self._changed.wait()
        finally:
            self.waiting -= 1
            self.wanted_offsets.discard(start)
            if not strict:
                self.on_demand_waits.remove(wait)
            if self.waiting == 0 and self.reader_waits is not None:
                self.reader_waits.files.discard(self)

    # -- the shared read descriptor --------------------------------------------------------

    def acquire_fd(self) -> SharedFd:
        """A read-only descriptor on the current copy of the file; call ``release()`` after use."""
        if self._fd is None:
            path = self.blob or self.partial
            if path is None:
                raise MxfsError(f"{self.file.path}: no local copy to read")
            self._fd = SharedFd(open_for_reading(path))
        self._fd.users += 1
        return self._fd

    def adopt_fd(self, fd: int) -> None:
        """Serve reads from ``fd`` (the downloader opens it on a new partial file, so readers
        never have to open the partial file by a name that a rename may take away)."""
        self.retire_fd()
        self._fd = SharedFd(fd)

    def retire_fd(self) -> None:
        """Stop handing out the current descriptor (the copy changed, or nobody reads any more).

        It is closed when the last read in flight releases it, never under a running read.
        """
        if self._fd is not None:
            self._fd.retire()
            self._fd = None


@dataclass(frozen=True)
class RemoteCopy:
    """Another node's partial file that reads are served from: its name and its inode."""

    name: str
    dev: int
    ino: int

    def same_file(self, other: RemoteCopy) -> bool:
        return (self.dev, self.ino) == (other.dev, other.ino)


class CopyDiscarded(IntegrityError):
    """A handle may hold bytes of a copy that was discarded unverified: EIO from now on."""


class SharedFd:
    """A descriptor shared by concurrent reads, closed only when retired and unused."""

    __slots__ = ("fd", "retired", "users")

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.users = 0
        self.retired = False

    def release(self) -> None:
        self.users -= 1
        if self.retired and self.users == 0:
            self._close()

    def retire(self) -> None:
        self.retired = True
        if self.users == 0:
            self._close()

    def _close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)
