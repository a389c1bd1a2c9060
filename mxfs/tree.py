"""A repo at one commit, as the Hub's tree listing describes it: the value types every part shares.

The Hub client makes them, the cache lays them out on disk, the fetcher downloads them and the
filesystem shows them; keeping them here, in a module that imports nothing of mxfs, lets each of
those use a file's size and hashes without importing another part.

A listing is stored in one format wherever it is kept (the HF cache's ``trees/<commit>.json`` and
the state dir's copy): huggingface_hub's own, which its offline mode reads, plus the commit date
that huggingface_hub does not record.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

# huggingface_hub's `trees/<commit>.json` format; it ignores a listing of any other version.
TREE_FORMAT_VERSION = 1


@dataclass(frozen=True)
class HubFile:
    """One file of a repo at one commit, as the Hub's tree listing describes it."""

    path: str
    size: int
    blob_id: str
    lfs_sha256: str | None = None

    @property
    def etag(self) -> str:
        """The cache's blob name: LFS sha256 for LFS files, else the git blob sha1 (as huggingface_hub)."""
        return self.lfs_sha256 or self.blob_id


@dataclass(frozen=True)
class RepoTree:
    """A repo at one commit: every file with its exact size, known before any byte is downloaded."""

    repo_id: str
    commit: str
    commit_date: datetime
    files: tuple[HubFile, ...]

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)

    def progress(self, bytes_present: Callable[[HubFile], int]) -> tuple[int, int]:
        """How far a download of the tree is: (bytes present, bytes in all).

        ``bytes_present`` says how many bytes of a file are there: the downloading process counts
        the ranges of partial files it holds, any other process only the verified blobs it sees.
        """
        return sum(bytes_present(f) for f in self.files), self.size

    def to_json(self) -> str:
        """The listing in huggingface_hub's ``trees/<commit>.json`` format, with the commit date added."""
        files: dict[str, dict[str, object]] = {}
        for f in sorted(self.files, key=lambda f: f.path):
            info: dict[str, object] = {"size": f.size, "blob_id": f.blob_id}
            if f.lfs_sha256 is not None:
                info["lfs_sha256"] = f.lfs_sha256
                info["lfs_size"] = f.size
            files[f.path] = info
        data = {"format_version": TREE_FORMAT_VERSION, "commit_date": self.commit_date.isoformat(), "files": files}
        return json.dumps(data, indent=1)

    @classmethod
    def from_json(cls, text: str, repo_id: str, commit: str, commit_date: datetime | None = None) -> RepoTree:
        """Read a listing of ``repo_id`` at ``commit`` that :meth:`to_json` or huggingface_hub wrote.

        ``commit_date`` stands in when the listing records none (huggingface_hub's do not).  The
        state dir's older listings (a list of files beside the repo id, commit and date) are
        read too, so state dirs written before the format was shared keep working offline.  ValueError, KeyError or
        TypeError for a listing that is none of these.
        """
        data = json.loads(text)
        if isinstance(data.get("files"), list):
            files = [HubFile(**f) for f in data["files"]]
        elif data.get("format_version") == TREE_FORMAT_VERSION:
            files = [
                HubFile(path, int(info["size"]), info["blob_id"], info.get("lfs_sha256"))
                for path, info in data["files"].items()
            ]
        else:
            raise ValueError(f"unknown tree listing format {data.get('format_version')!r}")
        recorded = data.get("commit_date")
        date = datetime.fromisoformat(recorded) if recorded is not None else commit_date
        if date is None:
            raise KeyError("commit_date")
        return cls(repo_id, commit, date, tuple(sorted(files, key=lambda f: f.path)))
