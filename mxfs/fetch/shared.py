"""What the owner of a download tells the other nodes sharing its cache, in the cache itself.

Nodes that share one cache directory (a network filesystem) share its partial files too.  The
owner publishes, per partial file, which of its ranges are durable:

    <repo folder>/.mxfs-partials/<etag>.json        {"file": <partial file's name>, "size", "ranges"}

written atomically (a temporary file, then a rename) and only after ``fdatasync`` of the partial
file, so a published range is never wrong on disk and never lost.  Readers on other nodes read
those ranges from the partial file as they land (:mod:`.follow`).  Readers that wait leave

    <repo folder>/.mxfs-partials/<etag>.<node>.want  [[start, end], ...]

(the ranges they wait for, refreshed while they wait): the owner then publishes every
``FAST_PUBLISH`` instead of every few seconds, and fetches those ranges on demand as it does for
its own readers.

The folder is hidden and outside ``blobs/``, ``refs/`` and ``snapshots/``, so
``huggingface_hub.scan_cache_dir`` never sees it; it goes with the repo folder when eviction
empties it.  The registry is not used: these files change several times a second while a
download runs, every registry backend would have to carry them, and they describe files that
live in this very directory, which every node reading them can see.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path

from mxfs.cache import SHARED_PARTIALS, HubCache, atomic_write_text
from mxfs.fetch.partials import PartialMap

FOLDER = SHARED_PARTIALS
WANT_SUFFIX = ".want"
# A want file older than this (by the writer's refresh) is a dead reader's: ignored.
WANT_FRESH = 10.0
# How often a waiting reader's node refreshes its want files.
WANT_REFRESH = 2.0


class SharedPartials:
    """The published range maps and readers' wants of one shared cache."""

    def __init__(self, cache: HubCache) -> None:
        self.cache = cache

    def folder(self, repo_id: str) -> Path:
        return self.cache.repo_dir(repo_id) / FOLDER

    def _map_path(self, repo_id: str, etag: str) -> Path:
        return self.folder(repo_id) / f"{etag}.json"

    # -- the owner's side (blocking: run in a thread) ----------------------------------------

    def publish(self, repo_id: str, etag: str, partial_map: PartialMap) -> None:
        """Publish ranges already made durable (the caller ran ``fdatasync`` first)."""
        folder = self.folder(repo_id)
        atomic_write_text(folder / f"{etag}.json", partial_map.to_json())

    def withdraw(self, repo_id: str, etag: str, filename: str) -> None:
        """Remove the published map of ``filename``, unless it names another writer's file."""
        path = self._map_path(repo_id, etag)
        current = self.load(repo_id, etag)
        if current is not None and current.filename == filename:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def wants(self, repo_id: str, etags: set[str]) -> dict[str, list[tuple[int, int]]]:
        """By etag (of ``etags``), the ranges readers on other nodes wait for now."""
        found: dict[str, list[tuple[int, int]]] = {}
        folder = self.folder(repo_id)
        try:
            names = os.listdir(folder)
        except FileNotFoundError:
            return found
        now = time.time()
        for name in names:
            if not name.endswith(WANT_SUFFIX):
                continue
            etag = name.split(".", 1)[0]
            if etag not in etags:
                continue
            try:
                path = folder / name
                if now - path.stat().st_mtime > WANT_FRESH:
                    continue
                ranges = [(int(s), int(e)) for s, e in json.loads(path.read_text())]
            except (OSError, ValueError, TypeError):
                continue  # gone meanwhile, or half-written by a foreign tool: not ours to judge
            found.setdefault(etag, []).extend(ranges)
        return found

    # -- the readers' side (blocking: run in a thread) ---------------------------------------

    def load(self, repo_id: str, etag: str) -> PartialMap | None:
        try:
            return PartialMap.from_json(self._map_path(repo_id, etag).read_text())
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError):
            return None  # written atomically: only a foreign file can be unreadable

    def want(self, repo_id: str, etag: str, node: str, ranges: list[tuple[int, int]]) -> None:
        """Record (or refresh) that this node's readers wait for ``ranges`` of the file."""
        if not self.cache.repo_dir(repo_id).joinpath("snapshots").is_dir():
            return  # the owner has not prepared the repo folder: no stray folder for scan_cache_dir
        atomic_write_text(self.folder(repo_id) / f"{etag}.{node}{WANT_SUFFIX}", json.dumps(ranges))

    def unwant(self, repo_id: str, etag: str, node: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.folder(repo_id) / f"{etag}.{node}{WANT_SUFFIX}").unlink()


__all__ = ["FOLDER", "WANT_REFRESH", "SharedPartials"]
