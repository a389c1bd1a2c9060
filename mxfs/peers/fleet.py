"""The fleet: nodes with their own caches that share one registry and fetch from each other.

With peers on (``peer_address``), a node's cache is its own: its claims, last-used times, pins
and eviction live in an embedded registry in its state dir (one download per cache, as always),
and the shared registry (Redis, Kubernetes) becomes the fleet's memory of who holds what:

* **the fleet claim.** The shared registry's record of an entry says whether some node is
  downloading it from the Hub (DOWNLOADING, with a lease) or the fleet has it (DOWNLOADED).  The
  first node to need an entry claims it there and downloads from the Hub; every other node that
  needs it meanwhile takes its bytes from that node, which serves the ranges it has as they land
  (a chain: nobody waits for the whole file).  The claim is kept alive like a download's lease;
  a claimer that dies lets its lease run out and the next node to need the entry claims it.
* **holders.** Every node lists itself as a holder of each entry it has complete and verified
  (and, while it downloads from the Hub, of the entry it is downloading), with the address it
  serves at and a time to live that it keeps renewing.  A node that needs an entry fetches
  ranges from the holders in turn (:class:`~mxfs.peers.client.PeerRanges`), and from the Hub
  when no holder can serve.  A node stops listing an entry before eviction deletes its files.

:class:`Fleet` is the :class:`~mxfs.fetch.sources.DownloadSources` the fetcher uses, and the
node's holder heartbeat.  Nothing a peer sends is trusted: every file is verified against the
Hub's checksum by the download, as always.
"""

from __future__ import annotations

import logging
import math
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import httpx2
import trio

from mxfs.fetch import Entry
from mxfs.fetch.sources import RangeClient
from mxfs.hub import HubClient
from mxfs.names import EntryName
from mxfs.peers.client import PeerRanges
from mxfs.registry import Claimed, Holder, Record, Registry, RegistryError, Status

log = logging.getLogger(__name__)

# How long a listing lives without renewal; renewed every third of it.  A node that dies stops
# being listed by then (peers that try it meanwhile fail fast and move on, for 30 s).  Complete
# copies change rarely, so their listings live long: a node holding hundreds of entries renews
# each every few minutes, not every few seconds (on Kubernetes each renewal is an API write).
# A node still downloading lists itself briefly: its listing matters only while it downloads.
HOLDER_TTL = 600.0
DOWNLOADING_TTL = 60.0
# How soon an entry completed outside a download of this daemon's is listed.
HEARTBEAT_INTERVAL = 60.0
# How often a download that takes its bytes from peers looks at the holders again (nodes that
# finish the entry become holders; dead ones drop out).
HOLDERS_REFRESH = 2.0
# How long a node waits for the node that claimed the Hub download to list itself before it
# goes to the Hub itself (the claimer lists itself right after claiming).
CLAIMER_LISTS_WITHIN = 5.0
# Between the node id and a unique part in the claim ids of the fleet's Hub downloads.
CLAIMER_SEPARATOR = "#"
# Parallel registry calls of one heartbeat round.
HEARTBEAT_CONCURRENCY = 8
REGISTRY_WARNING_INTERVAL = 30.0


class Fleet:
    """This node's part in the fleet: its downloads' sources and its holder listings."""

    def __init__(
        self,
        shared: Registry,
        local: Registry,
        hub: HubClient,
        http: httpx2.Client,
        *,
        address: str,
        lease: float,
        token: str | None = None,
    ) -> None:
        self.shared = shared
        self.local = local
        self.hub = hub
        self.http = http
        # The node's id in holder listings is the address it serves at: unique in the fleet, and
        # the same after a restart (so a restarted node replaces its own listings).
        self.node = self.address = address
        self.lease = lease
        self.token = token
        # Entries this node downloads from the Hub now (listed as partial holders).
        self._hub_downloads: set[str] = set()
        # When each complete entry was last listed (trio's clock): the heartbeat renews only
        # the listings that need it.
        self._listed_at: dict[str, float] = {}
        self._warned_at = -math.inf
        self._nursery: trio.Nursery | None = None
        # False in a command without a mount (`mxfs prefetch`): it has no peer server, so it
        # must not list itself nor claim the fleet's Hub download (nobody could fetch from it).
        self.serving = False

    async def run(self, *, serve: bool, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the tasks that go alongside downloads, and (``serve``: the daemon, whose peer
        server serves what it lists) the holder heartbeat, until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self.serving = serve
            if serve:
                await nursery.start(self.heartbeat)
            task_status.started()
            await trio.sleep_forever()

    @asynccontextmanager
    async def _alongside(self, fn: Callable[..., Awaitable[object]], *args: object) -> AsyncIterator[None]:
        """Run ``fn(*args)`` in the fleet's nursery while the body runs.

        Not a nursery of its own around the body: the download's exceptions (a lost lease, a
        domain error) must reach the fetcher as themselves, not wrapped in an ExceptionGroup.
        """
        if self._nursery is None:
            raise RuntimeError("Fleet.run() is not running")
        scope = trio.CancelScope()

        async def run() -> None:
            with scope:
                await fn(*args)

        self._nursery.start_soon(run)
        try:
            yield
        finally:
            scope.cancel()

    # -- the downloads' sources ---------------------------------------------------------------------

    @asynccontextmanager
    async def for_download(self, entry: Entry) -> AsyncIterator[RangeClient]:
        """The range client of one download of ``entry`` into this node's cache.

        Either this node claims the fleet's Hub download (nobody has it, nobody is downloading
        it, or every holder is gone) and downloads from the Hub while serving what it has, or
        it takes the bytes from the holders, the Hub only where they cannot serve.
        """
        name = entry.registry_key
        # The fleet's claim names its node, so the others know which downloading holder goes to
        # the Hub (see PeerRanges: the one node every download may wait on).
        claim_id = f"{self.node}{CLAIMER_SEPARATOR}{uuid.uuid4().hex}"
        registry_down = False
        try:
            if self.serving:
                claimed = await self._claim(name, claim_id)
                claimer_running = not claimed
            else:
                claimed, claimer_running = False, await self.shared.get_status(name) == Status.DOWNLOADING
        except RegistryError as exc:
            self._warn("%s: fleet registry unavailable (%s); downloading from the Hub", entry, exc)
            registry_down = True
        if registry_down:
            yield self.hub
            return
        if claimed:
            async with self._downloading_from_hub(entry, claim_id):
                yield self.hub
            return
        holders = await self._holders_or_claimer(entry, wait=claimer_running)
        peers = PeerRanges(self.hub, self.http, node=self.node, token=self.token)
        peers.claimer = await self._claimer(name)
        peers.set_holders(holders)
        log.info(
            "%s: downloading from peers (%s), the Hub where they cannot serve",
            entry,
            ", ".join(h.node for h in peers.holders) or "none listed yet",
        )
        # Later nodes may fetch what has landed here (a chain, not a star around the Hub downloader).
        relaying = self.serving
        if relaying:
            await self._put_holder(name, complete=False)
        ok = False
        try:
            async with self._alongside(self._follow_holders, entry, peers, relaying):
                yield peers
            ok = True
        finally:
            if relaying and not ok:
                with trio.CancelScope(shield=True), trio.move_on_after(5.0):
                    await self.withdraw(name)
        log.info(
            "%s: %d bytes from peers, %d ranges from the Hub",
            entry,
            peers.peer_bytes,
            peers.hub_ranges,
        )
        if self.serving:
            # Complete and verified here: list this node at once (the heartbeat keeps it listed).
            await self._put_holder(name, complete=True)

    async def _claim(self, name: str, claim_id: str) -> bool:
        """True if this node now owns the fleet's Hub download of ``name``; False when another
        node is downloading it or holders have it."""
        outcome = await self.shared.try_claim(name, claim_id, self.lease)
        if isinstance(outcome, Claimed):
            return True
        if outcome.status == Status.DOWNLOADING:
            return await self._end_own_stale_claim(name, claim_id)
        if outcome.status == Status.ERROR:
            # The last Hub download failed: this node tries the Hub again (one node does).
            return await self.shared.try_reset_error_for_retry(name, claim_id, self.lease)
        # DOWNLOADED: the fleet has it, unless every holder has gone (evicted, or dead).
        if any(h.node != self.node for h in await self.shared.holders(name)):
            return False
        return await self.shared.try_retake(name, claim_id, self.lease, Status.DOWNLOADED)

    async def _end_own_stale_claim(self, name: str, claim_id: str) -> bool:
        """If the fleet's claim on ``name`` names this node, it is this node's own from before a
        restart (one daemon per address, one download per entry): end it and claim afresh; True
        if this node now owns the Hub download.

        Otherwise the others would take this node for the Hub downloader until the old lease ran
        out, while it fetched from them, and their waits could go round in a cycle.  Ending it
        is fenced by the old claim id, so a claim taken over meanwhile is left alone.
        """
        record = await self.shared.get_record(name)
        if record is None or claiming_node(record) != self.node:
            return False
        assert record.claim_id is not None  # (claiming_node says so)
        if not await self.shared.finish_claim(name, record.claim_id, Status.ERROR, "the claiming node restarted"):
            return False
        log.info("%s: ended this node's claim from before its restart", EntryName.parse(name) or name)
        return await self.shared.try_reset_error_for_retry(name, claim_id, self.lease)

    async def _holders_or_claimer(self, entry: Entry, *, wait: bool) -> list[Holder]:
        """The entry's holders; if there are none yet and ``wait`` (another node claimed the Hub
        download), wait a moment for the claimer to list itself (it does right after claiming)."""
        deadline = trio.current_time() + (CLAIMER_LISTS_WITHIN if wait else 0.0)
        while True:
            try:
                holders = [h for h in await self.shared.holders(entry.registry_key) if h.node != self.node]
            except RegistryError as exc:
                self._warn("%s: fleet registry unavailable (%s); downloading from the Hub", entry, exc)
                return []
            if holders or trio.current_time() >= deadline:
                return holders
            await trio.sleep(0.1)

    async def _claimer(self, name: str) -> str | None:
        """The node downloading ``name`` from the Hub for the fleet now, if any."""
        try:
            record = await self.shared.get_record(name)
        except RegistryError:
            return None
        return claiming_node(record) if record is not None else None

    async def _follow_holders(self, entry: Entry, peers: PeerRanges, relaying: bool) -> None:
        """Keep the download's holders current (nodes that finish it join, dead ones drop out,
        nodes that start it later may be asked), and, while this node relays what it has, its
        own listing alive."""
        listed_at = trio.current_time()
        while True:
            await trio.sleep(HOLDERS_REFRESH)
            try:
                peers.claimer = await self._claimer(entry.registry_key)
                peers.set_holders(await self.shared.holders(entry.registry_key))
                if relaying and trio.current_time() - listed_at >= DOWNLOADING_TTL / 3:
                    await self.shared.put_holder(entry.registry_key, self.node, self.address, False, DOWNLOADING_TTL)
                    listed_at = trio.current_time()
            except RegistryError as exc:
                self._warn("%s: could not list peers (%s); using the ones known", entry, exc)

    @asynccontextmanager
    async def _downloading_from_hub(self, entry: Entry, claim_id: str) -> AsyncIterator[None]:
        """Keep the fleet claim and the partial listing while this node downloads from the Hub;
        publish the outcome when it ends."""
        name = entry.registry_key
        log.info("%s: this node downloads it from the Hub for the fleet, serving peers as it lands", entry)
        self._hub_downloads.add(name)
        ok = False
        try:
            await self._put_holder(name, complete=False)
            async with self._alongside(self._keep_claim, entry, claim_id):
                yield
            ok = True
        finally:
            self._hub_downloads.discard(name)
            with trio.CancelScope(shield=True), trio.move_on_after(5.0):
                await self._finish_claim(entry, claim_id, ok)

    async def _keep_claim(self, entry: Entry, claim_id: str) -> None:
        """Renew the fleet claim (and the partial listing) every third of the lease.

        Losing it is not fatal: this node's own download is its own cache's business; another
        node that claims the Hub download meanwhile only costs the Hub some bytes twice.
        """
        name = entry.registry_key
        while True:
            await trio.sleep(self.lease / 3)
            try:
                if not await self.shared.refresh_claim(name, claim_id, self.lease):
                    log.info("%s: another node took over the fleet's Hub download", entry)
                await self.shared.put_holder(name, self.node, self.address, False, DOWNLOADING_TTL)
            except RegistryError as exc:
                self._warn("%s: could not renew the fleet claim (%s)", entry, exc)

    async def _finish_claim(self, entry: Entry, claim_id: str, ok: bool) -> None:
        name = entry.registry_key
        try:
            if ok:
                await self.shared.finish_claim(name, claim_id, Status.DOWNLOADED, None, entry.size)
                await self._put_holder(name, complete=True)
            else:
                await self.shared.finish_claim(name, claim_id, Status.ERROR, "the downloading node's attempt failed")
                await self.shared.drop_holder(name, self.node)
        except RegistryError as exc:
            self._warn("%s: could not record the fleet's download (%s)", entry, exc)

    # -- listings ------------------------------------------------------------------------------

    async def _put_holder(self, name: str, *, complete: bool) -> None:
        try:
            await self.shared.put_holder(
                name, self.node, self.address, complete, HOLDER_TTL if complete else DOWNLOADING_TTL
            )
            if complete:
                self._listed_at[name] = trio.current_time()
            else:
                self._listed_at.pop(name, None)
        except RegistryError as exc:
            self._warn("%s: could not list this node as a holder (%s)", EntryName.parse(name) or name, exc)

    async def withdraw(self, name: str) -> None:
        """Stop listing this node as a holder of ``name`` (eviction, before the files go)."""
        self._listed_at.pop(name, None)
        try:
            await self.shared.drop_holder(name, self.node)
        except RegistryError as exc:
            # Its listing lapses within its time to live; meanwhile peers asking get 404 and move on.
            self._warn("%s: could not withdraw this node's listing (%s)", EntryName.parse(name) or name, exc)

    async def heartbeat(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep this node listed as a holder of every entry its cache holds complete, until
        cancelled: a round every HEARTBEAT_INTERVAL lists what is new (a `mxfs prefetch`, a
        cache found at start-up) and renews each listing once a third of its time to live has
        passed.

        What the cache holds is what its own registry says is DOWNLOADED: eviction deletes the
        record before the files, so an entry being evicted is not listed again.
        """
        task_status.started()
        while True:
            await self.list_holdings()
            await trio.sleep(HEARTBEAT_INTERVAL)

    async def list_holdings(self) -> None:
        """One heartbeat round."""
        try:
            records = await self.local.list_by_last_used()
        except RegistryError as exc:
            self._warn("could not read this node's registry to list its holdings (%s)", exc)
            return
        renew_before = trio.current_time() - HOLDER_TTL / 3
        held = {r.model_name for r in records if r.status == Status.DOWNLOADED and EntryName.parse(r.model_name)}
        for gone in set(self._listed_at) - held:
            del self._listed_at[gone]  # evicted (the evictor withdrew it) or no longer complete
        names = [
            name
            for name in held
            if name not in self._hub_downloads and self._listed_at.get(name, -math.inf) < renew_before
        ]
        limiter = trio.CapacityLimiter(HEARTBEAT_CONCURRENCY)

        async def put(name: str) -> None:
            async with limiter:
                await self._put_holder(name, complete=True)

        async with trio.open_nursery() as nursery:
            for name in names:
                nursery.start_soon(put, name)

    def _warn(self, message: str, *args: object) -> None:
        """Registry trouble at most every 30 s: an outage must not flood the log."""
        now = trio.current_time()
        if now - self._warned_at >= REGISTRY_WARNING_INTERVAL:
            self._warned_at = now
            log.warning(message, *args)


def claiming_node(record: Record) -> str | None:
    """The node a fleet record's running claim names (claim ids are ``<node>#<unique>``), if any."""
    if record.status != Status.DOWNLOADING or not record.claim_id:
        return None
    node, separator, _ = record.claim_id.rpartition(CLAIMER_SEPARATOR)
    return node if separator else None


class HolderListings:
    """This node's holder listings, for a command without the daemon (``mxfs evict``, ``gc``):
    eviction withdraws an entry's listing before its files go, as the daemon's does."""

    def __init__(self, shared: Registry, node: str) -> None:
        self.shared = shared
        self.node = node

    async def withdraw(self, name: str) -> None:
        try:
            await self.shared.drop_holder(name, self.node)
        except RegistryError as exc:
            log.warning("%s: could not withdraw this node's peer listing (%s)", EntryName.parse(name) or name, exc)


__all__ = ["DOWNLOADING_TTL", "HOLDER_TTL", "Fleet", "HolderListings"]
