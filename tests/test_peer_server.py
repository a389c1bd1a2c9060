"""The peer server: verified files only, in the Hub's URL scheme, to allowed peers.

The client side is mxfs's own :class:`HubClient` pointed at the peer, the same code that reads
ranges from the Hub, so these tests also show that a peer is a drop-in range source.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import outcome
import pytest
import trio

from mxfs.cache import HubCache
from mxfs.errors import AccessDenied, MxfsError
from mxfs.hub import HubClient
from mxfs.peers.server import BadRequest, PeerAccess, PeerServer, parse_range

REPO = "org/model"
COMMIT = "a" * 40
DATA = os.urandom(3 * (1 << 20) + 12345)
ETAG = "b" * 64


def publish(cache: HubCache, path: str, data: bytes, etag: str) -> None:
    incomplete, fd = cache.create_incomplete(REPO, etag, "w1")
    try:
        os.write(fd, data)
        cache.publish_blob(REPO, etag, incomplete, fd)
    finally:
        os.close(fd)
    cache.link_snapshot(REPO, COMMIT, path, etag)


@pytest.fixture
def cache(tmp_path: Path) -> HubCache:
    cache = HubCache(tmp_path / "cache")
    cache.ensure_root()
    publish(cache, "model.safetensors", DATA, ETAG)
    publish(cache, "sub/config.json", b'{"a": 1}', "c" * 40)
    # A partial file of another blob: never served.
    _, fd = cache.create_incomplete(REPO, "d" * 64, "w2")
    os.write(fd, b"partial")
    os.close(fd)
    return cache


def serve_and(cache: HubCache, access: PeerAccess, client_fn) -> object:
    """Run a PeerServer on a free loopback port and ``client_fn(base_url)`` in a thread."""

    async def main() -> outcome.Outcome:
        server = PeerServer(cache, access)
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(server.serve, "127.0.0.1", 0)
            port = listeners[0].socket.getsockname()[1]
            result = await trio.to_thread.run_sync(outcome.capture, client_fn, f"http://127.0.0.1:{port}")
            nursery.cancel_scope.cancel()
        return result

    return trio.run(main).unwrap()


def read_range(base: str, start: int, end: int, path: str = "model.safetensors", token: str | None = None) -> bytes:
    client = HubClient(endpoint=base, token=token or False, offline=False)
    with client.open_range(REPO, COMMIT, path, start, end) as body:
        return b"".join(body.chunks())


LOOPBACK = PeerAccess.parse(["127.0.0.0/8", "::1/128"])


def test_ranges_are_the_blob_bytes(cache: HubCache) -> None:
    size = len(DATA)
    spans = [(0, 1), (0, size), (1 << 20, 2 << 20), (size - 7, size), (12345, 12346)]

    def client(base: str) -> list[bytes]:
        return [read_range(base, s, e) for s, e in spans]

    got = serve_and(cache, LOOPBACK, client)
    assert got == [DATA[s:e] for s, e in spans]


def test_subfolder_files_and_head(cache: HubCache) -> None:
    def client(base: str) -> tuple[bytes, str, str]:
        raw = raw_request(base, f"HEAD /{REPO}/resolve/{COMMIT}/model.safetensors HTTP/1.1\r\nHost: x\r\n\r\n")
        return read_range(base, 0, 8, "sub/config.json"), raw, ""

    body, head, _ = serve_and(cache, LOOPBACK, client)
    assert body == b'{"a": 1}'
    assert head.startswith("HTTP/1.1 200")
    assert f"Content-Length: {len(DATA)}" in head
    assert f'ETag: "{ETAG}"' in head


def raw_request(base: str, *requests: str) -> str:
    """Send requests on one connection; the raw answers (bodies included) as text."""
    port = int(base.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        for request in requests:
            sock.sendall(request.encode())
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        while data := sock.recv(65536):
            chunks.append(data)
    return b"".join(chunks).decode("latin-1")


def test_persistent_connection_answers_each_request(cache: HubCache) -> None:
    get = f"GET /{REPO}/resolve/{COMMIT}/sub/config.json HTTP/1.1\r\nHost: x\r\nRange: bytes=1-3\r\n\r\n"

    def client(base: str) -> str:
        return raw_request(base, get, get)

    answer = serve_and(cache, LOOPBACK, client)
    assert answer.count("HTTP/1.1 206 Partial Content") == 2
    assert answer.count('"a"') == 2
    assert "Content-Range: bytes 1-3/8" in answer


@pytest.mark.parametrize(
    "target",
    [
        f"/{REPO}/resolve/main/model.safetensors",  # a branch: peers serve commits only
        f"/{REPO}/resolve/{COMMIT}/../../blobs/{ETAG}",  # leaves the snapshot
        f"/{REPO}/resolve/{COMMIT}/%2e%2e/x",
        f"/{REPO}/resolve/{COMMIT}/missing.bin",
        f"/org/other/resolve/{COMMIT}/model.safetensors",
        f"/{REPO}/blob/{COMMIT}/model.safetensors",
        f"/{REPO}/resolve/{'d' * 40}/model.safetensors",
    ],
)
def test_only_verified_snapshot_files_are_served(cache: HubCache, target: str) -> None:
    def client(base: str) -> str:
        return raw_request(base, f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")

    assert serve_and(cache, LOOPBACK, client).startswith("HTTP/1.1 404")


def test_partial_file_is_never_served(cache: HubCache) -> None:
    # A snapshot link pointing at a partial file (never made by mxfs, but a hand-edited cache could).
    link = cache.snapshot_file(REPO, COMMIT, "partial.bin")
    partial = next((cache.repo_dir(REPO) / "blobs").glob("*.incomplete"))
    os.symlink(os.path.relpath(partial, link.parent), link)

    def client(base: str) -> str:
        return raw_request(base, f"GET /{REPO}/resolve/{COMMIT}/partial.bin HTTP/1.1\r\nHost: x\r\n\r\n")

    assert serve_and(cache, LOOPBACK, client).startswith("HTTP/1.1 404")


def test_addresses_outside_allow_are_refused(cache: HubCache) -> None:
    def client(base: str) -> None:
        read_range(base, 0, 10)

    with pytest.raises(AccessDenied):
        serve_and(cache, PeerAccess.parse(["10.0.0.0/8"]), client)


def test_token_is_required_when_set(cache: HubCache) -> None:
    access = PeerAccess.parse(["127.0.0.1/32"], token="s3cret")
    with pytest.raises(AccessDenied):
        serve_and(cache, access, lambda base: read_range(base, 0, 10))
    with pytest.raises(AccessDenied):
        serve_and(cache, access, lambda base: read_range(base, 0, 10, token="wrong"))
    assert serve_and(cache, access, lambda base: read_range(base, 0, 10, token="s3cret")) == DATA[:10]


def test_unsatisfiable_range(cache: HubCache) -> None:
    def client(base: str) -> str:
        return raw_request(
            base,
            f"GET /{REPO}/resolve/{COMMIT}/sub/config.json HTTP/1.1\r\nRange: bytes=8-9\r\nConnection: close\r\n\r\n",
        )

    answer = serve_and(cache, LOOPBACK, client)
    assert answer.startswith("HTTP/1.1 416")
    assert "Content-Range: bytes */8" in answer


def test_evicted_between_requests_is_not_found(cache: HubCache) -> None:
    def client(base: str) -> None:
        assert read_range(base, 0, 4) == DATA[:4]
        cache.delete_revision(REPO, COMMIT)
        read_range(base, 0, 4)

    with pytest.raises(MxfsError):
        serve_and(cache, LOOPBACK, client)


@pytest.mark.parametrize(
    ("header", "size", "expected"),
    [
        (None, 10, None),
        ("bytes=0-0", 10, (0, 1)),
        ("bytes=2-", 10, (2, 10)),
        ("bytes=5-100", 10, (5, 10)),
        ("bytes=-3", 10, (7, 10)),
        ("bytes=-30", 10, (0, 10)),
    ],
)
def test_parse_range(header: str | None, size: int, expected: tuple[int, int] | None) -> None:
    assert parse_range(header, size) == expected


@pytest.mark.parametrize("header", ["bytes=10-", "bytes=3-1", "bytes=0-1,3-4", "items=0-1", "bytes=x-1", "bytes=-0"])
def test_parse_range_refuses(header: str) -> None:
    with pytest.raises(BadRequest) as info:
        parse_range(header, 10)
    assert info.value.status == 416


def test_link_leaving_the_repos_blobs_is_not_followed(cache: HubCache, tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("not a model file")
    link = cache.snapshot_file(REPO, COMMIT, "escape.bin")
    os.symlink(secret, link)

    def client(base: str) -> str:
        return raw_request(base, f"GET /{REPO}/resolve/{COMMIT}/escape.bin HTTP/1.1\r\nConnection: close\r\n\r\n")

    assert serve_and(cache, LOOPBACK, client).startswith("HTTP/1.1 404")
