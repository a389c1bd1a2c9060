"""Which background range of an entry goes next: a pure queue, no I/O and no trio.

The owner splits every file it downloads into ranges (:func:`chunk_size_for`) and its workers,
``connections`` of them, each take the next range when they are free.  The order:

1. ranges of files that readers wait on, the range that holds a wanted offset first;
2. then smaller files before larger ones (a model's config and tokenizer before its weights),
   by path, by offset.

Picking is O(log n) in the ranges queued (a heap for the static order) plus the few files readers
wait on, so an entry of thousands of files costs a download time linear in its size.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Collection, Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Generic, TypeVar

F = TypeVar("F", bound=Hashable)

# Range sizes of the background download: several per connection (see chunk_size_for).
CHUNKS_PER_CONNECTION = 4
MIN_CHUNK = 8 << 20
ALIGN = 1 << 20


def chunk_size_for(size: int, connections: int, largest: int) -> int:
    """The range size for one file: at most ``largest``, small enough for ``CHUNKS_PER_CONNECTION``.

    The connections stream the lowest ranges at once, so a sequential reader lags one window
    (connections x range) behind the download: a window as big as the file would make a reader
    of a 512 MiB file wait for all of it.  The floor keeps the per-request overhead (a redirect,
    a TLS handshake) small.
    """
    wanted = -(-size // (connections * CHUNKS_PER_CONNECTION))
    wanted = -(-wanted // ALIGN) * ALIGN
    return max(min(largest, wanted), min(largest, MIN_CHUNK))


@dataclass(eq=False)
class Chunk(Generic[F]):
    """One background range ``[start, end)`` of ``file`` (``size`` and ``path`` order the queue)."""

    file: F
    start: int
    end: int
    size: int = 0
    path: str = ""
    taken: bool = field(default=False, repr=False)

    def holds_any(self, offsets: Iterable[int]) -> bool:
        return any(self.start <= offset < self.end for offset in offsets)


class ChunkQueue(Generic[F]):
    """The background ranges not yet taken by a worker, and which one goes next."""

    def __init__(self) -> None:
        self._heap: list[tuple[int, str, int, int, Chunk[F]]] = []
        self._by_file: dict[F, list[Chunk[F]]] = {}
        self._order = itertools.count()  # ties: first queued first
        self._left = 0

    def __len__(self) -> int:
        return self._left

    def push_file(self, file: F, size: int, path: str, step: int) -> int:
        """Queue ``file`` cut into ranges of ``step`` bytes (one empty range for an empty file).

        Returns how many ranges were queued.
        """
        starts = range(0, size, step) if size else [0]
        chunks = [Chunk(file, start, min(start + step, size), size, path) for start in starts]
        return self.push(chunks)

    def push(self, chunks: Iterable[Chunk[F]]) -> int:
        count = 0
        for chunk in chunks:
            self._by_file.setdefault(chunk.file, []).append(chunk)
            heapq.heappush(self._heap, (chunk.size, chunk.path, chunk.start, next(self._order), chunk))
            count += 1
        self._left += count
        return count

    def queued(self, file: F) -> list[Chunk[F]]:
        """The ranges of ``file`` still queued, in offset order."""
        return list(self._by_file.get(file, ()))

    def drop_file(self, file: F) -> list[Chunk[F]]:
        """Take every queued range of ``file`` out of the queue (another plan replaces them)."""
        chunks = self._by_file.pop(file, [])
        for chunk in chunks:
            chunk.taken = True
        self._left -= len(chunks)
        return chunks

    def pop(self, waited: Mapping[F, Collection[int]] | None = None) -> Chunk[F] | None:
        """The next range: see the module docstring. ``waited``: file -> offsets readers wait for."""
        best: Chunk[F] | None = None
        best_key: tuple[int, int, str, int] | None = None
        for file, offsets in (waited or {}).items():
            chunks = self._by_file.get(file)
            if not chunks:
                continue
            pick = next((c for c in chunks if c.holds_any(offsets)), None)
            key = (0, pick.size, pick.path, pick.start) if pick is not None else None
            if pick is None:
                pick = chunks[0]
                key = (1, pick.size, pick.path, pick.start)
            assert key is not None
            if best_key is None or key < best_key:
                best, best_key = pick, key
        if best is None:
            while self._heap:
                chunk = heapq.heappop(self._heap)[-1]
                if not chunk.taken:
                    best = chunk
                    break
        if best is None:
            return None
        self._take(best)
        return best

    def _take(self, chunk: Chunk[F]) -> None:
        chunk.taken = True  # its heap item is skipped when it comes up
        chunks = self._by_file[chunk.file]
        chunks.remove(chunk)
        if not chunks:
            del self._by_file[chunk.file]
        self._left -= 1


__all__ = ["ALIGN", "Chunk", "ChunkQueue", "chunk_size_for"]
