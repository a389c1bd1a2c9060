"""The owner's side of the claim protocol: download one entry into the cache, under a lease.

Only the node whose ``try_claim`` returned ``Claimed`` runs this.  It

* keeps its lease alive every ``lease/3`` and stops writing at once if it cannot (another node
  may take over after expiry; two writers must never share an entry);
* downloads every file of the entry, several at once, large files in parallel ranges, small
  files first and files that readers are waiting for ahead of everything else;
* lets readers on this node read bytes as they land (``FileState.present``);
* verifies each finished file (LFS sha256, git blob sha1) before it becomes a blob, discarding
  and re-downloading a copy that fails, and tells readers that were served its bytes.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import trio

from mxfs.cache import HubCache
from mxfs.errors import (
    DiskFull,
    HubUnavailable,
    IntegrityError,
    MxfsError,
    domain_errors_ungrouped,
)
from mxfs.fetch.entry import Entry, tree_record
from mxfs.fetch.files import FileState
from mxfs.hub import HubClient, HubFile, RetryPolicy, Transient
from mxfs.registry import Registry, RegistryError

log = logging.getLogger(__name__)

# How many times a file that fails its checksum is downloaded again before the entry fails.
VERIFY_ATTEMPTS = 3
HASH_BLOCK = 8 << 20


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


def hash_matches(fd: int, file: HubFile) -> bool:
    """Check a complete copy against the Hub's hash: LFS sha256, else git's blob sha1."""
    if file.lfs_sha256:
        digest, expected = hashlib.sha256(), file.lfs_sha256
    else:
        digest, expected = hashlib.sha1(usedforsecurity=False), file.blob_id
        digest.update(b"blob %d\0" % file.size)
    offset = 0
    while offset < file.size:
        block = os.pread(fd, min(HASH_BLOCK, file.size - offset), offset)
        if not block:
            return False
        digest.update(block)
        offset += len(block)
    return digest.hexdigest() == expected


class EntryDownload:
    """One owner's download of one entry."""

    def __init__(
        self,
        entry: Entry,
        states: dict[str, FileState],
        claim_id: str,
        *,
        cache: HubCache,
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
        self.lease_lost = False
        self.bytes_downloaded = 0

    async def run(self) -> None:
        """Download everything; raises LeaseLost or an MxfsError. Files stay published either way."""
        try:
            with domain_errors_ungrouped():
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._keep_lease, nursery.cancel_scope)
                    await self._download_all()
                    nursery.cancel_scope.cancel()
        finally:
            await self._close_partials()
        if self.lease_lost:
            raise LeaseLost(f"{self.entry}: lease lost, stopped writing")
        await trio.to_thread.run_sync(self.remove_dead_partials, limiter=self.io_limiter)

    # -- lease ------------------------------------------------------------------------------

    async def _keep_lease(self, download_scope: trio.CancelScope) -> None:
        """Renew every lease/3; stop the download the moment the lease can no longer be trusted."""
        last_renewed = trio.current_time()
        while True:
            await trio.sleep(self.lease / 3)
            try:
                renewed = await self.registry.refresh_claim(self.entry.name, self.claim_id, self.lease)
            except RegistryError as exc:
                # Keep a margin: the registry's clock, not ours, decides when the lease expires.
                if trio.current_time() - last_renewed < self.lease * 0.8:
                    log.warning("%s: lease renewal failed (%s); retrying", self.entry, exc)
                    continue
                log.error("%s: could not renew the lease in time (%s); stopping the download", self.entry, exc)
                renewed = False
            if not renewed:
                if not self.lease_lost:
                    log.warning("%s: lost the download lease to another node; stopping", self.entry)
                self.lease_lost = True
                download_scope.cancel()
                return
            last_renewed = trio.current_time()

    # -- planning ---------------------------------------------------------------------------

    async def _download_all(self) -> None:
        await trio.to_thread.run_sync(self._prepare, limiter=self.io_limiter)
        for state in self.states.values():
            if state.complete:
                continue
            if await self._adopt_existing_blob(state):
                continue
            await self._start_partial(state)
            self._plan(state)
        workers = min(self.connections, max(len(self._queue), 1))
        with domain_errors_ungrouped():
            async with trio.open_nursery() as nursery:
                for _ in range(workers):
                    nursery.start_soon(self._worker)

    def _prepare(self) -> None:
        """Make the snapshot folder, and drop what dead writers left of this entry's files."""
        self.cache.ensure_snapshot_dir(self.entry.repo_id, self.entry.commit)
        self.remove_dead_partials()

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

    async def _start_partial(self, state: FileState) -> None:
        file = state.file

        def create() -> tuple[Path, int, int]:
            path, fd = self.cache.create_incomplete(self.entry.repo_id, file.etag, self.claim_id)
            try:
                _reserve(fd, file.size)
                read_fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except BaseException:
                os.close(fd)
                os.unlink(path)
                raise
            return path, fd, read_fd

        try:
            path, fd, read_fd = await trio.to_thread.run_sync(create, limiter=self.io_limiter)
        except OSError as exc:
            raise _disk_error(exc, f"{self.entry}/{file.path}") from exc
        state.adopt_fd(read_fd)
        state.partial = path
        state.present.clear()
        if file.size == 0:
            state.notify()
        self._fds[state] = fd

    def _plan(self, state: FileState) -> None:
        size = state.file.size
        chunks = [Chunk(state, start, min(start + self.chunk_size, size)) for start in range(0, size, self.chunk_size)]
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

    async def _worker(self) -> None:
        while (chunk := self._next_chunk()) is not None:
            await self._fetch_chunk(chunk)
            self._pending[chunk.state] -= 1
            if self._pending[chunk.state] == 0:
                await self._finish_file(chunk.state)

    async def _fetch_chunk(self, chunk: Chunk) -> None:
        """Fetch whatever of the chunk is missing, resuming from where a broken transfer stopped."""
        state = chunk.state
        failures = 0
        while gaps := state.present.missing(chunk.start, chunk.end):
            try:
                for start, end in gaps:
                    await trio.to_thread.run_sync(self._stream, state, start, end, limiter=self.net_limiter)
            except Transient as exc:
                failures += 1
                if failures >= self.retry.attempts:
                    raise HubUnavailable(f"{exc} (gave up after {failures} attempts)") from exc
                delay = self.retry.delay(failures - 1)
                log.warning("%s/%s: %s; resuming in %.1fs", self.entry, state.file.path, exc, delay)
                await trio.sleep(delay)

    def _stream(self, state: FileState, start: int, end: int) -> None:
        """Runs in a worker thread: copy one HTTP range into the partial file."""
        fd = self._fds[state]
        pos = start
        with self.client.open_range(self.entry.repo_id, self.entry.commit, state.file.path, start, end) as body:
            for data in body.chunks():
                try:
                    os.pwrite(fd, data, pos)
                except OSError as exc:
                    raise _disk_error(exc, f"{self.entry}/{state.file.path}") from exc
                trio.from_thread.run_sync(self._landed, state, pos, pos + len(data))
                pos += len(data)
                # Stop promptly when the download is cancelled (lease lost, daemon stopping).
                trio.from_thread.check_cancelled()

    def _landed(self, state: FileState, start: int, end: int) -> None:
        state.present.add(start, end)
        self.bytes_downloaded += end - start
        state.notify()

    # -- verification and publication -------------------------------------------------------

    async def _finish_file(self, state: FileState) -> None:
        file = state.file
        fd = self._fds[state]
        ok = await trio.to_thread.run_sync(hash_matches, fd, file, limiter=self.io_limiter)
        if not ok:
            failures = self._verify_failures[state] = self._verify_failures.get(state, 0) + 1
            state.corrupt_epoch += 1
            state.present.clear()
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
            state.notify()
            return
        partial = state.partial
        assert partial is not None

        def publish() -> Path:
            blob = self.cache.publish_blob(self.entry.repo_id, file.etag, partial, fd)
            self.cache.link_snapshot(self.entry.repo_id, self.entry.commit, file.path, file.etag)
            return blob

        try:
            blob = await trio.to_thread.run_sync(publish, limiter=self.io_limiter)
        except OSError as exc:
            raise _disk_error(exc, f"{self.entry}/{file.path}") from exc
        os.close(self._fds.pop(state))
        state.set_blob(blob, same_inode=True)
        log.debug("%s/%s: verified and cached (%d bytes)", self.entry, file.path, file.size)

    async def _close_partials(self) -> None:
        """Drop partial files we did not finish: they are private to this claim and worthless to others."""
        fds, self._fds = self._fds, {}
        for state, fd in fds.items():
            os.close(fd)
            partial = state.partial
            if partial is not None:
                state.partial = None
                state.present.clear()
                state.retire_fd()
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(os.unlink, partial, limiter=self.io_limiter)
            state.notify()


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
