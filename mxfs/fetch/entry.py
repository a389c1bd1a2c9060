"""An entry: one repo at one resolved commit, with its file tree indexed for the filesystem."""

from __future__ import annotations

from functools import cached_property

from mxfs.names import EntryName
from mxfs.tree import HubFile, RepoTree


class Entry:
    """A model at one commit. Immutable: a model directory never mixes files of two commits."""

    def __init__(self, tree: RepoTree) -> None:
        self.tree = tree
        self.files: dict[str, HubFile] = {f.path: f for f in tree.files}
        # Directory path ("" is the model root) -> child name -> file, or None for a subdirectory.
        self.children: dict[str, dict[str, HubFile | None]] = {"": {}}
        for f in tree.files:
            parts = f.path.split("/")
            for depth in range(len(parts) - 1):
                parent, sub = "/".join(parts[:depth]), "/".join(parts[: depth + 1])
                self.children.setdefault(parent, {})[parts[depth]] = None
                self.children.setdefault(sub, {})
            self.children["/".join(parts[:-1])][parts[-1]] = f

    @property
    def repo_id(self) -> str:
        return self.tree.repo_id

    @property
    def commit(self) -> str:
        return self.tree.commit

    @cached_property
    def registry_key(self) -> str:
        return EntryName(self.repo_id, self.commit).key

    @property
    def size(self) -> int:
        return self.tree.size

    def __repr__(self) -> str:
        return f"<Entry {self}>"

    def __str__(self) -> str:
        return EntryName(self.repo_id, self.commit).label
