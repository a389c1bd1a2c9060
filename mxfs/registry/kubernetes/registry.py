"""The registry on the Kubernetes API: one ``ModelCacheEntry`` object per entry (DESIGN section 3).

Schema (``deploy/crd.yaml``): ``modelexpress.nvidia.com/v1alpha1``, kind ``ModelCacheEntry``,
plural ``modelcacheentries``, short name ``mxcache``, namespaced::

    metadata.name   mx-cache-<DNS-1123 sanitized "provider/entry">-<12 hex of its sha256>
    spec            modelName (the entry name, mx1:<commit>:-:<org>/<name>), provider
    status          phase (Downloading | Downloaded | Error), createdAt, lastUsedAt, message,
                    claimId, leaseExpiresAt, leaseDurationSeconds; mxfs's pinned and sizeBytes

Timestamps are RFC 3339 in UTC with milliseconds (``2026-04-22T10:00:00.123Z``).

How each operation stays atomic without a server-side script:

- Claim = create.  Of N concurrent creates of one name exactly one gets 201; the others get 409
  AlreadyExists and read what is there.
- Every other change is read, decide, then replace (PUT) carrying the ``resourceVersion`` that
  was read.  A 409 Conflict (someone wrote in between) or 404 means the decision was made on
  stale data: re-read and decide again.  Deletes that depend on what was read
  (``delete_if_unchanged``, ``unlock``) carry ``preconditions.resourceVersion`` likewise.
- The CRD has no status subresource, on purpose: with one, the API server drops ``.status`` on
  create, so a claim would be a create followed by a status update, and a claimer that died in
  between would leave an entry with no phase and no owner.  Spec and status are written together.

Leases are judged on the local clock, never by comparing clocks across nodes.  ``leaseExpiresAt``
is the holder's own idea of its deadline (shown to humans, never compared with our clock);
what counts is that the holder keeps rewriting it.  This process remembers, per entry, the
``(claimId, leaseExpiresAt)`` it last saw and when (trio's monotonic clock) it first saw that
value; once the value has stood unchanged for the holder's ``leaseDurationSeconds``, the holder
is presumed dead and the next ``try_claim`` takes over (a fenced replace, so of two takers only
one wins).  Every read of an entry feeds this memory, so a node waiting on a download (polling
``get_status``) is ready to take over as soon as the lease has lapsed in its own eyes.  The price
is that a node that first looks at an abandoned entry waits one more lease before taking it
over.  A record without ``leaseDurationSeconds`` (written by another tool) is judged by the
caller's lease.

Named locks (the eviction sweep's) are ``coordination.k8s.io/v1`` ``Lease`` objects named
``mxfs-lock-<sanitized name>-<hash>``: the built-in type for exactly this, which keeps locks out
of ``kubectl get mxcache`` and out of any ModelExpress server's view of the entries.  A lease's
``holderIdentity`` is the owner; liveness is judged like an entry's, on the local clock, by its
``resourceVersion`` changing (only the holder writes it); its exact ttl is kept in an annotation
because ``leaseDurationSeconds`` holds whole seconds.

Waiters are woken by a watch (:meth:`KubernetesRegistry.listen_finished`): one list, then a
watch of ModelCacheEntry objects from the listing's resourceVersion, resumed from the last
version seen whenever the server ends it (every :data:`WATCH_TIMEOUT`, or when it restarts), and
re-listed when that version is too old (410 Gone).  Every event feeds the lease memory above as
a read does, so a waiter judges an owner's heartbeat without polling it.

Ref records (``mxfs refresh``, followed by every node) live in one ConfigMap, ``mxfs-refs``: a
data key per ref (``ref-<sanitized repo@revision>-<hash>``, value JSON ``{"repoId", "revision",
"commit", "version", "recordedAt"}``) and ``version``, the counter that numbers them.  A change
is a resourceVersion-fenced replace like any other, and followers poll it with one GET.  A
ConfigMap rather than a custom resource: refs are not entries, and a ModelExpress server listing
ModelCacheEntry objects must not meet them.

Peer holders (the nodes that serve an entry to their peers) live in a ConfigMap per entry,
``mxfs-holders-<sanitized provider/entry>-<hash>``, labelled ``app.kubernetes.io/component:
peer-holders`` and annotated with the entry's name: a data key per node
(``node-<sanitized node id>-<hash>``, value JSON ``{"node", "address", "complete", "expiresAt",
"ttlSeconds"}``).  Like a claim's lease, a holder's expiry is judged on the local clock: it has
expired once its value has stood unchanged for ``ttlSeconds`` since this process first saw it
(the writer changes ``expiresAt`` with every put), so the ``expires_at`` a node reports is its own
wall clock plus what is left of the ttl in its own eyes.  A node that first looks at a dead
holder lists it for one more ttl.  Expired holders are removed by the node that finds them
(one fenced replace, not retried: the next read tries again), and a ConfigMap left without
holders is deleted (fenced too), so an entry nobody holds leaves nothing behind.

Verbs used, and so granted by ``deploy/rbac.yaml``: get, list, watch, create, update and delete
on ``modelcacheentries``; get, create, update and delete on ``leases``; get, create, update and
delete on ``configmaps``.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import math
import random
import re
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Generic, TypeVar
from urllib.parse import parse_qsl, urlsplit

import trio

from mxfs.registry.base import (
    PROVIDER,
    AlreadyExists,
    Claimed,
    ClaimOutcome,
    Holder,
    Record,
    RefRecord,
    RegistryBackend,
    RegistryError,
    Status,
    StatusCounts,
    check_final,
    check_seconds,
    holder_order,
    redact_url,
)
from mxfs.registry.kubernetes.api import ApiError, KubeApi, Resource
from mxfs.registry.kubernetes.config import ClusterConfig, load_config

T = TypeVar("T")

log = logging.getLogger(__name__)

GROUP = "modelexpress.nvidia.com"
VERSION = "v1alpha1"
ENTRIES = Resource(GROUP, VERSION, "modelcacheentries", "ModelCacheEntry")
LEASES = Resource("coordination.k8s.io", "v1", "leases", "Lease")
CONFIG_MAPS = Resource("", "v1", "configmaps", "ConfigMap")
# The ConfigMap of ref records (``mxfs refresh``): one data key per ref, and the version counter.
REFS_OBJECT = "mxfs-refs"
REFS_VERSION_KEY = "version"
REF_KEY_PREFIX = "ref-"
# A ConfigMap per entry of the nodes that serve it to their peers: one data key per node.
HOLDERS_PREFIX = "mxfs-holders-"
HOLDER_KEY_PREFIX = "node-"
COMPONENT_LABEL = "app.kubernetes.io/component"
HOLDERS_COMPONENT = "peer-holders"
HOLDERS_ENTRY_ANNOTATION = f"{GROUP}/model-name"
SHORT_NAME = "mxcache"
ENTRY_PREFIX = "mx-cache-"
LOCK_PREFIX = "mxfs-lock-"
MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
MANAGED_BY = "mxfs"
# A Lease's leaseDurationSeconds is whole seconds; the exact ttl (the tests use fractions) is here.
LOCK_TTL_ANNOTATION = f"{GROUP}/lock-ttl-seconds"

PHASES = {Status.DOWNLOADING: "Downloading", Status.DOWNLOADED: "Downloaded", Status.ERROR: "Error"}
_STATUSES = {phase: status for status, phase in PHASES.items()}

# Longest object name Kubernetes accepts (a DNS-1123 subdomain), and the hash length in names.
MAX_NAME_LENGTH = 253
HASH_LENGTH = 12
# How long one watch runs before the server ends it and we resume it (client-go picks 5-10 min;
# shorter keeps a silently dead connection from hiding events for long).
WATCH_TIMEOUT = 300.0
MAX_REWATCH_DELAY = 30.0
MIN_WATCH = 1.0
# Conflicts mean other writers made progress; this many in a row on one object means something is
# badly wrong (or thousands of nodes touch one entry at once).
MAX_ATTEMPTS = 50

_MS = timedelta(milliseconds=1)
_US = timedelta(microseconds=1)
_NAMESPACE_RE = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")


# -- names ---------------------------------------------------------------------------------------


def object_name(prefix: str, original: str) -> str:
    """``<prefix><sanitized original>-<12 hex of sha256(original)>``, a valid DNS-1123 subdomain.

    Sanitizing lowercases and turns every run of other characters into one ``-`` (dots too, so
    no label can start or end badly); the hash keeps names that sanitize alike (``Org/M`` and
    ``org/m``) apart, and keeps the name unique when the sanitized part is cut to fit 253
    characters.
    """
    sanitized = re.sub(r"[^a-z0-9]+", "-", original.lower()).strip("-")
    digest = hashlib.sha256(original.encode()).hexdigest()[:HASH_LENGTH]
    room = MAX_NAME_LENGTH - len(prefix) - 1 - HASH_LENGTH
    sanitized = sanitized[:room].rstrip("-")
    return f"{prefix}{sanitized}-{digest}" if sanitized else f"{prefix}{digest}"


def entry_object_name(name: str, provider: str = PROVIDER) -> str:
    """The ModelCacheEntry name of entry ``name`` (``mx1:<commit>:-:<org>/<name>``)."""
    return object_name(ENTRY_PREFIX, f"{provider}/{name}")


def lock_object_name(name: str) -> str:
    """The Lease name of the named lock."""
    return object_name(LOCK_PREFIX, name)


def ref_key(repo_id: str, revision: str) -> str:
    """The data key of a ref record in the ``mxfs-refs`` ConfigMap (keys allow ``[-._a-zA-Z0-9]``)."""
    return object_name(REF_KEY_PREFIX, f"{repo_id}\n{revision}")


def holders_object_name(name: str, provider: str = PROVIDER) -> str:
    """The ConfigMap name of entry ``name``'s holders."""
    return object_name(HOLDERS_PREFIX, f"{provider}/{name}")


def holder_key(node: str) -> str:
    """The data key of a node in a holders ConfigMap."""
    return object_name(HOLDER_KEY_PREFIX, node)


# -- time ----------------------------------------------------------------------------------------


def _now() -> datetime:
    """This node's wall clock, cut to the millisecond that timestamps are stored at."""
    now = datetime.now(UTC)
    return now.replace(microsecond=now.microsecond // 1000 * 1000)


def format_time(when: datetime) -> str:
    """RFC 3339, UTC, milliseconds: ``2026-04-22T10:00:00.123Z``."""
    when = when.astimezone(UTC)
    return when.strftime("%Y-%m-%dT%H:%M:%S.") + f"{when.microsecond // 1000:03d}Z"


def _micro_time(when: datetime) -> str:
    """Kubernetes' MicroTime, what a Lease's acquireTime and renewTime hold."""
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_time(value: Any) -> datetime:
    """A timezone-aware UTC datetime from an RFC 3339 string; ValueError otherwise."""
    if not isinstance(value, str):
        raise ValueError(f"timestamp {value!r} is not a string")
    when = datetime.fromisoformat(value)
    if when.tzinfo is None:
        raise ValueError(f"timestamp {value!r} has no offset")
    return when.astimezone(UTC)


# -- liveness on the local clock -----------------------------------------------------------------


class LeaseObserver:
    """When this process first saw each lease holder's current heartbeat value.

    ``unchanged_for(key, value)`` is how long ``value`` has been what this process saw for
    ``key``, by trio's clock (monotonic, and a test's MockClock): 0 the first time and whenever
    it differs from the last sighting.  Nothing here reads another node's clock.
    """

    def __init__(self) -> None:
        self._seen: dict[str, tuple[Hashable, float]] = {}

    def unchanged_for(self, key: str, value: Hashable) -> float:
        now = trio.current_time()
        seen = self._seen.get(key)
        if seen is None or seen[0] != value:
            self._seen[key] = (value, now)
            return 0.0
        return now - seen[1]

    def forget(self, key: str) -> None:
        self._seen.pop(key, None)


# -- objects -------------------------------------------------------------------------------------


def _status_of(obj: dict[str, Any]) -> dict[str, Any]:
    status = obj.get("status")
    return status if isinstance(status, dict) else {}


def _phase(obj: dict[str, Any]) -> Status | None:
    return _STATUSES.get(_status_of(obj).get("phase"))


def _with_status(obj: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``obj`` with ``changes`` applied to its status (a None value removes the field)."""
    new = copy.deepcopy(obj)
    status = new.setdefault("status", {})
    for key, value in changes.items():
        if value is None:
            status.pop(key, None)
        else:
            status[key] = value
    return new


def _stamp(obj: dict[str, Any] | None, now: datetime) -> str:
    """``lastUsedAt`` for a write at ``now``: at least 1 ms past the stored one.

    Eviction's ``delete_if_unchanged`` must see every touch after its listing, even within one
    millisecond or when this node's clock is behind the last writer's.
    """
    if obj is not None:
        try:
            previous = parse_time(_status_of(obj).get("lastUsedAt"))
        except ValueError:
            pass
        else:
            now = max(now, previous + _MS)
    return format_time(now)


def _claim_fields(claim_id: str, lease: float, now: datetime) -> dict[str, Any]:
    return {
        "phase": PHASES[Status.DOWNLOADING],
        "claimId": claim_id,
        "leaseExpiresAt": format_time(now + timedelta(seconds=lease)),
        "leaseDurationSeconds": lease,
    }


# Fields that only a claimed (DOWNLOADING) record has, as changes that remove them.
_NO_CLAIM: dict[str, Any] = {"claimId": None, "leaseExpiresAt": None, "leaseDurationSeconds": None}


def _heartbeat(obj: dict[str, Any]) -> tuple[Any, Any]:
    """What a live owner keeps changing: its claim id and the lease deadline it last wrote."""
    status = _status_of(obj)
    return status.get("claimId"), status.get("leaseExpiresAt")


def _record(obj: dict[str, Any]) -> Record:
    """The record an object holds; ValueError if it is malformed."""
    spec = obj.get("spec") if isinstance(obj.get("spec"), dict) else {}
    status = _status_of(obj)
    model_name = spec.get("modelName")
    if not isinstance(model_name, str) or not model_name:
        raise ValueError("spec.modelName is missing")
    phase = _STATUSES.get(status.get("phase"))
    if phase is None:
        raise ValueError(f"unknown phase {status.get('phase')!r}")
    lease = status.get("leaseExpiresAt")
    size = status.get("sizeBytes")
    message = status.get("message")
    claim_id = status.get("claimId")
    return Record(
        model_name=model_name,
        provider=str(spec.get("provider", PROVIDER)),
        status=phase,
        created_at=parse_time(status.get("createdAt")),
        last_used_at=parse_time(status.get("lastUsedAt")),
        message=None if message is None else str(message),
        claim_id=None if claim_id is None else str(claim_id),
        lease_expires_at=None if lease is None else parse_time(lease),
        pinned=status.get("pinned") is True,
        size_bytes=None if size is None else int(size),
    )


# -- compare-and-set plans -----------------------------------------------------------------------


@dataclass(frozen=True)
class _Write:
    """One write of an entry object, and the status it leaves (None: it deletes the object).

    Calling it returns False when the object changed since the read (409) or vanished (404).
    """

    send: Callable[[], Awaitable[bool]]
    leaves: dict[str, Any] | None

    async def __call__(self) -> bool:
        return await self.send()

    def shows_in(self, obj: dict[str, Any] | None) -> bool:
        """Whether ``obj``, read after this write seemed to lose, is what the write itself left.

        The API client retries a 5xx or 429; when the first try was applied and only its answer
        was lost, the retry meets our own change as a 409 (or a 404 after a delete).  Our
        statuses carry millisecond timestamps and our claim id, so another writer leaving the
        very same status is not a coincidence to worry about.
        """
        if self.leaves is None:
            return obj is None
        return obj is not None and obj.get("status") == self.leaves


@dataclass(frozen=True)
class _Plan(Generic[T]):
    """What a decision made on one read amounts to: a result, and the write it needs (if any).

    When the write loses a race the decision is made again on a fresh read.
    """

    result: T
    write: _Write | None = None


def _done(result: T) -> _Plan[T]:
    return _Plan(result)


# -- the registry --------------------------------------------------------------------------------


class KubernetesRegistry(RegistryBackend):
    """The :class:`~mxfs.registry.base.Registry` on ModelCacheEntry objects; create it with :meth:`open`."""

    def __init__(self, api: KubeApi, url_for_logs: str) -> None:
        self.url_for_logs = url_for_logs
        self.namespace = api.namespace
        self._api = api
        self._observer = LeaseObserver()
        self._closed = False
        # Objects already warned about as malformed, so a periodic listing warns once.
        self._warned: set[str] = set()

    def __repr__(self) -> str:
        return f"<KubernetesRegistry {self.url_for_logs} at {redact_url(self._api.config.server)}>"

    @classmethod
    async def open(cls, url: str) -> KubernetesRegistry:
        """Load the cluster configuration, then check that the namespace's entries can be listed."""
        namespace, context = parse_url(url)
        config: ClusterConfig = await trio.to_thread.run_sync(load_config, context)
        namespace = namespace or config.namespace or "default"
        url_for_logs = f"kubernetes://{namespace}"
        server = redact_url(config.server)
        if config.server.startswith("http://") and (config.token or config.token_file):
            log.warning("registry %s: sending a bearer token over plain http to %s", url_for_logs, server)
        registry = cls(KubeApi(config, namespace, f"registry {url_for_logs}"), url_for_logs)
        try:
            await registry._api.probe(ENTRIES)
        except BaseException:
            await registry.aclose()
            raise
        log.debug("registry %s: connected to %s (%s, %s)", url_for_logs, server, config.source, config.auth)
        return registry

    # -- plumbing ----------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise RegistryError(f"registry {self.url_for_logs} is closed")

    async def _read(self, name: str) -> dict[str, Any] | None:
        """The entry's object (None if absent), after checking it is this entry's and noting its lease."""
        self._check_open()
        cr_name = entry_object_name(name)
        obj = await self._api.get(ENTRIES, cr_name)
        if obj is None:
            self._observer.forget(cr_name)
            return None
        model_name = (obj.get("spec") or {}).get("modelName")
        if model_name != name:
            raise RegistryError(
                f"registry {self.url_for_logs}: {ENTRIES.plural}/{cr_name} belongs to {model_name!r}, not {name!r}"
            )
        self._observe(cr_name, obj)
        return obj

    def _observe(self, cr_name: str, obj: dict[str, Any]) -> float:
        """Note the entry's lease heartbeat; how long it has stood unchanged in this process's eyes."""
        if _phase(obj) is Status.DOWNLOADING and _status_of(obj).get("leaseExpiresAt") is not None:
            return self._observer.unchanged_for(cr_name, _heartbeat(obj))
        self._observer.forget(cr_name)
        return 0.0

    async def _change(self, name: str, decide: Callable[[dict[str, Any] | None], _Plan[T]]) -> T:
        """Read the entry, decide, write; on a lost race (409/404) read again and decide again."""
        lost: _Plan[T] | None = None
        for attempt in range(MAX_ATTEMPTS):
            obj = await self._read(name)
            if lost is not None and lost.write is not None and lost.write.shows_in(obj):
                return lost.result  # it was applied after all; only its answer went missing
            plan = decide(obj)
            if plan.write is None or await plan.write():
                return plan.result
            lost = plan
            if attempt:
                # Several writers on one object: spread them out a little.
                await trio.sleep(random.uniform(0, 0.005 * min(attempt, 20)))
        raise RegistryError(f"registry {self.url_for_logs}: {name}: gave up after {MAX_ATTEMPTS} conflicting writes")

    def _create(self, name: str, status: dict[str, Any]) -> _Write:
        body = {
            "apiVersion": ENTRIES.api_version,
            "kind": ENTRIES.kind,
            "metadata": {
                "name": entry_object_name(name),
                "namespace": self.namespace,
                "labels": {MANAGED_BY_LABEL: MANAGED_BY},
            },
            "spec": {"modelName": name, "provider": PROVIDER},
            "status": status,
        }

        async def create() -> bool:
            return await self._api.create(ENTRIES, body) is not None

        return _Write(create, status)

    def _replace(self, obj: dict[str, Any], changes: dict[str, Any]) -> _Write:
        body = _with_status(obj, changes)

        async def replace() -> bool:
            return await self._api.replace(ENTRIES, body) is not None

        return _Write(replace, body["status"])

    def _delete(self, obj: dict[str, Any]) -> _Write:
        metadata = obj["metadata"]

        async def delete() -> bool:
            return await self._api.delete(ENTRIES, metadata["name"], metadata.get("resourceVersion"))

        return _Write(delete, None)

    def _to_record(self, obj: dict[str, Any]) -> Record:
        try:
            return _record(obj)
        except (ValueError, TypeError) as exc:
            name = (obj.get("metadata") or {}).get("name")
            raise RegistryError(f"registry {self.url_for_logs}: malformed {ENTRIES.plural}/{name}: {exc}") from None

    # -- reads -------------------------------------------------------------------------------------

    async def get_status(self, name: str) -> Status | None:
        obj = await self._read(name)
        if obj is None:
            return None
        # Only the phase: a waiter needs no more, and need not choke on a record another tool
        # wrote without, say, lastUsedAt.
        status = _phase(obj)
        if status is None:
            return self._to_record(obj).status  # raises RegistryError naming the bad phase
        return status

    async def get_record(self, name: str) -> Record | None:
        obj = await self._read(name)
        return None if obj is None else self._to_record(obj)

    async def _list(self) -> list[Record]:
        """Every readable HuggingFace record in the namespace, unsorted; warns once per malformed object."""
        self._check_open()
        records = []
        for obj in await self._api.list(ENTRIES):
            cr_name = str((obj.get("metadata") or {}).get("name"))
            try:
                record = _record(obj)
            except (ValueError, TypeError) as exc:
                if cr_name not in self._warned:
                    self._warned.add(cr_name)
                    log.warning(
                        "registry %s: skipping malformed %s/%s: %s", self.url_for_logs, ENTRIES.plural, cr_name, exc
                    )
                continue
            if record.provider != PROVIDER:
                continue  # another provider's entry (a ModelExpress server may keep those here too)
            self._observe(cr_name, obj)
            records.append(record)
        return records

    async def list_by_last_used(self, limit: int | None = None) -> list[Record]:
        if limit is not None and limit < 0:
            raise ValueError(f"limit must not be negative, got {limit}")
        records = await self._list()
        records.sort(key=lambda r: (r.last_used_at, r.model_name))
        return records if limit is None else records[:limit]

    async def status_counts(self) -> StatusCounts:
        statuses = [r.status for r in await self._list()]
        return StatusCounts(
            downloading=statuses.count(Status.DOWNLOADING),
            downloaded=statuses.count(Status.DOWNLOADED),
            error=statuses.count(Status.ERROR),
        )

    # -- claims ------------------------------------------------------------------------------------

    async def try_claim(self, name: str, claim_id: str, lease: float) -> ClaimOutcome:
        lease = check_seconds("lease", lease)

        def decide(obj: dict[str, Any] | None) -> _Plan[ClaimOutcome]:
            now = _now()
            if obj is None:
                stamp = format_time(now)
                fields = {**_claim_fields(claim_id, lease, now), "createdAt": stamp, "lastUsedAt": stamp}
                return _Plan(Claimed(), self._create(name, {**fields, "pinned": False}))
            record = self._to_record(obj)  # RegistryError if malformed: never overwrite what we cannot read
            if record.status is not Status.DOWNLOADING or not self._lease_lapsed(obj, lease):
                return _done(AlreadyExists(record.status, record.claim_id))
            log.info("registry %s: %s: lease of %s lapsed, taking over", self.url_for_logs, name, _heartbeat(obj)[0])
            changes = {
                **_claim_fields(claim_id, lease, now),
                "lastUsedAt": _stamp(obj, now),
                "message": None,
                "sizeBytes": None,
            }
            return _Plan(Claimed(), self._replace(obj, changes))

        return await self._change(name, decide)

    def _lease_lapsed(self, obj: dict[str, Any], caller_lease: float) -> bool:
        """Whether the owner's heartbeat has stood still for its whole lease, by our own clock.

        A DOWNLOADING record without a lease (written by ``set_status``, or by a tool that
        predates leases) has nothing that could lapse and is never taken over.
        """
        status = _status_of(obj)
        if status.get("leaseExpiresAt") is None:
            return False
        duration = status.get("leaseDurationSeconds")
        if not isinstance(duration, int | float) or isinstance(duration, bool) or duration <= 0:
            duration = caller_lease
        return self._observe(obj["metadata"]["name"], obj) >= duration

    async def refresh_claim(self, name: str, claim_id: str, lease: float) -> bool:
        lease = check_seconds("lease", lease)

        def decide(obj: dict[str, Any] | None) -> _Plan[bool]:
            if not self._owns(obj, claim_id):
                return _done(False)
            assert obj is not None
            fields = _claim_fields(claim_id, lease, _now())
            if fields["leaseExpiresAt"] == _status_of(obj).get("leaseExpiresAt"):
                # Observers watch this value change: a refresh within the same millisecond must
                # still change it.
                fields["leaseExpiresAt"] = format_time(parse_time(fields["leaseExpiresAt"]) + _MS)
            return _Plan(True, self._replace(obj, fields))

        return await self._change(name, decide)

    @staticmethod
    def _owns(obj: dict[str, Any] | None, claim_id: str) -> bool:
        return obj is not None and _phase(obj) is Status.DOWNLOADING and _status_of(obj).get("claimId") == claim_id

    async def finish_claim(
        self,
        name: str,
        claim_id: str,
        status: Status,
        message: str | None = None,
        size_bytes: int | None = None,
    ) -> bool:
        check_final(status)

        def decide(obj: dict[str, Any] | None) -> _Plan[bool]:
            if not self._owns(obj, claim_id):
                return _done(False)
            assert obj is not None
            changes: dict[str, Any] = {
                "phase": PHASES[Status(status)],
                "message": message,
                "lastUsedAt": _stamp(obj, _now()),
                **_NO_CLAIM,
            }
            if size_bytes is not None:
                changes["sizeBytes"] = int(size_bytes)
            return _Plan(True, self._replace(obj, changes))

        return await self._change(name, decide)

    async def try_retake(self, name: str, claim_id: str, lease: float, from_status: Status) -> bool:
        lease = check_seconds("lease", lease)
        from_status = Status(from_status)

        def decide(obj: dict[str, Any] | None) -> _Plan[bool]:
            if obj is None or _phase(obj) is not from_status:
                return _done(False)
            now = _now()
            changes = {**_claim_fields(claim_id, lease, now), "lastUsedAt": _stamp(obj, now)}
            return _Plan(True, self._replace(obj, {**changes, "message": None, "sizeBytes": None}))

        return await self._change(name, decide)

    # -- other writes ------------------------------------------------------------------------------

    async def set_status(self, name: str, status: Status, message: str | None = None) -> None:
        status = Status(status)

        def decide(obj: dict[str, Any] | None) -> _Plan[None]:
            now = _now()
            fields: dict[str, Any] = {"phase": PHASES[status], "message": message, "lastUsedAt": _stamp(obj, now)}
            if obj is None:
                fields = {k: v for k, v in fields.items() if v is not None}
                return _Plan(None, self._create(name, {**fields, "createdAt": format_time(now), "pinned": False}))
            if status is not Status.DOWNLOADING:
                # A final status has no owner: it ends any claim (the old owner's writes then fail).
                fields.update(_NO_CLAIM)
            return _Plan(None, self._replace(obj, fields))

        await self._change(name, decide)

    async def touch(self, name: str) -> None:
        def decide(obj: dict[str, Any] | None) -> _Plan[None]:
            if obj is None:
                return _done(None)
            return _Plan(None, self._replace(obj, {"lastUsedAt": _stamp(obj, _now())}))

        await self._change(name, decide)

    async def delete(self, name: str) -> None:
        self._check_open()
        cr_name = entry_object_name(name)
        await self._api.delete(ENTRIES, cr_name)
        self._observer.forget(cr_name)

    async def delete_if_unchanged(self, name: str, status: Status, last_used_at: datetime) -> bool:
        if last_used_at.tzinfo is None:
            raise ValueError("a naive datetime cannot be compared with registry timestamps")
        status = Status(status)

        def decide(obj: dict[str, Any] | None) -> _Plan[bool]:
            if obj is None:
                return _done(False)
            record = self._to_record(obj)
            if record.status is not status or record.last_used_at != last_used_at:
                return _done(False)
            return _Plan(True, self._delete(obj))

        return await self._change(name, decide)

    async def set_pinned(self, name: str, pinned: bool) -> bool:
        def decide(obj: dict[str, Any] | None) -> _Plan[bool]:
            if obj is None:
                return _done(False)
            if _status_of(obj).get("pinned") is pinned:
                return _done(True)
            return _Plan(True, self._replace(obj, {"pinned": bool(pinned)}))

        return await self._change(name, decide)

    # -- refs --------------------------------------------------------------------------------------

    async def record_ref(self, repo_id: str, revision: str, commit: str) -> RefRecord:
        key = ref_key(repo_id, revision)
        for _ in range(MAX_ATTEMPTS):
            self._check_open()
            obj = await self._api.get(CONFIG_MAPS, REFS_OBJECT)
            data = dict((obj or {}).get("data") or {})
            stored = _ref_record(data.get(key))
            if stored is not None and stored.commit == commit:
                return stored  # also a write of ours whose answer was lost, found on the re-read
            record = RefRecord(repo_id, revision, commit, _refs_version(obj) + 1, _now())
            data[key] = json.dumps(
                {
                    "repoId": repo_id,
                    "revision": revision,
                    "commit": commit,
                    "version": record.version,
                    "recordedAt": format_time(record.recorded_at),
                }
            )
            data[REFS_VERSION_KEY] = str(record.version)
            if obj is None:
                body = {
                    "apiVersion": CONFIG_MAPS.api_version,
                    "kind": CONFIG_MAPS.kind,
                    "metadata": {
                        "name": REFS_OBJECT,
                        "namespace": self.namespace,
                        "labels": {MANAGED_BY_LABEL: MANAGED_BY},
                    },
                    "data": data,
                }
                if await self._api.create(CONFIG_MAPS, body) is not None:
                    return record
            elif await self._api.replace(CONFIG_MAPS, {**obj, "data": data}) is not None:
                return record
        raise RegistryError(f"registry {self.url_for_logs}: refs: gave up after {MAX_ATTEMPTS} conflicts")

    async def refs_version(self) -> int:
        self._check_open()
        return _refs_version(await self._api.get(CONFIG_MAPS, REFS_OBJECT))

    async def refs_since(self, version: int) -> list[RefRecord]:
        self._check_open()
        obj = await self._api.get(CONFIG_MAPS, REFS_OBJECT)
        data = (obj or {}).get("data") or {}
        records = [_ref_record(value) for key, value in data.items() if key.startswith(REF_KEY_PREFIX)]
        return sorted((r for r in records if r is not None and r.version > version), key=lambda r: r.version)

    # -- peer holders ------------------------------------------------------------------------------

    async def put_holder(self, name: str, node: str, address: str, complete: bool, ttl: float) -> None:
        ttl = check_seconds("ttl", ttl)
        cm_name = holders_object_name(name)
        key = holder_key(node)
        for attempt in range(MAX_ATTEMPTS):
            obj = await self._read_holders(name, cm_name)
            data = dict((obj or {}).get("data") or {})
            expires_at = format_time(_now() + timedelta(seconds=ttl))
            previous = _holder_value(data.get(key))
            if previous is not None and previous.get("expiresAt") == expires_at:
                # Observers watch the value change: a put within the same millisecond must still change it.
                expires_at = format_time(parse_time(expires_at) + _MS)
            value = json.dumps(
                {
                    "node": node,
                    "address": address,
                    "complete": bool(complete),
                    "expiresAt": expires_at,
                    "ttlSeconds": ttl,
                },
                sort_keys=True,
            )
            data[key] = value
            if obj is None:
                written = await self._api.create(CONFIG_MAPS, self._new_holders(name, cm_name, data))
            else:
                written = await self._api.replace(CONFIG_MAPS, {**obj, "data": data})
            if written is not None:
                # Our own write is a sighting: the ttl runs from now in this process's eyes.
                self._observer.forget(_holder_seen_key(cm_name, key))
                self._observer.unchanged_for(_holder_seen_key(cm_name, key), value)
                return
            if attempt:
                await trio.sleep(random.uniform(0, 0.005 * min(attempt, 20)))
        raise RegistryError(f"registry {self.url_for_logs}: holders of {name}: gave up after {MAX_ATTEMPTS} conflicts")

    async def drop_holder(self, name: str, node: str) -> None:
        cm_name = holders_object_name(name)
        key = holder_key(node)
        for attempt in range(MAX_ATTEMPTS):
            obj = await self._read_holders(name, cm_name)
            data = dict((obj or {}).get("data") or {})
            if obj is None or key not in data:
                self._observer.forget(_holder_seen_key(cm_name, key))
                return
            del data[key]
            if await self._write_holders(obj, data):
                self._observer.forget(_holder_seen_key(cm_name, key))
                return
            if attempt:
                await trio.sleep(random.uniform(0, 0.005 * min(attempt, 20)))
        raise RegistryError(f"registry {self.url_for_logs}: holders of {name}: gave up after {MAX_ATTEMPTS} conflicts")

    async def holders(self, name: str) -> list[Holder]:
        cm_name = holders_object_name(name)
        obj = await self._read_holders(name, cm_name)
        if obj is None:
            return []
        data: dict[str, Any] = obj.get("data") or {}
        now = _now()
        live: list[Holder] = []
        expired: list[str] = []
        for key, value in data.items():
            if not key.startswith(HOLDER_KEY_PREFIX):
                continue
            holder = _holder_value(value)
            ttl = _holder_ttl(holder)
            if holder is None or ttl is None or not isinstance(holder.get("address"), str):
                if f"{cm_name}/{key}" not in self._warned:
                    self._warned.add(f"{cm_name}/{key}")
                    log.warning("registry %s: configmaps/%s: skipping malformed %s", self.url_for_logs, cm_name, key)
                continue
            quiet_for = self._observer.unchanged_for(_holder_seen_key(cm_name, key), value)
            if quiet_for >= ttl:
                expired.append(key)
                continue
            node = holder.get("node")
            live.append(
                Holder(
                    node=node if isinstance(node, str) else key,
                    address=holder["address"],
                    complete=holder.get("complete") is True,
                    expires_at=now + timedelta(seconds=ttl - quiet_for),
                )
            )
        if expired:
            # One try: a lost race means another writer was here, and the next read prunes again.
            remaining = {k: v for k, v in data.items() if k not in expired}
            if await self._write_holders(obj, remaining):
                for key in expired:
                    self._observer.forget(_holder_seen_key(cm_name, key))
        return sorted(live, key=holder_order)

    async def _read_holders(self, name: str, cm_name: str) -> dict[str, Any] | None:
        """The entry's holders ConfigMap (None if absent), after checking it is this entry's."""
        self._check_open()
        obj = await self._api.get(CONFIG_MAPS, cm_name)
        if obj is None:
            return None
        owner = ((obj.get("metadata") or {}).get("annotations") or {}).get(HOLDERS_ENTRY_ANNOTATION)
        if owner != name:
            raise RegistryError(
                f"registry {self.url_for_logs}: configmaps/{cm_name} belongs to {owner!r}, not {name!r}"
            )
        return obj

    async def _write_holders(self, obj: dict[str, Any], data: dict[str, Any]) -> bool:
        """Replace the holders ConfigMap's data, or delete it once no holder is left; False if it changed meanwhile."""
        metadata = obj["metadata"]
        if not any(key.startswith(HOLDER_KEY_PREFIX) for key in data):
            return await self._api.delete(CONFIG_MAPS, metadata["name"], metadata.get("resourceVersion"))
        return await self._api.replace(CONFIG_MAPS, {**obj, "data": data}) is not None

    def _new_holders(self, name: str, cm_name: str, data: dict[str, Any]) -> dict[str, Any]:
        return {
            "apiVersion": CONFIG_MAPS.api_version,
            "kind": CONFIG_MAPS.kind,
            "metadata": {
                "name": cm_name,
                "namespace": self.namespace,
                "labels": {MANAGED_BY_LABEL: MANAGED_BY, COMPONENT_LABEL: HOLDERS_COMPONENT},
                "annotations": {HOLDERS_ENTRY_ANNOTATION: name},
            },
            "data": data,
        }

    # -- locks -------------------------------------------------------------------------------------

    async def try_lock(self, name: str, owner: str, ttl: float) -> bool:
        ttl = check_seconds("ttl", ttl)
        lease_name = lock_object_name(name)
        for _ in range(MAX_ATTEMPTS):
            self._check_open()
            obj = await self._api.get(LEASES, lease_name)
            if obj is None:
                if await self._api.create(LEASES, self._new_lock(lease_name, owner, ttl)) is not None:
                    return True
                continue
            spec = obj.get("spec") or {}
            holder = spec.get("holderIdentity")
            key = f"lease:{lease_name}"
            quiet_for = self._observer.unchanged_for(key, obj["metadata"].get("resourceVersion"))
            if holder and holder != owner and quiet_for < _lock_ttl(obj):
                return False
            if await self._api.replace(LEASES, _renewed_lock(obj, owner, ttl)) is not None:
                self._observer.forget(key)
                return True
        raise RegistryError(f"registry {self.url_for_logs}: lock {name}: gave up after {MAX_ATTEMPTS} conflicts")

    def _new_lock(self, lease_name: str, owner: str, ttl: float) -> dict[str, Any]:
        now = _micro_time(datetime.now(UTC))
        return {
            "apiVersion": LEASES.api_version,
            "kind": LEASES.kind,
            "metadata": {
                "name": lease_name,
                "namespace": self.namespace,
                "labels": {MANAGED_BY_LABEL: MANAGED_BY},
                "annotations": {LOCK_TTL_ANNOTATION: repr(ttl)},
            },
            "spec": {
                "holderIdentity": owner,
                "leaseDurationSeconds": max(1, math.ceil(ttl)),
                "acquireTime": now,
                "renewTime": now,
                "leaseTransitions": 0,
            },
        }

    async def unlock(self, name: str, owner: str) -> bool:
        lease_name = lock_object_name(name)
        for _ in range(MAX_ATTEMPTS):
            self._check_open()
            obj = await self._api.get(LEASES, lease_name)
            if obj is None or (obj.get("spec") or {}).get("holderIdentity") != owner:
                if obj is not None:
                    # A read is a sighting: it starts the clock on the holder's lease.
                    self._observer.unchanged_for(f"lease:{lease_name}", obj["metadata"].get("resourceVersion"))
                return False
            if await self._api.delete(LEASES, lease_name, obj["metadata"].get("resourceVersion")):
                return True
        raise RegistryError(f"registry {self.url_for_logs}: lock {name}: gave up after {MAX_ATTEMPTS} conflicts")

    # -- waiting -----------------------------------------------------------------------------------

    async def listen_finished(
        self, on_finished: Callable[[str], None], *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Call ``on_finished(name)`` for each entry any node finishes, until cancelled (the watch).

        Started at once: an API server that is down must not hold up the caller, whose waiters
        poll anyway.  A listing calls ``on_finished`` for every finished entry it holds, which
        wakes only those waited on, so a finish between two watches is never missed.
        """
        task_status.started()
        version: str | None = None  # where the next watch starts; None: list first
        failures = 0
        while not self._closed:
            try:
                if version is None:
                    objects, version = await self._api.list_at(ENTRIES)
                    for obj in objects:
                        self._seen_change(obj, on_finished)
                started = trio.current_time()
                version = await self._watch_from(version, on_finished)
                failures = 0
                if trio.current_time() - started < MIN_WATCH:
                    # A server that ends every watch at once must not be asked again at once.
                    await trio.sleep(MIN_WATCH)
            except RegistryError as exc:
                if isinstance(exc, ApiError) and exc.code == 410:
                    version = None  # too old (an HTTP 410 rather than an ERROR event)
                    continue
                failures += 1
                delay = min(2.0**failures, MAX_REWATCH_DELAY)
                log.debug("registry %s: watch failed (%s); again in %.0fs", self.url_for_logs, exc, delay)
                await trio.sleep(delay)

    async def _watch_from(self, version: str, on_finished: Callable[[str], None]) -> str | None:
        """One watch from ``version``; the version to resume from, or None to list again (410)."""
        async with contextlib.aclosing(self._api.watch(ENTRIES, version, WATCH_TIMEOUT)) as events:
            async for event in events:
                obj = event["object"]
                kind = event.get("type")
                if kind == "ERROR":
                    if obj.get("code") == 410:
                        log.debug(
                            "registry %s: watch expired (%s); listing again", self.url_for_logs, obj.get("message")
                        )
                        return None
                    raise RegistryError(f"registry {self.url_for_logs}: watch: {obj.get('message') or obj}")
                version = str((obj.get("metadata") or {}).get("resourceVersion") or version)
                if kind in ("ADDED", "MODIFIED"):
                    self._seen_change(obj, on_finished)
                elif kind == "DELETED":
                    self._observer.forget(str((obj.get("metadata") or {}).get("name")))
        return version

    def _seen_change(self, obj: dict[str, Any], on_finished: Callable[[str], None]) -> None:
        """An entry object as a list or watch shows it: note its lease, and say if it finished."""
        spec = obj.get("spec") if isinstance(obj.get("spec"), dict) else {}
        model_name = spec.get("modelName")
        if not isinstance(model_name, str) or spec.get("provider", PROVIDER) != PROVIDER:
            return
        self._observe(str((obj.get("metadata") or {}).get("name")), obj)
        if _phase(obj) in (Status.DOWNLOADED, Status.ERROR):
            on_finished(model_name)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        # The shield makes sure the connections go even when the caller is cancelled.
        with trio.CancelScope(shield=True):
            await self._api.aclose()


def _holder_seen_key(cm_name: str, key: str) -> str:
    """The lease observer's key for one holder (apart from entries' and locks')."""
    return f"holder:{cm_name}/{key}"


def _holder_value(value: Any) -> dict[str, Any] | None:
    """A holder's JSON value; None if absent or not an object."""
    try:
        data = json.loads(value)
    except (TypeError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _holder_ttl(holder: dict[str, Any] | None) -> float | None:
    """The holder's ttl in seconds; None if it has none that could be judged."""
    ttl = (holder or {}).get("ttlSeconds")
    if isinstance(ttl, bool) or not isinstance(ttl, int | float) or not math.isfinite(ttl) or ttl <= 0:
        return None
    return float(ttl)


def _refs_version(obj: dict[str, Any] | None) -> int:
    """The ref records' counter in the ``mxfs-refs`` ConfigMap (0 without one)."""
    try:
        return int(((obj or {}).get("data") or {}).get(REFS_VERSION_KEY) or 0)
    except ValueError:
        return 0


def _ref_record(value: Any) -> RefRecord | None:
    """A ref record from its ConfigMap value; None if absent or malformed (another tool's)."""
    try:
        data = json.loads(value)
        return RefRecord(
            str(data["repoId"]),
            str(data["revision"]),
            str(data["commit"]),
            int(data["version"]),
            parse_time(data["recordedAt"]),
        )
    except (TypeError, ValueError, KeyError):
        return None


def _lock_ttl(obj: dict[str, Any]) -> float:
    """The holder's ttl: the exact annotation, else the Lease's whole seconds."""
    annotations = (obj.get("metadata") or {}).get("annotations") or {}
    try:
        ttl = float(annotations[LOCK_TTL_ANNOTATION])
        if math.isfinite(ttl) and ttl > 0:
            return ttl
    except (KeyError, TypeError, ValueError):
        pass
    seconds = (obj.get("spec") or {}).get("leaseDurationSeconds")
    return float(seconds) if isinstance(seconds, int) and seconds > 0 else 0.0


def _renewed_lock(obj: dict[str, Any], owner: str, ttl: float) -> dict[str, Any]:
    """``obj`` held by ``owner`` for ``ttl`` from now: a renewal, or a takeover of a lapsed lock."""
    new = copy.deepcopy(obj)
    spec = new.setdefault("spec", {})
    now = _micro_time(datetime.now(UTC))
    if spec.get("holderIdentity") != owner:
        spec["holderIdentity"] = owner
        spec["acquireTime"] = now
        spec["leaseTransitions"] = int(spec.get("leaseTransitions") or 0) + 1
    spec["renewTime"] = now
    spec["leaseDurationSeconds"] = max(1, math.ceil(ttl))
    new.setdefault("metadata", {}).setdefault("annotations", {})[LOCK_TTL_ANNOTATION] = repr(ttl)
    return new


def parse_url(url: str) -> tuple[str | None, str | None]:
    """``(namespace, context)`` of ``kubernetes://[namespace][?context=NAME]``; ValueError if malformed.

    An empty namespace means the pod's own (in-cluster) or the kubeconfig context's, else
    ``default``.
    """
    shown = redact_url(url)
    try:
        parts = urlsplit(url)
    except ValueError:
        raise ValueError(f"invalid registry URL {shown!r}") from None
    if parts.scheme != "kubernetes":
        raise ValueError(f"not a kubernetes URL: {shown!r}")
    if "@" in parts.netloc or parts.port is not None:
        raise ValueError(
            f"kubernetes URL {shown!r}: write kubernetes://NAMESPACE; the API server comes from the"
            " service account or the kubeconfig"
        )
    if parts.path not in ("", "/") or parts.fragment:
        raise ValueError(f"kubernetes URL {shown!r}: only a namespace may follow kubernetes://")
    namespace = parts.netloc or None  # not .hostname, which would lowercase it
    if namespace is not None and (len(namespace) > 63 or not _NAMESPACE_RE.fullmatch(namespace)):
        raise ValueError(f"kubernetes URL {shown!r}: {namespace!r} is not a valid namespace name")
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    unknown = set(query) - {"context"}
    if unknown:
        raise ValueError(f"kubernetes URL {shown!r}: unknown option(s) {', '.join(sorted(unknown))}; only context=")
    return namespace, query.get("context") or None


async def open_url(url: str) -> KubernetesRegistry:
    """Open the registry named by a ``kubernetes:`` URL (the entry point ``open_registry`` uses)."""
    return await KubernetesRegistry.open(url)
