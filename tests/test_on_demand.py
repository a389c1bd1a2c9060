"""Reads of bytes not downloaded yet are fetched on demand, and merge with the background download.

DESIGN section 5: a read waits only for the bytes it asks for; a range far ahead of the
background download is fetched with a range request of its own, and no byte is downloaded twice.
These tests check the mechanism (which requests the Hub saw, which bytes it sent, what readers
got), never how fast it was: speed is measured by ``bench/run.py``.
"""

from __future__ import annotations

import hashlib
import os
import random
import threading
from pathlib import Path

from tests.hubserver import FakeHub
from tests.mounting import requires_fuse, run_cli, wait_until

pytestmark = requires_fuse

MiB = 1 << 20
# Bytes the server may have pushed into a socket that the daemon closed because another request
# had those bytes in hand already (the server writes ahead of what the client consumes).
SOCKET_SLACK = 2 * MiB


def payload(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


def range_starts(hub: FakeHub, repo: str, filename: str, kind: str | None = None) -> list[int]:
    """Where the range requests for ``filename`` started (``kind``: only "resolve" requests,
    the ones the daemon makes; an LFS file's are each followed by a "cdn" one)."""
    starts = []
    for record in hub.requests("GET", repo_id=repo, filename=filename):
        if kind is not None and record.kind != kind:
            continue
        if record.range and record.range.startswith("bytes="):
            starts.append(int(record.range.removeprefix("bytes=").split("-", 1)[0]))
    return starts


def test_read_far_ahead_is_fetched_on_demand_and_nothing_twice(hub: FakeHub, new_repo_id, mxfs_mount) -> None:
    repo = new_repo_id()
    data = payload(40 * MiB, seed=1)
    hub.add_repo(repo, {"config.json": b"{}", "model.safetensors": data})
    # Slow enough that the background download is far from the end when the read comes.
    hub.inject("slow", repo_id=repo, filename="model.safetensors", bytes_per_second=8_000_000)
    # One connection, busy with the first 8 MiB range when the far read comes (a first read at 0
    # waits for it): the read is far (more than the planner's NEAR) from every stream.
    mount = mxfs_mount("--connections", "1")
    path = mount / repo / "model.safetensors"
    offset = 36 * MiB + 12345
    with open(path, "rb") as f:
        assert os.pread(f.fileno(), 8, 0) == data[:8]
        assert os.pread(f.fileno(), 8, offset) == data[offset : offset + 8]
        # The read was served by a range request of its own, starting at most one alignment unit
        # below the offset, not by waiting for the stream that started at 0.
        assert any(offset - MiB <= start <= offset for start in range_starts(hub, repo, "model.safetensors"))
        assert os.getxattr(path, "user.mxfs.status") == b"downloading"
        whole = f.read()
    assert hashlib.sha256(whole).digest() == hashlib.sha256(data).digest()
    served = hub.bytes_served(repo, "model.safetensors")
    assert len(data) <= served <= len(data) + SOCKET_SLACK


def test_random_reads_during_download_merge_with_background(hub: FakeHub, new_repo_id, mxfs_mount) -> None:
    """Many readers at random offsets while the file downloads: every byte right, each fetched once."""
    repo = new_repo_id()
    data = payload(48 * MiB, seed=2)
    hub.add_repo(repo, {"model.safetensors": data})
    hub.inject("slow", repo_id=repo, filename="model.safetensors", bytes_per_second=12_000_000)
    mount = mxfs_mount()
    path = mount / repo / "model.safetensors"
    errors: list[BaseException] = []
    wrong: list[tuple[int, int]] = []

    def reader(seed: int) -> None:
        rnd = random.Random(seed)
        try:
            with open(path, "rb") as f:
                for _ in range(12):
                    off = rnd.randrange(len(data))
                    n = rnd.choice((8, 4096, 300_000, 2 * MiB))
                    if os.pread(f.fileno(), n, off) != data[off : off + n]:
                        wrong.append((off, n))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=reader, args=(seed,)) for seed in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads)
    assert not errors, errors
    assert not wrong, wrong
    with open(path, "rb") as f:
        assert hashlib.sha256(f.read()).digest() == hashlib.sha256(data).digest()
    served = hub.bytes_served(repo, "model.safetensors")
    assert len(data) <= served <= len(data) + 4 * SOCKET_SLACK, served
    starts = range_starts(hub, repo, "model.safetensors")
    assert len(starts) > 2, "on-demand requests beside the background one"
    blob = next((mount.cache_dir / f"models--{repo.replace('/', '--')}" / "blobs").iterdir())
    assert hashlib.sha256(blob.read_bytes()).digest() == hashlib.sha256(data).digest()


def test_on_demand_with_a_server_that_ignores_range(hub: FakeHub, new_repo_id, mxfs_mount) -> None:
    """A 200 answer to a range request still yields exactly the bytes asked for."""
    repo = new_repo_id()
    data = payload(24 * MiB, seed=3)
    hub.add_repo(repo, {"model.safetensors": data})
    hub.inject("slow", repo_id=repo, filename="model.safetensors", bytes_per_second=20_000_000)
    hub.inject("ignore_range", repo_id=repo, filename="model.safetensors")
    mount = mxfs_mount()
    path = mount / repo / "model.safetensors"
    offset = 20 * MiB + 7
    with open(path, "rb") as f:
        assert os.pread(f.fileno(), 4096, offset) == data[offset : offset + 4096]
        assert hashlib.sha256(f.read()).digest() == hashlib.sha256(data).digest()


def test_a_server_that_ignores_range_sends_each_file_once(hub: FakeHub, new_repo_id, mxfs_mount) -> None:
    """A mirror or proxy that answers every range request with the whole file (olah, some caching
    proxies): mxfs notices at the first answer and fetches each file in one request, serving
    readers as the bytes land, instead of one whole body per range."""
    repo = new_repo_id()
    files = {f"model-{i}.safetensors": payload(16 * MiB, seed=10 + i) for i in range(3)}
    hub.add_repo(repo, {"config.json": b"{}", **files})
    hub.inject("slow", repo_id=repo, bytes_per_second=40_000_000)
    hub.inject("ignore_range", repo_id=repo)
    mount = mxfs_mount()
    for name, data in files.items():
        with open(mount / repo / name, "rb") as f:
            offset = len(data) // 2 + 5
            assert os.pread(f.fileno(), 4096, offset) == data[offset : offset + 4096]
            assert hashlib.sha256(f.read()).digest() == hashlib.sha256(data).digest()
    assert "the server ignores Range requests" in mount.log()
    for name, data in files.items():
        bodies = [r for r in hub.requests(repo_id=repo, filename=name) if r.status == 200 and r.bytes_sent]
        # One whole body per file. Requests already in flight when the first 200 came back are
        # dropped after what the socket held (the Hub paces, so a few pieces at most).
        assert sum(r.complete for r in bodies) == 1, [(r.range, r.bytes_sent) for r in bodies]
        assert hub.bytes_served(repo, name) <= len(data) + len(bodies) * MiB, [(r.range, r.bytes_sent) for r in bodies]


def test_sixteen_threads_on_one_handle_of_a_downloading_file(hub: FakeHub, new_repo_id, mxfs_mount) -> None:
    """Concurrent preads on one file handle proceed together (none waits for another's bytes)."""
    repo = new_repo_id()
    data = payload(32 * MiB, seed=4)
    hub.add_repo(repo, {"model.safetensors": data})
    hub.inject("slow", repo_id=repo, filename="model.safetensors", bytes_per_second=16_000_000)
    mount = mxfs_mount()
    path: Path = mount / repo / "model.safetensors"
    results: dict[int, bool] = {}
    barrier = threading.Barrier(16)
    with open(path, "rb") as f:
        fd = f.fileno()

        def reader(i: int) -> None:
            off = (i * 2 * MiB) % len(data)
            barrier.wait(30)
            results[i] = os.pread(fd, 2 * MiB, off) == data[off : off + 2 * MiB]

        threads = [threading.Thread(target=reader, args=(i,)) for i in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    assert results == dict.fromkeys(range(16), True)
    # The readers far from offset 0 were served by their own requests, not in file order.
    assert len(range_starts(hub, repo, "model.safetensors")) > 2
    # No byte is written twice: requests stop where another has the bytes. What a stopped request
    # had already pushed into its socket is the waste (a loopback socket holds MBs); the planner
    # cuts no request that will reach a reader within NEAR, so here the Hub sends each byte once
    # (1.00x over 10 runs; issue 14's target is 1.05x, which the bound keeps).
    wait_until(lambda: os.getxattr(path, "user.mxfs.status") == b"cached", 60, "the file is cached")
    assert hub.bytes_served(repo, "model.safetensors") <= len(data) * 1.05


def test_a_download_keeps_its_connections_busy(hub: FakeHub, new_repo_id, mxfs_mount) -> None:
    """A server that paces each connection (a CDN): the download keeps several in flight."""
    repo = new_repo_id()
    data = payload(32 * MiB, seed=5)
    hub.add_repo(repo, {"model.safetensors": data})
    hub.inject("slow", repo_id=repo, filename="model.safetensors", bytes_per_second=2_000_000)
    mount = mxfs_mount()
    run = run_cli("prefetch", repo, "--cache-dir", str(mount.cache_dir), "--state-dir", str(mount.state_dir),
                  env=hub.env())  # fmt: skip
    assert run.returncode == 0, run.stderr
    records = [r for r in hub.requests("GET", repo_id=repo, filename="model.safetensors") if r.bytes_sent]
    # The most range requests in flight at one moment.
    events = sorted([(r.started, 1) for r in records] + [(r.started + r.duration, -1) for r in records])
    in_flight = peak = 0
    for _, step in events:
        in_flight += step
        peak = max(peak, in_flight)
    assert peak >= 4, peak
    with open(mount / repo / "model.safetensors", "rb") as f:
        assert hashlib.sha256(f.read()).digest() == hashlib.sha256(data).digest()


def test_a_reader_following_the_download_opens_no_requests_of_its_own(hub: FakeHub, new_repo_id, mxfs_mount) -> None:
    # 40 MiB in 8 MiB ranges over one connection, a reader reading along as the bytes land: at
    # each range boundary the worker goes on with the next range (the reader puts it first),
    # so the reader opens no request of its own there.
    repo = new_repo_id()
    data = payload(40 * MiB, seed=6)
    hub.add_repo(repo, {"config.json": b"{}", "model.safetensors": data})
    hub.inject("slow", repo_id=repo, filename="model.safetensors", bytes_per_second=16_000_000)
    mount = mxfs_mount("--connections", "1", "--chunk-size", "8MiB")
    pieces = []
    with open(mount / repo / "model.safetensors", "rb", buffering=0) as f:
        # 1 MiB at a time, as a loader reads: one huge read() would make the kernel read far
        # ahead, and reads far ahead are rightly fetched on demand.
        while piece := f.read(MiB):
            pieces.append(piece)
    assert b"".join(pieces) == data
    asked = set()
    for record in hub.requests("GET", repo_id=repo, filename="model.safetensors"):
        if record.kind == "cdn" and record.range:  # each range once on the CDN, asked of the Hub or not
            first, _, last = record.range.removeprefix("bytes=").partition("-")
            asked.add((int(first) // MiB, (int(last) + 1) // MiB))
    # Each later range was asked for whole, from its start, by the worker that went on with it
    # (a reader arriving first used to open a small request there and push the range back).
    # Requests inside a range may still happen: a reader can get ahead of a stalled stream.
    assert {(8 * k, 8 * k + 8) for k in range(1, 5)} <= asked, sorted(asked)
    assert hub.bytes_served(repo, "model.safetensors") <= len(data) + SOCKET_SLACK
