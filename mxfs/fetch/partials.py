"""Range maps of partial downloads, kept in the state dir so a restarted daemon resumes them.

A partial file (``blobs/<etag>.<claim>.incomplete``) says nothing about which of its bytes are
real: it was reserved to its full size up front.  Its map, ``<state_dir>/partials/<repo>/<etag>.json``,
does.  A map is written only after ``fdatasync`` of the partial file, so it never claims bytes
that a crash could lose; it may lag behind the file, which costs a re-download of those bytes and
nothing else.  Every blob is hashed before it is published anyway, so even a wrong map can cost
time but never a corrupt blob.

Maps live in the state dir, which is per node (DESIGN section 4): the node that wrote a partial
file is the one that resumes it, after a restart or a failed attempt.  Another node that takes
over the entry starts afresh and removes the dead partial file after a lease.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from mxfs.cache import atomic_write_text
from mxfs.names import repo_folder
from mxfs.ranges import RangeSet

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PartialMap:
    """The partial file's name (in the repo's ``blobs/``), its full size, and its present ranges."""

    filename: str
    size: int
    ranges: list[tuple[int, int]]

    def to_json(self) -> str:
        return json.dumps({"file": self.filename, "size": self.size, "ranges": self.ranges})

    @classmethod
    def from_json(cls, text: str) -> PartialMap:
        raw = json.loads(text)
        ranges = [(int(start), int(end)) for start, end in raw["ranges"]]
        return cls(str(raw["file"]), int(raw["size"]), ranges)

    def present(self) -> RangeSet:
        """The ranges, clipped to the file (a map never grants bytes past the end)."""
        return RangeSet([(max(0, s), min(e, self.size)) for s, e in self.ranges])


class PartialMaps:
    """Read and write range maps under ``<state_dir>/partials``."""

    def __init__(self, state_dir: Path) -> None:
        self.root = Path(state_dir) / "partials"

    def _path(self, repo_id: str, etag: str) -> Path:
        return self.root / repo_folder(repo_id) / f"{etag}.json"

    def load(self, repo_id: str, etag: str) -> PartialMap | None:
        path = self._path(repo_id, etag)
        try:
            return PartialMap.from_json(path.read_text())
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring unreadable partial-download map %s: %s", path, exc)
            return None

    def save(self, repo_id: str, etag: str, fd: int, partial_map: PartialMap) -> None:
        """Make the mapped bytes durable, then record them (in that order: see the module doc)."""
        os.fdatasync(fd)
        atomic_write_text(self._path(repo_id, etag), partial_map.to_json())

    def record_name(self, repo_id: str, etag: str, partial_map: PartialMap) -> None:
        """Record that the partial file was renamed (its bytes did not change: no sync needed)."""
        atomic_write_text(self._path(repo_id, etag), partial_map.to_json())

    def remove(self, repo_id: str, etag: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._path(repo_id, etag).unlink()


__all__ = ["PartialMap", "PartialMaps"]
