"""``mxfs mount | status | prefetch``: the command line."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from datetime import UTC, datetime
from pathlib import Path

import trio

from mxfs import __version__
from mxfs.cache import HubCache
from mxfs.config import ConfigError, Settings, format_size, parse_duration, parse_size
from mxfs.daemon import make_evictor, open_services, serve
from mxfs.errors import MxfsError
from mxfs.evict import Report, ours
from mxfs.fetch import StateDir
from mxfs.names import parse_model_arg
from mxfs.registry import Record, RegistryError, open_registry, parse_entry_name

log = logging.getLogger("mxfs")


def _add_cache_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cache-dir", type=Path, help="HF hub-cache root (default /var/cache/mxfs)")
    parser.add_argument("--state-dir", type=Path, help="mxfs state: registry, listings (default /var/cache/mxfs-state)")
    parser.add_argument("--registry", help="registry URL: sqlite:///path (default: in the state dir)")
    parser.add_argument("--revision", help="revision shown as /<org>/<name> (default main)")
    parser.add_argument("--lease", help="download lease, e.g. 30s (default 30s)")
    parser.add_argument("--verify", choices=("fast", "strict"), help="serve bytes before the checksum (fast) or not")
    parser.add_argument("--log-level", default=None, help="debug, info, warning, error (default info)")


def _add_eviction_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("eviction (sizes like 500GiB, durations like 7d; 'off' disables a rule)")
    group.add_argument("--no-eviction", action="store_true", help="do not run the background eviction task")
    group.add_argument("--check-interval", help="how often the eviction task runs (default 5m)")
    group.add_argument("--unused-threshold", help="evict models unused for this long (default 7d)")
    group.add_argument("--max-models", help="keep at most this many models (default off)")
    group.add_argument("--max-cache-size", help="keep the cache below this size (default off)")
    group.add_argument("--min-free-space", help="keep this much free on the cache's disk (default off)")
    group.add_argument("--in-use-grace", help="never evict a model used this recently (default 10m)")


def _off(value: str) -> bool:
    return value.strip().lower() in ("off", "none", "")


def apply_eviction_args(settings: Settings, args: argparse.Namespace) -> None:
    ev = settings.eviction
    if getattr(args, "no_eviction", False):
        ev.enabled = False
    if getattr(args, "check_interval", None):
        ev.check_interval = parse_duration(args.check_interval, "eviction.check_interval")
    if getattr(args, "unused_threshold", None):
        raw = args.unused_threshold
        ev.unused_threshold = None if _off(raw) else parse_duration(raw, "eviction.unused_threshold")
    if getattr(args, "max_models", None):
        raw = args.max_models
        if _off(raw):
            ev.max_models = None
        elif raw.isdigit():
            ev.max_models = int(raw)
        else:
            raise ConfigError(f"eviction.max_models: expected a whole number or 'off', got {raw!r}")
    if getattr(args, "max_cache_size", None):
        raw = args.max_cache_size
        ev.max_cache_size = None if _off(raw) else parse_size(raw, "eviction.max_cache_size")
    if getattr(args, "min_free_space", None):
        raw = args.min_free_space
        ev.min_free_space = None if _off(raw) else parse_size(raw, "eviction.min_free_space")
    if getattr(args, "in_use_grace", None):
        ev.in_use_grace = parse_duration(args.in_use_grace, "eviction.in_use_grace")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mxfs", description="Hugging Face models as a lazy read-only filesystem")
    parser.add_argument("--version", action="version", version=f"mxfs {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    mount = sub.add_parser("mount", help="mount the model tree (stays in the foreground)")
    mount.add_argument("mountpoint", type=Path)
    mount.add_argument("--allow-other", action="store_true", default=None, help="let other users read the mount")
    _add_cache_options(mount)
    _add_eviction_options(mount)

    status = sub.add_parser("status", help="list cache entries")
    status.add_argument("--json", action="store_true", help="one JSON object per entry, one per line")
    _add_cache_options(status)

    prefetch = sub.add_parser("prefetch", help="download models into the cache (no mount needed)")
    prefetch.add_argument("models", nargs="+", metavar="MODEL[@REV]")
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
    return parser


def settings_from_args(args: argparse.Namespace) -> Settings:
    settings = Settings()
    if args.cache_dir is not None:
        settings.cache_dir = args.cache_dir.absolute()
    if args.state_dir is not None:
        settings.state_dir = args.state_dir.absolute()
    if args.registry:
        settings.registry = args.registry
    if args.revision:
        settings.revision = args.revision
    if args.lease:
        settings.lease = parse_duration(args.lease, "lease")
    if args.verify:
        settings.verify = args.verify
    if getattr(args, "allow_other", None):
        settings.allow_other = True
    if args.log_level:
        settings.log_level = args.log_level
    apply_eviction_args(settings, args)
    settings.validate()
    return settings


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
    args = build_parser().parse_args(argv)
    try:
        settings = settings_from_args(args)
    except ConfigError as exc:
        print(f"mxfs: {exc}", file=sys.stderr)
        return 2
    setup_logging(settings.log_level)
    try:
        if args.command == "mount":
            trio.run(serve, settings, args.mountpoint)
            return 0
        if args.command == "status":
            return trio.run(_status, settings, args.json)
        if args.command == "prefetch":
            return trio.run(_prefetch, settings, args.models)
        if args.command == "gc":
            return trio.run(_gc, settings, args.dry_run)
        if args.command == "evict":
            return trio.run(_evict, settings, args.models, args.force)
        if args.command in ("pin", "unpin"):
            return trio.run(_pin, settings, args.models, args.command == "pin")
    except (MxfsError, RegistryError, OSError, ValueError) as exc:
        log.error("%s", exc)
        return 1
    except KeyboardInterrupt:
        return 130
    raise AssertionError(args.command)


# -- status ------------------------------------------------------------------------------------


def _status_row(record: Record, refs: dict[str, list[str]]) -> dict[str, object]:
    try:
        repo_id, commit = parse_entry_name(record.model_name)
    except ValueError:
        repo_id, commit = record.model_name, ""
    return {
        "model": repo_id,
        "revision": ",".join(refs.get(commit, [])) or commit,
        "commit": commit,
        "status": record.status.value,
        "size_bytes": record.size_bytes,
        "created_at": record.created_at.isoformat(),
        "last_used_at": record.last_used_at.isoformat(),
        "pinned": record.pinned,
        "message": record.message,
    }


def _ago(when: datetime) -> str:
    seconds = (datetime.now(UTC) - when).total_seconds()
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit} ago"
    return f"{max(seconds, 0):.0f}s ago"


async def _status(settings: Settings, as_json: bool) -> int:
    registry = await open_registry(settings.registry_url)
    try:
        records = await registry.list_by_last_used()
    finally:
        await registry.aclose()

    state = StateDir(settings.state_dir)

    def rows() -> list[dict[str, object]]:
        out = []
        for record in reversed(records):  # most recently used first
            repo = record.model_name.rsplit(":", 1)[-1]
            out.append(_status_row(record, state.refs_by_commit(repo)))
        return out

    table = await trio.to_thread.run_sync(rows)
    if as_json:
        for row in table:
            print(json.dumps(row))
        return 0
    header = ("MODEL", "REVISION", "STATUS", "SIZE", "LAST USED", "PINNED")
    lines = [header]
    for row, record in zip(table, reversed(records), strict=True):
        size = format_size(row["size_bytes"]) if isinstance(row["size_bytes"], int) else "-"
        revision = str(row["revision"])
        revision = revision if len(revision) < 20 else revision[:12]
        lines.append(
            (
                str(row["model"]),
                revision,
                str(row["status"]),
                size,
                _ago(record.last_used_at),
                "yes" if row["pinned"] else "",
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    for line in lines:
        print("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip())
    total = sum(r.size_bytes or 0 for r in records)
    print(f"\n{len(records)} entries, {format_size(total)}")
    return 0


# -- prefetch ----------------------------------------------------------------------------------


async def _prefetch(settings: Settings, models: list[str]) -> int:
    failed = 0
    async with open_services(settings) as services:
        for text in models:
            try:
                ref = parse_model_arg(text, settings.revision)
                entry = await services.fetcher.lookup(ref)
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_report_progress, services.fetcher, entry)
                    await services.fetcher.prefetch(entry)
                    nursery.cancel_scope.cancel()
                log.info("%s: cached (%s, %s)", text, entry.commit[:12], format_size(entry.size))
            except MxfsError as exc:
                failed += 1
                log.error("%s: %s", text, exc)
    return 1 if failed else 0


async def _report_progress(fetcher, entry) -> None:
    tty = sys.stderr.isatty()
    while True:
        await trio.sleep(0.2 if tty else 5.0)
        have, total = fetcher.progress(entry)
        pct = 100.0 * have / total if total else 100.0
        if tty:
            width = 30
            filled = int(width * pct / 100)
            sys.stderr.write(f"\r{entry} [{'#' * filled}{'.' * (width - filled)}] {pct:5.1f}% {format_size(have)}")
            sys.stderr.flush()
        else:
            log.info("%s: %.1f%% (%s of %s)", entry, pct, format_size(have), format_size(total))


# -- gc, evict, pin ------------------------------------------------------------------------------


def _print_report(report: Report) -> None:
    verb = "would evict" if report.dry_run else "evicted"
    for victim in report.evicted:
        repo_id, commit = parse_entry_name(victim.name)
        print(f"{verb} {repo_id}@{commit[:12]}  {format_size(victim.size)}  ({victim.reason})")
    for name, why in report.skipped:
        repo_id, commit = parse_entry_name(name)
        print(f"kept {repo_id}@{commit[:12]}: {why}")
    print(
        f"{len(report.evicted)} entries, {format_size(report.bytes_freed)} {'to free' if report.dry_run else 'freed'}"
    )


async def _gc(settings: Settings, dry_run: bool) -> int:
    registry = await open_registry(settings.registry_url)
    try:
        report = await make_evictor(settings, registry, HubCache(settings.cache_dir)).cycle(dry_run=dry_run)
    finally:
        await registry.aclose()
    _print_report(report)
    return 0


async def _entry_names(settings: Settings, registry, models: list[str]) -> tuple[list[str], list[str]]:
    """Registry names for ``org/name`` (every entry of the repo) or ``org/name@rev`` (that commit,
    resolved from what this node recorded, so no Hub call is needed); and the arguments matching none."""
    records = ours(await registry.list_by_last_used())
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


async def _evict(settings: Settings, models: list[str], force: bool) -> int:
    registry = await open_registry(settings.registry_url)
    try:
        names, unmatched = await _entry_names(settings, registry, models)
        report = await make_evictor(settings, registry, HubCache(settings.cache_dir)).evict(names, force=force)
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
            repo_id, commit = parse_entry_name(name)
            print(f"{'pinned' if pinned else 'unpinned'} {repo_id}@{commit[:12]}")
    finally:
        await registry.aclose()
    for text in unmatched:
        print(f"{text}: not in the cache", file=sys.stderr)
    return 1 if unmatched else 0
