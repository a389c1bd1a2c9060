"""The on-disk cache, in the Hugging Face hub-cache layout (DESIGN section 4).

```
<root>/models--<org>--<name>/
    blobs/<etag>                    complete, verified file
    blobs/<etag>.<id>.incomplete    partial download, private to one writer
    snapshots/<commit>/<path>       relative symlink to ../../blobs/<etag>, made only when complete
    refs/<revision>                 the commit hash, written atomically
    trees/<commit>.json             huggingface_hub's tree listing, written when the entry is complete
```

Because the layout is huggingface_hub's own, ``HF_HUB_CACHE=<root>`` lets transformers use the same
files offline and an existing HF cache can be mounted as it is.  Everything here is synchronous
file-system work: callers run it in a worker thread.  Nothing here knows about FUSE, the Hub or
the registry.

Crash safety: a blob only appears at its final name after its bytes were verified and fsynced
(``publish_blob``), a snapshot symlink only after its blob exists, and refs and tree listings are
written to a temporary name and renamed, so a crash at any point leaves either the old state or
the new one, plus at worst an orphaned ``*.incomplete`` file that ``remove_stale_incomplete``
collects.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path

from mxfs.names import COMMIT_RE, repo_folder, repo_id_of_folder
from mxfs.tree import HubFile, RepoTree

INCOMPLETE_SUFFIX = ".incomplete"
# The published range maps of partial files, for the other nodes sharing the cache (mxfs.fetch.shared).
SHARED_PARTIALS = ".mxfs-partials"
# Inside a repo folder, beside blobs/ and snapshots/: the hand-off views (mxfs.handoff.view), hard
# links to the blobs, one folder per commit.  huggingface_hub's scan looks only at snapshots/,
# refs/ and blobs/ of a repo folder, so it stays clean; a new top-level folder would not.
VIEWS_DIR = ".mxfs-views"
# The most any folder or file of the cache (and of the state beside it) is ever created with:
# readable by the users of the mount and by programs that use the HF cache directly, writable by
# the daemon alone, whatever the umask it was started with (systemd's default is 0022, but a
# container or a shell may run it with 0000, and a blob anyone can write is served to everyone).
# A stricter umask still applies.
DIR_MODE = 0o755
FILE_MODE = 0o644


def repo_folder_name(repo_id: str) -> str:
    """The repo's folder in the cache root: ``models--org--name``."""
    return "models--" + repo_folder(repo_id)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def open_for_reading(path: Path | str) -> int:
    """A read-only descriptor that never moves the file's atime (``O_NOATIME``, where allowed).

    A blob handed to the kernel shares its inode with the hand-off's view (mxfs.handoff.view),
    which shows the commit date as its atime, as the FUSE view does; the daemon's own reads of
    the blob (FUSE handles opened before the hand-off) must not change it.  O_NOATIME needs the
    file's owner or CAP_FOWNER: without them (EPERM), a plain descriptor.
    """
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOATIME)
    except PermissionError:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)


def _remove_contents(folder: Path) -> None:
    """Unlink every file under ``folder`` and remove its emptied subfolders (not ``folder``)."""
    for dirpath, dirnames, filenames in os.walk(folder, topdown=False):
        for filename in filenames:
            (Path(dirpath) / filename).unlink(missing_ok=True)
        for dirname in dirnames:
            with contextlib.suppress(OSError):
                (Path(dirpath) / dirname).rmdir()


def make_dirs(path: Path) -> None:
    """``mkdir -p`` that creates every missing level with :data:`DIR_MODE`.

    ``Path.mkdir(parents=True, mode=...)`` applies ``mode`` to the last level only and gives the
    parents it creates ``0777`` less the umask.
    """
    try:
        path.mkdir(mode=DIR_MODE, exist_ok=True)
    except FileNotFoundError:
        if path.parent == path:
            raise
        make_dirs(path.parent)
        path.mkdir(mode=DIR_MODE, exist_ok=True)


def atomic_write_text(path: Path, text: str, *, tmp_dir: Path | None = None) -> None:
    """Write ``text`` to ``path`` so that readers see the old content or the new, never a mix.

    ``tmp_dir`` (same filesystem) holds the temporary file when ``path``'s own folder must never
    show a stray file: ``scan_cache_dir`` takes every file under ``refs/`` for a ref.
    """
    make_dirs(path.parent)
    tmp = (tmp_dir or path.parent) / f".{path.name}.{uuid.uuid4().hex}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)
        with open(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def read_commit(path: Path) -> str | None:
    """The commit hash a ref file holds; None if there is no such file or it holds anything else."""
    try:
        commit = path.read_text().strip()
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return None
    return commit if COMMIT_RE.fullmatch(commit) else None


class HubCache:
    """One HF hub-cache root directory."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def ensure_root(self) -> None:
        """Create the root (0755: readable by the users of the mount, writable only by the daemon)."""
        make_dirs(self.root)
        tag = self.root / "CACHEDIR.TAG"
        if not tag.exists():
            # Tells backup tools not to archive a cache; huggingface_hub's scan skips this name.
            atomic_write_text(tag, "Signature: 8a477f597d28d172789f06886806bc55\n# mxfs model cache\n")

    # -- paths -------------------------------------------------------------------------------

    def repo_dir(self, repo_id: str) -> Path:
        return self.root / repo_folder_name(repo_id)

    def blob_path(self, repo_id: str, etag: str) -> Path:
        return self.repo_dir(repo_id) / "blobs" / etag

    def snapshot_dir(self, repo_id: str, commit: str) -> Path:
        return self.repo_dir(repo_id) / "snapshots" / commit

    def snapshot_file(self, repo_id: str, commit: str, path: str) -> Path:
        return self.snapshot_dir(repo_id, commit) / path

    def ref_path(self, repo_id: str, revision: str) -> Path:
        return self.repo_dir(repo_id) / "refs" / revision

    def view_dir(self, repo_id: str, commit: str) -> Path:
        """The hand-off view of one revision: its files as hard links to the blobs."""
        return self.repo_dir(repo_id) / VIEWS_DIR / commit

    def remove_view(self, repo_id: str, commit: str) -> None:
        """Delete a revision's view (unmounted first: see mxfs.handoff); readers keep the inodes."""
        view = self.view_dir(repo_id, commit)
        _remove_contents(view)
        for folder in (view, view.parent):
            with contextlib.suppress(OSError):
                folder.rmdir()

    def tree_path(self, repo_id: str, commit: str) -> Path:
        return self.repo_dir(repo_id) / "trees" / f"{commit}.json"

    # -- reading -----------------------------------------------------------------------------

    def has_blob(self, repo_id: str, file: HubFile) -> bool:
        """The file's verified blob is in the cache (its snapshot link may still be missing).

        Only a verified blob ever gets its final name (``publish_blob``), so its presence at the
        file's size is the whole check: no byte of it needs reading.
        """
        try:
            return self.blob_path(repo_id, file.etag).stat().st_size == file.size
        except FileNotFoundError:
            return False

    def read_ref(self, repo_id: str, revision: str) -> str | None:
        return read_commit(self.ref_path(repo_id, revision))

    def cached_repos(self) -> list[str]:
        """Repo ids that have a folder in the cache (models only)."""
        try:
            names = os.listdir(self.root)
        except FileNotFoundError:
            return []
        repos = (repo_id_of_folder(name.removeprefix("models--")) for name in names if name.startswith("models--"))
        return sorted(repo for repo in repos if repo is not None)

    def cached_commits(self, repo_id: str) -> list[str]:
        try:
            names = os.listdir(self.repo_dir(repo_id) / "snapshots")
        except FileNotFoundError:
            return []
        return sorted(n for n in names if COMMIT_RE.fullmatch(n))

    def snapshot_size(self, repo_id: str, commit: str) -> int:
        """Bytes of the distinct blobs a snapshot links to (what deleting it could free at most)."""
        blobs = {p.resolve() for p in self.snapshot_links(repo_id, commit)}
        return sum(b.stat().st_size for b in blobs if b.exists())

    def snapshot_links(self, repo_id: str, commit: str) -> Iterator[Path]:
        base = self.snapshot_dir(repo_id, commit)
        for dirpath, _dirnames, filenames in os.walk(base):
            for filename in filenames:
                yield Path(dirpath) / filename

    def read_tree(self, repo_id: str, commit: str) -> RepoTree | None:
        """The listing of a revision the cache holds, from ``trees/<commit>.json`` or, where
        huggingface_hub wrote none, its snapshot links; None if the revision is not here."""
        snapshot = self.snapshot_dir(repo_id, commit)
        if not snapshot.is_dir():
            return None
        mtime = datetime.fromtimestamp(snapshot.stat().st_mtime, UTC)
        with contextlib.suppress(FileNotFoundError, ValueError, KeyError, TypeError):
            tree = RepoTree.from_json(self.tree_path(repo_id, commit).read_text(), repo_id, commit, mtime)
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

    # -- writing -----------------------------------------------------------------------------

    def create_incomplete(self, repo_id: str, etag: str, writer_id: str) -> tuple[Path, int]:
        """Create a fresh partial file private to ``writer_id``; returns its path and a read-write fd.

        The name carries the writer's id so that two writers (two nodes, or a writer that took
        over from a dead one) never share a temporary file.
        """
        blobs = self.repo_dir(repo_id) / "blobs"
        make_dirs(blobs)
        path = blobs / f"{etag}.{writer_id}{INCOMPLETE_SUFFIX}"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, FILE_MODE)
        return path, fd

    def adopt_incomplete(self, repo_id: str, filename: str, etag: str, writer_id: str) -> Path | None:
        """Rename an earlier partial file of this node to ``writer_id``'s name, to resume it.

        Returns the new path, or None if the file is gone.  The modification time is refreshed so
        that no sweep for dead writers' files mistakes the resumed file for abandoned.
        """
        blobs = self.repo_dir(repo_id) / "blobs"
        old, new = blobs / filename, blobs / f"{etag}.{writer_id}{INCOMPLETE_SUFFIX}"
        if not filename.startswith(f"{etag}.") or not filename.endswith(INCOMPLETE_SUFFIX) or "/" in filename:
            return None
        try:
            os.rename(old, new)
            os.utime(new)
        except FileNotFoundError:
            return None
        return new

    def publish_blob(self, repo_id: str, etag: str, incomplete: Path, fd: int) -> Path:
        """Make a verified partial file the blob: fsync, rename, fsync the directory.

        fsync before rename, or a crash could leave a blob with the right name and wrong bytes.
        If another writer published the same blob meanwhile (the same file in two commits), its
        copy wins and ours is dropped: both were verified against the same hash.
        """
        os.fsync(fd)
        blob = self.blob_path(repo_id, etag)
        if blob.exists():
            incomplete.unlink(missing_ok=True)
        else:
            os.rename(incomplete, blob)
            _fsync_dir(blob.parent)
        return blob

    def link_snapshot(self, repo_id: str, commit: str, path: str, etag: str) -> None:
        """Point ``snapshots/<commit>/<path>`` at its blob with a relative symlink, atomically."""
        link = self.snapshot_file(repo_id, commit, path)
        make_dirs(link.parent)
        target = os.path.relpath(self.blob_path(repo_id, etag), link.parent)
        with contextlib.suppress(FileNotFoundError):
            if os.readlink(link) == target:
                return
        tmp = link.with_name(f".{link.name}.{uuid.uuid4().hex}.tmp")
        os.symlink(target, tmp)
        os.replace(tmp, link)

    def write_ref(self, repo_id: str, revision: str, commit: str) -> None:
        """Record that ``revision`` is ``commit``. Only for a snapshot that exists (scan rule)."""
        atomic_write_text(self.ref_path(repo_id, revision), commit, tmp_dir=self.repo_dir(repo_id))

    def write_tree(self, tree: RepoTree) -> None:
        """Write huggingface_hub's ``trees/<commit>.json`` so its offline mode knows the file list."""
        atomic_write_text(self.tree_path(tree.repo_id, tree.commit), tree.to_json())

    def remove_stale_incomplete(
        self,
        repo_id: str,
        older_than: float,
        *,
        etags: Iterable[str] | None = None,
        keep: str = "",
        writer_is_dead: Callable[[str], bool] | None = None,
    ) -> list[Path]:
        """Delete partial files nobody has written to for ``older_than`` seconds.

        A live owner writes continuously and stops at once when its lease lapses, so a partial
        file untouched for longer than a lease belongs to a dead writer.  ``etags`` limits the
        sweep to those blobs; a name containing ``keep`` (the caller's own claim) is never removed.
        A file whose writer id (``<etag>.<writer id>.incomplete``) ``writer_is_dead`` says is gone
        goes at once, however recently it was written.
        """
        wanted = set(etags) if etags is not None else None
        removed = []
        blobs = self.repo_dir(repo_id) / "blobs"
        cutoff = time.time() - older_than
        try:
            names = os.listdir(blobs)
        except FileNotFoundError:
            return removed
        for name in names:
            if not name.endswith(INCOMPLETE_SUFFIX) or (keep and keep in name):
                continue
            if wanted is not None and name.split(".", 1)[0] not in wanted:
                continue
            path = blobs / name
            writer = name.partition(".")[2].removesuffix(INCOMPLETE_SUFFIX)
            with contextlib.suppress(FileNotFoundError):
                if (writer_is_dead is not None and writer_is_dead(writer)) or path.stat().st_mtime < cutoff:
                    path.unlink()
                    removed.append(path)
        return removed

    def delete_revision(self, repo_id: str, commit: str) -> int:
        """Remove one revision the HF way; returns the bytes of blobs actually freed.

        Order matters for concurrent readers of the cache: refs first (nobody resolves to the
        commit any more), then the snapshot links, then only the blobs no other snapshot uses.
        The hand-off view's links go too (its mounts are detached before: mxfs.handoff), or the
        blobs' inodes would outlive the eviction meant to free them.
        """
        repo = self.repo_dir(repo_id)
        self.remove_view(repo_id, commit)
        refs = repo / "refs"
        for dirpath, _dirs, filenames in os.walk(refs):
            for filename in filenames:
                ref = Path(dirpath) / filename
                with contextlib.suppress(OSError):
                    if ref.read_text().strip() == commit:
                        ref.unlink()
        ours = {os.path.basename(os.readlink(p)) for p in self.snapshot_links(repo_id, commit) if p.is_symlink()}
        snapshot = self.snapshot_dir(repo_id, commit)
        _remove_contents(snapshot)
        with contextlib.suppress(FileNotFoundError):
            snapshot.rmdir()
        self.tree_path(repo_id, commit).unlink(missing_ok=True)
        still_used = set()
        for other in self.cached_commits(repo_id):
            for link in self.snapshot_links(repo_id, other):
                with contextlib.suppress(OSError):
                    still_used.add(os.path.basename(os.readlink(link)))
        freed = 0
        for etag in ours - still_used:
            blob = self.blob_path(repo_id, etag)
            with contextlib.suppress(FileNotFoundError):
                size = blob.stat().st_size
                blob.unlink()
                freed += size
        if not self.cached_commits(repo_id):
            self._remove_empty_repo(repo)
        return freed

    def _remove_empty_repo(self, repo: Path) -> None:
        """Remove a repo folder left with no snapshot, unless partial downloads live in it."""
        blobs = repo / "blobs"
        if blobs.exists() and any(blobs.iterdir()):
            return
        # Published maps and readers' wants describe partial files, and there are none left.
        shutil.rmtree(repo / SHARED_PARTIALS, ignore_errors=True)
        for sub in ("snapshots", "trees", "blobs"):
            with contextlib.suppress(OSError):
                (repo / sub).rmdir()
        for dirpath, dirs, _files in os.walk(repo / "refs", topdown=False):
            for d in dirs:
                with contextlib.suppress(OSError):
                    (Path(dirpath) / d).rmdir()
        with contextlib.suppress(OSError):
            (repo / "refs").rmdir()
        with contextlib.suppress(OSError):
            repo.rmdir()
