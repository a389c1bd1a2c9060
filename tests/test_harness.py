"""The harness the mount tests stand on: the daemon-log check (``tests.mounting.bad_log_lines``)
and the settings file every test's mxfs runs with.

A log check that lets everything through, or a test daemon that reads the host's
``/etc/mxfs/mxfs.toml``, would make the mount tests pass whatever mxfs does.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from tests.hubserver import FakeHub
from tests.mounting import NO_CONFIG_FILE, AllowedLog, bad_log_lines, requires_fuse, run_cli

T = "2026-01-02 03:04:05,678"


def line(level: str, message: str, logger: str = "mxfs.fetch.fetcher") -> str:
    """One record as the daemon writes it (mxfs.cli.setup_logging)."""
    return f"{T} {level} {logger}: {message}"


@pytest.mark.parametrize("pattern", ["", " ", "\t\n", ".*", "a?", "(x)*", "^", "$", "|x", re.compile("")])
def test_a_pattern_that_would_allow_every_line_is_refused_at_once(pattern: str | re.Pattern[str]) -> None:
    allowed = AllowedLog()
    with pytest.raises(ValueError, match="matches every line"):
        allowed.append(pattern)
    with pytest.raises(ValueError, match="matches every line"):
        allowed.extend(["resuming in", pattern])
    with pytest.raises(ValueError, match="matches every line"):
        allowed += [pattern]
    with pytest.raises(ValueError, match="matches every line"):
        allowed.insert(0, pattern)
    with pytest.raises(ValueError, match="matches every line"):
        AllowedLog([pattern])
    assert [p.pattern for p in allowed] == ["resuming in"]  # what extend took before the bad one
    with pytest.raises(TypeError):
        allowed[0] = pattern  # type: ignore[call-overload]


def test_warnings_and_errors_fail_unless_their_message_is_allowed() -> None:
    warning = line("WARNING", "t1/m@abc/model.bin: HTTP 503; resuming in 0.5s", "mxfs.fetch.download")
    error = line("ERROR", "t1/m@abc: download failed: t1/m@abc/model.bin: no space left in the cache")
    quiet = [line("DEBUG", "could not set max_background"), line("INFO", "mounted at /mnt")]
    log = "\n".join([*quiet, warning, error])
    assert bad_log_lines(log, AllowedLog()) == [warning, error]
    assert bad_log_lines(log, AllowedLog([r"HTTP 503; resuming in [\d.]+s$"])) == [error]
    assert bad_log_lines(log, AllowedLog([r"HTTP 503; resuming", "no space left in the cache$"])) == []
    # Patterns are matched against the message, not the level, the logger or the time.
    for not_the_message in ("WARNING", "ERROR", "mxfs.fetch", "03:04:05", r"^\d{4}-"):
        assert bad_log_lines(log, AllowedLog([not_the_message])) == [warning, error], not_the_message
    # Any logger: a library's warning counts as much as mxfs's own.
    httpx = line("WARNING", "connection pool is full", "httpx2")
    assert bad_log_lines(httpx, AllowedLog(["HTTP 503"])) == [httpx]
    # A Python warning printed to stderr is a warning too.
    py = "/usr/lib/python3/x.py:12: DeprecationWarning: datetime.utcnow() is deprecated"
    assert bad_log_lines(py, AllowedLog()) == [py]
    assert bad_log_lines(py, AllowedLog([r"utcnow\(\) is deprecated$"])) == []


def test_tracebacks_unexpected_errors_and_critical_lines_fail_whatever_is_allowed() -> None:
    unexpected = line("ERROR", "unexpected error in read; answering EIO", "mxfs.fs")
    traceback = "Traceback (most recent call last):"
    critical = line("CRITICAL", "the cache directory is gone", "mxfs.daemon")
    log = "\n".join(
        [
            unexpected,
            traceback,
            '  File "/work/main/mxfs/fs.py", line 68, in wrapper',  # continuation lines of a record
            "RuntimeError: Nursery is closed to new arrivals",
            critical,
        ]
    )
    everything = AllowedLog(["unexpected error", "Traceback", "the cache directory is gone", "Nursery", "File"])
    assert bad_log_lines(log, everything) == [unexpected, traceback, critical]
    # Also when they are not at the start of a line, or inside an allowed warning.
    hidden = line("WARNING", "retrying after an unexpected error: Traceback follows")
    assert bad_log_lines(hidden, AllowedLog(["retrying after"])) == [hidden]


def test_run_cli_reads_no_host_settings_file_unless_the_test_names_one(tmp_path: Path) -> None:
    dirs = ["--state-dir", str(tmp_path / "state"), "--cache-dir", str(tmp_path / "cache")]
    done = run_cli("status", "--print-config", *dirs)
    assert done.returncode == 0, done.stderr
    assert f"# config file: {NO_CONFIG_FILE}\n" in done.stdout
    own = tmp_path / "own.toml"
    own.write_text('revision = "v7"\n')
    done = run_cli("status", "--print-config", *dirs, env={"MXFS_CONFIG": str(own)})
    assert done.returncode == 0, done.stderr
    assert f"# config file: {own}\n" in done.stdout
    assert 'revision = "v7"' in done.stdout


@requires_fuse
def test_test_daemons_read_no_host_settings_file(
    hub: FakeHub, mxfs_mount, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whatever settings file the host has (here: one the environment points to, that would stop
    the daemon), the fixture's daemons run with an empty one, unless a test passes its own."""
    host = tmp_path / "host-mxfs.toml"
    host.write_text('verify = "never"\n')  # not a valid value: a daemon that reads it exits
    monkeypatch.setenv("MXFS_CONFIG", str(host))
    mount = mxfs_mount()
    environ = Path(f"/proc/{mount.proc.pid}/environ").read_bytes().split(b"\0")
    (config,) = [v.split(b"=", 1)[1].decode() for v in environ if v.startswith(b"MXFS_CONFIG=")]
    assert config != str(host)
    assert os.path.isfile(config) and os.path.getsize(config) == 0
    assert mount.stop() == 0
    # A test that names its own file gets it.
    own = tmp_path / "own.toml"
    own.write_text('verify = "strict"\n')
    strict = mxfs_mount(env={"MXFS_CONFIG": str(own)})
    environ = Path(f"/proc/{strict.proc.pid}/environ").read_bytes().split(b"\0")
    assert f"MXFS_CONFIG={own}".encode() in environ
