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

import functools
import os
import uuid
from dataclasses import dataclass

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


def new_claim_id() -> str:
    """A fresh claim id, naming this process where it can."""
    me = this_process()
    fresh = uuid.uuid4().hex
    return fresh if me is None else f"{me.render()}{SEPARATOR}{fresh}"


def dead_claimant(claim_id: str) -> int | None:
    """The pid of the claimant of ``claim_id`` if it is known to be dead; None if it runs or
    this process cannot tell (another host, another pid namespace, an id in another form).

    Reads /proc: a few small in-memory files, not worth a thread.
    """
    tag, me = ProcessTag.parse(claim_id), this_process()
    if tag is None or me is None or (tag.boot_id, tag.pid_namespace) != (me.boot_id, me.pid_namespace):
        return None
    try:
        running = _stat(str(tag.pid))
    except (OSError, ValueError, IndexError):
        return None
    return tag.pid if running is None or running[1] != tag.start_time else None
