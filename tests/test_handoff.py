"""Complete models handed to the kernel (issue 15): a read-only bind of hard links to the blobs.

Real mounts: the daemon in a subprocess, the Hub on loopback, the binds read from
/proc/self/mountinfo.  Each test says which promise of docs/handoff.md it holds.
"""

from __future__ import annotations

import errno
import json
import mmap
import os
import random
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mxfs.cache import HubCache
from tests.hubserver import FakeHub
from tests.mounting import MountedFs, requires_fuse, run_cli, settled_scan, wait_until
from tests.scrape import free_port, http_scrape, parse, value

pytestmark = [
    requires_fuse,
    pytest.mark.skipif(os.geteuid() != 0, reason="the hand-off mounts: it needs root"),
]

RND = random.Random(15)
FILES = {
    "config.json": b'{"model_type": "test"}',
    "model.safetensors": RND.randbytes(3_000_000),
    "tokenizer/vocab.txt": b"\n".join(b"tok%d" % i for i in range(2000)),
    "tokenizer/deep/merges.txt": RND.randbytes(50_000),
    "twin.txt": b"same bytes in two places\n",
    "copy/twin.txt": b"same bytes in two places\n",
}


def binds_under(mountpoint: Path) -> list[str]:
    """Mount points strictly under ``mountpoint``, one per line of mountinfo (duplicates kept)."""
    base = str(mountpoint) + "/"
    with open("/proc/self/mountinfo") as f:
        return [fields[4] for fields in (line.split() for line in f) if fields[4].startswith(base)]


def handed_off(mount: MountedFs, rel: str) -> bool:
    return str(mount / rel) in binds_under(mount.mountpoint)


def read(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def last_used(mount: MountedFs, repo: str) -> str:
    db = sqlite3.connect(mount.state_dir / "registry.db")
    try:
        rows = db.execute("SELECT model_name, last_used_at FROM models").fetchall()
    finally:
        db.close()
    return max(at for name, at in rows if name.startswith(repo.replace("/", "--") + "--") or repo in name)


def complete(mount: MountedFs, repo: str, files: dict[str, bytes] = FILES) -> Path:
    """Read every file once through FUSE (downloads the model), then wait for the hand-off."""
    org, name = repo.split("/")
    model = mount / org / name
    for rel, data in files.items():
        assert read(model / rel) == data
    wait_until(lambda: handed_off(mount, f"{org}/{name}"), 15, "the complete model is handed off")
    # And the daemon is done attaching it (a stop while it still is would detach it unrecorded).
    wait_until(lambda: f"{org}/{name}: handed to the kernel" in mount.log(), 15, "the daemon says so")
    return model


def test_complete_model_is_served_by_the_kernel_and_looks_as_through_fuse(
    hub: FakeHub, new_repo_id, mxfs_mount
) -> None:
    repo = new_repo_id()
    commit = hub.add_repo(repo, FILES)
    mount = mxfs_mount()
    org, name = repo.split("/")
    model = mount / org / name
    fuse_dev = os.stat(mount.mountpoint).st_dev
    # Before completion: FUSE's view, with its attributes.
    fuse_stats = {rel: os.stat(model / rel) for rel in FILES}
    fuse_dirs = {d: os.stat(model / d) for d in ("", "tokenizer", "tokenizer/deep", "copy")}
    assert os.stat(model).st_dev == fuse_dev

    complete(mount, repo)
    assert binds_under(mount.mountpoint).count(str(model)) == 1
    assert os.stat(model).st_dev != fuse_dev  # the cache's file system now
    for rel, data in FILES.items():
        st = os.stat(model / rel)
        assert st.st_dev != fuse_dev
        assert read(model / rel) == data
        before = fuse_stats[rel]
        for attr in ("st_mode", "st_size", "st_uid", "st_gid", "st_mtime_ns", "st_atime_ns"):
            assert getattr(st, attr) == getattr(before, attr), (rel, attr)
    for d, before in fuse_dirs.items():
        st = os.stat(model / d)
        for attr in ("st_mode", "st_uid", "st_gid", "st_mtime_ns"):
            assert getattr(st, attr) == getattr(before, attr), (d, attr)
    assert sorted(os.listdir(model)) == sorted(os.listdir(model))  # listing works
    assert sorted(os.listdir(model / "tokenizer")) == ["deep", "vocab.txt"]
    # Twins are two links to one blob.
    assert os.stat(model / "twin.txt").st_ino == os.stat(model / "copy" / "twin.txt").st_ino
    # Read-only, whoever asks.
    with pytest.raises(OSError):
        open(model / "config.json", "r+b")
    with pytest.raises(OSError):
        (model / "new.txt").write_bytes(b"x")
    # An @revision directory a reader looks up is handed off too.
    pinned = mount / org / f"{name}@{commit}"
    assert read(pinned / "config.json") == FILES["config.json"]
    wait_until(lambda: handed_off(mount, f"{org}/{name}@{commit}"), 15, "the @commit directory is handed off")
    assert os.stat(pinned / "model.safetensors").st_ino == os.stat(model / "model.safetensors").st_ino
    # The HF cache stays clean for huggingface_hub.
    info = settled_scan(mount.cache_dir)
    assert not info.warnings, info.warnings

    assert mount.stop() == 0
    assert binds_under(mount.mountpoint) == []


def xattrs(path: Path) -> dict[str, bytes]:
    return {name: os.getxattr(path, name) for name in os.listxattr(path) if name.startswith("user.mxfs.")}


def test_handed_off_model_shows_the_user_mxfs_xattrs(hub: FakeHub, new_repo_id, mxfs_mount) -> None:
    """``getfattr -n user.mxfs.status`` keeps working on a handed-off model (README)."""
    repo = new_repo_id()
    commit = hub.add_repo(repo, FILES)
    mount = mxfs_mount()
    org, name = repo.split("/")
    model = mount / org / name
    fuse_dirs = {d: xattrs(model / d) for d in ("", "tokenizer/deep")}
    fuse_etags = {rel: os.getxattr(model / rel, "user.mxfs.etag") for rel in FILES}
    complete(mount, repo)
    assert os.stat(model).st_dev != os.stat(mount.mountpoint).st_dev
    for d, before in fuse_dirs.items():
        # The folders show what the FUSE model directory shows, now that the entry is whole.
        assert xattrs(model / d) == {**before, "user.mxfs.status": b"downloaded"}, d
        assert before["user.mxfs.revision"] == commit.encode()
    for rel in FILES:
        shown = xattrs(model / rel)
        assert shown == {
            "user.mxfs.status": b"cached",
            "user.mxfs.etag": fuse_etags[rel],
            "user.mxfs.model": repo.encode(),
        }
    # No revision on files: one blob serves every commit that has the same file.
    with pytest.raises(OSError) as missing:
        os.getxattr(model / "config.json", "user.mxfs.revision")
    assert missing.value.errno == errno.ENODATA
    # Still read-only.
    with pytest.raises(OSError):
        os.setxattr(model / "config.json", "user.mxfs.status", b"remote")


def status_rows(mount: MountedFs, *env: str) -> list[dict]:
    dirs = ["--cache-dir", str(mount.cache_dir), "--state-dir", str(mount.state_dir)]
    done = run_cli("status", "--json", *dirs, env=dict(e.split("=", 1) for e in env))
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()]


def status_text(mount: MountedFs, *env: str) -> str:
    dirs = ["--cache-dir", str(mount.cache_dir), "--state-dir", str(mount.state_dir)]
    done = run_cli("status", *dirs, env=dict(e.split("=", 1) for e in env))
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_handoff_false_keeps_fuse(hub: FakeHub, new_repo_id, mxfs_mount) -> None:
    repo = new_repo_id()
    hub.add_repo(repo, FILES)
    port = free_port()
    mount = mxfs_mount("--no-handoff", "--metrics-address", f"127.0.0.1:{port}")
    org, name = repo.split("/")
    for rel, data in FILES.items():
        assert read(mount / org / name / rel) == data
    time.sleep(1.0)  # time a hand-off would take; nothing to wait for
    assert binds_under(mount.mountpoint) == []
    assert os.stat(mount / org / name / "config.json").st_dev == os.stat(mount.mountpoint).st_dev
    samples = parse(http_scrape(port))
    assert value(samples, "mxfs_handoff_enabled") == 0
    assert value(samples, "mxfs_handoff_model_dirs") == 0
    assert "hand-off off (handoff = false): 0 model directories" in status_text(mount, "MXFS_HANDOFF=false")
    assert [row["handed_off"] for row in status_rows(mount)] == [[]]


def test_status_and_metrics_show_the_handoff(hub: FakeHub, new_repo_id, mxfs_mount) -> None:
    repo = new_repo_id()
    hub.add_repo(repo, FILES)
    port = free_port()
    mount = mxfs_mount("--metrics-address", f"127.0.0.1:{port}")
    org, name = repo.split("/")
    before = parse(http_scrape(port))
    assert value(before, "mxfs_handoff_enabled") == 1
    assert value(before, "mxfs_handoff_model_dirs") == 0
    complete(mount, repo)
    wait_until(lambda: value(parse(http_scrape(port)), "mxfs_handoff_model_dirs") == 1, 10, "the gauge counts it")

    (row,) = status_rows(mount)
    assert row["handed_off"] == [str(mount / org / name)]
    text = status_text(mount)
    assert "hand-off on: 1 model directory served by the kernel" in text
    header, line = text.splitlines()[:2]
    assert header.split()[-2:] == ["HANDED", "OFF"] and line.startswith(repo) and line.split()[-1] == "yes"

    # Without the daemon, the mount table still tells: after a kill -9 the kernel keeps serving.
    mount.kill()
    (row,) = status_rows(mount)
    assert row["handed_off"] == [str(mount / org / name)]
    mount.allowed_log.append(r"stale mount left by a crashed daemon")
    done = run_cli("unmount", str(mount.mountpoint))
    assert done.returncode == 0, done.stdout + done.stderr
    assert [row["handed_off"] for row in status_rows(mount)] == [[]]


def touched_ms(mount: MountedFs) -> int:
    db = sqlite3.connect(mount.state_dir / "registry.db")
    try:
        return max(row[0] for row in db.execute("SELECT last_used_at_ms FROM entries"))
    finally:
        db.close()


def test_opens_through_the_kernel_touch_the_entry(hub: FakeHub, new_repo_id, mxfs_mount) -> None:
    repo = new_repo_id()
    hub.add_repo(repo, FILES)
    mount = mxfs_mount()
    model = complete(mount, repo)
    before = touched_ms(mount)
    time.sleep(0.05)
    assert read(model / "tokenizer" / "vocab.txt") == FILES["tokenizer/vocab.txt"]  # no FUSE open
    wait_until(lambda: touched_ms(mount) > before, 10, "an open through the view touches the entry")


def evict_cli(mount: MountedFs, repo: str, *wrapper: str) -> subprocess.CompletedProcess[str]:
    here = ["--state-dir", str(mount.state_dir), "--cache-dir", str(mount.cache_dir)]
    cmd = [*wrapper, sys.executable, "-m", "mxfs", "evict", repo, "--force", *here]
    env = {**os.environ, "MXFS_CONFIG": "/dev/null"}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120, check=False)


def test_eviction_sees_open_and_mapped_readers_and_detaches(hub: FakeHub, new_repo_id, mxfs_mount) -> None:
    repo = new_repo_id()
    hub.add_repo(repo, FILES)
    mount = mxfs_mount()
    org, name = repo.split("/")
    model = complete(mount, repo)
    data = FILES["model.safetensors"]
    fd = os.open(model / "model.safetensors", os.O_RDONLY)
    with open(model / "tokenizer" / "deep" / "merges.txt", "rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)  # the descriptor closes, the map stays
    try:
        assert os.pread(fd, 1000, 0) == data[:1000]
        # This node sees the descriptor and the mapping: the entry is open here.
        refused = evict_cli(mount, repo)
        assert refused.returncode == 1 and "open on this node" in refused.stdout, refused.stdout + refused.stderr
        os.close(fd)
        fd = -1
        refused = evict_cli(mount, repo)
        assert refused.returncode == 1 and "open on this node" in refused.stdout, refused.stdout + refused.stderr

        # A process that cannot see these readers (its own PID namespace, as on another node
        # sharing the cache) evicts: the bind is detached first, then the files go.
        fd = os.open(model / "model.safetensors", os.O_RDONLY)
        blind = ["unshare", "--pid", "--fork", "--mount", "--propagation", "unchanged", "--mount-proc"]
        gone = evict_cli(mount, repo, *blind)
        assert gone.returncode == 0 and "evicted" in gone.stdout, gone.stdout + gone.stderr
        assert not handed_off(mount, f"{org}/{name}")
        assert not (mount.cache_dir / f"models--{org}--{name}").exists()
        # The readers keep reading the right bytes: the inodes live on.
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        assert os.pread(fd, len(data), 0) == data
        assert mapped[:] == FILES["tokenizer/deep/merges.txt"]
    finally:
        mapped.close()
        if fd >= 0:
            os.close(fd)
    mount.allowed_log.append(r"vanished from the cache; fetching it again")


def test_refresh_replaces_the_view_old_handles_keep_old_bytes(hub: FakeHub, new_repo_id, mxfs_mount) -> None:
    repo = new_repo_id()
    hub.add_repo(repo, FILES)
    mount = mxfs_mount()
    model = complete(mount, repo)
    held = open(model / "config.json", "rb")
    try:
        new_files = {**FILES, "config.json": b'{"model_type": "v2"}'}
        new = hub.commit(repo, {"config.json": new_files["config.json"]})
        dirs = ["--cache-dir", str(mount.cache_dir), "--state-dir", str(mount.state_dir)]
        done = run_cli("refresh", repo, *dirs, env=hub.env())
        assert done.returncode == 0, done.stderr

        # The directory moves (the old view's bind is taken away first, then the name moves):
        # from then on it shows the new commit, through FUSE until it is handed off again.
        def revision() -> bytes:
            return os.getxattr(model, "user.mxfs.revision")

        wait_until(lambda: revision() == new.encode(), 15, "the directory moves to the new commit")
        complete(mount, repo, new_files)
        assert binds_under(mount.mountpoint).count(str(model)) == 1  # the new view's, alone
        assert revision() == new.encode()
        assert read(model / "config.json") == new_files["config.json"]
        assert held.read() == FILES["config.json"]
    finally:
        held.close()


def test_kill_9_restart_and_unmount_leave_no_stale_binds(hub: FakeHub, new_repo_id, mxfs_mount) -> None:
    repo = new_repo_id()
    hub.add_repo(repo, FILES)
    mount = mxfs_mount()
    org, name = repo.split("/")
    model = complete(mount, repo)
    held = open(model / "model.safetensors", "rb")
    mount.kill()
    # The kernel serves the handed-off model with its daemon gone.
    assert held.read() == FILES["model.safetensors"]
    held.close()
    again = mxfs_mount(mountpoint=mount.mountpoint, state_dir=mount.state_dir)
    again.allowed_log.append(r"stale mount left by a crashed daemon")
    wait_until(lambda: handed_off(again, f"{org}/{name}"), 15, "the restart hands the model off again")
    assert binds_under(again.mountpoint) == [str(model)]
    assert read(model / "config.json") == FILES["config.json"]
    done = run_cli("unmount", str(again.mountpoint))
    assert done.returncode == 0, done.stdout + done.stderr
    wait_until(lambda: again.proc.poll() is not None, 15, "the daemon exits after mxfs unmount")
    assert binds_under(again.mountpoint) == []
    assert not os.path.ismount(again.mountpoint)


def abort_fuse_connection(mountpoint: Path) -> None:
    """Abort the FUSE connection of ``mountpoint`` (fusectl): every request waiting on it fails."""
    with open("/proc/self/mountinfo") as f:
        device = next(line.split()[2] for line in f if line.split()[4] == str(mountpoint))
    connections = Path("/sys/fs/fuse/connections")
    if not any(connections.iterdir()):
        subprocess.run(["mount", "-t", "fusectl", "fusectl", str(connections)], check=False)
    (connections / device.split(":")[1] / "abort").write_text("1")


def test_kill_9_while_the_daemon_waits_on_its_own_mount_leaves_it_dead_not_wedged(
    hub: FakeHub, new_repo_id, mxfs_mount
) -> None:
    """The daemon's calls into its own mount (binds, detaches, the lookups after a restart) run in
    child processes.  Made from a thread of the daemon, a kill -9 while one waits for the daemon's
    answer would leave that thread unkillable, the daemon's /dev/fuse open, and the mount hanging
    every process that touches it, for good."""
    repo = new_repo_id()
    hub.add_repo(repo, FILES)
    mount = mxfs_mount()
    complete(mount, repo)
    assert mount.stop() == 0  # its record of the hand-off stays, for the restart
    # The restart looks the directory up in its own mount, and its answer waits for the Hub.
    stall = hub.inject("delay", seconds=60, on="api", repo_id=repo)
    again = mxfs_mount(mountpoint=mount.mountpoint, state_dir=mount.state_dir)
    wait_until(lambda: stall.hits > 0, 15, "the restart's lookup waits for the Hub")
    again.proc.kill()
    try:
        again.proc.wait(15)  # a thread stuck in its own FUSE request would keep the process alive
    except subprocess.TimeoutExpired:
        abort_fuse_connection(mount.mountpoint)  # or the test's own clean-up would hang on it
        raise AssertionError("the killed daemon did not end: its mount was wedged") from None
    probe = [sys.executable, "-c", f"import os; os.stat({str(mount / repo)!r})"]
    done = subprocess.run(probe, capture_output=True, text=True, timeout=15, check=False)
    assert "Transport endpoint is not connected" in done.stderr, done.stderr  # dead, answering
    stall.remove()


def test_a_reader_in_its_own_mount_namespace_sees_the_handoff(hub: FakeHub, new_repo_id, mxfs_mount) -> None:
    repo = new_repo_id()
    hub.add_repo(repo, FILES)
    mount = mxfs_mount()
    org, name = repo.split("/")
    model = mount / org / name
    # Started before the hand-off, like a pod with HostToContainer propagation.
    script = (
        "import os, sys, time\n"
        f"model = {str(model)!r}\n"
        "sys.stdout.write(str(os.stat(model + '/config.json').st_dev) + '\\n'); sys.stdout.flush()\n"
        "sys.stdin.readline()\n"
        "print(os.stat(model + '/config.json').st_dev, open(model + '/config.json', 'rb').read().decode())\n"
    )
    reader = subprocess.Popen(
        ["unshare", "--mount", "--propagation", "slave", sys.executable, "-c", script],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert reader.stdout is not None and reader.stdin is not None
        fuse_dev = int(reader.stdout.readline())
        assert fuse_dev == os.stat(mount.mountpoint).st_dev
        complete(mount, repo)
        reader.stdin.write("go\n")
        reader.stdin.flush()
        dev, text = reader.stdout.readline().split(" ", 1)
        assert int(dev) == os.stat(model / "config.json").st_dev != fuse_dev
        assert text.strip() == FILES["config.json"].decode()
    finally:
        reader.kill()
        reader.wait()


def test_a_partial_model_stays_on_fuse_and_moves_when_complete(hub: FakeHub, new_repo_id, mxfs_mount) -> None:
    repo = new_repo_id()
    hub.add_repo(repo, FILES)
    mount = mxfs_mount()
    org, name = repo.split("/")
    model = mount / org / name
    fuse_dev = os.stat(mount.mountpoint).st_dev
    early = open(model / "model.safetensors", "rb")  # a FUSE handle opened while partial
    try:
        assert early.read(100) == FILES["model.safetensors"][:100]
        assert not handed_off(mount, f"{org}/{name}")
        assert os.fstat(early.fileno()).st_dev == fuse_dev
        complete(mount, repo)
        # The earlier handle still reads, through FUSE, the right bytes; new opens get the view.
        assert early.read() == FILES["model.safetensors"][100:]
        assert os.stat(model / "model.safetensors").st_dev != fuse_dev
    finally:
        early.close()


def test_reconcile_rebinds_an_unmounted_view_and_takes_back_a_deleted_revision(
    hub: FakeHub, new_repo_id, mxfs_mount
) -> None:
    """Changes behind the daemon's back are found within a check interval (here 1 s)."""
    repo = new_repo_id()
    commit = hub.add_repo(repo, FILES)
    mount = mxfs_mount(env={"MXFS_HANDOFF_CHECK_INTERVAL": "1s"})
    mount.allowed_log.append(r"vanished from the cache; fetching it again")
    org, name = repo.split("/")
    model = complete(mount, repo)

    # Unmounted outside the daemon (an admin, a refused `mxfs unmount`): bound again.
    subprocess.run(["umount", "-l", str(model)], check=True, capture_output=True)
    assert not handed_off(mount, f"{org}/{name}")
    wait_until(lambda: handed_off(mount, f"{org}/{name}"), 15, "the unmounted view is bound again")
    assert binds_under(mount.mountpoint) == [str(model)]

    # The revision deleted through the cache, as `mxfs evict` in another mount namespace or on
    # another node sharing the cache does: the bind goes, and so does the stale view.
    held = open(model / "model.safetensors", "rb")
    try:
        cache = HubCache(mount.cache_dir)
        cache.delete_revision(repo, commit)
        wait_until(lambda: not handed_off(mount, f"{org}/{name}"), 15, "the bind of a deleted revision goes")
        assert not cache.view_dir(repo, commit).exists()
        assert held.read() == FILES["model.safetensors"]  # a reader from before keeps its inode
    finally:
        held.close()
    # FUSE serves the directory again, fetches it again, and hands it off once complete.
    assert os.stat(model).st_dev == os.stat(mount.mountpoint).st_dev
    complete(mount, repo)
    assert binds_under(mount.mountpoint) == [str(model)]
    assert read(model / "model.safetensors") == FILES["model.safetensors"]
