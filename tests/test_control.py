"""``mxfs prefetch`` beside a running daemon: the daemon does the download (mxfs.control).

Real mounts, the counting test Hub, and for the fleet a real redis-server: the command talks to
the daemon over the control socket in the state dir, and falls back to downloading itself when
no daemon answers there.
"""

from __future__ import annotations

import os
import random
import socket
import stat
import subprocess
import sys
from pathlib import Path

from tests.hubserver import FakeHub
from tests.mounting import NO_CONFIG_FILE, REPO_ROOT, read, requires_fuse, run_cli, wait_until
from tests.redis_server import RedisServer
from tests.test_peers import HUB_DOWNLOADER, Node, start_peers

pytestmark = requires_fuse

BY_DAEMON = "the mount's daemon downloads it"
ASKED = "prefetch asked by a command on this node"


def files_of(seed: int, size: int) -> dict[str, bytes]:
    return {"config.json": b'{"control": 1}', "model.safetensors": random.Random(seed).randbytes(size)}


def test_prefetch_beside_a_daemon_is_done_by_the_daemon(hub: FakeHub, new_repo_id, mxfs_mount) -> None:
    repo = new_repo_id()
    files = files_of(31, 3_000_000)
    hub.add_repo(repo, files)
    mount = mxfs_mount()
    sock = mount.state_dir / "control.sock"
    assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
    dirs = ["--cache-dir", str(mount.cache_dir), "--state-dir", str(mount.state_dir)]
    # Whatever a client sends, the daemon answers or hangs up, and goes on serving.
    for junk in (b"not json\n", b"[1, 2]\n", b'{"op": "format the disk"}\n', b"x" * 200_000):
        with socket.socket(socket.AF_UNIX) as client:
            client.settimeout(15)
            client.connect(str(sock))
            try:
                client.sendall(junk)
                client.shutdown(socket.SHUT_WR)
                answer = client.recv(1000)
            except ConnectionResetError:
                answer = b""  # hung up on a line too long, with bytes unread
            assert answer in (b"", b'{"error": "unknown op \'format the disk\'"}\n'), answer

    done = run_cli("prefetch", repo, *dirs, env=hub.env())
    assert done.returncode == 0, done.stderr
    assert BY_DAEMON in done.stderr and f"{repo}: cached" in done.stderr
    assert mount.log().count(ASKED) == 1
    assert hub.bytes_served(repo) == sum(map(len, files.values()))
    # The daemon's download is the cache's: the mount reads it, the Hub sends nothing more.
    assert read(mount / repo / "model.safetensors") == files["model.safetensors"]
    assert hub.bytes_served(repo) == sum(map(len, files.values()))

    # A name the Hub does not know: the daemon's error, and the daemon goes on answering.
    missing = run_cli("prefetch", "nobody/nothing", repo, *dirs, env=hub.env())
    assert missing.returncode == 1
    assert "nobody/nothing: " in missing.stderr and "not found" in missing.stderr
    assert f"{repo}: cached" in missing.stderr
    assert mount.log().count(ASKED) == 2

    # --no-daemon: this process downloads (nothing: it is cached), the daemon is not asked.
    alone = run_cli("prefetch", "--no-daemon", repo, *dirs, env=hub.env())
    assert alone.returncode == 0, alone.stderr
    assert BY_DAEMON not in alone.stderr
    assert mount.log().count(ASKED) == 2

    status = run_cli("status", *dirs)
    assert f"daemon: pid {mount.proc.pid} serves this cache and takes its prefetches" in status.stdout
    assert mount.stop() == 0
    assert not sock.exists(), "the socket stays after the daemon"
    assert f"daemon: none answers on {sock}" in run_cli("status", *dirs).stdout


def test_a_killed_daemons_socket_means_no_daemon(hub: FakeHub, new_repo_id, mxfs_mount, tmp_path: Path) -> None:
    repo = new_repo_id()
    files = files_of(32, 1_000_000)
    hub.add_repo(repo, files)
    mount = mxfs_mount()
    mount.kill()
    sock = mount.state_dir / "control.sock"
    assert sock.exists()  # left behind, as by any kill -9
    dirs = ["--cache-dir", str(mount.cache_dir), "--state-dir", str(mount.state_dir)]
    done = run_cli("prefetch", repo, *dirs, env=hub.env())
    assert done.returncode == 0, done.stderr
    assert BY_DAEMON not in done.stderr and f"{repo}: cached" in done.stderr

    # A daemon started on the state dir again takes commands again (the stale socket replaced).
    other = new_repo_id()
    hub.add_repo(other, files)
    again = mxfs_mount(cache_dir=mount.cache_dir, state_dir=mount.state_dir, mountpoint=tmp_path / "again")
    done = run_cli("prefetch", other, *dirs, env=hub.env())
    assert done.returncode == 0, done.stderr
    assert BY_DAEMON in done.stderr
    assert again.log().count(ASKED) == 1


def test_a_daemon_of_another_cache_is_not_asked(hub: FakeHub, new_repo_id, mxfs_mount, tmp_path: Path) -> None:
    repo = new_repo_id()
    files = files_of(33, 1_000_000)
    hub.add_repo(repo, files)
    mount = mxfs_mount()
    other_cache = tmp_path / "other-cache"
    done = run_cli("prefetch", repo, "--cache-dir", str(other_cache), "--state-dir", str(mount.state_dir),
                   env=hub.env())  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert BY_DAEMON not in done.stderr
    assert ASKED not in mount.log()
    assert any(other_cache.rglob("model.safetensors"))
    status = run_cli("status", "--cache-dir", str(other_cache), "--state-dir", str(mount.state_dir))
    assert f"daemon: pid {mount.proc.pid} serves this state dir with another cache, {mount.cache_dir}" in status.stdout


def test_a_second_daemon_on_one_state_dir_leaves_the_socket_to_the_first(
    hub: FakeHub, new_repo_id, mxfs_mount, tmp_path: Path
) -> None:
    repo = new_repo_id()
    hub.add_repo(repo, files_of(34, 100_000))
    first = mxfs_mount()
    second = mxfs_mount(cache_dir=first.cache_dir, state_dir=first.state_dir)
    assert "another daemon answers at" in second.log()
    assert second.stop() == 0
    assert (first.state_dir / "control.sock").exists(), "the second daemon took the first's socket away"
    done = run_cli("prefetch", repo, "--cache-dir", str(first.cache_dir), "--state-dir", str(first.state_dir),
                   env=hub.env())  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert first.log().count(ASKED) == 1


def test_prefetch_on_every_node_costs_the_fleet_one_hub_download(
    hub: FakeHub, new_repo_id, mxfs_mount, tmp_path: Path, redis_server: RedisServer
) -> None:
    """A prefetch job on every node (a DaemonSet's init step): each node's daemon claims in the
    fleet, so one downloads from the Hub and the others take the bytes from it as they land.
    Prefetches of their own would each go to the Hub (they serve nobody, so may not claim)."""
    repo = new_repo_id()
    files = files_of(35, 12_000_000)
    hub.add_repo(repo, files)
    # Paced like a CDN connection: every node's prefetch starts while the first is under way.
    hub.inject("slow", repo_id=repo, filename="*.safetensors", bytes_per_second=6_000_000)
    nodes = start_peers(mxfs_mount, tmp_path, redis_server, 3)
    env = {**os.environ, "MXFS_CONFIG": NO_CONFIG_FILE, **hub.env()}

    def prefetch_on(node: Node) -> subprocess.Popen[str]:
        dirs = ["--cache-dir", str(node.mount.cache_dir), "--state-dir", str(node.mount.state_dir)]
        command = [sys.executable, "-m", "mxfs", "prefetch", repo, *dirs]
        return subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO_ROOT)

    jobs = [prefetch_on(n) for n in nodes]
    outcomes = [job.communicate(timeout=120) for job in jobs]
    for job, (_, err) in zip(jobs, outcomes, strict=True):
        assert job.returncode == 0, err
        assert BY_DAEMON in err
    total = sum(map(len, files.values()))
    sent = hub.bytes_served(repo)
    assert sent <= 1.1 * total, f"the Hub sent {sent} bytes for a {total}-byte model prefetched on 3 nodes"
    assert sum(HUB_DOWNLOADER in n.log() for n in nodes) == 1
    for n in nodes:
        assert read(n / repo / "model.safetensors") == files["model.safetensors"]
    assert hub.bytes_served(repo) == sent


def test_a_daemon_stopped_mid_prefetch_leaves_the_command_to_finish(hub: FakeHub, new_repo_id, mxfs_mount) -> None:
    """``systemctl restart mxfs`` while a prefetch job waits on the daemon: the command notices the
    daemon gone and downloads the rest itself (resuming the daemon's partial files: its claim was
    handed back as it stopped)."""
    repo = new_repo_id()
    files = files_of(36, 6_000_000)
    hub.add_repo(repo, files)
    slow = hub.inject("slow", repo_id=repo, filename="*.safetensors", bytes_per_second=1_500_000)
    mount = mxfs_mount()
    dirs = ["--cache-dir", str(mount.cache_dir), "--state-dir", str(mount.state_dir)]
    env = {**os.environ, "MXFS_CONFIG": NO_CONFIG_FILE, **hub.env()}
    job = subprocess.Popen(
        [sys.executable, "-m", "mxfs", "prefetch", repo, *dirs], stderr=subprocess.PIPE, text=True, env=env,
        cwd=REPO_ROOT,
    )  # fmt: skip
    wait_until(lambda: hub.bytes_served(repo, "model.safetensors") > 1_000_000, 30, "the daemon's download under way")
    assert mount.stop() == 0
    slow.remove()
    _, err = job.communicate(timeout=120)
    assert job.returncode == 0, err
    assert BY_DAEMON in err and "prefetching here" in err and f"{repo}: cached" in err
    # The command's copy is whole and right (verified against the Hub's checksum as always).
    blobs = next(mount.cache_dir.glob("models--*/blobs"))
    assert sorted(p.read_bytes() for p in blobs.iterdir()) == sorted(files.values())
