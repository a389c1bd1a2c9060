"""Faults through a real mount: the Hub failing in every way it can, a full disk, a killed daemon,
a wedged registry.  Whatever happens, a reader gets the right bytes or an error, never wrong bytes,
never a hang, and the cache never holds a corrupt blob or a dangling link.

The Hub look-alike injects the faults (``tests/hubserver.py``); ``HF_HUB_DOWNLOAD_TIMEOUT`` and
``HF_HUB_ETAG_TIMEOUT`` (huggingface_hub's own variables, which mxfs honours) are set low so that
a stalled connection is given up on in seconds.  A "bound" below is how long mxfs may take
before it answers; exceeding it means a hang or retries without end, not a slow machine.

Already covered elsewhere, and not repeated here: a gated repo without a token
(``test_mount.py``), cached models served offline and with the Hub answering 503
(``test_mount.py``), Redis going away and coming back (``test_multinode.py``), a killed owner
taken over by another node (``test_multinode.py``), the free-space rule on a small disk
(``test_evict_mount.py``).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import itertools
import json
import os
import random
import re
import signal
import sqlite3
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.hubserver import FakeHub
from tests.mounting import MountedFs, partial_files, requires_fuse, run_cli, settled_scan, wait_until

pytestmark = requires_fuse

MiB = 1 << 20
# Stalled connections are abandoned after this many seconds (huggingface_hub's variables).
FAST_TIMEOUTS = {"HF_HUB_DOWNLOAD_TIMEOUT": "2", "HF_HUB_ETAG_TIMEOUT": "2"}
# Longest any single failing request may keep a reader waiting before EIO: the Hub client's
# retries (5 attempts, 0.5-4 s apart) inside the fetcher's (3 attempts, 2-4 s apart) take about
# 30 s; twice that is still a bound, where a hang is forever.
EIO_BOUND = 60.0
# How the daemon's retry warnings end (``mount.allowed_log``: each test allows exactly the
# warnings of the faults it injects; anything else it logs at WARNING or above fails it).
RETRYING = r"; retrying in [\d.]+s$"
RESUMING = r"; resuming in [\d.]+s$"
RESET = r"ReadError: \[Errno 104\] Connection reset by peer"
CHECKSUM = r"downloaded bytes do not match the Hub's checksum \(attempt {} of 3\); discarded$"
GAVE_UP = r" \(gave up after 5 attempts\)"
DISK_FULL_RETRY = r"no space left in the cache; evicting unused models, then retrying$"


# -- helpers ------------------------------------------------------------------------------------


def read(path: Path, chunk: int = MiB) -> bytes:
    with open(path, "rb") as f:
        parts = []
        while block := f.read(chunk):
            parts.append(block)
    return b"".join(parts)


def read_checked(path: Path, expected: bytes, chunk: int = 256 * 1024) -> str:
    """Read ``path`` to its end in ``chunk`` pieces, each compared with ``expected`` at once.

    Returns "correct", "wrong" (some piece differed, or the length did), or the errno name of
    the error that ended the read.  "wrong" is the one outcome no test may ever see.
    """
    got = 0
    try:
        with open(path, "rb") as f:
            while block := f.read(chunk):
                if block != expected[got : got + len(block)]:
                    return "wrong"
                got += len(block)
    except OSError as exc:
        return errno.errorcode.get(exc.errno or 0, str(exc.errno))
    return "correct" if got == len(expected) else "wrong"


def read_to_end(path: Path, expected: bytes, chunk: int) -> str:
    """Read ``path`` to its end, then compare: "correct", "wrong", or the errno name of the error."""
    parts = []
    try:
        with open(path, "rb") as f:
            while block := f.read(chunk):
                parts.append(block)
    except OSError as exc:
        return errno.errorcode.get(exc.errno or 0, str(exc.errno))
    return "correct" if b"".join(parts) == expected else "wrong"


def outcome(fn: Callable[[], object]) -> tuple[object, float]:
    """(result, or the errno name of the OSError raised; seconds it took)."""
    started = time.monotonic()
    try:
        result: object = fn()
    except OSError as exc:
        result = errno.errorcode.get(exc.errno or 0, str(exc.errno))
    return result, time.monotonic() - started


def in_threads(calls: dict[str, Callable[[], object]], timeout: float = 120.0) -> dict[str, tuple[object, float]]:
    """Run each call in its own thread; every call must come back (a hang fails the test)."""
    results: dict[str, tuple[object, float]] = {}

    def run(key: str) -> None:
        results[key] = outcome(calls[key])

    threads = [threading.Thread(target=run, args=(key,), daemon=True) for key in calls]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    hung = [key for key in calls if key not in results]
    assert not hung, f"no answer within {timeout}s (a hang): {hung}"
    return results


def status_of(path: Path) -> bytes:
    try:
        return os.getxattr(path, "user.mxfs.status")
    except OSError:
        return b"?"


def wait_cached(mount: MountedFs, repo: str, names: list[str], timeout: float = 60.0) -> None:
    """Wait until the background download has verified and published every one of ``names``,
    and the entry is recorded as downloaded (a reader can be done before both)."""
    wait_until(
        lambda: (
            all(status_of(mount / repo / name) == b"cached" for name in names)
            and status_of(mount / repo) == b"downloaded"
        ),
        timeout,
        f"{repo}: {names} cached",
    )


def trigger(mount: MountedFs, repo: str, name: str) -> None:
    """Start the download of ``repo``'s entry without reading anything (open() starts it)."""
    with open(mount / repo / name, "rb"):
        pass


def repo_dir(cache_dir: Path, repo: str) -> Path:
    return cache_dir / f"models--{repo.replace('/', '--')}"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def blob_matches_its_name(blob: Path) -> bool:
    data = blob.read_bytes()
    if len(blob.name) == 64:
        return hashlib.sha256(data).hexdigest() == blob.name
    return git_blob_sha1(data) == blob.name


def assert_cache_sound(cache_dir: Path, *, settle: float = 20.0) -> None:
    """No partial file left, no dangling link or ref, and every blob's bytes match its name."""
    wait_until(lambda: not partial_files(cache_dir), settle, "partial files cleaned up")
    info = settled_scan(cache_dir)
    assert info.warnings == [], info.warnings
    for path in cache_dir.rglob("*"):
        if path.is_symlink():
            assert path.exists(), f"dangling symlink {path}"
            assert path.resolve().is_relative_to(cache_dir.resolve()), f"{path} points out of the cache"
    for blob in cache_dir.glob("models--*/blobs/*"):
        assert blob_matches_its_name(blob), f"corrupt blob {blob}"


def lfs_etag(hub: FakeHub, repo: str, name: str) -> str:
    return str(hub.file_info(repo, name)["etag"])


# -- the Hub misbehaving ---------------------------------------------------------------------------


def test_transient_errors_and_stalls_are_retried_with_backoff(
    hub: FakeHub, new_repo_id, mxfs_mount, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = new_repo_id()
    monkeypatch.setattr(hub, "tree_page_size", 2)  # the listing comes in three pages
    rnd = random.Random(21)
    files = {
        "config.json": b'{"faults": "transient"}',
        "errors.safetensors": rnd.randbytes(3_000_000),
        "stalled-headers.safetensors": rnd.randbytes(3_000_000),
        "stalled-body.safetensors": rnd.randbytes(5_000_000),
        "throttled.bin": rnd.randbytes(1_000_000),
    }
    hub.add_repo(repo, files)
    # Metadata: the revision fails twice (503), the tree listing once (502).
    hub.inject("error", status=503, on="api", path="*/revision/*", times=2)
    hub.inject("error", status=502, on="api", path="*/tree/*", times=1)
    # Bytes: two 500s; an answer whose headers never come; a body that stops mid-way; a 429.
    hub.inject("error", status=500, filename="errors.safetensors", times=2)
    hub.inject("delay", seconds=60, on="cdn", filename="stalled-headers.safetensors", times=1)
    hub.inject("delay", after=2_500_000, seconds=60, filename="stalled-body.safetensors", times=1)
    hub.inject("error", status=429, retry_after=1, filename="throttled.bin", times=1)
    mount = mxfs_mount(env=FAST_TIMEOUTS)
    mount.allowed_log.extend(
        [
            r"^resolve \S+@main: \S+@main: HTTP 503" + RETRYING,
            r"^list \S+: \S+: HTTP 502" + RETRYING,
            r"/errors\.safetensors: HTTP 500" + RESUMING,
            r"/stalled-headers\.safetensors: (connection broke: )?ReadTimeout: timed out" + RESUMING,
            r"/stalled-body\.safetensors: connection broke: ReadTimeout: timed out" + RESUMING,
            r"/throttled\.bin: HTTP 429" + RESUMING,
        ]
    )

    assert sorted(os.listdir(mount / repo)) == sorted(files)
    trigger(mount, repo, "config.json")
    wait_cached(mount, repo, list(files))
    for name, data in files.items():
        assert read(mount / repo / name) == data, name

    # Each failure cost one more request, no more: retried, and bounded.
    assert len(hub.requests(kind="api", repo_id=repo, status=503)) == 2
    assert len(hub.requests(kind="api", repo_id=repo, status=502)) == 1
    assert len([r for r in hub.requests(kind="api", repo_id=repo, status=200) if "/tree/" in r.path]) == 3
    errors = [r for r in hub.requests(repo_id=repo, filename="errors.safetensors") if r.kind == "resolve"]
    assert [r.status for r in errors] == [500, 500, 302]
    # With backoff between attempts (a lower bound on time, never an upper one).
    assert all(b.started - a.started >= 0.25 for a, b in itertools.pairwise(errors))
    # A stall is abandoned and the transfer resumed, not restarted: at most the last MiB again.
    for name, data in files.items():
        served = hub.bytes_served(repo, name)
        assert len(data) <= served <= len(data) + MiB, (name, served)
    assert "retrying" in mount.log()
    assert_cache_sound(mount.cache_dir)


def test_connections_cut_mid_file_resume_where_they_stopped(hub: FakeHub, new_repo_id, mxfs_mount) -> None:
    repo = new_repo_id()
    rnd = random.Random(22)
    files = {
        "config.json": b'{"faults": "cut"}',
        "cut.safetensors": rnd.randbytes(8_000_000),
        "truncated.safetensors": rnd.randbytes(6_000_000),
        "no-range.safetensors": rnd.randbytes(6_000_000),
        "small-cut.json": rnd.randbytes(300_000),
    }
    hub.add_repo(repo, files)
    # Three answers in a row reset (RST) after 1.5 MB each.
    hub.inject("cut", after=1_500_000, filename="cut.safetensors", times=3)
    # Content-Length says 6 MB, the server closes (FIN) after 2.5 MB.
    hub.inject("truncate", after=2_500_000, filename="truncated.safetensors", times=1)
    # A server (or proxy) that ignores Range: the first answer is cut, and the resumed request,
    # which asks from the middle of the file, gets the whole file with 200.
    hub.inject("ignore_range", filename="no-range.safetensors", times=2)
    hub.inject("cut", after=3_000_000, filename="no-range.safetensors", times=1)
    # A small (non-LFS) file served by /resolve itself, cut too.
    hub.inject("cut", after=100_000, reset=False, filename="small-cut.json", times=1)
    mount = mxfs_mount(env=FAST_TIMEOUTS)
    incomplete = r"connection broke: RemoteProtocolError: peer closed connection without sending complete message body"
    mount.allowed_log.extend(
        [
            r"/(cut|no-range)\.safetensors: connection broke: " + RESET + RESUMING,
            r"/(truncated\.safetensors|small-cut\.json): "
            + incomplete
            + r" \(received \d+ bytes, expected \d+\)"
            + RESUMING,
        ]
    )

    trigger(mount, repo, "config.json")
    wait_cached(mount, repo, list(files))
    for name, data in files.items():
        assert read(mount / repo / name) == data, name

    # Resumed where each transfer stopped: every retry asks for a later start, and the bytes
    # the Hub sent exceed the file by at most the unwritten tail (< 1 MiB) of each cut answer.
    # Starting over each time would cost the cut file 3 x 1.5 MB more than its size.
    cut = [r for r in hub.requests(kind="cdn", filename="cut.safetensors") if r.repo_id == repo]
    assert len(cut) == 4
    starts = [int(r.range.split("=")[1].split("-")[0]) for r in cut if r.range]
    assert starts == sorted(starts) and len(set(starts)) == 4, starts
    assert hub.bytes_served(repo, "cut.safetensors") <= len(files["cut.safetensors"]) + 3 * MiB
    assert hub.bytes_served(repo, "truncated.safetensors") <= len(files["truncated.safetensors"]) + MiB
    assert hub.bytes_served(repo, "small-cut.json") <= len(files["small-cut.json"]) + MiB
    # Ignoring Range costs the skipped prefix, never correctness.
    no_range = [r for r in hub.requests(kind="cdn", filename="no-range.safetensors") if r.repo_id == repo]
    assert [r.status for r in no_range] == [200, 200]
    assert no_range[1].range is not None and not no_range[1].range.startswith("bytes=0-")
    assert_cache_sound(mount.cache_dir)


def test_corrupt_bodies_are_detected_discarded_and_fetched_again(
    hub: FakeHub, new_repo_id, mxfs_mount, tmp_path: Path
) -> None:
    once, always = new_repo_id(), new_repo_id()
    rnd = random.Random(23)
    once_files = {"config.json": b'{"corrupt": "once"}', "model.safetensors": rnd.randbytes(6_000_000)}
    always_files = {"config.json": b'{"corrupt": "always"}', "model.safetensors": rnd.randbytes(2_000_000)}
    hub.add_repo(once, once_files)
    hub.add_repo(always, always_files)
    size = len(once_files["model.safetensors"])

    # Fast mode, the copy checked before anyone reads it: discarded, downloaded again, served right.
    hub.inject("corrupt", offset=size - 1000, length=16, repo_id=once, filename="model.safetensors", times=1)
    fast = mxfs_mount(cache_dir=tmp_path / "fast-cache")
    fast.allowed_log.append(re.escape(once) + r"@\w+/model\.safetensors: " + CHECKSUM.format(1))
    trigger(fast, once, "config.json")
    wait_cached(fast, once, list(once_files))
    assert read(fast / once / "model.safetensors") == once_files["model.safetensors"]
    assert hub.bytes_served(once, "model.safetensors") == 2 * size
    assert "do not match the Hub's checksum" in fast.log()
    assert_cache_sound(fast.cache_dir)
    assert fast.stop() == 0

    # Strict mode, readers already waiting while the bytes arrive: they never see the corrupt
    # copy. One corruption: they get the right bytes. A Hub that always corrupts: EIO, bounded.
    hub.reset_log()
    hub.inject("corrupt", offset=size // 2, length=16, repo_id=once, filename="model.safetensors", times=1)
    hub.inject("slow", bytes_per_second=6_000_000, repo_id=once, filename="model.safetensors", times=1)
    hub.inject("corrupt", offset=1_500_000, length=1, repo_id=always, filename="model.safetensors")
    strict = mxfs_mount("--verify", "strict", cache_dir=tmp_path / "strict-cache")
    failed = re.escape(always) + r"@\w+/model\.safetensors: checksum mismatch after 3 downloads"
    strict.allowed_log.extend(
        [
            re.escape(once) + r"@\w+/model\.safetensors: " + CHECKSUM.format(1),
            re.escape(always) + r"@\w+/model\.safetensors: " + CHECKSUM.format("[123]"),
            failed + r"; attempt [23] of 3 in \d+s$",
            r"download failed: " + failed + "$",
            r"^read: " + failed + "$",
        ]
    )
    results = in_threads(
        {
            **{
                f"once-{i}": lambda chunk=chunk: read_checked(
                    strict / once / "model.safetensors", once_files["model.safetensors"], chunk
                )
                for i, chunk in enumerate((4096, 65536, MiB))
            },
            **{
                f"always-{i}": lambda chunk=chunk: read_checked(
                    strict / always / "model.safetensors", always_files["model.safetensors"], chunk
                )
                for i, chunk in enumerate((4096, MiB))
            },
        }
    )
    for key, (result, seconds) in results.items():
        if key.startswith("once"):
            assert result == "correct", (key, result)
        else:
            assert result == "EIO", (key, result)
            assert seconds < EIO_BOUND, (key, seconds)
    assert hub.bytes_served(once, "model.safetensors") == 2 * size
    # The copy that never verified is nowhere in the cache, under any name.
    bad_etag = lfs_etag(hub, always, "model.safetensors")
    assert not list(repo_dir(strict.cache_dir, always).glob(f"blobs/{bad_etag}*"))
    assert not any(p.name == "model.safetensors" for p in repo_dir(strict.cache_dir, always).rglob("*"))
    assert_cache_sound(strict.cache_dir)


def test_fast_mode_reader_of_a_copy_that_fails_its_checksum_never_completes(
    hub: FakeHub, new_repo_id, mxfs_mount
) -> None:
    repo = new_repo_id()
    data = random.Random(24).randbytes(8_000_000)
    hub.add_repo(repo, {"config.json": b"{}", "model.safetensors": data})
    # Every copy the Hub sends is corrupt, so the only right outcome is EIO; and slow enough that
    # the reader keeps up with the download.
    hub.inject("corrupt", offset=6_000_000, length=16, repo_id=repo, filename="model.safetensors")
    hub.inject("slow", bytes_per_second=8_000_000, repo_id=repo, filename="model.safetensors")
    mount = mxfs_mount()
    failed = re.escape(repo) + r"@\w+/model\.safetensors: checksum mismatch after 3 downloads"
    mount.allowed_log.extend(
        [
            re.escape(repo) + r"@\w+/model\.safetensors: " + CHECKSUM.format("[123]"),
            r"^read: "
            + re.escape(repo)
            + r"@\w+/model\.safetensors: bytes served through this handle came from a copy that was discarded "
            + r"unverified",
            failed + r"; attempt [23] of 3 in \d+s$",
            r"download failed: " + failed + "$",
        ]
    )
    # Fast mode serves bytes before they are verified (DESIGN section 5): what it promises is that
    # no reader *completes* with them. Read to the end, then judge.
    results = in_threads({"reader": lambda: read_to_end(mount / repo / "model.safetensors", data, 65536)})
    assert results["reader"][0] == "EIO", results


def test_gated_forbidden_and_private_repos(hub: FakeHub, new_repo_id, mxfs_mount) -> None:
    """401/403 are answered at once (no retries) and the log tells the user what to do."""
    gated, forbidden, private = new_repo_id(), new_repo_id(), new_repo_id()
    hub.add_repo(gated, {"config.json": b"{}", "model.safetensors": b"g" * 100_000}, gated=True)
    hub.add_repo(forbidden, {"config.json": b"{}", "model.safetensors": b"f" * 100_000})
    hub.add_repo(private, {"config.json": b"{}"}, private=True)
    hub.valid_tokens.add("hf_the_right_one")
    # A plain 403 without an error code, as a region block or a disabled repo answers.
    hub.inject(
        "error", status=403, repo_id=forbidden, on=("resolve", "cdn"), message="Access to this resource is disabled"
    )
    wrong_token = "hf_wrong_token_0123456789"
    mount = mxfs_mount(env={"HF_TOKEN": wrong_token, "HF_HUB_DISABLE_IMPLICIT_TOKEN": "0"})
    mount.allowed_log.extend(
        [
            # The file read, or the other one: the download of the whole entry starts with it.
            re.escape(gated) + r"@\w+/[\w.]+: gated repo, access not granted; set HF_TOKEN to a token with",
            re.escape(forbidden) + r"@\w+/[\w.]+: HTTP 403; set HF_TOKEN to a token with access",
        ]
    )

    for repo in (gated, forbidden):
        # Metadata is public: the directory lists; the bytes are refused.
        assert sorted(os.listdir(mount / repo)) == ["config.json", "model.safetensors"]
        result, seconds = outcome(lambda repo=repo: read(mount / repo / "model.safetensors"))
        assert result == "EACCES", (repo, result)
        assert seconds < 10, (repo, seconds)  # not retried like a transient failure
        hints = [line for line in mount.log().splitlines() if repo in line and "HF_TOKEN" in line]
        assert hints, f"no log line names {repo} and HF_TOKEN"
        assert not list(repo_dir(mount.cache_dir, repo).glob("blobs/*")), "bytes of a refused file were kept"
    assert len([r for r in hub.requests(repo_id=forbidden) if r.status == 403]) <= 2
    # The Hub hides private repos behind a 401 "not found": ENOENT, once (the miss is cached).
    assert outcome(lambda: os.listdir(mount / private))[0] == "ENOENT"
    assert outcome(lambda: os.stat(mount / private))[0] == "ENOENT"
    assert len(hub.requests(repo_id=private)) == 1
    assert wrong_token not in mount.log()
    # The wrong token went to the Hub, never to the CDN.
    assert {r.auth for r in hub.requests(kind="resolve")} == {wrong_token}
    assert all(r.auth is None for r in hub.requests(kind="cdn"))


def test_a_failed_download_leaves_no_empty_snapshot(hub: FakeHub, new_repo_id, mxfs_mount) -> None:
    repo = new_repo_id()
    hub.add_repo(repo, {"config.json": b"{}"}, gated=True)
    mount = mxfs_mount()
    mount.allowed_log.append(
        re.escape(repo) + r"@\w+/config\.json: gated repo, access not granted; set HF_TOKEN to a token with access"
    )
    assert outcome(lambda: read(mount / repo / "config.json"))[0] == "EACCES"
    assert not (repo_dir(mount.cache_dir, repo) / "snapshots" / hub.head(repo)).exists()


def test_dead_hub_gives_eio_in_bounded_time_cache_still_served(hub: FakeHub, new_repo_id, mxfs_mount) -> None:
    cached, resolved, unknown, tree_503, tree_stall, later = (new_repo_id() for _ in range(6))
    rnd = random.Random(25)
    models = {
        repo: {"config.json": b'{"n": %d}' % i, "model.safetensors": rnd.randbytes(1_500_000)}
        for i, repo in enumerate((cached, resolved, unknown, tree_503, tree_stall, later))
    }
    for repo, files in models.items():
        hub.add_repo(repo, files)
    mount = mxfs_mount(env={**FAST_TIMEOUTS, "HF_HUB_ETAG_TIMEOUT": "1"})
    # Each fault below, as the daemon reports it: retried, given up on, answered with EIO.
    faults = {unknown: RESET, tree_503: "HTTP 503", tree_stall: "ReadTimeout: timed out"}
    for repo, fault in faults.items():
        name = re.escape(repo) + r"@\w+"
        mount.allowed_log.extend(
            [rf"^(resolve|list) {name}: {name}: {fault}{RETRYING}", rf"^lookup: {name}: {fault}{GAVE_UP}$"]
        )
    bytes_failed = re.escape(resolved) + r"@\w+/[\w.]+: " + RESET
    mount.allowed_log.extend(
        [
            bytes_failed + RESUMING,
            bytes_failed + GAVE_UP + r"; attempt [23] of 3 in \d+s$",
            r"download failed: " + bytes_failed + GAVE_UP + "$",
            r"^read: " + bytes_failed + GAVE_UP + "$",
        ]
    )
    assert read(mount / cached / "model.safetensors") == models[cached]["model.safetensors"]
    wait_cached(mount, cached, list(models[cached]))
    os.listdir(mount / resolved)  # its tree is known, none of its bytes are

    # Per repo, so each way of failing is seen on its own: no answer at all (connection reset);
    # tree listings answered 503 forever; tree listings that never answer.
    for repo in (cached, resolved, unknown):
        hub.inject("down", reset=True, repo_id=repo)
    hub.inject("error", status=503, on="api", path="*/tree/*", repo_id=tree_503)
    hub.inject("delay", seconds=60, on="api", path="*/tree/*", repo_id=tree_stall)
    failing = in_threads(
        {
            "unknown model": lambda: os.listdir(mount / unknown),
            "tree 503": lambda: os.listdir(mount / tree_503),
            "tree stalls": lambda: os.listdir(mount / tree_stall),
            "uncached bytes": lambda: read(mount / resolved / "model.safetensors"),
            # Meanwhile the cached model is served as usual, by fresh opens too.
            "cached": lambda: [read(mount / cached / name) for name in models[cached] for _ in range(3)],
            "listing": lambda: sorted(os.listdir(mount / resolved)),
        },
        timeout=2 * EIO_BOUND,
    )
    for key in ("unknown model", "tree 503", "tree stalls", "uncached bytes"):
        result, seconds = failing[key]
        assert result == "EIO", (key, result)
        assert seconds < EIO_BOUND, (key, seconds)
    assert failing["cached"][0] == [data for data in models[cached].values() for _ in range(3)]
    assert failing["listing"][0] == sorted(models[resolved])
    # Bounded means bounded in requests too: a handful of attempts, not one per retry of a retry.
    assert len(hub.requests(repo_id=tree_503, status=503)) <= 6

    # The whole Hub down (every request reset): the cache is still served, listings included.
    hub.clear_faults()
    with hub.inject("down", reset=True):
        assert read(mount / cached / "model.safetensors") == models[cached]["model.safetensors"]
        assert cached.split("/")[0] in os.listdir(mount.mountpoint)
        assert os.getxattr(mount / cached / "model.safetensors", "user.mxfs.status") == b"cached"
    # Back up: a model never seen before works at once (failures during the outage were not
    # cached as "not found").
    assert read(mount / unknown / "config.json") == models[unknown]["config.json"]
    assert read(mount / later / "model.safetensors") == models[later]["model.safetensors"]
    assert_cache_sound(mount.cache_dir)


def test_sigterm_with_stalled_hub_requests_exits_within_10s(hub: FakeHub, new_repo_id, mxfs_mount) -> None:
    looked_up, downloaded = new_repo_id(), new_repo_id()
    hub.add_repo(looked_up, {"config.json": b"{}"})
    hub.add_repo(downloaded, {"config.json": b"{}", "model.safetensors": b"s" * 3_000_000})
    hub.inject("delay", seconds=60, repo_id=looked_up, on="api")
    hub.inject("delay", seconds=60, repo_id=downloaded, filename="model.safetensors", on="cdn")
    mount = mxfs_mount(env={"HF_HUB_ETAG_TIMEOUT": "60", "HF_HUB_DOWNLOAD_TIMEOUT": "60"})
    trigger(mount, downloaded, "config.json")
    lookup = threading.Thread(target=outcome, args=(lambda: os.stat(mount / looked_up),), daemon=True)
    lookup.start()
    wait_until(
        lambda: (
            bool(hub.requests(kind="api", repo_id=looked_up)) and bool(hub.requests(kind="cdn", repo_id=downloaded))
        ),
        10,
        "both requests reached the Hub",
    )
    started = time.monotonic()
    mount.proc.send_signal(signal.SIGTERM)
    try:
        assert mount.proc.wait(10) == 0
    except subprocess.TimeoutExpired:
        raise AssertionError(f"mxfs still running {time.monotonic() - started:.0f}s after SIGTERM") from None
    assert not os.path.ismount(mount.mountpoint)


def test_offline_mode_never_calls_the_hub(hub: FakeHub, new_repo_id, mxfs_mount) -> None:
    cached, listed = new_repo_id(), new_repo_id()
    hub.add_repo(cached, {"config.json": b'{"offline": 1}', "model.safetensors": b"c" * 500_000})
    hub.add_repo(listed, {"config.json": b'{"offline": 2}', "weights/model.bin": b"l" * 500_000})
    online = mxfs_mount()
    assert read(online / cached / "model.safetensors") == b"c" * 500_000
    wait_cached(online, cached, ["config.json", "model.safetensors"])
    assert sorted(os.listdir(online / listed)) == ["config.json", "weights"]
    assert online.stop() == 0

    hub.reset_log()
    offline = mxfs_mount(state_dir=online.state_dir, env={"HF_HUB_OFFLINE": "1"})
    not_cached = "HF_HUB_OFFLINE is set and this is not cached"
    not_all_cached = re.escape(listed) + r"@\w+: HF_HUB_OFFLINE is set and not all of its files are cached$"
    offline.allowed_log.extend(
        [
            r"^\S+: download failed: " + not_all_cached,
            "^read: " + not_all_cached,
            rf"^lookup: (someone/never-seen@main|{re.escape(cached)}@v9): {not_cached}$",
        ]
    )
    assert read(offline / cached / "config.json") == b'{"offline": 1}'
    # A model whose listing is known but whose bytes are not: it lists, with exact sizes, and
    # reading it fails in bounded time instead of reaching for the Hub.
    assert sorted(os.listdir(offline / listed)) == ["config.json", "weights"]
    assert os.stat(offline / listed / "weights" / "model.bin").st_size == 500_000
    assert os.getxattr(offline / listed / "config.json", "user.mxfs.status") == b"remote"
    result, seconds = outcome(lambda: read(offline / listed / "config.json"))
    assert result == "ENOENT", result  # at once: nothing is claimed, waited for or retried
    assert seconds < EIO_BOUND
    assert outcome(lambda: os.stat(offline / "someone" / "never-seen"))[0] == "ENOENT"
    assert outcome(lambda: os.stat(offline / cached.split("/")[0] / f"{cached.split('/')[1]}@v9"))[0] == "ENOENT"
    assert hub.requests() == []


# -- local faults ----------------------------------------------------------------------------------


def make_models(hub: FakeHub, new_repo_id: Callable[[], str], sizes: list[int], seed: int) -> dict[str, bytes]:
    rnd = random.Random(seed)
    models = {}
    for size in sizes:
        repo = new_repo_id()
        data = rnd.randbytes(size)
        hub.add_repo(repo, {"config.json": b'{"size": %d}' % size, "model.safetensors": data})
        models[repo] = data
    return models


def test_disk_full_evicts_retries_then_enospc_with_no_partial_blob(
    hub: FakeHub, new_repo_id, mxfs_mount, small_tmpfs: Path
) -> None:
    models = make_models(hub, new_repo_id, [12_000_000, 15_000_000, 30_000_000], seed=26)
    first, second, too_big = models
    # The free-space rule, with a check interval so long that eviction here runs only because a
    # download hit ENOSPC.
    mount = mxfs_mount(
        "--min-free-space", "20MiB", "--check-interval", "1h", "--in-use-grace", "0", "--unused-threshold", "off",
        cache_dir=small_tmpfs / "cache",
    )  # fmt: skip
    # Whichever file of a model starts while the disk is full (all of them start at once).
    no_space = re.escape(too_big) + r"@\w+/[\w.]+: no space left in the cache$"
    mount.allowed_log.extend(
        [
            rf"({re.escape(second)}|{re.escape(too_big)})@\w+/[\w.]+: {DISK_FULL_RETRY}",
            r"^\S+: download failed: " + no_space,
            "^read: " + no_space,
            # The second model, evicted to make room for the big one, is read again at the end.
            re.escape(second) + r"@\w+: model\.safetensors vanished from the cache; fetching it again$",
        ]
    )
    assert read(mount / first / "model.safetensors") == models[first]
    wait_cached(mount, first, ["config.json", "model.safetensors"])
    # 12 MB used, 13 MB free: the second model fits only once the first is evicted.
    assert read(mount / second / "model.safetensors") == models[second]
    wait_cached(mount, second, ["config.json", "model.safetensors"])
    assert "no space left" in mount.log() and "reason disk" in mount.log()
    # Bigger than the whole disk: eviction cannot help; ENOSPC, in bounded time.
    result, seconds = outcome(lambda: read(mount / too_big / "model.safetensors"))
    assert result == "ENOSPC", result
    assert seconds < EIO_BOUND
    # No partial blob is visible under any name, and nothing links to one.  (Its small config.json
    # may have been verified and cached before the big file failed: a whole blob, not a partial.)
    big = repo_dir(mount.cache_dir, too_big)
    blobs = list(big.glob("blobs/*"))
    assert not any(b.name.startswith(lfs_etag(hub, too_big, "model.safetensors")) for b in blobs), blobs
    assert all(blob_matches_its_name(b) for b in blobs), blobs
    assert not list(big.glob("snapshots/*/*")), "a snapshot link of a failed download"
    assert status_of(mount / too_big / "model.safetensors") != b"cached"
    # The mount carries on: what fits is served (downloaded again if it was evicted meanwhile).
    assert read(mount / second / "model.safetensors") == models[second]
    assert_cache_sound(mount.cache_dir)


def test_disk_full_makes_room_without_a_free_space_rule(
    hub: FakeHub, new_repo_id, mxfs_mount, small_tmpfs: Path
) -> None:
    models = make_models(hub, new_repo_id, [12_000_000, 15_000_000], seed=27)
    first, second = models
    mount = mxfs_mount(
        "--check-interval", "1h", "--in-use-grace", "0", "--unused-threshold", "off", cache_dir=small_tmpfs / "cache"
    )
    # Whichever file of the model starts while the disk is full (all start at once).
    mount.allowed_log.append(re.escape(second) + r"@\w+/[\w.]+: " + DISK_FULL_RETRY)
    assert read(mount / first / "model.safetensors") == models[first]
    wait_cached(mount, first, ["config.json", "model.safetensors"])
    assert outcome(lambda: read(mount / second / "model.safetensors"))[0] == models[second]


def test_daemon_killed_mid_download_then_restarted(hub: FakeHub, new_repo_id, mxfs_mount, tmp_path: Path) -> None:
    """kill -9 with one entry just claimed, one mid-file, one with some files published."""
    claimed, mid_file, published = new_repo_id(), new_repo_id(), new_repo_id()
    rnd = random.Random(28)
    models = {
        repo: {
            "config.json": b'{"killed": "%s"}' % repo.encode(),
            "tokenizer.json": rnd.randbytes(200_000),
            "model.safetensors": rnd.randbytes(12_000_000),
        }
        for repo in (claimed, mid_file, published)
    }
    for repo, files in models.items():
        hub.add_repo(repo, files)
    hub.inject("delay", seconds=30, repo_id=claimed, on=("resolve", "cdn"))  # nothing arrives
    hub.inject("slow", bytes_per_second=1_000_000, repo_id=mid_file, filename="model.safetensors")
    hub.inject("delay", seconds=30, repo_id=published, filename="model.safetensors", on=("resolve", "cdn"))
    state = tmp_path / "state"
    first = mxfs_mount("--lease", "2s", state_dir=state)
    for repo in models:
        trigger(first, repo, "config.json")

    def killable() -> bool:
        mid_sent = sum(r.bytes_sent for r in hub.requests(kind="cdn", repo_id=mid_file, filename="model.safetensors"))
        blobs = repo_dir(first.cache_dir, published) / "blobs"
        small = {git_blob_sha1(models[published][n]) for n in ("config.json", "tokenizer.json")}
        return (
            first.log().count("downloading 3 files") == 3
            and mid_sent >= 3_000_000
            and small <= {p.name for p in blobs.iterdir()}
        )

    wait_until(killable, 30, "every entry at its kill point")
    assert status_of(first / mid_file / "model.safetensors") == b"downloading"
    first.kill()
    hub.clear_faults()
    assert_cache_sound_now(first.cache_dir)

    second = mxfs_mount("--lease", "2s", state_dir=state)
    results = in_threads(
        {
            f"{repo}/{name}": lambda repo=repo, name=name, data=data: read_checked(second / repo / name, data)
            for repo, files in models.items()
            for name, data in files.items()
        }
    )
    assert {key: result for key, (result, _) in results.items()} == {key: "correct" for key in results}
    for repo, files in models.items():
        wait_cached(second, repo, list(files))
    assert_cache_sound(second.cache_dir)
    status = run_cli("status", "--json", "--state-dir", str(state), "--cache-dir", str(second.cache_dir))
    assert status.returncode == 0, status.stderr
    rows = {row["model"]: row for row in map(json.loads, status.stdout.splitlines())}
    assert {repo: rows[repo]["status"] for repo in models} == dict.fromkeys(models, "DOWNLOADED")


def assert_cache_sound_now(cache_dir: Path) -> None:
    """What a crash leaves: partial files maybe, but no corrupt blob and no dangling link."""
    info = settled_scan(cache_dir)
    assert info.warnings == [], info.warnings
    for path in cache_dir.rglob("*"):
        if path.is_symlink():
            assert path.exists(), f"dangling symlink {path}"
    for blob in cache_dir.glob("models--*/blobs/*"):
        if not blob.name.endswith(".incomplete"):
            assert blob_matches_its_name(blob), f"corrupt blob {blob}"


@contextlib.contextmanager
def registry_write_locked(db: Path) -> Iterator[None]:
    """Hold the SQLite registry's write lock, as a wedged process on the node would."""
    conn = sqlite3.connect(db, timeout=5, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        yield
    finally:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")
        conn.close()


def test_wedged_registry_does_not_stop_cached_reads(hub: FakeHub, new_repo_id, mxfs_mount) -> None:
    """Another process holds the SQLite registry's write lock: cached models keep being served,
    with the right bytes."""
    cached, uncached = new_repo_id(), new_repo_id()
    files = {"config.json": b'{"r": 1}', "model.safetensors": random.Random(29).randbytes(2_000_000)}
    hub.add_repo(cached, files)
    hub.add_repo(uncached, {"config.json": b'{"r": 2}'})
    mount = mxfs_mount()
    assert read(mount / cached / "model.safetensors") == files["model.safetensors"]
    wait_cached(mount, cached, list(files))
    with registry_write_locked(mount.state_dir / "registry.db"):
        results = in_threads(
            {
                **{
                    f"read-{i}": lambda chunk=chunk: {
                        name: sha256(read(mount / cached / name, chunk)) for name in files
                    }
                    for i, chunk in enumerate((4096, 65536, MiB, 3 * MiB))
                },
                "listing": lambda: sorted(os.listdir(mount / cached)),
                "xattr": lambda: os.getxattr(mount / cached / "config.json", "user.mxfs.status"),
            }
        )
    expected = {
        **{f"read-{i}": {name: sha256(data) for name, data in files.items()} for i in range(4)},
        "listing": sorted(files),
        "xattr": b"cached",
    }
    assert {key: result for key, (result, _) in results.items()} == expected
    for key, (_, seconds) in results.items():
        assert seconds < 5, (key, seconds)  # served without waiting for the registry
    # Once the lock is gone, new downloads are claimed as usual.
    assert read(mount / uncached / "config.json") == b'{"r": 2}'
