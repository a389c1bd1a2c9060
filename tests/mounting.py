"""Helpers for tests that run real mxfs mounts in subprocesses."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from huggingface_hub import HFCacheInfo, scan_cache_dir

REPO_ROOT = Path(__file__).resolve().parent.parent

requires_fuse = pytest.mark.skipif(
    not os.path.exists("/dev/fuse") or shutil.which("fusermount3") is None,
    reason="needs /dev/fuse and fusermount3 (apt install fuse3)",
)

# Log lines that mean a bug, whatever the test was doing.
_BAD_LOG = re.compile(r"Traceback|unexpected error|CRITICAL")


@dataclass
class MountedFs:
    mountpoint: Path
    cache_dir: Path
    state_dir: Path
    proc: subprocess.Popen[bytes]
    log_path: Path
    allowed_log: list[str] = field(default_factory=list)

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
        lines = []
        for line in self.log().splitlines():
            if _BAD_LOG.search(line) and not any(a in line for a in self.allowed_log):
                lines.append(line)
        return lines


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


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run ``mxfs <args>`` as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "mxfs", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
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
