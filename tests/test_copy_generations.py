"""Copies and their generations (DESIGN section 5, "never silent wrong bytes"), without a mount.

A handle that may hold bytes of a copy that is discarded unverified fails from then on; one
opened later does not; a copy nobody read can be discarded without failing anyone; streams
never write over bytes that are present or that another stream brings (so the bytes readers got
are the bytes that were hashed).
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
import trio
import trio.testing

from mxfs.cache import HubCache
from mxfs.errors import IntegrityError
from mxfs.fetch.download import EntryDownload
from mxfs.fetch.entry import Entry
from mxfs.fetch.files import FileState
from mxfs.fetch.partials import PartialMaps
from mxfs.fetch.planner import Stream
from mxfs.hub import HUB_RETRY
from mxfs.tree import HubFile, RepoTree

SIZE = 1000


def partial_state(tmp_path: Path) -> FileState:
    state = FileState(HubFile("model.safetensors", SIZE, "0" * 40, lfs_sha256="1" * 64))
    state.entry_key = "entry"
    state.partial = tmp_path / "x.incomplete"
    state.partial.write_bytes(b"\0" * SIZE)
    state.present.add(0, 500)
    return state


def test_discarding_an_exposed_copy_taints_handles_open_then_and_only_those(tmp_path: Path) -> None:
    state = partial_state(tmp_path)
    send, receive = trio.open_memory_channel[tuple[str, str]](10)
    state.discards = send
    opened_before = state.generation
    assert state.expose() == opened_before  # a reader is served bytes of the unverified copy
    state.discard_copy()
    opened_after = state.generation
    with pytest.raises(IntegrityError):
        state.check_copy(opened_before)
    state.check_copy(opened_after)
    assert not state.present.total  # the bad copy's bytes are no longer offered
    assert receive.receive_nowait() == ("entry", "model.safetensors")  # the fs drops its pages


def test_discarding_a_copy_nobody_read_taints_nobody(tmp_path: Path) -> None:
    state = partial_state(tmp_path)
    send, receive = trio.open_memory_channel[tuple[str, str]](10)
    state.discards = send
    opened = state.generation
    state.discard_copy()
    state.check_copy(opened)
    with pytest.raises(trio.WouldBlock):
        receive.receive_nowait()


def test_verified_bytes_are_not_exposure(tmp_path: Path) -> None:
    state = partial_state(tmp_path)
    state.verified = True
    opened = state.generation
    state.expose()
    assert not state.exposed
    state.set_blob(tmp_path / "blob", same_inode=True)
    state.check_copy(opened)


def test_a_copy_replaced_before_it_was_checked_taints_its_readers(tmp_path: Path) -> None:
    """Another node's blob (or one found in the cache) replaces the copy readers were served."""
    state = partial_state(tmp_path)
    opened = state.generation
    state.expose()
    state.set_blob(tmp_path / "other-blob")
    with pytest.raises(IntegrityError):
        state.check_copy(opened)
    state.check_copy(state.generation)


def test_our_own_copy_verified_and_renamed_keeps_its_readers(tmp_path: Path) -> None:
    state = partial_state(tmp_path)
    opened = state.generation
    state.expose()
    state.set_blob(tmp_path / "blob", same_inode=True)
    state.check_copy(opened)
    assert not state.exposed


async def test_a_waiting_reader_fails_as_soon_as_its_copy_is_discarded(tmp_path: Path) -> None:
    """A reader waiting for verified bytes (the read that reaches the end) must not wait for the
    next copy to be told it was served bytes of the bad one."""
    state = partial_state(tmp_path)
    opened = state.generation
    state.expose()
    outcome: list[str] = []

    async def reader() -> None:
        try:
            await state.wait_readable(900, SIZE, strict=True, first_generation=opened)
        except IntegrityError:
            outcome.append("EIO")
        else:
            outcome.append("read")

    with trio.fail_after(5):  # a reader left waiting for the next copy would hang here
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            await trio.testing.wait_all_tasks_blocked()
            state.discard_copy()
    assert outcome == ["EIO"]


# -- streams never overwrite -------------------------------------------------------------------


def make_download(tmp_path: Path, state: FileState) -> EntryDownload:
    tree = RepoTree("org/model", "c" * 40, datetime(2024, 1, 1, tzinfo=UTC), (state.file,))
    return EntryDownload(
        Entry(tree),
        {state.file.path: state},
        "claim",
        cache=HubCache(tmp_path / "cache"),
        partial_maps=PartialMaps(tmp_path / "state"),
        client=None,  # type: ignore[arg-type]  # write_limit makes no request
        lease=30.0,
        connections=4,
        chunk_size=1 << 20,
        net_limiter=trio.CapacityLimiter(1),
        io_limiter=trio.CapacityLimiter(1),
        retry=HUB_RETRY,
    )


def test_a_stream_stops_at_present_bytes_and_at_other_streams(tmp_path: Path) -> None:
    state = FileState(HubFile("model.safetensors", SIZE, "0" * 40, lfs_sha256="1" * 64))
    download = make_download(tmp_path, state)
    background = Stream(0, SIZE)
    state.streams.add(background)
    assert download.transfer.write_limit(state, background) == SIZE
    # A reader's on-demand range ahead of the background stream: the background stops where it starts.
    on_demand = Stream(600, 800, on_demand=True)
    state.streams.add(on_demand)
    assert download.transfer.write_limit(state, background) == 600
    assert download.transfer.write_limit(state, on_demand) == 800
    # Bytes that landed (a reader may have been served them) are never written again.
    state.present.add(300, 400)
    assert download.transfer.write_limit(state, background) == 300
    background.pos = 300
    assert download.transfer.write_limit(state, background) == 300  # stop: the byte at pos is present
    # Inside an on-demand range, the background stream yields to it.
    background.pos = 650
    assert download.transfer.write_limit(state, background) == 650
    download.transfer.closed = True
    assert download.transfer.write_limit(state, on_demand) == 0


def test_a_lost_lease_withdraws_the_copy_from_readers_at_once(tmp_path: Path) -> None:
    """A renewal stuck in a frozen registry can keep the attempt from ending for long: from the
    moment the lease is lost, its partial file is offered to nobody, and its late writes land nowhere."""
    state = partial_state(tmp_path)
    download = make_download(tmp_path, state)
    download._fds[state] = -1  # started (the descriptor is not used here)
    opened = state.generation
    state.expose()
    download.withdraw_copies()  # what the claim calls the moment its lease is lost
    assert not state.readable(0, 100, strict=False)
    with pytest.raises(IntegrityError):
        state.check_copy(opened)  # it read bytes nobody will ever verify
    stream = Stream(500, SIZE)
    assert download.transfer.write_limit(state, stream) == 0
