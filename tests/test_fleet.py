"""The fleet's holder listings (mxfs.peers.fleet): what a node lists, and how often it writes to
the shared registry.  Under trio's autojump clock, with two real SQLite registries (the node's
own and a stand-in for the fleet's)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx2
import trio

from mxfs.hub import HubClient
from mxfs.names import EntryName
from mxfs.peers.fleet import HEARTBEAT_INTERVAL, HOLDER_TTL, Fleet
from mxfs.registry import Claimed, Registry, Status, open_registry

NODE = "http://10.0.0.1:7170"


class CountingRegistry:
    """The fleet's registry, counting the listings written to it."""

    def __init__(self, inner: Registry) -> None:
        self.inner = inner
        self.puts: list[str] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def put_holder(self, name: str, node: str, address: str, complete: bool, ttl: float) -> None:
        self.puts.append(name)
        await self.inner.put_holder(name, node, address, complete, ttl)


async def cached(local: Registry, repo: str) -> str:
    """Record ``repo`` as complete in this node's own registry; its entry's key."""
    key = EntryName(repo, "a" * 40).key
    assert isinstance(await local.try_claim(key, "claim", 30.0), Claimed)
    assert await local.finish_claim(key, "claim", Status.DOWNLOADED, None, 1)
    return key


async def test_a_heartbeat_round_lists_new_entries_and_renews_only_listings_a_third_of_their_ttl_old(
    tmp_path: Path, autojump_clock: Any
) -> None:
    local = await open_registry(f"sqlite://{tmp_path}/local.db")
    shared = CountingRegistry(await open_registry(f"sqlite://{tmp_path}/fleet.db"))
    try:
        first = await cached(local, "org/first")
        hub = HubClient(endpoint="http://127.0.0.1:9")
        fleet = Fleet(shared, local, hub, httpx2.Client(), address=NODE, lease=30.0)  # type: ignore[arg-type]
        await fleet.list_holdings()
        assert shared.puts == [first]  # listed at start-up
        assert [h.node for h in await shared.holders(first)] == [NODE]
        # An entry completed outside this daemon's downloads (`mxfs prefetch`) is listed by the
        # next round (every HEARTBEAT_INTERVAL); the first, listed just now, is not written again.
        second = await cached(local, "org/second")
        await trio.sleep(HEARTBEAT_INTERVAL)
        await fleet.list_holdings()
        assert shared.puts == [first, second]
        # Each listing is renewed once a third of its time to live has passed.
        await trio.sleep(HOLDER_TTL / 3 + 1)
        await fleet.list_holdings()
        assert sorted(shared.puts) == sorted([first, second, first, second])
        # Evicted: withdrawn, then its record deleted; never listed again.
        await fleet.withdraw(first)
        await local.delete(first)
        await trio.sleep(HOLDER_TTL / 3 + 1)
        await fleet.list_holdings()
        assert shared.puts.count(first) == 2
        assert shared.puts.count(second) == 3
        assert await shared.holders(first) == []
    finally:
        await local.aclose()
        await shared.inner.aclose()
