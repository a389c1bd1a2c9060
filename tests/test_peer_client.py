"""The peer range client's choices (mxfs.peers.client): which holder each range goes to, and
which holders it stops asking.  Real HTTP to a real peer server is in test_peers.py."""

from __future__ import annotations

from datetime import UTC, datetime

import httpx2

from mxfs.hub import HubClient
from mxfs.peers.client import PeerRanges, peer_url
from mxfs.registry import Holder

LATER = datetime(2100, 1, 1, tzinfo=UTC)


def holder(n: int, complete: bool = True) -> Holder:
    return Holder(f"http://10.0.0.{n}:7170", f"http://10.0.0.{n}:7170", complete, LATER)


def client(*holders: Holder, node: str = "http://10.0.0.99:7170", upstreams: tuple[Holder, ...] = ()) -> PeerRanges:
    hub = HubClient(endpoint="http://127.0.0.1:9")
    peers = PeerRanges(hub, httpx2.Client(), node=node, upstreams=frozenset(h.node for h in upstreams))
    peers.set_holders(holders)
    return peers


def test_ranges_go_to_complete_holders_in_turn_then_to_the_hub_downloader() -> None:
    downloading = holder(2, complete=False)
    peers = client(holder(1), downloading, holder(3), upstreams=(downloading,))
    firsts = [peers._candidates()[0].node for _ in range(4)]
    assert firsts == [holder(1).node, holder(3).node, holder(1).node, holder(3).node]
    # The node downloading from the Hub comes after every complete copy.
    assert peers._candidates()[-1] == downloading


def test_only_nodes_still_downloading_that_listed_before_this_one_are_asked() -> None:
    """Waits for bytes point at earlier nodes only: a tree rooted at the Hub downloader, never a cycle."""
    earlier, later = holder(4, complete=False), holder(5, complete=False)
    peers = client(earlier, later, upstreams=(earlier,))
    assert peers._candidates() == [earlier]
    # Once the later node has the whole entry verified, it is a complete holder like any other.
    peers.set_holders([earlier, holder(5)])
    assert {h.node for h in peers._candidates()} == {earlier.node, holder(5).node}


def test_ranges_spread_over_the_upstreams_still_downloading() -> None:
    first, second = holder(6, complete=False), holder(7, complete=False)
    peers = client(first, second, upstreams=(first, second))
    assert {peers._candidates()[0].node for _ in range(4)} == {first.node, second.node}


def test_this_node_is_never_its_own_peer() -> None:
    peers = client(holder(1), holder(99), node=holder(99).node)
    assert [h.node for h in peers._candidates()] == [holder(1).node]


def test_a_failed_peer_is_left_alone_and_the_others_are_asked() -> None:
    peers = client(holder(1), holder(2))
    peers._failed(holder(1), "org/name@abc/model.safetensors", "connection refused")
    assert [h.node for h in peers._candidates()] == [holder(2).node]
    peers._failed(holder(2), "org/name@abc/model.safetensors", "HTTP 404")
    assert peers._candidates() == []  # then the Hub


def test_a_bad_copy_stops_every_peer_that_sent_bytes_of_that_file_only() -> None:
    peers = client(holder(1), holder(2), holder(3))
    peers._served["model.safetensors"] = {holder(1).node, holder(2).node}
    peers._served["config.json"] = {holder(3).node}
    peers.bad_copy("model.safetensors")
    assert [h.node for h in peers._candidates()] == [holder(3).node]
    # The next copy of the file starts with nobody blamed yet.
    assert "model.safetensors" not in peers._served


def test_a_bad_copy_fetched_from_the_hub_blames_no_peer() -> None:
    peers = client(holder(1))
    peers.bad_copy("model.safetensors")
    assert [h.node for h in peers._candidates()] == [holder(1).node]


def test_peer_url_is_the_hubs_resolve_scheme() -> None:
    url = peer_url("http://10.0.0.1:7170/", "org/name", "a" * 40, "sub dir/model.safetensors")
    assert url == f"http://10.0.0.1:7170/org/name/resolve/{'a' * 40}/sub%20dir/model.safetensors"
