"""Secrets and permissions: the Hub token and registry passwords never reach a log or a command's
output, the cache cannot be written through the mount, and what mxfs creates on disk is never
writable by other users, whatever umask the daemon was started with."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import stat
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import quote

import pytest

from mxfs.config import Settings
from tests.hubserver import FakeHub
from tests.mounting import MountedFs, requires_fuse, run_cli, wait_until
from tests.redis_server import RedisServer

pytestmark = requires_fuse

TOKEN = "hf_TopSecretToken_4b1d2f0c9e8a7b6c"
# Characters a URL must escape, so that both spellings of the password are looked for.
PASSWORD = "pa55:w0rd/with@odd&chars"


def secret_spellings(*secrets: str) -> list[str]:
    spellings = []
    for secret in secrets:
        spellings += [secret, quote(secret, safe=""), quote(secret)]
    return sorted(set(spellings))


def assert_no_secret(text: str, secrets: list[str], where: str) -> None:
    for secret in secrets:
        assert secret not in text, f"{where} shows a secret ({secret[:4]}...)"


def read(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def wait_downloaded(mount: MountedFs, repo: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while os.getxattr(mount / repo, "user.mxfs.status") != b"downloaded":
        assert time.monotonic() < deadline, f"{repo} not downloaded within {timeout}s"
        time.sleep(0.05)


def test_token_and_registry_password_never_logged_or_printed(
    hub: FakeHub, new_repo_id, mxfs_mount, make_redis_server: Callable[..., RedisServer], tmp_path: Path
) -> None:
    server = make_redis_server(password=PASSWORD)
    url = server.url()
    secrets = secret_spellings(TOKEN, PASSWORD)
    gated, public = new_repo_id(), new_repo_id()
    hub.add_repo(gated, {"config.json": b'{"gated": 1}', "model.safetensors": b"g" * 200_000}, gated=True)
    hub.add_repo(public, {"config.json": b'{"public": 1}'})
    hub.valid_tokens.add(TOKEN)
    # Failures whose messages carry URLs and headers: a retried 503, a missing repo.
    hub.inject("error", status=503, repo_id=gated, filename="model.safetensors", times=1)
    mount = mxfs_mount(
        "--registry", url, cache_dir=tmp_path / "cache", env={"HF_TOKEN": TOKEN, "HF_HUB_DISABLE_IMPLICIT_TOKEN": "0"}
    )
    mount.allowed_log.extend(
        [
            # The injected 503, retried.
            re.escape(gated) + r"@\w+/model\.safetensors: HTTP 503; resuming in [\d.]+s$",
            # The registry gone: the listing falls back to the cache, with a warning that names the
            # registry (without its password: see below).
            r"^listing shows the local cache only: registry unavailable: registry redis://:\*\*\*@127\.0\.0\.1:\d+/0: ",
        ]
    )
    assert read(mount / gated / "model.safetensors") == b"g" * 200_000
    assert read(mount / public / "config.json") == b'{"public": 1}'
    with pytest.raises(FileNotFoundError):
        os.listdir(mount / "nobody" / "nothing-here")
    wait_downloaded(mount, gated)
    # The token went to the Hub (that is how the gated file was read).
    assert {r.auth for r in hub.requests(kind="resolve", repo_id=gated)} == {TOKEN}

    dirs = ["--cache-dir", str(tmp_path / "cache"), "--state-dir", str(mount.state_dir)]
    outputs = {
        "status": run_cli("status", "--registry", url, *dirs),
        "status --json": run_cli("status", "--json", "--registry", url, *dirs, "--log-level", "debug"),
        "--print-config": run_cli("status", "--print-config", "--registry", url, *dirs),
        "MXFS_REGISTRY --print-config": run_cli("status", "--print-config", *dirs, env={"MXFS_REGISTRY": url}),
        "wrong password": run_cli("status", "--registry", server.url(password="not-" + PASSWORD), *dirs),
    }
    assert outputs["status"].returncode == 0, outputs["status"].stderr
    assert gated in outputs["status"].stdout
    assert outputs["wrong password"].returncode != 0

    # The registry goes away: every message about it names it, without its password.
    server.stop()
    with contextlib.suppress(OSError):
        os.listdir(mount.mountpoint)  # lists the local cache only, with a warning
    assert read(mount / public / "config.json") == b'{"public": 1}'  # touching the entry fails, logged
    outputs["registry down"] = run_cli("status", "--registry", url, *dirs)
    assert outputs["registry down"].returncode != 0
    server.start()
    assert mount.stop() == 0

    assert_no_secret(mount.log(), secrets, "the daemon log")
    assert f":***@127.0.0.1:{server.port}" in mount.log()  # the URL is logged, redacted
    for name, done in outputs.items():
        assert_no_secret(done.stdout + done.stderr, secrets, f"mxfs {name}")
    assert "***" in outputs["--print-config"].stdout
    assert "registry" in outputs["registry down"].stderr


@pytest.mark.skipif(
    "token_file" not in {f.name for f in dataclasses.fields(Settings)}, reason="this mxfs has no token_file setting"
)
def test_token_file_is_sent_to_the_hub_and_never_logged(hub: FakeHub, new_repo_id, mxfs_mount, tmp_path: Path) -> None:
    repo = new_repo_id()
    hub.add_repo(repo, {"config.json": b'{"token": "file"}', "model.safetensors": b"t" * 100_000}, gated=True)
    hub.valid_tokens.add(TOKEN)
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    # HF_TOKEN is not set (the fixture's environment disables huggingface_hub's implicit token):
    # the token can come from the file only.
    mount = mxfs_mount("--token-file", str(token_file))
    assert read(mount / repo / "model.safetensors") == b"t" * 100_000
    assert {r.auth for r in hub.requests(kind="resolve", repo_id=repo)} == {TOKEN}
    assert all(r.auth is None for r in hub.requests(kind="cdn"))
    assert "readable by" not in mount.log()
    assert mount.stop() == 0
    assert_no_secret(mount.log(), secret_spellings(TOKEN), "the daemon log")

    # A token file others can read still works, with a warning that says what to do.
    token_file.chmod(0o644)
    loose = mxfs_mount("--token-file", str(token_file))
    loose.allowed_log.append(
        rf"^token_file {re.escape(str(token_file))} is readable by its group or by everyone \(mode 0644\); chmod 600"
    )
    assert read(loose / repo / "config.json") == b'{"token": "file"}'
    assert loose.stop() == 0
    assert "chmod 600" in loose.log()
    assert_no_secret(loose.log(), secret_spellings(TOKEN), "the daemon log")


@contextlib.contextmanager
def umask(mask: int) -> Iterator[None]:
    """The daemon inherits the umask of the process that starts it."""
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def test_what_mxfs_creates_is_never_writable_by_others(hub: FakeHub, new_repo_id, mxfs_mount) -> None:
    """Started with umask 0000 (a container, a careless shell), mxfs still creates folders 0755
    and files 0644 at most: a blob anyone could write would be served to every reader.  Its own
    state (the registry above all) is for the daemon alone."""
    repo = new_repo_id()
    files = {"config.json": b'{"perm": 1}', "sub/dir/tokenizer.json": b"{}" * 500, "model.safetensors": b"p" * 300_000}
    hub.add_repo(repo, files, tags=["v1"])
    with umask(0):
        mount = mxfs_mount()
    org, name = repo.split("/")
    for rel, data in files.items():
        assert read(mount / repo / rel) == data
    assert read(mount / org / f"{name}@v1" / "config.json") == files["config.json"]
    wait_downloaded(mount, repo)
    if os.geteuid() == 0:  # root hands complete models to the kernel: wait for it
        wait_until(lambda: os.stat(mount / repo).st_dev != os.stat(mount.mountpoint).st_dev, 15, "handed off")

    # Through the mount: read-only for everyone, root included.
    for rel in files:
        path = mount / repo / rel
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o444
        assert not os.access(path, os.W_OK)
        with pytest.raises(OSError, match="Read-only"):
            os.open(path, os.O_WRONLY)
    assert stat.S_IMODE(os.stat(mount / repo / "sub").st_mode) == 0o555

    # On disk: nothing writable by group or others, anywhere in the cache or the state dir.
    checked = 0
    for root in (mount.cache_dir, mount.state_dir):
        for dirpath, dirnames, filenames in os.walk(root):
            for entry in [dirpath, *(os.path.join(dirpath, n) for n in dirnames + filenames)]:
                st = os.lstat(entry)
                if stat.S_ISLNK(st.st_mode):
                    continue
                checked += 1
                assert st.st_mode & 0o022 == 0, f"{entry} is mode {stat.S_IMODE(st.st_mode):04o}"
    assert checked > 10
    # Blobs and the layout huggingface_hub reads stay readable by the users of the cache: 0644,
    # or 0444 once handed to the kernel, whose view's files are hard links to them (the daemon
    # runs as root here, so it hands the model off: docs/handoff.md).
    blob_mode = 0o444 if os.geteuid() == 0 else 0o644
    for blob in mount.cache_dir.glob("models--*/blobs/*"):
        assert stat.S_IMODE(blob.stat().st_mode) == blob_mode, blob
    assert stat.S_IMODE(mount.cache_dir.stat().st_mode) == 0o755
    # The state dir is the daemon's, the registry database (and its journal) its alone.
    assert os.stat(mount.state_dir).st_mode & 0o007 == 0
    databases = list(mount.state_dir.glob("registry.db*"))
    assert databases
    for db in databases:
        assert stat.S_IMODE(db.stat().st_mode) == 0o600, db
