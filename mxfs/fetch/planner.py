"""The planner: which ranges of an entry to request next, and where each request must stop.

Pure: no I/O, no trio, no clock (callers pass ``now``).  It is told the present ranges, the
ranges in flight (:class:`Stream`), where readers wait and the budget (``connections``), and it
answers; the download carries its answers out.  Every read-ahead, on-demand window and range-size
knob of the fetch package lives here (or in :mod:`.plan`, the background queue it drives).

* Background ranges: every file cut by :func:`.plan.chunk_size_for`, taken in the queue's order
  (files readers wait on first).  A server that ignores ``Range`` gets one request per file.
* On-demand windows: a reader waiting for bytes that no stream is about to bring gets a request
  of its own (:meth:`EntryPlan.on_demand`), aligned, growing for a reader that keeps asking
  where its previous window ended.
* Write limits: two streams never write the same byte, and no stream writes over a present byte
  (a reader may have been served it): :func:`write_limit`, :func:`unclaimed`.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Hashable, Iterable, Mapping
from dataclasses import dataclass
from typing import Generic, TypeVar

from mxfs.fetch.plan import ALIGN, Chunk, ChunkQueue, chunk_size_for
from mxfs.ranges import RangeSet

F = TypeVar("F", bound=Hashable)

# A reader whose bytes are this close ahead of a stream's position waits for that stream; further
# away, they are fetched on demand.  A window inside a range whose request is out cuts that
# request short, and what its server had already sent past the cut is wasted (a socket's worth,
# about 1 MiB on loopback, a bandwidth-delay product on a network): at 4 MiB, 16 readers at
# scattered offsets of a file in 8 MiB ranges cut every range and the Hub sent 1.13x the file;
# at 8 MiB (one default-size range) it sends each byte once, and a reader waits at most for
# 8 MiB of one connection (40 ms at 200 MiB/s) before its bytes arrive.
NEAR = 8 << 20
# On-demand windows are aligned, and grow (up to the maximum) for a reader that keeps asking
# right where the previous window ended: a sequential reader then needs fewer requests.
ON_DEMAND_ALIGN = ALIGN
ON_DEMAND_MIN = 2 << 20
ON_DEMAND_MAX = 32 << 20
# After an on-demand request fails, leave the bytes to the background download for a while.
ON_DEMAND_BACKOFF = 1.0


@dataclass(eq=False)
class Stream:
    """One HTTP range answer being written into the partial file: it has reached ``pos`` of ``end``.

    The planner looks at the streams to decide whether the bytes a reader waits for are about to
    arrive or must be fetched on demand, and streams look at each other (through
    :func:`write_limit`) so two never write the same bytes.
    """

    pos: int
    end: int
    on_demand: bool = False
    # Fetching the whole file from ``pos`` on, because the server ignores Range: it claims
    # ``[pos, end)`` like an on-demand stream.
    whole: bool = False

    @property
    def claims_ahead(self) -> bool:
        """Other streams leave ``[pos, end)`` to this one."""
        return self.on_demand or self.whole

    def will_reach(self, offset: int, within: int) -> bool:
        return self.pos <= offset < self.end and offset - self.pos <= within

    def hands_over_at(self, offset: int, within: int) -> bool:
        """A background range about to end just before ``offset``: its worker goes on with the
        next range, which a reader waiting there puts first in line, so a reader following the
        download across a range boundary need not open a request of its own."""
        return not self.claims_ahead and self.end <= offset and offset - self.pos <= within


def write_limit(present: RangeSet, streams: Iterable[Stream], stream: Stream) -> int:
    """Where ``stream`` must stop writing: its end, the next present byte, or the next byte
    another stream writes. At or below its position: stop now."""
    pos = stream.pos
    if pos >= stream.end:
        return pos
    gap = present.missing(pos, stream.end)
    if not gap or gap[0][0] != pos:
        return pos  # the byte at pos is present already
    limit = gap[0][1]
    for other in streams:
        if other is stream:
            continue
        if other.pos > pos:
            limit = min(limit, other.pos)
        elif other.claims_ahead and not stream.claims_ahead and other.pos <= pos < other.end:
            # A background stream yields to an on-demand one that has the bytes ahead in hand.
            return pos
    return limit


def unclaimed(present: RangeSet, streams: Iterable[Stream], stream: Stream, length: int) -> list[tuple[int, int]]:
    """The parts of the next ``length`` bytes of a whole-file ``stream`` it may write: neither
    present nor ahead of another stream."""
    claimed = RangeSet([(o.pos, o.end) for o in streams if o is not stream and o.pos < o.end])
    end = stream.pos + length
    return [piece for gap in present.missing(stream.pos, end) for piece in claimed.missing(*gap)]


def minus_on_demand(gaps: list[tuple[int, int]], streams: Iterable[Stream]) -> list[tuple[int, int]]:
    """``gaps`` without the bytes that on-demand (or whole-file) requests still have to write."""
    claimed = RangeSet([(stream.pos, stream.end) for stream in streams if stream.claims_ahead])
    if not claimed.total:
        return gaps
    return [piece for start, end in gaps for piece in claimed.missing(start, end)]


def on_demand_window(
    present: RangeSet,
    streams: Collection[Stream],
    size: int,
    start: int,
    end: int,
    last: tuple[int, int] | None = None,
) -> tuple[int, int, int] | None:
    """The window to request for a reader waiting for ``[start, end)`` of a file of ``size``
    bytes, or None when the bytes are present or a stream is about to bring them.

    ``last``: (end, size) of the file's previous window.  Returns (lo, hi, window size).
    """
    gaps = present.missing(start, end)
    if not gaps:
        return None
    first = gaps[0][0]
    if any(stream.will_reach(first, NEAR) or stream.hands_over_at(first, NEAR) for stream in streams):
        return None
    # Start at the aligned offset below, unless bytes there are present already or another
    # stream brings them (a window over them would cut that stream short: what its server had
    # sent past the cut is wasted).
    taken = RangeSet(present.as_list())
    for stream in streams:
        if stream.pos < min(stream.end, first):
            taken.add(stream.pos, min(stream.end, first))
    lo = taken.missing(first - first % ON_DEMAND_ALIGN, first + 1)[-1][0]
    window = ON_DEMAND_MIN
    if last is not None and last[0] == lo:
        window = min(last[1] * 2, ON_DEMAND_MAX)
    hi = min(max(lo + window, -(-end // ON_DEMAND_ALIGN) * ON_DEMAND_ALIGN), size)
    hi = present.missing(lo, hi)[0][1]  # up to the next present byte
    for stream in streams:
        if lo < stream.pos < hi:
            hi = stream.pos  # that stream writes from there on
    return lo, hi, window


class EntryPlan(Generic[F]):
    """The plan of one entry's download: its background queue, and per file what is left and
    what the on-demand windows were.  ``F``: the caller's file handle (hashable)."""

    def __init__(self, connections: int, chunk_size: int) -> None:
        self.connections = connections
        self.chunk_size = chunk_size
        self._queue: ChunkQueue[F] = ChunkQueue()
        # Per file, how many of its ranges are not finished.
        self._pending: dict[F, int] = {}
        # Per file: (end, size) of the last on-demand window, and when on-demand may be tried again.
        self._last_window: dict[F, tuple[int, int]] = {}
        self._paused_until: dict[F, float] = {}
        self._paths: dict[F, tuple[int, str]] = {}

    def __len__(self) -> int:
        """Background ranges not taken yet."""
        return len(self._queue)

    def add_file(self, file: F, size: int, path: str, *, one_request: bool = False) -> None:
        """Queue ``file`` in ranges (``one_request``: in one, for a server that ignores Range)."""
        self._paths[file] = (size, path)
        step = max(size, 1) if one_request else chunk_size_for(size, self.connections, self.chunk_size)
        self._pending[file] = self._queue.push_file(file, size, path, step)

    def next_chunk(self, waited: Mapping[F, Collection[int]] | None = None) -> Chunk[F] | None:
        """The next background range; ``waited``: file -> offsets readers wait for."""
        return self._queue.pop(waited)

    def chunk_done(self, file: F) -> bool:
        """One of the file's ranges is finished; True if it was its last."""
        self._pending[file] -= 1
        return self._pending[file] == 0

    def fetched_whole(self, file: F) -> None:
        """A request for ``file`` brought its whole body (the server ignores Range): that stream
        brings the file, and every file not started yet is fetched in one request too."""
        for other, pending in list(self._pending.items()):
            if other != file and pending > 1 and len(self._queue.queued(other)) == pending:
                self._queue.drop_file(other)
                self.add_file(other, *self._paths[other], one_request=True)
        self._pending[file] -= len(self._queue.drop_file(file))

    def on_demand(
        self, file: F, present: RangeSet, streams: Collection[Stream], start: int, end: int, now: float
    ) -> Stream | None:
        """A stream to start for a reader waiting for ``[start, end)`` of ``file``, or None."""
        if now < self._paused_until.get(file, -math.inf):
            return None
        size = self._paths[file][0]
        window = on_demand_window(present, streams, size, start, end, self._last_window.get(file))
        if window is None:
            return None
        lo, hi, window_size = window
        self._last_window[file] = (hi, window_size)
        return Stream(lo, hi, on_demand=True)

    def on_demand_failed(self, file: F, now: float) -> None:
        """Leave the file's bytes to the background download for ``ON_DEMAND_BACKOFF``."""
        self._paused_until[file] = now + ON_DEMAND_BACKOFF

    def forget(self, file: F) -> None:
        """The file is published: keep nothing of it (a repo of thousands of files must not hold
        bookkeeping for each until the whole entry is done)."""
        for per_file in (self._pending, self._last_window, self._paused_until, self._paths):
            per_file.pop(file, None)  # type: ignore[attr-defined]


__all__ = [
    "NEAR",
    "ON_DEMAND_ALIGN",
    "ON_DEMAND_BACKOFF",
    "ON_DEMAND_MAX",
    "ON_DEMAND_MIN",
    "EntryPlan",
    "Stream",
    "minus_on_demand",
    "on_demand_window",
    "unclaimed",
    "write_limit",
]
