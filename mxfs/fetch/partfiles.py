"""The partial files of one download: opened (resumed or new), their range maps saved, put
away when the attempt stops, and published as blobs once verified.

A partial file is ``blobs/<etag>.<claim>.incomplete``, private to one claim; its range map
(:mod:`.partials`) says which of its bytes are real, so this node's next attempt resumes it.
Files are opened when the download first needs them, so descriptors are bounded by the work in
flight, not by the number of files in the repo.
"""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path

import trio

from mxfs.cache import HubCache, make_dirs, open_for_reading
from mxfs.fetch.claimant import dead_claimant
from mxfs.fetch.entry import Entry
from mxfs.fetch.files import FileState
from mxfs.fetch.partials import PartialMap, PartialMaps
from mxfs.fetch.shared import SharedPartials
from mxfs.fetch.transfer import disk_error
from mxfs.ranges import RangeSet

log = logging.getLogger(__name__)

# How often the range maps of partial files are made durable: what a crash can cost to redo.
# The maps published to other nodes sharing the cache (mxfs.fetch.shared) are written then too.
MAP_SAVE_INTERVAL = 5.0
# How often the published maps follow the download while readers on other nodes wait for bytes
# (their want files), and how often the owner looks for such wants: a listing of one folder.
FAST_PUBLISH = 0.25


class PartialFiles:
    """One attempt's partial files. ``fds``: the writers' descriptors, by file."""

    def __init__(
        self,
        entry: Entry,
        states: dict[str, FileState],
        claim_id: str,
        cache: HubCache,
        partial_maps: PartialMaps,
        *,
        lease: float,
        io_limiter: trio.CapacityLimiter,
        shared: SharedPartials | None = None,
    ) -> None:
        self.entry = entry
        self.states = states
        self.claim_id = claim_id
        self.cache = cache
        self.partial_maps = partial_maps
        self.lease = lease
        self.io_limiter = io_limiter
        self.fds: dict[FileState, int] = {}
        # Held while a range map is saved: the partial file's descriptor must not close under it.
        self.lock = trio.Lock()
        # By etag, the partial files of an earlier attempt to resume, and their maps.
        self._resumed: dict[str, tuple[Path, PartialMap]] = {}
        # Where the durable ranges are published for the other nodes sharing the cache (None: the
        # cache is not shared, or readers elsewhere are to get verified blobs only).
        self.shared = shared
        # What each file's published map says now (to publish only what changed).
        self._published: dict[FileState, PartialMap] = {}
        # Files started afresh after a failed checksum: each copy gets a file of its own.
        self._copies = 0

    def prepare(self) -> None:
        """Take over this node's earlier partial files, and drop dead ones.

        Keeps, by etag, the partial files to resume (renamed to this claim's name) and their maps.
        Blocking: run it in a thread.
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
            partial_map = self._with_published(partial_map, file.etag)
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
        self.remove_dead()
        self._resumed = resumed

    def _with_published(self, partial_map: PartialMap, etag: str) -> PartialMap:
        """The ranges of the map and those published to other nodes for the same file: both were
        durable when written, and readers here or elsewhere may have been served the published
        ones, which must then be part of the copy that is verified, never written over."""
        published = self.shared.load(self.entry.repo_id, etag) if self.shared is not None else None
        if published is None or (published.filename, published.size) != (partial_map.filename, partial_map.size):
            return partial_map
        ranges = RangeSet(partial_map.ranges)
        for start, end in published.ranges:
            ranges.add(start, end)
        return PartialMap(partial_map.filename, partial_map.size, ranges.as_list())

    def remove_dead(self) -> None:
        """Remove partial files of this entry's files that nobody writes (blocking)."""
        # Untouched for a whole lease: its writer is dead or has stopped (a lapsed lease stops a
        # writer at once), so nobody will ever finish it.
        # Or written by a process of this host that is gone (mxfs.fetch.claimant): a daemon
        # killed and restarted, whose claim was just taken over without waiting for its lease.
        removed = self.cache.remove_stale_incomplete(
            self.entry.repo_id,
            self.lease,
            etags=(s.file.etag for s in self.states.values()),
            keep=self.claim_id,
            writer_is_dead=lambda writer: dead_claimant(writer) is not None,
        )
        for path in removed:
            log.info("%s: removed %s, left by a writer that stopped", self.entry, path.name)

    async def open(self, state: FileState, writer_id: str | None = None) -> None:
        """Open the file's partial file for writing (resumed, or new and reserved to its size),
        and hand readers a read-only descriptor on it. ``writer_id``: a new file of that name."""
        file = state.file
        resume = self._resumed.pop(file.etag, None) if writer_id is None else None
        writer_id = writer_id or self.claim_id

        def create() -> tuple[Path, int, int, bool]:
            if resume is not None:
                path = resume[0]
                fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
            else:
                path, fd = self.cache.create_incomplete(self.entry.repo_id, file.etag, writer_id)
            try:
                if resume is None:
                    reserve(fd, file.size)
                read_fd = open_for_reading(path)
                st = os.fstat(read_fd)
            except BaseException:
                os.close(fd)
                os.unlink(path)
                raise
            # The file readers here followed as another process's (mxfs.fetch.follow), resumed?
            remote = state.remote
            return path, fd, read_fd, remote is not None and (remote.dev, remote.ino) == (st.st_dev, st.st_ino)

        try:
            path, fd, read_fd, same_copy = await trio.to_thread.run_sync(create, limiter=self.io_limiter)
        except FileNotFoundError:
            if resume is None:
                raise
            resume = None  # swept away meanwhile: start afresh
            path, fd, read_fd, same_copy = await trio.to_thread.run_sync(create, limiter=self.io_limiter)
        except OSError as exc:
            raise disk_error(exc, f"{self.entry}/{file.path}") from exc
        if state.exposed and (resume is None or state.remote is not None) and not same_copy:
            state.discard_copy()  # readers had bytes of a copy that is not resumed
        state.adopt_fd(read_fd)
        state.partial = path
        state.remote = None  # this node writes the file now (it may have followed another's)
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
        self.fds[state] = fd

    def detach(self, state: FileState) -> int:
        """Take the file's writer descriptor out of the download: no request starts on it from
        now on (they find no descriptor). Returns it, for :meth:`replace`."""
        return self.fds.pop(state)

    async def replace(self, state: FileState, fd: int) -> None:
        """Start the file over in a new partial file (its copy failed its checksum; ``fd``: the
        old file's writer descriptor, from :meth:`detach`).

        Never rewritten in place: other nodes' readers know a copy by its file's inode, and the
        blob that appears with the inode they read from must be the copy they read.
        """
        old = state.partial
        repo, etag = self.entry.repo_id, state.file.etag
        self._published.pop(state, None)

        def drop() -> None:
            try:
                if old is not None:
                    if self.shared is not None:
                        self.shared.withdraw(repo, etag, old.name)
                    old.unlink(missing_ok=True)
            finally:
                os.close(fd)

        async with self.lock:
            await trio.to_thread.run_sync(drop, limiter=self.io_limiter)
        state.partial = None
        self._copies += 1
        await self.open(state, f"{self.claim_id}-{self._copies}")

    async def publish(self, state: FileState, also: list[str]) -> Path:
        """The verified partial file becomes the blob, linked at its path and at ``also`` (files
        with the same content); its writer's descriptor is closed. Returns the blob's path."""
        file, partial = state.file, state.partial
        assert partial is not None
        fd = self.fds[state]
        repo = self.entry.repo_id

        def publish() -> Path:
            blob = self.cache.publish_blob(repo, file.etag, partial, fd)
            for path in (file.path, *also):
                self.cache.link_snapshot(repo, self.entry.commit, path, file.etag)
            self.partial_maps.remove(repo, file.etag)
            # After the rename: a reader elsewhere that finds no map looks for the blob next.
            if self.shared is not None:
                self.shared.withdraw(repo, file.etag, partial.name)
            return blob

        async with self.lock:
            try:
                blob = await trio.to_thread.run_sync(publish, limiter=self.io_limiter)
            except OSError as exc:
                raise disk_error(exc, f"{self.entry}/{file.path}") from exc
            os.close(self.fds.pop(state))
            self._published.pop(state, None)
        return blob

    def snapshot_map(self, state: FileState) -> PartialMap | None:
        if state.partial is None:
            return None
        return PartialMap(state.partial.name, state.file.size, state.present.as_list())

    async def save_maps_periodically(self) -> None:
        """Make the maps durable every ``MAP_SAVE_INTERVAL``; publish them to the other nodes
        then, and every ``FAST_PUBLISH`` while readers there wait (each publication follows an
        ``fdatasync``: a published range is on disk)."""
        repo = self.entry.repo_id
        saved_at = trio.current_time()
        while True:
            await trio.sleep(FAST_PUBLISH if self.shared is not None else MAP_SAVE_INTERVAL)
            save = trio.current_time() - saved_at >= MAP_SAVE_INTERVAL
            wants: dict[str, list[tuple[int, int]]] = {}
            if self.shared is not None:
                etags = {state.file.etag for state in self.fds}
                wants = await trio.to_thread.run_sync(self.shared.wants, repo, etags, limiter=self.io_limiter)
                self._take_wants(wants)
            if not save and not wants:
                continue
            if save:
                saved_at = trio.current_time()
            async with self.lock:
                for state, fd in list(self.fds.items()):
                    partial_map = self.snapshot_map(state)
                    if partial_map is None or not partial_map.ranges:
                        continue
                    publish = self.shared is not None and partial_map != self._published.get(state)
                    if not save and not (publish and state.file.etag in wants):
                        continue
                    await trio.to_thread.run_sync(self._save, state, fd, partial_map, save, publish)
                    if publish:
                        self._published[state] = partial_map

    def _save(self, state: FileState, fd: int, partial_map: PartialMap, save: bool, publish: bool) -> None:
        repo, etag = self.entry.repo_id, state.file.etag
        if save:
            self.partial_maps.save(repo, etag, fd, partial_map)  # fdatasync, then the map
        else:
            os.fdatasync(fd)
        if publish and self.shared is not None:
            self.shared.publish(repo, etag, partial_map)

    def _take_wants(self, wants: dict[str, list[tuple[int, int]]]) -> None:
        """Readers elsewhere wait for these ranges: hand them to the planner as reader waits."""
        for state in self.fds:
            ranges = wants.get(state.file.etag, [])
            if ranges != state.remote_waits:
                state.remote_waits = ranges
                if ranges and state.reader_waits is not None:
                    state.reader_waits.changed()

    async def close_all(self, *, keep: bool) -> None:
        """Close the partial files this attempt did not finish; keep them (``keep``) for the next.

        Otherwise they are deleted: private to this claim, they are worthless to other writers.
        """
        with trio.CancelScope(shield=True):
            async with self.lock:
                # Emptied in place: the transfer and the hashes look descriptors up in this very
                # dict, and must find none (never a closed number the process may reuse).
                fds = dict(self.fds)
                self.fds.clear()
                for state, fd in fds.items():
                    await self._close_partial(state, fd, keep=keep)

    async def _close_partial(self, state: FileState, fd: int, *, keep: bool) -> None:
        repo, etag = self.entry.repo_id, state.file.etag
        partial_map = self.snapshot_map(state) if keep else None

        def close() -> None:
            try:
                if self.shared is not None and state.partial is not None:
                    # Other nodes stop reading it: this attempt will not verify it.
                    self.shared.withdraw(repo, etag, state.partial.name)
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
        state.remote_waits = []
        self._published.pop(state, None)
        state.retire_fd()
        if kept:
            # The next attempt of this node resumes this very copy (its map records every byte
            # present now, so every byte any reader got): same generation.
            state.present.clear()
            state.notify()
        else:
            state.discard_copy()


def reserve(fd: int, size: int) -> None:
    """Reserve the file's space up front, so a full disk fails now and not halfway through."""
    if size == 0:
        return
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise
        os.ftruncate(fd, size)


__all__ = ["PartialFiles"]
