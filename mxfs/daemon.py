"""Wiring: build the services from settings, run the mount in one trio nursery, stop cleanly.

``mxfs mount`` runs :func:`serve`: the FUSE loop, the fetcher's background tasks and the signal
handler are siblings in one nursery, so a failure in any of them ends the mount instead of
leaving half a daemon behind.  SIGTERM/SIGINT call ``pyfuse3.terminate()``; the mount is always
unmounted on the way out.  The cache commands (``prefetch``, ``status``) use
:func:`open_services` to run the same claim protocol without a mount.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import signal
import socket
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pyfuse3
import trio

from mxfs.cache import HubCache
from mxfs.config import Settings
from mxfs.evict import Evictor, Rules
from mxfs.fetch import Catalog, Fetcher, StateDir
from mxfs.fs import MxfsOperations
from mxfs.hub import Hub, HubClient
from mxfs.registry import Registry, open_registry, redact_url

log = logging.getLogger(__name__)

# Concurrent FUSE requests: reads of files still downloading wait, so allow many in flight.
MAX_FUSE_TASKS = 256
# Larger kernel read requests (1 MiB instead of 128 KiB) cut the per-request overhead of FUSE.
READ_AHEAD_KB = 1024
MAX_BACKGROUND = 64


@dataclass
class Services:
    settings: Settings
    cache: HubCache
    state: StateDir
    registry: Registry
    catalog: Catalog
    fetcher: Fetcher
    evictor: Evictor


def make_evictor(settings: Settings, registry: Registry, cache: HubCache, fetcher: Fetcher | None = None) -> Evictor:
    ev = settings.eviction
    rules = Rules(
        unused_threshold=ev.unused_threshold,
        max_models=ev.max_models,
        max_cache_size=ev.max_cache_size,
        min_free_space=ev.min_free_space,
        in_use_grace=ev.in_use_grace,
    )
    return Evictor(
        registry,
        cache,
        rules,
        check_interval=ev.check_interval,
        open_entries=fetcher.open_entries if fetcher is not None else set,
    )


@contextlib.asynccontextmanager
async def open_services(settings: Settings) -> AsyncIterator[Services]:
    """Cache, state dir, registry, Hub client and a running fetcher; torn down on exit."""
    settings.validate()
    cache = HubCache(settings.cache_dir)
    state = StateDir(settings.state_dir)

    def prepare_dirs() -> None:
        cache.ensure_root()
        # The state dir holds the registry and private bookkeeping: no reason for others to read it.
        settings.state_dir.mkdir(parents=True, exist_ok=True, mode=0o750)

    await trio.to_thread.run_sync(prepare_dirs)
    log.info(
        "cache %s, state %s, registry %s",
        settings.cache_dir,
        settings.state_dir,
        redact_url(settings.registry_url),
    )
    registry = await open_registry(settings.registry_url)
    try:
        hub = Hub(HubClient())
        if hub.offline:
            log.info("HF_HUB_OFFLINE is set: serving the cache only")
        catalog = Catalog(hub, cache, state, negative_ttl=settings.negative_ttl)
        fetcher = Fetcher(catalog, registry, cache, settings)
        evictor = make_evictor(settings, registry, cache, fetcher)
        # A download that hits a full disk runs an eviction cycle before it retries.
        fetcher.on_disk_full = evictor.cycle
        async with trio.open_nursery() as nursery:
            await nursery.start(fetcher.run)
            yield Services(settings, cache, state, registry, catalog, fetcher, evictor)
            nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            await registry.aclose()


def clear_stale_mount(mountpoint: Path) -> None:
    """Lazily unmount a FUSE mount whose daemon died ("Transport endpoint is not connected")."""
    try:
        os.stat(mountpoint)
        return
    except OSError as exc:
        if exc.errno != errno.ENOTCONN:
            raise
    log.warning("%s: stale mount left by a crashed daemon; unmounting it", mountpoint)
    for cmd in (["fusermount3", "-u", "-z", str(mountpoint)], ["umount", "-l", str(mountpoint)]):
        with contextlib.suppress(FileNotFoundError):
            if subprocess.run(cmd, capture_output=True, check=False).returncode == 0:
                return
    raise OSError(errno.ENOTCONN, f"could not clear the stale mount at {mountpoint}")


def prepare_mountpoint(mountpoint: Path) -> Path:
    mountpoint = mountpoint.absolute()
    clear_stale_mount(mountpoint)
    if not mountpoint.is_dir():
        raise NotADirectoryError(f"mount point {mountpoint} is not a directory")
    return mountpoint


def _mount_device(mountpoint: Path) -> tuple[int, int] | None:
    """The (major, minor) of our mount, from mountinfo: stat() on it would wait for ourselves."""
    target = str(mountpoint.resolve())
    found = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if len(fields) > 4 and fields[4] == target and " - fuse" in line:
                major, minor = fields[2].split(":")
                found = (int(major), int(minor))
    return found


def tune_fuse_connection(mountpoint: Path) -> None:
    """Raise readahead and background requests of the FUSE connection (root only; best effort)."""
    device = _mount_device(mountpoint)
    if device is None:
        return
    major, minor = device
    knobs = {
        Path(f"/sys/class/bdi/{major}:{minor}/read_ahead_kb"): READ_AHEAD_KB,
        Path(f"/sys/fs/fuse/connections/{minor}/max_background"): MAX_BACKGROUND,
        Path(f"/sys/fs/fuse/connections/{minor}/congestion_threshold"): MAX_BACKGROUND * 3 // 4,
    }
    for path, value in knobs.items():
        try:
            path.write_text(f"{value}\n")
        except OSError as exc:
            log.debug("could not set %s: %s", path, exc)


def sd_notify(message: str) -> None:
    """Tell systemd (``NOTIFY_SOCKET``) about our state; a no-op when not run by systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        try:
            sock.connect(address)
            sock.sendall(message.encode())
        except OSError as exc:
            log.warning("sd_notify(%s) failed: %s", message, exc)


async def _announce_ready(mountpoint: Path) -> None:
    """Wait until the mount answers (a stat served by our own loop), then say so."""
    parent_dev = (await trio.to_thread.run_sync(os.stat, mountpoint.parent)).st_dev
    for _ in range(200):
        st = await trio.to_thread.run_sync(os.stat, mountpoint)
        if st.st_dev != parent_dev:
            break
        await trio.sleep(0.05)
    await trio.to_thread.run_sync(tune_fuse_connection, mountpoint)
    log.info("mounted at %s", mountpoint)
    sd_notify("READY=1\nSTATUS=serving")


async def _stop_on_signals(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        task_status.started()
        async for signum in signals:
            log.info("received %s: unmounting", signal.Signals(signum).name)
            sd_notify("STOPPING=1")
            pyfuse3.terminate()
            return


async def serve(settings: Settings, mountpoint: Path) -> None:
    """Mount and serve until a signal (or ``fusermount -u``) ends it; always unmount."""
    mountpoint = await trio.to_thread.run_sync(prepare_mountpoint, mountpoint)
    async with open_services(settings) as services:
        ops = MxfsOperations(services.fetcher, settings.revision)
        options = set(pyfuse3.default_options) | {"fsname=mxfs", "subtype=mxfs", "ro"}
        if settings.allow_other:
            options.add("allow_other")
        pyfuse3.init(ops, str(mountpoint), options)
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(_stop_on_signals)
                if settings.eviction.enabled:
                    await nursery.start(services.evictor.run)
                nursery.start_soon(_announce_ready, mountpoint)
                await pyfuse3.main(max_tasks=MAX_FUSE_TASKS)
                nursery.cancel_scope.cancel()
        finally:
            pyfuse3.close(unmount=True)
            log.info("unmounted %s", mountpoint)
