"""mount(2) and umount2(2) for the hand-off, through ctypes; also a script the daemon runs as a child.

Standard library only, and no import of mxfs: the daemon runs this file as a short-lived child
process (``python -I -S syscalls.py OP ARGS``, see :mod:`mxfs.handoff.kernel`) for every call
that resolves a path inside its own FUSE mount.  Such a call waits for FUSE requests that the
daemon itself answers.  Made from one of the daemon's own threads, a ``kill -9`` of the daemon
while the request is in flight wedges the mount for good: the thread cannot die before the
request is answered (the kernel waits uninterruptibly for a request it has handed to the
daemon), and while it lives, the daemon's ``/dev/fuse`` descriptor stays open, so the kernel
never aborts the connection.  A child holds no such descriptor: when the daemon dies, the
connection is aborted and the child's call fails with ENOTCONN.

Exit status of the script: 0 done; 3 nothing was mounted there (detach); 1 an error, whose
``errno message`` is the one line on stdout.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import sys

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_NOATIME = 0x400
MS_BIND = 0x1000
MS_SHARED = 1 << 20
MNT_DETACH = 0x2

# Read-only, and reads never write the blob's atime: the view shows the commit date as its atime,
# as the FUSE view does.
VIEW_FLAGS = MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_NOATIME

EXIT_NOT_MOUNTED = 3

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mount.argtypes = (ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p)
_libc.umount2.argtypes = (ctypes.c_char_p, ctypes.c_int)


def _check(result: int, what: str, path: str | os.PathLike[str]) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what} {os.fspath(path)}: {os.strerror(err)}")


def _mount(source: str | None, target: str | os.PathLike[str], flags: int) -> None:
    src = os.fsencode(source) if source is not None else None
    _check(_libc.mount(src, os.fsencode(target), None, flags, None), "mount", target)


def make_shared(mountpoint: str | os.PathLike[str]) -> None:
    """Give a mount shared propagation, so submounts reach namespaces copied from it later
    (``unshare --propagation slave``, a pod's ``HostToContainer``), whatever its parent's is."""
    _mount(None, mountpoint, MS_SHARED)


def bind_read_only(view: str | os.PathLike[str], target: str | os.PathLike[str]) -> None:
    """Bind ``view`` over ``target``, then make that bind read-only (a bind ignores MS_RDONLY)."""
    _mount(os.fspath(view), target, MS_BIND)
    try:
        _mount(None, target, MS_REMOUNT | MS_BIND | VIEW_FLAGS)
    except OSError:
        detach(target)
        raise


def detach(target: str | os.PathLike[str]) -> bool:
    """Lazy unmount (MNT_DETACH): gone from the tree now, open files and maps keep reading.

    Returns False if nothing was mounted there (EINVAL) or the path is gone (ENOENT).
    """
    if _libc.umount2(os.fsencode(target), MNT_DETACH) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOENT):
        return False
    raise OSError(err, f"umount {os.fspath(target)}: {os.strerror(err)}")


def look_up(paths: list[str]) -> None:
    """stat each path (a FUSE lookup of the directories under our mount); errors are no matter."""
    for path in paths:
        with contextlib.suppress(OSError):
            os.stat(path)


def main(argv: list[str]) -> int:
    op, args = argv[0], argv[1:]
    try:
        if op == "bind":
            detach(args[1])  # never two binds on one directory
            bind_read_only(args[0], args[1])
        elif op == "detach":
            return 0 if detach(args[0]) else EXIT_NOT_MOUNTED
        elif op == "share":
            make_shared(args[0])
        elif op == "look-up":
            look_up(args)
        else:
            print(f"{errno.EINVAL} unknown operation {op!r}")
            return 1
    except OSError as exc:
        print(f"{exc.errno or errno.EIO} {exc.strerror or exc}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
