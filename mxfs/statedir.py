"""mxfs's own files beside the HF cache (DESIGN section 4): resolved revisions and tree listings.

```
<state_dir>/repos/<org>--<name>/
    refs/<revision>        the commit the revision resolved to when this node last asked the Hub
    trees/<commit>.json    the repo's tree listing at that commit (the format of mxfs.tree)
```

They let a daemon started while the Hub is unreachable (or with ``HF_HUB_OFFLINE=1``) list and
serve what is cached, and they are how ``mxfs refresh`` tells running daemons that a revision
moved.  They live outside the HF cache root, whose ``scan_cache_dir`` would take them for
corruption.  Everything here is synchronous file-system work: callers run it in a worker thread.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

from mxfs.cache import HubCache, atomic_write_text, read_commit
from mxfs.names import repo_folder, repo_id_of_folder
from mxfs.tree import RepoTree

log = logging.getLogger(__name__)


class StateDir:
    """Resolved refs and tree listings, per repo, in ``<state_dir>/repos``."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def _repo(self, repo_id: str) -> Path:
        return self.root / "repos" / repo_folder(repo_id)

    def read_ref(self, repo_id: str, revision: str) -> str | None:
        return read_commit(self._repo(repo_id) / "refs" / revision)

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
            repos = (repo_id_of_folder(name) for name in os.listdir(self.root / "repos"))
            return sorted(repo for repo in repos if repo is not None)
        return []


def recorded_commit(state: StateDir, cache: HubCache, repo_id: str, revision: str) -> str | None:
    """The commit ``revision`` resolved to when last asked, without asking the Hub, or None.

    mxfs's own record first, then the HF cache's ``refs/``: a huggingface_hub cache mounted as it
    is (or whose state dir was lost) still knows which commit its branches and tags were.
    """
    return state.read_ref(repo_id, revision) or cache.read_ref(repo_id, revision)
