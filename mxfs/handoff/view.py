"""The hand-off view of a complete revision: a folder of hard links to its blobs.

Mounted read-only over the model directory (``mxfs.handoff.kernel``), it shows what the FUSE
view shows, from the cache's own inodes: the same names, sizes, contents, modes (files 0444,
folders 0555), owner and mtime/atime (the commit date).  A hard link shares the blob's inode,
so the blob itself takes mode 0444, the owner and the times: harmless for a file that never
changes (the daemon unlinks, never writes, a published blob).  Two paths with one blob (twins)
are two links to one inode.  The view lives inside the repo folder (``HubCache.view_dir``):
hard links need the cache's filesystem, and huggingface_hub's scan ignores that folder.

The ``user.mxfs.*`` extended attributes the FUSE view answers are set on the view's folders
(revision, status, model, size: one view is one commit) and on the blobs (status, etag, model;
no revision: a blob belongs to every commit that has the same file), where the cache's
filesystem keeps user xattrs.  Best effort: without them the view is served all the same.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import uuid
from pathlib import Path

from mxfs.cache import HubCache, make_dirs
from mxfs.names import XATTR_ETAG, XATTR_MODEL, XATTR_REVISION, XATTR_SIZE, XATTR_STATUS
from mxfs.tree import RepoTree

log = logging.getLogger(__name__)

FILE_MODE = 0o444
DIR_MODE = 0o555
# What the FUSE view answers for a complete entry: the registry's status of its folders, and
# each file's own (mxfs.fs getxattr).  A view is made only of a complete, verified revision.
DIR_STATUS = b"downloaded"
FILE_STATUS = b"cached"
_said_no_xattrs = False


class NotComplete(Exception):
    """A blob of the revision is missing or has the wrong size: nothing to hand off."""


def _mtime_ns(tree: RepoTree) -> int:
    return int(tree.commit_date.timestamp() * 1e9)


def _dirs_of(tree: RepoTree) -> set[str]:
    dirs = {""}
    for f in tree.files:
        parts = f.path.split("/")[:-1]
        dirs.update("/".join(parts[: i + 1]) for i in range(len(parts)))
    return dirs


def _owner(path: Path, uid: int, gid: int) -> None:
    st = os.lstat(path)
    if (st.st_uid, st.st_gid) != (uid, gid):
        os.chown(path, uid, gid, follow_symlinks=False)


def dir_xattrs(tree: RepoTree) -> dict[bytes, bytes]:
    """The ``user.mxfs.*`` of every folder of ``tree``'s view, as the FUSE model directory shows them."""
    return {
        XATTR_REVISION: tree.commit.encode(),
        XATTR_STATUS: DIR_STATUS,
        XATTR_MODEL: tree.repo_id.encode(),
        XATTR_SIZE: str(tree.size).encode(),
    }


def file_xattrs(tree: RepoTree, etag: str) -> dict[bytes, bytes]:
    """The ``user.mxfs.*`` of one blob: no revision, since a blob is shared by every commit that has it."""
    return {XATTR_STATUS: FILE_STATUS, XATTR_ETAG: etag.encode(), XATTR_MODEL: tree.repo_id.encode()}


def _set_xattrs(path: Path, values: dict[bytes, bytes]) -> bool:
    """Set ``values`` on ``path``; False (said once, at DEBUG) where the filesystem keeps none
    (ENOTSUP, a ``nouser_xattr`` mount) or will not take them: labels never stop a hand-off."""
    global _said_no_xattrs
    try:
        for name, value in values.items():
            os.setxattr(path, name, value, follow_symlinks=False)
    except OSError as exc:
        if not _said_no_xattrs:
            _said_no_xattrs = True
            log.debug("hand-off: no user.mxfs.* xattrs on the views (%s: %s)", path, exc.strerror)
        return False
    return True


def label_view(cache: HubCache, tree: RepoTree, view: Path) -> bool:
    """Set the ``user.mxfs.*`` xattrs on ``view``'s folders and its blobs (best effort)."""
    if not all(_set_xattrs(view / d, dir_xattrs(tree)) for d in _dirs_of(tree)):
        return False
    return all(_set_xattrs(cache.blob_path(tree.repo_id, f.etag), file_xattrs(tree, f.etag)) for f in tree.files)


def _is_labelled(view: Path, tree: RepoTree) -> bool:
    try:
        return os.getxattr(view, XATTR_REVISION) == tree.commit.encode()
    except OSError:
        return False


def view_is_current(cache: HubCache, tree: RepoTree, view: Path) -> bool:
    """Every file of the view is a link to its blob now (not to a copy evicted and fetched again)."""
    for f in tree.files:
        try:
            a, b = os.stat(view / f.path), os.stat(cache.blob_path(tree.repo_id, f.etag))
        except OSError:
            return False
        if (a.st_dev, a.st_ino) != (b.st_dev, b.st_ino) or a.st_size != f.size:
            return False
    return True


def build_view(cache: HubCache, tree: RepoTree, *, uid: int, gid: int) -> Path:
    """The view of ``tree`` (built, or rebuilt if stale); raises :class:`NotComplete`.

    Built under a temporary name and renamed into place, so a view is whole or absent.
    """
    final = cache.view_dir(tree.repo_id, tree.commit)
    if final.is_dir() and view_is_current(cache, tree, final):
        if not _is_labelled(final, tree):
            label_view(cache, tree, final)  # a view made before the labels were
        # A view made by a daemon that showed files as another owner (``uid``/``gid``): the
        # mount's owner is this daemon's, whoever made the links.
        for f in tree.files:
            _owner(cache.blob_path(tree.repo_id, f.etag), uid, gid)
        for d in _dirs_of(tree):
            _owner(final / d, uid, gid)
        return final
    mtime = _mtime_ns(tree)
    for f in tree.files:
        blob = cache.blob_path(tree.repo_id, f.etag)
        try:
            st = os.stat(blob)
        except FileNotFoundError:
            raise NotComplete(f"{tree.repo_id}@{tree.commit}: {f.path} is not in the cache") from None
        if st.st_size != f.size:
            raise NotComplete(f"{tree.repo_id}@{tree.commit}: {f.path} has {st.st_size} of {f.size} bytes")
    make_dirs(final.parent)
    tmp = final.parent / f".{tree.commit}.{uuid.uuid4().hex}.tmp"
    try:
        for d in sorted(_dirs_of(tree)):
            (tmp / d).mkdir(mode=0o700)
        for f in tree.files:
            blob = cache.blob_path(tree.repo_id, f.etag)
            os.chmod(blob, FILE_MODE)
            _owner(blob, uid, gid)
            os.utime(blob, ns=(mtime, mtime))
            os.link(blob, tmp / f.path)
        label_view(cache, tree, tmp)  # before the folders are made read-only
        for d in sorted(_dirs_of(tree), key=lambda p: -p.count("/") if p else 1):
            path = tmp / d
            os.chmod(path, DIR_MODE)
            _owner(path, uid, gid)
            os.utime(path, ns=(mtime, mtime))
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
    except FileNotFoundError as exc:
        raise NotComplete(f"{tree.repo_id}@{tree.commit}: {exc}") from None
    finally:
        if tmp.exists():
            with contextlib.suppress(OSError):
                shutil.rmtree(tmp)
    return final
