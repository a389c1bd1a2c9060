"""Repos of many files (issue 14): descriptors bounded by the work in flight, not by the repo.

A daemon whose open-files limit is 256 (many container runtimes give 1024) reads every file of a
repo of 1200 small files and one larger one.  Before, the download opened two descriptors per
file before it started, and every read failed with EIO ("Too many open files").
"""

from __future__ import annotations

import hashlib
import os
import random
import subprocess

from tests.hubserver import FakeHub
from tests.mounting import requires_fuse

pytestmark = requires_fuse

FILES = 1200
NOFILE = 256


def test_a_repo_of_many_files_under_a_low_open_files_limit(hub: FakeHub, new_repo_id, mxfs_mount) -> None:
    repo = new_repo_id()
    rnd = random.Random(140)
    files = {f"shards/part-{i:05d}.json": rnd.randbytes(rnd.randrange(10, 3000)) for i in range(FILES)}
    files["model.safetensors"] = rnd.randbytes(6_000_000)
    hub.add_repo(repo, files)
    mount = mxfs_mount()
    limit = subprocess.run(
        ["prlimit", f"--nofile={NOFILE}:{NOFILE}", "--pid", str(mount.proc.pid)], capture_output=True, text=True
    )
    assert limit.returncode == 0, limit.stderr
    model = mount / repo
    assert len(os.listdir(model / "shards")) == FILES
    for name, data in files.items():
        with open(model / name, "rb") as f:
            assert hashlib.sha256(f.read()).digest() == hashlib.sha256(data).digest(), name
    open_fds = len(os.listdir(f"/proc/{mount.proc.pid}/fd"))
    assert open_fds < NOFILE // 2, open_fds  # nothing is held per file once it is published


def test_files_with_the_same_content_are_one_blob(hub: FakeHub, new_repo_id, mxfs_mount) -> None:
    """Files of one content share an etag and so one blob: it is downloaded once and every path
    links to it (two partial files of the same name used to truncate each other)."""
    repo = new_repo_id()
    same = random.Random(141).randbytes(3_000_000)
    files = {f"copies/{i:02d}.safetensors": same for i in range(12)}
    files.update({f"tiny/{i:02d}.txt": b"x" for i in range(12)})
    hub.add_repo(repo, files)
    mount = mxfs_mount()
    # The last of the twins first: a reader of a file that is not the one downloaded.
    for name in sorted(files, reverse=True):
        with open(mount / repo / name, "rb") as f:
            assert f.read() == files[name], name
    assert hub.bytes_served(repo, "copies/*") <= 2 * len(same)  # not once per path
    snapshot = next((mount.cache_dir / f"models--{repo.replace('/', '--')}" / "snapshots").iterdir())
    for name, data in files.items():
        assert (snapshot / name).read_bytes() == data, name
