"""Never silent wrong bytes (DESIGN section 5): a copy that fails its checksum never completes a read.

The Hub look-alike corrupts the *first* answer that carries a chosen byte of a file and answers
right afterwards (a flaky CDN edge), paced so that readers follow the download.  Readers are
separate processes (``tests/reader.py``): sequential reads of several sizes, an mmap, scattered
preads, started before, during and after the bad copy lands.  Whatever the order of events, each
reader ends with the right bytes or an error (EIO, or SIGBUS for a mapping); "wrong" fails the
test.  In strict mode no reader is ever served unverified bytes, so every reader gets the right
bytes.  A reader that opens the file after the bad copy was discarded gets the right bytes in
both modes.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.hubserver import FakeHub
from tests.mounting import REPO_ROOT, MountedFs, requires_fuse, wait_until

pytestmark = requires_fuse

MiB = 1 << 20
CHECKSUM_WARNING = "downloaded bytes do not match the Hub's checksum"
TAINT_WARNING = "came from a copy that was discarded unverified"
# Every way a reader may end when the bytes it was served failed their checksum.
SAFE = {"correct", "EIO", "SIGBUS"}
READER_TIMEOUT = 120.0


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def start_reader(
    pattern: str, path: Path, data: bytes, delay: float = 0.0, dump: Path | None = None
) -> subprocess.Popen[str]:
    """A reader process; ``dump``: where it leaves the bytes it read (to show a wrong read's pages)."""
    env = {**os.environ, "MXFS_READER_DUMP": str(dump)} if dump else None
    return subprocess.Popen(
        [sys.executable, "-m", "tests.reader", pattern, str(path), sha(data), "--delay", f"{delay:.3f}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO_ROOT,
        env=env,
    )


def wrong_pages(dump: Path, data: bytes) -> str:
    """Which 4 KiB pages of a wrong read differ from the data (for the failure message)."""
    got = dump.read_bytes()
    bad = [o for o in range(0, max(len(got), len(data)), 4096) if got[o : o + 4096] != data[o : o + 4096]]
    return f"read {len(got)} of {len(data)} bytes; {len(bad)} wrong pages, first at {bad[:8]}"


def outcome(proc: subprocess.Popen[str]) -> str:
    """The reader's word: "correct", "wrong", an errno name, or "SIGBUS"; any other crash fails the test."""
    try:
        out, err = proc.communicate(timeout=READER_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise AssertionError(f"reader {proc.args} hung for {READER_TIMEOUT}s") from None
    if proc.returncode == -signal.SIGBUS:
        return "SIGBUS"
    assert proc.returncode == 0, f"reader {proc.args} failed:\n{err}"
    return out.strip()


def log_count(mount: MountedFs, text: str) -> int:
    return mount.log().count(text)


def allow_corruption_warnings(mount: MountedFs) -> None:
    mount.allowed_log.extend([CHECKSUM_WARNING, TAINT_WARNING])


def test_fast_reader_following_a_corrupt_first_copy_never_completes_with_it(
    hub: FakeHub, new_repo_id, mxfs_mount
) -> None:
    """The report of issue 12: one process reads a 16 MiB file in 1 MiB reads as soon as it is
    opened; the Hub's first answer for the file carries flipped bytes, its second is right."""
    repo = new_repo_id()
    data = random.Random(120).randbytes(16 * MiB)
    hub.add_repo(repo, {"config.json": b"{}", "model.safetensors": data})
    corrupt = hub.inject(
        "corrupt", offset=5 * MiB + 123, length=8, covering=True, times=1, repo_id=repo, filename="model.safetensors"
    )
    hub.inject("slow", bytes_per_second=24 * MiB, repo_id=repo, filename="model.safetensors")
    mount = mxfs_mount()
    allow_corruption_warnings(mount)
    path = mount / repo / "model.safetensors"
    results = [outcome(start_reader(pattern, path, data)) for pattern in ("seq:1048576",)]
    assert corrupt.hits == 1
    assert log_count(mount, CHECKSUM_WARNING) == 1
    assert results == ["EIO"], results  # it was served the bad bytes: it must not complete
    # A reader that opens the file now gets the verified copy, through a page cache that holds
    # nothing of the bad one.
    for pattern in ("seq:1048576", "mmap"):
        assert outcome(start_reader(pattern, path, data)) == "correct"


@pytest.mark.parametrize("verify", ["fast", "strict"])
def test_no_reader_pattern_completes_with_a_corrupt_copy(
    verify: str, hub: FakeHub, new_repo_id, mxfs_mount, tmp_path: Path
) -> None:
    mount = mxfs_mount("--verify", verify)
    allow_corruption_warnings(mount)
    rnd_data = random.Random(121)
    # One LFS file (sha256, from the CDN) and one plain git file (sha1, from /resolve).
    sizes = {"model.safetensors": 8 * MiB, "tokenizer.json": 3 * MiB}

    @settings(
        max_examples=6,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.too_slow],
    )
    @given(
        name=st.sampled_from(sorted(sizes)),
        where=st.floats(min_value=0.0, max_value=0.9999),
        delays=st.lists(st.floats(min_value=0.0, max_value=0.8), min_size=8, max_size=8),
        chunks=st.lists(st.sampled_from([4096, 65536, MiB]), min_size=3, max_size=3),
        seed=st.integers(0, 1000),
    )
    def example(name: str, where: float, delays: list[float], chunks: list[int], seed: int) -> None:
        repo = new_repo_id()
        data = rnd_data.randbytes(sizes[name])
        hub.add_repo(repo, {"config.json": b"{}", name: data})
        offset = int(where * len(data))
        corrupt = hub.inject("corrupt", offset=offset, length=4, covering=True, times=1, repo_id=repo, filename=name)
        pace = hub.inject("slow", bytes_per_second=12 * MiB, repo_id=repo, filename=name)
        warnings_before = log_count(mount, CHECKSUM_WARNING)
        path = mount / repo / name
        patterns = [
            f"seq:{chunks[0]}",
            f"seq:{chunks[1]}",
            f"seq:{chunks[2]}",
            "mmap",
            f"pread:{chunks[0]}:{seed}",
            f"pread:{MiB}:{seed + 1}",
            "seq:1048576",
            "mmap",
        ]
        dumps = [tmp_path / f"{repo.replace('/', '-')}-{n}" for n in range(len(patterns))]
        readers = [
            start_reader(p, path, data, delay, dump) for p, delay, dump in zip(patterns, delays, dumps, strict=True)
        ]
        # And readers that open only once the bad copy has been discarded.
        wait_until(lambda: log_count(mount, CHECKSUM_WARNING) > warnings_before, 60, "the bad copy is discarded")
        late = [start_reader(p, path, data) for p in ("seq:65536", "mmap")]
        results = [outcome(r) for r in readers]
        late_results = [outcome(r) for r in late]
        pace.remove()
        assert corrupt.hits == 1, "the corruption must have happened for the example to mean anything"
        if "wrong" in results:
            details = [wrong_pages(d, data) for d, r in zip(dumps, results, strict=True) if r == "wrong"]
            daemon_log = "\n".join(line for line in mount.log().splitlines() if repo in line)
            raise AssertionError(f"{name} corrupt at {offset}: {list(zip(patterns, results, strict=True))}"
                                 f"\n{details}\n{daemon_log}")  # fmt: skip
        assert set(results) <= SAFE, results
        if verify == "strict":
            assert results == ["correct"] * len(results), list(zip(patterns, results, strict=True))
        assert late_results == ["correct", "correct"]

    example()


def test_resumed_partial_file_with_corrupt_bytes_never_completes_a_read(hub: FakeHub, new_repo_id, mxfs_mount) -> None:
    """A copy adopted after ``kill -9`` (a resumed partial file) is a copy like any other: its
    bytes are served at once, and when it fails its checksum its readers fail."""
    repo = new_repo_id()
    data = random.Random(122).randbytes(24 * MiB)
    hub.add_repo(repo, {"config.json": b"{}", "model.safetensors": data})
    slow = hub.inject("slow", repo_id=repo, filename="model.safetensors", bytes_per_second=1_000_000)
    first = mxfs_mount("--lease", "2s")
    path = first / repo / "model.safetensors"
    with open(path, "rb") as f:
        assert os.pread(f.fileno(), 16, 0) == data[:16]
    map_path = first.state_dir / "partials" / repo.replace("/", "--") / f"{sha(data)}.json"
    wait_until(lambda: map_path.exists() and json.loads(map_path.read_text())["ranges"], 30, "a durable map")
    first.kill()
    # A disk fault flips bytes that the map says are present.
    partial_map = json.loads(map_path.read_text())
    start, end = partial_map["ranges"][0]
    partial = first.cache_dir / f"models--{repo.replace('/', '--')}" / "blobs" / partial_map["file"]
    with open(partial, "r+b") as f:
        where = (start + end) // 2
        f.seek(where)
        f.write(bytes(b ^ 0xFF for b in data[where : where + 8]))
    slow.remove()
    # Slow enough that the readers below start long before the copy is complete and checked.
    hub.inject("slow", repo_id=repo, filename="model.safetensors", bytes_per_second=4 * MiB)

    second = mxfs_mount("--lease", "2s", cache_dir=first.cache_dir, state_dir=first.state_dir)
    allow_corruption_warnings(second)
    path = second / repo / "model.safetensors"
    readers = [start_reader(p, path, data) for p in ("seq:1048576", "seq:65536", "mmap", f"pread:{MiB}:7")]
    results = [outcome(r) for r in readers]
    assert "resuming a partial download" in second.log()
    assert log_count(second, CHECKSUM_WARNING) == 1
    assert set(results) <= SAFE and "wrong" not in results, results
    # Those that read from the start were served the flipped bytes before the check.
    assert results[0] == "EIO", results
    assert outcome(start_reader("seq:1048576", path, data)) == "correct"
    first.cleanup()


def test_pages_of_a_discarded_copy_leave_the_page_cache(hub: FakeHub, new_repo_id, mxfs_mount) -> None:
    """A reader that read part of a bad copy and closed the file before the check: its pages
    must not outlive the copy, or a later open of the verified file (``keep_cache``) would read
    them without asking the daemon."""
    repo = new_repo_id()
    data = random.Random(123).randbytes(8 * MiB)
    hub.add_repo(repo, {"config.json": b"{}", "model.safetensors": data})
    hub.inject("corrupt", offset=1000, length=8, covering=True, times=1, repo_id=repo, filename="model.safetensors")
    # Slow enough that the first MiB is read long before the copy is complete and checked.
    hub.inject("slow", bytes_per_second=4 * MiB, repo_id=repo, filename="model.safetensors")
    # FUSE's page cache (keep_cache) is what this guards: with the hand-off, the later opens could
    # go to the view (another inode, no stale pages) and the test would pass without the drop.
    mount = mxfs_mount("--no-handoff")
    allow_corruption_warnings(mount)
    path = mount / repo / "model.safetensors"
    with open(path, "rb", buffering=0) as f:
        head = f.read(MiB)
    assert head != data[:MiB]  # fast mode served the first copy's bytes, flipped ones included
    wait_until(lambda: os.getxattr(path, "user.mxfs.status") == b"cached", 60, "the verified copy is cached")
    assert log_count(mount, CHECKSUM_WARNING) == 1
    with open(path, "rb", buffering=0) as f:
        assert f.read(MiB) == data[:MiB]
    assert outcome(start_reader("mmap", path, data)) == "correct"
    assert "dropped the kernel's cached pages" in mount.log()
