"""Which registry entries a model argument names, and ``eviction.pinned`` kept in the registry.

``mxfs pin``, ``unpin`` and ``evict`` and the config's pin list all name models as
``org/name`` (every cached commit of the repo) or ``org/name@rev``; the registry pins entries.
"""

from __future__ import annotations

import logging

import trio

from mxfs.cache import HubCache
from mxfs.config import Settings
from mxfs.names import EntryName, entry_label, parse_model_arg
from mxfs.registry import Record, Registry, RegistryError
from mxfs.statedir import StateDir, recorded_commit

log = logging.getLogger(__name__)

# How often eviction.pinned is applied to the registry again, so that a model downloaded after
# start-up is pinned well within the in-use grace period (10m by default) that protects it meanwhile.
PIN_INTERVAL = 60.0


def match_entries(settings: Settings, records: list[Record], models: list[str]) -> tuple[list[str], list[str]]:
    """Registry names for ``org/name`` (every entry of the repo) or ``org/name@rev`` (that commit,
    resolved from what this node recorded, so no Hub call is needed); and the arguments matching none.

    Blocking (reads the state dir): call it from a thread in async code.
    """
    entries = [name for record in records if (name := EntryName.parse(record.model_name)) is not None]
    state, cache = StateDir(settings.state_dir), HubCache(settings.cache_dir)
    names: list[str] = []
    unmatched: list[str] = []
    for text in models:
        ref = parse_model_arg(text, settings.revision)
        explicit = "@" in text
        commit = None
        if explicit:
            commit = ref.revision if ref.revision_is_commit else None
            commit = commit or recorded_commit(state, cache, ref.repo_id, ref.revision)
        found = [
            entry.key for entry in entries if entry.repo_id == ref.repo_id and (not explicit or entry.commit == commit)
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
            log.info("%s: pinned (eviction.pinned)", entry_label(name))
            newly.append(name)
    return newly


async def keep_pins(
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
