"""Which files any process on this node holds open or mapped, by inode: a ``/proc`` scan.

A model handed to the kernel is read without the daemon seeing ``open()``, and a program in a
pod sees it under another path than ours, so paths cannot tell what is in use: the inode can.
Open descriptors are matched by ``/proc/<pid>/fdinfo``'s ``ino`` (cheap, no path lookup) and
then confirmed by a stat of the descriptor; mappings by ``/proc/<pid>/maps``, which names the
device and inode of every mapped file (an mmap outlives the descriptor it was made from, as
safetensors' ``safe_open`` does).  Processes in other PID namespaces are seen when the daemon
runs in the host's (the DaemonSet's ``hostPID``).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable

FileKey = tuple[int, int]  # (st_dev, st_ino)


def file_key(st: os.stat_result) -> FileKey:
    return (st.st_dev, st.st_ino)


def _pids() -> list[str]:
    try:
        return [p for p in os.listdir("/proc") if p.isdigit()]
    except FileNotFoundError:
        return []


def parse_fdinfo_ino(text: str) -> int | None:
    """The ``ino:`` of a ``/proc/<pid>/fdinfo/<fd>`` text (Linux >= 5.14); None if it has none."""
    for line in text.splitlines():
        if line.startswith("ino:"):
            with contextlib.suppress(IndexError, ValueError):
                return int(line.split()[1])
    return None


def parse_maps(text: str) -> set[FileKey]:
    """(st_dev, st_ino) of every file mapped in a ``/proc/<pid>/maps`` text.

    A line is ``start-end perms offset major:minor inode [path]`` with the device in hex;
    anonymous mappings have inode 0.  The path is not used: it may hold spaces, say
    ``(deleted)``, or name the file as another mount namespace sees it.
    """
    found: set[FileKey] = set()
    for line in text.splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) < 5 or fields[4] == "0":
            continue
        major, sep, minor = fields[3].partition(":")
        with contextlib.suppress(ValueError):
            if sep:
                found.add((os.makedev(int(major, 16), int(minor, 16)), int(fields[4])))
    return found


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None  # the process ended, or is not ours to read


def _fdinfo_ino(pid: str, fd: str) -> int | None:
    text = _read(f"/proc/{pid}/fdinfo/{fd}")
    return parse_fdinfo_ino(text) if text is not None else None


def _open_in(pid: str, inodes: set[int], keys: set[FileKey], found: set[FileKey]) -> None:
    fd_dir = f"/proc/{pid}/fd"
    try:
        fds = os.listdir(fd_dir)
    except OSError:
        return
    for fd in fds:
        if _fdinfo_ino(pid, fd) not in inodes:
            continue
        with contextlib.suppress(OSError):
            key = file_key(os.stat(f"{fd_dir}/{fd}"))
            if key in keys:
                found.add(key)


def _mapped_in(pid: str, keys: set[FileKey], found: set[FileKey]) -> None:
    text = _read(f"/proc/{pid}/maps")
    if text is not None:
        found |= parse_maps(text) & keys


def in_use(keys: Iterable[FileKey]) -> set[FileKey]:
    """The files among ``keys`` that some process holds open or has mapped."""
    wanted = set(keys)
    found: set[FileKey] = set()
    if not wanted:
        return found
    inodes = {ino for _dev, ino in wanted}
    for pid in _pids():
        _open_in(pid, inodes, wanted, found)
        _mapped_in(pid, wanted, found)
        if found == wanted:
            break
    return found
