"""Small pieces of the fetch path: hashes, the entry index, chunk order, range bodies, Hub errors,
reads and the places readers wait."""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import itertools
import json
import os
import random
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import httpx2
import pytest
import trio
import trio.lowlevel
import trio.testing
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
)
from huggingface_hub.utils import hf_raise_for_status
from hypothesis import given
from hypothesis import strategies as st

from mxfs.errors import AccessDenied, HubUnavailable, MxfsError, NotFound, OfflineMiss, errno_for
from mxfs.fetch.entry import Entry
from mxfs.fetch.files import FileState, SharedFd, read_at
from mxfs.fetch.transfer import first_bytes, write_all
from mxfs.fetch.verify import PrefixHasher
from mxfs.hub import MAX_BATCH_PIECES, RangeBody, Transient, _translate
from mxfs.names import EntryName
from mxfs.tree import HubFile, RepoTree

COMMIT = "c" * 40


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data, usedforsecurity=False).hexdigest()


def write_file(tmp_path: Path, data: bytes, name: str = "f") -> int:
    path = tmp_path / name
    path.write_bytes(data)
    return os.open(path, os.O_RDONLY)


# -- the Hub's checksums (PrefixHasher) -----------------------------------------------------------


def hash_matches(fd: int, file: HubFile) -> bool:
    """Whether the first ``file.size`` bytes of ``fd``, hashed in one pass, have the Hub's checksum."""
    hasher = PrefixHasher(file)
    try:
        hasher.feed(fd, file.size)
    except OSError:  # shorter than its size
        return False
    return hasher.matches()


def test_git_blob_sha1_is_what_git_computes() -> None:
    # `git hash-object` of an empty file and of "hello\n".
    assert git_blob_sha1(b"") == "e69de29bb2d1d6434b8b29ae775ad8c2e48c5391"
    assert git_blob_sha1(b"hello\n") == "ce013625030ba8dba906f756967f9e9ca394464a"


@pytest.mark.parametrize("data", [b"", b"hello\n", b'{"a": 1}', os.urandom(3 * 1024 * 1024 + 17)])
def test_hash_matches_non_lfs(tmp_path: Path, data: bytes) -> None:
    fd = write_file(tmp_path, data)
    try:
        good = HubFile("config.json", len(data), git_blob_sha1(data))
        assert hash_matches(fd, good)
        # A plain sha1 of the bytes (without git's header) is not the blob id.
        plain = HubFile("config.json", len(data), hashlib.sha1(data, usedforsecurity=False).hexdigest())
        assert not hash_matches(fd, plain)
        assert not hash_matches(fd, HubFile("config.json", len(data), git_blob_sha1(data + b"x")))
    finally:
        os.close(fd)


def test_hash_matches_lfs(tmp_path: Path) -> None:
    data = os.urandom(100_000)
    fd = write_file(tmp_path, data)
    try:
        sha = hashlib.sha256(data).hexdigest()
        # For LFS files the sha256 decides; blob_id is the pointer file's id and is not checked.
        assert hash_matches(fd, HubFile("model.safetensors", len(data), "0" * 40, lfs_sha256=sha))
        assert not hash_matches(fd, HubFile("model.safetensors", len(data), git_blob_sha1(data), lfs_sha256="0" * 64))
    finally:
        os.close(fd)


def test_hash_mismatch_on_one_flipped_byte(tmp_path: Path) -> None:
    data = bytearray(os.urandom(50_000))
    sha, blob_id = hashlib.sha256(data).hexdigest(), git_blob_sha1(bytes(data))
    data[12345] ^= 0x01
    fd = write_file(tmp_path, bytes(data))
    try:
        assert not hash_matches(fd, HubFile("m.bin", len(data), "0" * 40, lfs_sha256=sha))
        assert not hash_matches(fd, HubFile("m.txt", len(data), blob_id))
    finally:
        os.close(fd)


def test_hash_matches_short_file(tmp_path: Path) -> None:
    data = b"truncated download"
    fd = write_file(tmp_path, data[:-3])
    try:
        assert not hash_matches(fd, HubFile("a", len(data), git_blob_sha1(data)))
        assert not hash_matches(fd, HubFile("a", len(data), "0" * 40, lfs_sha256=hashlib.sha256(data).hexdigest()))
    finally:
        os.close(fd)


def test_hash_matches_ignores_bytes_past_size(tmp_path: Path) -> None:
    # A preallocated partial file may be longer than the file; only `size` bytes are hashed.
    data = b"exact content"
    fd = write_file(tmp_path, data + b"\0" * 100)
    try:
        assert hash_matches(fd, HubFile("a", len(data), git_blob_sha1(data)))
    finally:
        os.close(fd)


# -- HubFile, RepoTree, Entry ---------------------------------------------------------------------


def test_hubfile_etag() -> None:
    assert HubFile("config.json", 10, "1" * 40).etag == "1" * 40
    assert HubFile("model.safetensors", 10, "1" * 40, lfs_sha256="2" * 64).etag == "2" * 64


def make_tree(*paths: str, repo_id: str = "org/model") -> RepoTree:
    files = tuple(
        HubFile(p, 10 * (i + 1), f"{i:040x}", lfs_sha256=f"{i:064x}" if p.endswith(".safetensors") else None)
        for i, p in enumerate(sorted(paths))
    )
    return RepoTree(repo_id, COMMIT, datetime(2024, 5, 1, 12, 30, tzinfo=UTC), files)


def test_repo_tree_json_round_trip() -> None:
    tree = make_tree("config.json", "model.safetensors", "1_Pooling/config.json")
    again = RepoTree.from_json(tree.to_json(), tree.repo_id, tree.commit)
    assert again == tree
    assert again.commit_date.tzinfo is not None
    assert again.size == tree.size == sum(f.size for f in tree.files)
    other_tz = RepoTree("o/m", COMMIT, datetime(2024, 1, 1, tzinfo=timezone(timedelta(hours=2))), ())
    assert RepoTree.from_json(other_tz.to_json(), "o/m", COMMIT).commit_date == other_tz.commit_date


def test_repo_tree_json_is_huggingface_hubs_format() -> None:
    """huggingface_hub's offline mode reads the listing mxfs writes, and mxfs reads one it wrote."""
    tree = make_tree("config.json", "model.safetensors")
    data = json.loads(tree.to_json())
    assert data["format_version"] == 1
    lfs = next(f for f in tree.files if f.lfs_sha256)
    assert data["files"][lfs.path] == {
        "size": lfs.size,
        "blob_id": lfs.blob_id,
        "lfs_sha256": lfs.lfs_sha256,
        "lfs_size": lfs.size,
    }
    del data["commit_date"]  # huggingface_hub records none: the caller's date stands in
    fallback = datetime(2020, 1, 1, tzinfo=UTC)
    again = RepoTree.from_json(json.dumps(data), tree.repo_id, tree.commit, fallback)
    assert again == RepoTree(tree.repo_id, tree.commit, fallback, tree.files)
    with pytest.raises(KeyError):
        RepoTree.from_json(json.dumps(data), tree.repo_id, tree.commit)
    with pytest.raises(ValueError):
        RepoTree.from_json(json.dumps({**data, "format_version": 2}), tree.repo_id, tree.commit, fallback)


def test_repo_tree_reads_the_state_dirs_older_format() -> None:
    """State dirs written before the listing format was shared still work offline."""
    tree = make_tree("config.json", "model.safetensors")
    old = {
        "repo_id": tree.repo_id,
        "commit": tree.commit,
        "commit_date": tree.commit_date.isoformat(),
        "files": [dataclasses.asdict(f) for f in tree.files],
    }
    assert RepoTree.from_json(json.dumps(old), tree.repo_id, tree.commit) == tree


def test_entry_children_index() -> None:
    paths = [
        "config.json",
        "model.safetensors",
        "1_Pooling/config.json",
        "a/b/c/deep.txt",
        "a/b/other.txt",
        "a/top.txt",
        "onnx/model.onnx",
        "onnx/model_qint8.onnx",
    ]
    tree = make_tree(*paths)
    entry = Entry(tree)
    by_path = {f.path: f for f in tree.files}

    assert entry.files == by_path
    assert entry.children[""] == {
        "config.json": by_path["config.json"],
        "model.safetensors": by_path["model.safetensors"],
        "1_Pooling": None,
        "a": None,
        "onnx": None,
    }
    assert entry.children["1_Pooling"] == {"config.json": by_path["1_Pooling/config.json"]}
    assert entry.children["a"] == {"b": None, "top.txt": by_path["a/top.txt"]}
    assert entry.children["a/b"] == {"c": None, "other.txt": by_path["a/b/other.txt"]}
    assert entry.children["a/b/c"] == {"deep.txt": by_path["a/b/c/deep.txt"]}
    assert entry.children["onnx"] == {
        "model.onnx": by_path["onnx/model.onnx"],
        "model_qint8.onnx": by_path["onnx/model_qint8.onnx"],
    }
    assert set(entry.children) == {"", "1_Pooling", "a", "a/b", "a/b/c", "onnx"}
    # Every file is reachable from the root through the index, exactly once.
    seen = []

    def walk(d: str) -> None:
        for name, child in entry.children[d].items():
            path = f"{d}/{name}" if d else name
            if child is None:
                walk(path)
            else:
                assert child.path == path
                seen.append(path)

    walk("")
    assert sorted(seen) == sorted(paths)

    assert entry.repo_id == "org/model"
    assert entry.commit == COMMIT
    assert entry.size == tree.size
    assert entry.registry_key == EntryName("org/model", COMMIT).key
    assert str(entry) == f"org/model@{COMMIT[:12]}"


def test_entry_of_empty_repo() -> None:
    entry = Entry(make_tree())
    assert entry.children == {"": {}}
    assert entry.size == 0


# -- RangeBody ------------------------------------------------------------------------------------


class FakeResponse:
    """What RangeBody uses of an httpx2 response: status, headers, iter_bytes."""

    def __init__(self, status: int, pieces: list[bytes], headers: dict[str, str] | None = None, fail: bool = False):
        self.status_code = status
        self.headers = httpx2.Headers(headers or {})
        self._pieces = pieces
        self._fail = fail
        self.chunk_sizes: list[int] = []

    def iter_bytes(self, chunk_size: int | None = None) -> Iterator[bytes]:
        self.chunk_sizes.append(chunk_size)
        yield from self._pieces
        if self._fail:
            raise httpx2.ReadError("connection reset by peer")


def split(data: bytes, n: int) -> list[bytes]:
    return [data[i : i + n] for i in range(0, len(data), n)]


FILE = bytes(range(256)) * 40  # 10240 bytes


def test_range_body_206() -> None:
    start, end = 1000, 3000
    response = FakeResponse(206, split(FILE[start:end], 333), {"Content-Range": f"bytes {start}-{end - 1}/{len(FILE)}"})
    body = RangeBody(response, start, end, "org/m@c/f")
    assert b"".join(body.chunks(4096)) == FILE[start:end]
    assert response.chunk_sizes == [4096]


def test_range_body_206_cuts_extra_bytes() -> None:
    start, end = 0, 100
    response = FakeResponse(206, [FILE[:150]], {"content-range": f"bytes 0-99/{len(FILE)}"})
    assert b"".join(RangeBody(response, start, end, "w").chunks()) == FILE[:100]


@pytest.mark.parametrize("content_range", ["bytes 0-1999/10240", "bytes 999-1999/10240", "", "bytes */10240", "junk"])
def test_range_body_206_wrong_start(content_range: str) -> None:
    headers = {"Content-Range": content_range} if content_range else {}
    response = FakeResponse(206, [FILE[1000:2000]], headers)
    with pytest.raises(HubUnavailable) as info:
        RangeBody(response, 1000, 2000, "org/m@c/f")
    assert "org/m@c/f" in str(info.value)


def test_range_body_200_skips_to_start_and_cuts_at_end() -> None:
    start, end = 1000, 3000
    response = FakeResponse(200, split(FILE, 777))  # the whole file, Range ignored
    assert b"".join(RangeBody(response, start, end, "w").chunks()) == FILE[start:end]


def test_range_body_200_is_a_whole_file_that_can_be_taken_from_byte_0() -> None:
    """A server that ignored Range: the download takes the whole body once (issue 14)."""
    body = RangeBody(FakeResponse(200, split(FILE, 777)), 1000, 3000, "w")
    assert body.whole_file
    assert b"".join(body.whole_chunks(len(FILE))) == FILE
    assert not RangeBody(FakeResponse(206, [FILE[:10]], {"Content-Range": "bytes 0-9/99"}), 0, 10, "w").whole_file
    short = RangeBody(FakeResponse(200, [FILE[:100]]), 50, 60, "w")
    with pytest.raises(Transient):
        b"".join(short.whole_chunks(len(FILE)))


@given(
    data=st.binary(min_size=1, max_size=2000),
    bounds=st.tuples(st.integers(0, 2000), st.integers(0, 2000)),
    piece=st.integers(1, 300),
    status=st.sampled_from([200, 206]),
)
def test_range_body_any_chunking(data: bytes, bounds: tuple[int, int], piece: int, status: int) -> None:
    start, end = sorted(bounds)
    start, end = min(start, len(data) - 1), min(max(end, start + 1), len(data))
    if status == 206:
        response = FakeResponse(
            206, split(data[start:], piece), {"Content-Range": f"bytes {start}-{end - 1}/{len(data)}"}
        )
    else:
        response = FakeResponse(200, split(data, piece))
    out = list(RangeBody(response, start, end, "w").chunks())
    assert b"".join(out) == data[start:end]
    assert all(out)  # no empty pieces handed to the writer


@given(
    data=st.binary(min_size=1, max_size=3000),
    start=st.integers(0, 2999),
    piece=st.integers(1, 300),
    batch=st.integers(1, 5000),
)
def test_range_body_batches_are_the_bytes_as_received_never_joined(
    data: bytes, start: int, piece: int, batch: int
) -> None:
    start = min(start, len(data) - 1)
    pieces = split(data[start:], piece)
    response = FakeResponse(206, pieces, {"Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}"})
    batches = list(RangeBody(response, start, len(data), "w").batches(batch))
    assert b"".join(b"".join(b) for b in batches) == data[start:]
    assert response.chunk_sizes == [None]  # the pieces the connection received, not rechunked
    assert all(len(b) <= MAX_BATCH_PIECES for b in batches)
    assert all(sum(map(len, b)) >= batch or len(b) == MAX_BATCH_PIECES for b in batches[:-1])
    # The pieces themselves, not copies joined into one buffer.
    assert [p for b in batches for p in b] == pieces


@given(pieces=st.lists(st.binary(min_size=0, max_size=50), max_size=20), cut=st.integers(0, 1000))
def test_first_bytes_keeps_exactly_that_many(pieces: list[bytes], cut: int) -> None:
    whole = b"".join(pieces)
    cut = min(cut, max(len(whole) - 1, 0))
    assert b"".join(first_bytes(pieces, cut)) == whole[:cut]


def test_write_all_finishes_a_short_pwritev(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """pwritev may write less than asked (a signal, a nearly full disk): the rest is written."""
    pieces = [b"abc", b"", b"defgh", b"ij"]
    real = os.pwritev
    monkeypatch.setattr(os, "pwritev", lambda fd, bufs, offset: real(fd, [b"abcd"], offset))  # stops mid-piece
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT)
    try:
        os.pwrite(fd, b"0123456789xy", 0)
        write_all(fd, pieces, 2)
        assert os.pread(fd, 20, 0) == b"01abcdefghij"
    finally:
        os.close(fd)


@pytest.mark.parametrize("status", [200, 206])
def test_range_body_ends_early(status: int) -> None:
    start, end = 1000, 3000
    if status == 206:
        response = FakeResponse(
            206, split(FILE[start : end - 10], 500), {"Content-Range": f"bytes {start}-{end - 1}/*"}
        )
    else:
        response = FakeResponse(200, split(FILE[: end - 10], 500))
    body = RangeBody(response, start, end, "org/m@c/f")
    received = []
    with pytest.raises(Transient) as info:
        for chunk in body.chunks():
            received.append(chunk)
    assert b"".join(received) == FILE[start : end - 10]  # what did arrive is correct and usable
    assert "10 bytes early" in str(info.value)
    assert isinstance(info.value, HubUnavailable)


def test_range_body_connection_breaks() -> None:
    response = FakeResponse(206, [FILE[:100]], {"Content-Range": "bytes 0-999/10240"}, fail=True)
    received = []
    with pytest.raises(Transient) as info:
        for chunk in RangeBody(response, 0, 1000, "org/m@c/f").chunks():
            received.append(chunk)
    assert received == [FILE[:100]]
    assert "ReadError" in str(info.value)


def test_range_body_200_ending_before_start() -> None:
    response = FakeResponse(200, [FILE[:500]])
    with pytest.raises(Transient):
        list(RangeBody(response, 1000, 2000, "w").chunks())


@pytest.mark.parametrize("status", [204, 301, 304, 416])
def test_range_body_unexpected_status(status: int) -> None:
    with pytest.raises(HubUnavailable) as info:
        RangeBody(FakeResponse(status, []), 0, 10, "org/m@c/f")
    assert not isinstance(info.value, Transient)
    assert str(status) in str(info.value)


# -- _translate -----------------------------------------------------------------------------------

API_URL = "https://huggingface.co/api/models/org/model/revision/main"
FILE_URL = "https://huggingface.co/org/model/resolve/" + COMMIT + "/config.json"


def hub_error(status: int, url: str = API_URL, headers: dict[str, str] | None = None) -> Exception:
    """The exception huggingface_hub raises for this answer (through its own hf_raise_for_status)."""
    response = httpx2.Response(status, headers=headers or {}, request=httpx2.Request("GET", url))
    with pytest.raises(Exception) as info:
        hf_raise_for_status(response)
    return info.value


@pytest.mark.parametrize(
    ("status", "url", "headers", "expected"),
    [
        (401, API_URL, {"X-Error-Code": "RepoNotFound"}, NotFound),
        (404, API_URL, {"X-Error-Code": "RepoNotFound"}, NotFound),
        (404, API_URL, {"X-Error-Code": "RevisionNotFound"}, NotFound),
        (404, FILE_URL, {"X-Error-Code": "EntryNotFound"}, NotFound),
        (403, API_URL, {"X-Error-Code": "GatedRepo"}, AccessDenied),
        (401, API_URL, {"X-Error-Code": "GatedRepo"}, AccessDenied),
        (401, FILE_URL, {"X-Error-Message": "Invalid credentials in Authorization header"}, AccessDenied),
        (403, FILE_URL, {}, AccessDenied),
        (500, API_URL, {}, Transient),
        (502, FILE_URL, {}, Transient),
        (503, FILE_URL, {}, Transient),
        (504, API_URL, {}, Transient),
        (429, API_URL, {}, Transient),
        (408, FILE_URL, {}, Transient),
    ],
)
def test_translate_hub_http_errors(status: int, url: str, headers: dict[str, str], expected: type) -> None:
    exc = hub_error(status, url, headers)
    assert isinstance(exc, HfHubHTTPError)
    result = _translate(exc, "org/model@main")
    assert type(result) is expected
    assert "org/model@main" in str(result)


def test_gated_is_checked_before_repo_not_found() -> None:
    exc = hub_error(403, API_URL, {"X-Error-Code": "GatedRepo"})
    assert isinstance(exc, GatedRepoError)
    assert isinstance(exc, RepositoryNotFoundError)  # why the order matters
    result = _translate(exc, "org/model")
    assert isinstance(result, AccessDenied)
    assert "HF_TOKEN" in str(result)
    assert errno_for(result) == errno.EACCES


def test_repo_not_found_is_enoent() -> None:
    result = _translate(hub_error(401, API_URL, {"X-Error-Code": "RepoNotFound"}), "org/model")
    assert errno_for(result) == errno.ENOENT


def test_transient_is_eio_and_retried() -> None:
    result = _translate(hub_error(503), "org/model")
    assert isinstance(result, HubUnavailable)
    assert errno_for(result) == errno.EIO


def test_translate_client_error_is_not_transient() -> None:
    result = _translate(hub_error(400), "org/model")
    assert isinstance(result, HubUnavailable)
    assert not isinstance(result, Transient)


def test_translate_offline() -> None:
    result = _translate(OfflineModeIsEnabled("Cannot reach https://huggingface.co: offline mode is enabled."), "w")
    assert isinstance(result, OfflineMiss)
    assert errno_for(result) == errno.ENOENT


def test_translate_local_entry_not_found() -> None:
    result = _translate(LocalEntryNotFoundError("not in the local cache"), "w")
    assert isinstance(result, NotFound | OfflineMiss)
    assert errno_for(result) == errno.ENOENT


@pytest.mark.parametrize(
    "exc",
    [
        httpx2.ConnectError("connection refused"),
        httpx2.ReadTimeout("timed out"),
        httpx2.RemoteProtocolError("peer closed connection"),
        ConnectionResetError(errno.ECONNRESET, "reset"),
        TimeoutError("timed out"),
    ],
)
def test_translate_network_errors_are_transient(exc: Exception) -> None:
    result = _translate(exc, "org/model")
    assert isinstance(result, Transient)
    assert type(exc).__name__ in str(result)


def test_translate_passes_domain_errors_through() -> None:
    original = AccessDenied("already translated")
    assert _translate(original, "w") is original


def test_translate_unknown_error() -> None:
    result = _translate(ValueError("weird"), "org/model")
    assert type(result) is HubUnavailable
    assert "ValueError" in str(result)


# -- read_at --------------------------------------------------------------------------------------

DATA = os.urandom(256 * 1024 + 123)


@pytest.fixture
def data_fd(tmp_path: Path) -> Iterator[int]:
    fd = write_file(tmp_path, DATA)
    yield fd
    os.close(fd)


@pytest.mark.parametrize(
    ("offset", "size"),
    [(0, 4096), (0, len(DATA)), (12345, 131072), (len(DATA) - 10, 10), (len(DATA) - 10, 4096), (len(DATA), 4096)],
)
async def test_read_at(data_fd: int, offset: int, size: int) -> None:
    limiter = trio.CapacityLimiter(2)
    assert await read_at(data_fd, offset, size, limiter) == DATA[offset : offset + size]


async def test_read_at_past_end(data_fd: int) -> None:
    assert await read_at(data_fd, len(DATA) + 1000, 10, trio.CapacityLimiter(1)) == b""


# How long each pread of the test below takes, and the longest the event loop may then go
# without running another task: a read done in a worker thread leaves the loop free (gaps of a
# few ms), one done on the loop stops it for the whole read.
SLOW_READ = 0.3
LONGEST_GAP = SLOW_READ / 2


async def test_read_at_does_not_block_the_event_loop(data_fd: int, monkeypatch: pytest.MonkeyPatch) -> None:
    real_pread = os.pread

    def slow_pread(fd: int, size: int, offset: int) -> bytes:
        time.sleep(SLOW_READ)  # a cold read from a slow disk
        return real_pread(fd, size, offset)

    monkeypatch.setattr(os, "pread", slow_pread)
    ticks: list[float] = []

    async def ticker() -> None:
        while True:
            ticks.append(time.monotonic())
            await trio.sleep(0.005)

    started = time.monotonic()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(ticker)
        await trio.sleep(0.02)
        for offset in (0, 4096, 12345):
            assert await read_at(data_fd, offset, 4096, trio.CapacityLimiter(1)) == DATA[offset : offset + 4096]
        nursery.cancel_scope.cancel()
    took = time.monotonic() - started
    assert took >= 3 * SLOW_READ, f"the reads took {took:.2f}s: they did not go through os.pread"
    gaps = [b - a for a, b in itertools.pairwise([*ticks, time.monotonic()])]
    assert max(gaps) < LONGEST_GAP, f"the event loop stood still for {max(gaps):.3f}s while reading"


async def test_read_at_bad_fd_raises(tmp_path: Path) -> None:
    fd = write_file(tmp_path, b"x")
    os.close(fd)
    with pytest.raises(OSError) as info:
        await read_at(fd, 0, 1, trio.CapacityLimiter(1))
    assert info.value.errno == errno.EBADF


# -- FileState.wait_readable ----------------------------------------------------------------------


def partial_state(tmp_path: Path, size: int = 1000) -> FileState:
    state = FileState(HubFile("model.safetensors", size, "0" * 40, lfs_sha256="1" * 64))
    state.partial = tmp_path / "x.incomplete"
    state.partial.write_bytes(b"\0" * size)
    return state


async def test_wait_readable_returns_at_once_when_present(tmp_path: Path) -> None:
    state = partial_state(tmp_path)
    state.present.add(0, 500)
    with trio.fail_after(1):
        await state.wait_readable(100, 200, strict=False)
    assert state.waiting == 0
    assert state.wanted_offsets == set()


async def test_wait_readable_waits_until_present_covers(tmp_path: Path) -> None:
    state = partial_state(tmp_path)
    done = trio.Event()

    async def reader() -> None:
        await state.wait_readable(100, 300, strict=False)
        done.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        await trio.testing.wait_all_tasks_blocked()
        assert not done.is_set()
        assert state.waiting == 1
        assert state.wanted_offsets == {100}  # tells the downloader which chunk to fetch first

        state.present.add(100, 200)  # half of it: keep waiting
        state.notify()
        await trio.testing.wait_all_tasks_blocked()
        assert not done.is_set()

        state.present.add(200, 300)
        state.notify()
        with trio.fail_after(1):
            await done.wait()
    assert state.waiting == 0
    assert state.wanted_offsets == set()


async def test_wait_readable_raises_the_error(tmp_path: Path) -> None:
    state = partial_state(tmp_path)
    error = HubUnavailable("org/model: the Hub is down")
    caught: list[BaseException] = []

    async def reader() -> None:
        try:
            await state.wait_readable(0, 10, strict=False)
        except MxfsError as exc:
            caught.append(exc)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        nursery.start_soon(reader)
        await trio.testing.wait_all_tasks_blocked()
        assert state.waiting == 2
        state.set_error(error)
    assert caught == [error, error]
    assert state.waiting == 0
    # A later reader fails at once, without waiting.
    with trio.fail_after(1), pytest.raises(HubUnavailable):
        await state.wait_readable(0, 10, strict=False)


async def test_wait_readable_bytes_present_despite_error(tmp_path: Path) -> None:
    state = partial_state(tmp_path)
    state.present.add(0, 100)
    state.set_error(HubUnavailable("later bytes failed"))
    with trio.fail_after(1):
        await state.wait_readable(0, 100, strict=False)  # these bytes arrived before the failure
    with pytest.raises(HubUnavailable):
        await state.wait_readable(50, 150, strict=False)


async def test_wait_readable_strict_waits_for_the_blob(tmp_path: Path) -> None:
    state = partial_state(tmp_path)
    done = trio.Event()

    async def reader() -> None:
        await state.wait_readable(0, 100, strict=True)
        done.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        state.present.add(0, 1000)  # every byte is there, but not verified yet
        state.notify()
        await trio.testing.wait_all_tasks_blocked()
        assert not done.is_set()
        assert state.readable(0, 100, strict=False)
        assert not state.readable(0, 100, strict=True)

        state.set_blob(tmp_path / "blob", same_inode=True)
        with trio.fail_after(1):
            await done.wait()
    assert state.complete
    assert state.present.covers(0, 1000)
    assert state.partial is None


async def test_wait_readable_set_blob_clears_error(tmp_path: Path) -> None:
    state = partial_state(tmp_path)
    state.set_error(HubUnavailable("first try failed"))
    state.set_blob(tmp_path / "blob", same_inode=True)
    assert state.error is None
    with trio.fail_after(1):
        await state.wait_readable(0, 1000, strict=True)


async def test_wait_readable_cancelled_reader_cleans_up(tmp_path: Path) -> None:
    state = partial_state(tmp_path)
    with trio.move_on_after(0.05) as scope:
        await state.wait_readable(0, 10, strict=False)
    assert scope.cancelled_caught
    assert state.waiting == 0
    assert state.wanted_offsets == set()


async def test_wait_readable_nothing_local_waits(tmp_path: Path) -> None:
    # No partial file on this node (another node downloads): non-strict readers wait too.
    state = FileState(HubFile("a", 10, "0" * 40))
    state.present.add(0, 10)
    assert not state.readable(0, 10, strict=False)
    with trio.move_on_after(0.05) as scope:
        await state.wait_readable(0, 10, strict=False)
    assert scope.cancelled_caught


async def test_wait_readable_with_autojump_clock(tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    state = partial_state(tmp_path)

    async def downloader() -> None:
        for start in range(0, 1000, 100):
            await trio.sleep(1)
            state.present.add(start, start + 100)
            state.notify()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(downloader)
        t0 = trio.current_time()
        await state.wait_readable(450, 550, strict=False)
        assert trio.current_time() - t0 == pytest.approx(6)


# -- SharedFd and the shared descriptor -----------------------------------------------------------


def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError as exc:
        assert exc.errno == errno.EBADF
        return False
    return True


def test_shared_fd_closes_only_when_retired_and_unused(tmp_path: Path) -> None:
    shared = SharedFd(write_file(tmp_path, b"data"))
    shared.users = 2
    shared.release()
    assert is_open(shared.fd)  # not retired: a release never closes
    shared.users += 1
    shared.retire()
    assert is_open(shared.fd)  # two reads still in flight
    shared.release()
    assert is_open(shared.fd)
    shared.release()
    assert not is_open(shared.fd)


def test_shared_fd_retire_when_unused_closes_at_once(tmp_path: Path) -> None:
    shared = SharedFd(write_file(tmp_path, b"data"))
    shared.retire()
    assert shared.retired
    assert not is_open(shared.fd)


def test_file_state_fd_lifecycle(tmp_path: Path) -> None:
    state = partial_state(tmp_path, 4)
    state.partial.write_bytes(b"abcd")
    first = state.acquire_fd()
    assert state.acquire_fd() is first
    assert first.users == 2
    assert os.pread(first.fd, 4, 0) == b"abcd"

    # The partial file renamed to its blob keeps its inode and descriptor.
    blob = tmp_path / "blob"
    os.rename(state.partial, blob)
    state.set_blob(blob, same_inode=True)
    assert state.acquire_fd() is first
    first.release()

    # A different copy (another node's blob): the old descriptor is retired, closed after its reads.
    other = tmp_path / "other-blob"
    other.write_bytes(b"abcd")
    state.set_blob(other)
    assert first.retired
    assert is_open(first.fd)
    second = state.acquire_fd()
    assert second is not first
    assert os.fstat(second.fd).st_ino == other.stat().st_ino
    first.release()
    first.release()
    assert not is_open(first.fd)
    assert is_open(second.fd)
    second.release()
    state.retire_fd()
    assert not is_open(second.fd)


def test_acquire_fd_without_local_copy() -> None:
    state = FileState(HubFile("a", 10, "0" * 40))
    with pytest.raises(MxfsError):
        state.acquire_fd()


@given(size=st.integers(0, 1 << 40), connections=st.integers(1, 64), largest_mib=st.integers(1, 1024))
def test_chunk_size_keeps_the_download_window_a_fraction_of_the_file(size, connections, largest_mib) -> None:
    from mxfs.fetch.plan import CHUNKS_PER_CONNECTION, MIN_CHUNK, chunk_size_for

    largest = largest_mib << 20
    step = chunk_size_for(size, connections, largest)
    assert min(largest, MIN_CHUNK) <= step <= largest
    assert step % (1 << 20) == 0
    if step < largest and step > MIN_CHUNK:
        # Small enough that the connections' window is at most 1/CHUNKS_PER_CONNECTION of the file.
        assert -(-size // step) >= connections * CHUNKS_PER_CONNECTION - connections


def test_prefix_hasher_fed_in_pieces_matches_one_pass(tmp_path: Path) -> None:
    data = random.Random(3).randbytes(3_000_001)
    path = tmp_path / "blob"
    path.write_bytes(data)
    file = HubFile("model.safetensors", len(data), "0" * 40, hashlib.sha256(data).hexdigest())
    fd = os.open(path, os.O_RDONLY)
    try:
        hasher = PrefixHasher(file)
        for upto in (10, 1_000_000, 1_000_000, 2_999_999, len(data)):
            hasher.feed(fd, upto)
        assert hasher.matches()
        short = PrefixHasher(file)
        short.feed(fd, len(data) - 1)
        assert not short.matches()
    finally:
        os.close(fd)


def test_verified_bytes_are_readable_before_the_blob_is_published(tmp_path: Path) -> None:
    # Strict reads (and the read that reaches the end of a file) need verified bytes, not a
    # durable blob: they must not wait for the fsync that publication does.
    state = FileState(HubFile("model.bin", 10, "b" * 40))
    state.partial = tmp_path / "model.bin.incomplete"
    state.present.add(0, 10)
    assert state.readable(0, 10, strict=False)
    assert not state.readable(0, 10, strict=True)
    state.verified = True
    assert state.readable(0, 10, strict=True)
    assert not state.complete  # not published yet: keep_cache and the blob pin wait for that
