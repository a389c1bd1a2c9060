"""A download that stops (daemon stopped or killed) is resumed by the next daemon, not redone.

The range map of each partial file lives in the state dir (``partials/<repo>/<etag>.json``) and
only names bytes made durable before it was written; the restarted daemon takes the partial file
over and fetches only what the map does not name.  Checked by what the Hub served, never by time.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import time
from pathlib import Path

from tests.hubserver import FakeHub
from tests.mounting import MountedFs, requires_fuse, wait_until

pytestmark = requires_fuse

MiB = 1 << 20
SOCKET_SLACK = 2 * MiB


def start_download(mount: MountedFs, repo: str, data: bytes) -> None:
    with open(mount / repo / "model.safetensors", "rb") as f:
        assert os.pread(f.fileno(), 16, 0) == data[:16]


def map_file(mount: MountedFs, repo: str, data: bytes) -> Path:
    return mount.state_dir / "partials" / repo.replace("/", "--") / f"{hashlib.sha256(data).hexdigest()}.json"


def mapped_bytes(path: Path) -> int:
    try:
        return sum(end - start for start, end in json.loads(path.read_text())["ranges"])
    except FileNotFoundError:
        return 0


def blobs_dir(mount: MountedFs, repo: str) -> Path:
    return mount.cache_dir / f"models--{repo.replace('/', '--')}" / "blobs"


def test_stopped_daemon_resumes_where_it_stopped(hub: FakeHub, new_repo_id, mxfs_mount) -> None:
    repo = new_repo_id()
    data = random.Random(21).randbytes(24 * MiB)
    hub.add_repo(repo, {"config.json": b"{}", "model.safetensors": data})
    # Paced per connection: with every connection mxfs opens, still far from done after 1.5 s.
    slow = hub.inject("slow", repo_id=repo, filename="model.safetensors", bytes_per_second=1_500_000)
    first = mxfs_mount()
    start_download(first, repo, data)
    time.sleep(1.5)  # partway through
    assert first.stop() == 0
    served_first = hub.bytes_served(repo, "model.safetensors")
    kept = mapped_bytes(map_file(first, repo, data))
    assert 0 < kept < len(data)
    assert len(list(blobs_dir(first, repo).glob("*.incomplete"))) == 1
    slow.remove()

    second = mxfs_mount(cache_dir=first.cache_dir, state_dir=first.state_dir)
    with open(second / repo / "model.safetensors", "rb") as f:
        assert hashlib.sha256(f.read()).digest() == hashlib.sha256(data).digest()
    assert "resuming a partial download" in second.log()
    # The second daemon fetched only what the first had not kept.
    served_second = hub.bytes_served(repo, "model.safetensors") - served_first
    assert len(data) - kept <= served_second <= len(data) - kept + SOCKET_SLACK
    wait_until(lambda: not map_file(second, repo, data).exists(), 30, "map removed")
    assert not list(blobs_dir(second, repo).glob("*.incomplete"))
    assert (blobs_dir(second, repo) / hashlib.sha256(data).hexdigest()).read_bytes() == data


def test_killed_daemon_resumes_from_its_last_durable_map(hub: FakeHub, new_repo_id, mxfs_mount) -> None:
    repo = new_repo_id()
    data = random.Random(22).randbytes(40 * MiB)
    hub.add_repo(repo, {"config.json": b"{}", "model.safetensors": data})
    # Per connection: even with every connection mxfs may open, this takes longer than a map save.
    slow = hub.inject("slow", repo_id=repo, filename="model.safetensors", bytes_per_second=600_000)
    first = mxfs_mount("--lease", "2s")
    start_download(first, repo, data)
    path = map_file(first, repo, data)
    wait_until(lambda: mapped_bytes(path) > 0, 30, "map saved")  # the first periodic save
    first.kill()
    served_first = hub.bytes_served(repo, "model.safetensors")
    kept = mapped_bytes(path)
    assert 0 < kept < len(data)
    slow.remove()

    second = mxfs_mount("--lease", "2s", cache_dir=first.cache_dir, state_dir=first.state_dir)
    with open(second / repo / "model.safetensors", "rb") as f:
        assert hashlib.sha256(f.read()).digest() == hashlib.sha256(data).digest()
    assert "resuming a partial download" in second.log()
    served_second = hub.bytes_served(repo, "model.safetensors") - served_first
    # Only what the durable map did not name was fetched again (bytes the killed daemon got
    # after its last save are fetched twice: that is the price of a crash, bounded by the interval).
    assert served_second <= len(data) - kept + SOCKET_SLACK
    assert served_second >= len(data) - kept
    first.cleanup()
