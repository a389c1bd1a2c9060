"""The mount point as the kernel sees it: what is mounted where, stale mounts, unmount, FUSE knobs.

What is mounted is read from ``/proc/self/mountinfo``, never from a stat of the mount point: a
stat hangs on a wedged daemon, fails with ENOTCONN on a dead one and with EACCES on another
user's FUSE mount, and on our own mount it waits for our own loop.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import trio

log = logging.getLogger(__name__)

# Larger kernel read requests (1 MiB instead of 128 KiB) cut the per-request overhead of FUSE.
READ_AHEAD_KB = 1024
MAX_BACKGROUND = 64


# -- what is mounted where ---------------------------------------------------------------------


@dataclass(frozen=True)
class Mount:
    """One line of mountinfo."""

    device: tuple[int, int]  # (major, minor)
    mount_point: str
    fstype: str  # "fuse.mxfs", "ext4", ...


def _unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash in paths as octal escapes (``\\040``)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def parse_mountinfo(text: str) -> list[Mount]:
    """The mounts in a mountinfo text, in mount order: the last one on a path is the visible one."""
    mounts = []
    for line in text.splitlines():
        before, _, after = line.partition(" - ")
        fields, fstype = before.split(), after.split()[:1]
        if len(fields) > 4 and fstype:
            major, _, minor = fields[2].partition(":")
            mounts.append(Mount((int(major), int(minor)), _unescape(fields[4]), fstype[0]))
    return mounts


def current_mounts() -> list[Mount]:
    with open("/proc/self/mountinfo") as f:
        return parse_mountinfo(f.read())


def parse_mountinfo_roots(text: str) -> list[tuple[str, str]]:
    """(root, mount point) of every mount in a mountinfo text: ``root`` is the path inside its
    filesystem that a bind mount shows, so it names where a bind came from."""
    rows = (line.split() for line in text.splitlines())
    return [(_unescape(fields[3]), _unescape(fields[4])) for fields in rows if len(fields) > 4]


def mountinfo_roots() -> list[tuple[str, str]]:
    """:func:`parse_mountinfo_roots` of this mount namespace."""
    with open("/proc/self/mountinfo") as f:
        return parse_mountinfo_roots(f.read())


def mount_type(mountpoint: Path) -> str | None:
    """The filesystem type mounted at ``mountpoint`` (``fuse.mxfs``), or None if nothing is."""
    target = os.path.abspath(mountpoint)
    found = [m.fstype for m in current_mounts() if m.mount_point == target]
    return found[-1] if found else None


def fuse_device(mountpoint: Path, mounts: list[Mount] | None = None) -> tuple[int, int] | None:
    """The (major, minor) of the FUSE mount at ``mountpoint``, or None if there is none."""
    target = str(mountpoint.resolve())
    found = [
        m.device
        for m in (current_mounts() if mounts is None else mounts)
        if m.mount_point == target and m.fstype.startswith("fuse")
    ]
    return found[-1] if found else None


# -- stale mounts and unmount ------------------------------------------------------------------


def is_stale(mountpoint: Path) -> bool:
    """Is this a FUSE mount whose daemon died ("Transport endpoint is not connected")?

    Asked with statfs, which the kernel always forwards to the daemon: a stat may be answered
    from the attribute cache for a second after the daemon died.
    """
    try:
        os.statvfs(mountpoint)
    except OSError as exc:
        if exc.errno == errno.ENOTCONN:
            return True
        raise
    return False


def clear_stale_mount(mountpoint: Path) -> None:
    """Lazily unmount a FUSE mount whose daemon died ("Transport endpoint is not connected")."""
    if not is_stale(mountpoint):
        return
    log.warning("%s: stale mount left by a crashed daemon; unmounting it", mountpoint)
    for cmd in (["fusermount3", "-u", "-z", str(mountpoint)], ["umount", "-l", str(mountpoint)]):
        with contextlib.suppress(FileNotFoundError):
            if subprocess.run(cmd, capture_output=True, check=False).returncode == 0:
                return
    raise OSError(errno.ENOTCONN, f"could not clear the stale mount at {mountpoint}")


def prepare_mountpoint(mountpoint: Path) -> Path:
    mountpoint = mountpoint.absolute()
    clear_stale_mount(mountpoint)
    if not mountpoint.is_dir():
        raise NotADirectoryError(f"mount point {mountpoint} is not a directory")
    return mountpoint


BUSY_HINT = "; close the files using it, or use --lazy"


def _unmount_submounts(path: Path) -> None:
    """Unmount the models handed to the kernel (mxfs.handoff: binds under the mount), deepest first.

    The mount itself would be "busy" while they are there.  Not lazily: a file open through a
    bind is a file open under the mount, and a plain unmount refuses it with the same hint as a
    file open through FUSE (a lazy unmount of the mount detaches them with it).  A bind that
    stays is handed back by its daemon's reconcile.
    """
    base = str(path).rstrip("/") + "/"
    points = {m.mount_point for m in current_mounts() if m.mount_point.startswith(base)}
    busy = []
    for point in sorted(points, key=lambda p: -p.count("/")):
        done = subprocess.run(["umount", point], capture_output=True, text=True, check=False)
        if done.returncode != 0 and point in {m.mount_point for m in current_mounts()}:
            busy.append(done.stderr.strip() or f"umount {point} exited with {done.returncode}")
    if busy:
        raise OSError(errno.EBUSY, f"could not unmount {path}: {'; '.join(busy)}{BUSY_HINT}")


def unmount(mountpoint: Path, *, lazy: bool = False) -> str:
    """``mxfs unmount``: unmount an mxfs mount, lazily if its daemon is gone; returns what was done.

    A live mount is unmounted normally (the daemon then exits 0 by itself); a stale one ("Transport
    endpoint is not connected", the daemon died) can only be detached.  Raises OSError with a
    message for a person: not mounted, not an mxfs mount, or busy.
    """
    path = Path(os.path.abspath(mountpoint))
    fstype = mount_type(path)
    if fstype is None:
        raise OSError(errno.EINVAL, f"{path} is not mounted")
    if fstype != "fuse.mxfs":
        raise OSError(errno.EINVAL, f"{path} is not an mxfs mount (it is {fstype})")
    try:
        stale = is_stale(path)
    except OSError:
        stale = False  # EACCES (another user's mount without allow_other), say: let umount judge
    lazy = lazy or stale
    if not lazy:
        _unmount_submounts(path)
    commands = (
        ["fusermount3", "-u", *(["-z"] if lazy else []), str(path)],
        ["umount", *(["-l"] if lazy else []), str(path)],
    )
    errors = []
    for cmd in commands:
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        except FileNotFoundError:
            continue
        if done.returncode == 0:
            if stale:
                return f"detached the stale mount at {path} (its daemon had died)"
            return f"unmounted {path}" + (" (lazily: open files keep it alive until closed)" if lazy else "")
        errors.append(done.stderr.strip() or f"{cmd[0]} exited with {done.returncode}")
    hint = BUSY_HINT if any("busy" in e for e in errors) else ""
    raise OSError(errno.EBUSY, f"could not unmount {path}: {'; '.join(errors)}{hint}")


# -- our own mount -----------------------------------------------------------------------------


def tune_fuse_connection(mountpoint: Path) -> None:
    """Raise readahead and background requests of the FUSE connection (root only; best effort)."""
    device = fuse_device(mountpoint)
    if device is None:
        return
    major, minor = device
    knobs = {
        Path(f"/sys/class/bdi/{major}:{minor}/read_ahead_kb"): READ_AHEAD_KB,
        Path(f"/sys/fs/fuse/connections/{minor}/max_background"): MAX_BACKGROUND,
        Path(f"/sys/fs/fuse/connections/{minor}/congestion_threshold"): MAX_BACKGROUND * 3 // 4,
    }
    for path, value in knobs.items():
        try:
            path.write_text(f"{value}\n")
        except OSError as exc:
            log.debug("could not set %s: %s", path, exc)


class MountProbe:
    """Does the mount answer?  Asked of the mount point, and answered by our own FUSE loop.

    A statfs, which the kernel always forwards to the daemon (a stat may come from its attribute
    cache), then a stat to make sure the answer came from a mount and not from the directory
    under it.  It runs in a worker thread (it waits for this very process) and is abandoned on
    timeout; one probe at a time, so a wedged mount costs one stuck thread, not one per check.
    """

    def __init__(self, mountpoint: Path) -> None:
        self.mountpoint = mountpoint
        self._limiter = trio.CapacityLimiter(1)
        self._parent_dev: int | None = None

    def _answers(self) -> bool:
        if self._parent_dev is None:
            self._parent_dev = os.stat(self.mountpoint.parent).st_dev
        try:
            os.statvfs(self.mountpoint)
            return os.stat(self.mountpoint).st_dev != self._parent_dev
        except OSError:
            return False

    async def answers(self, within: float) -> bool:
        with trio.move_on_after(within):
            return await trio.to_thread.run_sync(self._answers, limiter=self._limiter, abandon_on_cancel=True)
        return False
