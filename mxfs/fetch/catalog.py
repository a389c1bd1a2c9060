"""From a name a user typed to an :class:`Entry`: revision resolution, tree listings, negative cache.

A revision is resolved to a commit once (per daemon run) on first lookup, before anything is
claimed.  Resolutions and tree listings are kept in the state directory, so a daemon started
while the Hub is unreachable (or with ``HF_HUB_OFFLINE=1``) still lists and serves every cached
entry.  The recorded resolution is also how a resolution moves while daemons run: ``mxfs
refresh`` re-resolves against the Hub and records the new commit, and every daemon on that state
directory follows the record (:meth:`Catalog.follow_recorded_refs`).  ``mxfs refresh`` records it
in the shared registry too, and daemons with their own state directory follow that
(:meth:`Catalog.follow_registry_refs`).

An existing huggingface_hub cache mounted as is works offline too: its ``refs/`` and ``trees/``
(or, failing that, its snapshot links) describe what it holds.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

import trio

from mxfs.cache import HubCache
from mxfs.errors import HubUnavailable, InvalidName, MxfsError, NotFound, OfflineMiss
from mxfs.fetch.entry import Entry
from mxfs.hub import Hub, Resolved
from mxfs.names import ModelRef, short_commit
from mxfs.registry import RefRecord
from mxfs.statedir import StateDir, recorded_commit
from mxfs.tree import RepoTree

log = logging.getLogger(__name__)


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
        # Registry refreshes warned about as not followed yet (the Hub could not list them).
        self._unfollowed: set[tuple[ModelRef, str]] = set()
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
        if ref.revision_is_commit:
            commit = ref.revision
        else:
            try:
                resolved = await self.hub.resolve(ref.repo_id, ref.revision)
                commit = resolved.commit
            except (HubUnavailable, OfflineMiss) as exc:
                commit = await self._offline_ref(ref)
                if commit is None:
                    raise
                # Offline by choice (HF_HUB_OFFLINE) is how a cached model is meant to be served:
                # no warning for it, only for a Hub that should answer and does not.
                level = logging.INFO if isinstance(exc, OfflineMiss) else logging.WARNING
                log.log(level, "%s: Hub unavailable (%s); using cached resolution %s", ref, exc, short_commit(commit))
        entry = await self._entry_at(ref.repo_id, commit, resolved)
        if not ref.revision_is_commit:
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
        if ref.revision_is_commit:
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
        movable = [(ref, entry) for ref, entry in self._by_ref.items() if not ref.revision_is_commit]
        if not movable:
            return []

        def recorded() -> list[str | None]:
            return [self.state.read_ref(ref.repo_id, ref.revision) for ref, _ in movable]

        commits = await trio.to_thread.run_sync(recorded, limiter=self.io_limiter)
        moved = []
        for (ref, entry), commit in zip(movable, commits, strict=True):
            if commit is None:
                continue
            try:
                if await self._move(ref, entry, commit, "recorded resolution"):
                    moved.append(ref)
            except MxfsError as exc:
                log.warning("%s: recorded resolution moved to %s, not followed yet: %s", ref, short_commit(commit), exc)
        return moved

    async def follow_registry_refs(self, records: Iterable[RefRecord]) -> tuple[list[ModelRef], list[RefRecord]]:
        """Move resolved refs to the commits ``mxfs refresh`` recorded in the shared registry.

        ``records`` are those recorded since the caller last looked, oldest first.  Returns the
        refs moved, and the records to try again later (their new commit could not be listed:
        the Hub is down, say).  A ref this daemon has not resolved is left alone: its first
        lookup asks the Hub, which is at least as new.  A move is written to the state dir too,
        so a restart (offline included) serves what the fleet serves.
        """
        moved: list[ModelRef] = []
        retry: list[RefRecord] = []
        for record in records:
            ref = ModelRef(record.repo_id, record.revision)
            entry = self._by_ref.get(ref)
            if entry is None or ref.revision_is_commit:
                continue
            try:
                if not await self._move(ref, entry, record.commit, "refreshed in the registry"):
                    continue
            except MxfsError as exc:
                # Tried again every round: warn once per commit, not every few seconds.
                level = logging.DEBUG if (ref, record.commit) in self._unfollowed else logging.WARNING
                self._unfollowed.add((ref, record.commit))
                log.log(level, "%s: refreshed to %s, not followed yet: %s", ref, short_commit(record.commit), exc)
                retry.append(record)
                continue
            self._unfollowed.discard((ref, record.commit))
            try:
                await trio.to_thread.run_sync(
                    self.state.write_ref, ref.repo_id, ref.revision, record.commit, limiter=self.io_limiter
                )
            except OSError as exc:
                # Moved all the same: only a restart would fall back to the old record.
                log.warning("%s: cannot record %s in the state dir: %s", ref, short_commit(record.commit), exc)
            moved.append(ref)
        return moved, retry

    async def _move(self, ref: ModelRef, entry: Entry, commit: str, why: str) -> bool:
        """Point ``ref``, now resolved to ``entry``, at ``commit``.

        False if it is there already, or a lookup or refresh moved it meanwhile; MxfsError if
        the new commit's tree cannot be listed.
        """
        if commit == entry.commit:
            return False
        new = await self._entry_at(ref.repo_id, commit, None)
        if self._by_ref.get(ref) is not entry:
            return False
        self._by_ref[ref] = new
        log.info("%s: now %s (was %s; %s)", ref, short_commit(commit), short_commit(entry.commit), why)
        return True

    async def _offline_ref(self, ref: ModelRef) -> str | None:
        return await trio.to_thread.run_sync(
            recorded_commit, self.state, self.cache, ref.repo_id, ref.revision, limiter=self.io_limiter
        )

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
            tree = await trio.to_thread.run_sync(self.cache.read_tree, repo_id, commit, limiter=self.io_limiter)
            if tree is None:
                raise
            return tree
        await trio.to_thread.run_sync(self.state.write_tree, tree, limiter=self.io_limiter)
        return tree
