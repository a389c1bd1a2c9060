"""A set of byte ranges: which parts of a partially downloaded file are present."""

from __future__ import annotations

import bisect


class RangeSet:
    """Disjoint, sorted half-open ``[start, end)`` intervals, merged as they are added.

    A file being downloaded in parallel ranges fills in out of order; readers ask whether the
    bytes they want are all there.  Both operations are O(log n) plus the merged intervals.
    """

    __slots__ = ("_ends", "_starts")

    def __init__(self, ranges: list[tuple[int, int]] | None = None) -> None:
        self._starts: list[int] = []
        self._ends: list[int] = []
        for start, end in ranges or ():
            self.add(start, end)

    def add(self, start: int, end: int) -> None:
        if end <= start:
            return
        # First interval that could touch [start, end): the one ending at or after start.
        lo = bisect.bisect_left(self._ends, start)
        hi = bisect.bisect_right(self._starts, end)
        if lo < hi:
            start = min(start, self._starts[lo])
            end = max(end, self._ends[hi - 1])
        self._starts[lo:hi] = [start]
        self._ends[lo:hi] = [end]

    def covers(self, start: int, end: int) -> bool:
        """True if every byte of ``[start, end)`` is present (an empty range always is)."""
        if end <= start:
            return True
        i = bisect.bisect_right(self._starts, start) - 1
        return i >= 0 and self._ends[i] >= end

    def contiguous_end(self, pos: int) -> int:
        """The end of the present run of bytes that starts at or covers ``pos`` (``pos`` if none)."""
        i = bisect.bisect_right(self._starts, pos) - 1
        if i >= 0 and self._ends[i] > pos:
            return self._ends[i]
        return pos

    def missing(self, start: int, end: int) -> list[tuple[int, int]]:
        """The sub-ranges of ``[start, end)`` that are not present, in order."""
        gaps: list[tuple[int, int]] = []
        pos = start
        i = max(bisect.bisect_right(self._starts, start) - 1, 0)
        while pos < end and i < len(self._starts):
            s, e = self._starts[i], self._ends[i]
            if e <= pos:
                i += 1
                continue
            if s > pos:
                gaps.append((pos, min(s, end)))
            pos = max(pos, e)
            i += 1
        if pos < end:
            gaps.append((pos, end))
        return gaps

    @property
    def total(self) -> int:
        return sum(e - s for s, e in zip(self._starts, self._ends, strict=True))

    def as_list(self) -> list[tuple[int, int]]:
        return list(zip(self._starts, self._ends, strict=True))

    def clear(self) -> None:
        self._starts.clear()
        self._ends.clear()

    def __repr__(self) -> str:
        return f"RangeSet({self.as_list()!r})"
