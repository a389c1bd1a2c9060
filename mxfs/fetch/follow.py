"""Readers on a node that does not own a download, served from the owner's partial files.

On a shared cache the owner publishes which ranges of each partial file are durable
(:mod:`.shared`).  While this node waits for the owner, each round of :meth:`Follower.follow`
reads the published map of every file its readers wait on (or read from) and sets the file's
state to that copy: ``partial`` is the owner's file, ``present`` the published ranges, and
``remote`` the copy's identity, its name and inode.  Readers then read those bytes at once, as
readers on the owner's node do, with the same copy generations (``FileState``):

* the blob appears with the inode that was read from: the copy readers got is the one the owner
  verified (a partial file only ever holds one copy: ``PartialFiles.replace``), nothing to undo;
* anything else (another blob, the map withdrawn or naming another file because the owner failed
  the checksum, stopped, died and was taken over, or the file shrank) discards the copy: handles
  that were served its bytes fail with EIO (``FileState.discard_copy``).

**Stale pages.** On a network filesystem the client caches pages of the owner's file, readahead
included, possibly before the owner wrote them.  Each time the published ranges grow the
descriptor is reopened: NFS's close-to-open consistency revalidates the file on open and drops
cached pages of a file that changed, and the ranges a read may touch were durable on the server
before the map naming them was written, so before that open.  ``O_DIRECT`` would do too, but
needs aligned buffers and offsets on local filesystems and gives up readahead for every read.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import trio

from mxfs.cache import HubCache, open_for_reading
from mxfs.fetch.entrystate import EntryFetch
from mxfs.fetch.files import FileState, RemoteCopy, SharedFd
from mxfs.fetch.shared import WANT_REFRESH, SharedPartials
from mxfs.ranges import RangeSet


@dataclass
class _Look:
    """What one round found for one file (from a worker thread)."""

    blob_copy: RemoteCopy | None = None  # the blob's identity, if it is in the cache
    partial: RemoteCopy | None = None  # the published partial file, opened as ``fd``
    ranges: list[tuple[int, int]] | None = None
    fd: int | None = None
    # No map: the owner withdrew it (its attempt ended) or renamed the file to the blob, which
    # a network filesystem's lookup cache may hide for a while: True for the rename.
    withdrawn: bool = False


class Follower:
    """This node's readers of other nodes' partial files."""

    def __init__(self, cache: HubCache, shared: SharedPartials, node: str, io_limiter: trio.CapacityLimiter) -> None:
        self.cache = cache
        self.shared = shared
        self.node = node
        self.io_limiter = io_limiter
        # (repo, etag) -> (ranges, when written) of this node's want files.
        self._wants: dict[tuple[str, str], tuple[list[tuple[int, int]], float]] = {}

    async def follow(self, ef: EntryFetch) -> bool:
        """One round for ``ef``'s files; True if any is followed or waited on (look again soon)."""
        states = [s for s in ef.states.values() if not s.complete and (s.waiting or s.remote is not None)]
        await self._update_wants(ef, states)
        if not states:
            return False
        await self.follow_files(ef, states)
        return True

    async def follow_files(self, ef: EntryFetch, states: list[FileState]) -> None:
        """One round for these files of ``ef``: what the owner published, or the blob."""
        repo = ef.entry.repo_id
        held = [state.acquire_fd() if state.remote is not None else None for state in states]
        try:
            looks = await trio.to_thread.run_sync(self._look_all, repo, states, held, limiter=self.io_limiter)
        finally:
            for fd in held:
                if fd is not None:
                    fd.release()
        for state, look in zip(states, looks, strict=True):
            self._apply(ef, state, look)

    def _look_all(self, repo: str, states: list[FileState], held: list[SharedFd | None]) -> list[_Look]:
        return [self._look(repo, state, fd) for state, fd in zip(states, held, strict=True)]

    def _look(self, repo: str, state: FileState, held: SharedFd | None) -> _Look:
        """Blocking: the published map, then the blob (the owner renames, then withdraws the map)."""
        etag, look = state.file.etag, _Look()
        published = self.shared.load(repo, etag)
        look.blob_copy = identity(self.cache.blob_path(repo, etag))
        if look.blob_copy is not None:
            return look
        if published is None or published.size != state.file.size:
            look.withdrawn = not (held is not None and renamed(held.fd, self.cache.repo_dir(repo) / "blobs", state))
            return look
        ranges = published.present().as_list()
        remote = state.remote
        if remote is not None and remote.name == published.filename and RangeSet(ranges).total == state.present.total:
            look.partial, look.ranges = remote, ranges  # nothing new: keep the descriptor
            return look
        path = self.cache.repo_dir(repo) / "blobs" / published.filename
        if "/" in published.filename or not published.filename.startswith(f"{etag}."):
            return look
        try:
            fd = open_for_reading(path)
        except FileNotFoundError:
            return look  # renamed to the blob, or removed, meanwhile: next round sees which
        st = os.fstat(fd)
        look.partial, look.ranges, look.fd = RemoteCopy(published.filename, st.st_dev, st.st_ino), ranges, fd
        return look

    def _apply(self, ef: EntryFetch, state: FileState, look: _Look) -> None:
        remote = state.remote
        if state.complete or (state.partial is not None and remote is None):
            # Settled meanwhile: the blob was found, or this node writes the file now.
            if look.fd is not None:
                os.close(look.fd)
            return
        if look.blob_copy is not None:
            if remote is not None and look.blob_copy.same_file(remote):
                # The very file readers were served from, verified and renamed by its owner.
                state.set_blob(self.cache.blob_path(ef.entry.repo_id, state.file.etag), same_inode=True)
            # Else leave it to the fetcher's scan (it discards an exposed copy first).
            return
        if look.partial is None or look.ranges is None:
            if remote is not None and look.withdrawn:
                self.drop(state)
            return
        new = look.ranges
        same = remote is not None and remote.same_file(look.partial)
        if same and not all(RangeSet(new).covers(s, e) for s, e in state.present.as_list()):
            same = False  # ranges it said were durable are gone: not the copy readers had
        if not same:
            if remote is not None or state.exposed:
                state.discard_copy()
            state.remote = look.partial
            state.partial = self.cache.repo_dir(ef.entry.repo_id) / "blobs" / look.partial.name
        if look.fd is not None:
            state.adopt_fd(look.fd)
        if RangeSet(new).total != state.present.total or not same:
            state.present = RangeSet(new)
            state.notify()

    def drop(self, state: FileState) -> None:
        """Stop reading the other node's file: its copy will not be verified here."""
        state.discard_copy()
        state.remote = None
        state.partial = None
        state.retire_fd()

    async def _update_wants(self, ef: EntryFetch, states: list[FileState]) -> None:
        """Tell the owner which ranges this node's readers wait for (and that they wait)."""
        repo = ef.entry.repo_id
        now = trio.current_time()
        todo: list[tuple[str, list[tuple[int, int]] | None]] = []
        waited = set()
        for state in states:
            etag = state.file.etag
            ranges = sorted(state.on_demand_waits)
            if not ranges:
                continue
            waited.add(etag)
            before = self._wants.get((repo, etag))
            if before is None or before[0] != ranges or now - before[1] >= WANT_REFRESH:
                self._wants[repo, etag] = (ranges, now)
                todo.append((etag, ranges))
        for key in [k for k in self._wants if k[0] == repo and k[1] not in waited]:
            del self._wants[key]
            todo.append((key[1], None))
        if todo:
            await trio.to_thread.run_sync(self._write_wants, repo, todo, limiter=self.io_limiter)

    def _write_wants(self, repo: str, todo: list[tuple[str, list[tuple[int, int]] | None]]) -> None:
        for etag, ranges in todo:
            with contextlib.suppress(OSError):  # a want is advice: the owner publishes every few s anyway
                if ranges is None:
                    self.shared.unwant(repo, etag, self.node)
                else:
                    self.shared.want(repo, etag, self.node, ranges)

    async def forget(self, ef: EntryFetch) -> None:
        """The entry no longer waits on another node: remove this node's want files for it."""
        await self._update_wants(ef, [])


def renamed(fd: int, blobs: os.PathLike[str], state: FileState) -> bool:
    """True if the followed file is gone by its name but not removed: renamed, to the blob."""
    remote = state.remote
    if remote is None or os.path.exists(os.path.join(blobs, remote.name)):
        return False  # still there without a map: its owner stopped, keeping it for itself
    try:
        return os.fstat(fd).st_nlink > 0
    except OSError:
        return False  # ESTALE: removed on the server


def identity(path: os.PathLike[str]) -> RemoteCopy | None:
    """The file's (name, st_dev, st_ino), or None if it does not exist (blocking)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return RemoteCopy(os.fspath(path), st.st_dev, st.st_ino)


__all__ = ["Follower", "identity"]
