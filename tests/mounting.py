"""Helpers for tests that run real mxfs mounts in subprocesses."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import SupportsIndex

import pytest
from huggingface_hub import HFCacheInfo, scan_cache_dir

REPO_ROOT = Path(__file__).resolve().parent.parent

requires_fuse = pytest.mark.skipif(
    not os.path.exists("/dev/fuse") or shutil.which("fusermount3") is None,
    reason="needs /dev/fuse and fusermount3 (apt install fuse3)",
)

# Log lines that mean a bug, whatever the test was doing and whatever it allows.
_BAD_LOG = re.compile(r"Traceback|unexpected error|CRITICAL")
# One record of the daemon's log, as mxfs.cli.setup_logging writes it:
# "2026-01-02 03:04:05,678 WARNING mxfs.fetch.fetcher: message".
_LOG_RECORD = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (?P<level>[A-Z]+) (?P<logger>\S+): (?P<message>.*)$")
# A Python warning printed to stderr ("path.py:12: DeprecationWarning: message").
_PY_WARNING = re.compile(r"^\S.*:\d+: (?P<level>\w*Warning): (?P<message>.*)$")
# Levels that fail a test unless the test allows that exact message.
_CHECKED_LEVELS = frozenset({"WARNING", "ERROR"})


def _allowed_pattern(pattern: str | re.Pattern[str]) -> re.Pattern[str]:
    """A pattern for :class:`AllowedLog`: a regex (``re.search`` on the message) that names a
    specific message.  One that is empty, only whitespace, or matches an empty message would
    allow every line, so it is refused at once."""
    compiled = pattern if isinstance(pattern, re.Pattern) else re.compile(pattern)
    if not compiled.pattern.strip() or compiled.search("") or compiled.search(" "):
        raise ValueError(f"allowed log pattern {compiled.pattern!r} matches every line; name a specific message")
    return compiled


class AllowedLog(list[re.Pattern[str]]):
    """The log messages a test expects at WARNING or ERROR level (regexes, ``re.search`` on the
    message text).  Every pattern is checked as it is added: see :func:`_allowed_pattern`."""

    def __init__(self, patterns: Iterable[str | re.Pattern[str]] = ()) -> None:
        super().__init__(_allowed_pattern(p) for p in patterns)

    def append(self, pattern: str | re.Pattern[str]) -> None:  # type: ignore[override]
        super().append(_allowed_pattern(pattern))

    def extend(self, patterns: Iterable[str | re.Pattern[str]]) -> None:  # type: ignore[override]
        super().extend(_allowed_pattern(p) for p in patterns)

    def __iadd__(self, patterns: Iterable[str | re.Pattern[str]]) -> AllowedLog:  # type: ignore[override]
        self.extend(patterns)
        return self

    def insert(self, index: SupportsIndex, pattern: str | re.Pattern[str]) -> None:  # type: ignore[override]
        super().insert(index, _allowed_pattern(pattern))

    def __setitem__(self, index: object, value: object) -> None:
        raise TypeError("AllowedLog: use append or extend")

    def allows(self, message: str) -> bool:
        return any(p.search(message) for p in self)


def bad_log_lines(log: str, allowed: AllowedLog) -> list[str]:
    """The lines of a daemon log that fail a test, like S3QL's checklogs.

    A traceback, an "unexpected error" or a CRITICAL line always fails, whatever is allowed.  A
    WARNING or ERROR record (from any logger) and a Python warning fail unless their message
    matches one of ``allowed``.  Other lines (DEBUG and INFO records, and the lines that continue
    a record) pass.
    """
    bad = []
    for line in log.splitlines():
        if _BAD_LOG.search(line):
            bad.append(line)
            continue
        record = _LOG_RECORD.match(line) or _PY_WARNING.match(line)
        if record is None:
            continue
        level = record["level"]
        if (level in _CHECKED_LEVELS or level.endswith("Warning")) and not allowed.allows(record["message"]):
            bad.append(line)
    return bad


@dataclass
class MountedFs:
    mountpoint: Path
    cache_dir: Path
    state_dir: Path
    proc: subprocess.Popen[bytes]
    log_path: Path
    allowed_log: AllowedLog = field(default_factory=AllowedLog)

    def __truediv__(self, rel: str) -> Path:
        return self.mountpoint / rel

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM and wait: the daemon must unmount and exit 0 by itself."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def cleanup(self) -> None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.stop()
        if os.path.ismount(self.mountpoint) or _is_stale(self.mountpoint):
            subprocess.run(["fusermount3", "-u", "-z", str(self.mountpoint)], capture_output=True, check=False)
        self.kill()

    def bad_log_lines(self) -> list[str]:
        return bad_log_lines(self.log(), self.allowed_log)


def _is_stale(path: Path) -> bool:
    try:
        os.stat(path)
    except OSError as exc:
        return exc.errno == 107  # ENOTCONN
    return False


def wait_for_mount(mount: MountedFs, timeout: float = 20.0) -> None:
    """Until the daemon has mounted: the mount point is a mount and the daemon says so (a dead
    mount left on the mount point by an earlier daemon also looks mounted)."""
    deadline = time.monotonic() + timeout
    while not (os.path.ismount(mount.mountpoint) and "mounted at" in mount.log()):
        if mount.proc.poll() is not None:
            raise AssertionError(f"mxfs exited with {mount.proc.returncode} before mounting:\n{mount.log()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"mxfs did not mount within {timeout}s:\n{mount.log()}")
        time.sleep(0.05)


# The settings file of every mxfs a test starts, unless the test names its own: an empty one, so
# that the host's /etc/mxfs/mxfs.toml (mxfs's default) never changes what a test sees.
NO_CONFIG_FILE = "/dev/null"


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run ``mxfs <args>`` as a user would (with no settings file: see ``NO_CONFIG_FILE``)."""
    return subprocess.run(
        [sys.executable, "-m", "mxfs", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "MXFS_CONFIG": NO_CONFIG_FILE, **(env or {})},
        cwd=REPO_ROOT,
        timeout=timeout,
        check=False,
    )


def wait_until(predicate: Callable[[], bool], timeout: float = 20.0, what: str = "condition") -> None:
    """Poll ``predicate`` until it holds; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not reached within {timeout}s: {what}")
        time.sleep(0.05)


def partial_files(root: Path) -> list[str]:
    """Names of the ``*.incomplete`` download files left under ``root``.

    os.walk skips directories that vanish mid-walk (the evictor deletes whole repo folders
    while a test looks), where ``Path.rglob`` raises FileNotFoundError.
    """
    return [name for _, _, names in os.walk(root) for name in names if name.endswith(".incomplete")]


def settled_scan(cache_dir: Path, timeout: float = 5.0) -> HFCacheInfo:
    """``huggingface_hub.scan_cache_dir`` that tolerates the evictor working at the same time.

    A folder deleted mid-scan raises FileNotFoundError or shows up as a warning for an instant;
    scan again until a scan is clean or ``timeout`` passes, then return the last one.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            info = scan_cache_dir(cache_dir)
        except FileNotFoundError:
            if time.monotonic() > deadline:
                raise
        else:
            if not info.warnings or time.monotonic() > deadline:
                return info
        time.sleep(0.05)


def read(path: Path) -> bytes:
    """The whole file, through plain ``open()``."""
    with open(path, "rb") as f:
        return f.read()


def read_or_eio(path: Path) -> bytes | str:
    """The file's bytes, or "EIO": a handle served bytes of a copy that is abandoned unverified
    (its owner died or lost its lease) fails (issue 16: readers on other nodes read the owner's
    partial files as they land)."""
    try:
        return read(path)
    except OSError as exc:
        if exc.errno != errno.EIO:
            raise
        return "EIO"


def parallel(fns: list[Callable[[], object]], timeout: float = 120) -> list[object]:
    """Run ``fns`` at once, a thread each; their results (or the exceptions they raised), in order."""
    results: list[object] = [None] * len(fns)

    def run(i: int) -> None:
        try:
            results[i] = fns[i]()
        except BaseException as exc:
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(fns))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    assert not any(t.is_alive() for t in threads), "a reader hung"
    return results
