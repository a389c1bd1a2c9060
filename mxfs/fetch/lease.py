"""The download owner's lease: renewed every ``lease/3``, and never trusted past its expiry.

Another node takes an entry over once its owner's lease has lapsed, so the owner must have
stopped writing by then, whatever the registry does.  Two things can make it lapse:

* the registry says the claim is someone else's now (``refresh_claim`` returns False);
* no renewal has succeeded for a while.  A registry that does not answer at all (a network
  partition, a frozen server) holds a renewal call until its socket timeout, which can be longer
  than the lease; so the deadline is kept by a task of its own, not by the renewal call
  returning.  The registry's clock decides the expiry, so the owner gives up a margin early.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import trio

from mxfs.registry import Registry, RegistryError

log = logging.getLogger(__name__)

# Renew this often (a fraction of the lease): two renewals may fail before the lease is at risk.
RENEW_FRACTION = 1 / 3
# After a failed renewal, try again this much sooner than a regular renewal.
RETRY_FRACTION = 1 / 10
# Trust a renewal for this fraction of the lease, counted from when it was sent: the rest is the
# margin for clock rates and for the time the registry took to apply it.
TRUST_FRACTION = 0.8


class LeaseKeeper:
    """Keeps one claim's lease alive for as long as a download runs."""

    def __init__(self, registry: Registry, registry_key: str, claim_id: str, lease: float, label: str) -> None:
        self.registry = registry
        self.registry_key = registry_key
        self.claim_id = claim_id
        self.lease = lease
        self.label = label  # the entry, for log lines
        self.lost = False
        self._trust = trio.CancelScope()
        # Called once, at the moment the lease stops being trusted (before the download's
        # tasks have wound down): the copy being written must stop being served at once.
        self.on_lost: Callable[[], None] | None = None

    async def run(self, download_scope: trio.CancelScope) -> None:
        """Renew until cancelled; the moment the lease cannot be trusted, cancel ``download_scope``.

        The claim is taken to have been made just before this starts.  Trust is a cancel scope
        whose deadline each successful renewal moves forward.
        """
        async with trio.open_nursery() as nursery:
            with trio.CancelScope(deadline=trio.current_time() + self.lease * TRUST_FRACTION) as self._trust:
                nursery.start_soon(self._renew, download_scope, nursery.cancel_scope)
                await trio.sleep_forever()
            self._give_up(download_scope, "could not renew the lease in time; stopping the download", logging.ERROR)
            # A renewal stuck in an unresponsive registry may keep this nursery open until its
            # call times out; the download has already stopped writing.
            nursery.cancel_scope.cancel()

    @property
    def trusted_until(self) -> float:
        return self._trust.deadline

    async def _renew(self, download_scope: trio.CancelScope, keeper_scope: trio.CancelScope) -> None:
        delay = self.lease * RENEW_FRACTION
        while True:
            await trio.sleep(delay)
            sent_at = trio.current_time()
            try:
                renewed = await self.registry.refresh_claim(self.registry_key, self.claim_id, self.lease)
            except RegistryError as exc:
                log.warning(
                    "%s: lease renewal failed (%s); retrying, %.1fs of trust left",
                    self.label,
                    exc,
                    max(self.trusted_until - trio.current_time(), 0.0),
                )
                delay = self.lease * RETRY_FRACTION
                continue
            if not renewed:
                self._give_up(download_scope, "lost the download lease to another node; stopping")
                keeper_scope.cancel()
                return
            self._trust.deadline = max(self._trust.deadline, sent_at + self.lease * TRUST_FRACTION)
            delay = self.lease * RENEW_FRACTION

    def _give_up(self, download_scope: trio.CancelScope, why: str, level: int = logging.WARNING) -> None:
        if not self.lost:
            log.log(level, "%s: %s", self.label, why)
            self.lost = True
            if self.on_lost is not None:
                self.on_lost()
        download_scope.cancel()
