"""The claim protocol and the read path: who downloads an entry, and how readers get its bytes.

See docs/internals.md (Layout of the code) for its parts: claim, planner, transfer, source.
"""

from mxfs.fetch.catalog import Catalog
from mxfs.fetch.entry import Entry
from mxfs.fetch.entrystate import EntryFetch
from mxfs.fetch.fetcher import Activity, Fetcher
from mxfs.fetch.source import FileSource

__all__ = ["Activity", "Catalog", "Entry", "EntryFetch", "Fetcher", "FileSource"]
