"""The follower's judgement of another node's copies, on real files in a cache directory, without a
mount: which changes keep a reader's handle and which fail it (see mxfs/fetch/follow.py)."""

from __future__ import annotations

import hashlib
import os
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
import trio

from mxfs.cache import HubCache
from mxfs.fetch.entry import Entry
from mxfs.fetch.entrystate import EntryFetch
from mxfs.fetch.files import CopyDiscarded
from mxfs.fetch.follow import Follower
from mxfs.fetch.partials import PartialMap
from mxfs.fetch.shared import SharedPartials
from mxfs.tree import HubFile, RepoTree

REPO = "o/m"
COMMIT = "c" * 40
DATA = os.urandom(1 << 20)
SHA = hashlib.sha256(DATA).hexdigest()


class Node:
    """The owner's side written by hand (a partial file and its published map), and a follower."""

    def __init__(self, root: Path) -> None:
        self.cache = HubCache(root)
        self.cache.ensure_root()
        (self.cache.repo_dir(REPO) / "snapshots").mkdir(parents=True)
        self.shared = SharedPartials(self.cache)
        self.follower = Follower(self.cache, self.shared, "node1", trio.CapacityLimiter(4))
        file = HubFile("model.safetensors", len(DATA), "0" * 40, lfs_sha256=SHA)
        self.ef = EntryFetch(Entry(RepoTree(REPO, COMMIT, datetime(2024, 1, 1, tzinfo=UTC), (file,))))
        self.state = self.ef.states[file.path]
        self.blobs = self.cache.repo_dir(REPO) / "blobs"
        self.blobs.mkdir()

    def write_partial(self, name: str, upto: int, data: bytes = DATA) -> Path:
        path = self.blobs / f"{SHA}.{name}.incomplete"
        with open(path, "r+b" if path.exists() else "wb") as f:
            f.truncate(len(DATA))
            f.seek(0)
            f.write(data[:upto])
        self.shared.publish(REPO, SHA, PartialMap(path.name, len(DATA), [(0, upto)]))
        return path

    async def serve(self, start: int, end: int) -> bytes:
        """What a reader's handle (opened now) reads: as FileSource does, generation checks included."""
        assert self.state.readable(start, end, strict=False)
        self.state.expose()
        fd = self.state.acquire_fd()
        try:
            return os.pread(fd.fd, end - start, start)
        finally:
            fd.release()


@pytest.fixture
def node(tmp_path: Path) -> Node:
    return Node(tmp_path)


def test_published_ranges_are_served_and_the_same_file_as_blob_keeps_the_handle(node: Node) -> None:
    async def main() -> None:
        path = node.write_partial("claim1", 4096)
        first = node.state.generation
        await node.follower.follow_files(node.ef, [node.state])
        assert await node.serve(0, 4096) == DATA[:4096]
        assert not node.state.readable(4096, 8192, strict=False)
        node.write_partial("claim1", 1 << 19)  # more lands: the map grows, the file is reopened
        await node.follower.follow_files(node.ef, [node.state])
        assert await node.serve(4096, 1 << 19) == DATA[4096 : 1 << 19]
        node.write_partial("claim1", len(DATA))
        os.rename(path, node.blobs / SHA)  # verified and published by the owner: the same inode
        node.shared.withdraw(REPO, SHA, path.name)
        await node.follower.follow_files(node.ef, [node.state])
        assert node.state.complete
        node.state.check_copy(first)  # the handle goes on: what it read was verified

    trio.run(main)


@pytest.mark.parametrize("change", ["new file", "map withdrawn", "other blob", "ranges shrank"])
def test_any_other_end_of_a_copy_that_was_read_fails_the_handle(node: Node, change: str) -> None:
    async def main() -> None:
        path = node.write_partial("claim1", 1 << 19)
        first = node.state.generation
        await node.follower.follow_files(node.ef, [node.state])
        assert await node.serve(0, 4096) == DATA[:4096]
        if change == "new file":  # the copy failed its checksum (or another node took over)
            path.unlink()
            node.write_partial("claim1-1", 4096)
        elif change == "map withdrawn":  # the owner's attempt ended without verifying it
            node.shared.withdraw(REPO, SHA, path.name)
            path.unlink()
        elif change == "other blob":
            (node.blobs / SHA).write_bytes(DATA)
            node.shared.withdraw(REPO, SHA, path.name)
        else:
            node.shared.publish(REPO, SHA, PartialMap(path.name, len(DATA), [(0, 4096)]))
        await node.follower.follow_files(node.ef, [node.state])
        if change == "other blob":
            assert not node.state.complete  # left to the fetcher's scan, which discards the copy
            node.state.set_blob(node.blobs / SHA)
        with pytest.raises(CopyDiscarded):
            node.state.check_copy(first)

    trio.run(main)


def test_a_copy_nobody_read_is_replaced_without_failing_anyone(node: Node) -> None:
    async def main() -> None:
        path = node.write_partial("claim1", 4096)
        first = node.state.generation
        await node.follower.follow_files(node.ef, [node.state])
        path.unlink()
        node.write_partial("claim2", 8192)
        await node.follower.follow_files(node.ef, [node.state])
        node.state.check_copy(first)
        assert await node.serve(0, 8192) == DATA[:8192]

    trio.run(main)


def test_a_renamed_file_whose_blob_is_not_visible_yet_is_not_dropped(node: Node) -> None:
    """A network filesystem's lookup cache may hide the new blob name for a while."""

    async def main() -> None:
        path = node.write_partial("claim1", 4096)
        first = node.state.generation
        await node.follower.follow_files(node.ef, [node.state])
        await node.serve(0, 4096)
        hidden = node.blobs.parent / "elsewhere"
        os.rename(path, hidden)  # gone by its name, not removed (the fd's inode keeps a link)
        node.shared.withdraw(REPO, SHA, path.name)
        await node.follower.follow_files(node.ef, [node.state])
        node.state.check_copy(first)
        assert node.state.remote is not None

    trio.run(main)


def test_want_files_reach_the_owner_and_go_when_nobody_waits(node: Node) -> None:
    node.shared.want(REPO, SHA, "node1", [(10, 20)])
    node.shared.want(REPO, SHA, "node2", [(30, 40)])
    assert sorted(node.shared.wants(REPO, {SHA})[SHA]) == [(10, 20), (30, 40)]
    old = node.shared.folder(REPO) / f"{SHA}.node2.want"
    stale = time.time() - 60
    os.utime(old, (stale, stale))  # a dead reader's
    assert node.shared.wants(REPO, {SHA}) == {SHA: [(10, 20)]}
    node.shared.unwant(REPO, SHA, "node1")
    assert node.shared.wants(REPO, {SHA}) == {}


def test_withdraw_leaves_another_writers_map(node: Node) -> None:
    node.write_partial("claim2", 4096)
    node.shared.withdraw(REPO, SHA, f"{SHA}.claim1.incomplete")
    assert node.shared.load(REPO, SHA) is not None
    node.shared.withdraw(REPO, SHA, f"{SHA}.claim2.incomplete")
    assert node.shared.load(REPO, SHA) is None
