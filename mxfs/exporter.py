"""The daemon's ``/metrics`` (DESIGN section 9): the event counters, and state read at scrape time.

Two kinds of values:

* **Events** (downloads, Hub requests, evictions, registry errors) are counted where they
  happen, in :data:`mxfs.metrics.EVENTS`.
* **State** (entries by status, cache and free bytes, bytes read, open handles, model
  directories handed to the kernel) already lives in the daemon's objects;
  :class:`StateCollector` reads it when Prometheus scrapes, so the hot paths carry no
  bookkeeping for it.  It reads only what the daemon hands it
  (:class:`ScrapeSources`), never the objects' insides, and knows nothing of the daemon.

:func:`listen` binds before the mount is made; :func:`serve` then answers ``GET /metrics`` from
a trio task in the daemon's nursery (not ``prometheus_client.start_http_server``, whose bare
threads would live outside it).
"""

from __future__ import annotations

import logging
import platform
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass

import trio
from prometheus_client import CollectorRegistry, Info
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

from mxfs import __version__
from mxfs.config import split_address
from mxfs.errors import MxfsError
from mxfs.evict import CacheUsage
from mxfs.fetch import Activity
from mxfs.metrics import EVENTS, HANDOFF_OFF, HandOffState, handoff_families
from mxfs.registry import RegistryError, StatusCounts

log = logging.getLogger(__name__)

# The version is no event: it is a registry of its own, exported beside EVENTS.
BUILD = CollectorRegistry()
Info("mxfs_build", "Version of the running mxfs.", registry=BUILD).info(
    {"version": __version__, "python": platform.python_version()}
)


@dataclass(frozen=True)
class ScrapeSources:
    """What a scrape reads, handed over by the daemon: one callable per source."""

    entry_counts: Callable[[], Awaitable[StatusCounts]]  # the registry's entries by status
    cache_usage: Callable[[], Awaitable[CacheUsage]]  # the cache's bytes and its disk's free bytes
    activity: Callable[[], Activity]  # reads and downloads on this node now
    handoff: Callable[[], HandOffState] = lambda: HANDOFF_OFF  # complete models handed to the kernel


# -- state read at scrape time -------------------------------------------------------------------

# The registry's share of a scrape, which must answer within Prometheus's default 10 s timeout.
REFRESH_TIMEOUT = 5.0


class StateCollector:
    """Reads the daemon's state for a scrape.

    Values that need I/O (registry counts, a walk of the cache's blobs, ``statvfs``) are fetched
    by :meth:`refresh` before rendering; :meth:`collect`, which ``prometheus_client`` calls
    synchronously, asks for the fetcher's activity directly, which is safe because it runs in
    the trio thread too.
    """

    def __init__(self, sources: ScrapeSources) -> None:
        self._sources = sources
        self._entries: StatusCounts | None = None
        self._cache_bytes: int | None = None
        self._free_bytes: int | None = None

    async def refresh(self) -> None:
        self._entries = self._cache_bytes = self._free_bytes = None
        with trio.move_on_after(REFRESH_TIMEOUT):
            try:
                self._entries = await self._sources.entry_counts()
            except RegistryError as exc:
                # The series goes absent (Prometheus marks it stale): an honest "unknown".
                log.debug("metrics: no entry counts: %s", exc)
        try:
            usage = await self._sources.cache_usage()
        except OSError as exc:
            log.debug("metrics: no cache usage: %s", exc)
        else:
            self._cache_bytes, self._free_bytes = usage.cache_bytes, usage.free_bytes

    def collect(self) -> Iterator[Metric]:
        activity = self._sources.activity()
        yield CounterMetricFamily(
            "mxfs_read_bytes_total", "Bytes returned by reads through the mount.", value=activity.bytes_read
        )
        yield GaugeMetricFamily(
            "mxfs_open_handles", "File handles open through the mount.", value=activity.open_handles
        )
        yield GaugeMetricFamily(
            "mxfs_downloads_in_progress",
            "Entry downloads this node runs as the claim owner now.",
            value=activity.downloads_running,
        )
        yield from handoff_families(self._sources.handoff())
        if self._entries is not None:
            family = GaugeMetricFamily(
                "mxfs_entries", "Registry entries (models at one commit) by status.", labels=["status"]
            )
            for status in ("downloading", "downloaded", "error"):
                family.add_metric([status], getattr(self._entries, status))
            yield family
        if self._cache_bytes is not None:
            yield GaugeMetricFamily(
                "mxfs_cache_bytes",
                "Disk space held by the cache's blobs, partial downloads included.",
                value=self._cache_bytes,
            )
        if self._free_bytes is not None:
            yield GaugeMetricFamily(
                "mxfs_cache_free_bytes", "Bytes free for mxfs on the cache's filesystem.", value=self._free_bytes
            )


class Exporter:
    """One daemon's metrics: the process's event counters, its version and its :class:`StateCollector`."""

    def __init__(self, sources: ScrapeSources) -> None:
        self.state = StateCollector(sources)
        self.registry = CollectorRegistry()
        self.registry.register(EVENTS)
        self.registry.register(BUILD)
        self.registry.register(self.state)
        # One scrape at a time: a refresh overlapping a render would mix two snapshots.
        self._lock = trio.Lock()

    async def render(self, accept: str = "") -> tuple[bytes, str]:
        """The exposition text in the format the scraper asked for, and its content type."""
        encoder, content_type = choose_encoder(accept)
        async with self._lock:
            await self.state.refresh()
            return encoder(self.registry), content_type


# -- /metrics over HTTP ------------------------------------------------------------------------

# A scrape request is one short head; anything larger or slower is not a scraper.
MAX_REQUEST_HEAD = 8192
REQUEST_TIMEOUT = 10.0
MAX_CONNECTIONS = 8
LINGER_TIMEOUT = 1.0
LINGER_MAX = 64 * 1024


async def listen(address: str) -> list[trio.SocketListener]:
    """Bind ``address`` for :func:`serve`.

    The daemon binds before it mounts, so a taken port or a bad host is a clear startup error
    (an :class:`MxfsError` naming the address) and not a mount that is half up.  ``address`` is
    ``HOST:PORT``, ``[IPv6]:PORT`` or ``:PORT`` (every interface), as ``metrics_address`` allows.
    """
    host, port = split_address(address)
    try:
        listeners = await trio.open_tcp_listeners(port, host=host)
    except OSError as exc:
        raise MxfsError(
            f"metrics: cannot listen on {address}: {exc.strerror or exc} (metrics_address = '' turns metrics off)"
        ) from exc
    log.info("metrics at %s", ", ".join(_url(listener.socket.getsockname()) for listener in listeners))
    return listeners


async def serve(listeners: list[trio.SocketListener], sources: ScrapeSources) -> None:
    """Answer scrapes on ``listeners`` (from :func:`listen`) until cancelled; closes them then."""
    await trio.serve_listeners(_Server(Exporter(sources)).handle, listeners)


def _url(sockname: tuple[str, int] | tuple[str, int, int, int]) -> str:
    host, port = sockname[0], sockname[1]
    return f"http://[{host}]:{port}/metrics" if ":" in host else f"http://{host}:{port}/metrics"


class _Server:
    """A minimal HTTP/1.1 server: ``GET``/``HEAD /metrics``, one request per connection."""

    def __init__(self, exporter: Exporter) -> None:
        self.exporter = exporter
        self._slots = trio.Semaphore(MAX_CONNECTIONS)

    async def handle(self, stream: trio.SocketStream) -> None:
        """One connection (trio closes it afterwards). Never raises: that would end the server and the mount."""
        try:
            self._slots.acquire_nowait()
        except trio.WouldBlock:
            return  # more scrapers at once than any Prometheus setup needs: shed the extra ones
        try:
            with trio.move_on_after(REQUEST_TIMEOUT):
                await self._respond(stream)
                await _linger(stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            log.debug("metrics: connection dropped: %s", exc)
        except Exception:
            log.exception("metrics: scrape failed")
        finally:
            self._slots.release()

    async def _respond(self, stream: trio.SocketStream) -> None:
        head = b""
        while b"\r\n\r\n" not in head:
            if len(head) > MAX_REQUEST_HEAD:
                await _send(stream, 431, b"request head too large\n")
                return
            data = await stream.receive_some(4096)
            if not data:
                return
            head += data
        request_line, *header_lines = head.split(b"\r\n\r\n", 1)[0].split(b"\r\n")
        parts = request_line.split()
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
            await _send(stream, 400, b"bad request\n")
            return
        method, target = parts[0], parts[1]
        if target.split(b"?", 1)[0] != b"/metrics":
            await _send(stream, 404, b"not found; metrics are at /metrics\n")
            return
        if method not in (b"GET", b"HEAD"):
            await _send(stream, 405, b"method not allowed\n", extra=b"Allow: GET, HEAD\r\n")
            return
        accept = ""
        for line in header_lines:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"accept":
                accept = value.strip().decode("latin-1")
        body, content_type = await self.exporter.render(accept)
        await _send(stream, 200, body, content_type=content_type, head_only=method == b"HEAD")


async def _linger(stream: trio.SocketStream) -> None:
    """Read what the client still sends before closing: a close with unread bytes resets the
    connection, and the client may lose the answer (a 431 for an oversized head, say)."""
    await stream.send_eof()
    with trio.move_on_after(LINGER_TIMEOUT):
        drained = 0
        while drained < LINGER_MAX and (data := await stream.receive_some(4096)):
            drained += len(data)


_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed", 431: "Too Large"}


async def _send(
    stream: trio.SocketStream,
    status: int,
    body: bytes,
    *,
    content_type: str = "text/plain; charset=utf-8",
    extra: bytes = b"",
    head_only: bool = False,
) -> None:
    head = (
        f"HTTP/1.1 {status} {_REASONS[status]}\r\n"
        f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n"
    ).encode() + extra
    await stream.send_all(head + b"\r\n" + (b"" if head_only else body))


__all__ = ["Exporter", "ScrapeSources", "StateCollector", "listen", "serve"]
