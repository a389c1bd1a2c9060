#!/usr/bin/env python3
"""A bare read-only pyfuse3 passthrough filesystem: the yardstick for mxfs's read path.

Usage: python bench/passthrough.py SRC MNT

It serves SRC (read-only) at MNT in the style of pyfuse3's examples: lookup / getattr / opendir /
readdir / open / read / release, ``keep_cache=True``, every read an ``os.pread`` in a worker thread.
After mounting it raises the FUSE bdi's ``read_ahead_kb`` like mxfs does.  SIGTERM/SIGINT unmount.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import sys
from pathlib import Path

import pyfuse3
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
try:
    from mxfs.mounts import tune_fuse_connection
except Exception:  # pragma: no cover - the bench still works without mxfs importable
    tune_fuse_connection = None

log = logging.getLogger("passthrough")


class Passthrough(pyfuse3.Operations):
    def __init__(self, source: str) -> None:
        super().__init__()
        self._inode_path: dict[int, str] = {pyfuse3.ROOT_INODE: source}
        self._path_inode: dict[str, int] = {source: pyfuse3.ROOT_INODE}
        self._lookup_cnt: dict[int, int] = {}
        self._next_inode = pyfuse3.ROOT_INODE + 1

    def _inode_for(self, path: str) -> int:
        ino = self._path_inode.get(path)
        if ino is None:
            ino = self._next_inode
            self._next_inode += 1
            self._path_inode[path] = ino
            self._inode_path[ino] = path
        return ino

    def _path(self, inode: int) -> str:
        try:
            return self._inode_path[inode]
        except KeyError:
            raise pyfuse3.FUSEError(errno.ENOENT) from None

    def _attr(self, path: str, inode: int) -> pyfuse3.EntryAttributes:
        try:
            st = os.lstat(path)
        except OSError as exc:
            raise pyfuse3.FUSEError(exc.errno) from None
        entry = pyfuse3.EntryAttributes()
        entry.st_ino = inode
        entry.generation = 0
        entry.entry_timeout = 300
        entry.attr_timeout = 300
        entry.st_mode = st.st_mode & ~0o222
        entry.st_nlink = st.st_nlink
        entry.st_uid = st.st_uid
        entry.st_gid = st.st_gid
        entry.st_rdev = st.st_rdev
        entry.st_size = st.st_size
        entry.st_blksize = 4096
        entry.st_blocks = (st.st_size + 511) // 512
        entry.st_atime_ns = st.st_atime_ns
        entry.st_mtime_ns = st.st_mtime_ns
        entry.st_ctime_ns = st.st_ctime_ns
        return entry

    async def lookup(self, parent_inode, name, ctx=None):
        name = os.fsdecode(name)
        parent = self._path(parent_inode)
        if name == ".":
            path = parent
        elif name == "..":
            path = os.path.dirname(parent)
        else:
            path = os.path.join(parent, name)
        # Follow symlinks (HF cache snapshots are links into blobs/): serve the target as a file.
        real = os.path.realpath(path)
        if not os.path.lexists(real):
            raise pyfuse3.FUSEError(errno.ENOENT)
        inode = self._inode_for(path)
        self._lookup_cnt[inode] = self._lookup_cnt.get(inode, 0) + 1
        return self._attr(real, inode)

    async def getattr(self, inode, ctx=None):
        return self._attr(os.path.realpath(self._path(inode)), inode)

    async def forget(self, inode_list):
        for inode, nlookup in inode_list:
            left = self._lookup_cnt.get(inode, 0) - nlookup
            if left > 0:
                self._lookup_cnt[inode] = left
                continue
            self._lookup_cnt.pop(inode, None)
            if inode != pyfuse3.ROOT_INODE:
                path = self._inode_path.pop(inode, None)
                if path is not None:
                    self._path_inode.pop(path, None)

    async def opendir(self, inode, ctx):
        path = self._path(inode)
        if not os.path.isdir(path):
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    async def readdir(self, fh, start_id, token):
        path = self._path(fh)
        try:
            names = sorted(os.listdir(path))
        except OSError as exc:
            raise pyfuse3.FUSEError(exc.errno) from None
        for i, name in enumerate(names[start_id:], start=start_id):
            child = os.path.join(path, name)
            real = os.path.realpath(child)
            if not os.path.lexists(real):
                continue
            inode = self._inode_for(child)
            if not pyfuse3.readdir_reply(token, os.fsencode(name), self._attr(real, inode), i + 1):
                return
            self._lookup_cnt[inode] = self._lookup_cnt.get(inode, 0) + 1

    async def releasedir(self, fh):
        pass

    async def open(self, inode, flags, ctx):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_TRUNC):
            raise pyfuse3.FUSEError(errno.EROFS)
        path = self._path(inode)
        try:
            fd = await trio.to_thread.run_sync(os.open, path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise pyfuse3.FUSEError(exc.errno) from None
        info = pyfuse3.FileInfo(fh=fd)
        info.keep_cache = True
        return info

    async def read(self, fh, off, size):
        try:
            return await trio.to_thread.run_sync(os.pread, fh, size, off)
        except OSError as exc:
            raise pyfuse3.FUSEError(exc.errno) from None

    async def release(self, fh):
        os.close(fh)

    async def statfs(self, ctx):
        st = os.statvfs(self._inode_path[pyfuse3.ROOT_INODE])
        out = pyfuse3.StatvfsData()
        for attr in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files", "f_ffree", "f_favail"):
            setattr(out, attr, getattr(st, attr))
        out.f_namemax = st.f_namemax
        return out


async def _serve(mountpoint: str) -> None:
    async def stop_on_signals(task_status=trio.TASK_STATUS_IGNORED):
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            task_status.started()
            async for _ in signals:
                pyfuse3.terminate()
                return

    async def tune():
        if tune_fuse_connection is not None:
            await trio.sleep(0.2)  # let the mount appear in mountinfo
            await trio.to_thread.run_sync(tune_fuse_connection, Path(mountpoint))
        print("MOUNTED", flush=True)

    async with trio.open_nursery() as nursery:
        await nursery.start(stop_on_signals)
        nursery.start_soon(tune)
        await pyfuse3.main(max_tasks=256)
        nursery.cancel_scope.cancel()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    source, mountpoint = os.path.abspath(argv[0]), os.path.abspath(argv[1])
    logging.basicConfig(level=logging.WARNING)
    ops = Passthrough(source)
    options = set(pyfuse3.default_options) | {"fsname=passthrough", "ro"}
    pyfuse3.init(ops, mountpoint, options)
    try:
        trio.run(_serve, mountpoint)
    finally:
        pyfuse3.close(unmount=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
