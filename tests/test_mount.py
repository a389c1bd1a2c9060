"""The core path through a real mount: lazy listing, claimed downloads, HF-layout cache, errors.

Each test starts ``mxfs mount`` in a subprocess against the loopback Hub and uses the mount with
plain ``open()``, ``os.listdir()`` and ``os.stat()``.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from huggingface_hub import scan_cache_dir, snapshot_download

from tests.hubserver import FakeHub
from tests.mounting import MountedFs, requires_fuse, run_cli, wait_until

pytestmark = requires_fuse


def sample_files(seed: int = 0, big: int = 3_000_000) -> dict[str, bytes]:
    rnd = random.Random(seed)
    return {
        "config.json": json.dumps({"model_type": "test", "seed": seed}).encode(),
        "README.md": b"# a test model\n",
        "empty.txt": b"",
        "model.safetensors": rnd.randbytes(big),
        "tokenizer/vocab.txt": b"\n".join(b"tok%d" % i for i in range(2000)),
        "tokenizer/deep/nested/merges.txt": rnd.randbytes(50_000),
        "weights/pytorch_model.bin": rnd.randbytes(big // 2),
    }


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def expect_errno(code: int, fn: Callable[[], object]) -> None:
    with pytest.raises(OSError) as info:
        fn()
    assert info.value.errno == code, f"expected {errno.errorcode[code]}, got {info.value!r}"


def file_requests(hub: FakeHub, repo_id: str) -> int:
    """Requests that move file bytes (resolve and CDN GETs)."""
    return len([r for r in hub.requests(method="GET", repo_id=repo_id) if r.kind in ("resolve", "cdn")])


def test_listing_and_stat_before_any_download(hub: FakeHub, new_repo_id, mxfs_mount) -> None:
    repo = new_repo_id()
    files = sample_files()
    hub.add_repo(repo, files)
    mount: MountedFs = mxfs_mount()
    model = mount / repo

    assert sorted(os.listdir(model)) == [
        "README.md",
        "config.json",
        "empty.txt",
        "model.safetensors",
        "tokenizer",
        "weights",
    ]
    assert sorted(os.listdir(model / "tokenizer")) == ["deep", "vocab.txt"]
    for rel, data in files.items():
        st = os.stat(model / rel)
        assert st.st_size == len(data), rel
        assert st.st_mode & 0o777 == 0o444
    assert os.stat(model).st_mode & 0o777 == 0o555
    assert os.stat(model / "tokenizer" / "deep").st_mode & 0o777 == 0o555
    assert os.getxattr(model / "model.safetensors", "user.mxfs.status") == b"remote"
    assert os.getxattr(model, "user.mxfs.revision") == hub.head(repo).encode()
    # Listing and stat never download contents.
    assert file_requests(hub, repo) == 0
    assert hub.bytes_served(repo) == 0
    assert not list((mount.cache_dir / f"models--{repo.replace('/', '--')}" / "blobs").glob("*"))


def test_every_file_reads_back_identical(hub: FakeHub, new_repo_id, mxfs_mount) -> None:
    repo = new_repo_id()
    files = sample_files(seed=1)
    commit = hub.add_repo(repo, files)
    # The FUSE read path and a file's user.mxfs.revision, which only FUSE answers (a blob belongs
    # to every commit that has it: docs/handoff.md): hand-off off.
    mount = mxfs_mount("--no-handoff")
    for rel, data in files.items():
        assert sha256(read(mount / repo / rel)) == sha256(data), rel
    # Random-offset reads too (pread through the mount).
    with open(mount / repo / "model.safetensors", "rb") as f:
        rnd = random.Random(7)
        data = files["model.safetensors"]
        for _ in range(50):
            off = rnd.randrange(len(data))
            n = rnd.randrange(1, 300_000)
            assert os.pread(f.fileno(), n, off) == data[off : off + n]
    # The read that reaches the end returns once the file is verified, maybe before its blob
    # is published (fsync and rename) and the status says so.
    status = mount / repo / "model.safetensors"
    wait_until(lambda: os.getxattr(status, "user.mxfs.status") == b"cached", 30, "published")
    etag = os.getxattr(mount / repo / "model.safetensors", "user.mxfs.etag").decode()
    assert etag == sha256(files["model.safetensors"])
    assert os.getxattr(mount / repo / "model.safetensors", "user.mxfs.revision") == commit.encode()
    # The whole entry was fetched exactly once, each file once.
    for rel, data in files.items():
        assert hub.bytes_served(repo, rel) == len(data), rel


def test_concurrent_readers_share_one_download(hub: FakeHub, new_repo_id, mxfs_mount) -> None:
    repo = new_repo_id()
    files = sample_files(seed=2, big=20_000_000)
    hub.add_repo(repo, files)
    # Slow the big file down so that every reader arrives while it is still downloading.
    hub.inject("slow", repo_id=repo, filename="model.safetensors", bytes_per_second=20_000_000)
    mount = mxfs_mount()
    path = mount / repo / "model.safetensors"
    results: list[str] = []
    errors: list[BaseException] = []

    def reader(chunk: int) -> None:
        try:
            with open(path, "rb") as f:
                parts = []
                while block := f.read(chunk):
                    parts.append(block)
            results.append(sha256(b"".join(parts)))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=reader, args=(size,)) for size in (4096, 65536, 1 << 20, 3 << 20) * 2]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert results == [sha256(files["model.safetensors"])] * len(threads)
    assert hub.bytes_served(repo, "model.safetensors") == len(files["model.safetensors"])
    assert "downloading 7 files" in mount.log()
    assert mount.log().count("downloading 7 files") == 1


def test_revisions_branch_tag_and_commit(hub: FakeHub, new_repo_id, mxfs_mount) -> None:
    repo = new_repo_id()
    old = hub.add_repo(repo, {"config.json": b'{"v": 1}', "only-in-v1.txt": b"one"}, tags=["v1.0"])
    new = hub.add_repo(repo, {"config.json": b'{"v": 2}', "added-in-v2.txt": b"two"})
    hub.add_repo(repo, {"config.json": b'{"v": "dev"}'}, branch="dev")
    mount = mxfs_mount()
    org, name = repo.split("/")
    base = mount / org
    assert read(base / name / "config.json") == b'{"v": 2}'
    assert read(base / f"{name}@v1.0" / "config.json") == b'{"v": 1}'
    assert read(base / f"{name}@{old}" / "only-in-v1.txt") == b"one"
    assert read(base / f"{name}@dev" / "config.json") == b'{"v": "dev"}'
    assert sorted(os.listdir(base / f"{name}@{new}")) == ["added-in-v2.txt", "config.json"]
    assert os.getxattr(base / f"{name}@v1.0", "user.mxfs.revision") == old.encode()
    # Directories never mix commits: v1.0 does not have v2's file and vice versa.
    expect_errno(errno.ENOENT, lambda: os.stat(base / f"{name}@v1.0" / "added-in-v2.txt"))
    expect_errno(errno.ENOENT, lambda: os.stat(base / name / "only-in-v1.txt"))
    listing = os.listdir(base)
    assert name in listing and f"{name}@v1.0" in listing and f"{name}@dev" in listing


def test_writes_are_erofs(hub: FakeHub, new_repo_id, mxfs_mount) -> None:
    repo = new_repo_id()
    hub.add_repo(repo, {"config.json": b"{}"})
    mount = mxfs_mount()
    model = mount / repo
    os.listdir(model)
    expect_errno(errno.EROFS, lambda: open(model / "config.json", "r+b"))
    expect_errno(errno.EROFS, lambda: open(model / "config.json", "wb"))
    expect_errno(errno.EROFS, lambda: open(model / "new.txt", "wb"))
    expect_errno(errno.EROFS, lambda: os.mkdir(model / "d"))
    expect_errno(errno.EROFS, lambda: os.unlink(model / "config.json"))
    expect_errno(errno.EROFS, lambda: os.rename(model / "config.json", model / "x.json"))
    expect_errno(errno.EROFS, lambda: os.truncate(model / "config.json", 0))
    expect_errno(errno.EROFS, lambda: os.chmod(model / "config.json", 0o777))
    expect_errno(errno.EROFS, lambda: os.symlink("config.json", model / "link"))
    expect_errno(errno.EROFS, lambda: os.setxattr(model / "config.json", "user.x", b"1"))
    expect_errno(errno.EROFS, lambda: os.rmdir(model))
    assert read(model / "config.json") == b"{}"


def test_invalid_and_unknown_names_are_enoent(hub: FakeHub, new_repo_id, mxfs_mount) -> None:
    repo = new_repo_id()
    hub.add_repo(repo, {"config.json": b"{}"}, tags=["v1"])
    mount = mxfs_mount()
    org, name = repo.split("/")
    hub.reset_log()
    # Invalid names never reach the Hub.
    for bad in (".git", "-x", "a--b", "a..b", "x.git", "ünïcode", "has space", "star*", "x."):
        expect_errno(errno.ENOENT, lambda bad=bad: os.stat(mount / org / bad))
    expect_errno(errno.ENOENT, lambda: os.stat(mount / ".hidden"))
    expect_errno(errno.ENOENT, lambda: os.stat(mount / org / f"{name}@bad..rev"))
    expect_errno(errno.ENAMETOOLONG, lambda: os.stat(mount / org / ("x" * 300)))
    assert hub.requests() == []
    # Unknown repo, revision and file: ENOENT, and a second lookup is answered from the negative cache.
    expect_errno(errno.ENOENT, lambda: os.stat(mount / org / "does-not-exist"))
    expect_errno(errno.ENOENT, lambda: os.stat(mount / org / f"{name}@no-such-branch"))
    calls = len(hub.requests())
    assert calls >= 2
    expect_errno(errno.ENOENT, lambda: os.listdir(mount / org / "does-not-exist"))
    expect_errno(errno.ENOENT, lambda: os.stat(mount / org / f"{name}@no-such-branch"))
    assert len(hub.requests()) == calls
    expect_errno(errno.ENOENT, lambda: os.stat(mount / repo / "missing.json"))
    expect_errno(errno.ENOENT, lambda: open(mount / repo / "nested" / "missing.json", "rb"))
    expect_errno(errno.ENOTDIR, lambda: os.listdir(mount / repo / "config.json"))
    # The file tree is known, so misses inside a model directory cost no Hub call either.
    assert len(hub.requests()) == calls + 2  # resolve + tree listing of the repo itself


def test_gated_repo_is_eacces_with_a_hint(hub: FakeHub, new_repo_id, mxfs_mount) -> None:
    repo = new_repo_id()
    hub.add_repo(repo, {"config.json": b"{}"}, gated=True)
    mount = mxfs_mount()
    mount.allowed_log.append(
        re.escape(repo) + r"@\w+/config\.json: gated repo, access not granted; set HF_TOKEN to a token with access"
    )
    # Like the real Hub, metadata of a gated repo is public: the directory lists, bytes are refused.
    assert os.listdir(mount / repo) == ["config.json"]
    expect_errno(errno.EACCES, lambda: read(mount / repo / "config.json"))
    assert "HF_TOKEN" in mount.log()
    # With a token that has access it works.
    hub.valid_tokens.add("hf_good")
    mount2 = mxfs_mount(env={"HF_TOKEN": "hf_good", "HF_HUB_DISABLE_IMPLICIT_TOKEN": "0"})
    assert read(mount2 / repo / "config.json") == b"{}"
    assert "hf_good" not in mount2.log()


def test_cache_is_a_clean_hf_cache(hub: FakeHub, new_repo_id, mxfs_mount, tmp_path: Path) -> None:
    repo = new_repo_id()
    files = sample_files(seed=3)
    commit = hub.add_repo(repo, files)
    mount = mxfs_mount()
    read(mount / repo / "config.json")  # opening any file downloads the whole entry
    run = run_cli("prefetch", repo, "--cache-dir", str(mount.cache_dir), "--state-dir", str(mount.state_dir),
                  env=hub.env())  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert mount.stop() == 0
    assert not os.path.ismount(mount.mountpoint)

    info = scan_cache_dir(mount.cache_dir)
    assert info.warnings == []
    (cached,) = [r for r in info.repos if r.repo_id == repo]
    (revision,) = cached.revisions
    assert revision.commit_hash == commit
    assert "main" in revision.refs
    assert revision.size_on_disk == sum(len(d) for d in files.values())
    assert not list(mount.cache_dir.rglob("*.incomplete"))

    folder = snapshot_download(repo, cache_dir=mount.cache_dir, local_files_only=True)
    for rel, data in files.items():
        assert read(Path(folder) / rel) == data, rel
    # Blobs are named as huggingface_hub names them.
    blobs = mount.cache_dir / f"models--{repo.replace('/', '--')}" / "blobs"
    assert (blobs / sha256(files["model.safetensors"])).exists()
    git_sha1 = hashlib.sha1(b"blob %d\0" % len(files["config.json"]) + files["config.json"]).hexdigest()
    assert (blobs / git_sha1).exists()


def test_root_and_org_list_what_the_cache_holds(hub: FakeHub, new_repo_id, mxfs_mount) -> None:
    repo_a, repo_b = new_repo_id(), new_repo_id()
    hub.add_repo(repo_a, {"a.txt": b"a"})
    hub.add_repo(repo_b, {"b.txt": b"b"})
    mount = mxfs_mount()
    assert os.listdir(mount.mountpoint) == []
    assert read(mount / repo_a / "a.txt") == b"a"
    os.listdir(mount / repo_b)
    org_a, name_a = repo_a.split("/")
    org_b = repo_b.split("/")[0]
    assert sorted(os.listdir(mount.mountpoint)) == sorted({org_a, org_b})
    assert os.listdir(mount / org_a) == [name_a]
    # A restarted daemon knows them too (from the cache and the state dir).
    assert mount.stop() == 0
    mount2 = mxfs_mount(state_dir=mount.state_dir)
    assert sorted(os.listdir(mount2.mountpoint)) == sorted({org_a, org_b})


def test_status_and_prefetch_commands(hub: FakeHub, new_repo_id, tmp_path: Path) -> None:
    repo = new_repo_id()
    files = sample_files(seed=4)
    commit = hub.add_repo(repo, files, tags=["v2"])
    dirs = ["--cache-dir", str(tmp_path / "cache"), "--state-dir", str(tmp_path / "state")]
    run = run_cli("prefetch", f"{repo}@v2", *dirs, env=hub.env())
    assert run.returncode == 0, run.stderr
    assert hub.bytes_served(repo) == sum(len(d) for d in files.values())
    run = run_cli("prefetch", f"{repo}@v2", *dirs, env=hub.env())
    assert run.returncode == 0, run.stderr
    assert hub.bytes_served(repo) == sum(len(d) for d in files.values())  # nothing downloaded twice

    status = run_cli("status", "--json", *dirs)
    assert status.returncode == 0, status.stderr
    (row,) = [json.loads(line) for line in status.stdout.splitlines()]
    assert row["model"] == repo
    assert row["commit"] == commit
    assert row["revision"] == "v2"
    assert row["status"] == "DOWNLOADED"
    assert row["size_bytes"] == sum(len(d) for d in files.values())
    assert row["pinned"] is False
    assert row["last_used_at"]
    table = run_cli("status", *dirs)
    assert repo in table.stdout and "DOWNLOADED" in table.stdout

    missing = run_cli("prefetch", "nobody/nothing", *dirs, env=hub.env())
    assert missing.returncode == 1
    assert "not found" in missing.stderr


def test_cached_models_are_served_offline(hub: FakeHub, new_repo_id, mxfs_mount) -> None:
    repo = new_repo_id()
    files = sample_files(seed=5)
    hub.add_repo(repo, files)
    mount = mxfs_mount()
    for rel in files:
        read(mount / repo / rel)
    # Cached means the whole entry: a daemon stopped before that leaves the offline one a model it
    # cannot complete (empty.txt, which no read waits for, may not be in the cache yet).
    wait_until(lambda: os.getxattr(mount / repo, "user.mxfs.status") == b"downloaded", 30, "entry downloaded")
    assert mount.stop() == 0
    hub.reset_log()
    offline = mxfs_mount(state_dir=mount.state_dir, env={"HF_HUB_OFFLINE": "1"})
    not_cached = "HF_HUB_OFFLINE is set and this is not cached"
    offline.allowed_log.extend(
        [
            # The revision is looked up in the Hub's cache layout first, then in mxfs's own records.
            rf"^{re.escape(repo)}@main: Hub unavailable \({re.escape(repo)}@main: {not_cached}\); using cached "
            r"resolution \w+$",
            rf"^lookup: someone/uncached@main: {not_cached}$",
        ]
    )
    for rel, data in files.items():
        assert read(offline / repo / rel) == data
    assert hub.requests() == []
    expect_errno(errno.ENOENT, lambda: os.listdir(offline / "someone" / "uncached"))
    # And with the Hub down (not offline mode), cached entries are still served.
    assert offline.stop() == 0
    with hub.inject("error", status=503):
        down = mxfs_mount(state_dir=mount.state_dir, env={"MXFS_TEST": "hub-down"})
        for rel, data in files.items():
            assert read(down / repo / rel) == data
    down.allowed_log.extend(
        [
            r"^ignoring unknown environment variable MXFS_TEST$",
            rf"^resolve {re.escape(repo)}@main: {re.escape(repo)}@main: HTTP 503; retrying in [\d.]+s$",
            rf"^{re.escape(repo)}@main: Hub unavailable \({re.escape(repo)}@main: HTTP 503 "
            r"\(gave up after 5 attempts\)\); using cached resolution \w+$",
        ]
    )


def test_sigterm_unmounts_and_exits_zero(hub: FakeHub, new_repo_id, mxfs_mount) -> None:
    repo = new_repo_id()
    hub.add_repo(repo, {"config.json": b"{}"})
    mount = mxfs_mount()
    assert read(mount / repo / "config.json") == b"{}"
    assert mount.stop() == 0
    assert not os.path.ismount(mount.mountpoint)
    assert "unmounted" in mount.log()


def test_two_daemons_on_one_node_download_once(hub: FakeHub, new_repo_id, mxfs_mount, tmp_path: Path) -> None:
    """Two mounts sharing one cache and one SQLite registry: one claims, the other waits for its blobs."""
    repo = new_repo_id()
    files = sample_files(seed=6, big=12_000_000)
    hub.add_repo(repo, files)
    hub.inject("slow", repo_id=repo, filename="model.safetensors", bytes_per_second=12_000_000)
    state = tmp_path / "shared-state"
    first, second = mxfs_mount(state_dir=state), mxfs_mount(state_dir=state)
    results: dict[str, bytes] = {}

    def reader(mount: MountedFs, key: str) -> None:
        results[key] = read(mount / repo / "model.safetensors")

    threads = [
        threading.Thread(target=reader, args=(m, f"{m.mountpoint.name}-{i}")) for m in (first, second) for i in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(results) == 6
    assert all(data == files["model.safetensors"] for data in results.values())
    for rel, data in files.items():
        assert hub.bytes_served(repo, rel) == len(data), rel
    owners = [m for m in (first, second) if "downloading 7 files" in m.log()]
    assert len(owners) == 1


def test_vanished_files_are_downloaded_again(hub: FakeHub, new_repo_id, mxfs_mount) -> None:
    """A DOWNLOADED entry whose files were deleted (by hand, or evicted by another node) is re-claimed."""
    repo = new_repo_id()
    files = sample_files(seed=7)
    hub.add_repo(repo, files)
    # FUSE's re-claim of vanished blobs: hand-off off.  A handed-off model keeps serving the
    # deleted blobs' inodes until the reconcile detaches it (tests/test_handoff.py).
    mount = mxfs_mount("--no-handoff")
    mount.allowed_log.append(rf"^{re.escape(repo)}@\w+: [\w./-]+ vanished from the cache; fetching it again$")
    assert read(mount / repo / "config.json") == files["config.json"]
    run = run_cli(
        "prefetch", repo, "--cache-dir", str(mount.cache_dir), "--state-dir", str(mount.state_dir), env=hub.env()
    )
    assert run.returncode == 0, run.stderr
    repo_dir = mount.cache_dir / f"models--{repo.replace('/', '--')}"
    for blob in (repo_dir / "blobs").iterdir():
        blob.unlink()
    for rel, data in files.items():
        assert read(mount / repo / rel) == data, rel
    for rel, data in files.items():
        assert hub.bytes_served(repo, rel) == 2 * len(data), rel
    assert "vanished from the cache" in mount.log()
    # Reads return as soon as their bytes are there; the snapshot is whole once every file is cached.
    deadline = time.monotonic() + 30
    while any(os.getxattr(mount / repo / rel, "user.mxfs.status") != b"cached" for rel in files):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert scan_cache_dir(mount.cache_dir).warnings == []
    status = run_cli("status", "--json", "--state-dir", str(mount.state_dir))
    assert json.loads(status.stdout)["status"] == "DOWNLOADED"
