"""The pure parts of the hand-off (issue 15), table driven: the view built from a RepoTree, the
mountinfo that names the binds of views, and the /proc fdinfo and maps texts that say which
files a process holds.  The mounts themselves are tested in tests/test_handoff.py.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import mmap
import os
import stat
import struct
from datetime import UTC, datetime
from pathlib import Path

import pytest
import trio

from mxfs.cache import HubCache
from mxfs.fetch.entry import Entry
from mxfs.handoff import usage
from mxfs.handoff import view as view_module
from mxfs.handoff.kernel import find_view_binds, submounts, view_of_root
from mxfs.handoff.service import HandOff
from mxfs.handoff.view import NotComplete, build_view, view_is_current
from mxfs.mounts import parse_mountinfo_roots
from mxfs.names import ModelRef
from mxfs.openfiles import file_key, in_use, parse_fdinfo_ino, parse_maps
from mxfs.tree import HubFile, RepoTree

COMMIT = "c" * 40
OTHER = "d" * 40
REPO = "org/name"
WHEN = datetime(2024, 5, 6, 7, 8, 9, tzinfo=UTC)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- the view -------------------------------------------------------------------------------------

# path -> contents; twin.txt and copy/twin.txt are one blob.
CONTENTS = {
    "config.json": b"{}",
    "model.safetensors": b"w" * 5000,
    "tokenizer/deep/merges.txt": b"m e r g e s",
    "twin.txt": b"same",
    "copy/twin.txt": b"same",
}


def tree_of(contents: dict[str, bytes], commit: str = COMMIT) -> RepoTree:
    files = tuple(HubFile(path, len(data), "b" * 40, sha(data)) for path, data in contents.items())
    return RepoTree(REPO, commit, WHEN, files)


def cached(tmp_path: Path, contents: dict[str, bytes], missing: tuple[str, ...] = ()) -> tuple[HubCache, RepoTree]:
    """A cache holding the blobs of ``contents`` (minus ``missing``), as a download leaves them."""
    cache = HubCache(tmp_path / "cache")
    tree = tree_of(contents)
    for f in tree.files:
        blob = cache.blob_path(REPO, f.etag)
        blob.parent.mkdir(parents=True, exist_ok=True)
        if f.path not in missing:
            blob.write_bytes(contents[f.path])
    return cache, tree


def test_view_shows_each_file_as_a_link_to_its_blob(tmp_path: Path) -> None:
    cache, tree = cached(tmp_path, CONTENTS)
    view = build_view(cache, tree, uid=os.getuid(), gid=os.getgid())
    assert view == cache.view_dir(REPO, COMMIT)
    assert view.is_relative_to(cache.repo_dir(REPO))  # the cache's filesystem: hard links work
    mtime = int(WHEN.timestamp() * 1e9)
    # Stat before any read: outside the noatime bind a read moves the atime.
    stats = {path: os.stat(view / path) for path in CONTENTS}
    for path, data in CONTENTS.items():
        st, blob = stats[path], os.stat(cache.blob_path(REPO, sha(data)))
        assert (st.st_dev, st.st_ino) == (blob.st_dev, blob.st_ino), path
        assert stat.S_IMODE(st.st_mode) == 0o444 and stat.S_ISREG(st.st_mode)
        assert st.st_mtime_ns == st.st_atime_ns == mtime
        assert (view / path).read_bytes() == data
    for folder in ("", "tokenizer", "tokenizer/deep", "copy"):
        st = os.stat(view / folder)
        assert stat.S_IMODE(st.st_mode) == 0o555 and st.st_mtime_ns == mtime, folder
    assert os.stat(view / "twin.txt").st_ino == os.stat(view / "copy" / "twin.txt").st_ino
    assert sorted(os.listdir(view)) == ["config.json", "copy", "model.safetensors", "tokenizer", "twin.txt"]
    assert [p.name for p in view.parent.iterdir()] == [COMMIT]  # no temporary folder left
    assert view_is_current(cache, tree, view)
    assert build_view(cache, tree, uid=os.getuid(), gid=os.getgid()) == view  # kept as it is


@pytest.mark.parametrize(
    ("case", "why"),
    [
        ("missing", "is not in the cache"),
        ("short", "has 3 of 5000 bytes"),
    ],
)
def test_an_incomplete_revision_has_no_view(tmp_path: Path, case: str, why: str) -> None:
    cache, tree = cached(tmp_path, CONTENTS, missing=("model.safetensors",) if case == "missing" else ())
    if case == "short":
        cache.blob_path(REPO, sha(CONTENTS["model.safetensors"])).write_bytes(b"abc")
    with pytest.raises(NotComplete, match=why):
        build_view(cache, tree, uid=os.getuid(), gid=os.getgid())
    assert not cache.view_dir(REPO, COMMIT).exists()
    assert not any(cache.view_dir(REPO, COMMIT).parent.glob("*"))


@pytest.mark.parametrize(
    "change",
    ["blob fetched again", "blob deleted", "view file deleted"],
)
def test_a_stale_view_is_seen_and_rebuilt(tmp_path: Path, change: str) -> None:
    cache, tree = cached(tmp_path, CONTENTS)
    view = build_view(cache, tree, uid=os.getuid(), gid=os.getgid())
    blob = cache.blob_path(REPO, sha(CONTENTS["config.json"]))
    if change == "blob fetched again":  # evicted, then downloaded again: a new inode
        blob.unlink()
        blob.write_bytes(CONTENTS["config.json"])
    elif change == "blob deleted":
        blob.unlink()
    else:
        os.chmod(view, 0o755)
        (view / "config.json").unlink()
    assert not view_is_current(cache, tree, view)
    if change == "blob deleted":
        with pytest.raises(NotComplete):
            build_view(cache, tree, uid=os.getuid(), gid=os.getgid())
        return
    again = build_view(cache, tree, uid=os.getuid(), gid=os.getgid())
    assert view_is_current(cache, tree, again)
    assert os.stat(again / "config.json").st_ino == os.stat(blob).st_ino


def xattrs(path: Path) -> dict[str, bytes]:
    return {name: os.getxattr(path, name) for name in os.listxattr(path) if name.startswith("user.mxfs.")}


def test_view_folders_and_blobs_carry_the_user_mxfs_xattrs(tmp_path: Path) -> None:
    cache, tree = cached(tmp_path, CONTENTS)
    probe = tmp_path / "probe"
    probe.touch()
    try:
        os.setxattr(probe, "user.probe", b"1")
    except OSError as exc:
        pytest.skip(f"no user xattrs on {tmp_path}: {exc}")
    view = build_view(cache, tree, uid=os.getuid(), gid=os.getgid())
    folder = {
        "user.mxfs.revision": COMMIT.encode(),
        "user.mxfs.status": b"downloaded",
        "user.mxfs.model": REPO.encode(),
        "user.mxfs.size": str(tree.size).encode(),
    }
    for d in ("", "tokenizer", "tokenizer/deep", "copy"):
        assert xattrs(view / d) == folder, d
    for path, data in CONTENTS.items():
        expected = {"user.mxfs.status": b"cached", "user.mxfs.etag": sha(data).encode(), "user.mxfs.model": b"org/name"}
        assert xattrs(view / path) == expected, path
        assert xattrs(cache.blob_path(REPO, sha(data))) == expected  # on the blob: one inode
    # A view made before the labels were (an older daemon) is labelled when used again.
    os.chmod(view, 0o755)
    os.removexattr(view, "user.mxfs.revision")
    build_view(cache, tree, uid=os.getuid(), gid=os.getgid())
    assert xattrs(view)["user.mxfs.revision"] == COMMIT.encode()


def test_a_filesystem_without_user_xattrs_gets_a_view_without_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    cache, tree = cached(tmp_path, CONTENTS)
    calls = []

    def no_xattrs(path: object, name: object, value: object, *args: object, **kwargs: object) -> None:
        calls.append(path)
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")

    monkeypatch.setattr(view_module, "_said_no_xattrs", False)
    monkeypatch.setattr(os, "setxattr", no_xattrs)
    with caplog.at_level(logging.DEBUG, logger="mxfs.handoff.view"):
        view = build_view(cache, tree, uid=os.getuid(), gid=os.getgid())
        other = cached(tmp_path / "again", {"a.txt": b"a"})
        build_view(*other, uid=os.getuid(), gid=os.getgid())
    assert calls, "the labels were tried"
    assert all((view / p).read_bytes() == d for p, d in CONTENTS.items())
    said = [r for r in caplog.records if "no user.mxfs.* xattrs" in r.getMessage()]
    assert len(said) == 1 and said[0].levelno == logging.DEBUG  # once, quietly


# -- mountinfo ------------------------------------------------------------------------------------

VIEW_ROOT = f"/srv/cache/models--org--name/.mxfs-views/{COMMIT}"


@pytest.mark.parametrize(
    ("root", "expected"),
    [
        (VIEW_ROOT, ("models--org--name", COMMIT)),
        (VIEW_ROOT + "/", ("models--org--name", COMMIT)),
        # The cache on a filesystem of its own: root is relative to that filesystem.
        (f"/models--org--name/.mxfs-views/{COMMIT}", ("models--org--name", COMMIT)),
        (f"/models--a.b--c-d_e/.mxfs-views/{OTHER}", ("models--a.b--c-d_e", OTHER)),
        ("/", None),
        ("/srv/cache/models--org--name", None),
        (f"/srv/cache/models--org--name/snapshots/{COMMIT}", None),
        (f"/srv/cache/models--org--name/.mxfs-views/{COMMIT}/tokenizer", None),  # a folder of a view
        ("/srv/cache/models--org--name/.mxfs-views/main", None),
        (f"/srv/cache/models--org--name/.mxfs-views/{COMMIT.upper()}", None),
        (f"/srv/cache/datasets--org--name/.mxfs-views/{COMMIT}", None),
        (f".mxfs-views/{COMMIT}", None),
    ],
)
def test_view_of_root(root: str, expected: tuple[str, str] | None) -> None:
    assert view_of_root(root) == expected


MOUNTINFO = f"""\
22 1 259:1 / / rw,relatime shared:1 - ext4 /dev/root rw
60 22 0:52 / /models rw,nosuid,nodev,relatime shared:30 - fuse.mxfs mxfs rw,user_id=0,group_id=0
61 60 259:1 {VIEW_ROOT} /models/org/name ro,nosuid,nodev,noexec,noatime shared:1 - ext4 /dev/root rw
62 60 259:1 {VIEW_ROOT} /models/org/name@main ro,nosuid,nodev,noexec,noatime shared:1 - ext4 /dev/root rw
63 22 259:1 {VIEW_ROOT} /models/org/name ro,nosuid,nodev shared:1 - ext4 /dev/root rw
70 60 0:60 /models--x--y/.mxfs-views/{OTHER} /with\\040space/x/y ro master:5 - xfs /dev/sdb rw
71 22 0:61 / /tmp rw shared:7 - tmpfs tmpfs rw
short line
"""


def test_mountinfo_roots_unescape_paths() -> None:
    roots = parse_mountinfo_roots(MOUNTINFO)
    assert roots[0] == ("/", "/")
    assert ("/models--x--y/.mxfs-views/" + OTHER, "/with space/x/y") in roots
    assert len(roots) == 7  # the short line is no mount


def test_find_view_binds_groups_mount_points_by_view() -> None:
    assert find_view_binds(parse_mountinfo_roots(MOUNTINFO)) == {
        # A duplicate line (a bind over a bind) is one mount point.
        ("models--org--name", COMMIT): ["/models/org/name", "/models/org/name@main"],
        ("models--x--y", OTHER): ["/with space/x/y"],
    }
    assert find_view_binds([]) == {}


# -- /proc fdinfo and maps ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("pos:\t0\nflags:\t0100000\nmnt_id:\t61\nino:\t1234567\n", 1234567),
        ("pos:\t0\nflags:\t02\nmnt_id:\t12\n", None),  # a kernel before 5.14 says no inode
        ("ino:\tnot-a-number\n", None),
        ("ino:\n", None),
        ("", None),
    ],
)
def test_parse_fdinfo_ino(text: str, expected: int | None) -> None:
    assert parse_fdinfo_ino(text) == expected


MAPS = """\
55d0c0a00000-55d0c0a21000 r--p 00000000 103:02 2883603                    /usr/bin/python3.12
7f1c2a000000-7f1c2b000000 r--s 00000000 00:2f 99                         /models/org/name/model.safetensors
7f1c2b000000-7f1c2c000000 r--s 00001000 00:2f 100                        /cache/with space/blob (deleted)
7f1c2c000000-7f1c2c021000 rw-p 00000000 00:00 0                          [heap]
7ffd7e5a0000-7ffd7e5c1000 rw-p 00000000 00:00 0                          [stack]
7f1c2d000000-7f1c2d001000 r--p 00000000 fe:01 42
garbage line
7f1c2e000000-7f1c2e001000 r--p 00000000 zz:01 43                         /bad/device
"""


def test_parse_maps_names_every_mapped_file_by_device_and_inode() -> None:
    assert parse_maps(MAPS) == {
        (os.makedev(0x103, 0x02), 2883603),
        (os.makedev(0, 0x2F), 99),
        (os.makedev(0, 0x2F), 100),  # the path does not matter: spaces, "(deleted)"
        (os.makedev(0xFE, 0x01), 42),
    }
    assert parse_maps("") == set()


def test_in_use_finds_this_process_open_and_mapped_files(tmp_path: Path) -> None:
    opened, mapped, idle = (tmp_path / n for n in ("opened", "mapped", "idle"))
    for path in (opened, mapped, idle):
        path.write_bytes(b"x" * 8192)
    keys = {file_key(os.stat(p)): p.name for p in (opened, mapped, idle)}
    fd = os.open(opened, os.O_RDONLY)
    with open(mapped, "rb") as f:
        m = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)  # the descriptor closes, the map stays
    try:
        assert {keys[k] for k in in_use(keys)} == {"opened", "mapped"}
    finally:
        os.close(fd)
        m.close()
    assert in_use(keys) == set()
    assert in_use([]) == set()


# -- inotify events ------------------------------------------------------------------------------


def inotify_event(wd: int, mask: int, name: bytes = b"") -> bytes:
    padded = name + b"\0" * (16 - len(name) % 16) if name else b""  # NUL-terminated, padded
    return struct.pack("iIII", wd, mask, 0, len(padded)) + padded


@pytest.mark.parametrize(
    ("events", "labels", "overflowed"),
    [
        ([inotify_event(1, usage.IN_OPEN, b"config.json")], {"a"}, False),
        ([inotify_event(2, usage.IN_OPEN, b"merges.txt")], {"b"}, False),
        # A folder opened (a listing, a walk of the cache): no use of the model.
        ([inotify_event(1, usage.IN_OPEN | usage.IN_ISDIR)], set(), False),
        ([inotify_event(1, usage.IN_OPEN | usage.IN_ISDIR, b"tokenizer")], set(), False),
        ([inotify_event(9, usage.IN_OPEN, b"x")], set(), False),  # a watch already removed
        ([inotify_event(-1, usage.IN_Q_OVERFLOW)], set(), True),
        (
            [inotify_event(1, usage.IN_OPEN | usage.IN_ISDIR), inotify_event(2, usage.IN_OPEN, b"v")],
            {"b"},
            False,
        ),
    ],
)
def test_open_events_name_the_models_whose_files_were_opened(
    events: list[bytes], labels: set[str], overflowed: bool
) -> None:
    watch = usage.OpenWatch()
    try:
        watch._labels.update({1: "a", 2: "b"})
        assert watch._parse(b"".join(events)) == labels
        assert watch.overflowed is overflowed
    finally:
        watch.close()


async def test_open_watch_reports_file_opens_not_folder_walks(tmp_path: Path) -> None:
    folder = tmp_path / "view"
    (folder / "sub").mkdir(parents=True)
    (folder / "config.json").write_bytes(b"{}")
    watch = usage.OpenWatch()
    try:
        watch.watch(folder, "model")
        list(os.walk(tmp_path))  # opens every folder: not a use
        try:  # the events of an open are queued before open() returns
            queued = os.read(watch.fd, 65536)
        except BlockingIOError:
            queued = b""
        assert queued, "the walk was seen"
        assert watch._parse(queued) == set(), "a folder walk was taken for a use"
        (folder / "config.json").read_bytes()
        with trio.fail_after(10):
            assert await watch.opened() == {"model"}
    finally:
        watch.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")
def test_a_view_made_for_another_owner_takes_this_daemons(tmp_path: Path) -> None:
    # A daemon run with --uid nobody after one that ran as root, on the same cache: the kept view
    # must show the files as this daemon's mount does (nobody), not as the first daemon's.
    cache, tree = cached(tmp_path, {"config.json": b"{}", "sub/model.bin": b"x" * 100})
    view = build_view(cache, tree, uid=0, gid=0)
    nobody = 65534
    assert build_view(cache, tree, uid=nobody, gid=nobody) == view
    for path in (view, view / "sub", view / "config.json", view / "sub" / "model.bin"):
        st = os.lstat(path)
        assert (st.st_uid, st.st_gid) == (nobody, nobody), path


# -- a stop in the middle of a hand-off -----------------------------------------------------------


@pytest.mark.skipif(os.geteuid() != 0, reason="binds need root")
async def test_a_stop_keeps_the_record_and_binds_nothing_after_it(tmp_path: Path) -> None:
    """The daemon stops (SIGTERM) while a hand-off is finishing: the record of what was handed off
    stays for the restart, and a hand-off queued behind the stop's detach binds nothing."""
    cache, tree = cached(tmp_path, CONTENTS)
    mountpoint, state = tmp_path / "mnt", tmp_path / "state"
    (mountpoint / "org" / "name").mkdir(parents=True)
    (mountpoint / "org" / "late").mkdir()
    state.mkdir()

    async def touch(key: str) -> None:
        return None

    handoff = HandOff(
        cache, mountpoint, state, uid=0, gid=0, touch=touch, completed=trio.open_memory_channel[Entry](0)[1]
    )
    entry = Entry(tree)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(handoff.run)
            handoff.model_dir_resolved("org/name", ModelRef(REPO, "main"), entry)
            with trio.fail_after(10):
                while handoff.attached != ["org/name"]:  # noqa: ASYNC110 (the bind is a child's)
                    await trio.sleep(0.01)
            assert submounts(mountpoint) == [str(mountpoint / "org" / "name")]
            record = state / "handoff-dirs"
            assert record.read_text() == "org/name\n"
            await handoff.detach_all()
            assert submounts(mountpoint) == []
            handoff._write_record()  # the tail of a hand-off that finished as the stop detached it
            assert record.read_text() == "org/name\n"
            handoff.model_dir_resolved("org/late", ModelRef(REPO, "late"), entry)
            await handoff._attach(handoff._dirs["org/late"])  # queued behind the stop
            assert submounts(mountpoint) == []
            nursery.cancel_scope.cancel()
    finally:
        for point in submounts(mountpoint):
            await trio.run_process(["umount", "-l", point], check=False)
