"""Readers on a node that is not the download's owner wait only for their bytes (issue 16, item 1).

Two daemons ("nodes") share one cache directory and a real redis-server, as in
``tests/test_multinode.py``.  The owner publishes the durable ranges of its partial files in the
shared cache; the other node's readers read them from the owner's partial file as they land.
The Hub's request log shows that bytes reached the other node while the download still ran.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import re
import signal
import warnings
from pathlib import Path

import huggingface_hub
import pytest

from tests.hubserver import FakeHub
from tests.mounting import MountedFs, requires_fuse, wait_until
from tests.redis_server import RedisServer
from tests.test_multinode import assert_blob_settled, read, start_nodes
from tests.test_wrong_bytes import SAFE, outcome, start_reader

pytestmark = requires_fuse

MiB = 1 << 20
NAME = "model.safetensors"
CHECKSUM_WARNING = "downloaded bytes do not match the Hub's checksum"
TAINT_WARNING = "came from a copy that was discarded unverified"


def blobs(cache: Path, repo: str) -> Path:
    return cache / f"models--{repo.replace('/', '--')}" / "blobs"


def still_downloading(hub: FakeHub, repo: str, size: int) -> bool:
    """The Hub has not sent the whole file yet, and a request for it is still being served."""
    records = hub.requests(repo_id=repo, filename=NAME)
    return hub.bytes_served(repo, NAME) < size and any(not r.done for r in records)


def start_download(hub: FakeHub, nodes: list[MountedFs], repo: str) -> None:
    """The first node opens a file of the entry: it owns the download of every file."""
    assert read(nodes[0] / repo / "config.json") == b"{}"
    assert "downloading 2 files" in nodes[0].log()


def assert_scan_clean(cache: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        info = huggingface_hub.scan_cache_dir(cache)
    assert not info.warnings, info.warnings


def test_reader_on_another_node_reads_the_owners_partial_file(
    hub: FakeHub, new_repo_id, mxfs_mount, tmp_path: Path, redis_server: RedisServer
) -> None:
    redis_server.client().flushdb()
    repo = new_repo_id()
    data = random.Random(160).randbytes(64 * MiB)
    hub.add_repo(repo, {"config.json": b"{}", NAME: data})
    # Ranges on 8 connections, about 4 s for the whole file: the reads below land long before it ends.
    slow = hub.inject("slow", repo_id=repo, filename=NAME, bytes_per_second=2 * MiB)
    owner, other = start_nodes(mxfs_mount, tmp_path, redis_server.url(), 2)
    cache = tmp_path / "shared-cache"
    start_download(hub, [owner, other], repo)
    blob = blobs(cache, repo) / hashlib.sha256(data).hexdigest()
    near_end = len(data) * 9 // 10
    with open(other / repo / NAME, "rb", buffering=0) as f:
        head = os.pread(f.fileno(), MiB, 0)
        tail = os.pread(f.fileno(), MiB, near_end)
        # Both were served from the owner's partial file while it was still being written.
        assert still_downloading(hub, repo, len(data)), hub.requests(repo_id=repo, filename=NAME)
        assert not blob.exists()
        assert head == data[:MiB]
        assert tail == data[near_end : near_end + MiB]
        # The published maps and want files keep the cache clean for huggingface_hub, meanwhile too.
        assert list((cache / f"models--{repo.replace('/', '--')}" / ".mxfs-partials").glob("*.json"))
        assert_scan_clean(cache)
        # The whole file through the same handle: served as it lands, ended by the verified blob.
        assert f.read() == data
    slow.remove()
    assert "downloading" not in other.log()
    # One download: the other node's readers got their bytes through the owner's transfer (a
    # background range stopped where an on-demand one took over may have pushed a little more
    # into its socket).
    assert hub.bytes_served(repo, NAME) <= len(data) * 1.05
    assert read(other / repo / NAME) == data
    assert_blob_settled(cache, repo, data, timeout=10)
    assert not list((cache / f"models--{repo.replace('/', '--')}" / ".mxfs-partials").glob("*.json"))
    assert_scan_clean(cache)


def test_killed_owner_never_gives_the_other_node_wrong_bytes(
    hub: FakeHub, new_repo_id, mxfs_mount, tmp_path: Path, redis_server: RedisServer
) -> None:
    redis_server.client().flushdb()
    repo = new_repo_id()
    data = random.Random(161).randbytes(64 * MiB)
    hub.add_repo(repo, {"config.json": b"{}", NAME: data})
    slow = hub.inject("slow", repo_id=repo, filename=NAME, bytes_per_second=2 * MiB)
    owner, other = start_nodes(mxfs_mount, tmp_path, redis_server.url(), 2, "--lease", "2s")
    other.allowed_log.extend([re.escape(TAINT_WARNING)])
    start_download(hub, [owner, other], repo)
    got = bytearray()
    outcome_ = "correct"
    with open(other / repo / NAME, "rb", buffering=0) as f:
        got += f.read(4 * MiB)
        assert still_downloading(hub, repo, len(data))  # these came from the owner's partial file
        owner.proc.send_signal(signal.SIGKILL)
        owner.proc.wait(10)
        slow.remove()
        try:
            while chunk := f.read(MiB):
                got += chunk
        except OSError as exc:
            assert exc.errno == errno.EIO, exc
            outcome_ = "EIO"
    if outcome_ == "correct":
        assert bytes(got) == data, "the reader completed with wrong bytes"
    else:
        assert got == data[: len(got)]
    # The other node took the download over; a fresh open reads the verified file.
    assert read(other / repo / NAME) == data
    assert "downloading 2 files" in other.log()
    assert_blob_settled(tmp_path / "shared-cache", repo, data, timeout=10)
    owner.cleanup()


@pytest.mark.parametrize("verify", ["fast", "strict"])
def test_corrupt_bytes_on_the_owner_never_complete_a_read_on_the_other_node(
    verify: str, hub: FakeHub, new_repo_id, mxfs_mount, tmp_path: Path, redis_server: RedisServer
) -> None:
    redis_server.client().flushdb()
    repo = new_repo_id()
    data = random.Random(162).randbytes(16 * MiB)
    hub.add_repo(repo, {"config.json": b"{}", NAME: data})
    corrupt = hub.inject("corrupt", offset=3 * MiB + 77, length=8, covering=True, times=1, repo_id=repo, filename=NAME)
    hub.inject("slow", repo_id=repo, filename=NAME, bytes_per_second=2 * MiB)
    owner, other = start_nodes(mxfs_mount, tmp_path, redis_server.url(), 2, "--verify", verify)
    owner.allowed_log.extend([re.escape(CHECKSUM_WARNING), re.escape(TAINT_WARNING)])
    other.allowed_log.extend([re.escape(TAINT_WARNING)])
    start_download(hub, [owner, other], repo)
    path = other / repo / NAME
    patterns = ["seq:1048576", "seq:65536", "mmap", f"pread:{MiB}:5"]
    readers = [start_reader(p, path, data) for p in patterns]
    results = [outcome(r) for r in readers]
    assert corrupt.hits == 1
    assert CHECKSUM_WARNING in owner.log()
    assert "wrong" not in results and set(results) <= SAFE, results
    if verify == "strict":
        # Verified blobs only: nobody there ever saw the bad copy.
        assert results == ["correct"] * len(results), results
        assert TAINT_WARNING not in other.log()
    else:
        # The sequential reader was served the bad copy's first bytes from the owner's partial file.
        assert results[0] == "EIO", results
    assert outcome(start_reader("seq:1048576", path, data)) == "correct"
    assert "downloading" not in other.log()


def test_published_map_is_durable_and_names_the_partial_file(
    hub: FakeHub, new_repo_id, mxfs_mount, tmp_path: Path, redis_server: RedisServer
) -> None:
    """What the owner publishes: the partial file's name, its size, ranges that hold the Hub's bytes."""
    redis_server.client().flushdb()
    repo = new_repo_id()
    data = random.Random(163).randbytes(32 * MiB)
    hub.add_repo(repo, {"config.json": b"{}", NAME: data})
    # Ranges on 8 connections: about 8 s for the file, longer than the 5 s between maps.
    slow = hub.inject("slow", repo_id=repo, filename=NAME, bytes_per_second=MiB // 2)
    (owner,) = start_nodes(mxfs_mount, tmp_path, redis_server.url(), 1)
    assert read(owner / repo / "config.json") == b"{}"
    cache = tmp_path / "shared-cache"
    folder = cache / f"models--{repo.replace('/', '--')}" / ".mxfs-partials"
    map_path = folder / f"{hashlib.sha256(data).hexdigest()}.json"
    wait_until(lambda: map_path.exists(), 20, "a published map")
    published = json.loads(map_path.read_text())
    assert published["size"] == len(data)
    partial = blobs(cache, repo) / published["file"]
    assert partial.name.endswith(".incomplete")
    with open(partial, "rb") as f:
        for start, end in published["ranges"]:
            assert os.pread(f.fileno(), end - start, start) == data[start:end]
    assert_scan_clean(cache)
    slow.remove()
    assert read(owner / repo / NAME) == data
    wait_until(lambda: not map_path.exists(), 10, "the map withdrawn once the blob is published")
