"""Bad input through a real mount: arbitrary names, paths, revisions and xattr names, and every
kind of write.

The property test throws names at the mount the way tools, scripts and attackers do (``..``,
``@`` forms, URL escapes, unicode, names longer than Linux allows) through ``stat``, ``exists``,
``listdir``, ``open`` and ``getxattr``.  Whatever comes in: only valid repo ids and revisions
reach the Hub, nothing is created outside the cache and state dirs, errors are the expected
errno values (never EIO, never a crash), and the daemon keeps answering.

``test_mount.py`` already checks a fixed list of invalid names and the basic writes on a file;
this file generalizes both.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import stat
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import unquote

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.hubserver import FakeHub
from tests.mounting import MountedFs, requires_fuse

pytestmark = requires_fuse

NAME_MAX = 255
# What a lookup of a bad name may answer; EIO would mean a failure inside mxfs.
LOOKUP_ERRNOS = {errno.ENOENT, errno.ENOTDIR, errno.ENAMETOOLONG, errno.EISDIR}
# getxattr adds: no such attribute, a namespace FUSE does not pass on, a name the kernel refuses.
XATTR_ERRNOS = LOOKUP_ERRNOS | {errno.ENODATA, errno.EOPNOTSUPP, errno.ERANGE, errno.EINVAL, errno.EPERM}

# Independent of mxfs.names: what the Hub itself accepts (huggingface_hub's validate_repo_id) and
# a conservative reading of git's ref-name rules.
_HUB_REPO_PART = re.compile(r"^[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?$")
_REVISION = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+/-]*$")


def valid_repo_id(repo_id: str | None) -> bool:
    if repo_id is None:
        return False
    parts = repo_id.split("/")
    return (
        len(parts) == 2
        and all(_HUB_REPO_PART.match(p) and len(p) <= 96 and ".." not in p and "--" not in p for p in parts)
        and not parts[1].endswith(".git")
    )


def valid_revision(revision: str | None) -> bool:
    return revision is None or (
        bool(_REVISION.match(revision)) and ".." not in revision and "//" not in revision and len(revision) <= 255
    )


def errno_of(fn: Callable[[], object]) -> int | None:
    try:
        fn()
    except OSError as exc:
        return exc.errno
    return None


def tree_snapshot(root: Path) -> dict[str, str]:
    """Every path under ``root`` with what it is (and a file's hash), for before/after checks."""
    found: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = path.relative_to(root).as_posix()
            if path.is_symlink():
                found[rel] = "link:" + os.readlink(path)
            elif path.is_file():
                found[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
            else:
                found[rel] = "dir"
    return found


# -- names, paths, revisions, xattr names -----------------------------------------------------------

_any_char = st.characters(blacklist_characters="/\x00", blacklist_categories=("Cs",))
_near_valid = st.text(alphabet="abcXYZ019-_.@%2Ff ", min_size=1, max_size=30)
# Names the Hub could have: they cost a lookup (a 404 here), and test what reaches the Hub.
_hub_like = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,20}[A-Za-z0-9]", fullmatch=True)
_SPECIAL = [
    ".", "..", "...", "@", "@@", "@main", "a@", "a@@b", "a@..", "a@.", "a@/", "a@%2F..%2F..%2Fetc",
    "a@..%2F..", "a@refs%2Fpr%2F1", "a@refs%2F..%2F..", "a@-rf", "a@HEAD~1", "a@v1.0.lock", "a@x//y",
    ".git", ".DS_Store", "a--b", "-a", "a-", "a.", ".a", "a.git", "*", "?", "%2F", "%2e%2e", "..%2F..",
    " ", "\t", "\n", "a\nb", "CON", "x" * 96, "x" * 97, "x" * NAME_MAX, "é" * 127, "日本語", "🙂",
    "\u202e", "a\u0301", "\ufb01le", "\uff21",
]  # fmt: skip
_component = st.one_of(
    st.text(alphabet=_any_char, min_size=1, max_size=40),
    _hub_like,
    _near_valid,
    st.sampled_from(_SPECIAL),
    st.integers(NAME_MAX - 3, NAME_MAX + 60).map(lambda n: "x" * n),
    st.integers(120, 140).map(lambda n: "é" * n),  # fewer characters than NAME_MAX, more bytes
)
_xattr_name = st.one_of(
    st.sampled_from(
        [
            "user.mxfs.revision",
            "user.mxfs.status",
            "user.mxfs.etag",
            "user.mxfs.model",
            "user.mxfs.size",
            "user.mxfs.",
            "user.",
            "user.mxfs.status\n",
            "trusted.mxfs",
            "security.selinux",
            "system.posix_acl_access",
            "mxfs.status",
            "user.mxfs.revision" + "x" * 300,
        ]
    ),
    st.text(alphabet=_any_char, min_size=1, max_size=60).map(lambda t: "user." + t),
    st.text(alphabet=_any_char, min_size=1, max_size=60),
)
_OPS = ("stat", "exists", "listdir", "open", "getxattr")


def _run(op: str, path: Path, xattr: str) -> int | None:
    if op == "stat":
        return errno_of(lambda: os.stat(path))
    if op == "exists":
        os.path.exists(path)  # never raises; the answer is checked through stat
        return None
    if op == "listdir":
        return errno_of(lambda: os.listdir(path))
    if op == "open":

        def read_some() -> None:
            with open(path, "rb") as f:
                f.read(64)

        return errno_of(read_some)
    return errno_of(lambda: os.getxattr(path, xattr))


def test_arbitrary_names_paths_and_xattrs_never_escape_or_crash(
    hub: FakeHub, new_repo_id, mxfs_mount, tmp_path: Path
) -> None:
    repo = new_repo_id()
    files = {"config.json": b'{"bad": "input"}', "sub/dir/vocab.txt": b"a\nb\n", "model.safetensors": b"m" * 4096}
    commit = hub.add_repo(repo, files, tags=["v1.0"])
    org, name = repo.split("/")
    # The daemon's answers to bad names, and that every answer comes from the mount: hand-off
    # off, since a model handed to the kernel is answered by the cache's filesystem (a bind of
    # its view), without asking the daemon (tests/test_handoff.py).
    mount = mxfs_mount("--no-handoff")
    mnt = mount.mountpoint
    mount_dev = os.stat(mnt).st_dev
    assert (mount / repo / "config.json").read_bytes() == files["config.json"]
    before = {p.name for p in tmp_path.iterdir()}

    prefixes = st.sampled_from(
        [
            [], [org], [org, name], [org, f"{name}@v1.0"], [org, f"{name}@{commit}"], [org, name, "sub"],
            [org, name, "config.json"],
        ]
    )  # fmt: skip
    revisions = st.one_of(
        st.sampled_from(_SPECIAL), _near_valid, _hub_like, st.text(alphabet=_any_char, min_size=1, max_size=30)
    )
    at_forms = revisions.map(lambda rev: [org, f"{name}@{rev}"])
    paths = st.one_of(
        st.tuples(prefixes, st.lists(_component, min_size=1, max_size=3)).map(lambda t: t[0] + t[1]),
        st.tuples(at_forms, st.lists(_component, max_size=2)).map(lambda t: t[0] + t[1]),
    )
    seen: list[tuple[str, list[str], int | None]] = []

    @settings(
        max_examples=1200,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(parts=paths, op=st.sampled_from(_OPS), xattr=_xattr_name)
    def probe(parts: list[str], op: str, xattr: str) -> None:
        path = mnt.joinpath(*parts)
        normalized = os.path.normpath(path)
        if normalized != str(mnt) and not normalized.startswith(f"{mnt}/"):
            return  # ".." above the mount point: the kernel's business, not the daemon's
        code = _run(op, path, xattr)
        seen.append((op, parts, code))
        # A walk stops at the first name that fails, so a name too long is reported only when
        # the walk gets to it.
        if len(parts[-1].encode("utf-8")) > NAME_MAX and op != "exists" and os.path.isdir(path.parent):
            assert code == errno.ENAMETOOLONG, (op, parts, code)
        allowed = XATTR_ERRNOS if op == "getxattr" else LOOKUP_ERRNOS
        assert code is None or code in allowed, (op, parts, errno.errorcode.get(code or 0, code))
        if code is None and op in ("stat", "listdir"):
            assert os.stat(path).st_dev == mount_dev, f"{parts} answered from outside the mount"
        assert mount.proc.poll() is None, f"mxfs died on {op} {parts!r}"

    probe()

    # The mount still answers, with the right bytes.
    assert mount.proc.poll() is None
    assert (mount / repo / "sub" / "dir" / "vocab.txt").read_bytes() == files["sub/dir/vocab.txt"]
    assert org in os.listdir(mnt)
    print(
        "SEEN",
        len(seen),
        len(hub.requests()),
        sum(1 for s in seen if s[2] is None),
        {errno.errorcode.get(c, c) for _, _, c in seen if c},
    )
    assert len(seen) > 200
    # Only valid repo ids and revisions reached the Hub, and no path that walks up.
    for record in hub.requests():
        assert valid_repo_id(record.repo_id), record
        assert valid_revision(record.revision), record
        assert ".." not in unquote(record.path.split("?")[0]).split("/"), record
    # Nothing was created beside the mount's own directories, nor links out of them.
    assert {p.name for p in tmp_path.iterdir()} == before
    for root in (mount.cache_dir, mount.state_dir):
        for dirpath, dirnames, filenames in os.walk(root):
            for entry in dirnames + filenames:
                path = Path(dirpath) / entry
                assert path.resolve().is_relative_to(root.resolve()), f"{path} points out of {root}"
    for folder in mount.cache_dir.glob("models--*"):
        assert valid_repo_id(folder.name.removeprefix("models--").replace("--", "/", 1)), folder
    for folder in (mount.state_dir / "repos").iterdir():
        assert valid_repo_id(folder.name.replace("--", "/", 1)), folder


# -- writes ----------------------------------------------------------------------------------------


def _write_ops(existing: Path, is_dir: bool, new: Path) -> dict[str, Callable[[], object]]:
    """Every write-type operation that applies to ``existing`` (a file or a directory), plus the
    ones that would create ``new`` (a name that does not exist)."""
    ops: dict[str, Callable[[], object]] = {
        "chmod": lambda: os.chmod(existing, 0o777),
        "chown": lambda: os.chown(existing, 1, 1),
        "utime": lambda: os.utime(existing, (0, 0)),
        "utime-now": lambda: os.utime(existing),
        "setxattr": lambda: os.setxattr(existing, "user.mxfs.status", b"cached"),
        "setxattr-new": lambda: os.setxattr(existing, "user.evil", b"1"),
        "removexattr": lambda: os.removexattr(existing, "user.mxfs.status"),
        "rename-away": lambda: os.rename(existing, new),
        "create": lambda: os.close(os.open(new, os.O_WRONLY | os.O_CREAT, 0o644)),
        "create-excl": lambda: os.close(os.open(new, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)),
        "mkdir": lambda: os.mkdir(new),
        "mkfifo": lambda: os.mkfifo(new),
        "mknod": lambda: os.mknod(new, 0o644 | stat.S_IFREG),
        "symlink": lambda: os.symlink("/etc/passwd", new),
    }
    if is_dir:
        ops["rmdir"] = lambda: os.rmdir(existing)
        ops["unlink-dir"] = lambda: os.unlink(existing)
    else:
        ops.update(
            {
                "open-wronly": lambda: os.close(os.open(existing, os.O_WRONLY)),
                "open-rdwr": lambda: os.close(os.open(existing, os.O_RDWR)),
                "open-append": lambda: os.close(os.open(existing, os.O_WRONLY | os.O_APPEND)),
                "open-trunc": lambda: os.close(os.open(existing, os.O_RDONLY | os.O_TRUNC)),
                "truncate": lambda: os.truncate(existing, 0),
                "unlink": lambda: os.unlink(existing),
                "link": lambda: os.link(existing, new),
                "rename-over": lambda: os.rename(existing, existing.with_name("config.json")),
            }
        )
    return ops


def test_every_write_is_erofs_at_every_level(hub: FakeHub, new_repo_id, mxfs_mount) -> None:
    repo = new_repo_id()
    files = {"config.json": b'{"ro": true}', "sub/weights.bin": b"w" * 10_000}
    hub.add_repo(repo, files)
    mount: MountedFs = mxfs_mount()
    org = repo.split("/")[0]
    for rel, data in files.items():
        assert (mount / repo / rel).read_bytes() == data
    # A reader can be done before the download is verified and published: let it settle.
    deadline = time.monotonic() + 30
    while os.getxattr(mount / repo, "user.mxfs.status") != b"downloaded":
        assert time.monotonic() < deadline, "the download did not settle"
        time.sleep(0.05)
    # Root hands the complete model to the kernel (docs/handoff.md): then the writes below meet
    # its read-only bind, and the model directory is a mount point.
    handed_off = os.geteuid() == 0
    while handed_off and os.stat(mount / repo).st_dev == os.stat(mount.mountpoint).st_dev:
        assert time.monotonic() < deadline, "the model was not handed off"
        time.sleep(0.05)
    cache_before = tree_snapshot(mount.cache_dir)
    requests_before = len(hub.requests())

    targets = {
        "root": (mount.mountpoint, True),
        "org": (mount / org, True),
        "model": (mount / repo, True),
        "folder": (mount / repo / "sub", True),
        "file": (mount / repo / "sub" / "weights.bin", False),
    }
    wrong: list[str] = []
    for level, (existing, is_dir) in targets.items():
        # Not a valid repo name: creating it must fail as a write, not turn into a Hub lookup.
        new = (existing if is_dir else existing.parent) / "new--name"
        for op, fn in _write_ops(existing, is_dir, new).items():
            if level == "root" and op in ("rename-away", "rmdir", "unlink-dir"):
                continue  # the mount point itself: the kernel answers EXDEV, EBUSY, EISDIR
            code = errno_of(fn)
            if level == "model" and handed_off and op in ("rename-away", "rmdir", "unlink-dir"):
                # A mount point too: the kernel refuses before any filesystem is asked.
                if code not in (errno.EROFS, errno.EXDEV, errno.EBUSY, errno.EISDIR):
                    wrong.append(f"{op} on {level}: {errno.errorcode.get(code or 0, code)}")
                continue
            if code != errno.EROFS:
                wrong.append(f"{op} on {level}: {errno.errorcode.get(code or 0, code)}")
    assert not wrong, wrong

    # Nothing changed: same bytes through the mount, same files in the cache, no Hub traffic.
    for rel, data in files.items():
        assert (mount / repo / rel).read_bytes() == data
        assert os.stat(mount / repo / rel).st_mode & 0o777 == 0o444
    assert tree_snapshot(mount.cache_dir) == cache_before
    assert len(hub.requests()) == requests_before
    assert not (mount / repo / "new--name").exists()
