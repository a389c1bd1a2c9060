"""Keeping the daemon's memory near its working set: glibc malloc's retention, bounded and trimmed.

Does nothing where malloc is not glibc's.
"""

from __future__ import annotations

import contextlib
import ctypes
from typing import Protocol

import trio

# glibc mallopt parameters (malloc.h).
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8

IDLE_TRIM_INTERVAL = 1.0


class Activity(Protocol):
    """What tells a busy daemon from an idle one (the fetcher)."""

    bytes_read: int

    def downloads_running(self) -> bool: ...


def bound_malloc_retention() -> None:
    """Keep the daemon's memory near its working set under sustained load.

    glibc gives each worker thread an arena of its own and raises its mmap threshold after every
    large free, so the 1-8 MiB read and hash buffers would pile up in arenas that keep their peak.
    Two arenas and a fixed 4 MiB threshold (larger buffers are mapped and returned at once) bound it.
    """
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None)
        libc.mallopt(_M_ARENA_MAX, 2)
        libc.mallopt(_M_MMAP_THRESHOLD, 4 << 20)


async def return_memory_when_idle(
    activity: Activity, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """After a burst of reads or downloads, give the freed heap back to the system once.

    Two arenas (see :func:`bound_malloc_retention`) still keep freed 1 MiB buffers in the heap,
    fragmented between live objects; ``malloc_trim`` returns those pages.  It runs once per idle
    spell (no bytes read for a tick, no download running), never under load.
    """
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        trim = None
    task_status.started()
    if trim is None:
        return
    last_read, dirty = activity.bytes_read, False
    while True:
        await trio.sleep(IDLE_TRIM_INTERVAL)
        busy = activity.bytes_read != last_read or activity.downloads_running()
        last_read = activity.bytes_read
        if busy:
            dirty = True
        elif dirty:
            dirty = False
            await trio.to_thread.run_sync(trim, 0)
