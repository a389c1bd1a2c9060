"""Who uses a handed-off model: inotify ``IN_OPEN`` on the view's folders.

The kernel serves a handed-off model without asking the daemon, so ``open()`` no longer tells
it a model is in use.  inotify watches inodes, not paths: an open through any bind of the view,
in any mount namespace (a pod), is reported on the view's folder.  Reads of files opened before
and mappings are found by the ``/proc`` scan (mxfs.openfiles) instead.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import struct
from pathlib import Path

import trio

IN_OPEN = 0x20
IN_IGNORED = 0x8000
IN_Q_OVERFLOW = 0x4000
IN_ONLYDIR = 0x1000000
IN_ISDIR = 0x40000000
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC
_EVENT = struct.Struct("iIII")

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.inotify_add_watch.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32)
_libc.inotify_rm_watch.argtypes = (ctypes.c_int, ctypes.c_int)


class OpenWatch:
    """inotify watches on folders, each labelled; :meth:`events` yields the labels of opens."""

    def __init__(self) -> None:
        fd = _libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"inotify_init1: {os.strerror(err)}")
        self.fd = fd
        self._labels: dict[int, str] = {}
        self.overflowed = False

    def watch(self, folder: Path, label: str) -> None:
        """Report opens of ``folder`` and of the files in it as ``label`` (blocking: a thread)."""
        wd = _libc.inotify_add_watch(self.fd, os.fsencode(folder), IN_OPEN | IN_ONLYDIR)
        if wd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"inotify_add_watch {folder}: {os.strerror(err)}")
        self._labels[wd] = label

    def unwatch_label(self, label: str) -> None:
        for wd in [wd for wd, lab in self._labels.items() if lab == label]:
            _libc.inotify_rm_watch(self.fd, wd)  # EINVAL if the folder is gone already: fine
            del self._labels[wd]

    def labels(self) -> set[str]:
        return set(self._labels.values())

    def _parse(self, data: bytes) -> set[str]:
        found: set[str] = set()
        offset = 0
        while offset + _EVENT.size <= len(data):
            wd, mask, _cookie, length = _EVENT.unpack_from(data, offset)
            offset += _EVENT.size + length
            if mask & IN_Q_OVERFLOW:
                self.overflowed = True
            elif mask & IN_IGNORED:
                self._labels.pop(wd, None)
            elif mask & IN_ISDIR:
                # A folder opened (a listing, a walk of the cache by `du` or a backup): no use of
                # the model, as an opendir through FUSE is none.  Files opened are.
                continue
            elif wd in self._labels:
                found.add(self._labels[wd])
        return found

    async def opened(self) -> set[str]:
        """Wait for opens; the labels of the folders they were in (an overflow sets ``overflowed``)."""
        while True:
            await trio.lowlevel.wait_readable(self.fd)
            try:
                data = os.read(self.fd, 64 * 1024)
            except BlockingIOError:
                continue
            except OSError as exc:
                if exc.errno == errno.EINTR:
                    continue
                raise
            found = self._parse(data)
            if found or self.overflowed:
                return found

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
