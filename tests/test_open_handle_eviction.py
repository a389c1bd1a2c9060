"""A file open through the mount keeps reading the right bytes when its blob leaves the cache under
it (docs/operations.md: "A file already open keeps reading from its blob (the daemon holds it
open)").

Two ways the blob goes: someone deletes the blob and its snapshot link by hand, and ``mxfs evict
--force`` run by a node that cannot see this node's open files (here: in a PID namespace of its
own, whose ``/proc`` shows none of this node's processes, and through a bind mount of the same
cache, its own path to it, as for another node sharing the cache; the path alone no longer hides
anything, since open files are matched by inode).  Each reader has read part of the file
before; the rest is read after the kernel's cached pages are dropped (``posix_fadvise``,
``madvise``), so it really comes from the daemon, which the daemon's read counter confirms.
Sequential reads, ``pread``s back to the start, and an ``mmap`` are compared with the source.
"""

from __future__ import annotations

import contextlib
import hashlib
import mmap
import os
import random
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.hubserver import FakeHub
from tests.mounting import NO_CONFIG_FILE, MountedFs, requires_fuse, run_cli, wait_until

pytestmark = requires_fuse

MiB = 1 << 20
# A process that sees none of this node's processes: its own PID namespace and /proc.
OTHER_NODE = ["unshare", "--pid", "--fork", "--mount", "--mount-proc"]
SIZE = 8 * MiB
FIRST = 3 * MiB + 12345  # read before the blob goes


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def daemon_read_bytes(mount: MountedFs) -> int:
    """Bytes the daemon has read with read(2)/pread(2) so far (its blob reads among them)."""
    with open(f"/proc/{mount.proc.pid}/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("rchar:"))


def repo_dir(cache: Path, repo: str) -> Path:
    return cache / f"models--{repo.replace('/', '--')}"


def the_blob(cache: Path, repo: str) -> Path:
    link = next(repo_dir(cache, repo).glob("snapshots/*/model.safetensors"))
    return link.parent / os.readlink(link)


def delete_by_hand(mount: MountedFs, repo: str) -> Path:
    """rm the blob and the snapshot link, as a user cleaning up the cache would; the blob's path."""
    link = next(repo_dir(mount.cache_dir, repo).glob("snapshots/*/model.safetensors"))
    blob = the_blob(mount.cache_dir, repo)
    blob.unlink()
    link.unlink()
    return blob


@pytest.fixture
def other_node_view(mount_cache: Path, tmp_path: Path) -> Iterator[Path]:
    """The same cache at another path (a bind mount): what a node sharing it sees."""
    view = tmp_path / "other-node-cache"
    view.mkdir()
    done = subprocess.run(["mount", "--bind", str(mount_cache), str(view)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot bind-mount here: {done.stderr.strip()}")
    try:
        yield view
    finally:
        subprocess.run(["umount", "-l", str(view)], capture_output=True, check=False)


@pytest.fixture
def mount_cache(tmp_path: Path) -> Path:
    cache = tmp_path / "cache"
    cache.mkdir()
    return cache


def cached_model(hub: FakeHub, new_repo_id, mxfs_mount, cache: Path, seed: int) -> tuple[MountedFs, str, bytes]:
    repo = new_repo_id()
    data = random.Random(seed).randbytes(SIZE)
    hub.add_repo(repo, {"config.json": b'{"open": "handle"}', "model.safetensors": data})
    # FUSE's own promise (the daemon holds the blob and answers the reads, as its read counter
    # checks): hand-off off.  Readers of a model handed to the kernel: tests/test_handoff.py.
    mount = mxfs_mount("--no-handoff", cache_dir=cache)
    with open(mount / repo / "model.safetensors", "rb") as f:
        assert sha256(f.read()) == sha256(data)
    wait_until(lambda: os.getxattr(mount / repo, "user.mxfs.status") == b"downloaded", 30, "entry downloaded")
    # The blob is a real file of the right size: the removals below are of something.
    assert the_blob(cache, repo).stat().st_size == SIZE
    return mount, repo, data


def read_on(fd: int, data: bytes, mount: MountedFs) -> None:
    """From FIRST to the end in odd-sized reads, then preads back to the start: all from the daemon."""
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # nothing left in the page cache
    before = daemon_read_bytes(mount)
    parts = []
    while block := os.read(fd, 777_777):
        parts.append(block)
    assert sha256(data[:FIRST] + b"".join(parts)) == sha256(data)
    for offset in (0, 4096, FIRST - 1, SIZE - 1):
        assert os.pread(fd, 65536, offset) == data[offset : offset + 65536], offset
    assert daemon_read_bytes(mount) - before >= (SIZE - FIRST) // 2, "the reads were not answered by the daemon"


def read_mapped(m: mmap.mmap, fd: int, data: bytes, mount: MountedFs) -> None:
    """The whole mapping, after its pages are dropped: every page faults in from the daemon."""
    m.madvise(mmap.MADV_DONTNEED)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    before = daemon_read_bytes(mount)
    assert sha256(m[:]) == sha256(data)
    assert m[SIZE - 10 :] == data[-10:]
    assert daemon_read_bytes(mount) - before >= SIZE // 2, "the mapping was not filled by the daemon"


def allow_vanished(mount: MountedFs, repo: str) -> None:
    """A new open after the blob is gone logs that it fetches it again (expected here)."""
    mount.allowed_log.append(rf"^{re.escape(repo)}@\w+: model\.safetensors vanished from the cache; fetching it again$")


@contextlib.contextmanager
def in_use(path: Path, data: bytes) -> Iterator[tuple[int, mmap.mmap, int]]:
    """A handle that has read the file's start and a mapping that has touched it: the file in use.

    Yields (fd, mapping, the mapping's fd); the mapping and both descriptors are closed after.
    """
    fd = os.open(path, os.O_RDONLY)
    mapped_fd = os.open(path, os.O_RDONLY)
    try:
        assert os.read(fd, FIRST) == data[:FIRST]
        m = mmap.mmap(mapped_fd, 0, prot=mmap.PROT_READ)
        try:
            assert m[:FIRST] == data[:FIRST]
            yield fd, m, mapped_fd
        finally:
            m.close()
    finally:
        os.close(fd)
        os.close(mapped_fd)


def test_blob_deleted_by_hand_under_open_handles(hub: FakeHub, new_repo_id, mxfs_mount, mount_cache: Path) -> None:
    mount, repo, data = cached_model(hub, new_repo_id, mxfs_mount, mount_cache, seed=41)
    allow_vanished(mount, repo)
    path = mount / repo / "model.safetensors"
    with in_use(path, data) as (fd, m, mapped_fd):
        blob = delete_by_hand(mount, repo)
        assert not blob.exists()
        read_on(fd, data, mount)
        read_mapped(m, mapped_fd, data, mount)
    # A new open finds the blob gone and downloads it again, right.
    with open(path, "rb") as f:
        assert sha256(f.read()) == sha256(data)


def test_blob_evicted_by_a_node_that_cannot_see_the_open_handles(
    hub: FakeHub, new_repo_id, mxfs_mount, mount_cache: Path, other_node_view: Path
) -> None:
    mount, repo, data = cached_model(hub, new_repo_id, mxfs_mount, mount_cache, seed=42)
    allow_vanished(mount, repo)
    path = mount / repo / "model.safetensors"
    with in_use(path, data) as (fd, m, mapped_fd):
        blob = the_blob(mount_cache, repo)
        # This node's own `mxfs evict --force` refuses: the daemon holds the blob open.
        here = ["--state-dir", str(mount.state_dir), "--cache-dir", str(mount_cache)]
        refused = run_cli("evict", repo, "--force", *here)
        assert refused.returncode == 1 and "open on this node" in refused.stdout, refused.stdout + refused.stderr
        # Another node's, through its own path to the same cache, does not see it and evicts.
        there = ["--state-dir", str(mount.state_dir), "--cache-dir", str(other_node_view)]
        gone = subprocess.run(
            [*OTHER_NODE, sys.executable, "-m", "mxfs", "evict", repo, "--force", *there],
            capture_output=True,
            text=True,
            env={**os.environ, "MXFS_CONFIG": NO_CONFIG_FILE},
            timeout=120,
            check=False,
        )
        assert gone.returncode == 0 and "evicted" in gone.stdout, gone.stdout + gone.stderr
        assert not blob.exists() and not repo_dir(mount_cache, repo).exists()
        read_on(fd, data, mount)
        read_mapped(m, mapped_fd, data, mount)
    with open(path, "rb") as f:
        assert sha256(f.read()) == sha256(data)
