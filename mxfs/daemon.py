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
import errno
import functools
import logging
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pyfuse3
import trio

from mxfs import exporter
from mxfs.cache import HubCache
from mxfs.config import Settings
from mxfs.control import ControlServer, socket_path
from mxfs.evict import Evictor, PeerRelease
from mxfs.exporter import ScrapeSources
from mxfs.fetch import Catalog, Fetcher
from mxfs.fetch.claimant import hold_lock
from mxfs.fs import MxfsOperations
from mxfs.handoff import HandOff, KernelRelease
from mxfs.handoff.kernel import can_mount
from mxfs.hub import Hub, HubClient, trust_ca_bundle
from mxfs.memory import bound_malloc_retention, return_memory_when_idle
from mxfs.metrics import HANDOFF_OFF, HandOffState
from mxfs.mounts import MountProbe, prepare_mountpoint, tune_fuse_connection
from mxfs.names import ModelRef
from mxfs.peers.client import open_peer_http
from mxfs.peers.fleet import Fleet
from mxfs.peers.server import PeerAccess, PeerServer, listen_for_peers
from mxfs.peers.tls import PeerTls
from mxfs.pins import keep_pins
from mxfs.rebuild import open_registry_recovering
from mxfs.registry import RefRecord, Registry, RegistryError, open_registry, redact_url
from mxfs.statedir import StateDir
from mxfs.systemd import feed_watchdog, sd_notify, watchdog_period

log = logging.getLogger(__name__)

# Concurrent FUSE requests: reads of files still downloading wait, so allow many in flight.
MAX_FUSE_TASKS = 256
# A mount that does not answer within this long after mounting is reported as a failure.
MOUNT_ANSWER_TIMEOUT = 20.0


@dataclass
class Services:
    settings: Settings
    cache: HubCache
    state: StateDir
    registry: Registry  # this cache's: claims, last-used times, pins, eviction
    catalog: Catalog
    fetcher: Fetcher
    evictor: Evictor
    # The registry every node shares (ref records; with peers, the fleet's claims and holders):
    # the cache's own unless peers are on.
    shared_registry: Registry
    fleet: Fleet | None = None
    peer_tls: PeerTls | None = None  # with peers over mutual TLS: the server's and client's contexts
    peer_token: str | None = None  # the fleet's shared token, read once: the client sends it, the server asks it

    def scrape_sources(self, handoff: HandOff | None = None) -> ScrapeSources:
        """What the metrics exporter reads at each scrape (``handoff``: the mount's, if it runs)."""

        def handoff_state() -> HandOffState:
            if handoff is None:
                return HANDOFF_OFF
            return HandOffState(enabled=not handoff.refused, model_dirs=len(handoff.attached))

        return ScrapeSources(
            entry_counts=self.registry.status_counts,
            cache_usage=self.evictor.usage,
            activity=self.fetcher.activity,
            handoff=handoff_state,
        )


def make_evictor(
    settings: Settings,
    registry: Registry,
    cache: HubCache,
    fetcher: Fetcher | None = None,
    handoff: HandOff | KernelRelease | None = None,
    peers: PeerRelease | None = None,
) -> Evictor:
    """The evictor; ``handoff`` takes handed-off models back from the kernel before deleting them
    (a command without a mount detaches what this mount namespace shows, if it may mount)."""
    if handoff is None and can_mount():
        handoff = KernelRelease()
    return Evictor(
        registry,
        cache,
        settings.eviction,
        check_interval=settings.eviction.check_interval,
        open_entries=fetcher.open_entries if fetcher is not None else set,
        handoff=handoff,
        peers=peers,
    )


@contextlib.asynccontextmanager
async def open_services(settings: Settings, *, serve_peers: bool = False) -> AsyncIterator[Services]:
    """Cache, state dir, registry, Hub client and a running fetcher; torn down on exit.

    With peers on, also the fleet; ``serve_peers`` (the daemon, which runs the peer server)
    lists this node's holdings and lets it claim the fleet's Hub downloads."""
    settings.validate()
    cache = HubCache(settings.cache_dir)
    state = StateDir(settings.state_dir)

    def prepare_dirs() -> None:
        cache.ensure_root()
        # The state dir holds the registry and private bookkeeping: no reason for others to read it.
        settings.state_dir.mkdir(parents=True, exist_ok=True, mode=0o750)
        # Before any claim: a process of another pid namespace on this state dir (a restarted
        # container) tells by this lock that our claims died with us (mxfs.fetch.claimant).
        hold_lock(settings.state_dir)

    await trio.to_thread.run_sync(prepare_dirs)
    log.info(
        "cache %s, state %s, registry %s%s",
        settings.cache_dir,
        settings.state_dir,
        redact_url(settings.registry_url),
        f", fleet registry {redact_url(settings.shared_registry_url)}, peers at {settings.peer_address}"
        if settings.peers
        else "",
    )
    # Read up front so that an unreadable token file fails the start, not the first download.
    token = await trio.to_thread.run_sync(settings.read_token)
    peer_token = await trio.to_thread.run_sync(settings.read_peer_token)
    async with contextlib.AsyncExitStack() as stack:
        # A corrupt embedded registry is moved aside and rebuilt from the cache (mxfs.rebuild).
        registry = await open_registry_recovering(settings.registry_url, cache, state.read_tree)
        stack.push_async_callback(_close_registry, registry)
        shared_registry = registry
        if settings.peers:
            shared_registry = await open_registry(settings.shared_registry_url)
            stack.push_async_callback(_close_registry, shared_registry)
        if settings.ca_bundle is not None:
            await trio.to_thread.run_sync(trust_ca_bundle, settings.ca_bundle)
        # token None: huggingface_hub finds HF_TOKEN (or a stored login) itself.
        hub = Hub(HubClient(token=token))
        if hub.offline:
            log.info("HF_HUB_OFFLINE is set: serving the cache only")
        fleet = None
        peer_tls = await trio.to_thread.run_sync(PeerTls.from_settings, settings) if settings.peers else None
        if settings.peers:
            http = stack.enter_context(open_peer_http(peer_tls.client if peer_tls is not None else None))
            fleet = Fleet(
                shared_registry,
                registry,
                hub.client,
                http,
                address=settings.peer_url,
                lease=settings.lease,
                token=peer_token,
            )
        catalog = Catalog(hub, cache, state, negative_ttl=settings.negative_ttl)
        fetcher = Fetcher(catalog, registry, cache, settings, sources=fleet)
        evictor = make_evictor(settings, registry, cache, fetcher, peers=fleet)
        # A download that hits a full disk runs an eviction cycle before it retries.
        fetcher.on_disk_full = evictor.make_room
        async with trio.open_nursery() as nursery:
            if fleet is not None:
                await nursery.start(functools.partial(fleet.run, serve=serve_peers))
            await nursery.start(fetcher.run)
            yield Services(
                settings,
                cache,
                state,
                registry,
                catalog,
                fetcher,
                evictor,
                shared_registry,
                fleet,
                peer_tls=peer_tls,
                peer_token=peer_token,
            )
            nursery.cancel_scope.cancel()


async def _close_registry(registry: Registry) -> None:
    with trio.CancelScope(shield=True):
        await registry.aclose()


async def _announce_ready(probe: MountProbe, handoff: HandOff | None) -> None:
    """Wait until the mount answers, then tell systemd; a mount that never answers fails the daemon.

    Before it is ready the mount is made shared for the hand-off: readers in mount namespaces
    made after that (pods) see the models handed off later."""
    deadline = trio.current_time() + MOUNT_ANSWER_TIMEOUT
    while not await probe.answers(max(deadline - trio.current_time(), 0.001)):
        if trio.current_time() >= deadline:
            what = f"the mount at {probe.mountpoint} did not answer within {MOUNT_ANSWER_TIMEOUT:.0f}s"
            raise OSError(errno.ETIMEDOUT, what)
        await trio.sleep(0.05)
    await trio.to_thread.run_sync(tune_fuse_connection, probe.mountpoint)
    if handoff is not None:
        await handoff.share_mount()
    log.info("mounted at %s", probe.mountpoint)
    sd_notify("READY=1\nSTATUS=serving")


# How long a stopping daemon spends taking its hand-offs back before it unmounts anyway (the
# lazy unmount of the FUSE mount detaches whatever is left).
DETACH_TIMEOUT = 3.0


async def _stop_on_signals(
    ops: MxfsOperations,
    handoff: HandOff | None,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        task_status.started()
        async for signum in signals:
            log.info("received %s: unmounting", signal.Signals(signum).name)
            if handoff is not None:
                # While the loop still answers: the detach looks the directories up through FUSE.
                with trio.move_on_after(DETACH_TIMEOUT):
                    await handoff.detach_all()
            pyfuse3.terminate()
            # pyfuse3.main() returns once the requests in flight are answered: end them now.
            ops.requests.cancel_all()
            return


# How soon a running daemon follows ``mxfs refresh`` (one small file read per resolved ref).
REF_POLL_INTERVAL = 2.0


async def _move_model_dirs(ops: MxfsOperations, handoff: HandOff | None, moved: list[ModelRef]) -> None:
    """Point moved model directory names (a refresh) at their new commits.

    The hand-off's bind is detached first: the old commit's bind would otherwise hide the new
    one, and its open files keep reading the old commit.
    """
    if handoff is not None:
        await handoff.detach_refs(moved)
    ops.forget_model_dirs(moved)


async def _follow_refreshes(
    catalog: Catalog,
    ops: MxfsOperations,
    handoff: HandOff | None,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Move model directories to the commits recorded in the state dir (``mxfs refresh``).

    The CLI and the daemon share nothing but the state directory, so the record is the message:
    polling it keeps ``refresh`` working whether zero, one or several daemons run on the node.
    """
    task_status.started()
    while True:
        await trio.sleep(REF_POLL_INTERVAL)
        if moved := await catalog.follow_recorded_refs():
            await _move_model_dirs(ops, handoff, moved)


async def _follow_registry_refs(
    registry: Registry,
    catalog: Catalog,
    ops: MxfsOperations,
    handoff: HandOff | None,
    within: float,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Move model directories to the commits ``mxfs refresh`` recorded in the shared registry.

    The state dir reaches only the daemons that share it; the registry reaches every node.  One
    cheap read (the refs version) every half of ``within``, and the records themselves only when
    it moved, so a node follows within ``within`` as long as the Hub answers the new commit's
    listing.  Records older than this daemon are skipped: its own lookups ask the Hub, which is
    at least as new.  A record whose commit cannot be listed yet is tried again next round.
    """
    task_status.started()
    seen: int | None = None
    pending: dict[tuple[str, str], RefRecord] = {}
    unreachable = False
    while True:
        try:
            version = await registry.refs_version()
            if seen is None or version < seen:  # start-up, or a registry emptied and begun again
                seen = version
            elif version > seen:
                for record in await registry.refs_since(seen):
                    pending[(record.repo_id, record.revision)] = record
                    seen = max(seen, record.version)
            if unreachable:
                unreachable = False
                log.info("registry %s: following refreshed revisions again", registry.url_for_logs)
        except RegistryError as exc:
            # Not a warning: the fetcher warns of an unreachable registry already, and a node
            # that cannot read the records keeps serving what it resolved.
            if not unreachable:
                unreachable = True
                log.info("cannot read refreshed revisions (tried again every %.1fs): %s", within / 2, exc)
        if pending:
            moved, retry = await catalog.follow_registry_refs(sorted(pending.values(), key=lambda r: r.version))
            pending = {(r.repo_id, r.revision): r for r in retry}
            if moved:
                await _move_model_dirs(ops, handoff, moved)
        await trio.sleep(within / 2)


# -- the mount ---------------------------------------------------------------------------------


def _make_handoff(settings: Settings, services: Services, mountpoint: Path) -> HandOff | None:
    """The hand-off of complete models to the kernel, if it is on and the daemon may mount."""
    if not settings.handoff:
        log.info("hand-off off: FUSE serves every file")
        return None
    if not can_mount():
        log.info("hand-off needs root (mount(2)); FUSE serves every file")
        return None
    registry = services.registry

    async def touch(key: str) -> None:
        with contextlib.suppress(RegistryError):
            await registry.touch(key)

    return HandOff(
        services.cache,
        mountpoint,
        settings.state_dir,
        uid=os.getuid() if settings.uid is None else settings.uid,
        gid=os.getgid() if settings.gid is None else settings.gid,
        touch=touch,
        completed=services.fetcher.completed_entries(),
        check_interval=settings.handoff_check_interval,
    )


async def _listen_for_commands(settings: Settings, services: Services) -> Callable[[], Awaitable[None]] | None:
    """Bind the control socket (mxfs.control); the task that answers on it, or None."""
    control = ControlServer(services.fetcher, settings.cache_dir)
    path = socket_path(settings.state_dir)
    try:
        listener = await control.listen(path)
    except OSError as exc:
        log.warning("control: cannot listen at %s (%s); commands on this node work alone", path, exc)
        return None
    return None if listener is None else functools.partial(control.serve, listener, path)


async def _serve_peers(
    nursery: trio.Nursery, settings: Settings, services: Services, listeners: list[trio.SocketListener]
) -> None:
    """Serve this node's files to its peers (and keep renewed TLS files current) in ``nursery``."""
    access = PeerAccess.parse(settings.peer_allow, services.peer_token)
    tls = services.peer_tls.server if services.peer_tls is not None else None
    server = PeerServer(services.cache, access, downloads=services.fetcher, tls=tls)
    if services.peer_tls is not None:
        nursery.start_soon(services.peer_tls.keep_current)
    nursery.start_soon(server.serve_on, listeners)
    log.info("serving peers at %s (allowed: %s)", settings.peer_url, ", ".join(settings.peer_allow))


async def serve(settings: Settings, mountpoint: Path) -> None:
    """Mount and serve until a signal (or ``fusermount -u``) ends it; always unmount."""
    bound_malloc_retention()
    mountpoint = await trio.to_thread.run_sync(prepare_mountpoint, mountpoint)
    # Bound before mounting: a taken port is a clear startup error, not a half-started daemon.
    listeners = await exporter.listen(settings.metrics_address) if settings.metrics_address else []
    peer_listeners = await listen_for_peers(settings.peer_address) if settings.peers else []
    async with open_services(settings, serve_peers=bool(peer_listeners)) as services:
        handoff = _make_handoff(settings, services, mountpoint)
        if handoff is not None:
            services.evictor.handoff = handoff
        ops = MxfsOperations(
            services.fetcher,
            settings.revision,
            uid=settings.uid,
            gid=settings.gid,
            on_model_dir=handoff.model_dir_resolved if handoff is not None else None,
        )
        # Listening before the mount answers: a command that finds the mount finds the daemon.
        commands = await _listen_for_commands(settings, services)
        options = set(pyfuse3.default_options) | {"fsname=mxfs", "subtype=mxfs", "ro"}
        if settings.allow_other:
            # Root needs no user_allow_other in /etc/fuse.conf; other users do.
            options.add("allow_other")
        pyfuse3.init(ops, str(mountpoint), options)
        probe = MountProbe(mountpoint)
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(_stop_on_signals, ops, handoff)
                await nursery.start(return_memory_when_idle, services.fetcher)
                await nursery.start(_follow_refreshes, services.catalog, ops, handoff)
                await nursery.start(
                    _follow_registry_refs,
                    services.shared_registry,
                    services.catalog,
                    ops,
                    handoff,
                    settings.refresh_within,
                )
                if peer_listeners:
                    await _serve_peers(nursery, settings, services, peer_listeners)
                if handoff is not None:
                    nursery.start_soon(handoff.run)
                if commands is not None:
                    nursery.start_soon(commands)
                await nursery.start(ops.drop_discarded_pages)
                if listeners:
                    nursery.start_soon(exporter.serve, listeners, services.scrape_sources(handoff))
                if settings.eviction.pinned:
                    await nursery.start(keep_pins, settings, services.registry)
                if settings.eviction.enabled:
                    await nursery.start(services.evictor.run)
                if (period := watchdog_period()) is not None:
                    await nursery.start(feed_watchdog, probe, period)
                nursery.start_soon(_announce_ready, probe, handoff)
                # The HTTP session and headers are ready before the first reader's lookup needs them.
                nursery.start_soon(services.catalog.hub.warm_up)
                await pyfuse3.main(max_tasks=MAX_FUSE_TASKS)
                nursery.cancel_scope.cancel()
        finally:
            sd_notify("STOPPING=1\nSTATUS=unmounting")
            pyfuse3.close(unmount=True)
            log.info("unmounted %s", mountpoint)
