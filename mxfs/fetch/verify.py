"""Verification of downloaded files: the Hub's hash of each file, computed as its bytes land.

The download hashes each file's prefix as it becomes contiguous, while the rest still arrives,
so verifying a finished file costs only its last bytes instead of a second pass over all of it
(seconds for a multi-GB file, during which its last reader would wait).
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os

import trio

from mxfs.fetch.files import FileState
from mxfs.tree import HubFile

log = logging.getLogger(__name__)

# Bytes per read of a file being hashed: under glibc's mmap threshold (mxfs.memory), so the
# buffer comes from the heap, already mapped.
HASH_BLOCK = 1 << 20
# At most this much is hashed per thread call, so the hashing task stays responsive.
HASH_FEED = 64 << 20


class PrefixHasher:
    """The Hub's hash of a file (LFS sha256, else git's blob sha1), fed with its bytes in order.

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
        """Hash the bytes from ``pos`` to ``upto`` (blocking: run it in a thread).

        Read into one buffer, reused for every block of the call: a fresh buffer per block made
        the kernel map and zero its pages again each time, a twentieth of a cold load's CPU.
        """
        buffer = memoryview(bytearray(min(HASH_BLOCK, upto - self.pos)))
        while self.pos < upto:
            n = os.preadv(fd, [buffer[: min(len(buffer), upto - self.pos)]], self.pos)
            if not n:
                raise OSError(errno.EIO, "file shorter than its size")
            self._digest.update(buffer[:n])
            self.pos += n

    def matches(self) -> bool:
        return self.pos == self.file.size and self._digest.hexdigest() == self._expected


class Hashes:
    """The running hashes of one download's files. ``fds``: the download's descriptors on the
    partial files, by file (read here, never closed here)."""

    def __init__(self, fds: dict[FileState, int], io_limiter: trio.CapacityLimiter, label: str) -> None:
        self.fds = fds
        self.io_limiter = io_limiter
        self.label = label  # the entry, for log lines
        self._hashers: dict[FileState, PrefixHasher] = {}

    def start(self, state: FileState, nursery: trio.Nursery | None) -> None:
        """Hash the file (afresh) as it lands, in a task of ``nursery``."""
        hasher = self._hashers[state] = PrefixHasher(state.file)
        assert nursery is not None
        nursery.start_soon(self._hash_as_it_lands, state, hasher)

    async def _hash_as_it_lands(self, state: FileState, hasher: PrefixHasher) -> None:
        """Feed ``hasher`` the file's contiguous prefix as it grows, a block at a time."""
        fd = self.fds[state]
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
                    log.warning("%s/%s: could not hash the partial file: %s", self.label, state.file.path, exc)
                    return

    async def verified(self, state: FileState) -> bool:
        """Finish the file's hash (usually only its last bytes are left) and compare."""
        hasher = self._hashers.pop(state, None) or PrefixHasher(state.file)
        fd = self.fds[state]
        async with hasher.lock:
            try:
                await trio.to_thread.run_sync(hasher.feed, fd, state.file.size, limiter=self.io_limiter)
            except OSError:
                return False
        return hasher.matches()


__all__ = ["Hashes", "PrefixHasher"]
