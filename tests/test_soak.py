"""A bounded soak: 32 readers over 3 models for a fixed time, with eviction pressure (room for
2 models) and Hub faults injected all along (503s, stalls, slow answers, cut connections).

It ends with: zero wrong bytes (every block read is compared with the expected content), zero
failed reads, no error in the daemon's log and no warning but those of the injected faults, and
the daemon's open file descriptors and memory back near where they were before, once every handle
is closed.  Every loop is bounded by a deadline and a count.
"""

from __future__ import annotations

import errno
import os
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from tests.hubserver import FakeHub
from tests.mounting import MountedFs, partial_files, requires_fuse, wait_until

pytestmark = requires_fuse

READERS = 32
SOAK_SECONDS = 10.0  # the reading phase
# Each window uses two of the three models, so the third is idle, evicted (room for two) and
# downloaded again when its turn comes: eviction and re-download run under the faults.
WINDOW_SECONDS = 4.0
FAULT_EVERY = 0.4
MiB = 1 << 20
RESET = r"ReadError: \[Errno 104\] Connection reset by peer"
INCOMPLETE = (
    r"RemoteProtocolError: peer closed connection without sending complete message body \(received \d+ bytes, "
    r"expected \d+\)"
)

# What the daemon may hold beyond its baseline once every handle is closed and downloads are
# over.  Descriptors: idle keep-alive connections in huggingface_hub's HTTP pool (the soak opens
# more of them, to the Hub and to the CDN, than the warm-up did); a leak of one per open would be
# thousands.  Memory: glibc gives each thread that allocates its own malloc arena and keeps freed
# memory there; the daemon's ~80 worker threads each allocate 1 MiB read and download buffers, so
# by default RSS settles about 70 MiB above the warm-up (measured: 64 -> 130 MiB after 22 s, 137
# after 60 s: a plateau, not a leak).  The daemon bounds that itself (memory.bound_malloc_retention:
# two arenas, a fixed mmap threshold; measured: 52 -> 74 MiB), so the slack can be tight enough to
# catch a real leak: the soak reads about 15 GiB, and keeping even 0.2% of it would exceed it.
FD_SLACK = 16
# Idle worker threads exit after 10 s (trio's thread cache), and with them their stacks; the daemon
# returns freed heap after a second idle (memory.return_memory_when_idle). Both measurements of
# RSS and descriptors are taken after this long idle (a few trim ticks), so they compare like
# with like.
IDLE_SECONDS = 3.0
# Measured on a 2-core VM with the daemon's own malloc bounds: 50 MiB idle after the warm-up,
# 66-90 MiB idle after the soak (not yet explained in full: a plateau across runs, not a growth
# proportional to what was read; with every connection of a download busy from the start it
# reached 90, and a run past the old 48 MiB slack was seen). 64 MiB is 0.3 % of the ~20 GiB a
# soak reads: a leak of one buffer per read (~13000 reads), or of a fraction of the bytes, still
# exceeds it.
RSS_SLACK = 64 * MiB


def daemon_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def daemon_rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@dataclass
class Tally:
    reads: int = 0
    bytes: int = 0
    wrong: list[str] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)


def read_and_compare(path: Path, expected: bytes, rnd: random.Random, tally: Tally) -> None:
    """One open: the whole file in random-sized reads, or random preads; every block compared."""
    got = 0
    with open(path, "rb") as f:
        if rnd.random() < 0.5 or len(expected) < 4096:
            chunk = rnd.choice((4096, 65536, 1 << 20, 3 << 20))
            offset = 0
            while block := f.read(chunk):
                if block != expected[offset : offset + len(block)]:
                    raise WrongBytes(f"{path.name}@{offset}+{len(block)}")
                offset += len(block)
                got += len(block)
            if offset != len(expected):
                raise WrongBytes(f"{path.name}: {offset} bytes of {len(expected)}")
        else:
            for _ in range(rnd.randint(1, 8)):
                offset = rnd.randrange(len(expected))
                n = rnd.randint(1, 512 * 1024)
                block = os.pread(f.fileno(), n, offset)
                if block != expected[offset : offset + n]:
                    raise WrongBytes(f"{path.name}@{offset}+{n}")
                got += len(block)
    with tally.lock:
        tally.reads += 1
        tally.bytes += got


class WrongBytes(Exception):
    pass


def inject_faults(hub: FakeHub, repos: list[str], stop: threading.Event, rnd: random.Random) -> int:
    """Every FAULT_EVERY seconds, one fault for one request of one model's files."""
    injected = 0
    for _ in range(int(60 / FAULT_EVERY)):  # bounded; the test sets ``stop`` long before
        if stop.wait(FAULT_EVERY):
            break
        repo = rnd.choice(repos)
        kind = rnd.choice(("503", "stall", "slow", "cut", "cut"))
        if kind == "503":
            hub.inject("error", status=503, repo_id=repo, on=("resolve", "cdn"), times=1)
        elif kind == "stall":
            hub.inject("delay", seconds=8, repo_id=repo, on="cdn", times=1)
        elif kind == "slow":
            hub.inject("slow", bytes_per_second=2_000_000, repo_id=repo, times=2)
        else:
            hub.inject("cut", after=rnd.randrange(1, 3_000_000), repo_id=repo, times=1)
        injected += 1
    return injected


def test_soak_32_readers_3_models_eviction_and_faults(hub: FakeHub, new_repo_id, mxfs_mount) -> None:
    rnd = random.Random(31)
    models: dict[str, dict[str, bytes]] = {}
    for i in range(3):
        repo = new_repo_id()
        models[repo] = {
            "config.json": b'{"soak": %d}' % i,
            "tokenizer.json": rnd.randbytes(400_000),
            "model.safetensors": rnd.randbytes(6_000_000),
            "extra/adapter.bin": rnd.randbytes(2_000_000),
        }
        hub.add_repo(repo, models[repo])
    repos = list(models)
    mount: MountedFs = mxfs_mount(
        "--max-models", "2", "--check-interval", "0.5s", "--in-use-grace", "0", "--unused-threshold", "off",
        env={"HF_HUB_DOWNLOAD_TIMEOUT": "2", "HF_HUB_ETAG_TIMEOUT": "2"},
    )  # fmt: skip
    # The injected faults, retried and resumed (WARNING); anything at ERROR is checked below, and
    # any other warning fails the test when it ends.  Models evicted while idle are read again.
    fault = r"/[\w./-]+: (HTTP 503|(connection broke: )?(ReadTimeout: timed out|" + RESET + "|" + INCOMPLETE + "))"
    mount.allowed_log.extend(
        [
            fault + r"; (resuming|retrying) in [\d.]+s$",
            # Faults injected one after the other can use up a request's retries: the download
            # attempt is then tried again as a whole (a read would fail only after three).
            fault + r" \(gave up after 5 attempts\); attempt [23] of 3 in \d+s$",
            r"^\S+@\w+: [\w./-]+ vanished from the cache; fetching it again$",
        ]
    )
    pid = mount.proc.pid

    # Warm-up: every model read by as many readers at once as the soak has, so the baseline
    # includes what any daemon allocates for that much concurrency (imported modules, worker
    # threads, HTTP pool, FUSE request buffers); then let it go idle as at the end (see below).
    tally = Tally()

    def warm_up(seed: int) -> None:
        my = random.Random(seed)
        for repo, files in models.items():
            for name, data in files.items():
                read_and_compare(mount / repo / name, data, my, tally)

    warmers = [threading.Thread(target=warm_up, args=(1000 + i,), daemon=True) for i in range(READERS)]
    for t in warmers:
        t.start()
    for t in warmers:
        t.join(120)
    assert not any(t.is_alive() for t in warmers), "a warm-up reader hung"
    wait_until(lambda: not partial_files(mount.cache_dir), 30, "warm-up downloads done")
    time.sleep(IDLE_SECONDS)
    baseline_fds, baseline_rss = daemon_fds(pid), daemon_rss(pid)

    stop = threading.Event()
    started = time.monotonic()
    deadline = started + SOAK_SECONDS

    def reader(seed: int) -> None:
        my = random.Random(seed)
        for _ in range(100_000):  # bounded; the deadline ends it long before
            now = time.monotonic()
            if now > deadline:
                return
            window = int((now - started) / WINDOW_SECONDS)
            active = [repos[(window + k) % 3] for k in (0, 1)]
            repo = my.choice(active)
            name, data = my.choice(list(models[repo].items()))
            try:
                read_and_compare(mount / repo / name, data, my, tally)
            except WrongBytes as exc:
                with tally.lock:
                    tally.wrong.append(str(exc))
            except OSError as exc:
                with tally.lock:
                    tally.errors[errno.errorcode.get(exc.errno or 0, str(exc))] += 1

    faults = threading.Thread(target=lambda: results.append(inject_faults(hub, repos, stop, rnd)), daemon=True)
    results: list[int] = []
    threads = [threading.Thread(target=reader, args=(i,), daemon=True) for i in range(READERS)]
    faults.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(1.0, deadline + 15 - time.monotonic()))
    stop.set()
    faults.join(5)
    hub.clear_faults()
    assert not any(t.is_alive() for t in threads), "a reader hung"

    assert tally.wrong == [], tally.wrong[:10]
    assert results and results[0] >= 10, "faults were injected all along"
    assert tally.reads >= 300, tally
    # No read may fail: each injected fault hits one request, which is retried or resumed (a 503,
    # a stall past HF_HUB_DOWNLOAD_TIMEOUT, a cut) or merely slow.  None of them is a fault that
    # makes a read fail with an expected errno, so every errno counted here is a failure.
    assert tally.errors == Counter(), f"failed reads by errno: {dict(tally.errors)}"
    log = mount.log()
    assert "reason count" in log, "eviction never ran under the soak"
    assert sum(hub.bytes_served(repo) for repo in repos) > sum(
        len(d) for files in models.values() for d in files.values()
    ), "evicted models were downloaded again"
    errors = [line for line in log.splitlines() if " ERROR " in line or " CRITICAL " in line]
    assert errors == [], errors[:5]

    # Every handle closed, every download over: descriptors and memory back near the baseline.
    wait_until(lambda: not partial_files(mount.cache_dir), 30, "downloads done")
    wait_until(lambda: all(r.done for r in hub.requests()), 30, "no request in flight")
    time.sleep(IDLE_SECONDS)
    fds, rss = daemon_fds(pid), daemon_rss(pid)
    print(f"soak: {tally.reads} reads, {tally.bytes / MiB:.0f} MiB, errors {dict(tally.errors)}, "
          f"fds {baseline_fds} -> {fds}, rss {baseline_rss / MiB:.0f} -> {rss / MiB:.0f} MiB")  # fmt: skip
    assert fds <= baseline_fds + FD_SLACK, (baseline_fds, fds, sorted(os.listdir(f"/proc/{pid}/fd")))
    assert rss <= baseline_rss + RSS_SLACK, (baseline_rss, rss)
    # Still serving, correctly.
    for repo in repos:
        assert (mount / repo / "config.json").read_bytes() == models[repo]["config.json"]
