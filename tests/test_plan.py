"""The planner: the background range queue (mxfs/fetch/plan.py: order, waited files first, its
cost) and mxfs/fetch/planner.py (on-demand windows, write limits, the entry's plan)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mxfs.fetch.plan import Chunk, ChunkQueue, chunk_size_for
from mxfs.fetch.planner import (
    NEAR,
    ON_DEMAND_BACKOFF,
    ON_DEMAND_MAX,
    ON_DEMAND_MIN,
    EntryPlan,
    Stream,
    on_demand_window,
    write_limit,
)
from mxfs.ranges import RangeSet

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


# -- the planner (mxfs/fetch/planner.py): on-demand windows and write limits ---------------------

ON = True  # an on-demand stream in the tables below


@pytest.mark.parametrize(
    ("present", "streams", "wait", "last", "expected"),
    [
        # Nothing present, nothing in flight: an aligned window of ON_DEMAND_MIN from the MiB below.
        ([], [], (5 * MiB + 10, 5 * MiB + 20), None, (5 * MiB, 7 * MiB, ON_DEMAND_MIN)),
        # A wait longer than the minimum window: up to the aligned end of the wait.
        ([], [], (0, 5 * MiB + 1), None, (0, 6 * MiB, ON_DEMAND_MIN)),
        # The bytes are present: no request.
        ([(0, 8 * MiB)], [], (MiB, 2 * MiB), None, None),
        # A background stream that will reach the bytes within NEAR: the reader waits for it.
        ([], [(4 * MiB, 16 * MiB, False)], (5 * MiB, 5 * MiB + 1), None, None),
        # ...but not one further than NEAR behind them.
        ([], [(0, 16 * MiB, False)], (10 * MiB, 10 * MiB + 1), None, (10 * MiB, 12 * MiB, ON_DEMAND_MIN)),
        # A background range ending just before the wait hands over to the next range: wait.
        ([], [(MiB, 2 * MiB, False)], (2 * MiB, 2 * MiB + 1), None, None),
        # Present bytes below the wait in its MiB: start at the first missing byte.
        (
            [(4 * MiB, 4 * MiB + 100)],
            [],
            (4 * MiB + 200, 4 * MiB + 300),
            None,
            (4 * MiB + 100, 6 * MiB + 100, ON_DEMAND_MIN),
        ),
        # Present bytes ahead: the window stops there.
        ([(6 * MiB, 7 * MiB)], [], (5 * MiB, 5 * MiB + 1), None, (5 * MiB, 6 * MiB, ON_DEMAND_MIN)),
        # Another stream writes from inside the window on: the window stops where it is.
        ([], [(6 * MiB, 9 * MiB, ON)], (5 * MiB, 5 * MiB + 1), None, (5 * MiB, 6 * MiB, ON_DEMAND_MIN)),
        # A reader asking where its last window ended gets a window twice as large...
        ([], [], (7 * MiB, 7 * MiB + 1), (7 * MiB, 2 * MiB), (7 * MiB, 11 * MiB, 4 * MiB)),
        # ...up to the maximum.
        ([], [], (0, 1), (0, ON_DEMAND_MAX), (0, ON_DEMAND_MAX, ON_DEMAND_MAX)),
        # Never past the end of the file.
        ([], [], (63 * MiB, 63 * MiB + 1), None, (63 * MiB, 64 * MiB, ON_DEMAND_MIN)),
    ],
)
def test_on_demand_window(
    present: list[tuple[int, int]],
    streams: list[tuple[int, int, bool]],
    wait: tuple[int, int],
    last: tuple[int, int] | None,
    expected: tuple[int, int, int] | None,
) -> None:
    flying = [Stream(pos, end, on_demand=on) for pos, end, on in streams]
    assert on_demand_window(RangeSet(present), flying, 64 * MiB, *wait, last) == expected


def test_write_limit_table() -> None:
    present = RangeSet([(300, 400)])
    background, on_demand = Stream(0, 1000), Stream(600, 800, on_demand=True)
    streams = [background, on_demand]
    assert write_limit(present, streams, background) == 300  # the next present byte
    assert write_limit(present, streams, on_demand) == 800  # its end
    background.pos = 300
    assert write_limit(present, streams, background) == 300  # stop: the byte at pos is present
    background.pos = 400
    assert write_limit(present, streams, background) == 600  # up to the on-demand stream
    background.pos = 650
    assert write_limit(present, streams, background) == 650  # inside an on-demand range: yield to it


stream_sets = st.lists(
    st.tuples(st.integers(0, 200), st.integers(1, 100), st.booleans()).map(lambda t: Stream(t[0], t[0] + t[1], t[2])),
    max_size=5,
)
range_sets = st.lists(st.tuples(st.integers(0, 250), st.integers(1, 50)), max_size=5).map(
    lambda ranges: RangeSet([(s, s + n) for s, n in ranges])
)


@settings(max_examples=300, deadline=None)
@given(present=range_sets, streams=stream_sets)
def test_a_stream_never_writes_a_present_byte_or_ahead_of_another(present: RangeSet, streams: list[Stream]) -> None:
    """No byte is written twice: between its position and its limit a stream finds neither a
    present byte nor the position of another stream (whose bytes from there on are its own)."""
    for stream in streams:
        limit = write_limit(present, streams, stream)
        if limit <= stream.pos:
            continue
        assert limit <= stream.end
        assert present.missing(stream.pos, limit) == [(stream.pos, limit)]
        for other in streams:
            if other is not stream:
                assert not stream.pos < other.pos < limit
                # A background stream never writes inside what an on-demand stream claims ahead.
                if other.claims_ahead and not stream.claims_ahead:
                    assert not other.pos <= stream.pos < other.end


@settings(max_examples=300, deadline=None)
@given(
    present=range_sets,
    streams=stream_sets,
    start=st.integers(0, 299),
    length=st.integers(1, 50),
    last=st.none() | st.tuples(st.integers(0, 300), st.sampled_from([ON_DEMAND_MIN, ON_DEMAND_MAX])),
)
def test_an_on_demand_window_brings_the_first_missing_byte_and_no_present_one(
    present: RangeSet, streams: list[Stream], start: int, length: int, last: tuple[int, int] | None
) -> None:
    size = 300
    end = min(start + length, size)
    window = on_demand_window(present, streams, size, start, end, last)
    gaps = present.missing(start, end)
    if window is None:
        # Nothing to fetch, or a stream is about to bring the first missing byte.
        assert not gaps or any(s.will_reach(gaps[0][0], NEAR) or s.hands_over_at(gaps[0][0], NEAR) for s in streams)
        return
    lo, hi, _ = window
    assert lo <= gaps[0][0] < hi <= size
    assert present.missing(lo, hi) == [(lo, hi)]  # no present byte is fetched again
    assert not any(lo < s.pos < hi for s in streams)  # nor a byte another stream writes from its position on


def test_the_entry_plan_replans_for_a_server_that_ignores_range() -> None:
    plan: EntryPlan[str] = EntryPlan(connections=2, chunk_size=8 * MiB)
    plan.add_file("big", 64 * MiB, "big.bin")
    plan.add_file("other", 64 * MiB, "other.bin")
    first = plan.next_chunk()
    assert first is not None and first.file == "big"
    plan.fetched_whole("big")  # its first request brought the whole body
    # The whole-body stream brings "big": its other ranges are gone, one range is left to finish.
    assert plan.chunk_done("big")
    # "other" is not started: one request for the whole file now.
    chunk = plan.next_chunk()
    assert chunk is not None and (chunk.file, chunk.start, chunk.end) == ("other", 0, 64 * MiB)
    assert plan.next_chunk() is None


def test_the_entry_plan_backs_off_on_demand_after_a_failure() -> None:
    plan: EntryPlan[str] = EntryPlan(connections=2, chunk_size=8 * MiB)
    plan.add_file("f", 64 * MiB, "f.bin")
    assert plan.on_demand("f", RangeSet(), [], 10 * MiB, 10 * MiB + 1, now=0.0) is not None
    plan.on_demand_failed("f", now=1.0)
    assert plan.on_demand("f", RangeSet(), [], 20 * MiB, 20 * MiB + 1, now=1.0 + ON_DEMAND_BACKOFF / 2) is None
    assert plan.on_demand("f", RangeSet(), [], 20 * MiB, 20 * MiB + 1, now=1.0 + ON_DEMAND_BACKOFF) is not None
