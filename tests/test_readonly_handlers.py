"""Every write-type handler of ``MxfsOperations`` answers ``EROFS`` by itself.

The mount is ``ro``, so through a real mount the kernel answers ``EROFS`` before any of these
handlers runs (``test_mount.py::test_writes_are_erofs``, ``test_bad_input.py``): those tests
would pass whatever the handlers did.  Here the handlers are called directly, at every level of
the tree (root, org, model, folder, file), with a fetcher stand-in that records what it is asked:
a write never reaches it, and never adds an inode.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

import pyfuse3
import pytest

from mxfs.fetch import Entry
from mxfs.fs import MxfsOperations
from mxfs.names import ModelRef
from mxfs.tree import HubFile, RepoTree

ROOT = pyfuse3.ROOT_INODE
COMMIT = "a" * 40
CTX: Any = None  # the handlers under test never look at the request context


def no(*_args: object, **_kwargs: object) -> bool:
    return False


class Handle:
    """What ``open`` keeps for a file opened for reading: complete, and "no" to any other question."""

    state = SimpleNamespace(complete=True)

    def close(self) -> None:
        pass

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return no


class Fetcher:
    """Answers lookups of model directories (one fixed tree per repo) and opens; records every call
    but lookups (any other synchronous question is answered 0)."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    async def lookup(self, ref: ModelRef) -> Entry:
        files = (HubFile("config.json", 2, "b" * 40), HubFile("sub/model.bin", 10, "c" * 40, "d" * 64))
        return Entry(RepoTree(ref.repo_id, COMMIT, datetime(2026, 1, 1, tzinfo=UTC), files))

    async def open(self, entry: Entry, path: str) -> Handle:
        self.calls.append(f"open {path}")
        return Handle()

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)

        def call(*_args: object, **_kwargs: object) -> int:
            self.calls.append(name)
            return 0

        return call


async def tree() -> tuple[MxfsOperations, Fetcher, dict[str, int]]:
    """The operations, the fetcher stand-in, and an inode at each level of the tree."""
    fetcher = Fetcher()
    ops = MxfsOperations(fetcher)  # type: ignore[arg-type]

    async def lookup(parent: int, name: str) -> int:
        return (await ops.lookup(parent, name.encode(), CTX)).st_ino

    org = await lookup(ROOT, "org")
    model = await lookup(org, "model")
    folder = await lookup(model, "sub")
    file = await lookup(model, "config.json")
    deep = await lookup(folder, "model.bin")
    fetcher.calls.clear()  # what the lookups asked is not under test
    return ops, fetcher, {"root": ROOT, "org": org, "model": model, "folder": folder, "file": file, "deep": deep}


def writes(ops: MxfsOperations, inode: int, parent: int, fh: int) -> dict[str, Callable[[], Awaitable[object]]]:
    """Each write-type request, on ``inode`` (or, for those that name a child, in ``parent``)."""
    attr, fields = pyfuse3.EntryAttributes(), pyfuse3.SetattrFields()
    return {
        "setattr": lambda: ops.setattr(inode, attr, fields, None, CTX),
        "setattr with fh": lambda: ops.setattr(inode, attr, fields, fh, CTX),
        "mknod": lambda: ops.mknod(parent, b"new", 0o100644, 0, CTX),
        "mkdir": lambda: ops.mkdir(parent, b"new", 0o755, CTX),
        "unlink": lambda: ops.unlink(parent, b"config.json", CTX),
        "rmdir": lambda: ops.rmdir(parent, b"sub", CTX),
        "symlink": lambda: ops.symlink(parent, b"new", b"config.json", CTX),
        "rename": lambda: ops.rename(parent, b"config.json", parent, b"new", 0, CTX),
        "link": lambda: ops.link(inode, parent, b"new", CTX),
        "create": lambda: ops.create(parent, b"new", 0o644, os.O_WRONLY | os.O_CREAT, CTX),
        "write": lambda: ops.write(fh, 0, b"x"),
        "setxattr": lambda: ops.setxattr(inode, b"user.mxfs.status", b"cached", CTX),
        "setxattr new": lambda: ops.setxattr(inode, b"user.other", b"x", CTX),
        "removexattr": lambda: ops.removexattr(inode, b"user.mxfs.revision", CTX),
    }


async def erofs(call: Callable[[], Awaitable[object]]) -> str:
    """ "EROFS", or what the handler did instead."""
    try:
        result = await call()
    except pyfuse3.FUSEError as exc:
        return errno.errorcode.get(exc.errno, str(exc.errno))
    return f"returned {result!r}"


async def test_every_write_type_handler_is_erofs_at_every_level() -> None:
    ops, fetcher, inodes = await tree()
    fh = (await ops.open(inodes["file"], os.O_RDONLY, CTX)).fh  # a real read handle, for write()
    fetcher.calls.clear()
    count = ops.inode_count
    parents = {"root": ROOT, "org": ROOT, "model": inodes["org"], "folder": inodes["model"]}
    parents |= {"file": inodes["model"], "deep": inodes["folder"]}
    answers = {}
    for level, inode in inodes.items():
        for as_parent in (False, True):
            parent = inode if as_parent and level not in ("file", "deep") else parents[level]
            for name, call in writes(ops, inode, parent, fh).items():
                answers[f"{name} on {level}{' (in it)' if as_parent else ''}"] = await erofs(call)
    assert {key: answer for key, answer in answers.items() if answer != "EROFS"} == {}
    assert len(answers) > 100
    # Neither the fetcher (so neither the cache nor the Hub) was asked anything, and no name the
    # writes used became an inode.
    assert fetcher.calls == []
    assert ops.inode_count == count
    # The handle opened for reading is still there, untouched by the write on it.
    await ops.release(fh)


@pytest.mark.parametrize(
    "flags",
    [
        os.O_WRONLY,
        os.O_RDWR,
        os.O_WRONLY | os.O_TRUNC,
        os.O_RDONLY | os.O_TRUNC,
        os.O_RDONLY | os.O_APPEND,
        os.O_WRONLY | os.O_APPEND,
        os.O_RDONLY | os.O_CREAT,
        os.O_RDWR | os.O_CREAT | os.O_EXCL,
    ],
    ids=lambda flags: f"0o{flags:o}",
)
async def test_open_for_writing_is_erofs_before_anything_is_fetched(flags: int) -> None:
    ops, fetcher, inodes = await tree()
    for level in ("file", "deep"):
        assert await erofs(lambda level=level: ops.open(inodes[level], flags, CTX)) == "EROFS", level
    assert fetcher.calls == []  # refused before the download would have started


async def test_open_for_reading_still_works() -> None:
    """The stand-in is not what makes the writes fail: a plain read-only open reaches it."""
    ops, fetcher, inodes = await tree()
    info = await ops.open(inodes["deep"], os.O_RDONLY, CTX)
    assert fetcher.calls == ["open sub/model.bin"]
    await ops.release(info.fh)
