"""Fixtures: a Hub look-alike on loopback, and real mxfs mounts in subprocesses.

Mount tests run ``python -m mxfs mount`` in a subprocess against :class:`FakeHub` and use the
mount through plain ``open()``/``os.listdir()``/``os.stat()``.  Every mount is torn down even
when its test fails (SIGTERM, then a lazy unmount, then SIGKILL), and the daemon's log is
checked afterwards, like S3QL's checklogs: a traceback, an "unexpected error" or a CRITICAL line
fails the test that caused it, and so does any WARNING or ERROR line the test did not allow by its
message (``mount.allowed_log``, see ``tests.mounting.bad_log_lines``).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.hubserver import FakeHub
from tests.mounting import REPO_ROOT, AllowedLog, MountedFs, wait_for_mount
from tests.redis_server import make_redis_server, redis_server  # noqa: F401

# Messages that tests in other files expect their daemons to log at WARNING or ERROR level, by
# test.  They belong beside those tests, as ``@pytest.mark.allow_log(...)`` (or
# ``mount.allowed_log``); they are kept here until those files carry them themselves.
VANISHED = r"^\S+: [\w./-]+ vanished from the cache; fetching it again$"
_EXPECTED_ELSEWHERE: dict[str, tuple[str, ...]] = {
    # Models this daemon evicted itself (max_models, `mxfs evict`) are read again.
    "test_evict_mount.py::test_lru_order_with_max_models_and_re_download": (VANISHED,),
    "test_evict_mount.py::test_evict_command_and_gc_dry_run": (VANISHED,),
    "test_metrics.py::test_mount_fails_cleanly_when_the_metrics_port_is_taken": (
        r"^metrics: cannot listen on 127\.0\.0\.1:\d+: Address already in use \(metrics_address = '' turns",
    ),
    # The API-server stand-in speaks plain http.
    "test_registry_kubernetes.py::test_mount_serves_a_model_through_the_kubernetes_registry": (
        r"sending a bearer token over plain http to http://127\.0\.0\.1:\d+$",
    ),
    "test_service.py::test_restart_after_kill_9_on_the_same_mountpoint": (
        r": stale mount left by a crashed daemon; unmounting it$",
    ),
    # The test's token file is 0644.
    "test_service.py::test_token_file_opens_gated_repos_and_never_reaches_the_log": (
        r"^token_file \S+ is readable by its group or by everyone \(mode 0644\); chmod 600 it$",
    ),
}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "allow_log(*patterns): WARNING/ERROR messages (regexes) every daemon the test starts may log;"
        " see tests.mounting.bad_log_lines",
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        patterns = _EXPECTED_ELSEWHERE.get(f"{item.path.name}::{item.name.split('[')[0]}")
        if patterns:
            item.add_marker(pytest.mark.allow_log(*patterns))


_DAEMONS = pytest.StashKey[list[MountedFs]]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """A failed test's report carries the tails of its daemons' logs, so that a failure in CI
    shows what the daemons were doing (added here, not at teardown: pytest-xdist sends the report
    on as soon as it is made)."""
    report = yield
    if report.when == "call" and report.failed:
        for mount in item.stash.get(_DAEMONS, []):
            report.sections.append((f"daemon log {mount.log_path} (tail)", mount.log()[-8000:]))
    return report


@pytest.fixture(scope="session")
def hub_server() -> Iterator[FakeHub]:
    with FakeHub() as hub:
        yield hub


@pytest.fixture
def hub(hub_server: FakeHub) -> Iterator[FakeHub]:
    """The session's Hub, with a clean request log and no faults for each test."""
    hub_server.clear_faults()
    hub_server.reset_log()
    hub_server.valid_tokens.clear()
    yield hub_server
    hub_server.clear_faults()
    assert not hub_server.server_errors, hub_server.server_errors


_repo_numbers = itertools.count()


@pytest.fixture
def new_repo_id(request: pytest.FixtureRequest) -> Callable[[], str]:
    """Unique repo ids per test, so tests sharing the session's Hub never see each other's commits."""
    base = re.sub(r"[^A-Za-z0-9]+", "-", request.node.name).strip("-")[:60]

    def make() -> str:
        return f"t{next(_repo_numbers)}/{base}"

    return make


@pytest.fixture
def mxfs_mount(tmp_path: Path, hub: FakeHub, request: pytest.FixtureRequest) -> Iterator[Callable[..., MountedFs]]:
    """Start ``mxfs mount`` in a subprocess; returns a factory so a test can run several daemons.

    Each daemon's log is checked when the test ends (``tests.mounting.bad_log_lines``); the
    messages a test expects go in ``mount.allowed_log`` or ``@pytest.mark.allow_log(...)``.
    """
    mounts: list[MountedFs] = []
    request.node.stash[_DAEMONS] = mounts
    marked = [p for marker in request.node.iter_markers("allow_log") for p in marker.args]
    numbers = itertools.count()

    def start(
        *args: str,
        mountpoint: Path | None = None,
        cache_dir: Path | None = None,
        state_dir: Path | None = None,
        env: dict[str, str] | None = None,
        wait: bool = True,
        wrap: tuple[str, ...] = (),
    ) -> MountedFs:
        """``wrap``: a command the daemon runs under (``unshare --pid ...``: a node of its own)."""
        n = next(numbers)
        mountpoint = mountpoint or tmp_path / f"mnt{n}"
        # Not mkdir(exist_ok=True): its stat of a killed daemon's mount fails with ENOTCONN once
        # the kernel's cached attributes of the root expire (a restart on it is what some tests do).
        with contextlib.suppress(FileExistsError):
            mountpoint.mkdir()
        cache_dir = cache_dir or tmp_path / "cache"
        state_dir = state_dir or tmp_path / f"state{n}"
        log_path = tmp_path / f"mxfs{n}.log"
        # Metrics off unless a test asks (--metrics-address): daemons of one test, or of tests run
        # side by side, would all want the default port.  systemd's variables only where a test
        # sets them: the daemon must not notify whatever runs the tests.
        base = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")}
        # An empty settings file: the host's /etc/mxfs/mxfs.toml must not change a test's daemon.
        no_config = tmp_path / "empty-mxfs.toml"
        no_config.touch()
        full_env = {
            **base,
            **hub.env(),
            "PYTHONUNBUFFERED": "1",
            "MXFS_METRICS_ADDRESS": "",
            "MXFS_CONFIG": str(no_config),
            **(env or {}),
        }
        cmd = [
            *wrap, sys.executable, "-m", "mxfs", "mount", str(mountpoint),
            "--cache-dir", str(cache_dir), "--state-dir", str(state_dir), "--log-level", "debug", *args,
        ]  # fmt: skip
        with open(log_path, "wb") as log_file:
            proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=full_env, cwd=REPO_ROOT)
        mount = MountedFs(mountpoint, cache_dir, state_dir, proc, log_path, AllowedLog(marked))
        mounts.append(mount)
        if wait:
            wait_for_mount(mount)
        return mount

    yield start

    problems = []
    for mount in mounts:
        mount.cleanup()
        problems += mount.bad_log_lines()
    if problems:
        logs = "\n\n".join(m.log()[-5000:] for m in mounts)
        pytest.fail("daemon logged errors:\n" + "\n".join(problems) + "\n\nlog tail:\n" + logs)


@pytest.fixture
def small_tmpfs(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Path]:
    """A 24 MiB tmpfs for the cache: a disk that really fills up, with a real statvfs.

    Its daemons stop before it goes, whichever fixture the test named first: a daemon whose
    cache disappeared under it would log errors that are the fixture's, not the code's."""
    where = tmp_path / "tmpfs"
    where.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(where)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield where
    finally:
        for mount in request.node.stash.get(_DAEMONS, []):
            if mount.cache_dir.is_relative_to(where):
                mount.cleanup()
        subprocess.run(["umount", "-l", str(where)], capture_output=True, check=False)
