"""Names: what a path component under the mount may name, and how an entry is named and shown.

An entry (a model at one commit) has one :class:`EntryName`: the registry keys it, logs and the
CLI show it, and parsing a key tells mxfs's records from the ModelExpress records that share a
Redis.  A repo id becomes one path component (``org--name``) the same way in the HF cache and
in the state dir.

The rest of this module checks path components before anything reaches the Hub.

``/<org>/<name>`` is repo ``org/name`` at the default revision and ``/<org>/<name>@<rev>`` pins a
branch, tag or commit.  The rules follow ``huggingface_hub``'s ``validate_repo_id`` (ASCII only) and
git's ref-name rules, so a name that could never exist on the Hub is rejected locally: tools that
probe for ``.git``, ``.DS_Store`` or ``Thumbs db`` never cause Hub traffic (a probe that is a valid
repo name, such as ``__pycache__``, costs one lookup whose miss is then cached).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from mxfs.errors import InvalidName, NameTooLong

# One path component, as Linux limits it.
NAME_MAX = 255
# huggingface_hub allows up to 96 characters for each half of a repo id.
REPO_PART_MAX = 96

_REPO_PART = re.compile(r"^[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?$")
_REVISION = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+/-]*$")
COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")
# An entry's registry key is ModelExpress's model_name for one commit of a repo with full weights:
# ``mx1:<commit>:-:<org>/<name>``.  The ``-`` means "all files", not a subset.
_ENTRY_KEY = re.compile(r"^mx1:(?P<commit>[0-9a-f]{40}):-:(?P<repo_id>[^/]+/[^/]+)$")
# How many hex digits of a commit people are shown, as git and the Hub abbreviate it.
SHORT_COMMIT = 12

# The extended attributes a model directory, its folders and its files show: through FUSE
# (mxfs.fs) and, on a model handed to the kernel, set on the view's folders and the blobs
# (mxfs.handoff.view).
XATTR_REVISION = b"user.mxfs.revision"
XATTR_STATUS = b"user.mxfs.status"
XATTR_ETAG = b"user.mxfs.etag"
XATTR_MODEL = b"user.mxfs.model"
XATTR_SIZE = b"user.mxfs.size"

# Revisions such as ``refs/pr/1`` contain ``/``, which a path component cannot: spell it ``%2F``.
_SLASH_ESCAPE = "%2F"


def short_commit(commit: str) -> str:
    """A commit as people are shown it: its first 12 hex digits."""
    return commit[:SHORT_COMMIT]


@dataclass(frozen=True)
class EntryName:
    """A model at one resolved commit: the registry's key for it, and how people see it."""

    repo_id: str
    commit: str

    @classmethod
    def parse(cls, key: str) -> EntryName | None:
        """The entry a registry key names; None for a key that is not mxfs's.

        A shared Redis also holds ModelExpress's own records (keyed ``org/name``): they describe
        another cache, so mxfs lists, evicts and pins none of them.
        """
        match = _ENTRY_KEY.fullmatch(key)
        return cls(match["repo_id"], match["commit"]) if match else None

    @property
    def key(self) -> str:
        """The registry key (ModelExpress's ``model_name``)."""
        return f"mx1:{self.commit}:-:{self.repo_id}"

    @property
    def label(self) -> str:
        """``org/name@<12 hex>``, for logs and the command line."""
        return f"{self.repo_id}@{short_commit(self.commit)}"

    def __str__(self) -> str:
        return self.label


def entry_label(key: str) -> str:
    """How logs and the command line show a registry key: its entry's label, or the key as it is."""
    name = EntryName.parse(key)
    return name.label if name is not None else key


def repo_folder(repo_id: str) -> str:
    """``org/name`` as one path component, ``org--name``, as huggingface_hub spells it.

    Unambiguous because an org or model name never contains ``--`` (:func:`validate_repo_part`).
    """
    return repo_id.replace("/", "--")


def repo_id_of_folder(folder: str) -> str | None:
    """The repo id a :func:`repo_folder` name stands for; None for a name that is not one."""
    org, sep, name = folder.partition("--")
    return f"{org}/{name}" if sep and "--" not in name else None


def check_component_length(name: str) -> None:
    if len(name.encode("utf-8", "surrogateescape")) > NAME_MAX:
        raise NameTooLong(f"name longer than {NAME_MAX} bytes")


def validate_repo_part(part: str) -> str:
    """Validate an org or model name; returns it unchanged."""
    check_component_length(part)
    if (
        len(part) > REPO_PART_MAX
        or not _REPO_PART.fullmatch(part)
        or "--" in part
        or ".." in part
        or part.endswith(".git")
    ):
        raise InvalidName(f"not a valid Hub repo name: {part!r}")
    return part


def validate_revision(revision: str) -> str:
    """Validate a branch, tag or commit name by git's ref rules (a subset, ASCII only)."""
    if (
        not revision
        or len(revision) > NAME_MAX
        or not _REVISION.fullmatch(revision)
        or ".." in revision
        or "//" in revision
        or revision.endswith(("/", ".", ".lock"))
        or "/." in revision
    ):
        raise InvalidName(f"not a valid revision: {revision!r}")
    return revision


@dataclass(frozen=True)
class ModelRef:
    """A model as a user named it: repo id and the revision asked for (a branch, tag or commit)."""

    repo_id: str
    revision: str

    @property
    def revision_is_commit(self) -> bool:
        return bool(COMMIT_RE.fullmatch(self.revision))

    def __str__(self) -> str:
        return f"{self.repo_id}@{self.revision}"


def parse_model_dir(org: str, component: str, default_revision: str) -> ModelRef:
    """Parse the second path level, ``name`` or ``name@revision``, into a :class:`ModelRef`."""
    check_component_length(component)
    validate_repo_part(org)
    name, sep, revision = component.partition("@")
    validate_repo_part(name)
    if sep:
        revision = validate_revision(revision.replace(_SLASH_ESCAPE, "/").replace("%2f", "/"))
    else:
        revision = default_revision
    return ModelRef(f"{org}/{name}", revision)


def parse_model_arg(text: str, default_revision: str) -> ModelRef:
    """Parse a CLI argument ``org/name[@revision]``."""
    repo, sep, revision = text.partition("@")
    org, slash, name = repo.partition("/")
    if not slash:
        raise InvalidName(f"expected org/name[@revision], got {text!r}")
    return parse_model_dir(org, f"{name}{sep}{revision.replace('/', _SLASH_ESCAPE)}", default_revision)


def model_dir_name(ref: ModelRef, default_revision: str) -> str:
    """The directory name under ``/<org>/`` that shows ``ref``."""
    name = ref.repo_id.split("/", 1)[1]
    if ref.revision == default_revision:
        return name
    return f"{name}@{ref.revision.replace('/', _SLASH_ESCAPE)}"
