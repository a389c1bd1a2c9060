"""The retry policies: the delays each layer waits between tries, and where it gives up."""

from __future__ import annotations

import random

import pytest

from mxfs.fetch.fetcher import ENTRY_RETRY
from mxfs.hub import HUB_RETRY
from mxfs.registry.kubernetes.api import API_RETRY
from mxfs.retry import RetryPolicy


def test_delays_double_up_to_the_cap() -> None:
    policy = RetryPolicy(attempts=5, initial_delay=0.5, max_delay=10.0)
    assert [policy.delay(i) for i in range(7)] == [0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    assert all(policy.delay(i) <= policy.max_delay for i in range(100))


def test_attempts_are_counted_with_the_first_try() -> None:
    policy = RetryPolicy(attempts=3, initial_delay=1.0, max_delay=1.0)
    assert [policy.gives_up_after(n) for n in (1, 2, 3, 4)] == [False, False, True, True]


def test_jitter_waits_half_to_all_of_each_delay() -> None:
    policy = RetryPolicy(attempts=5, initial_delay=0.25, max_delay=2.0, jitter=True)
    random.seed(7)
    for retry, full in enumerate((0.25, 0.5, 1.0, 2.0)):
        delays = [policy.delay(retry) for _ in range(200)]
        assert all(full / 2 <= d <= full for d in delays)
        assert max(delays) - min(delays) > full / 4  # spread, not one value


@pytest.mark.parametrize(
    ("policy", "attempts", "delays"),
    [
        (HUB_RETRY, 5, [0.5, 1.0, 2.0, 4.0]),  # one Hub request
        (ENTRY_RETRY, 3, [2.0, 4.0]),  # one entry's download attempts
    ],
)
def test_each_layer_keeps_its_delays(policy: RetryPolicy, attempts: int, delays: list[float]) -> None:
    assert policy.attempts == attempts
    assert [policy.delay(i) for i in range(attempts - 1)] == delays


def test_the_kubernetes_api_retries_with_jitter() -> None:
    assert API_RETRY.attempts == 5 and API_RETRY.jitter
    assert [API_RETRY.delay(i) <= 0.25 * 2**i for i in range(4)] == [True] * 4
