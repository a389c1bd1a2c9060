"""This node's view of one entry: its files' states, whether a download runs, what went wrong.

A record the fetcher (the claim protocol) and the file sources (the readers) share; it calls
into neither.  Readers ask for the entry's download to start by sending it on ``start_requests``.
"""

from __future__ import annotations

import trio

from mxfs.errors import MxfsError
from mxfs.fetch.download import EntryDownload
from mxfs.fetch.entry import Entry
from mxfs.fetch.files import FileState, ReaderWaits


class EntryFetch:
    """This node's view of one entry: per-file state, who downloads it, and what went wrong."""

    def __init__(
        self,
        entry: Entry,
        discards: trio.MemorySendChannel[tuple[str, str]] | None = None,
        start_requests: trio.MemorySendChannel[EntryFetch] | None = None,
    ) -> None:
        self.entry = entry
        # Where a reader that must wait asks for the download to (re)start: the fetcher reads it.
        self.start_requests = start_requests
        self.states = {path: FileState(f) for path, f in entry.files.items()}
        waits = ReaderWaits()
        for state in self.states.values():
            state.entry_key = entry.registry_key
            state.discards = discards
            state.reader_waits = waits
        self.running = False
        self.error: MxfsError | None = None
        self.retry_at = 0.0
        self.failures = 0
        self.handles = 0
        self.download: EntryDownload | None = None
        self._done = trio.Event()

    @property
    def complete(self) -> bool:
        return all(s.complete for s in self.states.values())

    def progress(self) -> tuple[int, int]:
        """(bytes present on this node, partial files included, total bytes)."""
        return self.entry.tree.progress(lambda f: self.states[f.path].bytes_present)

    def set_error(self, error: MxfsError) -> None:
        self.error = error
        for state in self.states.values():
            if not state.complete:
                state.set_error(error)
        self._done.set()

    def clear_error(self) -> None:
        self.error = None
        for state in self.states.values():
            state.error = None

    def request_start(self) -> None:
        """Have the entry's download (the claim protocol) start, unless it runs, is complete, or
        waits out the backoff after a failure. Cleared at once, so a reader that waits next does
        not see the last attempt's error."""
        if self.running or self.complete:
            return
        if self.error is not None:
            if trio.current_time() < self.retry_at:
                return
            self.clear_error()
        self.running = True
        self.reset_done()
        if self.start_requests is not None:
            self.start_requests.send_nowait(self)

    def release_handle(self) -> None:
        """A handle on one of the entry's files closed."""
        self.handles -= 1
        if self.handles == 0:
            for state in self.states.values():
                if state.complete:  # a partial file's descriptor belongs to its download
                    state.retire_fd()

    def mark_done(self) -> None:
        self._done.set()
        if self.handles == 0:
            # Nobody reads: do not keep blobs open (an open blob counts as "in use" for eviction).
            for state in self.states.values():
                state.retire_fd()

    async def wait_done(self) -> None:
        await self._done.wait()

    def reset_done(self) -> None:
        if self._done.is_set():
            self._done = trio.Event()


__all__ = ["EntryFetch"]
