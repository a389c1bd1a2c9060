"""The background range queue (mxfs/fetch/plan.py): order, waited files first, and its cost."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from mxfs.fetch.plan import Chunk, ChunkQueue, chunk_size_for

MiB = 1 << 20


def drain(queue: ChunkQueue[str], waited: dict[str, set[int]] | None = None) -> list[tuple[str, int]]:
    out = []
    while (chunk := queue.pop(waited)) is not None:
        out.append((chunk.file, chunk.start))
    return out


def test_small_files_first_then_by_path_then_offset() -> None:
    queue: ChunkQueue[str] = ChunkQueue()
    queue.push_file("weights", 30, "model.safetensors", 10)
    queue.push_file("config", 5, "config.json", 10)
    queue.push_file("tok", 5, "a/tokenizer.json", 10)
    queue.push_file("empty", 0, "zzz", 10)
    assert len(queue) == 6
    assert drain(queue) == [("empty", 0), ("tok", 0), ("config", 0), ("weights", 0), ("weights", 10), ("weights", 20)]
    assert len(queue) == 0


def test_a_waited_file_goes_first_and_the_range_with_the_wanted_offset_first() -> None:
    queue: ChunkQueue[str] = ChunkQueue()
    queue.push_file("small", 5, "config.json", 10)
    queue.push_file("big", 40, "model.safetensors", 10)
    chunk = queue.pop({"big": {25}})
    assert (chunk.file, chunk.start) == ("big", 20)
    chunk = queue.pop({"big": {25}})  # the wanted range is taken: the file's first one left
    assert (chunk.file, chunk.start) == ("big", 0)
    assert drain(queue) == [("small", 0), ("big", 10), ("big", 30)]


def test_a_wanted_offset_belongs_to_the_half_open_range_that_starts_there() -> None:
    queue: ChunkQueue[str] = ChunkQueue()
    queue.push_file("m", 300, "m.bin", 100)
    assert queue.pop({"m": {100}}).start == 100  # [100, 200), not [0, 100)


def test_a_waited_file_beats_smaller_files() -> None:
    queue: ChunkQueue[str] = ChunkQueue()
    queue.push_file("huge", 10**12, "huge.bin", 10**11)
    queue.push_file("tiny", 1, "tiny.txt", 10)
    assert queue.pop().file == "tiny"
    queue.push_file("tiny2", 1, "tiny2.txt", 10)
    assert queue.pop({"huge": {5 * 10**11}}).start == 5 * 10**11


def test_dropping_a_file_removes_its_ranges() -> None:
    queue: ChunkQueue[str] = ChunkQueue()
    queue.push_file("a", 30, "a", 10)
    queue.push_file("b", 30, "b", 10)
    assert queue.pop() is not None  # a@0
    assert [c.start for c in queue.drop_file("a")] == [10, 20]
    assert drain(queue) == [("b", 0), ("b", 10), ("b", 20)]


@settings(max_examples=200, deadline=None)
@given(
    files=st.lists(st.tuples(st.integers(0, 100), st.sampled_from("abcdef")), min_size=1, max_size=8),
    step=st.integers(1, 30),
    waits=st.lists(st.tuples(st.integers(0, 7), st.integers(0, 100)), max_size=5),
)
def test_pop_is_the_minimum_of_the_old_priority_order(
    files: list[tuple[int, str]], step: int, waits: list[tuple[int, int]]
) -> None:
    """Same order as the scan it replaces: (waited file, holds a wanted offset, size, path, offset)."""
    queue: ChunkQueue[int] = ChunkQueue()
    reference: list[Chunk[int]] = []
    for index, (size, path) in enumerate(files):
        queue.push_file(index, size, path, step)
        reference += queue.queued(index)
    waited: dict[int, set[int]] = {}
    for index, offset in waits:
        if index < len(files):
            waited.setdefault(index, set()).add(offset)
    order = {id(c): n for n, c in enumerate(reference)}

    def old_priority(c: Chunk[int]) -> tuple:
        offsets = waited.get(c.file)
        return (0 if offsets is not None else 1, 0 if offsets and c.holds_any(offsets) else 1, c.size, c.path,
                c.start, order[id(c)])  # fmt: skip

    left = list(reference)
    while left:
        chunk = queue.pop(waited)
        expected = min(left, key=old_priority)
        assert old_priority(chunk)[:5] == old_priority(expected)[:5]
        left.remove(chunk)
    assert queue.pop(waited) is None


class CountingPath(str):
    """A path that counts how often the queue compares it: the cost of picking, without a clock."""

    comparisons = 0

    def __lt__(self, other: str) -> bool:
        CountingPath.comparisons += 1
        return str.__lt__(self, other)


def test_picking_is_logarithmic_not_a_scan_of_the_whole_queue() -> None:
    """The old min()+remove scanned every queued range per pick: quadratic over a 5000-file repo."""

    def comparisons_per_pick(files: int) -> float:
        queue: ChunkQueue[int] = ChunkQueue()
        for i in range(files):
            queue.push_file(i, 1000, CountingPath(f"f{(i * 7919) % files:06d}"), 1000)
        CountingPath.comparisons = 0
        while queue.pop({}) is not None:
            pass
        return CountingPath.comparisons / files

    small, large = comparisons_per_pick(1_000), comparisons_per_pick(10_000)
    # log2: about 1.3x; a scan would be 10x.
    assert large < small * 2, (small, large)


def test_chunk_size_for() -> None:
    assert chunk_size_for(1 << 30, 8, 64 * MiB) == 32 * MiB  # 1 GiB / (8 x 4), aligned
    assert chunk_size_for(10 * MiB, 8, 64 * MiB) == 8 * MiB  # the floor
    assert chunk_size_for(100 << 30, 8, 64 * MiB) == 64 * MiB  # the ceiling
    assert chunk_size_for(10 * MiB, 8, 4 * MiB) == 4 * MiB  # a configured largest below the floor
