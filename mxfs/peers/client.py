"""Fetch an entry's byte ranges from peers that hold it, falling back to the Hub.

:class:`PeerRanges` is a range client with :class:`~mxfs.hub.HubClient`'s ``open_range``: the
download's transfer (ranges, parallel, on demand) uses it unchanged.  Each range goes to one
holder, taken in turn so that a download spreads over every node that holds the entry, complete
copies first and then the node downloading it from the Hub (which serves the ranges it has, and
waits for the others as its own readers would).  A holder that refuses, fails or stalls is left
alone for a while and the range is asked of the next one; when none is left, of the Hub.

A peer is never trusted: every file is verified against the Hub's checksum as always (the
download does that), so a bad peer can cost time, never bytes.  When a file fails its checksum,
:meth:`PeerRanges.bad_copy` stops asking every peer that sent bytes of it for a long while, and
the file's next copy comes from other peers or the Hub.

Runs in the transfer's worker threads: the state below is guarded by a lock, and time is the
monotonic clock (trio's clock is not readable from a worker thread).
"""

from __future__ import annotations

import itertools
import logging
import ssl
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from urllib.parse import quote

import httpx2

from mxfs import metrics
from mxfs.errors import HubUnavailable, MxfsError
from mxfs.fetch.sources import SourceFailed
from mxfs.hub import CONNECT_TIMEOUT, READ_TIMEOUT, HubClient, RangeBody, Transient
from mxfs.names import EntryName
from mxfs.registry import Holder

log = logging.getLogger(__name__)

# A peer that failed a request (refused, unreachable, an error answer, a stalled or broken body)
# is not asked again for this long: long enough not to hammer a dead node, short enough that a
# restarted one is used again soon.
FAILED_PEER_PAUSE = 30.0
# A peer whose bytes failed a file's checksum is not asked again for this long.
BAD_COPY_PAUSE = 600.0
# Connecting to a peer on the same network takes milliseconds: a peer that does not accept within
# this long is treated as down and the range goes elsewhere.
PEER_CONNECT_TIMEOUT = min(CONNECT_TIMEOUT, 3.0)


# A complete copy is on a disk on the fleet's network: a range from it that arrives slower than
# this (measured over SLOW_WINDOW seconds, after the first) is a peer in trouble (an overloaded
# node, a failing disk, a congested link), and the rest of the range goes elsewhere.  Not applied
# to the node downloading from the Hub, whose answers are paced by the Hub.
MIN_PEER_RATE = 4 * 1024 * 1024
SLOW_WINDOW = 5.0


class PeerTooSlow(Transient):
    """A complete holder sent a range slower than MIN_PEER_RATE."""


class _Meter:
    """Told the length of each piece of one peer's answer (RangeBody's ``on_bytes``): counts the
    peer's bytes, and gives up on a complete holder that sends too slowly."""

    def __init__(self, peers: PeerRanges, what: str, min_rate: float | None) -> None:
        self.peers = peers
        self.what = what
        self.min_rate = min_rate
        self.window_start = time.monotonic()
        self.window_bytes = 0

    def __call__(self, n: int) -> None:
        self.peers._count(n)
        if self.min_rate is None:
            return
        self.window_bytes += n
        elapsed = time.monotonic() - self.window_start
        if elapsed >= SLOW_WINDOW:
            if self.window_bytes < self.min_rate * elapsed:
                rate = self.window_bytes / elapsed / 1e6
                raise PeerTooSlow(f"{self.what}: {rate:.1f} MB/s from a complete copy")
            self.window_start, self.window_bytes = time.monotonic(), 0


class PeerFailed(Exception):
    """A peer could not start serving a range (the range is then asked elsewhere)."""


def peer_url(address: str, repo_id: str, commit: str, path: str) -> str:
    """The URL a peer serves a file at: the Hub's own ``resolve`` scheme (see mxfs.peers.server)."""
    return f"{address.rstrip('/')}/{quote(repo_id)}/resolve/{commit}/{quote(path)}"


class PeerRanges:
    """The range client of one download that may take its bytes from peers."""

    def __init__(
        self,
        hub: HubClient,
        http: httpx2.Client,
        *,
        node: str,
        token: str | None = None,
    ) -> None:
        self.hub = hub
        self.http = http
        self.node = node  # this node's own id: never asked
        self.token = token
        # The node downloading the entry from the Hub for the fleet (the fleet's claim names it).
        self.claimer: str | None = None
        self._lock = threading.Lock()
        self._holders: tuple[Holder, ...] = ()
        self._paused: dict[str, float] = {}  # node -> monotonic time it may be asked again
        self._served: dict[str, set[str]] = {}  # path -> nodes that sent bytes of its current copy
        self._turn = itertools.count()
        self.peer_bytes = 0
        self.hub_ranges = 0

    # -- what the fleet tells it ---------------------------------------------------------------

    def set_holders(self, holders: Sequence[Holder]) -> None:
        """The entry's holders as the registry lists them now (called from the trio thread):
        those with a complete copy, and those still downloading it that :meth:`may_wait_on`."""
        scheme = _scheme(self.node)
        usable = [
            h
            for h in holders
            if h.node != self.node and _scheme(h.address) == scheme and (h.complete or self.may_wait_on(h.node))
        ]
        with self._lock:
            self._holders = tuple(usable)

    def may_wait_on(self, node: str) -> bool:
        """Whether this node may ask ``node``, still downloading the entry, for bytes it may not
        have yet (its answer then waits for them).

        The Hub downloader, and nodes whose id sorts before this one's: the Hub downloader waits
        on nobody but the Hub, and every other wait goes to a smaller id, so waits can never go
        round in a cycle, however many nodes start at once, and the first wave of a fleet that
        starts together spreads over all of them instead of a star around the Hub downloader.
        """
        return node == self.claimer or node < self.node

    @property
    def holders(self) -> tuple[Holder, ...]:
        return self._holders

    # -- the range client's interface -----------------------------------------------------------

    @property
    def ignores_ranges(self) -> bool:
        """Whether the Hub ignores ``Range`` (peers never do): the transfer plans by it."""
        return self.hub.ignores_ranges

    @ignores_ranges.setter
    def ignores_ranges(self, value: bool) -> None:
        self.hub.ignores_ranges = value

    @contextmanager
    def open_range(self, repo_id: str, commit: str, path: str, start: int, end: int) -> Iterator[RangeBody]:
        """Stream bytes ``[start, end)`` of a file from a peer if one serves it, else from the Hub."""
        what = f"{EntryName(repo_id, commit)}/{path}"
        for holder in self._candidates():
            stack = ExitStack()
            try:
                body = self._open_at(stack, holder, repo_id, commit, path, start, end, what)
            except PeerFailed as exc:
                stack.close()
                self._failed(holder, what, str(exc))
                continue
            with self._lock:
                # Counted before a byte is read: the bytes of this copy came (partly) from it.
                self._served.setdefault(path, set()).add(holder.node)
            metrics.PEER_RANGES.labels("peer").inc()
            with stack:
                try:
                    yield body
                except (Transient, HubUnavailable) as exc:
                    # The body broke or stalled: the transfer resumes the range, elsewhere.
                    self._failed(holder, what, str(exc))
                    raise SourceFailed(f"{what}: peer {holder.node} stopped sending") from exc
            return
        with self._lock:
            self.hub_ranges += 1
        metrics.PEER_RANGES.labels("hub").inc()
        with self.hub.open_range(repo_id, commit, path, start, end) as body:
            yield body

    def bad_copy(self, path: str) -> None:
        """The file's bytes failed the Hub's checksum: stop asking the peers that sent any of them."""
        with self._lock:
            nodes = self._served.pop(path, set())
            until = time.monotonic() + BAD_COPY_PAUSE
            for node in nodes:
                self._paused[node] = until
        for node in sorted(nodes):
            log.warning(
                "peer %s sent bytes of %s that failed the Hub's checksum; not asking it again for %.0f minutes",
                node,
                path,
                BAD_COPY_PAUSE / 60,
            )

    # -- choosing and asking ---------------------------------------------------------------------

    def _candidates(self) -> list[Holder]:
        """Holders to try for one range, in order: complete copies, then the nodes still
        downloading it that this node may wait on; each group starting at the next one in turn,
        so ranges spread over it."""
        now = time.monotonic()
        with self._lock:
            usable = [h for h in self._holders if self._paused.get(h.node, 0.0) <= now]
            turn = next(self._turn)
        return _rotated([h for h in usable if h.complete], turn) + _rotated([h for h in usable if not h.complete], turn)

    def _open_at(
        self, stack: ExitStack, holder: Holder, repo_id: str, commit: str, path: str, start: int, end: int, what: str
    ) -> RangeBody:
        headers = {"Range": f"bytes={start}-{end - 1}", "Accept-Encoding": "identity"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        url = peer_url(holder.address, repo_id, commit, path)
        timeout = httpx2.Timeout(READ_TIMEOUT, connect=PEER_CONNECT_TIMEOUT)
        try:
            response = stack.enter_context(self.http.stream("GET", url, headers=headers, timeout=timeout))
        except httpx2.HTTPError as exc:
            raise PeerFailed(f"{type(exc).__name__}: {exc}") from exc
        if response.status_code != 206:
            response.read()
            if response.status_code == 403:
                log.warning(
                    "peer %s refused %s (HTTP 403): is this node in its peer_allow, with the same peer token?",
                    holder.node,
                    what,
                )
            raise PeerFailed(f"HTTP {response.status_code}")
        try:
            meter = _Meter(self, what, MIN_PEER_RATE if holder.complete else None)
            return RangeBody(response, start, end, what, on_bytes=meter)
        except MxfsError as exc:
            raise PeerFailed(str(exc)) from exc

    def _count(self, n: int) -> None:
        self.peer_bytes += n  # a single counter's lost update only skews a log line
        metrics.PEER_FETCHED_BYTES.inc(n)

    def _failed(self, holder: Holder, what: str, why: str) -> None:
        now = time.monotonic()
        with self._lock:
            was_usable = self._paused.get(holder.node, 0.0) <= now
            self._paused[holder.node] = max(self._paused.get(holder.node, 0.0), now + FAILED_PEER_PAUSE)
        metrics.PEER_RANGES.labels("failed").inc()
        # Said once per pause, not once per range in flight.
        log.log(
            logging.WARNING if was_usable else logging.DEBUG,
            "%s: peer %s failed (%s); not asking it for %.0fs, asking other peers or the Hub",
            what,
            holder.node,
            why,
            FAILED_PEER_PAUSE,
        )


def _rotated(holders: list[Holder], turn: int) -> list[Holder]:
    if not holders:
        return holders
    first = turn % len(holders)
    return holders[first:] + holders[:first]


def _scheme(url: str) -> str:
    """``https`` for a node that speaks mutual TLS, ``http`` for one that does not.  A node asks
    only peers that speak as it does: a TLS node never sends its token in clear, and a plain one
    has no certificate a TLS peer would accept."""
    return url.partition("://")[0]


def open_peer_http(tls: ssl.SSLContext | None = None) -> httpx2.Client:
    """The HTTP client for peers: its own connection pool, and no proxy (peers are on the fleet's
    own network; ``HTTPS_PROXY`` is for the Hub).  ``tls``: the client context of mutual TLS
    (mxfs.peers.tls), which presents this node's certificate and checks the peer's."""
    return httpx2.Client(
        trust_env=False,
        follow_redirects=False,
        timeout=None,
        limits=httpx2.Limits(max_connections=256),
        verify=tls if tls is not None else True,
    )


__all__ = ["PeerFailed", "PeerRanges", "open_peer_http", "peer_url"]
