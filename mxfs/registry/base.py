"""The registry contract: records, claim outcomes and the protocol every backend implements.

The registry is the one place where nodes agree on who downloads an entry (a model at one
resolved commit) and when it was last used. It knows nothing of FUSE, the Hub or the cache.

Semantics follow ModelExpress's registry (see DESIGN section 3), with two changes that make
ownership safe: a claim carries a ``claim_id`` and a lease, and every owner-only write
(``refresh_claim``, ``finish_claim``) is fenced by that ``claim_id``, so an owner whose lease
expired and was taken over can no longer publish anything.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol, runtime_checkable
from urllib.parse import parse_qsl, urlencode, urlsplit

PROVIDER = "HuggingFace"


class Status(enum.StrEnum):
    DOWNLOADING = "DOWNLOADING"
    DOWNLOADED = "DOWNLOADED"
    ERROR = "ERROR"


@dataclass(frozen=True)
class Record:
    """One registry record. Timestamps are timezone-aware UTC datetimes."""

    model_name: str
    provider: str
    status: Status
    created_at: datetime
    last_used_at: datetime
    message: str | None = None
    claim_id: str | None = None
    lease_expires_at: datetime | None = None
    pinned: bool = False
    size_bytes: int | None = None


@dataclass(frozen=True)
class RefRecord:
    """Where a branch or tag points, as ``mxfs refresh`` last recorded it for the whole fleet.

    ``version`` orders every ref record of one registry: each change of any ref gets a version
    above all earlier ones, so a follower that remembers the last version it saw asks for what
    came after it (one cheap read when nothing did).  ``recorded_at`` is the backend's clock,
    shown to humans.
    """

    repo_id: str
    revision: str
    commit: str
    version: int
    recorded_at: datetime


@dataclass(frozen=True)
class Holder:
    """A node that serves an entry's files to its peers (issue 16: peers).

    Holders are not records: they live beside them, and nothing that lists, counts, evicts or
    deletes records sees or touches them.  A holder that stops refreshing itself expires
    (``expires_at``, by the backend's clock) and is no longer listed.
    """

    node: str
    """The node's id (mxfs uses its advertised base URL); opaque to the registry."""
    address: str
    """The base URL it serves at, e.g. ``http://10.0.0.5:7170``."""
    complete: bool
    """True: it holds every file of the entry, verified.  False: it is downloading the entry from
    the Hub now and serves the ranges it has."""
    expires_at: datetime
    """Timezone-aware UTC, from the backend's clock."""


def holder_order(holder: Holder) -> tuple[bool, str]:
    """The order ``holders`` lists in: complete holders first, then by node id."""
    return (not holder.complete, holder.node)


@dataclass(frozen=True)
class Claimed:
    """This caller now owns the download of the entry."""


@dataclass(frozen=True)
class AlreadyExists:
    """Somebody else has the entry; ``status`` is what the claim attempt saw."""

    status: Status
    # The running claim's id when ``status`` is DOWNLOADING, read in the same step: a waiter
    # tells from it whether the claimant is dead (mxfs.fetch.claimant) without another read.
    # Not part of equality: an outcome is its status.
    claim_id: str | None = field(default=None, compare=False)


ClaimOutcome = Claimed | AlreadyExists


@dataclass(frozen=True)
class StatusCounts:
    downloading: int = 0
    downloaded: int = 0
    error: int = 0


class RegistryError(Exception):
    """The registry could not be reached or answered with an error (not a semantic refusal)."""


def check_seconds(what: str, seconds: float) -> float:
    """A lease or lock time: a positive, finite number of seconds; ValueError otherwise."""
    if not (math.isfinite(seconds) and seconds > 0):
        raise ValueError(f"{what} must be a positive number of seconds, got {seconds!r}")
    return float(seconds)


def lease_ms(seconds: float) -> int:
    """A lease (or lock ttl) in whole milliseconds, at least one, as the backends store it."""
    return max(1, round(check_seconds("lease", seconds) * 1000))


def check_final(status: Status) -> None:
    """``finish_claim`` publishes an outcome: DOWNLOADED or ERROR, nothing else."""
    if status not in (Status.DOWNLOADED, Status.ERROR):
        raise ValueError(f"a claim finishes as DOWNLOADED or ERROR, not {status}")


_REDACTED = "***"
# Query parameters that some clients (redis-py among them) accept in place of userinfo.
_SECRET_QUERY_KEYS = frozenset({"password"})


def redact_url(url: str) -> str:
    """``url`` with any password replaced by ``***``, for logs and error messages.

    Edits the text in place rather than rebuilding the URL, which would normalize it
    (``urlunsplit`` turns ``sqlite:///a`` into ``sqlite:/a``).
    """
    try:
        parts = urlsplit(url)
    except ValueError:
        # Unparsable (say, an unbalanced IPv6 bracket): show nothing that could be a secret.
        return "<unparsable URL>"
    # Split as urlsplit does: the host after the last "@", the password after the first ":".
    userinfo, at, host = parts.netloc.rpartition("@")
    if at and ":" in userinfo:
        user = userinfo.split(":", 1)[0]
        url = url.replace(f"//{parts.netloc}", f"//{user}:{_REDACTED}@{host}", 1)
    query = parse_qsl(parts.query, keep_blank_values=True)
    if any(key in _SECRET_QUERY_KEYS for key, _ in query):
        redacted = [(key, _REDACTED if key in _SECRET_QUERY_KEYS else value) for key, value in query]
        url = url.replace(f"?{parts.query}", f"?{urlencode(redacted, safe='*')}", 1)
    return url


class Registry(Protocol):
    """What mxfs needs from a model registry. Every method is async and safe under trio.

    Backends that use blocking clients run them in ``trio.to_thread.run_sync`` with a
    ``CapacityLimiter``.  Time always comes from the backend's own clock (the database for
    SQLite, Redis ``TIME`` for Redis), never from the caller's, so nodes with skewed clocks agree
    on lease expiry.  Leases are given in seconds (floats; sub-second leases are allowed).
    Transport failures raise :class:`RegistryError`.
    """

    url_for_logs: str
    """The backend URL with any password replaced by ``***``."""

    async def get_status(self, name: str) -> Status | None: ...

    async def get_record(self, name: str) -> Record | None: ...

    async def set_status(self, name: str, status: Status, message: str | None = None) -> None:
        """Upsert status and message, stamping ``last_used_at``; keeps ``created_at`` and ``pinned``."""
        ...

    async def touch(self, name: str) -> None:
        """Set ``last_used_at`` to now. No-op for an unknown entry."""
        ...

    async def delete(self, name: str) -> None:
        """Remove the record. No-op for an unknown entry."""
        ...

    async def delete_if_unchanged(self, name: str, status: Status, last_used_at: datetime) -> bool:
        """Remove the record only if its status and ``last_used_at`` still equal the given ones.

        Eviction chooses victims from a listing and then deletes them; an entry touched (or
        re-claimed) in between must survive, so the comparison and the delete are one atomic step.
        """
        ...

    async def list_by_last_used(self, limit: int | None = None) -> list[Record]:
        """All records, oldest ``last_used_at`` first (ties broken by name), at most ``limit``."""
        ...

    async def status_counts(self) -> StatusCounts: ...

    async def try_claim(self, name: str, claim_id: str, lease: float) -> ClaimOutcome:
        """Atomically create the record as DOWNLOADING owned by ``claim_id``.

        If a record exists and is DOWNLOADING with an expired lease, take it over (new
        ``claim_id`` and lease; ``created_at`` kept) and return :class:`Claimed`.  Otherwise return
        :class:`AlreadyExists` with the status seen, changing nothing.  Of N concurrent callers
        exactly one gets :class:`Claimed`.
        """
        ...

    async def refresh_claim(self, name: str, claim_id: str, lease: float) -> bool:
        """Extend the lease to now + ``lease`` if ``claim_id`` still owns a DOWNLOADING record."""
        ...

    async def finish_claim(
        self,
        name: str,
        claim_id: str,
        status: Status,
        message: str | None = None,
        size_bytes: int | None = None,
    ) -> bool:
        """Publish the outcome (DOWNLOADED or ERROR) if ``claim_id`` still owns the record.

        Clears ``claim_id`` and the lease, stamps ``last_used_at``; returns False (and changes
        nothing) when the caller was fenced out by a takeover or the record is gone.
        """
        ...

    async def try_retake(self, name: str, claim_id: str, lease: float, from_status: Status) -> bool:
        """Compare-and-set: if the record's status is ``from_status``, make it DOWNLOADING owned by
        ``claim_id`` with a fresh lease and return True; otherwise change nothing and return False.

        Used to retry an ERROR entry, and to re-download a DOWNLOADED entry whose files vanished,
        with exactly one winner among concurrent callers.
        """
        ...

    async def try_reset_error_for_retry(self, name: str, claim_id: str, lease: float) -> bool:
        """Retry an ERROR entry: ``try_retake`` from ERROR, under ModelExpress's name for it.

        Every backend has it from :class:`RegistryBackend`.
        """
        ...

    async def set_pinned(self, name: str, pinned: bool) -> bool:
        """Pin or unpin an entry; False if the entry is unknown."""
        ...

    async def try_lock(self, name: str, owner: str, ttl: float) -> bool:
        """Take the named lock for ``ttl`` seconds if it is free, expired or already ``owner``'s.

        Used so that one node at a time sweeps the cache for eviction; a holder that dies loses
        it when the ttl runs out.
        """
        ...

    async def unlock(self, name: str, owner: str) -> bool:
        """Release the named lock if ``owner`` holds it; False otherwise (changing nothing)."""
        ...

    async def record_ref(self, repo_id: str, revision: str, commit: str) -> RefRecord:
        """Record that ``revision`` of ``repo_id`` resolves to ``commit`` (``mxfs refresh``).

        A change gets the next version, above every earlier ref record of this registry;
        recording the commit already recorded changes nothing (waking no follower) and returns
        the stored record.  Concurrent recorders of one ref each get a distinct version, and the
        stored record is the one with the highest.
        """
        ...

    async def refs_version(self) -> int:
        """The highest version of any ref record, 0 when there is none: what followers poll."""
        ...

    async def refs_since(self, version: int) -> list[RefRecord]:
        """The ref records whose version is above ``version``, lowest version first."""
        ...

    async def put_holder(self, name: str, node: str, address: str, complete: bool, ttl: float) -> None:
        """Record that ``node`` serves entry ``name`` at ``address`` until now + ``ttl`` seconds.

        An upsert: putting again refreshes the expiry and may change ``address`` and
        ``complete``.  ``ttl`` is a positive, finite number of seconds (ValueError otherwise).
        """
        ...

    async def drop_holder(self, name: str, node: str) -> None:
        """Forget that ``node`` holds ``name``. No-op when it is not listed."""
        ...

    async def holders(self, name: str) -> list[Holder]:
        """The unexpired holders of ``name``: complete ones first, then by node id; [] for none.

        Expired holders are never returned; the backend prunes them as it meets them.
        """
        ...

    async def aclose(self) -> None: ...


class RegistryBackend:
    """The base of every backend: the operations written once, on top of the ones each backend has."""

    async def try_retake(self, name: str, claim_id: str, lease: float, from_status: Status) -> bool:
        raise NotImplementedError

    async def try_reset_error_for_retry(self, name: str, claim_id: str, lease: float) -> bool:
        return await self.try_retake(name, claim_id, lease, Status.ERROR)


@runtime_checkable
class FinishNotifier(Protocol):
    """A registry that can say when an entry finishes on any node (Redis: pub/sub; Kubernetes: a watch).

    Optional: waiters poll the registry anyway, so a backend without it (SQLite, whose waiters
    share the owner's node) only makes them notice a finish one poll later.
    """

    async def listen_finished(self, on_finished: Callable[[str], None], *, task_status: Any = ...) -> None:
        """Call ``on_finished(entry name)`` for each entry finished DOWNLOADED or ERROR, until
        cancelled; ``task_status.started()`` at once (a registry that is down must not hold up
        the caller), then keep (re)subscribing in the background."""
        ...
