"""Peers on hosts of their own: each daemon in a network namespace with its own address on a
bridge, the Hub and Redis on the test's side of it (tests/netns.py).

What loopback cannot show: a node lists the address the others reach it at, peers connect from
their own addresses, and ``peer_allow`` judges the real source address of each connection.
"""

from __future__ import annotations

import http.client
import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.hubserver import FakeHub
from tests.mounting import read, requires_fuse, wait_until
from tests.netns import Hosts
from tests.redis_server import RedisServer

pytestmark = requires_fuse

PORT = 7170


@pytest.fixture
def hosts() -> Iterator[Hosts]:
    """Two namespaces; asked for before ``mxfs_mount``, so the daemons stop before they go."""
    with Hosts(2) as made:
        yield made


def status_from_test_side(address: str, target: str) -> int:
    """The status a GET from the test's address on the bridge gets."""
    host, port = address.split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=15)
    try:
        connection.request("GET", target, headers={"Range": "bytes=0-9"})
        response = connection.getresponse()
        response.read()
        return response.status
    finally:
        connection.close()


def test_peers_at_their_own_addresses_fetch_once_and_admit_by_source_address(
    hosts: Hosts, mxfs_mount, tmp_path: Path
) -> None:
    data = random.Random(41).randbytes(8_000_000)
    with FakeHub(host=hosts.bridge_ip) as hub, RedisServer(also_bind=(hosts.bridge_ip,)) as redis:
        repo = "netns/peers"
        hub.add_repo(repo, {"config.json": b"{}", "model.safetensors": data})
        commit = hub.head(repo)
        first_address, second_address = (f"{ip}:{PORT}" for ip in hosts.ips)

        def node(i: int, allow: str):
            return mxfs_mount(
                "--registry", redis.url(host=hosts.bridge_ip), "--peer-address", f"{hosts.ips[i]}:{PORT}",
                "--peer-allow", allow,
                cache_dir=tmp_path / f"cache{i}", state_dir=tmp_path / f"state{i}", env=hub.env(), wrap=hosts.enter(i),
            )  # fmt: skip

        # The first node admits the second node's address only; the second, the whole bridge.
        first = node(0, f"{hosts.ips[1]}/32")
        second = node(1, f"{hosts.bridge_ip}/24")

        assert read(first / repo / "model.safetensors") == data  # from the Hub
        assert hub.bytes_served(repo, "model.safetensors") == len(data)
        assert read(second / repo / "model.safetensors") == data  # from the first node, across the bridge
        assert hub.bytes_served(repo, "model.safetensors") == len(data), "the second node went to the Hub"
        assert f"downloading from peers (http://{first_address})" in second.log()
        every_byte = f"{len(data) + 2} bytes from peers, 0 ranges from the Hub"
        wait_until(lambda: every_byte in second.log(), 10, "the second node's download ends")

        # The test's own address is on the bridge: the second node admits it, the first does not.
        target = f"/{repo}/resolve/{commit}/model.safetensors"
        assert status_from_test_side(second_address, target) == 206
        assert status_from_test_side(first_address, target) == 403
