"""The hand-off service: complete models leave FUSE for a read-only bind mount of their view.

Once a model directory (``<org>/<name>`` or an ``@revision`` one a reader looked up) resolves
to a revision whose blobs are all in the cache, the view of that revision (mxfs.handoff.view)
is bound read-only over the directory inside our FUSE mount.  From then on the kernel serves
it from the cache's inodes; FUSE handles opened before keep the FUSE inode and keep working.

What ``open()`` used to tell the daemon comes from elsewhere: opens of the view's files are
reported by inotify (a touch at once, then at most one per ``OPEN_TOUCH_INTERVAL``: LRU order
keeps a second's precision without a registry write per file of a model being loaded),
descriptors and mappings held for longer by the ``/proc`` scan (a touch every
``touch_interval``; eviction runs the same scan).  The daemon's calls into its own mount run in
child processes (mxfs.handoff.kernel, which says why).  Eviction detaches a view before it
deletes (:meth:`HandOff.detach_entry`); ``mxfs refresh`` detaches the directories whose
revision moved (:meth:`HandOff.detach_refs`), and the next lookup hands the new commit off.
The directories handed off are recorded in the state directory so that a restart (after a
stop or a ``kill -9``) hands them off again; :meth:`HandOff.reconcile` repairs what changed
behind the daemon's back.
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
from mxfs.handoff import kernel, syscalls
from mxfs.handoff.usage import OpenWatch
from mxfs.handoff.view import NotComplete, build_view, view_is_current
from mxfs.names import EntryName, ModelRef
from mxfs.openfiles import file_key, in_use
from mxfs.tree import RepoTree

log = logging.getLogger(__name__)

# As often as the fetcher touches the entries open through FUSE (mxfs.fetch.fetcher).
TOUCH_INTERVAL = 60.0
# At most one touch per entry this often for opens through the kernel (FUSE touches on every open).
OPEN_TOUCH_INTERVAL = 1.0
# How often the hand-offs are checked against the mount table and the cache (``HandOff.reconcile``).
CHECK_INTERVAL = 45.0
RECORD_FILE = "handoff-dirs"


@dataclass(eq=False)
class ModelDir:
    """One model directory of the mount (``org/name[@rev]``) and what is bound over it."""

    rel: str
    ref: ModelRef
    entry: Entry
    view: Path | None = None  # the view bound over it now; None while FUSE serves it


def view_key(tree: RepoTree) -> tuple[str, str]:
    """How :func:`mxfs.handoff.kernel.view_binds` names the view of ``tree``."""
    return repo_folder_name(tree.repo_id), tree.commit


def entry_view_key(name: EntryName) -> tuple[str, str]:
    return repo_folder_name(name.repo_id), name.commit


class KernelRelease:
    """Eviction's hand-off hook for a process other than the daemon (``mxfs evict``, ``gc``):
    detach whatever binds this node's mount namespace holds of the view; the daemon hands the
    model back itself if it stays."""

    async def detach_entry(self, name: EntryName) -> None:
        def detach_all() -> None:
            for point in kernel.view_binds().get(entry_view_key(name), []):
                syscalls.detach(point)  # not the daemon: no FUSE request of its own to wait for

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
        check_interval: float = CHECK_INTERVAL,
    ) -> None:
        self.cache = cache
        self.mountpoint = mountpoint
        # As mountinfo names the mount's directories (no FUSE lookup of the mount point itself).
        self._mount_path = Path(os.path.realpath(mountpoint.parent)) / mountpoint.name
        self.check_interval = check_interval
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
        # One change at a time to the views and their binds: a bind and a detach of one directory
        # never race, nor a view's build and its removal.
        self._serial = trio.Lock()
        self._watch: OpenWatch | None = None
        # Set when the kernel refuses our binds (root without CAP_SYS_ADMIN, a seccomp profile):
        # said once, and FUSE serves everything from then on.
        self.refused = False
        # Set once the daemon stops: the record then keeps what was handed off, for the restart.
        self._stopping = False

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
        async with self._serial:
            pass  # a hand-off in flight ends first: it sees the hold and takes its bind back
        for md in list(self._dirs.values()):
            if md.entry.registry_key == name.key:
                await self._detach(md, "evicting")
        # Binds of the view that this run did not make (a daemon before a restart).
        for point in await trio.to_thread.run_sync(lambda: kernel.view_binds().get(entry_view_key(name), [])):
            async with self._serial:
                await kernel.detach(Path(point))

    async def restore_entry(self, name: EntryName) -> None:
        """Eviction is done with ``name``: hand its directories off again where it is still whole."""
        self._held.discard(name.key)
        for rel, md in self._dirs.items():
            if md.entry.registry_key == name.key:
                self._queue_send.send_nowait(rel)

    # -- the service -----------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Hand off and touch until cancelled.

        The binds are not detached on the way out: a stopping daemon detaches them while its
        loop still answers (:meth:`detach_all`, from the signal handler), and the lazy unmount of
        the FUSE mount detaches whatever is left with it.  Detaching after the loop stopped
        would wait for FUSE answers that nobody gives.
        """
        self._watch = OpenWatch()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._attach_queued)
                nursery.start_soon(self._follow_completions)
                nursery.start_soon(self._touch_on_open)
                nursery.start_soon(self._touch_held)
                nursery.start_soon(self._hand_off_recorded)
                nursery.start_soon(self._reconcile_every_interval)
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._watch.close()

    async def share_mount(self) -> None:
        """Give the FUSE mount shared propagation, once it answers and before the daemon says it is
        ready: a pod (``HostToContainer``) or an ``unshare --propagation slave`` started after
        that sees every later hand-off."""
        try:
            await kernel.make_shared(self.mountpoint)
        except OSError as exc:
            log.warning("hand-off: %s; mount namespaces made from now on will not see hand-offs", exc)

    async def detach_all(self) -> None:
        """Detach every bind under the mount (ours, and any a crashed daemon left)."""

        self._stopping = True  # a hand-off finishing meanwhile must not write its directory out
        async with self._serial:
            for md in self._dirs.values():
                md.view = None
            points = kernel.submounts(self.mountpoint)  # reads mountinfo: no FUSE request
            for point in points:
                await kernel.detach(Path(point))
        count = len(points)
        if count:
            log.info("hand-off: detached %d model director%s", count, "y" if count == 1 else "ies")

    async def _hand_off_recorded(self) -> None:
        """After a restart: look up the directories handed off before, which hands them off again."""

        try:
            rels = (await trio.to_thread.run_sync(self._record.read_text)).split("\n")
        except FileNotFoundError:
            return
        # FUSE lookups, which resolve the directories: in a child, as every call into our mount.
        await kernel.look_up([self.mountpoint / rel for rel in filter(None, rels)])

    async def _reconcile_every_interval(self) -> None:
        while True:
            await trio.sleep(self.check_interval)
            await self.reconcile()

    async def reconcile(self) -> None:
        """Make what the kernel serves match what the daemon believes, after changes behind its back.

        * A bind whose view is no longer whole (its revision deleted by hand, or evicted by
          ``mxfs evict`` in another mount namespace or on another node sharing the cache) is
          taken back to FUSE, and the stale view deleted: its links would keep the deleted blobs'
          disk space.  Readers that opened or mapped a file keep it.  FUSE fetches what a reader
          asks for again; the directory is handed off again once the entry is complete.
        * A bind that is gone while its view is whole (unmounted outside the daemon, a refused
          ``mxfs unmount``) is made again.
        * A directory on FUSE whose entry became complete without this daemon (``mxfs prefetch``,
          another node) is handed off.
        """
        binds = await trio.to_thread.run_sync(kernel.view_binds)
        for md in list(self._dirs.values()):
            if self._dirs.get(md.rel) is not md or md.entry.registry_key in self._held:
                continue
            view = md.view
            if view is None:
                self._queue_send.send_nowait(md.rel)  # handed off if complete now
                continue
            tree = md.entry.tree
            async with self._serial:
                whole = await trio.to_thread.run_sync(view_is_current, self.cache, tree, view)
            if md.view is not view:
                continue  # detached or replaced meanwhile
            if not whole:
                await self._detach(md, "its files left the cache")
                async with self._serial:
                    await trio.to_thread.run_sync(self._drop_stale_view, tree)
                self._queue_send.send_nowait(md.rel)
            elif str(self._mount_path / md.rel) not in binds.get(view_key(tree), []):
                log.info("%s: its bind was unmounted outside the daemon; handing it off again", md.rel)
                md.view = None
                self._queue_send.send_nowait(md.rel)

    def _drop_stale_view(self, tree: RepoTree) -> None:
        view = self.cache.view_dir(tree.repo_id, tree.commit)
        if view.exists() and not view_is_current(self.cache, tree, view):
            self.cache.remove_view(tree.repo_id, tree.commit)

    async def _follow_completions(self) -> None:
        async for entry in self._completed:
            for rel, md in self._dirs.items():
                if md.entry.registry_key == entry.registry_key and md.view is None:
                    self._queue_send.send_nowait(rel)

    async def _attach_queued(self) -> None:
        async for rel in self._queue:
            md = self._dirs.get(rel)
            if self.refused or md is None or md.view is not None or md.entry.registry_key in self._held:
                continue
            try:
                await self._attach(md)
            except FileNotFoundError as exc:
                # The view or the directory went while the bind was made (an eviction or a
                # refresh elsewhere): FUSE serves it, and the next check looks again.
                log.debug("%s: not handed off, gone meanwhile: %s", rel, exc)
            except PermissionError as exc:
                self.refused = True
                log.warning("hand-off: the kernel refuses our mounts (%s); FUSE serves every file", exc)
            except OSError as exc:
                log.warning("%s: could not hand it to the kernel, FUSE serves it: %s", rel, exc)

    async def _attach(self, md: ModelDir) -> None:
        tree = md.entry.tree
        target = self.mountpoint / md.rel
        async with self._serial:
            if self._stopping:
                return  # detached for the stop: no bind after it
            try:
                view = await trio.to_thread.run_sync(lambda: build_view(self.cache, tree, uid=self._uid, gid=self._gid))
            except NotComplete as exc:
                log.debug("%s: not handed off yet: %s", md.rel, exc)
                return
            # Recorded before it is bound: a kill -9 right after the bind still finds it recorded,
            # and the restart hands it off again (a record of a directory not bound costs a lookup).
            await trio.to_thread.run_sync(self._write_record, md.rel)
            await kernel.bind_read_only(view, target)  # over whatever was bound there
            if self._dirs.get(md.rel) is not md or md.entry.registry_key in self._held:
                # Refresh or eviction took the directory back while the bind was made.
                await kernel.detach(target)
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

    def _write_record(self, also: str | None = None) -> None:
        """Record the directories handed off (and ``also``, about to be) for a restart."""
        if self._stopping:
            return
        text = "".join(f"{rel}\n" for rel in sorted({*self.attached, *filter(None, [also])}))
        with contextlib.suppress(OSError):
            atomic_write_text(self._record, text)

    async def _detach(self, md: ModelDir, why: str) -> None:
        if md.view is None:
            return
        md.view = None
        target = self.mountpoint / md.rel
        async with self._serial:
            detached = await kernel.detach(target)
        if detached:
            log.info("%s: taken back from the kernel (%s); open files keep reading", md.rel, why)
        if self._watch is not None and not any(
            d.view is not None and d.entry.registry_key == md.entry.registry_key for d in self._dirs.values()
        ):
            self._watch.unwatch_label(md.entry.registry_key)
        await trio.to_thread.run_sync(self._write_record)

    # -- touching --------------------------------------------------------------------------------

    async def _touch_if_due(self, key: str) -> None:
        now = trio.current_time()
        if now - self._touched_at.get(key, -math.inf) >= OPEN_TOUCH_INTERVAL:
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
