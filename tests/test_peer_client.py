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


def client(*holders: Holder, node: str = "http://10.0.0.99:7170", claimer: Holder | None = None) -> PeerRanges:
    peers = PeerRanges(HubClient(endpoint="http://127.0.0.1:9"), httpx2.Client(), node=node)
    peers.claimer = claimer.node if claimer is not None else None
    peers.set_holders(holders)
    return peers


def test_ranges_go_to_complete_holders_in_turn_then_to_the_hub_downloader() -> None:
    downloading = holder(200, complete=False)
    peers = client(holder(1), downloading, holder(3), claimer=downloading)
    firsts = [peers._candidates()[0].node for _ in range(4)]
    assert firsts == [holder(1).node, holder(3).node, holder(1).node, holder(3).node]
    # The node downloading from the Hub comes after every complete copy.
    assert peers._candidates()[-1] == downloading


def test_a_node_waits_only_on_the_hub_downloader_and_on_smaller_ids() -> None:
    """Waits for bytes never go round in a cycle: the Hub downloader waits on nobody, every other
    wait goes to a smaller id."""
    hub_downloader, smaller, larger = (
        holder(200, complete=False),
        holder(10, complete=False),
        holder(98, complete=False),
    )
    me = "http://10.0.0.5:7170"
    assert smaller.node < me < larger.node  # as strings: ids are compared as they are
    peers = client(hub_downloader, smaller, larger, node=me, claimer=hub_downloader)
    assert {h.node for h in peers._candidates()} == {hub_downloader.node, smaller.node}
    # Once the larger node has the whole entry verified, it is a complete holder like any other.
    peers.set_holders([hub_downloader, smaller, holder(98)])
    assert {h.node for h in peers._candidates()} == {hub_downloader.node, smaller.node, holder(98).node}


def test_the_wait_graph_has_no_cycle_however_many_nodes_download_at_once() -> None:
    nodes = [holder(n, complete=False) for n in range(1, 40)]
    hub_downloader = nodes[17]
    edges = {}
    for me in nodes:
        if me == hub_downloader:
            continue  # it fetches from the Hub only
        peers = client(*nodes, node=me.node, claimer=hub_downloader)
        edges[me.node] = {h.node for h in peers._candidates()}
    # Follow every path: each step goes to a smaller id or ends at the Hub downloader.
    for start, targets in edges.items():
        for target in targets:
            assert target == hub_downloader.node or target < start


def test_ranges_spread_over_the_nodes_still_downloading() -> None:
    hub_downloader, other = holder(6, complete=False), holder(7, complete=False)
    peers = client(hub_downloader, other, node="http://10.0.0.8:7170", claimer=hub_downloader)
    assert {peers._candidates()[0].node for _ in range(4)} == {hub_downloader.node, other.node}


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


def test_a_node_asks_only_peers_that_speak_as_it_does() -> None:
    """A TLS node never sends its token in clear; a plain one has no certificate a TLS peer takes."""
    tls = Holder("https://10.0.0.2:7170", "https://10.0.0.2:7170", True, LATER)
    plain = holder(1)
    assert [h.node for h in client(plain, tls, node="https://10.0.0.99:7170")._candidates()] == [tls.node]
    assert [h.node for h in client(plain, tls, node="http://10.0.0.99:7170")._candidates()] == [plain.node]
