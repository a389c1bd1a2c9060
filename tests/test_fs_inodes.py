"""The mount's inode table follows the kernel: lookups add references, FORGET drops them, so a
long-running daemon keeps in memory only the names the kernel still holds.

The unit tests call the ``Operations`` methods directly (with a catalog stand-in); the last test
looks names up through a real mount and lets the kernel forget them (``drop_caches``).
"""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path

import pyfuse3

from mxfs.fetch import Entry
from mxfs.fs import MxfsOperations
from mxfs.names import ModelRef
from mxfs.tree import HubFile, RepoTree
from tests.hubserver import FakeHub
from tests.mounting import MountedFs, requires_fuse, wait_until
from tests.scrape import free_port, http_scrape, parse, value

ROOT = pyfuse3.ROOT_INODE
COMMIT = "a" * 40


class Fetcher:
    """Just what lookups of model directories need: one fixed tree per repo."""

    async def lookup(self, ref: ModelRef) -> Entry:
        files = (HubFile("config.json", 2, "b" * 40), HubFile("sub/model.bin", 10, "c" * 40, "d" * 64))
        return Entry(RepoTree(ref.repo_id, COMMIT, datetime(2026, 1, 1, tzinfo=UTC), files))

    def copy_generation(self, entry: Entry, path: str) -> int:
        return 0


def operations() -> MxfsOperations:
    return MxfsOperations(Fetcher())  # type: ignore[arg-type]


async def lookup(ops: MxfsOperations, parent: int, name: str) -> int:
    return (await ops.lookup(parent, name.encode(), None)).st_ino  # type: ignore[arg-type]


async def test_forgotten_inodes_are_dropped_and_names_resolve_again() -> None:
    ops = operations()
    orgs = [await lookup(ops, ROOT, f"org{i}") for i in range(100)]
    assert ops.inode_count == 101
    await ops.forget([(inode, 1) for inode in orgs])
    assert ops.inode_count == 1
    # A forgotten name gets a fresh inode when it is looked up again.
    again = await lookup(ops, ROOT, "org0")
    assert again not in orgs
    assert ops.inode_count == 2


async def test_an_inode_stays_until_every_lookup_is_forgotten() -> None:
    ops = operations()
    org = await lookup(ops, ROOT, "org")
    assert await lookup(ops, ROOT, "org") == org  # the kernel now holds it twice
    model = await lookup(ops, org, "model")
    sub = await lookup(ops, model, "sub")
    weights = await lookup(ops, sub, "model.bin")
    assert ops.inode_count == 5
    await ops.forget([(weights, 1), (sub, 1), (model, 1)])
    assert ops.inode_count == 2
    await ops.forget([(org, 1)])
    assert ops.inode_count == 2, "one of the two lookups is still held"
    model_again = await lookup(ops, org, "model")  # and it still answers, with a new inode
    assert model_again != model
    # The kernel forgets children before their parent.
    await ops.forget([(model_again, 1), (org, 1)])
    assert ops.inode_count == 1
    await ops.forget([(ROOT, 5)])  # the root is never dropped
    assert (await ops.getattr(ROOT, None)).st_ino == ROOT  # type: ignore[arg-type]


async def test_forget_of_unknown_inodes_raises_nothing() -> None:
    ops = operations()
    await ops.forget([(12345, 1), (ROOT, 1)])
    assert ops.inode_count == 1


def inodes(port: int) -> float:
    found = value(parse(http_scrape(port)), "mxfs_inodes")
    assert found is not None, "no mxfs_inodes in the metrics"
    return found


@requires_fuse
def test_the_kernel_forgetting_names_empties_the_table(hub: FakeHub, new_repo_id, mxfs_mount, tmp_path: Path) -> None:
    repo = new_repo_id()
    hub.add_repo(repo, {"config.json": b"{}", **{f"shard-{i:03}.bin": b"x" for i in range(50)}})
    port = free_port()
    mount: MountedFs = mxfs_mount("--metrics-address", f"127.0.0.1:{port}")
    baseline = inodes(port)
    # Probing names (a script checking which orgs exist) and listing a model both add inodes.
    for i in range(200):
        os.stat(mount / f"probe-{i}")
    assert len(os.listdir(mount / repo)) == 51
    assert inodes(port) >= baseline + 250

    def forgotten() -> bool:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("2\n")  # drop dentries and inodes: the kernel sends FORGET for each
        return inodes(port) <= baseline + 5

    wait_until(forgotten, 20, "the daemon dropped what the kernel forgot")
    # Everything still resolves afterwards.
    assert (mount / repo / "config.json").read_bytes() == b"{}"
    assert len(os.listdir(mount / repo)) == 51
