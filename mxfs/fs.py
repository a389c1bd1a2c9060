"""The pyfuse3 ``Operations``: inodes, lookup, readdir, open, read, xattrs. A thin translation layer.

The tree it shows::

    /                              orgs with something in the cache or registry
    /<org>/                        any valid org name; lists that org's known models
    /<org>/<name>[@<revision>]/    the repo at one commit: its files and folders
    /<org>/<name>/<path...>        files (0444) and folders (0555), exact sizes, mtime = commit date

Every handler goes through :func:`fuse_handler`: domain errors become their errno, ``OSError``
keeps its errno, and anything unexpected is logged with its traceback and becomes ``EIO``, so no
exception other than ``FUSEError`` ever reaches pyfuse3 (which would end the mount).  The mount
is read-only: every write-type request is ``EROFS``.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import functools
import itertools
import logging
import os
import stat
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ParamSpec, TypeVar

import pyfuse3
import trio

from mxfs import metrics
from mxfs.errors import AccessDenied, InvalidName, MxfsError, NameTooLong, NotFound, ReadOnly, errno_for
from mxfs.fetch import Entry, Fetcher, FileSource
from mxfs.names import (
    XATTR_ETAG,
    XATTR_MODEL,
    XATTR_REVISION,
    XATTR_SIZE,
    XATTR_STATUS,
    ModelRef,
    check_component_length,
    model_dir_name,
    parse_model_dir,
    validate_repo_part,
)
from mxfs.tree import HubFile

log = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")

# Contents of a commit never change: let the kernel cache file and folder attributes for long.
IMMUTABLE_TIMEOUT = 3600.0
# A model directory name follows a branch that `mxfs refresh` may move.
MODEL_TIMEOUT = 60.0
# Root and org listings change as models are used.
LISTING_TIMEOUT = 1.0


def fuse_handler(fn: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
    """Map domain errors to errno at the FUSE boundary; never let another exception escape."""

    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        ops = args[0]
        assert isinstance(ops, MxfsOperations)
        with ops.requests.track() as scope:
            try:
                return await fn(*args, **kwargs)
            except pyfuse3.FUSEError:
                raise
            except (InvalidName, NotFound, NameTooLong, ReadOnly) as exc:
                log.debug("%s: %s", fn.__name__, exc)
                raise pyfuse3.FUSEError(errno_for(exc)) from None
            except AccessDenied as exc:
                log.warning("%s", exc)
                raise pyfuse3.FUSEError(errno_for(exc)) from None
            except (MxfsError, OSError) as exc:
                log.warning("%s: %s", fn.__name__, exc)
                raise pyfuse3.FUSEError(errno_for(exc)) from None
            except Exception:
                log.exception("unexpected error in %s; answering EIO", fn.__name__)
                raise pyfuse3.FUSEError(errno.EIO) from None
        assert scope.cancelled_caught
        raise pyfuse3.FUSEError(errno.EINTR)  # the daemon is stopping

    return wrapper


class InFlight:
    """The requests being answered, so that stopping the daemon can end them.

    ``pyfuse3.main()`` returns only once every request in flight is answered, so a lookup
    waiting for a stalled Hub would hold the exit for its whole timeout and retries (DESIGN
    section 11 promises an exit within 10 s of SIGTERM).  :meth:`cancel_all` answers them with
    ``EINTR`` instead; requests arriving after it are answered so at once.
    """

    def __init__(self) -> None:
        self._scopes: set[trio.CancelScope] = set()
        self.stopping = False

    @contextlib.contextmanager
    def track(self) -> Iterator[trio.CancelScope]:
        scope = trio.CancelScope()
        if self.stopping:
            scope.cancel()
        self._scopes.add(scope)
        try:
            with scope:
                yield scope
        finally:
            self._scopes.discard(scope)

    def cancel_all(self) -> None:
        self.stopping = True
        for scope in self._scopes:
            scope.cancel()


def read_only(fn: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    @functools.wraps(fn)
    async def wrapper(*_args: Any, **_kwargs: Any) -> Any:
        raise pyfuse3.FUSEError(errno.EROFS)

    return wrapper


@dataclass(eq=False)
class Node:
    """One inode. ``kind`` is root, org, model (a model directory), dir (inside a model) or file."""

    inode: int
    kind: str
    parent: int
    name: str = ""
    org: str = ""
    ref: ModelRef | None = None
    entry: Entry | None = None
    path: str = ""  # inside the entry; "" for the model directory itself
    file: HubFile | None = None
    children: dict[str, int] = field(default_factory=dict)
    # Files: the generation of the file's copy when this inode was made. Once a copy of that
    # generation or later is discarded unverified, the inode is retired (see MxfsOperations.open).
    copy_generation: int = 0

    @property
    def is_dir(self) -> bool:
        return self.kind != "file"


class MxfsOperations(pyfuse3.Operations):
    """The filesystem. Talks to the Hub, the registry and the cache only through ``Fetcher``."""

    supports_dot_lookup = True
    enable_writeback_cache = False

    def __init__(
        self,
        fetcher: Fetcher,
        default_revision: str = "main",
        *,
        uid: int | None = None,
        gid: int | None = None,
        on_model_dir: Callable[[str, ModelRef, Entry], None] | None = None,
    ) -> None:
        super().__init__()
        self.fetcher = fetcher
        # Told each model directory (``org/name[@rev]``) as it resolves: the hand-off binds the
        # complete ones over it (mxfs.handoff, wired by the daemon).
        self._on_model_dir = on_model_dir
        self.default_revision = default_revision
        self._inodes = itertools.count(pyfuse3.ROOT_INODE + 1)
        root = Node(pyfuse3.ROOT_INODE, "root", pyfuse3.ROOT_INODE)
        self._nodes: dict[int, Node] = {root.inode: root}
        # How many times the kernel was given each inode (lookup and readdir replies), minus
        # what it forgot: a node is dropped at zero.
        self._lookups: collections.Counter[int] = collections.Counter()
        self._handles: dict[int, FileSource] = {}
        self._dir_handles: dict[int, list[tuple[str, Node]]] = {}
        self._fh = itertools.count(1)
        self.requests = InFlight()
        # The owner every node shows (settings uid/gid); by default the daemon's own.
        self._uid = os.getuid() if uid is None else uid
        self._gid = os.getgid() if gid is None else gid
        self._started = time.time_ns()

    # -- inodes -------------------------------------------------------------------------------

    def _node(self, inode: int) -> Node:
        try:
            return self._nodes[inode]
        except KeyError:
            raise pyfuse3.FUSEError(errno.ENOENT) from None

    def _child(self, parent: Node, name: str, make: Callable[[int], Node]) -> Node:
        """The child inode of ``parent`` called ``name``: stable for the life of the mount."""
        inode = parent.children.get(name)
        if inode is None:
            node = make(next(self._inodes))
            self._nodes[node.inode] = node
            parent.children[name] = node.inode
            metrics.INODES.set(len(self._nodes))
            return node
        return self._nodes[inode]

    def _org_node(self, root: Node, org: str) -> Node:
        return self._child(root, org, lambda ino: Node(ino, "org", root.inode, org, org=org))

    def _model_node(self, org_node: Node, name: str, ref: ModelRef) -> Node:
        return self._child(org_node, name, lambda ino: Node(ino, "model", org_node.inode, name, ref=ref))

    def _tree_child(self, parent: Node, name: str) -> Node:
        entry = parent.entry
        assert entry is not None
        children = entry.children.get(parent.path, {})
        if name not in children:
            raise NotFound(f"{entry}: no {name!r} in /{parent.path}")
        file = children[name]
        path = f"{parent.path}/{name}" if parent.path else name
        kind = "file" if file is not None else "dir"
        generation = self.fetcher.copy_generation(entry, path) if file is not None else 0
        return self._child(
            parent,
            name,
            lambda ino: Node(
                ino, kind, parent.inode, name, entry=entry, path=path, file=file, copy_generation=generation
            ),
        )

    def _retire(self, node: Node) -> None:
        """Give the name of ``node`` a new inode at its next lookup; open handles keep the old one.

        Used for a file whose copy was discarded unverified: the old inode's page cache may hold
        the bad copy's bytes and is shared with the handles that read them, so nothing new may
        be read through it.
        """
        parent = self._nodes.get(node.parent)
        if parent is not None and parent.children.get(node.name) == node.inode:
            del parent.children[node.name]
            pyfuse3.invalidate_entry_async(parent.inode, node.name.encode(), ignore_enoent=True)

    def forget_model_dirs(self, refs: Iterable[ModelRef]) -> None:
        """Give the names of model directories whose revision moved new inodes (``mxfs refresh``).

        A directory never mixes two commits: the old inode keeps its entry, so open files and
        a shell sitting in it go on seeing the old commit, while the next lookup of the name
        makes a new inode on the new commit.  The kernel is told to drop its cached name now
        rather than when the model timeout ends.
        """
        root = self._nodes[pyfuse3.ROOT_INODE]
        for ref in refs:
            org_inode = root.children.get(ref.repo_id.split("/", 1)[0])
            if org_inode is None:
                continue
            org_node = self._nodes[org_inode]
            for name, inode in list(org_node.children.items()):
                if self._nodes[inode].ref == ref:
                    del org_node.children[name]
                    pyfuse3.invalidate_entry_async(org_inode, name.encode(), ignore_enoent=True)

    async def drop_discarded_pages(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Drop the kernel's cached pages of every file whose copy was discarded unverified.

        Readers of such a copy were served its bytes, and the kernel may hold them in the
        inode's page cache, which later reads and mmaps use without asking the daemon.  Dropping
        them makes those readers ask again (and fail: their handles are tainted), and keeps a
        later open of the verified file (``keep_cache``) from ever seeing them.
        """
        discards = self.fetcher.discarded_copies()
        task_status.started()
        async for entry_key, path in discards:
            nodes = [
                node
                for node in list(self._nodes.values())
                if node.kind == "file" and node.path == path and node.entry and node.entry.registry_key == entry_key
            ]
            for node in nodes:
                self._retire(node)
                await self._invalidate_pages(node.inode)
            if nodes:
                log.info(
                    "%s/%s: a copy readers were served was discarded unverified; dropped the kernel's cached pages "
                    "of inode(s) %s, and the name gets a new inode",
                    nodes[0].entry,
                    path,
                    ", ".join(str(node.inode) for node in nodes),
                )

    async def _invalidate_pages(self, inode: int) -> None:
        try:
            # In a thread: the kernel waits for reads in flight on the inode's pages, and those
            # are answered by this very event loop.
            await trio.to_thread.run_sync(pyfuse3.invalidate_inode, inode, False)
        except OSError as exc:
            if exc.errno != errno.ENOENT:  # the kernel has forgotten the inode: nothing cached
                log.warning("could not drop the cached pages of inode %d: %s", inode, exc)

    async def _resolve(self, node: Node) -> Entry:
        """The entry of a model directory (resolved at most once, on first use)."""
        if node.entry is None:
            assert node.ref is not None
            node.entry = await self.fetcher.lookup(node.ref)
            if self._on_model_dir is not None and node.kind == "model":
                org = self._nodes[node.parent].org if node.parent in self._nodes else node.ref.repo_id.split("/")[0]
                self._on_model_dir(f"{org}/{node.name}", node.ref, node.entry)
        return node.entry

    def _reply_entry(self, node: Node) -> pyfuse3.EntryAttributes:
        """The attributes of a lookup reply: the kernel now holds one more reference to ``node``."""
        self._lookups[node.inode] += 1
        return self._attrs(node)

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        """Drop the inodes the kernel no longer knows, so the table holds what is in use.

        Without this every name ever looked up (any org a script probed, every file of every
        model ever listed) would stay in memory for the life of the mount.  An inode dropped
        here gets a new number if the name is looked up again; numbers are never reused.
        pyfuse3 forbids any exception here, FUSEError included: there is no request to fail.
        """
        try:
            self._forget(inode_list)
        except Exception:
            log.exception("forget failed; those inodes stay in memory")

    def _forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        try:
            self._forget_each(inode_list)
        finally:
            metrics.INODES.set(len(self._nodes))

    def _forget_each(self, inode_list: Sequence[tuple[int, int]]) -> None:
        for inode, count in inode_list:
            left = self._lookups.get(inode, 0) - count
            if left > 0:
                self._lookups[inode] = left
                continue
            self._lookups.pop(inode, None)
            node = self._nodes.get(inode)
            if node is None or node.inode == pyfuse3.ROOT_INODE:
                continue
            del self._nodes[inode]
            parent = self._nodes.get(node.parent)
            if parent is not None and parent.children.get(node.name) == inode:
                del parent.children[node.name]
            self._drop_unreferenced(node)

    def _drop_unreferenced(self, node: Node) -> None:
        """Remove the children of a dropped node that the kernel never held (readdir built them
        but did not return them); those it holds stay until their own forget."""
        for inode in node.children.values():
            child = self._nodes.get(inode)
            if child is not None and self._lookups.get(inode, 0) == 0:
                del self._nodes[inode]
                self._drop_unreferenced(child)

    @property
    def inode_count(self) -> int:
        return len(self._nodes)

    # -- attributes ---------------------------------------------------------------------------

    def _attrs(self, node: Node) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = node.inode
        attr.st_uid, attr.st_gid = self._uid, self._gid
        attr.generation = 0
        attr.st_blksize = 1 << 20
        if node.entry is not None:
            mtime = int(node.entry.tree.commit_date.timestamp() * 1e9)
        else:
            mtime = self._started
        attr.st_atime_ns = attr.st_mtime_ns = attr.st_ctime_ns = mtime
        if node.kind == "file":
            assert node.file is not None
            attr.st_mode = stat.S_IFREG | 0o444
            attr.st_nlink = 1
            attr.st_size = node.file.size
            attr.st_blocks = (node.file.size + 511) // 512
            attr.entry_timeout = attr.attr_timeout = IMMUTABLE_TIMEOUT
        else:
            attr.st_mode = stat.S_IFDIR | 0o555
            attr.st_nlink = 2
            attr.st_size = 0
            if node.kind == "dir":
                attr.entry_timeout = attr.attr_timeout = IMMUTABLE_TIMEOUT
            elif node.kind == "model":
                attr.entry_timeout = attr.attr_timeout = MODEL_TIMEOUT
            else:
                attr.entry_timeout = attr.attr_timeout = LISTING_TIMEOUT
        return attr

    # -- lookup and listing -------------------------------------------------------------------

    @fuse_handler
    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        parent = self._node(parent_inode)
        text = _decode(name)
        if text == ".":
            return self._reply_entry(parent)
        if text == "..":
            return self._reply_entry(self._node(parent.parent))
        child = await self._lookup(parent, text)
        return self._reply_entry(child)

    async def _lookup(self, parent: Node, name: str) -> Node:
        check_component_length(name)
        if parent.kind == "root":
            return self._org_node(parent, validate_repo_part(name))
        if parent.kind == "org":
            ref = parse_model_dir(parent.org, name, self.default_revision)
            node = self._model_node(parent, name, ref)
            await self._resolve(node)
            return node
        if parent.kind == "model":
            await self._resolve(parent)
        if parent.kind in ("model", "dir"):
            return self._tree_child(parent, name)
        raise NotFound(f"{parent.path}/{name}: not a directory")

    @fuse_handler
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        node = self._node(inode)
        if node.kind == "model":
            await self._resolve(node)
        return self._attrs(node)

    @fuse_handler
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        node = self._node(inode)
        if not node.is_dir:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        listing = await self._listing(node)
        fh = next(self._fh)
        self._dir_handles[fh] = listing
        return fh

    async def _listing(self, node: Node) -> list[tuple[str, Node]]:
        """A snapshot of the directory taken at opendir, so readdir offsets stay consistent."""
        if node.kind == "root":
            orgs = sorted({repo.split("/", 1)[0] for repo in await self.fetcher.known_repos()})
            return [(org, self._org_node(node, org)) for org in orgs]
        if node.kind == "org":
            names: dict[str, ModelRef] = {}
            for repo in await self.fetcher.known_repos():
                org, _, name = repo.partition("/")
                if org == node.org:
                    names[name] = ModelRef(repo, self.default_revision)
            for ref in self.fetcher.resolved_refs():
                if ref.repo_id.split("/", 1)[0] == node.org:
                    names[model_dir_name(ref, self.default_revision)] = ref
            return [(name, self._model_node(node, name, ref)) for name, ref in sorted(names.items())]
        if node.kind == "model":
            await self._resolve(node)
        assert node.entry is not None
        return [(name, self._tree_child(node, name)) for name in sorted(node.entry.children.get(node.path, {}))]

    @fuse_handler
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        listing = self._dir_handles.get(fh, [])
        for index in range(start_id, len(listing)):
            name, node = listing[index]
            # Forgotten since opendir: the kernel is about to know it again, so it must resolve.
            self._nodes.setdefault(node.inode, node)
            if not pyfuse3.readdir_reply(token, name.encode(), self._attrs(node), index + 1):
                break
            self._lookups[node.inode] += 1  # an entry readdir returns is looked up, for the kernel

    @fuse_handler
    async def releasedir(self, fh: int) -> None:
        self._dir_handles.pop(fh, None)

    # -- files --------------------------------------------------------------------------------

    @fuse_handler
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        node = self._node(inode)
        if node.is_dir:
            raise pyfuse3.FUSEError(errno.EISDIR)
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND | os.O_CREAT):
            raise ReadOnly("the mount is read-only")
        assert node.entry is not None
        handle = await self.fetcher.open(node.entry, node.path)
        if handle.copy_discarded_since(node.copy_generation):
            # This inode's page cache may hold bytes of a discarded copy, and handles that read
            # them still use it: a new handle must not put good bytes there for them to find.
            # ESTALE makes the kernel look the name up again (one retry with LOOKUP_REVAL), and
            # the lookup answers with a new inode.
            handle.close()
            self._retire(node)
            raise pyfuse3.FUSEError(errno.ESTALE)
        fh = next(self._fh)
        self._handles[fh] = handle
        # Blobs are immutable, so cached pages stay right; but only for verified bytes, so a
        # copy that fails its checksum can never linger in the page cache.
        return pyfuse3.FileInfo(fh=fh, keep_cache=handle.complete, direct_io=False)

    @fuse_handler
    async def read(self, fh: int, off: int, size: int) -> bytes:
        handle = self._handles.get(fh)
        if handle is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        return await handle.read(off, size)

    @fuse_handler
    async def release(self, fh: int) -> None:
        handle = self._handles.pop(fh, None)
        if handle is not None:
            handle.close()

    @fuse_handler
    async def flush(self, fh: int) -> None:
        return None

    @fuse_handler
    async def fsync(self, fh: int, datasync: bool) -> None:
        return None  # nothing is ever written through the mount

    # -- extended attributes ------------------------------------------------------------------

    @fuse_handler
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> Sequence[bytes]:
        node = self._node(inode)
        if node.kind == "file":
            return [XATTR_REVISION, XATTR_STATUS, XATTR_ETAG, XATTR_MODEL]
        if node.kind in ("model", "dir"):
            return [XATTR_REVISION, XATTR_STATUS, XATTR_MODEL, XATTR_SIZE]
        return []

    @fuse_handler
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        node = self._node(inode)
        if node.kind == "model":
            await self._resolve(node)
        entry = node.entry
        if entry is None or name not in await self.listxattr(inode, ctx):
            raise pyfuse3.FUSEError(errno.ENODATA)
        if name == XATTR_REVISION:
            return entry.commit.encode()
        if name == XATTR_MODEL:
            return entry.repo_id.encode()
        if name == XATTR_SIZE:
            return str(entry.size).encode()
        if name == XATTR_ETAG:
            assert node.file is not None
            return node.file.etag.encode()
        if node.kind == "file":
            return self.fetcher.file_status(entry, node.path).encode()
        return (await self.fetcher.entry_status(entry)).encode()

    # -- the filesystem as a whole ------------------------------------------------------------

    @fuse_handler
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        st = await self.fetcher.cache_statvfs()
        data = pyfuse3.StatvfsData()
        data.f_bsize, data.f_frsize = st.f_bsize, st.f_frsize
        data.f_blocks, data.f_bfree, data.f_bavail = st.f_blocks, st.f_bfree, st.f_bavail
        data.f_files, data.f_ffree, data.f_favail = st.f_files, st.f_ffree, st.f_favail
        data.f_namemax = 255
        return data

    # -- everything that would write ------------------------------------------------------------

    setattr = read_only(pyfuse3.Operations.setattr)
    mknod = read_only(pyfuse3.Operations.mknod)
    mkdir = read_only(pyfuse3.Operations.mkdir)
    unlink = read_only(pyfuse3.Operations.unlink)
    rmdir = read_only(pyfuse3.Operations.rmdir)
    symlink = read_only(pyfuse3.Operations.symlink)
    rename = read_only(pyfuse3.Operations.rename)
    link = read_only(pyfuse3.Operations.link)
    create = read_only(pyfuse3.Operations.create)
    write = read_only(pyfuse3.Operations.write)
    setxattr = read_only(pyfuse3.Operations.setxattr)
    removexattr = read_only(pyfuse3.Operations.removexattr)


def _decode(name: bytes) -> str:
    try:
        return name.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidName(f"not UTF-8: {name!r}") from None
