"""Which process made a claim: on its own host, a dead claimant's claim need not lapse.

A claim's lease is what frees the download of a claimant that died, so a daemon killed with
``kill -9`` (OOM, a crash) and started again by systemd used to make its readers wait out the
rest of its predecessor's lease before anyone resumed the download.  The claim id therefore
begins with a tag of the process that made it: the host's boot id, the process's pid namespace,
its pid and its start time.  A process that finds a claim DOWNLOADING whose tag names a process
of its own boot and pid namespace that no longer runs (or whose pid now belongs to a later
process: the start time tells) knows the claim is dead, ends it (fenced by its id) and takes
the download over at once.

Anything else is left to the lease, as before: claims of other hosts or containers (another
pid namespace: their pids mean nothing here), and ids in another form (older versions).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import itertools
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

TAG = "p"
SEPARATOR = "."


@dataclass(frozen=True)
class ProcessTag:
    """A running process, as a claim id names it."""

    boot_id: str
    pid_namespace: int
    pid: int
    start_time: int  # clock ticks after boot (/proc/<pid>/stat, field 22)

    def render(self) -> str:
        return SEPARATOR.join((TAG, self.boot_id, str(self.pid_namespace), str(self.pid), str(self.start_time)))

    @classmethod
    def parse(cls, claim_id: str) -> ProcessTag | None:
        """The tag a claim id begins with; None for ids in another form."""
        parts = claim_id.split(SEPARATOR)
        if len(parts) != 6 or parts[0] != TAG or not all(p.isdigit() for p in parts[2:5]):
            return None
        return cls(parts[1], int(parts[2]), int(parts[3]), int(parts[4]))


def _stat(process: str) -> tuple[int, int] | None:
    """(pid, start time) from ``/proc/<process>/stat``; None if no such process runs."""
    try:
        with open(f"/proc/{process}/stat", "rb") as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name (field 2) may hold spaces and parentheses: count fields after its ")".
    fields = stat[stat.rindex(b")") + 2 :].split()
    return int(stat.split(b" ", 1)[0]), int(fields[19])


@functools.cache
def this_process() -> ProcessTag | None:
    """This process's tag; None where /proc does not say (then claims carry no tag and are
    left to their leases): no /proc, or a /proc of another pid namespace than this process's
    (``unshare --pid`` without ``--mount-proc``), whose pids are not the ones we would judge."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot_id = f.read().strip().replace("-", "")
        namespace = os.stat("/proc/self/ns/pid").st_ino
        me = _stat("self")
    except (OSError, ValueError, IndexError):
        return None
    if me is None or me[0] != os.getpid() or not boot_id.isalnum():
        return None
    return ProcessTag(boot_id, namespace, me[0], me[1])


# This process's lock: its name (the first LOCK_NAME_LENGTH characters of the last part of its
# claim ids) and, once held, the state dir's folder of locks and the open file that holds it.
_LOCK_NAME = uuid.uuid4().hex
LOCK_NAME_LENGTH = len(_LOCK_NAME)
LOCKS_DIR = "claims"
# A lock its process let go of this long ago is removed: every claim it made has lapsed by then
# (leases are seconds to minutes), so nothing needs it to tell that the process is gone.
STALE_LOCK_AGE = 24 * 3600.0
_held: tuple[Path, int] | None = None
_claims = itertools.count()


def hold_lock(state_dir: Path) -> None:
    """Hold this process's lock in ``state_dir`` for the rest of its life (blocking: a few file
    operations), so that a process of another pid namespace with the same state dir can tell
    when it has died; and remove the locks of processes gone for longer than STALE_LOCK_AGE.

    Not sooner: the lock of a process that just died is what tells the others (a daemon
    restarted after it, say) that its claims died with it.
    """
    global _held
    if _held is not None:
        return
    folder = state_dir / LOCKS_DIR
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    old = time.time() - STALE_LOCK_AGE
    for name in os.listdir(folder):
        path = folder / name
        with contextlib.suppress(FileNotFoundError):
            if name != _LOCK_NAME and path.stat().st_mtime < old and _lock_is_free(path):
                os.unlink(path)
    fd = os.open(folder / _LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    _held = (folder, fd)


def _lock_is_free(path: Path) -> bool:
    """True if nobody holds the lock at ``path`` (its process is gone); False if somebody does
    or there is no such lock."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # BlockingIOError: its process holds it
        return False
    finally:
        os.close(fd)  # (lets go of the lock too, if it was taken)
    return True


def new_claim_id() -> str:
    """A fresh claim id, naming this process where it can."""
    me = this_process()
    if me is None:
        return uuid.uuid4().hex
    return f"{me.render()}{SEPARATOR}{_LOCK_NAME}{next(_claims):x}"


def dead_claimant(claim_id: str) -> str | None:
    """Which process of ``claim_id`` is known to be dead (``pid N``, said for a log line); None
    if it runs or this process cannot tell (another host, another pid namespace without a lock
    in our state dir, an id in another form).

    Reads /proc and tries a lock: a few small in-memory operations, not worth a thread.
    """
    tag, me = ProcessTag.parse(claim_id), this_process()
    if tag is None or me is None or tag.boot_id != me.boot_id:
        return None
    if tag.pid_namespace == me.pid_namespace:
        try:
            running = _stat(str(tag.pid))
        except (OSError, ValueError, IndexError):
            return None
        return f"pid {tag.pid}" if running is None or running[1] != tag.start_time else None
    lock = claim_id.split(SEPARATOR)[5][:LOCK_NAME_LENGTH]
    if _held is None or len(lock) != LOCK_NAME_LENGTH or not lock.isalnum():
        return None
    if _lock_is_free(_held[0] / lock):
        return f"pid {tag.pid} of another pid namespace"
    return None
