"""Running mxfs as a service: systemd notifications, signals, restarts, unmount, allow_other.

The daemon runs in a subprocess as ``mxfs mount`` (as systemd would start it) against the loopback
Hub.  systemd's side of ``sd_notify`` is played by a real ``AF_UNIX`` datagram socket that the test
binds and passes as ``NOTIFY_SOCKET``.  Mount points are chosen by the tests here (the same one
twice for the restart test; one that other users can reach for allow_other), so these tests start
their daemons with a local factory rather than the shared ``mxfs_mount`` fixture, torn down the
same way: SIGTERM, then a lazy unmount, then SIGKILL, and the log checked for tracebacks.
"""

from __future__ import annotations

import errno
import itertools
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from mxfs import cli, systemd
from mxfs.cache import HubCache
from mxfs.names import EntryName
from mxfs.registry import Record, Status
from mxfs.statedir import StateDir
from mxfs.tree import HubFile, RepoTree
from tests.hubserver import FakeHub
from tests.mounting import NO_CONFIG_FILE, REPO_ROOT, MountedFs, parallel, requires_fuse, run_cli, wait_until

NOBODY = 65534

# -- helpers -------------------------------------------------------------------------------------


class NotifySocket:
    """What systemd listens on: every datagram the daemon sends, with the time it arrived."""

    def __init__(self) -> None:
        self._dir = tempfile.mkdtemp(prefix="mxfs-sd-")  # short: AF_UNIX paths are limited to 108 bytes
        self.path = os.path.join(self._dir, "notify")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.messages: list[tuple[float, str]] = []

    def close(self) -> None:
        self.sock.close()
        shutil.rmtree(self._dir, ignore_errors=True)

    def _receive(self, timeout: float) -> bool:
        self.sock.settimeout(max(timeout, 0.001))
        try:
            data = self.sock.recv(4096)
        except TimeoutError:
            return False
        self.messages.append((time.monotonic(), data.decode()))
        return True

    def wait_for(self, line: str, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> float:
        """Wait for a datagram with ``line`` in it; returns when it arrived."""
        deadline = time.monotonic() + timeout
        seen = 0
        while True:
            for arrived, text in self.messages[seen:]:
                if line in text.splitlines():
                    return arrived
            seen = len(self.messages)
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {line!r} within {timeout}s; got {[m for _, m in self.messages]}")
            if proc is not None and proc.poll() is not None and not self._receive(0.2):
                raise AssertionError(f"mxfs exited with {proc.returncode} before sending {line!r}")
            self._receive(min(left, 0.2))

    def times_of(self, line: str) -> list[float]:
        return [arrived for arrived, text in self.messages if line in text.splitlines()]

    def drain(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            self._receive(left)


@pytest.fixture
def notify() -> Iterator[NotifySocket]:
    sock = NotifySocket()
    yield sock
    sock.close()


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """A directory every user can reach (pytest's tmp_path is 0700 root's), for allow_other tests.

    Request it before ``start_daemon`` so that it outlives the daemons mounted in it.
    """
    path = Path(tempfile.mkdtemp(prefix="mxfs-pub-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    for child in path.iterdir():
        if os.path.ismount(child) or is_stale(child):
            subprocess.run(["fusermount3", "-u", "-z", str(child)], capture_output=True, check=False)
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def start_daemon(mxfs_mount: Callable[..., MountedFs], tmp_path: Path) -> Callable[..., MountedFs]:
    """``mxfs mount MOUNTPOINT`` on a mount point the test chooses; the daemons of a test share
    one cache and state dir, as the restarts of one service do."""

    def start(mountpoint: Path, *args: str, env: dict[str, str] | None = None, wait: bool = True) -> MountedFs:
        return mxfs_mount(*args, mountpoint=mountpoint, state_dir=tmp_path / "state", env=env, wait=wait)

    return start


def read(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def is_stale(path: Path) -> bool:
    """A dead mount; statfs always reaches the daemon (a stat may be answered from the kernel's cache)."""
    try:
        os.statvfs(path)
    except OSError as exc:
        return exc.errno == errno.ENOTCONN
    return False


def wait_downloaded(model_dir: Path, timeout: float = 20) -> None:
    """Until the whole model is in the cache (a read returns before its download finishes)."""
    deadline = time.monotonic() + timeout
    while os.getxattr(model_dir, "user.mxfs.status") != b"downloaded":
        assert time.monotonic() < deadline, os.getxattr(model_dir, "user.mxfs.status")
        time.sleep(0.05)


def as_nobody(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(cmd), user=NOBODY, group=NOBODY, extra_groups=[], capture_output=True, text=True, timeout=30, check=False
    )


# -- systemd notifications -----------------------------------------------------------------------


@requires_fuse
def test_ready_only_once_the_mount_answers_and_stopping_on_sigterm(
    hub: FakeHub, new_repo_id, start_daemon, notify: NotifySocket, tmp_path: Path
) -> None:
    repo = new_repo_id()
    hub.add_repo(repo, {"config.json": b'{"a": 1}'})
    mount = start_daemon(tmp_path / "mnt", env={"NOTIFY_SOCKET": notify.path}, wait=False)
    notify.wait_for("READY=1", timeout=20, proc=mount.proc)
    # At READY=1 the mount is there and served by the daemon (this is what `After=mxfs.service` buys).
    assert os.path.ismount(mount.mountpoint)
    assert read(mount / repo / "config.json") == b'{"a": 1}'
    assert not notify.times_of("STOPPING=1")
    assert not notify.times_of("WATCHDOG=1")  # no WATCHDOG_USEC: no pings

    mount.proc.send_signal(signal.SIGTERM)
    notify.wait_for("STOPPING=1", timeout=10)
    assert mount.proc.wait(10) == 0
    assert not os.path.ismount(mount.mountpoint)
    assert "unmounted" in mount.log()


@requires_fuse
def test_no_ready_when_the_mount_fails(hub: FakeHub, notify: NotifySocket, tmp_path: Path) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    env = {**os.environ, **hub.env(), "NOTIFY_SOCKET": notify.path}
    done = subprocess.run(
        [sys.executable, "-m", "mxfs", "mount", str(not_a_dir), "--cache-dir", str(tmp_path / "c"),
         "--state-dir", str(tmp_path / "s"), "--metrics-address", ""],
        env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert done.returncode == 1
    assert "not a directory" in done.stderr
    notify.drain(0.2)
    assert not notify.times_of("READY=1")


@requires_fuse
def test_watchdog_pings_at_least_every_half_period(
    hub: FakeHub, start_daemon, notify: NotifySocket, tmp_path: Path
) -> None:
    period = 2.0
    mount = start_daemon(
        tmp_path / "mnt", env={"NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": str(int(period * 1e6))}, wait=False
    )
    ready = notify.wait_for("READY=1", timeout=20, proc=mount.proc)
    notify.drain(1.5 * period)
    pings = [t for t in notify.times_of("WATCHDOG=1") if t >= ready]
    assert len(pings) >= 4, notify.messages  # every period / 4
    gaps = [b - a for a, b in itertools.pairwise([ready, *pings])]
    assert max(gaps) <= period / 2, gaps
    assert mount.stop() == 0


def test_watchdog_period_is_for_this_process_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    assert systemd.watchdog_period() is None
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    assert systemd.watchdog_period() == 30.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert systemd.watchdog_period() == 30.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))  # meant for the process that started us
    assert systemd.watchdog_period() is None
    monkeypatch.delenv("WATCHDOG_PID")
    for bad in ("0", "", "abc", "-5"):
        monkeypatch.setenv("WATCHDOG_USEC", bad)
        assert systemd.watchdog_period() is None


# -- stop, crash, restart, unmount ---------------------------------------------------------------


@requires_fuse
def test_restart_after_kill_9_on_the_same_mountpoint(hub: FakeHub, new_repo_id, start_daemon, tmp_path: Path) -> None:
    repo = new_repo_id()
    hub.add_repo(repo, {"config.json": b"{}", "weights.bin": os.urandom(200_000)})
    mountpoint = tmp_path / "models"
    first = start_daemon(mountpoint)
    data = read(first / repo / "weights.bin")
    wait_downloaded(first / repo)
    first.proc.kill()
    first.proc.wait(10)
    assert is_stale(mountpoint)  # what a crash leaves: "Transport endpoint is not connected"

    second = start_daemon(mountpoint)
    assert "stale mount" in second.log()
    hub.reset_log()
    assert read(second / repo / "weights.bin") == data
    assert hub.bytes_served(repo) == 0  # served from the cache the first daemon filled
    assert second.stop() == 0
    assert not os.path.ismount(mountpoint) and not is_stale(mountpoint)


@requires_fuse
def test_restart_after_kill_9_mid_download_resumes_it_at_once(
    hub: FakeHub, new_repo_id, start_daemon, tmp_path: Path
) -> None:
    """The daemon killed mid-download, systemd starts it again: its predecessor's claim names a
    process that is gone, so the restart resumes the download at once instead of waiting out a
    lease (here 10 minutes, longer than the test may take)."""
    repo = new_repo_id()
    data = os.urandom(6_000_000)
    hub.add_repo(repo, {"config.json": b"{}", "weights.bin": data})
    slow = hub.inject("slow", repo_id=repo, filename="weights.bin", bytes_per_second=1_500_000)
    mountpoint = tmp_path / "models"
    first = start_daemon(mountpoint, "--lease", "600s")
    assert read(first / repo / "config.json") == b"{}"  # the open claims the whole model
    wait_until(lambda: hub.bytes_served(repo, "weights.bin") > 0, 20, "the download under way")
    first.proc.kill()
    first.proc.wait(10)
    slow.remove()

    second = start_daemon(mountpoint, "--lease", "600s")
    second.allowed_log.append(r": stale mount left by a crashed daemon; unmounting it$")
    got = parallel([lambda: read(second / repo / "weights.bin")], timeout=60)
    assert got == [data]
    assert re.search(r"the process that was downloading it \(pid \d+\) is gone; taking the download over", second.log())


@requires_fuse
def test_prefetch_container_killed_mid_download_taken_over_at_once(
    hub: FakeHub, new_repo_id, start_daemon, tmp_path: Path
) -> None:
    """A prefetch job in a container of its own (its own pid namespace and /proc) is OOM-killed
    mid-download; the node's daemon, on the same state dir, knows by the job's lock there that the
    claim died with it, and downloads at once instead of waiting out the lease (10 minutes)."""
    repo = new_repo_id()
    data = os.urandom(6_000_000)
    hub.add_repo(repo, {"config.json": b"{}", "weights.bin": data})
    slow = hub.inject("slow", repo_id=repo, filename="weights.bin", bytes_per_second=1_500_000)
    dirs = ["--cache-dir", str(tmp_path / "cache"), "--state-dir", str(tmp_path / "state")]
    env = {**os.environ, "MXFS_CONFIG": NO_CONFIG_FILE, **hub.env()}
    job = subprocess.Popen(
        ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child",
         sys.executable, "-m", "mxfs", "prefetch", "--no-daemon", "--lease", "600s", repo, *dirs],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=REPO_ROOT,
    )  # fmt: skip
    try:
        wait_until(lambda: hub.bytes_served(repo, "weights.bin") > 0, 20, "the job's download under way")
    finally:
        job.kill()
        job.wait(10)
    slow.remove()

    daemon = start_daemon(tmp_path / "models", "--lease", "600s")  # its cache and state dir: the job's
    got = parallel([lambda: read(daemon / repo / "weights.bin")], timeout=60)
    assert got == [data]
    gone = r"the process that was downloading it \(pid \d+ of another pid namespace\) is gone; taking the download over"
    assert re.search(gone, daemon.log())


@requires_fuse
def test_unmount_command(hub: FakeHub, new_repo_id, start_daemon, tmp_path: Path) -> None:
    repo = new_repo_id()
    hub.add_repo(repo, {"config.json": b"{}"})
    mountpoint = tmp_path / "models"

    # A live mount: unmounted, and the daemon notices and exits 0 by itself.
    live = start_daemon(mountpoint)
    assert read(live / repo / "config.json") == b"{}"
    done = run_cli("unmount", str(mountpoint), timeout=30)
    assert done.returncode == 0, done.stderr
    assert "unmounted" in done.stdout
    assert live.proc.wait(10) == 0
    assert not os.path.ismount(mountpoint)

    # Nothing mounted: a clear error.
    done = run_cli("unmount", str(mountpoint), timeout=30)
    assert done.returncode == 1
    assert "not mounted" in done.stderr

    # Busy: refused with a hint, then --lazy detaches it.
    busy = start_daemon(mountpoint)
    with open(busy / repo / "config.json", "rb") as f:
        done = run_cli("unmount", str(mountpoint), timeout=30)
        assert done.returncode == 1
        assert "--lazy" in done.stderr, done.stderr
        assert os.path.ismount(mountpoint)
        done = run_cli("unmount", "--lazy", str(mountpoint), timeout=30)
        assert done.returncode == 0, done.stderr
        assert not os.path.ismount(mountpoint)
        assert f.read() == b"{}"  # an open file keeps working until closed
    assert busy.proc.wait(10) == 0

    # A dead daemon's mount is detached (lazily: nothing else works on it).
    dead = start_daemon(mountpoint)
    dead.proc.kill()
    dead.proc.wait(10)
    assert is_stale(mountpoint)
    done = run_cli("unmount", str(mountpoint), timeout=30)
    assert done.returncode == 0, done.stderr
    assert "stale" in done.stdout
    assert not is_stale(mountpoint) and not os.path.ismount(mountpoint)


def test_unmount_refuses_what_is_not_mxfs(tmp_path: Path) -> None:
    done = run_cli("unmount", "/proc", timeout=30)
    assert done.returncode == 1
    assert "not an mxfs mount" in done.stderr
    done = run_cli("unmount", str(tmp_path), timeout=30)
    assert done.returncode == 1
    assert "not mounted" in done.stderr


# -- allow_other, uid, gid, token_file ----------------------------------------------------------


@requires_fuse
def test_allow_other_lets_other_users_read(hub: FakeHub, new_repo_id, public_dir: Path, start_daemon) -> None:
    repo = new_repo_id()
    hub.add_repo(repo, {"config.json": b'{"x": 1}'})

    private = start_daemon(public_dir / "private")
    assert read(private / repo / "config.json") == b'{"x": 1}'  # root, the daemon's user, may
    denied = as_nobody("cat", str(private / repo / "config.json"))
    assert denied.returncode != 0
    assert "Permission denied" in denied.stderr
    assert private.stop() == 0

    shared = start_daemon(public_dir / "shared", "--allow-other", "--uid", "nobody", "--gid", str(NOBODY))
    allowed = as_nobody("cat", str(shared / repo / "config.json"))
    assert allowed.returncode == 0, allowed.stderr
    assert allowed.stdout == '{"x": 1}'
    listing = as_nobody("ls", str(shared / repo))
    assert listing.stdout.split() == ["config.json"]
    for path in (shared / repo, shared / repo / "config.json"):
        st = os.stat(path)
        assert (st.st_uid, st.st_gid) == (NOBODY, NOBODY)
    assert os.stat(shared / repo / "config.json").st_mode & 0o777 == 0o444
    # Still read-only for everyone.
    refused = as_nobody("sh", "-c", f"echo x > {shared / repo / 'new.txt'}")
    assert refused.returncode != 0


@requires_fuse
def test_token_file_opens_gated_repos_and_never_reaches_the_log(
    hub: FakeHub, new_repo_id, start_daemon, tmp_path: Path
) -> None:
    repo = new_repo_id()
    hub.add_repo(repo, {"config.json": b"{}"}, gated=True)
    token = "hf_" + os.urandom(12).hex()
    hub.valid_tokens.add(token)
    token_file = tmp_path / "hf-token"
    token_file.write_text(token + "\n")
    token_file.chmod(0o644)  # too open: works, with a warning
    mount = start_daemon(tmp_path / "mnt", "--token-file", str(token_file))
    assert read(mount / repo / "config.json") == b"{}"
    assert mount.stop() == 0
    log = mount.log()
    assert re.search(r"token_file .*hf-token is readable by its group or by everyone", log), log
    assert token not in log


# -- the unit file -------------------------------------------------------------------------------

UNIT = REPO_ROOT / "systemd" / "mxfs.service"
INSTALLED_MXFS = "/opt/mxfs/bin/mxfs"


def _unit_settings() -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if line and not line.startswith(("#", "[")) and "=" in line:
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def test_systemd_unit_verifies(tmp_path: Path) -> None:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed (apt install systemd)")
    # verify checks that ExecStart's binary exists: point it at this checkout's mxfs for the check
    # (the unit itself names the README's install path, checked below).
    mxfs = Path(sys.executable).parent / "mxfs"
    if not mxfs.exists():
        pytest.skip(f"no mxfs entry point beside {sys.executable} (pip install -e .)")
    unit = tmp_path / "mxfs.service"
    unit.write_text(UNIT.read_text().replace(INSTALLED_MXFS, str(mxfs)))
    done = subprocess.run([tool, "verify", str(unit)], capture_output=True, text=True, timeout=60, check=False)
    if done.returncode != 0 and re.search(r"Failed to (initialize|connect|set up)|not booted", done.stderr):
        pytest.skip(f"systemd-analyze cannot run here: {done.stderr.strip()}")
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip() == "", done.stderr


def test_systemd_unit_contract() -> None:
    unit = _unit_settings()
    assert unit["Type"] == ["notify"]
    assert unit["NotifyAccess"] == ["main"]
    assert unit["WatchdogSec"] == ["30s"]
    assert unit["Restart"] == ["on-failure"]
    assert unit["ExecStart"] == [f"{INSTALLED_MXFS} mount /models --config /etc/mxfs/mxfs.toml"]
    assert "DeviceAllow" in unit and unit["DeviceAllow"] == ["/dev/fuse rw"]
    assert "CAP_SYS_ADMIN" in unit["CapabilityBoundingSet"][0]
    # Any file-system sandboxing setting puts the service in a mount namespace whose mounts do not
    # propagate to the host: /models would be invisible outside the service.
    for hiding in (
        "PrivateMounts", "ProtectSystem", "ProtectHome", "PrivateTmp", "PrivateDevices", "ReadWritePaths",
        "ReadOnlyPaths", "InaccessiblePaths", "ProtectKernelTunables", "ProtectKernelModules",
        "ProtectKernelLogs", "ProtectControlGroups", "ProtectProc", "BindPaths", "TemporaryFileSystem", "MountFlags",
    ):  # fmt: skip
        assert hiding not in unit, hiding
    readme = (REPO_ROOT / "README.md").read_text()
    assert "/opt/mxfs" in readme  # the install path the unit runs


# -- Kubernetes examples -------------------------------------------------------------------------


def _yaml_documents(path: Path) -> list[dict]:
    yaml = pytest.importorskip("yaml")
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def test_daemonset_example() -> None:
    from mxfs.config import load_settings

    docs = {doc["kind"]: doc for doc in _yaml_documents(REPO_ROOT / "deploy" / "daemonset.yaml")}
    pod = docs["DaemonSet"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["securityContext"]["privileged"] is True
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts["/models"]["mountPropagation"] == "Bidirectional"
    assert "unmount" in " ".join(container["lifecycle"]["preStop"]["exec"]["command"])
    assert "fuse.mxfs" in " ".join(container["readinessProbe"]["exec"]["command"])
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes[mounts["/models"]["name"]]["hostPath"]["path"] == "/models"
    # The ConfigMap's mxfs.toml is a valid config whose token_file is the Secret's mounted file.
    toml_text = docs["ConfigMap"]["data"]["mxfs.toml"]
    with tempfile.NamedTemporaryFile("w", suffix=".toml") as f:
        f.write(toml_text)
        f.flush()
        settings = load_settings(Path(f.name), env={})
    assert settings.token_file is not None
    token_mount = next(m for path, m in mounts.items() if str(settings.token_file).startswith(path))
    secret_volume = volumes[token_mount["name"]]
    assert secret_volume["secret"]["defaultMode"] == 0o400
    assert settings.allow_other is True


@requires_fuse
def test_daemonset_readiness_probe_tells_a_mount_from_a_bare_directory(
    hub: FakeHub, public_dir: Path, start_daemon
) -> None:
    docs = {doc["kind"]: doc for doc in _yaml_documents(REPO_ROOT / "deploy" / "daemonset.yaml")}
    (container,) = docs["DaemonSet"]["spec"]["template"]["spec"]["containers"]
    command = [
        part.replace("/models", str(public_dir / "models")) for part in container["readinessProbe"]["exec"]["command"]
    ]
    (public_dir / "models").mkdir()
    assert subprocess.run(command, capture_output=True, timeout=30, check=False).returncode != 0
    mount = start_daemon(public_dir / "models")
    assert subprocess.run(command, capture_output=True, timeout=30, check=False).returncode == 0
    assert mount.stop() == 0
    assert subprocess.run(command, capture_output=True, timeout=30, check=False).returncode != 0


def test_example_pod() -> None:
    (pod,) = _yaml_documents(REPO_ROOT / "deploy" / "example-pod.yaml")
    spec = pod["spec"]
    (container,) = spec["containers"]
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"].startswith("/models")]
    assert mount["mountPropagation"] == "HostToContainer"
    (volume,) = [v for v in spec["volumes"] if v["name"] == mount["name"]]
    assert volume["hostPath"]["path"] == "/models"


# -- eviction.pinned -----------------------------------------------------------------------------


def _status_rows(dirs: list[str]) -> list[dict]:
    done = run_cli("status", "--json", *dirs, timeout=60)
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()]


@requires_fuse
def test_configured_pins_are_applied_at_startup(hub: FakeHub, new_repo_id, start_daemon, tmp_path: Path) -> None:
    pinned, other = new_repo_id(), new_repo_id()
    for repo in (pinned, other):
        hub.add_repo(repo, {"config.json": b"{}"})
    dirs = ["--config", "/dev/null", "--cache-dir", str(tmp_path / "cache"), "--state-dir", str(tmp_path / "state")]
    for repo in (pinned, other):
        assert run_cli("prefetch", repo, *dirs, env=hub.env()).returncode == 0
    assert not any(row["pinned"] for row in _status_rows(dirs))

    mount = start_daemon(tmp_path / "mnt", env={"MXFS_EVICTION_PINNED": f"{pinned}, someone/not-cached"})
    assert f"{pinned}@" in mount.log() and "pinned (eviction.pinned)" in mount.log()
    assert {row["model"]: row["pinned"] for row in _status_rows(dirs)} == {pinned: True, other: False}
    assert mount.stop() == 0


def test_gc_honours_configured_pins(hub: FakeHub, new_repo_id, tmp_path: Path) -> None:
    pinned, other = new_repo_id(), new_repo_id()
    for repo in (pinned, other):
        hub.add_repo(repo, {"config.json": b"{}"})
    config_file = tmp_path / "mxfs.toml"
    config_file.write_text(f'[eviction]\npinned = ["{pinned}"]\nin_use_grace = "0s"\n')
    dirs = ["--config", str(config_file), "--cache-dir", str(tmp_path / "cache"), "--state-dir", str(tmp_path / "st")]
    for repo in (pinned, other):
        assert run_cli("prefetch", repo, *dirs, env=hub.env()).returncode == 0
    done = run_cli("gc", "--max-models", "0", *dirs)
    assert done.returncode == 0, done.stderr
    assert f"evicted {other}@" in done.stdout
    assert [row["model"] for row in _status_rows(dirs)] == [pinned]


# -- mxfs status and prefetch progress -----------------------------------------------------------


def _record(model: str, commit: str, status: Status, size: int | None, **kw: object) -> Record:
    now = datetime.now(UTC)
    return Record(EntryName(model, commit).key, "HuggingFace", status, now, now, size_bytes=size, **kw)  # type: ignore[arg-type]


def test_status_shows_download_progress_and_errors(tmp_path: Path) -> None:
    state, cache = StateDir(tmp_path / "state"), HubCache(tmp_path / "cache")
    commit = "a" * 40
    files = (HubFile("a.bin", 3 * 2**20, "1" * 40), HubFile("b.bin", 1 * 2**20, "2" * 40))
    state.write_tree(RepoTree("org/big", commit, datetime.now(UTC), files))
    blob = cache.blob_path("org/big", files[0].etag)
    blob.parent.mkdir(parents=True)
    with open(blob, "wb") as f:  # a complete blob (sparse, of the file's size): its file counts in full
        f.truncate(files[0].size)
    state.write_ref("org/big", "main", commit)
    records = [
        _record("org/big", commit, Status.DOWNLOADING, None),
        _record("org/done", "b" * 40, Status.DOWNLOADED, 2**30, pinned=True),
        _record("org/bad", "c" * 40, Status.ERROR, None, message="checksum mismatch"),
    ]
    # org/done is handed to the kernel (a bind of its view over its model directory).
    handed_off = {"org/done": ["/models/org/done"]}
    rows = [
        cli._status_row(
            r,
            state.refs_by_commit(EntryName.parse(r.model_name).repo_id),
            cli._download_progress(state, cache, r),
            handed_off.get(EntryName.parse(r.model_name).repo_id, []),
        )
        for r in records
    ]
    assert rows[0]["downloaded_bytes"] == 3 * 2**20 and rows[0]["size_bytes"] == 4 * 2**20
    assert rows[0]["revision"] == "main"
    assert rows[1]["downloaded_bytes"] == rows[1]["size_bytes"] == 2**30
    assert rows[2]["downloaded_bytes"] is None
    for row in rows:  # the keys scripts rely on (DESIGN section 11)
        assert {"model", "revision", "commit", "status", "size_bytes", "last_used_at", "pinned"} <= row.keys()
    table = "\n".join(cli._status_table(rows, records))
    assert "DOWNLOADING 75%" in table
    assert "3.0 MiB / 4.0 MiB" in table
    assert re.search(r"org/done +b{12} +DOWNLOADED +1\.0 GiB +\S+ ago +yes +yes$", table, re.MULTILINE), table
    assert re.search(r"org/big +main +DOWNLOADING 75% +.* ago$", table, re.MULTILINE), table  # neither
    assert "org/bad@" in table and "checksum mismatch" in table


async def test_prefetch_progress_is_a_bar_on_a_terminal_and_log_lines_elsewhere(
    capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    bar = cli.ProgressReport("org/name", tty=True)
    bar.update(2**20, 4 * 2**20)
    bar.update(4 * 2**20, 4 * 2**20)
    bar.close()
    err = capsys.readouterr().err
    assert err.startswith("\rorg/name [")
    assert " 25.0% " in err and "100.0%" in err
    assert err.endswith("\n") and err.count("\n") == 1
    with caplog.at_level(logging.INFO, logger="mxfs"):
        plain = cli.ProgressReport("org/name", tty=False)
        plain.update(2**20, 4 * 2**20)
        plain.close()
    assert capsys.readouterr().err == ""
    assert "org/name: 25.0% (1.0 MiB of 4.0 MiB" in caplog.text
    assert plain.interval >= 1.0  # not a line every 0.2 s in a log file
