"""From a name a user typed to an :class:`Entry`: revision resolution, tree listings, negative cache.

A revision is resolved to a commit once (per daemon run) on first lookup, before anything is
claimed.  Resolutions and tree listings are kept in the state directory, so a daemon started
while the Hub is unreachable (or with ``HF_HUB_OFFLINE=1``) still lists and serves every cached
entry.  The recorded resolution is also how a resolution moves while daemons run: ``mxfs
refresh`` re-resolves against the Hub and records the new commit, and every daemon on that state
directory follows the record (:meth:`Catalog.follow_recorded_refs`).

An existing huggingface_hub cache mounted as is works offline too: its ``refs/`` and ``trees/``
(or, failing that, its snapshot links) describe what it holds.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import trio

from mxfs.cache import HubCache, atomic_write_text
from mxfs.errors import HubUnavailable, InvalidName, MxfsError, NotFound, OfflineMiss
from mxfs.fetch.entry import Entry
from mxfs.hub import Hub, Resolved
from mxfs.names import COMMIT_RE, ModelRef
from mxfs.tree import HubFile, RepoTree

log = logging.getLogger(__name__)


class StateDir:
    """mxfs's own files beside the HF cache: resolved refs and tree listings, per repo."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def _repo(self, repo_id: str) -> Path:
        return self.root / "repos" / repo_id.replace("/", "--")

    def read_ref(self, repo_id: str, revision: str) -> str | None:
        path = self._repo(repo_id) / "refs" / revision
        with contextlib.suppress(FileNotFoundError, NotADirectoryError):
            commit = path.read_text().strip()
            return commit if COMMIT_RE.fullmatch(commit) else None
        return None

    def write_ref(self, repo_id: str, revision: str, commit: str) -> None:
        atomic_write_text(self._repo(repo_id) / "refs" / revision, commit)

    def read_tree(self, repo_id: str, commit: str) -> RepoTree | None:
        path = self._repo(repo_id) / "trees" / f"{commit}.json"
        try:
            return RepoTree.from_json(path.read_text(), repo_id, commit)
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring unreadable tree listing %s: %s", path, exc)
            return None

    def write_tree(self, tree: RepoTree) -> None:
        atomic_write_text(self._repo(tree.repo_id) / "trees" / f"{tree.commit}.json", tree.to_json())

    def refs_by_commit(self, repo_id: str) -> dict[str, list[str]]:
        """Every recorded revision of ``repo_id``, grouped by the commit it resolved to."""
        base = self._repo(repo_id) / "refs"
        refs: dict[str, list[str]] = {}
        if base.is_dir():
            for path in sorted(base.rglob("*")):
                if path.is_file():
                    refs.setdefault(path.read_text().strip(), []).append(path.relative_to(base).as_posix())
        return refs

    def known_repos(self) -> list[str]:
        with contextlib.suppress(FileNotFoundError):
            return sorted(n.replace("--", "/", 1) for n in os.listdir(self.root / "repos") if "--" in n)
        return []


def tree_from_hf_cache(cache: HubCache, repo_id: str, commit: str) -> RepoTree | None:
    """Rebuild a tree listing from an HF cache written by huggingface_hub (or by us)."""
    snapshot = cache.snapshot_dir(repo_id, commit)
    if not snapshot.is_dir():
        return None
    mtime = datetime.fromtimestamp(snapshot.stat().st_mtime, UTC)
    with contextlib.suppress(FileNotFoundError, ValueError, KeyError, TypeError):
        tree = RepoTree.from_json(cache.tree_path(repo_id, commit).read_text(), repo_id, commit, mtime)
        if tree.files:
            return tree
    # No listing: trust the snapshot links (etag = blob name; sha256 if it has 64 hex digits).
    files: list[HubFile] = []
    for dirpath, _dirs, filenames in os.walk(snapshot):
        for filename in filenames:
            link = Path(dirpath) / filename
            try:
                size = link.stat().st_size
            except FileNotFoundError:
                continue
            etag = os.path.basename(os.readlink(link)) if link.is_symlink() else ""
            rel = link.relative_to(snapshot).as_posix()
            sha256 = etag if len(etag) == 64 else None
            files.append(HubFile(rel, size, etag if len(etag) == 40 else "", sha256))
    return RepoTree(repo_id, commit, mtime, tuple(sorted(files, key=lambda f: f.path)))


@dataclass
class _Miss:
    error: MxfsError
    until: float


class Catalog:
    """Resolves :class:`ModelRef` to :class:`Entry`, once, with single-flight and a negative cache."""

    def __init__(self, hub: Hub, cache: HubCache, state: StateDir, *, negative_ttl: float = 30.0) -> None:
        self.hub = hub
        self.cache = cache
        self.state = state
        self.negative_ttl = negative_ttl
        self._by_ref: dict[ModelRef, Entry] = {}
        self._by_commit: dict[tuple[str, str], Entry] = {}
        self._misses: dict[ModelRef, _Miss] = {}
        self._inflight: dict[ModelRef, trio.Event] = {}
        self.io_limiter = trio.CapacityLimiter(8)

    def resolved_refs(self) -> dict[ModelRef, Entry]:
        return dict(self._by_ref)

    async def lookup(self, ref: ModelRef) -> Entry:
        """The entry ``ref`` names; raises NotFound / AccessDenied / HubUnavailable / OfflineMiss."""
        while True:
            if (entry := self._by_ref.get(ref)) is not None:
                return entry
            miss = self._misses.get(ref)
            if miss is not None:
                if trio.current_time() < miss.until:
                    raise miss.error
                del self._misses[ref]
            if (event := self._inflight.get(ref)) is not None:
                await event.wait()
                continue
            event = self._inflight[ref] = trio.Event()
            try:
                entry = await self._resolve(ref)
            except (NotFound, OfflineMiss) as exc:
                # Only definite answers are cached: a Hub outage must not hide a model for 30 s.
                self._misses[ref] = _Miss(exc, trio.current_time() + self.negative_ttl)
                raise
            finally:
                del self._inflight[ref]
                event.set()
            self._by_ref[ref] = entry
            return entry

    async def _resolve(self, ref: ModelRef) -> Entry:
        resolved: Resolved | None = None
        if ref.pinned_to_commit:
            commit = ref.revision
        else:
            try:
                resolved = await self.hub.resolve(ref.repo_id, ref.revision)
                commit = resolved.commit
            except (HubUnavailable, OfflineMiss) as exc:
                commit = await self._offline_ref(ref)
                if commit is None:
                    raise
                log.warning("%s: Hub unavailable (%s); using cached resolution %s", ref, exc, commit[:12])
        entry = await self._entry_at(ref.repo_id, commit, resolved)
        if not ref.pinned_to_commit:
            await trio.to_thread.run_sync(
                self.state.write_ref, ref.repo_id, ref.revision, commit, limiter=self.io_limiter
            )
        return entry

    async def _entry_at(self, repo_id: str, commit: str, resolved: Resolved | None) -> Entry:
        """The one :class:`Entry` of ``repo_id`` at ``commit`` (its tree listed on first use)."""
        entry = self._by_commit.get((repo_id, commit))
        if entry is None:
            tree = await self._tree(repo_id, commit, resolved)
            entry = self._by_commit.setdefault((repo_id, commit), Entry(tree))
        return entry

    async def refresh(self, ref: ModelRef) -> tuple[str | None, Entry]:
        """Re-resolve ``ref`` against the Hub and record the answer: ``(previous commit, entry)``.

        Unlike a first lookup this never falls back to a recorded resolution: a refresh that
        cannot reach the Hub raises (HubUnavailable / OfflineMiss) and changes nothing.
        """
        if ref.pinned_to_commit:
            raise InvalidName(f"{ref}: a commit never moves; refresh a branch or tag")
        previous = await trio.to_thread.run_sync(
            self.state.read_ref, ref.repo_id, ref.revision, limiter=self.io_limiter
        )
        resolved = await self.hub.resolve(ref.repo_id, ref.revision)
        entry = await self._entry_at(ref.repo_id, resolved.commit, resolved)
        await trio.to_thread.run_sync(
            self.state.write_ref, ref.repo_id, ref.revision, resolved.commit, limiter=self.io_limiter
        )
        self._by_ref[ref] = entry
        self._misses.pop(ref, None)
        return previous, entry

    async def follow_recorded_refs(self) -> list[ModelRef]:
        """Move every resolved ref whose recorded commit changed under us; return those moved.

        The record changes when ``mxfs refresh`` re-resolves a revision, or when another daemon
        sharing this state directory resolved it later (and so more recently) than we did.  A
        ref whose new commit cannot be listed (Hub down, listing not recorded) stays where it is
        and is tried again next time.
        """
        movable = [(ref, entry) for ref, entry in self._by_ref.items() if not ref.pinned_to_commit]
        if not movable:
            return []

        def recorded() -> list[str | None]:
            return [self.state.read_ref(ref.repo_id, ref.revision) for ref, _ in movable]

        commits = await trio.to_thread.run_sync(recorded, limiter=self.io_limiter)
        moved = []
        for (ref, entry), commit in zip(movable, commits, strict=True):
            if commit is None or commit == entry.commit:
                continue
            try:
                new = await self._entry_at(ref.repo_id, commit, None)
            except MxfsError as exc:
                log.warning("%s: recorded resolution moved to %s, not followed yet: %s", ref, commit[:12], exc)
                continue
            if self._by_ref.get(ref) is entry:  # not moved by a lookup or refresh meanwhile
                self._by_ref[ref] = new
                moved.append(ref)
                log.info("%s: now %s (was %s)", ref, commit[:12], entry.commit[:12])
        return moved

    async def _offline_ref(self, ref: ModelRef) -> str | None:
        def read() -> str | None:
            return self.state.read_ref(ref.repo_id, ref.revision) or self.cache.read_ref(ref.repo_id, ref.revision)

        return await trio.to_thread.run_sync(read, limiter=self.io_limiter)

    async def _tree(self, repo_id: str, commit: str, resolved: Resolved | None) -> RepoTree:
        tree = await trio.to_thread.run_sync(self.state.read_tree, repo_id, commit, limiter=self.io_limiter)
        if tree is not None:
            return tree
        try:
            if resolved is None:
                # A commit given by hash: its date comes with the model info of that commit.
                resolved = await self.hub.resolve(repo_id, commit)
                if resolved.commit != commit:
                    raise NotFound(f"{repo_id}@{commit}: not a commit of this repo")
            tree = await self.hub.list_tree(repo_id, resolved)
        except (HubUnavailable, OfflineMiss):
            # An HF cache we did not write (or whose state dir is gone): trust what it holds.
            # Only offline: online, a snapshot folder may be a partial download.
            tree = await trio.to_thread.run_sync(
                tree_from_hf_cache, self.cache, repo_id, commit, limiter=self.io_limiter
            )
            if tree is None:
                raise
            return tree
        await trio.to_thread.run_sync(self.state.write_tree, tree, limiter=self.io_limiter)
        return tree
