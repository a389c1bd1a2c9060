"""Eviction through a real mount: LRU order, size and disk limits, open handles and pins protected,
the cache left scan-clean, and evicted models fetched again on the next open."""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Callable
from pathlib import Path

from tests.hubserver import FakeHub
from tests.mounting import MountedFs, partial_files, requires_fuse, run_cli, settled_scan, wait_until

pytestmark = requires_fuse

# Fast cycles, no grace: these tests want eviction to happen as soon as the rules allow.
FAST = ("--check-interval", "0.3s", "--in-use-grace", "0", "--unused-threshold", "off")


def make_models(hub: FakeHub, new_repo_id: Callable[[], str], n: int, size: int = 1_000_000) -> dict[str, bytes]:
    models = {}
    for i in range(n):
        repo = new_repo_id()
        data = random.Random(i).randbytes(size)
        hub.add_repo(repo, {"config.json": b'{"i": %d}' % i, "model.safetensors": data})
        models[repo] = data
    return models


def read(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def cached_repos(mount: MountedFs) -> set[str]:
    return {r.repo_id for r in settled_scan(mount.cache_dir).repos if r.revisions}


def registry_models(mount: MountedFs) -> list[str]:
    out = run_cli("status", "--json", "--state-dir", str(mount.state_dir), "--cache-dir", str(mount.cache_dir))
    assert out.returncode == 0, out.stderr
    return [json.loads(line)["model"] for line in out.stdout.splitlines()]


def assert_scan_clean(mount: MountedFs) -> None:
    # A read can finish before its file is verified and linked: wait for downloads to settle.
    wait_until(lambda: not partial_files(mount.cache_dir), what="downloads settled")
    info = settled_scan(mount.cache_dir)
    assert info.warnings == []
    for repo in info.repos:
        for revision in repo.revisions:
            assert revision.files, f"{repo.repo_id}: empty snapshot left behind"


def test_lru_order_with_max_models_and_re_download(hub: FakeHub, new_repo_id, mxfs_mount) -> None:
    models = make_models(hub, new_repo_id, 4)
    names = list(models)
    mount = mxfs_mount("--max-models", "2", *FAST)
    for repo in names[:3]:
        assert read(mount / repo / "model.safetensors") == models[repo]
        time.sleep(0.05)
    # Three models, room for two: the least recently used (the first) goes.
    wait_until(lambda: cached_repos(mount) == set(names[1:3]))
    assert sorted(registry_models(mount)) == sorted(names[1:3])
    assert_scan_clean(mount)
    assert "reason count" in mount.log()
    # Using the second makes the third the oldest; loading a fourth evicts the third.
    assert read(mount / names[1] / "config.json") == b'{"i": 1}'
    # Through FUSE the open touches the entry before it returns; a model handed to the kernel is
    # touched when the daemon hears of the open (inotify), a moment later: wait for it.
    wait_until(lambda: registry_models(mount)[0] == names[1], 20, "the use of the second is recorded")
    time.sleep(0.05)
    assert read(mount / names[3] / "model.safetensors") == models[names[3]]
    wait_until(lambda: cached_repos(mount) == {names[1], names[3]})
    # An evicted model opened again is downloaded again, correctly.
    assert read(mount / names[0] / "model.safetensors") == models[names[0]]
    assert hub.bytes_served(names[0], "model.safetensors") == 2 * len(models[names[0]])
    assert_scan_clean(mount)


def test_open_handles_and_pins_are_never_evicted(hub: FakeHub, new_repo_id, mxfs_mount) -> None:
    models = make_models(hub, new_repo_id, 5)
    a, b, c, d, e = models
    mount = mxfs_mount("--max-models", "2", *FAST)
    dirs = ["--state-dir", str(mount.state_dir), "--cache-dir", str(mount.cache_dir)]
    with open(mount / a / "model.safetensors", "rb") as held:
        assert held.read(10) == models[a][:10]
        assert read(mount / b / "model.safetensors") == models[b]
        pin = run_cli("pin", b, *dirs)
        assert pin.returncode == 0, pin.stderr
        # Three models, room for two: a is the oldest but open, b is pinned, so c goes.
        assert read(mount / c / "model.safetensors") == models[c]
        wait_until(lambda: cached_repos(mount) == {a, b})
        time.sleep(1.0)  # several more cycles: a (open) and b (pinned) stay
        assert cached_repos(mount) == {a, b}
        held.seek(0)
        assert held.read() == models[a]
    # Closed: a is an ordinary candidate again and, the oldest, goes when d arrives.
    assert read(mount / d / "model.safetensors") == models[d]
    wait_until(lambda: cached_repos(mount) == {b, d})
    unpin = run_cli("unpin", b, *dirs)
    assert unpin.returncode == 0, unpin.stderr
    assert read(mount / e / "model.safetensors") == models[e]
    wait_until(lambda: cached_repos(mount) == {d, e})
    assert_scan_clean(mount)


def test_max_cache_size(hub: FakeHub, new_repo_id, mxfs_mount) -> None:
    models = make_models(hub, new_repo_id, 4, size=2_000_000)
    mount = mxfs_mount("--max-cache-size", "5MiB", *FAST)
    for repo, data in models.items():
        assert read(mount / repo / "model.safetensors") == data
        time.sleep(0.05)
    wait_until(lambda: len(cached_repos(mount)) == 2)
    assert cached_repos(mount) == set(list(models)[2:])
    assert "reason size" in mount.log()
    assert_scan_clean(mount)


def test_min_free_space_on_a_small_disk(hub: FakeHub, new_repo_id, mxfs_mount, small_tmpfs: Path) -> None:
    models = make_models(hub, new_repo_id, 5, size=5_000_000)
    mount = mxfs_mount("--min-free-space", "12MiB", *FAST, cache_dir=small_tmpfs / "cache")
    for repo, data in models.items():
        assert read(mount / repo / "model.safetensors") == data
        st = os.statvfs(small_tmpfs)
        wait_until(lambda: os.statvfs(small_tmpfs).f_bavail * os.statvfs(small_tmpfs).f_frsize >= 12 << 20)
        del st
    # Every load succeeded; the newest model is cached and free space is back above the floor.
    assert list(models)[-1] in cached_repos(mount)
    assert "reason disk" in mount.log()
    assert_scan_clean(mount)


def test_evict_command_and_gc_dry_run(hub: FakeHub, new_repo_id, mxfs_mount) -> None:
    models = make_models(hub, new_repo_id, 2)
    a, b = models
    mount = mxfs_mount("--no-eviction")
    for repo, data in models.items():
        assert read(mount / repo / "model.safetensors") == data
    dirs = ["--state-dir", str(mount.state_dir), "--cache-dir", str(mount.cache_dir)]
    dry = run_cli("gc", "--dry-run", "--max-models", "1", "--in-use-grace", "0", *dirs)
    assert dry.returncode == 0, dry.stderr
    assert "would evict" in dry.stdout and a in dry.stdout
    assert cached_repos(mount) == {a, b}
    # Used just now: the grace rule keeps it unless forced.
    kept = run_cli("evict", a, *dirs)
    assert kept.returncode == 1 and "used within" in kept.stdout
    gone = run_cli("evict", a, "--force", *dirs)
    assert gone.returncode == 0, gone.stdout + gone.stderr
    assert "evicted" in gone.stdout and "(manual)" in gone.stdout
    assert cached_repos(mount) == {b}
    # A file held open through the mount protects its model even from --force.
    with open(mount / b / "model.safetensors", "rb") as held:
        held.read(1)
        refused = run_cli("evict", b, "--force", *dirs)
        assert refused.returncode == 1 and "open on this node" in refused.stdout
    assert cached_repos(mount) == {b}
    assert read(mount / a / "model.safetensors") == models[a]
    # Eviction is the everyday way a model goes: the next open says so, without a warning (a
    # file deleted behind mxfs's back is what "vanished" warns of: test_mount).
    assert "model.safetensors was evicted from the cache; fetching it again" in mount.log()
    assert "vanished" not in mount.log()
    assert_scan_clean(mount)


def test_stream_of_loads_under_eviction_never_fails_a_reader(hub: FakeHub, new_repo_id, mxfs_mount) -> None:
    models = make_models(hub, new_repo_id, 6, size=500_000)
    names = list(models)
    mount = mxfs_mount("--max-models", "2", *FAST)
    # An open that races the eviction of its model finds the blob gone and downloads it again.
    mount.allowed_log.append(r"/model\.safetensors vanished from the cache; fetching it again$")
    rnd = random.Random(3)
    for _ in range(30):  # bounded
        repo = rnd.choice(names)
        assert read(mount / repo / "model.safetensors") == models[repo]
        assert read(mount / repo / "config.json")
    wait_until(lambda: len(cached_repos(mount)) <= 2)
    assert_scan_clean(mount)
