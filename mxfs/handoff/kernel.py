"""The hand-off's mounts: bind, read-only remount, detach and share, and what mountinfo shows.

The daemon makes every mount call that resolves a path inside its own FUSE mount in a child
process (:func:`run_child`, running :mod:`mxfs.handoff.syscalls` as a script), never in one of
its threads: the kernel resolves such a path with FUSE requests that this very daemon answers,
and a thread of the daemon blocked in one keeps a killed daemon's FUSE connection from ever
being aborted (see :mod:`mxfs.handoff.syscalls`).  A process that is not the daemon
(``mxfs evict``) may call :mod:`mxfs.handoff.syscalls` directly.
"""

from __future__ import annotations

import errno
import os
import sys
from collections.abc import Iterable
from pathlib import Path

import trio

from mxfs.cache import VIEWS_DIR
from mxfs.handoff import syscalls
from mxfs.mounts import current_mounts, mountinfo_roots
from mxfs.names import COMMIT_RE

# A child's start-up: no site, no user paths; it imports only the standard library.
_CHILD = (sys.executable, "-I", "-S", syscalls.__file__)


async def run_child(op: str, *args: str | os.PathLike[str]) -> int:
    """Run one :mod:`mxfs.handoff.syscalls` operation in a child; its exit status (0 or
    ``EXIT_NOT_MOUNTED``), or OSError with the child's errno and message."""
    done = await trio.run_process(
        [*_CHILD, op, *map(os.fspath, args)], capture_stdout=True, capture_stderr=True, check=False
    )
    if done.returncode in (0, syscalls.EXIT_NOT_MOUNTED):
        return done.returncode
    number, _, message = done.stdout.decode(errors="replace").strip().partition(" ")
    if not number.isdigit():
        said = done.stderr.decode(errors="replace").strip()[-500:]
        number, message = str(errno.EIO), said or f"exited with {done.returncode}"
    raise OSError(int(number), f"{op}: {message}")


async def bind_read_only(view: Path, target: Path) -> None:
    """Bind ``view`` read-only over ``target`` (whatever was bound there before is detached)."""
    await run_child("bind", view, target)


async def detach(target: Path) -> bool:
    """Detach whatever is bound at ``target`` lazily; False if nothing was."""
    return await run_child("detach", target) == 0


async def make_shared(mountpoint: Path) -> None:
    """Give our FUSE mount shared propagation (:func:`mxfs.handoff.syscalls.make_shared`)."""
    await run_child("share", mountpoint)


async def look_up(paths: Iterable[Path]) -> None:
    """stat these paths (FUSE lookups of directories of our mount), in one child."""
    await run_child("look-up", *paths)


def can_mount() -> bool:
    """Only a process with CAP_SYS_ADMIN may mount; the daemon runs as root (or the DaemonSet's
    privileged container) when it hands off, and falls back to FUSE otherwise."""
    return os.geteuid() == 0


def submounts(mountpoint: Path) -> list[str]:
    """Mount points strictly under ``mountpoint`` in this namespace (deepest first, for unmounting)."""
    base = os.path.abspath(mountpoint).rstrip("/") + "/"
    found = {m.mount_point for m in current_mounts() if m.mount_point.startswith(base)}
    return sorted(found, key=lambda p: (-p.count("/"), p))


def view_of_root(root: str) -> tuple[str, str] | None:
    """(repo folder, commit) of a view, if mountinfo's root field ``root`` is one
    (``.../models--org--name/.mxfs-views/<commit>``, wherever the cache's filesystem is mounted)."""
    parts = root.rstrip("/").split("/")
    if len(parts) < 3 or parts[-2] != VIEWS_DIR or not COMMIT_RE.match(parts[-1]):
        return None
    if not parts[-3].startswith("models--"):
        return None
    return parts[-3], parts[-1]


def find_view_binds(roots: Iterable[tuple[str, str]]) -> dict[tuple[str, str], list[str]]:
    """The binds of views among (root, mount point) pairs: (repo folder, commit) -> mount points."""
    found: dict[tuple[str, str], set[str]] = {}
    for root, point in roots:
        view = view_of_root(root)
        if view is not None:
            found.setdefault(view, set()).add(point)
    return {view: sorted(points) for view, points in found.items()}


def view_binds() -> dict[tuple[str, str], list[str]]:
    """The hand-offs this mount namespace shows, whoever made them (the daemon, before a restart;
    read by ``mxfs status`` and ``mxfs evict``, which did not make them)."""
    return find_view_binds(mountinfo_roots())
