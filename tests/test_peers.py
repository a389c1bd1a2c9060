"""Peers: nodes with their own caches and one Redis fetch each model once from the Hub (issue 16).

Each daemon ("node") has its own cache dir, state dir and mountpoint, serves its files to the
others at its own loopback port (``--peer-address``), and shares only a real redis-server, the
fleet's registry.  The test Hub counts the bytes it serves and paces them like a CDN connection,
so "the Hub sends each byte about once" is checked byte for byte.
"""

from __future__ import annotations

import contextlib
import http.client
import http.server
import os
import random
import signal
import ssl
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from mxfs.names import EntryName
from mxfs.registry import Status, open_registry
from tests.forward_proxy import make_proxy_ca
from tests.hubserver import FakeHub
from tests.kube_apiserver import kube_apiserver_fixture, kube_target_fixture  # noqa: F401
from tests.mounting import MountedFs, parallel, read, read_or_eio, requires_fuse, run_cli, wait_until
from tests.redis_server import RedisServer
from tests.scrape import free_port, http_scrape, parse, value
from tests.tcp_proxy import TcpProxy

pytestmark = requires_fuse

# The Kubernetes API stand-in speaks plain http.
KUBE_STAND_IN = r"sending a bearer token over plain http to http://127\.0\.0\.1:\d+$"
# The log line of the node that downloads a model from the Hub for the fleet.
HUB_DOWNLOADER = "downloads it from the Hub for the fleet"


class Node:
    """One node: its mount, the address it serves peers at, and its metrics port."""

    def __init__(self, mount: MountedFs, peer_address: str, metrics_port: int) -> None:
        self.mount = mount
        self.peer_address = peer_address
        self.metrics_port = metrics_port

    def __truediv__(self, rel: str) -> Path:
        return self.mount / rel

    def log(self) -> str:
        return self.mount.log()

    def metric(self, name: str, **labels: str) -> float:
        return value(parse(http_scrape(self.metrics_port)), name, **labels) or 0.0


def start_peers(
    mxfs_mount: Callable[..., MountedFs], tmp_path: Path, redis: RedisServer | str, n: int, *args: str
) -> list[Node]:
    """``n`` nodes, each with its own cache, serving peers on a port of its own; the fleet's
    registry is ``redis`` (emptied first) or the registry URL given."""
    if isinstance(redis, RedisServer):
        redis.client().flushdb()
    url = redis.url() if isinstance(redis, RedisServer) else redis
    nodes = []
    for i in range(n):
        peer_address, metrics_port = f"127.0.0.1:{free_port()}", free_port()
        mount = mxfs_mount(
            "--registry",
            url,
            "--peer-address",
            peer_address,
            "--metrics-address",
            f"127.0.0.1:{metrics_port}",
            "--no-handoff",
            *args,
            cache_dir=tmp_path / f"node{i}-cache",
            state_dir=tmp_path / f"node{i}-state",
        )
        nodes.append(Node(mount, peer_address, metrics_port))
    return nodes


def holders(fleet: RedisServer | str, repo: str, commit: str, *, complete: bool = False) -> list:
    """The entry's holders' node ids (``complete``: with whether each holds it whole)."""

    async def ask() -> list:
        registry = await open_registry(fleet.url() if isinstance(fleet, RedisServer) else fleet)
        try:
            listed = await registry.holders(EntryName(repo, commit).key)
            return [(h.node, h.complete) for h in listed] if complete else [h.node for h in listed]
        finally:
            await registry.aclose()

    return trio.run(ask)


def model(seed: int, sizes: dict[str, int]) -> dict[str, bytes]:
    rnd = random.Random(seed)
    return {"config.json": b'{"peers": true}', **{name: rnd.randbytes(size) for name, size in sizes.items()}}


@pytest.fixture(params=["redis", "kubernetes"])
def fleet(request: pytest.FixtureRequest) -> RedisServer | str:
    """The fleet's registry: a redis-server, or a namespace of the Kubernetes API stand-in.

    A test names it before ``mxfs_mount``, so the daemons stop before the registry goes."""
    if request.param == "redis":
        return request.getfixturevalue("redis_server")
    return request.getfixturevalue("kube_target").url


def test_four_nodes_read_at_once_and_the_hub_sends_the_model_once(
    fleet: RedisServer | str, hub: FakeHub, new_repo_id, mxfs_mount, tmp_path: Path
) -> None:
    repo = new_repo_id()
    files = model(21, {"model-00001.safetensors": 12_000_000, "model-00002.safetensors": 8_000_000})
    hub.add_repo(repo, files)
    # Paced like a CDN connection: every node reads while the first download is under way.
    hub.inject("slow", repo_id=repo, filename="*.safetensors", bytes_per_second=6_000_000)
    nodes = start_peers(mxfs_mount, tmp_path, fleet, 4)
    if not isinstance(fleet, RedisServer):
        for node in nodes:
            node.mount.allowed_log.append(KUBE_STAND_IN)
    names = list(files)
    results = parallel([lambda n=n, name=name: read(n / repo / name) for n in nodes for name in names])
    for i, got in enumerate(results):
        name = names[i % len(names)]
        assert got == files[name], f"node {i // len(names)}, {name}: {got!r:.100}"
    total = sum(len(d) for d in files.values())
    sent = sum(hub.bytes_served(repo, name) for name in names)
    assert sent <= 1.1 * total, f"the Hub sent {sent} bytes for a {total}-byte model read on 4 nodes"
    assert sum(HUB_DOWNLOADER in n.log() for n in nodes) == 1
    # Every node holds it verified and says so to the fleet.
    commit = hub.head(repo)
    wait_until(lambda: len(holders(fleet, repo, commit)) == 4, 10, "all four nodes listed as holders")


def test_a_node_fetches_from_every_holder_and_not_the_hub(
    hub: FakeHub, new_repo_id, mxfs_mount, tmp_path: Path, redis_server: RedisServer
) -> None:
    repo = new_repo_id()
    files = model(22, {"model.safetensors": 24_000_000})
    hub.add_repo(repo, files)
    first, second, third = start_peers(mxfs_mount, tmp_path, redis_server, 3, "--chunk-size", "1MiB")
    for node in (first, second):
        assert read(node / repo / "model.safetensors") == files["model.safetensors"]
    commit = hub.head(repo)
    wait_until(
        lambda: [c for _, c in holders(redis_server, repo, commit, complete=True)] == [True, True],
        10,
        "both nodes listed as complete holders",
    )
    sent = hub.bytes_served(repo)
    assert read(third / repo / "model.safetensors") == files["model.safetensors"]
    assert hub.bytes_served(repo) == sent, "a node with two holders went to the Hub"
    # Its ranges were spread over both holders.
    served = [node.metric("mxfs_peer_served_bytes_total") for node in (first, second)]
    assert all(s > 0 for s in served), served
    assert third.metric("mxfs_peer_fetched_bytes_total") >= len(files["model.safetensors"])


def test_killed_hub_downloader_the_others_finish_with_right_bytes(
    hub: FakeHub, new_repo_id, mxfs_mount, tmp_path: Path, redis_server: RedisServer
) -> None:
    repo = new_repo_id()
    data = random.Random(23).randbytes(16_000_000)
    hub.add_repo(repo, {"config.json": b"{}", "model.safetensors": data})
    slow = hub.inject("slow", repo_id=repo, filename="model.safetensors", bytes_per_second=3_000_000)
    nodes = start_peers(mxfs_mount, tmp_path, redis_server, 3, "--lease", "3s")
    first, rest = nodes[0], nodes[1:]
    # The first node opens first and downloads from the Hub for the fleet.
    assert read(first / repo / "config.json") == b"{}"
    wait_until(lambda: HUB_DOWNLOADER in first.log(), 10, "the first node claims the Hub download")
    for node in rest:
        node.mount.allowed_log.append("peer http://127.0.0.1:[0-9]+ failed")
    results: list[object] = []
    readers = [
        threading.Thread(target=lambda n=n: results.append(read_or_eio(n / repo / "model.safetensors"))) for n in rest
    ]
    for reader in readers:
        reader.start()
    time.sleep(1.5)  # mid-download
    first.mount.proc.send_signal(signal.SIGKILL)
    first.mount.proc.wait(10)
    slow.remove()
    for reader in readers:
        reader.join(60)
        assert not reader.is_alive()
    # Each node's copy is its own, verified against the Hub's checksum: right bytes.
    assert results == [data, data]


def test_a_peer_serving_corrupt_bytes_costs_time_never_bytes(
    hub: FakeHub, new_repo_id, mxfs_mount, tmp_path: Path, redis_server: RedisServer
) -> None:
    repo = new_repo_id()
    data = random.Random(24).randbytes(6_000_000)
    hub.add_repo(repo, {"config.json": b"{}", "model.safetensors": data})
    holder, reader = start_peers(mxfs_mount, tmp_path, redis_server, 2)
    assert read(holder / repo / "model.safetensors") == data
    # The holder's verified blob rots on its disk: it serves what its disk says.
    blob = next((holder.mount.cache_dir / f"models--{repo.replace('/', '--')}" / "blobs").glob("*[0-9a-f]" * 64))
    with open(blob, "r+b") as f:
        f.seek(1_000_000)
        f.write(b"\0" * 4096)
    reader.mount.allowed_log += [
        "downloaded bytes do not match the Hub's checksum",
        "sent bytes of model.safetensors that failed the Hub's checksum",
        "came from a copy that was discarded unverified",
    ]
    got = read_or_eio(reader / repo / "model.safetensors")
    assert got in (data, "EIO"), "a reader completed with wrong bytes"
    # The node fell back to the Hub; a new open reads the right bytes.
    assert read(reader / repo / "model.safetensors") == data
    assert "failed the Hub's checksum; not asking it again" in reader.log()
    assert hub.bytes_served(repo, "model.safetensors") >= 2 * len(data)


def test_evicted_copy_leaves_the_holder_set_before_its_files(
    hub: FakeHub, new_repo_id, mxfs_mount, tmp_path: Path, redis_server: RedisServer
) -> None:
    repo = new_repo_id()
    hub.add_repo(repo, {"config.json": b"{}", "model.safetensors": b"x" * 3_000_000})
    (node,) = start_peers(mxfs_mount, tmp_path, redis_server, 1)
    assert read(node / repo / "model.safetensors") == b"x" * 3_000_000
    commit = hub.head(repo)
    wait_until(lambda: len(holders(redis_server, repo, commit)) == 1, 10, "the node is listed")
    settings = [
        "--cache-dir",
        str(node.mount.cache_dir),
        "--state-dir",
        str(node.mount.state_dir),
        "--registry",
        redis_server.url(),
        "--peer-address",
        node.peer_address,
    ]
    status = run_cli("status", *settings)
    assert status.returncode == 0, status.stderr
    assert f"peers on at http://{node.peer_address}" in status.stdout
    assert "1 of 1 cached entries listed for peers" in status.stdout
    result = run_cli("evict", repo, "--force", *settings, env={**os.environ, **hub.env()})
    assert result.returncode == 0, result.stderr
    assert holders(redis_server, repo, commit) == []


class TricklingPeer:
    """A peer that serves the right bytes of a model's files, a few hundred KB/s: alive, but too slow."""

    def __init__(self, files: dict[str, bytes], rate: int) -> None:
        self.files, self.rate, self.requests = files, rate, 0
        peer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                data = peer.files[self.path.rsplit("/", 1)[1]]
                peer.requests += 1
                first, last = self.headers["Range"].removeprefix("bytes=").split("-")
                start, end = int(first), min(int(last) + 1, len(data))
                self.send_response(206)
                self.send_header("Content-Length", str(end - start))
                self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(data)}")
                self.end_headers()
                try:
                    for offset in range(start, end, 16384):  # bounded by the range
                        self.wfile.write(data[offset : min(offset + 16384, end)])
                        time.sleep(16384 / peer.rate)
                except OSError:
                    pass  # the node gave up on it, as it should

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.address = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_a_slow_peer_is_left_for_the_hub(
    hub: FakeHub, new_repo_id, mxfs_mount, tmp_path: Path, redis_server: RedisServer
) -> None:
    repo = new_repo_id()
    data = random.Random(25).randbytes(12_000_000)
    files = {"config.json": b"{}", "model.safetensors": data}
    commit = hub.add_repo(repo, files)
    (node,) = start_peers(mxfs_mount, tmp_path, redis_server, 1)
    peer = TricklingPeer(files, rate=200_000)
    try:
        # The fleet has the model, and the trickling peer is listed as holding it complete.
        async def list_the_peer() -> None:
            registry = await open_registry(redis_server.url())
            try:
                key = EntryName(repo, commit).key
                assert await registry.try_claim(key, "other-node", 30.0)
                assert await registry.finish_claim(key, "other-node", Status.DOWNLOADED, None, len(data) + 2)
                await registry.put_holder(key, peer.address, peer.address, True, 60.0)
            finally:
                await registry.aclose()

        trio.run(list_the_peer)
        node.mount.allowed_log.append(rf"peer {peer.address} failed \(.*MB/s from a complete copy\)")
        assert read(node / repo / "model.safetensors") == data
        assert peer.requests > 0
        assert "MB/s from a complete copy" in node.log()
        assert hub.bytes_served(repo, "model.safetensors") > 0
    finally:
        peer.close()


def test_nodes_that_join_later_fetch_from_nodes_still_downloading(
    hub: FakeHub, new_repo_id, mxfs_mount, tmp_path: Path, redis_server: RedisServer
) -> None:
    """A chain, not a star: a node relays what has landed on it to other nodes downloading it."""
    repo = new_repo_id()
    data = random.Random(26).randbytes(16_000_000)
    commit = hub.add_repo(repo, {"config.json": b"{}", "model.safetensors": data})
    hub.inject("slow", repo_id=repo, filename="model.safetensors", bytes_per_second=1_000_000)
    first, *others = start_peers(mxfs_mount, tmp_path, redis_server, 3, "--chunk-size", "1MiB")
    # A node waits only on the Hub downloader and on nodes whose id sorts before its own.
    second, third = sorted(others, key=lambda n: f"http://{n.peer_address}")
    results: dict[str, object] = {}

    def reader(node: Node) -> threading.Thread:
        thread = threading.Thread(
            target=lambda: results.__setitem__(node.peer_address, read(node / repo / "model.safetensors"))
        )
        thread.start()
        return thread

    def downloading(node: Node) -> bool:
        return (f"http://{node.peer_address}", False) in holders(redis_server, repo, commit, complete=True)

    threads = [reader(first)]
    wait_until(lambda: downloading(first), 10, "the Hub downloader is listed")
    threads.append(reader(second))
    wait_until(lambda: downloading(second), 10, "the second node is listed while it downloads")
    threads.append(reader(third))
    for thread in threads:
        thread.join(60)
        assert not thread.is_alive()
    assert all(results[n.peer_address] == data for n in (first, second, third))
    assert hub.bytes_served(repo, "model.safetensors") <= 1.1 * len(data)
    # The third node took some of its bytes from the second, which was still downloading.
    assert second.metric("mxfs_peer_served_bytes_total") > 0


def test_fleet_registry_outage_the_node_downloads_from_the_hub(
    hub: FakeHub, new_repo_id, mxfs_mount, tmp_path: Path, redis_server: RedisServer
) -> None:
    redis_server.client().flushdb()
    repo = new_repo_id()
    data = random.Random(27).randbytes(3_000_000)
    hub.add_repo(repo, {"config.json": b"{}", "model.safetensors": data})
    with TcpProxy(redis_server.port) as fleet_link:
        node = mxfs_mount(
            "--registry",
            f"redis://127.0.0.1:{fleet_link.port}/0",
            "--peer-address",
            f"127.0.0.1:{free_port()}",
            "--no-handoff",
            cache_dir=tmp_path / "node-cache",
            state_dir=tmp_path / "node-state",
        )
    # The fleet's registry is gone (the link closed): this node's own cache and registry are not.
    node.allowed_log += [
        r": fleet registry unavailable \(.*\); downloading from the Hub$",
        r": could not list this node as a holder \(",
    ]
    assert read(node / repo / "model.safetensors") == data
    assert "fleet registry unavailable" in node.log()
    assert hub.bytes_served(repo, "model.safetensors") == len(data)


def test_a_restarted_hub_downloader_ends_its_own_old_claim_and_claims_again(
    hub: FakeHub, new_repo_id, mxfs_mount, tmp_path: Path, redis_server: RedisServer
) -> None:
    """Killed mid-download and restarted at once (well within the lease) with a fresh state dir
    (a pod whose state lived in an emptyDir), a node does not take itself for somebody else's Hub
    download: it ends its old claim and downloads for the fleet."""
    repo = new_repo_id()
    data = random.Random(28).randbytes(8_000_000)
    hub.add_repo(repo, {"config.json": b"{}", "model.safetensors": data})
    slow = hub.inject("slow", repo_id=repo, filename="model.safetensors", bytes_per_second=1_000_000)
    (node,) = start_peers(mxfs_mount, tmp_path, redis_server, 1)

    def read_until_killed() -> None:
        with contextlib.suppress(OSError):  # the daemon is killed under it (ENOTCONN)
            read(node / repo / "model.safetensors")

    reader = threading.Thread(target=read_until_killed, daemon=True)
    reader.start()
    wait_until(lambda: HUB_DOWNLOADER in node.log(), 10, "the node claims the Hub download")
    node.mount.proc.send_signal(signal.SIGKILL)
    node.mount.proc.wait(10)
    slow.remove()
    again = mxfs_mount(
        "--registry",
        redis_server.url(),
        "--peer-address",
        node.peer_address,
        "--no-handoff",
        mountpoint=tmp_path / "mnt-again",
        cache_dir=node.mount.cache_dir,
        state_dir=tmp_path / "fresh-state",
    )
    assert read(again / repo / "model.safetensors") == data
    assert "ended this node's claim from before its restart" in again.log()
    assert HUB_DOWNLOADER in again.log()


def test_peers_over_mutual_tls_admit_only_what_the_fleet_ca_signed(
    hub: FakeHub, new_repo_id, mxfs_mount, tmp_path: Path, redis_server: RedisServer
) -> None:
    """With peer_tls_* the peers speak TLS both ways: the fleet still downloads the model once,
    and a client without a certificate of the fleet's CA gets nothing, whatever it knows."""
    repo = new_repo_id()
    files = model(27, {"model.safetensors": 12_000_000})
    hub.add_repo(repo, files)
    hub.inject("slow", repo_id=repo, filename="*.safetensors", bytes_per_second=6_000_000)
    (fleet_dir := tmp_path / "fleet").mkdir()
    (stranger_dir := tmp_path / "stranger").mkdir()
    fleet_ca, stranger = make_proxy_ca(fleet_dir), make_proxy_ca(stranger_dir)
    token = tmp_path / "peer-token"
    token.write_text("fleet-secret\n")
    token.chmod(0o600)
    tls = ["--peer-tls-cert", str(fleet_ca.cert_file), "--peer-tls-key", str(fleet_ca.key_file),
           "--peer-tls-ca", str(fleet_ca.ca_file), "--peer-token-file", str(token)]  # fmt: skip
    nodes = start_peers(mxfs_mount, tmp_path, redis_server, 3, *tls)

    results = parallel([lambda n=n: read(n / repo / "model.safetensors") for n in nodes])
    assert results == [files["model.safetensors"]] * 3
    total = len(files["model.safetensors"])
    assert hub.bytes_served(repo, "model.safetensors") <= 1.1 * total
    assert sum(n.metric("mxfs_peer_fetched_bytes_total") for n in nodes) >= total
    commit = hub.head(repo)
    wait_until(lambda: len(holders(redis_server, repo, commit)) == 3, 10, "all three nodes listed")
    assert all(node.startswith("https://127.0.0.1:") for node in holders(redis_server, repo, commit))

    host, port = nodes[0].peer_address.split(":")
    target = f"/{repo}/resolve/{commit}/model.safetensors"

    def ask(context: ssl.SSLContext | None, token: str | None = "fleet-secret") -> int | str:
        """The status of a GET of a verified file, or the name of the error that ended it."""
        headers = {"Range": "bytes=0-99"} | ({"Authorization": f"Bearer {token}"} if token else {})
        connection = (
            http.client.HTTPSConnection(host, int(port), context=context, timeout=15)
            if context is not None
            else http.client.HTTPConnection(host, int(port), timeout=15)
        )
        try:
            connection.request("GET", target, headers=headers)
            response = connection.getresponse()
            body = response.read()
            assert response.status != 206 or body == files["model.safetensors"][:100]
            return response.status
        except (OSError, http.client.HTTPException) as exc:
            return type(exc).__name__
        finally:
            connection.close()

    def context(cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
        made = ssl.create_default_context(cafile=str(fleet_ca.ca_file))
        made.check_hostname = False
        if cert is not None:
            made.load_cert_chain(str(cert), str(key))
        return made

    assert ask(context(fleet_ca.cert_file, fleet_ca.key_file)) == 206  # a node of the fleet
    assert ask(context(fleet_ca.cert_file, fleet_ca.key_file), token=None) == 403  # the token still counts
    assert isinstance(ask(None), str)  # plain HTTP
    assert isinstance(ask(context()), str)  # TLS without a certificate
    assert isinstance(ask(context(stranger.cert_file, stranger.key_file)), str)  # another CA's
    assert "peer TLS: refused 127.0.0.1" in nodes[0].log()


def test_peer_tls_files_that_do_not_load_fail_the_start(tmp_path: Path, redis_server: RedisServer) -> None:
    (fleet_dir := tmp_path / "fleet").mkdir()
    (other_dir := tmp_path / "other").mkdir()
    fleet_ca, other = make_proxy_ca(fleet_dir), make_proxy_ca(other_dir)
    (tmp_path / "mnt").mkdir()
    dirs = ["--cache-dir", str(tmp_path / "cache"), "--state-dir", str(tmp_path / "state")]
    peers = ["--registry", redis_server.url(), "--peer-address", f"127.0.0.1:{free_port()}"]
    for cert, key, why in [
        (fleet_ca.cert_file, tmp_path / "missing.key", "No such file"),
        (fleet_ca.cert_file, other.key_file, "KEY_VALUES_MISMATCH"),  # another certificate's key
    ]:
        tls = ["--peer-tls-cert", str(cert), "--peer-tls-key", str(key), "--peer-tls-ca", str(fleet_ca.ca_file)]
        done = run_cli("mount", str(tmp_path / "mnt"), *dirs, *peers, *tls, timeout=60)
        assert done.returncode != 0
        assert "peer TLS: cannot load" in done.stderr and why in done.stderr, done.stderr
        assert not os.path.ismount(tmp_path / "mnt")
