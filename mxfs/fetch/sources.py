"""Where a download's bytes come from: the Hub, or (with peers) other nodes first.

The transfer needs a range client: something with :class:`~mxfs.hub.HubClient`'s ``open_range``.
For every download the fetcher asks its :class:`DownloadSources` for one, and keeps it for the
download's life.  Without peers that is the Hub client itself (:class:`HubOnly`); with peers,
:mod:`mxfs.peers.fleet` decides per download whether this node is the one that goes to the Hub
or takes the bytes from the nodes that hold them, and is told how the download ended.  The fetch
package defines the interface and never imports the peers package (nothing calls back up).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, AbstractContextManager, asynccontextmanager
from typing import Protocol

from mxfs.fetch.entry import Entry
from mxfs.hub import HubClient, RangeBody, Transient


class RangeClient(Protocol):
    """What the transfer asks for bytes (run in worker threads)."""

    ignores_ranges: bool
    """Set once the server answered a range request with the whole file (see Transfer)."""

    def open_range(
        self, repo_id: str, commit: str, path: str, start: int, end: int
    ) -> AbstractContextManager[RangeBody]:
        """Stream bytes ``[start, end)`` of a file."""
        ...

    def bad_copy(self, path: str) -> None:
        """The file's bytes failed the Hub's checksum; its next copy is about to be fetched."""
        ...


class SourceFailed(Transient):
    """One source of a range failed (a peer died mid-answer) and the next attempt asks another:
    resumed like any transient failure, but not worth a warning of its own (the range client
    says what happened to the source)."""


class DownloadSources(Protocol):
    """Gives each download its range client, and learns how the download ended."""

    def for_download(self, entry: Entry) -> AbstractAsyncContextManager[RangeClient]:
        """``async with sources.for_download(entry) as client``: the download runs inside; it
        succeeded if the body ends without an exception."""
        ...


class HubOnly:
    """Every download from the Hub (no peers)."""

    def __init__(self, client: HubClient) -> None:
        self.client = client

    @asynccontextmanager
    async def for_download(self, entry: Entry) -> AsyncIterator[RangeClient]:
        yield self.client


__all__ = ["DownloadSources", "HubOnly", "RangeClient", "SourceFailed"]
