"""The claim protocol and the read path: who downloads an entry, and how readers get its bytes."""

from mxfs.fetch.catalog import Catalog
from mxfs.fetch.entry import Entry
from mxfs.fetch.fetcher import Activity, EntryFetch, Fetcher, OpenFile

__all__ = ["Activity", "Catalog", "Entry", "EntryFetch", "Fetcher", "OpenFile"]
