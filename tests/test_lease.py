"""The download owner's lease keeper: renews every lease/3, and stops the download before the
lease can lapse, whether the registry says no, fails, or does not answer at all.

Run on trio's autojump clock: the registries below answer in virtual time.
"""

from __future__ import annotations

import logging

import pytest
import trio

from mxfs.fetch.lease import RENEW_FRACTION, TRUST_FRACTION, LeaseKeeper
from mxfs.registry import RegistryError

LEASE = 30.0


class Registry:
    """``refresh_claim`` as a registry would answer it: by a script of outcomes, one per call.

    ``"ok"``/``"lost"`` answer True/False, ``"error"`` raises RegistryError, ``"hang"`` holds
    the call for ``hang_for`` seconds and cannot be cancelled (a worker thread blocked in a
    socket read), then raises.  The last outcome repeats.
    """

    def __init__(self, *script: str, hang_for: float = 100.0) -> None:
        self.script = list(script)
        self.hang_for = hang_for
        self.calls: list[float] = []

    async def refresh_claim(self, name: str, claim_id: str, lease: float) -> bool:
        assert (name, claim_id, lease) == ("entry", "claim", LEASE)
        self.calls.append(trio.current_time())
        outcome = self.script.pop(0) if len(self.script) > 1 else self.script[0]
        if outcome == "hang":
            with trio.CancelScope(shield=True):
                await trio.sleep(self.hang_for)
            raise RegistryError("registry redis://x: Timeout reading from socket")
        if outcome == "error":
            raise RegistryError("registry redis://x: Connection refused")
        return outcome == "ok"


async def download_under(keeper: LeaseKeeper, runs_for: float) -> float | None:
    """Run a pretend download of ``runs_for`` seconds under ``keeper``; when it was stopped, or None."""
    stopped_at = None
    async with trio.open_nursery() as nursery:
        nursery.start_soon(keeper.run, nursery.cancel_scope)
        try:
            await trio.sleep(runs_for)
        except trio.Cancelled:
            stopped_at = trio.current_time()  # the keeper stopped the download
            raise
        nursery.cancel_scope.cancel()  # finished: the end of the download ends its keeper
    return stopped_at


def keeper_for(registry: Registry) -> LeaseKeeper:
    return LeaseKeeper(registry, "entry", "claim", LEASE, "org/model@abc")  # type: ignore[arg-type]


async def test_a_healthy_registry_keeps_the_download_going(autojump_clock: trio.abc.Clock) -> None:
    registry = Registry("ok")
    keeper = keeper_for(registry)
    start = trio.current_time()
    # Ends between two renewals: at a renewal's instant the order of the two would be a toss-up.
    assert await download_under(keeper, 10.5 * LEASE) is None
    assert not keeper.lost
    gaps = [b - a for a, b in zip([start, *registry.calls], registry.calls, strict=False)]
    assert len(registry.calls) == 31
    assert all(gap == pytest.approx(LEASE * RENEW_FRACTION) for gap in gaps)


async def test_a_claim_taken_by_another_node_stops_the_download_at_once(
    autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    registry = Registry("ok", "lost")
    keeper = keeper_for(registry)
    start = trio.current_time()
    stopped = await download_under(keeper, 10 * LEASE)
    assert keeper.lost
    assert stopped == pytest.approx(start + 2 * LEASE * RENEW_FRACTION)
    assert "lost the download lease to another node" in caplog.text


async def test_failing_renewals_are_retried_then_the_download_stops_before_the_lease_lapses(
    autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    registry = Registry("ok", "error")
    keeper = keeper_for(registry)
    start = trio.current_time()
    stopped = await download_under(keeper, 10 * LEASE)
    assert keeper.lost
    last_renewal = registry.calls[0]
    assert stopped == pytest.approx(last_renewal + TRUST_FRACTION * LEASE)
    assert stopped < start + LEASE * (RENEW_FRACTION + 1)  # before the renewed lease lapses
    assert len(registry.calls) > 3, "failed renewals are retried sooner than every lease/3"
    assert "lease renewal failed" in caplog.text
    assert "could not renew the lease in time" in caplog.text


async def test_one_failed_renewal_is_survived(autojump_clock: trio.abc.Clock) -> None:
    keeper = keeper_for(Registry("error", "ok"))
    assert await download_under(keeper, 5 * LEASE) is None
    assert not keeper.lost


async def test_a_registry_that_does_not_answer_cannot_hold_the_download_past_its_lease(
    autojump_clock: trio.abc.Clock,
) -> None:
    # The first renewal hangs for longer than the whole lease (a frozen server, a partition):
    # the download must stop on time anyway, not when the call finally times out.
    registry = Registry("hang", hang_for=3 * LEASE)
    keeper = keeper_for(registry)
    start = trio.current_time()
    stopped = await download_under(keeper, 10 * LEASE)
    assert keeper.lost
    assert stopped == pytest.approx(start + TRUST_FRACTION * LEASE)
    assert registry.calls == [pytest.approx(start + LEASE * RENEW_FRACTION)]
