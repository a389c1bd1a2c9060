"""``mxfs mount | status | prefetch | gc | evict | pin | unpin | unmount``: the command line.

Every command that works on the cache reads its settings the same way (DESIGN section 7):
defaults, then ``/etc/mxfs/mxfs.toml`` (or ``--config``), then ``MXFS_*`` variables, then flags.
Flags are plain strings here and go through the same parsers as the file and the environment
(:mod:`mxfs.config`), so ``--lease 30x`` and ``MXFS_LEASE=30x`` fail with the same message.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import math
import os
import sys
from collections.abc import AsyncIterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import trio

from mxfs import __version__
from mxfs.cache import HubCache, repo_folder_name
from mxfs.config import (
    DEFAULT_CONFIG_FILE,
    OPTIONS,
    ConfigError,
    Settings,
    default_text,
    format_size,
    get_value,
    load_settings,
    toml_value,
)
from mxfs.control import (
    LOOKUP_TIMEOUT,
    SILENCE_TIMEOUT,
    ControlError,
    NoDaemon,
    ask_daemon,
    daemon_hello,
    socket_path,
)
from mxfs.daemon import make_evictor, open_services, serve
from mxfs.errors import MxfsError
from mxfs.evict import EvictionReport
from mxfs.fetch import Entry, Fetcher
from mxfs.handoff.kernel import view_binds
from mxfs.mounts import unmount
from mxfs.names import EntryName, entry_label, parse_model_arg, short_commit
from mxfs.peers.fleet import HolderListings
from mxfs.pins import apply_pins, match_entries
from mxfs.registry import Record, Registry, RegistryError, Status, open_registry, redact_url
from mxfs.statedir import StateDir

log = logging.getLogger("mxfs")

# argparse destination -> config key.  A flag left out is None and does not override anything.
FLAG_KEYS = {
    "cache_dir": "cache_dir",
    "state_dir": "state_dir",
    "registry": "registry",
    "revision": "revision",
    "lease": "lease",
    "negative_ttl": "negative_ttl",
    "verify": "verify",
    "connections": "connections",
    "chunk_size": "chunk_size",
    "poll_interval": "poll_interval",
    "refresh_within": "refresh_within",
    "ca_bundle": "ca_bundle",
    "allow_other": "allow_other",
    "handoff": "handoff",
    "uid": "uid",
    "gid": "gid",
    "metrics_address": "metrics_address",
    "log_level": "log_level",
    "token_file": "token_file",
    "peer_address": "peer_address",
    "peer_allow": "peer_allow",
    "peer_token_file": "peer_token_file",
    "peer_tls_cert": "peer_tls_cert",
    "peer_tls_key": "peer_tls_key",
    "peer_tls_ca": "peer_tls_ca",
    "eviction_enabled": "eviction.enabled",
    "check_interval": "eviction.check_interval",
    "unused_threshold": "eviction.unused_threshold",
    "max_models": "eviction.max_models",
    "max_cache_size": "eviction.max_cache_size",
    "min_free_space": "eviction.min_free_space",
    "in_use_grace": "eviction.in_use_grace",
}


def _add_setting(parser: argparse.ArgumentParser | argparse._ArgumentGroup, flag: str, text: str, **kw: Any) -> None:
    """A flag for the setting :data:`FLAG_KEYS` names; its help ends in the setting's default."""
    key = FLAG_KEYS[flag.removeprefix("--").replace("-", "_")]
    parser.add_argument(flag, help=f"{text} (default {default_text(key)})", **kw)


def _add_config_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help=f"settings file (default {DEFAULT_CONFIG_FILE}, if it exists)")
    parser.add_argument(
        "--print-config", action="store_true", help="print the effective settings as TOML (secrets redacted) and exit"
    )


def _add_cache_options(parser: argparse.ArgumentParser) -> None:
    _add_config_options(parser)
    _add_setting(parser, "--cache-dir", "HF hub-cache root")
    _add_setting(parser, "--state-dir", "mxfs state: registry, listings")
    parser.add_argument("--registry", help="registry URL: sqlite:///path, redis://... (default: in the state dir)")
    _add_setting(parser, "--revision", "revision shown as /<org>/<name>")
    _add_setting(parser, "--lease", "download lease, e.g. 30s")
    _add_setting(parser, "--negative-ttl", "how long a name the Hub does not know stays unknown")
    _add_setting(parser, "--verify", "fast: serve bytes before the checksum; strict: only verified")
    _add_setting(parser, "--connections", "parallel connections of one model's download")
    _add_setting(parser, "--chunk-size", "size of one range request")
    _add_setting(parser, "--poll-interval", "how often a waiter checks another's download")
    parser.add_argument("--token-file", help="file holding the Hub token (like HF_TOKEN); keep it mode 0600")
    parser.add_argument("--ca-bundle", help="CA bundle (PEM) that Hub connections trust, for a proxy that re-signs TLS")
    group = parser.add_argument_group("peers: nodes with their own caches fetch from each other (docs/peers.md)")
    group.add_argument(
        "--peer-address",
        help="HOST:PORT this node serves its files to peers at (then --registry is the fleet's; default off)",
    )
    _add_setting(group, "--peer-allow", "networks (CIDR, comma-separated) whose nodes may fetch from this one")
    group.add_argument("--peer-token-file", help="file holding the token every node of the fleet shares")
    group.add_argument("--peer-tls-cert", help="peers speak mutual TLS: this node's certificate chain (PEM)")
    group.add_argument("--peer-tls-key", help="the private key of --peer-tls-cert (PEM)")
    group.add_argument("--peer-tls-ca", help="the fleet's CA (PEM), which signed every peer's certificate")
    _add_setting(parser, "--log-level", "debug, info, warning, error")


def _add_mount_options(parser: argparse.ArgumentParser) -> None:
    _add_setting(
        parser,
        "--allow-other",
        "let users other than the daemon's read the mount",
        action=argparse.BooleanOptionalAction,
        default=None,
    )
    _add_setting(
        parser,
        "--handoff",
        "serve complete models from the cache's own inodes (a read-only bind mount; root only)",
        action=argparse.BooleanOptionalAction,
        default=None,
    )
    parser.add_argument("--uid", help="owner shown for files and folders, a number or a name (default: the daemon's)")
    parser.add_argument("--gid", help="group shown for files and folders, a number or a name (default: the daemon's)")
    _add_setting(parser, "--metrics-address", "where /metrics listens, HOST:PORT; '' turns it off")
    _add_setting(parser, "--refresh-within", "how soon this node follows `mxfs refresh` made on any node")


def _add_eviction_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("eviction (sizes like 500GiB, durations like 7d; 'off' disables a rule)")
    group.add_argument(
        "--no-eviction",
        dest="eviction_enabled",
        action="store_const",
        const=False,
        default=None,
        help="do not run the background eviction task",
    )
    _add_setting(group, "--check-interval", "how often the eviction task runs")
    _add_setting(group, "--unused-threshold", "evict models unused for this long")
    _add_setting(group, "--max-models", "keep at most this many models")
    _add_setting(group, "--max-cache-size", "keep the cache below this size")
    _add_setting(group, "--min-free-space", "keep this much free on the cache's disk")
    _add_setting(group, "--in-use-grace", "never evict a model used this recently")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mxfs", description="Hugging Face models as a lazy read-only filesystem")
    parser.add_argument("--version", action="version", version=f"mxfs {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    mount = sub.add_parser("mount", help="mount the model tree (stays in the foreground)")
    mount.add_argument("mountpoint", type=Path, nargs="?", help="where to mount (not needed with --print-config)")
    _add_cache_options(mount)
    _add_mount_options(mount)
    _add_eviction_options(mount)

    unmount_cmd = sub.add_parser("unmount", help="unmount a mount (also one left behind by a crashed daemon)")
    unmount_cmd.add_argument("mountpoint", type=Path)
    unmount_cmd.add_argument("--lazy", action="store_true", help="detach now even if files are open (umount -l)")

    status = sub.add_parser("status", help="list cache entries")
    status.add_argument("--json", action="store_true", help="one JSON object per entry, one per line")
    _add_cache_options(status)

    prefetch = sub.add_parser(
        "prefetch",
        help="download models into the cache (no mount needed; a daemon on the same state dir does it for you)",
    )
    prefetch.add_argument("models", nargs="+", metavar="MODEL[@REV]")
    prefetch.add_argument(
        "--no-daemon",
        action="store_true",
        help="download in this process even when a daemon serves this state dir",
    )
    _add_cache_options(prefetch)

    gc = sub.add_parser("gc", help="run one eviction cycle now")
    gc.add_argument("--dry-run", action="store_true", help="only say what would be evicted")
    _add_cache_options(gc)
    _add_eviction_options(gc)

    evict = sub.add_parser("evict", help="evict models from the cache now")
    evict.add_argument("models", nargs="+", metavar="MODEL[@REV]", help="without @REV: every cached revision")
    evict.add_argument("--force", action="store_true", help="also evict models used within the grace period")
    _add_cache_options(evict)
    _add_eviction_options(evict)

    for name, text in (("pin", "never evict these models"), ("unpin", "let eviction consider these models again")):
        cmd = sub.add_parser(name, help=text)
        cmd.add_argument("models", nargs="+", metavar="MODEL[@REV]", help="without @REV: every cached revision")
        _add_cache_options(cmd)

    refresh = sub.add_parser(
        "refresh", help="re-resolve branches or tags on the Hub; running daemons follow within seconds"
    )
    refresh.add_argument("models", nargs="+", metavar="MODEL[@REV]", help="without @REV: the default revision")
    _add_cache_options(refresh)
    return parser


def _flag_spelling(dest: str, value: object) -> str:
    if dest == "eviction_enabled":
        return "--no-eviction"
    if dest in ("allow_other", "handoff") and value is False:
        return "--no-" + dest.replace("_", "-")
    return "--" + dest.replace("_", "-")


def settings_from_args(args: argparse.Namespace, env: Mapping[str, str] | None = None) -> Settings:
    """The effective settings: defaults < config file < ``MXFS_*`` environment < flags."""
    flags: dict[str, tuple[object, str]] = {}
    for dest, key in FLAG_KEYS.items():
        value = getattr(args, dest, None)
        if value is not None:
            flags[key] = (value, _flag_spelling(dest, value))
    return load_settings(getattr(args, "config", None), env, flags)


def render_config(settings: Settings, env: Mapping[str, str] | None = None) -> str:
    """The settings as a TOML file that mxfs reads back; passwords and tokens are never shown."""
    env = os.environ if env is None else env
    lines = ["# mxfs effective settings: defaults < config file < MXFS_* environment < flags."]
    lines.append(f"# config file: {settings.config_file or 'none'}")
    if settings.token_file is not None:
        lines.append("# Hub token: read from token_file when mxfs starts (never printed)")
    elif env.get("HF_TOKEN"):
        lines.append("# Hub token: HF_TOKEN from the environment (never printed)")
    else:
        lines.append("# Hub token: none set (huggingface_hub may still use a stored login)")
    lines.append("")
    section = ""
    for option in OPTIONS:
        table, _, name = option.key.rpartition(".")
        if table != section:
            lines += ["", f"[{table}]"]
            section = table
        value = get_value(settings, option.key)
        if option.key == "registry":
            value = redact_url(settings.shared_registry_url if settings.peers else settings.registry_url)
        text = toml_value(option, value)
        origin = settings.sources.get(option.key)
        if text is None:
            line = f"# {name}: not set"
        else:
            line = f"{name} = {text}"
        lines.append(f"{line:<50} # {origin}" if origin else line)
    return "\n".join(lines) + "\n"


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # huggingface_hub and its HTTP client are chatty at INFO; their failures reach us as errors.
    for noisy in ("httpx2", "httpcore2", "huggingface_hub", "pyfuse3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "unmount":
        # Needs no settings: it must work even when the config file is what broke the daemon.
        setup_logging("info")
        try:
            print(unmount(args.mountpoint, lazy=args.lazy))
        except OSError as exc:
            print(f"mxfs: {exc.strerror or exc}", file=sys.stderr)
            return 1
        return 0
    try:
        settings = settings_from_args(args)
    except ConfigError as exc:
        print(f"mxfs: {exc}", file=sys.stderr)
        return 2
    if args.print_config:
        sys.stdout.write(render_config(settings))
        return 0
    if args.command == "mount" and args.mountpoint is None:
        parser.error("mount: the following arguments are required: mountpoint")
    setup_logging(settings.log_level)
    for warning in settings.warnings:
        log.warning("%s", warning)
    try:
        if args.command == "mount":
            trio.run(serve, settings, args.mountpoint)
            return 0
        if args.command == "status":
            return trio.run(_status, settings, args.json)
        if args.command == "prefetch":
            return trio.run(functools.partial(_prefetch, settings, args.models, use_daemon=not args.no_daemon))
        if args.command == "gc":
            return trio.run(_gc, settings, args.dry_run)
        if args.command == "evict":
            return trio.run(_evict, settings, args.models, args.force)
        if args.command in ("pin", "unpin"):
            return trio.run(_pin, settings, args.models, args.command == "pin")
        if args.command == "refresh":
            return trio.run(_refresh, settings, args.models)
    except (MxfsError, RegistryError, OSError, ValueError) as exc:
        log.error("%s", exc)
        return 1
    except KeyboardInterrupt:
        return 130
    raise AssertionError(args.command)


# -- status ------------------------------------------------------------------------------------


def _status_row(
    record: Record, refs: dict[str, list[str]], progress: tuple[int, int] | None, handed_off: list[str] | None = None
) -> dict[str, object]:
    """One entry; ``handed_off``: the directories (mount points) the kernel serves it at."""
    name = EntryName.parse(record.model_name)
    repo_id, commit = (name.repo_id, name.commit) if name is not None else (record.model_name, "")
    if record.status == Status.DOWNLOADED:
        downloaded = record.size_bytes
    else:
        downloaded = progress[0] if progress else None
    return {
        "model": repo_id,
        "revision": ",".join(refs.get(commit, [])) or commit,
        "commit": commit,
        "status": record.status.value,
        "size_bytes": record.size_bytes if record.size_bytes is not None else (progress[1] if progress else None),
        "downloaded_bytes": downloaded,
        "created_at": record.created_at.isoformat(),
        "last_used_at": record.last_used_at.isoformat(),
        "pinned": record.pinned,
        "handed_off": handed_off or [],
        "message": record.message,
    }


def _handed_off(record: Record, binds: dict[tuple[str, str], list[str]]) -> list[str]:
    """Where this namespace's mount table shows the entry handed to the kernel: a bind of its view
    over a model directory.  Read from the kernel, so right whether or not the daemon runs."""
    name = EntryName.parse(record.model_name)
    if name is None:
        return []
    return binds.get((repo_folder_name(name.repo_id), name.commit), [])


def _download_progress(state: StateDir, cache: HubCache, record: Record) -> tuple[int, int] | None:
    """(bytes of verified files in the cache, total bytes) of a download in progress, if known.

    Counted from what any process can see, the tree listing in the state dir and the blobs in the
    cache, so it works whichever process (or node, on a shared cache) downloads.  Whole files
    only: a large file counts once it is complete.
    """
    name = EntryName.parse(record.model_name)
    if record.status != Status.DOWNLOADING or name is None:
        return None
    tree = state.read_tree(name.repo_id, name.commit)
    if tree is None:
        return None
    return tree.progress(lambda f: f.size if cache.has_blob(name.repo_id, f) else 0)


def _ago(when: datetime) -> str:
    seconds = (datetime.now(UTC) - when).total_seconds()
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit} ago"
    return f"{max(seconds, 0):.0f}s ago"


def _status_table(rows: list[dict[str, object]], records: list[Record]) -> list[str]:
    header = ("MODEL", "REVISION", "STATUS", "SIZE", "LAST USED", "PINNED", "HANDED OFF")
    lines = [header]
    notes = []
    for row, record in zip(rows, records, strict=True):
        size, have = row["size_bytes"], row["downloaded_bytes"]
        status = str(row["status"])
        if record.status == Status.DOWNLOADING and isinstance(have, int) and isinstance(size, int) and size:
            status = f"{status} {100 * have / size:.0f}%"
            size_text = f"{format_size(have)} / {format_size(size)}"
        else:
            size_text = format_size(size) if isinstance(size, int) else "-"
        revision = str(row["revision"])
        revision = revision if len(revision) < 20 else short_commit(revision)
        lines.append(
            (
                str(row["model"]),
                revision,
                status,
                size_text,
                _ago(record.last_used_at),
                "yes" if row["pinned"] else "",
                "yes" if row["handed_off"] else "",
            )
        )
        if record.status == Status.ERROR and record.message:
            notes.append(f"{row['model']}@{revision}: {record.message}")
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip() for line in lines]
    if notes:
        out += ["", "errors:", *(f"  {note}" for note in notes)]
    return out


async def _status(settings: Settings, as_json: bool) -> int:
    registry = await open_registry(settings.registry_url)
    try:
        records = list(reversed(await registry.list_by_last_used()))  # most recently used first
    finally:
        await registry.aclose()

    state, cache = StateDir(settings.state_dir), HubCache(settings.cache_dir)

    def refs(record: Record) -> dict[str, list[str]]:
        name = EntryName.parse(record.model_name)
        return state.refs_by_commit(name.repo_id) if name is not None else {}

    def rows() -> list[dict[str, object]]:
        binds = view_binds()
        return [
            _status_row(record, refs(record), _download_progress(state, cache, record), _handed_off(record, binds))
            for record in records
        ]

    table = await trio.to_thread.run_sync(rows)
    if as_json:
        for row in table:
            print(json.dumps(row))
        return 0
    for line in _status_table(table, records):
        print(line)
    counts = {status: sum(r.status == status for r in records) for status in Status}
    summary = ", ".join(f"{n} {status.value.lower()}" for status, n in counts.items() if n)
    total = sum(r.size_bytes or 0 for r in records if r.status == Status.DOWNLOADED)
    pinned = sum(r.pinned for r in records)
    print(f"\n{len(records)} entries ({summary or 'none'}), {format_size(total)} cached, {pinned} pinned")
    print(_handoff_line(settings, table))
    print(await _daemon_line(settings))
    if settings.peers:
        print(await _peers_line(settings, [r.model_name for r in records if r.status == Status.DOWNLOADED]))
    try:
        disk = await trio.to_thread.run_sync(os.statvfs, settings.cache_dir)
        print(f"cache {settings.cache_dir}: {format_size(disk.f_bavail * disk.f_frsize)} free")
    except OSError:
        pass
    return 0


async def _daemon_line(settings: Settings) -> str:
    """Whether a daemon serves this state dir (and so does `mxfs prefetch`'s downloads)."""
    hello = await daemon_hello(settings.state_dir)
    if hello is None:
        return f"daemon: none answers on {socket_path(settings.state_dir)}"
    if hello.get("cache_dir") != str(settings.cache_dir):
        return f"daemon: pid {hello.get('pid')} serves this state dir with another cache, {hello.get('cache_dir')}"
    return f"daemon: pid {hello.get('pid')} serves this cache and takes its prefetches"


async def _peers_line(settings: Settings, cached: list[str]) -> str:
    """How this node stands in the fleet: its cached entries the fleet's registry lists it for."""
    where = f"peers on at {settings.peer_url}, fleet registry {redact_url(settings.shared_registry_url)}"
    try:
        shared = await open_registry(settings.shared_registry_url)
        try:
            listed = [any(h.node == settings.peer_url for h in await shared.holders(name)) for name in cached]
        finally:
            await shared.aclose()
    except RegistryError as exc:
        return f"{where}: unreachable ({exc})"
    return f"{where}: {sum(listed)} of {len(cached)} cached entries listed for peers"


def _handoff_line(settings: Settings, rows: list[dict[str, object]]) -> str:
    dirs = sum(len(row["handed_off"]) for row in rows if isinstance(row["handed_off"], list))
    setting = "on" if settings.handoff else "off (handoff = false)"
    served = f"{dirs} model director{'y' if dirs == 1 else 'ies'} served by the kernel"
    return f"hand-off {setting}: {served}"


# -- prefetch ----------------------------------------------------------------------------------


class ProgressReport:
    """Progress of one download on stderr: a bar redrawn in place on a terminal, else a log line
    every few seconds (a bar's carriage returns make a mess of journald and CI logs)."""

    def __init__(self, label: str, tty: bool) -> None:
        self.label = label
        self.tty = tty
        self.interval = 0.2 if tty else 5.0
        self._drawn = False
        self._start = trio.current_time()

    def update(self, have: int, total: int) -> None:
        pct = 100.0 * have / total if total else 100.0
        elapsed = max(trio.current_time() - self._start, 1e-9)
        rate = have / elapsed
        if self.tty:
            width = 30
            filled = int(width * pct / 100)
            eta = f" ETA {(total - have) / rate:.0f}s" if rate > 0 and have < total else ""
            line = (
                f"\r{self.label} [{'#' * filled}{'.' * (width - filled)}] {pct:5.1f}% "
                f"{format_size(have)} / {format_size(total)} {format_size(rate)}/s{eta}"
            )
            sys.stderr.write(f"{line}\x1b[K")
            sys.stderr.flush()
            self._drawn = True
        else:
            log.info("%s: %.1f%% (%s of %s, %s/s)", self.label, pct, format_size(have), format_size(total),
                     format_size(rate))  # fmt: skip

    def close(self) -> None:
        """End the bar's line, so the next message starts on a line of its own."""
        if self._drawn:
            sys.stderr.write("\n")
            sys.stderr.flush()


async def _prefetch(settings: Settings, models: list[str], *, use_daemon: bool = True) -> int:
    """Download ``models``: by the daemon serving this state dir if one does (it claims the
    fleet's Hub download and serves peers: see mxfs.control), else in this process."""
    failed = 0
    tty = sys.stderr.isatty()
    alone = list(models)
    while use_daemon and alone:
        outcome = await _prefetch_by_daemon(settings, alone[0], tty)
        if outcome is None:
            break  # no daemon (or it went away): this process downloads the rest
        failed += outcome
        alone.pop(0)
    if not alone:
        return 1 if failed else 0
    async with open_services(settings) as services:
        for text in alone:
            try:
                ref = parse_model_arg(text, settings.revision)
                entry = await services.fetcher.lookup(ref)
                report = ProgressReport(text, tty)
                try:
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(_report_progress, services.fetcher, entry, report)
                        await services.fetcher.prefetch(entry)
                        nursery.cancel_scope.cancel()
                    if report.tty:  # the bar ends full; a log gets the "cached" line below instead
                        report.update(*services.fetcher.progress(entry))
                finally:
                    report.close()
                log.info("%s: cached (%s, %s)", text, short_commit(entry.commit), format_size(entry.size))
            except MxfsError as exc:
                failed += 1
                log.error("%s: %s", text, exc)
    return 1 if failed else 0


async def _prefetch_by_daemon(settings: Settings, text: str, tty: bool) -> int | None:
    """Have the daemon on this state dir download ``text``: 0 when cached, 1 when it failed,
    None when no daemon takes it (none runs, it serves another cache, or it went away)."""
    try:
        ref = parse_model_arg(text, settings.revision)
    except MxfsError as exc:
        log.error("%s: %s", text, exc)
        return 1
    request = {"op": "prefetch", "model": str(ref), "cache_dir": str(settings.cache_dir)}
    try:
        async with ask_daemon(settings.state_dir, request) as replies:
            first = await replies.receive(LOOKUP_TIMEOUT)
            if first is not None and "wrong_cache" in first:
                daemons = first["wrong_cache"]
                log.info("the daemon on %s serves the cache %s: prefetching here", settings.state_dir, daemons)
                return None
            if first is None or "error" in first:
                log.error("%s: %s", text, first["error"] if first else "the daemon closed the connection")
                return 1
            log.info("%s: the mount's daemon downloads it (%s)", text, short_commit(first["commit"]))
            report = ProgressReport(text, tty)
            shown_at = -math.inf
            try:
                while (reply := await replies.receive(SILENCE_TIMEOUT)) is not None:
                    if "error" in reply:
                        log.error("%s: %s", text, reply["error"])
                        return 1
                    if "progress" in reply and (reply.get("done") or trio.current_time() - shown_at >= report.interval):
                        report.update(*reply["progress"])
                        shown_at = trio.current_time()
                    if reply.get("done"):
                        log.info("%s: cached (%s, %s)", text, short_commit(first["commit"]), format_size(first["size"]))
                        return 0
            finally:
                report.close()
    except NoDaemon:
        return None
    except (ControlError, OSError, trio.BrokenResourceError) as exc:
        log.warning("%s: the daemon stopped answering (%s); prefetching here", text, exc)
        return None
    log.warning("%s: the daemon went away before it finished; prefetching here", text)
    return None


async def _report_progress(fetcher: Fetcher, entry: Entry, report: ProgressReport) -> None:
    while True:
        await trio.sleep(report.interval)
        report.update(*fetcher.progress(entry))


# -- gc, evict, pin ------------------------------------------------------------------------------


def _print_report(report: EvictionReport) -> None:
    verb = "would evict" if report.dry_run else "evicted"
    for victim in report.evicted:
        print(f"{verb} {entry_label(victim.name)}  {format_size(victim.size)}  ({victim.reason})")
    for name, why in report.skipped:
        print(f"kept {entry_label(name)}: {why}")
    print(
        f"{len(report.evicted)} entries, {format_size(report.bytes_freed)} {'to free' if report.dry_run else 'freed'}"
    )


@contextlib.asynccontextmanager
async def _peer_listings(settings: Settings) -> AsyncIterator[HolderListings | None]:
    """With peers on, this node's listings in the fleet's registry (eviction withdraws them)."""
    if not settings.peers:
        yield None
        return
    shared = await open_registry(settings.shared_registry_url)
    try:
        yield HolderListings(shared, settings.peer_url)
    finally:
        await shared.aclose()


async def _gc(settings: Settings, dry_run: bool) -> int:
    registry = await open_registry(settings.registry_url)
    try:
        # The config's pins hold wherever the config is read, not only while a daemon runs.
        await apply_pins(settings, registry)
        async with _peer_listings(settings) as peers:
            evictor = make_evictor(settings, registry, HubCache(settings.cache_dir), peers=peers)
            report = await evictor.cycle(dry_run=dry_run)
    finally:
        await registry.aclose()
    _print_report(report)
    return 0


async def _entry_names(settings: Settings, registry: Registry, models: list[str]) -> tuple[list[str], list[str]]:
    records = await registry.list_by_last_used()
    return await trio.to_thread.run_sync(match_entries, settings, records, models)


async def _evict(settings: Settings, models: list[str], force: bool) -> int:
    registry = await open_registry(settings.registry_url)
    try:
        await apply_pins(settings, registry)
        names, unmatched = await _entry_names(settings, registry, models)
        async with _peer_listings(settings) as peers:
            evictor = make_evictor(settings, registry, HubCache(settings.cache_dir), peers=peers)
            report = await evictor.evict(names, force=force)
    finally:
        await registry.aclose()
    for text in unmatched:
        print(f"{text}: not in the cache", file=sys.stderr)
    _print_report(report)
    return 1 if unmatched or report.skipped else 0


async def _pin(settings: Settings, models: list[str], pinned: bool) -> int:
    registry = await open_registry(settings.registry_url)
    try:
        names, unmatched = await _entry_names(settings, registry, models)
        for name in names:
            await registry.set_pinned(name, pinned)
            print(f"{'pinned' if pinned else 'unpinned'} {entry_label(name)}")
    finally:
        await registry.aclose()
    for text in unmatched:
        print(f"{text}: not in the cache", file=sys.stderr)
    return 1 if unmatched else 0


# -- refresh -------------------------------------------------------------------------------------


async def _refresh(settings: Settings, models: list[str]) -> int:
    """Re-resolve each revision and record it, in the state dir and the registry; daemons follow.

    Daemons on this state dir follow the state dir's record, every other node following the
    branch the registry's (within its ``refresh_within``).  Nothing is downloaded: the model
    directory shows the new commit's tree at once and its files are fetched when opened, like
    any other lookup.  The old commit stays cached (and served to whoever has it open) until
    eviction takes it.
    """
    failed = 0
    async with open_services(settings) as services:
        for text in models:
            try:
                ref = parse_model_arg(text, settings.revision)
                previous, entry = await services.catalog.refresh(ref)
            except MxfsError as exc:
                failed += 1
                log.error("%s: %s", text, exc)
                continue
            try:
                await services.shared_registry.record_ref(ref.repo_id, ref.revision, entry.commit)
            except RegistryError as exc:
                # This node's daemons follow the state dir; the other nodes would not follow.
                failed += 1
                log.error("%s: recorded on this node only: registry unavailable: %s", ref, exc)
            commit = short_commit(entry.commit)
            if previous == entry.commit:
                print(f"{ref}: unchanged ({commit})")
            elif previous is None:
                print(f"{ref}: {commit}")
            else:
                print(f"{ref}: {short_commit(previous)} -> {commit}")
    return 1 if failed else 0
