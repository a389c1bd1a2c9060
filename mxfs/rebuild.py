"""The embedded registry rebuilt from the cache: after its file was found corrupt, or when it is empty.

A corrupt ``registry.db`` (a disk fault, a truncated or garbled file) used to stop ``mxfs mount``
with an error that systemd restarted into again and again.  Now :func:`open_registry_recovering`
moves it aside (``mxfs.registry.sqlite.quarantine``), opens a fresh one and fills it from the cache.

The SQLite registry describes one node's cache, so the cache is the truth for it: every entry
whose snapshot is complete (each file of the commit's tree listing, as kept in the state dir, is a
snapshot link to its blob, present with the listed size) is recorded as DOWNLOADED with its size.
An entry whose listing the state dir does not hold is left alone: this node never looked it up
(say, an HF cache mounted as it is), and recording it would make eviction delete files that mxfs
did not manage.  Incomplete snapshots get no record; opening them claims and resumes them as
usual.  Pins from ``eviction.pinned`` are applied again by the daemon's start-up (``apply_pins``);
pins made with ``mxfs pin``, claims in progress and errors are lost with the old file.

The rebuild also runs when the registry opens with no record at all, which covers the rest: a
file deleted by hand, one truncated to zero bytes (SQLite takes that for a new, empty database),
and a start that died between moving the file aside and recording the cache (the records go in
one transaction, so a rebuild is all or nothing).  Only ``sqlite://``: a shared registry (Redis,
Kubernetes) describes more than this node's cache, and its corruption is its server's business.

Like eviction, this sits beside the registry and the cache, which know nothing of each other; the
state dir's tree listings come in as a function (``StateDir.read_tree``).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

import trio

from mxfs.cache import HubCache
from mxfs.config import format_size
from mxfs.names import EntryName
from mxfs.registry import Registry, RegistryError, open_registry
from mxfs.registry.sqlite import RegistryCorrupt, RestoredRecord, SqliteRegistry, quarantine
from mxfs.tree import HubFile, RepoTree

log = logging.getLogger(__name__)

# The message of a rebuilt record, so ``mxfs status --json`` says where it came from.
REBUILT_MESSAGE = "recorded from the cache by a registry rebuild"


# (repo_id, commit) -> the listing the state dir keeps, or None.  Blocking.
ReadListing = Callable[[str, str], RepoTree | None]


@dataclass
class Rebuilt:
    """What a rebuild found in the cache and recorded."""

    recorded: list[str] = field(default_factory=list)
    bytes: int = 0
    incomplete: int = 0  # snapshots missing a file: downloaded again when opened
    unlisted: int = 0  # snapshots with no listing in the state dir: not mxfs's to record

    def summary(self) -> str:
        n = len(self.recorded)
        text = f"{n} model{'' if n == 1 else 's'} recorded as DOWNLOADED ({format_size(self.bytes)})"
        if self.incomplete:
            text += f", {self.incomplete} incomplete (completed when opened)"
        if self.unlisted:
            text += f", {self.unlisted} without a tree listing in the state dir (recorded when opened)"
        return text


async def open_registry_recovering(url: str, cache: HubCache, read_listing: ReadListing) -> Registry:
    """:func:`~mxfs.registry.open_registry`; for the embedded registry, also recover it.

    A corrupt file is moved aside and replaced by a fresh one, and a registry without records is
    filled from the cache (:func:`rebuild`).  A failing rebuild is logged and the registry used as
    it is: the models are recorded again as they are opened, and the next start tries again.
    """
    moved = None
    try:
        registry = await open_registry(url)
    except RegistryCorrupt as exc:
        moved = await trio.to_thread.run_sync(quarantine, exc.path)
        if moved is not None:
            log.warning(
                "registry %s is corrupt (%s): moved it (and its -wal and -shm, where present) aside to %s;"
                " starting with a fresh registry, into which every model complete in the cache is recorded again"
                " as DOWNLOADED (pins from eviction.pinned are applied again; pins made with `mxfs pin` and"
                " downloads in progress or failed are forgotten)",
                exc.path,
                exc.reason,
                moved,
            )
        registry = await open_registry(url)
    if not isinstance(registry, SqliteRegistry):
        return registry
    try:
        counts = await registry.status_counts()
        if counts.downloading + counts.downloaded + counts.error == 0:
            done = await rebuild(registry, cache, read_listing)
            if moved is not None or done.recorded:
                log.info("registry %s rebuilt from the cache: %s", registry.url_for_logs, done.summary())
    except (RegistryError, OSError) as exc:
        log.warning(
            "could not rebuild registry %s from the cache (models are recorded as they are opened, and the next"
            " start tries again): %s",
            registry.url_for_logs,
            exc,
        )
    except BaseException:
        with trio.CancelScope(shield=True):
            await registry.aclose()
        raise
    return registry


async def rebuild(registry: SqliteRegistry, cache: HubCache, read_listing: ReadListing) -> Rebuilt:
    """Record every entry complete in the cache as DOWNLOADED (an entry with a record keeps it)."""
    found, done = await trio.to_thread.run_sync(scan, cache, read_listing)
    recorded = set(await registry.restore_downloaded(found))
    done.recorded = [r.model_name for r in found if r.model_name in recorded]
    done.bytes = sum(r.size_bytes for r in found if r.model_name in recorded)
    return done


def scan(cache: HubCache, read_listing: ReadListing) -> tuple[list[RestoredRecord], Rebuilt]:
    """The entries complete in the cache, as records to restore; blocking."""
    found: list[RestoredRecord] = []
    done = Rebuilt()
    for repo_id in cache.cached_repos():
        for commit in cache.cached_commits(repo_id):
            try:
                listing = read_listing(repo_id, commit)
                if listing is None:
                    done.unlisted += 1
                    continue
                times = complete_snapshot_times(cache, repo_id, commit, listing.files)
            except OSError as exc:
                log.warning("%s: left out of the registry rebuild: %s", EntryName(repo_id, commit), exc)
                continue
            if times is None:
                done.incomplete += 1
                continue
            first, last = times
            found.append(
                RestoredRecord(
                    model_name=EntryName(repo_id, commit).key,
                    size_bytes=sum(f.size for f in listing.files),
                    created_at=datetime.fromtimestamp(first, UTC),
                    last_used_at=datetime.fromtimestamp(last, UTC),
                    message=REBUILT_MESSAGE,
                )
            )
    return found, done


def complete_snapshot_times(
    cache: HubCache, repo_id: str, commit: str, files: Sequence[HubFile]
) -> tuple[float, float] | None:
    """(when it arrived, when it was last used) of a complete snapshot; None if one is incomplete.

    Complete: each listed file is a snapshot link that leads to ``blobs/<etag>`` (the same file, not
    a copy or another blob of the same size), present with the listed size.  Blocking.

    The times come from the blobs.  Arrived: the oldest modification time, when the first blob was
    written.  Last used: the newest access or modification time.  mxfs serves a read through the
    mount with a ``pread`` of the blob, so its access time moves with reads (under ``relatime``,
    the Linux default, at most once a day; under ``noatime`` never, and it stays the download
    time), and the modification time is when the download wrote it, when the entry was certainly
    in use.  Nothing else that touches the cache reads blobs (``stat`` and ``du`` do not; a
    program using the cache directly through ``HF_HUB_CACHE`` does, and that is use too), so both
    say "used then or later": the result never makes an entry look more recent than it was, and
    eviction keeps its oldest-first order.  A blob shared with another commit carries that
    commit's use as well.  Times later than now (a clock that was set back) are stored as now.
    """
    first, last = math.inf, -math.inf
    for file in files:
        link = cache.snapshot_file(repo_id, commit, file.path)
        blob = cache.blob_path(repo_id, file.etag)
        try:
            target = os.stat(link)  # follows the link; a dangling one raises
            st = os.stat(blob)
        except (FileNotFoundError, NotADirectoryError):
            return None
        if (target.st_dev, target.st_ino) != (st.st_dev, st.st_ino) or st.st_size != file.size:
            return None
        first = min(first, st.st_mtime)
        last = max(last, st.st_atime, st.st_mtime)
    if not files:  # an empty repo: its snapshot folder is all there is
        first = last = cache.snapshot_dir(repo_id, commit).stat().st_mtime
    return first, last
