"""RangeSet against a brute-force model: a set of byte offsets."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from mxfs.ranges import RangeSet

LIMIT = 80

offsets = st.integers(min_value=0, max_value=LIMIT)
intervals = st.tuples(offsets, offsets)


def gaps(model: set[int], start: int, end: int) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for x in range(start, end):
        if x in model:
            continue
        if out and out[-1][1] == x:
            out[-1] = (out[-1][0], x + 1)
        else:
            out.append((x, x + 1))
    return out


def check_invariants(rs: RangeSet, model: set[int]) -> None:
    ranges = rs.as_list()
    for s, e in ranges:
        assert s < e
    # Sorted, disjoint and never adjacent: touching ranges are merged.
    for (_, e1), (s2, _) in itertools.pairwise(ranges):
        assert e1 < s2
    assert {x for s, e in ranges for x in range(s, e)} == model
    assert rs.total == len(model)


@settings(max_examples=300)
@given(adds=st.lists(intervals, max_size=20), queries=st.lists(intervals, min_size=1, max_size=10))
def test_rangeset_matches_model(adds: list[tuple[int, int]], queries: list[tuple[int, int]]) -> None:
    rs = RangeSet()
    model: set[int] = set()
    for start, end in adds:
        rs.add(start, end)
        model.update(range(start, end))
        check_invariants(rs, model)
    for start, end in queries:
        assert rs.covers(start, end) == all(x in model for x in range(start, end)), (rs, start, end)
        assert rs.missing(start, end) == gaps(model, start, end), (rs, start, end)


@given(adds=st.lists(intervals, max_size=20))
def test_constructor_equals_sequential_adds(adds: list[tuple[int, int]]) -> None:
    rs = RangeSet()
    for start, end in adds:
        rs.add(start, end)
    assert RangeSet(adds).as_list() == rs.as_list()


@given(adds=st.lists(intervals, max_size=20), order=st.randoms(use_true_random=False))
def test_order_of_adds_does_not_matter(adds: list[tuple[int, int]], order) -> None:
    shuffled = list(adds)
    order.shuffle(shuffled)
    assert RangeSet(adds).as_list() == RangeSet(shuffled).as_list()


def test_adjacent_ranges_merge() -> None:
    rs = RangeSet()
    rs.add(0, 5)
    rs.add(5, 10)
    assert rs.as_list() == [(0, 10)]
    rs.add(20, 30)
    rs.add(15, 20)
    assert rs.as_list() == [(0, 10), (15, 30)]
    rs.add(10, 15)  # fills the gap exactly: everything becomes one range
    assert rs.as_list() == [(0, 30)]
    assert rs.total == 30


def test_overlapping_and_contained_ranges() -> None:
    rs = RangeSet([(10, 20), (30, 40), (50, 60)])
    rs.add(15, 55)
    assert rs.as_list() == [(10, 60)]
    rs.add(20, 30)  # already inside
    assert rs.as_list() == [(10, 60)]
    rs.add(0, 100)
    assert rs.as_list() == [(0, 100)]


def test_empty_and_reversed_ranges_are_ignored() -> None:
    rs = RangeSet()
    rs.add(5, 5)
    rs.add(9, 3)
    assert rs.as_list() == []
    assert rs.total == 0
    assert rs.covers(4, 4)
    assert rs.covers(7, 2)
    assert rs.missing(4, 4) == []
    assert not rs.covers(0, 1)


def test_covers_and_missing_examples() -> None:
    rs = RangeSet([(0, 10), (20, 30)])
    assert rs.covers(0, 10)
    assert rs.covers(22, 28)
    assert not rs.covers(5, 25)
    assert not rs.covers(10, 11)
    assert not rs.covers(30, 31)
    assert rs.missing(0, 40) == [(10, 20), (30, 40)]
    assert rs.missing(5, 25) == [(10, 20)]
    assert rs.missing(12, 18) == [(12, 18)]
    assert rs.missing(40, 50) == [(40, 50)]
    assert rs.missing(0, 10) == []


def test_large_offsets() -> None:
    big = 1 << 40
    rs = RangeSet()
    rs.add(big, big + (64 << 20))
    rs.add(0, 1 << 20)
    assert rs.covers(big + 5, big + 10)
    assert rs.missing(0, big + (64 << 20)) == [(1 << 20, big)]
    assert rs.total == (1 << 20) + (64 << 20)


def test_clear_and_repr() -> None:
    rs = RangeSet([(1, 2)])
    assert repr(rs) == "RangeSet([(1, 2)])"
    rs.clear()
    assert rs.as_list() == []
    assert rs.total == 0
    assert not rs.covers(1, 2)


def test_contiguous_end() -> None:
    r = RangeSet([(0, 10), (20, 30)])
    assert r.contiguous_end(0) == 10
    assert r.contiguous_end(5) == 10
    assert r.contiguous_end(10) == 10  # not present: nothing contiguous from here
    assert r.contiguous_end(15) == 15
    assert r.contiguous_end(20) == 30
    assert RangeSet().contiguous_end(3) == 3
