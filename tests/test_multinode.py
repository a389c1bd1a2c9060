"""Several daemons ("nodes") sharing one cache directory and one Redis registry.

Each daemon has its own mountpoint and state dir, as separate machines would; they share the
cache directory (a shared volume in production) and a real redis-server.  The Hub counts the
bytes it serves, so "one download per cache" is checked byte for byte.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import signal
import threading
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

from tests.hubserver import FakeHub
from tests.mounting import MountedFs, parallel, partial_files, read, read_or_eio, requires_fuse, wait_until
from tests.redis_server import RedisServer
from tests.tcp_proxy import TcpProxy

pytestmark = requires_fuse


# A daemon run under this is in a pid namespace of its own, with the host's /proc: its claims
# carry no process tag (mxfs.fetch.claimant), as a claim of another host is judged by its lease.
OTHER_HOST = ("unshare", "--pid", "--fork", "--kill-child")


def start_nodes(
    mxfs_mount: Callable[..., MountedFs], tmp_path: Path, url: str, n: int, *args: str, wrap: tuple[str, ...] = ()
) -> list[MountedFs]:
    """``n`` nodes on one cache; ``wrap``: a command each runs under (``OTHER_HOST``)."""
    cache = tmp_path / "shared-cache"
    return [
        mxfs_mount("--registry", url, *args, cache_dir=cache, state_dir=tmp_path / f"node{i}-state", wrap=wrap)
        for i in range(n)
    ]


def assert_blob_settled(cache: Path, repo: str, data: bytes, timeout: float) -> None:
    """No partial file left in ``repo``'s blobs (a dead or stopped writer's included) within
    ``timeout``, and its blob holds exactly ``data``."""
    blobs = cache / f"models--{repo.replace('/', '--')}" / "blobs"
    wait_until(lambda: not partial_files(blobs), timeout, "partial files cleaned up")
    assert (blobs / hashlib.sha256(data).hexdigest()).read_bytes() == data


# The log line of a read failed because its handle was served bytes of an abandoned copy.
TAINTED = "came from a copy that was discarded unverified"


def test_two_nodes_eight_readers_one_download(
    hub: FakeHub, new_repo_id, mxfs_mount, tmp_path: Path, redis_server: RedisServer
) -> None:
    redis_server.client().flushdb()
    repo = new_repo_id()
    rnd = random.Random(11)
    files = {
        "config.json": b'{"nodes": 2}',
        "model-00001.safetensors": rnd.randbytes(6_000_000),
        "model-00002.safetensors": rnd.randbytes(4_000_000),
        "tokenizer.json": rnd.randbytes(300_000),
    }
    hub.add_repo(repo, files)
    # Slow enough that every reader on both nodes arrives while the download is under way.
    hub.inject("slow", repo_id=repo, filename="*.safetensors", bytes_per_second=8_000_000)
    nodes = start_nodes(mxfs_mount, tmp_path, redis_server.url(), 2)
    names = list(files)
    readers = [lambda i=i: read(nodes[i % 2] / repo / names[i % len(names)]) for i in range(8)]
    results = parallel(readers)
    for i, got in enumerate(results):
        assert got == files[names[i % len(names)]], f"reader {i}: {got!r:.100}"
    for name, data in files.items():
        assert hub.bytes_served(repo, name) == len(data), name
    owners = [n for n in nodes if "downloading 4 files" in n.log()]
    assert len(owners) == 1
    # Every file, read afterwards through the other node too, is complete and right.
    for node in nodes:
        for name, data in files.items():
            assert read(node / repo / name) == data


def test_killed_owner_is_taken_over_after_its_lease(
    hub: FakeHub, new_repo_id, mxfs_mount, tmp_path: Path, redis_server: RedisServer
) -> None:
    redis_server.client().flushdb()
    repo = new_repo_id()
    data = random.Random(12).randbytes(12_000_000)
    hub.add_repo(repo, {"config.json": b"{}", "model.safetensors": data})
    slow = hub.inject("slow", repo_id=repo, filename="model.safetensors", bytes_per_second=3_000_000)
    (first,) = start_nodes(mxfs_mount, tmp_path, redis_server.url(), 1, "--lease", "2s", wrap=OTHER_HOST)
    second = mxfs_mount(
        "--registry", redis_server.url(), "--lease", "2s", cache_dir=first.cache_dir, state_dir=tmp_path / "node1-state"
    )
    second.allowed_log.append(TAINTED)
    # The first node opens first and owns the download.
    assert read(first / repo / "config.json") == b"{}"
    assert "downloading 2 files" in first.log()
    reader = threading.Thread(target=lambda: results.append(read_or_eio(second / repo / "model.safetensors")))
    results: list[bytes | str] = []
    reader.start()
    time.sleep(1.0)  # mid-download
    first.proc.send_signal(signal.SIGKILL)
    first.proc.wait(10)
    slow.remove()
    reader.join(60)
    assert not reader.is_alive()
    assert results in ([data], ["EIO"])
    assert read(second / repo / "model.safetensors") == data
    assert "downloading 2 files" in second.log()
    assert "is gone; taking the download over" not in second.log()  # the lease, not the process
    assert hashlib.sha256(read(second / repo / "model.safetensors")).hexdigest() == hashlib.sha256(data).hexdigest()
    # No corrupt blob, no dangling link; the dead owner's partial file is gone once the new owner is done.
    assert_blob_settled(tmp_path / "shared-cache", repo, data, timeout=10)
    first.cleanup()


def test_registry_outage_keeps_cached_models_served(
    hub: FakeHub, new_repo_id, mxfs_mount, tmp_path: Path, make_redis_server: Callable[..., RedisServer]
) -> None:
    server = make_redis_server()
    cached, later = new_repo_id(), new_repo_id()
    cached_data = random.Random(13).randbytes(2_000_000)
    later_data = random.Random(14).randbytes(1_000_000)
    hub.add_repo(cached, {"config.json": b'{"c": 1}', "model.safetensors": cached_data})
    hub.add_repo(later, {"config.json": b'{"c": 2}', "model.safetensors": later_data})
    (node,) = start_nodes(mxfs_mount, tmp_path, server.url(), 1)
    unavailable = (
        r"registry unavailable: registry redis://127\.0\.0\.1:\d+/0: (Error \d+ .*|Connection closed by server\.)"
    )
    name = re.escape(later) + r"@\w+"
    node.allowed_log.extend(
        [
            # Reads of the cached model go on; recording that they happened does not.
            rf"^{re.escape(cached)}@\w+: could not update last-used time: registry redis://",
            # Nor for the new one's open (its warning is the first of the outage when the cached
            # model is handed to the kernel, whose reads the fetcher does not touch).
            rf"^{name}: could not update last-used time: registry redis://",
            # The new download cannot be claimed: retried, then EIO.
            rf"^{name}: {name}: {unavailable}; attempt [23] of 3 in \d+s$",
            rf"^{name}: download failed: {name}: {unavailable}$",
            rf"^read: {name}: {unavailable}$",
        ]
    )
    assert read(node / cached / "model.safetensors") == cached_data
    # Recorded as downloaded before the registry goes (a read can be done before that).
    wait_until(lambda: registry_status(node / cached) == b"downloaded", 30, "cached model recorded")

    server.stop()
    for _ in range(3):  # reads go on, also through fresh opens
        assert read(node / cached / "model.safetensors") == cached_data
        assert read(node / cached / "config.json") == b'{"c": 1}'
    assert os.listdir(node / cached)
    # A new download cannot be claimed: it fails with EIO, bounded, with a clear log line.
    started = time.monotonic()
    try:
        read(node / later / "model.safetensors")
        raise AssertionError("read succeeded without a registry")
    except OSError as exc:
        assert exc.errno == 5  # EIO
    assert time.monotonic() - started < 60
    assert "registry unavailable" in node.log()

    server.start()
    # Registry back: after the failure backoff, new downloads work again with the same daemon.
    deadline = time.monotonic() + 60
    while True:
        try:
            assert read(node / later / "model.safetensors") == later_data
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(1.0)
    assert read(node / cached / "config.json") == b'{"c": 1}'
    # The new download recorded too, before the registry is torn down with the test.
    wait_until(lambda: registry_status(node / later) == b"downloaded", 30, "new download recorded")


def registry_status(model_dir: Path) -> bytes:
    try:
        return os.getxattr(model_dir, "user.mxfs.status")
    except OSError:
        return b"?"


LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ", re.M)


def logged_at(log: str, text: str) -> datetime:
    """When the daemon logged the first line containing ``text`` (its logging timestamps)."""
    for line in log.splitlines():
        if text in line and (match := LOG_TIME.match(line)):
            return datetime.strptime(match[1], "%Y-%m-%d %H:%M:%S,%f")
    raise AssertionError(f"no log line with {text!r}")


def test_owner_cut_off_from_the_registry_stops_writing_before_another_node_takes_over(
    hub: FakeHub, new_repo_id, mxfs_mount, tmp_path: Path, make_redis_server: Callable[..., RedisServer]
) -> None:
    server = make_redis_server()
    repo = new_repo_id()
    data = random.Random(15).randbytes(12_000_000)
    hub.add_repo(repo, {"config.json": b"{}", "model.safetensors": data})
    slow = hub.inject("slow", repo_id=repo, filename="model.safetensors", bytes_per_second=2_000_000)
    with TcpProxy(server.port) as partition:
        # The owner reaches Redis through the proxy; the other node directly.
        owner = mxfs_mount(
            "--registry", f"redis://127.0.0.1:{partition.port}/0", "--lease", "3s",
            cache_dir=tmp_path / "shared-cache", state_dir=tmp_path / "owner-state",
        )  # fmt: skip
        other = mxfs_mount(
            "--registry", server.url(), "--lease", "3s",
            cache_dir=tmp_path / "shared-cache", state_dir=tmp_path / "other-state",
        )  # fmt: skip
        name = re.escape(repo) + r"@\w+"
        other.allowed_log.append(TAINTED)
        owner.allowed_log.extend(
            [
                rf"^{name}: could not renew the lease in time; stopping the download$",
                rf"^{name}: lease lost, stopped writing$",
                # Its registry connection went through the frozen proxy, now cut.
                rf"^{name}: cached, but the registry is unavailable \(registry redis://127\.0\.0\.1:\d+/0: ",
            ]
        )
        assert read(owner / repo / "config.json") == b"{}"
        assert "downloading 2 files" in owner.log()
        time.sleep(0.5)  # mid-download, with a renewed lease

        partition.freeze()  # renewals now hang: neither an answer nor an error
        results: list[bytes | str] = []
        reader = threading.Thread(target=lambda: results.append(read_or_eio(other / repo / "model.safetensors")))
        reader.start()
        deadline = time.monotonic() + 30
        while "downloading 2 files" not in other.log():
            assert time.monotonic() < deadline, "the other node never took over"
            time.sleep(0.1)
        slow.remove()
        reader.join(60)
        assert not reader.is_alive()
        assert results in ([data], ["EIO"])
        assert read(other / repo / "model.safetensors") == data
        partition.thaw()

        # The owner gave up on its own clock, before its lease could lapse and be taken over.
        stopped = logged_at(owner.log(), "could not renew the lease in time")
        took_over = logged_at(other.log(), "downloading 2 files")
        assert stopped < took_over, (stopped, took_over)
        assert read(owner / repo / "model.safetensors") == data
    assert_blob_settled(tmp_path / "shared-cache", repo, data, timeout=20)


def test_a_waiting_node_is_woken_when_the_download_finishes(
    hub: FakeHub, new_repo_id, mxfs_mount, tmp_path: Path, redis_server: RedisServer
) -> None:
    # The other node polls only once a minute: it is the finish message on Redis that wakes it.
    redis_server.client().flushdb()
    repo = new_repo_id()
    data = random.Random(16).randbytes(6_000_000)
    hub.add_repo(repo, {"config.json": b"{}", "model.safetensors": data})
    slow = hub.inject("slow", repo_id=repo, filename="model.safetensors", bytes_per_second=3_000_000)
    owner, waiter = start_nodes(mxfs_mount, tmp_path, redis_server.url(), 2, "--poll-interval", "60s")
    assert read(owner / repo / "config.json") == b"{}"
    assert "downloading 2 files" in owner.log()
    started = time.monotonic()
    results = parallel(
        [lambda: read(owner / repo / "model.safetensors"), lambda: read(waiter / repo / "model.safetensors")]
    )
    slow.remove()
    assert results == [data, data]
    assert time.monotonic() - started < 30, "the waiting node slept through the finish"
    assert "downloading" not in waiter.log()
    assert hub.bytes_served(repo, "model.safetensors") == len(data)
