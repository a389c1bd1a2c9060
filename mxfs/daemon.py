"""Wiring: build the services from settings, run the mount in one trio nursery, stop cleanly.

``mxfs mount`` runs :func:`serve`: the FUSE loop, the fetcher's background tasks and the signal
handler are siblings in one nursery, so a failure in any of them ends the mount instead of
leaving half a daemon behind.  SIGTERM/SIGINT call ``pyfuse3.terminate()``; the mount is always
unmounted on the way out.  The cache commands (``prefetch``, ``status``) use
:func:`open_services` to run the same claim protocol without a mount.

Under systemd (``Type=notify``) the daemon says ``READY=1`` only once the mount point answers
(a statfs, served by its own loop), ``STOPPING=1`` when it starts to unmount, and, with
``WatchdogSec=``, ``WATCHDOG=1`` only while the mount keeps answering: a wedged loop stops the
pings and systemd restarts the service.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import re
import signal
import socket
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pyfuse3
import trio

from mxfs import metrics
from mxfs.cache import HubCache
from mxfs.config import Settings
from mxfs.evict import Evictor, Rules, ours
from mxfs.fetch import Catalog, Fetcher, StateDir
from mxfs.fs import MxfsOperations
from mxfs.hub import Hub, HubClient
from mxfs.names import parse_model_arg
from mxfs.rebuild import open_registry_recovering
from mxfs.registry import Record, Registry, RegistryError, parse_entry_name, redact_url

log = logging.getLogger(__name__)

# Concurrent FUSE requests: reads of files still downloading wait, so allow many in flight.
MAX_FUSE_TASKS = 256
# Larger kernel read requests (1 MiB instead of 128 KiB) cut the per-request overhead of FUSE.
READ_AHEAD_KB = 1024
MAX_BACKGROUND = 64
# A mount that does not answer within this long after mounting is reported as a failure.
MOUNT_ANSWER_TIMEOUT = 20.0
# How often eviction.pinned is applied to the registry again, so that a model downloaded after
# start-up is pinned well within the in-use grace period (10m by default) that protects it meanwhile.
PIN_INTERVAL = 60.0


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
    # Read up front so that an unreadable token file fails the start, not the first download.
    token = await trio.to_thread.run_sync(settings.read_token)
    # A corrupt embedded registry is moved aside and rebuilt from the cache (mxfs.rebuild).
    registry = await open_registry_recovering(settings.registry_url, cache, state.read_tree)
    try:
        # token None: huggingface_hub finds HF_TOKEN (or a stored login) itself.
        hub = Hub(HubClient(token=token))
        if hub.offline:
            log.info("HF_HUB_OFFLINE is set: serving the cache only")
        catalog = Catalog(hub, cache, state, negative_ttl=settings.negative_ttl)
        fetcher = Fetcher(catalog, registry, cache, settings)
        evictor = make_evictor(settings, registry, cache, fetcher)
        # A download that hits a full disk runs an eviction cycle before it retries.
        fetcher.on_disk_full = evictor.make_room
        async with trio.open_nursery() as nursery:
            await nursery.start(fetcher.run)
            yield Services(settings, cache, state, registry, catalog, fetcher, evictor)
            nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            await registry.aclose()


def is_stale(mountpoint: Path) -> bool:
    """Is this a FUSE mount whose daemon died ("Transport endpoint is not connected")?

    Asked with statfs, which the kernel always forwards to the daemon: a stat may be answered
    from the attribute cache for a second after the daemon died.
    """
    try:
        os.statvfs(mountpoint)
    except OSError as exc:
        if exc.errno == errno.ENOTCONN:
            return True
        raise
    return False


def clear_stale_mount(mountpoint: Path) -> None:
    """Lazily unmount a FUSE mount whose daemon died ("Transport endpoint is not connected")."""
    if not is_stale(mountpoint):
        return
    log.warning("%s: stale mount left by a crashed daemon; unmounting it", mountpoint)
    for cmd in (["fusermount3", "-u", "-z", str(mountpoint)], ["umount", "-l", str(mountpoint)]):
        with contextlib.suppress(FileNotFoundError):
            if subprocess.run(cmd, capture_output=True, check=False).returncode == 0:
                return
    raise OSError(errno.ENOTCONN, f"could not clear the stale mount at {mountpoint}")


def _unescape_mountinfo(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash in paths as octal escapes (``\\040``)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mount_type(mountpoint: Path) -> str | None:
    """The filesystem type mounted at ``mountpoint`` (``fuse.mxfs``), or None if nothing is.

    Read from mountinfo, never from a stat of the mount point: that hangs on a wedged daemon,
    fails with ENOTCONN on a dead one, and with EACCES on another user's FUSE mount.
    """
    target = os.path.abspath(mountpoint)
    found = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            before, _, after = line.partition(" - ")
            fields = before.split()
            if len(fields) > 4 and _unescape_mountinfo(fields[4]) == target:
                found = after.split()[0]  # the last mount on a path is the visible one
    return found


def unmount(mountpoint: Path, *, lazy: bool = False) -> str:
    """``mxfs unmount``: unmount an mxfs mount, lazily if its daemon is gone; returns what was done.

    A live mount is unmounted normally (the daemon then exits 0 by itself); a stale one ("Transport
    endpoint is not connected", the daemon died) can only be detached.  Raises OSError with a
    message for a person: not mounted, not an mxfs mount, or busy.
    """
    path = Path(os.path.abspath(mountpoint))
    fstype = mount_type(path)
    if fstype is None:
        raise OSError(errno.EINVAL, f"{path} is not mounted")
    if fstype != "fuse.mxfs":
        raise OSError(errno.EINVAL, f"{path} is not an mxfs mount (it is {fstype})")
    try:
        stale = is_stale(path)
    except OSError:
        stale = False  # EACCES (another user's mount without allow_other), say: let umount judge
    lazy = lazy or stale
    commands = (
        ["fusermount3", "-u", *(["-z"] if lazy else []), str(path)],
        ["umount", *(["-l"] if lazy else []), str(path)],
    )
    errors = []
    for cmd in commands:
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        except FileNotFoundError:
            continue
        if done.returncode == 0:
            if stale:
                return f"detached the stale mount at {path} (its daemon had died)"
            return f"unmounted {path}" + (" (lazily: open files keep it alive until closed)" if lazy else "")
        errors.append(done.stderr.strip() or f"{cmd[0]} exited with {done.returncode}")
    hint = "; close the files using it, or use --lazy" if any("busy" in e for e in errors) else ""
    raise OSError(errno.EBUSY, f"could not unmount {path}: {'; '.join(errors)}{hint}")


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


def watchdog_period() -> float | None:
    """systemd's watchdog timeout in seconds (``WATCHDOG_USEC``), if it is meant for this process."""
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if pid.isdigit() and int(pid) != os.getpid():
        return None  # inherited from a parent that systemd watches, not us
    return int(usec) / 1e6


class MountProbe:
    """Does the mount answer?  Asked of the mount point, and answered by our own FUSE loop.

    A statfs, which the kernel always forwards to the daemon (a stat may come from its attribute
    cache), then a stat to make sure the answer came from a mount and not from the directory
    under it.  It runs in a worker thread (it waits for this very process) and is abandoned on
    timeout; one probe at a time, so a wedged mount costs one stuck thread, not one per check.
    """

    def __init__(self, mountpoint: Path) -> None:
        self.mountpoint = mountpoint
        self._limiter = trio.CapacityLimiter(1)
        self._parent_dev: int | None = None

    def _answers(self) -> bool:
        if self._parent_dev is None:
            self._parent_dev = os.stat(self.mountpoint.parent).st_dev
        try:
            os.statvfs(self.mountpoint)
            return os.stat(self.mountpoint).st_dev != self._parent_dev
        except OSError:
            return False

    async def answers(self, within: float) -> bool:
        with trio.move_on_after(within):
            return await trio.to_thread.run_sync(self._answers, limiter=self._limiter, abandon_on_cancel=True)
        return False


async def _announce_ready(probe: MountProbe) -> None:
    """Wait until the mount answers, then tell systemd; a mount that never answers fails the daemon."""
    deadline = trio.current_time() + MOUNT_ANSWER_TIMEOUT
    while not await probe.answers(max(deadline - trio.current_time(), 0.001)):
        if trio.current_time() >= deadline:
            what = f"the mount at {probe.mountpoint} did not answer within {MOUNT_ANSWER_TIMEOUT:.0f}s"
            raise OSError(errno.ETIMEDOUT, what)
        await trio.sleep(0.05)
    await trio.to_thread.run_sync(tune_fuse_connection, probe.mountpoint)
    log.info("mounted at %s", probe.mountpoint)
    sd_notify("READY=1\nSTATUS=serving")


async def _watchdog(
    probe: MountProbe, period: float, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """``WATCHDOG=1`` every quarter of systemd's period while the mount answers.

    A quarter (not the half systemd asks for at least) leaves room for a slow probe and a busy
    loop.  No ping when the probe fails: if the mount stays wedged, systemd kills and restarts us.
    """
    interval = period / 4
    log.info("systemd watchdog: %.1fs, pinging every %.1fs", period, interval)
    task_status.started()
    while True:
        started = trio.current_time()
        if await probe.answers(interval):
            sd_notify("WATCHDOG=1")
        else:
            log.warning(
                "the mount at %s did not answer within %.1fs; not pinging the watchdog", probe.mountpoint, interval
            )
        await trio.sleep_until(started + interval)


async def _stop_on_signals(
    ops: MxfsOperations, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        task_status.started()
        async for signum in signals:
            log.info("received %s: unmounting", signal.Signals(signum).name)
            pyfuse3.terminate()
            # pyfuse3.main() returns once the requests in flight are answered: end them now.
            ops.requests.cancel_all()
            return


# -- pins --------------------------------------------------------------------------------------


def match_entries(settings: Settings, records: list[Record], models: list[str]) -> tuple[list[str], list[str]]:
    """Registry names for ``org/name`` (every entry of the repo) or ``org/name@rev`` (that commit,
    resolved from what this node recorded, so no Hub call is needed); and the arguments matching none.

    Blocking (reads the state dir): call it from a thread in async code.
    """
    records = ours(records)
    state, cache = StateDir(settings.state_dir), HubCache(settings.cache_dir)
    names: list[str] = []
    unmatched: list[str] = []
    for text in models:
        ref = parse_model_arg(text, settings.revision)
        explicit = "@" in text
        commit = None
        if explicit:
            commit = ref.revision if ref.pinned_to_commit else None
            commit = commit or state.read_ref(ref.repo_id, ref.revision) or cache.read_ref(ref.repo_id, ref.revision)
        found = [
            r.model_name
            for r in records
            if parse_entry_name(r.model_name)[0] == ref.repo_id
            and (not explicit or parse_entry_name(r.model_name)[1] == commit)
        ]
        names += found
        if not found:
            unmatched.append(text)
    return names, unmatched


async def apply_pins(settings: Settings, registry: Registry) -> list[str]:
    """Pin in the registry every entry that ``eviction.pinned`` names; returns those newly pinned.

    Only entries the registry holds can be pinned, so a model not downloaded yet is pinned by a
    later call (the daemon repeats this every :data:`PIN_INTERVAL`).  Taking a model out of the
    list does not unpin it: ``mxfs unpin`` does.
    """
    if not settings.eviction.pinned:
        return []
    records = await registry.list_by_last_used()
    names, _unmatched = await trio.to_thread.run_sync(match_entries, settings, records, settings.eviction.pinned)
    already = {r.model_name for r in records if r.pinned}
    newly = []
    for name in names:
        if name not in already and await registry.set_pinned(name, True):
            repo_id, commit = parse_entry_name(name)
            log.info("%s@%s: pinned (eviction.pinned)", repo_id, commit[:12])
            newly.append(name)
    return newly


async def _keep_pins(
    settings: Settings, registry: Registry, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Apply ``eviction.pinned`` at start-up (before eviction starts) and then every minute."""
    interval = min(PIN_INTERVAL, settings.eviction.check_interval)
    while True:
        try:
            await apply_pins(settings, registry)
        except (RegistryError, OSError) as exc:
            log.warning("could not apply eviction.pinned now (trying again in %.0fs): %s", interval, exc)
        task_status.started()
        task_status = trio.TASK_STATUS_IGNORED
        await trio.sleep(interval)


# How soon a running daemon follows ``mxfs refresh`` (one small file read per resolved ref).
REF_POLL_INTERVAL = 2.0


async def _follow_refreshes(
    catalog: Catalog, ops: MxfsOperations, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Move model directories to the commits recorded in the state dir (``mxfs refresh``).

    The CLI and the daemon share nothing but the state directory, so the record is the message:
    polling it keeps ``refresh`` working whether zero, one or several daemons run on the node.
    """
    task_status.started()
    while True:
        await trio.sleep(REF_POLL_INTERVAL)
        if moved := await catalog.follow_recorded_refs():
            ops.forget_model_dirs(moved)


# -- the mount ---------------------------------------------------------------------------------


# glibc mallopt parameters (malloc.h).
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8


def bound_malloc_retention() -> None:
    """Keep the daemon's memory near its working set under sustained load.

    By default glibc gives each of the daemon's ~80 worker threads an arena of its own, and
    raises its mmap threshold after every large free, so the 1-8 MiB read and hash buffers end
    up in arenas that keep their peak for good: a soak of 32 readers left the daemon 40-70 MiB
    above its baseline with nothing open.  Two arenas and a fixed 4 MiB threshold (buffers above
    it are mapped and returned at once; 1 MiB read buffers are reused from the heap) keep it
    within a few MiB.  Does nothing where malloc is not glibc's.
    """
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None)
        libc.mallopt(_M_ARENA_MAX, 2)
        libc.mallopt(_M_MMAP_THRESHOLD, 4 << 20)


IDLE_TRIM_INTERVAL = 1.0


async def _return_memory_when_idle(
    fetcher: Fetcher, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """After a burst of reads or downloads, give the freed heap back to the system once.

    Two arenas (see :func:`bound_malloc_retention`) still keep freed 1 MiB buffers in the heap,
    fragmented between live objects; ``malloc_trim`` returns those pages.  It runs once per idle
    spell (no bytes read for a tick, no download running), never under load.
    """
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        trim = None
    task_status.started()
    if trim is None:
        return
    last_read, dirty = fetcher.bytes_read, False
    while True:
        await trio.sleep(IDLE_TRIM_INTERVAL)
        busy = fetcher.bytes_read != last_read or fetcher.downloads_running()
        last_read = fetcher.bytes_read
        if busy:
            dirty = True
        elif dirty:
            dirty = False
            await trio.to_thread.run_sync(trim, 0)


async def serve(settings: Settings, mountpoint: Path) -> None:
    """Mount and serve until a signal (or ``fusermount -u``) ends it; always unmount."""
    bound_malloc_retention()
    mountpoint = await trio.to_thread.run_sync(prepare_mountpoint, mountpoint)
    # Bound before mounting: a taken port is a clear startup error, not a half-started daemon.
    listeners = await metrics.listen(settings.metrics_address) if settings.metrics_address else []
    async with open_services(settings) as services:
        ops = MxfsOperations(services.fetcher, settings.revision, uid=settings.uid, gid=settings.gid)
        options = set(pyfuse3.default_options) | {"fsname=mxfs", "subtype=mxfs", "ro"}
        if settings.allow_other:
            # Root needs no user_allow_other in /etc/fuse.conf; other users do.
            options.add("allow_other")
        pyfuse3.init(ops, str(mountpoint), options)
        probe = MountProbe(mountpoint)
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(_stop_on_signals, ops)
                await nursery.start(_return_memory_when_idle, services.fetcher)
                await nursery.start(_follow_refreshes, services.fetcher.catalog, ops)
                await nursery.start(ops.drop_discarded_pages)
                if listeners:
                    nursery.start_soon(metrics.serve, listeners, services)
                if settings.eviction.pinned:
                    await nursery.start(_keep_pins, settings, services.registry)
                if settings.eviction.enabled:
                    await nursery.start(services.evictor.run)
                if (period := watchdog_period()) is not None:
                    await nursery.start(_watchdog, probe, period)
                nursery.start_soon(_announce_ready, probe)
                await pyfuse3.main(max_tasks=MAX_FUSE_TASKS)
                nursery.cancel_scope.cancel()
        finally:
            sd_notify("STOPPING=1\nSTATUS=unmounting")
            pyfuse3.close(unmount=True)
            log.info("unmounted %s", mountpoint)
