"""open_registry's URL handling, redact_url, and what is particular to the SQLite backend.

The behaviour every backend shares is in test_registry_conformance.py.
"""

from __future__ import annotations

import sqlite3
import stat
from datetime import timedelta
from pathlib import Path
from urllib.parse import quote

import pytest

from mxfs.names import EntryName
from mxfs.registry import Claimed, RegistryError, Status, open_registry, redact_url

NAME = EntryName("org/model", "0" * 40).key


@pytest.mark.parametrize(
    ("url", "redacted"),
    [
        ("redis://:secret@h:6379/0", "redis://:***@h:6379/0"),
        ("redis://user:secret@h/0", "redis://user:***@h/0"),
        ("rediss://user:p%40ss:w@h:6380/1", "rediss://user:***@h:6380/1"),
        ("redis://user@h/0", "redis://user@h/0"),
        ("redis://h:6379/0", "redis://h:6379/0"),
        ("redis://h/0?password=secret&db=1", "redis://h/0?password=***&db=1"),
        ("sqlite:///var/cache/mxfs-state/registry.db", "sqlite:///var/cache/mxfs-state/registry.db"),
        ("kubernetes://mxfs", "kubernetes://mxfs"),
        ("redis://:secret@[::1", "<unparsable URL>"),
    ],
)
def test_redact_url(url: str, redacted: str) -> None:
    assert redact_url(url) == redacted


async def test_unknown_scheme_names_it_and_the_supported_ones() -> None:
    with pytest.raises(ValueError, match=r"'mysql'.*supported schemes: sqlite") as raised:
        await open_registry("mysql://root:hunter2@db/mxfs")
    assert "hunter2" not in str(raised.value)


async def test_url_without_scheme_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no scheme"):
        await open_registry(str(tmp_path / "registry.db"))


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("sqlite:registry.db", "relative"),
        ("sqlite://var/cache/registry.db", "host"),
        ("sqlite://", "names no database"),
        ("sqlite:", "names no database"),
        ("sqlite:///", "directory"),
        ("sqlite:///var/cache/", "directory"),
        ("sqlite:///var/cache/registry.db?mode=ro", "query"),
    ],
)
async def test_bad_sqlite_urls_are_rejected(url: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        await open_registry(url)


async def test_sqlite_creates_private_file_and_parents_and_reopens(tmp_path: Path) -> None:
    path = tmp_path / "state dir" / "nested" / "registry.db"
    url = "sqlite://" + quote(str(path))
    registry = await open_registry(url)
    try:
        assert registry.url_for_logs == f"sqlite://{path}"
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        await registry.set_status(NAME, Status.DOWNLOADED)
    finally:
        await registry.aclose()

    # Opening again keeps the schema and the data.
    registry = await open_registry(url)
    try:
        assert await registry.get_status(NAME) is Status.DOWNLOADED
    finally:
        await registry.aclose()


async def test_sqlite_refuses_a_newer_schema(tmp_path: Path) -> None:
    path = tmp_path / "registry.db"
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA user_version = 99")
    conn.close()
    with pytest.raises(RegistryError, match="schema version 99"):
        await open_registry(f"sqlite://{path}")


@pytest.mark.parametrize("what", ["not a database", "parent is a file"])
async def test_sqlite_open_failures_are_registry_errors(tmp_path: Path, what: str) -> None:
    path = tmp_path / "registry.db"
    if what == "not a database":
        path.write_bytes(b"this is not a database, just some text long enough to be read" * 20)
    else:
        (tmp_path / "file").write_text("")
        path = tmp_path / "file" / "registry.db"
    with pytest.raises(RegistryError):
        await open_registry(f"sqlite://{path}")


async def test_sqlite_closed_registry_raises_registry_error(tmp_path: Path) -> None:
    registry = await open_registry(f"sqlite://{tmp_path}/registry.db")
    await registry.aclose()
    await registry.aclose()
    with pytest.raises(RegistryError, match="closed"):
        await registry.get_status(NAME)


async def test_sqlite_rejects_bad_arguments(tmp_path: Path) -> None:
    registry = await open_registry(f"sqlite://{tmp_path}/registry.db")
    try:
        for lease in (0.0, -1.0, float("nan"), float("inf")):
            with pytest.raises(ValueError, match="lease"):
                await registry.try_claim(NAME, "owner", lease)
        assert await registry.get_record(NAME) is None

        assert await registry.try_claim(NAME, "owner", 30.0) == Claimed()
        with pytest.raises(ValueError, match="DOWNLOADED or ERROR"):
            await registry.finish_claim(NAME, "owner", Status.DOWNLOADING)

        record = await registry.get_record(NAME)
        assert record is not None
        with pytest.raises(ValueError, match="naive"):
            await registry.delete_if_unchanged(NAME, record.status, record.last_used_at.replace(tzinfo=None))
        # Finer than the stored milliseconds: cannot be what a listing returned, so never equal.
        finer = record.last_used_at + timedelta(microseconds=1)
        assert not await registry.delete_if_unchanged(NAME, record.status, finer)
        assert await registry.delete_if_unchanged(NAME, record.status, record.last_used_at)
    finally:
        await registry.aclose()
