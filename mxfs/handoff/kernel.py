"""mount(2) and umount2(2) for the hand-off, through ctypes: bind, read-only remount, detach, share.

Paths inside our own FUSE mount are resolved by the kernel with FUSE lookups that this very
daemon answers: every call here blocks, and must run in a worker thread while the trio loop
keeps serving (``trio.to_thread.run_sync``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
from pathlib import Path

from mxfs.mounts import current_mounts, mountinfo_roots

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_NOATIME = 0x400
MS_BIND = 0x1000
MS_REC = 0x4000
MS_SHARED = 1 << 20
MNT_DETACH = 0x2

# Read-only, and reads never write the blob's atime: the view shows the commit date as its atime,
# as the FUSE view does.
VIEW_FLAGS = MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_NOATIME

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mount.argtypes = (ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p)
_libc.umount2.argtypes = (ctypes.c_char_p, ctypes.c_int)


def _check(result: int, what: str, path: Path | str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what} {path}: {os.strerror(err)}")


def _mount(source: str | None, target: Path | str, flags: int) -> None:
    src = source.encode() if source is not None else None
    _check(_libc.mount(src, os.fsencode(target), None, flags, None), "mount", target)


def can_mount() -> bool:
    """Only a process with CAP_SYS_ADMIN may mount; the daemon runs as root (or the DaemonSet's
    privileged container) when it hands off, and falls back to FUSE otherwise."""
    return os.geteuid() == 0


def make_shared(mountpoint: Path) -> None:
    """Give our FUSE mount shared propagation, so submounts reach namespaces copied from it later
    (``unshare --propagation slave``, a pod's ``HostToContainer``), whatever its parent's is."""
    _mount(None, mountpoint, MS_SHARED)


def bind_read_only(view: Path, target: Path) -> None:
    """Bind ``view`` over ``target``, then make that bind read-only (a bind ignores MS_RDONLY)."""
    _mount(str(view), target, MS_BIND)
    try:
        _mount(None, target, MS_REMOUNT | MS_BIND | VIEW_FLAGS)
    except OSError:
        detach(target)
        raise


def detach(target: Path) -> bool:
    """Lazy unmount (MNT_DETACH): gone from the tree now, open files and maps keep reading.

    Returns False if nothing was mounted there (EINVAL) or the path is gone (ENOENT).
    """
    if _libc.umount2(os.fsencode(target), MNT_DETACH) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOENT):
        return False
    raise OSError(err, f"umount {target}: {os.strerror(err)}")


def submounts(mountpoint: Path) -> list[str]:
    """Mount points strictly under ``mountpoint`` in this namespace (deepest first, for unmounting)."""
    base = os.path.abspath(mountpoint).rstrip("/") + "/"
    found = {m.mount_point for m in current_mounts() if m.mount_point.startswith(base)}
    return sorted(found, key=lambda p: (-p.count("/"), p))


def mounts_of_view(view_suffix: str) -> list[str]:
    """Mount points whose source (mountinfo's root field) ends with ``view_suffix``: the hand-offs
    of one view, found by a process that did not make them (``mxfs evict``)."""
    return sorted({point for root, point in mountinfo_roots() if root.endswith(view_suffix)})
