"""One claim on one entry (DESIGN section 5): win it, keep its lease while the download runs,
and record the outcome, in one place.

    claim = Claim(registry, entry, lease)
    if await claim.acquire():
        async with claim.held(on_lost=...) as lease:
            ...  # download; cancelled the moment the lease cannot be trusted

Leaving ``held`` records the outcome in the registry: DOWNLOADED when the body ends normally,
ERROR with the message of a domain error it raises, ERROR "interrupted" when it is cancelled
from outside (the daemon stopping: the claim is handed back now rather than left to lapse).
A lost lease records nothing (the claim is someone else's) and raises :class:`LeaseLost`.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import trio

from mxfs.errors import MxfsError, RegistryUnavailable, domain_errors_ungrouped
from mxfs.fetch.claimant import dead_claimant, new_claim_id
from mxfs.fetch.entry import Entry
from mxfs.fetch.lease import LeaseKeeper
from mxfs.registry import AlreadyExists, Claimed, Registry, RegistryError, Status

log = logging.getLogger(__name__)

# How long a stopping daemon tries to hand its running claims back.
RELEASE_TIMEOUT = 2.0


class LeaseLost(Exception):
    """The lease could not be renewed (taken over, or the registry unreachable for too long)."""


class Claim:
    """This node's bid for one entry: a fresh claim id per attempt."""

    def __init__(self, registry: Registry, entry: Entry, lease: float) -> None:
        self.registry = registry
        self.entry = entry
        self.lease = lease
        self.id = new_claim_id()

    async def acquire(self) -> bool:
        """One round of the claim protocol; True if this node now owns the entry's download."""
        name = self.entry.registry_key
        try:
            outcome = await self.registry.try_claim(name, self.id, self.lease)
            if isinstance(outcome, Claimed):
                return True
            assert isinstance(outcome, AlreadyExists)
            if outcome.status == Status.DOWNLOADED:
                # The registry says done but our cache lacks files: they vanished. Re-download.
                return await self.registry.try_retake(name, self.id, self.lease, Status.DOWNLOADED)
            if outcome.status == Status.ERROR:
                return await self.registry.try_reset_error_for_retry(name, self.id, self.lease)
            return await self._take_over_from_the_dead(outcome.claim_id)
        except RegistryError as exc:
            raise RegistryUnavailable(f"{self.entry}: registry unavailable: {exc}") from exc

    async def _take_over_from_the_dead(self, running: str | None) -> bool:
        """The entry is DOWNLOADING under the claim ``running``: if its claimant was a process of
        this host that is gone (a daemon killed and restarted), end its claim and take the
        download over now, rather than wait out its lease (see mxfs.fetch.claimant); True if
        this claim owns it now.  Waiters call this every poll: it reads nothing more."""
        if running is None or (who := dead_claimant(running)) is None:
            return False
        name = self.entry.registry_key
        why = f"the process that was downloading it ({who}) is gone"
        if not await self.registry.finish_claim(name, running, Status.ERROR, why):
            return False  # taken over meanwhile
        log.info("%s: %s; taking the download over", self.entry, why)
        return await self.registry.try_reset_error_for_retry(name, self.id, self.lease)

    @asynccontextmanager
    async def held(self, on_lost: Callable[[], None] | None = None) -> AsyncIterator[LeaseKeeper]:
        """Keep the lease while the body runs; see the module docstring for what leaving does.

        ``on_lost`` runs the moment the lease stops being trusted, before the body has wound
        down (its copies must stop being served at once: see LeaseKeeper).
        """
        keeper = LeaseKeeper(self.registry, self.entry.registry_key, self.id, self.lease, str(self.entry))
        keeper.on_lost = on_lost
        settled = False
        try:
            with domain_errors_ungrouped():
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(keeper.run, nursery.cancel_scope)
                    yield keeper
                    nursery.cancel_scope.cancel()
            settled = True
        except MxfsError as exc:
            settled = True
            await self.finish(Status.ERROR, str(exc))
            raise
        finally:
            if not settled and not keeper.lost:
                # Cancelled: the daemon is stopping. Hand the claim back now rather than leave
                # others (and our own restart, which resumes the partial files) waiting for the
                # lease to run out.
                with trio.move_on_after(RELEASE_TIMEOUT, shield=True):
                    await self.finish(Status.ERROR, "interrupted: the downloading daemon stopped")
        if keeper.lost:
            raise LeaseLost(f"{self.entry}: lease lost, stopped writing")
        if await self.finish(Status.DOWNLOADED, None) is False:
            log.warning("%s: finished, but another node had taken the claim over", self.entry)

    async def finish(self, status: Status, message: str | None) -> bool | None:
        """Publish the outcome: True, False if another node owns the claim now, None if the
        registry could not be reached (logged here)."""
        try:
            return await self.registry.finish_claim(self.entry.registry_key, self.id, status, message, self.entry.size)
        except RegistryError as exc:
            log.error("%s: could not record %s in the registry: %s", self.entry, status, exc)
            return None


__all__ = ["RELEASE_TIMEOUT", "Claim", "LeaseLost"]
