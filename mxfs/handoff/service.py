"""The hand-off service: complete models leave FUSE for a read-only bind mount of their view.

Once a model directory (``<org>/<name>`` or an ``@revision`` one a reader looked up) resolves
to a revision whose blobs are all in the cache, the view of that revision (mxfs.handoff.view)
is bound read-only over the directory inside our FUSE mount.  From then on the kernel serves
it from the cache's inodes; FUSE handles opened before keep the FUSE inode and keep working.

What ``open()`` used to tell the daemon comes from elsewhere: opens of the view are reported by
inotify (a touch at once, then at most one per ``touch_interval``), descriptors and mappings
held for longer by the ``/proc`` scan (a touch every ``touch_interval``; eviction runs the
same scan).  Eviction detaches a view before it deletes (:meth:`HandOff.detach_entry`);
``mxfs refresh`` detaches the directories whose revision moved (:meth:`HandOff.detach_refs`),
and the next lookup hands the new commit off.  The directories handed off are recorded in the
state directory so that a restart (after a stop or a ``kill -9``) hands them off again.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import trio

from mxfs.cache import HubCache, atomic_write_text, repo_folder_name
from mxfs.fetch import Entry
from mxfs.handoff import kernel
from mxfs.handoff.usage import OpenWatch
from mxfs.handoff.view import NotComplete, build_view, view_is_current
from mxfs.names import EntryName, ModelRef
from mxfs.openfiles import file_key, in_use

log = logging.getLogger(__name__)

# As often as the fetcher touches the entries open through FUSE (mxfs.fetch.fetcher).
TOUCH_INTERVAL = 60.0
RECORD_FILE = "handoff-dirs"


@dataclass(eq=False)
class ModelDir:
    """One model directory of the mount (``org/name[@rev]``) and what is bound over it."""

    rel: str
    ref: ModelRef
    entry: Entry
    view: Path | None = None  # the view bound over it now; None while FUSE serves it


def view_suffix(name: EntryName) -> str:
    """How a view's bind mount ends in mountinfo's root field, whoever made it."""
    return f"/{repo_folder_name(name.repo_id)}/.mxfs-views/{name.commit}"


class KernelRelease:
    """Eviction's hand-off hook for a process other than the daemon (``mxfs evict``, ``gc``):
    detach whatever binds this node's mount namespace holds of the view; the daemon hands the
    model back itself if it stays."""

    async def detach_entry(self, name: EntryName) -> None:
        def detach_all() -> None:
            for point in kernel.mounts_of_view(view_suffix(name)):
                kernel.detach(Path(point))

        await trio.to_thread.run_sync(detach_all)

    async def restore_entry(self, name: EntryName) -> None:
        return None


class HandOff:
    """Hands complete model directories of one mount to the kernel, and takes them back."""

    def __init__(
        self,
        cache: HubCache,
        mountpoint: Path,
        state_dir: Path,
        *,
        uid: int,
        gid: int,
        touch: Callable[[str], Awaitable[None]],
        completed: trio.MemoryReceiveChannel[Entry],
        touch_interval: float = TOUCH_INTERVAL,
    ) -> None:
        self.cache = cache
        self.mountpoint = mountpoint
        self._record = state_dir / RECORD_FILE
        self._uid, self._gid = uid, gid
        self._touch = touch
        self._completed = completed
        self.touch_interval = touch_interval
        self._dirs: dict[str, ModelDir] = {}
        # Entries eviction is taking away: nothing is handed off until it is done with them.
        self._held: set[str] = set()
        self._touched_at: dict[str, float] = {}
        self._queue_send, self._queue = trio.open_memory_channel[str](math.inf)
        # One mount(2)/umount2(2) at a time: a bind and a detach of one directory never race.
        self._kernel = trio.CapacityLimiter(1)
        self._watch: OpenWatch | None = None

    # -- what the filesystem and the daemon tell it ----------------------------------------------

    def model_dir_resolved(self, rel: str, ref: ModelRef, entry: Entry) -> None:
        """The filesystem resolved ``rel`` (``org/name[@rev]``) to ``entry``: hand it off if complete."""
        current = self._dirs.get(rel)
        if current is not None and current.entry is entry:
            return
        self._dirs[rel] = ModelDir(rel, ref, entry)
        self._queue_send.send_nowait(rel)

    @property
    def attached(self) -> list[str]:
        """The model directories the kernel serves now."""
        return sorted(rel for rel, md in self._dirs.items() if md.view is not None)

    async def detach_refs(self, refs: Iterable[ModelRef]) -> None:
        """Before ``mxfs refresh`` moves these names: take their directories back to FUSE."""
        moved = set(refs)
        for rel, md in list(self._dirs.items()):
            if md.ref in moved:
                await self._detach(md, "its revision moved")
                del self._dirs[rel]

    async def detach_entry(self, name: EntryName) -> None:
        """Eviction is about to delete ``name``: detach every directory showing it, hand none off."""
        self._held.add(name.key)
        for md in list(self._dirs.values()):
            if md.entry.registry_key == name.key:
                await self._detach(md, "evicting")
        await KernelRelease().detach_entry(name)

    async def restore_entry(self, name: EntryName) -> None:
        """Eviction is done with ``name``: hand its directories off again where it is still whole."""
        self._held.discard(name.key)
        for rel, md in self._dirs.items():
            if md.entry.registry_key == name.key:
                self._queue_send.send_nowait(rel)

    # -- the service -----------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Hand off and touch until cancelled; every bind is detached on the way out."""
        await trio.to_thread.run_sync(kernel.make_shared, self.mountpoint, limiter=self._kernel)
        self._watch = OpenWatch()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._attach_queued)
                nursery.start_soon(self._follow_completions)
                nursery.start_soon(self._touch_on_open)
                nursery.start_soon(self._touch_held)
                nursery.start_soon(self._hand_off_recorded)
                task_status.started()
                await trio.sleep_forever()
        finally:
            with trio.CancelScope(shield=True):
                await self.detach_all()
                self._watch.close()

    async def detach_all(self) -> None:
        """Detach every bind under the mount (ours, and any a crashed daemon left)."""

        def detach() -> int:
            points = kernel.submounts(self.mountpoint)
            for point in points:
                kernel.detach(Path(point))
            return len(points)

        count = await trio.to_thread.run_sync(detach, limiter=self._kernel)
        for md in self._dirs.values():
            md.view = None
        if count:
            log.info("hand-off: detached %d model director%s", count, "y" if count == 1 else "ies")

    async def _hand_off_recorded(self) -> None:
        """After a restart: look up the directories handed off before, which hands them off again."""

        def look_up() -> None:
            try:
                rels = self._record.read_text().split("\n")
            except FileNotFoundError:
                return
            for rel in filter(None, rels):
                with contextlib.suppress(OSError):
                    os.stat(self.mountpoint / rel)  # a FUSE lookup: resolves the directory

        await trio.to_thread.run_sync(look_up, abandon_on_cancel=True)

    async def _follow_completions(self) -> None:
        async for entry in self._completed:
            for rel, md in self._dirs.items():
                if md.entry.registry_key == entry.registry_key and md.view is None:
                    self._queue_send.send_nowait(rel)

    async def _attach_queued(self) -> None:
        async for rel in self._queue:
            md = self._dirs.get(rel)
            if md is None or md.view is not None or md.entry.registry_key in self._held:
                continue
            try:
                await self._attach(md)
            except OSError as exc:
                log.warning("%s: could not hand it to the kernel, FUSE serves it: %s", rel, exc)

    async def _attach(self, md: ModelDir) -> None:
        tree = md.entry.tree
        try:
            view = await trio.to_thread.run_sync(
                lambda: build_view(self.cache, tree, uid=self._uid, gid=self._gid), limiter=self._kernel
            )
        except NotComplete as exc:
            log.debug("%s: not handed off yet: %s", md.rel, exc)
            return
        target = self.mountpoint / md.rel

        def bind() -> None:
            kernel.detach(target)  # never two binds on one directory
            kernel.bind_read_only(view, target)

        await trio.to_thread.run_sync(bind, limiter=self._kernel)
        if self._dirs.get(md.rel) is not md or md.entry.registry_key in self._held:
            # Refresh or eviction took the directory back while the bind was made.
            await trio.to_thread.run_sync(kernel.detach, target, limiter=self._kernel)
            return
        md.view = view
        log.info("%s: handed to the kernel (%s)", md.rel, md.entry)
        await trio.to_thread.run_sync(self._watch_view, md.entry, view)
        await trio.to_thread.run_sync(self._write_record)

    def _watch_view(self, entry: Entry, view: Path) -> None:
        assert self._watch is not None
        if entry.registry_key in self._watch.labels():
            return
        for folder in {""} | {p.rpartition("/")[0] for p in entry.files}:
            with contextlib.suppress(OSError):
                self._watch.watch(view / folder, entry.registry_key)

    def _write_record(self) -> None:
        text = "".join(f"{rel}\n" for rel in self.attached)
        with contextlib.suppress(OSError):
            atomic_write_text(self._record, text)

    async def _detach(self, md: ModelDir, why: str) -> None:
        if md.view is None:
            return
        md.view = None
        target = self.mountpoint / md.rel
        if await trio.to_thread.run_sync(kernel.detach, target, limiter=self._kernel):
            log.info("%s: taken back from the kernel (%s); open files keep reading", md.rel, why)
        if self._watch is not None and not any(
            d.view is not None and d.entry.registry_key == md.entry.registry_key for d in self._dirs.values()
        ):
            self._watch.unwatch_label(md.entry.registry_key)
        await trio.to_thread.run_sync(self._write_record)

    # -- touching --------------------------------------------------------------------------------

    async def _touch_if_due(self, key: str) -> None:
        now = trio.current_time()
        if now - self._touched_at.get(key, -math.inf) >= self.touch_interval:
            self._touched_at[key] = now
            await self._touch(key)

    async def _touch_on_open(self) -> None:
        assert self._watch is not None
        while True:
            for key in await self._watch.opened():
                await self._touch_if_due(key)
            if self._watch.overflowed:
                self._watch.overflowed = False
                for key in {md.entry.registry_key for md in self._dirs.values() if md.view is not None}:
                    await self._touch_if_due(key)

    async def _touch_held(self) -> None:
        """Every interval, touch the handed-off entries some process holds open or mapped."""
        while True:
            await trio.sleep(self.touch_interval)
            entries = {md.entry.registry_key: md for md in self._dirs.values() if md.view is not None}
            if entries:
                used = await trio.to_thread.run_sync(self._entries_in_use, list(entries.values()))
                for key in used:
                    self._touched_at[key] = trio.current_time()
                    await self._touch(key)

    def _entries_in_use(self, dirs: list[ModelDir]) -> set[str]:
        keys: dict[tuple[int, int], str] = {}
        for md in dirs:
            if md.view is None:
                continue
            for path in md.entry.files:
                with contextlib.suppress(OSError):
                    keys[file_key(os.stat(md.view / path))] = md.entry.registry_key
        return {keys[k] for k in in_use(keys)}


__all__ = ["HandOff", "KernelRelease", "ModelDir", "view_is_current"]
